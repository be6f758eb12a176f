/**
 * Health and quarantine: a partition that failed twice, a GPU with an Xid in the kernel log, and a
 * GPU whose fabric state failed are taken out of placement until an operator clears them.
 */
import { appendFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSimHost, writeFaults } from '../src/host/sim/sim-host.ts';
import { expectInvariantsAtRest } from './support/invariants.ts';
import { startTestService, usingPostgres, waitUntil, type TestService } from './support/env.ts';

let t: TestService;
const simRoot = () => join(t.dataDir, 'sim', t.service.host.hostId);
const until = (id: string, state: string) => waitUntil(`${id} ${state}`, async () => (await t.service.vms.get(id)).state === state, 60_000);

async function api(method: string, path: string, body?: object) {
  const res = await fetch(t.service.url + path, { method, headers: body ? { 'content-type': 'application/json' } : {}, body: body ? JSON.stringify(body) : undefined });
  return { status: res.status, body: await res.json() };
}

describe(`quarantine (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    t = await startTestService();
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('quarantines a partition whose cycles failed twice in a row, and places elsewhere until cleared', async () => {
    await writeFaults(simRoot(), { fmpm: { activateFails: { '8': -24 } } });
    try {
      for (let i = 0; i < 2; i++) {
        const vm = await t.service.vms.create({ gpus: 1, actor: 'test' });
        expect(vm.partition_id).toBe(8);
        await until(vm.id, 'failed');
      }
      const p8 = await t.service.db.kysely.selectFrom('partitions').selectAll().where('partition_id', '=', 8).executeTakeFirstOrThrow();
      expect(p8.state).toBe('quarantined');
      expect(p8.failure).toMatch(/activatePartition/);
      const hosts = (await api('GET', '/v1/hosts')).body.hosts;
      expect(hosts[0].quarantinedPartitions).toEqual([{ partitionId: 8, failure: p8.failure }]);

      const next = await t.service.vms.create({ gpus: 1, actor: 'test' });
      expect(next.partition_id).not.toBe(8);
      await until(next.id, 'running');
      await t.service.vms.delete(next.id, 'test');
      await until(next.id, 'deleted');
    } finally {
      await writeFaults(simRoot(), { fmpm: {} });
    }
    expect((await api('POST', '/v1/hosts/sim-b200/clear-quarantine', { moduleId: 3 })).status).toBe(409);
    const cleared = await api('POST', '/v1/hosts/sim-b200/clear-quarantine', { partitionId: 8 });
    expect(cleared).toEqual({ status: 200, body: { modules: [], partitions: [8] } });
    const again = await t.service.vms.create({ gpus: 1, actor: 'test' });
    expect(again.partition_id).toBe(8);
    await until(again.id, 'running');
    await t.service.vms.delete(again.id, 'test');
    await until(again.id, 'deleted');
    for (const v of await t.service.vms.list()) await t.service.vms.delete(v.id, 'test');
    for (const v of await t.service.vms.list()) await until(v.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  });

  it('quarantines a GPU with an Xid in the kernel log: no partition containing it is placed on', async () => {
    const sim = await loadSimHost(simRoot());
    const gpu = sim.gpus[2]!;
    const [domain, bus, dev] = gpu.pciAddress.split(/[:.]/);
    appendFileSync(join(simRoot(), 'var', 'log', 'kern.log'), `Nov 23 03:12:01 hgx kernel: NVRM: Xid (PCI:${domain}:${bus}:${dev}): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n`);
    await t.service.health.check();
    await t.service.health.check(); // the same line is recorded once
    const host = await t.service.db.kysely.selectFrom('hosts').selectAll().executeTakeFirstOrThrow();
    expect(Object.keys(host.quarantined_modules)).toEqual([String(gpu.moduleId)]);
    expect(host.quarantined_modules[String(gpu.moduleId)]).toMatchObject({ source: 'xid' });
    const events = await t.service.db.kysely.selectFrom('events').select('type').where('stream_id', '=', 'host:sim-b200').where('type', '=', 'GPU_UNHEALTHY').execute();
    expect(events).toHaveLength(1);

    await expect(t.service.vms.create({ gpus: 8, actor: 'test' })).rejects.toThrow(/no capacity.*1 quarantined/);
    const vms = [];
    for (let i = 0; i < 7; i++) vms.push(await t.service.vms.create({ gpus: 1, actor: 'test' }));
    expect(vms.flatMap((v) => v.gpus.map((g) => g.moduleId))).not.toContain(gpu.moduleId);
    await expect(t.service.vms.create({ gpus: 1, actor: 'test' })).rejects.toThrow(/no capacity/);
    for (const v of vms) await t.service.vms.delete(v.id, 'test');
    for (const v of vms) await until(v.id, 'deleted');

    const cleared = await api('POST', '/v1/hosts/sim-b200/clear-quarantine', { moduleId: gpu.moduleId });
    expect(cleared.body).toEqual({ modules: [gpu.moduleId], partitions: [] });
    await t.service.health.check(); // an Xid already recorded does not quarantine again
    const vm = await t.service.vms.create({ gpus: 8, actor: 'test' });
    await until(vm.id, 'running');
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  }, 180_000);

  it('quarantines a GPU whose fabric state failed, again after a clear while it stays failed', async () => {
    const sim = await loadSimHost(simRoot());
    const gpu = sim.gpus[5]!;
    await writeFaults(simRoot(), { nvidiaSmi: { fabricFailed: [gpu.pciAddress] } });
    try {
      await t.service.health.check();
      const host = await t.service.db.kysely.selectFrom('hosts').selectAll().executeTakeFirstOrThrow();
      expect(host.quarantined_modules[String(gpu.moduleId)]).toMatchObject({ source: 'fabric' });
      await api('POST', '/v1/hosts/sim-b200/clear-quarantine', { all: true });
      await t.service.health.check();
      const after = await t.service.db.kysely.selectFrom('hosts').selectAll().executeTakeFirstOrThrow();
      expect(Object.keys(after.quarantined_modules)).toEqual([String(gpu.moduleId)]);
    } finally {
      await writeFaults(simRoot(), { nvidiaSmi: {} });
    }
    await api('POST', '/v1/hosts/sim-b200/clear-quarantine', { all: true });
    await t.service.health.check();
    const healthy = await t.service.db.kysely.selectFrom('hosts').selectAll().executeTakeFirstOrThrow();
    expect(healthy.quarantined_modules).toEqual({});
  });
});
