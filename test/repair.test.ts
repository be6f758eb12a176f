/**
 * An operator's way out: a partition whose release failed for good (`broken`) is repaired with
 * `POST /v1/hosts/:id/repair` (`gpuvm host repair <host> --partition N`) and returns to `free` with
 * its GPU claims dropped. A VM whose QEMU would not stop keeps its partition until the QEMU monitor
 * sees the process gone. And a partition already active when gpuvm first registers the host is
 * registered holding its GPUs and repaired (deactivated) before anything is placed on it.
 */
import { execFile } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vmStream } from '../machines/index.ts';
import { applyEvent } from '../src/engine/commands.ts';
import { inTransaction } from '../src/engine/retrying.ts';
import { createSimHost, loadSimHost, stopSimKernel, writeFaults } from '../src/host/sim/sim-host.ts';
import { retryPolicy, startService } from '../src/service.ts';
import { expectInvariantsAtRest } from './support/invariants.ts';
import { freshDatabaseUrl, quietLog, startTestService, tempDir, testConfig, usingPostgres, waitUntil, type TestService } from './support/env.ts';

const BIN = fileURLToPath(new URL('../bin/gpuvm.js', import.meta.url));
let t: TestService;
const simRoot = () => join(t.dataDir, 'sim', t.service.host.hostId);

async function api(method: string, path: string, body?: object) {
  const res = await fetch(t.service.url + path, { method, headers: body ? { 'content-type': 'application/json' } : {}, body: body ? JSON.stringify(body) : undefined });
  return { status: res.status, body: await res.json() };
}

const partition = (id: number) => t.service.db.kysely.selectFrom('partitions').selectAll().where('partition_id', '=', id).executeTakeFirstOrThrow();
const claims = (id: number) => t.service.db.kysely.selectFrom('gpu_claims').selectAll().where('partition_id', '=', id).execute();

describe(`operator repair (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    // An unbind that stays EBUSY gives up after 300 ms, three tries: broken in about a second.
    t = await startTestService({ bindTimeoutMs: 300, effectMaxAttempts: 3 });
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('returns a broken partition to free through host repair, its claims dropped', async () => {
    // Given a VM whose GPU will not unbind from vfio-pci when it is deleted
    const vm = await t.service.vms.create({ gpus: 1, actor: 'test' });
    await waitUntil('running', async () => (await t.service.vms.get(vm.id)).state === 'running', 60_000);
    const pci = (await loadSimHost(simRoot())).gpus.find((g) => g.moduleId === vm.gpus[0]!.moduleId)!.pciAddress;
    await writeFaults(simRoot(), { sysfs: { unbindBusy: [pci] } });
    await t.service.vms.delete(vm.id, 'test');
    await waitUntil('broken', async () => (await partition(vm.partition_id)).state === 'broken', 60_000);
    expect(await claims(vm.partition_id)).toHaveLength(1);
    expect((await t.service.vms.get(vm.id)).state).toBe('deleted');

    // A partition that is not broken is refused, and so are unknown hosts and partitions
    const free = vm.partition_id === 8 ? 9 : 8;
    expect(await api('POST', '/v1/hosts/sim-b200/repair', { partitionId: free })).toMatchObject({ status: 409, body: { error: { code: 'not-broken' } } });
    expect((await api('POST', '/v1/hosts/nope/repair', { partitionId: 1 })).status).toBe(404);
    expect((await api('POST', '/v1/hosts/sim-b200/repair', { partitionId: 999 })).status).toBe(404);
    expect((await api('POST', '/v1/hosts/sim-b200/repair', { partition: 1 })).status).toBe(400);

    // When the operator has fixed the host and runs gpuvm host repair
    await writeFaults(simRoot(), { sysfs: {} });
    const { stdout } = await promisify(execFile)(process.execPath, [BIN, '--url', t.service.url, 'host', 'repair', 'sim-b200', '--partition', String(vm.partition_id), '--json']);
    expect(JSON.parse(stdout)).toMatchObject({ partition_id: vm.partition_id, state: 'repairing' });

    // Then the partition repairs and is free, its claims dropped, the host at rest
    await waitUntil('free', async () => (await partition(vm.partition_id)).state === 'free', 30_000);
    expect(await claims(vm.partition_id)).toEqual([]);
    expect((await partition(vm.partition_id)).vm_id).toBeNull();
    expect(await t.service.host.sysfs.driverOf(pci)).toBe(t.service.host.hostDriver);
    await expectInvariantsAtRest(t.service);
  }, 120_000);
});

describe(`a VM whose QEMU would not stop (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    t = await startTestService();
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('holds its partition in stopFailed until the monitor sees QEMU gone, then releases it', async () => {
    // Given a running VM whose terminateQemu failed for good (driven by hand: the stop's effects never run)
    const vm = await t.service.vms.create({ gpus: 1, actor: 'test' });
    await waitUntil('running', async () => (await t.service.vms.get(vm.id)).state === 'running', 60_000);
    const policy = retryPolicy(t.service.config);
    const meta = { actor: 'test', correlationId: vm.id, causationId: null };
    await inTransaction(t.service.db.kysely, async (tx) => {
      for (const e of [{ type: 'DELETE' }, { type: 'POWERDOWN_TIMEOUT' }, { type: 'EFFECT_FAILED', effect: 'terminateQemu', error: 'still alive after SIGKILL' }]) {
        await applyEvent(tx, vmStream(vm.id), e, meta, policy);
      }
      await tx.updateTable('effects').set({ status: 'failed' }).where('stream_id', '=', vmStream(vm.id)).where('status', 'in', ['pending', 'running']).execute();
    });
    expect((await t.service.vms.get(vm.id)).state).toBe('stopFailed');
    await t.service.monitor.check();
    expect((await t.service.vms.get(vm.id)).state).toBe('stopFailed'); // QEMU still runs: the partition stays held
    expect((await partition(vm.partition_id)).state).toBe('ready');

    // When the process is finally gone
    process.kill((await t.service.host.qemu.status(vm.id)).pid!, 'SIGKILL');
    await waitUntil('QEMU gone', async () => (await t.service.host.qemu.status(vm.id)).state === 'gone');
    await t.service.monitor.check();

    // Then the VM releases its partition and is deleted, as asked
    await waitUntil('deleted', async () => (await t.service.vms.get(vm.id)).state === 'deleted', 30_000);
    expect((await partition(vm.partition_id)).state).toBe('free');
    expect(await claims(vm.partition_id)).toEqual([]);
  }, 120_000);
});

describe(`registration (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  it('registers a partition fmpm -l shows active as repairing, holding its claims, and deactivates it', async () => {
    // Given a host whose partition 5 (modules 3, 4) is active before gpuvm ever ran on it
    const dataDir = tempDir();
    const root = join(dataDir, 'sim', 'sim-b200');
    const db = await freshDatabaseUrl();
    await createSimHost({ root, hostId: 'sim-b200' });
    await promisify(execFile)(join(root, 'bin', 'fmpm'), ['-a', '5']);
    // When gpuvm starts and registers the host
    const service = await startService(testConfig(dataDir, db.url), { log: quietLog });
    try {
      // Then partition 5 registered into repairing, its modules claimed, and the repair deactivates it
      const events = await service.db.kysely.selectFrom('events').select(['type', 'data', 'state_after']).where('stream_id', '=', 'partition:sim-b200:5').orderBy('stream_version').execute();
      expect(events[0]).toMatchObject({ type: 'REGISTER', state_after: 'repairing', data: { active: true } });
      const other = await service.db.kysely.selectFrom('events').select('data').where('stream_id', '=', 'partition:sim-b200:6').executeTakeFirstOrThrow();
      expect(other.data).not.toHaveProperty('active');
      await waitUntil('repaired', async () => (await service.db.kysely.selectFrom('partitions').select('state').where('partition_id', '=', 5).executeTakeFirstOrThrow()).state === 'free', 30_000);
      expect((await service.host.fmpm.list()).partitions.filter((p) => p.isActive)).toEqual([]);
      expect(await service.db.kysely.selectFrom('gpu_claims').selectAll().execute()).toEqual([]);
      const stored = await service.db.kysely.selectFrom('hosts').select('inventory').executeTakeFirstOrThrow();
      expect(Object.keys(stored.inventory).sort()).toEqual(['board', 'gpus', 'partitions']);
    } finally {
      await service.stop();
      await stopSimKernel(root).catch(() => {});
      await db.drop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  }, 120_000);
});
