/**
 * The decider: event + current state → new state + effects, kept apart from I/O.
 *
 * `decide` folds one event through a stream's machine with xstate's pure `transition`, which
 * returns the next snapshot and the actions to run without running them. `fold` replays a whole
 * stream the same way. Nothing here touches the database or the clock.
 */
import { createActor, type AnyActorScope, type AnyMachineSnapshot, type AnyStateMachine } from 'xstate';
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

/**
 * One inert actor scope per machine, made once. xstate's transition() and initialTransition() build a
 * new actor for every call (createActor, which also computes the machine's initial snapshot) and
 * throw it away: that was most of the time a decide took. Our machines spawn no children and nothing
 * here runs an action, only collects it; calls are synchronous, so the collector set around one call
 * is never seen by another.
 */
const scopes = new Map<StreamKind, AnyActorScope>();

function scopeOf(kind: StreamKind): AnyActorScope {
  let scope = scopes.get(kind);
  if (!scope) {
    const self = createActor(machineOf(kind));
    scope = { self, id: '', sessionId: '', logger: () => {}, defer: () => {}, emit: () => {}, system: self.system, stopChild: () => {}, actionExecutor: () => {} };
    scopes.set(kind, scope);
  }
  return scope;
}

/** xstate's transition() on the machine's shared scope: the next snapshot and the actions it asks for. */
function step(kind: StreamKind, snapshot: AnyMachineSnapshot, event: MachineEvent): [AnyMachineSnapshot, { type: string; params?: unknown }[]] {
  const scope = scopeOf(kind);
  const actions: { type: string; params?: unknown }[] = [];
  scope.actionExecutor = (action) => void actions.push(action);
  try {
    return [machineOf(kind).transition(snapshot, event, scope), actions];
  } finally {
    scope.actionExecutor = () => {};
  }
}

const initialSnapshot = (kind: StreamKind): AnyMachineSnapshot => machineOf(kind).getInitialSnapshot(scopeOf(kind));

function stateValue(value: unknown): string {
  // Our machines are flat; a nested value would be serialised the same way here and in the log.
  return typeof value === 'string' ? value : JSON.stringify(value);
}

function restore(kind: StreamKind, snap: StreamSnapshot | null): AnyMachineSnapshot {
  if (snap === null) return initialSnapshot(kind);
  return machineOf(kind).resolveState({ value: snap.state, context: snap.context });
}

export function decide(streamId: string, current: StreamSnapshot | null, event: MachineEvent): Decision {
  const kind = streamKind(streamId);
  const snapshot = restore(kind, current);
  const before = current === null ? null : stateValue(snapshot.value);
  if (!snapshot.can(event)) {
    return {
      kind: 'rejected',
      state: before ?? 'new',
      reason: `${kind} ${streamId.slice(kind.length + 1)} is ${before ?? 'not created'}; it cannot take ${event.type} there`,
    };
  }
  const [next, actions] = step(kind, snapshot, event);
  const after = stateValue(next.value);
  const effects = actions.map((a) => ({ type: a.type, params: (a.params ?? {}) as Record<string, unknown> }));
  const context = next.context as Record<string, unknown>;
  if (before === after && effects.length === 0 && sameJson(context, current?.context)) {
    return { kind: 'unchanged', state: after };
  }
  return { kind: 'changed', stateBefore: before, stateAfter: after, context, effects, final: next.status === 'done' };
}

/**
 * The machine's initial snapshot, computed by xstate once per machine for fold(). It is a pure value
 * (no input, a static initial context, nothing run), and xstate never mutates a snapshot it is given,
 * so every stream's fold can start from the same one: getInitialSnapshot costs about two transitions,
 * a fifth of a replay's xstate time at the log's 8 events per stream.
 */
const foldStarts = new Map<StreamKind, AnyMachineSnapshot>();

function foldStart(kind: StreamKind): AnyMachineSnapshot {
  let start = foldStarts.get(kind);
  if (!start) foldStarts.set(kind, (start = initialSnapshot(kind)));
  return start;
}

/** What fold() reads of a stored event. */
export type FoldEvent = Pick<StoredEvent, 'type' | 'data' | 'streamVersion' | 'machineVersion' | 'recordedAt'>;

/**
 * Folds stored events into the snapshot they produce; `verify` compares this with the streams table.
 * The xstate snapshot is carried from one event to the next (decide() would rebuild it from state and
 * context for every event), through the same machine.transition() on the same shared scope as
 * step(), minus the action collector: a fold runs no effects (assign is applied inside the
 * transition, not by the executor). An event no transition takes leaves the very same snapshot
 * object: that is decide()'s 'rejected'.
 */
export function fold(streamId: string, events: readonly FoldEvent[]): StreamSnapshot | null {
  if (events.length === 0) return null;
  const kind = streamKind(streamId);
  const machine = machineOf(kind);
  const scope = scopeOf(kind);
  let snapshot = foldStart(kind);
  for (const e of events) {
    const next = machine.transition(snapshot, { ...e.data, type: e.type }, scope);
    if (next === snapshot) {
      throw new Error(`stream ${streamId} version ${e.streamVersion}: ${e.type} does not apply to state ${stateValue(snapshot.value)} on replay`);
    }
    snapshot = next;
  }
  const first = events[0]!;
  const last = events[events.length - 1]!;
  return {
    streamId,
    kind,
    machineVersion: last.machineVersion,
    version: last.streamVersion,
    state: stateValue(snapshot.value),
    context: snapshot.context as Record<string, unknown>,
    createdAt: first.recordedAt,
    updatedAt: last.recordedAt,
  };
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
