/**
 * The lifecycle of one GPU VM, as an operator's runbook.
 *
 *   new ──CREATE──▶ provisioning           the partition was claimed in the same statement; wait for it
 *   provisioning ──PARTITION_READY──▶ starting [startQemu]
 *   starting ──QEMU_STARTED──▶ running
 *   running ──DELETE──▶ stopping            [powerdownQemu, powerdownTimer]   ACPI power button, then wait
 *   stopping ──QEMU_EXITED──▶ releasing     [releasePartition]   the powerdown timer ends with `stopping`: cancelled
 *            ──POWERDOWN_TIMEOUT──▶ terminating [terminateQemu]   quit → SIGTERM → SIGKILL
 *   terminating ──QEMU_EXITED──▶ releasing  [releasePartition]
 *   releasing ──PARTITION_RELEASED──▶ deleted | crashed | failed
 *
 * Failure paths: the partition could not be prepared → `failed` with its reason (the partition has
 * already unwound itself); QEMU could not start → terminate whatever started, release, `failed`;
 * QEMU dies on its own while running → release, `crashed`. `failed` and `crashed` keep the record
 * (resources returned, unless a release gave up: see below) until DELETE. DELETE is accepted in every state but `deleted`; where a step
 * is in flight it is remembered and honoured when the step completes.
 *
 * EFFECT_FAILED is taken only for the effect the state waits for: a late failure of an earlier
 * state's effect (a powerdown whose QMP hung past the timer) is recorded by the engine and ignored.
 *
 *   terminating ──EFFECT_FAILED(terminateQemu)──▶ stopFailed   QEMU would not die, or could not be seen
 *        gone: the partition stays held, since a live QEMU may still use its GPUs
 *   stopFailed ──QEMU_EXITED──▶ releasing   the QEMU monitor saw the process gone
 *              ──DELETE──▶ terminating      an operator's retry
 *   releasing ──EFFECT_FAILED(releasePartition)──▶ deleted | failed   the QEMU was never seen gone; the
 *        partition is left `ready` under an ended VM, which the reconciler repairs (machines/partition.ts)
 *
 * Pure: no I/O, no clock, no randomness. Effects are named actions with params.
 */
import { assign, setup } from 'xstate';
import type { PartitionGpu } from './partition.ts';

/**
 * 2: EFFECT_FAILED names its effect (a stale one is refused); terminateQemu failing for good goes to
 * `stopFailed`, not `failed`; releasing takes releasePartition failing for good.
 */
export const VM_MACHINE_VERSION = 2;

export interface VmContext {
  vmId: string;
  name: string;
  hostId: string;
  gpuCount: number;
  partitionId: number;
  /** The partition's GPUs in module order: the order they appear in the guest. */
  gpus: PartitionGpu[];
  memoryMiB: number;
  vcpus: number;
  powerdownTimeoutMs: number;
  deleteRequested: boolean;
  /** How the VM ends once its partition is returned, when no DELETE says otherwise. */
  outcome: 'deleted' | 'failed' | 'crashed';
  reason: string | null;
  qemuPid: number | null;
}

export type VmEvent =
  | {
      type: 'CREATE';
      vmId: string;
      name: string;
      hostId: string;
      partitionId: number;
      gpus: PartitionGpu[];
      memoryMiB: number;
      vcpus: number;
      powerdownTimeoutMs: number;
    }
  | { type: 'DELETE' }
  | { type: 'PARTITION_READY' }
  | { type: 'PARTITION_RELEASED' }
  | { type: 'PARTITION_FAILED'; reason: string }
  | { type: 'QEMU_STARTED'; pid: number }
  | { type: 'QEMU_EXITED'; how: string }
  | { type: 'POWERDOWN_TIMEOUT' }
  | { type: 'EFFECT_FAILED'; effect: string; error: string };

export interface VmEffectParams {
  hostId: string;
  vmId: string;
  partitionId: number;
}

export interface StartQemuParams extends VmEffectParams {
  gpus: PartitionGpu[];
  memoryMiB: number;
  vcpus: number;
}

const vmParams = ({ context }: { context: VmContext }): VmEffectParams => ({
  hostId: context.hostId,
  vmId: context.vmId,
  partitionId: context.partitionId,
});

const stopEffects = [
  { type: 'powerdownQemu' as const, params: vmParams },
  {
    type: 'powerdownTimer' as const,
    params: ({ context }: { context: VmContext }) => ({ ...vmParams({ context }), delayMs: context.powerdownTimeoutMs }),
  },
];

export const vmMachine = setup({
  types: {} as { context: VmContext; events: VmEvent },
  actions: {
    // Effects: declared here, executed by the engine's workers (src/engine/handlers.ts).
    startQemu: (_, _params: StartQemuParams) => {},
    powerdownQemu: (_, _params: VmEffectParams) => {},
    /** A durable timer: the engine delivers POWERDOWN_TIMEOUT after delayMs. */
    powerdownTimer: (_, _params: VmEffectParams & { delayMs: number }) => {},
    terminateQemu: (_, _params: VmEffectParams) => {},
    releasePartition: (_, _params: VmEffectParams) => {},
    rememberDelete: assign({ deleteRequested: true }),
    recordPartitionLeftHeld: assign({
      reason: ({ context, event }) =>
        `${event.type === 'EFFECT_FAILED' ? `${event.effect}: ${event.error}` : 'release failed'}; partition ${context.partitionId} is left held for a repair`,
    }),
  },
  guards: {
    deleteRequested: ({ context }) => context.deleteRequested,
    deleteNotYetRequested: ({ context }) => !context.deleteRequested,
    /** EFFECT_FAILED of the effect this state waits for; a late failure of an earlier one is not taken. */
    effectFailed: ({ event }, effect: string) => event.type === 'EFFECT_FAILED' && event.effect === effect,
    releaseGaveUpAfterDelete: ({ context, event }) => context.deleteRequested && event.type === 'EFFECT_FAILED' && event.effect === 'releasePartition',
  },
}).createMachine({
  id: 'vm',
  initial: 'new',
  context: {
    vmId: '',
    name: '',
    hostId: '',
    gpuCount: 0,
    partitionId: -1,
    gpus: [],
    memoryMiB: 0,
    vcpus: 0,
    powerdownTimeoutMs: 0,
    deleteRequested: false,
    outcome: 'deleted',
    reason: null,
    qemuPid: null,
  },
  // A DELETE while a step is in flight is remembered and honoured when it completes; states that act
  // on DELETE at once say so themselves.
  on: { DELETE: { guard: 'deleteNotYetRequested', actions: 'rememberDelete' } },
  states: {
    new: {
      on: {
        DELETE: undefined,
        CREATE: {
          target: 'provisioning',
          actions: assign(({ event }) => ({
            vmId: event.vmId,
            name: event.name,
            hostId: event.hostId,
            gpuCount: event.gpus.length,
            partitionId: event.partitionId,
            gpus: event.gpus,
            memoryMiB: event.memoryMiB,
            vcpus: event.vcpus,
            powerdownTimeoutMs: event.powerdownTimeoutMs,
          })),
        },
      },
    },

    provisioning: {
      on: {
        PARTITION_READY: { target: 'starting' },
        PARTITION_FAILED: {
          target: 'failed',
          actions: assign({ outcome: 'failed', reason: ({ event }) => event.reason }),
        },
        DELETE: { target: 'releasing', actions: 'rememberDelete' },
      },
    },

    starting: {
      entry: {
        type: 'startQemu',
        params: ({ context }) => ({
          ...vmParams({ context }),
          gpus: context.gpus,
          memoryMiB: context.memoryMiB,
          vcpus: context.vcpus,
        }),
      },
      on: {
        QEMU_STARTED: [
          { guard: 'deleteRequested', target: 'stopping', actions: assign({ qemuPid: ({ event }) => event.pid }) },
          { target: 'running', actions: assign({ qemuPid: ({ event }) => event.pid }) },
        ],
        EFFECT_FAILED: {
          guard: { type: 'effectFailed', params: 'startQemu' },
          target: 'terminating',
          actions: assign({ outcome: 'failed', reason: ({ event }) => `${event.effect}: ${event.error}` }),
        },
      },
    },

    running: {
      on: {
        DELETE: { target: 'stopping', actions: 'rememberDelete' },
        QEMU_EXITED: {
          target: 'releasing',
          actions: assign({ outcome: 'crashed', reason: ({ event }) => `QEMU exited on its own (${event.how})` }),
        },
      },
    },

    stopping: {
      entry: stopEffects,
      on: {
        QEMU_EXITED: { target: 'releasing' },
        POWERDOWN_TIMEOUT: { target: 'terminating' },
        // system_powerdown failing is not fatal: the timer still escalates to quit/kill.
        EFFECT_FAILED: { guard: { type: 'effectFailed', params: 'powerdownQemu' }, target: 'terminating' },
      },
    },

    terminating: {
      entry: { type: 'terminateQemu', params: vmParams },
      on: {
        QEMU_EXITED: { target: 'releasing' },
        EFFECT_FAILED: {
          // The process could not be stopped: do not release GPUs a live QEMU may still hold.
          guard: { type: 'effectFailed', params: 'terminateQemu' },
          target: 'stopFailed',
          actions: assign({ outcome: 'failed', reason: ({ event }) => `${event.effect}: ${event.error}` }),
        },
      },
    },

    /** QEMU may still live: the partition stays held until the monitor sees the process gone, or an operator retries. */
    stopFailed: {
      on: {
        QEMU_EXITED: { target: 'releasing' },
        DELETE: { target: 'terminating', actions: 'rememberDelete' },
      },
    },

    releasing: {
      entry: { type: 'releasePartition', params: vmParams },
      on: {
        PARTITION_RELEASED: [
          { guard: 'deleteRequested', target: 'deleted' },
          { guard: ({ context }) => context.outcome === 'crashed', target: 'crashed' },
          { guard: ({ context }) => context.outcome === 'failed', target: 'failed' },
          { target: 'deleted' },
        ],
        PARTITION_FAILED: [
          {
            guard: 'deleteRequested',
            target: 'deleted',
            actions: assign({ reason: ({ event }) => `partition release failed: ${event.reason}` }),
          },
          { target: 'failed', actions: assign({ outcome: 'failed', reason: ({ event }) => event.reason }) },
        ],
        // The engine waited long and never saw QEMU gone: end the VM, but leave its partition held;
        // the reconciler finds a ready partition under an ended VM and repairs it once QEMU is gone.
        EFFECT_FAILED: [
          { guard: 'releaseGaveUpAfterDelete', target: 'deleted', actions: 'recordPartitionLeftHeld' },
          { guard: { type: 'effectFailed', params: 'releasePartition' }, target: 'failed', actions: ['recordPartitionLeftHeld', assign({ outcome: 'failed' })] },
        ],
      },
    },

    /**
     * The record stays for the operator until DELETE. The partition was returned, or (after
     * releasePartition failed for good) is left held for the reconciler's repair, as the reason says.
     */
    failed: { on: { DELETE: { target: 'deleted', actions: 'rememberDelete' } } },
    crashed: { on: { DELETE: { target: 'deleted', actions: 'rememberDelete' } } },
    // Final; the root's DELETE does not reach it: deleting twice is refused.
    deleted: { type: 'final', on: { DELETE: undefined } },
  },
});

/** Commands an operator (API/CLI) may send; everything else is delivered by effects. */
export const VM_COMMANDS = ['DELETE'] as const;

/** VM states in which its QEMU may be alive: being started, running, being stopped, or refusing to stop. */
export function qemuMayLive(state: string): boolean {
  return state === 'starting' || state === 'running' || state === 'stopping' || state === 'terminating' || state === 'stopFailed';
}

/**
 * VM states past the end of its QEMU (states never lead back to `starting`): a QEMU still alive for
 * such a VM, or for a VM the log does not know, belongs to nobody.
 */
export function qemuHasEnded(state: string): boolean {
  return state === 'releasing' || state === 'failed' || state === 'crashed' || state === 'deleted';
}
