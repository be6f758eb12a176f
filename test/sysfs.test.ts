/**
 * The sysfs adapter against the simulated kernel (a real child process reacting to writes in a
 * folder), plus `resource` parsing on the real H100 capture.
 */
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createSimHost, startSimKernel, stopSimKernel, writeFaults, type SimHostInfo } from '../src/host/sim/sim-host.ts';
import { Sysfs, SysfsError } from '../src/host/sysfs.ts';

const CAPTURE = fileURLToPath(new URL('./fixtures/host-captures/h100-sxm-sysfs.txt', import.meta.url));
const MiB = 1n << 20n;
const GiB = 1n << 30n;

let root: string;
let host: SimHostInfo;

const kernelLog = () => readFile(path.join(root, 'kernel.log'), 'utf8');
const devicePath = (bdf: string, file: string) => path.join(root, 'sys', 'bus', 'pci', 'devices', bdf, file);
const sysfs = (bindTimeoutMs = 3000) => new Sysfs({ root, bindTimeoutMs, pollMs: 5 });

async function eventually<T>(probe: () => Promise<T>, accept: (v: T) => boolean, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (accept(v) || Date.now() > deadline) return v;
    await sleep(10);
  }
}

async function expectSysfsError(p: Promise<unknown>, codes: string[], pciAddress?: string): Promise<SysfsError> {
  const err = await p.then(
    () => {
      throw new Error('expected a SysfsError, the call succeeded');
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SysfsError);
  const e = err as SysfsError;
  expect(codes).toContain(e.code);
  if (pciAddress !== undefined) {
    expect(e.pciAddress).toBe(pciAddress);
    expect(e.message).toContain(pciAddress);
  }
  return e;
}

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'gpuvm-sysfs-'));
  host = await createSimHost({ root });
  await startSimKernel(root);
});

afterAll(async () => {
  if (!root) return;
  await stopSimKernel(root);
  await rm(root, { recursive: true, force: true });
});

afterEach(async () => {
  // Every test leaves the host as it found it: faults cleared, kernel up, every GPU on nvidia.
  await writeFaults(root, { sysfs: null });
  await startSimKernel(root);
  const s = sysfs(5000);
  for (const gpu of host.gpus) await s.bindGroupToHost(gpu.pciAddress, 'nvidia');
  for (const gpu of host.gpus) expect(await s.driverOf(gpu.pciAddress)).toBe('nvidia');
});

describe('Sysfs against the simulated kernel', () => {
  it('round-trips a GPU nvidia → vfio-pci → nvidia and clears the override', async () => {
    const gpu = '0000:17:00.0';
    const s = sysfs();
    expect(await s.driverOf(gpu)).toBe('nvidia');
    const { group, devices } = await s.iommuGroup(gpu);
    expect(group).toBe(host.gpus.find((g) => g.pciAddress === gpu)!.iommuGroup);
    expect(devices).toEqual([gpu]);
    expect(await s.vfioGroupReady(group)).toBe(false);

    expect(await s.bindGroupToVfio(gpu)).toEqual({ group, changed: [gpu] });
    expect(await s.driverOf(gpu)).toBe('vfio-pci');
    expect(await s.vfioGroupReady(group)).toBe(true);
    expect((await readFile(devicePath(gpu, 'driver_override'), 'utf8')).trim()).toBe('(null)');

    expect(await s.bindGroupToHost(gpu, 'nvidia')).toEqual({ group, changed: [gpu] });
    expect(await s.driverOf(gpu)).toBe('nvidia');
    expect(await s.vfioGroupReady(group)).toBe(false);
    expect((await readFile(devicePath(gpu, 'driver_override'), 'utf8')).trim()).toBe('(null)');
    const log = await kernelLog();
    expect(log).toContain(`unbind ${gpu} from nvidia: unbound`);
    expect(log).toContain(`drivers_probe ${gpu}: bound to vfio-pci`);
    expect(log).toContain(`drivers_probe ${gpu}: bound to nvidia`);
  });

  it('moves a two-function IOMMU group together; dev/vfio/N exists only while all of it is on vfio-pci', async () => {
    const shared = await Promise.all(host.gpus.map(async (g) => ({ g, devices: (await sysfs().iommuGroup(g.pciAddress)).devices })));
    const two = shared.filter((x) => x.devices.length === 2);
    expect(two).toHaveLength(1);
    const gpu = two[0]!.g.pciAddress;
    const sibling = two[0]!.devices.find((d) => d !== gpu)!;
    const group = two[0]!.g.iommuGroup;
    const s = sysfs();
    expect(await s.driverOf(sibling)).toBe('snd_hda_intel');

    // The GPU alone on vfio-pci does not make the group viable.
    expect(await s.bindDriver(gpu, 'vfio-pci')).toBe('bound');
    expect(await s.vfioGroupReady(group)).toBe(false);
    expect(await s.bindGroupToVfio(gpu)).toEqual({ group, changed: [sibling] });
    expect(await s.driverOf(sibling)).toBe('vfio-pci');
    expect(await s.vfioGroupReady(group)).toBe(true);

    expect(await s.bindGroupToHost(gpu, 'nvidia')).toEqual({ group, changed: [gpu, sibling] });
    expect(await s.driverOf(gpu)).toBe('nvidia');
    expect(await s.driverOf(sibling)).toBe('snd_hda_intel');
    expect(await s.vfioGroupReady(group)).toBe(false);
  });

  it('writes nothing when the device is already on the wanted driver', async () => {
    const gpu = '0000:3d:00.0';
    const s = sysfs();
    await s.bindGroupToVfio(gpu);
    await sleep(150); // let the kernel settle (override normalisation) before taking the snapshot
    const controlFiles = [
      path.join(root, 'sys', 'bus', 'pci', 'drivers_probe'),
      path.join(root, 'sys', 'bus', 'pci', 'drivers', 'nvidia', 'unbind'),
      path.join(root, 'sys', 'bus', 'pci', 'drivers', 'vfio-pci', 'unbind'),
      devicePath(gpu, 'driver_override'),
    ];
    const mtimes = async () => Promise.all(controlFiles.map(async (f) => (await stat(f)).mtimeMs));
    const logBefore = await kernelLog();
    const mtimesBefore = await mtimes();

    expect(await s.bindGroupToVfio(gpu)).toEqual({ group: expect.any(Number), changed: [] });
    expect(await s.bindDriver(gpu, 'vfio-pci')).toBe('already');
    await sleep(150);
    expect(await kernelLog()).toBe(logBefore);
    expect(await mtimes()).toEqual(mtimesBefore);

    await s.bindGroupToHost(gpu, 'nvidia');
    await sleep(150);
    const logHost = await kernelLog();
    expect((await s.bindGroupToHost(gpu, 'nvidia')).changed).toEqual([]);
    expect(await s.bindDriver(gpu, 'nvidia')).toBe('already');
    await sleep(150);
    expect(await kernelLog()).toBe(logHost);
  });

  it('waits out an asynchronous probe (probeDelayMs)', async () => {
    const gpu = '0000:60:00.0';
    await writeFaults(root, { sysfs: { probeDelayMs: 300 } });
    const s = sysfs(3000);
    const t0 = Date.now();
    expect((await s.bindGroupToVfio(gpu)).changed).toEqual([gpu]);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(300);
    expect(await s.driverOf(gpu)).toBe('vfio-pci');
    const t1 = Date.now();
    expect((await s.bindGroupToHost(gpu, 'nvidia')).changed).toEqual([gpu]);
    expect(Date.now() - t1).toBeGreaterThanOrEqual(300);
    expect(await s.driverOf(gpu)).toBe('nvidia');
    expect(await kernelLog()).toContain(`drivers_probe ${gpu}: probe deferred 300 ms`);
  });

  it('reports a refused unbind and leaves the GPU on nvidia', async () => {
    const gpu = '0000:70:00.0';
    await writeFaults(root, { sysfs: { unbindBusy: [gpu] } });
    const s = sysfs(400);
    await expectSysfsError(s.bindGroupToVfio(gpu), ['EBUSY', 'timeout'], gpu);
    expect(await s.driverOf(gpu)).toBe('nvidia');
    expect((await readFile(devicePath(gpu, 'driver_override'), 'utf8')).trim()).toBe('(null)');
    expect(await kernelLog()).toContain(`unbind ${gpu} from nvidia: EBUSY`);
  });

  it('rolls a GPU back to nvidia when vfio-pci fails to probe (never no driver)', async () => {
    const gpu = '0000:98:00.0';
    const group = host.gpus.find((g) => g.pciAddress === gpu)!.iommuGroup;
    await writeFaults(root, { sysfs: { probeFails: [gpu] } });
    const s = sysfs(500);
    const err = await expectSysfsError(s.bindGroupToVfio(gpu), ['no-driver'], gpu);
    expect(err.message).not.toContain('ALSO failed');
    expect(await s.driverOf(gpu)).toBe('nvidia');
    expect(await s.vfioGroupReady(group)).toBe(false);
    expect((await readFile(devicePath(gpu, 'driver_override'), 'utf8')).trim()).toBe('(null)');
    expect(await kernelLog()).toContain(`drivers_probe ${gpu}: vfio-pci probe failed`);
  });

  it('refuses a driver that is not loaded and an unknown device before writing anything', async () => {
    const s = sysfs();
    const before = await kernelLog();
    await expectSysfsError(s.bindDriver('0000:17:00.0', 'nouveau'), ['ENODEV'], '0000:17:00.0');
    await expectSysfsError(s.bindDriver('0000:01:00.0', 'vfio-pci'), ['ENODEV'], '0000:01:00.0');
    await expectSysfsError(s.driverOf('0000:01:00.0'), ['ENODEV'], '0000:01:00.0');
    await expectSysfsError(s.iommuGroup('0000:01:00.0'), ['ENODEV'], '0000:01:00.0');
    await expectSysfsError(s.reset('0000:01:00.0'), ['ENODEV'], '0000:01:00.0');
    await sleep(100);
    expect(await kernelLog()).toBe(before);
    expect(await s.driverOf('0000:17:00.0')).toBe('nvidia');
  });

  it('rejects bad PCI addresses and driver names before any file-system access', async () => {
    // A root that does not exist: any fs access would surface as ENODEV, not EINVAL.
    const s = new Sysfs({ root: path.join(root, 'no-such-root'), bindTimeoutMs: 100 });
    const bad = ['0000:17:00.0/../../../../etc', '../../etc/passwd', '0000:17:00.0\n', ' 0000:17:00.0', '0000:17:00.8', '0000:17:0A.0', '17:00.0', ''];
    for (const addr of bad) {
      await expectSysfsError(s.driverOf(addr), ['EINVAL']);
      await expectSysfsError(s.iommuGroup(addr), ['EINVAL']);
      await expectSysfsError(s.bindDriver(addr, 'vfio-pci'), ['EINVAL']);
      await expectSysfsError(s.bindGroupToVfio(addr), ['EINVAL']);
      await expectSysfsError(s.bindGroupToHost(addr, 'nvidia'), ['EINVAL']);
      await expectSysfsError(s.reset(addr), ['EINVAL']);
      await expectSysfsError(s.barRegions(addr), ['EINVAL']);
    }
    for (const driver of ['../nvidia', 'a/b', '', 'x'.repeat(65), 'nvidia\n']) {
      await expectSysfsError(s.bindDriver('0000:17:00.0', driver), ['EINVAL'], '0000:17:00.0');
      await expectSysfsError(s.bindGroupToHost('0000:17:00.0', driver), ['EINVAL'], '0000:17:00.0');
    }
    for (const group of [-1, 1.5, Number.NaN]) await expectSysfsError(s.vfioGroupReady(group), ['EINVAL']);
    // The same non-existent root with a valid address does reach the fs: ENODEV, as it should.
    await expectSysfsError(s.driverOf('0000:17:00.0'), ['ENODEV'], '0000:17:00.0');
  });

  it('serializes concurrent binds on different GPUs', async () => {
    const s = sysfs(5000);
    const gpus = host.gpus.slice(0, 4).map((g) => g.pciAddress);
    const results = await Promise.all(gpus.map((g) => s.bindGroupToVfio(g)));
    expect(results.map((r) => r.changed)).toEqual(gpus.map((g) => [g]));
    for (const g of gpus) expect(await s.driverOf(g)).toBe('vfio-pci');
    await Promise.all(gpus.map((g) => s.bindGroupToHost(g, 'nvidia')));
    for (const g of gpus) expect(await s.driverOf(g)).toBe('nvidia');
  });

  it('resumes after a kernel restart: writes made while it was down are handled at start', async () => {
    const gpu = '0000:ed:00.0';
    await stopSimKernel(root);
    await expect(stat(path.join(root, 'kernel.pid'))).rejects.toThrow();
    const s = new Sysfs({ root, bindTimeoutMs: 20_000, pollMs: 5 });
    const pending = s.bindGroupToVfio(gpu);
    await sleep(300);
    // The adapter has written its unbind; nothing handles it while the kernel is down.
    expect(await readFile(path.join(root, 'sys', 'bus', 'pci', 'drivers', 'nvidia', 'unbind'), 'utf8')).toBe(`${gpu}\n`);
    expect(await s.driverOf(gpu)).toBe('nvidia');
    expect((await startSimKernel(root)).started).toBe(true);
    expect((await pending).changed).toEqual([gpu]);
    expect(await s.driverOf(gpu)).toBe('vfio-pci');

    // A raw write while the kernel is down leaves the GPU unbound after restart; the adapter binds it back.
    const other = '0000:dd:00.0';
    await stopSimKernel(root);
    await writeFile(path.join(root, 'sys', 'bus', 'pci', 'drivers', 'nvidia', 'unbind'), `${other}\n`);
    await startSimKernel(root);
    expect(await eventually(() => s.driverOf(other), (d) => d === null)).toBeNull();
    expect(await s.bindDriver(other, 'nvidia')).toBe('bound');
    expect(await s.driverOf(other)).toBe('nvidia');
  });

  it('resets a function through D/reset', async () => {
    const gpu = '0000:bb:00.0';
    await sysfs().reset(gpu);
    const log = await eventually(kernelLog, (l) => l.includes(`reset ${gpu}: function reset done`));
    expect(log).toContain(`reset ${gpu}: function reset done`);
  });

  it('reads B200 BAR sizes from the simulated resource file', async () => {
    const bars = await sysfs().barRegions(host.gpus[0]!.pciAddress);
    expect(bars.map((b) => [b.index, b.sizeBytes])).toEqual([
      [0, 64n * MiB],
      [2, 256n * GiB],
      [4, 32n * MiB],
    ]);
  });
});

describe('Sysfs.barRegions on the real H100 capture', () => {
  let captureRoot: string;
  const bdf = '0000:00:06.0';

  beforeAll(async () => {
    captureRoot = await mkdtemp(path.join(tmpdir(), 'gpuvm-capture-'));
    const lines = (await readFile(CAPTURE, 'utf8')).split('\n').filter((l) => /^0x[0-9a-f]+ 0x[0-9a-f]+ 0x[0-9a-f]+$/.test(l.trim()));
    expect(lines).toHaveLength(7);
    const dir = path.join(captureRoot, 'sys', 'bus', 'pci', 'devices', bdf);
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'resource'), `${lines.join('\n')}\n`);
    await mkdir(path.join(captureRoot, 'sys', 'bus', 'pci', 'devices', '0000:00:07.0'), { recursive: true });
    await writeFile(path.join(captureRoot, 'sys', 'bus', 'pci', 'devices', '0000:00:07.0', 'resource'), '0x1000 0x0fff\n');
  });

  afterAll(async () => {
    if (captureRoot) await rm(captureRoot, { recursive: true, force: true });
  });

  it('finds BAR0 16 MiB, BAR2 128 GiB, BAR4 32 MiB and skips empty regions', async () => {
    const bars = await new Sysfs({ root: captureRoot }).barRegions(bdf);
    expect(bars).toEqual([
      { index: 0, start: 0x102002000000n, end: 0x102002ffffffn, flags: 0x14220cn, sizeBytes: 16n * MiB },
      { index: 2, start: 0x100000000000n, end: 0x101fffffffffn, flags: 0x14220cn, sizeBytes: 128n * GiB },
      { index: 4, start: 0x102000000000n, end: 0x102001ffffffn, flags: 0x14220cn, sizeBytes: 32n * MiB },
    ]);
  });

  it('rejects a malformed resource file', async () => {
    await expectSysfsError(new Sysfs({ root: captureRoot }).barRegions('0000:00:07.0'), ['unknown'], '0000:00:07.0');
  });
});
