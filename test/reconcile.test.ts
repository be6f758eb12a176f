/**
 * Reconciliation against the simulated host: drift an operator or a crash could leave (a partition
 * activated by hand, a GPU left on vfio-pci, a QEMU nobody owns, a partition deactivated under a
 * running VM) becomes events and is repaired in the safe direction; a healthy host, even in the
 * middle of lifecycles, shows no drift at all.
 */
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vmStream } from '../machines/index.ts';
import { applyEvent } from '../src/engine/commands.ts';
import { inTransaction } from '../src/engine/retrying.ts';
import { createHandlers } from '../src/engine/handlers.ts';
import { verifyProjections } from '../src/engine/rebuild.ts';
import { retryPolicy } from '../src/service.ts';
import type { DriftRecord } from '../src/engine/reconcile.ts';
import { loadSimHost, restartFabricManager } from '../src/host/sim/sim-host.ts';
import { expectInvariantsAtRest } from './support/invariants.ts';
import { handlerContext, startTestService, usingPostgres, waitUntil, type TestService } from './support/env.ts';

let t: TestService;
const simRoot = () => join(t.dataDir, 'sim', t.service.host.hostId);
const until = (id: string, state: string) => waitUntil(`${id} ${state}`, async () => (await t.service.vms.get(id)).state === state, 60_000);

async function partition(id: number) {
  return t.service.db.kysely.selectFrom('partitions').selectAll().where('partition_id', '=', id).executeTakeFirstOrThrow();
}

async function eventsOf(streamId: string) {
  return t.service.db.kysely.selectFrom('events').select(['type', 'data', 'state_after']).where('stream_id', '=', streamId).orderBy('stream_version').execute();
}

async function settled() {
  await waitUntil(
    'no effect in flight',
    async () => (await t.service.db.kysely.selectFrom('effects').select('id').where('status', 'in', ['pending', 'running']).where('type', '!=', 'powerdownTimer').execute()).length === 0,
    60_000,
  );
}

/** Starts a QEMU that no VM in the log owns, as a crash between deleting a VM and stopping it could leave. */
async function startStrayQemu(vmId: string, pciAddress: string) {
  const host = t.service.host;
  return host.qemu.start({ vmId, memoryMiB: 64, vcpus: 1, gpus: [pciAddress], gpuDevice: host.gpuDevice });
}

describe(`reconciliation (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    t = await startTestService();
    await t.service.reconciler.reconcile(); // after the pass the service runs at start
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('repairs an unowned active partition, a GPU left on vfio-pci and a stray QEMU, through events', async () => {
    const { host } = t.service;
    const sim = await loadSimHost(simRoot());
    const pci = (m: number) => sim.gpus.find((g) => g.moduleId === m)!.pciAddress;

    // Drift: partition 5 (modules 3, 4) activated by hand; module 6's GPU on vfio-pci under a QEMU the log never knew.
    await host.fmpm.activate(5);
    await host.sysfs.bindGroupToVfio(pci(6));
    const stray = await startStrayQemu('vm-stray00001', pci(6));

    const records = await t.service.reconciler.reconcile();
    expect(records.map((r) => `${r.streamId} ${r.drift}`).sort()).toEqual([
      'host:sim-b200 qemu-without-vm',
      'partition:sim-b200:13 gpu-off-host-driver', // the 1-GPU partition of module 6
      'partition:sim-b200:5 active-without-owner',
    ]);
    expect(records.find((r) => r.drift === 'qemu-without-vm')!.detail).toContain(`pid ${stray.pid}`);
    // The repairing partitions hold the GPUs' claims: nothing is placed on them meanwhile.
    expect((await t.service.db.kysely.selectFrom('gpu_claims').select('module_id').where('vm_id', 'is', null).execute()).map((c) => c.module_id).sort()).toEqual([3, 4, 6]);
    // A second pass finds the repairs under way and records nothing more.
    expect(await t.service.reconciler.reconcile()).toEqual([]);

    await waitUntil('repairs done', async () => (await partition(5)).state === 'free' && (await partition(13)).state === 'free', 30_000);
    await settled();
    const p5 = await eventsOf('partition:sim-b200:5');
    expect(p5.slice(-2).map((e) => `${e.type} → ${e.state_after}`)).toEqual(['DRIFT_DETECTED → repairing', 'REPAIRED → free']);
    expect(p5.at(-2)!.data).toMatchObject({ drift: 'active-without-owner', strayQemu: ['vm-stray00001'] });
    expect(p5.at(-1)!.data).toEqual({ actions: ['fmpm -d 5'] });
    expect((await eventsOf('partition:sim-b200:13')).at(-1)!.data).toEqual({ actions: [`GPU ${pci(6)} (module 6) vfio-pci → nvidia`] });
    const hostEvents = (await eventsOf('host:sim-b200')).map((e) => e.type);
    expect(hostEvents.slice(-2)).toEqual(['DRIFT_DETECTED', 'STRAY_QEMU_STOPPED']);

    expect(await t.service.reconciler.reconcile()).toEqual([]);
    await expectInvariantsAtRest(t.service);
    // The host is usable again, GPUs 3, 4 and 6 included.
    const vm = await t.service.vms.create({ gpus: 8, actor: 'test' });
    await until(vm.id, 'running');
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
  }, 120_000);

  it('the repair waits while a stray QEMU lives', async () => {
    const { host } = t.service;
    const sim = await loadSimHost(simRoot());
    const gpu = sim.gpus.find((g) => g.moduleId === 2)!;
    await startStrayQemu('vm-stray00002', gpu.pciAddress);
    const handlers = createHandlers(host);
    const params = { hostId: host.hostId, partitionId: 9, gpus: [{ moduleId: 2, pciAddress: gpu.pciAddress }], strayQemu: ['vm-stray00002'], drift: 'gpu-off-host-driver' as const };
    await expect(handlers.repairPartition!(params, await handlerContext(t.service, 'partition:sim-b200:9'))).rejects.toThrow(/stray QEMU of vm-stray00002 .* still runs/);
    await host.qemu.terminate('vm-stray00002');
    await host.qemu.cleanup('vm-stray00002');
    await expect(handlers.repairPartition!(params, await handlerContext(t.service, 'partition:sim-b200:9'))).resolves.toEqual({ deliver: { streamId: 'partition:sim-b200:9', event: { type: 'REPAIRED', actions: [] } } });
  });

  it('finds no drift on a healthy host while VMs are created and deleted', async () => {
    const vms = [await t.service.vms.create({ gpus: 2, actor: 'test' }), await t.service.vms.create({ gpus: 1, actor: 'test' })];
    const found: DriftRecord[] = [];
    const passes = async (done: () => Promise<boolean>) => {
      let n = 0;
      while (!(await done())) {
        found.push(...(await t.service.reconciler.reconcile()));
        n++;
      }
      return n;
    };
    const allIn = (state: string) => async () => (await Promise.all(vms.map((v) => t.service.vms.get(v.id)))).every((v) => v.state === state);
    const duringStart = await passes(allIn('running'));
    for (const v of vms) await t.service.vms.delete(v.id, 'test');
    const duringDelete = await passes(allIn('deleted'));
    expect(found).toEqual([]);
    expect(duringStart + duringDelete).toBeGreaterThan(2);
    await settled();
    await expectInvariantsAtRest(t.service);
  }, 120_000);

  it('reports a partition deactivated under a running VM once, and its QEMU gone makes the VM crashed', async () => {
    const { host } = t.service;
    const vm = await t.service.vms.create({ gpus: 1, actor: 'test' });
    await until(vm.id, 'running');
    const running = await t.service.vms.get(vm.id);
    await host.fmpm.deactivate(running.partition_id);

    const records = await t.service.reconciler.reconcile();
    expect(records).toEqual([
      { streamId: 'host:sim-b200', drift: 'partition-inactive-under-vm', detail: `partition ${running.partition_id} of VM ${vm.id} is not active in fmpm -l`, repair: null },
    ]);
    expect(await t.service.reconciler.reconcile()).toEqual([]); // still there: not written again
    expect((await partition(running.partition_id)).state).toBe('ready'); // the tenant's VM is left alone

    process.kill((await host.qemu.status(vm.id)).pid!, 'SIGKILL');
    await waitUntil('QEMU gone', async () => (await host.qemu.status(vm.id)).state === 'gone');
    await t.service.reconciler.reconcile();
    await until(vm.id, 'crashed');
    await settled();
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  }, 120_000);

  it('a QEMU that cannot be observed is not crashed, not stopped, not cleaned up, and nothing is released under it', async () => {
    const { host } = t.service;
    const sim = await loadSimHost(simRoot());
    const vm = await t.service.vms.create({ gpus: 1, actor: 'test' });
    await until(vm.id, 'running');
    const running = await t.service.vms.get(vm.id);
    const stray = await startStrayQemu('vm-stray00003', sim.gpus.find((g) => g.moduleId === 7)!.pciAddress);
    // A read of the pidfile that fails (EISDIR here; EMFILE or EACCES in the field) while both live.
    const blind = (vmId: string) => {
      const pidfile = join(host.qemu.runDir(vmId), 'qemu.pid');
      const pid = readFileSync(pidfile, 'utf8').trim();
      rmSync(pidfile);
      mkdirSync(pidfile);
      return () => {
        rmSync(pidfile, { recursive: true });
        writeFileSync(pidfile, `${pid}\n`);
      };
    };
    const restore = [blind(vm.id), blind('vm-stray00003')];
    try {
      expect((await host.qemu.status(vm.id)).state).toBe('unknown');
      // The monitor records no QEMU_EXITED, and the unowned QEMU is not a stray to stop.
      expect(await t.service.reconciler.reconcile()).toEqual([]);
      expect((await t.service.vms.get(vm.id)).state).toBe('running');
      const handlers = createHandlers(host);
      const params = { hostId: host.hostId, partitionId: running.partition_id, vmId: vm.id, gpus: [] };
      await expect(handlers.bindHost!(params, await handlerContext(t.service, 'partition:sim-b200:14'))).rejects.toThrow(new RegExp(`observing QEMU of VM ${vm.id} failed \\(.*EISDIR.*\\): a failed read is no evidence that it exited`));
      await expect(handlers.releasePartition!(params, await handlerContext(t.service, 'partition:sim-b200:14'))).rejects.toMatchObject({ retryable: true, message: expect.stringMatching(/observing QEMU .* failed/) });
      await expect(handlers.stopStrayQemu!({ hostId: host.hostId, vmId: 'vm-stray00003' }, await handlerContext(t.service, 'partition:sim-b200:14'))).rejects.toMatchObject({ retryable: true, message: expect.stringMatching(/observation failed/) });
      await expect(handlers.repairPartition!({ hostId: host.hostId, partitionId: 14, gpus: [], strayQemu: ['vm-stray00003'], drift: 'gpu-off-host-driver' }, await handlerContext(t.service, 'partition:sim-b200:14'))).rejects.toThrow(/observing QEMU of VM vm-stray00003 failed/);
      expect(existsSync(join(host.qemu.runDir(vm.id), 'qmp.sock'))).toBe(true);
      expect(() => process.kill(stray.pid, 0)).not.toThrow();
    } finally {
      for (const r of restore) r();
    }
    expect((await t.service.reconciler.reconcile()).map((r) => r.drift)).toEqual(['qemu-without-vm']); // seen alive now: stopped
    await waitUntil('stray stopped', async () => (await host.qemu.status('vm-stray00003')).state === 'gone', 30_000);
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await settled();
    await expectInvariantsAtRest(t.service);
  }, 120_000);

  it('leaves partitions to the Fabric Manager guard while a restarted Fabric Manager waits for its list', async () => {
    const vm = await t.service.vms.create({ gpus: 2, actor: 'test' });
    await until(vm.id, 'running');
    await restartFabricManager(simRoot(), { timeoutMs: 60_000 });
    expect(await t.service.reconciler.reconcile()).toEqual([]); // every partition looks inactive now: not drift
    await waitUntil('activated list answered', async () => (await eventsOf('host:sim-b200')).some((e) => e.type === 'FABRIC_MANAGER_RESTARTED'), 10_000);
    expect(await t.service.reconciler.reconcile()).toEqual([]);
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await settled();
    await expectInvariantsAtRest(t.service);
  }, 120_000);

  it('repairs a ready partition whose VM ended without releasing it, once that VM’s QEMU is gone', async () => {
    // Given a running VM whose release gave up (its QEMU was never seen gone): the VM ended, the partition is still ready
    const vm = await t.service.vms.create({ gpus: 1, actor: 'test' });
    await until(vm.id, 'running');
    const policy = retryPolicy(t.service.config);
    const meta = { actor: 'test', correlationId: vm.id, causationId: null };
    await inTransaction(t.service.db.kysely, async (tx) => {
      await applyEvent(tx, vmStream(vm.id), { type: 'QEMU_EXITED', how: 'not observed' }, meta, policy);
      await applyEvent(tx, vmStream(vm.id), { type: 'EFFECT_FAILED', effect: 'releasePartition', error: 'QEMU could not be observed gone' }, meta, policy);
      // The release the first step asked for is what gave up: it never runs.
      await tx.updateTable('effects').set({ status: 'failed' }).where('stream_id', '=', vmStream(vm.id)).where('type', '=', 'releasePartition').execute();
    });
    expect((await t.service.vms.get(vm.id)).state).toBe('failed');
    expect((await partition(vm.partition_id)).state).toBe('ready');

    // When reconciliation runs
    const records = await t.service.reconciler.reconcile();

    // Then the partition repairs itself, waiting for the VM's QEMU (stopped as a stray), and ends free with its claims dropped
    expect(records.map((r) => `${r.streamId} ${r.drift}`).sort()).toEqual([`host:sim-b200 qemu-without-vm`, `partition:sim-b200:${vm.partition_id} vm-ended`]);
    const drift = (await eventsOf(`partition:sim-b200:${vm.partition_id}`)).at(-1)!;
    expect(drift).toMatchObject({ type: 'DRIFT_DETECTED', state_after: 'repairing', data: { drift: 'vm-ended', strayQemu: [vm.id] } });
    // While it repairs, the claims still name the ended VM, as the fold does: the rebuild agrees.
    expect((await verifyProjections(t.service.db.kysely)).differences).toEqual([]);
    await waitUntil('repaired', async () => (await partition(vm.partition_id)).state === 'free', 30_000);
    await settled();
    expect(await t.service.db.kysely.selectFrom('gpu_claims').selectAll().where('partition_id', '=', vm.partition_id).execute()).toEqual([]);
    expect(await t.service.reconciler.reconcile()).toEqual([]);
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await expectInvariantsAtRest(t.service);
  }, 120_000);
});
