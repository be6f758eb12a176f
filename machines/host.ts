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
}

export type HostEvent =
  | { type: 'REGISTER'; hostId: string; simulated: boolean; inventory: HostInventory }
  | { type: 'GPU_UNHEALTHY'; moduleId: number; pciAddress: string; source: string; reason: string }
  | { type: 'CLEAR_QUARANTINE'; moduleId: number | null; by: string }
  | { type: 'FABRIC_MANAGER_RESTARTED'; activatedList: number[] };

export const hostMachine = setup({
  types: {} as { context: HostContext; events: HostEvent },
  guards: {
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
