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
import { VmService } from './engine/vms.ts';
import { EffectWorker, type RetryPolicy } from './engine/worker.ts';
import { openSimulatedHost, type HostAdapters } from './host/host.ts';
import { createLogger, type Logger } from './log.ts';
import { migrate, openDb, type Db } from './store/db.ts';

export interface Service {
  config: Config;
  db: Db;
  host: HostAdapters;
  vms: VmService;
  worker: EffectWorker;
  monitor: QemuMonitor;
  api: FastifyInstance;
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

export async function startService(config: Config, opts: { log?: Logger; host?: HostAdapters } = {}): Promise<Service> {
  const log = opts.log ?? createLogger(config.logLevel);
  const db = await openDb({ databaseUrl: config.databaseUrl, pgliteDir: join(config.dataDir, 'pglite') });
  try {
    await migrate(db);
    log.info({ database: db.kind === 'postgres' ? 'postgres' : `pglite at ${join(config.dataDir, 'pglite')}` }, 'database ready');

    const host =
      opts.host ??
      (await openSimulatedHost(
        { hostId: config.hostId, dataDir: config.dataDir, qemuBin: config.qemuBin, bindTimeoutMs: config.bindTimeoutMs, toolTimeoutMs: config.toolTimeoutMs },
        log,
      ));
    log.info({ hostId: host.hostId, qemu: host.qemuDescription }, 'host adapters ready');

    const policy: EffectPolicy & RetryPolicy = retryPolicy(config);
    await registerHost(db.kysely, host, policy, log);

    const powerdownTimeoutMs = config.powerdownTimeoutMs ?? (host.simulated ? 3000 : 30_000);
    const vms = new VmService(db.kysely, host.hostId, { memoryMiB: config.vmMemoryMiB, vcpus: config.vmVcpus, powerdownTimeoutMs }, policy);
    const worker = new EffectWorker(db, {
      hostId: host.hostId,
      handlers: createHandlers(host),
      policy,
      leaseMs: config.leaseMs,
      pollMs: config.pollMs,
      concurrency: config.workerConcurrency,
      log,
    });
    await worker.start();
    const monitor = new QemuMonitor(db.kysely, host, policy, config.monitorIntervalMs, log);
    monitor.start();

    const api = await buildApi({
      vms,
      db: db.kysely,
      log,
      health: async () => ({
        ok: true,
        hostId: host.hostId,
        simulated: host.simulated,
        database: db.kind,
        qemu: host.qemuDescription,
        vms: await vms.countByState(),
      }),
    });
    const address = await api.listen({ host: config.listenHost, port: config.port });
    log.info({ url: address, hostId: host.hostId }, 'gpuvm is serving');

    let stopped = false;
    return {
      config,
      db,
      host,
      vms,
      worker,
      monitor,
      api,
      url: address,
      log,
      async stop() {
        if (stopped) return;
        stopped = true;
        await api.close();
        await monitor.stop();
        await worker.stop();
        await db.close();
      },
    };
  } catch (err) {
    await db.close().catch(() => {});
    throw err;
  }
}
