/**
 * What an API node watches in the fleet, from the database alone (any number of API nodes may run
 * it; each change is an event guarded by its stream's version, so two nodes never record it twice):
 *
 *   - an agent silent past `silentMs` → AGENT_SILENT on its host: nothing is placed there (placement
 *     checks the heartbeat itself too) and its VMs show `unknown`. The agent records AGENT_BACK once
 *     it is heard again and has reconciled (src/roles/agent.ts);
 *   - a draining host with no live VM and no claimed GPU → DRAINED: it is in maintenance.
 */
import { sql, type Kysely } from 'kysely';
import { hostStream } from '../../machines/index.ts';
import type { Logger } from '../log.ts';
import type { Database } from '../store/schema.ts';
import { applyEvent, type EffectPolicy } from './commands.ts';
import { Periodic } from './periodic.ts';
import { retrying } from './retrying.ts';

export class FleetWatch {
  private readonly periodic: Periodic;

  constructor(
    private readonly db: Kysely<Database>,
    private readonly policy: EffectPolicy,
    private readonly opts: { intervalMs: number; silentMs: number; log: Logger },
  ) {
    this.periodic = new Periodic('fleet watch', opts.intervalMs, () => this.pass(), opts.log);
  }

  start(): void {
    this.periodic.start();
    this.periodic.kick();
  }

  stop(): Promise<void> {
    return this.periodic.stop();
  }

  /** One look at the fleet; returns what it recorded. */
  async pass(): Promise<{ silent: string[]; drained: string[] }> {
    const { rows: silent } = await sql<{ id: string; heartbeat_at: Date | null }>`
      select h.id, a.heartbeat_at from hosts h left join agents a on a.host_id = h.id
      where h.state <> 'removed' and h.silent_since is null
        and (a.heartbeat_at is null or a.heartbeat_at < now() - make_interval(secs => ${this.opts.silentMs / 1000}))
      order by h.id`.execute(this.db);
    const { rows: drained } = await sql<{ id: string }>`
      select h.id from hosts h
      where h.state = 'draining'
        and not exists (select 1 from vms v where v.host_id = h.id and v.state not in ('deleted', 'failed', 'crashed'))
        and not exists (select 1 from gpu_claims c where c.host_id = h.id)
      order by h.id`.execute(this.db);
    const recorded = { silent: [] as string[], drained: [] as string[] };
    const meta = (id: string) => ({ actor: 'gpuvm:fleet-watch', correlationId: hostStream(id), causationId: null });
    for (const h of silent) {
      const lastHeartbeat = h.heartbeat_at ? new Date(h.heartbeat_at).toISOString() : new Date(0).toISOString();
      const r = await retrying(() => applyEvent(this.db, hostStream(h.id), { type: 'AGENT_SILENT', lastHeartbeat, limitMs: this.opts.silentMs }, meta(h.id), this.policy));
      if (r.kind === 'changed') {
        recorded.silent.push(h.id);
        this.opts.log.warn({ hostId: h.id, lastHeartbeat, silentMs: this.opts.silentMs }, 'host unreachable: its agent is silent; nothing is placed there and its VMs show unknown');
      }
    }
    for (const h of drained) {
      const r = await retrying(() => applyEvent(this.db, hostStream(h.id), { type: 'DRAINED' }, meta(h.id), this.policy));
      if (r.kind === 'changed') {
        recorded.drained.push(h.id);
        this.opts.log.info({ hostId: h.id }, 'host drained: in maintenance');
      }
    }
    return recorded;
  }
}
