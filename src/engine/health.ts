/**
 * GPU health: Xid lines in the kernel log and a failed fabric state in nvidia-smi quarantine the
 * GPU's module on the host stream, so placement stops using every partition that contains it.
 * Each Xid line is recorded once (its hash is the event's causation); a failed fabric state is
 * recorded whenever the module is not already quarantined, so clearing a GPU that is still bad
 * quarantines it again on the next pass.
 */
import { createHash } from 'node:crypto';
import { open, stat } from 'node:fs/promises';
import type { Kysely } from 'kysely';
import { hostStream, type HostContext } from '../../machines/index.ts';
import { parseXidLines } from '../host/doctor.ts';
import type { HostAdapters } from '../host/host.ts';
import type { Logger } from '../log.ts';
import { DuplicateCausationError } from '../store/events.ts';
import type { Database } from '../store/schema.ts';
import { applyEvent, loadSnapshot, type EffectPolicy } from './commands.ts';
import { inTransaction } from './retrying.ts';
import type { MachineEvent } from './decide.ts';
import { Periodic } from './periodic.ts';

export class HealthMonitor {
  private readonly periodic: Periodic;
  /** How far the kernel log has been read; a shorter file (rotated) starts over. */
  private kernelLogOffset = 0;

  constructor(
    private readonly db: Kysely<Database>,
    private readonly host: HostAdapters,
    private readonly policy: EffectPolicy,
    private readonly opts: { intervalMs: number; kernelLog: string; log: Logger },
  ) {
    this.periodic = new Periodic(`GPU health check of host ${host.hostId}`, opts.intervalMs, () => this.check(), opts.log);
  }

  start(): void {
    this.periodic.start();
  }

  stop(): Promise<void> {
    return this.periodic.stop();
  }

  /** One pass over the kernel log and nvidia-smi. */
  async check(): Promise<void> {
    const snapshot = await loadSnapshot(this.db, hostStream(this.host.hostId));
    if (!snapshot) return;
    const gpus = (snapshot.context as unknown as HostContext).inventory?.gpus ?? [];
    const moduleOf = (pci: string) => gpus.find((g) => g.pciAddress === pci || g.pciAddress.slice(0, -2) === pci.slice(0, -2));

    for (const xid of parseXidLines(await this.readNewKernelLog())) {
      const gpu = moduleOf(xid.pciAddress);
      if (!gpu) continue;
      const causation = `xid:${createHash('sha256').update(xid.line).digest('hex').slice(0, 24)}`;
      await this.report({ type: 'GPU_UNHEALTHY', moduleId: gpu.moduleId, pciAddress: gpu.pciAddress, source: 'xid', reason: `Xid ${xid.xid}: ${xid.line.trim()}` }, causation);
    }

    const report = await this.host.nvidiaSmi.query();
    for (const g of report.gpus) {
      const f = g.fabric;
      if (!f || !(f.state === 'Failed' || (f.state === 'Completed' && f.status !== 'Success'))) continue;
      const gpu = moduleOf(g.pciAddress);
      if (!gpu) continue;
      await this.report({ type: 'GPU_UNHEALTHY', moduleId: gpu.moduleId, pciAddress: gpu.pciAddress, source: 'fabric', reason: `fabric state ${f.state}, status ${f.status}` }, null);
    }
  }

  private async report(event: MachineEvent, causationId: string | null): Promise<void> {
    try {
      const result = await inTransaction(this.db, (tx) =>
        applyEvent(tx, hostStream(this.host.hostId), event, { actor: 'health', correlationId: hostStream(this.host.hostId), causationId }, this.policy),
      );
      if (result.kind === 'changed') this.opts.log.warn({ hostId: this.host.hostId, moduleId: event.moduleId, reason: event.reason }, 'GPU quarantined');
    } catch (err) {
      if (!(err instanceof DuplicateCausationError)) throw err;
    }
  }

  private async readNewKernelLog(): Promise<string> {
    let size: number;
    try {
      size = (await stat(this.opts.kernelLog)).size;
    } catch {
      return '';
    }
    if (size < this.kernelLogOffset) this.kernelLogOffset = 0;
    if (size === this.kernelLogOffset) return '';
    const file = await open(this.opts.kernelLog, 'r');
    try {
      const buf = Buffer.alloc(size - this.kernelLogOffset);
      await file.read(buf, 0, buf.length, this.kernelLogOffset);
      // Only whole lines: a line being written now is read on the next pass.
      const text = buf.toString('utf8');
      const end = text.lastIndexOf('\n') + 1;
      this.kernelLogOffset += Buffer.byteLength(text.slice(0, end));
      return text.slice(0, end);
    } finally {
      await file.close();
    }
  }
}
