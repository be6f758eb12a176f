/**
 * Every lifecycle path end to end on the simulated B200 host, with the real adapters, the real
 * QEMU (stand-in devices) and the database under test (PGlite, or Postgres with DATABASE_URL).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { sql } from 'kysely';
import { verifyProjections } from '../src/engine/rebuild.ts';
import { writeFaults } from '../src/host/sim/sim-host.ts';
import { expectInvariantsAtRest, hostPicture } from './support/invariants.ts';
import { startTestService, usingPostgres, waitUntil, type TestService } from './support/env.ts';

let t: TestService;
const vmState = async (id: string) => (await t.service.vms.get(id)).state;
const until = (id: string, state: string, ms = 60_000) => waitUntil(`${id} to be ${state}`, async () => (await vmState(id)) === state, ms);
const simRoot = () => join(t.dataDir, 'sim', t.service.host.hostId);

describe(`VM lifecycles on the simulated host (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    t = await startTestService();
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('registers the host from nvidia-smi and fmpm -l: 15 B200 partitions, module ids mapped to PCI addresses', async () => {
    const partitions = await t.service.db.kysely.selectFrom('partitions').selectAll().orderBy('partition_id').execute();
    expect(partitions.map((p) => [p.partition_id, p.size])).toEqual([
      [1, 8], [2, 4], [3, 4], [4, 2], [5, 2], [6, 2], [7, 2], [8, 1], [9, 1], [10, 1], [11, 1], [12, 1], [13, 1], [14, 1], [15, 1],
    ]);
    expect(partitions.every((p) => p.state === 'free')).toBe(true);
    await expectInvariantsAtRest(t.service);
  });

  it('creates a 2-GPU VM: claim → activate → confirm → bind vfio-pci → QEMU → running; delete returns everything', async () => {
    const vm = await t.service.vms.create({ gpus: 2, name: 'two', actor: 'test' });
    expect(vm.state).toBe('provisioning');
    await until(vm.id, 'running');
    const running = await t.service.vms.get(vm.id);
    const picture = await expectInvariantsAtRest(t.service);
    expect(picture.activePartitions).toEqual([running.partition_id]);
    for (const g of running.gpus) expect(picture.drivers[g.pciAddress]).toBe('vfio-pci');
    expect(picture.liveQemu).toEqual([vm.id]);

    const history = await t.service.vms.history(vm.id);
    expect(history.events.filter((e) => e.stream === `partition:${t.service.host.hostId}:${vm.partition_id}`).map((e) => e.to)).toEqual([
      'preparing', 'activating', 'confirmingActive', 'binding', 'ready',
    ]);

    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    const after = await expectInvariantsAtRest(t.service);
    expect(after.activePartitions).toEqual([]);
    expect(after.liveQemu).toEqual([]);
    const h = await t.service.vms.history(vm.id);
    const vmSteps = h.events.filter((e) => e.stream === `vm:${vm.id}`).map((e) => e.to);
    expect(vmSteps).toEqual(['provisioning', 'starting', 'running', 'stopping', 'terminating', 'releasing', 'deleted']);
    // Order of the teardown: QEMU gone before the GPUs move, GPUs back on nvidia before deactivation.
    const order = h.events.map((e) => e.to);
    expect(order.indexOf('releasing')).toBeLessThan(order.indexOf('unbinding'));
    expect(order.indexOf('unbinding')).toBeLessThan(order.indexOf('deactivating'));
    // Direct hand-off: each partition step after the first was claimed in the transaction that
    // recorded the previous step's outcome (same now()), not by a later poll or notification.
    const first = (type: string) => h.effects.find((e) => e.type === type)!;
    for (const [prev, next] of [['prepareGpus', 'activatePartition'], ['activatePartition', 'confirmActive'], ['bindHost', 'deactivatePartition']] as const) {
      expect(first(next).tries[0]!.startedAt.getTime(), `${prev} → ${next}`).toBe(first(prev).completedAt!.getTime());
    }
  });

  it('fails the VM with the reason when activation fails, and unwinds the partition', async () => {
    const allIds = Object.fromEntries(Array.from({ length: 15 }, (_, i) => [String(i + 1), -24]));
    await writeFaults(simRoot(), { fmpm: { activateFails: allIds } });
    try {
      const vm = await t.service.vms.create({ gpus: 1, actor: 'test' });
      await until(vm.id, 'failed');
      const failed = await t.service.vms.get(vm.id);
      expect(failed.reason).toMatch(/activatePartition/);
      expect(failed.reason).toMatch(/-24|resource-in-another-partition/);
      await expectInvariantsAtRest(t.service);
      await t.service.vms.delete(vm.id, 'test');
      await until(vm.id, 'deleted');
    } finally {
      await writeFaults(simRoot(), { fmpm: {} });
    }
  });

  it('marks the VM crashed when its QEMU dies on its own, and returns GPUs and partition', async () => {
    const vm = await t.service.vms.create({ gpus: 4, actor: 'test' });
    await until(vm.id, 'running');
    const { pid } = await t.service.host.qemu.status(vm.id);
    process.kill(pid!, 'SIGKILL');
    await until(vm.id, 'crashed');
    expect((await t.service.vms.get(vm.id)).reason).toMatch(/QEMU exited on its own/);
    const picture = await expectInvariantsAtRest(t.service);
    expect(picture.activePartitions).toEqual([]);
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
  });

  it('accepts delete while provisioning and while starting, and leaks nothing', async () => {
    const a = await t.service.vms.create({ gpus: 1, actor: 'test' });
    await t.service.vms.delete(a.id, 'test');
    const b = await t.service.vms.create({ gpus: 2, actor: 'test' });
    await until(b.id, 'starting');
    await t.service.vms.delete(b.id, 'test');
    // A repeat changes nothing and is not an error.
    await t.service.vms.delete(b.id, 'test');
    await until(a.id, 'deleted');
    await until(b.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  });

  it('places 50 concurrent 1-GPU creates on one 8-GPU host: exactly 8 succeed, the rest get no capacity', async () => {
    const results = await Promise.allSettled(Array.from({ length: 50 }, () => t.service.vms.create({ gpus: 1, actor: 'test' })));
    const ok = results.filter((r) => r.status === 'fulfilled').map((r) => (r as PromiseFulfilledResult<{ id: string }>).value);
    const refused = results.filter((r) => r.status === 'rejected').map((r) => (r as PromiseRejectedResult).reason as Error);
    expect(ok).toHaveLength(8);
    expect(refused).toHaveLength(42);
    for (const e of refused) expect(e.message).toMatch(/no capacity/);
    const claims = await t.service.db.kysely.selectFrom('gpu_claims').selectAll().execute();
    expect(claims).toHaveLength(8);
    expect(new Set(claims.map((c) => c.module_id)).size).toBe(8);
    expect(new Set(claims.map((c) => c.vm_id))).toEqual(new Set(ok.map((v) => v.id)));
    // A 2-GPU request has no room either.
    await expect(t.service.vms.create({ gpus: 2, actor: 'test' })).rejects.toThrow(/no capacity/);
    for (const v of ok) await until(v.id, 'running', 120_000);
    await expectInvariantsAtRest(t.service);
    for (const v of ok) await t.service.vms.delete(v.id, 'test');
    for (const v of ok) await until(v.id, 'deleted', 120_000);
    const picture = await expectInvariantsAtRest(t.service);
    expect(picture.liveQemu).toEqual([]);
  }, 300_000);

  it('an 8-GPU VM takes the whole board after the small ones are gone', async () => {
    const vm = await t.service.vms.create({ gpus: 8, actor: 'test' });
    await until(vm.id, 'running');
    const running = await t.service.vms.get(vm.id);
    expect(running.gpus.map((g) => g.moduleId)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    await hostPicture(t.service);
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  });

  it('replay: folding every stream reproduces every projection row, and a tampered row is named', async () => {
    const vm = await t.service.vms.create({ gpus: 2, actor: 'test' });
    await until(vm.id, 'running');
    const db = t.service.db.kysely;
    const clean = await verifyProjections(db);
    expect(clean.differences).toEqual([]);
    expect(clean.streams).toBeGreaterThanOrEqual(17); // host, 15 partitions, at least this VM
    expect(clean.events).toBeGreaterThanOrEqual(16 + 8);

    await sql`update vms set state = 'crashed' where id = ${vm.id}`.execute(db);
    const tamperedVm = await verifyProjections(db);
    expect(tamperedVm.differences.map((d) => `${d.streamId} ${d.table}`)).toEqual([`vm:${vm.id} vms`]);
    await sql`update vms set state = 'running' where id = ${vm.id}`.execute(db);

    const claim = await db.selectFrom('gpu_claims').selectAll().where('vm_id', '=', vm.id).limit(1).executeTakeFirstOrThrow();
    await sql`delete from gpu_claims where host_id = ${claim.host_id} and module_id = ${claim.module_id}`.execute(db);
    expect((await verifyProjections(db)).differences.map((d) => d.table)).toEqual(['gpu_claims']);
    await db.insertInto('gpu_claims').values(claim).execute();
    expect((await verifyProjections(db)).differences).toEqual([]);

    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  });
});
