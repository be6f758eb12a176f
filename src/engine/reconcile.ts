/**
 * Reconciliation: what the log says against what the host shows, at start and every
 * `reconcileIntervalMs`. The log is read first, the host second; a difference becomes an event, and
 * the repair goes through the machines in the safe direction:
 *
 *   - a partition active in `fmpm -l` that no VM holds, or a GPU on vfio-pci (or on no driver) that no
 *     VM holds → DRIFT_DETECTED on a free partition containing it, which takes the GPUs' claims and
 *     repairs: stray QEMU gone first, GPUs back to the host driver, fmpm -d (machines/partition.ts);
 *   - a ready partition whose VM has ended (failed, crashed, deleted) or is unknown: nothing will
 *     release it → DRIFT_DETECTED vm-ended, and it repairs itself once that VM's QEMU is gone;
 *   - a QEMU whose VM is unknown or has ended → DRIFT_DETECTED on the host stream, which stops it;
 *   - a VM marked running whose QEMU is gone → the QEMU monitor's QEMU_EXITED (monitor.ts);
 *   - a VM's ready partition inactive, or its GPUs off vfio-pci → DRIFT_DETECTED on the host stream,
 *     for an operator: the tenant's VM is up, and taking it down is not a safe-direction repair.
 *
 * A QEMU whose observation failed (`unknown`) is neither a stray to stop nor evidence of absence:
 * it is logged, and a partition repair recorded in the same pass waits for it to be observed gone.
 *
 * Partitions between steps are left alone: an effect is in flight and observes before it acts.
 * An observation goes stale the moment it is made, so each drift is applied only if its stream has
 * not moved since the log was read (the stream version), and the claims' primary key turns away a
 * repair whose GPUs a VM claimed meanwhile. A Fabric Manager waiting for its activated list is the
 * guard's business (fabric-manager.ts): the pass skips the partitions then.
 */
import { sql, type Kysely } from 'kysely';
import {
  hostStream,
  partitionStream,
  qemuHasEnded,
  vmStream,
  type HostDrift,
  type HostInventory,
  type PartitionContext,
  type PartitionDrift,
} from '../../machines/index.ts';
import type { HostAdapters } from '../host/host.ts';
import type { RunningQemu } from '../host/qemu.ts';
import type { Logger } from '../log.ts';
import { DuplicateCausationError, type Executor } from '../store/events.ts';
import { isClaimConflict } from '../store/projections.ts';
import type { Database } from '../store/schema.ts';
import { applyEvent, loadSnapshot, type EffectPolicy } from './commands.ts';
import { inTransaction } from './retrying.ts';
import { isWaitingForActivatedList } from './fabric-manager.ts';
import type { QemuMonitor } from './monitor.ts';
import { Periodic } from './periodic.ts';

/** One drift the pass recorded: on which stream, what it is, and what will repair it. */
export interface DriftRecord {
  streamId: string;
  drift: PartitionDrift | HostDrift;
  detail: string;
  repair: string | null;
}

interface PartitionView {
  id: number;
  state: string;
  version: number;
  context: PartitionContext;
}

/** What the log says about one host, read before the host is looked at. */
interface LogView {
  inventory: HostInventory;
  partitions: PartitionView[];
  /** module id → the partition holding its claim. */
  claims: Map<number, number>;
  vmStates: Map<string, string>;
  /** VMs whose stray QEMU is being stopped already. */
  stopping: Set<string>;
}

/** What the host shows. `active` is null while Fabric Manager waits for its activated list. */
interface HostView {
  active: Set<number> | null;
  drivers: Map<string, string | null>;
  /** Every QEMU under the run folder not observed gone: alive, or unknown (its observation failed). */
  qemu: RunningQemu[];
}

/** Drift only reported, valid while the partitions it was judged from have not moved. */
interface Report {
  drift: HostDrift;
  detail: string;
  partitionId: number | null;
  judgedFrom: PartitionView[];
}

/** A partition that needs repairing: why, and the words for the record. */
interface RepairNeed {
  partition: PartitionView;
  drift: PartitionDrift;
  detail: string;
  /** QEMU processes the repair waits for besides the stray ones seen this pass. */
  waitFor?: string[];
}

/** VM states after which nothing will release the VM's partition. */
const vmEnded = (state: string | undefined) => state === undefined || state === 'failed' || state === 'crashed' || state === 'deleted';

export class Reconciler {
  private readonly periodic: Periodic;
  /** Report-only drift recorded by earlier passes and still present (by its words). */
  private reported = new Set<string>();
  private underWay: Promise<DriftRecord[]> | null = null;
  /** A pass has compared the partitions with `fmpm -l` (see firstJudgement). */
  private judged = false;
  private stopped = false;

  constructor(
    private readonly db: Kysely<Database>,
    private readonly host: HostAdapters,
    private readonly policy: EffectPolicy,
    private readonly opts: { intervalMs: number; log: Logger; monitor: QemuMonitor; fabricManagerWaiting?: () => void },
  ) {
    this.periodic = new Periodic(`reconciliation of host ${host.hostId}`, opts.intervalMs, () => this.reconcile(), opts.log);
  }

  /** Starts the periodic passes, the first one now. */
  start(): void {
    this.periodic.start();
    this.periodic.kick();
  }

  /**
   * Resolves after the first pass that judged the partitions against `fmpm -l` (a pass that could
   * not see Fabric Manager, or failed, does not count); until then passes are retried every second.
   */
  async firstJudgement(): Promise<void> {
    if (!this.judged) await this.judge();
  }

  /** Runs passes (every second) until one has judged the partitions against `fmpm -l`. */
  async judge(): Promise<void> {
    this.judged = false;
    while (!this.judged) {
      if (this.stopped) throw new Error('reconciliation stopped before its first pass');
      await this.reconcile().catch((err) => {
        if (!this.stopped) this.opts.log.warn({ hostId: this.host.hostId, err: String(err) }, 'reconciliation pass failed; trying again');
      });
      if (!this.judged) await new Promise((r) => setTimeout(r, 1000));
    }
  }

  stop(): Promise<void> {
    this.stopped = true;
    return this.periodic.stop();
  }

  /** One pass: observe, compare, record the drift found. Returns what it recorded. Passes never overlap. */
  async reconcile(): Promise<DriftRecord[]> {
    while (this.underWay) await this.underWay.catch(() => {});
    this.underWay = this.pass();
    try {
      return await this.underWay;
    } finally {
      this.underWay = null;
    }
  }

  private async pass(): Promise<DriftRecord[]> {
    const log = await this.readLog();
    const seen = await this.observeHost(log.inventory);
    await this.opts.monitor.check();

    const records: DriftRecord[] = [];
    const withoutVm = seen.qemu.filter((q) => {
      const state = log.vmStates.get(q.vmId);
      return state === undefined || qemuHasEnded(state);
    });
    for (const q of seen.qemu) {
      if (q.state !== 'unknown') continue;
      this.opts.log.warn({ hostId: this.host.hostId, vmId: q.vmId, pid: q.pid, error: q.error }, 'cannot observe QEMU; neither stopping it nor counting it gone');
    }
    // Only a QEMU observed alive is stopped; signals need a confirmed process.
    for (const q of withoutVm) {
      if (q.state !== 'alive' || log.stopping.has(q.vmId)) continue;
      const r = await this.recordStrayQemu(q.vmId, q.pid);
      if (r) records.push(r);
    }

    if (seen.active) {
      const { repairs, reports } = this.comparePartitions(log, seen.active, seen.drivers);
      // A repair waits for every QEMU without a VM that was not observed gone, unknown ones included.
      const strayIds = withoutVm.map((q) => q.vmId);
      for (const need of repairs) {
        const r = await this.recordPartitionDrift(need, [...new Set([...(need.waitFor ?? []), ...strayIds])]);
        if (r) records.push(r);
      }
      // A drift only reported stays on the record once, until it goes away.
      const reportedNow = new Set<string>();
      for (const report of reports) {
        reportedNow.add(report.detail);
        if (this.reported.has(report.detail)) continue;
        const r = await this.recordHostDrift(report.drift, report.detail, null, report.partitionId, (tx) => this.unmoved(tx, report.judgedFrom));
        if (r) records.push(r);
      }
      this.reported = reportedNow;
      this.judged = true;
    }
    for (const r of records) this.opts.log.warn({ hostId: this.host.hostId, streamId: r.streamId, drift: r.drift, repair: r.repair }, `drift detected: ${r.detail}`);
    return records;
  }

  private async readLog(): Promise<LogView> {
    const hostId = this.host.hostId;
    const snapshot = await loadSnapshot(this.db, hostStream(hostId));
    if (!snapshot) throw new Error(`host ${hostId} is not registered`);
    const partitions = await sql<{ partition_id: number; state: string; version: number; context: PartitionContext }>`
      select p.partition_id, s.state, s.version, s.context
      from partitions p join streams s on s.stream_id = 'partition:' || p.host_id || ':' || p.partition_id
      where p.host_id = ${hostId}
      order by p.partition_id`.execute(this.db);
    const claims = await this.db.selectFrom('gpu_claims').select(['module_id', 'partition_id']).where('host_id', '=', hostId).execute();
    const vms = await this.db.selectFrom('vms').select(['id', 'state']).where('host_id', '=', hostId).execute();
    const stopping = await this.db
      .selectFrom('effects')
      .select(sql<string>`params->>'vmId'`.as('vm_id'))
      .where('host_id', '=', hostId)
      .where('type', '=', 'stopStrayQemu')
      .where('status', 'in', ['pending', 'running'])
      .execute();
    return {
      inventory: snapshot.context.inventory as unknown as HostInventory,
      partitions: partitions.rows.map((p) => ({ id: p.partition_id, state: p.state, version: p.version, context: p.context })),
      claims: new Map(claims.map((c) => [c.module_id, c.partition_id])),
      vmStates: new Map(vms.map((v) => [v.id, v.state])),
      stopping: new Set(stopping.map((s) => s.vm_id)),
    };
  }

  private async observeHost(inventory: HostInventory): Promise<HostView> {
    let active: Set<number> | null = null;
    try {
      active = new Set((await this.host.fmpm.list()).partitions.filter((p) => p.isActive).map((p) => p.partitionId));
    } catch (err) {
      if (!isWaitingForActivatedList(err)) throw err;
      this.opts.fabricManagerWaiting?.();
    }
    const drivers = new Map<string, string | null>();
    for (const gpu of inventory.gpus) drivers.set(gpu.pciAddress, await this.host.sysfs.driverOf(gpu.pciAddress));
    return { active, drivers, qemu: await this.host.qemu.running() };
  }

  /** The partition drift to repair, and what to report about partitions held by VMs. */
  private comparePartitions(log: LogView, active: Set<number>, drivers: Map<string, string | null>) {
    const repairs: RepairNeed[] = [];
    const reports: Report[] = [];
    const unowned = (p: PartitionView) => p.state === 'free' || p.state === 'quarantined';

    for (const p of log.partitions) {
      if (p.state === 'unrepaired') {
        repairs.push({ partition: p, drift: 'repair-retry', detail: `partition ${p.id}: trying its failed repair again (${p.context.failure ?? 'unknown failure'})` });
      } else if (unowned(p) && active.has(p.id)) {
        repairs.push({ partition: p, drift: 'active-without-owner', detail: `partition ${p.id} is active in fmpm -l but no VM holds it (log: ${p.state})` });
      } else if (p.state === 'ready' && vmEnded(log.vmStates.get(p.context.vmId ?? ''))) {
        const vm = p.context.vmId!;
        const detail = `partition ${p.id} is ready under VM ${vm}, which is ${log.vmStates.get(vm) ?? 'unknown to the log'}`;
        repairs.push({ partition: p, drift: 'vm-ended', detail, waitFor: [vm] });
      } else if (p.state === 'ready') {
        const vm = p.context.vmId;
        if (!active.has(p.id)) {
          reports.push({ drift: 'partition-inactive-under-vm', partitionId: p.id, judgedFrom: [p], detail: `partition ${p.id} of VM ${vm} is not active in fmpm -l` });
        }
        for (const g of p.context.gpus) {
          const driver = drivers.get(g.pciAddress) ?? null;
          if (driver !== 'vfio-pci') {
            const detail = `GPU ${g.pciAddress} (module ${g.moduleId}) of VM ${vm} is on ${driver ?? 'no driver'}, not vfio-pci`;
            reports.push({ drift: 'gpu-not-on-vfio-under-vm', partitionId: p.id, judgedFrom: [p], detail });
          }
        }
      }
    }

    // GPUs off the host driver that no partition claims, and no repair above covers.
    const covered = new Set(repairs.flatMap((r) => r.partition.context.gpus.map((g) => g.moduleId)));
    for (const gpu of log.inventory.gpus) {
      const driver = drivers.get(gpu.pciAddress) ?? null;
      if (driver === this.host.hostDriver || log.claims.has(gpu.moduleId) || covered.has(gpu.moduleId)) continue;
      const detail = `GPU ${gpu.pciAddress} (module ${gpu.moduleId}) is on ${driver ?? 'no driver'} but no VM holds it`;
      // The smallest free partition holding the GPU repairs it, touching as few GPUs as it can.
      const holding = log.partitions.filter((p) => p.context.gpus.some((g) => g.moduleId === gpu.moduleId));
      const repairer = holding.filter((p) => p.state === 'free').sort((a, b) => a.context.gpus.length - b.context.gpus.length || a.id - b.id)[0];
      if (!repairer) {
        reports.push({ drift: 'unrepairable', partitionId: null, judgedFrom: holding, detail: `${detail}, and no free partition holds it to repair it` });
        continue;
      }
      repairs.push({ partition: repairer, drift: 'gpu-off-host-driver', detail });
      for (const g of repairer.context.gpus) covered.add(g.moduleId);
    }
    return { repairs, reports };
  }

  private async recordPartitionDrift(need: RepairNeed, strayQemu: string[]): Promise<DriftRecord | null> {
    const { partition } = need;
    const streamId = partitionStream(this.host.hostId, partition.id);
    try {
      const recorded = await inTransaction(this.db, async (tx) => {
        const snapshot = await loadSnapshot(tx, streamId);
        // Moved since the log was read: the observation may predate the move; the next pass looks again.
        if (snapshot?.version !== partition.version) return false;
        const result = await applyEvent(
          tx,
          streamId,
          { type: 'DRIFT_DETECTED', drift: need.drift, detail: need.detail, strayQemu },
          { actor: 'reconciler', correlationId: streamId, causationId: `drift@${partition.version}` },
          this.policy,
        );
        return result.kind === 'changed';
      });
      if (!recorded) return null;
    } catch (err) {
      // A VM claimed some of these GPUs meanwhile: it owns them now, and its own steps observe the host.
      if (isClaimConflict(err) || err instanceof DuplicateCausationError) return null;
      throw err;
    }
    const waits = strayQemu.length > 0 ? `, after stray QEMU ${strayQemu.join(', ')} is stopped` : '';
    return { streamId, drift: need.drift, detail: need.detail, repair: `GPUs of partition ${partition.id} back to ${this.host.hostDriver} and fmpm -d${waits}` };
  }

  /** Whether these partitions are where the log stood when it was read (the judgement still holds). */
  private async unmoved(tx: Executor, partitions: PartitionView[]): Promise<boolean> {
    for (const p of partitions) {
      const snapshot = await loadSnapshot(tx, partitionStream(this.host.hostId, p.id));
      if (snapshot?.version !== p.version) return false;
    }
    return true;
  }

  private async recordStrayQemu(vmId: string, pid: number): Promise<DriftRecord | null> {
    const detail = `QEMU pid ${pid} runs for ${vmId}, which the log does not know or has ended`;
    return this.recordHostDrift('qemu-without-vm', detail, vmId, null, async (tx) => {
      // Re-read in the transaction: a VM created since the log was read may own this QEMU now.
      const snapshot = await loadSnapshot(tx, vmStream(vmId));
      return snapshot === null || qemuHasEnded(snapshot.state);
    });
  }

  private async recordHostDrift(
    drift: HostDrift,
    detail: string,
    vmId: string | null,
    partitionId: number | null,
    stillTrue: (tx: Executor) => Promise<boolean> = async () => true,
  ): Promise<DriftRecord | null> {
    const streamId = hostStream(this.host.hostId);
    const recorded = await inTransaction(this.db, async (tx) => {
      if (!(await stillTrue(tx))) return false;
      const meta = { actor: 'reconciler', correlationId: streamId, causationId: null };
      const result = await applyEvent(tx, streamId, { type: 'DRIFT_DETECTED', drift, detail, vmId, partitionId }, meta, this.policy);
      return result.kind === 'changed';
    });
    if (!recorded) return null;
    return { streamId, drift, detail, repair: drift === 'qemu-without-vm' ? `stop QEMU of ${vmId}` : null };
  }
}
