/**
 * A host as gpuvm knows it: registered once with its inventory (module → PCI address, partition table),
 * taken while the GPUs rest on `nvidia`. Later issues add health and quarantine here.
 */
import { assign, setup } from 'xstate';

export const HOST_MACHINE_VERSION = 1;

export interface HostInventory {
  board: string;
  gpus: { moduleId: number; pciAddress: string }[];
  partitions: { id: number; modules: number[] }[];
}

export interface HostContext {
  hostId: string;
  simulated: boolean;
  inventory: HostInventory | null;
}

export type HostEvent = { type: 'REGISTER'; hostId: string; simulated: boolean; inventory: HostInventory };

export const hostMachine = setup({
  types: {} as { context: HostContext; events: HostEvent },
}).createMachine({
  id: 'host',
  initial: 'new',
  context: { hostId: '', simulated: false, inventory: null },
  states: {
    new: {
      on: {
        REGISTER: {
          target: 'registered',
          actions: assign(({ event }) => ({ hostId: event.hostId, simulated: event.simulated, inventory: event.inventory })),
        },
      },
    },
    registered: {},
  },
});
