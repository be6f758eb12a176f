/**
 * Test environment: a fresh database per test file (PGlite in memory, or a new database on the
 * Postgres named by DATABASE_URL), a temp data dir, and the service with fast timings.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { loadConfig, type Config } from '../../src/config.ts';
import { startService, type Service } from '../../src/service.ts';
import type { ClaimedEffect, EffectContext } from '../../src/engine/worker.ts';

export { freshDatabaseUrl, usingPostgres } from './db.ts';
import { freshDatabaseUrl } from './db.ts';

export function tempDir(prefix = 'gpuvm-test-'): string {
  // Short paths: QMP unix sockets live under the data dir and are limited to 107 bytes.
  return mkdtempSync(join(tmpdir(), prefix));
}

export const quietLog = pino({ level: process.env.GPUVM_TEST_LOG ?? 'silent' });

/** Timings that keep lifecycles short in tests. */
export function testConfig(dataDir: string, databaseUrl: string | undefined, overrides: Partial<Config> = {}): Config {
  return loadConfig(
    {
      dataDir,
      databaseUrl,
      port: 0,
      powerdownTimeoutMs: 300,
      backoffBaseMs: 20,
      backoffMaxMs: 200,
      pollMs: 200,
      monitorIntervalMs: 100,
      // Tests call service.health.check() themselves, so a pass never races an assertion.
      healthIntervalMs: 3_600_000,
      fabricManagerCheckMs: 50_000,
      reconcileIntervalMs: 3_600_000,
      bindTimeoutMs: 3000,
      toolTimeoutMs: 10_000,
      vmMemoryMiB: 64,
      ...overrides,
    },
    {},
  );
}

export interface TestService {
  service: Service;
  dataDir: string;
  cleanup: () => Promise<void>;
}

export async function startTestService(overrides: Partial<Config> = {}): Promise<TestService> {
  const dataDir = tempDir();
  const db = await freshDatabaseUrl();
  const service = await startService(testConfig(dataDir, db.url, overrides), { log: quietLog });
  return {
    service,
    dataDir,
    cleanup: async () => {
      await stopAllQemu(service);
      await service.stop();
      const { stopSimKernel } = await import('../../src/host/sim/sim-host.ts');
      await stopSimKernel(join(dataDir, 'sim', service.host.hostId)).catch(() => {});
      await db.drop();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

async function stopAllQemu(service: Service): Promise<void> {
  const vms = await service.db.kysely.selectFrom('vms').select('id').execute();
  for (const vm of vms) await service.host.qemu.terminate(vm.id).catch(() => {});
}

export async function waitUntil<T>(what: string, probe: () => Promise<T | undefined | null | false>, timeoutMs = 30_000, everyMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/**
 * The context a worker gives a handler, for tests that call handlers by hand: a try of the stream's
 * next step under the service's current epoch (what the host fence compares), never aborted.
 */
export async function handlerContext(service: Service, streamId: string): Promise<EffectContext> {
  const row = await service.db.kysely.selectFrom('streams').select('version').where('stream_id', '=', streamId).executeTakeFirst();
  const effect: ClaimedEffect = {
    id: `${streamId}@${(row?.version ?? 0) + 1}#0`,
    streamId,
    hostId: service.host.hostId,
    type: 'test',
    params: {},
    correlationId: 'test',
    attempt: 1,
    maxAttempts: 1,
    claimedAt: new Date(),
    epoch: service.agent.epoch,
    waits: 0,
    waitingSince: null,
    exhausted: false,
  };
  return { effect, log: quietLog, signal: new AbortController().signal };
}
