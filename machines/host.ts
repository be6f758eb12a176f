/**
 * A host as gpuvm knows it: registered once with its inventory (module → PCI address, partition
 * table), taken while the GPUs rest on `nvidia`; then the health of its GPUs. A GPU with an Xid in
 * the kernel log or a failed fabric state is quarantined: no partition containing it is placed on
 * until an operator clears it.
 *
 *   new ──REGISTER──▶ registered
 *   registered: GPU_UNHEALTHY(module) quarantines the module (once; a repeat changes nothing)
 *               CLEAR_QUARANTINE(module | all) returns modules to service
 *               FABRIC_MANAGER_RESTARTED(list) records the activated list gpuvm gave a restarted
 *               Fabric Manager from its own log
 *               DRIFT_DETECTED(kind) records what the reconciler found on the host that no partition
 *               can repair; a QEMU that belongs to no VM is stopped [stopStrayQemu] → STRAY_QEMU_STOPPED
 *               (or EFFECT_FAILED, kept on the record)
 */
import { assign, setup } from 'xstate';

export const HOST_MACHINE_VERSION = 1;

export interface HostInventory {
  board: string;
  gpus: { moduleId: number; pciAddress: string; [key: string]: unknown }[];
  partitions: { id: number; modules: number[] }[];
}

export interface Quarantine {
  reason: string;
  /** What saw it: 'xid', 'fabric', or an operator. */
  source: string;
}

export interface HostContext {
  hostId: string;
  simulated: boolean;
  inventory: HostInventory | null;
  /** Module id (as a string key, for JSON) → why it is out of service. */
  quarantinedModules: Record<string, Quarantine>;
  /** Fabric Manager restarts answered with `--set-activated-list`, and the last list given. */
  fabricManagerRestarts: number;
  lastActivatedList: number[] | null;
  /** Drift events recorded on this stream (absent in histories from before reconciliation). */
  driftsDetected?: number;
  lastStrayQemuStopped?: string;
  /** The last host-level effect that failed for good (a stray QEMU that would not stop). */
  lastEffectFailure?: string;
}

export type HostEvent =
  | { type: 'REGISTER'; hostId: string; simulated: boolean; inventory: HostInventory }
  | { type: 'GPU_UNHEALTHY'; moduleId: number; pciAddress: string; source: string; reason: string }
  | { type: 'CLEAR_QUARANTINE'; moduleId: number | null; by: string }
  | { type: 'FABRIC_MANAGER_RESTARTED'; activatedList: number[] }
  | { type: 'DRIFT_DETECTED'; drift: HostDrift; detail: string; vmId: string | null; partitionId: number | null }
  | { type: 'STRAY_QEMU_STOPPED'; vmId: string; how: string }
  | { type: 'EFFECT_FAILED'; effect: string; error: string };

/** Drift the host stream records (partition drift goes to the partition's own stream). */
export type HostDrift =
  /** A live QEMU whose VM is unknown or has ended: stopped. */
  | 'qemu-without-vm'
  /** A partition under a VM that `fmpm -l` shows inactive: reported for an operator. */
  | 'partition-inactive-under-vm'
  /** A GPU of a VM's ready partition not on vfio-pci: reported for an operator. */
  | 'gpu-not-on-vfio-under-vm'
  /** Drift a partition could not take up (its GPUs are claimed meanwhile, or no free partition holds them). */
  | 'unrepairable';

export interface StopStrayQemuParams {
  hostId: string;
  vmId: string;
}

export const hostMachine = setup({
  types: {} as { context: HostContext; events: HostEvent },
  actions: {
    // Effects: declared here, executed by the engine's workers (src/engine/handlers.ts).
    stopStrayQemu: (_, _params: StopStrayQemuParams) => {},
    countDrift: assign({ driftsDetected: ({ context }) => (context.driftsDetected ?? 0) + 1 }),
  },
  guards: {
    stopStrayQemuFailed: ({ event }) => event.type === 'EFFECT_FAILED' && event.effect === 'stopStrayQemu',
    strayQemu: ({ event }) => event.type === 'DRIFT_DETECTED' && event.drift === 'qemu-without-vm' && event.vmId !== null,
    notYetQuarantined: ({ context, event }) => event.type === 'GPU_UNHEALTHY' && !(String(event.moduleId) in context.quarantinedModules),
    somethingToClear: ({ context, event }) =>
      event.type === 'CLEAR_QUARANTINE' &&
      (event.moduleId === null ? Object.keys(context.quarantinedModules).length > 0 : String(event.moduleId) in context.quarantinedModules),
  },
}).createMachine({
  id: 'host',
  initial: 'new',
  context: { hostId: '', simulated: false, inventory: null, quarantinedModules: {}, fabricManagerRestarts: 0, lastActivatedList: null },
  states: {
    new: {
      on: {
        REGISTER: {
          target: 'registered',
          actions: assign(({ event }) => ({ hostId: event.hostId, simulated: event.simulated, inventory: event.inventory })),
        },
      },
    },
    registered: {
      on: {
        GPU_UNHEALTHY: {
          guard: 'notYetQuarantined',
          actions: assign({
            quarantinedModules: ({ context, event }) => ({
              ...context.quarantinedModules,
              [String(event.moduleId)]: { reason: event.reason, source: event.source },
            }),
          }),
        },
        FABRIC_MANAGER_RESTARTED: {
          actions: assign({
            fabricManagerRestarts: ({ context }) => context.fabricManagerRestarts + 1,
            lastActivatedList: ({ event }) => event.activatedList,
          }),
        },
        DRIFT_DETECTED: [
          {
            guard: 'strayQemu',
            actions: [
              'countDrift',
              { type: 'stopStrayQemu', params: ({ context, event }) => ({ hostId: context.hostId, vmId: event.type === 'DRIFT_DETECTED' ? event.vmId! : '' }) },
            ],
          },
          { actions: 'countDrift' },
        ],
        // The repair's outcome, on the record next to the drift that asked for it.
        STRAY_QEMU_STOPPED: { actions: assign({ lastStrayQemuStopped: ({ event }) => event.vmId }) },
        // On the record for the operator; the reconciler's next pass finds the QEMU again and retries.
        EFFECT_FAILED: { guard: 'stopStrayQemuFailed', actions: assign({ lastEffectFailure: ({ event }) => `${event.effect}: ${event.error}` }) },
        CLEAR_QUARANTINE: {
          guard: 'somethingToClear',
          actions: assign({
            quarantinedModules: ({ context, event }) =>
              event.moduleId === null
                ? {}
                : Object.fromEntries(Object.entries(context.quarantinedModules).filter(([m]) => m !== String(event.moduleId))),
          }),
        },
      },
    },
  },
});
