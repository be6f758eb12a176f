/**
 * The effect worker of one host: claims due effects from the outbox, runs their handlers, and
 * records each outcome as an event on the stream in the same transaction that marks the effect
 * done. Claims use FOR UPDATE SKIP LOCKED and a lease, so several workers never run one effect at
 * once, and an effect whose worker died becomes due again when its lease runs out. LISTEN/NOTIFY
 * wakes the worker as soon as an effect is committed; a poll interval covers a lost notification,
 * and a timer wakes it when the next delayed effect (a durable timer) falls due.
 *
 * Fencing (src/engine/agent.ts): every lease carries the agent's epoch, and a try's handler gets an
 * AbortSignal that fires the moment its lease is lost or cannot be renewed, or the agent loses its
 * lock; it checks it before each host action. The worker never claims an effect it is still running,
 * and a try whose lease ran out counts against the budget: the last one lost ends in EFFECT_FAILED.
 * A "not yet" answer (NotYet: Fabric Manager starting, a QEMU still exiting, an observation that
 * could not be made) waits — up to `notYetMs` from the first — without spending a try.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { sql, type Kysely } from 'kysely';
import type { Logger } from 'pino';
import { EFFECTS_CHANNEL, PREPARED, type Db } from '../store/db.ts';
import type { Database } from '../store/schema.ts';
import { DuplicateCausationError } from '../store/events.ts';
import { StepBatcher } from '../store/step.ts';
import { applyEvent, LostLeaseError, type ApplyResult, type ClaimedEffect, type ClaimOnWrite, type EffectPolicy } from './commands.ts';
import { retrying } from './retrying.ts';
import { SnapshotCache } from './snapshot-cache.ts';
import type { MachineEvent } from './decide.ts';
import type { Delivery } from '../../machines/index.ts';
import { crashPoint } from './crash-points.ts';

export type { ClaimedEffect };

export interface EffectContext {
  effect: ClaimedEffect;
  log: Logger;
  /** Fires when this try must stop touching the host: its lease is lost or cannot be renewed, or the agent lost its lock. */
  signal: AbortSignal;
}

/** What the worker needs of its agent (src/engine/agent.ts): the epoch its leases carry, and when it is lost. */
export interface AgentLease {
  readonly epoch: number;
  readonly signal: AbortSignal;
  /** After a loss: resolves once the lock is held again, under a new epoch. */
  renew(): Promise<void>;
}

/** This process or the machine ran short (descriptors, memory): the host was not even looked at. */
const SHORT_OF_RESOURCES = new Set(['EMFILE', 'ENFILE', 'EAGAIN', 'ENOMEM']);

/**
 * An answer that says "not yet" rather than "failed": the try waits without counting against the
 * budget. A NotYet of a handler, or — anywhere in the error's causes — a tool or file that could not
 * be opened for lack of resources: an observation that could not be made, not a failure of the host.
 */
export function isNotYet(err: unknown): boolean {
  let e = err as { notYet?: boolean; code?: unknown; cause?: unknown } | undefined;
  for (let depth = 0; e && depth < 8; depth++, e = e.cause as typeof e) {
    if (e.notYet === true || SHORT_OF_RESOURCES.has(String(e.code))) return true;
  }
  return false;
}

/** What a handler reports: usually an event for a stream (its own, or another for cross-stream steps). */
export interface EffectOutcome {
  deliver?: Delivery;
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
  agent: AgentLease;
  /** How long "not yet" answers may go on (from the first) before they count as failed tries. */
  notYetMs: number;
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

/** `<host>/<machine>/<pid>/<random>`: the machine and pid tell a successor whether this worker can still be alive. */
function parseWorkerId(id: string): { machine: string; pid: number } | null {
  const parts = id.split('/');
  return parts.length === 4 && /^\d+$/.test(parts[2]!) ? { machine: parts[1]!, pid: Number(parts[2]) } : null;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** An effects row as the worker runs it. */
function claimedEffect(
  r: { id: string; stream_id: string; host_id: string; type: string; params: Record<string, unknown>; correlation_id: string; attempts: number; max_attempts: number; claimed_at: Date | string | null; waits: number; waiting_since: Date | string | null },
  epoch: number,
  exhausted: boolean,
): ClaimedEffect {
  return {
    id: r.id,
    streamId: r.stream_id,
    hostId: r.host_id,
    type: r.type,
    params: r.params,
    correlationId: r.correlation_id,
    attempt: r.attempts,
    maxAttempts: r.max_attempts,
    claimedAt: new Date(r.claimed_at!),
    epoch,
    waits: r.waits,
    waitingSince: r.waiting_since ? new Date(r.waiting_since) : null,
    exhausted,
  };
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
  /** Effects whose try this worker gave up on (aborted, or its outcome could not be recorded): their leases run out. */
  private readonly abandoned = new Set<string>();
  readonly snapshots: SnapshotCache;
  /** Group commit of the steps this process writes on their own (outcomes, deletes, the monitor's). */
  readonly batcher: StepBatcher;

  constructor(
    private readonly store: Db,
    private readonly opts: WorkerOptions,
  ) {
    this.db = store.kysely;
    this.workerId = `${opts.hostId}/${hostname()}/${process.pid}/${randomBytes(3).toString('hex')}`;
    this.snapshots = opts.snapshots ?? new SnapshotCache();
    this.batcher = new StepBatcher(this.db);
  }

  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    await this.expireDeadLeases();
    this.unlisten = await this.store.listen(EFFECTS_CHANNEL, (hostId) => {
      if (hostId === this.opts.hostId) this.wake();
    });
    this.loop = this.run();
  }

  /**
   * Leases still held on this host's effects by a predecessor whose process is gone (kill -9, crash)
   * are expired now rather than after the lease, so work resumes at once. A predecessor that may
   * still be alive (its pid lives, or it ran on another machine) keeps its lease until it runs out:
   * having lost the agent lock, it is aborting its handlers, and its epoch can no longer write.
   */
  private async expireDeadLeases(): Promise<void> {
    const owners = await this.db
      .selectFrom('effects')
      .select('lease_owner')
      .distinct()
      .where('host_id', '=', this.opts.hostId)
      .where('status', '=', 'running')
      .execute();
    const here = hostname();
    const dead = owners
      .map((o) => o.lease_owner)
      .filter((owner): owner is string => {
        if (owner === null || owner === this.workerId) return false;
        const w = parseWorkerId(owner);
        // This process's own earlier worker is stopped: this one holds the host's lock.
        return w !== null && w.machine === here && (w.pid === process.pid || !processAlive(w.pid));
      });
    if (dead.length === 0) return;
    const { numUpdatedRows } = await this.db
      .updateTable('effects')
      .set({ lease_until: sql`now()` })
      .where('host_id', '=', this.opts.hostId)
      .where('status', '=', 'running')
      .where('lease_owner', 'in', dead)
      .executeTakeFirst();
    if (numUpdatedRows > 0n) this.opts.log.warn({ hostId: this.opts.hostId, effects: Number(numUpdatedRows) }, 'resuming effects left running by a previous process');
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

  /** Launches the effects a committed write handed to this worker that nothing launched (see LocalWorker); returns how many. */
  async adopt(correlationId: string): Promise<number> {
    const orphans = await this.claimOrphans(correlationId);
    for (const e of orphans) this.launch(e);
    return orphans.length;
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
      if (this.opts.agent.signal.aborted) {
        await this.afterAgentLoss();
        continue;
      }
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

  /**
   * The agent lost its lock: the handlers in flight were aborted (their signals follow the agent's).
   * Once they have settled, wait for the lock again; the leases of this worker's old epoch are then
   * expired, so their effects are claimed again (each a lost try) under the new epoch.
   */
  private async afterAgentLoss(): Promise<void> {
    await Promise.allSettled(this.inFlight.values());
    if (!this.running) return;
    await this.opts.agent.renew();
    if (!this.running) return;
    await retrying(() =>
      this.db
        .updateTable('effects')
        .set({ lease_until: sql`now()` })
        .where('host_id', '=', this.opts.hostId)
        .where('status', '=', 'running')
        .where('lease_owner', '=', this.workerId)
        .where('lease_epoch', '<>', String(this.opts.agent.epoch))
        .execute(),
    ).catch((err) => this.opts.log.error({ err: describe(err) }, 'could not expire the leases of the lost epoch; they will run out'));
  }

  private sleep(): Promise<void> {
    if (this.woken || !this.running) {
      this.woken = false;
      return Promise.resolve();
    }
    let wait = this.opts.pollMs;
    if (this.nextDue !== null) wait = Math.max(0, Math.min(wait, this.nextDue - Date.now() + 2));
    const agentLost = this.opts.agent.signal;
    return new Promise<void>((resolve) => {
      const timer = setTimeout(done, wait);
      agentLost.addEventListener('abort', done, { once: true });
      function done() {
        clearTimeout(timer);
        agentLost.removeEventListener('abort', done);
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

  /**
   * Claims up to `limit` due effects under the agent's epoch (none once a newer epoch took the host).
   * An expired lease counts as due and its lost try is recorded; if that was the budget's last try,
   * the effect comes back `exhausted`: its failure is recorded and nothing runs. Never an effect this
   * worker is running now, whatever its lease says.
   */
  async claim(limit: number): Promise<{ claimed: ClaimedEffect[]; nextDue: Date | null }> {
    const epoch = this.opts.agent.epoch;
    const { rows } = await sql<{
      id: string;
      stream_id: string;
      host_id: string;
      type: string;
      params: Record<string, unknown>;
      correlation_id: string;
      attempts: number;
      max_attempts: number;
      waits: number;
      waiting_since: Date | null;
      claimed_at: Date;
      prev_status: string;
      prev_owner: string | null;
      prev_epoch: string | null;
      prev_claimed_at: Date | null;
      exhausted: boolean;
      next_due_ms: number | null;
    }>`${sql.raw(PREPARED)}
      with due as (
        select id, status as prev_status, lease_owner as prev_owner, lease_epoch as prev_epoch, claimed_at as prev_claimed_at,
               status = 'running' and attempts >= max_attempts as exhausted
        from effects
        where host_id = ${this.opts.hostId}
          and ((status = 'pending' and due_at <= now()) or (status = 'running' and lease_until < now()))
          and not (id = any(${[...this.inFlight.keys()]}::text[]))
          and exists (select 1 from agents where host_id = ${this.opts.hostId} and epoch = ${epoch})
        order by due_at, id
        limit ${limit}
        for update skip locked
      )
      , taken as (
        update effects e
        set status = 'running', attempts = case when due.exhausted then e.attempts else e.attempts + 1 end,
            lease_owner = ${this.workerId}, lease_epoch = ${epoch},
            lease_until = now() + make_interval(secs => ${this.opts.leaseMs / 1000}), claimed_at = now()
        from due
        where e.id = due.id
        returning e.id, e.stream_id, e.host_id, e.type, e.params, e.correlation_id, e.attempts, e.max_attempts, e.waits,
                  e.waiting_since, e.claimed_at, due.prev_status, due.prev_owner, due.prev_epoch, due.prev_claimed_at, due.exhausted
      )
      -- The same round trip says how long until the next pending effect not taken here falls due (a
      -- durable timer), measured on the database's clock, so the worker can sleep that long on its
      -- own. With nothing taken, one row carries just that.
      select taken.*, next.due_ms as next_due_ms
      from (select (extract(epoch from (min(due_at) - now())) * 1000)::float8 as due_ms from effects
            where host_id = ${this.opts.hostId} and status = 'pending' and id not in (select id from due)) as next
      left join taken on true`.execute(this.db);

    const dueMs = rows[0]?.next_due_ms;
    const nextDue = dueMs === null || dueMs === undefined ? null : new Date(Date.now() + Math.max(0, Number(dueMs)));
    const takenRows = rows.filter((r) => r.id !== null);
    const lost = takenRows.filter((r) => r.prev_status === 'running');
    if (lost.length > 0) {
      await this.db
        .insertInto('effect_attempts')
        .values(
          lost.map((r) => ({
            effect_id: r.id,
            attempt: r.exhausted ? r.attempts : r.attempts - 1,
            worker: r.prev_owner ?? 'unknown',
            epoch: r.prev_epoch,
            started_at: r.prev_claimed_at ?? r.claimed_at,
            finished_at: r.claimed_at,
            outcome: 'lost' as const,
            error: 'the worker running this try stopped or lost its lease before finishing (lease expired)',
          })),
        )
        .onConflict((oc) => oc.doNothing())
        .execute();
    }
    return { claimed: takenRows.map((r) => claimedEffect(r, epoch, r.exhausted)), nextDue };
  }

  private launch(effect: ClaimedEffect): void {
    // Handed over at commit and found by a claim as well: one run.
    if (this.inFlight.has(effect.id)) return;
    this.abandoned.delete(effect.id);
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
    const log = this.opts.log.child({ effectId: effect.id, effect: effect.type, stream: effect.streamId, correlationId: effect.correlationId, attempt: effect.attempt, epoch: effect.epoch });
    const handler = this.opts.handlers[effect.type];
    const lease = this.watchLease(effect, log);
    let outcome: EffectOutcome | null = null;
    let failure: unknown = null;
    const started = Date.now();
    try {
      if (effect.exhausted) {
        failure = Object.assign(new Error(`try ${effect.attempt} of ${effect.maxAttempts} was lost (its worker stopped or lost its lease); no tries are left`), { retryable: false });
      } else {
        if (!handler) throw Object.assign(new Error(`no handler for effect ${effect.type}`), { retryable: false });
        lease.signal.throwIfAborted();
        crashPoint(`effect:${effect.type}:before-action`);
        outcome = await handler(effect.params, { effect, log, signal: lease.signal });
        crashPoint(`effect:${effect.type}:after-action`);
      }
    } catch (err) {
      failure = err;
    } finally {
      lease.stop();
    }
    // The try stopped before its next host action because it may no longer act (its lease or the
    // agent lock is gone, or the host fence saw a newer epoch act). Nothing is recorded: the lease
    // runs out and the next claim records this try as lost (it counts).
    if (failure !== null && (lease.signal.aborted || (failure as { staleEpoch?: boolean }).staleEpoch === true)) {
      log.warn({ err: describe(lease.signal.aborted ? lease.signal.reason : failure) }, 'try stopped: this worker may no longer act on it');
      this.abandoned.add(effect.id);
      return 0;
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
          next = await this.fail(effect, failure, log, Date.now() - started);
        }
        for (const e of next) this.launch(e);
        return next.length;
      } catch (err) {
        if (err instanceof LostLeaseError) return this.afterLostLease(effect, log);
        if (!this.running || Date.now() + pause > deadline) {
          this.abandoned.add(effect.id);
          throw err;
        }
        log.warn({ err: describe(err), retryInMs: pause }, 'could not record the effect outcome; retrying');
        await new Promise((r) => setTimeout(r, pause));
      }
    }
  }

  /**
   * The close found the lease gone. Either it is (another worker owns the effect now), or an earlier
   * write of this very outcome committed and only its answer was lost (an ambiguous commit: the
   * connection dropped after COMMIT). Read back: if this try is on record as this worker's, the
   * outcome stands, and the follow-ups it handed to this worker are launched.
   */
  private async afterLostLease(effect: ClaimedEffect, log: Logger): Promise<number> {
    const mine = await retrying(() =>
      this.db
        .selectFrom('effect_attempts')
        .select('outcome')
        .where('effect_id', '=', effect.id)
        .where('attempt', '=', effect.attempt)
        .where('worker', '=', this.workerId)
        .where('outcome', '!=', 'lost')
        .executeTakeFirst(),
    ).catch(() => undefined);
    if (!mine) {
      log.warn('lease lost before the outcome was recorded; another worker owns this effect now');
      return 0;
    }
    // Born leased to this worker by that write and never launched: nothing else will run them.
    const followUps = await this.adopt(effect.correlationId);
    log.warn({ followUps }, 'the outcome had been recorded (read back after an ambiguous commit)');
    return followUps;
  }

  /** Effects leased to this worker under this epoch for `correlationId`, not running and not abandoned here. */
  private async claimOrphans(correlationId: string): Promise<ClaimedEffect[]> {
    const rows = await retrying(() =>
      this.db
        .selectFrom('effects')
        .select(['id', 'stream_id', 'host_id', 'type', 'params', 'correlation_id', 'attempts', 'max_attempts', 'claimed_at', 'waits', 'waiting_since'])
        .where('correlation_id', '=', correlationId)
        .where('status', '=', 'running')
        .where('lease_owner', '=', this.workerId)
        .where('lease_epoch', '=', String(this.opts.agent.epoch))
        .execute(),
    );
    return rows.filter((r) => !this.inFlight.has(r.id) && !this.abandoned.has(r.id)).map((r) => claimedEffect(r, this.opts.agent.epoch, false));
  }

  /**
   * The try's lease, renewed every third of it; the signal fires when a renewal finds the lease taken
   * (or the epoch replaced), when no renewal has succeeded for two thirds of a lease (the database is
   * out of reach: the lease may run out before the next one), or when the agent loses its lock.
   */
  private watchLease(effect: ClaimedEffect, log: Logger): { signal: AbortSignal; stop: () => void } {
    const lost = new AbortController();
    const signal = AbortSignal.any([lost.signal, this.opts.agent.signal]);
    let renewedAt = Date.now();
    const every = Math.max(50, this.opts.leaseMs / 3);
    const timer = setInterval(() => {
      if (Date.now() - renewedAt > (this.opts.leaseMs * 2) / 3) {
        lost.abort(new Error(`the lease of effect ${effect.id} could not be renewed for ${Date.now() - renewedAt} ms`));
        return;
      }
      const at = Date.now();
      this.renewLease(effect).then(
        (held) => {
          if (held) renewedAt = Math.max(renewedAt, at);
          else lost.abort(new LostLeaseError(effect.id));
        },
        (err) => log.warn({ err: describe(err) }, 'could not renew the lease; will try again'),
      );
    }, every);
    signal.addEventListener('abort', () => clearInterval(timer), { once: true });
    return { signal, stop: () => clearInterval(timer) };
  }

  /** Whether the lease is still this worker's, under its epoch, and that epoch still the host's. */
  private async renewLease(effect: ClaimedEffect): Promise<boolean> {
    const { rows } = await sql<{ id: string }>`${sql.raw(PREPARED)}
      update effects
      set lease_until = now() + make_interval(secs => ${this.opts.leaseMs / 1000})
      where id = ${effect.id} and status = 'running' and lease_owner = ${this.workerId} and lease_epoch = ${effect.epoch}
        and exists (select 1 from agents a where a.host_id = effects.host_id and a.epoch = ${effect.epoch})
      returning id`.execute(this.db);
    return rows.length > 0;
  }

  /**
   * Closes the effect with no event: one autocommit statement, the effect row and its try together.
   * `wait`: the try answered "not yet": it is recorded as a wait and the effect's attempt count is
   * given back, so it does not count against the budget.
   */
  private async finish(
    effect: ClaimedEffect,
    set: { status: 'done' | 'failed' | 'pending'; error: string | null; dueInMs?: number; note?: string | null; wait?: boolean },
  ): Promise<void> {
    const wait = set.wait === true;
    // The effect row is closed only if this worker still holds its lease under a current epoch, and
    // the try is recorded from the same row (it started when the row was claimed).
    const { rows } = await sql<{ effect_id: string }>`${sql.raw(PREPARED)}
      with closed as (
        update effects
        set status = ${set.status}, lease_owner = null, lease_epoch = null, lease_until = null, last_error = ${set.error}, note = ${set.note ?? null},
            due_at = ${set.dueInMs === undefined ? sql`due_at` : sql`now() + make_interval(secs => ${set.dueInMs / 1000})`},
            completed_at = ${set.status === 'pending' ? null : sql`now()`},
            attempts = attempts - ${wait ? 1 : 0}, waits = waits + ${wait ? 1 : 0},
            waiting_since = ${wait ? sql`coalesce(waiting_since, claimed_at)` : sql`waiting_since`}
        where id = ${effect.id} and status = 'running' and lease_owner = ${this.workerId} and lease_epoch = ${effect.epoch}
          and exists (select 1 from agents a where a.host_id = effects.host_id and a.epoch = ${effect.epoch})
        returning id, claimed_at, waits
      ),
      tried as (
        insert into effect_attempts (effect_id, attempt, wait, worker, epoch, started_at, finished_at, outcome, error)
        select id, ${effect.attempt}, ${wait ? sql`waits` : sql`0`}, ${this.workerId}, ${effect.epoch}, claimed_at, now(),
               ${wait ? 'waiting' : set.status === 'done' ? 'ok' : 'error'}, ${set.error}
        from closed
        -- An exhausted effect's last try was lost and is on record as such: closing it adds none.
        where ${!effect.exhausted})
      select id as effect_id from closed`.execute(this.db);
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
    if (this.opts.agent.signal.aborted) return undefined;
    return { workerId: this.workerId, epoch: this.opts.agent.epoch, hostId: this.opts.hostId, leaseMs: this.opts.leaseMs, limit };
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
            closes: { effectId: effect.id, workerId: this.workerId, epoch: effect.epoch, attempt: effect.attempt, noTry: effect.exhausted, ...close },
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

  private async fail(effect: ClaimedEffect, err: unknown, log: Logger, ranMs: number): Promise<ClaimedEffect[]> {
    const message = describe(err);
    // How long this effect has been answering "not yet", on the database's clock up to this claim.
    const waitedMs = effect.claimedAt.getTime() - (effect.waitingSince ?? effect.claimedAt).getTime() + ranMs;
    if (isNotYet(err) && waitedMs < this.opts.notYetMs) {
      const delay = Math.min(backoffMs(this.opts.policy, effect.waits + 1), 1000);
      log.info({ err: message, retryInMs: delay, waitedMs }, 'not yet; waiting (does not count as a try)');
      await retrying(() => this.finish(effect, { status: 'pending', error: message, dueInMs: delay, wait: true }));
      this.noteDue(new Date(Date.now() + delay));
      return [];
    }
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
