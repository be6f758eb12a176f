/**
 * A host as gpuvm knows it: its inventory (module → PCI address, partition table), taken once while
 * the GPUs rest on `nvidia`; the health of its GPUs; and its place in the fleet — whether new VMs may
 * be placed on it — as an operator and its agent decide.
 *
 *   new ──REGISTER──▶ registered ──READY──▶ ready ⇄ cordoned        (CORDON / UNCORDON)
 *   registered: the inventory is recorded; the agent has not yet judged the host against the log
 *               (its first reconciliation). READY: it has; VMs may be placed.
 *   ready | cordoned ──DRAIN──▶ draining ──DRAINED──▶ maintenance ──UNCORDON──▶ ready
 *               draining: no new VMs; waiting for the host's VMs to end (with deleteVms, the drain
 *               asked for their deletion). GPU VMs cannot live-migrate: a drain ends them or waits.
 *               DRAINED: the last of them ended. UNCORDON from draining calls the drain off.
 *   any of these ──REMOVE──▶ removed   (only an empty host: no VM, no claimed GPU; checked by the command)
 *
 * In every state but new and removed:
 *   AGENT_SILENT: no heartbeat from the host's agent past the limit (seen by an API node): nothing is
 *               placed here and its VMs show `unknown`; AGENT_BACK: the agent returned and reconciled.
 *   GPU_UNHEALTHY(module) quarantines the module (once; a repeat changes nothing);
 *   CLEAR_QUARANTINE(module | all) returns modules to service;
 *   FABRIC_MANAGER_RESTARTED(list) records the activated list gpuvm gave a restarted Fabric Manager;
 *   DRIFT_DETECTED(kind) records what the reconciler found that no partition can repair; a QEMU that
 *   belongs to no VM is stopped [stopStrayQemu] → STRAY_QEMU_STOPPED (or EFFECT_FAILED, on the record).
 */
import { assign, setup } from 'xstate';

export const HOST_MACHINE_VERSION = 2;

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
  /** When an API node found the agent silent (its last heartbeat); null once it is back (absent before version 2). */
  silentSince?: string | null;
  /** Who cordoned or drained the host and why, while it is not ready. */
  cordon?: { by: string; reason: string | null; drain: boolean; deleteVms: boolean } | null;
}

export type HostEvent =
  | { type: 'REGISTER'; hostId: string; simulated: boolean; inventory: HostInventory }
  | { type: 'GPU_UNHEALTHY'; moduleId: number; pciAddress: string; source: string; reason: string }
  | { type: 'CLEAR_QUARANTINE'; moduleId: number | null; by: string }
  | { type: 'FABRIC_MANAGER_RESTARTED'; activatedList: number[] }
  | { type: 'DRIFT_DETECTED'; drift: HostDrift; detail: string; vmId: string | null; partitionId: number | null }
  | { type: 'STRAY_QEMU_STOPPED'; vmId: string; how: string }
  | { type: 'EFFECT_FAILED'; effect: string; error: string }
  | { type: 'READY' }
  | { type: 'CORDON'; by: string; reason: string | null }
  | { type: 'UNCORDON'; by: string }
  | { type: 'DRAIN'; by: string; reason: string | null; deleteVms: boolean }
  | { type: 'DRAINED' }
  | { type: 'REMOVE'; by: string }
  | { type: 'AGENT_SILENT'; lastHeartbeat: string; limitMs: number }
  | { type: 'AGENT_BACK'; epoch: number };

/** The states in which new VMs may be placed (with a live, judged agent: src/engine/placement-query.ts). */
export const PLACEABLE_HOST_STATES = ['ready'] as const;

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
    recordCordon: assign({
      cordon: ({ event }) =>
        event.type === 'CORDON' ? { by: event.by, reason: event.reason, drain: false, deleteVms: false }
        : event.type === 'DRAIN' ? { by: event.by, reason: event.reason, drain: true, deleteVms: event.deleteVms }
        : null,
    }),
    clearCordon: assign({ cordon: null }),
  },
  guards: {
    registered: ({ context }) => context.inventory !== null,
    stopStrayQemuFailed: ({ context, event }) => context.inventory !== null && event.type === 'EFFECT_FAILED' && event.effect === 'stopStrayQemu',
    strayQemu: ({ context, event }) => context.inventory !== null && event.type === 'DRIFT_DETECTED' && event.drift === 'qemu-without-vm' && event.vmId !== null,
    notYetQuarantined: ({ context, event }) => context.inventory !== null && event.type === 'GPU_UNHEALTHY' && !(String(event.moduleId) in context.quarantinedModules),
    somethingToClear: ({ context, event }) =>
      event.type === 'CLEAR_QUARANTINE' &&
      (event.moduleId === null ? Object.keys(context.quarantinedModules).length > 0 : String(event.moduleId) in context.quarantinedModules),
    notSilent: ({ context }) => context.inventory !== null && !context.silentSince,
    silent: ({ context }) => context.inventory !== null && !!context.silentSince,
  },
}).createMachine({
  id: 'host',
  initial: 'new',
  context: { hostId: '', simulated: false, inventory: null, quarantinedModules: {}, fabricManagerRestarts: 0, lastActivatedList: null },
  // What every registered host takes, whatever the operator has made of it.
  on: {
    AGENT_SILENT: { guard: 'notSilent', actions: assign({ silentSince: ({ event }) => event.lastHeartbeat }) },
    AGENT_BACK: { guard: 'silent', actions: assign({ silentSince: null }) },
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
      guard: 'registered',
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
      { guard: 'registered', actions: 'countDrift' },
    ],
    // The repair's outcome, on the record next to the drift that asked for it.
    STRAY_QEMU_STOPPED: { guard: 'registered', actions: assign({ lastStrayQemuStopped: ({ event }) => event.vmId }) },
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
        READY: 'ready',
        CORDON: { target: 'cordoned', actions: 'recordCordon' },
        DRAIN: { target: 'draining', actions: 'recordCordon' },
        REMOVE: 'removed',
      },
    },
    ready: {
      on: {
        CORDON: { target: 'cordoned', actions: 'recordCordon' },
        DRAIN: { target: 'draining', actions: 'recordCordon' },
        REMOVE: 'removed',
      },
    },
    cordoned: {
      on: {
        UNCORDON: { target: 'ready', actions: 'clearCordon' },
        DRAIN: { target: 'draining', actions: 'recordCordon' },
        REMOVE: 'removed',
      },
    },
    draining: {
      on: {
        DRAINED: 'maintenance',
        UNCORDON: { target: 'ready', actions: 'clearCordon' },
      },
    },
    maintenance: {
      on: {
        UNCORDON: { target: 'ready', actions: 'clearCordon' },
        REMOVE: 'removed',
      },
    },
    removed: { type: 'final' },
  },
});
