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
 * projections (streams, vms, partitions, gpu_claims, hosts) are replicated the same way, so
 * verifyProjections finds no differences.
 *
 * Measured, each over every event:
 *   read       the reference: every column through one server-side cursor in readStreams' order
 *              (stream_id, stream_version), pages of --page rows, parsed by pg, nothing done with
 *              them. Also: the engine's own scan (src/store/log-scan.ts) alone.
 *   rebuild    the engine: src/engine/rebuild.ts rebuildProjections — every stream folded with
 *              decide.ts fold() and its projection rows built — on the reading thread alone, and with
 *              fold worker threads besides it (one per core but one, unless --workers=N; the reading
 *              thread folds whatever batch no worker has room for), in a repeatable-read transaction.
 *   verify     src/engine/rebuild.ts verifyProjections (what `gpuvm verify` runs for the
 *              projections): the rebuild plus each table read in bulk and compared.
 * Checked: on a fixed sample of streams, decide() applied event by event gives the same snapshot
 * as fold() and as the rebuild's (worker-thread) result; the rebuild sees every event and stream.
 *
 *   node --import tsx bench/replay.ts [--events=1000000] [--page=5000] [--workers=N] [--keep] [--db=NAME]
 *
 * --db=NAME reuses a log kept by an earlier --keep run, with --only=read|rebuild|verify to run one
 * part; --readlog also times readLog's order (tx_id, position), pages of 1000.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { sql, type Kysely } from 'kysely';
import pino from 'pino';
import { streamKind } from '../machines/index.ts';
import { loadConfig } from '../src/config.ts';
import { decide, fold, sameJson } from '../src/engine/decide.ts';
import { rebuildProjections, verifyProjections, type FoldedStream, type RebuildOptions, type RebuildStats } from '../src/engine/rebuild.ts';
import { readStreams, toStoredEvent, type Executor } from '../src/store/events.ts';
import { scanLogByStream } from '../src/store/log-scan.ts';
import type { StreamSnapshot } from '../src/store/projections.ts';
import { openDb, type Db } from '../src/store/db.ts';
import type { Database } from '../src/store/schema.ts';
import { startService, type Service } from '../src/service.ts';
import { adminQuery, databaseUrl, isMain, option, printTable } from './lib.ts';
import { createMemoryHost } from './memory-host.ts';

/** A bare `--name` on the command line. */
const flag = (name: string) => process.argv.includes(`--${name}`);
const TARGET = option('events', 1_000_000);
const PAGE = option('page', 5000);
const SEED_HOST = 'seedhost';

// The database: gpuvm_bench_r_*, this figure's own prefix (made and dropped with lib.ts's adminQuery).
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
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

/** The log and the tables as of one moment, as verifyProjections reads them. */
function inSnapshot<T>(db: Kysely<Database>, f: (tx: Executor) => Promise<T>): Promise<T> {
  return db.transaction().setIsolationLevel('repeatable read').setAccessMode('read only').execute(f);
}

/**
 * The reference: every event, every column, in readStreams' order through one server-side cursor,
 * pages of --page; pg parses each row (JSON, timestamps) and nothing is done with it.
 */
async function readReference(db: Kysely<Database>): Promise<number> {
  return inSnapshot(db, async (tx) => {
    await sql.raw(`declare replay_scan no scroll cursor for select ${ALL_COLUMNS} from events order by stream_id, stream_version`).execute(tx);
    let events = 0;
    for (;;) {
      const { rows } = await sql.raw<any>(`fetch ${PAGE} from replay_scan`).execute(tx);
      if (rows.length === 0) return events;
      events += rows.length;
    }
  });
}

/** The rebuild's own read (src/store/log-scan.ts), nothing done with the pages. */
async function readScan(db: Kysely<Database>): Promise<number> {
  return inSnapshot(db, async (tx) => {
    let events = 0;
    for await (const page of scanLogByStream(tx, PAGE)) events += page.length;
    return events;
  });
}

/** The global log in readLog's order, (tx_id, position), pages of 1000: src/store/events.ts readLog's query. */
async function readLogOrder(db: Kysely<Database>): Promise<number> {
  let n = 0;
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

interface RebuildRun {
  stats: RebuildStats;
  /** Snapshots of the sampled streams, as the rebuild gave them. */
  sampled: Map<string, StreamSnapshot>;
  rows: { vms: number; partitions: number; hosts: number; claims: number; unfoldable: number };
}

/** The engine's rebuild (rebuild.ts rebuildProjections), keeping what it gives in memory. */
async function rebuild(db: Kysely<Database>, opts: RebuildOptions, sample: ReadonlySet<string>): Promise<RebuildRun> {
  const sampled = new Map<string, StreamSnapshot>();
  const rows = { vms: 0, partitions: 0, hosts: 0, claims: 0, unfoldable: 0 };
  const stats = await inSnapshot(db, (tx) =>
    rebuildProjections(
      tx,
      (f: FoldedStream) => {
        if ('error' in f) {
          rows.unfoldable++;
          return;
        }
        rows[f.read.table]++;
        rows.claims += f.claims.length;
        if (sample.has(f.streamId)) sampled.set(f.streamId, f.snapshot);
      },
      { ...opts, pageSize: PAGE },
    ),
  );
  return { stats, sampled, rows };
}

const asJson = (v: unknown) => JSON.parse(JSON.stringify(v));

/**
 * On the sample: decide() applied event by event (the live engine's path) gives the same snapshot as
 * fold() and as the rebuild. Then fold() alone, in memory (no I/O, no parsing): best of 3.
 */
async function checkSample(db: Kysely<Database>, ids: string[], rebuilt: Map<string, StreamSnapshot>): Promise<{ streams: number; events: number; foldUs: number }> {
  const all = [...(await readStreams(db, ids))];
  let events = 0;
  for (const [id, list] of all) {
    events += list.length;
    let snap = null as StreamSnapshot | null;
    for (const e of list) {
      const d = decide(id, snap, { ...e.data, type: e.type });
      if (d.kind !== 'changed') throw new Error(`decide() does not take ${id} v${e.streamVersion} ${e.type} (${d.kind})`);
      snap = { streamId: id, kind: streamKind(id), machineVersion: e.machineVersion, version: e.streamVersion, state: d.stateAfter, context: d.context, createdAt: snap?.createdAt ?? e.recordedAt, updatedAt: e.recordedAt };
    }
    const folded = fold(id, list);
    if (!sameJson(asJson(snap), asJson(folded))) throw new Error(`fold() differs from decide() on ${id}: ${JSON.stringify(folded)} vs ${JSON.stringify(snap)}`);
    if (!sameJson(asJson(snap), asJson(rebuilt.get(id)))) throw new Error(`the rebuild differs from decide() on ${id}: ${JSON.stringify(rebuilt.get(id))} vs ${JSON.stringify(snap)}`);
  }
  let ms = Infinity;
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    for (const [id, list] of all) fold(id, list);
    ms = Math.min(ms, performance.now() - t0);
  }
  return { streams: all.length, events, foldUs: (ms * 1000) / events };
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
  const name = reuse ?? `gpuvm_bench_r_replay_${process.pid}`;
  if (!name.startsWith('gpuvm_bench_r_')) throw new Error('--db must name a gpuvm_bench_r_ database');
  let store: Db | null = null;
  try {
    if (!reuse) {
      await adminQuery(`create database ${name}`);
      console.log(`figure 4: building a log of ${TARGET.toLocaleString('en-US')} events in ${name}`);
      const vmIds = await timed('seed lifecycles through the engine', () => runSeed(databaseUrl(name)));
      store = await openDb({ databaseUrl: databaseUrl(name) });
      const seedCheck = await verifyProjections(store.kysely);
      if (seedCheck.differences.length) throw new Error(`the seed does not verify: ${JSON.stringify(seedCheck.differences[0])}`);
      const { value: rep } = await timed('replicate with SQL', () => replicate(store!.kysely, vmIds.value, TARGET));
      console.log(`  seed: ${rep.seedEvents} events of ${vmIds.value.length} VMs on one host; ${rep.copies} copies`);
      // Reads should meet a settled table (hint bits set, statistics known), as a long-lived log is.
      await timed('vacuum analyze', () => sql`vacuum analyze`.execute(store!.kysely));
    } else {
      store = await openDb({ databaseUrl: databaseUrl(name) });
    }
    const db = store.kysely;
    const count = async (q: string) => Number((await sql.raw<{ n: string }>(`select count(*)::text as n from ${q}`).execute(db)).rows[0]!.n);
    const total = await count('events');
    const expected = { streams: await count('streams'), vms: await count('vms'), partitions: await count('partitions'), hosts: await count('hosts'), claims: await count('gpu_claims') };
    const workers = option('workers', Math.max(1, cpus().length - 1));
    console.log(`log: ${total.toLocaleString('en-US')} events in ${expected.streams.toLocaleString('en-US')} streams; pages of ${PAGE}`);
    console.log(`machine: ${cpus().length} cores, load average ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);

    const only = option('only', '') || undefined;
    const want = (what: string) => !only || only === what;
    /** Table rows, formatted once every read is in (the share is of the mean read rate). */
    const rows: { what: string; rate: number; where: string }[] = [];
    const rate = (events: number, ms: number) => events / (ms / 1000);
    const reads: number[] = [];
    const readRate = () => reads.reduce((a, b) => a + b, 0) / reads.length;
    const row = (what: string, rate: number, where = '') => ({ what, rate, where });
    const reference = async (when: string) => {
      const read = await timed(`read (reference), ${when}`, () => readReference(db));
      if (read.value !== total) throw new Error(`the read saw ${read.value} events of ${total}`);
      reads.push(rate(read.value, read.ms));
    };

    if (want('read')) {
      await readReference(db); // warms the page cache; not counted
      await reference('before');
      const scan = await timed('read: log-scan.ts alone', () => readScan(db));
      rows.push(row('read: the rebuild\'s scan alone (log-scan.ts: fold columns, data as text)', rate(scan.value, scan.ms)));
      if (flag('readlog')) {
        const log = await timed('read: readLog order, pages of 1000', () => readLogOrder(db));
        rows.push(row('read: readLog order (tx_id, position), pages of 1000', rate(log.value, log.ms)));
      }
    }

    // A fixed pseudo-random sample: hosts, partitions and VMs in the log's proportions.
    const sampleIds = (await sql<{ stream_id: string }>`select stream_id from (select distinct stream_id from events) s order by md5(stream_id) limit 2000`.execute(db)).rows.map((r) => r.stream_id);
    const sample = new Set(sampleIds);
    const check = (what: string, run: RebuildRun) => {
      const r = run.rows;
      if (run.stats.events !== total || run.stats.streams !== expected.streams || r.unfoldable || r.vms !== expected.vms || r.partitions !== expected.partitions || r.hosts !== expected.hosts || r.claims !== expected.claims) {
        throw new Error(`${what} saw ${run.stats.events} events, ${run.stats.streams} streams, rows ${JSON.stringify(r)}; the database has ${total} events, ${JSON.stringify(expected)}`);
      }
    };
    let headline = NaN;
    if (want('rebuild')) {
      for (const n of new Set([0, workers])) {
        const label = n === 0 ? 'rebuild: rebuildProjections, folded on the reading thread alone' : `rebuild: rebuildProjections, ${n} fold worker thread(s) + the reading thread`;
        const run = await timed(label, () => rebuild(db, { workers: n }, sample));
        check(label, run.value);
        const r = rate(run.value.stats.events, run.ms);
        if (n === workers) headline = r;
        const here = n > 0 ? `; ${run.value.stats.foldedHere.toLocaleString('en-US')} events folded on the reading thread` : '';
        rows.push(row(label, r, `fold ${(run.value.stats.foldMs / 1000).toFixed(1)} s summed over threads in ${(run.ms / 1000).toFixed(1)} s${here}`));
        if (n === workers) {
          const cpu = await checkSample(db, sampleIds, run.value.sampled);
          console.log(
            `  decide() event by event = fold() = the rebuild's snapshot on ${cpu.streams} sampled streams (${cpu.events} events); ` +
              `fold() alone in memory: ${cpu.foldUs.toFixed(1)} µs per event (${fmtRate(1e6 / cpu.foldUs)} events/s on one core)`,
          );
        }
      }
    }
    if (want('verify')) {
      const v = await timed(`verify: verifyProjections (${workers} fold workers)`, () => verifyProjections(db, { workers, pageSize: PAGE }));
      if (v.value.events !== total || v.value.streams !== expected.streams) throw new Error(`verifyProjections saw ${v.value.events} events in ${v.value.streams} streams`);
      if (v.value.differences.length) console.log(`  verifyProjections found ${v.value.differences.length} differences, first: ${JSON.stringify(v.value.differences[0]).slice(0, 300)}`);
      rows.push(row(`verify: verifyProjections, ${workers} fold workers (${v.value.differences.length} differences)`, rate(v.value.events, v.ms), 'rebuild + 5 tables read and compared'));
    }
    if (want('read')) await reference('after');
    if (reads.length) rows.unshift(row(`read: every column, readStreams order, cursor (the reference; mean of ${reads.map(fmtRate).join(' and ')})`, readRate()));
    console.log(`load average at the end: ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
    printTable(
      `figure 4 — replay of ${total.toLocaleString('en-US')} events`,
      rows.map((r) => ({ what: r.what, 'events/s': fmtRate(r.rate), 'of read': reads.length ? `${((100 * r.rate) / readRate()).toFixed(0)} %` : '', 'where the time went': r.where })),
    );
    if (Number.isFinite(headline) && reads.length) {
      const share = headline / readRate();
      console.log(
        `rebuild (${workers} fold workers): ${fmtRate(headline)} events/s — goal ≥ 100,000: ${headline >= 100_000 ? 'met' : 'missed'}; ` +
          `${(100 * share).toFixed(0)} % of the read rate — goal ≥ 50 %: ${share >= 0.5 ? 'met' : 'missed'}`,
      );
    }
  } finally {
    await store?.close();
    if (!flag('keep') && !reuse) await adminQuery(`drop database if exists ${name} with (force)`);
    else console.log(`kept database ${name}`);
  }
}

if (isMain(import.meta.url)) await main();
