/**
 * The host config file (parse, file checks, load, openRealHost) and the inventory registration
 * takes — the latter against a simulated host driven through openRealHost, so the real-host
 * adapters run against the simulated binaries and sysfs.
 */
import { mkdir, mkdtemp, readFile, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  HOST_CONFIG_DEFAULTS,
  HostConfigError,
  isFabricManagerAddress,
  loadHostConfig,
  openRealHost,
  parseHostConfig,
  type HostConfig,
} from '../src/host/host-config.ts';
import { InventoryError, takeInventory, type HostAdapters } from '../src/host/host.ts';
import { createSimHost, startSimKernel, stopSimKernel, type SimHostInfo } from '../src/host/sim/sim-host.ts';

const here = (p: string) => fileURLToPath(new URL(p, import.meta.url));
const EXAMPLE = here('../examples/gpuvm-host.json');
const DOCS = here('../docs/real-host.md');
const FMPM_LIST = here('./fixtures/fmpm/b200-list.json');
const SMI_XML = here('./fixtures/host-captures/h100-sxm-nvidia-smi-q.xml');
const QEMU_VERSION = here('./fixtures/qemu/version-7.2.txt');

const MiB = 1n << 20n;
const GiB = 1n << 30n;

const minimal = { hostId: 'hgx-b200-01', board: 'B200' };
const withField = (patch: Record<string, unknown>) => ({ ...minimal, ...patch });

function refusal(fn: () => unknown): HostConfigError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(HostConfigError);
    return err as HostConfigError;
  }
  throw new Error('expected a HostConfigError, the call succeeded');
}

async function refusalAsync(p: Promise<unknown>): Promise<HostConfigError> {
  const err = await p.then(
    () => new Error('expected a HostConfigError, the call succeeded'),
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(HostConfigError);
  return err as HostConfigError;
}

/** Dotted leaf paths of a JSON value; array elements become `[]` (`expectedGpus[].moduleId`). */
function leafPaths(value: unknown, prefix = ''): string[] {
  if (Array.isArray(value)) return [...new Set(value.flatMap((v) => leafPaths(v, `${prefix}[]`)))];
  if (value !== null && typeof value === 'object') {
    return Object.entries(value).flatMap(([k, v]) => leafPaths(v, prefix ? `${prefix}.${k}` : k));
  }
  return [prefix];
}

describe('parseHostConfig', () => {
  it('parses the example file, and every field in it round-trips unchanged', async () => {
    const raw = JSON.parse(await readFile(EXAMPLE, 'utf8')) as Record<string, unknown>;
    const cfg = parseHostConfig(raw, { checkFiles: false });
    // The example sets every field, so nothing is defaulted: parsed equals written.
    expect(cfg).toEqual(raw);
    expect(JSON.parse(JSON.stringify(cfg))).toEqual(raw);
    expect(cfg.board).toBe('B200');
    expect(cfg.expectedGpus).toHaveLength(8);
  });

  it('the example sets every field the schema knows, and the docs describe each one', async () => {
    const raw = JSON.parse(await readFile(EXAMPLE, 'utf8')) as Record<string, unknown>;
    const docs = await readFile(DOCS, 'utf8');
    const paths = leafPaths(raw);
    // Every optional field appears in the example (a field the example left out would be undocumented there).
    expect(paths).toEqual(
      expect.arrayContaining([
        'hostId', 'board', 'binaries.fmpm', 'binaries.nvidiaSmi', 'binaries.fabricManager', 'binaries.qemu',
        'fabricManager.address', 'sysfsRoot', 'fsRoot', 'runDir', 'qemu.firmware', 'qemu.forceNoMmap', 'qemu.accel',
        'vm.memoryMiB', 'vm.vcpus', 'vm.hugepages', 'vm.diskImage', 'vm.imageDriverVersion', 'vm.powerdownTimeoutMs',
        'expectedGpus[].moduleId', 'expectedGpus[].pciAddress',
      ]),
    );
    for (const p of paths) expect(docs, `docs/real-host.md documents ${p}`).toContain(`| \`${p}\` |`);
    // A key the example does not have is refused, so the example covers the schema.
    for (const p of paths.filter((x) => !x.includes('[]'))) {
      const [top, sub] = p.split('.') as [string, string | undefined];
      const patched = structuredClone(raw) as Record<string, Record<string, unknown>>;
      if (sub) patched[top]![`${sub}X`] = patched[top]![sub];
      else (patched as Record<string, unknown>)[`${top}X`] = raw[top];
      expect(refusal(() => parseHostConfig(patched, { checkFiles: false })).field).toBe(`${p}X`);
    }
  });

  it('fills in the documented defaults when only hostId and board are given', () => {
    const cfg = parseHostConfig(minimal, { checkFiles: false });
    expect(cfg).toEqual({ ...minimal, ...HOST_CONFIG_DEFAULTS });
    expect(cfg.qemu.firmware).toBeUndefined();
    expect(cfg.expectedGpus).toBeUndefined();
  });

  const gpu = (moduleId: unknown, pciAddress: unknown) => ({ moduleId, pciAddress });
  const bad: [string, unknown, string, RegExp][] = [
    ['not an object', ['x'], '', /must be a JSON object/],
    ['missing hostId', { board: 'B200' }, 'hostId', /is required/],
    ['bad hostId', withField({ hostId: 'HGX_01' }), 'hostId', /lower-case/],
    ['unknown board', withField({ board: 'A100' }), 'board', /B200, B300, H100, H200/],
    ['unknown top-level key', withField({ sysfsroot: '/' }), 'sysfsroot', /unknown key/],
    ['unknown nested key', withField({ qemu: { acel: 'kvm' } }), 'qemu.acel', /unknown key/],
    ['unknown key in expectedGpus', withField({ expectedGpus: [{ moduleId: 1, pciAddress: '0000:17:00.0', slot: 3 }] }), 'expectedGpus.0.slot', /unknown key/],
    ['binaries not an object', withField({ binaries: '/usr/bin' }), 'binaries', /must be an object, got string/],
    ['relative binary path', withField({ binaries: { fmpm: 'fmpm' } }), 'binaries.fmpm', /absolute path/],
    ['binary path of wrong type', withField({ binaries: { qemu: 7 } }), 'binaries.qemu', /must be a string, got number 7/],
    ['fabric manager host name', withField({ fabricManager: { address: 'localhost:6666' } }), 'fabricManager.address', /IP address/],
    ['fabric manager port out of range', withField({ fabricManager: { address: '127.0.0.1:70000' } }), 'fabricManager.address', /IP address/],
    ['fabric manager option-like address', withField({ fabricManager: { address: '--help' } }), 'fabricManager.address', /IP address/],
    ['relative sysfsRoot', withField({ sysfsRoot: 'sys' }), 'sysfsRoot', /absolute path/],
    ['runDir too long for a QMP socket', withField({ runDir: `/${'r'.repeat(90)}` }), 'runDir', /too long.*107/],
    ['accel not kvm/tcg', withField({ qemu: { accel: 'hvf' } }), 'qemu.accel', /"kvm" or "tcg"/],
    ['forceNoMmap as a string', withField({ qemu: { forceNoMmap: 'yes' } }), 'qemu.forceNoMmap', /must be true or false/],
    ['memory as a string', withField({ vm: { memoryMiB: '65536' } }), 'vm.memoryMiB', /must be a number, got string/],
    ['memory too small', withField({ vm: { memoryMiB: 32 } }), 'vm.memoryMiB', /at least 64/],
    ['fractional vcpus', withField({ vm: { vcpus: 2.5 } }), 'vm.vcpus', /whole number/],
    ['too many vcpus', withField({ vm: { vcpus: 256 } }), 'vm.vcpus', /at most 255/],
    ['negative powerdown timeout', withField({ vm: { powerdownTimeoutMs: -1 } }), 'vm.powerdownTimeoutMs', /at least 0/],
    ['bad image driver version', withField({ vm: { imageDriverVersion: 'latest' } }), 'vm.imageDriverVersion', /driver version/],
    ['empty expectedGpus', withField({ expectedGpus: [] }), 'expectedGpus', /at least one/],
    ['nvidia-smi form of a PCI address', withField({ expectedGpus: [gpu(1, '00000000:17:00.0')] }), 'expectedGpus.0.pciAddress', /invalid PCI address "00000000:17:00.0"/],
    ['upper-case PCI address', withField({ expectedGpus: [gpu(1, '0000:17:00.0'), gpu(2, '0000:3D:00.0')] }), 'expectedGpus.1.pciAddress', /invalid PCI address/],
    ['module id 0', withField({ expectedGpus: [gpu(0, '0000:17:00.0')] }), 'expectedGpus.0.moduleId', /at least 1/],
    ['module id 9', withField({ expectedGpus: [gpu(9, '0000:17:00.0')] }), 'expectedGpus.0.moduleId', /at most 8/],
    ['module id as a string', withField({ expectedGpus: [gpu('1', '0000:17:00.0')] }), 'expectedGpus.0.moduleId', /must be a number/],
    ['duplicate module id', withField({ expectedGpus: [gpu(1, '0000:17:00.0'), gpu(2, '0000:3d:00.0'), gpu(1, '0000:60:00.0')] }), 'expectedGpus.2.moduleId', /module 1 is listed twice \(also expectedGpus.0\)/],
    ['duplicate address', withField({ expectedGpus: [gpu(1, '0000:17:00.0'), gpu(2, '0000:17:00.0')] }), 'expectedGpus.1.pciAddress', /0000:17:00.0 is listed twice/],
    ['nine GPUs', withField({ expectedGpus: Array.from({ length: 9 }, (_, i) => gpu(i + 1, `0000:1${i}:00.0`)) }), 'expectedGpus', /at most 8/],
  ];
  it.each(bad)('refuses %s, naming the field', (_what, input, field, message) => {
    const err = refusal(() => parseHostConfig(input, { checkFiles: false }));
    expect(err.field).toBe(field);
    if (field) expect(err.message.startsWith(`${field}: `)).toBe(true);
    expect(err.message).toMatch(message);
  });

  it('accepts the address forms fmpm --hostname takes', () => {
    for (const ok of ['127.0.0.1', '127.0.0.1:6666', '10.20.30.40:1', '[::1]:6666', '[fe80::1]']) expect(isFabricManagerAddress(ok), ok).toBe(true);
    for (const no of ['', 'localhost', '::1', '[127.0.0.1]:6666', '127.0.0.1:0', '127.0.0.1:', '1.2.3:4', '127.0.0.1:6666:1', '[fe80::1%eth0]:6666', '-l']) {
      expect(isFabricManagerAddress(no), no).toBe(false);
    }
  });
});

describe('parseHostConfig file checks', () => {
  let dir: string;
  let cfg: Record<string, unknown>;
  const p = (...parts: string[]) => path.join(dir, ...parts);

  beforeAll(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'gpuvm-hostcfg-'));
    await mkdir(p('bin'));
    for (const name of ['fmpm', 'nvidia-smi', 'nv-fabricmanager', 'qemu-system-x86_64']) await writeFile(p('bin', name), '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    await writeFile(p('bin', 'not-executable'), '#!/bin/sh\n', { mode: 0o644 });
    await mkdir(p('root', 'sys', 'bus', 'pci', 'devices'), { recursive: true });
    await mkdir(p('hugepages'));
    await writeFile(p('OVMF.fd'), 'firmware');
    await writeFile(p('guest.qcow2'), 'image');
    await mkdir(p('run'));
    cfg = {
      ...minimal,
      binaries: { fmpm: p('bin', 'fmpm'), nvidiaSmi: p('bin', 'nvidia-smi'), fabricManager: p('bin', 'nv-fabricmanager'), qemu: p('bin', 'qemu-system-x86_64') },
      sysfsRoot: p('root'),
      fsRoot: p('root'),
      runDir: p('run'),
      qemu: { firmware: p('OVMF.fd') },
      vm: { hugepages: p('hugepages'), diskImage: p('guest.qcow2') },
    };
  });
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  const patched = (section: string, key: string | null, value: unknown) => {
    const c = structuredClone(cfg);
    if (key === null) c[section] = value;
    else c[section] = { ...(c[section] as object), [key]: value };
    return c;
  };

  it('accepts a config whose paths all exist, and a runDir that does not exist yet', () => {
    expect(parseHostConfig(cfg).binaries.qemu).toBe(p('bin', 'qemu-system-x86_64'));
    expect(parseHostConfig(patched('runDir', null, p('run', 'not-yet'))).runDir).toBe(p('run', 'not-yet'));
  });

  it('refuses with the field named: missing, non-executable and directory binaries', () => {
    let err = refusal(() => parseHostConfig(patched('binaries', 'fmpm', p('bin', 'fmpm-missing'))));
    expect([err.field, err.code]).toEqual(['binaries.fmpm', 'missing']);
    expect(err.message).toBe(`binaries.fmpm: binary ${p('bin', 'fmpm-missing')} does not exist`);
    err = refusal(() => parseHostConfig(patched('binaries', 'nvidiaSmi', p('bin', 'not-executable'))));
    expect([err.field, err.code]).toEqual(['binaries.nvidiaSmi', 'not-executable']);
    err = refusal(() => parseHostConfig(patched('binaries', 'fabricManager', p('bin'))));
    expect([err.field, err.code]).toEqual(['binaries.fabricManager', 'not-a-file']);
    err = refusal(() => parseHostConfig(patched('binaries', 'qemu', p('nowhere', 'qemu'))));
    expect(err.field).toBe('binaries.qemu');
  });

  it('refuses a missing firmware or disk image, and a hugepages path that is not a folder', () => {
    let err = refusal(() => parseHostConfig(patched('qemu', 'firmware', p('OVMF_CODE.fd'))));
    expect([err.field, err.code]).toEqual(['qemu.firmware', 'missing']);
    expect(err.message).toContain(p('OVMF_CODE.fd'));
    err = refusal(() => parseHostConfig(patched('vm', 'diskImage', p('other.qcow2'))));
    expect([err.field, err.code]).toEqual(['vm.diskImage', 'missing']);
    err = refusal(() => parseHostConfig(patched('vm', 'diskImage', p('hugepages'))));
    expect([err.field, err.code]).toEqual(['vm.diskImage', 'not-a-file']);
    err = refusal(() => parseHostConfig(patched('vm', 'hugepages', p('OVMF.fd'))));
    expect([err.field, err.code]).toEqual(['vm.hugepages', 'not-a-directory']);
    err = refusal(() => parseHostConfig(patched('vm', 'hugepages', p('no-hugepages'))));
    expect([err.field, err.code]).toEqual(['vm.hugepages', 'missing']);
  });

  it('refuses a sysfsRoot without sys/bus/pci/devices, a missing fsRoot, and a runDir that is a file', () => {
    let err = refusal(() => parseHostConfig(patched('sysfsRoot', null, dir)));
    expect(err.field).toBe('sysfsRoot');
    expect(err.message).toContain(path.join(dir, 'sys', 'bus', 'pci', 'devices'));
    err = refusal(() => parseHostConfig(patched('fsRoot', null, p('no-root'))));
    expect(err.field).toBe('fsRoot');
    err = refusal(() => parseHostConfig(patched('runDir', null, p('OVMF.fd'))));
    expect([err.field, err.code]).toEqual(['runDir', 'not-a-directory']);
  });

  it('skips every file check with checkFiles: false', () => {
    expect(() => parseHostConfig(patched('binaries', 'fmpm', p('bin', 'fmpm-missing')), { checkFiles: false })).not.toThrow();
  });
});

describe('loadHostConfig', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'gpuvm-hostcfg-load-'));
  });
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('reports a JSON syntax error with its line and column', async () => {
    const file = path.join(dir, 'broken.json');
    await writeFile(file, '{\n  "hostId": "h1",\n  "board": "B200"\n  "runDir": "/run/gpuvm"\n}\n');
    const err = await refusalAsync(loadHostConfig(file));
    expect(err.code).toBe('bad-json');
    expect(err.message).toContain(file);
    expect(err.message).toMatch(/line 4,? column 3/);
  });

  it('reports an unreadable file with its path', async () => {
    const file = path.join(dir, 'absent.json');
    const err = await refusalAsync(loadHostConfig(file));
    expect(err.code).toBe('unreadable');
    expect(err.message).toContain(file);
  });

  it('names the field first and the file last, and checks files', async () => {
    const file = path.join(dir, 'host.json');
    await writeFile(file, JSON.stringify({ ...minimal, binaries: { fmpm: path.join(dir, 'fmpm') } }));
    const err = await refusalAsync(loadHostConfig(file));
    expect(err.field).toBe('binaries.fmpm');
    expect(err.file).toBe(file);
    expect(err.message).toBe(`binaries.fmpm: binary ${path.join(dir, 'fmpm')} does not exist (in ${file})`);
  });
});

describe('openRealHost', () => {
  let dir: string;
  const sampleConfig = (): HostConfig =>
    parseHostConfig(
      {
        hostId: 'hgx-b200-07',
        board: 'B200',
        binaries: {
          fmpm: path.join(dir, 'fmpm'),
          nvidiaSmi: path.join(dir, 'nvidia-smi'),
          fabricManager: path.join(dir, 'nv-fabricmanager'),
          qemu: path.join(dir, 'qemu'),
        },
        fabricManager: { address: '10.0.0.5:6666' },
        sysfsRoot: '/srv/sysfs',
        fsRoot: '/srv/fs',
        runDir: path.join(dir, 'run'),
        qemu: { firmware: '/usr/share/ovmf/OVMF.fd', accel: 'kvm' },
        vm: { hugepages: '/dev/hugepages', diskImage: '/images/guest.qcow2', imageDriverVersion: '580.95.05' },
      },
      { checkFiles: false },
    );

  beforeAll(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'gpuvm-hostcfg-open-'));
    // Stand-ins that record their argv and print captured output of the real tools.
    const recorder = (fixture: string) => `#!/bin/sh\nprintf '%s\\n' "$@" > "$0.args"\ncat '${fixture}'\n`;
    await writeFile(path.join(dir, 'fmpm'), recorder(FMPM_LIST), { mode: 0o755 });
    await writeFile(path.join(dir, 'nvidia-smi'), recorder(SMI_XML), { mode: 0o755 });
    await writeFile(path.join(dir, 'qemu'), recorder(QEMU_VERSION), { mode: 0o755 });
  });
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('builds real-host adapters from the config (no I/O)', () => {
    const host = openRealHost(sampleConfig());
    expect(host.hostId).toBe('hgx-b200-07');
    expect(host.simulated).toBe(false);
    expect(host.gpuDevice).toBe('vfio-pci');
    expect(host.hostDriver).toBe('nvidia');
    expect(host.fsRoot).toBe('/srv/fs');
    expect(host.sysfs.root).toBe('/srv/sysfs');
    expect(host.fabricManagerBin).toBe(path.join(dir, 'nv-fabricmanager'));
    expect(host.qemu.runDir('vm-abcdefghij')).toBe(path.join(dir, 'run', 'vm-abcdefghij'));
    expect(host.qemuDescription).toMatch(new RegExp(`^QEMU at ${path.join(dir, 'qemu').replaceAll('/', '\\/')} \\(KVM\\), vfio-pci`));
    expect(host.vmDefaults).toEqual({
      hugepagesPath: '/dev/hugepages',
      diskImage: '/images/guest.qcow2',
      firmware: '/usr/share/ovmf/OVMF.fd',
      imageDriverVersion: '580.95.05',
    });
    const tcg = openRealHost({ ...sampleConfig(), qemu: { accel: 'tcg', forceNoMmap: true } });
    expect(tcg.qemuDescription).toMatch(/\(TCG\), vfio-pci, x-no-mmap=true forced/);
    expect(tcg.vmDefaults.firmware).toBeUndefined();
  });

  it('runs the configured binaries: fmpm with --hostname, nvidia-smi -q -x, qemu --version', async () => {
    const host = openRealHost(sampleConfig(), { toolTimeoutMs: 10_000 });
    const table = await host.fmpm.list();
    expect(table.partitions).toHaveLength(15);
    expect((await readFile(path.join(dir, 'fmpm.args'), 'utf8')).split('\n')).toEqual(['--hostname', '10.0.0.5:6666', '-l', '']);
    const report = await host.nvidiaSmi.query();
    expect(report.gpus.map((g) => g.pciAddress)).toEqual(['0000:00:06.0']);
    expect(await readFile(path.join(dir, 'nvidia-smi.args'), 'utf8')).toBe('-q\n-x\n');
    expect((await host.qemu.version()).text).toMatch(/^QEMU emulator version 7\.2\.22/);
  });
});

describe('takeInventory on a simulated host (through openRealHost)', () => {
  let root: string;
  let sim: SimHostInfo;
  let host: HostAdapters;
  let hostJsonText: string;
  const hostJsonPath = () => path.join(root, 'host.json');
  type SimHostJson = { gpus: { pciAddress: string; moduleId: number; iommuGroup: number }[]; partitions: { id: number; modules: number[] }[] };
  const editHostJson = async (edit: (h: SimHostJson) => void) => {
    const h = JSON.parse(hostJsonText) as SimHostJson;
    edit(h);
    await writeFile(hostJsonPath(), JSON.stringify(h, null, 2));
  };
  const expectedFromSim = () => sim.gpus.map((g) => ({ moduleId: g.moduleId, pciAddress: g.pciAddress }));

  async function inventoryRefusal(p: Promise<unknown>, code: string): Promise<string> {
    const err = await p.then(
      () => new Error('expected an InventoryError, takeInventory succeeded'),
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(InventoryError);
    expect((err as InventoryError).code).toBe(code);
    return (err as InventoryError).message;
  }

  beforeAll(async () => {
    root = await mkdtemp(path.join(tmpdir(), 'gpuvm-inventory-'));
    sim = await createSimHost({ root, hostId: 'sim-inv' });
    await startSimKernel(root);
    hostJsonText = await readFile(hostJsonPath(), 'utf8');
    const cfg = parseHostConfig(
      {
        hostId: 'sim-inv',
        board: 'B200',
        binaries: { fmpm: sim.fmpmBin, nvidiaSmi: sim.nvidiaSmiBin, fabricManager: path.join(root, 'bin', 'nv-fabricmanager'), qemu: '/usr/bin/qemu-system-x86_64' },
        sysfsRoot: sim.sysfsRoot,
        fsRoot: root,
        runDir: path.join(root, 'run'),
      },
      { checkFiles: false },
    );
    host = openRealHost(cfg, { toolTimeoutMs: 15_000, bindTimeoutMs: 3000 });
  });
  afterEach(async () => {
    if (hostJsonText) await writeFile(hostJsonPath(), hostJsonText);
  });
  afterAll(async () => {
    if (!root) return;
    await stopSimKernel(root);
    await rm(root, { recursive: true, force: true });
  });

  it('maps modules to PCI addresses and records IOMMU groups and BAR sizes, JSON-safe', async () => {
    const inv = await takeInventory(host, { expectedGpus: expectedFromSim() });
    const byModule = [...sim.gpus].sort((a, b) => a.moduleId - b.moduleId);
    expect(inv.gpus.map((g) => [g.moduleId, g.pciAddress, g.iommuGroup])).toEqual(byModule.map((g) => [g.moduleId, g.pciAddress, g.iommuGroup]));
    // The simulation shuffles module ids against PCI order: a mapping that followed PCI order would differ.
    expect(inv.gpus.map((g) => g.pciAddress)).not.toEqual([...inv.gpus.map((g) => g.pciAddress)].sort());
    for (const g of inv.gpus) {
      expect(g.bars).toEqual([
        { index: 0, sizeBytes: String(64n * MiB) },
        { index: 2, sizeBytes: String(256n * GiB) },
        { index: 4, sizeBytes: String(32n * MiB) },
      ]);
    }
    expect(inv.partitions).toEqual(sim.partitions);
    expect(inv.board).toBe('NVIDIA B200');
    expect(JSON.parse(JSON.stringify(inv))).toEqual(inv);
  });

  it('refuses two GPUs reporting one module id (host.json corrupted), naming both', async () => {
    const [a, b] = sim.gpus as [SimHostInfo['gpus'][number], SimHostInfo['gpus'][number]];
    await editHostJson((h) => {
      h.gpus[1]!.moduleId = h.gpus[0]!.moduleId;
    });
    const message = await inventoryRefusal(takeInventory(host), 'bad-module-map');
    expect(message).toBe(`two GPUs report Module Id ${a.moduleId}: ${a.pciAddress} and ${b.pciAddress}`);
  });

  it('refuses a partition naming a module no GPU reports (a GPU missing from host.json)', async () => {
    const gone = sim.gpus[2]!;
    await editHostJson((h) => {
      h.gpus.splice(2, 1);
    });
    const message = await inventoryRefusal(takeInventory(host), 'bad-partition-table');
    expect(message).toMatch(new RegExp(`^partition \\d+ names module ${gone.moduleId}, but no GPU on nvidia reports that Module Id`));
    expect(message).toContain(`nvidia-smi saw ${[1, 2, 3, 4, 5, 6, 7, 8].filter((m) => m !== gone.moduleId).join(', ')}`);
  });

  it('refuses a module at another address than expectedGpus says, naming both addresses', async () => {
    const expected = expectedFromSim();
    const [x, y] = [expected[0]!, expected[1]!];
    // Swap the addresses of two modules: a board cabled differently from what the operator wrote down.
    const swapped = expected.map((g) => (g === x ? { ...g, pciAddress: y.pciAddress } : g === y ? { ...g, pciAddress: x.pciAddress } : g));
    const message = await inventoryRefusal(takeInventory(host, { expectedGpus: swapped }), 'unexpected-mapping');
    expect(message).toContain(`module ${x.moduleId} expected at ${y.pciAddress}, but nvidia-smi reports it at ${x.pciAddress}`);
    expect(message).toContain(`module ${y.moduleId} expected at ${x.pciAddress}, but nvidia-smi reports it at ${y.pciAddress}`);
  });

  it('refuses an expected module nvidia-smi does not report, and a reported module expectedGpus leaves out', async () => {
    const expected = expectedFromSim();
    const gone = sim.gpus[3]!;
    await editHostJson((h) => {
      h.gpus.splice(3, 1);
    });
    let message = await inventoryRefusal(takeInventory(host, { expectedGpus: expected }), 'unexpected-mapping');
    expect(message).toContain(`module ${gone.moduleId} expected at ${gone.pciAddress}, but no GPU on nvidia reports Module Id ${gone.moduleId}`);

    await writeFile(hostJsonPath(), hostJsonText);
    const partial = expected.filter((g) => g.moduleId !== gone.moduleId);
    message = await inventoryRefusal(takeInventory(host, { expectedGpus: partial }), 'unexpected-mapping');
    expect(message).toContain(`nvidia-smi reports module ${gone.moduleId} at ${gone.pciAddress}, which expectedGpus does not list`);
  });

  it('refuses a partition of 3 GPUs, and a table with no partitions', async () => {
    await editHostJson((h) => {
      h.partitions[1]!.modules = h.partitions[1]!.modules.slice(0, 3);
    });
    let message = await inventoryRefusal(takeInventory(host), 'bad-partition-table');
    expect(message).toMatch(/^partition 2 has 3 GPU\(s\) \(modules 1, 2, 3\); gpuvm places only 1, 2, 4 or 8$/);

    await editHostJson((h) => {
      h.partitions = [];
    });
    message = await inventoryRefusal(takeInventory(host), 'bad-partition-table');
    expect(message).toMatch(/^fmpm -l lists no partitions on host sim-inv/);
  });

  it('refuses a GPU whose IOMMU group cannot be read, naming module and address', async () => {
    const victim = sim.gpus[0]!;
    const link = path.join(root, 'sys', 'bus', 'pci', 'devices', victim.pciAddress, 'iommu_group');
    await unlink(link);
    try {
      const message = await inventoryRefusal(takeInventory(host), 'sysfs');
      expect(message).toMatch(new RegExp(`^module ${victim.moduleId} \\(GPU ${victim.pciAddress}\\): .*no IOMMU group`));
    } finally {
      await symlink(path.join('..', '..', '..', '..', 'kernel', 'iommu_groups', String(victim.iommuGroup)), link);
    }
    expect((await takeInventory(host)).gpus).toHaveLength(8);
  });
});
