/**
 * The agent of one host: everything that touches the host, and nothing public. It takes the host's
 * lock and epoch, opens the host (real or simulated), registers it on first start, and runs its
 * effect worker, QEMU monitor, GPU health checks, Fabric Manager guard and reconciliation. Its
 * presence is what makes the host placeable: API nodes place on it only once this epoch has judged
 * the host against the log (agents.ready_at) and while it heartbeats (src/engine/fleet.ts).
 *
 * `gpuvm agent` runs one of these; `gpuvm serve` runs one for the local host (or one per simulated
 * host with --sim-hosts) beside the API.
 */
import { join } from 'node:path';
import { hostStream, type HostContext } from '../../machines/index.ts';
import type { Config } from '../config.ts';
import type { EffectPolicy } from '../engine/commands.ts';
import { applyEvent, loadSnapshot } from '../engine/commands.ts';
import { createHandlers } from '../engine/handlers.ts';
import { registerHost } from '../engine/hosts.ts';
import { QemuMonitor } from '../engine/monitor.ts';
import { Reconciler } from '../engine/reconcile.ts';
import { HealthMonitor } from '../engine/health.ts';
import { FabricManagerGuard } from '../engine/fabric-manager.ts';
import { EffectWorker, type RetryPolicy } from '../engine/worker.ts';
import { HostAgent } from '../engine/agent.ts';
import { Periodic } from '../engine/periodic.ts';
import { retrying } from '../engine/retrying.ts';
import { HOST_FILES } from '../host/doctor.ts';
import { openSimulatedHost, type HostAdapters } from '../host/host.ts';
import { openRealHost, type HostConfig } from '../host/host-config.ts';
import type { SimBoard } from '../host/sim/sim-host.ts';
import type { Logger } from '../log.ts';
import type { Db } from '../store/db.ts';
import type { VmDefaults } from '../engine/vms.ts';

export interface AgentRole {
  hostId: string;
  host: HostAdapters;
  agent: HostAgent;
  worker: EffectWorker;
  monitor: QemuMonitor;
  health: HealthMonitor;
  fabricManager: FabricManagerGuard;
  reconciler: Reconciler;
  /** The VM sizes this host's config gives, published to API nodes. */
  vmDefaults: VmDefaults;
  /** Resolves once this agent's first reconciliation has judged the host (see the file header). */
  ready: Promise<void>;
  stop(): Promise<void>;
}

export interface AgentRoleOptions {
  log: Logger;
  policy: EffectPolicy & RetryPolicy;
  command: string;
  /** A real host (`--config FILE`). */
  hostConfig?: HostConfig;
  /** Adapters built by the caller (tests). */
  host?: HostAdapters;
  /** A simulated host: its id and board. */
  sim?: { hostId: string; board?: SimBoard };
}

export async function startAgentRole(db: Db, config: Config, opts: AgentRoleOptions): Promise<AgentRole> {
  const { log, policy, hostConfig } = opts;
  const hostId = opts.host?.hostId ?? hostConfig?.hostId ?? opts.sim?.hostId ?? config.hostId;
  const started: (() => Promise<unknown>)[] = [];
  try {
    // One agent per host, before anything on the host or its streams is touched.
    const agentVmDefaults = hostConfig ? { memoryMiB: hostConfig.vm.memoryMiB, vcpus: hostConfig.vm.vcpus, powerdownTimeoutMs: hostConfig.vm.powerdownTimeoutMs } : undefined;
    const host =
      opts.host ??
      (hostConfig ? openRealHost(hostConfig, { bindTimeoutMs: config.bindTimeoutMs, toolTimeoutMs: config.toolTimeoutMs }) : null) ??
      (await openSimulatedHost(
        { hostId, board: opts.sim?.board, dataDir: config.dataDir, qemuBin: config.qemuBin, bindTimeoutMs: config.bindTimeoutMs, toolTimeoutMs: config.toolTimeoutMs },
        log,
      ));
    // VM sizes and the powerdown timeout: the host config file, else the service options.
    const vmDefaults: VmDefaults = {
      memoryMiB: agentVmDefaults?.memoryMiB ?? config.vmMemoryMiB,
      vcpus: agentVmDefaults?.vcpus ?? config.vmVcpus,
      powerdownTimeoutMs: agentVmDefaults?.powerdownTimeoutMs ?? config.powerdownTimeoutMs ?? (host.simulated ? 3000 : 30_000),
    };
    const agent = await HostAgent.start(db, hostId, { command: opts.command, heartbeatMs: config.agentHeartbeatMs, log, vmDefaults: { ...vmDefaults } });
    started.push(() => agent.stop());
    log.info({ hostId, qemu: host.qemuDescription }, 'host adapters ready');

    await registerHost(db.kysely, host, policy, log, { expectedGpus: hostConfig?.expectedGpus, expectedBoard: hostConfig?.board });

    const fabricManager = new FabricManagerGuard(db.kysely, host, policy, { intervalMs: config.fabricManagerCheckMs, log, signal: () => agent.signal });
    const worker = new EffectWorker(db, {
      hostId,
      agent,
      notYetMs: config.notYetMs,
      handlers: createHandlers(host, { fabricManagerWaiting: () => fabricManager.kick() }),
      policy,
      leaseMs: config.leaseMs,
      pollMs: config.pollMs,
      concurrency: config.workerConcurrency,
      log,
    });
    started.push(() => worker.stop());
    await worker.start();
    started.push(() => fabricManager.stop());
    fabricManager.start();
    const monitor = new QemuMonitor(db.kysely, host, policy, config.monitorIntervalMs, log, worker);
    started.push(() => monitor.stop());
    monitor.start();
    const health = new HealthMonitor(db.kysely, host, policy, { intervalMs: config.healthIntervalMs, kernelLog: join(host.fsRoot, HOST_FILES.kernelLog), log });
    started.push(() => health.stop());
    health.start();
    const reconciler = new Reconciler(db.kysely, host, policy, {
      intervalMs: config.reconcileIntervalMs,
      log,
      monitor,
      fabricManagerWaiting: () => fabricManager.kick(),
    });
    started.push(() => reconciler.stop());
    reconciler.start();

    const presence = new Presence(db, agent, reconciler, policy, log);
    // The reconciler first: a presence check waiting for a judgement ends when it stops.
    started.push(async () => {
      await reconciler.stop();
      await presence.stop();
    });
    const ready = presence.start(config.agentHeartbeatMs);
    // Stopped before it was ready: whoever awaits `ready` hears it; nobody else must.
    ready.catch(() => {});

    let stopped = false;
    return {
      hostId,
      host,
      agent,
      worker,
      monitor,
      health,
      fabricManager,
      reconciler,
      vmDefaults,
      ready,
      async stop() {
        if (stopped) return;
        stopped = true;
        // The reconciler first: a presence check waiting for a judgement ends when it stops.
        await reconciler.stop();
        await presence.stop();
        await monitor.stop();
        await health.stop();
        await fabricManager.stop();
        await worker.stop();
        await agent.stop();
      },
    };
  } catch (err) {
    for (const stop of started.reverse()) await stop().catch(() => {});
    throw err;
  }
}

/**
 * The agent's side of its host's place in the fleet. Each epoch judges the host against the log
 * (a reconciliation pass that saw Fabric Manager) before it says it is ready (agents.ready_at), and
 * moves a newly registered host to `ready`. When an API node has recorded the agent silent (a
 * SIGSTOP, a network partition, a long GC pause), the agent reconciles again before it records
 * AGENT_BACK: until then its VMs show `unknown`, because what they did meanwhile is not yet known.
 */
class Presence {
  private periodic: Periodic | null = null;
  private judgedEpoch: number | null = null;
  private stopped = false;

  constructor(
    private readonly db: Db,
    private readonly agent: HostAgent,
    private readonly reconciler: Reconciler,
    private readonly policy: EffectPolicy,
    private readonly log: Logger,
  ) {}

  /** Resolves once the first epoch has judged the host; then checks every `intervalMs`. */
  async start(intervalMs: number): Promise<void> {
    while (this.judgedEpoch === null) {
      if (this.stopped) throw new Error('the agent stopped before its first reconciliation');
      await this.check().catch((err) => {
        if (!this.stopped) this.log.warn({ hostId: this.agent.hostId, err: String(err) }, 'could not declare the host judged yet; trying again');
      });
      // Not yet (the check failed, or the epoch changed under it): try again in a moment.
      if (this.judgedEpoch === null) await new Promise((r) => setTimeout(r, 1000));
    }
    this.periodic = new Periodic(`presence of host ${this.agent.hostId}`, intervalMs, () => this.check(), this.log);
    this.periodic.start();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.periodic?.stop();
  }

  private async check(): Promise<void> {
    const hostId = this.agent.hostId;
    const epoch = this.agent.epoch;
    if (this.agent.signal.aborted) return;
    const snapshot = await loadSnapshot(this.db.kysely, hostStream(hostId));
    const silent = !!(snapshot?.context as unknown as HostContext | undefined)?.silentSince;
    if (this.judgedEpoch === epoch && !silent && snapshot?.state !== 'registered') return;
    // The first judgement may be the start's own pass; after that, a renewed epoch or a silence needs a new one.
    if (this.judgedEpoch === null) await this.reconciler.firstJudgement();
    else await this.reconciler.judge();
    if (this.stopped || this.agent.epoch !== epoch) return;
    if (!(await declareJudged(this.db, this.agent, epoch, this.policy, this.log))) return;
    this.judgedEpoch = epoch;
  }
}

/**
 * Records that `epoch` of this agent has judged its host against the log: agents.ready_at, READY on
 * a newly registered host, AGENT_BACK on one found silent. False if the epoch is no longer the host's.
 */
export async function declareJudged(db: Db, agent: HostAgent, epoch: number, policy: EffectPolicy, log: Logger): Promise<boolean> {
  const hostId = agent.hostId;
  if (!(await agent.markReady(epoch))) return false;
  const meta = { actor: 'gpuvm:agent', correlationId: hostStream(hostId), causationId: null };
  const now = await loadSnapshot(db.kysely, hostStream(hostId));
  if (now?.state === 'registered') await retrying(() => applyEvent(db.kysely, hostStream(hostId), { type: 'READY' }, meta, policy));
  if ((now?.context as unknown as HostContext | undefined)?.silentSince) {
    await retrying(() => applyEvent(db.kysely, hostStream(hostId), { type: 'AGENT_BACK', epoch }, meta, policy));
    log.warn({ hostId, epoch }, 'agent heard again and reconciled: host reachable');
  }
  log.info({ hostId, epoch }, 'host judged against the log: accepting VMs');
  return true;
}
