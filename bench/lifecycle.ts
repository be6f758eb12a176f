/**
 * Figure 1 — lifecycle throughput — and figure 6 — the same on the embedded database.
 *
 * gpuvm: the real service (startService: store, engine, worker, monitors, reconciler, API on port
 * 0) against a fresh Postgres database, on in-memory B200 hosts (bench/memory-host.ts) whose
 * adapters do no I/O. A lifecycle is what an operator asks for through the API, called on the
 * service's VmService object (the API's handlers call the same methods; HTTP is left out): create a
 * 1-GPU VM, wait until the `vms` projection says running, delete it, wait until it says deleted —
 * every step, event, effect and projection of the real machines in between.
 *
 * A B200 has 8 GPUs, so 16 concurrent lifecycles run on two hosts, one service (one agent: its own
 * pool, LISTEN connection and worker) per host, both in this process and on the same database;
 * slot i always works on host i mod 2, so neither host is ever asked for a ninth GPU.
 *
 * References, in the same invocation: DBOS Transact (bench/dbos-lifecycle.ts) with as many no-op
 * steps per workflow as a gpuvm lifecycle runs effects, and pgbench's one-row INSERT
 * (bench/pgbench.ts) — the commit floor.
 *
 *   node --import tsx bench/lifecycle.ts [--concurrency=1,16] [--lifecycles-1=500] [--lifecycles-16=1600]
 *        [--pglite-concurrency=1,8] [--monitor-variant-ms=0] [--pgbench-seconds=10] [--skip=dbos,pgbench,pglite]
 *        [--dbos-workflows-1=500] [--dbos-workflows-16=1600]
 *   node --import tsx bench/lifecycle.ts --profile-summary=FILE.cpuprofile   (after node --cpu-prof …)
 *
 * Waiting: the API is asynchronous (create and delete return at once), so the bench waits as an
 * operator's --wait does, through the long poll behind GET /v1/vms/:id?changedFrom=… (VmService.
 * awaitChange); its reads are the service's and are counted with the engine's round trips.
 */
import { readFileSync } from 'node:fs';
import { runDbos, dbosRows, DBOS_VERSION, type DbosResult } from './dbos-lifecycle.ts';
import {
  dropStaleDatabases,
  fmt,
  freshDatabase,
  runMain,
  listOption,
  option,
  printTable,
  roundTrips,
  RoundTripRecorder,
  runLifecycles,
  settledXactCommit,
  startGpuvm,
  stepGaps,
  summarizeCpuProfile,
  type DbKind,
  type GpuvmUnderTest,
  type LifecycleRun,
} from './lib.ts';
import { pgbenchRows, runPgbench, type PgbenchRun } from './pgbench.ts';
import type { Config } from '../src/config.ts';

export interface GpuvmMeasurement {
  label: string;
  run: LifecycleRun;
  gaps: Awaited<ReturnType<typeof stepGaps>>;
  /** Server-side pg_stat_database.xact_commit over the service's whole life (setup, warm-up, run,
   *  drain, the bench's own queries, autovacuum) against the client-side count of the same span. */
  xact: { server: number; client: number } | null;
}

/** One measured gpuvm run on a fresh database: start, warm up (one lifecycle per slot), measure, stop. */
export async function measureGpuvm<T = undefined>(opts: {
  kind: DbKind;
  concurrency: number;
  lifecycles: number;
  config?: Partial<Config>;
  label?: string;
  /** Record each effect's creating COMMIT and its claim (figure 2). */
  recordEffects?: boolean;
  /** Reads what a figure needs from the database after the run, before it is dropped. */
  inspect?: (g: GpuvmUnderTest, run: LifecycleRun) => Promise<T>;
}): Promise<GpuvmMeasurement & { inspected: T | undefined; effects: { commits: Map<string, { sent: number; acked: number }>; claims: Map<string, number> } }> {
  const recorder = roundTrips();
  const hosts = Math.ceil(opts.concurrency / 8);
  const db = opts.kind === 'postgres' ? await freshDatabase(`c${opts.concurrency}`) : null;
  try {
    const before = recorder.snapshot();
    const g = await startGpuvm({ kind: opts.kind, hosts, databaseUrl: db?.url, config: opts.config });
    let run: LifecycleRun;
    let gaps: GpuvmMeasurement['gaps'];
    let inspected: T | undefined;
    try {
      await runLifecycles(g, { total: opts.concurrency, concurrency: opts.concurrency });
      recorder.recordEffects = opts.recordEffects ?? false;
      run = await runLifecycles(g, { total: opts.lifecycles, concurrency: opts.concurrency, serverDatabase: db?.name });
      recorder.recordEffects = false;
      gaps = await stepGaps(g.db, run.afterPosition);
      inspected = await opts.inspect?.(g, run);
    } finally {
      await g.stop();
    }
    const spent = RoundTripRecorder.diff(recorder.snapshot(), before);
    const xact = db ? { server: await settledXactCommit(db.name), client: spent.transactions + spent.benchStatements } : null;
    return {
      label: opts.label ?? `${opts.kind} c=${opts.concurrency}`,
      run,
      gaps,
      xact,
      inspected,
      effects: { commits: new Map(recorder.effectCommits), claims: new Map(recorder.effectClaims) },
    };
  } finally {
    recorder.effectCommits.clear();
    recorder.effectClaims.clear();
    await db?.drop();
  }
}

const roundTripCount = (r: LifecycleRun) => Object.values(r.roundTrips.statements).reduce((s, v) => s + v.n, 0);

export function gpuvmRows(ms: GpuvmMeasurement[]): Record<string, string | number>[] {
  return ms.map(({ label, run: r, xact }) => ({
    run: label,
    hosts: r.hosts,
    lifecycles: r.lifecycles,
    'wall s': fmt(r.wallMs / 1000, 2),
    'lifecycles/s': fmt(r.lifecyclesPerSec, 2),
    'p50 ms': r.latencyMs.p50,
    'p99 ms': r.latencyMs.p99,
    'events/lc': r.events / r.lifecycles,
    'effects/lc': r.effects / r.lifecycles,
    'tx/lc': r.roundTrips.transactions / r.lifecycles,
    'writing tx/lc': r.roundTrips.writingTransactions / r.lifecycles,
    'round trips/lc': roundTripCount(r) / r.lifecycles,
    'writing tx/s': (r.roundTrips.writingTransactions * 1000) / (r.wallMs + r.drainMs),
    'cpu ms/lc': r.cpuMs / r.lifecycles,
    'pg cpu ms/lc': r.serverCpuMs === null ? 'in-proc' : r.serverCpuMs / r.lifecycles,
    'xact_commit srv/cli': xact ? `${xact.server}/${xact.client}` : 'n/a',
  }));
}

/** Where the round trips of a run go: by kind, then the statements that cost most. */
export function printRoundTrips(m: GpuvmMeasurement, top = 12): void {
  const r = m.run;
  printTable(
    `${m.label}: round trips per lifecycle by kind (ms = client-side wait, summed over connections)`,
    Object.entries(r.roundTrips.statements)
      .filter(([, v]) => v.n > 0)
      .map(([kind, v]) => ({ kind, 'per lifecycle': v.n / r.lifecycles, 'avg ms': fmt(v.ms / v.n, 2), 'ms per lifecycle': v.ms / r.lifecycles })),
  );
  console.log(`  of the claims, ${fmt(r.roundTrips.emptyClaims / r.lifecycles, 1)} per lifecycle found nothing due`);
  printTable(
    `${m.label}: the ${top} statements with the most total wait`,
    r.statements.slice(0, top).map((s) => ({ 'per lc': s.n / r.lifecycles, 'avg ms': fmt(s.ms / s.n, 2), 'ms/lc': s.ms / r.lifecycles, statement: s.statement })),
  );
}

export function printGaps(m: GpuvmMeasurement): void {
  printTable(
    `${m.label}: time between consecutive events of a lifecycle (recorded_at, ms; the last step's transaction, the hand-off, the handler, the next transaction's start)`,
    m.gaps.map((g) => ({ step: g.step, p50: g.p50, p90: g.p90, max: g.max, mean: g.mean })),
  );
}

const goalMet = (ratio: number, goal: number) => `${fmt(ratio, 2)}× (goal ≥ ${goal}×: ${ratio >= goal ? 'met' : 'missed'})`;

/** `--profile-summary=FILE.cpuprofile`: where a `node --cpu-prof` run of this script spent its CPU. */
function printProfileSummary(file: string): void {
  const s = summarizeCpuProfile(JSON.parse(readFileSync(file, 'utf8')));
  const busy = s.byPackage.filter((p) => p.where !== '(idle)').reduce((t, p) => t + p.ms, 0);
  printTable(
    `${file}: self time by package (${fmt(s.totalMs / 1000, 1)} s sampled, ${fmt(busy / 1000, 1)} s not idle)`,
    s.byPackage.map((p) => ({ where: p.where, ms: Math.round(p.ms), '% of busy': p.where === '(idle)' ? '' : `${fmt((100 * p.ms) / busy, 1)}%` })),
  );
  printTable('the 25 functions with the most self time', s.byFunction.filter((f) => f.where !== '(idle)').slice(0, 25).map((f) => ({ function: f.fn, where: f.where, ms: Math.round(f.ms) })));
}

async function main(): Promise<void> {
  const profile = option('profile-summary', '');
  if (profile) return printProfileSummary(profile);
  const skip = new Set(option('skip', '').split(',').filter(Boolean));
  const concurrency = listOption('concurrency', [1, 16]);
  // Long enough to reach steady state (JIT-compiled code, warm caches) on both sides: short runs measure start-up.
  const lifecycles = (c: number) => option(`lifecycles-${c}`, c === 1 ? 500 : 100 * c);
  const monitorVariant = option('monitor-variant-ms', 0);
  const stale = await dropStaleDatabases();
  if (stale.length) console.log(`dropped databases left by killed bench runs: ${stale.join(', ')}`);
  roundTrips();

  console.log(`figure 1: gpuvm lifecycles on Postgres at concurrency ${concurrency.join(', ')} (service defaults; in-memory hosts)`);
  const pg: (GpuvmMeasurement & { c: number })[] = [];
  for (const c of concurrency) pg.push({ c, ...(await measureGpuvm({ kind: 'postgres', concurrency: c, lifecycles: lifecycles(c) })) });
  const variant: (GpuvmMeasurement & { c: number })[] = [];
  if (monitorVariant > 0) {
    for (const c of concurrency) {
      variant.push({
        c,
        ...(await measureGpuvm({ kind: 'postgres', concurrency: c, lifecycles: lifecycles(c), config: { monitorIntervalMs: monitorVariant }, label: `postgres c=${c} monitor ${monitorVariant} ms` })),
      });
    }
  }
  printTable('gpuvm on Postgres (lc = lifecycle; tx = transactions, i.e. commits incl. autocommit statements; writing = those that flush the WAL)', gpuvmRows([...pg, ...variant]));
  const first = pg[0]!;
  const effectsPerLifecycle = first.run.effects / first.run.lifecycles;
  console.log(`\neffects per lifecycle: ${Object.entries(first.run.effectsByType).map(([t, n]) => `${t}×${n / first.run.lifecycles}`).join(', ')} = ${effectsPerLifecycle}`);
  for (const m of [...pg, ...variant]) printGaps(m);
  for (const m of pg) printRoundTrips(m);

  let dbos: DbosResult | null = null;
  if (!skip.has('dbos')) {
    const names = Object.entries(first.run.effectsByType).flatMap(([type, n]) => Array.from({ length: n / first.run.lifecycles }, () => type));
    dbos = await runDbos({
      steps: effectsPerLifecycle,
      stepNames: names,
      runs: concurrency.map((c) => ({ concurrency: c, total: option(`dbos-workflows-${c}`, c === 1 ? 500 : 100 * c) })),
      poolSize: 10 * Math.ceil(Math.max(...concurrency) / 8),
    });
    printTable(`DBOS Transact ${DBOS_VERSION}: one workflow of ${effectsPerLifecycle} no-op steps, same server (pool ${dbos.poolSize}; server xact_commit over the launch: ${dbos.xactCommit})`, dbosRows(dbos));
  }

  let bench: PgbenchRun[] | null = null;
  if (!skip.has('pgbench')) {
    bench = await runPgbench({ clients: concurrency, seconds: option('pgbench-seconds', 10) });
    printTable('pgbench: one-row INSERT per transaction, same server', pgbenchRows(bench));
  }

  const pglite: (GpuvmMeasurement & { c: number })[] = [];
  if (!skip.has('pglite')) {
    // Embedded: one service, one host — 8 one-GPU lifecycles at most at once.
    for (const c of listOption('pglite-concurrency', [1, 8])) {
      pglite.push({ c, ...(await measureGpuvm({ kind: 'pglite', concurrency: c, lifecycles: option(`pglite-lifecycles-${c}`, c === 1 ? 200 : 50 * c) })) });
    }
    const samePg: (GpuvmMeasurement & { c: number })[] = [];
    for (const p of pglite) {
      const onPg = pg.find((m) => m.c === p.c) ?? { c: p.c, ...(await measureGpuvm({ kind: 'postgres', concurrency: p.c, lifecycles: option(`pglite-lifecycles-${p.c}`, p.c === 1 ? 200 : 50 * p.c) })) };
      samePg.push(onPg);
    }
    printTable('figure 6: gpuvm on embedded PGlite (one service, one host) and on Postgres at the same concurrency', gpuvmRows([...pglite, ...samePg.filter((m) => !pg.includes(m))]));
    for (const m of pglite) printGaps(m);
    printTable(
      'figure 6: PGlite against Postgres',
      pglite.map((p) => {
        const q = samePg.find((m) => m.c === p.c)!;
        return { concurrency: p.c, 'PGlite lc/s': fmt(p.run.lifecyclesPerSec, 2), 'Postgres lc/s': fmt(q.run.lifecyclesPerSec, 2), 'PGlite / Postgres': `${fmt(p.run.lifecyclesPerSec / q.run.lifecyclesPerSec, 2)}×` };
      }),
    );
  }

  // ── ratios ──
  const rows: Record<string, string | number>[] = [];
  for (const m of [...pg, ...variant]) {
    const d = dbos?.runs.find((r) => r.concurrency === m.c);
    const p = bench?.find((b) => b.clients === m.c);
    const writing = m.run.roundTrips.writingTransactions / m.run.lifecycles;
    const floor = p ? p.tps / writing : Number.NaN;
    rows.push({
      run: m.label,
      'gpuvm lc/s': fmt(m.run.lifecyclesPerSec, 2),
      'DBOS wf/s': d ? fmt(d.workflowsPerSec, 2) : 'skipped',
      'gpuvm / DBOS': d ? goalMet(m.run.lifecyclesPerSec / d.workflowsPerSec, m.c === 1 ? 2 : 3) : 'n/a',
      'pgbench tps': p ? fmt(p.tps, 0) : 'skipped',
      'floor lc/s (tps / writing tx per lc)': fmt(floor, 2),
      'gpuvm / floor': p ? `${fmt((100 * m.run.lifecyclesPerSec) / floor, 1)}%` : 'n/a',
      'gpuvm writing tx/s / pgbench tps': p ? `${fmt((100 * (m.run.roundTrips.writingTransactions * 1000)) / (m.run.wallMs + m.run.drainMs) / p.tps, 1)}%` : 'n/a',
    });
  }
  printTable('figure 1: ratios (goal: gpuvm ≥ 2× DBOS at 1, ≥ 3× DBOS at 16)', rows);
}

runMain(import.meta.url, main);
