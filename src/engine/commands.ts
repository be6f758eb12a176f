/**
 * Applying an event to a stream: take the stream's snapshot, decide, then write the event, the
 * snapshot and read rows, and the effects it asked for as one statement (store/step.ts) — on its
 * own or in the caller's transaction — so an event and its effects commit together or not at all
 * (the outbox).
 */
import { sql, type Kysely } from 'kysely';
import { machines, streamKind } from '../../machines/index.ts';
import { ConcurrencyError, type Executor } from '../store/events.ts';
import { claimChange, readRowOf, type StreamSnapshot } from '../store/projections.ts';
import { PREPARED } from '../store/db.ts';
import { NOW, writeSteps, type EffectClose, type NewEffect, type StepBatcher, type StepWrite, type StepWritten } from '../store/step.ts';
import type { Database } from '../store/schema.ts';
import { decide, type Decision, type MachineEvent } from './decide.ts';
import { crashPoint } from './crash-points.ts';

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
}

/**
 * A worker applying an outcome takes the new effects of its own host that are due now (up to
 * `limit`) as they are written: they are born leased to it and it runs them right after the
 * commit — no claim round trip, no notification, no polling delay between the steps of a lifecycle.
 */
export interface ClaimOnWrite {
  workerId: string;
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

/** The lease of the effect being closed was gone when its outcome was written: nothing was written. */
export class LostLeaseError extends Error {
  constructor(readonly effectId: string) {
    super(`the lease of effect ${effectId} is no longer held by this worker`);
    this.name = 'LostLeaseError';
  }
}

/**
 * The snapshots this process committed, so that the next step of a stream need not read its
 * snapshot back, and so that a request waiting for a VM hears of its steps at once (`watch`).
 * A snapshot that another writer has since moved past is harmless: the step's insert at version+1
 * then fails with ConcurrencyError, the entry is dropped, and the retry reads the stream. Only
 * committed snapshots are kept, so an entry is never ahead of the log. Bounded: the oldest go first.
 */
export class SnapshotCache {
  private readonly entries = new Map<string, StreamSnapshot>();
  private readonly watchers = new Map<string, Set<(snapshot: StreamSnapshot) => void>>();
  constructor(private readonly max = 10_000) {}

  get(streamId: string): StreamSnapshot | undefined {
    return this.entries.get(streamId);
  }

  /** Call only once `snapshot` is committed. */
  remember(snapshot: StreamSnapshot): void {
    this.entries.delete(snapshot.streamId);
    this.entries.set(snapshot.streamId, snapshot);
    if (this.entries.size > this.max) this.entries.delete(this.entries.keys().next().value!);
    for (const watcher of this.watchers.get(snapshot.streamId) ?? []) watcher(snapshot);
  }

  forget(streamId: string): void {
    this.entries.delete(streamId);
  }

  /** Calls `watcher` with every snapshot of the stream this process commits from now on; returns the unwatch function. */
  watch(streamId: string, watcher: (snapshot: StreamSnapshot) => void): () => void {
    let set = this.watchers.get(streamId);
    if (!set) this.watchers.set(streamId, (set = new Set()));
    set.add(watcher);
    return () => {
      set.delete(watcher);
      if (set.size === 0) this.watchers.delete(streamId);
    };
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

export async function applyEvent(
  tx: Executor,
  streamId: string,
  event: MachineEvent,
  meta: CommandMeta,
  policy: EffectPolicy,
  opts: ApplyOptions = {},
): Promise<ApplyResult> {
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
  const claimFor = opts.claimFor?.hostId === hostId ? opts.claimFor : undefined;
  const effects: NewEffect[] = decision.effects.map((e, i) => {
    const delayMs = typeof e.params.delayMs === 'number' ? e.params.delayMs : 0;
    return { id: effectId(streamId, next.version, i), hostId, type: e.type, params: e.params, delayMs, maxAttempts: policy.maxAttempts(e.type), leasedTo: null };
  });
  let handed = 0;
  for (const e of effects) {
    if (!claimFor || e.delayMs > 0 || handed >= claimFor.limit) continue;
    e.leasedTo = claimFor.workerId;
    handed++;
  }
  const pending = effects.filter((e) => e.leasedTo === null);

  // A kill here is a kill before the commit: nothing of this step survives it.
  crashPoint(`event:${type}:before-commit`);
  const write: StepWrite = {
    streamId,
    expectedVersion: version,
    event: {
      type,
      data,
      stateBefore: decision.stateBefore,
      stateAfter: decision.stateAfter,
      machine: kind,
      machineVersion: machines[kind].version,
      causationId: meta.causationId,
      correlationId: meta.correlationId,
      actor: meta.actor,
    },
    stream: { machine: kind, machineVersion: next.machineVersion, version: next.version, state: next.state, context: next.context, createdAt: next.createdAt },
    readRow: readRowOf(next),
    claims: claimChange(next, snapshot),
    effects,
    leaseMs: claimFor?.leaseMs ?? 0,
    // The local worker is told of what it was not handed (pendingDueAt); other processes hear NOTIFY.
    notifyHost: pending.length > 0 && !claimFor ? hostId : null,
    closes: opts.closes ?? null,
  };
  let written: StepWritten | null;
  try {
    // On its own, the step may share its statement and commit with other lifecycles' (group commit).
    written = opts.batcher && !tx.isTransaction ? await opts.batcher.write(write) : (await writeSteps(tx, [write]))[0]!;
  } catch (err) {
    opts.snapshots?.forget(streamId);
    throw err;
  }
  if (!written) throw new LostLeaseError(opts.closes!.effectId);

  const { now } = written;
  const stored: StreamSnapshot = { ...next, createdAt: snapshot?.createdAt ?? now, updatedAt: now };
  // Inside a caller's transaction the step is not committed yet: it may still roll back.
  if (tx.isTransaction) opts.snapshots?.forget(streamId);
  else opts.snapshots?.remember(stored);
  const claimed: ClaimedEffect[] = effects
    .filter((e) => e.leasedTo !== null)
    .map((e) => ({ id: e.id, streamId, hostId, type: e.type, params: e.params, correlationId: meta.correlationId, attempt: 1, maxAttempts: e.maxAttempts, claimedAt: now }));
  const pendingDueAt = claimFor && pending.length > 0 ? new Date(now.getTime() + Math.min(...pending.map((e) => e.delayMs))) : null;
  return { kind: 'changed', snapshot: stored, position: written.position, claimed, pendingDueAt };
}

/** Serialization failures and deadlocks are worth a retry, like a lost optimistic race. */
function isRetryable(err: unknown): boolean {
  if (err instanceof ConcurrencyError) return true;
  const code = (err as { code?: string })?.code;
  return code === '40001' || code === '40P01';
}

/**
 * Runs `work` again from scratch when it lost a race (another writer moved a stream it read, a
 * serialization failure, a deadlock). Each try decides again on fresh state.
 */
export async function retrying<T>(work: () => Promise<T>, opts: { retries?: number } = {}): Promise<T> {
  const retries = opts.retries ?? 20;
  for (let attempt = 0; ; attempt++) {
    try {
      return await work();
    } catch (err) {
      if (!isRetryable(err) || attempt >= retries) throw err;
      // A short randomised pause spreads out writers that collided on the same stream.
      await new Promise((r) => setTimeout(r, Math.random() * Math.min(50, 2 ** attempt)));
    }
  }
}

/** Runs `work` in a transaction, retried as a whole (see retrying). */
export function inTransaction<T>(db: Kysely<Database>, work: (tx: Executor) => Promise<T>, opts: { retries?: number } = {}): Promise<T> {
  return retrying(() => db.transaction().execute(work), opts);
}
