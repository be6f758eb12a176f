/**
 * The DBOS reference for figure 1: DBOS Transact (@dbos-inc/dbos-sdk 5.x) on the same Postgres
 * server, one workflow per gpuvm lifecycle with one no-op step per effect a gpuvm lifecycle runs
 * (the number is measured, not assumed), at the same concurrencies, in the same process.
 *
 * Each workflow is called directly (`await lifecycle()`), which runs it durably in this process:
 * DBOS records the workflow's start, a checkpoint after every step, and its end in its system
 * database. DBOS gets as many pool connections as the gpuvm agents had at that concurrency.
 *
 *   node --import tsx bench/dbos-lifecycle.ts [--steps=N] [--concurrency=1,16] [--dbos-workflows-1=60] [--dbos-workflows-16=320]
 *
 * Without --steps, one gpuvm lifecycle is run first (embedded database, in-memory host) to count
 * its effects.
 */
import { readFileSync } from 'node:fs';
import { DBOS } from '@dbos-inc/dbos-sdk';
import { backendCpu, cpuBetween, effectsOfOneLifecycle, fmt, freshDatabase, runMain, listOption, option, printTable, roundTrips, RoundTripRecorder, settledXactCommit, summarize, wallNow, type RoundTripCounts, type Summary } from './lib.ts';

export interface DbosRun {
  concurrency: number;
  workflows: number;
  steps: number;
  wallMs: number;
  workflowsPerSec: number;
  latencyMs: Summary;
  roundTrips: RoundTripCounts;
  cpuMs: number;
  /** CPU of the system database's server processes during the run. */
  serverCpuMs: number;
}

export interface DbosResult {
  runs: DbosRun[];
  poolSize: number;
  /** pg_stat_database.xact_commit of the DBOS system database over the whole launch (server side). */
  xactCommit: number;
}

/** A no-op step: DBOS still checkpoints its (empty) result. */
async function noop(): Promise<void> {}

export async function runDbos(opts: { steps: number; stepNames?: string[]; runs: { concurrency: number; total: number }[]; poolSize: number; warmup?: number }): Promise<DbosResult> {
  const recorder = roundTrips();
  const db = await freshDatabase('dbos');
  const names = Array.from({ length: opts.steps }, (_, i) => opts.stepNames?.[i] ?? `step${i + 1}`);
  const lifecycle = DBOS.registerWorkflow(
    async () => {
      for (const name of names) await DBOS.runStep(noop, { name });
    },
    { name: 'gpuvmLifecycle' },
  );
  const results: DbosRun[] = [];
  try {
    DBOS.setConfig({
      name: 'gpuvm-bench',
      systemDatabaseUrl: db.url,
      systemDatabasePoolSize: opts.poolSize,
      logLevel: 'error',
      applicationVersion: '0.1.0',
    });
    await DBOS.launch();
    try {
      // Warm-up: connections open, code paths compiled, as for gpuvm.
      await drive(lifecycle, opts.warmup ?? 8, Math.min(8, opts.warmup ?? 8));
      for (const run of opts.runs) {
        const before = recorder.snapshot();
        const server = await backendCpu(db.name);
        const cpu = process.cpuUsage();
        const t0 = wallNow();
        const latencies = await drive(lifecycle, run.total, run.concurrency);
        const wallMs = wallNow() - t0;
        const used = process.cpuUsage(cpu);
        const serverCpuMs = cpuBetween(server, await backendCpu(db.name));
        results.push({
          concurrency: run.concurrency,
          workflows: run.total,
          steps: opts.steps,
          wallMs,
          workflowsPerSec: (run.total * 1000) / wallMs,
          latencyMs: summarize(latencies),
          roundTrips: RoundTripRecorder.diff(recorder.snapshot(), before),
          cpuMs: (used.user + used.system) / 1000,
          serverCpuMs,
        });
      }
    } finally {
      await DBOS.shutdown();
    }
    return { runs: results, poolSize: opts.poolSize, xactCommit: await settledXactCommit(db.name) };
  } finally {
    await db.drop();
  }
}

/** Runs `total` workflows, `concurrency` at a time; returns each one's milliseconds. */
async function drive(workflow: () => Promise<void>, total: number, concurrency: number): Promise<number[]> {
  const latencies: number[] = [];
  let next = 0;
  const slot = async () => {
    while (next < total) {
      next++;
      const t = wallNow();
      await workflow();
      latencies.push(wallNow() - t);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, slot));
  return latencies;
}

export function dbosRows(result: DbosResult): Record<string, string | number>[] {
  return result.runs.map((r) => ({
    concurrency: r.concurrency,
    workflows: r.workflows,
    steps: r.steps,
    'wall s': fmt(r.wallMs / 1000, 2),
    'workflows/s': r.workflowsPerSec,
    'p50 ms': r.latencyMs.p50,
    'p99 ms': r.latencyMs.p99,
    'tx/wf': r.roundTrips.transactions / r.workflows,
    'writing tx/wf': r.roundTrips.writingTransactions / r.workflows,
    'round trips/wf': Object.values(r.roundTrips.statements).reduce((s, v) => s + v.n, 0) / r.workflows,
    'cpu ms/wf': r.cpuMs / r.workflows,
    'pg cpu ms/wf': r.serverCpuMs / r.workflows,
  }));
}

async function main(): Promise<void> {
  const concurrency = listOption('concurrency', [1, 16]);
  let steps = option('steps', 0);
  let stepNames: string[] | undefined;
  if (steps === 0) {
    // One gpuvm lifecycle on a throwaway embedded database says how many effects it runs.
    const one = await effectsOfOneLifecycle();
    steps = one.total;
    stepNames = Object.entries(one.byType).flatMap(([type, n]) => Array.from({ length: n }, () => type));
    console.log(`one gpuvm lifecycle runs ${steps} effects: ${Object.entries(one.byType).map(([t, n]) => `${t}×${n}`).join(', ')}`);
  }
  const runs = concurrency.map((c) => ({ concurrency: c, total: option(`dbos-workflows-${c}`, c === 1 ? 60 : 20 * c) }));
  const result = await runDbos({ steps, stepNames, runs, poolSize: 10 * Math.ceil(Math.max(...concurrency) / 8) });
  printTable(`DBOS Transact ${DBOS_VERSION}: one workflow of ${steps} no-op steps (pool ${result.poolSize}; server xact_commit over the launch: ${result.xactCommit})`, dbosRows(result));
}

/** The installed SDK's version, as its package.json says. */
export const DBOS_VERSION: string = JSON.parse(readFileSync(new URL('../node_modules/@dbos-inc/dbos-sdk/package.json', import.meta.url), 'utf8')).version;

runMain(import.meta.url, main);
