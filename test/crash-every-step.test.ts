/**
 * Crash at every step: `gpuvm serve` runs a whole VM lifecycle (create → running → delete → gone)
 * as a child process with GPUVM_CRASH_AT=walk:<file>, so it SIGKILLs itself at the first named
 * crash point it has not died at before — before and after every effect's action on the host,
 * before and after every event's commit. The test restarts it after every death until the
 * lifecycle is done, then checks the host and the log against a run with no crash.
 */
import { appendFileSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Fmpm } from '../src/host/fmpm.ts';
import { Qemu } from '../src/host/qemu.ts';
import { loadSimHost, stopSimKernel, writeFaults } from '../src/host/sim/sim-host.ts';
import { Sysfs } from '../src/host/sysfs.ts';
import { freePort, http, startServeChild, type ServeChild } from './support/child.ts';
import { freshDatabaseUrl, tempDir, usingPostgres, waitUntil } from './support/env.ts';

const dirs: string[] = [];
const drops: (() => Promise<void>)[] = [];
let child: ServeChild | null = null;

afterAll(async () => {
  await child?.kill();
  for (const dir of dirs) {
    if (process.env.GPUVM_KEEP_TEST_DIRS) continue;
    const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot: join(dir, 'run', 'sim-b200'), accel: 'tcg' });
    for (const id of (() => { try { return readdirSync(join(dir, 'run', 'sim-b200')); } catch { return []; } })()) await qemu.terminate(id).catch(() => {});
    await stopSimKernel(join(dir, 'sim', 'sim-b200')).catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  }
  for (const drop of drops) await drop();
});

interface Walk {
  dataDir: string;
  visitedFile: string;
  port: number;
  databaseUrl: string | undefined;
  restarts: number;
}

async function start(walk: Walk): Promise<ServeChild> {
  // A walk that failed leaves its child running: the next walk must not run beside it.
  await child?.kill();
  for (;;) {
    try {
      child = await startServeChild({
        dataDir: walk.dataDir,
        port: walk.port,
        databaseUrl: walk.databaseUrl,
        // Every death at a crash point while an effect's try is in flight loses that try, and lost
        // tries count against its budget: one try here can die five times (its action, its outcome's
        // commit, the message that commit delivers), so the walk allows more tries than a host does.
        // The powerdown timer falls due well after system_powerdown has answered: were the two
        // effects to finish together, the walk could die at one's point before reaching the other's.
        env: { GPUVM_CRASH_AT: `walk:${walk.visitedFile}`, GPUVM_EFFECT_MAX_ATTEMPTS: '12', GPUVM_POWERDOWN_TIMEOUT_MS: '1500' },
      });
      return child;
    } catch (err) {
      // It may die at a crash point while starting up (resuming effects): start it again.
      walk.restarts++;
      appendFileSync(join(walk.dataDir, 'start-errors.log'), `${String(err).split('\n').slice(0, 3).join(' | ')}\n${String(err).slice(-600)}\n---\n`);
      if (walk.restarts > 400) throw err;
    }
  }
}

const alive = (c: ServeChild) => c.proc.exitCode === null && c.proc.signalCode === null;

/**
 * Calls the API, restarting the service whenever it died at a crash point, until `done` holds. The
 * time limit is generous: every restart is a Node start (seconds on a loaded machine), and a phase
 * has up to ~30 of them.
 */
async function drive(walk: Walk, step: () => Promise<boolean>, what: string, timeoutMs = 600_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!child || !alive(child)) {
      await child?.kill();
      walk.restarts++;
      await start(walk);
    }
    try {
      if (await step()) return;
    } catch {
      // The service died under the request; the next turn restarts it.
    }
    if (Date.now() > deadline) throw new Error(`timed out driving ${what}; visited:\n${readFileSync(walk.visitedFile, 'utf8')}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function vmByName(name: string): Promise<any | null> {
  const { body } = await http(child!.url, 'GET', '/v1/vms?all=true');
  return body.vms.find((v: { name: string }) => v.name === name) ?? null;
}

async function walkLifecycle(
  name: string,
  opts: { gpus: number; fault?: Record<string, unknown>; expectEnd: string; killQemu?: boolean },
): Promise<{ walk: Walk; points: string[]; vm: any }> {
  const dataDir = tempDir();
  dirs.push(dataDir);
  const db = await freshDatabaseUrl();
  drops.push(db.drop);
  const walk: Walk = { dataDir, visitedFile: join(dataDir, 'crash-points-visited'), port: await freePort(), databaseUrl: db.url, restarts: 0 };
  writeFileSync(walk.visitedFile, '');
  await start(walk);
  if (opts.fault) await writeFaults(join(dataDir, 'sim', 'sim-b200'), opts.fault);

  // Create: exactly once, even when the service dies before or after the commit.
  await drive(walk, async () => {
    if (await vmByName(name)) return true;
    await http(child!.url, 'POST', '/v1/vms', { gpus: opts.gpus, name });
    return false;
  }, 'create');
  const settled = opts.expectEnd === 'failed' ? ['failed'] : ['running'];
  await drive(walk, async () => settled.includes((await vmByName(name))?.state), 'provisioning');
  if (opts.killQemu) {
    // QEMU dies on its own (kill -9 from outside); the service notices, and may die on the way too.
    const running = await vmByName(name);
    process.kill(running.qemu_pid, 'SIGKILL');
    await drive(walk, async () => (await vmByName(name))?.state === 'crashed', 'crash handling');
  }
  await drive(walk, async () => {
    const vm = await vmByName(name);
    if (vm.state === 'deleted') return true;
    if (['running', 'failed', 'crashed'].includes(vm.state)) await http(child!.url, 'DELETE', `/v1/vms/${vm.id}`);
    return false;
  }, 'delete');
  const vm = await vmByName(name);
  const points = readFileSync(walk.visitedFile, 'utf8').split('\n').filter(Boolean);
  return { walk, points, vm };
}

async function expectHostAtRest(dataDir: string): Promise<void> {
  const sim = await loadSimHost(join(dataDir, 'sim', 'sim-b200'));
  const fmpm = new Fmpm({ bin: sim.fmpmBin });
  expect((await fmpm.list()).partitions.filter((p) => p.isActive)).toEqual([]);
  const sysfs = new Sysfs({ root: sim.sysfsRoot });
  for (const g of sim.gpus) expect(await sysfs.driverOf(g.pciAddress), g.pciAddress).toBe('nvidia');
}

// Every restart starts a Node process and a database connection: this walk runs on the real
// Postgres only, where CI runs it; the embedded database's crash resume is covered by crash.test.ts.
describe.runIf(usingPostgres)('crash at every step (postgres)', () => {
  it('dies at every named point of a full lifecycle and still ends as a run with no crash', async () => {
    const { walk, points, vm } = await walkLifecycle('walk-ok', { gpus: 2, expectEnd: 'deleted' });
    console.log(`crash-every-step: ${points.length} crash points exercised over ${walk.restarts} restarts (lifecycle create → running → delete)`);

    // The same final state as a run with no crash.
    expect(vm.state).toBe('deleted');
    await expectHostAtRest(walk.dataDir);
    const history = (await http(child!.url, 'GET', `/v1/vms/${vm.id}/history`)).body;
    expect(history.events.filter((e: { stream: string }) => e.stream === `vm:${vm.id}`).map((e: { to: string }) => e.to)).toEqual([
      'provisioning', 'starting', 'running', 'stopping', 'terminating', 'releasing', 'deleted',
    ]);
    expect(history.effects.every((e: { status: string }) => e.status === 'done')).toBe(true);
    const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot: join(walk.dataDir, 'run', 'sim-b200'), accel: 'tcg' });
    expect((await qemu.status(vm.id)).state).toBe('gone');

    // Every point of the lifecycle was reached: both sides of every effect and every event commit.
    const effects = ['prepareGpus', 'activatePartition', 'confirmActive', 'bindVfio', 'notifyVm', 'startQemu', 'powerdownQemu', 'powerdownTimer', 'terminateQemu', 'releasePartition', 'bindHost', 'deactivatePartition', 'confirmInactive'];
    const events = ['CLAIM', 'CREATE', 'GPUS_READY', 'ACTIVATED', 'CONFIRMED_ACTIVE', 'BOUND_VFIO', 'PARTITION_READY', 'QEMU_STARTED', 'DELETE', 'POWERDOWN_TIMEOUT', 'QEMU_EXITED', 'RELEASE', 'BOUND_HOST', 'DEACTIVATED', 'CONFIRMED_INACTIVE', 'PARTITION_RELEASED'];
    const expected = [
      ...effects.flatMap((e) => [`effect:${e}:before-action`, `effect:${e}:after-action`]),
      ...events.map((e) => `event:${e}:before-commit`),
      // CLAIM commits with CREATE, and the notices with the partition's step that sends them
      // (BOUND_VFIO, CONFIRMED_INACTIVE): a kill after those commits is the other event's point.
      ...events.filter((e) => !['CLAIM', 'PARTITION_READY', 'PARTITION_RELEASED'].includes(e)).map((e) => `event:${e}:after-commit`),
    ];
    expect(expected.filter((p) => !points.includes(p))).toEqual([]);
    expect(walk.restarts).toBeGreaterThanOrEqual(expected.length);
    await child!.kill();
  }, 900_000);

  it('dies at every named point of an activation failure and still ends failed with everything returned', async () => {
    const allIds = Object.fromEntries(Array.from({ length: 15 }, (_, i) => [String(i + 1), -24]));
    const { walk, points, vm } = await walkLifecycle('walk-fail', { gpus: 1, fault: { fmpm: { activateFails: allIds } }, expectEnd: 'failed' });
    console.log(`crash-every-step: ${points.length} crash points exercised over ${walk.restarts} restarts (activation failure)`);
    expect(vm.state).toBe('deleted');
    const history = (await http(child!.url, 'GET', `/v1/vms/${vm.id}/history`)).body;
    expect(history.events.filter((e: { stream: string }) => e.stream === `vm:${vm.id}`).map((e: { to: string }) => e.to)).toEqual(['provisioning', 'failed', 'deleted']);
    expect(points).toContain('event:EFFECT_FAILED:before-commit');
    await expectHostAtRest(walk.dataDir);
    await child!.kill();
  }, 900_000);

  it('dies at every named point of a QEMU crash and still ends crashed, then deleted, with everything returned', async () => {
    const { walk, points, vm } = await walkLifecycle('walk-crash', { gpus: 1, killQemu: true, expectEnd: 'deleted' });
    console.log(`crash-every-step: ${points.length} crash points exercised over ${walk.restarts} restarts (QEMU dies on its own)`);
    expect(vm.state).toBe('deleted');
    const history = (await http(child!.url, 'GET', `/v1/vms/${vm.id}/history`)).body;
    expect(history.events.filter((e: { stream: string }) => e.stream === `vm:${vm.id}`).map((e: { to: string }) => e.to)).toEqual([
      'provisioning', 'starting', 'running', 'releasing', 'crashed', 'deleted',
    ]);
    expect(points).toContain('event:QEMU_EXITED:before-commit');
    expect(points).toContain('event:QEMU_EXITED:after-commit');
    await expectHostAtRest(walk.dataDir);
    await child!.kill();
  }, 900_000);
});
