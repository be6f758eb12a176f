/**
 * The lifecycle of one Fabric Manager partition on one host, as an operator's runbook.
 *
 *   new ──REGISTER──▶ free
 *   free ──CLAIM(vm)──▶ preparing    [prepareGpus]          GPUs on nvidia, idle, optionally reset
 *        ──GPUS_READY──▶ activating  [activatePartition]    fmpm -a ID
 *        ──ACTIVATED──▶ confirmingActive [confirmActive]    fmpm -l says isActive 1
 *        ──CONFIRMED_ACTIVE──▶ binding [bindVfio]           every function of every IOMMU group to vfio-pci
 *        ──BOUND_VFIO──▶ ready        [notifyVm READY]      the VM may start QEMU
 *   ready ──RELEASE──▶ unbinding     [bindHost]             (the VM sends RELEASE only after QEMU has exited)
 *        ──BOUND_HOST──▶ deactivating [deactivatePartition] fmpm -d ID
 *        ──DEACTIVATED──▶ confirmingInactive [confirmInactive]
 *        ──CONFIRMED_INACTIVE──▶ free [notifyVm RELEASED | FAILED]   the GPU claims are dropped
 *                              (or quarantined after the second failed cycle in a row)
 *
 * A step that fails for good (EFFECT_FAILED) during start-up unwinds through the same release path,
 * which is safe to run from any point because every handler observes before it acts. A failure while
 * releasing leaves the partition `broken`: its GPUs stay claimed until an operator repairs the host.
 * RELEASE during start-up is remembered and honoured when the step in flight completes, so a partition
 * never has two effects in flight.
 *
 * Fabric Manager does not hide a partition that keeps failing: a partition whose cycles failed twice
 * in a row ends `quarantined` instead of `free`, and is not placed on until an operator clears it.
 *
 * Drift (src/engine/reconcile.ts): when the host shows what the log says cannot be — this partition
 * active in `fmpm -l` while no VM holds it, or its GPUs on vfio-pci or on no driver — the partition
 * takes its GPUs' claims and repairs the host in the safe direction:
 *   free | quarantined ──DRIFT_DETECTED──▶ repairing [repairPartition]   once no stray QEMU lives: GPUs
 *        back to the host driver, fmpm -d, confirmed by fmpm -l
 *   new ──REGISTER(active)──▶ repairing   fmpm -l showed it active before gpuvm ever activated it
 *   ready ──DRIFT_DETECTED(vm-ended)──▶ repairing   its VM ended without releasing it (QEMU never seen
 *        gone): the repair waits for that QEMU first
 *   broken | unrepaired ──REPAIR(operator)──▶ repairing   an operator's way out
 *   repairing ──REPAIRED──▶ free (or back to quarantined)
 *            ──EFFECT_FAILED──▶ unrepaired     claims kept; the reconciler tries again on its next pass
 * A repair that ends a VM's cycle (from ready or broken: the VM id is still held) counts that cycle
 * as failed, as the release path does: the cycle did not unwind by itself, and whatever broke it is
 * not known to be fixed, so a second such cycle in a row quarantines the partition.
 *
 * EFFECT_FAILED is taken only for the effect the state waits for (its entry effect); a late failure
 * of an earlier state's effect is recorded by the engine and ignored.
 *
 * Pure: no I/O, no clock, no randomness. Effects are named actions with params.
 */
import { assign, setup } from 'xstate';

/**
 * 2: EFFECT_FAILED names its effect; REGISTER may find the partition active; ready takes vm-ended
 * drift; REPAIR; a repair ending a VM's cycle counts it as failed.
 */
export const PARTITION_MACHINE_VERSION = 2;

export interface PartitionGpu {
  moduleId: number;
  pciAddress: string;
}

export interface PartitionContext {
  hostId: string;
  partitionId: number;
  gpus: PartitionGpu[];
  /** The VM holding the claim, null when free. */
  vmId: string | null;
  releaseRequested: boolean;
  /** Why the current cycle is unwinding, null on a normal release. */
  failure: string | null;
  /** Number of claim cycles so far; part of every effect's identity in logs. */
  cycle: number;
  /** Cycles in a row that ended in a failure; reset by a good cycle or by an operator. */
  consecutiveFailures: number;
  /** The drift being repaired, null otherwise. */
  drift?: { kind: PartitionDrift; detail: string; strayQemu: string[] } | null;
}

/** Failed cycles in a row after which a partition is quarantined. */
export const PARTITION_FAILURES_BEFORE_QUARANTINE = 2;

export type PartitionEvent =
  /** `active`: fmpm -l showed it active at registration (absent in older histories: false); `strayQemu`: QEMUs alive then. */
  | { type: 'REGISTER'; hostId: string; partitionId: number; gpus: PartitionGpu[]; active?: boolean; strayQemu?: string[] }
  /**
   * `placement`: why this partition (src/engine/vms.ts): the policy, its score, the runner-up, how
   * many hosts were scored and the request mix. For the record; the machine does not read it.
   */
  | { type: 'CLAIM'; vmId: string; placement?: Record<string, unknown> }
  | { type: 'GPUS_READY' }
  | { type: 'ACTIVATED'; outcome: 'activated' | 'already-active' }
  | { type: 'CONFIRMED_ACTIVE' }
  | { type: 'BOUND_VFIO' }
  | { type: 'RELEASE'; vmId: string }
  | { type: 'BOUND_HOST' }
  | { type: 'DEACTIVATED'; outcome: 'deactivated' | 'already-inactive' }
  | { type: 'CONFIRMED_INACTIVE' }
  | { type: 'EFFECT_FAILED'; effect: string; error: string }
  | { type: 'CLEAR_QUARANTINE'; by: string }
  | { type: 'DRIFT_DETECTED'; drift: PartitionDrift; detail: string; strayQemu: string[] }
  | { type: 'REPAIRED'; actions: string[] }
  | { type: 'REPAIR'; by: string };

/** What the reconciler saw on the host that the log says cannot be. */
export type PartitionDrift =
  /** `fmpm -l` shows the partition active; no VM holds it. */
  | 'active-without-owner'
  /** One of its GPUs is on vfio-pci, or on no driver, while no VM holds it. */
  | 'gpu-off-host-driver'
  /** A repair failed earlier; the reconciler tries again. */
  | 'repair-retry'
  /** Ready under a VM the log shows ended (or does not know): nothing will release it. */
  | 'vm-ended'
  /** `fmpm -l` showed it active when the host was registered: gpuvm never activated it. */
  | 'active-at-registration'
  /** An operator asked for a repair of a broken or unrepaired partition. */
  | 'operator-repair';

/** Params every partition effect carries: enough for a handler to act without reading the log. */
export interface PartitionEffectParams {
  hostId: string;
  partitionId: number;
  vmId: string;
  gpus: PartitionGpu[];
}

/** A drift repair: the partition's GPUs, and the stray QEMU processes to wait for before touching them. */
export interface RepairParams {
  hostId: string;
  partitionId: number;
  gpus: PartitionGpu[];
  strayQemu: string[];
  drift: PartitionDrift;
}

export type VmNotice = 'PARTITION_READY' | 'PARTITION_RELEASED' | 'PARTITION_FAILED';

/** The params of a notifyVm effect: the partition's, and what the VM is told. */
export type NotifyVmParams = PartitionEffectParams & { notice: VmNotice; reason: string | null };

/** The event a notifyVm effect delivers to the VM's stream. */
export function vmNoticeEvent(p: NotifyVmParams): { type: 'PARTITION_READY' | 'PARTITION_RELEASED' } | { type: 'PARTITION_FAILED'; reason: string } {
  return p.notice === 'PARTITION_FAILED' ? { type: p.notice, reason: p.reason ?? 'unknown' } : { type: p.notice };
}

const effectParams = ({ context }: { context: PartitionContext }): PartitionEffectParams => ({
  hostId: context.hostId,
  partitionId: context.partitionId,
  vmId: context.vmId!,
  gpus: context.gpus,
});

/** The VM learns how its partition's cycle ended: released, or failed with the reason. */
const notifyEndOfCycle = {
  type: 'notifyVm' as const,
  params: ({ context }: { context: PartitionContext }) => ({
    ...effectParams({ context }),
    notice: context.failure ? ('PARTITION_FAILED' as const) : ('PARTITION_RELEASED' as const),
    reason: context.failure,
  }),
};

export const partitionMachine = setup({
  types: {} as { context: PartitionContext; events: PartitionEvent },
  actions: {
    // Effects: declared here, executed by the engine's workers (src/engine/handlers.ts).
    prepareGpus: (_, _params: PartitionEffectParams) => {},
    activatePartition: (_, _params: PartitionEffectParams) => {},
    confirmActive: (_, _params: PartitionEffectParams) => {},
    bindVfio: (_, _params: PartitionEffectParams) => {},
    bindHost: (_, _params: PartitionEffectParams) => {},
    deactivatePartition: (_, _params: PartitionEffectParams) => {},
    confirmInactive: (_, _params: PartitionEffectParams) => {},
    notifyVm: (_, _params: NotifyVmParams) => {},
    repairPartition: (_, _params: RepairParams) => {},
    rememberRelease: assign({ releaseRequested: true }),
    endCycle: assign(({ context }) => ({
      vmId: null,
      releaseRequested: false,
      consecutiveFailures: context.failure ? context.consecutiveFailures + 1 : 0,
    })),
    recordDrift: assign({
      drift: ({ event }) => (event.type === 'DRIFT_DETECTED' ? { kind: event.drift, detail: event.detail, strayQemu: event.strayQemu } : null),
    }),
    /** An operator's repair waits for the holding VM's QEMU, and any the last drift named, to be gone. */
    recordOperatorRepair: assign({
      drift: ({ context, event }) => ({
        kind: 'operator-repair' as const,
        detail: `repair requested by ${event.type === 'REPAIR' ? event.by : 'an operator'}`,
        strayQemu: [...new Set([...(context.vmId ? [context.vmId] : []), ...(context.drift?.strayQemu ?? [])])],
      }),
    }),
    /** Ends the VM's cycle a repair finished: it failed, and counts toward quarantine. */
    endRepairedCycle: assign(({ context }) => ({
      vmId: null,
      releaseRequested: false,
      failure: null,
      drift: null,
      consecutiveFailures: context.consecutiveFailures + 1,
    })),
    recordFailure: assign({
      failure: ({ event }) => (event.type === 'EFFECT_FAILED' ? `${event.effect}: ${event.error}` : null),
    }),
  },
  guards: {
    releaseRequested: ({ context }) => context.releaseRequested,
    claimantIsHolder: ({ context, event }) => event.type === 'RELEASE' && event.vmId === context.vmId,
    failedTooOften: ({ context }) => context.failure !== null && context.consecutiveFailures + 1 >= PARTITION_FAILURES_BEFORE_QUARANTINE,
    // Quarantine is only ever left through CLEAR_QUARANTINE, which resets the count.
    wasQuarantined: ({ context }) => context.consecutiveFailures >= PARTITION_FAILURES_BEFORE_QUARANTINE,
    /** EFFECT_FAILED of the effect this state waits for; a late failure of an earlier one is not taken. */
    effectFailed: ({ event }, effect: string) => event.type === 'EFFECT_FAILED' && event.effect === effect,
    activeAtRegistration: ({ event }) => event.type === 'REGISTER' && event.active === true,
    vmEnded: ({ event }) => event.type === 'DRIFT_DETECTED' && event.drift === 'vm-ended',
    repairEndsCycle: ({ context }) => context.vmId !== null,
    repairEndsCycleTooOften: ({ context }) => context.vmId !== null && context.consecutiveFailures + 1 >= PARTITION_FAILURES_BEFORE_QUARANTINE,
  },
}).createMachine({
  id: 'partition',
  initial: 'new',
  context: { hostId: '', partitionId: -1, gpus: [], vmId: null, releaseRequested: false, failure: null, cycle: 0, consecutiveFailures: 0 },
  // RELEASE from the holding VM while a step is in flight is remembered and honoured when it
  // completes, so a partition never has two effects in flight. Unheld states refuse it: no holder.
  on: { RELEASE: { guard: 'claimantIsHolder', actions: 'rememberRelease' } },
  states: {
    new: {
      on: {
        REGISTER: [
          {
            // Active before gpuvm ever activated it: hold its GPUs' claims and repair it first.
            guard: 'activeAtRegistration',
            target: 'repairing',
            actions: assign(({ event }) => ({
              hostId: event.hostId,
              partitionId: event.partitionId,
              gpus: event.gpus,
              drift: { kind: 'active-at-registration' as const, detail: `partition ${event.partitionId} was active in fmpm -l at registration`, strayQemu: event.strayQemu ?? [] },
            })),
          },
          {
            target: 'free',
            actions: assign(({ event }) => ({
              hostId: event.hostId,
              partitionId: event.partitionId,
              gpus: event.gpus,
            })),
          },
        ],
      },
    },

    free: {
      on: {
        CLAIM: {
          target: 'preparing',
          actions: assign(({ context, event }) => ({
            vmId: event.vmId,
            releaseRequested: false,
            failure: null,
            cycle: context.cycle + 1,
          })),
        },
        DRIFT_DETECTED: { target: 'repairing', actions: 'recordDrift' },
      },
    },

    // ── start-up: each step has one effect in flight; RELEASE is remembered, failures unwind ──
    preparing: {
      entry: { type: 'prepareGpus', params: effectParams },
      on: {
        GPUS_READY: [{ guard: 'releaseRequested', target: 'unbinding' }, { target: 'activating' }],
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'prepareGpus' }, target: 'unbinding', actions: 'recordFailure' },
      },
    },
    activating: {
      entry: { type: 'activatePartition', params: effectParams },
      on: {
        ACTIVATED: [{ guard: 'releaseRequested', target: 'unbinding' }, { target: 'confirmingActive' }],
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'activatePartition' }, target: 'unbinding', actions: 'recordFailure' },
      },
    },
    confirmingActive: {
      entry: { type: 'confirmActive', params: effectParams },
      on: {
        CONFIRMED_ACTIVE: [{ guard: 'releaseRequested', target: 'unbinding' }, { target: 'binding' }],
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'confirmActive' }, target: 'unbinding', actions: 'recordFailure' },
      },
    },
    binding: {
      entry: { type: 'bindVfio', params: effectParams },
      on: {
        BOUND_VFIO: [{ guard: 'releaseRequested', target: 'unbinding' }, { target: 'ready' }],
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'bindVfio' }, target: 'unbinding', actions: 'recordFailure' },
      },
    },

    ready: {
      entry: {
        type: 'notifyVm',
        params: ({ context }) => ({ ...effectParams({ context }), notice: 'PARTITION_READY' as const, reason: null }),
      },
      on: {
        RELEASE: { guard: 'claimantIsHolder', target: 'unbinding', actions: 'rememberRelease' },
        // Its VM ended without releasing it: repair, holding the claims, once that VM's QEMU is gone.
        DRIFT_DETECTED: { guard: 'vmEnded', target: 'repairing', actions: 'recordDrift' },
      },
    },

    // ── release: the same path serves a normal release and an unwind after a failure ──
    unbinding: {
      entry: { type: 'bindHost', params: effectParams },
      on: {
        BOUND_HOST: { target: 'deactivating' },
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'bindHost' }, target: 'broken', actions: 'recordFailure' },
      },
    },
    deactivating: {
      entry: { type: 'deactivatePartition', params: effectParams },
      on: {
        DEACTIVATED: { target: 'confirmingInactive' },
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'deactivatePartition' }, target: 'broken', actions: 'recordFailure' },
      },
    },
    confirmingInactive: {
      entry: { type: 'confirmInactive', params: effectParams },
      on: {
        CONFIRMED_INACTIVE: [
          { guard: 'failedTooOften', target: 'quarantined', actions: [notifyEndOfCycle, 'endCycle'] },
          { target: 'free', actions: [notifyEndOfCycle, 'endCycle'] },
        ],
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'confirmInactive' }, target: 'broken', actions: 'recordFailure' },
      },
    },

    /** Failed too often: unclaimed, inactive, and never placed on until an operator clears it. */
    quarantined: {
      on: {
        CLEAR_QUARANTINE: { target: 'free', actions: assign({ consecutiveFailures: 0, failure: null }) },
        DRIFT_DETECTED: { target: 'repairing', actions: 'recordDrift' },
      },
    },

    // ── drift repair: the claims keep placement off these GPUs meanwhile ──
    repairing: {
      entry: {
        type: 'repairPartition',
        params: ({ context }) => ({
          hostId: context.hostId,
          partitionId: context.partitionId,
          gpus: context.gpus,
          strayQemu: context.drift?.strayQemu ?? [],
          drift: context.drift?.kind ?? ('repair-retry' as const),
        }),
      },
      on: {
        REPAIRED: [
          { guard: 'repairEndsCycleTooOften', target: 'quarantined', actions: 'endRepairedCycle' },
          { guard: 'repairEndsCycle', target: 'free', actions: 'endRepairedCycle' },
          { guard: 'wasQuarantined', target: 'quarantined', actions: assign({ drift: null }) },
          { target: 'free', actions: assign({ drift: null, failure: null }) },
        ],
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'repairPartition' }, target: 'unrepaired', actions: 'recordFailure' },
      },
    },
    /** A repair failed for good: the claims stay so nothing is placed on a host in an unknown state. */
    unrepaired: {
      on: {
        DRIFT_DETECTED: { target: 'repairing', actions: 'recordDrift' },
        REPAIR: { target: 'repairing', actions: 'recordOperatorRepair' },
      },
    },

    /** Release failed for good: the claim stays so nothing is placed on these GPUs; an operator must act. */
    broken: {
      entry: {
        type: 'notifyVm',
        params: ({ context }) => ({ ...effectParams({ context }), notice: 'PARTITION_FAILED' as const, reason: context.failure }),
      },
      on: {
        REPAIR: { target: 'repairing', actions: 'recordOperatorRepair' },
      },
    },
  },
});

/** States in which the partition holds its GPU claims. */
export function partitionHoldsClaim(state: string): boolean {
  return state !== 'new' && state !== 'free' && state !== 'quarantined';
}
