import { execa } from 'execa';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { restartFabricManager } from '../src/host/sim/sim-host.ts';
import { Fmpm, FmpmError, parsePartitionTable } from '../src/host/fmpm.ts';

const FMPM_MJS = fileURLToPath(new URL('../src/host/sim/bin/fmpm.mjs', import.meta.url));
const FIXTURES = fileURLToPath(new URL('./fixtures/fmpm/', import.meta.url));
const EMFILE_SCRIPT = fileURLToPath(new URL('./support/fmpm-emfile.ts', import.meta.url));
const REPO = fileURLToPath(new URL('..', import.meta.url));

const B200_PARTITIONS = [
  [1, 2, 3, 4, 5, 6, 7, 8],
  [1, 2, 3, 4],
  [5, 6, 7, 8],
  [1, 2],
  [3, 4],
  [5, 6],
  [7, 8],
  [1], [2], [3], [4], [5], [6], [7], [8],
].map((modules, i) => ({ id: i + 1, modules }));

const H100_MODULES_BY_ID: Record<number, number[]> = { 0: [1, 2, 3, 4, 5, 6, 7, 8], 1: [1, 2, 3, 4], 3: [1, 3], 4: [2, 4], 6: [6, 8], 7: [1], 14: [8] };

async function fixture(name: string): Promise<string> {
  return readFile(join(FIXTURES, name), 'utf8');
}

/** Expects `p` to reject with an FmpmError and returns it. */
async function fmpmError(p: Promise<unknown>): Promise<FmpmError> {
  const err = await p.then(
    () => {
      throw new Error('expected an FmpmError, but the call succeeded');
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(FmpmError);
  return err as FmpmError;
}

// ── a simulated host laid out as common.md describes ──────────────────────────
let tmp: string;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'gpuvm-fmpm-test-'));
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

let rootCounter = 0;

async function makeSimRoot(partitions: { id: number; modules: number[] }[], board = 'B200'): Promise<{ root: string; bin: string }> {
  const root = join(tmp, `host-${++rootCounter}`);
  const moduleCount = Math.max(...partitions.flatMap((p) => p.modules));
  const gpus = Array.from({ length: moduleCount }, (_, i) => ({
    pciAddress: `0000:${(0x10 + i).toString(16)}:00.0`,
    moduleId: i + 1,
    uuid: `GPU-${String(i).padStart(8, '0')}-0000-0000-0000-000000000000`,
    serial: String(1650000000000 + i),
    iommuGroup: 20 + i,
  }));
  await mkdir(join(root, 'bin'), { recursive: true });
  await writeFile(
    join(root, 'host.json'),
    JSON.stringify({
      hostId: 'sim-test',
      board,
      productName: `NVIDIA ${board}`,
      pciVendorId: '0x10de',
      pciDeviceId: '0x2901',
      driverVersion: '580.95.05',
      fabricManagerVersion: '580.95.05',
      kernelModule: 'open',
      gpus,
      partitions,
    }),
  );
  const bin = join(root, 'bin', 'fmpm');
  await writeFile(bin, `#!/bin/sh\nGPUVM_SIM_ROOT='${root}'\nexport GPUVM_SIM_ROOT\nexec '${process.execPath}' '${FMPM_MJS}' "$@"\n`);
  await chmod(bin, 0o755);
  return { root, bin };
}

async function setFaults(root: string, fmpm: Record<string, unknown>): Promise<void> {
  await writeFile(join(root, 'faults.json'), JSON.stringify({ fmpm }));
}

async function activeInState(root: string): Promise<number[]> {
  const state = JSON.parse(await readFile(join(root, 'fm', 'state.json'), 'utf8')) as { active: number[] };
  return state.active;
}

// ── parsing ───────────────────────────────────────────────────────────────────
describe('parsePartitionTable', () => {
  it('reads a StyledWriter B200 table (ids 1..15)', async () => {
    const t = parsePartitionTable(await fixture('b200-list.json'));
    expect(t.numPartitions).toBe(15);
    expect(t.maxNumPartitions).toBe(64);
    expect(t.version).toBe(16909068);
    expect(t.partitions.map((p) => p.partitionId)).toEqual(B200_PARTITIONS.map((p) => p.id));
    for (const p of t.partitions) {
      expect(p.gpus.map((g) => g.physicalId)).toEqual(B200_PARTITIONS.find((b) => b.id === p.partitionId)!.modules);
      expect(p.numGpus).toBe(p.gpus.length);
    }
    expect(t.partitions.filter((p) => p.isActive).map((p) => p.partitionId)).toEqual([3, 4]);
    const gpu = t.partitions[0]!.gpus[0]!;
    expect(gpu).toEqual({ physicalId: 1, pciBusId: '', uuid: '', maxNumNvLinks: 18, numNvLinksAvailable: 18, nvlinkLineRateMBps: 53125 });
    // A single-GPU partition has no NVLink peers.
    expect(t.partitions.find((p) => p.partitionId === 8)!.gpus[0]).toMatchObject({ physicalId: 1, maxNumNvLinks: 0, numNvLinksAvailable: 0 });
  });

  it('reads an H100 table (ids 0..14, other pairings)', async () => {
    const t = parsePartitionTable(await fixture('h100-list.json'));
    expect(t.partitions.map((p) => p.partitionId)).toEqual(Array.from({ length: 15 }, (_, i) => i));
    for (const [id, modules] of Object.entries(H100_MODULES_BY_ID)) {
      expect(t.partitions.find((p) => p.partitionId === Number(id))!.gpus.map((g) => g.physicalId)).toEqual(modules);
    }
    expect(t.partitions.filter((p) => p.isActive).map((p) => p.partitionId)).toEqual([0]);
    expect(t.partitions[0]!.gpus[0]).toMatchObject({ maxNumNvLinks: 18, numNvLinksAvailable: 18, nvlinkLineRateMBps: 26562 });
    expect(t.partitions[7]!.gpus[0]).toMatchObject({ maxNumNvLinks: 0, numNvLinksAvailable: 0, nvlinkLineRateMBps: 26562 });
  });

  it('skips a banner printed before the JSON document', async () => {
    const t = parsePartitionTable(`Connected to Fabric Manager instance.\n${await fixture('h100-list.json')}`);
    expect(t.numPartitions).toBe(15);
  });

  it('rejects malformed output with bad-output', async () => {
    const good = JSON.parse(await fixture('b200-list.json')) as Record<string, unknown>;
    const variants: [string, string][] = [
      ['empty', ''],
      ['not json', 'Failed to get partition list. fmReturn: -8'],
      ['truncated', (await fixture('b200-list.json')).slice(0, 400)],
      ['missing version', JSON.stringify({ ...good, version: undefined })],
      ['missing partitionInfo', JSON.stringify({ ...good, partitionInfo: undefined })],
      ['isActive 2', JSON.stringify({ ...good, partitionInfo: [{ ...(good.partitionInfo as object[])[0], isActive: 2 }], numPartitions: 1 })],
      ['numGpus mismatch', JSON.stringify({ ...good, partitionInfo: [{ ...(good.partitionInfo as object[])[0], numGpus: 3 }], numPartitions: 1 })],
      ['numPartitions mismatch', JSON.stringify({ ...good, numPartitions: 14 })],
      ['physicalId as string', (await fixture('b200-list.json')).replace('"physicalId" : 1,', '"physicalId" : "1",')],
      ['array at root', '[]'],
    ];
    for (const [name, text] of variants) {
      let caught: unknown;
      try {
        parsePartitionTable(text);
      } catch (err) {
        caught = err;
      }
      expect(caught, name).toBeInstanceOf(FmpmError);
      expect((caught as FmpmError).code, name).toBe('bad-output');
      expect((caught as FmpmError).retryable, name).toBe(false);
    }
  });
});

// ── the simulator's own output ────────────────────────────────────────────────
describe('simulated fmpm', () => {
  it('prints -l byte-for-byte in StyledWriter form', async () => {
    const { root, bin } = await makeSimRoot(B200_PARTITIONS);
    await mkdir(join(root, 'fm'));
    await writeFile(join(root, 'fm', 'state.json'), JSON.stringify({ active: [3, 4], faults: {} }));
    const { stdout, exitCode } = await execa(bin, ['-l'], { timeout: 10_000, stripFinalNewline: false });
    expect(exitCode).toBe(0);
    expect(stdout).toBe(await fixture('b200-list.json'));
  });

  it('uses the real exit codes and stdout messages', async () => {
    const { bin } = await makeSimRoot(B200_PARTITIONS);
    const run = (...args: string[]) => execa(bin, args, { timeout: 10_000, reject: false });
    expect(await run('-a', '2')).toMatchObject({ exitCode: 0, stdout: '' });
    expect(await run('-a', '2')).toMatchObject({ exitCode: 239, stdout: 'Failed to activate partition. fmReturn: -17' });
    expect(await run('-a', '9')).toMatchObject({ exitCode: 249, stdout: 'Failed to activate partition. fmReturn: -7' });
    expect(await run('-d', '3')).toMatchObject({ exitCode: 238, stdout: 'Failed to deactivate partition. fmReturn: -18' });
    expect(await run('-a', '64')).toMatchObject({ exitCode: 255, stdout: 'Invalid Partition ID.' });
    expect(await run('--bogus')).toMatchObject({ exitCode: 255 });
    expect(await run('-v')).toMatchObject({ exitCode: 0, stdout: '1.0.1' });
  });

  it('exits 2 with a clear message when GPUVM_SIM_ROOT is unset', async () => {
    const env = { ...process.env };
    delete env.GPUVM_SIM_ROOT;
    const r = await execa(process.execPath, [FMPM_MJS, '-l'], { env, extendEnv: false, reject: false, timeout: 10_000 });
    expect(r.exitCode).toBe(2);
    expect(r.stderr).toContain('GPUVM_SIM_ROOT');
  });
});

// ── the adapter against the simulator ─────────────────────────────────────────
describe('Fmpm adapter', () => {
  let root: string;
  let fmpm: Fmpm;

  beforeEach(async () => {
    const sim = await makeSimRoot(B200_PARTITIONS);
    root = sim.root;
    fmpm = new Fmpm({ bin: sim.bin, timeoutMs: 10_000 });
  });

  it('lists the partition table', async () => {
    const t = await fmpm.list();
    expect(t.partitions.map((p) => [p.partitionId, p.gpus.map((g) => g.physicalId)])).toEqual(B200_PARTITIONS.map((p) => [p.id, p.modules]));
    expect(t.partitions.every((p) => !p.isActive)).toBe(true);
  });

  it('activates, is idempotent on already-active, and deactivates', async () => {
    expect(await fmpm.activate(2)).toBe('activated');
    expect(await fmpm.isActive(2)).toBe(true);
    expect(await activeInState(root)).toEqual([2]);
    expect(await fmpm.activate(2)).toBe('already-active');

    expect(await fmpm.deactivate(2)).toBe('deactivated');
    expect(await fmpm.isActive(2)).toBe(false);
    expect(await fmpm.deactivate(2)).toBe('already-inactive');
    expect(await activeInState(root)).toEqual([]);
  });

  it('refuses a partition that overlaps an active one (in-use)', async () => {
    await fmpm.activate(2); // modules 1-4
    const err = await fmpmError(fmpm.activate(4)); // modules 1,2
    expect(err).toMatchObject({ code: 'in-use', fmReturn: -7, exitCode: 249, partitionId: 4, retryable: false });
    expect(err.message).toContain(join(root, 'bin', 'fmpm'));
    expect(err.message).toContain('partition 4');
    expect(err.message).toContain('-7');
    expect(await fmpm.isActive(4)).toBe(false);
    expect(await activeInState(root)).toEqual([2]);
  });

  it('does not take "already active" for success when fmpm -l disagrees', async () => {
    await setFaults(root, { activateFails: { '5': -17 } });
    const err = await fmpmError(fmpm.activate(5));
    expect(err.code).toBe('already-active');
    expect(err.message).toContain('fmpm -l shows partition 5 inactive');
  });

  it('does not take "already inactive" for success when fmpm -l disagrees', async () => {
    await fmpm.activate(5);
    await setFaults(root, { deactivateFails: { '5': -18 } });
    const err = await fmpmError(fmpm.deactivate(5));
    expect(err.code).toBe('already-inactive');
    expect(err.message).toContain('fmpm -l shows partition 5 active');
  });

  it('treats UNINITIALIZED on deactivate as already-inactive only when fmpm -l confirms', async () => {
    await setFaults(root, { deactivateFails: { '6': -4, '7': -4 } });
    expect(await fmpm.deactivate(6)).toBe('already-inactive');
    await fmpm.activate(7);
    const err = await fmpmError(fmpm.deactivate(7));
    expect(err).toMatchObject({ code: 'uninitialized', fmReturn: -4, exitCode: 252, retryable: true });
  });

  it('validates partition ids before they reach argv', async () => {
    const neverRun = new Fmpm({ bin: join(tmp, 'does-not-exist') });
    for (const bad of [-1, 1.5, 1000, Number.NaN, Number.POSITIVE_INFINITY]) {
      for (const call of [() => neverRun.activate(bad), () => neverRun.deactivate(bad), () => neverRun.isActive(bad)]) {
        const err = await fmpmError(call());
        expect(err.code).toBe('bad-param'); // not spawn-failed: nothing was run
      }
    }
    expect((await fmpmError(neverRun.setActivatedList([1, -2]))).code).toBe('bad-param');
  });

  it('reports an id Fabric Manager does not know as bad-param', async () => {
    const err = await fmpmError(fmpm.activate(42));
    expect(err).toMatchObject({ code: 'bad-param', fmReturn: -1, exitCode: 255, partitionId: 42 });
    expect((await fmpmError(fmpm.isActive(42))).code).toBe('bad-param');
  });

  it('maps each injected fmReturn to its error code', async () => {
    const cases: [number, string, boolean][] = [
      [-8, 'not-configured', true],
      [-9, 'connection-not-valid', true],
      [-4, 'uninitialized', true],
      [-24, 'resource-in-another-partition', false],
      [-7, 'in-use', false],
      [-1, 'bad-param', false],
      [-2, 'unknown', false],
    ];
    for (const [fmReturn, code, retryable] of cases) {
      await setFaults(root, { activateFails: { '3': fmReturn } });
      const err = await fmpmError(fmpm.activate(3));
      expect(err, code).toMatchObject({ code, fmReturn, exitCode: fmReturn & 0xff, partitionId: 3, retryable });
      expect(err.message).toContain(`fmReturn ${fmReturn}`);
    }
    await setFaults(root, {});
    await fmpm.activate(3);
    await setFaults(root, { deactivateFails: { '3': -7 } });
    expect(await fmpmError(fmpm.deactivate(3))).toMatchObject({ code: 'in-use', fmReturn: -7, exitCode: 249 });
    expect(await fmpm.isActive(3)).toBe(true);
  });

  it('reports Fabric Manager down as cannot-connect (retryable)', async () => {
    await setFaults(root, { down: true });
    for (const call of [() => fmpm.list(), () => fmpm.activate(1), () => fmpm.setActivatedList([1])]) {
      const err = await fmpmError(call());
      expect(err).toMatchObject({ code: 'cannot-connect', retryable: true, fmReturn: -9, exitCode: 247 });
      expect(err.message).toContain('cannot reach Fabric Manager');
    }
  });

  it('kills a hung fmpm at the timeout', async () => {
    await setFaults(root, { hangMs: 5_000 });
    const quick = new Fmpm({ bin: join(root, 'bin', 'fmpm'), timeoutMs: 300 });
    const started = Date.now();
    const err = await fmpmError(quick.activate(1));
    expect(err).toMatchObject({ code: 'timeout', retryable: true, partitionId: 1 });
    expect(Date.now() - started).toBeLessThan(3_000);
    expect(err.message).toContain('300 ms');
    // The killed call changed nothing.
    await setFaults(root, {});
    expect(await fmpm.isActive(1)).toBe(false);
  });

  it('sets the activated list while a restarted Fabric Manager waits for it, and only then', async () => {
    expect(await fmpmError(fmpm.setActivatedList([4, 7]))).toMatchObject({ code: 'not-configured', fmReturn: -8 });
    await fmpm.activate(1);
    await restartFabricManager(root, { timeoutMs: 60_000 });
    // Waiting for the list: every other call is refused.
    expect(await fmpmError(fmpm.list())).toMatchObject({ code: 'not-configured', retryable: true });
    expect(await fmpmError(fmpm.activate(2))).toMatchObject({ code: 'not-configured' });
    await fmpm.setActivatedList([4, 7]);
    const t = await fmpm.list();
    expect(t.partitions.filter((p) => p.isActive).map((p) => p.partitionId)).toEqual([4, 7]);
    await restartFabricManager(root, { timeoutMs: 60_000 });
    await fmpm.setActivatedList([]);
    expect((await fmpm.list()).partitions.some((p) => p.isActive)).toBe(false);
    await restartFabricManager(root, { timeoutMs: 60_000 });
    expect(await fmpmError(fmpm.setActivatedList([4, 8]))).toMatchObject({ code: 'in-use', fmReturn: -7 }); // 4 = {1,2}, 8 = {1}
    expect(await fmpmError(fmpm.setActivatedList([8, 8]))).toMatchObject({ code: 'bad-param', partitionId: 8 });
    await fmpm.setActivatedList([]);
  });

  it('exits when its window passes unanswered', async () => {
    await restartFabricManager(root, { timeoutMs: 100 });
    await new Promise((r) => setTimeout(r, 200));
    expect(await fmpmError(fmpm.list())).toMatchObject({ code: 'cannot-connect' });
    expect(await fmpmError(fmpm.setActivatedList([]))).toMatchObject({ code: 'cannot-connect' });
  });

  it('passes --hostname and the comma list exactly', async () => {
    const argsFile = join(tmp, `argv-${Date.now()}.txt`);
    const recorder = join(tmp, `recorder-${Date.now()}.sh`);
    await writeFile(recorder, `#!/bin/sh\nprintf '%s\\n' "$@" > '${argsFile}'\n`);
    await chmod(recorder, 0o755);
    await new Fmpm({ bin: recorder, hostname: '10.1.2.3:6666' }).setActivatedList([1, 5]);
    expect((await readFile(argsFile, 'utf8')).trim().split('\n')).toEqual(['--hostname', '10.1.2.3:6666', '--set-activated-list', '1,5']);
    await new Fmpm({ bin: recorder }).activate(12);
    expect((await readFile(argsFile, 'utf8')).trim().split('\n')).toEqual(['-a', '12']);
    expect(() => new Fmpm({ bin: recorder, hostname: '-l' })).toThrow(FmpmError);
    expect(() => new Fmpm({ bin: recorder, hostname: '1.2.3.4 -a 1' })).toThrow(FmpmError);
    // The simulator accepts and ignores --hostname, as a reachable FM would.
    expect((await new Fmpm({ bin: join(root, 'bin', 'fmpm'), hostname: '127.0.0.1:6666' }).list()).numPartitions).toBe(15);
  });

  it('reports a missing binary as spawn-failed and garbage output as bad-output', async () => {
    const missing = join(tmp, 'no-such-fmpm');
    const err = await fmpmError(new Fmpm({ bin: missing }).list());
    expect(err.code).toBe('spawn-failed');
    expect(err.message).toContain(missing);

    const garbage = join(tmp, `garbage-${Date.now()}.sh`);
    await writeFile(garbage, '#!/bin/sh\necho "hello"\n');
    await chmod(garbage, 0o755);
    expect((await fmpmError(new Fmpm({ bin: garbage }).list())).code).toBe('bad-output');
  });

  it('out of file descriptors: fmpm -l cannot be spawned → retryable spawn-failed, and the process lives on', () => {
    // A child node under a low open-file limit, so the test runner keeps its own descriptors.
    const r = spawnSync('prlimit', ['--nofile=128:128', process.execPath, '--import', 'tsx', EMFILE_SCRIPT, join(root, 'bin', 'fmpm')], {
      cwd: REPO,
      env: { ...process.env, GPUVM_SIM_ROOT: root },
      encoding: 'utf8',
      timeout: 60_000,
    });
    const lines = r.stdout.trim().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect({ status: r.status, signal: r.signal, lines, stderr: r.stderr.slice(-2_000) }).toMatchObject({ status: 0, signal: null, stderr: '' });
    expect(lines[0]).toMatchObject({ what: 'exhausted', ok: false, isFmpmError: true, code: 'spawn-failed', retryable: true });
    expect(lines[0]!.message).toMatch(/EMFILE/);
    expect(lines[1]).toEqual({ what: 'freed', ok: true, numPartitions: 15 });
  });

  it('breaks a stale lock left by a killed fmpm', async () => {
    const dead = await execa(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
    await mkdir(join(root, 'fm'), { recursive: true });
    await writeFile(join(root, 'fm', 'state.lock'), dead.stdout);
    expect(await fmpm.activate(8)).toBe('activated');
    expect(await activeInState(root)).toEqual([8]);
  });

  it('lets exactly a non-overlapping set win when overlapping partitions race', async () => {
    const ids = B200_PARTITIONS.map((p) => p.id);
    const results = await Promise.allSettled(ids.map((id) => fmpm.activate(id)));
    const won = ids.filter((_, i) => results[i]!.status === 'fulfilled');
    for (const [i, r] of results.entries()) {
      if (r.status === 'rejected') expect((r.reason as FmpmError).code, `partition ${ids[i]}`).toBe('in-use');
    }
    const modules = won.flatMap((id) => B200_PARTITIONS.find((p) => p.id === id)!.modules);
    expect(new Set(modules).size).toBe(modules.length);
    expect(won.length).toBeGreaterThan(0);
    expect((await activeInState(root)).sort((a, b) => a - b)).toEqual(won);
  });
});

describe('Fmpm adapter under concurrency', () => {
  it('lands 20 concurrent single-GPU activations with no lost update', async () => {
    const singles = Array.from({ length: 20 }, (_, i) => ({ id: i + 1, modules: [i + 1] }));
    const { root, bin } = await makeSimRoot(singles);
    const fmpm = new Fmpm({ bin, timeoutMs: 30_000 });
    const outcomes = await Promise.all(singles.map((p) => fmpm.activate(p.id)));
    expect(outcomes).toEqual(singles.map(() => 'activated'));
    expect((await activeInState(root)).sort((a, b) => a - b)).toEqual(singles.map((p) => p.id));
    expect((await fmpm.list()).partitions.every((p) => p.isActive)).toBe(true);

    const back = await Promise.all(singles.map((p) => fmpm.deactivate(p.id)));
    expect(back).toEqual(singles.map(() => 'deactivated'));
    expect(await activeInState(root)).toEqual([]);
  });
});
