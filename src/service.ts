/**
 * `gpuvm serve`, assembled: open and migrate the database, start the agent of each local host
 * (src/roles/agent.ts) unless told not to, and serve the API and placement for the whole fleet the
 * database holds. Tests start the same service in-process.
 */
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { buildApi } from './api/server.ts';
import { ConfigError, type Config } from './config.ts';
import type { EffectPolicy, LocalWorker } from './engine/commands.ts';
import type { QemuMonitor } from './engine/monitor.ts';
import type { Reconciler } from './engine/reconcile.ts';
import type { HealthMonitor } from './engine/health.ts';
import type { FabricManagerGuard } from './engine/fabric-manager.ts';
import { VmService } from './engine/vms.ts';
import type { EffectWorker, RetryPolicy } from './engine/worker.ts';
import type { HostAdapters } from './host/host.ts';
import type { HostConfig } from './host/host-config.ts';
import type { SimBoard } from './host/sim/sim-host.ts';
import { createLogger, type Logger } from './log.ts';
import { migrate, openDb, type Db } from './store/db.ts';
import { lockDataDir } from './store/data-dir.ts';
import type { HostAgent } from './engine/agent.ts';
import { FleetWatch } from './engine/fleet-watch.ts';
import { startAgentRole, type AgentRole } from './roles/agent.ts';

/** An API node: placement and the HTTP API for every host in the database, with no agent of its own. */
export interface ApiNode {
  config: Config;
  db: Db;
  vms: VmService;
  fleetWatch: FleetWatch;
  api: FastifyInstance;
  /** The API's base URL, e.g. http://127.0.0.1:7070 */
  url: string;
  log: Logger;
  stop(): Promise<void>;
}

/** `gpuvm serve`: an API node and the agents of its local hosts. The first agent's parts are named directly. */
export interface Service extends ApiNode {
  agents: AgentRole[];
  host: HostAdapters;
  worker: EffectWorker;
  monitor: QemuMonitor;
  health: HealthMonitor;
  fabricManager: FabricManagerGuard;
  reconciler: Reconciler;
  /** This host's agent: its lock and epoch (src/engine/agent.ts). */
  agent: HostAgent;
  /**
   * Resolves once every local agent's first reconciliation has judged its host against the log.
   * Until then `/v1/health` says `starting`, and creates that only such a host could take are
   * answered 503: a partition Fabric Manager shows active that the log does not own must be taken
   * up before anything is placed.
   */
  ready: Promise<void>;
}

export function retryPolicy(config: Config): RetryPolicy {
  return {
    maxAttempts: () => config.effectMaxAttempts,
    backoffBaseMs: config.backoffBaseMs,
    backoffMaxMs: config.backoffMaxMs,
  };
}

export interface StartOptions {
  log?: Logger;
  /** A real host from `gpuvm serve --config FILE`; without it the simulated host is used. */
  hostConfig?: HostConfig;
  /** Adapters built by the caller (tests). */
  host?: HostAdapters;
  /**
   * Simulated hosts to run agents for (`--sim-hosts N --sim-board b200,h100`): N hosts, boards taken
   * in turn, named sim-<board>-<i>. Default: one simulated host named by config.hostId.
   */
  simHosts?: { count: number; boards: SimBoard[] };
  /** Resolve only once the service is ready (see Service.ready); default true. `gpuvm serve` serves while it starts. */
  waitReady?: boolean;
}

/** The simulated hosts `--sim-hosts` asks for: ids and boards. */
export function simFleet(config: Config, simHosts: StartOptions['simHosts']): { hostId: string; board: SimBoard }[] {
  if (!simHosts) return [{ hostId: config.hostId, board: 'b200' }];
  return Array.from({ length: simHosts.count }, (_, i) => {
    const board = simHosts.boards[i % simHosts.boards.length]!;
    return { hostId: `sim-${board}-${i + 1}`, board };
  });
}

/** Opens the data folder (locked: one gpuvm per folder) and the database, migrated. */
async function openStore(config: Config, command: string, log: Logger): Promise<{ db: Db; release: () => void }> {
  const folder = lockDataDir(config.dataDir, command);
  let db: Db;
  try {
    db = await openDb({ databaseUrl: config.databaseUrl, pgliteDir: join(config.dataDir, 'pglite') });
  } catch (err) {
    folder.release();
    throw err;
  }
  try {
    await migrate(db);
  } catch (err) {
    await db.close().catch(() => {});
    folder.release();
    throw err;
  }
  log.info({ database: db.kind === 'postgres' ? 'postgres' : `pglite at ${join(config.dataDir, 'pglite')}` }, 'database ready');
  return { db, release: () => folder.release() };
}

async function startApi(
  config: Config,
  db: Db,
  log: Logger,
  agents: AgentRole[],
  allReady: () => boolean,
): Promise<Omit<ApiNode, 'config' | 'db' | 'log' | 'stop'> & { close(): Promise<void> }> {
  const policy: EffectPolicy = retryPolicy(config);
  const localWorkers = new Map<string, LocalWorker>(agents.map((a) => [a.hostId, a.worker]));
  // Requests hand the effects they write for a local host to its worker (no claim, no NOTIFY).
  const vms = new VmService(db.kysely, {
    defaults: { memoryMiB: config.vmMemoryMiB, vcpus: config.vmVcpus, powerdownTimeoutMs: config.powerdownTimeoutMs ?? 30_000 },
    policy,
    localWorkers,
    silentMs: config.agentSilentMs,
  });
  const fleetWatch = new FleetWatch(db.kysely, policy, { intervalMs: Math.min(config.agentHeartbeatMs, 5000), silentMs: config.agentSilentMs, log });
  fleetWatch.start();
  let api: FastifyInstance;
  try {
    const first = agents[0];
    api = await buildApi({
      vms,
      db: db.kysely,
      policy,
      log,
      silentMs: config.agentSilentMs,
      health: async () => ({
        ok: true,
        status: allReady() ? 'ok' : 'starting',
        ...(first ? { epoch: first.agent.epoch, hostId: first.hostId, simulated: first.host.simulated, qemu: first.host.qemuDescription } : {}),
        agents: agents.map((a) => ({ hostId: a.hostId, epoch: a.agent.epoch })),
        database: db.kind,
        vms: await vms.countByState(),
      }),
    });
  } catch (err) {
    await fleetWatch.stop();
    throw err;
  }
  try {
    const url = await api.listen({ host: config.listenHost, port: config.port });
    log.info({ url, hosts: agents.map((a) => a.hostId) }, 'gpuvm is serving');
    return {
      vms,
      fleetWatch,
      api,
      url,
      async close() {
        await api.close();
        await fleetWatch.stop();
      },
    };
  } catch (err) {
    await api.close().catch(() => {});
    await fleetWatch.stop();
    throw err;
  }
}

/**
 * Opens the store and starts `start` on it. What it returns stops the store with it (once); a start
 * that throws has stopped what it started, and the store is closed after it.
 */
async function onStore<T extends { stop(): Promise<void> }>(config: Config, command: string, log: Logger, start: (db: Db) => Promise<T>): Promise<T & { db: Db }> {
  const { db, release } = await openStore(config, command, log);
  try {
    const started = await start(db);
    let stopped = false;
    return {
      ...started,
      db,
      async stop() {
        if (stopped) return;
        stopped = true;
        await started.stop();
        await db.close();
        release();
      },
    };
  } catch (err) {
    await db.close().catch(() => {});
    release();
    throw err;
  }
}

/** `gpuvm serve --no-agent`: an API node for a fleet whose agents run elsewhere (Postgres only). */
export async function startApiNode(config: Config, opts: { log?: Logger } = {}): Promise<ApiNode> {
  const log = opts.log ?? createLogger(config.logLevel);
  if (!config.databaseUrl) throw new ConfigError('an API node without an agent needs a shared Postgres (DATABASE_URL): the embedded database serves one process');
  return onStore(config, 'serve', log, async (db) => {
    const node = await startApi(config, db, log, [], () => true);
    return { config, log, ...node, stop: () => node.close() };
  });
}

/** `gpuvm agent`: one host's agent against a shared Postgres, serving nothing. */
export async function startAgentNode(
  config: Config,
  opts: { log?: Logger; hostConfig?: HostConfig; sim?: { hostId: string; board?: SimBoard } },
): Promise<AgentRole & { log: Logger; db: Db }> {
  const log = opts.log ?? createLogger(config.logLevel);
  if (!config.databaseUrl) throw new ConfigError('gpuvm agent needs a shared Postgres (DATABASE_URL): the embedded database serves one process');
  return onStore(config, 'agent', log, async (db) => {
    const role = await startAgentRole(db, config, { log, policy: retryPolicy(config), command: 'agent', hostConfig: opts.hostConfig, sim: opts.sim });
    return { ...role, log };
  });
}

export async function startService(config: Config, opts: StartOptions = {}): Promise<Service> {
  const log = opts.log ?? createLogger(config.logLevel);
  return onStore(config, 'serve', log, async (db) => {
    const agents: AgentRole[] = [];
    let node: Awaited<ReturnType<typeof startApi>> | null = null;
    const stop = async () => {
      await node?.close();
      for (const a of agents) await a.stop();
    };
    try {
      const policy = retryPolicy(config);
      if (opts.host || opts.hostConfig) {
        agents.push(await startAgentRole(db, config, { log, policy, command: 'serve', host: opts.host, hostConfig: opts.hostConfig }));
      } else {
        for (const sim of simFleet(config, opts.simHosts)) agents.push(await startAgentRole(db, config, { log, policy, command: 'serve', sim }));
      }
      let isReady = false;
      const ready = Promise.all(agents.map((a) => a.ready)).then(() => {
        isReady = true;
        log.info({ hosts: agents.map((a) => a.hostId) }, 'first reconciliation done: accepting creates');
      });
      ready.catch(() => {});
      node = await startApi(config, db, log, agents, () => isReady);
      if (opts.waitReady !== false) await ready;

      const first = agents[0]!;
      return {
        config,
        log,
        ...node,
        agents,
        host: first.host,
        worker: first.worker,
        monitor: first.monitor,
        health: first.health,
        fabricManager: first.fabricManager,
        reconciler: first.reconciler,
        agent: first.agent,
        ready,
        stop,
      };
    } catch (err) {
      await node?.close().catch(() => {});
      for (const a of agents.reverse()) await a.stop().catch(() => {});
      throw err;
    }
  });
}
