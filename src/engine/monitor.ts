/**
 * Watches the QEMU of every VM that should have one. A QEMU that is gone while its VM is running,
 * stopping, or failed to stop becomes QEMU_EXITED on the VM's stream; the machine decides what that
 * means (a crash while running, the expected end while stopping). The check reads the pidfile and /proc, so it
 * works the same for a QEMU this process started and for one it found after a restart. Only an
 * observed `gone` is an exit: an observation that failed (`unknown`) is logged and made again on
 * the next pass.
 */
import type { Kysely } from 'kysely';
import { vmStream } from '../../machines/index.ts';
import type { HostAdapters } from '../host/host.ts';
import type { Logger } from '../log.ts';
import type { Database } from '../store/schema.ts';
import { DuplicateCausationError } from '../store/events.ts';
import { applyEvent, loadSnapshot, type EffectPolicy, type LocalWorker } from './commands.ts';
import { retrying } from './retrying.ts';
import { Periodic } from './periodic.ts';
import { crashPoint } from './crash-points.ts';

/**
 * The states in which a VM's QEMU should be alive: its exit there is news. `stopFailed`: the QEMU
 * would not stop, or could not be seen gone; seeing it gone is what lets the VM release its GPUs.
 */
const WATCHED = ['running', 'stopping', 'stopFailed'];
const qemuShouldRun = (state: string) => WATCHED.includes(state);

export class QemuMonitor {
  private readonly periodic: Periodic;
  /** VMs whose QEMU this process saw exit since the last pass: a pass prompted by them checks just these. */
  private exited = new Set<string>();
  private lastFullPass = 0;

  constructor(
    private readonly db: Kysely<Database>,
    private readonly host: HostAdapters,
    private readonly policy: EffectPolicy,
    private readonly intervalMs: number,
    private readonly log: Logger,
    /** The effect worker of this process: it runs the effects QEMU_EXITED asks for without a claim. */
    private readonly worker: LocalWorker | null = null,
  ) {
    this.periodic = new Periodic(`QEMU monitor of host ${host.hostId}`, intervalMs, () => this.pass(), log);
  }

  start(): void {
    this.periodic.start();
    // A QEMU this process started reports its exit: no waiting for the next pass.
    this.host.qemu.onExit((vmId) => {
      this.exited.add(vmId);
      this.periodic.kick();
    });
  }

  stop(): Promise<void> {
    return this.periodic.stop();
  }

  /**
   * A full pass once an interval has gone by since the last; otherwise, when exits were reported,
   * just those VMs (no read of the vms table between a QEMU's exit and its QEMU_EXITED).
   */
  private pass(): Promise<void> {
    const reported = [...this.exited];
    this.exited.clear();
    if (reported.length > 0 && Date.now() - this.lastFullPass < this.intervalMs) return this.check(reported);
    this.lastFullPass = Date.now();
    return this.check();
  }

  /** One pass: every VM whose QEMU should be alive (or just `vmIds`), checked against the host. */
  async check(vmIds?: string[]): Promise<void> {
    const vms =
      vmIds?.map((id) => ({ id })) ??
      (await this.db
        .selectFrom('vms')
        .select(['id', 'state'])
        .where('host_id', '=', this.host.hostId)
        .where('state', 'in', WATCHED)
        .execute());
    for (const vm of vms) {
      const status = await this.host.qemu.status(vm.id);
      if (status.state === 'alive') continue;
      if (status.state === 'unknown') {
        // A failed read is not an exit: record nothing, look again on the next pass.
        this.log.warn({ vmId: vm.id, pid: status.pid, error: status.error }, 'cannot observe QEMU; checking again on the next pass');
        continue;
      }
      const streamId = vmStream(vm.id);
      const result = await retrying(async () => {
        const cached = this.worker?.snapshots.get(streamId);
        const snapshot = cached && qemuShouldRun(cached.state) ? cached : await loadSnapshot(this.db, streamId);
        if (!snapshot || !qemuShouldRun(snapshot.state)) return null;
        try {
          // One observation per stream version: a second monitor pass cannot record it twice.
          return await applyEvent(
            this.db,
            streamId,
            { type: 'QEMU_EXITED', how: 'process gone' },
            { actor: 'monitor', correlationId: vm.id, causationId: `monitor@${snapshot.version}` },
            this.policy,
            { snapshot, snapshots: this.worker?.snapshots, batcher: this.worker?.batcher, claimFor: this.worker?.claimOnWrite() },
          );
        } catch (err) {
          if (!(err instanceof DuplicateCausationError)) throw err;
          return null;
        }
      });
      if (result?.kind === 'changed') {
        this.log.warn({ vmId: vm.id, to: result.snapshot.state }, 'QEMU process is gone');
        crashPoint('event:QEMU_EXITED:after-commit');
        this.worker?.handOver(result);
      }
    }
  }
}
