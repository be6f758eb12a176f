/**
 * Applying an event to a stream inside a transaction: load the snapshot, decide, then write the
 * event, the snapshot and read rows, and the effects it asked for — all in the caller's
 * transaction, so an event and its effects commit together or not at all (the outbox).
 */
import { sql, type Kysely } from 'kysely';
import { machines, streamKind } from '../../machines/index.ts';
import { appendEvents, ConcurrencyError, type Executor } from '../store/events.ts';
import { EFFECTS_CHANNEL } from '../store/db.ts';
import { writeProjections, type StreamSnapshot } from '../store/projections.ts';
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
  | { kind: 'changed'; snapshot: StreamSnapshot; position: string; claimed: ClaimedEffect[] };

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

interface StreamRowWithNow {
  now: Date;
  stream_id: string | null;
  machine_version: number | null;
  version: number | null;
  state: unknown;
  context: Record<string, unknown> | null;
  created_at: Date | null;
  updated_at: Date | null;
}

/** The stream's snapshot and the database clock, in one round trip. */
export async function loadSnapshot(db: Executor, streamId: string): Promise<{ now: Date; snapshot: StreamSnapshot | null }> {
  const { rows } = await sql<StreamRowWithNow>`
    select now() as now, s.stream_id, s.machine_version, s.version, s.state, s.context, s.created_at, s.updated_at
    from (select 1) as one left join streams s on s.stream_id = ${streamId}`.execute(db);
  const r = rows[0]!;
  if (r.stream_id === null) return { now: new Date(r.now), snapshot: null };
  return {
    now: new Date(r.now),
    snapshot: {
      streamId,
      kind: streamKind(streamId),
      machineVersion: r.machine_version!,
      version: r.version!,
      state: r.state as string,
      context: r.context!,
      createdAt: new Date(r.created_at!),
      updatedAt: new Date(r.updated_at!),
    },
  };
}

export function effectId(streamId: string, version: number, index: number): string {
  return `${streamId}@${version}#${index}`;
}

export async function applyEvent(
  tx: Executor,
  streamId: string,
  event: MachineEvent,
  meta: CommandMeta,
  policy: EffectPolicy,
  claimFor?: ClaimOnWrite,
): Promise<ApplyResult> {
  const { now, snapshot } = await loadSnapshot(tx, streamId);
  const decision: Decision = decide(streamId, snapshot, event);
  if (decision.kind === 'rejected') return { ...decision, snapshot };
  if (decision.kind === 'unchanged') return { kind: 'unchanged', state: decision.state, snapshot: snapshot! };

  const kind = streamKind(streamId);
  const { type, ...data } = event;
  const version = snapshot?.version ?? 0;
  const { positions } = await appendEvents(tx, streamId, version, [
    {
      type,
      data,
      stateBefore: decision.stateBefore,
      stateAfter: decision.stateAfter,
      machine: kind,
      machineVersion: machines[kind].version,
      causationId: meta.causationId,
      correlationId: meta.correlationId,
      actor: meta.actor,
      recordedAt: now,
    },
  ]);

  const next: StreamSnapshot = {
    streamId,
    kind,
    machineVersion: machines[kind].version,
    version: version + 1,
    state: decision.stateAfter,
    context: decision.context,
    createdAt: snapshot?.createdAt ?? now,
    updatedAt: now,
  };
  await writeProjections(tx, next, snapshot);

  const claimed: ClaimedEffect[] = [];
  if (decision.effects.length > 0) {
    const hostId = String(decision.context.hostId);
    const leaseUntil = claimFor ? new Date(now.getTime() + claimFor.leaseMs) : null;
    let pendingHere = false;
    const rows = decision.effects.map((e, i) => {
      const id = effectId(streamId, next.version, i);
      const delayMs = typeof e.params.delayMs === 'number' ? e.params.delayMs : 0;
      const maxAttempts = policy.maxAttempts(e.type);
      const take = claimFor !== undefined && claimFor.hostId === hostId && delayMs === 0 && claimed.length < claimFor.limit;
      if (take) claimed.push({ id, streamId, hostId, type: e.type, params: e.params, correlationId: meta.correlationId, attempt: 1, maxAttempts, claimedAt: now });
      else pendingHere = true;
      return {
        id,
        stream_id: streamId,
        host_id: hostId,
        type: e.type,
        params: JSON.stringify(e.params),
        correlation_id: meta.correlationId,
        due_at: new Date(now.getTime() + delayMs),
        max_attempts: maxAttempts,
        created_at: now,
        ...(take
          ? { status: 'running' as const, attempts: 1, lease_owner: claimFor.workerId, lease_until: leaseUntil, claimed_at: now }
          : { status: 'pending' as const }),
      };
    });
    await tx.insertInto('effects').values(rows).execute();
    // Delivered at commit: wakes the host's workers without a polling delay.
    if (pendingHere) await sql`select pg_notify(${EFFECTS_CHANNEL}, ${hostId})`.execute(tx);
  }
  // Everything is written but not committed: a kill here loses all of it, as a crash before commit.
  crashPoint(`event:${type}:before-commit`);
  return { kind: 'changed', snapshot: next, position: positions[0]!, claimed };
}

/** Serialization failures and deadlocks are worth a retry, like a lost optimistic race. */
function isRetryable(err: unknown): boolean {
  if (err instanceof ConcurrencyError) return true;
  const code = (err as { code?: string })?.code;
  return code === '40001' || code === '40P01';
}

/**
 * Runs `work` in a transaction, re-running it from scratch when it lost a race (another writer
 * moved a stream it read). Each try decides again on fresh state.
 */
export async function inTransaction<T>(
  db: Kysely<Database>,
  work: (tx: Executor) => Promise<T>,
  opts: { retries?: number } = {},
): Promise<T> {
  const retries = opts.retries ?? 20;
  for (let attempt = 0; ; attempt++) {
    try {
      return await db.transaction().execute(work);
    } catch (err) {
      if (!isRetryable(err) || attempt >= retries) throw err;
      // A short randomised pause spreads out writers that collided on the same stream.
      await new Promise((r) => setTimeout(r, Math.random() * Math.min(50, 2 ** attempt)));
    }
  }
}
