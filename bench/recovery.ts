/**
 * Figure 3 — recovery: 1,000 lifecycles in flight, SIGKILL the service, start it again. How long
 * until every in-flight effect runs again, and until every lifecycle has finished, against the same
 * 1,000 lifecycles run without a kill.
 *
 * The service is bench/recovery-serve.ts, a child process: gpuvm's engine for 125 in-memory B200
 * hosts (8 GPUs each, so 1,000 one-GPU VMs can all hold GPUs at once: VmService.create refuses with
 * "no capacity" rather than queueing), their state kept in files so it survives the kill as a real
 * host's would. This process is the operator: it sends every create at once (16 commands at a
 * time), deletes each VM when it is running, and waits until all are deleted — through VmService
 * against the database, and only while the service is up (as a client of the API would).
 *
 * Both runs: fresh database, fresh hosts, same fleet, same commands. The interrupted run SIGKILLs
 * the service the moment the last create is accepted (all 1,000 lifecycles in flight), and starts
 * it again as soon as it has exited.
 *
 * Definitions (all on this machine's clock; Postgres' now() reads the same one):
 * - restart: the new service process is spawned. ready: it printed that its workers run.
 * - in-flight effects: at the kill, every effect that was running (claimed by the killed process)
 *   or pending and already due. resumed: each of them has been claimed by the new process — the
 *   first claim after the restart, from effect_attempts (a 'lost' try's finished_at is the
 *   re-claim; otherwise a try's started_at). "Resumed after" is the latest of those, minus restart.
 * - finished: every VM deleted. Total: first create sent → last VM seen deleted.
 *
 *   node --import tsx bench/recovery.ts [--lifecycles=1000] [--hosts=125] [--commands=16] [--poll-ms=20] [--pairs=1]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { sql, type Kysely } from 'kysely';
import { loadConfig } from '../src/config.ts';
import { VmService } from '../src/engine/vms.ts';
import { retryPolicy } from '../src/service.ts';
import { openDb, type Db } from '../src/store/db.ts';
import type { Database } from '../src/store/schema.ts';
import { fmt, freshDatabase, isMain, option, printTable, summarize, wallNow } from './lib.ts';

const SERVE = fileURLToPath(new URL('./recovery-serve.ts', import.meta.url));

// ── the service child ────────────────────────────────────────────────────────
interface Ready {
  ready: number;
  startedAt: number;
  hostsAt: number;
  pid: number;
  hostIds: string[];
}

interface ServeChild {
  proc: ChildProcess;
  spawnedAt: number;
  ready: Promise<Ready>;
  exited: Promise<void>;
}

function spawnServe(databaseUrl: string, hosts: number, stateDir: string): ServeChild {
  const spawnedAt = wallNow();
  const proc = spawn(process.execPath, ['--import', 'tsx', SERVE, `--database-url=${databaseUrl}`, `--hosts=${hosts}`, `--state-dir=${stateDir}`], {
    stdio: ['ignore', 'pipe', 'pipe'],
    cwd: fileURLToPath(new URL('..', import.meta.url)),
  });
  let out = '';
  let err = '';
  proc.stderr!.on('data', (d) => {
    err += d;
    if (err.length > 20_000) err = err.slice(-10_000);
  });
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  const ready = new Promise<Ready>((resolve, reject) => {
    proc.stdout!.on('data', (d) => {
      out += d;
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (line && out.includes('\n')) resolve(JSON.parse(line) as Ready);
    });
    proc.once('exit', (code, signal) => reject(new Error(`recovery-serve exited (${code ?? signal}) before it was ready:\n${err.slice(-3000)}`)));
  });
  ready.catch(() => {});
  return { proc, spawnedAt, ready, exited };
}

// ── the operator ─────────────────────────────────────────────────────────────

/** Runs queued commands, `width` at a time, only while the gate is open (the service is up). */
class CommandQueue {
  private queue: (() => Promise<void>)[] = [];
  private running = 0;
  private open = false;
  private failure: Error | null = null;
  private idleWaiters: (() => void)[] = [];
  constructor(private readonly width: number) {}

  push(task: () => Promise<void>): void {
    this.queue.push(task);
    this.pump();
  }

  setOpen(open: boolean): void {
    this.open = open;
    this.pump();
  }

  /** Resolves when nothing is queued or running. */
  idle(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.queue.length === 0 && this.running === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  get error(): Error | null {
    return this.failure;
  }

  private pump(): void {
    while (this.open && this.running < this.width && this.queue.length > 0) {
      const task = this.queue.shift()!;
      this.running++;
      task()
        .catch((err) => (this.failure ??= err as Error))
        .finally(() => {
          this.running--;
          this.pump();
          if (this.queue.length === 0 && this.running === 0) for (const w of this.idleWaiters.splice(0)) w();
        });
    }
  }
}

interface RunOptions {
  lifecycles: number;
  hosts: number;
  commands: number;
  pollMs: number;
  kill: boolean;
}

interface RunResult {
  label: string;
  totalMs: number;
  lifecycleMs: number[];
  /** Interrupted run only. */
  kill?: {
    atMs: number;
    inFlightLifecycles: number;
    vmStates: Record<string, number>;
    effectsRunning: number;
    effectsDue: number;
    effectsWaiting: number;
    downMs: number;
    spawnToMainMs: number;
    memoryHostsMs: number;
    spawnToReadyMs: number;
    resumedAfterRestartMs: number;
    resumedAfterReadyMs: number;
    firstClaimAfterRestartMs: number;
    finishedAfterRestartMs: number;
    resumedLate: number;
  };
  events: number;
  effects: number;
  lostTries: number;
}

async function countBy(db: Kysely<Database>, q: string): Promise<Record<string, number>> {
  const { rows } = await sql.raw<{ k: string; n: string }>(q).execute(db);
  return Object.fromEntries(rows.map((r) => [r.k, Number(r.n)]));
}

async function oneRun(label: string, o: RunOptions): Promise<RunResult> {
  const database = await freshDatabase(`recovery_${label}`, 'gpuvm_bench_b_');
  const stateDir = mkdtempSync(join(tmpdir(), 'gb-rec-'));
  let child = spawnServe(database.url, o.hosts, stateDir);
  let store: Db | null = null;
  try {
    const ready = await child.ready;
    store = await openDb({ databaseUrl: database.url, poolSize: Math.min(16, o.commands + 2) });
    const db = store.kysely;
    const policy = retryPolicy(loadConfig({ dataDir: stateDir }, {}));
    // As the service would build them; no powerdown wait: the memory host's guest powers off at once.
    const service = new VmService(db, { defaults: { memoryMiB: 256, vcpus: 1, powerdownTimeoutMs: 0 }, policy, silentMs: 30_000 });

    const queue = new CommandQueue(o.commands);
    const vms = new Map<string, { host: number; sentAt: number; deleteSent: boolean; doneAt: number | null }>();
    let created = 0;
    let done = 0;
    let allCreated!: () => void;
    const allCreatedP = new Promise<void>((r) => (allCreated = r));
    let allDone!: () => void;
    let failed!: (err: Error) => void;
    // Resolves when every VM is deleted; rejects as soon as the watcher or a command fails.
    const allDoneP = new Promise<void>((resolve, reject) => {
      allDone = resolve;
      failed = reject;
    });
    allDoneP.catch(() => {});

    const t0 = wallNow();
    queue.setOpen(true);
    for (let i = 0; i < o.lifecycles; i++) {
      const host = i % o.hosts;
      queue.push(async () => {
        const sentAt = wallNow();
        const vm = await service.create({ gpus: 1, hostId: ready.hostIds[host], actor: 'bench' });
        vms.set(vm.id, { host, sentAt, deleteSent: false, doneAt: null });
        if (++created === o.lifecycles) allCreated();
      });
    }

    // Watches every VM's state (one query per tick) and deletes each as soon as it is running.
    let polling = true;
    const poller = (async () => {
      while (polling) {
        const { rows } = await sql<{ id: string; state: string; reason: string | null }>`select id, state, reason from vms where state <> 'provisioning'`.execute(db);
        for (const r of rows) {
          const v = vms.get(r.id);
          if (!v || v.doneAt !== null) continue;
          if (r.state === 'failed' || r.state === 'crashed') throw new Error(`VM ${r.id} ended ${r.state}: ${r.reason}`);
          if (r.state === 'deleted') {
            v.doneAt = wallNow();
            if (++done === o.lifecycles) allDone();
          } else if (r.state === 'running' && !v.deleteSent) {
            v.deleteSent = true;
            queue.push(async () => void (await service.delete(r.id, 'bench')));
          }
        }
        if (queue.error) throw queue.error;
        await new Promise((r) => setTimeout(r, o.pollMs));
      }
    })();
    poller.catch((err) => failed(err as Error));

    let kill: RunResult['kill'];
    if (o.kill) {
      await Promise.race([allCreatedP, allDoneP]);
      // The service goes down: clients' commands wait for it (the queue closes), then SIGKILL.
      queue.setOpen(false);
      const killAt = wallNow();
      child.proc.kill('SIGKILL');
      await child.exited;
      // Nothing writes now but commands already sent; let them land so the picture is final.
      await new Promise((r) => setTimeout(r, 50));
      const vmStates = await countBy(db, `select state as k, count(*)::text as n from vms group by state`);
      const effectStates = await countBy(
        db,
        `select case when status = 'running' then 'running' when status = 'pending' and due_at <= now() then 'due'
                     when status = 'pending' then 'waiting' else status end as k, count(*)::text as n
         from effects where status in ('pending', 'running') group by 1`,
      );
      const inFlight = (await sql<{ id: string }>`select id from effects where status = 'running' or (status = 'pending' and due_at <= now())`.execute(db)).rows.map((r) => r.id);

      const restartAt = wallNow();
      child = spawnServe(database.url, o.hosts, stateDir);
      const again = await child.ready;
      queue.setOpen(true);
      await allDoneP;
      const finishedAt = wallNow();
      // The first claim of each in-flight effect after the restart (see the file comment).
      const { rows } = await sql<{ id: string; first_ms: number | null }>`
        select e.id, (select min(extract(epoch from case when a.outcome = 'lost' then a.finished_at else a.started_at end) * 1000)
                      from effect_attempts a
                      where a.effect_id = e.id
                        and (case when a.outcome = 'lost' then a.finished_at else a.started_at end) >= to_timestamp(${restartAt / 1000})) as first_ms
        from effects e where e.id = any(${inFlight})`.execute(db);
      const claims = rows.map((r) => (r.first_ms === null ? Number.NaN : Number(r.first_ms)));
      if (claims.some((c) => Number.isNaN(c))) throw new Error(`${claims.filter((c) => Number.isNaN(c)).length} in-flight effects have no claim after the restart`);
      const resumedAt = Math.max(...claims);
      const firstClaim = Math.min(...claims);
      kill = {
        atMs: killAt - t0,
        inFlightLifecycles: o.lifecycles - (vmStates.deleted ?? 0),
        vmStates,
        effectsRunning: effectStates.running ?? 0,
        effectsDue: effectStates.due ?? 0,
        effectsWaiting: effectStates.waiting ?? 0,
        downMs: restartAt - killAt,
        spawnToMainMs: again.startedAt - child.spawnedAt,
        memoryHostsMs: again.hostsAt - again.startedAt,
        spawnToReadyMs: again.ready - child.spawnedAt,
        resumedAfterRestartMs: resumedAt - restartAt,
        resumedAfterReadyMs: resumedAt - again.ready,
        firstClaimAfterRestartMs: firstClaim - restartAt,
        finishedAfterRestartMs: finishedAt - restartAt,
        resumedLate: claims.filter((c) => c - restartAt > 1000).length,
      };
    }
    await allDoneP;
    const endAt = wallNow();
    polling = false;
    await poller;
    await queue.idle();
    const counts = (
      await sql<{ events: string; effects: string; lost: string }>`
        select (select count(*) from events)::text as events, (select count(*) from effects)::text as effects,
               (select count(*) from effect_attempts where outcome = 'lost')::text as lost`.execute(db)
    ).rows[0]!;
    return {
      label,
      totalMs: endAt - t0,
      lifecycleMs: [...vms.values()].map((v) => v.doneAt! - v.sentAt),
      kill,
      events: Number(counts.events),
      effects: Number(counts.effects),
      lostTries: Number(counts.lost),
    };
  } finally {
    if (child.proc.exitCode === null && child.proc.signalCode === null) {
      child.proc.kill('SIGTERM');
      const timer = setTimeout(() => child.proc.kill('SIGKILL'), 10_000);
      await child.exited;
      clearTimeout(timer);
    }
    await store?.close();
    if (process.argv.includes('--keep')) console.log(`  kept database ${database.name}`);
    else await database.drop();
    rmSync(stateDir, { recursive: true, force: true });
  }
}

export async function main(): Promise<void> {
  const lifecycles = option('lifecycles', 1000);
  const o: RunOptions = {
    lifecycles,
    hosts: option('hosts', Math.ceil(lifecycles / 8)),
    commands: option('commands', 16),
    pollMs: option('poll-ms', 20),
    kill: false,
  };
  if (o.hosts * 8 < lifecycles) throw new Error(`${lifecycles} one-GPU VMs at once need ${Math.ceil(lifecycles / 8)} hosts of 8 GPUs`);
  console.log(
    `figure 3: ${lifecycles} lifecycles (1-GPU VM create → running → delete → deleted) on ${o.hosts} in-memory hosts, ` +
      `${o.commands} commands at a time; ${cpus().length} cores, load average ${loadavg().map((x) => x.toFixed(1)).join(' ')}`,
  );
  const pairs = option('pairs', 1);
  const load = () => `load average ${loadavg()[0]!.toFixed(1)}`;
  for (let pair = 1; pair <= pairs; pair++) {
    const plainLoad = load();
    const plain = await oneRun('plain', o);
    console.log(`  uninterrupted: ${(plain.totalMs / 1000).toFixed(2)} s (${plainLoad} at its start)`);
    const killedLoad = load();
    const killed = await oneRun('killed', { ...o, kill: true });
    const k = killed.kill!;
    console.log(`  interrupted: ${(killed.totalMs / 1000).toFixed(2)} s (killed at ${(k.atMs / 1000).toFixed(2)} s, ${k.inFlightLifecycles} lifecycles in flight; ${killedLoad} at its start)`);
    console.log(`  at the kill: VMs ${JSON.stringify(k.vmStates)}; effects running ${k.effectsRunning}, due ${k.effectsDue}, waiting (not yet due) ${k.effectsWaiting}`);

    printTable(`figure 3 — recovery${pairs > 1 ? ` (pair ${pair} of ${pairs})` : ''}`, [
      { measure: 'uninterrupted run: first create → all deleted', ms: plain.totalMs, note: `p50 lifecycle ${fmt(summarize(plain.lifecycleMs).p50, 0)} ms` },
      { measure: 'interrupted run: first create → all deleted', ms: killed.totalMs, note: `${fmt(killed.totalMs / plain.totalMs, 2)}× uninterrupted (goal ≤ 1.2×)` },
      { measure: 'kill → restart (old process gone)', ms: k.downMs, note: '' },
      { measure: 'restart → new process running its code', ms: k.spawnToMainMs, note: 'node + tsx + imports' },
      { measure: '  of which: building the memory hosts', ms: k.memoryHostsMs, note: 'bench artefact (board facts from a sim host)' },
      { measure: 'restart → workers started (ready)', ms: k.spawnToReadyMs, note: 'db, migrations, registration check, workers' },
      { measure: 'restart → first in-flight effect claimed', ms: k.firstClaimAfterRestartMs, note: '' },
      { measure: 'restart → every in-flight effect claimed', ms: k.resumedAfterRestartMs, note: `${k.effectsRunning + k.effectsDue} effects; goal ≤ 1000 ms` },
      { measure: 'ready → every in-flight effect claimed', ms: k.resumedAfterReadyMs, note: '' },
      { measure: 'restart → every lifecycle finished', ms: k.finishedAfterRestartMs, note: '' },
    ]);
    console.log(
      `events ${plain.events} / ${killed.events}, effects ${plain.effects} / ${killed.effects}, lost tries ${plain.lostTries} / ${killed.lostTries} (uninterrupted / interrupted)`,
    );
    console.log(
      `resumed ${fmt(k.resumedAfterRestartMs, 0)} ms after the restart (${fmt(k.resumedAfterReadyMs, 0)} ms after ready): goal ≤ 1 s ${k.resumedAfterRestartMs <= 1000 ? 'met' : 'missed'}` +
        `${k.resumedLate ? ` (${k.resumedLate} effects later than 1 s)` : ''}; ` +
        `total ${fmt(killed.totalMs / plain.totalMs, 2)}× the uninterrupted run: goal ≤ 1.2× ${killed.totalMs / plain.totalMs <= 1.2 ? 'met' : 'missed'}`,
    );
  }
}

if (isMain(import.meta.url)) await main();
