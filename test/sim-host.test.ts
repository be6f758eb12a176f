/**
 * The simulated host builder (a B200 by default; other boards: boards.test.ts) and the simulated kernel process's lifecycle and raw behaviour
 * (what it does with writes that do not come from the adapter).
 */
import { execa } from 'execa';
import { access, lstat, mkdtemp, readFile, readdir, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSimHost, loadSimHost, SimHostError, startSimKernel, stopSimKernel, writeFaults } from '../src/host/sim/sim-host.ts';
import { Sysfs } from '../src/host/sysfs.ts';

const GPU_ADDRESSES = ['0000:17:00.0', '0000:3d:00.0', '0000:60:00.0', '0000:70:00.0', '0000:98:00.0', '0000:bb:00.0', '0000:dd:00.0', '0000:ed:00.0'];
const B200_TABLE = [
  [1, [1, 2, 3, 4, 5, 6, 7, 8]],
  [2, [1, 2, 3, 4]],
  [3, [5, 6, 7, 8]],
  [4, [1, 2]],
  [5, [3, 4]],
  [6, [5, 6]],
  [7, [7, 8]],
  [8, [1]],
  [9, [2]],
  [10, [3]],
  [11, [4]],
  [12, [5]],
  [13, [6]],
  [14, [7]],
  [15, [8]],
] as const;
const SIM_BIN = fileURLToPath(new URL('../src/host/sim/bin/', import.meta.url));
const KERNEL = fileURLToPath(new URL('../src/host/sim/kernel.ts', import.meta.url));

const temps: string[] = [];
async function tempRoot(): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'gpuvm-simhost-'));
  temps.push(dir);
  return path.join(dir, 'host');
}

afterAll(async () => {
  for (const dir of temps) {
    await stopSimKernel(path.join(dir, 'host')).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
});

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

async function eventually<T>(probe: () => Promise<T>, accept: (v: T) => boolean, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (accept(v) || Date.now() > deadline) return v;
    await sleep(10);
  }
}

describe('createSimHost', () => {
  it('builds a B200 host: 8 GPUs in PCI order, shuffled module ids, the B200 partition table', async () => {
    const root = await tempRoot();
    const info = await createSimHost({ root });
    expect(info.root).toBe(root);
    expect(info.hostId).toBe('sim-b200');
    expect(info.board).toBe('b200');
    expect(info.sysfsRoot).toBe(root);
    expect(info.fmpmBin).toBe(path.join(root, 'bin', 'fmpm'));
    expect(info.nvidiaSmiBin).toBe(path.join(root, 'bin', 'nvidia-smi'));
    expect(info.gpus.map((g) => g.pciAddress)).toEqual(GPU_ADDRESSES);
    const modules = info.gpus.map((g) => g.moduleId);
    expect([...modules].sort()).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(modules).not.toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(new Set(info.gpus.map((g) => g.iommuGroup)).size).toBe(8);
    expect(info.partitions.map((p) => [p.id, p.modules])).toEqual(B200_TABLE.map(([id, m]) => [id, [...m]]));

    const json = JSON.parse(await readFile(path.join(root, 'host.json'), 'utf8'));
    expect(json).toMatchObject({
      hostId: 'sim-b200',
      board: 'B200',
      productName: 'NVIDIA B200',
      pciVendorId: '0x10de',
      pciDeviceId: '0x2901',
      driverVersion: '580.95.05',
      fabricManagerVersion: '580.95.05',
      kernelModule: 'open',
    });
    const uuids = json.gpus.map((g: { uuid: string }) => g.uuid);
    for (const u of uuids) expect(u).toMatch(/^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    expect(new Set(uuids).size).toBe(8);
    expect(new Set(json.gpus.map((g: { serial: string }) => g.serial)).size).toBe(8);
    expect(await loadSimHost(root)).toEqual(info);
  });

  it('shuffles by seed, never into PCI order', async () => {
    const perms = new Set<string>();
    for (let seed = 1; seed <= 12; seed++) {
      const info = await createSimHost({ root: await tempRoot(), seed });
      const modules = info.gpus.map((g) => g.moduleId);
      expect([...modules].sort()).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
      expect(modules).not.toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
      perms.add(modules.join(','));
    }
    expect(perms.size).toBeGreaterThan(6);
    // The same seed gives the same host.
    const a = await createSimHost({ root: await tempRoot(), seed: 7 });
    const b = await createSimHost({ root: await tempRoot(), seed: 7 });
    expect(a.gpus).toEqual(b.gpus);
  });

  it('keeps an existing host.json as is', async () => {
    const root = await tempRoot();
    await createSimHost({ root, hostId: 'first', seed: 1 });
    const before = await readFile(path.join(root, 'host.json'), 'utf8');
    const again = await createSimHost({ root, hostId: 'second', seed: 99 });
    expect(again.hostId).toBe('first');
    expect(await readFile(path.join(root, 'host.json'), 'utf8')).toBe(before);
  });

  it('lays out sysfs: driver and iommu_group links, attributes, one shared group, B200 BARs', async () => {
    const root = await tempRoot();
    const info = await createSimHost({ root });
    const pci = path.join(root, 'sys', 'bus', 'pci');
    for (const d of ['nvidia', 'vfio-pci', 'snd_hda_intel']) {
      expect(await readFile(path.join(pci, 'drivers', d, 'bind'), 'utf8')).toBe('');
      expect(await readFile(path.join(pci, 'drivers', d, 'unbind'), 'utf8')).toBe('');
    }
    expect((await readdir(path.join(pci, 'drivers', 'nvidia'))).filter((e) => e.includes(':')).sort()).toEqual(GPU_ADDRESSES);
    for (const gpu of info.gpus) {
      const dir = path.join(pci, 'devices', gpu.pciAddress);
      expect(await readlink(path.join(dir, 'driver'))).toBe('../../drivers/nvidia');
      expect((await stat(path.join(dir, 'driver'))).isDirectory()).toBe(true); // the link resolves
      expect(await readlink(path.join(dir, 'iommu_group'))).toBe(`../../../../kernel/iommu_groups/${gpu.iommuGroup}`);
      expect((await lstat(path.join(dir, 'iommu_group', 'devices', gpu.pciAddress))).isSymbolicLink()).toBe(true);
      expect(await readFile(path.join(dir, 'vendor'), 'utf8')).toBe('0x10de\n');
      expect(await readFile(path.join(dir, 'device'), 'utf8')).toBe('0x2901\n');
      expect(await readFile(path.join(dir, 'class'), 'utf8')).toBe('0x030200\n');
      expect(await readFile(path.join(dir, 'driver_override'), 'utf8')).toBe('(null)\n');
      expect((await readFile(path.join(dir, 'resource'), 'utf8')).split('\n').filter(Boolean)).toHaveLength(7);
    }
    const s = new Sysfs({ root });
    const groups = await Promise.all(info.gpus.map((g) => s.iommuGroup(g.pciAddress)));
    const shared = groups.filter((g) => g.devices.length > 1);
    expect(shared).toHaveLength(1);
    const sibling = shared[0]!.devices.find((d) => !GPU_ADDRESSES.includes(d))!;
    expect(sibling).toMatch(/\.[1-7]$/);
    expect(await s.driverOf(sibling)).toBe('snd_hda_intel');
    expect(await readFile(path.join(pci, 'devices', sibling, 'class'), 'utf8')).toBe('0x040300\n');
    const MiB = 1n << 20n;
    for (const gpu of info.gpus) {
      expect((await s.barRegions(gpu.pciAddress)).map((b) => [b.index, b.sizeBytes])).toEqual([
        [0, 64n * MiB],
        [2, 256n * 1024n * MiB],
        [4, 32n * MiB],
      ]);
    }
  });

  it('writes executable wrappers that run the simulators against this host', async () => {
    const root = await tempRoot();
    const info = await createSimHost({ root });
    for (const [bin, script] of [
      [info.fmpmBin, 'fmpm.mjs'],
      [info.nvidiaSmiBin, 'nvidia-smi.mjs'],
    ] as const) {
      expect((await stat(bin)).mode & 0o777).toBe(0o755);
      const text = await readFile(bin, 'utf8');
      expect(text.startsWith('#!/bin/sh\n')).toBe(true);
      expect(text).toContain(`GPUVM_SIM_ROOT='${root}'`);
      expect(text).toContain('export GPUVM_SIM_ROOT');
      expect(text).toContain(`exec node '${path.join(SIM_BIN, script)}' "$@"`);
      await access(path.join(SIM_BIN, script));
    }
    const listed = await execa(info.fmpmBin, ['-l'], { timeout: 15_000 });
    expect(JSON.parse(listed.stdout).numPartitions).toBe(15);
  });

  it('refuses a missing or malformed host.json with a SimHostError', async () => {
    const root = await tempRoot();
    await expect(loadSimHost(root)).rejects.toMatchObject({ name: 'SimHostError', code: 'bad-host-json' });
    await createSimHost({ root });
    await writeFile(path.join(root, 'host.json'), JSON.stringify({ hostId: 'x', gpus: [{ pciAddress: '../etc', moduleId: 1, iommuGroup: 1 }], partitions: [] }));
    const err = await loadSimHost(root).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SimHostError);
    expect((err as SimHostError).message).toContain('host.json');
  });
});

describe('writeFaults', () => {
  it('merges per key, removes a key given null, and leaves no temp files', async () => {
    const root = await tempRoot();
    await createSimHost({ root });
    await writeFaults(root, { fmpm: { down: true } });
    await writeFaults(root, { sysfs: { probeDelayMs: 5 } });
    expect(JSON.parse(await readFile(path.join(root, 'faults.json'), 'utf8'))).toEqual({ fmpm: { down: true }, sysfs: { probeDelayMs: 5 } });
    await writeFaults(root, { sysfs: { unbindBusy: ['0000:17:00.0'] }, fmpm: null });
    expect(JSON.parse(await readFile(path.join(root, 'faults.json'), 'utf8'))).toEqual({ sysfs: { unbindBusy: ['0000:17:00.0'] } });
    expect((await readdir(root)).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });
});

describe('the simulated kernel process', () => {
  let root: string;

  beforeAll(async () => {
    root = await tempRoot();
    await createSimHost({ root });
  });

  it('starts once, writes its pidfile, and stops cleanly on SIGTERM', async () => {
    const first = await startSimKernel(root);
    expect(first.started).toBe(true);
    expect(alive(first.pid)).toBe(true);
    expect((await readFile(path.join(root, 'kernel.pid'), 'utf8')).trim()).toBe(String(first.pid));
    expect(await startSimKernel(root)).toEqual({ pid: first.pid, started: false });

    // A second kernel on the same root refuses to run.
    const second = await execa(process.execPath, ['--import', 'tsx', KERNEL, root], { reject: false, timeout: 20_000 });
    expect(second.exitCode).toBe(1);
    expect(second.stderr).toContain(`pid ${first.pid}`);

    await stopSimKernel(root);
    expect(alive(first.pid)).toBe(false);
    await expect(access(path.join(root, 'kernel.pid'))).rejects.toThrow();
    await stopSimKernel(root); // nothing running: a no-op
    expect(await readFile(path.join(root, 'kernel.log'), 'utf8')).toContain(`kernel stopped (pid ${first.pid})`);
  });

  it('never signals a process that is not its kernel (stale pidfile)', async () => {
    await writeFile(path.join(root, 'kernel.pid'), `${process.pid}\n`);
    await stopSimKernel(root); // would kill this test runner if it trusted the pidfile
    expect(alive(process.pid)).toBe(true);
    await expect(access(path.join(root, 'kernel.pid'))).rejects.toThrow();
    await writeFile(path.join(root, 'kernel.pid'), `${process.pid}\n`);
    const started = await startSimKernel(root);
    expect(started.started).toBe(true);
    expect(started.pid).not.toBe(process.pid);
    await stopSimKernel(root);
  });

  it('acts on raw writes like the kernel: override, bind, unbind, probe, reset', async () => {
    await startSimKernel(root);
    const pci = path.join(root, 'sys', 'bus', 'pci');
    const gpu = '0000:3d:00.0';
    const dev = path.join(pci, 'devices', gpu);
    const log = () => readFile(path.join(root, 'kernel.log'), 'utf8');
    const driver = async () => readlink(path.join(dev, 'driver')).then((l) => path.basename(l), () => null);
    try {
      // An empty write to driver_override reads back "(null)".
      await writeFile(path.join(dev, 'driver_override'), '\n');
      expect(await eventually(() => readFile(path.join(dev, 'driver_override'), 'utf8'), (t) => t === '(null)\n')).toBe('(null)\n');

      // Unbinding from a driver the device is not on changes nothing (ENODEV in the kernel).
      await writeFile(path.join(pci, 'drivers', 'vfio-pci', 'unbind'), `${gpu}\n`);
      await eventually(log, (l) => l.includes(`unbind ${gpu} from vfio-pci: ENODEV`));
      expect(await log()).toContain(`unbind ${gpu} from vfio-pci: ENODEV`);
      expect(await readFile(path.join(pci, 'drivers', 'vfio-pci', 'unbind'), 'utf8')).toBe(''); // consumed
      expect(await driver()).toBe('nvidia');

      await writeFile(path.join(pci, 'drivers', 'nvidia', 'unbind'), `${gpu}\n`);
      expect(await eventually(driver, (d) => d === null)).toBeNull();
      await expect(lstat(path.join(pci, 'drivers', 'nvidia', gpu))).rejects.toThrow();

      // vfio-pci has no id table: a bind without an override is refused.
      await writeFile(path.join(pci, 'drivers', 'vfio-pci', 'bind'), `${gpu}\n`);
      await eventually(log, (l) => l.includes(`bind via vfio-pci/bind ${gpu}: ENODEV`));
      expect(await driver()).toBeNull();

      // With the override it binds, and the single-device group becomes viable.
      await writeFile(path.join(dev, 'driver_override'), 'vfio-pci\n');
      await writeFile(path.join(pci, 'drivers', 'vfio-pci', 'bind'), `${gpu}\n`);
      expect(await eventually(driver, (d) => d === 'vfio-pci')).toBe('vfio-pci');
      const group = path.basename(await readlink(path.join(dev, 'iommu_group')));
      await eventually(() => access(path.join(root, 'dev', 'vfio', group)).then(() => true, () => false), (x) => x);
      await access(path.join(root, 'dev', 'vfio', group));

      // Unbind, clear the override, probe: the id table gives it back to nvidia.
      await writeFile(path.join(pci, 'drivers', 'vfio-pci', 'unbind'), `${gpu}\n`);
      expect(await eventually(driver, (d) => d === null)).toBeNull();
      expect(await eventually(() => access(path.join(root, 'dev', 'vfio', group)).then(() => true, () => false), (x) => !x)).toBe(false);
      await writeFile(path.join(dev, 'driver_override'), '\n');
      await eventually(() => readFile(path.join(dev, 'driver_override'), 'utf8'), (t) => t === '(null)\n');
      await writeFile(path.join(pci, 'drivers_probe'), `${gpu}\n`);
      expect(await eventually(driver, (d) => d === 'nvidia')).toBe('nvidia');
      expect(await readlink(path.join(pci, 'drivers', 'nvidia', gpu))).toBe(`../../devices/${gpu}`);

      await writeFile(path.join(dev, 'reset'), '1\n');
      await eventually(log, (l) => l.includes(`reset ${gpu}: function reset done`));
      expect(await log()).toContain(`reset ${gpu}: function reset done`);
      expect(await readFile(path.join(dev, 'reset'), 'utf8')).toBe('');
    } finally {
      await stopSimKernel(root);
    }
  });
});
