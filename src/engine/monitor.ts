/**
 * Watches the QEMU of every VM that should have one. A QEMU that is gone while its VM is running
 * or stopping becomes QEMU_EXITED on the VM's stream; the machine decides what that means (a crash
 * while running, the expected end while stopping). The check reads the pidfile and /proc, so it
 * works the same for a QEMU this process started and for one it found after a restart.
 */
import type { Kysely } from 'kysely';
import { vmStream } from '../../machines/index.ts';
import type { HostAdapters } from '../host/host.ts';
import type { Logger } from '../log.ts';
import type { Database } from '../store/schema.ts';
import { DuplicateCausationError } from '../store/events.ts';
import { applyEvent, inTransaction, loadSnapshot, type EffectPolicy } from './commands.ts';
import { Periodic } from './periodic.ts';
import { crashPoint } from './crash-points.ts';

export class QemuMonitor {
  private readonly periodic: Periodic;

  constructor(
    private readonly db: Kysely<Database>,
    private readonly host: HostAdapters,
    private readonly policy: EffectPolicy,
    private readonly intervalMs: number,
    private readonly log: Logger,
    /** Called after a commit that wrote effects: the local worker claims them without waiting for NOTIFY. */
    private readonly effectsWritten: () => void = () => {},
  ) {
    this.periodic = new Periodic(`QEMU monitor of host ${host.hostId}`, intervalMs, () => this.check(), log);
  }

  start(): void {
    this.periodic.start();
    // A QEMU this process started reports its exit: no waiting for the next pass.
    this.host.qemu.onExit(() => this.periodic.kick());
  }

  stop(): Promise<void> {
    return this.periodic.stop();
  }

  /** One pass: every VM whose QEMU should be alive, checked against the host. */
  async check(): Promise<void> {
    const vms = await this.db
      .selectFrom('vms')
      .select(['id', 'state'])
      .where('host_id', '=', this.host.hostId)
      .where('state', 'in', ['running', 'stopping'])
      .execute();
    for (const vm of vms) {
      const status = await this.host.qemu.status(vm.id);
      if (status.running) continue;
      const recorded = await inTransaction(this.db, async (tx) => {
        const { snapshot } = await loadSnapshot(tx, vmStream(vm.id));
        if (!snapshot || (snapshot.state !== 'running' && snapshot.state !== 'stopping')) return false;
        try {
          // One observation per stream version: a second monitor pass cannot record it twice.
          const result = await applyEvent(
            tx,
            vmStream(vm.id),
            { type: 'QEMU_EXITED', how: 'process gone' },
            { actor: 'monitor', correlationId: vm.id, causationId: `monitor@${snapshot.version}` },
            this.policy,
          );
          if (result.kind === 'changed') this.log.warn({ vmId: vm.id, from: snapshot.state, to: result.snapshot.state }, 'QEMU process is gone');
          return result.kind === 'changed';
        } catch (err) {
          if (!(err instanceof DuplicateCausationError)) throw err;
          return false;
        }
      });
      if (recorded) {
        crashPoint('event:QEMU_EXITED:after-commit');
        this.effectsWritten();
      }
    }
  }
}
