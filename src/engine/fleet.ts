/**
 * The fleet as placement and operators see it, read from the database every API node shares:
 * which hosts may take VMs now, what each can still place, and why a host cannot.
 *
 * A host takes new VMs only when all of these hold (fail closed: each is an observed fact):
 *   - its machine is `ready` (not registering, cordoned, draining, in maintenance or removed);
 *   - its agent is heard: a heartbeat within `silentMs` (agents.heartbeat_at, the database's clock),
 *     and no API node has recorded it silent since (hosts.silent_since);
 *   - its agent's current epoch has judged the host against the log (agents.ready_at).
 */
import { sql, type Kysely } from 'kysely';
import type { Database } from '../store/schema.ts';
import { PREPARED } from '../store/db.ts';
import { capacityOf, GPU_COUNTS, type GpuCount, type HostView } from './placement.ts';

/** The boards a request may pin, matched as a word of the product name nvidia-smi reports. */
export const BOARD_NAMES = ['b200', 'b300', 'h100', 'h200'] as const;
export type BoardName = (typeof BOARD_NAMES)[number];

/** The most-used hosts that fit a request, scored in memory; placement keeps 1,000-host fleets under a millisecond of scoring. */
export const SHORTLIST = 64;

/** Why a host takes no new VM now, or null when it does. */
export type HostAvailability = 'ready' | 'registering' | 'starting' | 'cordoned' | 'draining' | 'maintenance' | 'removed' | 'unreachable';

export interface HostStatusRow {
  id: string;
  board: string;
  state: string;
  silent_since: Date | null;
  heartbeat_at: Date | null;
  ready_at: Date | null;
  heard: boolean;
  epoch: string | null;
  vm_defaults: Record<string, unknown> | null;
}

export function availability(h: Pick<HostStatusRow, 'state' | 'silent_since' | 'heard' | 'ready_at'>): HostAvailability {
  if (h.state === 'removed') return 'removed';
  if (!h.heard || h.silent_since !== null) return 'unreachable';
  if (h.state === 'registered') return 'registering';
  if (h.state !== 'ready') return h.state as HostAvailability;
  return h.ready_at === null ? 'starting' : 'ready';
}

const heardSql = (silentMs: number) => sql<boolean>`coalesce(a.heartbeat_at >= now() - make_interval(secs => ${silentMs / 1000}), false)`;

/** Every host with its state, its agent's last heartbeat, and whether it is heard. */
export async function readHostStatus(db: Kysely<Database>, silentMs: number, hostId?: string): Promise<HostStatusRow[]> {
  const { rows } = await sql<HostStatusRow>`
    select h.id, h.board, h.state, h.silent_since, a.heartbeat_at, a.ready_at, a.epoch::text as epoch, a.vm_defaults,
           ${heardSql(silentMs)} as heard
    from hosts h left join agents a on a.host_id = h.id
    ${hostId === undefined ? sql`` : sql`where h.id = ${hostId}`}
    order by h.id`.execute(db);
  return rows;
}

export interface PlacementRequest {
  size: GpuCount;
  /** Only this host. */
  hostId?: string;
  /** Only hosts of this board. */
  board?: BoardName;
}

export interface FleetCandidates {
  hosts: HostView[];
  /** Each shortlisted host's VM sizes and powerdown timeout, as its agent published them. */
  vmDefaults: Map<string, Record<string, unknown> | null>;
}

/**
 * The hosts a request could go to: placeable now, matching its pins, holding a free partition of its
 * size whose modules are unclaimed and healthy — the `SHORTLIST` most used of them, each with its
 * whole partition table, claims and quarantined modules, for the policy to score. One statement;
 * it is advice: the claim's primary key and the partition's stream version decide (src/engine/vms.ts).
 */
export async function readCandidates(db: Kysely<Database>, req: PlacementRequest, silentMs: number): Promise<FleetCandidates> {
  // Most used first, and only as far as needed: the placeable hosts are ranked by their claims (one
  // pass over gpu_claims), then each is checked for a fitting partition through its own index scans,
  // in rank order, until SHORTLIST fit. The ranked subquery is kept whole (OFFSET 0) and the check is
  // a LATERAL with LIMIT 1, so the plan is a nested loop reading the ranking in order and stopping at
  // the LIMIT: a fleet of mostly full hosts costs the ranking plus a few dozen per-host checks, not a
  // join of every free partition with every claim. The final ORDER BY restates the order.
  const { rows } = await sql<{ host_id: string; board: string; quarantined: Record<string, unknown>; claimed: number[]; partitions: { partitionId: number; modules: number[]; state: string }[]; vm_defaults: Record<string, unknown> | null }>`${sql.raw(PREPARED)}
    with shortlist as (
      select r.id, r.used, r.board, r.quarantined_modules, r.vm_defaults
      from (
        select h.id, h.board, h.quarantined_modules, a.vm_defaults, coalesce(u.used, 0) as used
        from hosts h join agents a on a.host_id = h.id
          left join (select c.host_id, count(*) as used from gpu_claims c group by c.host_id) u on u.host_id = h.id
        where h.state = 'ready' and h.silent_since is null and a.ready_at is not null and ${heardSql(silentMs)}
          ${req.hostId === undefined ? sql`` : sql`and h.id = ${req.hostId}`}
          ${req.board === undefined ? sql`` : sql`and h.board ~* ${`\\m${req.board}\\M`}`}
        order by used desc, h.id
        offset 0
      ) r
      cross join lateral (
        select 1 from partitions p
        where p.host_id = r.id and p.size = ${req.size} and p.state = 'free'
          and not exists (select 1 from gpu_claims c where c.host_id = p.host_id and p.modules @> to_jsonb(c.module_id))
          and not exists (select 1 from jsonb_object_keys(r.quarantined_modules) q where p.modules @> to_jsonb(q::int))
        limit 1
      ) fits
      limit ${SHORTLIST}
    )
    select s.id as host_id, s.board, s.quarantined_modules as quarantined, s.vm_defaults,
           (select coalesce(json_agg(c.module_id), '[]') from gpu_claims c where c.host_id = s.id) as claimed,
           (select json_agg(json_build_object('partitionId', p.partition_id, 'modules', p.modules, 'state', p.state) order by p.partition_id)
              from partitions p where p.host_id = s.id) as partitions
    from shortlist s
    order by s.used desc, s.id`.execute(db);
  return {
    hosts: rows.map((r) => ({
      hostId: r.host_id,
      board: r.board,
      partitions: r.partitions,
      unavailable: new Set([...r.claimed, ...Object.keys(r.quarantined ?? {}).map(Number)]),
    })),
    vmDefaults: new Map(rows.map((r) => [r.host_id, r.vm_defaults])),
  };
}

export interface HostCapacity {
  hostId: string;
  board: string;
  availability: HostAvailability;
  /** VMs of each size that can be placed now: counted on activatable partitions, zero unless the host takes VMs. */
  placeable: Record<GpuCount, number>;
  /** The same, were the host taking VMs (what a cordoned or unreachable host holds back). */
  free: Record<GpuCount, number>;
  liveVms: number;
  claimedGpus: number;
}

const none = (): Record<GpuCount, number> => ({ 1: 0, 2: 0, 4: 0, 8: 0 });

/** Per host and for the fleet: how many VMs of 1, 2, 4 and 8 GPUs can be placed now. */
export async function readCapacity(db: Kysely<Database>, silentMs: number): Promise<{ hosts: HostCapacity[]; fleet: Record<GpuCount, number> }> {
  const status = await readHostStatus(db, silentMs);
  const { rows } = await sql<{ host_id: string; quarantined: Record<string, unknown>; claimed: number[]; partitions: { partitionId: number; modules: number[]; state: string }[] | null; live: string }>`
    select h.id as host_id, h.quarantined_modules as quarantined,
           (select coalesce(json_agg(c.module_id), '[]') from gpu_claims c where c.host_id = h.id) as claimed,
           (select json_agg(json_build_object('partitionId', p.partition_id, 'modules', p.modules, 'state', p.state)) from partitions p where p.host_id = h.id) as partitions,
           (select count(*) from vms v where v.host_id = h.id and v.state not in ('deleted', 'failed', 'crashed'))::text as live
    from hosts h`.execute(db);
  const byId = new Map(rows.map((r) => [r.host_id, r]));
  const fleet = none();
  const hosts = status.map((s) => {
    const r = byId.get(s.id)!;
    const view: HostView = {
      hostId: s.id,
      board: s.board,
      partitions: r.partitions ?? [],
      unavailable: new Set([...r.claimed, ...Object.keys(r.quarantined ?? {}).map(Number)]),
    };
    const free = capacityOf(view);
    const takes = availability(s) === 'ready';
    const placeable = takes ? free : none();
    for (const n of GPU_COUNTS) fleet[n] += placeable[n];
    return { hostId: s.id, board: s.board, availability: availability(s), placeable, free, liveVms: Number(r.live), claimedGpus: r.claimed.length };
  });
  return { hosts, fleet };
}

/** Whether a host's agent is unheard (its VMs' status is then `unknown`), by host id. */
export async function unreachableHosts(db: Kysely<Database>, silentMs: number): Promise<Set<string>> {
  const rows = await readHostStatus(db, silentMs);
  return new Set(rows.filter((r) => availability(r) === 'unreachable').map((r) => r.id));
}
