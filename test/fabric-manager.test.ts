/**
 * Fabric Manager restarting in resiliency mode: gpuvm answers its wait for the activated list from
 * its own log, so running VMs keep their partitions and provisioning carries on.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHandlers } from '../src/engine/handlers.ts';
import { loadSimHost, restartFabricManager } from '../src/host/sim/sim-host.ts';
import { expectInvariantsAtRest } from './support/invariants.ts';
import { handlerContext, startTestService, usingPostgres, waitUntil, type TestService } from './support/env.ts';

let t: TestService;
const simRoot = () => join(t.dataDir, 'sim', t.service.host.hostId);
const until = (id: string, state: string) => waitUntil(`${id} ${state}`, async () => (await t.service.vms.get(id)).state === state, 60_000);
const activeNow = async () => (await t.service.host.fmpm.list()).partitions.filter((p) => p.isActive).map((p) => p.partitionId);

describe(`Fabric Manager restart (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    t = await startTestService();
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('gives a restarted Fabric Manager the active partitions of the running VMs', async () => {
    const a = await t.service.vms.create({ gpus: 2, actor: 'test' });
    const b = await t.service.vms.create({ gpus: 1, actor: 'test' });
    await until(a.id, 'running');
    await until(b.id, 'running');
    const expected = [a.partition_id, b.partition_id].sort((x, y) => x - y);
    expect(await activeNow()).toEqual(expected);

    await restartFabricManager(simRoot(), { timeoutMs: 60_000 });
    expect(await t.service.fabricManager.check()).toBe('answered');
    expect(await activeNow()).toEqual(expected);
    expect(await t.service.fabricManager.check()).toBe('running');
    const restart = await t.service.db.kysely.selectFrom('events').select(['type', 'data']).where('stream_id', '=', 'host:sim-b200').where('type', '=', 'FABRIC_MANAGER_RESTARTED').execute();
    expect(restart).toEqual([{ type: 'FABRIC_MANAGER_RESTARTED', data: { activatedList: expected } }]);

    for (const v of [a, b]) await t.service.vms.delete(v.id, 'test');
    for (const v of [a, b]) await until(v.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  });

  it('carries on provisioning when Fabric Manager restarts under it: the refusal wakes the guard', async () => {
    await restartFabricManager(simRoot(), { timeoutMs: 60_000 });
    const vm = await t.service.vms.create({ gpus: 4, actor: 'test' });
    await until(vm.id, 'running');
    const h = await t.service.vms.history(vm.id);
    // Some fmpm call was refused with NOT_CONFIGURED and waited (no try spent) until the guard answered.
    const refused = h.effects.flatMap((e) => e.tries).filter((tr) => tr.outcome === 'waiting' && /not-configured|fmReturn: -8/.test(tr.error ?? ''));
    expect(refused.length).toBeGreaterThan(0);
    expect(await activeNow()).toEqual([vm.partition_id]);
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  });

  it('deactivates again a partition a restarted Fabric Manager was told is active after its fmpm -d', async () => {
    // The guard answers from the log: a partition between fmpm -d and its confirmation is still
    // "active" there, so Fabric Manager activates it again. confirmInactive must not wait forever.
    const { host } = t.service;
    const gpus = (await loadSimHost(simRoot())).gpus.filter((g) => g.moduleId === 7 || g.moduleId === 8).map((g) => ({ moduleId: g.moduleId, pciAddress: g.pciAddress }));
    const params = { hostId: host.hostId, partitionId: 7, vmId: 'vm-gone000001', gpus };
    await host.fmpm.activate(7);
    const handlers = createHandlers(host);
    const ctx = await handlerContext(t.service, 'partition:sim-b200:7');
    await expect(handlers.confirmInactive!(params, ctx)).rejects.toThrow(/active again after deactivation; deactivated it again/);
    expect(await activeNow()).toEqual([]);
    await expect(handlers.confirmInactive!(params, ctx)).resolves.toEqual({ deliver: { streamId: 'partition:sim-b200:7', event: { type: 'CONFIRMED_INACTIVE' } } });
  });
});
