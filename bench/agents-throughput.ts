/**
 * Throughput with agents — lifecycles/s (create a 1-GPU VM → running → delete → deleted) with 1, 2,
 * 4 and 8 agents, one per in-memory B200 host, driven by one VmService placing across the whole
 * fleet; the ratio is to the 1-agent point of the same invocation.
 *
 * Per point: a fresh database; per host an agent as `gpuvm agent` runs it (src/roles/agent.ts,
 * startAgentRole: the agent lock and epoch, registration, effect worker, QEMU monitor, health
 * monitor, Fabric Manager guard, reconciler, presence), each on a pool of its own (--agent-pool
 * connections, default 2, against gpuvm's 10: the server allows 100 connections, shared with other
 * jobs, and eight agents at 10 plus their LISTEN and lock connections took the rest and failed with
 * "too many clients"), all in this one process. Placement is fleet-wide: every create and
 * delete goes through one API node's VmService with no local worker (its own pool,
 * --api-pool), so each effect reaches its host's worker through NOTIFY — the fleet variant, not
 * each host's own VmService pinned to it.
 *
 * Waiting, as `gpuvm vm create --wait` does: the long poll VmService.awaitChange — on a VmService of
 * the VM's host's process (its agent's worker is local there, so it hears each step as that worker
 * commits it). The API node's own long poll would read every 250 ms, which would bound the figure.
 *
 * Fixed concurrency: --per-agent lifecycles in flight per agent (8: one per GPU), each slot running
 * lifecycles back to back for --seconds after --warmup-seconds. CPU: this process
 * (process.cpuUsage) and the database's backends (/proc/<pid>/stat), over the measured span.
 *
 *   node --import tsx bench/agents-throughput.ts [--agents=1,2,4,8] [--per-agent=8] [--seconds=20]
 *        [--warmup-seconds=3] [--agent-pool=2] [--api-pool=3] [--local-reference=1] [--gaps=0] [--log=warn] [--pg-url=…]
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'kysely';
import { loadConfig } from '../src/config.ts';
import { VmService } from '../src/engine/vms.ts';
import { GpuvmError } from '../src/errors.ts';
import { startAgentRole, type AgentRole } from '../src/roles/agent.ts';
import { retryPolicy } from '../src/service.ts';
import { migrate, openDb, type Db } from '../src/store/db.ts';
import type { VmRow } from '../src/store/projections.ts';
import {
  backendCpu,
  BENCH_MARK,
  benchLogger,
  cpuBetween,
  drained,
  fmt,
  freshDatabase,
  listOption,
  option,
  printTable,
  roundTrips,
  RoundTripRecorder,
  runMain,
  statementDiff,
  stepGaps,
  summarize,
  wallNow,
  type Summary,
} from './lib.ts';
import { createMemoryHost } from './memory-host.ts';

const DB_PREFIX = 'gpuvm_bench_t_';
const END_STATES = new Set(['failed', 'crashed', 'deleted']);

interface Point {
  agents: number;
  variant: 'fleet' | 'local';
  inFlight: number;
  lifecycles: number;
  wallS: number;
  lcPerS: number;
  latency: Summary;
  nodeCpuMs: number;
  pgCpuMs: number;
  perHost: number[];
  tx: number;
  writingTx: number;
  roundTrips: number;
  connections: number;
  statements: { statement: string; n: number; ms: number }[];
  /** Creates refused 409 contention during the measured span (retried by the bench). */
  contention: number;
  /** readCandidates statements during the measured span: one per placement attempt. */
  candidateReads: number;
}

async function until(waiter: VmService, vm: VmRow, states: string[]): Promise<VmRow> {
  while (!states.includes(vm.state)) {
    if (END_STATES.has(vm.state)) throw new Error(`VM ${vm.id} ended ${vm.state} while waiting for ${states.join('/')}: ${vm.reason ?? 'no reason'}`);
    vm = await waiter.awaitChange(vm.id, vm.state, 60_000);
  }
  return vm;
}

async function measurePoint(agentCount: number, variant: 'fleet' | 'local', opts: { perAgent: number; seconds: number; warmupSeconds: number; agentPool: number; apiPool: number }): Promise<Point> {
  const bench = await freshDatabase(`a${agentCount}_${variant}`, DB_PREFIX);
  const log = benchLogger();
  const dataDir = mkdtempSync(join(tmpdir(), 'gpuvm-bench-agents-'));
  const dbs: Db[] = [];
  const roles: AgentRole[] = [];
  try {
    const api = await openDb({ databaseUrl: bench.url, poolSize: opts.apiPool });
    dbs.push(api);
    await migrate(api);
    const hostIds = Array.from({ length: agentCount }, (_, i) => `agent-${i + 1}`);
    const waiters = new Map<string, VmService>();
    let config = loadConfig({ dataDir, databaseUrl: bench.url, port: 0, logLevel: 'warn' }, {});
    const policy = retryPolicy(config);
    for (const hostId of hostIds) {
      config = loadConfig({ dataDir, databaseUrl: bench.url, hostId, port: 0, logLevel: 'warn' }, {});
      const memory = await createMemoryHost(hostId);
      const db = await openDb({ databaseUrl: bench.url, poolSize: opts.agentPool });
      dbs.push(db);
      const role = await startAgentRole(db, config, { log, policy, command: 'agent', host: memory.adapters });
      roles.push(role);
      // The VM's host's process long-polls with its worker local (see the file comment).
      waiters.set(hostId, new VmService(db.kysely, { defaults: { ...role.vmDefaults }, policy, localWorkers: new Map([[hostId, role.worker]]), silentMs: config.agentSilentMs }));
    }
    await Promise.all(roles.map((r) => r.ready));
    // The API node: places across every ready host; no local worker, so effects go out by NOTIFY.
    const vms = new VmService(api.kysely, {
      defaults: { memoryMiB: config.vmMemoryMiB, vcpus: config.vmVcpus, powerdownTimeoutMs: config.powerdownTimeoutMs ?? 30_000 },
      policy,
      silentMs: config.agentSilentMs,
    });

    const perHost = new Map<string, number>();
    let contention = 0;
    const latencies: number[] = [];
    let measuring = false;
    let stopAt = Infinity;
    const slot = async (i: number) => {
      // local: slot i works through host i mod n's own VmService, pinned to it (figure 1's path).
      const own = hostIds[i % hostIds.length]!;
      while (wallNow() < stopAt) {
        const t0 = wallNow();
        const counted = measuring;
        let vm: VmRow;
        for (;;) {
          try {
            vm = variant === 'fleet' ? await vms.create({ gpus: 1, actor: 'bench' }) : await waiters.get(own)!.create({ gpus: 1, hostId: own, actor: 'bench' });
            break;
          } catch (err) {
            // 409 contention: 50 placement races lost in a row (see BENCHMARKS.md, figure 9). A client retries.
            if (!(err instanceof GpuvmError && err.code === 'contention')) throw err;
            if (measuring) contention++;
          }
        }
        const waiter = waiters.get(vm.host_id)!;
        await until(waiter, vm, ['running']);
        await until(waiter, await (variant === 'fleet' ? vms : waiter).delete(vm.id, 'bench'), ['deleted']);
        if (counted && measuring) {
          latencies.push(wallNow() - t0);
          perHost.set(vm.host_id, (perHost.get(vm.host_id) ?? 0) + 1);
        }
      }
    };
    const inFlight = opts.perAgent * agentCount;
    const recorder = roundTrips();
    // A failing slot stops the others; every slot has settled before the databases close.
    let failure: unknown = null;
    const runners = Array.from({ length: inFlight }, (_, i) =>
      slot(i).catch((err) => {
        failure ??= err;
        stopAt = 0;
      }),
    );
    await new Promise((r) => setTimeout(r, opts.warmupSeconds * 1000));
    // Measured span: lifecycles that start after this and end before stopAt.
    const rtBefore = recorder.snapshot();
    const stBefore = new Map([...recorder.byStatement].map(([k, v]) => [k, { ...v }]));
    const pgBefore = await backendCpu(bench.name);
    const cpu = process.cpuUsage();
    const started = wallNow();
    measuring = true;
    await new Promise((r) => setTimeout(r, opts.seconds * 1000));
    if (failure) {
      await Promise.all(runners);
      throw failure;
    }
    const connections = (await sql<{ n: number }>`${sql.raw(BENCH_MARK)} select count(*)::int as n from pg_stat_activity where datname = current_database()`.execute(api.kysely)).rows[0]!.n;
    const ended = wallNow();
    const cpuUsed = process.cpuUsage(cpu);
    const pgCpuMs = cpuBetween(pgBefore, await backendCpu(bench.name));
    const rt = RoundTripRecorder.diff(recorder.snapshot(), rtBefore);
    const statements = statementDiff(recorder.byStatement, stBefore);
    measuring = false;
    stopAt = 0;
    await Promise.all(runners);
    if (failure) throw failure;
    await drained(api.kysely);
    const gaps = option('gaps', 0) === 1 ? await stepGaps(api.kysely) : [];
    if (gaps.length > 0) printTable(`Step gaps, ${agentCount} agent(s) (ms between consecutive events of a lifecycle, db clock)`, gaps.map((g) => ({ step: g.step, n: g.n, p50: fmt(g.p50, 1), p90: fmt(g.p90, 1), max: fmt(g.max, 1) })));
    const done = latencies.length;
    return {
      agents: agentCount,
      variant,
      inFlight,
      lifecycles: done,
      wallS: (ended - started) / 1000,
      lcPerS: (done * 1000) / (ended - started),
      latency: summarize(latencies),
      nodeCpuMs: (cpuUsed.user + cpuUsed.system) / 1000,
      pgCpuMs,
      perHost: hostIds.map((h) => perHost.get(h) ?? 0),
      tx: rt.transactions,
      writingTx: rt.writingTransactions,
      roundTrips: KINDS.reduce((s, k) => s + rt.statements[k].n, 0),
      connections,
      statements,
      contention,
      candidateReads: statements.filter((x) => x.statement.includes('shortlist as (')).reduce((a, x) => a + x.n, 0),
    };
  } finally {
    for (const r of roles.reverse()) await r.stop().catch((err) => console.error(err));
    for (const d of dbs) await d.close().catch(() => {});
    rmSync(dataDir, { recursive: true, force: true });
    await bench.drop();
  }
}

const KINDS = ['begin', 'commit', 'rollback', 'claim', 'select', 'insert', 'update', 'delete', 'notify', 'other'] as const;

async function main(): Promise<void> {
  const points = listOption('agents', [1, 2, 4, 8]);
  const perAgent = option('per-agent', 8);
  const seconds = option('seconds', 20);
  const warmupSeconds = option('warmup-seconds', 3);
  const agentPool = option('agent-pool', 2);
  const apiPool = option('api-pool', 3);
  roundTrips();
  console.log(`throughput with agents: ${points.join(', ')} agents, ${perAgent} lifecycles in flight per agent, ${seconds} s each after ${warmupSeconds} s of warm-up; ${cpus().length} CPUs, load ${loadavg().map((l) => l.toFixed(2)).join(' ')}, ${new Date().toISOString()}`);
  const results: Point[] = [];
  const runs: { agents: number; variant: 'fleet' | 'local' }[] = points.map((a) => ({ agents: a, variant: 'fleet' }));
  if (option('local-reference', 1) === 1) runs.push({ agents: 1, variant: 'local' });
  for (const { agents: a, variant } of runs) {
    const p = await measurePoint(a, variant, { perAgent, seconds, warmupSeconds, agentPool, apiPool });
    results.push(p);
    console.log(`  ${a} agent(s), ${variant}: ${fmt(p.lcPerS)} lc/s (${p.lifecycles} in ${fmt(p.wallS)} s), load ${loadavg()[0]!.toFixed(2)}`);
  }
  const ref = results.find((r) => r.agents === 1 && r.variant === 'fleet') ?? results[0]!;
  const wallMs = (r: Point) => r.wallS * 1000;
  printTable('Lifecycles/s: fleet = placed fleet-wide by one API node, effects by NOTIFY; local = each host\'s own VmService, pinned, effects handed over in-process (figure 1\'s path). Ratio to 1 agent, fleet, same invocation', results.map((r) => ({
    agents: r.agents,
    variant: r.variant,
    'in flight': r.inFlight,
    lifecycles: r.lifecycles,
    's': fmt(r.wallS, 1),
    'lc/s': fmt(r.lcPerS, 1),
    'ratio to 1': `${fmt(r.lcPerS / ref.lcPerS, 2)}×`,
    'p50 ms': fmt(r.latency.p50, 1),
    'p99 ms': fmt(r.latency.p99, 1),
    'per host': r.perHost.join('/'),
    'CPU node %': fmt((100 * r.nodeCpuMs) / wallMs(r), 0),
    'CPU pg %': fmt((100 * r.pgCpuMs) / wallMs(r), 0),
    'of 2 cores %': fmt((100 * (r.nodeCpuMs + r.pgCpuMs)) / (wallMs(r) * cpus().length), 0),
    'CPU ms/lc node': fmt(r.nodeCpuMs / r.lifecycles, 2),
    'CPU ms/lc pg': fmt(r.pgCpuMs / r.lifecycles, 2),
    'tx/lc': fmt(r.tx / r.lifecycles, 1),
    'writing tx/lc': fmt(r.writingTx / r.lifecycles, 1),
    'round trips/lc': fmt(r.roundTrips / r.lifecycles, 1),
    'connections': r.connections,
    'placement tries/create': fmt(r.candidateReads / r.lifecycles, 2),
    '409 contention': r.contention,
  })));
  for (const r of results) {
    printTable(`Round trips per lifecycle by statement, ${r.agents} agent(s), ${r.variant} (top 10 by count)`, [...r.statements].sort((a, b) => b.n - a.n).slice(0, 10).map((x) => ({ statement: x.statement, 'n/lc': fmt(x.n / r.lifecycles, 2), 'ms/lc': fmt(x.ms / r.lifecycles, 2) })));
  }
}

runMain(import.meta.url, main);
