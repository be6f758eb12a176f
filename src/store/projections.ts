/**
 * Projections: read tables derived from each stream's snapshot. The row functions are pure, so the
 * same code writes them in the command's transaction and rebuilds them from the log (`rebuild.ts`).
 */
import { partitionHoldsClaim, type HostContext, type PartitionContext, type StreamKind, type VmContext } from '../../machines/index.ts';
import { isUniqueViolation } from './events.ts';
import type { StepWrite } from './step.ts';

/** A stream's state after its latest event. `state` is the machine's state value. */
export interface StreamSnapshot {
  streamId: string;
  kind: StreamKind;
  machineVersion: number;
  version: number;
  state: string;
  context: Record<string, unknown>;
  createdAt: Date;
  updatedAt: Date;
}

export interface VmRow {
  id: string;
  name: string;
  host_id: string;
  gpu_count: number;
  partition_id: number;
  gpus: { moduleId: number; pciAddress: string }[];
  state: string;
  reason: string | null;
  qemu_pid: number | null;
  created_at: Date;
  updated_at: Date;
}

export interface PartitionRow {
  host_id: string;
  partition_id: number;
  modules: number[];
  size: number;
  state: string;
  vm_id: string | null;
  failure: string | null;
  updated_at: Date;
}

export interface ClaimRow {
  host_id: string;
  module_id: number;
  partition_id: number;
  vm_id: string | null;
}

export interface HostRow {
  id: string;
  simulated: boolean;
  board: string;
  inventory: Record<string, unknown>;
  registered_at: Date;
  quarantined_modules: Record<string, { reason: string; source: string }>;
  state: string;
  silent_since: Date | null;
}

export function vmRow(s: StreamSnapshot): VmRow {
  const c = s.context as unknown as VmContext;
  return {
    id: c.vmId,
    name: c.name,
    host_id: c.hostId,
    gpu_count: c.gpuCount,
    partition_id: c.partitionId,
    gpus: c.gpus,
    state: s.state,
    reason: c.reason,
    qemu_pid: c.qemuPid,
    created_at: s.createdAt,
    updated_at: s.updatedAt,
  };
}

export function partitionRow(s: StreamSnapshot): PartitionRow {
  const c = s.context as unknown as PartitionContext;
  return {
    host_id: c.hostId,
    partition_id: c.partitionId,
    modules: c.gpus.map((g) => g.moduleId),
    size: c.gpus.length,
    state: s.state,
    vm_id: c.vmId,
    failure: c.failure,
    updated_at: s.updatedAt,
  };
}

export function claimRows(s: StreamSnapshot): ClaimRow[] {
  const c = s.context as unknown as PartitionContext;
  if (!partitionHoldsClaim(s.state)) return [];
  // vm_id is null while a drift repair holds the GPUs, or names the ended VM whose cycle a repair
  // finishes (ready or broken → repairing keeps context.vmId, so the rows inserted when the cycle
  // began stay equal to these until the repair drops them).
  return c.gpus.map((g) => ({ host_id: c.hostId, module_id: g.moduleId, partition_id: c.partitionId, vm_id: c.vmId }));
}

export function hostRow(s: StreamSnapshot): HostRow {
  const c = s.context as unknown as HostContext;
  return {
    id: c.hostId,
    simulated: c.simulated,
    board: c.inventory?.board ?? 'unknown',
    inventory: (c.inventory ?? {}) as unknown as Record<string, unknown>,
    registered_at: s.createdAt,
    quarantined_modules: c.quarantinedModules,
    state: s.state,
    silent_since: c.silentSince ? new Date(c.silentSince) : null,
  };
}

/** Another partition holds one of these GPUs' claims: the primary key that forbids claiming a GPU twice. */
export function isClaimConflict(err: unknown): boolean {
  return isUniqueViolation(err, 'gpu_claims_pkey');
}

/** A read row, with the table it belongs in. */
export type ReadRow = { table: 'vms'; row: VmRow } | { table: 'partitions'; row: PartitionRow } | { table: 'hosts'; row: HostRow };

/** The read row a snapshot maps to, and its table. */
export function readRowOf(s: StreamSnapshot): ReadRow {
  switch (s.kind) {
    case 'vm':
      return { table: 'vms', row: vmRow(s) };
    case 'partition':
      return { table: 'partitions', row: partitionRow(s) };
    case 'host':
      return { table: 'hosts', row: hostRow(s) };
  }
}

/**
 * How a step changes the GPU claims: a partition inserts them when it starts holding its GPUs (their
 * primary key is what makes two concurrent placements on overlapping modules impossible) and
 * releases them when it stops.
 */
export function claimChange(next: StreamSnapshot, previous: StreamSnapshot | null): StepWrite['claims'] {
  if (next.kind !== 'partition') return null;
  const held = previous !== null && partitionHoldsClaim(previous.state);
  const holds = partitionHoldsClaim(next.state);
  if (!held && holds) return { insert: claimRows(next) };
  if (held && !holds) {
    const c = next.context as unknown as PartitionContext;
    return { release: { hostId: c.hostId, partitionId: c.partitionId } };
  }
  return null;
}
