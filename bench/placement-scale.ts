/**
 * Placement at scale — create latency (request → CLAIM and CREATE committed: the time
 * VmService.create takes to return) with 10, 100 and 1,000 registered hosts, mostly full, against
 * the same create on a 1-host fleet (the single-host case), measured in the same invocation.
 *
 * Each fleet size gets a fresh database and a fleet built by bench/fleet.ts (registerHost, the
 * agents row by HostAgent's own statement, READY by declareJudged, one effect worker per in-memory
 * host sharing one LISTEN connection; no HostAgent session per host). Then every host but the last
 * 10 % is filled to 7 of 8 modules by three creates pinned to it (4 + 2 + 1 GPUs), run until the
 * VMs are running; the last 10 % stay empty (a 1-host fleet: its host is filled).
 *
 * Measured: `--creates` sequential 1-GPU creates placed fleet-wide (no pin) by a VmService with no
 * local worker — an API node: its effects reach the host's worker through NOTIFY. After each create
 * the bench deletes the VM and waits until no effect is pending, so the VM's partition is free again
 * and every create faces the same fleet (the claims of a create whose effects never ran would
 * otherwise pile up: a 10-host fleet holds 17 free modules). Only the create is timed.
 *
 * Split of a create, from the round trips it made (bench/lib.ts's recorder) and in-process timing:
 * the candidate read (readCandidates' statement), the partition's snapshot read (prepareStep), the
 * commit (the one statement writing CLAIM + CREATE), and the rest — Node: place()'s scoring,
 * deciding the two steps, building the statement. place() alone is timed on the same candidates.
 *
 *   node --import tsx bench/placement-scale.ts [--hosts=1,10,100,1000] [--creates=300] [--warmup=30]
 *        [--full-fraction=0.9] [--explain=1] [--log=warn] [--pg-url=…]
 */
import { cpus, loadavg } from 'node:os';
import pg from 'pg';
import { loadConfig } from '../src/config.ts';
import { readCandidates } from '../src/engine/fleet.ts';
import { place } from '../src/engine/placement.ts';
import { VmService } from '../src/engine/vms.ts';
import { retryPolicy } from '../src/service.ts';
import { migrate, openDb, PREPARED, type Db } from '../src/store/db.ts';
import { sql } from 'kysely';
import { inBatches, startFleet } from './fleet.ts';
import { BENCH_MARK, benchLogger, fmt, freshDatabase, listOption, option, printTable, roundTrips, runMain, statementDiff, summarize, wallNow, type Summary } from './lib.ts';

const DB_PREFIX = 'gpuvm_bench_p_';

/** The last readCandidates statement sent (text and values), for EXPLAIN. */
let lastCandidateRead: { text: string; values: unknown[] } | null = null;
function captureCandidateReads(): void {
  const query = pg.Client.prototype.query as (...args: unknown[]) => unknown;
  (pg.Client.prototype as unknown as { query: (...args: unknown[]) => unknown }).query = function (this: object, ...args: unknown[]) {
    const first = args[0] as string | { text?: string; values?: unknown[] } | undefined;
    const text = typeof first === 'string' ? first : first?.text;
    if (typeof text === 'string' && text.startsWith(PREPARED) && text.includes('shortlist as (')) {
      const values = (typeof first === 'string' ? args[1] : first?.values) as unknown[];
      lastCandidateRead = { text, values: [...values] };
    }
    return query.apply(this, args);
  };
}

interface SizeResult {
  hosts: number;
  filled: number;
  claimedGpus: number;
  setupS: number;
  latency: Summary;
  split: { candidates: number; snapshot: number; commit: number; otherDb: number; node: number; roundTrips: number };
  placeUs: number;
  candidatesReturned: number;
  statements: { statement: string; n: number; ms: number }[];
  explain: string | null;
  /** On one pool connection (whichever answered): readCandidates executions on a generic and on a custom plan. */
  plans: { generic: number; custom: number };
}

/** Waits until no effect is pending or running (polls every 2 ms; the bench's own statement). */
async function quiet(db: Db, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await sql<{ n: number }>`${sql.raw(BENCH_MARK)} select count(*)::int as n from effects where status in ('pending', 'running')`.execute(db.kysely);
    if (r.rows[0]!.n === 0) return;
    if (Date.now() > deadline) throw new Error(`effects still pending after ${timeoutMs} ms`);
    await new Promise((res) => setTimeout(res, 2));
  }
}

async function measureSize(hostCount: number, opts: { creates: number; warmup: number; fullFraction: number; explain: boolean }): Promise<SizeResult> {
  const bench = await freshDatabase(`h${hostCount}`, DB_PREFIX);
  const log = benchLogger();
  const config = loadConfig({ dataDir: '/nonexistent', databaseUrl: bench.url, powerdownTimeoutMs: 0, pollMs: 600_000 }, {});
  const policy = retryPolicy(config);
  const db = await openDb({ databaseUrl: bench.url, poolSize: 10 });
  const setupStart = wallNow();
  let fleet: Awaited<ReturnType<typeof startFleet>> | null = null;
  try {
    await migrate(db);
    const vmDefaults = { memoryMiB: config.vmMemoryMiB, vcpus: config.vmVcpus, powerdownTimeoutMs: 0 };
    fleet = await startFleet(db, {
      hosts: hostCount,
      prefix: 'ph',
      policy,
      log,
      vmDefaults,
      heartbeatMs: config.agentHeartbeatMs,
      workers: { pollMs: config.pollMs, leaseMs: config.leaseMs, notYetMs: config.notYetMs, concurrency: config.workerConcurrency },
    });
    // An API node: no local worker, effects go to the hosts' workers by NOTIFY.
    const vms = new VmService(db.kysely, { defaults: vmDefaults, policy, silentMs: config.agentSilentMs });

    // Fill: 7 of 8 modules on all but the last 10 % of hosts (at least one host).
    const filled = Math.max(1, Math.round(hostCount * opts.fullFraction));
    await inBatches(fleet.hosts.slice(0, filled), 16, async (h) => {
      for (const gpus of [4, 2, 1]) await vms.create({ gpus, hostId: h.hostId, actor: 'bench-fill' });
    });
    await quiet(db, 300_000);
    const states = await sql<{ state: string; n: number }>`${sql.raw(BENCH_MARK)} select state, count(*)::int as n from vms group by state`.execute(db.kysely);
    const claimed = (await sql<{ n: number }>`${sql.raw(BENCH_MARK)} select count(*)::int as n from gpu_claims`.execute(db.kysely)).rows[0]!.n;
    const running = states.rows.find((r) => r.state === 'running')?.n ?? 0;
    if (running !== filled * 3 || claimed !== filled * 7) throw new Error(`fill: expected ${filled * 3} running VMs and ${filled * 7} claims, got ${JSON.stringify(states.rows)} and ${claimed}`);
    const setupS = (wallNow() - setupStart) / 1000;
    await sql`${sql.raw(BENCH_MARK)} analyze`.execute(db.kysely);

    // Measure.
    const recorder = roundTrips();
    const latencies: number[] = [];
    const total = { candidates: 0, snapshot: 0, commit: 0, otherDb: 0, roundTrips: 0 };
    const allStatements = new Map<string, { n: number; ms: number }>();
    for (let i = 0; i < opts.warmup + opts.creates; i++) {
      const before = new Map([...recorder.byStatement].map(([k, v]) => [k, { ...v }]));
      const t0 = wallNow();
      const vm = await vms.create({ gpus: 1, actor: 'bench' });
      const ms = wallNow() - t0;
      const diff = statementDiff(recorder.byStatement, before);
      if (i >= opts.warmup) {
        latencies.push(ms);
        for (const s of diff) {
          // The host's worker claiming what the NOTIFY announced, or closing an effect: not the create's.
          if (s.statement.includes('with due as') || s.statement.includes('with closed as')) continue;
          const a = allStatements.get(s.statement) ?? { n: 0, ms: 0 };
          a.n += s.n;
          a.ms += s.ms;
          allStatements.set(s.statement, a);
          total.roundTrips += s.n;
          const text = s.statement.replace(PREPARED.trim(), '').trim();
          if (text.includes('shortlist as (')) total.candidates += s.ms;
          else if (text.startsWith('select stream_id, machine_version')) total.snapshot += s.ms;
          else if (/insert|with/i.test(s.statement)) total.commit += s.ms;
          else total.otherDb += s.ms;
        }
      }
      await vms.delete(vm.id, 'bench');
      await quiet(db);
    }
    const after = (await sql<{ n: number }>`${sql.raw(BENCH_MARK)} select count(*)::int as n from gpu_claims`.execute(db.kysely)).rows[0]!.n;
    if (after !== claimed) throw new Error(`claims after the run: ${after}, before: ${claimed} (a measured VM was not released)`);

    // place() alone, on what readCandidates returns for this fleet now.
    const candidates = await readCandidates(db.kysely, { size: 1 }, config.agentSilentMs);
    const reps = 2000;
    const p0 = performance.now();
    for (let r = 0; r < reps; r++) place(candidates.hosts, 1, { 1: 1 });
    const placeUs = ((performance.now() - p0) * 1000) / reps;

    // Whether the pool's connections run readCandidates on a generic plan or plan it every time.
    const plans = (await sql<{ generic: number; custom: number }>`${sql.raw(BENCH_MARK)} select coalesce(sum(generic_plans), 0)::int as generic, coalesce(sum(custom_plans), 0)::int as custom from pg_prepared_statements where statement like '%shortlist as (%'`.execute(db.kysely)).rows[0]!;

    let explain: string | null = null;
    if (opts.explain && lastCandidateRead) {
      const c = new pg.Client({ connectionString: bench.url });
      await c.connect();
      try {
        const text = lastCandidateRead.text.replace(PREPARED, '');
        const r = await c.query(`${BENCH_MARK} explain (analyze, buffers) ${text}`, lastCandidateRead.values);
        explain = r.rows.map((x: Record<string, string>) => x['QUERY PLAN']).join('\n');
      } finally {
        await c.end();
      }
    }

    const n = latencies.length;
    const latency = summarize(latencies);
    const dbMs = total.candidates + total.snapshot + total.commit + total.otherDb;
    return {
      hosts: hostCount,
      filled,
      claimedGpus: claimed,
      setupS,
      latency,
      split: {
        candidates: total.candidates / n,
        snapshot: total.snapshot / n,
        commit: total.commit / n,
        otherDb: total.otherDb / n,
        node: latency.mean - dbMs / n,
        roundTrips: total.roundTrips / n,
      },
      placeUs,
      candidatesReturned: candidates.hosts.length,
      statements: [...allStatements].map(([statement, v]) => ({ statement, n: v.n / n, ms: v.ms / n })).sort((a, b) => b.ms - a.ms),
      explain,
      plans,
    };
  } finally {
    await fleet?.stop().catch((err) => console.error(err));
    await db.close().catch(() => {});
    if (option('keep-db', 0) === 1) console.log(`  kept database ${bench.name} (--keep-db=1): drop it yourself`);
    else await bench.drop();
  }
}

async function main(): Promise<void> {
  const sizes = listOption('hosts', [1, 10, 100, 1000]);
  const creates = option('creates', 300);
  const warmup = option('warmup', 30);
  const fullFraction = option('full-fraction', 0.9);
  const explain = option('explain', 1) === 1;
  roundTrips();
  captureCandidateReads();
  console.log(`placement at scale: ${sizes.join(', ')} hosts; ${creates} measured 1-GPU creates each after ${warmup} unmeasured; ${cpus().length} CPUs, load ${loadavg().map((l) => l.toFixed(2)).join(' ')}, ${new Date().toISOString()}`);
  const results: SizeResult[] = [];
  for (const h of sizes) {
    const r = await measureSize(h, { creates, warmup, fullFraction, explain: explain && h === Math.max(...sizes) });
    results.push(r);
    console.log(`  ${h} hosts: set up in ${fmt(r.setupS)} s; p50 ${fmt(r.latency.p50, 2)} ms, p99 ${fmt(r.latency.p99, 2)} ms`);
  }
  const ref = results.find((r) => r.hosts === 1) ?? results[0]!;
  printTable('VmService.create, 1 GPU, placed fleet-wide (ms; request → CLAIM + CREATE committed)', results.map((r) => ({
    hosts: r.hosts,
    'full (7/8)': r.filled,
    'claimed GPUs': r.claimedGpus,
    creates: r.latency.n,
    p50: fmt(r.latency.p50, 2),
    p90: fmt(r.latency.p90, 2),
    p99: fmt(r.latency.p99, 2),
    max: fmt(r.latency.max, 2),
    mean: fmt(r.latency.mean, 2),
    'p50 ÷ 1 host': `${fmt(r.latency.p50 / ref.latency.p50, 2)}×`,
    'p99 ÷ 1 host': `${fmt(r.latency.p99 / ref.latency.p99, 2)}×`,
    'goal p99 < 10': r.hosts === 1000 ? (r.latency.p99 < 10 ? 'met' : 'missed') : '',
  })));
  printTable('Where a create\'s time goes (mean ms per create; round trips on the client\'s clock)', results.map((r) => ({
    hosts: r.hosts,
    'candidate read': fmt(r.split.candidates, 2),
    'snapshot read': fmt(r.split.snapshot, 2),
    'commit (CLAIM+CREATE)': fmt(r.split.commit, 2),
    'other db': fmt(r.split.otherDb, 2),
    'node (incl. place())': fmt(r.split.node, 2),
    'place() alone µs': fmt(r.placeUs, 1),
    'shortlist': r.candidatesReturned,
    'round trips': fmt(r.split.roundTrips, 2),
    'plans generic/custom (1 conn)': `${r.plans.generic}/${r.plans.custom}`,
  })));
  for (const r of results) {
    printTable(`Statements per create, ${r.hosts} hosts`, r.statements.slice(0, 6).map((s) => ({ statement: s.statement, 'n/create': fmt(s.n, 2), 'ms/create': fmt(s.ms, 3) })));
  }
  for (const r of results) if (r.explain) console.log(`\nEXPLAIN (ANALYZE, BUFFERS) of readCandidates, ${r.hosts} hosts, after the run:\n${r.explain}`);
}

runMain(import.meta.url, main);
