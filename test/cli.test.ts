/** The CLI as a user runs it, against `gpuvm serve` in a child process. */
import { execFile } from 'node:child_process';
import { readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qemu } from '../src/host/qemu.ts';
import { simKernelRunning, stopSimKernel } from '../src/host/sim/sim-host.ts';
import { freePort, startServeChild, type ServeChild } from './support/child.ts';
import { freshDatabaseUrl, tempDir, usingPostgres } from './support/env.ts';

const BIN = fileURLToPath(new URL('../bin/gpuvm.js', import.meta.url));
const dataDir = tempDir();
let child: ServeChild;
let dropDb = async () => {};

async function gpuvm(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [BIN, '--url', child.url, ...args], { timeout: 120_000 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

describe(`gpuvm CLI (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    const db = await freshDatabaseUrl();
    dropDb = db.drop;
    child = await startServeChild({ dataDir, port: await freePort(), databaseUrl: db.url });
  });
  afterAll(async () => {
    await child?.kill('SIGTERM');
    const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot: join(dataDir, 'run', 'sim-b200'), accel: 'tcg' });
    for (const id of (() => { try { return readdirSync(join(dataDir, 'run', 'sim-b200')); } catch { return []; } })()) await qemu.terminate(id).catch(() => {});
    await stopSimKernel(join(dataDir, 'sim', 'sim-b200')).catch(() => {});
    await dropDb();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('creates, lists, shows, prints history and deletes a VM', async () => {
    const created = await gpuvm('vm', 'create', '--gpus', '2', '--name', 'cli-vm', '--wait');
    expect(created.code, created.stderr).toBe(0);
    const id = /^(vm-[a-z0-9]{10}) running/.exec(created.stdout)?.[1];
    expect(id, created.stdout).toBeTruthy();
    expect(created.stderr).toContain(`${id}: running`);

    const ls = await gpuvm('vm', 'ls');
    expect(ls.stdout.split('\n')[0]).toMatch(/^ID\s+NAME\s+STATE\s+HOST\s+GPUS\s+PARTITION\s+MODULES\s+CREATED$/);
    expect(ls.stdout).toMatch(new RegExp(`${id}\\s+cli-vm\\s+running\\s+sim-b200\\s+2\\s+\\d+`));
    expect(created.stdout).toMatch(new RegExp(`^${id} running on sim-b200 \\(partition \\d+, modules \\d+,\\d+\\)`));
    const lsJson = JSON.parse((await gpuvm('vm', 'ls', '--json')).stdout);
    expect(lsJson).toHaveLength(1);
    expect(lsJson[0]).toMatchObject({ id, name: 'cli-vm', state: 'running', gpu_count: 2 });

    const show = await gpuvm('vm', 'show', id!);
    expect(show.stdout).toMatch(/state:\s+running/);
    expect(show.stdout).toMatch(/0: module \d+\s+0000:[0-9a-f]{2}:00\.0/);

    const history = await gpuvm('history', id!);
    expect(history.stdout).toMatch(/CLAIM\s+free → preparing/);
    expect(history.stdout).toMatch(/QEMU_STARTED\s+starting → running/);
    expect(history.stdout).toContain('Effects:');
    const historyJson = JSON.parse((await gpuvm('history', id!, '--json')).stdout);
    expect(historyJson.events.length).toBeGreaterThanOrEqual(8);

    const rm = await gpuvm('vm', 'rm', id!, '--wait');
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stdout.trim()).toBe(`${id} deleted`);
  }, 120_000);


  it('migrate applies the migrations once', async () => {
    const dir = tempDir();
    try {
      const db = await freshDatabaseUrl();
      const args = [BIN, 'migrate', '--data-dir', dir, ...(db.url ? ['--database-url', db.url] : [])];
      const first = await promisify(execFile)(process.execPath, args);
      expect(first.stdout.trim()).toBe('applied: 0001_initial, 0002_quarantine, 0003_drift_repair, 0004_timer_cancelled, 0005_fencing, 0006_fleet');
      const second = await promisify(execFile)(process.execPath, args);
      expect(second.stdout.trim()).toBe('database is up to date');
      await db.drop();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);

  it('prints one line and exits non-zero on every error', async () => {
    const cases: [string[], RegExp][] = [
      [['vm', 'create', '--gpus', '3'], /^gpuvm: gpus must be 1, 2, 4 or 8 \(got 3\)\n$/],
      [['vm', 'create', '--gpus', 'two'], /^gpuvm: --gpus must be 1, 2, 4 or 8/],
      [['vm', 'create', '--gpus', '1', '--name', 'a/b'], /^gpuvm: name: name may hold only/],
      [['vm', 'show', 'vm-0000000000'], /^gpuvm: no VM vm-0000000000\n$/],
      [['vm', 'rm', 'nope'], /^gpuvm: invalid VM id "nope"/],
      [['--url', 'http://127.0.0.1:1', 'vm', 'ls'], /^gpuvm: cannot reach the gpuvm service at http:\/\/127\.0\.0\.1:1/],
    ];
    for (const [args, message] of cases) {
      const r = await gpuvm(...args);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr, args.join(' ')).toMatch(message);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
    }
  }, 60_000);

  it('host ls, capacity, cordon, drain --wait and uncordon, as an operator types them', async () => {
    const ls = await gpuvm('host', 'ls');
    expect(ls.stdout.split('\n')[0]).toMatch(/^HOST\s+STATE\s+BOARD\s+FREE \(GPUS:VMS\)\s+VMS\s+HEARTBEAT\s+NOTE$/);
    expect(ls.stdout).toMatch(/sim-b200\s+ready\s+NVIDIA B200 \(sim\)\s+1:8 2:4 4:2 8:1\s+0\s+\d+s ago/);
    const capacity = await gpuvm('capacity');
    expect(capacity.stdout).toMatch(/sim-b200\s+NVIDIA B200\s+yes\s+8\s+4\s+2\s+1\s+0/);
    expect(capacity.stdout).toMatch(/fleet\s+8\s+4\s+2\s+1\s+0/);

    expect((await gpuvm('host', 'cordon', 'sim-b200', '--reason', 'bios update')).stdout).toBe('sim-b200 cordoned: no new VMs are placed on it\n');
    expect((await gpuvm('host', 'ls')).stdout).toMatch(/sim-b200\s+cordoned\s+.*cordoned by api:cli:\S+: bios update/);
    const refused = await gpuvm('vm', 'create', '--gpus', '1');
    expect([refused.code, refused.stderr]).toEqual([1, expect.stringMatching(/^gpuvm: no capacity: no free partition of 1 GPU in the fleet \(0 hosts taking VMs; cordoned: sim-b200\)\n$/)]);
    expect((await gpuvm('capacity')).stdout).toMatch(/held back \(not taking VMs\): sim-b200 \(cordoned\) 1:8 2:4 4:2 8:1/);

    const drain = await gpuvm('host', 'drain', 'sim-b200', '--wait', '--timeout', '60');
    expect(drain.code, drain.stderr).toBe(0);
    expect(drain.stdout).toMatch(/^sim-b200 draining: no new VMs; waiting for its VMs to end .*\nsim-b200 maintenance\n$/);
    expect((await gpuvm('host', 'uncordon', 'sim-b200')).stdout).toBe('sim-b200 ready\n');
    const rm = await gpuvm('host', 'rm', 'sim-b200x');
    expect([rm.code, rm.stderr]).toEqual([1, 'gpuvm: no host sim-b200x\n']);
  }, 120_000);

  it('sim-down stops the VMs and the simulated kernel left running after the service stops', async () => {
    const created = await gpuvm('vm', 'create', '--gpus', '1', '--wait');
    const id = /^(vm-[a-z0-9]{10}) running/.exec(created.stdout)![1]!;
    await child.kill('SIGTERM');
    const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot: join(dataDir, 'run', 'sim-b200'), accel: 'tcg' });
    expect((await qemu.status(id)).state).toBe('alive');
    const down = await promisify(execFile)(process.execPath, [BIN, 'sim-down', '--data-dir', dataDir]);
    expect(down.stdout).toContain(`${id}: QEMU stopped`);
    expect(down.stdout).toContain('simulated host sim-b200 is down');
    expect((await qemu.status(id)).state).toBe('gone');
    expect(await simKernelRunning(join(dataDir, 'sim', 'sim-b200'))).toBeNull();
  }, 120_000);
});
