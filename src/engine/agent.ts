/**
 * One agent per host, enforced, and fenced by epochs.
 *
 * On Postgres the agent of host H holds a session advisory lock keyed by H on a connection of its own
 * for as long as it runs; a second agent for H finds the lock taken and refuses to start, naming the
 * holder (the `agents` row). On the embedded database one process owns the data folder
 * (src/store/data-dir.ts), which is the same guarantee.
 *
 * Each start takes the next epoch of its host (agents.epoch). Every effect's lease carries the epoch
 * it was taken under, and a write that closes an effect is refused unless that epoch is still the
 * host's current one (src/store/step.ts), so an agent that lost its lock — its connection cut during
 * a Postgres failover, say, while it kept running — cannot record anything once a successor started.
 * The lock's connection is checked every heartbeat; when it is lost, `signal` fires: the worker aborts
 * the handlers in flight and stops claiming, and `renew()` waits for the lock again under a new epoch.
 */
import { createHash } from 'node:crypto';
import { hostname } from 'node:os';
import type { Logger } from '../log.ts';
import type { Db, Session } from '../store/db.ts';

export class AgentConflictError extends Error {
  override name = 'AgentConflictError';
}

/** The advisory lock's key for a host: 64 bits of a hash, as a bigint string. */
export function agentLockKey(hostId: string): string {
  return createHash('sha256').update(`gpuvm-agent:${hostId}`).digest().readBigInt64BE(0).toString();
}

interface AgentRow {
  epoch: string;
  pid: number;
  machine: string;
  command: string;
  started_at: Date;
  heartbeat_at: Date;
}

export interface AgentOptions {
  command: string;
  /** Published for API nodes that place VMs on this host (agents.vm_defaults). */
  vmDefaults?: Record<string, unknown>;
  /** How often the lock's connection is checked and the heartbeat written. */
  heartbeatMs: number;
  log: Logger;
}

export class HostAgent {
  private controller = new AbortController();
  private timer: NodeJS.Timeout | null = null;
  private stopped = false;

  private constructor(
    private readonly db: Db,
    readonly hostId: string,
    private readonly opts: AgentOptions,
    private session: Session,
    /** This agent's epoch: changes only when the lock was lost and taken again. */
    public epoch: number,
  ) {}

  /** Takes the host's lock and its next epoch, or throws AgentConflictError naming the holder. */
  static async start(db: Db, hostId: string, opts: AgentOptions): Promise<HostAgent> {
    const taken = await take(db, hostId, opts);
    if ('holder' in taken) throw new AgentConflictError(conflictMessage(hostId, taken.holder));
    const agent = new HostAgent(db, hostId, opts, taken.session, taken.epoch);
    agent.watch();
    opts.log.info({ hostId, epoch: taken.epoch }, 'agent lock taken');
    return agent;
  }

  /** Fires when this epoch's lock is lost; a renewed lease has a new signal. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** After a loss: waits until the lock can be taken again, under a new epoch. */
  async renew(): Promise<void> {
    for (let pause = 200; !this.stopped; pause = Math.min(pause * 2, 5000)) {
      try {
        const taken = await take(this.db, this.hostId, this.opts);
        if ('session' in taken) {
          this.session = taken.session;
          this.epoch = taken.epoch;
          this.controller = new AbortController();
          this.watch();
          this.opts.log.warn({ hostId: this.hostId, epoch: taken.epoch }, 'agent lock taken again under a new epoch');
          return;
        }
        this.opts.log.error({ hostId: this.hostId }, conflictMessage(this.hostId, taken.holder));
      } catch (err) {
        this.opts.log.warn({ hostId: this.hostId, err: String(err) }, 'cannot take the agent lock yet; retrying');
      }
      await new Promise((r) => setTimeout(r, pause));
    }
  }

  /**
   * This epoch has judged the host against the log (its first reconciliation): API nodes may place
   * on it. A renewed epoch starts unjudged again. False if the epoch is no longer the host's.
   */
  async markReady(epoch: number): Promise<boolean> {
    const r = await this.session.query('update agents set ready_at = now() where host_id = $1 and epoch = $2', [this.hostId, String(epoch)]);
    return (r.rowCount ?? 0) > 0;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.controller.abort(new Error('the agent is stopping'));
    // Closing the session drops the advisory lock; the row stays as the record of the last holder.
    await this.session.close();
  }

  private watch(): void {
    const session = this.session;
    const epoch = this.epoch;
    const lose = (why: string) => {
      if (this.controller.signal.aborted || this.session !== session) return;
      if (this.timer) clearInterval(this.timer);
      this.timer = null;
      this.opts.log.error({ hostId: this.hostId, epoch, why }, 'agent lock lost: stopping every host action of this epoch');
      this.controller.abort(new Error(`agent lock of host ${this.hostId} lost (epoch ${epoch}): ${why}`));
      void session.close();
    };
    session.closed.addEventListener('abort', () => lose('its database connection closed'), { once: true });
    if (this.timer) clearInterval(this.timer);
    this.timer = setInterval(() => {
      session
        .query('update agents set heartbeat_at = now() where host_id = $1 and epoch = $2', [this.hostId, String(epoch)])
        .then(
          (r) => {
            if (r.rowCount === 0) lose(`a newer agent took the host (epoch > ${epoch})`);
          },
          (err) => lose(`heartbeat failed: ${String(err)}`),
        );
    }, this.opts.heartbeatMs);
    this.timer.unref();
  }
}

async function take(db: Db, hostId: string, opts: Pick<AgentOptions, 'command' | 'vmDefaults'>): Promise<{ session: Session; epoch: number } | { holder: AgentRow | null }> {
  const session = await db.openSession();
  try {
    if (db.kind === 'postgres') {
      const { rows } = await session.query<{ ok: boolean }>('select pg_try_advisory_lock($1::bigint) as ok', [agentLockKey(hostId)]);
      if (!rows[0]?.ok) {
        const held = await session.query<AgentRow>('select epoch::text, pid, machine, command, started_at, heartbeat_at from agents where host_id = $1', [hostId]);
        await session.close();
        return { holder: held.rows[0] ?? null };
      }
    }
    const { rows } = await session.query<{ epoch: string }>(
      `insert into agents (host_id, epoch, pid, machine, command, started_at, heartbeat_at, ready_at, vm_defaults)
       values ($1, 1, $2, $3, $4, now(), now(), null, $5)
       on conflict (host_id) do update
         set epoch = agents.epoch + 1, pid = excluded.pid, machine = excluded.machine, command = excluded.command,
             started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, ready_at = null, vm_defaults = excluded.vm_defaults
       returning epoch::text`,
      [hostId, process.pid, hostname(), opts.command, opts.vmDefaults ? JSON.stringify(opts.vmDefaults) : null],
    );
    return { session, epoch: Number(rows[0]!.epoch) };
  } catch (err) {
    await session.close();
    throw err;
  }
}

function conflictMessage(hostId: string, holder: AgentRow | null): string {
  if (!holder) return `host ${hostId} already has a running agent (its advisory lock is held); stop it first`;
  return `host ${hostId} already has a running agent: \`gpuvm ${holder.command}\` (pid ${holder.pid} on ${holder.machine}, epoch ${holder.epoch}, since ${new Date(holder.started_at).toISOString()}, last heartbeat ${new Date(holder.heartbeat_at).toISOString()}); stop it first`;
}
