/**
 * `gpuvm serve`, assembled: open and migrate the database, open the host, register it, start the
 * effect worker and the QEMU monitor, and serve the API. Tests start the same service in-process.
 */
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { buildApi } from './api/server.ts';
import type { Config } from './config.ts';
import type { EffectPolicy } from './engine/commands.ts';
import { createHandlers } from './engine/handlers.ts';
import { registerHost } from './engine/hosts.ts';
import { QemuMonitor } from './engine/monitor.ts';
import { Reconciler } from './engine/reconcile.ts';
import { HealthMonitor } from './engine/health.ts';
import { HOST_FILES } from './host/doctor.ts';
import { FabricManagerGuard } from './engine/fabric-manager.ts';
import { VmService } from './engine/vms.ts';
import { EffectWorker, type RetryPolicy } from './engine/worker.ts';
import { openSimulatedHost, type HostAdapters } from './host/host.ts';
import { openRealHost, type HostConfig } from './host/host-config.ts';
import { createLogger, type Logger } from './log.ts';
import { migrate, openDb, type Db } from './store/db.ts';
import { lockDataDir } from './store/data-dir.ts';
import { HostAgent } from './engine/agent.ts';

export interface Service {
  config: Config;
  db: Db;
  host: HostAdapters;
  vms: VmService;
  worker: EffectWorker;
  monitor: QemuMonitor;
  health: HealthMonitor;
  fabricManager: FabricManagerGuard;
  reconciler: Reconciler;
  /** This host's agent: its lock and epoch (src/engine/agent.ts). */
  agent: HostAgent;
  api: FastifyInstance;
  /**
   * Resolves once the first reconciliation pass has judged the host against the log. Until then
   * `/v1/health` says `starting` and creates are answered 503: a partition Fabric Manager shows
   * active that the log does not own must be taken up before anything is placed.
   */
  ready: Promise<void>;
  /** The API's base URL, e.g. http://127.0.0.1:7070 */
  url: string;
  log: Logger;
  stop(): Promise<void>;
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
  /** Resolve only once the service is ready (see Service.ready); default true. `gpuvm serve` serves while it starts. */
  waitReady?: boolean;
}

export async function startService(config: Config, opts: StartOptions = {}): Promise<Service> {
  const log = opts.log ?? createLogger(config.logLevel);
  // One gpuvm per data folder: a second one stops here, before it writes anything.
  const folder = lockDataDir(config.dataDir, 'serve');
  let db: Db;
  try {
    db = await openDb({ databaseUrl: config.databaseUrl, pgliteDir: join(config.dataDir, 'pglite') });
  } catch (err) {
    folder.release();
    throw err;
  }
  // What a failed start must stop again, newest first; each is pushed before it starts, so one
  // that throws halfway through its start is stopped too.
  const started: (() => Promise<unknown>)[] = [];
  try {
    await migrate(db);
    log.info({ database: db.kind === 'postgres' ? 'postgres' : `pglite at ${join(config.dataDir, 'pglite')}` }, 'database ready');

    const hostConfig = opts.hostConfig;
    // One agent per host, before anything on the host or its streams is touched.
    const hostId = opts.host?.hostId ?? hostConfig?.hostId ?? config.hostId;
    const agent = await HostAgent.start(db, hostId, { command: 'serve', heartbeatMs: config.agentHeartbeatMs, log });
    started.push(() => agent.stop());
    const host =
      opts.host ??
      (hostConfig ? openRealHost(hostConfig, { bindTimeoutMs: config.bindTimeoutMs, toolTimeoutMs: config.toolTimeoutMs }) : null) ??
      (await openSimulatedHost(
        { hostId: config.hostId, dataDir: config.dataDir, qemuBin: config.qemuBin, bindTimeoutMs: config.bindTimeoutMs, toolTimeoutMs: config.toolTimeoutMs },
        log,
      ));
    log.info({ hostId: host.hostId, qemu: host.qemuDescription }, 'host adapters ready');

    const policy: EffectPolicy & RetryPolicy = retryPolicy(config);
    await registerHost(db.kysely, host, policy, log, { expectedGpus: hostConfig?.expectedGpus });

    // VM sizes and the powerdown timeout: the host config file, else the service options.
    const vmDefaults = {
      memoryMiB: hostConfig?.vm.memoryMiB ?? config.vmMemoryMiB,
      vcpus: hostConfig?.vm.vcpus ?? config.vmVcpus,
      powerdownTimeoutMs: hostConfig?.vm.powerdownTimeoutMs ?? config.powerdownTimeoutMs ?? (host.simulated ? 3000 : 30_000),
    };
    const fabricManager = new FabricManagerGuard(db.kysely, host, policy, { intervalMs: config.fabricManagerCheckMs, log, signal: () => agent.signal });
    const worker = new EffectWorker(db, {
      hostId: host.hostId,
      agent,
      notYetMs: config.notYetMs,
      handlers: createHandlers(host, { fabricManagerWaiting: () => fabricManager.kick() }),
      policy,
      leaseMs: config.leaseMs,
      pollMs: config.pollMs,
      concurrency: config.workerConcurrency,
      log,
    });
    started.push(() => worker.stop());
    await worker.start();
    // Requests and the QEMU monitor hand the effects they write to this worker (no claim, no NOTIFY).
    let isReady = false;
    const vms = new VmService(db.kysely, host.hostId, vmDefaults, policy, worker, () => isReady);
    started.push(() => fabricManager.stop());
    fabricManager.start();
    const monitor = new QemuMonitor(db.kysely, host, policy, config.monitorIntervalMs, log, worker);
    started.push(() => monitor.stop());
    monitor.start();
    const health = new HealthMonitor(db.kysely, host, policy, { intervalMs: config.healthIntervalMs, kernelLog: join(host.fsRoot, HOST_FILES.kernelLog), log });
    started.push(() => health.stop());
    health.start();
    const reconciler = new Reconciler(db.kysely, host, policy, {
      intervalMs: config.reconcileIntervalMs,
      log,
      monitor,
      fabricManagerWaiting: () => fabricManager.kick(),
    });
    started.push(() => reconciler.stop());
    reconciler.start();
    const ready = reconciler.firstJudgement().then(() => {
      isReady = true;
      log.info({ hostId: host.hostId }, 'first reconciliation done: accepting creates');
    });
    // Stopped before it was ready: whoever awaits `ready` hears it; nobody else must.
    ready.catch(() => {});

    const api = await buildApi({
      vms,
      db: db.kysely,
      policy,
      log,
      health: async () => ({
        ok: true,
        status: isReady ? 'ok' : 'starting',
        epoch: agent.epoch,
        hostId: host.hostId,
        simulated: host.simulated,
        database: db.kind,
        qemu: host.qemuDescription,
        vms: await vms.countByState(),
      }),
    });
    started.push(() => api.close());
    const address = await api.listen({ host: config.listenHost, port: config.port });
    log.info({ url: address, hostId: host.hostId }, 'gpuvm is serving');
    if (opts.waitReady !== false) await ready;

    let stopped = false;
    return {
      config,
      db,
      host,
      vms,
      worker,
      monitor,
      health,
      fabricManager,
      reconciler,
      agent,
      api,
      ready,
      url: address,
      log,
      async stop() {
        if (stopped) return;
        stopped = true;
        await api.close();
        await reconciler.stop();
        await monitor.stop();
        await health.stop();
        await fabricManager.stop();
        await worker.stop();
        await agent.stop();
        await db.close();
        folder.release();
      },
    };
  } catch (err) {
    for (const stop of started.reverse()) await stop().catch(() => {});
    await db.close().catch(() => {});
    folder.release();
    throw err;
  }
}
