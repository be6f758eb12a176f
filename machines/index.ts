/** The machines by stream kind. A stream id is `<kind>:<rest>`: `vm:<id>`, `partition:<host>:<n>`, `host:<id>`. */
import { hostMachine, HOST_MACHINE_VERSION } from './host.ts';
import { partitionMachine, PARTITION_MACHINE_VERSION, vmNoticeEvent, type NotifyVmParams } from './partition.ts';
import { vmMachine, VM_MACHINE_VERSION } from './vm.ts';

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

export const vmStream = (vmId: string) => `vm:${vmId}`;
export const partitionStream = (hostId: string, partitionId: number) => `partition:${hostId}:${partitionId}`;
export const hostStream = (hostId: string) => `host:${hostId}`;

/**
 * Effects that only carry a message from one stream to another: no host I/O, and the event they
 * deliver follows from their params alone. The engine delivers such a message in the same statement
 * as the step that asks for it whenever the receiving stream accepts it (src/engine/commands.ts),
 * and through the outbox and a worker otherwise; the history reads the same either way.
 */
export const MESSAGE_EFFECTS: Record<string, (params: Record<string, unknown>) => { streamId: string; event: { type: string; [key: string]: unknown } }> = {
  notifyVm: (params) => {
    const p = params as unknown as NotifyVmParams;
    return { streamId: vmStream(p.vmId), event: vmNoticeEvent(p) };
  },
};

export * from './vm.ts';
export * from './partition.ts';
export * from './host.ts';
