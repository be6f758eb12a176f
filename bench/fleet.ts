/**
 * A fleet of in-memory hosts on one Postgres database, for the fleet figures (bench/placement-scale.ts,
 * bench/agents-throughput.ts) — without one HostAgent session per host: 1,000 agents would hold 1,000
 * connections (this server allows 100).
 *
 * Per host, everything goes through gpuvm's own functions except the agent's lock session:
 * - registerHost (the REGISTER events of the host and its 15 partitions, one transaction);
 * - the agents row: the statement HostAgent takes its epoch with (src/engine/agent.ts, `take`),
 *   copied verbatim below (AGENT_TAKE), minus the advisory lock, which only guards against a second
 *   agent for the host and is held by a session for the agent's whole life;
 * - READY and agents.ready_at: declareJudged (src/roles/agent.ts) with a stand-in agent whose
 *   markReady runs HostAgent.markReady's statement;
 * - heartbeats: HostAgent writes `update agents set heartbeat_at = now()` per host every
 *   agentHeartbeatMs; here one statement refreshes every host's row every `heartbeatMs` (the bench's
 *   own, counted apart), so every agent stays heard for the whole run;
 * - an EffectWorker per host with the real handlers (src/engine/handlers.ts) when asked, sharing
 *   one LISTEN connection (as bench/recovery-serve.ts does), its lease carrying the epoch taken above.
 */
import { rmSync } from 'node:fs';
import { hostname } from 'node:os';
import { CompiledQuery, sql } from 'kysely';
import type { Logger } from '../src/log.ts';
import type { HostAgent } from '../src/engine/agent.ts';
import type { EffectPolicy } from '../src/engine/commands.ts';
import { createHandlers } from '../src/engine/handlers.ts';
import { registerHost } from '../src/engine/hosts.ts';
import { EffectWorker, type AgentLease, type RetryPolicy } from '../src/engine/worker.ts';
import { declareJudged } from '../src/roles/agent.ts';
import type { Db } from '../src/store/db.ts';
import { BENCH_MARK, sharedListener } from './lib.ts';
import { createMemoryHost, type MemoryHost } from './memory-host.ts';

/** HostAgent's epoch statement (src/engine/agent.ts, take()), verbatim. */
const AGENT_TAKE = `insert into agents (host_id, epoch, pid, machine, command, started_at, heartbeat_at, ready_at, vm_defaults)
       values ($1, 1, $2, $3, $4, now(), now(), null, $5)
       on conflict (host_id) do update
         set epoch = agents.epoch + 1, pid = excluded.pid, machine = excluded.machine, command = excluded.command,
             started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, ready_at = null, vm_defaults = excluded.vm_defaults
       returning epoch::text`;
/** HostAgent.markReady's statement, verbatim. */
const MARK_READY = 'update agents set ready_at = now() where host_id = $1 and epoch = $2';

export interface FleetHost {
  hostId: string;
  memory: MemoryHost;
  epoch: number;
  worker: EffectWorker | null;
}

export interface BenchFleet {
  hosts: FleetHost[];
  /** Milliseconds: memory hosts, registration, agents rows + READY, workers. */
  setupMs: { register: number; agents: number; workers: number };
  stop(): Promise<void>;
}

/** Runs `fn` over `items`, `width` at a time. */
export async function inBatches<T>(items: readonly T[], width: number, fn: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(width, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        await fn(items[i]!, i);
      }
    }),
  );
}


export interface FleetOptions {
  hosts: number;
  /** Host ids are `<prefix>-0001`, … */
  prefix: string;
  policy: RetryPolicy & EffectPolicy;
  log: Logger;
  /** Published as agents.vm_defaults. */
  vmDefaults: Record<string, unknown>;
  /** Start an effect worker per host. */
  workers?: { pollMs: number; leaseMs: number; notYetMs: number; concurrency: number };
  heartbeatMs?: number;
}

export async function startFleet(db: Db, opts: FleetOptions): Promise<BenchFleet> {
  const ids = Array.from({ length: opts.hosts }, (_, i) => `${opts.prefix}-${String(i + 1).padStart(4, '0')}`);
  const t0 = performance.now();
  const memories = await Promise.all(ids.map((id) => createMemoryHost(id)));
  await inBatches(memories, 8, async (m) => {
    await registerHost(db.kysely, m.adapters, opts.policy, opts.log);
  });
  const t1 = performance.now();
  const hosts: FleetHost[] = memories.map((memory) => ({ hostId: memory.adapters.hostId, memory, epoch: 0, worker: null }));
  await inBatches(hosts, 8, async (h) => {
    const { rows } = await db.kysely.executeQuery<{ epoch: string }>(
      CompiledQuery.raw(AGENT_TAKE, [h.hostId, process.pid, hostname(), 'bench', JSON.stringify(opts.vmDefaults)]),
    );
    h.epoch = Number(rows[0]!.epoch);
    // declareJudged needs of its agent only hostId and markReady(epoch).
    const standIn = {
      hostId: h.hostId,
      markReady: async (epoch: number) => {
        const r = await db.kysely.executeQuery(CompiledQuery.raw(MARK_READY, [h.hostId, String(epoch)]));
        return Number(r.numAffectedRows ?? 0) > 0;
      },
    } as unknown as HostAgent;
    if (!(await declareJudged(db, standIn, h.epoch, opts.policy, opts.log))) throw new Error(`host ${h.hostId}: declareJudged refused epoch ${h.epoch}`);
  });
  const t2 = performance.now();
  const listenerFor = sharedListener(db);
  if (opts.workers) {
    const w = opts.workers;
    for (const h of hosts) {
      const lease: AgentLease = { epoch: h.epoch, signal: new AbortController().signal, renew: async () => {} };
      h.worker = new EffectWorker(listenerFor(h.hostId), {
        hostId: h.hostId,
        agent: lease,
        notYetMs: w.notYetMs,
        handlers: createHandlers(h.memory.adapters),
        policy: opts.policy,
        leaseMs: w.leaseMs,
        pollMs: w.pollMs,
        concurrency: w.concurrency,
        log: opts.log,
      });
    }
    await inBatches(hosts, 16, async (h) => {
      await h.worker!.start();
    });
  }
  const t3 = performance.now();
  const heartbeat = setInterval(() => {
    void sql`${sql.raw(BENCH_MARK)} update agents set heartbeat_at = now()`.execute(db.kysely).catch(() => {});
  }, opts.heartbeatMs ?? 2000);
  heartbeat.unref();
  return {
    hosts,
    setupMs: { register: t1 - t0, agents: t2 - t1, workers: t3 - t2 },
    async stop() {
      clearInterval(heartbeat);
      await Promise.all(hosts.map((h) => h.worker?.stop()));
      for (const h of hosts) rmSync(h.memory.adapters.fence.dir, { recursive: true, force: true });
    },
  };
}
