/**
 * The service under test in figure 3 (bench/recovery.ts), as a child process the bench can SIGKILL:
 * gpuvm's engine for many in-memory hosts in one process — per host the registration and an
 * EffectWorker with the real handlers, as src/service.ts assembles them for one host.
 *
 * Different from `gpuvm serve` on purpose, and only in what a recovery figure does not exercise:
 * - many hosts in one process (a fleet of 1,000 in-flight 1-GPU VMs needs 125 B200 hosts), and one
 *   LISTEN connection shared by their workers (Postgres here allows 100 connections, not 125+);
 * - no API, QEMU monitor, health monitor or Fabric Manager guard: the bench drives VmService
 *   commands against the database itself (only while this process is up, as a client of the API
 *   would), and none of those loops moves a lifecycle forward.
 *
 * The memory hosts would forget everything on a kill, which a real host does not (its partitions
 * stay active, its GPUs stay on vfio-pci, its QEMUs keep running). So each host's state is written
 * to <state-dir>/<hostId>.json after every call that changes it (write + rename, before the handler
 * sees the result, so no outcome is ever reported for a change the file lacks), and read back at
 * start.
 *
 *   node --import tsx bench/recovery-serve.ts --database-url=URL --hosts=125 --state-dir=DIR
 *
 * Prints one JSON line on stdout once every worker has started: {"ready", "startedAt", "hostsAt"
 * (epoch ms: workers started, main() entered after the imports, memory hosts built), "pid", "hostIds"}.
 */
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { loadConfig } from '../src/config.ts';
import { createHandlers } from '../src/engine/handlers.ts';
import { declareJudged } from '../src/roles/agent.ts';
import { registerHost } from '../src/engine/hosts.ts';
import { EffectWorker } from '../src/engine/worker.ts';
import { HostAgent } from '../src/engine/agent.ts';
import type { HostAdapters } from '../src/host/host.ts';
import type { QemuVmSpec } from '../src/host/qemu.ts';
import { retryPolicy } from '../src/service.ts';
import { migrate, openDb } from '../src/store/db.ts';
import { option, sharedListener, wallNow } from './lib.ts';
import { createMemoryHost, type MemoryHost } from './memory-host.ts';

interface PersistedHost {
  active: number[];
  drivers: [string, string | null][];
  qemu: [string, { pid: number; spec: QemuVmSpec }][];
}

/** Calls after which the memory host's state differs: these are persisted before they return. */
const MUTATING: Record<string, ReadonlySet<string>> = {
  fmpm: new Set(['activate', 'deactivate', 'setActivatedList']),
  sysfs: new Set(['bindGroupToVfio', 'bindGroupToHost']),
  qemu: new Set(['start', 'powerdown', 'terminate']),
};

/**
 * The memory host's state lives in a Set and two Maps it hands out read-only; this process owns the
 * host, so it fills them on start and snapshots them after each change.
 */
function persistent(memory: MemoryHost, file: string): HostAdapters {
  const active = memory.activePartitions as Set<number>;
  const drivers = memory.drivers as Map<string, string | null>;
  const qemu = memory.qemuProcesses as Map<string, { pid: number; spec: QemuVmSpec }>;
  if (existsSync(file)) {
    const saved = JSON.parse(readFileSync(file, 'utf8')) as PersistedHost;
    active.clear();
    for (const id of saved.active) active.add(id);
    for (const [bdf, driver] of saved.drivers) drivers.set(bdf, driver);
    qemu.clear();
    for (const [vmId, p] of saved.qemu) qemu.set(vmId, p);
    // New "processes" get pids above the restored ones (memory-host keeps its counter private).
    const top = Math.max(99_999, ...saved.qemu.map(([, p]) => p.pid));
    (memory.adapters.qemu as unknown as { nextPid: number }).nextPid = top + 1;
  }
  const save = () => {
    const state: PersistedHost = { active: [...active], drivers: [...drivers], qemu: [...qemu] };
    writeFileSync(`${file}.tmp`, JSON.stringify(state));
    renameSync(`${file}.tmp`, file);
  };
  save();
  const wrap = <T extends object>(name: string, adapter: T): T =>
    new Proxy(adapter, {
      get(obj, prop) {
        const v = Reflect.get(obj, prop, obj);
        if (typeof v !== 'function' || !MUTATING[name]!.has(String(prop))) return v;
        return async (...args: unknown[]) => {
          try {
            return await (v as (...a: unknown[]) => Promise<unknown>).apply(obj, args);
          } finally {
            save();
          }
        };
      },
    });
  const a = memory.adapters;
  return { ...a, fmpm: wrap('fmpm', a.fmpm), sysfs: wrap('sysfs', a.sysfs), qemu: wrap('qemu', a.qemu) };
}


async function main(): Promise<void> {
  const startedAt = wallNow();
  const databaseUrl = option('database-url', '');
  const hosts = option('hosts', 125);
  const stateDir = option('state-dir', '');
  if (!databaseUrl || !stateDir) throw new Error('--database-url=URL and --state-dir=DIR are required');
  const log = pino({ level: option('log', 'warn') }, pino.destination(2));
  // gpuvm's defaults (lease 30 s, poll 1 s, 16 effects per worker, backoff 200 ms…); the environment is not read.
  const config = loadConfig({ dataDir: stateDir, databaseUrl, powerdownTimeoutMs: option('powerdown-timeout-ms', 0) }, {});
  const policy = retryPolicy(config);
  const hostIds = Array.from({ length: hosts }, (_, i) => `rh-${i + 1}`);
  // The first memory host reads the board's facts from a throwaway simulated host (it runs the
  // simulated fmpm and nvidia-smi once): a bench artefact a real host's restart does not have,
  // so it comes first and is timed apart (startedAt → hostsAt).
  const memories = await Promise.all(hostIds.map((id) => createMemoryHost(id)));
  const hostsAt = wallNow();

  const db = await openDb({ databaseUrl, poolSize: option('pool', 20) });
  await migrate(db);
  const listenerFor = sharedListener(db);
  const workers: EffectWorker[] = [];
  const adapters = hostIds.map((hostId, i) => persistent(memories[i]!, join(stateDir, `${hostId}.json`)));
  // On a restart this only finds each host registered (one read per host); all hosts at once.
  await Promise.all(adapters.map((host) => registerHost(db.kysely, host, policy, log)));
  const agents = await Promise.all(adapters.map((host) => HostAgent.start(db, host.hostId, { command: 'bench', heartbeatMs: 5000, log })));
  for (const [i, host] of adapters.entries()) {
    workers.push(
      new EffectWorker(listenerFor(host.hostId), {
        hostId: host.hostId,
        agent: agents[i]!,
        notYetMs: config.notYetMs,
        handlers: createHandlers(host),
        policy,
        leaseMs: config.leaseMs,
        pollMs: config.pollMs,
        concurrency: config.workerConcurrency,
        log,
      }),
    );
  }
  await Promise.all(workers.map((w) => w.start()));
  // No reconciler here (the memory hosts have nothing to reconcile): each agent declares its host judged.
  await Promise.all(agents.map((a) => declareJudged(db, a, a.epoch, policy, log)));
  process.stdout.write(JSON.stringify({ ready: wallNow(), startedAt, hostsAt, pid: process.pid, hostIds }) + '\n');

  const stop = async () => {
    await Promise.all(workers.map((w) => w.stop()));
    await Promise.all(agents.map((a) => a.stop()));
    await db.close();
    process.exit(0);
  };
  process.once('SIGTERM', () => void stop());
  process.once('SIGINT', () => void stop());
}

await main();
