/**
 * Steps of streams, written as ONE statement: for each step its event, the stream's snapshot, its
 * read row and GPU claims, the effects the event asks for, the stream's durable timers it cancels
 * and — for a worker recording an outcome — the effect it closes with that try. Every part is a JSON parameter, so the text depends only on
 * which parts the steps have (its shape), and Postgres prepares each shape once per connection; it
 * carries any number of steps of different streams, which is how several lifecycles share one round
 * trip and one commit (see StepBatcher). On its own it is one commit; inside a caller's
 * transaction, one round trip of it.
 *
 * Everything of a step hangs off its event's insert, and, when it closes an effect, the event's
 * insert hangs off the close (a step delivering another step's message, off that step's close:
 * `closesWith`): a worker that lost its lease writes nothing of that step. The guards
 * are the log's unique keys, as for appendEvents: a stream moved by another writer fails the
 * statement with ConcurrencyError, a re-delivered outcome with DuplicateCausationError, a GPU
 * claimed twice with gpu_claims' primary key.
 */
import { CompiledQuery, sql, type Kysely, type RawBuilder } from 'kysely';
import { EFFECTS_CHANNEL, PREPARED } from './db.ts';
import { mapAppendError, type Executor, type NewEvent } from './events.ts';
import type { ReadRow } from './projections.ts';
import type { Database } from './schema.ts';

/**
 * Stands for the statement's `now()` in the rows a step writes: the database's clock, which the
 * effects' `due_at` is compared with, and which is known only once the statement runs.
 */
export const NOW: Date = new Date(0);

export interface NewEffect {
  id: string;
  hostId: string;
  type: string;
  params: Record<string, unknown>;
  delayMs: number;
  maxAttempts: number;
  /** Inserted already leased to this worker (first try running), rather than pending. */
  leasedTo: string | null;
  /**
   * A message effect delivered in this same statement (its event is one of the statement's steps):
   * the row is born done, with its one try recorded under this name, and `note` says so.
   */
  deliveredBy: string | null;
  note: string | null;
}

/** The effect a worker's outcome closes, with its try (which started at the row's claimed_at), in the same statement. */
export interface EffectClose {
  effectId: string;
  workerId: string;
  /** The agent epoch the lease was taken under: the close is refused unless it is still the host's (src/engine/agent.ts). */
  epoch: number;
  attempt: number;
  /** Its last try was lost (recorded then): closing it records no new try. */
  noTry?: boolean;
  status: 'done' | 'failed';
  error: string | null;
  note: string | null;
}

export interface StepWrite {
  streamId: string;
  /** The stream's version before this event (0 for a new stream). */
  expectedVersion: number;
  event: Omit<NewEvent, 'recordedAt'>;
  /** The stream's snapshot after the event, as the streams table holds it; its dates may be NOW. */
  stream: { machine: string; machineVersion: number; version: number; state: unknown; context: unknown; createdAt: Date };
  readRow: ReadRow;
  claims: { insert: object[] } | { release: { hostId: string; partitionId: number } } | null;
  effects: NewEffect[];
  leaseMs: number;
  /** The epoch of the agent the leased effects are born to (see NewEffect.leasedTo). */
  leaseEpoch: number | null;
  /** NOTIFY this host's workers at commit (effects were left pending for them). */
  notifyHost: string | null;
  closes: EffectClose | null;
  /**
   * For a step that delivers a message of another step in the same statement: the effect that
   * step closes, so that a lost lease writes neither of them.
   */
  closesWith: string | null;
  /**
   * The stream left the state its pending durable timers were set in: they are cancelled, with
   * this note (null: none to cancel).
   */
  cancelTimers: string | null;
}

export interface StepWritten {
  position: string;
  /** The statement's now(): the event's recorded_at. */
  now: Date;
}

/** Each read table: its key, and its timestamp columns (a null there is the statement's now()). */
const READ_TABLES = {
  vms: { key: ['id'], columns: ['id', 'name', 'host_id', 'gpu_count', 'partition_id', 'gpus', 'state', 'reason', 'qemu_pid', 'created_at', 'updated_at'], stamped: ['created_at', 'updated_at'] },
  partitions: { key: ['host_id', 'partition_id'], columns: ['host_id', 'partition_id', 'modules', 'size', 'state', 'vm_id', 'failure', 'updated_at'], stamped: ['updated_at'] },
  hosts: { key: ['id'], columns: ['id', 'simulated', 'board', 'inventory', 'registered_at', 'quarantined_modules', 'state', 'silent_since'], stamped: ['registered_at'] },
} as const;

/** A row's NOW values become null, which the statement reads as now() (only top-level fields hold dates). */
function stamped(row: object): object {
  return Object.fromEntries(Object.entries(row).map(([k, v]) => [k, v === NOW ? null : v]));
}

function upsertReadRows(table: keyof typeof READ_TABLES, param: string): RawBuilder<unknown> {
  const t = READ_TABLES[table];
  const cols = sql.join(t.columns.map((c) => sql.id(c)));
  const values = sql.join(t.columns.map((c) => ((t.stamped as readonly string[]).includes(c) ? sql`coalesce(r.${sql.id(c)}, now())` : sql`r.${sql.id(c)}`)));
  const updates = sql.join(t.columns.filter((c) => !(t.key as readonly string[]).includes(c)).map((c) => sql`${sql.id(c)} = excluded.${sql.id(c)}`));
  return sql`${sql.id(`${table}_rows`)} as (
    insert into ${sql.table(table)} (${cols})
    select ${values}
    from jsonb_array_elements(${param}::jsonb) as j join ev on ev.stream_id = j->>'stream_id',
         jsonb_populate_record(null::${sql.table(table)}, j->'row') as r
    on conflict (${sql.join(t.key.map((k) => sql.id(k)))}) do update set ${updates})`;
}

/** The statement's parameters: JSON arrays, one per part. */
type Parts = Record<'closes' | 'events' | 'streams' | 'vms' | 'partitions' | 'hosts' | 'claims' | 'releases' | 'effects' | 'cancels' | 'notify', string>;

/** The optional parts: a statement holds only those its steps use (see compiledStatement). */
const OPTIONAL = ['closes', 'vms', 'partitions', 'hosts', 'claims', 'releases', 'effects', 'cancels', 'notify'] as const;
type Shape = Record<(typeof OPTIONAL)[number], boolean>;

/** A CTE, or nothing when the statement's steps have none of that part. */
const part = (present: boolean, cte: RawBuilder<unknown>) => (present ? sql`, ${cte}` : sql``);

const statement = (p: Parts & { channel: string }, has: Shape) => sql`${sql.raw(PREPARED)}
  with
  ${
    has.closes
      ? sql`closed as (
    update effects e
    set status = c.status, lease_owner = null, lease_until = null, last_error = c.error, note = c.note, completed_at = now()
    from jsonb_to_recordset(${p.closes}::jsonb) as c(effect_id text, worker text, epoch bigint, status text, error text, note text, attempt integer, no_try boolean)
    where e.id = c.effect_id and e.status = 'running' and e.lease_owner = c.worker and e.lease_epoch = c.epoch
      -- Fenced: an agent whose epoch a successor has replaced writes nothing.
      and exists (select 1 from agents a where a.host_id = e.host_id and a.epoch = c.epoch)
    returning e.id, c.worker, c.epoch, c.attempt, c.no_try, e.claimed_at, c.status, c.error),
  tried as (
    insert into effect_attempts (effect_id, attempt, worker, epoch, started_at, finished_at, outcome, error)
    select id, attempt, worker, epoch, claimed_at, now(), case when status = 'done' then 'ok' else 'error' end, error from closed where not no_try),`
      : sql``
  }
  ev as (
    insert into events (stream_id, stream_version, type, data, state_before, state_after, machine, machine_version,
                        causation_id, correlation_id, actor, recorded_at)
    select e.stream_id, e.stream_version, e.type, e.data, e.state_before, e.state_after, e.machine, e.machine_version,
           e.causation_id, e.correlation_id, e.actor, now()
    from jsonb_to_recordset(${p.events}::jsonb) as e(stream_id text, stream_version integer, type text, data jsonb, state_before jsonb,
           state_after jsonb, machine text, machine_version integer, causation_id text, correlation_id text, actor text, closes text)
    ${has.closes ? sql`where e.closes is null or e.closes in (select id from closed)` : sql``}
    returning stream_id, position, recorded_at),
  snap as (
    insert into streams (stream_id, machine, machine_version, version, state, context, created_at, updated_at)
    select s.stream_id, s.machine, s.machine_version, s.version, s.state, s.context, coalesce(s.created_at, now()), now()
    from jsonb_populate_recordset(null::streams, ${p.streams}::jsonb) as s join ev using (stream_id)
    on conflict (stream_id) do update set machine_version = excluded.machine_version, version = excluded.version,
      state = excluded.state, context = excluded.context, updated_at = excluded.updated_at)
  ${part(has.vms, upsertReadRows('vms', p.vms))}
  ${part(has.partitions, upsertReadRows('partitions', p.partitions))}
  ${part(has.hosts, upsertReadRows('hosts', p.hosts))}
  ${part(
    has.claims,
    sql`claims_taken as (
    insert into gpu_claims (host_id, module_id, partition_id, vm_id)
    select r.host_id, r.module_id, r.partition_id, r.vm_id
    from jsonb_array_elements(${p.claims}::jsonb) as j join ev on ev.stream_id = j->>'stream_id',
         jsonb_populate_record(null::gpu_claims, j->'row') as r)`,
  )}
  ${part(
    has.releases,
    sql`claims_released as (
    delete from gpu_claims g
    using jsonb_to_recordset(${p.releases}::jsonb) as x(stream_id text, host_id text, partition_id integer) join ev using (stream_id)
    where g.host_id = x.host_id and g.partition_id = x.partition_id)`,
  )}
  ${part(
    has.effects,
    sql`fx as (
    insert into effects (id, stream_id, host_id, type, params, correlation_id, status, due_at, attempts, max_attempts,
                         lease_owner, lease_epoch, lease_until, claimed_at, completed_at, note, created_at)
    select f.id, f.stream_id, f.host_id, f.type, f.params, f.correlation_id,
           case when f.delivered_by is not null then 'done' when f.leased_to is null then 'pending' else 'running' end,
           now() + f.delay_ms * interval '1 millisecond',
           case when f.delivered_by is null and f.leased_to is null then 0 else 1 end,
           f.max_attempts, f.leased_to, case when f.leased_to is null then null else f.lease_epoch end,
           case when f.leased_to is null then null else now() + f.lease_ms * interval '1 millisecond' end,
           case when f.delivered_by is null and f.leased_to is null then null else now() end,
           case when f.delivered_by is null then null else now() end,
           f.note, now()
    from jsonb_to_recordset(${p.effects}::jsonb) as f(stream_id text, id text, host_id text, type text, params jsonb, correlation_id text,
           delay_ms double precision, max_attempts integer, leased_to text, lease_ms double precision, lease_epoch bigint, delivered_by text, note text)
    join ev using (stream_id)
    returning id),
  -- A message delivered in this statement: its one try, done.
  delivered as (
    insert into effect_attempts (effect_id, attempt, worker, started_at, finished_at, outcome, error)
    select f.id, 1, f.delivered_by, now(), now(), 'ok', null
    from jsonb_to_recordset(${p.effects}::jsonb) as f(id text, delivered_by text) join fx using (id)
    where f.delivered_by is not null)`,
  )}
  ${part(
    has.cancels,
    // Only timers (a delayMs param) still pending: not one running, nor an effect waiting to retry.
    sql`cancelled as (
    update effects e
    set status = 'cancelled', completed_at = now(), note = x.note
    from jsonb_to_recordset(${p.cancels}::jsonb) as x(stream_id text, note text) join ev using (stream_id)
    where e.stream_id = x.stream_id and e.status = 'pending' and jsonb_typeof(e.params->'delayMs') = 'number')`,
  )}
  ${part(
    has.notify,
    // Delivered at commit: wakes the hosts' workers without a polling delay.
    sql`notified as (
    select pg_notify(${p.channel}, n.host)
    from (select distinct n.host from jsonb_to_recordset(${p.notify}::jsonb) as n(stream_id text, host text) join ev using (stream_id)) as n)`,
  )}
  select ev.stream_id, ev.position::text as position, ev.recorded_at as now${has.notify ? sql`, (select count(*) from notified) as notified` : sql``} from ev`;

/**
 * Compiled once per shape, on first use: a shape is which optional parts a statement holds, and
 * only those are in its text, so Postgres does not set up, lock and run parts a step does not use
 * (a step that closes no effect and claims no GPU, say). The engine's steps come in a few dozen
 * shapes; each text is prepared once per connection. Each parameter is compiled as its own name,
 * looked up when the statement runs.
 */
const compiled = new Map<string, { sql: string; order: (keyof Parts | 'channel')[] }>();

function compiledStatement(db: Executor, has: Shape): { sql: string; order: (keyof Parts | 'channel')[] } {
  const key = OPTIONAL.map((k) => (has[k] ? '1' : '0')).join('');
  let c = compiled.get(key);
  if (!c) {
    const names = ['closes', 'events', 'streams', 'vms', 'partitions', 'hosts', 'claims', 'releases', 'effects', 'cancels', 'notify', 'channel'] as const;
    const query = statement(Object.fromEntries(names.map((n) => [n, n])) as Parts & { channel: string }, has).compile(db);
    compiled.set(key, (c = { sql: query.sql, order: query.parameters as (keyof Parts | 'channel')[] }));
  }
  return c;
}

/**
 * Writes the steps, of distinct streams, in one statement. Returns, per step, its event's position
 * and the statement's time, or null where `closes` found the lease gone (nothing of it written).
 */
export async function writeSteps(db: Executor, writes: StepWrite[]): Promise<(StepWritten | null)[]> {
  const rows = (table: ReadRow['table']) => writes.filter((w) => w.readRow.table === table).map((w) => ({ stream_id: w.streamId, row: stamped(w.readRow.row) }));
  const parts: Parts & { channel: string } = {
    channel: EFFECTS_CHANNEL,
    closes: JSON.stringify(
      writes.flatMap((w) =>
        w.closes ? [{ effect_id: w.closes.effectId, worker: w.closes.workerId, epoch: w.closes.epoch, status: w.closes.status, error: w.closes.error, note: w.closes.note, attempt: w.closes.attempt, no_try: w.closes.noTry === true }] : [],
      ),
    ),
    events: JSON.stringify(
      writes.map((w) => ({
        stream_id: w.streamId,
        stream_version: w.expectedVersion + 1,
        type: w.event.type,
        data: w.event.data,
        state_before: w.event.stateBefore,
        state_after: w.event.stateAfter,
        machine: w.event.machine,
        machine_version: w.event.machineVersion,
        causation_id: w.event.causationId,
        correlation_id: w.event.correlationId,
        actor: w.event.actor,
        closes: w.closes?.effectId ?? w.closesWith,
      })),
    ),
    streams: JSON.stringify(writes.map((w) => ({ stream_id: w.streamId, machine: w.stream.machine, machine_version: w.stream.machineVersion, version: w.stream.version, state: w.stream.state, context: w.stream.context, created_at: w.stream.createdAt === NOW ? null : w.stream.createdAt }))),
    vms: JSON.stringify(rows('vms')),
    partitions: JSON.stringify(rows('partitions')),
    hosts: JSON.stringify(rows('hosts')),
    claims: JSON.stringify(writes.flatMap((w) => (w.claims && 'insert' in w.claims ? w.claims.insert.map((row) => ({ stream_id: w.streamId, row })) : []))),
    releases: JSON.stringify(writes.flatMap((w) => (w.claims && 'release' in w.claims ? [{ stream_id: w.streamId, host_id: w.claims.release.hostId, partition_id: w.claims.release.partitionId }] : []))),
    effects: JSON.stringify(
      writes.flatMap((w) =>
        w.effects.map((f) => ({ stream_id: w.streamId, id: f.id, host_id: f.hostId, type: f.type, params: f.params, correlation_id: w.event.correlationId, delay_ms: f.delayMs, max_attempts: f.maxAttempts, leased_to: f.leasedTo, lease_ms: w.leaseMs, lease_epoch: w.leaseEpoch, delivered_by: f.deliveredBy, note: f.note })),
      ),
    ),
    cancels: JSON.stringify(writes.flatMap((w) => (w.cancelTimers ? [{ stream_id: w.streamId, note: w.cancelTimers }] : []))),
    notify: JSON.stringify(writes.flatMap((w) => (w.notifyHost ? [{ stream_id: w.streamId, host: w.notifyHost }] : []))),
  };
  try {
    const has = Object.fromEntries(OPTIONAL.map((k) => [k, parts[k] !== '[]'])) as Shape;
    const { sql: text, order } = compiledStatement(db, has);
    const { rows: written } = await db.executeQuery<{ stream_id: string; position: string; now: Date }>(CompiledQuery.raw(text, order.map((name) => parts[name])));
    const byStream = new Map(written.map((r) => [r.stream_id, { position: r.position, now: new Date(r.now) }]));
    return writes.map((w) => byStream.get(w.streamId) ?? null);
  } catch (err) {
    // Attributed to the step the violated key names (Postgres's detail); else to the first. With
    // several units, StepBatcher writes each alone to find the one.
    const detail = String((err as { detail?: unknown })?.detail ?? '');
    const w = writes.find((x) => detail.includes(`(${x.streamId},`)) ?? writes[0]!;
    mapAppendError(err, w.streamId, w.expectedVersion, w.event.causationId);
  }
}

/**
 * Group commit. Units of steps handed to `write` while a statement is in flight wait for it, then
 * go together in the next one: at one lifecycle at a time each unit is its own statement, with no
 * added wait; at many, one round trip and one commit carry the steps of many lifecycles. A unit
 * (steps that must commit together, such as a step and the message it delivers) is never split,
 * and two steps of one stream never share a statement (the later unit waits for the next). When a
 * shared statement fails (one step's stream moved, say) each of its units is written alone, so each
 * caller gets its own answer.
 */
export class StepBatcher {
  private queue: { unit: StepWrite[]; resolve: (r: (StepWritten | null)[]) => void; reject: (err: unknown) => void }[] = [];
  private flushing = false;
  /** Steps written, and the statements that carried them (shared ones and lone retries). */
  readonly stats = { steps: 0, statements: 0 };

  constructor(
    private readonly db: Kysely<Database>,
    private readonly maxSteps = 64,
  ) {}

  /** Writes the unit's steps (of distinct streams) in one statement; resolves with each step's result. */
  write(unit: StepWrite[]): Promise<(StepWritten | null)[]> {
    return new Promise((resolve, reject) => {
      this.queue.push({ unit, resolve, reject });
      if (!this.flushing) void this.flush();
    });
  }

  private async flush(): Promise<void> {
    this.flushing = true;
    while (this.queue.length > 0) {
      const streams = new Set<string>();
      const batch: typeof this.queue = [];
      const rest: typeof this.queue = [];
      let steps = 0;
      for (const item of this.queue) {
        const fits = batch.length === 0 || steps + item.unit.length <= this.maxSteps;
        if (fits && item.unit.every((w) => !streams.has(w.streamId))) {
          for (const w of item.unit) streams.add(w.streamId);
          steps += item.unit.length;
          batch.push(item);
        } else rest.push(item);
      }
      this.queue = rest;
      this.stats.steps += steps;
      this.stats.statements++;
      try {
        const results = await writeSteps(this.db, batch.flatMap((b) => b.unit));
        let i = 0;
        for (const b of batch) b.resolve(results.slice(i, (i += b.unit.length)));
      } catch (err) {
        if (batch.length === 1) batch[0]!.reject(err);
        else {
          this.stats.statements += batch.length;
          await Promise.all(batch.map((b) => writeSteps(this.db, b.unit).then(b.resolve, b.reject)));
        }
      }
    }
    this.flushing = false;
  }
}
