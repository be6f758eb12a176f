/** The machines by stream kind. A stream id is `<kind>:<rest>`: `vm:<id>`, `partition:<host>:<n>`, `host:<id>`. */
import type { StateMachine } from 'xstate';
import { hostMachine, HOST_MACHINE_VERSION, type HostEvent } from './host.ts';
import { partitionMachine, PARTITION_MACHINE_VERSION, vmNoticeEvent, type NotifyVmParams, type PartitionEvent } from './partition.ts';
import { vmMachine, VM_MACHINE_VERSION, type VmEvent } from './vm.ts';

/**
 * `timers`: the machine sets durable timers (effects with a `delayMs` param). A timer lives as long
 * as the state that set it, as XState's `after` does: the step that leaves the state cancels the
 * stream's timers still pending (src/engine/commands.ts).
 */
export const machines = {
  vm: { machine: vmMachine, version: VM_MACHINE_VERSION, timers: true },
  partition: { machine: partitionMachine, version: PARTITION_MACHINE_VERSION, timers: false },
  host: { machine: hostMachine, version: HOST_MACHINE_VERSION, timers: false },
} as const;

export type StreamKind = keyof typeof machines;

export function streamKind(streamId: string): StreamKind {
  const kind = streamId.slice(0, streamId.indexOf(':'));
  if (kind !== 'vm' && kind !== 'partition' && kind !== 'host') throw new Error(`unknown stream kind in ${JSON.stringify(streamId)}`);
  return kind;
}

export const vmStream = (vmId: string): `vm:${string}` => `vm:${vmId}`;
export const partitionStream = (hostId: string, partitionId: number): `partition:${string}` => `partition:${hostId}:${partitionId}`;
export const hostStream = (hostId: string): `host:${string}` => `host:${hostId}`;

/**
 * An event for a stream, typed by the stream's kind: an effect's outcome can only deliver an event
 * the receiving stream's own machine declares.
 */
export type Delivery =
  | { streamId: `vm:${string}`; event: VmEvent }
  | { streamId: `partition:${string}`; event: PartitionEvent }
  | { streamId: `host:${string}`; event: HostEvent };

type ActionsOf<M> = M extends StateMachine<any, any, any, any, infer A, any, any, any, any, any, any, any, any, any> ? A : never;

/**
 * A machine's effects, derived from its own definition: name → params. Effects are the declared
 * actions that take params; assign actions (context updates) take none.
 */
export type EffectsOf<M> = {
  [A in ActionsOf<M> as A extends { type: infer T extends string; params: infer P } ? (unknown extends P ? never : T) : never]: A extends { params: infer P } ? P : never;
};

/** Every effect of every machine, by name: what the engine's handlers must implement (src/engine/handlers.ts). */
export type Effects = EffectsOf<typeof vmMachine> & EffectsOf<typeof partitionMachine> & EffectsOf<typeof hostMachine>;

/** The same at run time: a machine's declared actions, less its assign actions. */
export function effectNames(kind: StreamKind): string[] {
  return Object.entries(machines[kind].machine.implementations.actions)
    .filter(([, a]) => (a as { type?: string }).type !== 'xstate.assign')
    .map(([name]) => name);
}

/**
 * Effects that only carry a message from one stream to another: no host I/O, and the event they
 * deliver follows from their params alone. The engine delivers such a message in the same statement
 * as the step that asks for it whenever the receiving stream accepts it (src/engine/commands.ts),
 * and through the outbox and a worker otherwise; the history reads the same either way.
 */
export const MESSAGE_EFFECTS: Record<string, (params: Record<string, unknown>) => Delivery> = {
  notifyVm: (params) => {
    const p = params as unknown as NotifyVmParams;
    return { streamId: vmStream(p.vmId), event: vmNoticeEvent(p) };
  },
};

export * from './vm.ts';
export * from './partition.ts';
export * from './host.ts';
