/**
 * Random schedules for the property test (test/schedules.test.ts): what a schedule is, how one runs
 * against a simulated host, and what "at rest" must look like afterwards.
 *
 * A schedule is a short list of commands — VM creates (1/2/4/8 GPUs), deletes (at once, or once the
 * VM runs), pauses (so the next command lands at a random step of the lifecycles in flight), host
 * faults (fmpm activation/deactivation failures, Fabric Manager down, unbind EBUSY, a QEMU killed,
 * Fabric Manager restarted, also right after a successful `fmpm -a`, a QEMU hung on system_powerdown),
 * engine faults (the agent's open-file limit lowered to what it has open; its database connections
 * cut, or on PGlite the process paused past its lease; a second `gpuvm serve` for the same folder
 * or host, which must be refused) and crashes of the service. One simulated host and one database serve
 * many schedules: each schedule ends by clearing the faults and deleting what is left, then the
 * invariants are checked, so the next one starts from a host at rest — which is exactly the claim
 * under test.
 *
 * Crashes are real: a schedule that holds crashes runs on a `gpuvm serve` child process from its
 * first command; each crash SIGKILLs it and starts the next one (a child again, or, after the last
 * crash, the in-process service, which resumes from the log and is the one the checks read through).
 * A fault that acts on the agent's process (fdLimit; leaseLoss on PGlite) needs a child too: such a
 * schedule starts one the same way, and ends it with SIGTERM before the clean-up so the in-process
 * service resumes. Other schedules run on the in-process service, cheaper by one process start.
 */
import { execFile, spawn } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import fc from 'fast-check';
import { sql } from 'kysely';
import pg from 'pg';
import { partitionStream, vmStream } from '../../machines/index.ts';
import { partitionHoldsClaim } from '../../machines/partition.ts';
import { JOURNAL_FILE, type JournalLine } from '../../src/host/fence.ts';
import { canonical, fold, sameJson } from '../../src/engine/decide.ts';
import { clearQuarantine } from '../../src/engine/hosts.ts';
import { verifyHistory, formatProblem } from '../../src/engine/verify.ts';
import { QEMU_STANDIN } from '../../src/host/host.ts';
import { Qemu } from '../../src/host/qemu.ts';
import { loadSimHost, restartFabricManager, stopSimKernel, writeFaults, type SimHostInfo } from '../../src/host/sim/sim-host.ts';
import { retryPolicy, startService, type Service } from '../../src/service.ts';
import { LOG_START, readLog, readStreams } from '../../src/store/events.ts';
import { claimRows, hostRow, partitionRow, vmRow, type StreamSnapshot } from '../../src/store/projections.ts';
import { freePort, http, startServeChild, type ServeChild } from './child.ts';
import { freshDatabaseUrl } from './db.ts';
import { quietLog, tempDir, testConfig, waitUntil } from './env.ts';
import { hostPicture } from './invariants.ts';

// ── what a schedule is ───────────────────────────────────────────────────────

/** A VM of this schedule by creation index (taken modulo the number created), or a partition id, or every partition. */
export type Target = { vm: number } | { partition: number } | 'all';

export type Command =
  | { do: 'create'; gpus: 1 | 2 | 4 | 8 }
  | { do: 'delete'; vm: number; when: 'now' | 'running' }
  | { do: 'wait'; ms: number }
  | { do: 'crash' }
  | { do: 'activateFails'; target: Target }
  | { do: 'deactivateFails'; target: Target; fmReturn: number }
  | { do: 'fmDown' }
  | { do: 'unbindBusy'; target: { vm: number } | { gpu: number } }
  | { do: 'killQemu'; vm: number }
  | { do: 'fmRestart' }
  | { do: 'clearFaults'; what: 'fmpm' | 'sysfs' | 'all' }
  /** The agent's open-file limit lowered to what it has open, for `ms` (needs the service in a child). */
  | { do: 'fdLimit'; ms: number }
  /** The VM's QEMU swallows system_powerdown: no answer, no POWERDOWN, no SHUTDOWN. */
  | { do: 'hungQmp'; vm: number }
  /** Postgres: the agent's database connections cut; PGlite: the serve child paused (SIGSTOP) `pauseMs`, past its lease. */
  | { do: 'leaseLoss'; pauseMs: number }
  /** A second `gpuvm serve` on the same data folder (and, on Postgres, one for the same host in another folder): each must be refused. */
  | { do: 'secondAgent' }
  /** Fabric Manager restarts between the next successful `fmpm -a` and its confirmation. */
  | { do: 'fmRestartAfterActivate' };

export type FaultKind =
  | 'activateFails'
  | 'deactivateFails'
  | 'fmDown'
  | 'unbindBusy'
  | 'killQemu'
  | 'fmRestart'
  | 'fdLimit'
  | 'hungQmp'
  | 'leaseLoss'
  | 'secondAgent'
  | 'fmRestartAfterActivate';
export const FAULT_KINDS: readonly FaultKind[] = [
  'activateFails',
  'deactivateFails',
  'fmDown',
  'unbindBusy',
  'killQemu',
  'fmRestart',
  'fdLimit',
  'hungQmp',
  'leaseLoss',
  'secondAgent',
  'fmRestartAfterActivate',
];

/** Faults that need the service in a `gpuvm serve` child (prlimit and SIGSTOP act on a process; PGlite has no connections to cut). */
export const needsChild = (c: Command, postgres: boolean): boolean => c.do === 'crash' || c.do === 'fdLimit' || (c.do === 'leaseLoss' && !postgres);

export interface Schedule {
  commands: Command[];
  /**
   * How the schedule ends when faults are still in place: 'clear-first' clears them, then deletes
   * what is left; 'delete-first' deletes under them for a while first, so the release steps meet
   * them too (and a partition may end broken, which costs a fresh host).
   */
  finish: 'clear-first' | 'delete-first';
}

/** What this schedule's faults were aimed at, to tell whether a failure is one of theirs. */
export interface FaultTargets {
  activateFails: Set<number>;
  deactivateFails: Set<number>;
  /** PCI addresses whose unbind answers EBUSY. */
  unbindBusy: Set<string>;
  fmDown: boolean;
  fmRestart: boolean;
  /** Windows [from, to] (Date.now()) in which the agent's open-file limit was lowered. */
  fdLimit: [number, number][];
  /** Tries lost to a cut connection or a pause past the lease. */
  leaseLoss: boolean;
  fmRestartAfterActivate: boolean;
}

/**
 * Whether an injected fault explains a failure recorded on a partition (its `failure`, which a
 * failed VM's reason repeats). Read from machines/partition.ts and src/engine/handlers.ts: a step
 * fails for good on a refusal that cannot be retried (fmpm -a/-d answering an injected error), or
 * when a retryable one outlasts the effect's retries (Fabric Manager down or restarted and not yet
 * answered, an unbind that stays EBUSY past the bind timeout). Nothing injected explains a partition
 * that fmpm -l shows in the wrong state after a successful -a or -d, nor a QEMU that fails to start.
 */
export function faultExplains(failure: string, partition: { id: number; pcis: string[] }, t: FaultTargets): boolean {
  // Descriptors exhausted: a tool that could not be spawned, a sysfs file or a pidfile that could
  // not be opened. Only the fault says EMFILE.
  if (/EMFILE|too many open files/i.test(failure)) return t.fdLimit.length > 0;
  // Lost tries count against the budget: the cut or the pause loses every try in flight.
  if (/was lost \(its worker stopped or lost its lease\); no tries are left/.test(failure)) return t.leaseLoss;
  if (/connection-not-valid|cannot-connect/.test(failure)) return t.fmDown || t.deactivateFails.has(partition.id);
  if (/not-configured/.test(failure)) return t.fmRestart || t.fmRestartAfterActivate;
  if (/^activatePartition: .*fmReturn -24/.test(failure)) return t.activateFails.has(partition.id);
  if (/^deactivatePartition: .*fmReturn -1\b/.test(failure)) return t.deactivateFails.has(partition.id);
  if (/^(prepareGpus|bindVfio|bindHost|repairPartition): /.test(failure)) return partition.pcis.some((pci) => t.unbindBusy.has(pci));
  return false;
}

const vmIndex = fc.nat({ max: 7 });
/** Weights of aiming at a VM of the schedule (its partition), at a partition id, at every partition. */
const target = (vm: number, partition: number, all: number): fc.Arbitrary<Target> =>
  fc.oneof(
    { weight: vm, arbitrary: vmIndex.map((i) => ({ vm: i })) },
    // Placement is deterministic (lowest id among the best-packed), so these are the ids VMs get.
    { weight: partition, arbitrary: fc.constantFrom(1, 2, 4, 5, 8, 9, 10).map((id) => ({ partition: id })) },
    { weight: all, arbitrary: fc.constant('all' as const) },
  );
const create = fc.constantFrom(1, 2, 4, 8).map((gpus) => ({ do: 'create', gpus }) as Command);
const lifecycleCommand: fc.Arbitrary<Command> = fc.oneof(
  { weight: 4, arbitrary: create },
  { weight: 4, arbitrary: fc.record({ vm: vmIndex, when: fc.constantFrom('now', 'running') }).map((c) => ({ do: 'delete', ...c }) as Command) },
  { weight: 4, arbitrary: fc.integer({ min: 0, max: 900 }).map((ms) => ({ do: 'wait', ms }) as Command) },
);
const FAULT_COMMANDS: { kind: FaultKind | 'clearFaults'; weight: number; arbitrary: fc.Arbitrary<Command> }[] = [
  // Activation matters for VMs created after the fault, so mostly every partition or a likely id;
  // deactivation for VMs already there, so mostly a VM's partition.
  // Weights: the host faults at six times their old weights; the engine's own faults: fdLimit costs a `gpuvm serve` child start (~3 CPU
  // seconds) and secondAgent one or two refused ones, so they are rarer than the host's faults.
  { kind: 'activateFails', weight: 12, arbitrary: target(1, 2, 3).map((t) => ({ do: 'activateFails', target: t }) as Command) },
  { kind: 'deactivateFails', weight: 6, arbitrary: fc.record({ target: target(3, 1, 1), fmReturn: fc.constantFrom(-1, -9) }).map((c) => ({ do: 'deactivateFails', ...c }) as Command) },
  { kind: 'fmDown', weight: 12, arbitrary: fc.constant({ do: 'fmDown' } as Command) },
  {
    kind: 'unbindBusy',
    weight: 12,
    arbitrary: fc
      .oneof(vmIndex.map((vm) => ({ vm })), fc.nat({ max: 7 }).map((gpu) => ({ gpu })))
      .map((t) => ({ do: 'unbindBusy', target: t }) as Command),
  },
  { kind: 'killQemu', weight: 18, arbitrary: vmIndex.map((vm) => ({ do: 'killQemu', vm }) as Command) },
  { kind: 'fmRestart', weight: 12, arbitrary: fc.constant({ do: 'fmRestart' } as Command) },
  { kind: 'clearFaults', weight: 18, arbitrary: fc.constantFrom('fmpm', 'sysfs', 'all').map((what) => ({ do: 'clearFaults', what }) as Command) },
  { kind: 'fdLimit', weight: 4, arbitrary: fc.integer({ min: 300, max: 2000 }).map((ms) => ({ do: 'fdLimit', ms }) as Command) },
  { kind: 'hungQmp', weight: 8, arbitrary: vmIndex.map((vm) => ({ do: 'hungQmp', vm }) as Command) },
  { kind: 'leaseLoss', weight: 8, arbitrary: fc.integer({ min: 2000, max: 3000 }).map((pauseMs) => ({ do: 'leaseLoss', pauseMs }) as Command) },
  { kind: 'secondAgent', weight: 2, arbitrary: fc.constant({ do: 'secondAgent' } as Command) },
  { kind: 'fmRestartAfterActivate', weight: 8, arbitrary: fc.constant({ do: 'fmRestartAfterActivate' } as Command) },
];
/** The fault commands, or (GPUVM_SCHEDULE_FAULTS=kind,… to aim a run at some) only those of the kinds named. */
function faultCommand(only?: readonly string[]): fc.Arbitrary<Command> {
  const chosen = only && only.length > 0 ? FAULT_COMMANDS.filter((f) => only.includes(f.kind)) : FAULT_COMMANDS;
  if (chosen.length === 0) throw new Error(`no fault kind among ${JSON.stringify(only)}; kinds: ${FAULT_COMMANDS.map((f) => f.kind).join(', ')}`);
  return fc.oneof(...chosen.map(({ weight, arbitrary }) => ({ weight, arbitrary })));
}

/** Where crashes go: none in most schedules (each costs a process start), one or two in the rest. */
export interface ScheduleShape {
  /** Relative weights of schedules with no host faults, with faults, and with crashes. */
  plain: number;
  faulty: number;
  crashing: number;
}

export function scheduleArbitrary(shape: ScheduleShape, onlyFaults?: readonly string[]): fc.Arbitrary<Schedule> {
  const faults = faultCommand(onlyFaults);
  const body = (withFaults: boolean) =>
    fc.array(withFaults ? fc.oneof({ weight: 3, arbitrary: lifecycleCommand }, { weight: 2, arbitrary: faults }) : lifecycleCommand, { minLength: 1, maxLength: 6 });
  // Every schedule starts with a create: a schedule with no VM checks nothing new.
  const finish = fc.constantFrom('clear-first' as const, 'delete-first' as const);
  const plain = fc.tuple(create, body(false), finish).map(([first, rest, f]) => ({ commands: [first, ...rest], finish: f }));
  const faulty = fc.tuple(create, body(true), finish).map(([first, rest, f]) => ({ commands: [first, ...rest], finish: f }));
  const crashing = fc
    .tuple(
      create,
      fc.boolean().chain((f) => body(f)),
      fc.oneof({ weight: 4, arbitrary: fc.tuple(fc.nat({ max: 16 })) }, { weight: 1, arbitrary: fc.tuple(fc.nat({ max: 16 }), fc.nat({ max: 16 })) }),
      finish,
    )
    .map(([first, rest, at, f]) => {
      const commands = [first, ...rest];
      for (const p of at) commands.splice(1 + (p % commands.length), 0, { do: 'crash' });
      return { commands, finish: f };
    });
  return fc.oneof({ weight: shape.plain, arbitrary: plain }, { weight: shape.faulty, arbitrary: faulty }, { weight: shape.crashing, arbitrary: crashing });
}

export function describeCommand(c: Command): string {
  const t = (x: Target | { vm: number } | { gpu: number }) => (x === 'all' ? 'all' : 'vm' in x ? `vm#${x.vm}` : 'gpu' in x ? `gpu#${x.gpu}` : `partition ${x.partition}`);
  switch (c.do) {
    case 'create':
      return `create ${c.gpus} GPU(s)`;
    case 'delete':
      return `delete vm#${c.vm}${c.when === 'running' ? ' once running' : ''}`;
    case 'wait':
      return `wait ${c.ms} ms`;
    case 'crash':
      return 'crash (SIGKILL gpuvm serve)';
    case 'activateFails':
      return `fmpm -a fails on ${t(c.target)}`;
    case 'deactivateFails':
      return `fmpm -d fails (${c.fmReturn}) on ${t(c.target)}`;
    case 'fmDown':
      return 'Fabric Manager down';
    case 'unbindBusy':
      return `unbind EBUSY on ${t(c.target)}`;
    case 'killQemu':
      return `kill -9 QEMU of vm#${c.vm} once it runs`;
    case 'fmRestart':
      return 'Fabric Manager restarts';
    case 'clearFaults':
      return `clear ${c.what} faults`;
    case 'fdLimit':
      return `open-file limit of gpuvm lowered to its open descriptors for ${c.ms} ms`;
    case 'hungQmp':
      return `QEMU of vm#${c.vm} ignores system_powerdown`;
    case 'leaseLoss':
      return `lease loss (Postgres: cut gpuvm's connections; PGlite: pause the child ${c.pauseMs} ms)`;
    case 'secondAgent':
      return 'a second gpuvm serve on the same data folder (and on Postgres, for the same host in another folder)';
    case 'fmRestartAfterActivate':
      return 'Fabric Manager restarts right after the next successful fmpm -a';
  }
}

// ── the host the schedules run on ────────────────────────────────────────────

/**
 * Fast timings (testConfig's, and startServeChild's for the child), with three changes: a bind
 * that stays EBUSY gives up after 500 ms instead of 3 s, so an unbind fault costs seconds, not
 * tens of them; the worker polls every second instead of every 200 ms (LISTEN/NOTIFY wakes it) and
 * the QEMU monitor looks every 200 ms instead of 100, which together halve what an idle service
 * costs between the schedule's commands (measured: 6.5% of a core on Postgres, 14% on PGlite).
 */
const SERVICE_OPTIONS = { qemuBin: QEMU_STANDIN, bindTimeoutMs: 500, pollMs: 1000, monitorIntervalMs: 200, fabricManagerCheckMs: 5000, toolTimeoutMs: 10_000 } as const;
const CHILD_ENV = {
  GPUVM_QEMU: QEMU_STANDIN,
  GPUVM_POLL_MS: '1000',
  GPUVM_MONITOR_INTERVAL_MS: '200',
  GPUVM_BIND_TIMEOUT_MS: '500',
  GPUVM_FM_CHECK_MS: '5000',
  GPUVM_TOOL_TIMEOUT_MS: '10000',
  GPUVM_HEALTH_INTERVAL_MS: '3600000',
  // As testConfig: reconciliation runs once at start (after every crash), not on a timer.
  GPUVM_RECONCILE_INTERVAL_MS: '3600000',
  GPUVM_LOG_LEVEL: 'warn',
};
/** For a pause past the lease on PGlite: a short lease and a fast heartbeat, so 2–3 s of SIGSTOP outlasts them. */
const SHORT_LEASE_ENV = { GPUVM_LEASE_MS: '1500', GPUVM_AGENT_HEARTBEAT_MS: '300' };

/**
 * The QMP stand-in's fault file (qemu-standin.mjs reads GPUVM_STANDIN_FAULTS on each command). One
 * per test process: the lanes share process.env, and the in-process services' QEMUs inherit it; VM
 * ids are unique, so the lanes' entries never collide. Written whole, synchronously (no interleaving).
 */
const STANDIN_FAULTS = join(tmpdir(), `gpuvm-standin-faults-${process.pid}.json`);
process.env.GPUVM_STANDIN_FAULTS = STANDIN_FAULTS;
(CHILD_ENV as Record<string, string>).GPUVM_STANDIN_FAULTS = STANDIN_FAULTS;

function setHangPowerdown(vmIds: string[], on: boolean): void {
  let current: string[] = [];
  try {
    current = (JSON.parse(readFileSync(STANDIN_FAULTS, 'utf8')) as { hangPowerdown?: string[] }).hangPowerdown ?? [];
  } catch {}
  const next = on ? [...new Set([...current, ...vmIds])] : current.filter((id) => !vmIds.includes(id));
  const tmp = `${STANDIN_FAULTS}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify({ hangPowerdown: next }));
  renameSync(tmp, STANDIN_FAULTS);
}

const BIN = fileURLToPath(new URL('../../bin/gpuvm.js', import.meta.url));
const run$ = promisify(execFile);

/**
 * One simulated host with its database, served by the in-process service or by a `gpuvm serve`
 * child. QEMU is the QMP stand-in: it exits on system_powerdown, so a delete does not wait for the
 * powerdown timeout and quit → SIGTERM, and it starts in one node process instead of a TCG guest.
 */
export class ScheduleHost {
  service: Service | null = null;
  child: ServeChild | null = null;
  /** The adapter the test uses to see and kill QEMU processes (reads pidfiles; never starts one). */
  readonly qemu: Qemu;
  readonly simRoot: string;
  sim!: SimHostInfo;
  private port = 0;
  /** The environment of this schedule's children beyond CHILD_ENV. */
  private childEnv: Record<string, string> = {};
  /** The fence journal as far as the checks have read it, and what it said per key so far. */
  journal = { offset: 0, last: new Map<string, { epoch: number; generation: number; effectId: string }>(), open: new Map<string, JournalLine>() };

  private constructor(
    readonly dataDir: string,
    private readonly db: { url: string | undefined; drop: () => Promise<void> },
  ) {
    this.qemu = new Qemu({ bin: QEMU_STANDIN, runRoot: join(dataDir, 'run', 'sim-b200'), accel: 'tcg' });
    this.simRoot = join(dataDir, 'sim', 'sim-b200');
  }

  static async open(): Promise<ScheduleHost> {
    const host = new ScheduleHost(tempDir('gpuvm-sched-'), await freshDatabaseUrl());
    host.port = await freePort();
    await host.startInProcess();
    host.sim = await loadSimHost(host.simRoot);
    return host;
  }

  /** The in-process service: the checks need it (PGlite cannot be opened by two processes). */
  get inProcess(): Service {
    if (!this.service) throw new Error('the in-process service is not running');
    return this.service;
  }

  get postgres(): boolean {
    return this.db.url !== undefined;
  }

  get databaseUrl(): string | undefined {
    return this.db.url;
  }

  get journalPath(): string {
    return join(this.dataDir, 'fence', 'sim-b200', JOURNAL_FILE);
  }

  get url(): string {
    const url = this.service?.url ?? this.child?.url;
    if (!url) throw new Error('no gpuvm is serving');
    return url;
  }

  /**
   * A restart with a host fault in place may not become ready (its first reconciliation cannot
   * judge the host while Fabric Manager is down): it serves, creates answer 503, and settle()
   * waits for it once the faults are cleared. Only the first start waits here.
   */
  async startInProcess(waitReady = true): Promise<void> {
    this.service = await startService(testConfig(this.dataDir, this.db.url, SERVICE_OPTIONS), { log: quietLog, waitReady });
  }

  /** Hands the host to a `gpuvm serve` child: the in-process service stops first (at rest, nothing in flight). */
  async toChild(extraEnv: Record<string, string> = {}): Promise<void> {
    await this.service?.stop();
    this.service = null;
    this.childEnv = extraEnv;
    this.child = await startServeChild({ dataDir: this.dataDir, port: this.port, databaseUrl: this.db.url, env: { ...CHILD_ENV, ...this.childEnv } });
  }

  /** Ends a child's turn without a crash (SIGTERM: it stops as an operator would stop it); the in-process service resumes. */
  async toInProcess(): Promise<void> {
    if (!this.child) return;
    await this.child.kill('SIGTERM');
    this.child = null;
    await this.startInProcess(false);
  }

  /** SIGKILLs the child and starts the next gpuvm on the same data: another child, or the in-process service. */
  async crash(next: 'child' | 'in-process'): Promise<void> {
    if (!this.child) throw new Error('crash: no child to kill');
    await this.child.kill('SIGKILL');
    this.child = null;
    if (next === 'child') this.child = await startServeChild({ dataDir: this.dataDir, port: this.port, databaseUrl: this.db.url, env: { ...CHILD_ENV, ...this.childEnv }, waitFor: 'answering' });
    else await this.startInProcess(false);
  }

  /** A query on this host's database from a connection of the test's own (Postgres), or through the in-process service. */
  async query<R>(text: string, params: unknown[] = []): Promise<R[]> {
    if (this.db.url) {
      const c = new pg.Client({ connectionString: this.db.url });
      c.on('error', () => {});
      await c.connect();
      try {
        return (await c.query(text, params)).rows as R[];
      } finally {
        await c.end().catch(() => {});
      }
    }
    if (!this.service) throw new Error('PGlite is held by the serve child: no query from the test');
    const rows = await this.service.db.openSession().then(async (session) => {
      try {
        return (await session.query(text, params)).rows;
      } finally {
        await session.close();
      }
    });
    return rows as R[];
  }

  /** Stops gpuvm, every QEMU and the simulated kernel; drops the database and the folder. */
  async close(): Promise<void> {
    await this.child?.kill('SIGKILL').catch(() => {});
    this.child = null;
    await this.service?.stop().catch(() => {});
    this.service = null;
    let vmIds: string[] = [];
    try {
      vmIds = readdirSync(join(this.dataDir, 'run', 'sim-b200'));
    } catch {}
    for (const id of vmIds) await this.qemu.terminate(id, { quitTimeoutMs: 500, termTimeoutMs: 1000 }).catch(() => {});
    await stopSimKernel(this.simRoot).catch(() => {});
    // GPUVM_KEEP_TEST_DIRS (as in crash-every-step): keep the data and the database for a post-mortem.
    if (process.env.GPUVM_KEEP_TEST_DIRS) return console.log(`kept ${this.dataDir} (database ${this.db.url ?? 'PGlite in it'})`);
    await this.db.drop().catch(() => {});
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

// ── running one schedule ─────────────────────────────────────────────────────

export interface TraceLine {
  atMs: number;
  command: string;
  result: string;
}

export interface ScheduleRun {
  index: number;
  /** VMs this schedule created, in order. */
  vms: { id: string; gpus: number; partitionId: number }[];
  refused: number;
  deletes: number;
  crashes: number;
  /** Faults that took effect (a kill of a live QEMU, a fault written with a target that resolved). */
  injected: Record<FaultKind, number>;
  /** What the faults were aimed at. */
  targets: FaultTargets;
  /** VMs whose QEMU this schedule killed. */
  killed: Set<string>;
  /** The log's last position before the schedule began: its events are the ones after it. */
  startPosition: string;
  /** Per VM, the latest Date.now() taken just before an observation that found its QEMU alive. */
  lastAlive: Map<string, number>;
  trace: TraceLine[];
  started: number;
  ms: { commands: number; restarts: number; settle: number; checks: number };
  /** Violations seen while the commands ran (a second agent not refused, a lease loss not followed by a new epoch). */
  violations: string[];
}

const noFaults = (): Record<FaultKind, number> => Object.fromEntries(FAULT_KINDS.map((k) => [k, 0])) as Record<FaultKind, number>;

/** The fault files as this schedule has set them; written whole so clearing one part keeps the rest. */
interface FaultState {
  fmpm: { down?: boolean; activateFails?: Record<string, number>; deactivateFails?: Record<string, number>; restartAfterActivate?: string };
  sysfs: { unbindBusy?: string[] };
}

const ALL_PARTITIONS = Array.from({ length: 15 }, (_, i) => i + 1);

export function newRun(index: number): ScheduleRun {
  return {
    index,
    vms: [],
    refused: 0,
    deletes: 0,
    crashes: 0,
    injected: noFaults(),
    targets: { activateFails: new Set(), deactivateFails: new Set(), unbindBusy: new Set(), fmDown: false, fmRestart: false, fdLimit: [], leaseLoss: false, fmRestartAfterActivate: false },
    killed: new Set(),
    startPosition: '0',
    lastAlive: new Map(),
    trace: [],
    started: Date.now(),
    ms: { commands: 0, restarts: 0, settle: 0, checks: 0 },
    violations: [],
  };
}

/** Runs the commands, then brings the host back to rest. `run` records what happened, also when it throws. */
export async function runSchedule(host: ScheduleHost, schedule: Schedule, run: ScheduleRun): Promise<void> {
  const index = run.index;
  const note = (command: string, result: string) => run.trace.push({ atMs: Date.now() - run.started, command, result });
  const faults: FaultState = { fmpm: {}, sysfs: {} };
  const writeAll = () => writeFaults(host.simRoot, { fmpm: faults.fmpm, sysfs: faults.sysfs });
  const api = (method: string, path: string, body?: unknown) => http(host.url, method, path, body);
  const pick = (i: number) => (run.vms.length === 0 ? null : run.vms[i % run.vms.length]!);
  const partitionsOf = (t: Target): number[] | null => {
    if (t === 'all') return ALL_PARTITIONS;
    if ('partition' in t) return [t.partition];
    const vm = pick(t.vm);
    return vm ? [vm.partitionId] : null;
  };

  const sampler = startLivenessSampler(host, run);
  // A crash starts a child again while a later command needs one; after the last, the in-process service.
  const childNeededLater = () => schedule.commands.slice(commandIndex + 1).some((c) => needsChild(c, host.postgres));
  const hungVms: string[] = [];
  let commandIndex = -1;
  try {
    const last = await host.inProcess.db.kysely.selectFrom('events').select((eb) => eb.fn.max('position').as('p')).executeTakeFirst();
    run.startPosition = String(last?.p ?? '0');
    if (schedule.commands.some((c) => needsChild(c, host.postgres))) {
      const t0 = Date.now();
      const pause = !host.postgres && schedule.commands.some((c) => c.do === 'leaseLoss');
      await host.toChild(pause ? SHORT_LEASE_ENV : {});
      run.ms.restarts += Date.now() - t0;
      note('(start gpuvm serve child)', `${Date.now() - t0} ms${pause ? ' (lease 1.5 s, heartbeat 0.3 s)' : ''}`);
    }
    for (const command of schedule.commands) {
      commandIndex++;
      const what = describeCommand(command);
      switch (command.do) {
        case 'create': {
          const res = await api('POST', '/v1/vms', { gpus: command.gpus, name: `s${index}-${run.vms.length}` });
          if (res.status === 202) {
            run.vms.push({ id: res.body.id, gpus: command.gpus, partitionId: res.body.partition_id });
            note(what, `vm#${run.vms.length - 1} = ${res.body.id} on partition ${res.body.partition_id}`);
          } else if (res.status === 409) {
            run.refused++;
            note(what, `refused: ${res.body?.error?.message}`);
          } else if (res.status === 503) {
            // Restarted under a host fault: not ready until it can judge the host.
            note(what, `503 ${res.body?.error?.message ?? 'starting'}`);
          } else throw new Error(`POST /v1/vms answered ${res.status}: ${JSON.stringify(res.body)}`);
          break;
        }
        case 'delete': {
          const vm = pick(command.vm);
          if (!vm) {
            note(what, 'no VM yet');
            break;
          }
          if (command.when === 'running') {
            const seen = await waitForState(api, vm.id, ['running', 'failed', 'crashed', 'deleted'], 30_000);
            note(`  (vm#${run.vms.indexOf(vm)} is ${seen})`, '');
          }
          const res = await api('DELETE', `/v1/vms/${vm.id}`);
          if (res.status === 202) run.deletes++;
          else if (res.status !== 409 && res.status !== 503) throw new Error(`DELETE /v1/vms/${vm.id} answered ${res.status}: ${JSON.stringify(res.body)}`);
          note(what, `${vm.id}: ${res.status === 202 ? res.body.state : `${res.status} ${res.body?.error?.message}`}`);
          break;
        }
        case 'wait':
          await new Promise((r) => setTimeout(r, command.ms));
          note(what, '');
          break;
        case 'crash': {
          const next = childNeededLater() ? 'child' : 'in-process';
          const t0 = Date.now();
          await host.crash(next);
          run.crashes++;
          run.ms.restarts += Date.now() - t0;
          note(what, `restarted as ${next === 'child' ? 'a new child' : 'the in-process service'} in ${Date.now() - t0} ms`);
          break;
        }
        case 'activateFails':
        case 'deactivateFails': {
          const ids = partitionsOf(command.target);
          if (!ids) {
            note(what, 'no VM yet');
            break;
          }
          const code = command.do === 'activateFails' ? -24 : command.fmReturn;
          faults.fmpm[command.do] = { ...faults.fmpm[command.do], ...Object.fromEntries(ids.map((id) => [String(id), code])) };
          await writeAll();
          run.injected[command.do]++;
          for (const id of ids) run.targets[command.do].add(id);
          note(what, `partitions ${ids.join(',')}`);
          break;
        }
        case 'fmDown':
          faults.fmpm.down = true;
          await writeAll();
          run.injected.fmDown++;
          run.targets.fmDown = true;
          note(what, '');
          break;
        case 'unbindBusy': {
          const t = command.target;
          let pci: string | undefined;
          if ('gpu' in t) pci = host.sim.gpus[t.gpu % host.sim.gpus.length]!.pciAddress;
          else {
            const vm = pick(t.vm);
            const row = vm ? await getVm(api, vm.id) : null;
            pci = row?.gpus?.[0]?.pciAddress;
          }
          if (!pci) {
            note(what, 'no VM yet');
            break;
          }
          faults.sysfs.unbindBusy = [...new Set([...(faults.sysfs.unbindBusy ?? []), pci])];
          await writeAll();
          run.injected.unbindBusy++;
          run.targets.unbindBusy.add(pci);
          note(what, pci);
          break;
        }
        case 'killQemu': {
          const vm = pick(command.vm);
          // A QEMU can only die once it runs: wait for that (or for the VM to end without one).
          if (vm) await waitForState(api, vm.id, ['running', 'failed', 'crashed', 'deleted'], 30_000);
          const status = vm ? await host.qemu.status(vm.id) : null;
          if (!vm || status?.state !== 'alive' || !status.pid) {
            note(what, vm ? 'no live QEMU' : 'no VM yet');
            break;
          }
          bumpAlive(run, vm.id, Date.now());
          process.kill(status.pid, 'SIGKILL');
          run.killed.add(vm.id);
          run.injected.killQemu++;
          note(what, `${vm.id} pid ${status.pid}`);
          break;
        }
        case 'fmRestart':
          await restartFabricManager(host.simRoot, { timeoutMs: 60_000 });
          run.injected.fmRestart++;
          run.targets.fmRestart = true;
          note(what, '');
          break;
        case 'clearFaults':
          if (command.what !== 'sysfs') faults.fmpm = {};
          if (command.what !== 'fmpm') faults.sysfs = {};
          if (command.what === 'all' && hungVms.length > 0) setHangPowerdown(hungVms.splice(0), false);
          await writeAll();
          note(what, '');
          break;
        case 'fdLimit': {
          const pid = host.child?.proc.pid;
          if (!pid) throw new Error('fdLimit: no serve child');
          const window = await lowerFdLimit(pid, command.ms);
          run.injected.fdLimit++;
          run.targets.fdLimit.push([window.from, window.to]);
          note(what, `pid ${pid}: nofile ${window.limit} (was ${window.was}) for ${window.to - window.from} ms`);
          break;
        }
        case 'hungQmp': {
          const vm = pick(command.vm);
          if (!vm) {
            note(what, 'no VM yet');
            break;
          }
          setHangPowerdown([vm.id], true);
          hungVms.push(vm.id);
          run.injected.hungQmp++;
          note(what, vm.id);
          break;
        }
        case 'leaseLoss': {
          const result = host.postgres ? await cutConnections(host, run) : await pauseChild(host, command.pauseMs);
          run.injected.leaseLoss++;
          run.targets.leaseLoss = true;
          note(what, result);
          break;
        }
        case 'secondAgent': {
          const result = await secondAgents(host, run);
          run.injected.secondAgent++;
          note(what, result);
          break;
        }
        case 'fmRestartAfterActivate':
          faults.fmpm.restartAfterActivate = `s${index}-c${commandIndex}`;
          await writeAll();
          run.injected.fmRestartAfterActivate++;
          run.targets.fmRestartAfterActivate = true;
          note(what, '');
          break;
      }
    }
    run.ms.commands = Date.now() - run.started - run.ms.restarts;

    // ── back to rest: faults cleared, Fabric Manager answered, everything deleted ──
    const t0 = Date.now();
    if (schedule.finish === 'delete-first' && (Object.keys(faults.fmpm).length > 0 || (faults.sysfs.unbindBusy?.length ?? 0) > 0)) {
      // Faults still in place: tear down under them first, so release steps meet them too (for a
      // while: a fault that outlasts a step's retries fails it, which is what this is for).
      for (const vm of run.vms) await api('DELETE', `/v1/vms/${vm.id}`);
      const ids = run.vms.map((v) => v.id);
      await waitUntil('the VMs to end under the faults', async () => (await Promise.all(ids.map((id) => getVm(api, id)))).every((v) => ['deleted', 'failed', 'crashed'].includes(v?.state)), 2_000, 100).catch(() => {});
      note('(delete everything, faults still in place)', `${Date.now() - t0} ms`);
    }
    await writeFaults(host.simRoot, { fmpm: null, sysfs: null });
    if (hungVms.length > 0) setHangPowerdown(hungVms.splice(0), false);
    if (host.child) {
      // The checks read through the in-process service (PGlite has one process).
      const t1 = Date.now();
      await host.toInProcess();
      run.ms.restarts += Date.now() - t1;
      note('(SIGTERM the serve child; the in-process service resumes)', `${Date.now() - t1} ms`);
    }
    await settle(host, run);
    run.ms.settle = Date.now() - t0;
    note('(at rest)', `${run.ms.settle} ms to settle`);
  } catch (err) {
    note('(failed)', err instanceof Error ? err.message : String(err));
    throw err;
  } finally {
    if (hungVms.length > 0) setHangPowerdown(hungVms, false);
    await sampler.stop();
  }
}

/**
 * Lowers a process's open-file limit to the number of descriptors it has open, for `ms`, then puts
 * the old limits back: opening anything (a /proc or pidfile read, a sysfs write, a tool's pipes, a
 * database connection, an accepted HTTP connection) fails with EMFILE meanwhile.
 */
async function lowerFdLimit(pid: number, ms: number): Promise<{ from: number; to: number; limit: number; was: string }> {
  const { stdout } = await run$('prlimit', ['--pid', String(pid), '--nofile', '--output', 'SOFT,HARD', '--raw', '--noheadings']);
  const [soft, hard] = stdout.trim().split(/\s+/);
  if (!soft || !hard) throw new Error(`prlimit --pid ${pid} --nofile printed ${JSON.stringify(stdout)}`);
  const open = readdirSync(`/proc/${pid}/fd`).length;
  const from = Date.now();
  await run$('prlimit', ['--pid', String(pid), `--nofile=${open}:${hard}`]);
  try {
    await new Promise((r) => setTimeout(r, ms));
  } finally {
    await run$('prlimit', ['--pid', String(pid), `--nofile=${soft}:${hard}`]);
  }
  return { from, to: Date.now(), limit: open, was: `${soft}:${hard}` };
}

/** Postgres: every connection to this schedule's database but the admin's is terminated; the agent must take a new epoch. */
async function cutConnections(host: ScheduleHost, run: ScheduleRun): Promise<string> {
  const epochOf = async () => Number((await host.query<{ epoch: string }>('select epoch::text from agents where host_id = $1', ['sim-b200']))[0]?.epoch ?? 0);
  const before = await epochOf();
  const cut = await host.query<{ n: string }>(
    'select count(*) filter (where pg_terminate_backend(pid))::text as n from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()',
  );
  const t0 = Date.now();
  let after = before;
  while (after <= before && Date.now() - t0 < 30_000) {
    await new Promise((r) => setTimeout(r, 50));
    after = await epochOf().catch(() => before);
  }
  if (after <= before) run.violations.push(`lease loss: the agent did not take the lock again within 30 s of its connections being cut (epoch still ${before})`);
  return `${cut[0]?.n ?? '?'} connection(s) cut; epoch ${before} → ${after} in ${Date.now() - t0} ms`;
}

/** PGlite: the child is paused past its lease (1.5 s) and resumed; its tries in flight are lost and claimed again. */
async function pauseChild(host: ScheduleHost, pauseMs: number): Promise<string> {
  const child = host.child;
  if (!child?.proc.pid) throw new Error('leaseLoss: no serve child to pause');
  child.proc.kill('SIGSTOP');
  try {
    await new Promise((r) => setTimeout(r, pauseMs));
  } finally {
    child.proc.kill('SIGCONT');
  }
  return `pid ${child.proc.pid} stopped for ${pauseMs} ms`;
}

/** Runs `gpuvm serve` to its end (it must be refused); SIGKILLs it after `timeoutMs`. */
function serveOnce(args: string[], env: Record<string, string | undefined>, timeoutMs: number): Promise<{ code: number | null; signal: string | null; stderr: string; ms: number }> {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const e: Record<string, string> = { ...(process.env as Record<string, string>), ...CHILD_ENV, GPUVM_LOG_LEVEL: 'warn' };
    delete e.DATABASE_URL;
    for (const [k, v] of Object.entries(env)) if (v !== undefined) e[k] = v;
    const proc = spawn(process.execPath, [BIN, 'serve', ...args], { env: e, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    proc.stderr!.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => proc.kill('SIGKILL'), timeoutMs);
    proc.once('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stderr, ms: Date.now() - t0 });
    });
  });
}

/**
 * A second agent for this host must be refused before it writes: `gpuvm serve` on the same data
 * folder (the folder lock), and on Postgres one in another folder for the same host id (the
 * advisory lock). Each must exit non-zero within seconds with one line on stderr; the agents row
 * must not change, and nothing a starting agent writes (host registration, reconciliation) may
 * appear in the log meanwhile.
 */
async function secondAgents(host: ScheduleHost, run: ScheduleRun): Promise<string> {
  const canRead = host.postgres || host.service !== null;
  const look = async () =>
    canRead
      ? {
          agent: JSON.stringify(await host.query('select epoch::text, pid from agents order by host_id')),
          position: (await host.query<{ p: string | null }>('select max(position)::text as p from events'))[0]?.p ?? '0',
        }
      : null;
  const before = await look();
  const results: string[] = [];
  const tries: { what: string; args: string[]; env: Record<string, string | undefined>; expect: RegExp; other?: string }[] = [
    { what: 'same data folder', args: ['--port', '0', '--data-dir', host.dataDir], env: { DATABASE_URL: host.databaseUrl }, expect: /the data folder .* is in use/ },
  ];
  if (host.postgres) {
    const other = tempDir('gpuvm-second-');
    tries.push({ what: 'another folder, same host', args: ['--port', '0', '--data-dir', other], env: { DATABASE_URL: host.databaseUrl }, expect: /host sim-b200 already has a running agent/, other });
  }
  for (const t of tries) {
    const r = await serveOnce(t.args, t.env, 20_000);
    const lines = r.stderr.trim().split('\n').filter((l) => l.trim() !== '');
    const ok = r.code !== null && r.code !== 0 && lines.length === 1 && t.expect.test(lines[0]!);
    if (!ok) {
      run.violations.push(
        `second agent (${t.what}): expected a non-zero exit with one line matching ${t.expect}; got ${r.signal ? `killed by ${r.signal} after ${r.ms} ms` : `exit ${r.code} after ${r.ms} ms`}, stderr ${JSON.stringify(r.stderr.slice(0, 600))}`,
      );
    }
    results.push(`${t.what}: exit ${r.code ?? r.signal} in ${r.ms} ms${ok ? '' : ' (NOT REFUSED AS EXPECTED)'}`);
    if (t.other) {
      await run$(process.execPath, [BIN, 'sim-down', '--data-dir', t.other]).catch(() => {});
      rmSync(t.other, { recursive: true, force: true });
    }
  }
  const after = await look();
  if (before && after) {
    if (after.agent !== before.agent) run.violations.push(`second agent: the agents row changed from ${before.agent} to ${after.agent}`);
    const written = await host.query<{ type: string; actor: string; stream_id: string }>(
      `select type, actor, stream_id from events where position > $1::bigint and position <= $2::bigint and actor in ('gpuvm:register', 'reconciler')`,
      [before.position, after.position],
    );
    if (written.length > 0) run.violations.push(`second agent: events a starting agent writes appeared meanwhile: ${written.map((w) => `${w.type} by ${w.actor} on ${w.stream_id}`).join('; ')}`);
  }
  return results.join('; ') + (before ? '' : ' (log not checked: PGlite is held by the child)');
}

function bumpAlive(run: ScheduleRun, vmId: string, at: number): void {
  if ((run.lastAlive.get(vmId) ?? 0) < at) run.lastAlive.set(vmId, at);
}

/** Looks at the schedule's VMs' QEMU processes every 100 ms; feeds the invariant-2 check. */
function startLivenessSampler(host: ScheduleHost, run: ScheduleRun): { stop: () => Promise<void> } {
  let busy: Promise<void> | null = null;
  const timer = setInterval(() => {
    if (busy) return;
    busy = (async () => {
      for (const vm of run.vms) {
        const before = Date.now();
        // Unknown counts as alive: a failed read is no evidence the QEMU had exited.
        const state = (await host.qemu.status(vm.id).catch(() => null))?.state;
        if (state === 'alive' || state === 'unknown') bumpAlive(run, vm.id, before);
      }
    })().finally(() => (busy = null));
  }, 100);
  return {
    stop: async () => {
      clearInterval(timer);
      await busy;
    },
  };
}

type Api = (method: string, path: string, body?: unknown) => Promise<{ status: number; body: any }>;

async function getVm(api: Api, id: string): Promise<any | null> {
  const res = await api('GET', `/v1/vms/${id}`);
  return res.status === 200 ? res.body : null;
}

async function waitForState(api: Api, id: string, states: string[], timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const state = (await getVm(api, id))?.state ?? 'unknown';
    if (states.includes(state) || Date.now() > deadline) return state;
    await new Promise((r) => setTimeout(r, 40));
  }
}

const SETTLE_TIMEOUT_MS = 90_000;

/** Answers a restarted Fabric Manager, deletes every VM of the schedule, waits for the outbox to drain. */
async function settle(host: ScheduleHost, run: ScheduleRun): Promise<void> {
  const service = host.inProcess;
  const db = service.db.kysely;
  // Restarted while a fault was in place, the service may still be judging the host; the faults are cleared now.
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    service.ready,
    new Promise((_, reject) => (timer = setTimeout(() => reject(new Error('the service was not ready 60 s after the faults were cleared')), 60_000))),
  ]).finally(() => clearTimeout(timer));
  // A restarted Fabric Manager refuses every call until it has its activated list. The guard
  // answers on its own (periodically, or when a handler is refused); kick it now to keep this short.
  // (Not check(): a second pass beside the guard's own would race it to --set-activated-list.)
  if (run.injected.fmRestart > 0 || run.injected.fmRestartAfterActivate > 0) {
    await waitUntil(
      'Fabric Manager to answer',
      async () => {
        service.fabricManager.kick();
        return service.host.fmpm.list().then(() => true, () => false);
      },
      30_000,
      200,
    );
  }
  for (const vm of run.vms) {
    await service.vms.delete(vm.id, 'schedules').catch((err: { status?: number }) => {
      if (err?.status !== 409) throw err;
    });
  }
  const ids = run.vms.map((v) => v.id);
  await waitUntil(
    'every VM deleted and the outbox drained',
    async () => {
      if (ids.length > 0) {
        const left = await db.selectFrom('vms').select('id').where('id', 'in', ids).where('state', '!=', 'deleted').execute();
        if (left.length > 0) return false;
      }
      // Powerdown timers may still be due; they only deliver an event a deleted VM ignores.
      const open = await db.selectFrom('effects').select('id').where('status', 'in', ['pending', 'running']).where('type', '!=', 'powerdownTimer').limit(1).execute();
      return open.length === 0;
    },
    SETTLE_TIMEOUT_MS,
    50,
  );
}

// ── the invariants at rest ───────────────────────────────────────────────────

export interface RestReport {
  violations: string[];
  /** Partitions left holding their GPUs for an operator: `broken` (release failed) or `unrepaired` (drift repair failed). */
  stuck: number[];
  quarantined: number[];
  outcomes: { deleted: number; failed: number; crashed: number };
  /** DRIFT_DETECTED events this schedule caused (reconciliation at a restart). */
  drifts: number;
  /** The stuck partitions the operator's repair did not bring back to free or quarantined. */
  unrepairable: number[];
  /** Fenced host actions refused (the fence working: a stale epoch or an older cycle). */
  fenceRefusals: number;
  /** Fenced host actions run. */
  fencedActions: number;
}

const ms = (d: Date | string) => new Date(d).getTime();
/** Partition states an operator must repair; they keep their GPUs' claims. */
const STUCK = ['broken', 'unrepaired'];

/**
 * DESIGN §3.3 at rest, after one schedule, with the operator's exceptions made explicit: a
 * partition whose release failed for good (`broken`) or whose drift repair failed (`unrepaired`)
 * keeps its GPUs until an operator repairs the host ("stuck" below).
 *
 * 1. Claims are exactly the GPUs of stuck partitions (nothing else holds a GPU once every VM is
 *    deleted); a module is claimed once (the primary key).
 * 2. No partition was deactivated while its VM's QEMU lived: from the log, every bindHost and
 *    deactivatePartition try for a VM that had a startQemu began after a releasePartition try of
 *    that VM had found its QEMU gone; from the host, no deactivation of a VM's partition finished
 *    before an instant at which this test saw that VM's QEMU alive.
 * 3. No QEMU alive; every GPU on nvidia, except that a stuck partition's GPUs may still be on
 *    vfio-pci; every partition active in `fmpm -l` is stuck.
 * 4. Folding each stream this schedule touched (its VMs, every partition, the host) gives the
 *    stored rows (the whole log is refolded by the periodic full check).
 * 5. Then the operator's way out: every stuck partition is repaired (POST /v1/hosts/:id/repair) and
 *    must reach free or quarantined; after that no partition holds a claim, no gpu_claims row is
 *    left, nothing is active in `fmpm -l` and every GPU is on nvidia.
 * 6. The host fence's journal (the lines this schedule added): no two tries of one effect acted at
 *    the same time, no two actions on one key overlapped, and per key the acting epoch and
 *    generation never went down (nothing ran under a stale epoch). Refusals are counted.
 * 7. No effect used more tries than its budget (effect_attempts rows that are not waits ≤ max_attempts).
 * Plus what the faults may explain: a partition ends stuck or quarantined, a VM failed, or a VM's
 * release failed, only with a recorded failure that a fault of this schedule aimed at that
 * partition explains (faultExplains); a VM crashed only if this test killed its QEMU; reconciliation
 * finds drift only after a host fault. So a schedule of creates, deletes and crashes must end exactly
 * as it would with no crash: every VM deleted, never failed or crashed, nothing drifted (invariant 5).
 */
export async function checkAtRest(host: ScheduleHost, run: ScheduleRun): Promise<RestReport> {
  const service = host.inProcess;
  const db = service.db.kysely;
  const violations: string[] = [];
  const injected = new Set(FAULT_KINDS.filter((k) => run.injected[k] > 0));
  const partitions = await db.selectFrom('partitions').selectAll().where('host_id', '=', service.host.hostId).orderBy('partition_id').execute();
  const pciOf = (m: number) => host.sim.gpus.find((g) => g.moduleId === m)!.pciAddress;
  const partitionView = (id: number) => ({ id, pcis: (partitions.find((p) => p.partition_id === id)?.modules ?? []).map(pciOf) });
  const explained = (failure: string | null, partitionId: number) => failure !== null && faultExplains(failure, partitionView(partitionId), run.targets);
  const RELEASE_FAILED = 'partition release failed: ';

  // VMs: all deleted; how each got there, and why.
  const vmIds = run.vms.map((v) => v.id);
  const outcomes = { deleted: 0, failed: 0, crashed: 0 };
  const notDeleted = await db.selectFrom('vms').select(['id', 'state']).where('state', '!=', 'deleted').execute();
  for (const v of notDeleted) violations.push(`VM ${v.id} is ${v.state} at rest`);
  // The machine's `outcome` says how the VM ended even when a DELETE cut the way to `failed` or
  // `crashed` short (a delete while releasing ends `deleted`, the outcome and reason stay).
  const contexts = new Map(
    (vmIds.length ? await db.selectFrom('streams').select(['stream_id', 'context']).where('stream_id', 'in', vmIds.map(vmStream)).execute() : []).map((r) => [
      r.stream_id,
      r.context as { outcome?: string; reason?: string | null },
    ]),
  );
  for (const vm of run.vms) {
    const { outcome, reason = null } = contexts.get(vmStream(vm.id)) ?? {};
    if (outcome === 'failed') {
      outcomes.failed++;
      // A QEMU killed while it started makes startQemu fail: the kill explains it.
      if (!run.killed.has(vm.id) && !explained(reason, vm.partitionId)) violations.push(`VM ${vm.id} failed (${reason}); no injected fault explains it`);
    } else if (outcome === 'crashed') {
      outcomes.crashed++;
      if (!run.killed.has(vm.id)) violations.push(`VM ${vm.id} crashed (${reason}) but its QEMU was not killed by the test`);
    } else outcomes.deleted++;
    if (reason?.startsWith(RELEASE_FAILED) && !explained(reason.slice(RELEASE_FAILED.length), vm.partitionId)) {
      violations.push(`VM ${vm.id}: ${reason}; no injected fault explains it`);
    }
  }

  // Partitions: free, quarantined or stuck, and only for a reason an injected fault gives.
  const stuck = partitions.filter((p) => STUCK.includes(p.state));
  const quarantined = partitions.filter((p) => p.state === 'quarantined');
  for (const p of partitions) {
    if (!['free', 'quarantined', ...STUCK].includes(p.state)) violations.push(`partition ${p.partition_id} is ${p.state} at rest`);
    else if (p.state !== 'free' && !explained(p.failure, p.partition_id)) {
      violations.push(`partition ${p.partition_id} ended ${p.state} (${p.failure}); no injected fault explains it (injected: ${[...injected].join(', ') || 'none'})`);
    }
  }
  const drifts = await db
    .selectFrom('events')
    .select(['stream_id', 'data'])
    .where('type', '=', 'DRIFT_DETECTED')
    .where(sql<boolean>`position > ${run.startPosition}::bigint`)
    .execute();
  if (drifts.length > 0 && injected.size === 0) {
    violations.push(`reconciliation found drift with no host fault injected: ${drifts.map((d) => `${d.stream_id} ${JSON.stringify(d.data)}`).join('; ')}`);
  }

  // 3: the host.
  const picture = await hostPicture(service);
  const stuckIds = new Set(stuck.map((p) => p.partition_id));
  const strayActive = picture.activePartitions.filter((id) => !stuckIds.has(id));
  if (strayActive.length > 0) violations.push(`fmpm -l shows partition(s) ${strayActive.join(', ')} active with no VM`);
  if (picture.liveQemu.length > 0) violations.push(`QEMU still alive for ${picture.liveQemu.join(', ')}`);
  const stuckPci = new Set(stuck.flatMap((p) => p.modules.map(pciOf)));
  for (const [pci, driver] of Object.entries(picture.drivers)) {
    const ok = stuckPci.has(pci) ? driver === 'nvidia' || driver === 'vfio-pci' : driver === 'nvidia';
    if (!ok) violations.push(`GPU ${pci} is on ${driver ?? 'no driver'}${stuckPci.has(pci) ? ' (in a stuck partition)' : ''}`);
  }

  // 1: claims are the stuck partitions' modules.
  const claims = (await db.selectFrom('gpu_claims').selectAll().execute()).map((c) => `${c.module_id}@${c.partition_id}`).sort();
  const expectedClaims = stuck.flatMap((p) => p.modules.map((m) => `${m}@${p.partition_id}`)).sort();
  if (!sameJson(claims, expectedClaims)) violations.push(`GPU claims ${JSON.stringify(claims)}, expected ${JSON.stringify(expectedClaims)} (the stuck partitions' modules)`);

  // 2: never deactivated (or rebound) under a live QEMU.
  violations.push(...(await checkNoDeactivationUnderLiveQemu(service, run)));

  // 4: the touched streams fold to their rows.
  const streams = [...vmIds.map(vmStream), ...partitions.map((p) => partitionStream(p.host_id, p.partition_id)), `host:${service.host.hostId}`];
  violations.push(...(await foldAndCompare(service, streams)));

  // Nothing left in the outbox but powerdown timers.
  const open = await db.selectFrom('effects').select(['id', 'type', 'status']).where('status', 'in', ['pending', 'running']).where('type', '!=', 'powerdownTimer').execute();
  for (const e of open) violations.push(`effect ${e.id} (${e.type}) is still ${e.status}`);

  // What happened while the commands ran (second agents, lease losses).
  violations.push(...run.violations);

  // 5: the operator's way out for what is stuck, then nothing may hold a GPU.
  const unrepairable = stuck.length > 0 ? await repairStuck(host, stuck.map((p) => p.partition_id), violations) : [];
  if (stuck.length > 0 && unrepairable.length === 0) {
    const holding = (await db.selectFrom('partitions').select(['partition_id', 'state']).execute()).filter((p) => partitionHoldsClaim(p.state));
    for (const p of holding) violations.push(`after the repairs partition ${p.partition_id} is ${p.state}, which holds its GPUs`);
    const left = await db.selectFrom('gpu_claims').selectAll().execute();
    if (left.length > 0) violations.push(`after the repairs gpu_claims still has ${left.map((c) => `${c.module_id}@${c.partition_id}`).join(', ')}`);
    const after = await hostPicture(service);
    if (after.activePartitions.length > 0) violations.push(`after the repairs fmpm -l shows partition(s) ${after.activePartitions.join(', ')} active`);
    for (const [pci, driver] of Object.entries(after.drivers)) if (driver !== 'nvidia') violations.push(`after the repairs GPU ${pci} is on ${driver ?? 'no driver'}`);
  }

  // 6: the host fence's journal.
  const fence = checkFenceJournal(host);
  violations.push(...fence.violations);

  // 7: no effect tried more often than its budget.
  const over = await sql<{ id: string; type: string; max_attempts: number; tries: string; outcomes: string }>`
    select e.id, e.type, e.max_attempts, count(*)::text as tries, string_agg(a.attempt || ':' || a.outcome, ' ' order by a.attempt) as outcomes
    from effects e join effect_attempts a on a.effect_id = e.id
    where a.wait = 0 and e.id in (select effect_id from effect_attempts where finished_at >= to_timestamp(${run.started / 1000 - 5}))
    group by e.id, e.type, e.max_attempts
    having count(*) > e.max_attempts`.execute(db);
  for (const e of over.rows) violations.push(`effect ${e.id} (${e.type}) has ${e.tries} tries of a budget of ${e.max_attempts}: ${e.outcomes}`);

  return {
    violations,
    stuck: [...stuckIds],
    quarantined: quarantined.map((p) => p.partition_id),
    outcomes,
    drifts: drifts.length,
    unrepairable,
    fenceRefusals: fence.refusals,
    fencedActions: fence.actions,
  };
}

/** POST /v1/hosts/:id/repair for each stuck partition, then waits for each to be free or quarantined; returns those that are not. */
async function repairStuck(host: ScheduleHost, ids: number[], violations: string[]): Promise<number[]> {
  const db = host.inProcess.db.kysely;
  const hostId = host.inProcess.host.hostId;
  for (const id of ids) {
    const res = await http(host.url, 'POST', `/v1/hosts/${hostId}/repair`, { partitionId: id });
    if (res.status !== 202) violations.push(`POST /v1/hosts/${hostId}/repair {partitionId: ${id}} answered ${res.status}: ${JSON.stringify(res.body)}`);
  }
  const states = async () => db.selectFrom('partitions').select(['partition_id', 'state', 'failure']).where('partition_id', 'in', ids).execute();
  await waitUntil('the repaired partitions to be free or quarantined', async () => (await states()).every((p) => p.state === 'free' || p.state === 'quarantined'), 60_000, 50).catch(() => {});
  const left = (await states()).filter((p) => p.state !== 'free' && p.state !== 'quarantined');
  for (const p of left) violations.push(`partition ${p.partition_id} is ${p.state} after the operator's repair (${p.failure})`);
  // A repair leaves the outbox drained too.
  await waitUntil(
    'the repairs to drain',
    async () => (await db.selectFrom('effects').select('id').where('status', 'in', ['pending', 'running']).where('type', '!=', 'powerdownTimer').limit(1).execute()).length === 0,
    30_000,
    50,
  ).catch(() => violations.push('effects still open 30 s after the repairs'));
  return left.map((p) => p.partition_id);
}

const pidAlive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/**
 * Invariant 6 from the host's side: the fence journal's lines since the last check. Per key, lines
 * come in the order the key's flock was held, so a `start` before the previous action's `end` is an
 * overlap — unless that action's process died (a crash: the kernel dropped the lock; the action
 * ended when it did). Per effect, the actions of different tries must not overlap in time. Per key,
 * the epoch and the generation of `start` lines never go down.
 */
function checkFenceJournal(host: ScheduleHost): { violations: string[]; refusals: number; actions: number } {
  const violations: string[] = [];
  const j = host.journal;
  let text = '';
  try {
    const size = statSync(host.journalPath).size;
    if (size > j.offset) {
      const fd = openSync(host.journalPath, 'r');
      try {
        const buf = Buffer.alloc(size - j.offset);
        readSync(fd, buf, 0, buf.length, j.offset);
        text = buf.toString('utf8');
      } finally {
        closeSync(fd);
      }
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  // Only whole lines (at rest nothing writes; a torn tail waits for the next check).
  const end = text.lastIndexOf('\n') + 1;
  j.offset += Buffer.byteLength(text.slice(0, end));
  const lines = text
    .slice(0, end)
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as JournalLine);
  const at = (l: JournalLine) => new Date(l.at).getTime();
  const tryOf = (l: JournalLine) => `try ${l.attempt} (epoch ${l.epoch}, pid ${l.pid})`;
  const intervals = new Map<string, { who: string; from: number; to: number; action: string; key: string }[]>();
  const closeAction = (start: JournalLine, to: number) => {
    const list = intervals.get(start.effectId) ?? [];
    list.push({ who: tryOf(start), from: at(start), to, action: start.action, key: start.key });
    intervals.set(start.effectId, list);
  };
  let refusals = 0;
  let actions = 0;
  for (const l of lines) {
    if (l.phase === 'refused') {
      refusals++;
      continue;
    }
    if (l.phase === 'start') {
      actions++;
      const open = j.open.get(l.key);
      if (open) {
        if (open.pid === l.pid || pidAlive(open.pid)) {
          violations.push(`fence: ${l.action} of ${l.effectId} ${tryOf(l)} started on ${l.key} at ${l.at} while ${open.action} of ${open.effectId} ${tryOf(open)} (since ${open.at}) had not ended`);
        }
        closeAction(open, at(l));
      }
      j.open.set(l.key, l);
      const last = j.last.get(l.key);
      if (last && l.epoch < last.epoch) {
        violations.push(`fence: ${l.action} of ${l.effectId} ${tryOf(l)} ran on ${l.key} at ${l.at} under epoch ${l.epoch}, after epoch ${last.epoch} had acted there (${last.effectId}): a stale epoch acted`);
      }
      if (last && l.generation < last.generation) {
        violations.push(`fence: ${l.action} of ${l.effectId} ${tryOf(l)} ran on ${l.key} at ${l.at} with generation ${l.generation}, after generation ${last.generation} had acted there (${last.effectId})`);
      }
      if (!last || l.epoch >= last.epoch || l.generation >= last.generation) {
        j.last.set(l.key, { epoch: Math.max(l.epoch, last?.epoch ?? 0), generation: Math.max(l.generation, last?.generation ?? 0), effectId: l.effectId });
      }
      continue;
    }
    const open = j.open.get(l.key);
    if (!open || open.effectId !== l.effectId || open.attempt !== l.attempt || open.pid !== l.pid) {
      violations.push(`fence: an end of ${l.action} by ${l.effectId} ${tryOf(l)} on ${l.key} at ${l.at} matches no start${open ? ` (the open one is ${open.effectId} ${tryOf(open)})` : ''}`);
      continue;
    }
    closeAction(open, at(l));
    j.open.delete(l.key);
  }
  // An action still open at rest belongs to a process that died in it, or it is a violation.
  for (const [key, open] of j.open) {
    if (pidAlive(open.pid) && open.pid === process.pid) violations.push(`fence: ${open.action} of ${open.effectId} ${tryOf(open)} on ${key} started at ${open.at} and has not ended at rest`);
  }
  for (const [effectId, list] of intervals) {
    for (let a = 0; a < list.length; a++) {
      for (let b = a + 1; b < list.length; b++) {
        const x = list[a]!;
        const y = list[b]!;
        if (x.who !== y.who && x.from < y.to && y.from < x.to) {
          violations.push(`fence: two tries of ${effectId} acted at once: ${x.who} ${x.action} on ${x.key} [${new Date(x.from).toISOString()}, ${new Date(x.to).toISOString()}] and ${y.who} ${y.action} on ${y.key} [${new Date(y.from).toISOString()}, ${new Date(y.to).toISOString()}]`);
        }
      }
    }
  }
  return { violations, refusals, actions };
}

async function checkNoDeactivationUnderLiveQemu(service: Service, run: ScheduleRun): Promise<string[]> {
  if (run.vms.length === 0) return [];
  const db = service.db.kysely;
  const violations: string[] = [];
  const rows = await db
    .selectFrom('effects as e')
    .innerJoin('effect_attempts as a', 'a.effect_id', 'e.id')
    .select(['e.id', 'e.type', 'e.params', 'a.attempt', 'a.started_at', 'a.finished_at', 'a.outcome'])
    .where('e.type', 'in', ['startQemu', 'releasePartition', 'bindHost', 'deactivatePartition'])
    // A VM's effects and its partition cycle's carry the VM id as correlation id (indexed).
    .where('e.correlation_id', 'in', run.vms.map((v) => v.id))
    .where(sql<string>`e.params->>'vmId'`, 'in', run.vms.map((v) => v.id))
    .execute();
  for (const vm of run.vms) {
    const mine = rows.filter((r) => (r.params as { vmId?: string }).vmId === vm.id);
    const started = mine.some((r) => r.type === 'startQemu');
    const releasedAt = mine.filter((r) => r.type === 'releasePartition' && r.outcome === 'ok').map((r) => ms(r.finished_at));
    const firstRelease = releasedAt.length ? Math.min(...releasedAt) : null;
    const lastAlive = run.lastAlive.get(vm.id);
    for (const r of mine.filter((x) => x.type === 'bindHost' || x.type === 'deactivatePartition')) {
      const what = `${r.type} try ${r.attempt} of ${vm.id}'s partition ${vm.partitionId} (${r.outcome}, ${new Date(r.started_at).toISOString()})`;
      if (started && (firstRelease === null || ms(r.started_at) < firstRelease)) {
        violations.push(`${what} began before a releasePartition had found the VM's QEMU gone`);
      }
      // Timestamps: the database's now() against this process's Date.now(), one host clock.
      if (r.type === 'deactivatePartition' && r.outcome === 'ok' && lastAlive !== undefined && ms(r.finished_at) + 5 < lastAlive) {
        violations.push(`${what} finished at ${new Date(r.finished_at).toISOString()}, but the VM's QEMU was seen alive at ${new Date(lastAlive).toISOString()}`);
      }
    }
  }
  return violations;
}

/** Invariant 4 for some streams: the fold of each equals its stored stream row and read row; claims from all partitions. */
async function foldAndCompare(service: Service, streamIds: string[]): Promise<string[]> {
  const db = service.db.kysely;
  const plain = (row: object | undefined | null) => (row ? canonical(JSON.parse(JSON.stringify(row))) : null);
  const violations: string[] = [];
  // A few bulk reads rather than three per stream: this runs after every schedule.
  const logs = await readStreams(db, streamIds);
  const storedStreams = new Map((await db.selectFrom('streams').selectAll().where('stream_id', 'in', streamIds).execute()).map((r) => [r.stream_id, r]));
  const vmIds = streamIds.filter((id) => id.startsWith('vm:')).map((id) => id.slice(3));
  const storedVms = new Map((vmIds.length ? await db.selectFrom('vms').selectAll().where('id', 'in', vmIds).execute() : []).map((r) => [r.id, r]));
  const storedPartitions = new Map((await db.selectFrom('partitions').selectAll().execute()).map((r) => [`${r.host_id}/${r.partition_id}`, r]));
  const storedHosts = new Map((await db.selectFrom('hosts').selectAll().execute()).map((r) => [r.id, r]));
  const rebuiltClaims: object[] = [];
  for (const streamId of streamIds) {
    const snap = fold(streamId, logs.get(streamId) ?? []) as StreamSnapshot | null;
    if (!snap) {
      violations.push(`${streamId}: no events`);
      continue;
    }
    const rebuilt = { stream_id: snap.streamId, machine: snap.kind, machine_version: snap.machineVersion, version: snap.version, state: snap.state, context: snap.context, created_at: snap.createdAt, updated_at: snap.updatedAt };
    if (!sameJson(plain(storedStreams.get(streamId)), plain(rebuilt))) violations.push(`${streamId}: streams row differs from the fold`);
    let storedRow: object | undefined;
    let rebuiltRow: object;
    if (snap.kind === 'vm') {
      const row = vmRow(snap);
      [rebuiltRow, storedRow] = [row, storedVms.get(row.id)];
    } else if (snap.kind === 'partition') {
      const row = partitionRow(snap);
      [rebuiltRow, storedRow] = [row, storedPartitions.get(`${row.host_id}/${row.partition_id}`)];
      rebuiltClaims.push(...claimRows(snap));
    } else {
      const row = hostRow(snap);
      [rebuiltRow, storedRow] = [row, storedHosts.get(row.id)];
    }
    if (!sameJson(plain(storedRow), plain(rebuiltRow))) violations.push(`${streamId}: ${snap.kind} row ${JSON.stringify(plain(storedRow))} differs from the fold ${JSON.stringify(plain(rebuiltRow))}`);
  }
  const key = (c: any) => `${c.host_id}/${c.module_id}`;
  const storedClaims = (await db.selectFrom('gpu_claims').selectAll().execute()).map(plain).sort((a: any, b: any) => key(a).localeCompare(key(b)));
  const rebuilt = rebuiltClaims.map(plain).sort((a: any, b: any) => key(a).localeCompare(key(b)));
  if (!sameJson(storedClaims, rebuilt)) violations.push(`gpu_claims ${JSON.stringify(storedClaims)} differ from the partitions' folds ${JSON.stringify(rebuilt)}`);
  return violations;
}

/**
 * The whole history at once: `gpuvm verify` (every stream refolded and replayed against the outbox,
 * every projection compared, invariants 1 and 2 over the global log), and the global log as
 * readers page through it (DESIGN §3.1: commit-safe order, every event exactly once). A stuck
 * partition is the one expected finding: its VM is deleted but the partition never returned (an
 * operator must act).
 */
export async function checkWholeHistory(service: Service, stuckPartitions: ReadonlySet<number>): Promise<{ violations: string[]; streams: number; events: number }> {
  const report = await verifyHistory(service.db.kysely);
  const hostId = service.host.hostId;
  const expected = (p: { code: string; message: string }) =>
    p.code === 'partition-not-returned' && [...stuckPartitions].some((id) => p.message.includes(`(${partitionStream(hostId, id)} `));
  const violations = report.problems.filter((p) => !expected(p)).map(formatProblem);
  violations.push(...(await checkLogOrder(service)));
  return { violations, streams: report.streams, events: report.events };
}

/** readLog, paged as verify pages it, in one snapshot: (tx id, position) strictly increasing, and every event once. */
async function checkLogOrder(service: Service): Promise<string[]> {
  return service.db.kysely
    .transaction()
    .setIsolationLevel('repeatable read')
    .execute(async (tx) => {
      const { count } = await tx
        .selectFrom('events')
        .select((eb) => eb.fn.countAll<string>().as('count'))
        .where(sql<boolean>`tx_id < pg_snapshot_xmin(pg_current_snapshot())`)
        .executeTakeFirstOrThrow();
      const violations: string[] = [];
      const seen = new Set<string>();
      let previous: { tx: bigint; position: bigint } | null = null;
      for (let cursor = LOG_START; ; ) {
        const page = await readLog(tx, cursor, 1000);
        if (page.events.length === 0) break;
        cursor = page.next;
        for (const e of page.events) {
          const here = { tx: BigInt(e.txId), position: BigInt(e.position) };
          if (previous && (here.tx < previous.tx || (here.tx === previous.tx && here.position <= previous.position)) && violations.length < 3) {
            violations.push(`readLog: event at position ${e.position} (tx ${e.txId}) comes after position ${previous.position} (tx ${previous.tx}): not in commit-safe order`);
          }
          if (seen.has(e.position) && violations.length < 3) violations.push(`readLog: event at position ${e.position} read twice`);
          seen.add(e.position);
          previous = here;
        }
      }
      if (seen.size !== Number(count)) violations.push(`readLog: paging through the log gave ${seen.size} distinct events of the ${count} committed`);
      return violations;
    });
}

/** After the checks: quarantined partitions back in service so the next schedule has the whole board. */
export async function clearQuarantinedPartitions(service: Service): Promise<number> {
  const q = await service.db.kysely.selectFrom('partitions').select('partition_id').where('state', '=', 'quarantined').execute();
  if (q.length === 0) return 0;
  const cleared = await clearQuarantine(service.db.kysely, service.host.hostId, { all: true }, 'test:schedules', retryPolicy(service.config));
  return cleared.partitions.length;
}

export function formatTrace(run: ScheduleRun): string {
  return run.trace.map((l) => `  +${String(l.atMs).padStart(6)} ms  ${l.command}${l.result ? ` → ${l.result}` : ''}`).join('\n');
}
