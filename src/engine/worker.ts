/**
 * The effect worker of one host: claims due effects from the outbox, runs their handlers, and
 * records each outcome as an event on the stream in the same transaction that marks the effect
 * done. Claims use FOR UPDATE SKIP LOCKED and a lease, so several workers never run one effect at
 * once, and an effect whose worker died becomes due again when its lease runs out. LISTEN/NOTIFY
 * wakes the worker as soon as an effect is committed; a poll interval covers a lost notification,
 * and a timer wakes it when the next delayed effect (a durable timer) falls due.
 */
import { randomBytes } from 'node:crypto';
import { sql, type Kysely } from 'kysely';
import type { Logger } from 'pino';
import { EFFECTS_CHANNEL, PREPARED, type Db } from '../store/db.ts';
import type { Database } from '../store/schema.ts';
import { DuplicateCausationError } from '../store/events.ts';
import { StepBatcher } from '../store/step.ts';
import { applyEvent, LostLeaseError, retrying, SnapshotCache, type ApplyResult, type ClaimedEffect, type ClaimOnWrite, type EffectPolicy } from './commands.ts';
import type { MachineEvent } from './decide.ts';
import { crashPoint } from './crash-points.ts';

export type { ClaimedEffect };

export interface EffectContext {
  effect: ClaimedEffect;
  log: Logger;
}

/** What a handler reports: usually an event for a stream (its own, or another for cross-stream steps). */
export interface EffectOutcome {
  deliver?: { streamId: string; event: MachineEvent };
  note?: string;
}

export type EffectHandler = (params: any, ctx: EffectContext) => Promise<EffectOutcome>;
export type EffectHandlers = Record<string, EffectHandler>;

export interface RetryPolicy extends EffectPolicy {
  backoffBaseMs: number;
  backoffMaxMs: number;
}

export interface WorkerOptions {
  hostId: string;
  handlers: EffectHandlers;
  policy: RetryPolicy;
  leaseMs: number;
  pollMs: number;
  concurrency: number;
  log: Logger;
  /** Snapshots shared with the other writers of this process (requests, monitor); see SnapshotCache. */
  snapshots?: SnapshotCache;
}

/** An error a handler throws when trying again cannot help (bad input, a refused operation). */
export function isPermanent(err: unknown): boolean {
  return (err as { retryable?: boolean })?.retryable === false;
}

export function backoffMs(policy: RetryPolicy, attempt: number): number {
  const ceiling = Math.min(policy.backoffMaxMs, policy.backoffBaseMs * 2 ** (attempt - 1));
  // "Equal jitter": at least half the ceiling, so retries neither stampede nor starve.
  return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
}

function describe(err: unknown): string {
  if (err instanceof Error) {
    const code = (err as { code?: unknown }).code;
    return code && !err.message.includes(String(code)) ? `${String(code)}: ${err.message}` : err.message;
  }
  return String(err);
}

export class EffectWorker {
  readonly workerId: string;
  private readonly db: Kysely<Database>;
  private running = false;
  private inFlight = new Map<string, Promise<void>>();
  private wakeUp: (() => void) | null = null;
  private woken = false;
  private unlisten: (() => Promise<void>) | null = null;
  private loop: Promise<void> | null = null;
  /** When the earliest effect left pending on this host falls due, as far as this worker knows. */
  private nextDue: number | null = null;
  /** The last claim filled every free slot: more may be due, so a freed slot should claim again. */
  private backlog = false;
  readonly snapshots: SnapshotCache;
  /** Group commit of the steps this process writes on their own (outcomes, deletes, the monitor's). */
  readonly batcher: StepBatcher;

  constructor(
    private readonly store: Db,
    private readonly opts: WorkerOptions,
  ) {
    this.db = store.kysely;
    this.workerId = `${opts.hostId}/${process.pid}/${randomBytes(3).toString('hex')}`;
    this.snapshots = opts.snapshots ?? new SnapshotCache();
    this.batcher = new StepBatcher(this.db);
  }

  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    // One agent per host: leases still held on this host's effects belong to a predecessor that
    // died (kill -9, crash). Expire them now rather than after the lease, so work resumes at once.
    const { numUpdatedRows } = await this.db
      .updateTable('effects')
      .set({ lease_until: sql`now()` })
      .where('host_id', '=', this.opts.hostId)
      .where('status', '=', 'running')
      .executeTakeFirst();
    if (numUpdatedRows > 0n) this.opts.log.warn({ hostId: this.opts.hostId, effects: Number(numUpdatedRows) }, 'resuming effects left running by a previous process');
    this.unlisten = await this.store.listen(EFFECTS_CHANNEL, (hostId) => {
      if (hostId === this.opts.hostId) this.wake();
    });
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.wake();
    await this.loop;
    await Promise.allSettled(this.inFlight.values());
    await this.unlisten?.();
  }

  wake(): void {
    this.woken = true;
    this.wakeUp?.();
  }

  /**
   * What a writer of this process committed: its snapshot is kept, the effects it handed over (see
   * ClaimOnWrite) are launched, and those it left pending on this host are scheduled.
   */
  handOver(result: ApplyResult): void {
    if (result.kind !== 'changed') return;
    // Committed now, so the next step of the stream need not read it back.
    this.snapshots.remember(result.snapshot);
    for (const effect of result.claimed) this.launch(effect);
    if (result.pendingDueAt) this.noteDue(result.pendingDueAt);
  }

  /** An effect of this host falls due at `at`: wake then (or now). */
  noteDue(at: Date): void {
    const due = at.getTime();
    if (due <= Date.now()) {
      this.wake();
    } else if (this.nextDue === null || due < this.nextDue) {
      this.nextDue = due;
      this.wake(); // to sleep again, until the earlier time
    }
  }

  private async run(): Promise<void> {
    while (this.running) {
      try {
        const room = this.opts.concurrency - this.inFlight.size;
        this.backlog = room <= 0;
        if (room > 0) {
          const { claimed, nextDue } = await this.claim(room);
          for (const effect of claimed) this.launch(effect);
          this.nextDue = nextDue?.getTime() ?? null;
          this.backlog = claimed.length === room;
          if (this.backlog) continue;
        }
      } catch (err) {
        // The database may be restarting; keep the worker alive and try again after a pause.
        this.opts.log.error({ err: describe(err), hostId: this.opts.hostId }, 'effect worker could not claim; retrying');
      }
      await this.sleep();
    }
  }

  private sleep(): Promise<void> {
    if (this.woken || !this.running) {
      this.woken = false;
      return Promise.resolve();
    }
    let wait = this.opts.pollMs;
    if (this.nextDue !== null) wait = Math.max(0, Math.min(wait, this.nextDue - Date.now() + 2));
    return new Promise<void>((resolve) => {
      const timer = setTimeout(done, wait);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wakeUp = () => {
        this.wakeUp = null;
        done();
      };
    }).then(() => {
      this.woken = false;
    });
  }

  /** Claims up to `limit` due effects; an expired lease counts as due and its lost try is recorded. */
  async claim(limit: number): Promise<{ claimed: ClaimedEffect[]; nextDue: Date | null }> {
    const { rows } = await sql<{
      id: string;
      stream_id: string;
      host_id: string;
      type: string;
      params: Record<string, unknown>;
      correlation_id: string;
      attempts: number;
      max_attempts: number;
      claimed_at: Date;
      prev_status: string;
      prev_owner: string | null;
      prev_claimed_at: Date | null;
      next_due: Date | null;
    }>`${sql.raw(PREPARED)}
      with due as (
        select id, status as prev_status, lease_owner as prev_owner, claimed_at as prev_claimed_at
        from effects
        where host_id = ${this.opts.hostId}
          and ((status = 'pending' and due_at <= now()) or (status = 'running' and lease_until < now()))
        order by due_at, id
        limit ${limit}
        for update skip locked
      )
      , taken as (
        update effects e
        set status = 'running', attempts = e.attempts + 1, lease_owner = ${this.workerId},
            lease_until = now() + make_interval(secs => ${this.opts.leaseMs / 1000}), claimed_at = now()
        from due
        where e.id = due.id
        returning e.id, e.stream_id, e.host_id, e.type, e.params, e.correlation_id, e.attempts, e.max_attempts,
                  e.claimed_at, due.prev_status, due.prev_owner, due.prev_claimed_at
      )
      -- The same round trip says when the next pending effect not taken here falls due (a durable
      -- timer), so the worker can sleep until then. With nothing taken, one row carries just that.
      select taken.*, next.due as next_due
      from (select min(due_at) as due from effects
            where host_id = ${this.opts.hostId} and status = 'pending' and id not in (select id from due)) as next
      left join taken on true`.execute(this.db);

    const nextDue = rows[0]?.next_due ? new Date(rows[0].next_due) : null;
    const takenRows = rows.filter((r) => r.id !== null);
    const lost = takenRows.filter((r) => r.prev_status === 'running');
    if (lost.length > 0) {
      await this.db
        .insertInto('effect_attempts')
        .values(
          lost.map((r) => ({
            effect_id: r.id,
            attempt: r.attempts - 1,
            worker: r.prev_owner ?? 'unknown',
            started_at: r.prev_claimed_at ?? r.claimed_at,
            finished_at: r.claimed_at,
            outcome: 'lost' as const,
            error: 'the worker running this try stopped before finishing (lease expired)',
          })),
        )
        .onConflict((oc) => oc.doNothing())
        .execute();
    }
    const claimed = takenRows.map((r) => ({
      id: r.id,
      streamId: r.stream_id,
      hostId: r.host_id,
      type: r.type,
      params: r.params,
      correlationId: r.correlation_id,
      attempt: r.attempts,
      maxAttempts: r.max_attempts,
      claimedAt: new Date(r.claimed_at),
    }));
    return { claimed, nextDue };
  }

  private launch(effect: ClaimedEffect): void {
    const task = this.execute(effect)
      .catch((err) => {
        this.opts.log.error({ err: describe(err), effectId: effect.id, correlationId: effect.correlationId }, 'effect outcome not recorded; the lease will make it due again');
        return 0;
      })
      .then((handedOff) => {
        this.inFlight.delete(effect.id);
        // A freed slot claims again only if effects may be waiting for one; a follow-up took it otherwise.
        if (handedOff === 0 && this.backlog) this.wake();
      });
    this.inFlight.set(effect.id, task);
  }

  /**
   * Runs one claimed effect to a recorded outcome, then launches the follow-ups handed to it;
   * returns how many. Exposed for tests that drive effects by hand.
   */
  async execute(effect: ClaimedEffect): Promise<number> {
    const log = this.opts.log.child({ effectId: effect.id, effect: effect.type, stream: effect.streamId, correlationId: effect.correlationId, attempt: effect.attempt });
    const handler = this.opts.handlers[effect.type];
    const renew = setInterval(() => void this.renewLease(effect.id).catch(() => {}), Math.max(50, this.opts.leaseMs / 3));
    let outcome: EffectOutcome | null = null;
    let failure: unknown = null;
    const started = Date.now();
    try {
      if (!handler) throw Object.assign(new Error(`no handler for effect ${effect.type}`), { retryable: false });
      crashPoint(`effect:${effect.type}:before-action`);
      outcome = await handler(effect.params, { effect, log });
      crashPoint(`effect:${effect.type}:after-action`);
    } catch (err) {
      failure = err;
    } finally {
      clearInterval(renew);
    }
    // The host has been changed; recording the outcome must not be lost to a database that is
    // restarting. Keep trying while the lease would still be ours, then let the lease decide.
    const deadline = Date.now() + this.opts.leaseMs;
    for (let pause = 100; ; pause = Math.min(pause * 2, 2000)) {
      try {
        let next: ClaimedEffect[];
        if (failure === null) {
          next = await this.complete(effect, outcome!);
          if (outcome!.deliver) crashPoint(`event:${outcome!.deliver.event.type}:after-commit`);
          log.info({ ms: Date.now() - started, deliver: outcome?.deliver?.event.type }, 'effect done');
        } else {
          next = await this.fail(effect, failure, log);
        }
        for (const e of next) this.launch(e);
        return next.length;
      } catch (err) {
        if (err instanceof LostLeaseError) {
          log.warn('lease lost before the outcome was recorded; another worker owns this effect now');
          return 0;
        }
        if (!this.running || Date.now() + pause > deadline) throw err;
        log.warn({ err: describe(err), retryInMs: pause }, 'could not record the effect outcome; retrying');
        await new Promise((r) => setTimeout(r, pause));
      }
    }
  }

  private async renewLease(id: string): Promise<void> {
    await this.db
      .updateTable('effects')
      .set({ lease_until: sql`now() + make_interval(secs => ${this.opts.leaseMs / 1000})` })
      .where('id', '=', id)
      .where('lease_owner', '=', this.workerId)
      .where('status', '=', 'running')
      .execute();
  }

  /** Closes the effect with no event: one autocommit statement, the effect row and its try together. */
  private async finish(
    effect: ClaimedEffect,
    set: { status: 'done' | 'failed' | 'pending'; error: string | null; dueInMs?: number; note?: string | null },
  ): Promise<void> {
    // The effect row is closed only if this worker still holds its lease, and the try is recorded
    // from the same row (it started when the row was claimed).
    const { rows } = await sql<{ effect_id: string }>`${sql.raw(PREPARED)}
      with closed as (
        update effects
        set status = ${set.status}, lease_owner = null, lease_until = null, last_error = ${set.error}, note = ${set.note ?? null},
            due_at = ${set.dueInMs === undefined ? sql`due_at` : sql`now() + make_interval(secs => ${set.dueInMs / 1000})`},
            completed_at = ${set.status === 'pending' ? null : sql`now()`}
        where id = ${effect.id} and status = 'running' and lease_owner = ${this.workerId}
        returning id, claimed_at
      )
      insert into effect_attempts (effect_id, attempt, worker, started_at, finished_at, outcome, error)
      select id, ${effect.attempt}, ${this.workerId}, claimed_at, now(), ${set.status === 'done' ? 'ok' : 'error'}, ${set.error}
      from closed
      returning effect_id`.execute(this.db);
    if (rows.length === 0) throw new LostLeaseError(effect.id);
  }

  /**
   * Direct hand-off: the effects a write asks for, due now on this host, are born leased to this
   * worker and launched as soon as the write commits (see ClaimOnWrite). A crash after the commit
   * leaves them leased, and start-up expires this host's leases: nothing is lost. `completing`: the
   * caller is an effect of this worker whose slot is about to be free.
   */
  claimOnWrite(completing = false): ClaimOnWrite | undefined {
    const limit = this.opts.concurrency - this.inFlight.size + (completing ? 1 : 0);
    if (!this.running || limit <= 0) return undefined;
    return { workerId: this.workerId, hostId: this.opts.hostId, leaseMs: this.opts.leaseMs, limit };
  }

  /**
   * Records the outcome's event and closes the effect in one statement. When the event changes
   * nothing, is refused (a late outcome for a state that has moved on: a timer after the VM
   * stopped, say) or was already delivered, the effect is closed alone and its row says why.
   */
  private async record(effect: ClaimedEffect, streamId: string, event: MachineEvent, close: { status: 'done' | 'failed'; error: string | null; note: string | null }): Promise<ClaimedEffect[]> {
    let ignored: string | null = null;
    try {
      const result = await retrying(() =>
        applyEvent(
          this.db,
          streamId,
          event,
          { actor: `effect:${effect.type}`, correlationId: effect.correlationId, causationId: effect.id },
          this.opts.policy,
          {
            snapshots: this.snapshots,
            batcher: this.batcher,
            claimFor: this.claimOnWrite(true),
            closes: { effectId: effect.id, workerId: this.workerId, attempt: effect.attempt, ...close },
          },
        ),
      );
      if (result.kind === 'changed') {
        if (result.pendingDueAt) this.noteDue(result.pendingDueAt);
        return result.claimed;
      }
      if (result.kind === 'rejected') ignored = `ignored ${event.type}: ${result.reason}`;
    } catch (err) {
      if (!(err instanceof DuplicateCausationError)) throw err;
      ignored = `already delivered to ${streamId}`;
    }
    await retrying(() => this.finish(effect, { ...close, note: [close.note, ignored].filter(Boolean).join('; ') || null }));
    return [];
  }

  private async complete(effect: ClaimedEffect, outcome: EffectOutcome): Promise<ClaimedEffect[]> {
    const note = outcome.note ?? null;
    if (outcome.deliver) return this.record(effect, outcome.deliver.streamId, outcome.deliver.event, { status: 'done', error: null, note });
    await retrying(() => this.finish(effect, { status: 'done', error: null, note }));
    return [];
  }

  private async fail(effect: ClaimedEffect, err: unknown, log: Logger): Promise<ClaimedEffect[]> {
    const message = describe(err);
    const exhausted = effect.attempt >= effect.maxAttempts || isPermanent(err);
    if (!exhausted) {
      const delay = backoffMs(this.opts.policy, effect.attempt);
      log.warn({ err: message, retryInMs: delay }, 'effect failed; will retry');
      await retrying(() => this.finish(effect, { status: 'pending', error: message, dueInMs: delay }));
      this.noteDue(new Date(Date.now() + delay));
      return [];
    }
    log.error({ err: message }, 'effect failed for good');
    const next = await this.record(effect, effect.streamId, { type: 'EFFECT_FAILED', effect: effect.type, error: message }, { status: 'failed', error: message, note: null });
    crashPoint('event:EFFECT_FAILED:after-commit');
    return next;
  }
}
