/**
 * Incident replay: what the log says a VM, its partition or a whole host looked like at a moment.
 *
 * A moment is a time (events recorded at or before it) or a log position (events at or below it).
 * Every answer is a fold of the streams' events up to that moment through today's machines — the
 * projections are never read, so a replay does not depend on them being right.
 */
import { sql, type Kysely } from 'kysely';
import {
  hostStream,
  partitionHoldsClaim,
  partitionStream,
  vmStream,
  type HostContext,
  type PartitionContext,
  type Quarantine,
  type VmContext,
} from '../../machines/index.ts';
import { GpuvmError, notFound } from '../errors.ts';
import { readStreams, type Executor, type StoredEvent } from '../store/events.ts';
import type { StreamSnapshot } from '../store/projections.ts';
import type { Database } from '../store/schema.ts';
import { fold } from './decide.ts';
import { ACTIVE_IN_LOG } from './fabric-manager.ts';

/** The moment to replay to; with neither field, the end of the log. With both, an event must satisfy both. */
export interface ReplayPoint {
  time?: Date;
  /**
   * A global log position (decimal digits). The cut is at a transaction boundary: every event of the
   * transaction that wrote this position (or, where no event holds it, the nearest position below it)
   * and of the transactions before it in the global order (tx_id, position), none of later ones. One
   * step statement commits several events (a partition's CLAIM and its VM's CREATE), and a cut inside
   * it would show a pair of states that never existed.
   */
  position?: string;
}

/**
 * Where a position cut ends: the transaction that wrote the position, and the last position it wrote
 * (the cut ends there in the global order). null: the log held nothing at or below the position.
 */
export interface PositionCut {
  txId: string;
  through: string;
}

export interface ReplayedStream {
  streamId: string;
  state: string;
  context: Record<string, unknown>;
  version: number;
  machineVersion: number;
  /** The last event folded: the step this snapshot is the result of. */
  lastEvent: { position: string; type: string; recordedAt: Date };
}

/**
 * The moment replayed. `through`: with a position, the last position of the transaction the cut ends
 * with (the events folded are those up to it in the global order); null otherwise, or when nothing
 * was logged at or below the position.
 */
export interface ReplayMoment {
  time: Date | null;
  position: string | null;
  through: string | null;
}

export interface VmReplay {
  vmId: string;
  at: ReplayMoment;
  vm: ReplayedStream;
  /** The VM's partition at the same moment. */
  partition: ReplayedStream | null;
}

export interface ReplayedGpu {
  moduleId: number;
  pciAddress: string;
  /** From the log: on vfio-pci between its partition's BOUND_VFIO and BOUND_HOST, else on nvidia. */
  driver: 'vfio-pci' | 'nvidia';
  /** The partition holding the GPU's claim, and its VM. */
  partitionId: number | null;
  vmId: string | null;
}

export interface HostReplay {
  hostId: string;
  at: ReplayMoment;
  host: ReplayedStream;
  /** Partitions Fabric Manager had (or may still have had) active: states in ACTIVE_IN_LOG. */
  activePartitions: { partitionId: number; state: string; vmId: string | null; modules: number[] }[];
  gpus: ReplayedGpu[];
  /** VMs of this host that existed then and were not deleted. */
  vms: { id: string; state: string; partitionId: number }[];
  quarantinedModules: Record<string, Quarantine>;
  quarantinedPartitions: number[];
}

/** The log cannot be folded by today's machines: a corrupt or too-new history. */
export class HistoryFoldError extends GpuvmError {
  constructor(
    readonly streamId: string,
    detail: string,
  ) {
    super(500, 'history-does-not-fold', `stream ${streamId} does not replay: ${detail} (run \`gpuvm verify\`)`);
    this.name = 'HistoryFoldError';
  }
}

export function describePoint(at: ReplayPoint): string {
  const parts = [];
  if (at.time) parts.push(at.time.toISOString());
  if (at.position !== undefined) parts.push(`position ${at.position}`);
  return parts.length ? parts.join(' and ') : 'the end of the log';
}

/**
 * Whether an event had happened at the moment. Times compare at millisecond precision, as printed;
 * a time cut is already whole by transaction, since every event of one statement is recorded at its
 * now() (step.ts), the transaction's start. A position compares by transaction (`cut`, from
 * positionCut): the event's transaction is the cut's or before it.
 */
export function happenedBy(e: StoredEvent, at: ReplayPoint, cut?: PositionCut | null): boolean {
  if (at.time && e.recordedAt.getTime() > at.time.getTime()) return false;
  if (at.position !== undefined) {
    if (cut === undefined) throw new Error('a position replay needs its transaction cut (positionCut)');
    if (cut === null || BigInt(e.txId) > BigInt(cut.txId)) return false;
  }
  return true;
}

/** The transaction a position cut ends with: the one that wrote the position, or the nearest position below it. */
export async function positionCut(db: Executor, position: string): Promise<PositionCut | null> {
  const { rows } = await sql<PositionCut>`
    select e.tx_id::text as "txId", (select max(x.position) from events x where x.tx_id = e.tx_id)::text as through
    from events e where e.position <= ${position}::bigint order by e.position desc limit 1`.execute(db);
  return rows[0] ?? null;
}

/** A replay point resolved against the log: its position cut, if it has a position. */
interface Moment {
  at: ReplayPoint;
  cut: PositionCut | null | undefined;
}

async function resolve(db: Executor, at: ReplayPoint): Promise<Moment> {
  return { at, cut: at.position === undefined ? undefined : await positionCut(db, at.position) };
}

function foldUpTo(streamId: string, events: StoredEvent[], m: Moment): { snap: StreamSnapshot; last: StoredEvent; folded: StoredEvent[] } | null {
  const folded = events.filter((e) => happenedBy(e, m.at, m.cut));
  if (folded.length === 0) return null;
  let snap: StreamSnapshot | null;
  try {
    snap = fold(streamId, folded);
  } catch (err) {
    throw new HistoryFoldError(streamId, err instanceof Error ? err.message : String(err));
  }
  return { snap: snap!, last: folded.at(-1)!, folded };
}

function replayed(r: { snap: StreamSnapshot; last: StoredEvent }): ReplayedStream {
  return {
    streamId: r.snap.streamId,
    state: r.snap.state,
    context: r.snap.context,
    version: r.snap.version,
    machineVersion: r.snap.machineVersion,
    lastEvent: { position: r.last.position, type: r.last.type, recordedAt: r.last.recordedAt },
  };
}

/** Several reads that must see one moment of the database. */
function inSnapshot<T>(db: Kysely<Database>, work: (tx: Executor) => Promise<T>): Promise<T> {
  return db.transaction().setIsolationLevel('repeatable read').setAccessMode('read only').execute(work);
}

const pointJson = (m: Moment): ReplayMoment => ({ time: m.at.time ?? null, position: m.at.position ?? null, through: m.cut?.through ?? null });

/** The VM and its partition as of the moment. 404 when the VM is unknown or did not exist yet then. */
export async function replayVm(db: Kysely<Database>, vmId: string, at: ReplayPoint): Promise<VmReplay> {
  return inSnapshot(db, async (tx) => {
    const m = await resolve(tx, at);
    const vmStreamId = vmStream(vmId);
    const vmEvents = (await readStreams(tx, [vmStreamId])).get(vmStreamId)!;
    if (vmEvents.length === 0) throw notFound(`no VM ${vmId}`);
    const vm = foldUpTo(vmStreamId, vmEvents, m);
    if (!vm) {
      const created = vmEvents[0]!;
      throw notFound(
        `no VM ${vmId} at ${describePoint(at)}: it was created at ${created.recordedAt.toISOString()} (position ${created.position})`,
      );
    }
    const ctx = vm.snap.context as unknown as VmContext;
    let partition: ReplayedStream | null = null;
    if (ctx.hostId && ctx.partitionId >= 0) {
      const pStreamId = partitionStream(ctx.hostId, ctx.partitionId);
      const p = foldUpTo(pStreamId, (await readStreams(tx, [pStreamId])).get(pStreamId)!, m);
      partition = p ? replayed(p) : null;
    }
    return { vmId, at: pointJson(m), vm: replayed(vm), partition };
  });
}

/** Which partitions were active, which GPU was on which driver, which VMs ran on the host at the moment. */
export async function replayHost(db: Kysely<Database>, hostId: string, at: ReplayPoint): Promise<HostReplay> {
  return inSnapshot(db, async (tx) => {
    const m = await resolve(tx, at);
    const hStreamId = hostStream(hostId);
    const hostEvents = (await readStreams(tx, [hStreamId])).get(hStreamId)!;
    if (hostEvents.length === 0) throw notFound(`no host ${hostId}`);
    const host = foldUpTo(hStreamId, hostEvents, m);
    if (!host) {
      throw notFound(`host ${hostId} was not registered yet at ${describePoint(at)}: it was registered at ${hostEvents[0]!.recordedAt.toISOString()}`);
    }
    const hostCtx = host.snap.context as unknown as HostContext;

    // The host's partition streams, and its VMs: a VM names its host in its first event (CREATE).
    const prefix = `partition:${hostId}:`;
    const partitionIds = (
      await tx.selectFrom('events').select('stream_id').distinct().where('stream_id', 'like', `${prefix.replace(/[\\%_]/g, '\\$&')}%`).execute()
    )
      .map((r) => r.stream_id)
      .filter((id) => id.startsWith(prefix));
    const vmIds = (
      await tx
        .selectFrom('events')
        .select('stream_id')
        .where('stream_id', 'like', 'vm:%')
        .where('stream_version', '=', 1)
        .where(sql<string>`data->>'hostId'`, '=', hostId)
        .execute()
    ).map((r) => r.stream_id);
    const events = await readStreams(tx, [...partitionIds, ...vmIds]);

    const partitions = partitionIds
      .map((id) => foldUpTo(id, events.get(id)!, m))
      .filter((p) => p !== null)
      .map((p) => {
        const c = p.snap.context as unknown as PartitionContext;
        // The GPUs sit on vfio-pci from the cycle's BOUND_VFIO until its BOUND_HOST.
        const lastMove = p.folded.filter((e) => e.type === 'BOUND_VFIO' || e.type === 'BOUND_HOST').at(-1);
        return { id: c.partitionId, state: p.snap.state, ctx: c, onVfio: lastMove?.type === 'BOUND_VFIO' };
      })
      .sort((a, b) => a.id - b.id);

    const gpus = [...(hostCtx.inventory?.gpus ?? [])]
      .sort((a, b) => a.moduleId - b.moduleId)
      .map((g): ReplayedGpu => {
        const holder = partitions.find((p) => partitionHoldsClaim(p.state) && p.ctx.vmId && p.ctx.gpus.some((x) => x.moduleId === g.moduleId));
        const onVfio = partitions.some((p) => p.onVfio && p.ctx.gpus.some((x) => x.moduleId === g.moduleId));
        return {
          moduleId: g.moduleId,
          pciAddress: g.pciAddress,
          driver: onVfio ? 'vfio-pci' : 'nvidia',
          partitionId: holder?.id ?? null,
          vmId: holder?.ctx.vmId ?? null,
        };
      });

    const vms = vmIds
      .map((id) => foldUpTo(id, events.get(id)!, m))
      .filter((v) => v !== null && v.snap.state !== 'deleted')
      .map((v) => {
        const c = v!.snap.context as unknown as VmContext;
        return { id: c.vmId, state: v!.snap.state, partitionId: c.partitionId };
      })
      .sort((a, b) => a.id.localeCompare(b.id));

    return {
      hostId,
      at: pointJson(m),
      host: replayed(host),
      activePartitions: partitions
        .filter((p) => ACTIVE_IN_LOG.includes(p.state))
        .map((p) => ({ partitionId: p.id, state: p.state, vmId: p.ctx.vmId, modules: p.ctx.gpus.map((g) => g.moduleId) })),
      gpus,
      vms,
      quarantinedModules: hostCtx.quarantinedModules,
      quarantinedPartitions: partitions.filter((p) => p.state === 'quarantined').map((p) => p.id),
    };
  });
}

const ISO_TIME = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:?\d{2})$/;

/** An ISO 8601 time with a zone (e.g. 2025-01-02T03:04:05.678Z), or null: no rolling 02-30 over into March. */
export function parseIsoTime(text: string): Date | null {
  const m = ISO_TIME.exec(text);
  if (!m) return null;
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map((x) => Number(x ?? 0)) as [number, number, number, number, number, number];
  const fields = new Date(Date.UTC(y, mo - 1, d, h, mi, s));
  if (fields.getUTCFullYear() !== y || fields.getUTCMonth() !== mo - 1 || fields.getUTCDate() !== d || fields.getUTCHours() !== h || fields.getUTCMinutes() !== mi) return null;
  const time = new Date(text);
  return Number.isNaN(time.getTime()) ? null : time;
}

/** A global log position: decimal digits that fit a bigint. */
export const POSITION_PATTERN = /^[0-9]{1,18}$/;
