/**
 * The commit floor for figure 1: `pgbench` on the same Postgres server, each transaction a
 * one-row INSERT into a table it gets to itself, at the same client counts, for a fixed time.
 * Every such transaction writes and so flushes the WAL at commit, like each of gpuvm's writing
 * transactions; how many of those a lifecycle needs, times this rate, bounds lifecycles/s.
 *
 *   node --import tsx bench/pgbench.ts [--concurrency=1,16] [--pgbench-seconds=10]
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { adminUrl, fmt, freshDatabase, isMain, listOption, option, printTable } from './lib.ts';

const run = promisify(execFile);

export const PGBENCH = option('pgbench', '/usr/bin/pgbench');

export interface PgbenchRun {
  clients: number;
  threads: number;
  seconds: number;
  transactions: number;
  tps: number;
  latencyMs: number;
}

const SCRIPT = `insert into bench_insert (payload) values ('one row');\n`;

/** Parses pgbench's summary: processed transactions, tps without connection time, average latency. */
export function parsePgbench(stdout: string): { transactions: number; tps: number; latencyMs: number } {
  const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(stdout);
  const processed = /number of transactions actually processed: (\d+)/.exec(stdout);
  const latency = /latency average = ([\d.]+) ms/.exec(stdout);
  if (!tps || !processed) throw new Error(`cannot read pgbench's summary:\n${stdout}`);
  return { transactions: Number(processed[1]), tps: Number(tps[1]), latencyMs: latency ? Number(latency[1]) : Number.NaN };
}

export async function runPgbench(opts: { clients: number[]; seconds: number }): Promise<PgbenchRun[]> {
  const db = await freshDatabase('pgbench');
  const dir = await mkdtemp(join(tmpdir(), 'gpuvm-bench-pgbench-'));
  try {
    const c = new pg.Client({ connectionString: db.url });
    await c.connect();
    await c.query(`create table bench_insert (id bigserial primary key, payload text not null, at timestamptz not null default now())`);
    await c.end();
    const script = join(dir, 'insert.sql');
    await writeFile(script, SCRIPT);
    const server = new URL(adminUrl());
    const results: PgbenchRun[] = [];
    for (const clients of opts.clients) {
      // -j 2: the machine's two cores; pgbench refuses more threads than clients.
      const threads = Math.min(2, clients);
      const args = ['-n', '-f', script, '-c', String(clients), '-j', String(threads), '-T', String(opts.seconds)];
      args.push('-h', server.hostname, '-p', server.port || '5432', '-U', decodeURIComponent(server.username || 'postgres'), db.name);
      const { stdout } = await run(PGBENCH, args, { maxBuffer: 1 << 20 });
      results.push({ clients, threads, seconds: opts.seconds, ...parsePgbench(stdout) });
    }
    return results;
  } finally {
    await rm(dir, { recursive: true, force: true });
    await db.drop();
  }
}

export function pgbenchRows(runs: PgbenchRun[]): Record<string, string | number>[] {
  return runs.map((r) => ({ clients: r.clients, threads: r.threads, seconds: r.seconds, transactions: r.transactions, tps: fmt(r.tps, 0), 'latency ms': fmt(r.latencyMs, 3) }));
}

async function main(): Promise<void> {
  const runs = await runPgbench({ clients: listOption('concurrency', [1, 16]), seconds: option('pgbench-seconds', 10) });
  printTable(`pgbench: one-row INSERT per transaction (${SCRIPT.trim()})`, pgbenchRows(runs));
}

if (isMain(import.meta.url)) {
  main().catch((err) => {
    console.error(err);
    process.exitCode = 1;
  });
}
