/**
 * What each effect does on the host. Every handler observes before it acts (is the partition
 * already active? is the GPU already on vfio-pci? is this VM's QEMU already up?), so running it
 * again after a crash is safe, and reports its outcome as an event for a stream.
 *
 * The actions that are not idempotent — rebinding GPUs, fmpm -a/-d, starting QEMU — run through the
 * host's fence (src/host/fence.ts) under the try's epoch and its stream version, after a last look
 * at the try's abort signal: a try whose lease is gone, from a stale agent or an older cycle of the
 * partition, never acts.
 */
import {
  type Effects,
  type NotifyVmParams,
  type PartitionEvent,
  type VmEvent,
  hostStream,
  MESSAGE_EFFECTS,
  partitionStream,
  vmStream,
  type PartitionEffectParams,
  type RepairParams,
  type StartQemuParams,
  type StopStrayQemuParams,
  type VmEffectParams,
} from '../../machines/index.ts';
import type { HostAdapters } from '../host/host.ts';
import { QemuError, type QemuStatus } from '../host/qemu.ts';
import { isWaitingForActivatedList } from './fabric-manager.ts';
import { parseEffectId } from './commands.ts';
import type { EffectContext, EffectOutcome } from './worker.ts';
import type { FenceStamp } from '../host/fence.ts';

/** The host fence's stamp of a try: its epoch, and its stream version as the generation. */
function stampOf(ctx: EffectContext): FenceStamp {
  const id = parseEffectId(ctx.effect.id);
  if (!id) throw new Error(`not an effect id: ${JSON.stringify(ctx.effect.id)}`);
  return { epoch: ctx.effect.epoch, generation: id.version, effectId: ctx.effect.id, attempt: ctx.effect.attempt };
}

/** A step that must wait for the host to catch up: it waits on a deadline without spending tries (see isNotYet). */
export class NotYetError extends Error {
  readonly retryable = true;
  readonly notYet = true;
}

/** Why a QEMU observation did not come back `gone`, or null when it did. */
function notGone(vmId: string, status: QemuStatus, what: string, alive = `QEMU of VM ${vmId} (pid ${status.pid}) is still running; ${what}`): string | null {
  if (status.state === 'gone') return null;
  if (status.state === 'alive') return alive;
  const pid = status.pid === null ? '' : ` (pid ${status.pid})`;
  return `observing QEMU of VM ${vmId}${pid} failed (${status.error ?? 'no reason given'}): a failed read is no evidence that it exited; ${what}`;
}

/** A QEMU adapter call that refused because its observation failed waits like any other "not yet". */
async function observing<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    if (err instanceof QemuError && err.code === 'unknown') throw new NotYetError(`observation failed: ${err.message}`, { cause: err });
    throw err;
  }
}

/** A step that cannot succeed by retrying; fails the effect at once. */
class RefusedError extends Error {
  readonly retryable = false;
}

const toVm = (p: { vmId: string }, event: VmEvent): EffectOutcome => ({
  deliver: { streamId: vmStream(p.vmId), event },
});
const toPartition = (p: { hostId: string; partitionId: number }, event: PartitionEvent): EffectOutcome => ({
  deliver: { streamId: partitionStream(p.hostId, p.partitionId), event },
});

export interface HandlerHooks {
  /** Fabric Manager refused a call the way a restarted one waiting for its activated list does. */
  fabricManagerWaiting?: () => void;
}

/**
 * One handler per effect the machines declare (machines/index.ts `Effects`): a missing handler, a
 * handler of an effect no machine declares, wrong params, or an outcome delivering an event the
 * receiving stream's machine does not know, each fails to compile.
 */
export type Handlers = { [K in keyof Effects]: (params: Effects[K], ctx: EffectContext) => Promise<EffectOutcome> };

export function createHandlers(host: HostAdapters, hooks: HandlerHooks = {}): Handlers {
  /**
   * Runs an fmpm call. A refusal from a restarted Fabric Manager (NOT_CONFIGURED: it waits for its
   * activated list) wakes the guard, and is "not yet", not a failure.
   */
  async function fm<T>(call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (err) {
      if (!isWaitingForActivatedList(err)) throw err;
      hooks.fabricManagerWaiting?.();
      throw new NotYetError(`Fabric Manager is not ready yet: ${(err as Error).message}`, { cause: err });
    }
  }

  /** A non-idempotent action on a partition or VM, fenced on the host (see the top of this file). */
  const fenced = <T>(ctx: EffectContext, key: string, action: string, fn: () => Promise<T>): Promise<T> => host.fence.run(key, action, stampOf(ctx), ctx.signal, fn);
  const partitionKey = (p: { partitionId: number }) => `partition-${p.partitionId}`;

  /** Invariant: never touch a partition's GPUs or its activation while the VM's QEMU lives. */
  async function assertQemuGone(p: PartitionEffectParams, step: string): Promise<void> {
    const why = notGone(p.vmId, await host.qemu.status(p.vmId), `${step} of partition ${p.partitionId} waits for it to exit`);
    if (why) throw new NotYetError(why);
  }

  return {
    // ── partition ────────────────────────────────────────────────────────────
    async prepareGpus(p: PartitionEffectParams, ctx: EffectContext) {
      for (const gpu of p.gpus) {
        const driver = await host.sysfs.driverOf(gpu.pciAddress);
        // GPUs rest on the host driver; one left elsewhere by an interrupted cycle is brought back.
        if (driver !== host.hostDriver) await fenced(ctx, partitionKey(p), 'rebind to host driver', () => host.sysfs.bindGroupToHost(gpu.pciAddress, host.hostDriver));
      }
      // Re-verify the inventory while the GPUs are visible to nvidia-smi: a wrong module → PCI
      // mapping would hand a tenant GPUs outside its NVLink island.
      const report = await host.nvidiaSmi.query();
      for (const gpu of p.gpus) {
        const seen = report.gpus.find((g) => g.pciAddress === gpu.pciAddress);
        if (!seen) throw new NotYetError(`GPU ${gpu.pciAddress} (module ${gpu.moduleId}) is not visible to nvidia-smi`);
        if (seen.moduleId !== gpu.moduleId) {
          throw new RefusedError(`GPU ${gpu.pciAddress} reports Module Id ${seen.moduleId}, inventory says ${gpu.moduleId}: refusing partition ${p.partitionId}`);
        }
      }
      return toPartition(p, { type: 'GPUS_READY' });
    },

    async activatePartition(p: PartitionEffectParams, ctx: EffectContext) {
      if (await fm(() => host.fmpm.isActive(p.partitionId))) return toPartition(p, { type: 'ACTIVATED', outcome: 'already-active' });
      const outcome = await fenced(ctx, partitionKey(p), 'fmpm -a', () => fm(() => host.fmpm.activate(p.partitionId)));
      return toPartition(p, { type: 'ACTIVATED', outcome });
    },

    async confirmActive(p: PartitionEffectParams) {
      if (!(await fm(() => host.fmpm.isActive(p.partitionId)))) throw new NotYetError(`fmpm -l does not show partition ${p.partitionId} active yet`);
      return toPartition(p, { type: 'CONFIRMED_ACTIVE' });
    },

    async bindVfio(p: PartitionEffectParams, ctx: EffectContext) {
      for (const gpu of p.gpus) {
        const { group } = await fenced(ctx, partitionKey(p), 'bind vfio-pci', () => host.sysfs.bindGroupToVfio(gpu.pciAddress));
        if (!(await host.sysfs.vfioGroupReady(group))) throw new NotYetError(`/dev/vfio/${group} for GPU ${gpu.pciAddress} has not appeared`);
      }
      return toPartition(p, { type: 'BOUND_VFIO' });
    },

    async bindHost(p: PartitionEffectParams, ctx: EffectContext) {
      await assertQemuGone(p, 'rebinding the GPUs');
      for (const gpu of p.gpus) await fenced(ctx, partitionKey(p), 'rebind to host driver', () => host.sysfs.bindGroupToHost(gpu.pciAddress, host.hostDriver));
      return toPartition(p, { type: 'BOUND_HOST' });
    },

    async deactivatePartition(p: PartitionEffectParams, ctx: EffectContext) {
      await assertQemuGone(p, 'deactivation');
      if (!(await fm(() => host.fmpm.isActive(p.partitionId)))) return toPartition(p, { type: 'DEACTIVATED', outcome: 'already-inactive' });
      const outcome = await fenced(ctx, partitionKey(p), 'fmpm -d', () => fm(() => host.fmpm.deactivate(p.partitionId)));
      return toPartition(p, { type: 'DEACTIVATED', outcome });
    },

    async confirmInactive(p: PartitionEffectParams, ctx: EffectContext) {
      if (await fm(() => host.fmpm.isActive(p.partitionId))) {
        // Active again after fmpm -d succeeded: a Fabric Manager restarted in resiliency mode was
        // handed this partition in its activated list (the guard answers from the log, which cannot
        // tell whether -d ran before the restart). QEMU is gone and the GPUs are back on the host
        // driver, so deactivating again is the safe direction; the retry confirms.
        await assertQemuGone(p, 'deactivation');
        await fenced(ctx, partitionKey(p), 'fmpm -d', () => fm(() => host.fmpm.deactivate(p.partitionId)));
        throw new NotYetError(`fmpm -l showed partition ${p.partitionId} active again after deactivation; deactivated it again`);
      }
      return toPartition(p, { type: 'CONFIRMED_INACTIVE' });
    },

    /** A message (MESSAGE_EFFECTS): run here only when it could not be delivered with the step that asked for it. */
    async notifyVm(params: NotifyVmParams) {
      return { deliver: MESSAGE_EFFECTS.notifyVm!(params as unknown as Record<string, unknown>) };
    },

    /** Drift repair, in the safe direction and in the release order: no stray QEMU, GPUs home, fmpm -d. */
    async repairPartition(p: RepairParams, ctx: EffectContext) {
      for (const vmId of p.strayQemu) {
        const status = await host.qemu.status(vmId);
        const waits = `repair of partition ${p.partitionId} waits for it to be stopped`;
        const why = notGone(vmId, status, waits, `stray QEMU of ${vmId} (pid ${status.pid}) still runs; ${waits}`);
        if (why) throw new NotYetError(why);
      }
      const actions: string[] = [];
      for (const gpu of p.gpus) {
        const driver = await host.sysfs.driverOf(gpu.pciAddress);
        if (driver === host.hostDriver) continue;
        await fenced(ctx, partitionKey(p), 'rebind to host driver', () => host.sysfs.bindGroupToHost(gpu.pciAddress, host.hostDriver));
        actions.push(`GPU ${gpu.pciAddress} (module ${gpu.moduleId}) ${driver ?? 'no driver'} → ${host.hostDriver}`);
      }
      if (await fm(() => host.fmpm.isActive(p.partitionId))) {
        await fenced(ctx, partitionKey(p), 'fmpm -d', () => fm(() => host.fmpm.deactivate(p.partitionId)));
        actions.push(`fmpm -d ${p.partitionId}`);
      }
      if (await fm(() => host.fmpm.isActive(p.partitionId))) throw new NotYetError(`fmpm -l still shows partition ${p.partitionId} active after the repair`);
      return toPartition(p, { type: 'REPAIRED', actions });
    },

    // ── host ─────────────────────────────────────────────────────────────────
    async stopStrayQemu(p: StopStrayQemuParams, ctx: EffectContext) {
      const how = await observing(() => host.qemu.terminate(p.vmId));
      ctx.signal.throwIfAborted();
      await observing(() => host.qemu.cleanup(p.vmId));
      return { deliver: { streamId: hostStream(p.hostId), event: { type: 'STRAY_QEMU_STOPPED', vmId: p.vmId, how } } };
    },

    // ── vm ───────────────────────────────────────────────────────────────────
    async startQemu(p: StartQemuParams, ctx: EffectContext) {
      for (const gpu of p.gpus) {
        const driver = await host.sysfs.driverOf(gpu.pciAddress);
        if (driver !== 'vfio-pci') throw new RefusedError(`GPU ${gpu.pciAddress} is on ${driver ?? 'no driver'}, not vfio-pci: refusing to start VM ${p.vmId}`);
      }
      const started = await fenced(ctx, `vm-${p.vmId}`, 'start QEMU', () => observing(() => host.qemu.start({
        vmId: p.vmId,
        memoryMiB: p.memoryMiB,
        vcpus: p.vcpus,
        gpus: p.gpus.map((g) => g.pciAddress),
        gpuDevice: host.gpuDevice,
        hugepagesPath: host.vmDefaults.hugepagesPath,
        diskImage: host.vmDefaults.diskImage,
        firmware: host.vmDefaults.firmware,
      })));
      return {
        ...toVm(p, { type: 'QEMU_STARTED', pid: started.pid }),
        note: started.alreadyRunning ? `QEMU pid ${started.pid} was already running` : `QEMU pid ${started.pid}`,
      };
    },

    async powerdownQemu(p: VmEffectParams) {
      try {
        const sent = await observing(() => host.qemu.powerdown(p.vmId));
        return { note: `system_powerdown: ${sent}` };
      } catch (err) {
        // QMP refused or hung: pressing the button again adds nothing, the powerdown timer escalates
        // to quit/kill. Fail at once; a failure that arrives after the VM moved on is ignored.
        if (err instanceof QemuError && err.code === 'qmp') throw new RefusedError(`system_powerdown: ${err.message}`, { cause: err });
        throw err;
      }
    },

    async powerdownTimer(p: VmEffectParams) {
      return toVm(p, { type: 'POWERDOWN_TIMEOUT' });
    },

    async terminateQemu(p: VmEffectParams) {
      const how = await observing(() => host.qemu.terminate(p.vmId));
      return toVm(p, { type: 'QEMU_EXITED', how });
    },

    async releasePartition(p: VmEffectParams, ctx: EffectContext) {
      const status = await host.qemu.status(p.vmId);
      const why = notGone(p.vmId, status, `not releasing partition ${p.partitionId}`, `QEMU of VM ${p.vmId} is still running; not releasing partition ${p.partitionId}`);
      if (why) throw new NotYetError(why);
      ctx.signal.throwIfAborted();
      await observing(() => host.qemu.cleanup(p.vmId));
      return { deliver: { streamId: partitionStream(p.hostId, p.partitionId), event: { type: 'RELEASE', vmId: p.vmId } } };
    },
  };
}
