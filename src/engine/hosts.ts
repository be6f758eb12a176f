/**
 * Host registration: the first start on a host records its inventory on the host stream and one
 * REGISTER per partition, in one transaction. A partition `fmpm -l` already shows active was not
 * activated by gpuvm: it registers `active`, holding its GPUs' claims while it is repaired
 * (deactivated), so no VM is placed on it meanwhile. Later starts find the host known and keep its
 * recorded inventory (the GPUs may be on vfio-pci under running VMs, invisible to nvidia-smi);
 * each cycle re-verifies the module mapping while the GPUs are back on the host driver.
 */
import { sql, type Kysely } from 'kysely';
import { availability, readCapacity, readHostStatus, type HostAvailability } from './fleet.ts';
import type { GpuCount } from './placement.ts';
import { hostStream, partitionStream, vmStream, type HostContext } from '../../machines/index.ts';
import { takeInventory, type HostAdapters } from '../host/host.ts';
import type { Logger } from '../log.ts';
import { partitionRow, type PartitionRow } from '../store/projections.ts';
import type { Database } from '../store/schema.ts';
import { conflict, notFound } from '../errors.ts';
import { applyEvent, loadSnapshot, type EffectPolicy } from './commands.ts';
import { inTransaction } from './retrying.ts';

export async function registerHost(
  db: Kysely<Database>,
  host: HostAdapters,
  policy: EffectPolicy,
  log: Logger,
  opts: { expectedGpus?: { moduleId: number; pciAddress: string }[]; expectedBoard?: string } = {},
): Promise<{ registered: boolean; context: HostContext }> {
  const existing = await loadSnapshot(db, hostStream(host.hostId));
  if (existing) return { registered: false, context: existing.context as unknown as HostContext };

  const { activePartitions, ...inventory } = await takeInventory(host, opts);
  const active = new Set(activePartitions);
  // A repair of an active partition waits for any QEMU already running: it may be using those GPUs.
  const strayQemu = active.size > 0 ? (await host.qemu.running()).map((q) => q.vmId) : [];
  const pci = new Map(inventory.gpus.map((g) => [g.moduleId, g.pciAddress]));
  const meta = { actor: 'gpuvm:register', correlationId: hostStream(host.hostId), causationId: null };
  const context = await inTransaction(db, async (tx) => {
    const result = await applyEvent(tx, hostStream(host.hostId), { type: 'REGISTER', hostId: host.hostId, simulated: host.simulated, inventory }, meta, policy);
    if (result.kind !== 'changed') throw new Error(`host ${host.hostId} was registered concurrently`);
    for (const p of inventory.partitions) {
      await applyEvent(
        tx,
        partitionStream(host.hostId, p.id),
        {
          type: 'REGISTER',
          hostId: host.hostId,
          partitionId: p.id,
          gpus: p.modules.map((m) => ({ moduleId: m, pciAddress: pci.get(m)! })),
          ...(active.has(p.id) ? { active: true, strayQemu } : {}),
        },
        meta,
        policy,
      );
    }
    return result.snapshot.context as unknown as HostContext;
  });
  log.info({ hostId: host.hostId, board: inventory.board, gpus: inventory.gpus.length, partitions: inventory.partitions.length, activeAtRegistration: [...active] }, 'host registered');
  return { registered: true, context };
}

export interface HostSummary {
  id: string;
  board: string;
  simulated: boolean;
  registeredAt: Date;
  /** The host machine's state: registered, ready, cordoned, draining, maintenance, removed. */
  state: string;
  /** Whether it takes new VMs now, or why not (src/engine/fleet.ts). */
  availability: HostAvailability;
  cordon: HostContext['cordon'] | null;
  agent: { epoch: number; lastHeartbeat: Date; readyAt: Date | null } | null;
  silentSince: Date | null;
  /** VMs of each size that could be placed on it now (were it taking VMs: see availability). */
  free: Record<GpuCount, number>;
  liveVms: number;
  gpus: { moduleId: number; pciAddress: string }[];
  quarantinedModules: Record<string, { reason: string; source: string }>;
  quarantinedPartitions: { partitionId: number; failure: string | null }[];
}

export async function listHosts(db: Kysely<Database>, silentMs: number): Promise<HostSummary[]> {
  const hosts = await db.selectFrom('hosts').innerJoin('streams', (j) => j.on(sql`streams.stream_id`, '=', sql`'host:' || hosts.id`)).select(['hosts.id', 'hosts.board', 'hosts.simulated', 'hosts.registered_at', 'hosts.inventory', 'hosts.quarantined_modules', 'streams.context']).orderBy('hosts.id').execute();
  const status = new Map((await readHostStatus(db, silentMs)).map((s) => [s.id, s]));
  const capacity = new Map((await readCapacity(db, silentMs)).hosts.map((c) => [c.hostId, c]));
  const quarantined = await db.selectFrom('partitions').select(['host_id', 'partition_id', 'failure']).where('state', '=', 'quarantined').execute();
  return hosts.map((h) => {
    const s = status.get(h.id)!;
    const c = capacity.get(h.id)!;
    return {
      id: h.id,
      board: h.board,
      simulated: h.simulated,
      registeredAt: new Date(h.registered_at),
      state: s.state,
      availability: availability(s),
      cordon: (h.context as unknown as HostContext).cordon ?? null,
      agent: s.epoch === null ? null : { epoch: Number(s.epoch), lastHeartbeat: new Date(s.heartbeat_at!), readyAt: s.ready_at ? new Date(s.ready_at) : null },
      silentSince: s.silent_since ? new Date(s.silent_since) : null,
      free: c.free,
      liveVms: c.liveVms,
      gpus: ((h.inventory as { gpus?: { moduleId: number; pciAddress: string }[] }).gpus ?? []).map((g) => ({ moduleId: g.moduleId, pciAddress: g.pciAddress })),
      quarantinedModules: h.quarantined_modules,
      quarantinedPartitions: quarantined.filter((p) => p.host_id === h.id).map((p) => ({ partitionId: p.partition_id, failure: p.failure })),
    };
  });
}

/**
 * An operator returns quarantined GPUs or partitions to service: one module, one partition, or
 * everything on the host. Returns what was cleared; clearing nothing is an error that says so.
 */
export async function clearQuarantine(
  db: Kysely<Database>,
  hostId: string,
  what: { moduleId?: number; partitionId?: number; all?: boolean },
  actor: string,
  policy: EffectPolicy,
): Promise<{ modules: number[]; partitions: number[] }> {
  return inTransaction(db, async (tx) => {
    const snapshot = await loadSnapshot(tx, hostStream(hostId));
    if (!snapshot) throw notFound(`no host ${hostId}`);
    const meta = { actor, correlationId: hostStream(hostId), causationId: null };
    const quarantinedModules = Object.keys((snapshot.context as unknown as HostContext).quarantinedModules).map(Number);
    const modules = what.all ? quarantinedModules : what.moduleId !== undefined ? quarantinedModules.filter((m) => m === what.moduleId) : [];
    if (modules.length > 0) {
      await applyEvent(tx, hostStream(hostId), { type: 'CLEAR_QUARANTINE', moduleId: what.all ? null : what.moduleId!, by: actor }, meta, policy);
    }
    let q = tx.selectFrom('partitions').select('partition_id').where('host_id', '=', hostId).where('state', '=', 'quarantined');
    if (!what.all) q = q.where('partition_id', '=', what.partitionId ?? -1);
    const partitions = (await q.execute()).map((p) => p.partition_id);
    for (const id of partitions) {
      await applyEvent(tx, partitionStream(hostId, id), { type: 'CLEAR_QUARANTINE', by: actor }, meta, policy);
    }
    if (modules.length === 0 && partitions.length === 0) {
      const target = what.all ? 'nothing' : what.moduleId !== undefined ? `module ${what.moduleId}` : `partition ${what.partitionId}`;
      throw conflict('not-quarantined', `${target} on host ${hostId} is not quarantined`);
    }
    return { modules, partitions };
  });
}

/**
 * An operator's way out for a partition whose release (`broken`) or repair (`unrepaired`) failed for
 * good: REPAIR, which observes first, waits for the holding VM's QEMU to be gone, rebinds the GPUs to
 * the host driver and deactivates (machines/partition.ts). Returns the partition as it is now
 * (`repairing`). A quarantined partition is not repaired here: clear-quarantine returns it.
 */
export async function repairPartition(
  db: Kysely<Database>,
  hostId: string,
  partitionId: number,
  actor: string,
  policy: EffectPolicy,
): Promise<PartitionRow> {
  return inTransaction(db, async (tx) => {
    if (!(await loadSnapshot(tx, hostStream(hostId)))) throw notFound(`no host ${hostId}`);
    const streamId = partitionStream(hostId, partitionId);
    const snapshot = await loadSnapshot(tx, streamId);
    if (!snapshot) throw notFound(`no partition ${partitionId} on host ${hostId}`);
    if (snapshot.state !== 'broken' && snapshot.state !== 'unrepaired') {
      throw conflict('not-broken', `partition ${partitionId} on host ${hostId} is ${snapshot.state}, not broken or unrepaired: nothing to repair`);
    }
    const result = await applyEvent(tx, streamId, { type: 'REPAIR', by: actor }, { actor, correlationId: streamId, causationId: null }, policy);
    if (result.kind !== 'changed') throw conflict('not-broken', `partition ${partitionId} on host ${hostId} cannot be repaired from ${snapshot.state}`);
    return partitionRow(result.snapshot);
  });
}

export type HostLifecycleCommand =
  | { type: 'cordon'; reason: string | null }
  | { type: 'uncordon' }
  | { type: 'drain'; reason: string | null; deleteVms: boolean }
  | { type: 'remove' };

/**
 * An operator takes a host out of placement or puts it back, as events on the host stream with the
 * operator as actor. `drain` cordons and waits for the host's VMs to end (an API node's fleet watch
 * records DRAINED once none is left and no GPU is claimed: src/engine/fleet-watch.ts); with
 * `deleteVms` it asks for each live VM's deletion in the same transaction. GPU VMs cannot be
 * live-migrated: a drain ends them or waits for their owners to. `remove` takes only an empty host.
 */
export async function changeHost(
  db: Kysely<Database>,
  hostId: string,
  command: HostLifecycleCommand,
  actor: string,
  policy: EffectPolicy,
  requestId: string,
): Promise<{ host: { id: string; state: string }; deletedVms: string[] }> {
  const written = await inTransaction(db, async (tx) => {
    const streamId = hostStream(hostId);
    const snapshot = await loadSnapshot(tx, streamId);
    if (!snapshot) throw notFound(`no host ${hostId}`);
    const meta = { actor, correlationId: streamId, causationId: `request:${requestId}` };
    const live = await tx.selectFrom('vms').select(['id', 'state']).where('host_id', '=', hostId).where('state', 'not in', ['deleted', 'failed', 'crashed']).execute();
    if (command.type === 'remove') {
      const claimed = await tx.selectFrom('gpu_claims').select('module_id').where('host_id', '=', hostId).execute();
      if (live.length > 0 || claimed.length > 0) {
        throw conflict(
          'host-not-empty',
          `host ${hostId} is not empty (${live.length} live VM${live.length === 1 ? '' : 's'}, ${claimed.length} claimed GPU${claimed.length === 1 ? '' : 's'}): drain it first (gpuvm host drain ${hostId} --delete-vms)`,
        );
      }
    }
    const event =
      command.type === 'cordon' ? { type: 'CORDON', by: actor, reason: command.reason }
      : command.type === 'uncordon' ? { type: 'UNCORDON', by: actor }
      : command.type === 'drain' ? { type: 'DRAIN', by: actor, reason: command.reason, deleteVms: command.deleteVms }
      : { type: 'REMOVE', by: actor };
    const result = await applyEvent(tx, streamId, event, meta, policy);
    const already = { cordon: 'cordoned', uncordon: 'ready', drain: 'draining', remove: 'removed' }[command.type];
    if (result.kind === 'rejected' && snapshot.state !== already) {
      throw conflict('bad-state', `host ${hostId} is ${snapshot.state}: it cannot be ${{ cordon: 'cordoned', uncordon: 'uncordoned', drain: 'drained', remove: 'removed' }[command.type]} from there`);
    }
    const deletedVms: string[] = [];
    if (command.type === 'drain' && command.deleteVms) {
      for (const vm of live) {
        const r = await applyEvent(tx, vmStream(vm.id), { type: 'DELETE' }, { actor, correlationId: vm.id, causationId: `request:${requestId}` }, policy);
        if (r.kind === 'changed') deletedVms.push(vm.id);
      }
    }
    return { host: { id: hostId, state: result.kind === 'changed' ? result.snapshot.state : snapshot.state }, deletedVms };
  });
  return written;
}
