/**
 * Projections: read tables derived from each stream's snapshot. The row functions are pure, so the
 * same code writes them in the command's transaction and rebuilds them from the log (`rebuild.ts`).
 */
import type { Insertable } from 'kysely';
import { partitionHoldsClaim, type HostContext, type PartitionContext, type StreamKind, type VmContext } from '../../machines/index.ts';
import { isUniqueViolation, type Executor } from './events.ts';
import type { GpuClaimsTable, HostsTable, PartitionsTable, StreamsTable, VmsTable } from './schema.ts';

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
  // vm_id is null while a drift repair holds the GPUs.
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
  };
}

function streamRow(s: StreamSnapshot): Insertable<StreamsTable> {
  return {
    stream_id: s.streamId,
    machine: s.kind,
    machine_version: s.machineVersion,
    version: s.version,
    state: JSON.stringify(s.state),
    context: JSON.stringify(s.context),
    created_at: s.createdAt,
    updated_at: s.updatedAt,
  };
}

/** Another partition holds one of these GPUs' claims: the primary key that forbids claiming a GPU twice. */
export function isClaimConflict(err: unknown): boolean {
  return isUniqueViolation(err, 'gpu_claims_pkey');
}

/**
 * Writes the stream's snapshot and its read rows. `previous` is the snapshot before this event
 * (null for a new stream). GPU claims are inserted when a partition starts holding them: their
 * primary key is what makes two concurrent placements on overlapping modules impossible.
 */
export async function writeProjections(db: Executor, next: StreamSnapshot, previous: StreamSnapshot | null): Promise<void> {
  const row = streamRow(next);
  // The snapshot rides with the read row in one statement (a data-modifying CTE): one round trip.
  const withSnapshot = db.with('snapshot', (qb) =>
    previous === null ? qb.insertInto('streams').values(row) : qb.updateTable('streams').set(row).where('stream_id', '=', next.streamId),
  );

  switch (next.kind) {
    case 'vm': {
      const vm = vmRow(next);
      const values: Insertable<VmsTable> = { ...vm, gpus: JSON.stringify(vm.gpus) };
      await withSnapshot
        .insertInto('vms')
        .values(values)
        .onConflict((oc) => oc.column('id').doUpdateSet(values))
        .execute();
      return;
    }
    case 'partition': {
      const p = partitionRow(next);
      const values: Insertable<PartitionsTable> = { ...p, modules: JSON.stringify(p.modules) };
      await withSnapshot
        .insertInto('partitions')
        .values(values)
        .onConflict((oc) => oc.columns(['host_id', 'partition_id']).doUpdateSet(values))
        .execute();
      const held = previous !== null && partitionHoldsClaim(previous.state);
      const holds = partitionHoldsClaim(next.state);
      if (!held && holds) {
        const claims: Insertable<GpuClaimsTable>[] = claimRows(next);
        await db.insertInto('gpu_claims').values(claims).execute();
      } else if (held && !holds) {
        await db
          .deleteFrom('gpu_claims')
          .where('host_id', '=', p.host_id)
          .where('partition_id', '=', p.partition_id)
          .execute();
      }
      return;
    }
    case 'host': {
      const h = hostRow(next);
      const values: Insertable<HostsTable> = { ...h, inventory: JSON.stringify(h.inventory), quarantined_modules: JSON.stringify(h.quarantined_modules) };
      await withSnapshot
        .insertInto('hosts')
        .values(values)
        .onConflict((oc) => oc.column('id').doUpdateSet(values))
        .execute();
      return;
    }
  }
}
