/**
 * Figure 4 — replay: rebuild every projection from a log of 1,000,000 events, against the rate of
 * merely reading those rows.
 *
 * The log: a few real lifecycles run through the real engine on the in-memory host
 * (bench/memory-host.ts) — the seed: the host's registration, its 15 partitions, VMs of every size
 * created, run and deleted, two left running — then replicated with SQL (INSERT … SELECT over
 * generate_series) with the host id and the VM ids rewritten in every column that names them
 * (stream ids, data, causation and correlation ids) and the timestamps shifted, until the log holds
 * the target count. Each copy is a consistent host history, so every stream still folds. The
 * projections (streams, vms, partitions, gpu_claims, hosts) are replicated the same way, so the
 * current verifyProjections finds no differences.
 *
 * Measured, each over every event, in the order replay reads them:
 *   read       rows fetched through one server-side cursor in readStreams' order (stream_id,
 *              stream_version), same columns as src/store/events.ts, pages of --page rows; nothing
 *              done with them: the reference. Also: only the columns a fold uses; readLog's order.
 *   rebuild    the same cursor, each stream folded with decide.ts's fold() and its projection rows
 *              built in memory (projections.ts row functions) — the "rebuild all projections" work.
 *   prototypes proposals for decide.ts / rebuild.ts, each checked against today's code:
 *              1 keeps xstate's snapshot across a stream's events; 2 also reuses one actor scope per
 *              machine; 3 is verifyProjections streaming (one scan, each table read once).
 *   current    src/engine/rebuild.ts verifyProjections as it is (--current; off past 200k events
 *              unless asked: it issues three queries per stream).
 *
 *   node --import tsx bench/replay.ts [--events=1000000] [--page=5000] [--current] [--keep] [--db=NAME]
 *
 * --db=NAME reuses a log kept by an earlier --keep run (for profiling), with
 * --only=read|rebuild|fast|fast2|verify3|current to run one part; --readlog-as-is also times
 * src/store/events.ts readLog itself, which sorts every page (see readLogOrder).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { sql, type Kysely } from 'kysely';
import pg from 'pg';
import pino from 'pino';
import { createActor, initialTransition, transition, type AnyActorScope, type AnyMachineSnapshot, type AnyStateMachine } from 'xstate';
import { hostStream, machines, partitionStream, streamKind, vmStream, type StreamKind } from '../machines/index.ts';
import { loadConfig } from '../src/config.ts';
import { canonical, decide, fold, sameJson } from '../src/engine/decide.ts';
import { verifyProjections, type Difference } from '../src/engine/rebuild.ts';
import { readLog, readStreams, toStoredEvent, LOG_START, type StoredEvent } from '../src/store/events.ts';
import { claimRows, hostRow, partitionRow, vmRow, type ClaimRow, type HostRow, type PartitionRow, type StreamSnapshot, type VmRow } from '../src/store/projections.ts';
import { openDb, type Db } from '../src/store/db.ts';
import type { Database } from '../src/store/schema.ts';
import { startService, type Service } from '../src/service.ts';
import { isMain, option, printTable } from './lib.ts';
import { createMemoryHost } from './memory-host.ts';

/** A bare `--name` on the command line. */
const flag = (name: string) => process.argv.includes(`--${name}`);
const TARGET = option('events', 1_000_000);
const PAGE = option('page', 5000);
const SEED_HOST = 'seedhost';

// ── the database (gpuvm_bench_b_*: bench/lib.ts's freshDatabase names gpuvm_bench_a_* only) ────
const PG_URL = option('pg-url', 'postgres://postgres@127.0.0.1:5432/postgres');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
async function admin(q: string): Promise<void> {
  const c = new pg.Client({ connectionString: PG_URL });
  await c.connect();
  try {
    await c.query(q);
  } finally {
    await c.end();
  }
}
function dbUrl(name: string): string {
  const url = new URL(PG_URL);
  url.pathname = `/${name}`;
  return url.toString();
}
const fmtRate = (n: number) => Math.round(n).toLocaleString('en-US');

// ── the seed: real lifecycles through the engine ─────────────────────────────────────────────


async function until(service: Service, ids: string[], state: string): Promise<void> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const rows = await service.db.kysely.selectFrom('vms').select(['id', 'state']).where('id', 'in', ids).execute();
    if (rows.length === ids.length && rows.every((r) => r.state === state)) return;
    const bad = rows.find((r) => r.state === 'failed' || r.state === 'crashed');
    if (bad) throw new Error(`seed VM ${bad.id} ended ${bad.state}`);
    if (Date.now() > deadline) throw new Error(`seed VMs not ${state} in time: ${JSON.stringify(rows)}`);
    await sleep(10);
  }
}

/** Runs the seed lifecycles; returns the VM ids in creation order. */
async function runSeed(databaseUrl: string): Promise<string[]> {
  const log = pino({ level: process.env.BENCH_LOG ?? 'silent' });
  const dataDir = mkdtempSync(join(tmpdir(), 'gb-r-'));
  const config = loadConfig(
    { dataDir, databaseUrl, port: 0, hostId: SEED_HOST, powerdownTimeoutMs: 0, backoffBaseMs: 20, backoffMaxMs: 200, healthIntervalMs: 3_600_000, fabricManagerCheckMs: 50_000, vmMemoryMiB: 64 },
    {},
  );
  const host = (await createMemoryHost(SEED_HOST)).adapters;
  const service = await startService(config, { log, host });
  const ids: string[] = [];
  try {
    // Rounds of VMs of every size, each created together, run, and deleted; the last round keeps two.
    for (const [sizes, keep] of [
      [[1, 1, 1, 1, 1, 1, 1, 1], 0],
      [[4, 4], 0],
      [[8], 0],
      [[2, 2, 2, 2], 2],
    ] as const) {
      const vms = await Promise.all(sizes.map((gpus) => service.vms.create({ gpus, actor: 'seed' })));
      const round = vms.map((v) => v.id);
      ids.push(...round);
      await until(service, round, 'running');
      const gone = round.slice(0, round.length - keep);
      await Promise.all(gone.map((id) => service.vms.delete(id, 'seed')));
      await until(service, gone, 'deleted');
    }
  } finally {
    for (const id of ids) await host.qemu.terminate(id).catch(() => {});
    await service.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
  return ids;
}

// ── replication ──────────────────────────────────────────────────────────────────────────────

/**
 * SQL that rewrites a text expression for copy `k`: the seed host id becomes h<k:7> and each seed
 * VM id becomes vm-<k in hex:7><index:3> (still vm-[a-z0-9]{10}).
 */
function rewriter(vmIds: string[]): (expr: string) => string {
  return (expr) => {
    let out = `replace(${expr}, '${SEED_HOST}', 'h' || lpad(k::text, 7, '0'))`;
    vmIds.forEach((id, j) => {
      out = `replace(${out}, '${id}', 'vm-' || lpad(to_hex(k), 7, '0') || '${String(j).padStart(3, '0')}')`;
    });
    return out;
  };
}

async function replicate(db: Kysely<Database>, vmIds: string[], target: number): Promise<{ seedEvents: number; copies: number }> {
  const seed = await sql<{ n: string; span_ms: string }>`
    select count(*)::text as n, (extract(epoch from max(recorded_at) - min(recorded_at)) * 1000 + 1000)::bigint::text as span_ms from events`.execute(db);
  const seedEvents = Number(seed.rows[0]!.n);
  const spanMs = Number(seed.rows[0]!.span_ms);
  const copies = Math.max(0, Math.ceil(target / seedEvents) - 1);
  const R = rewriter(vmIds);
  const shift = (col: string) => `${col} + (k * ${spanMs}) * interval '1 millisecond'`;
  const J = (col: string) => `${R(`${col}::text`)}::jsonb`;
  // Copies of the seed per statement: about 100k events per transaction.
  const perBatch = Math.max(1, Math.floor(100_000 / seedEvents));
  const maxSeedPosition = (await sql<{ p: string }>`select max(position)::text as p from events`.execute(db)).rows[0]!.p;
  const started = performance.now();
  for (let from = 1; from <= copies; from += perBatch) {
    const to = Math.min(copies, from + perBatch - 1);
    await sql
      .raw(
        `insert into events (stream_id, stream_version, type, data, state_before, state_after, machine, machine_version, causation_id, correlation_id, actor, recorded_at)
         select ${R('e.stream_id')}, e.stream_version, e.type, ${J('e.data')}, ${J('e.state_before')}, ${J('e.state_after')}, e.machine, e.machine_version,
                ${R('e.causation_id')}, ${R('e.correlation_id')}, e.actor, ${shift('e.recorded_at')}
         from generate_series(${from}, ${to}) as k cross join events e
         where e.position <= ${maxSeedPosition}
         order by k, e.position`,
      )
      .execute(db);
    process.stdout.write(`\r  replicating the seed: ${to}/${copies} copies (${Math.round((performance.now() - started) / 1000)} s)`);
  }
  process.stdout.write('\n');
  // The projections of every copy, rewritten the same way.
  const gen = `generate_series(1, ${copies}) as k`;
  await sql
    .raw(
      `insert into streams (stream_id, machine, machine_version, version, state, context, created_at, updated_at)
       select ${R('s.stream_id')}, s.machine, s.machine_version, s.version, s.state, ${J('s.context')}, ${shift('s.created_at')}, ${shift('s.updated_at')}
       from ${gen} cross join (select * from streams) s`,
    )
    .execute(db);
  await sql
    .raw(
      `insert into vms (id, name, host_id, gpu_count, partition_id, gpus, state, reason, qemu_pid, created_at, updated_at)
       select ${R('v.id')}, ${R('v.name')}, ${R('v.host_id')}, v.gpu_count, v.partition_id, v.gpus, v.state, v.reason, v.qemu_pid, ${shift('v.created_at')}, ${shift('v.updated_at')}
       from ${gen} cross join (select * from vms) v`,
    )
    .execute(db);
  await sql
    .raw(
      `insert into partitions (host_id, partition_id, modules, size, state, vm_id, failure, updated_at)
       select ${R('p.host_id')}, p.partition_id, p.modules, p.size, p.state, ${R('p.vm_id')}, p.failure, ${shift('p.updated_at')}
       from ${gen} cross join (select * from partitions) p`,
    )
    .execute(db);
  await sql
    .raw(
      `insert into gpu_claims (host_id, module_id, partition_id, vm_id)
       select ${R('c.host_id')}, c.module_id, c.partition_id, ${R('c.vm_id')} from ${gen} cross join (select * from gpu_claims) c`,
    )
    .execute(db);
  await sql
    .raw(
      `insert into hosts (id, simulated, board, inventory, registered_at, quarantined_modules)
       select ${R('h.id')}, h.simulated, h.board, ${J('h.inventory')}, ${shift('h.registered_at')}, h.quarantined_modules
       from ${gen} cross join (select * from hosts) h`,
    )
    .execute(db);
  return { seedEvents, copies };
}

// ── measurements ─────────────────────────────────────────────────────────────────────────────

/** The columns readStreams / readLog select (src/store/events.ts eventColumns). */
const ALL_COLUMNS = `position::text as position, stream_id, stream_version, type, data, state_before, state_after, machine,
  machine_version, causation_id, correlation_id, actor, recorded_at, tx_id::text as tx_id`;
/** What a fold and the projection rows use: nothing else of an event is read by fold(). */
const FOLD_COLUMNS = `stream_id, stream_version, type, data, machine_version, recorded_at`;

interface ScanStats {
  events: number;
  /** Time spent awaiting FETCH: Postgres, the wire, and pg's row parsing (JSON, timestamps). */
  fetchMs: number;
  /** Time spent in onPage: the processing. */
  processMs: number;
}

/**
 * Streams every event in readStreams' order (stream_id, stream_version) through one server-side
 * cursor in a read-only repeatable-read transaction, handing each page to `onPage`. With
 * `pipeline`, the next FETCH is sent before the current page is processed, so Postgres and the
 * wire work while JavaScript folds.
 */
async function scan(db: Kysely<Database>, columns: string, onPage: (rows: any[]) => void, pipeline = false): Promise<ScanStats> {
  const stats: ScanStats = { events: 0, fetchMs: 0, processMs: 0 };
  await db
    .transaction()
    .setIsolationLevel('repeatable read')
    .setAccessMode('read only')
    .execute(async (tx) => {
      await sql.raw(`declare replay_scan no scroll cursor for select ${columns} from events order by stream_id, stream_version`).execute(tx);
      const fetch = () => sql.raw<any>(`fetch ${PAGE} from replay_scan`).execute(tx);
      let next = fetch();
      for (;;) {
        const t0 = performance.now();
        const { rows } = await next;
        const t1 = performance.now();
        stats.fetchMs += t1 - t0;
        if (rows.length === 0) break;
        if (pipeline) next = fetch();
        stats.events += rows.length;
        onPage(rows);
        if (!pipeline) next = fetch();
        stats.processMs += performance.now() - t1;
      }
    });
  return stats;
}

interface Rebuilt {
  streams: Map<string, StreamSnapshot>;
  vms: Map<string, VmRow>;
  partitions: Map<string, PartitionRow>;
  hosts: Map<string, HostRow>;
  claims: ClaimRow[];
}

const emptyRebuilt = (): Rebuilt => ({ streams: new Map(), vms: new Map(), partitions: new Map(), hosts: new Map(), claims: [] });

/** Keeps a folded stream's snapshot and its projection rows (the projections.ts row functions). */
function project(out: Rebuilt, snap: StreamSnapshot | null): void {
  if (!snap) return;
  out.streams.set(snap.streamId, snap);
  switch (snap.kind) {
    case 'vm':
      out.vms.set(snap.streamId, vmRow(snap));
      break;
    case 'partition':
      out.partitions.set(snap.streamId, partitionRow(snap));
      out.claims.push(...claimRows(snap));
      break;
    case 'host':
      out.hosts.set(snap.streamId, hostRow(snap));
      break;
  }
}

/** Groups a scan's rows by stream (they arrive in stream order) and hands each complete stream on. */
function byStream<E extends { streamId: string }>(toEvent: (row: any) => E, onStream: (streamId: string, events: E[]) => void) {
  let current: string | null = null;
  let pending: E[] = [];
  return {
    page(rows: any[]) {
      for (const r of rows) {
        const e = toEvent(r);
        if (e.streamId !== current) {
          if (current !== null) onStream(current, pending);
          current = e.streamId;
          pending = [];
        }
        pending.push(e);
      }
    },
    end() {
      if (current !== null) onStream(current, pending);
    },
  };
}

/** Today's rebuild, as verifyProjections does it per stream: every column read, decide.ts fold(). */
async function rebuild(db: Kysely<Database>): Promise<{ stats: ScanStats; rebuilt: Rebuilt }> {
  const rebuilt = emptyRebuilt();
  const group = byStream(toStoredEvent, (streamId, events) => project(rebuilt, fold(streamId, events)));
  const stats = await scan(db, ALL_COLUMNS, (rows) => group.page(rows));
  group.end();
  return { stats, rebuilt };
}

/** The fields fold() reads of an event. */
interface FoldEvent {
  streamId: string;
  streamVersion: number;
  type: string;
  data: Record<string, unknown>;
  machineVersion: number;
  recordedAt: Date;
}

const toFoldEvent = (r: any): FoldEvent => ({
  streamId: r.stream_id,
  streamVersion: r.stream_version,
  type: r.type,
  data: r.data,
  machineVersion: r.machine_version,
  recordedAt: r.recorded_at,
});

/**
 * One inert actor scope per machine, made once. xstate's transition() / initialTransition() build a
 * new one — createActor(), which also computes the machine's initial snapshot — on every call;
 * a fold needs none of it: our machines spawn no children, and a fold runs no actions (assign is
 * applied inside the transition, not by the executor).
 */
const foldScopes = new Map<StreamKind, AnyActorScope>();
function foldScope(kind: StreamKind, machine: AnyStateMachine): AnyActorScope {
  let scope = foldScopes.get(kind);
  if (!scope) {
    const self = createActor(machine);
    scope = { self, id: '', sessionId: '', logger: () => {}, defer: () => {}, emit: () => {}, system: self.system, stopChild: () => {}, actionExecutor: () => {} };
    foldScopes.set(kind, scope);
  }
  return scope;
}

/**
 * PROTOTYPE (a proposal for src/engine/decide.ts fold): keep xstate's snapshot from one event to the
 * next instead of rebuilding it from state + context for every event (decide's resolveState), and
 * drop the separate can(): transition() returns the very same snapshot for an event no transition
 * takes, which is exactly decide()'s 'rejected'. Three xstate calls per event become one. With
 * `sharedScope`, that one call also reuses the machine's actor scope (foldScope above).
 */
function fastFold(streamId: string, events: FoldEvent[], sharedScope: boolean): StreamSnapshot | null {
  if (events.length === 0) return null;
  const kind = streamKind(streamId);
  const machine = machines[kind].machine as unknown as AnyStateMachine;
  const scope = sharedScope ? foldScope(kind, machine) : null;
  let snapshot = scope ? machine.getInitialSnapshot(scope) : initialTransition(machine)[0];
  for (const e of events) {
    const event = { ...e.data, type: e.type };
    const next = scope ? machine.transition(snapshot, event, scope) : transition(machine, snapshot, event)[0];
    if (next === snapshot) {
      throw new Error(`stream ${streamId} version ${e.streamVersion}: ${e.type} does not apply to state ${String(snapshot.value)} on replay`);
    }
    snapshot = next;
  }
  const first = events[0]!;
  const last = events[events.length - 1]!;
  return {
    streamId,
    kind,
    machineVersion: last.machineVersion,
    version: last.streamVersion,
    state: typeof snapshot.value === 'string' ? snapshot.value : JSON.stringify(snapshot.value),
    context: snapshot.context as Record<string, unknown>,
    createdAt: first.recordedAt,
    updatedAt: last.recordedAt,
  };
}

/** PROTOTYPE rebuild: only the columns a fold uses, the next page fetched while this one folds, fastFold. */
async function rebuildFast(db: Kysely<Database>, sharedScope: boolean): Promise<{ stats: ScanStats; rebuilt: Rebuilt }> {
  const rebuilt = emptyRebuilt();
  const group = byStream(toFoldEvent, (streamId, events) => project(rebuilt, fastFold(streamId, events, sharedScope)));
  const stats = await scan(db, FOLD_COLUMNS, (rows) => group.page(rows), true);
  group.end();
  return { stats, rebuilt };
}

/**
 * PROTOTYPE 3 (a proposal for src/engine/rebuild.ts verifyProjections): the same comparison — every
 * stream folded and its rows compared with the stored ones, claims as a set, orphan rows — in a
 * fixed number of queries: the log streamed once in (stream_id, stream_version) order, and each
 * projection table read once into a map, instead of three queries per stream. Folds with fastFold
 * on the shared scope. Returns verifyProjections' result shape.
 */
async function verifyProjectionsStreaming(db: Kysely<Database>): Promise<{ streams: number; events: number; differences: Difference[] }> {
  const plain = (row: object | undefined | null): unknown => (row ? canonical(JSON.parse(JSON.stringify(row))) : null);
  const differences: Difference[] = [];
  const stored = {
    streams: new Map((await db.selectFrom('streams').selectAll().execute()).map((r) => [r.stream_id, r])),
    vms: new Map((await db.selectFrom('vms').selectAll().execute()).map((r) => [r.id, r])),
    partitions: new Map((await db.selectFrom('partitions').selectAll().execute()).map((r) => [partitionStream(r.host_id, r.partition_id), r])),
    hosts: new Map((await db.selectFrom('hosts').selectAll().execute()).map((r) => [r.id, r])),
  };
  const rebuiltClaims: object[] = [];
  const unfoldable = new Set<string>();
  const known = new Set<string>();
  let streams = 0;
  const compare = (streamId: string, table: string, storedRow: object | undefined, row: object) => {
    if (!sameJson(plain(storedRow), plain(row))) differences.push({ streamId, table, stored: plain(storedRow), rebuilt: plain(row) });
  };
  const group = byStream(toFoldEvent, (streamId, events) => {
    streams++;
    known.add(streamId);
    let snap: StreamSnapshot;
    try {
      snap = fastFold(streamId, events, true)!;
    } catch (err) {
      differences.push({ streamId, table: 'events', stored: `${events.length} events`, rebuilt: err instanceof Error ? err.message : String(err) });
      if (streamKind(streamId) === 'partition') unfoldable.add(streamId);
      return;
    }
    compare(streamId, 'streams', stored.streams.get(streamId), {
      stream_id: snap.streamId,
      machine: snap.kind,
      machine_version: snap.machineVersion,
      version: snap.version,
      state: snap.state,
      context: snap.context,
      created_at: snap.createdAt,
      updated_at: snap.updatedAt,
    });
    if (snap.kind === 'vm') {
      const row = vmRow(snap);
      compare(streamId, 'vms', stored.vms.get(row.id), row);
    } else if (snap.kind === 'partition') {
      const row = partitionRow(snap);
      compare(streamId, 'partitions', stored.partitions.get(streamId), row);
      rebuiltClaims.push(...claimRows(snap));
    } else {
      const row = hostRow(snap);
      compare(streamId, 'hosts', stored.hosts.get(row.id), row);
    }
  });
  const stats = await scan(db, FOLD_COLUMNS, (rows) => group.page(rows), true);
  group.end();

  const key = (c: any) => `${c.host_id}/${c.module_id}`;
  const storedClaims = (await db.selectFrom('gpu_claims').selectAll().execute())
    .filter((c) => !unfoldable.has(partitionStream(c.host_id, c.partition_id)))
    .map(plain)
    .sort((a: any, b: any) => key(a).localeCompare(key(b)));
  const rebuilt = rebuiltClaims.map(plain).sort((a: any, b: any) => key(a).localeCompare(key(b)));
  if (!sameJson(storedClaims, rebuilt)) differences.push({ streamId: '*', table: 'gpu_claims', stored: storedClaims, rebuilt });
  const orphan = (streamId: string, table: string, row: object) => {
    if (!known.has(streamId)) differences.push({ streamId, table, stored: plain(row), rebuilt: null });
  };
  for (const [id, r] of stored.streams) orphan(id, 'streams', r);
  for (const [id, r] of stored.vms) orphan(vmStream(id), 'vms', r);
  for (const [id, r] of stored.partitions) orphan(id, 'partitions', r);
  for (const [id, r] of stored.hosts) orphan(hostStream(id), 'hosts', r);
  return { streams, events: stats.events, differences };
}

/**
 * PROTOTYPE (the live path, src/engine/decide.ts decide): the same shared scope, collecting the
 * actions a transition asks for, as xstate's transition() does. Returns the effects and context
 * decide() would return for an accepted event.
 */
function decideShared(kind: StreamKind, snapshot: AnyMachineSnapshot, event: { type: string }): { next: AnyMachineSnapshot; effects: { type: string; params: unknown }[] } {
  const machine = machines[kind].machine as unknown as AnyStateMachine;
  const scope = foldScope(kind, machine);
  const actions: { type: string; params?: unknown }[] = [];
  scope.actionExecutor = (a) => void actions.push(a);
  try {
    const next = machine.transition(snapshot, event, scope);
    return { next, effects: actions.map((a) => ({ type: a.type, params: a.params ?? {} })) };
  } finally {
    scope.actionExecutor = () => {};
  }
}

/** decideShared gives decide()'s effects and context at every event of `events`. */
function checkDecideShared(streamId: string, events: StoredEvent[]): void {
  const kind = streamKind(streamId);
  let snap = null as StreamSnapshot | null;
  let shared = machines[kind].machine.getInitialSnapshot(foldScope(kind, machines[kind].machine as unknown as AnyStateMachine)) as AnyMachineSnapshot;
  for (const e of events) {
    const event = { ...e.data, type: e.type };
    const d = decide(streamId, snap, event);
    const s = decideShared(kind, shared, event);
    if (d.kind !== 'changed' || !sameJson(d.effects, s.effects) || !sameJson(d.context, s.next.context)) {
      throw new Error(`decideShared differs from decide on ${streamId} v${e.streamVersion}: ${JSON.stringify(d)} vs ${JSON.stringify(s.effects)}`);
    }
    shared = s.next;
    snap = { streamId, kind, machineVersion: e.machineVersion, version: e.streamVersion, state: d.stateAfter, context: d.context, createdAt: snap?.createdAt ?? e.recordedAt, updatedAt: e.recordedAt };
  }
}

/**
 * fastFold must give what fold() gives: compared on every stream of a sample of `limit`. The same
 * streams, already in memory, then time the folds alone (no I/O, no row parsing): best of 3.
 */
async function checkFastFold(db: Kysely<Database>, limit: number): Promise<{ streams: number; events: number; usPerEvent: Record<string, number> }> {
  // A fixed pseudo-random sample: hosts, partitions and VMs in the log's proportions.
  const streams = await sql<{ stream_id: string }>`select stream_id from (select distinct stream_id from events) s order by md5(stream_id) limit ${limit}`.execute(db);
  const ids = streams.rows.map((r) => r.stream_id);
  const all = [...(await readStreams(db, ids))];
  let events = 0;
  for (const [id, list] of all) {
    events += list.length;
    checkDecideShared(id, list);
    const a = fold(id, list);
    for (const shared of [false, true]) {
      const b = fastFold(id, list, shared);
      if (!sameJson(JSON.parse(JSON.stringify(a)), JSON.parse(JSON.stringify(b)))) {
        throw new Error(`fastFold (shared scope: ${shared}) differs from fold on ${id}: ${JSON.stringify(a)} vs ${JSON.stringify(b)}`);
      }
    }
  }
  const best = (f: () => void) => {
    let ms = Infinity;
    for (let i = 0; i < 3; i++) {
      const t0 = performance.now();
      f();
      ms = Math.min(ms, performance.now() - t0);
    }
    return (ms * 1000) / events;
  };
  return {
    streams: ids.length,
    events,
    usPerEvent: {
      'fold() (today)': best(() => all.forEach(([id, list]) => fold(id, list))),
      'prototype 1': best(() => all.forEach(([id, list]) => fastFold(id, list, false))),
      'prototype 2': best(() => all.forEach(([id, list]) => fastFold(id, list, true))),
    },
  };
}

/**
 * The global log in readLog's order, pages of 1000. `asIs` calls src/store/events.ts readLog. Its
 * ORDER BY "tx_id", "position" names the select list's `tx_id::text as tx_id` and
 * `position::text as position`, so Postgres orders by the text ('100000' < '99999'): it sorts
 * every page instead of walking the (tx_id, position) index, and since the WHERE compares the
 * xid8 and bigint columns, a page boundary can skip events (a whole transaction, when the ids
 * cross a power of ten). The default here is the same query ordered by the columns
 * (events.tx_id, events.position), which is what readLog means to do.
 */
async function readLogOrder(db: Kysely<Database>, asIs: boolean): Promise<number> {
  let n = 0;
  if (asIs) {
    for (let cursor = LOG_START; ; ) {
      const page = await readLog(db, cursor, 1000);
      if (page.events.length === 0) return n;
      n += page.events.length;
      cursor = page.next;
    }
  }
  let cursor = { txId: '0', position: '0' };
  for (;;) {
    const { rows } = await sql<any>`
      select ${sql.raw(ALL_COLUMNS)} from events
      where (tx_id, events.position) > (${cursor.txId}::xid8, ${cursor.position}::bigint)
        and tx_id < pg_snapshot_xmin(pg_current_snapshot())
      order by events.tx_id, events.position limit 1000`.execute(db);
    if (rows.length === 0) return n;
    n += rows.length;
    const last = toStoredEvent(rows[rows.length - 1]);
    cursor = { txId: last.txId, position: last.position };
  }
}

async function timed<T>(what: string, f: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t0 = performance.now();
  const value = await f();
  const ms = performance.now() - t0;
  console.log(`  ${what}: ${(ms / 1000).toFixed(2)} s`);
  return { ms, value };
}

export async function main(): Promise<void> {
  const reuse = option('db', '') || undefined;
  const name = reuse ?? `gpuvm_bench_b_replay_${process.pid}`;
  if (!name.startsWith('gpuvm_bench_b_')) throw new Error('--db must name a gpuvm_bench_b_ database');
  let store: Db | null = null;
  try {
    if (!reuse) {
      await admin(`create database ${name}`);
      console.log(`figure 4: building a log of ${TARGET.toLocaleString('en-US')} events in ${name}`);
      const vmIds = await timed('seed lifecycles through the engine', () => runSeed(dbUrl(name)));
      store = await openDb({ databaseUrl: dbUrl(name) });
      const seedCheck = await verifyProjections(store.kysely);
      if (seedCheck.differences.length) throw new Error(`the seed does not verify: ${JSON.stringify(seedCheck.differences[0])}`);
      const { value: rep } = await timed('replicate with SQL', () => replicate(store!.kysely, vmIds.value, TARGET));
      console.log(`  seed: ${rep.seedEvents} events of ${vmIds.value.length} VMs on one host; ${rep.copies} copies`);
      // Reads should meet a settled table (hint bits set, statistics known), as a long-lived log is.
      await timed('vacuum analyze', () => sql`vacuum analyze`.execute(store!.kysely));
    } else {
      store = await openDb({ databaseUrl: dbUrl(name) });
    }
    const db = store.kysely;
    const counts = (await sql<{ events: string; streams: string }>`select (select count(*) from events)::text as events, (select count(*) from streams)::text as streams`.execute(db)).rows[0]!;
    const total = Number(counts.events);
    console.log(`log: ${total.toLocaleString('en-US')} events in ${Number(counts.streams).toLocaleString('en-US')} streams; cursor pages of ${PAGE}`);

    console.log(`machine: ${cpus().length} cores, load average ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
    const only = option('only', '') || undefined;
    const want = (what: string) => !only || only === what;
    const rows: Record<string, string>[] = [];
    const rate = (st: ScanStats, ms: number) => st.events / (ms / 1000);
    const split = (st: ScanStats) => `fetch ${(st.fetchMs / 1000).toFixed(1)} s, process ${(st.processMs / 1000).toFixed(1)} s`;
    let readRate = NaN;
    let rebuildRate = NaN;
    let fastRate = NaN;
    const row = (what: string, eventsPerSec: string, ofRead: string, where: string) => ({ what, 'events/s': eventsPerSec, 'of read': ofRead, 'where the time went': where });
    const pct = (r: number) => (Number.isFinite(readRate) ? `${((100 * r) / readRate).toFixed(0)} %` : '');
    if (want('read')) {
      await scan(db, ALL_COLUMNS, () => {}); // warms the page cache; not counted
      const read = await timed('read, every column, readStreams order', () => scan(db, ALL_COLUMNS, () => {}));
      readRate = rate(read.value, read.ms);
      rows.push(row('read: every column, readStreams order (the reference)', fmtRate(readRate), '100 %', split(read.value)));
      if (!only) {
        const few = await timed('read, fold columns only', () => scan(db, FOLD_COLUMNS, () => {}));
        rows.push(row('read: only the columns a fold uses', fmtRate(rate(few.value, few.ms)), pct(rate(few.value, few.ms)), split(few.value)));
        const log = await timed('read, readLog order, pages of 1000', () => readLogOrder(db, false));
        rows.push(row('read: readLog order (tx_id, position), pages of 1000', fmtRate(log.value / (log.ms / 1000)), pct(log.value / (log.ms / 1000)), 'ordered by the columns, not the text'));
        if (flag('readlog-as-is')) {
          const asIs = await timed('read, readLog as is (src/store/events.ts)', () => readLogOrder(db, true));
          rows.push(row('read: readLog as is (orders by the text aliases)', fmtRate(asIs.value / (asIs.ms / 1000)), pct(asIs.value / (asIs.ms / 1000)), ''));
        }
      }
    }
    const storedVms = Number((await sql<{ n: string }>`select count(*)::text as n from vms`.execute(db)).rows[0]!.n);
    const check = (what: string, r: { stats: ScanStats; rebuilt: Rebuilt }) => {
      if (r.stats.events !== total || r.rebuilt.vms.size !== storedVms || r.rebuilt.streams.size !== Number(counts.streams)) {
        throw new Error(`${what} saw ${r.stats.events} events, ${r.rebuilt.vms.size} VMs, ${r.rebuilt.streams.size} streams; the database has ${total}, ${storedVms}, ${counts.streams}`);
      }
    };
    if (want('rebuild')) {
      const rb = await timed('rebuild: decide.ts fold() of every stream + projection rows in memory', () => rebuild(db));
      check('rebuild', rb.value);
      rebuildRate = rate(rb.value.stats, rb.ms);
      rows.push(row('rebuild: fold() every stream + projection rows (today)', fmtRate(rebuildRate), pct(rebuildRate), split(rb.value.stats)));
    }
    if (want('fast')) {
      const cpu = await checkFastFold(db, 2000);
      console.log(`  the prototype folds equal fold(), and decideShared equals decide() at every event, on a sample of ${cpu.streams} streams (${cpu.events} events); folding them in memory, no I/O:`);
      for (const [what, us] of Object.entries(cpu.usPerEvent)) console.log(`    ${what}: ${us.toFixed(1)} µs per event (${fmtRate(1e6 / us)} events/s on one core)`);
    }
    if (want('fast')) {
      const p1 = await timed('rebuild prototype 1: snapshot kept across events, fold columns, pipelined fetch', () => rebuildFast(db, false));
      check('rebuild prototype 1', p1.value);
      const p1Rate = rate(p1.value.stats, p1.ms);
      rows.push(row('prototype 1: snapshot kept, 1 xstate call per event', fmtRate(p1Rate), pct(p1Rate), split(p1.value.stats)));
    }
    if (want('fast') || only === 'fast2') {
      const p2 = await timed('rebuild prototype 2: … and one actor scope per machine', () => rebuildFast(db, true));
      check('rebuild prototype 2', p2.value);
      fastRate = rate(p2.value.stats, p2.ms);
      rows.push(row('prototype 2: … + one actor scope per machine', fmtRate(fastRate), pct(fastRate), split(p2.value.stats)));
    }
    if (want('fast') || only === 'verify3') {
      const v3 = await timed('prototype 3: verifyProjections streaming (one scan, bulk reads, fastFold)', () => verifyProjectionsStreaming(db));
      if (v3.value.events !== total || v3.value.streams !== Number(counts.streams)) throw new Error(`prototype 3 saw ${v3.value.events} events in ${v3.value.streams} streams`);
      if (v3.value.differences.length) console.log(`  prototype 3 found ${v3.value.differences.length} differences, first: ${JSON.stringify(v3.value.differences[0]).slice(0, 300)}`);
      const r = rate({ events: v3.value.events, fetchMs: 0, processMs: 0 }, v3.ms);
      rows.push(row(`prototype 3: verifyProjections streaming (${v3.value.differences.length} differences)`, fmtRate(r), pct(r), ''));
    }
    const runCurrent = flag('current') || (!flag('no-current') && !only && total <= 200_000);
    if (runCurrent) {
      const cur = await timed('verifyProjections (src/engine/rebuild.ts, as is)', () => verifyProjections(db));
      if (cur.value.differences.length) console.log(`  verifyProjections found ${cur.value.differences.length} differences, first: ${JSON.stringify(cur.value.differences[0]).slice(0, 300)}`);
      const r = cur.value.events / (cur.ms / 1000);
      rows.push(row(`verifyProjections as is, 3 queries per stream (${cur.value.differences.length} differences)`, fmtRate(r), pct(r), ''));
    }
    printTable(`figure 4 — replay of ${total.toLocaleString('en-US')} events`, rows);
    if (Number.isFinite(rebuildRate)) {
      const share = rebuildRate / readRate;
      console.log(
        `rebuild (today's fold): ${fmtRate(rebuildRate)} events/s — goal ≥ 100,000: ${rebuildRate >= 100_000 ? 'met' : 'missed'}; ` +
          `${(100 * share).toFixed(0)} % of the read rate — goal ≥ 50 %: ${share >= 0.5 ? 'met' : 'missed'}`,
      );
    }
    if (Number.isFinite(fastRate)) {
      const share = fastRate / readRate;
      console.log(
        `rebuild prototype 2: ${fmtRate(fastRate)} events/s — goal ≥ 100,000: ${fastRate >= 100_000 ? 'met' : 'missed'}; ` +
          `${(100 * share).toFixed(0)} % of the read rate — goal ≥ 50 %: ${share >= 0.5 ? 'met' : 'missed'}`,
      );
    }
  } finally {
    await store?.close();
    if (!flag('keep') && !reuse) await admin(`drop database if exists ${name} with (force)`);
    else console.log(`kept database ${name}`);
  }
}

if (isMain(import.meta.url)) await main();
