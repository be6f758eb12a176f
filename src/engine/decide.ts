/**
 * The decider: event + current state → new state + effects, kept apart from I/O.
 *
 * `decide` folds one event through a stream's machine with xstate's pure `transition`, which
 * returns the next snapshot and the actions to run without running them. `fold` replays a whole
 * stream the same way. Nothing here touches the database or the clock.
 */
import { initialTransition, transition, type AnyStateMachine } from 'xstate';
import { machines, streamKind, type StreamKind } from '../../machines/index.ts';
import type { StoredEvent } from '../store/events.ts';
import type { StreamSnapshot } from '../store/projections.ts';

export interface MachineEvent {
  type: string;
  [key: string]: unknown;
}

/** An effect a transition asked for: the name of the machine's action and its params. */
export interface EffectRequest {
  type: string;
  params: Record<string, unknown>;
}

export type Decision =
  | { kind: 'rejected'; state: string; reason: string }
  /** Accepted, but nothing changes: nothing is written (an idempotent repeat). */
  | { kind: 'unchanged'; state: string }
  | { kind: 'changed'; stateBefore: string | null; stateAfter: string; context: Record<string, unknown>; effects: EffectRequest[]; final: boolean };

function machineOf(kind: StreamKind): AnyStateMachine {
  return machines[kind].machine as unknown as AnyStateMachine;
}

function stateValue(value: unknown): string {
  // Our machines are flat; a nested value would be serialised the same way here and in the log.
  return typeof value === 'string' ? value : JSON.stringify(value);
}

function restore(kind: StreamKind, snap: StreamSnapshot | null) {
  const machine = machineOf(kind);
  if (snap === null) return initialTransition(machine)[0];
  return machine.resolveState({ value: snap.state, context: snap.context });
}

export function decide(streamId: string, current: StreamSnapshot | null, event: MachineEvent): Decision {
  const kind = streamKind(streamId);
  const machine = machineOf(kind);
  const snapshot = restore(kind, current);
  const before = current === null ? null : stateValue(snapshot.value);
  if (!snapshot.can(event)) {
    return {
      kind: 'rejected',
      state: before ?? 'new',
      reason: `${kind} ${streamId.slice(kind.length + 1)} is ${before ?? 'not created'}; it cannot take ${event.type} there`,
    };
  }
  const [next, actions] = transition(machine, snapshot, event);
  const after = stateValue(next.value);
  const effects = actions.map((a) => ({ type: a.type, params: (a.params ?? {}) as Record<string, unknown> }));
  const context = next.context as Record<string, unknown>;
  if (before === after && effects.length === 0 && sameJson(context, current?.context)) {
    return { kind: 'unchanged', state: after };
  }
  return { kind: 'changed', stateBefore: before, stateAfter: after, context, effects, final: next.status === 'done' };
}

/** Folds stored events into the snapshot they produce; `verify` compares this with the streams table. */
export function fold(streamId: string, events: StoredEvent[]): StreamSnapshot | null {
  const kind = streamKind(streamId);
  let snap = null as StreamSnapshot | null;
  for (const e of events) {
    const d = decide(streamId, snap, { ...e.data, type: e.type });
    if (d.kind === 'rejected') {
      throw new Error(`stream ${streamId} version ${e.streamVersion}: ${e.type} does not apply to state ${d.state} on replay`);
    }
    snap = {
      streamId,
      kind,
      machineVersion: e.machineVersion,
      version: e.streamVersion,
      state: d.kind === 'changed' ? d.stateAfter : d.state,
      context: d.kind === 'changed' ? d.context : snap!.context,
      createdAt: snap?.createdAt ?? e.recordedAt,
      updatedAt: e.recordedAt,
    };
  }
  return snap;
}

export function sameJson(a: unknown, b: unknown): boolean {
  return JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
}

/** Key-sorted copy, so that jsonb's key order and JavaScript's compare equal. */
export function canonical(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(canonical);
  if (value && typeof value === 'object' && !(value instanceof Date)) {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((k) => [k, canonical((value as Record<string, unknown>)[k])]),
    );
  }
  return value;
}
