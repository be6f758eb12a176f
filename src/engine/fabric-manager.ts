/**
 * Fabric Manager restarted in resiliency mode waits (60 s on NVIDIA's default) for the hypervisor
 * to declare which partitions are active, refuses every other call meanwhile, and exits if nobody
 * answers. gpuvm knows the answer from its own log: the partitions whose activation was confirmed
 * and whose deactivation was not. This guard notices the restart (periodically, and at once when an
 * effect handler sees Fabric Manager refuse a call) and answers with `fmpm --set-activated-list`.
 */
import type { Kysely } from 'kysely';
import { hostStream } from '../../machines/index.ts';
import { FmpmError } from '../host/fmpm.ts';
import type { HostAdapters } from '../host/host.ts';
import type { Logger } from '../log.ts';
import type { Database } from '../store/schema.ts';
import { applyEvent, type EffectPolicy } from './commands.ts';
import { inTransaction } from './retrying.ts';
import { Periodic } from './periodic.ts';

/**
 * Partition states in which Fabric Manager has (or may still have) the partition active. A partition
 * under repair may still run under a stray QEMU until the repair has seen it gone: declaring it active
 * errs in the safe direction (the repair deactivates it afterwards), declaring it inactive would take
 * it away from under a live VM.
 */
export const ACTIVE_IN_LOG = ['confirmingActive', 'binding', 'ready', 'unbinding', 'deactivating', 'confirmingInactive', 'broken', 'repairing', 'unrepaired'];

/** What Fabric Manager answers while it waits for the activated list. */
export function isWaitingForActivatedList(err: unknown): boolean {
  return err instanceof FmpmError && err.code === 'not-configured';
}

export class FabricManagerGuard {
  private readonly periodic: Periodic;

  constructor(
    private readonly db: Kysely<Database>,
    private readonly host: HostAdapters,
    private readonly policy: EffectPolicy,
    /** `signal`: the agent's (src/engine/agent.ts); once it fires this process may no longer answer Fabric Manager. */
    private readonly opts: { intervalMs: number; log: Logger; signal?: () => AbortSignal },
  ) {
    this.periodic = new Periodic(`Fabric Manager check of host ${host.hostId}`, opts.intervalMs, () => this.check(), opts.log);
  }

  start(): void {
    this.periodic.start();
  }

  stop(): Promise<void> {
    return this.periodic.stop();
  }

  /** Checks now unless a check is under way; never throws. */
  kick(): void {
    this.periodic.kick();
  }

  /** One look at Fabric Manager; answers a restart. */
  async check(): Promise<'running' | 'answered' | 'unreachable'> {
    try {
      await this.host.fmpm.list();
      return 'running';
    } catch (err) {
      if (!isWaitingForActivatedList(err)) {
        this.opts.log.warn({ hostId: this.host.hostId, err: String(err) }, 'Fabric Manager is not answering');
        return 'unreachable';
      }
    }
    const rows = await this.db
      .selectFrom('partitions')
      .select('partition_id')
      .where('host_id', '=', this.host.hostId)
      .where('state', 'in', ACTIVE_IN_LOG)
      .orderBy('partition_id')
      .execute();
    const activatedList = rows.map((r) => r.partition_id);
    // A host action: not from an agent that lost its lock (its successor answers from the same log).
    this.opts.signal?.().throwIfAborted();
    await this.host.fmpm.setActivatedList(activatedList);
    await inTransaction(this.db, (tx) =>
      applyEvent(tx, hostStream(this.host.hostId), { type: 'FABRIC_MANAGER_RESTARTED', activatedList }, { actor: 'fabric-manager-guard', correlationId: hostStream(this.host.hostId), causationId: null }, this.policy),
    );
    this.opts.log.warn({ hostId: this.host.hostId, activatedList }, 'Fabric Manager restarted: gave it the activated partitions from the log');
    return 'answered';
  }
}
