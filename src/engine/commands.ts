/**
 * Applying an event to a stream: take the stream's snapshot, decide, then write the event, the
 * snapshot and read rows, and the effects it asked for as one statement (store/step.ts) — on its
 * own or in the caller's transaction — so an event and its effects commit together or not at all
 * (the outbox). On its own, the statement also carries the delivery of the messages the step
 * sends (withMessages). prepareStep and commitSteps are the two halves, for a caller that writes
 * several decided steps as one unit (a VM's create: its partition's CLAIM and its CREATE).
 */
import { sql } from 'kysely';
import { machines, MESSAGE_EFFECTS, streamKind } from '../../machines/index.ts';
import type { Executor } from '../store/events.ts';
import { claimChange, readRowOf, type StreamSnapshot } from '../store/projections.ts';
import { PREPARED } from '../store/db.ts';
import { NOW, writeSteps, type EffectClose, type NewEffect, type StepBatcher, type StepWrite, type StepWritten } from '../store/step.ts';
import { decide, type Decision, type MachineEvent } from './decide.ts';
import { crashPoint } from './crash-points.ts';
import type { SnapshotCache } from './snapshot-cache.ts';

export interface CommandMeta {
  actor: string;
  correlationId: string;
  /** What caused this event: a request id or an effect id. Unique per stream when set. */
  causationId: string | null;
}

export interface EffectPolicy {
  /** Tries before an effect fails for good and its stream gets EFFECT_FAILED. */
  maxAttempts(effectType: string): number;
}

export type ApplyResult =
  | { kind: 'rejected'; state: string; reason: string; snapshot: StreamSnapshot | null }
  | { kind: 'unchanged'; state: string; snapshot: StreamSnapshot }
  /**
   * `claimed`: the effects handed to the `claimFor` worker, to launch once this is committed;
   * `pendingDueAt`: when the earliest effect of that worker's host left pending falls due (the
   * worker schedules it; no NOTIFY was sent for it).
   */
  | { kind: 'changed'; snapshot: StreamSnapshot; position: string; claimed: ClaimedEffect[]; pendingDueAt: Date | null };

/** An effect a worker holds the lease of, ready to run. */
export interface ClaimedEffect {
  id: string;
  streamId: string;
  hostId: string;
  type: string;
  params: Record<string, unknown>;
  correlationId: string;
  attempt: number;
  maxAttempts: number;
  claimedAt: Date;
  /** The agent epoch the lease was taken under (src/engine/agent.ts). */
  epoch: number;
  /** "Not yet" answers so far (waits that did not count as tries), and when the first came. */
  waits: number;
  waitingSince: Date | null;
  /** The lease expired on a try that was the last the budget allows: record the failure, run nothing. */
  exhausted: boolean;
}

/**
 * A worker applying an outcome takes the new effects of its own host that are due now (up to
 * `limit`) as they are written: they are born leased to it and it runs them right after the
 * commit — no claim round trip, no notification, no polling delay between the steps of a lifecycle.
 */
export interface ClaimOnWrite {
  workerId: string;
  epoch: number;
  hostId: string;
  leaseMs: number;
  limit: number;
}

interface StreamRow {
  stream_id: string;
  machine_version: number;
  version: number;
  state: unknown;
  context: Record<string, unknown>;
  created_at: Date;
  updated_at: Date;
}

/** The stream's stored snapshot, or null for a stream with no event yet. */
export async function loadSnapshot(db: Executor, streamId: string): Promise<StreamSnapshot | null> {
  const { rows } = await sql<StreamRow>`${sql.raw(PREPARED)}
    select stream_id, machine_version, version, state, context, created_at, updated_at
    from streams where stream_id = ${streamId}`.execute(db);
  const r = rows[0];
  if (!r) return null;
  return {
    streamId,
    kind: streamKind(streamId),
    machineVersion: r.machine_version,
    version: r.version,
    state: r.state as string,
    context: r.context,
    createdAt: new Date(r.created_at),
    updatedAt: new Date(r.updated_at),
  };
}

export function effectId(streamId: string, version: number, index: number): string {
  return `${streamId}@${version}#${index}`;
}

/** The stream, version and index an effect id names (see effectId), or null for another string. */
export function parseEffectId(id: string): { streamId: string; version: number; index: number } | null {
  const m = /^(.*)@(\d+)#(\d+)$/.exec(id);
  return m ? { streamId: m[1]!, version: Number(m[2]), index: Number(m[3]) } : null;
}

/** The lease of the effect being closed was gone when its outcome was written: nothing was written. */
export class LostLeaseError extends Error {
  constructor(readonly effectId: string) {
    super(`the lease of effect ${effectId} is no longer held by this worker`);
    this.name = 'LostLeaseError';
  }
}

/**
 * The effect worker of this process as the other writers here (requests, the QEMU monitor) use it:
 * they hand it the effects their writes ask for, and share its snapshots.
 */
export interface LocalWorker {
  readonly snapshots: SnapshotCache;
  readonly batcher: StepBatcher;
  claimOnWrite(): ClaimOnWrite | undefined;
  /** Call after the write committed: launches what was handed over, schedules what was left pending. */
  handOver(result: ApplyResult): void;
  /**
   * After a write whose answer was lost but which committed (read back): launches the effects it
   * handed to this worker under `correlationId`, which nothing else would run before their lease ends.
   */
  adopt(correlationId: string): Promise<number>;
}

export interface ApplyOptions {
  /** The stream's snapshot as the caller read it in this transaction. Otherwise it is read (or taken from `snapshots`). */
  snapshot?: StreamSnapshot | null;
  snapshots?: SnapshotCache;
  /** Hand the new effects due now on this host to this worker (see ClaimOnWrite). */
  claimFor?: ClaimOnWrite;
  /** The worker's effect this event is the outcome of: closed, with its try, in the same statement. */
  closes?: EffectClose;
  /** Group commit for a step written on its own (not in the caller's transaction). */
  batcher?: StepBatcher;
}

/**
 * Decides `event` on the stream and writes it (see the top of this file). The snapshot comes from
 * `opts.snapshot`, else this process's cache, else the store; a refusal is always confirmed on the
 * stored state.
 */
export async function applyEvent(
  tx: Executor,
  streamId: string,
  event: MachineEvent,
  meta: CommandMeta,
  policy: EffectPolicy,
  opts: ApplyOptions = {},
): Promise<ApplyResult> {
  const prepared = await prepareStep(tx, streamId, event, meta, policy, opts);
  if (prepared.kind !== 'prepared') return prepared;
  // On its own (not in a caller's transaction) the step carries the messages it sends.
  const unit = tx.isTransaction ? [prepared] : await withMessages(tx, prepared, policy, opts);
  const results = await commitSteps(tx, unit, opts);
  const [first, ...delivered] = results;
  // A kill after this commit is the caller's `after-commit` point: the delivered steps have none of their own.
  if (delivered.length === 0) return first!;
  // The caller launches what any step of the unit handed over; the delivered steps' snapshots are remembered already.
  const due = results.map((r) => r.pendingDueAt?.getTime()).filter((t) => t !== undefined);
  return { ...first!, claimed: results.flatMap((r) => r.claimed), pendingDueAt: due.length > 0 ? new Date(Math.min(...due)) : null };
}

/** A step decided and not yet written: see prepareStep and commitSteps. */
export interface PreparedStep {
  kind: 'prepared';
  prior: StreamSnapshot | null;
  next: StreamSnapshot;
  write: StepWrite;
}

/**
 * Decides `event` on the stream (see applyEvent for where the snapshot comes from) and builds its
 * write, or says why nothing is to be written.
 */
export async function prepareStep(
  tx: Executor,
  streamId: string,
  event: MachineEvent,
  meta: CommandMeta,
  policy: EffectPolicy,
  opts: Pick<ApplyOptions, 'snapshot' | 'snapshots' | 'closes'> = {},
): Promise<PreparedStep | Exclude<ApplyResult, { kind: 'changed' }>> {
  const cached = opts.snapshot === undefined ? opts.snapshots?.get(streamId) : undefined;
  let snapshot = opts.snapshot !== undefined ? opts.snapshot : (cached ?? (await loadSnapshot(tx, streamId)));
  let decision: Decision = decide(streamId, snapshot, event);
  if (cached && decision.kind !== 'changed') {
    // A refusal must come from the stored state, not from a snapshot another writer may have moved past.
    snapshot = await loadSnapshot(tx, streamId);
    decision = decide(streamId, snapshot, event);
  }
  if (decision.kind === 'rejected') return { ...decision, snapshot };
  if (decision.kind === 'unchanged') return { kind: 'unchanged', state: decision.state, snapshot: snapshot! };

  const kind = streamKind(streamId);
  const { type, ...data } = event;
  const version = snapshot?.version ?? 0;
  // NOW stands for the statement's now(): the database's clock, read when the step is written.
  const next: StreamSnapshot = {
    streamId,
    kind,
    machineVersion: machines[kind].version,
    version: version + 1,
    state: decision.stateAfter,
    context: decision.context,
    createdAt: snapshot?.createdAt ?? NOW,
    updatedAt: NOW,
  };
  const hostId = String(decision.context.hostId);
  const effects: NewEffect[] = decision.effects.map((e, i) => {
    const delayMs = typeof e.params.delayMs === 'number' ? e.params.delayMs : 0;
    return { id: effectId(streamId, next.version, i), hostId, type: e.type, params: e.params, delayMs, maxAttempts: policy.maxAttempts(e.type), leasedTo: null, deliveredBy: null, note: null };
  });
  const write: StepWrite = {
    streamId,
    expectedVersion: version,
    event: {
      type,
      data,
      stateBefore: decision.stateBefore,
      stateAfter: decision.stateAfter,
      machine: kind,
      machineVersion: next.machineVersion,
      causationId: meta.causationId,
      correlationId: meta.correlationId,
      actor: meta.actor,
    },
    stream: { machine: kind, machineVersion: next.machineVersion, version: next.version, state: next.state, context: next.context, createdAt: next.createdAt },
    readRow: readRowOf(next),
    claims: claimChange(next, snapshot),
    effects,
    leaseMs: 0,
    leaseEpoch: null,
    notifyHost: null,
    closes: opts.closes ?? null,
    closesWith: null,
    // A durable timer lives as long as the state that set it (XState's `after`): leaving it cancels the timer.
    cancelTimers:
      machines[kind].timers && decision.stateBefore !== null && decision.stateBefore !== decision.stateAfter
        ? `cancelled: ${kind} left ${decision.stateBefore} (${type}) before it fell due`
        : null,
  };
  return { kind: 'prepared', prior: snapshot, next, write };
}

/** A bound on messages delivered with one step (our machines send one at most; a chain stops here). */
const MAX_DELIVERED = 4;

/**
 * The step, followed by the steps that deliver its message effects (MESSAGE_EFFECTS) to streams
 * that accept them now: one statement then commits the sender's step, the message's effect row
 * (born done, with its try) and the receiver's step, where the outbox would take a second commit
 * and a worker's turn. A message the receiver refuses, or that could not be decided here, stays an
 * ordinary effect and the worker delivers it, recording why it was ignored; should the receiver's
 * stream move before the commit, the statement fails as a whole and the caller's retry decides
 * both again.
 */
async function withMessages(tx: Executor, first: PreparedStep, policy: EffectPolicy, opts: ApplyOptions): Promise<PreparedStep[]> {
  const unit = [first];
  for (let i = 0; i < unit.length && unit.length <= MAX_DELIVERED; i++) {
    const sender = unit[i]!;
    for (const effect of sender.write.effects) {
      const message = MESSAGE_EFFECTS[effect.type];
      if (!message || effect.delayMs > 0 || unit.length > MAX_DELIVERED) continue;
      crashPoint(`effect:${effect.type}:before-action`);
      const { streamId, event } = message(effect.params);
      if (unit.some((s) => s.write.streamId === streamId)) continue;
      const meta = { actor: `effect:${effect.type}`, correlationId: sender.write.event.correlationId, causationId: effect.id };
      const receiver = await prepareStep(tx, streamId, event, meta, policy, { snapshots: opts.snapshots });
      if (receiver.kind !== 'prepared') continue;
      crashPoint(`effect:${effect.type}:after-action`);
      effect.deliveredBy = opts.claimFor?.workerId ?? sender.write.event.actor;
      effect.note = `delivered ${event.type} to ${streamId} in the statement of ${sender.write.event.type}`;
      receiver.write.closesWith = sender.write.closes?.effectId ?? sender.write.closesWith;
      unit.push(receiver);
    }
  }
  return unit;
}

/**
 * Writes prepared steps (of distinct streams) as one statement: all commit or none. The new effects
 * due now on the `claimFor` worker's host are handed to it; the rest are left pending (and the
 * host's other processes told by NOTIFY, unless the local worker is told through pendingDueAt).
 */
export async function commitSteps(tx: Executor, steps: PreparedStep[], opts: Pick<ApplyOptions, 'snapshots' | 'claimFor' | 'batcher'> = {}): Promise<Extract<ApplyResult, { kind: 'changed' }>[]> {
  const claimFor = opts.claimFor;
  let handed = 0;
  const pendingOf = new Map<PreparedStep, { pending: NewEffect[]; mine: boolean }>();
  for (const step of steps) {
    const mine = claimFor !== undefined && claimFor.hostId === String(step.next.context.hostId);
    for (const e of step.write.effects) {
      if (!mine || e.deliveredBy !== null || e.delayMs > 0 || handed >= claimFor.limit) continue;
      e.leasedTo = claimFor.workerId;
      handed++;
    }
    const pending = step.write.effects.filter((e) => e.leasedTo === null && e.deliveredBy === null);
    pendingOf.set(step, { pending, mine });
    step.write.leaseMs = mine ? claimFor.leaseMs : 0;
    step.write.leaseEpoch = mine ? claimFor.epoch : null;
    // The local worker is told of what it was not handed (pendingDueAt); other processes hear NOTIFY.
    step.write.notifyHost = pending.length > 0 && !mine ? String(step.next.context.hostId) : null;
  }

  // A kill here is a kill before the commit: nothing of these steps survives it.
  for (const step of steps) crashPoint(`event:${step.write.event.type}:before-commit`);
  const writes = steps.map((s) => s.write);
  let written: (StepWritten | null)[];
  try {
    // On its own, the unit may share its statement and commit with other lifecycles' (group commit).
    written = opts.batcher && !tx.isTransaction ? await opts.batcher.write(writes) : await writeSteps(tx, writes);
  } catch (err) {
    for (const w of writes) opts.snapshots?.forget(w.streamId);
    throw err;
  }
  // Only a step that closes an effect can come back unwritten, and every step of the unit hangs off
  // the first one's close: a lost lease writes none of them.
  if (written.some((w) => w === null)) throw new LostLeaseError(writes[0]!.closes!.effectId);

  return steps.map((step, i) => {
    const { now, position } = written[i]!;
    const stored: StreamSnapshot = { ...step.next, createdAt: step.prior?.createdAt ?? now, updatedAt: now };
    // Inside a caller's transaction the step is not committed yet: it may still roll back.
    if (tx.isTransaction) opts.snapshots?.forget(step.next.streamId);
    else opts.snapshots?.remember(stored);
    const claimed: ClaimedEffect[] = step.write.effects
      .filter((e) => e.leasedTo !== null)
      .map((e) => ({
        id: e.id,
        streamId: step.next.streamId,
        hostId: e.hostId,
        type: e.type,
        params: e.params,
        correlationId: step.write.event.correlationId,
        attempt: 1,
        maxAttempts: e.maxAttempts,
        claimedAt: now,
        epoch: claimFor!.epoch,
        waits: 0,
        waitingSince: null,
        exhausted: false,
      }));
    const { pending, mine } = pendingOf.get(step)!;
    // On this process's clock (the worker sleeps on it), not the database's: the two may differ.
    const pendingDueAt = mine && pending.length > 0 ? new Date(Date.now() + Math.min(...pending.map((e) => e.delayMs))) : null;
    return { kind: 'changed' as const, snapshot: stored, position, claimed, pendingDueAt };
  });
}
