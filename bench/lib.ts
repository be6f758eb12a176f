/**
 * Shared benchmark helpers: options, clocks and percentiles, a fresh bench database, a round-trip
 * recorder over `pg` and PGlite, the gpuvm service under test on in-memory hosts, the lifecycle
 * driver, and the results table.
 *
 * Clocks: "wall" times in this file are performance.timeOrigin + performance.now() — the system
 * real-time clock with sub-millisecond resolution. Postgres runs on this machine, so its now()
 * reads the same clock and the two can be subtracted (only when the server is local).
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import { PGlite } from '@electric-sql/pglite';
import { sql, type Kysely } from 'kysely';
import pg from 'pg';
import pino from 'pino';
import { loadConfig, type Config } from '../src/config.ts';
import { VmService } from '../src/engine/vms.ts';
import type { VmRow } from '../src/store/projections.ts';
import type { Logger } from '../src/log.ts';
import { startService, type Service } from '../src/service.ts';
import type { Database } from '../src/store/schema.ts';
import { EFFECTS_CHANNEL, type Db } from '../src/store/db.ts';
import { createMemoryHost, type MemoryHost } from './memory-host.ts';

// ── options ──────────────────────────────────────────────────────────────────

/** `--name=value` on the command line, else BENCH_NAME in the environment, else the default. */
export function option(name: string, fallback: number): number;
export function option(name: string, fallback: string): string;
export function option(name: string, fallback: number | string): number | string {
  const flag = process.argv.find((a) => a.startsWith(`--${name}=`));
  const raw = flag ? flag.slice(name.length + 3) : process.env[`BENCH_${name.toUpperCase().replace(/-/g, '_')}`];
  if (raw === undefined || raw === '') return fallback;
  if (typeof fallback === 'number') {
    const n = Number(raw);
    if (!Number.isFinite(n)) throw new Error(`--${name} must be a number (got ${JSON.stringify(raw)})`);
    return n;
  }
  return raw;
}

/** A comma-separated list of numbers, e.g. --concurrency=1,16. */
export function listOption(name: string, fallback: number[]): number[] {
  const raw = option(name, fallback.join(','));
  return raw.split(',').filter(Boolean).map((s) => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < 1) throw new Error(`--${name}: ${JSON.stringify(s)} is not a positive integer`);
    return n;
  });
}

/** True when this module is the script node was started with (not imported by run.ts or another figure). */
export function isMain(importMetaUrl: string): boolean {
  return process.argv[1] !== undefined && importMetaUrl === pathToFileURL(process.argv[1]).href;
}

/**
 * Runs a figure's `main` when its module is the script node was started with, then exits: DBOS
 * leaves timers behind after shutdown, and the figures are printed by then.
 */
export function runMain(importMetaUrl: string, main: () => Promise<void>): void {
  if (!isMain(importMetaUrl)) return;
  main().then(
    () => process.exit(0),
    (err) => {
      console.error(err);
      process.exit(1);
    },
  );
}

// ── clocks and statistics ────────────────────────────────────────────────────

/** Wall-clock milliseconds with sub-millisecond resolution (see the file comment). */
export function wallNow(): number {
  return performance.timeOrigin + performance.now();
}

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}

export interface Summary {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

export function summarize(samples: readonly number[]): Summary {
  const sorted = [...samples].sort((a, b) => a - b);
  const mean = sorted.reduce((s, v) => s + v, 0) / (sorted.length || 1);
  return { n: sorted.length, p50: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99), max: sorted.at(-1) ?? Number.NaN, mean };
}

export const fmt = (v: number, digits = 1): string => (Number.isFinite(v) ? v.toFixed(digits) : '–');

/** Prints rows as an aligned table under a title. */
export function printTable(title: string, rows: Record<string, string | number>[]): void {
  console.log(`\n${title}`);
  if (rows.length === 0) {
    console.log('  (no rows)');
    return;
  }
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const cell = (v: string | number | undefined) => (v === undefined ? '' : typeof v === 'number' ? (Number.isInteger(v) ? String(v) : fmt(v)) : v);
  const width = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (vals: string[]) => '  ' + vals.map((v, i) => v.padStart(width[i]!)).join('  ');
  console.log(line(cols));
  console.log(line(width.map((w) => '-'.repeat(w))));
  for (const r of rows) console.log(line(cols.map((c) => cell(r[c]))));
}

// ── databases ────────────────────────────────────────────────────────────────

export const DB_PREFIX = 'gpuvm_bench_a_';

/** The server the benchmarks run on; only used to create and drop gpuvm_bench_* databases. */
export function adminUrl(): string {
  return option('pg-url', 'postgres://postgres@127.0.0.1:5432/postgres');
}

export function databaseUrl(name: string): string {
  const url = new URL(adminUrl());
  url.pathname = `/${name}`;
  return url.toString();
}

async function admin<T>(fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: adminUrl() });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

/** One statement on the bench server's admin connection (create or drop a database). */
export async function adminQuery(text: string): Promise<void> {
  await admin((c) => c.query(text));
}

export interface BenchDatabase {
  name: string;
  url: string;
  drop(): Promise<void>;
}

/**
 * A brand-new database `<prefix><label>_<pid>_<random>` on the bench server. Figures 1, 2 and 6 use
 * gpuvm_bench_a_ (which dropStaleDatabases reaps); figures 3 and 5 their own prefix.
 */
export async function freshDatabase(label: string, prefix = DB_PREFIX): Promise<BenchDatabase> {
  const name = `${prefix}${label}_${process.pid}_${Math.random().toString(36).slice(2, 7)}`;
  if (!/^[a-z0-9_]+$/.test(name)) throw new Error(`bad database label ${JSON.stringify(label)}`);
  await admin((c) => c.query(`create database ${name}`));
  return {
    name,
    url: databaseUrl(name),
    drop: () => admin((c) => c.query(`drop database if exists ${name} with (force)`)).then(() => undefined),
  };
}

/** Drops gpuvm_bench_a_* databases left by a bench process that no longer runs (killed mid-run). */
export async function dropStaleDatabases(): Promise<string[]> {
  return admin(async (c) => {
    const { rows } = await c.query<{ datname: string }>(`select datname from pg_database where datname like $1`, [`${DB_PREFIX}%`]);
    const dropped: string[] = [];
    for (const { datname } of rows) {
      const pid = Number(/_(\d+)_[a-z0-9]+$/.exec(datname)?.[1]);
      if (!Number.isInteger(pid) || pidAlive(pid)) continue;
      await c.query(`drop database if exists ${pg.escapeIdentifier(datname)} with (force)`);
      dropped.push(datname);
    }
    return dropped;
  });
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * The database's committed transactions (pg_stat_database.xact_commit). Backends report their
 * counts when idle (at most once a second) and when they exit, so read this after the pool that
 * did the work has closed; it waits until the value stops moving.
 */
export async function settledXactCommit(name: string): Promise<number> {
  return admin(async (c) => {
    const read = async () => Number((await c.query(`select xact_commit from pg_stat_database where datname = $1`, [name])).rows[0]?.xact_commit ?? 0);
    let last = await read();
    for (let i = 0; i < 20; i++) {
      await new Promise((r) => setTimeout(r, 250));
      const now = await read();
      if (now === last) return now;
      last = now;
    }
    return last;
  });
}

/** Clock ticks per second of /proc/<pid>/stat times. */
let clockTicks: number | null = null;
function ticksPerSecond(): number {
  if (clockTicks === null) {
    try {
      clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      clockTicks = 100;
    }
  }
  return clockTicks;
}

/**
 * CPU used so far (user + system, ms) by each server process connected to the database, from
 * /proc/<pid>/stat (the server runs on this machine). Two readings around a run give the
 * server's CPU for it, counted for backends alive at the second reading; 10 ms resolution.
 */
export async function backendCpu(name: string): Promise<Map<number, number>> {
  const pids = await admin(async (c) => (await c.query<{ pid: number }>(`select pid from pg_stat_activity where datname = $1`, [name])).rows.map((r) => r.pid));
  const cpu = new Map<number, number>();
  for (const pid of pids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      // After "pid (comm) ": state is field 3, utime 14 and stime 15 → indexes 11 and 12 here.
      cpu.set(pid, ((Number(fields[11]) + Number(fields[12])) * 1000) / ticksPerSecond());
    } catch {
      // the backend exited between the two reads
    }
  }
  return cpu;
}

export function cpuBetween(before: Map<number, number>, after: Map<number, number>): number {
  let ms = 0;
  for (const [pid, v] of after) ms += v - (before.get(pid) ?? 0);
  return ms;
}

// ── round trips ──────────────────────────────────────────────────────────────

/** Statements carrying this comment are the benchmark's own (its bookkeeping); they are counted apart. */
export const BENCH_MARK = '/* gpuvm-bench */';

type StatementKind = 'begin' | 'commit' | 'rollback' | 'claim' | 'select' | 'insert' | 'update' | 'delete' | 'notify' | 'other';

export interface RoundTripCounts {
  /** Round trips by kind, and the milliseconds spent waiting for them (summed over connections). */
  statements: Record<StatementKind, { n: number; ms: number }>;
  /** Transactions that ended in COMMIT, plus statements run outside a transaction (autocommit). */
  transactions: number;
  /** Of those, the ones that wrote (insert/update/delete/notify): each flushes the WAL at commit. */
  writingTransactions: number;
  /** Explicit transactions: BEGIN sent → COMMIT answered, summed. */
  txMs: number;
  explicitTransactions: number;
  /** The benchmark's own statements, not included above. */
  benchStatements: number;
  /** Claims that found nothing to claim (a worker woken with no due effect). */
  emptyClaims: number;
}

const KINDS: StatementKind[] = ['begin', 'commit', 'rollback', 'claim', 'select', 'insert', 'update', 'delete', 'notify', 'other'];
const EFFECT_ID = /^(vm|partition|host):[^@]+@\d+#\d+$/;

function classify(text: string): StatementKind {
  const s = text.replace(/^\s*(\/\*[\s\S]*?\*\/\s*)*/, '').slice(0, 200).toLowerCase();
  if (s.startsWith('begin') || s.startsWith('start transaction')) return 'begin';
  if (s.startsWith('commit')) return 'commit';
  if (s.startsWith('rollback')) return 'rollback';
  if (s.startsWith('with due as')) return 'claim';
  if (s.includes('pg_notify')) return 'notify';
  for (const k of ['select', 'insert', 'update', 'delete'] as const) if (s.startsWith(k)) return k;
  if (s.startsWith('with')) return /\b(insert|update|delete)\b/.test(text.toLowerCase()) ? 'update' : 'select';
  return 'other';
}

const labels = new Map<string, string>();
/** A statement's text, whitespace collapsed, first 90 characters (cached: the engine repeats its statements). */
function statementLabel(text: string): string {
  let label = labels.get(text);
  if (label === undefined) {
    label = text.replace(/\s+/g, ' ').trim().slice(0, 90);
    if (labels.size < 10_000) labels.set(text, label);
  }
  return label;
}

/** The difference of two byStatement copies, largest total first. */
export function statementDiff(after: Map<string, { n: number; ms: number }>, before: Map<string, { n: number; ms: number }>): { statement: string; n: number; ms: number }[] {
  return [...after]
    .map(([statement, v]) => ({ statement, n: v.n - (before.get(statement)?.n ?? 0), ms: v.ms - (before.get(statement)?.ms ?? 0) }))
    .filter((r) => r.n > 0)
    .sort((a, b) => b.ms - a.ms);
}

const WRITES = new Set<StatementKind>(['claim', 'insert', 'update', 'delete', 'notify']);

interface TxState {
  begunAt: number;
  wrote: boolean;
  /** Effects this transaction inserted. */
  effectIds: string[];
  /** Effects this transaction claimed: their handlers start once it has committed. */
  claimedIds: string[];
}

/**
 * Counts every round trip the process makes to the database — `pg` clients (gpuvm's pool, its
 * LISTEN connection, DBOS's pool) and PGlite — by patching their `query` once. It also records,
 * for the step hand-off figure, when the transaction that inserted each effect sent and got back
 * its COMMIT, and when the claim that took the effect returned (the handler starts in that tick).
 */
export class RoundTripRecorder {
  private counts = RoundTripRecorder.empty();
  private readonly tx = new WeakMap<object, TxState>();
  /** effect id → COMMIT of the transaction that inserted it: sent and answered (wall ms). */
  readonly effectCommits = new Map<string, { sent: number; acked: number }>();
  /** effect id → when its first claim returned to the worker (wall ms); for a claim made inside a
   *  transaction, when that transaction's COMMIT returned. */
  readonly effectClaims = new Map<string, number>();
  recordEffects = false;
  /** When set, every statement's milliseconds by kind (for percentiles while profiling). */
  samples: Map<StatementKind, number[]> | null = null;
  /** Round trips and milliseconds by statement (its text, whitespace collapsed, first 90 characters). */
  readonly byStatement = new Map<string, { n: number; ms: number }>();

  private static empty(): RoundTripCounts {
    return {
      statements: Object.fromEntries(KINDS.map((k) => [k, { n: 0, ms: 0 }])) as RoundTripCounts['statements'],
      transactions: 0,
      writingTransactions: 0,
      txMs: 0,
      explicitTransactions: 0,
      benchStatements: 0,
      emptyClaims: 0,
    };
  }

  snapshot(): RoundTripCounts {
    return structuredClone(this.counts);
  }

  static diff(after: RoundTripCounts, before: RoundTripCounts): RoundTripCounts {
    const d = RoundTripRecorder.empty();
    for (const k of KINDS) d.statements[k] = { n: after.statements[k].n - before.statements[k].n, ms: after.statements[k].ms - before.statements[k].ms };
    d.transactions = after.transactions - before.transactions;
    d.writingTransactions = after.writingTransactions - before.writingTransactions;
    d.txMs = after.txMs - before.txMs;
    d.explicitTransactions = after.explicitTransactions - before.explicitTransactions;
    d.benchStatements = after.benchStatements - before.benchStatements;
    d.emptyClaims = after.emptyClaims - before.emptyClaims;
    return d;
  }

  /** Called before a statement is sent on `conn`; returns what to call with its rows and the
   *  rows it changed (null rows: it failed). */
  private start(conn: object, text: string, params: unknown[] | undefined): (rows: unknown[] | null, changed?: number) => void {
    const sent = wallNow();
    if (text.includes(BENCH_MARK)) {
      this.counts.benchStatements++;
      return () => {};
    }
    const kind = classify(text);
    let state = this.tx.get(conn);
    if (kind === 'begin') {
      state = { begunAt: sent, wrote: false, effectIds: [], claimedIds: [] };
      this.tx.set(conn, state);
    }
    // Effects this statement inserts: a Kysely insert names them as parameters, the step writer
    // (src/store/step.ts) inside a JSON parameter.
    const inserted: string[] = [];
    if (this.recordEffects && (kind === 'insert' || kind === 'update') && /insert into "?effects"?/i.test(text)) {
      for (const p of params ?? []) {
        if (typeof p !== 'string') continue;
        if (EFFECT_ID.test(p)) inserted.push(p);
        else if (p.startsWith('[')) for (const m of p.matchAll(/"id":"([^"]+)"/g)) if (EFFECT_ID.test(m[1]!)) inserted.push(m[1]!);
      }
    }
    if (state && kind !== 'begin') state.effectIds.push(...inserted);
    return (rows, changed) => {
      const done = wallNow();
      // A write that changed nothing (a claim that found no due effect) gets no transaction id and
      // flushes nothing at commit; a notify always does work at commit. A statement whose rows come
      // from a data-modifying CTE (a step) wrote them, whatever count the driver reports for its
      // final SELECT (PGlite reports 0 affected rows).
      // A claim always answers one row (the next due time); it took something only if a row has an id.
      const took = kind === 'claim' && rows !== null && (rows as { id?: unknown }[]).some((r) => typeof r.id === 'string');
      const wrote = WRITES.has(kind) && rows !== null && (kind === 'claim' ? took : kind === 'notify' || Math.max(changed ?? 0, rows.length) > 0);
      const open = this.tx.get(conn);
      if (open && wrote) open.wrote = true;
      const c = this.counts;
      c.statements[kind].n++;
      c.statements[kind].ms += done - sent;
      const label = statementLabel(text);
      const byLabel = this.byStatement.get(label) ?? { n: 0, ms: 0 };
      byLabel.n++;
      byLabel.ms += done - sent;
      this.byStatement.set(label, byLabel);
      if (this.samples) {
        if (!this.samples.has(kind)) this.samples.set(kind, []);
        this.samples.get(kind)!.push(done - sent);
      }
      if (kind === 'commit' || kind === 'rollback') {
        const t = this.tx.get(conn);
        this.tx.delete(conn);
        if (kind === 'commit' && rows !== null) {
          c.transactions++;
          c.explicitTransactions++;
          if (t) {
            c.txMs += done - t.begunAt;
            if (t.wrote) c.writingTransactions++;
            for (const id of t.effectIds) this.effectCommits.set(id, { sent, acked: done });
            for (const id of t.claimedIds) if (!this.effectClaims.has(id)) this.effectClaims.set(id, done);
          }
        }
      } else if (kind !== 'begin' && !open && rows !== null) {
        c.transactions++;
        if (wrote) c.writingTransactions++;
        // An autocommit statement's effects are due once it returns.
        for (const id of inserted) this.effectCommits.set(id, { sent, acked: done });
      }
      if (kind === 'claim' && rows !== null && !took) c.emptyClaims++;
      if (kind === 'claim' && this.recordEffects && rows) {
        for (const r of rows as { id?: unknown }[]) {
          if (typeof r.id !== 'string') continue;
          // Claimed inside a transaction (the worker's direct hand-off): launched after its commit.
          if (open) open.claimedIds.push(r.id);
          else if (!this.effectClaims.has(r.id)) this.effectClaims.set(r.id, done);
        }
      }
    };
  }

  /** Patches pg.Client and PGlite once for this process. */
  install(): this {
    if (installed) throw new Error('a RoundTripRecorder is already installed in this process');
    installed = this;
    const recorder = this;

    const pgQuery = pg.Client.prototype.query as (...args: unknown[]) => unknown;
    (pg.Client.prototype as unknown as { query: (...args: unknown[]) => unknown }).query = function (this: object, ...args: unknown[]) {
      const first = args[0] as string | { text?: string; values?: unknown[] } | undefined;
      const text = typeof first === 'string' ? first : first?.text;
      if (typeof text !== 'string') return pgQuery.apply(this, args);
      const params = (typeof first === 'string' ? args[1] : first?.values) as unknown[] | undefined;
      const finish = recorder.start(this, text, Array.isArray(params) ? params : undefined);
      const last = args.at(-1);
      if (typeof last === 'function') {
        args[args.length - 1] = (err: unknown, res: { rows?: unknown[]; rowCount?: number | null } | undefined) => {
          finish(err ? null : (res?.rows ?? []), res?.rowCount ?? undefined);
          (last as (e: unknown, r: unknown) => void)(err, res);
        };
        return pgQuery.apply(this, args);
      }
      const out = pgQuery.apply(this, args);
      if (out && typeof (out as Promise<unknown>).then === 'function') {
        (out as Promise<{ rows?: unknown[]; rowCount?: number | null }>).then(
          (res) => finish(res?.rows ?? [], res?.rowCount ?? undefined),
          () => finish(null),
        );
      }
      return out;
    };

    const pgliteQuery = PGlite.prototype.query;
    PGlite.prototype.query = function (this: PGlite, text: string, params?: unknown[], options?: unknown) {
      const finish = recorder.start(this, text, params);
      const out = pgliteQuery.call(this, text, params, options as never);
      out.then(
        (res) => finish(res.rows, res.affectedRows),
        () => finish(null),
      );
      return out;
    } as typeof PGlite.prototype.query;
    return this;
  }
}

let installed: RoundTripRecorder | null = null;

/** The process's recorder, installed on first use. */
export function roundTrips(): RoundTripRecorder {
  return installed ?? new RoundTripRecorder().install();
}

// ── gpuvm under test ─────────────────────────────────────────────────────────

export type DbKind = 'postgres' | 'pglite';

export interface GpuvmHost {
  hostId: string;
  memory: MemoryHost;
  vms: VmService;
}

export interface GpuvmUnderTest {
  kind: DbKind;
  hosts: GpuvmHost[];
  db: Kysely<Database>;
  services: Service[];
  stop(): Promise<void>;
}

export interface GpuvmOptions {
  kind: DbKind;
  hosts: number;
  /** Postgres: the bench database. */
  databaseUrl?: string;
  /** Config overrides (e.g. monitorIntervalMs); everything else is gpuvm's default. */
  config?: Partial<Config>;
}

/** Logs at warn and above go to stderr: a retry or a failure during a run is worth seeing. */
export function benchLogger(): Logger {
  return pino({ level: option('log', 'error'), base: { service: 'gpuvm' } }, pino.destination(2));
}

function benchConfig(dataDir: string, hostId: string, databaseUrl: string | undefined, overrides: Partial<Config>): Config {
  // The environment is not read (env = {}): a GPUVM_* variable in the shell must not change a figure.
  return loadConfig({ dataDir, databaseUrl, hostId, port: 0, logLevel: 'warn', ...overrides }, {});
}

/**
 * Starts gpuvm on `hosts` in-memory B200 hosts (hostIds bench-1, bench-2, …): one startService per
 * host — each host its own agent with its own pool, LISTEN connection, worker, monitors,
 * reconciler and API (port 0), as one `gpuvm serve` per host — all against the same database and
 * sharing this process and its cores. PGlite: one host (the embedded database is one service's).
 */
export async function startGpuvm(opts: GpuvmOptions): Promise<GpuvmUnderTest> {
  const dataDir = mkdtempSync(join(tmpdir(), 'gpuvm-bench-'));
  const log = benchLogger();
  const memories = await Promise.all(Array.from({ length: opts.hosts }, (_, i) => createMemoryHost(`bench-${i + 1}`)));
  const removeDir = () => rmSync(dataDir, { recursive: true, force: true });

  if (opts.kind === 'postgres' && !opts.databaseUrl) throw new Error('startGpuvm: postgres needs databaseUrl');
  // An embedded database belongs to one process and one service: two services cannot share it.
  if (opts.kind === 'pglite' && opts.hosts > 1) throw new Error('startGpuvm: PGlite serves one host (one service per embedded database)');
  const services: Service[] = [];
  try {
    // One after another: the first migrates, the others find the schema in place.
    for (const m of memories) services.push(await startService(benchConfig(dataDir, m.adapters.hostId, opts.databaseUrl, opts.config ?? {}), { host: m.adapters, log }));
  } catch (err) {
    for (const s of services) await s.stop().catch(() => {});
    removeDir();
    throw err;
  }
  return {
    kind: opts.kind,
    hosts: services.map((s, i) => ({ hostId: s.host.hostId, memory: memories[i]!, vms: s.vms })),
    db: services[0]!.db.kysely,
    services,
    async stop() {
      for (const s of services) await s.stop();
      removeDir();
    },
  };
}

// ── driving lifecycles ───────────────────────────────────────────────────────

const END_STATES = new Set(['failed', 'crashed', 'deleted']);

/**
 * Waits for a VM to reach one of `states` as `GET /v1/vms/:id?changedFrom=…` does for
 * `gpuvm vm create --wait`: VmService.awaitChange, which hears the steps its own process commits
 * and reads the VM once per call. Its reads are the service's, and are counted.
 */
export async function untilState(vms: VmService, vm: VmRow, states: string[]): Promise<VmRow> {
  while (!states.includes(vm.state)) {
    if (END_STATES.has(vm.state)) throw new Error(`VM ${vm.id} ended ${vm.state} while waiting for ${states.join('/')}: ${vm.reason ?? 'no reason'}`);
    vm = await vms.awaitChange(vm.id, vm.state, 60_000);
  }
  return vm;
}

export interface LifecycleRun {
  kind: DbKind;
  concurrency: number;
  hosts: number;
  lifecycles: number;
  /** First create sent → last VM seen deleted. */
  wallMs: number;
  lifecyclesPerSec: number;
  /** One lifecycle: create sent → seen deleted, as a slot experienced it. */
  latencyMs: Summary;
  /** Last VM deleted → no effect pending or running (the trailing powerdown timers fire then). */
  drainMs: number;
  events: number;
  effects: number;
  effectsByType: Record<string, number>;
  /** Round trips from the first create until drained, the waits' included. */
  roundTrips: RoundTripCounts;
  hostCalls: Record<string, number>;
  /** CPU time of this process (user + system) from the first create until drained: the engine's
   *  JavaScript, the drivers, and the waits — Postgres's own CPU is not in it. */
  cpuMs: number;
  /** Postgres: CPU of the database's server processes over the same span (null on PGlite, whose
   *  engine runs inside this process and is in cpuMs). */
  serverCpuMs: number | null;
  /** Round trips by statement text during the run, largest total milliseconds first. */
  statements: { statement: string; n: number; ms: number }[];
  /** The log position before the run: its events come after it. */
  afterPosition: string;
}

/**
 * Runs `total` full lifecycles (create 1-GPU VM → running → delete → deleted) through VmService,
 * `concurrency` at a time: slot i works on host i mod hosts, so no host is asked for more GPUs than
 * it has. After the last VM is gone it waits until no effect is pending (timers included), so the
 * round trips and events counted are all a lifecycle causes.
 */
export async function runLifecycles(g: GpuvmUnderTest, opts: { total: number; concurrency: number; serverDatabase?: string }): Promise<LifecycleRun> {
  const perHost = Math.ceil(opts.concurrency / g.hosts.length);
  if (perHost > 8) throw new Error(`${opts.concurrency} concurrent 1-GPU lifecycles need ${Math.ceil(opts.concurrency / 8)} hosts; ${g.hosts.length} started`);
  const recorder = roundTrips();
  const before = {
    position: await maxPosition(g.db),
    effects: await effectCount(g.db),
    byType: await effectsByType(g.db),
    rt: recorder.snapshot(),
    statements: new Map([...recorder.byStatement].map(([k, v]) => [k, { ...v }])),
    calls: g.hosts.map((h) => new Map(h.memory.calls)),
  };
  const latencies: number[] = [];
  let next = 0;
  const serverBefore = opts.serverDatabase ? await backendCpu(opts.serverDatabase) : null;
  const cpu = process.cpuUsage();
  const started = wallNow();
  const slot = async (i: number) => {
    const host = g.hosts[i % g.hosts.length]!;
    while (next < opts.total) {
      next++;
      const t0 = wallNow();
      const vm = await host.vms.create({ gpus: 1, hostId: host.hostId, actor: 'bench' });
      await untilState(host.vms, vm, ['running']);
      await untilState(host.vms, await host.vms.delete(vm.id, 'bench'), ['deleted']);
      latencies.push(wallNow() - t0);
    }
  };
  await Promise.all(Array.from({ length: opts.concurrency }, (_, i) => slot(i)));
  const ended = wallNow();
  await drained(g.db);
  const drainedAt = wallNow();
  const cpuUsed = process.cpuUsage(cpu);
  const serverCpuMs = serverBefore && opts.serverDatabase ? cpuBetween(serverBefore, await backendCpu(opts.serverDatabase)) : null;
  const rt = RoundTripRecorder.diff(recorder.snapshot(), before.rt);
  const statements = statementDiff(recorder.byStatement, before.statements);

  const events = Number((await sql<{ n: string }>`${sql.raw(BENCH_MARK)} select count(*)::text as n from events where position > ${before.position}`.execute(g.db)).rows[0]!.n);
  const byTypeAfter = await effectsByType(g.db);
  const effectsByTypeInRun = Object.fromEntries(
    Object.entries(byTypeAfter)
      .map(([type, n]) => [type, n - (before.byType[type] ?? 0)] as const)
      .filter(([, n]) => n > 0),
  );
  const hostCalls: Record<string, number> = {};
  g.hosts.forEach((h, i) => {
    for (const [k, v] of h.memory.calls) hostCalls[k] = (hostCalls[k] ?? 0) + v - (before.calls[i]!.get(k) ?? 0);
  });
  return {
    kind: g.kind,
    concurrency: opts.concurrency,
    hosts: g.hosts.length,
    lifecycles: opts.total,
    wallMs: ended - started,
    lifecyclesPerSec: (opts.total * 1000) / (ended - started),
    latencyMs: summarize(latencies),
    drainMs: drainedAt - ended,
    events,
    effects: (await effectCount(g.db)) - before.effects,
    effectsByType: effectsByTypeInRun,
    roundTrips: rt,
    hostCalls,
    cpuMs: (cpuUsed.user + cpuUsed.system) / 1000,
    serverCpuMs,
    statements,
    afterPosition: before.position,
  };
}

async function maxPosition(db: Kysely<Database>): Promise<string> {
  const r = await sql<{ p: string | null }>`${sql.raw(BENCH_MARK)} select max(position)::text as p from events`.execute(db);
  return r.rows[0]?.p ?? '0';
}

async function effectsByType(db: Kysely<Database>): Promise<Record<string, number>> {
  const r = await sql<{ type: string; n: string }>`${sql.raw(BENCH_MARK)} select type, count(*)::text as n from effects group by type order by type`.execute(db);
  return Object.fromEntries(r.rows.map((x) => [x.type, Number(x.n)]));
}

async function effectCount(db: Kysely<Database>): Promise<number> {
  return Number((await sql<{ n: string }>`${sql.raw(BENCH_MARK)} select count(*)::text as n from effects`.execute(db)).rows[0]!.n);
}

/** Waits until no effect is pending or running (a timer falls due, runs and completes). */
export async function drained(db: Kysely<Database>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await sql<{ n: string }>`${sql.raw(BENCH_MARK)} select count(*)::text as n from effects where status in ('pending', 'running')`.execute(db);
    if (Number(r.rows[0]!.n) === 0) return;
    if (Date.now() > deadline) throw new Error(`effects still pending ${timeoutMs} ms after the last lifecycle`);
    await new Promise((res) => setTimeout(res, 20));
  }
}

/** Effects one lifecycle runs, by type: measured by running one lifecycle on a throwaway embedded database. */
export async function effectsOfOneLifecycle(): Promise<{ total: number; byType: Record<string, number> }> {
  const g = await startGpuvm({ kind: 'pglite', hosts: 1 });
  try {
    const run = await runLifecycles(g, { total: 1, concurrency: 1 });
    return { total: run.effects, byType: run.effectsByType };
  } finally {
    await g.stop();
  }
}

/**
 * Where a lifecycle's time goes, from the log alone: for every VM of the run, the time between
 * consecutive events of its lifecycle (VM and partition streams share the VM id as correlation),
 * grouped by transition. recorded_at is now() of the transaction that wrote the event — its start
 * — so a gap spans: the rest of the previous transaction, the hand-off to the next effect, the
 * handler, and the start of the next transaction.
 */
export async function stepGaps(db: Kysely<Database>, afterPosition = '0'): Promise<{ step: string; n: number; p50: number; p90: number; max: number; mean: number }[]> {
  const { rows } = await sql<{ correlation_id: string; type: string; stream_id: string; at_ms: number }>`
    ${sql.raw(BENCH_MARK)} select correlation_id, type, stream_id, extract(epoch from recorded_at) * 1000 as at_ms
    from events where position > ${afterPosition} and correlation_id like 'vm-%' order by correlation_id, position`.execute(db);
  const gaps = new Map<string, number[]>();
  for (let i = 1; i < rows.length; i++) {
    const a = rows[i - 1]!;
    const b = rows[i]!;
    if (a.correlation_id !== b.correlation_id) continue;
    const step = `${a.type} → ${b.type}`;
    if (!gaps.has(step)) gaps.set(step, []);
    gaps.get(step)!.push(Number(b.at_ms) - Number(a.at_ms));
  }
  // In lifecycle order: by the position of the step's first occurrence in the first lifecycle.
  return [...gaps].map(([step, v]) => ({ step, ...summarize(v) })).map(({ step, n, p50, p90, max, mean }) => ({ step, n, p50, p90, max, mean }));
}

// ── CPU profiles ─────────────────────────────────────────────────────────────

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}

/** Where a `node --cpu-prof` profile spent its samples: self time by package (or gpuvm folder) and by function. */
export function summarizeCpuProfile(profile: { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[] }): {
  totalMs: number;
  byPackage: { where: string; ms: number }[];
  byFunction: { fn: string; where: string; ms: number }[];
} {
  const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
  const self = new Map<number, number>();
  profile.samples.forEach((id, i) => self.set(id, (self.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0) / 1000));
  const where = (n: ProfileNode): string => {
    const { url, functionName } = n.callFrame;
    if (!url) return functionName.startsWith('(') ? functionName : '(native)';
    const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(url);
    if (pkg) return pkg[1]!;
    const own = /\/(src\/[^/]+|machines|bench|migrations)\//.exec(url);
    if (own) return `gpuvm ${own[1]}`;
    if (url.startsWith('node:')) return 'node internals';
    return url;
  };
  const byPackage = new Map<string, number>();
  const byFunction = new Map<string, { fn: string; where: string; ms: number }>();
  let totalMs = 0;
  for (const [id, ms] of self) {
    const n = nodes.get(id)!;
    const w = where(n);
    totalMs += ms;
    byPackage.set(w, (byPackage.get(w) ?? 0) + ms);
    const key = `${n.callFrame.functionName || '(anonymous)'} ${n.callFrame.url}:${n.callFrame.lineNumber + 1}`;
    const f = byFunction.get(key) ?? { fn: `${n.callFrame.functionName || '(anonymous)'}:${n.callFrame.lineNumber + 1}`, where: w, ms: 0 };
    f.ms += ms;
    byFunction.set(key, f);
  }
  return {
    totalMs,
    byPackage: [...byPackage].map(([w, ms]) => ({ where: w, ms })).sort((a, b) => b.ms - a.ms),
    byFunction: [...byFunction.values()].sort((a, b) => b.ms - a.ms),
  };
}

/**
 * One LISTEN connection for every worker of the process: each worker's listen() registers its
 * callback here, and a notification (its payload is the host id) goes to that host's worker.
 */
export function sharedListener(db: Db): (hostId: string) => Db {
  const byHost = new Map<string, (payload: string) => void>();
  let started: Promise<unknown> | null = null;
  return (hostId) => ({
    ...db,
    async listen(channel, onNotify) {
      if (channel !== EFFECTS_CHANNEL) throw new Error(`bench: only ${EFFECTS_CHANNEL} is shared between workers, not ${channel}`);
      byHost.set(hostId, onNotify);
      started ??= db.listen(EFFECTS_CHANNEL, (payload) => byHost.get(payload)?.(payload));
      await started;
      return async () => {
        byHost.delete(hostId);
      };
    },
    // The process closes the real database once, after every worker has stopped.
    async close() {},
  });
}
