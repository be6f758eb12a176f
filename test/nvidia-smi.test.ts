import { execa } from 'execa';
import { chmod, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NvidiaSmi, NvidiaSmiError, parseNvidiaSmiText, parseNvidiaSmiXml, type NvidiaSmiReport } from '../src/host/nvidia-smi.ts';

const NVIDIA_SMI_MJS = fileURLToPath(new URL('../src/host/sim/bin/nvidia-smi.mjs', import.meta.url));
// Real H100 captures (copied from shared/fixtures/host-captures).
const CAPTURES = fileURLToPath(new URL('./fixtures/host-captures/', import.meta.url));

/** A B200-style `nvidia-smi -q` excerpt, written by hand in the real layout (several GPUs, key padding to column 55). */
const B200_TEXT = `
==============NVSMI LOG==============

Timestamp                                              : Tue Nov 24 09:12:44 2026
Driver Version                                         : 580.95.05
CUDA Version                                           : 13.0

Attached GPUs                                          : 3
GPU 00000000:1A:00.0
    Product Name                                       : NVIDIA B200
    Product Brand                                      : NVIDIA
    Product Architecture                               : Blackwell
    MIG Mode
        Current                                        : Disabled
        Pending                                        : Disabled
    Serial Number                                      : 1654024010123
    GPU UUID                                           : GPU-5b1c7e52-8f0e-4d1a-9a36-1f3e2c7d9a01
    Minor Number                                       : 0
    Platform Info
        Chassis Serial Number                          : N/A
        Slot Number                                    : N/A
        Tray Index                                     : N/A
        Host ID                                        : 1
        Peer Type                                      : Switch Connected
        Module Id                                      : 3
        GPU Fabric GUID                                : 0xa5cd3b41e0a7c5b2
    PCI
        Bus                                            : 0x1A
        Device                                         : 0x00
        Domain                                         : 0x0000
        Device Id                                      : 0x290110DE
        Bus Id                                         : 00000000:1A:00.0
    Clocks Event Reasons
        Idle                                           : Active
        HW Slowdown                                    : Not Active
            HW Thermal Slowdown                        : Not Active
            HW Power Brake Slowdown                    : Not Active
        Sync Boost                                     : Not Active
    GPU Memory Power Readings 
        Average Power Draw                             : 61.20 W
    Fabric
        State                                          : Completed
        Status                                         : Success
        CliqueId                                       : 0
        ClusterUUID                                    : 00000000-0000-0000-0000-000000000000
        Health
            Summary                                    : Healthy
            Bandwidth                                  : Full
    Processes                                          : None

GPU 00000000:BA:00.0
    Product Name                                       : NVIDIA B200
    Product Architecture                               : Blackwell
    Serial Number                                      : 1654024010456
    GPU UUID                                           : GPU-0f3a9d11-22c4-4b7e-8d5b-6a7c8e9f0b12
    Platform Info
        Peer Type                                      : Switch Connected
        Module Id                                      : 7
    PCI
        Bus Id                                         : 00000000:BA:00.0
    Fabric
        State                                          : In Progress
        Status                                         : N/A
    Processes                                          : None

GPU 00000000:DB:00.0
    Product Name                                       : NVIDIA B200
    Serial Number                                      : N/A
    GPU UUID                                           : N/A
    Platform Info
        Peer Type                                      : N/A
        Module Id                                      : 0
    PCI
        Bus Id                                         : 00000000:DB:00.0
    Processes                                          : None

`;

function expectedH100(): NvidiaSmiReport {
  return {
    driverVersion: '580.159.04',
    cudaVersion: '13.0',
    gpus: [
      {
        pciAddress: '0000:00:06.0',
        busId: '00000000:00:06.0',
        moduleId: 2,
        productName: 'NVIDIA H100 80GB HBM3',
        uuid: 'GPU-00000000-0000-0000-0000-000000000000',
        serial: '0000000000000',
        peerType: null,
        fabric: { state: 'N/A', status: 'N/A' },
      },
    ],
  };
}

function expectSmiError(fn: () => unknown, code: NvidiaSmiError['code'], label: string): NvidiaSmiError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught, label).toBeInstanceOf(NvidiaSmiError);
  expect((caught as NvidiaSmiError).code, label).toBe(code);
  return caught as NvidiaSmiError;
}

async function rejection(p: Promise<unknown>): Promise<NvidiaSmiError> {
  const err = await p.then(
    () => {
      throw new Error('expected an NvidiaSmiError, but the call succeeded');
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(NvidiaSmiError);
  return err as NvidiaSmiError;
}

// ── parsers on real and hand-written output ───────────────────────────────────
describe('parseNvidiaSmiText', () => {
  it('reads the real H100 capture', async () => {
    const text = await readFile(join(CAPTURES, 'h100-sxm-nvidia-smi-q.txt'), 'utf8');
    expect(parseNvidiaSmiText(text)).toEqual(expectedH100());
  });

  it('reads a B200 multi-GPU block (Switch Connected, module ids, fabric state)', () => {
    const r = parseNvidiaSmiText(B200_TEXT);
    expect(r.driverVersion).toBe('580.95.05');
    expect(r.cudaVersion).toBe('13.0');
    expect(r.gpus).toEqual([
      {
        pciAddress: '0000:1a:00.0',
        busId: '00000000:1A:00.0',
        moduleId: 3,
        productName: 'NVIDIA B200',
        uuid: 'GPU-5b1c7e52-8f0e-4d1a-9a36-1f3e2c7d9a01',
        serial: '1654024010123',
        peerType: 'Switch Connected',
        fabric: { state: 'Completed', status: 'Success' },
      },
      {
        pciAddress: '0000:ba:00.0',
        busId: '00000000:BA:00.0',
        moduleId: 7,
        productName: 'NVIDIA B200',
        uuid: 'GPU-0f3a9d11-22c4-4b7e-8d5b-6a7c8e9f0b12',
        serial: '1654024010456',
        peerType: 'Switch Connected',
        fabric: { state: 'In Progress', status: 'N/A' },
      },
      {
        pciAddress: '0000:db:00.0',
        busId: '00000000:DB:00.0',
        moduleId: null, // Module Id 0: not a module nvidia-smi can vouch for
        productName: 'NVIDIA B200',
        uuid: null,
        serial: null,
        peerType: null,
        fabric: null, // no Fabric section
      },
    ]);
  });

  it('does not depend on the padding width', () => {
    const narrow = B200_TEXT.replace(/ {2,}: /g, ' : ');
    expect(parseNvidiaSmiText(narrow)).toEqual(parseNvidiaSmiText(B200_TEXT));
  });

  it('rejects malformed output with bad-output', () => {
    const cases: [string, string][] = [
      ['empty', ''],
      ['unrelated text', 'Segmentation fault\n'],
      ['attached count differs', B200_TEXT.replace('Attached GPUs                                          : 3', 'Attached GPUs : 4')],
      ['module id not a number', B200_TEXT.replace('Module Id                                      : 7', 'Module Id : seven')],
      ['bus id domain out of range', B200_TEXT.replace('GPU 00000000:BA:00.0', 'GPU 0001FFFF:BA:00.0')],
      ['bus id mangled', B200_TEXT.replace('GPU 00000000:BA:00.0', 'GPU 1FFFF0000:BA:00.0')],
      ['no product name', B200_TEXT.replace('    Product Name                                       : NVIDIA B200\n    Serial Number                                      : N/A', '    Serial Number : N/A')],
    ];
    for (const [label, text] of cases) expectSmiError(() => parseNvidiaSmiText(text), 'bad-output', label);
  });
});

describe('parseNvidiaSmiXml', () => {
  it('reads the real H100 capture, agreeing with the text form', async () => {
    const xml = await readFile(join(CAPTURES, 'h100-sxm-nvidia-smi-q.xml'), 'utf8');
    const text = await readFile(join(CAPTURES, 'h100-sxm-nvidia-smi-q.txt'), 'utf8');
    expect(parseNvidiaSmiXml(xml)).toEqual(expectedH100());
    expect(parseNvidiaSmiXml(xml)).toEqual(parseNvidiaSmiText(text));
  });

  it('rejects malformed XML with bad-output', async () => {
    const xml = await readFile(join(CAPTURES, 'h100-sxm-nvidia-smi-q.xml'), 'utf8');
    const cases: [string, string][] = [
      ['empty', ''],
      ['not xml', 'NVIDIA-SMI has failed'],
      ['unclosed', xml.slice(0, 2000)],
      ['other root', '<?xml version="1.0" ?><log><gpu id="00000000:00:06.0"/></log>'],
      ['attached count differs', xml.replace('<attached_gpus>1</attached_gpus>', '<attached_gpus>2</attached_gpus>')],
      ['module id not a number', xml.replace('<module_id>2</module_id>', '<module_id>two</module_id>')],
    ];
    for (const [label, text] of cases) expectSmiError(() => parseNvidiaSmiXml(text), 'bad-output', label);
  });
});

// ── the simulator, through a temp sim root laid out as common.md describes ─────
interface SimGpu {
  pciAddress: string;
  moduleId: number;
  driver: string | null;
}

const SIM_GPUS: SimGpu[] = [
  { pciAddress: '0000:17:00.0', moduleId: 3, driver: 'nvidia' },
  { pciAddress: '0000:3d:00.0', moduleId: 1, driver: 'nvidia' },
  { pciAddress: '0000:60:00.0', moduleId: 4, driver: 'vfio-pci' },
  { pciAddress: '0000:70:00.0', moduleId: 2, driver: null },
  { pciAddress: '0000:9a:00.0', moduleId: 8, driver: 'nvidia' },
  { pciAddress: '0000:ba:00.0', moduleId: 6, driver: 'nvidia' },
];

let tmp: string;
let rootCounter = 0;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'gpuvm-nvsmi-test-'));
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

async function makeSimRoot(gpus: SimGpu[], active: number[]): Promise<{ root: string; bin: string }> {
  const root = join(tmp, `host-${++rootCounter}`);
  const partitions = [
    { id: 1, modules: [1, 2, 3, 4, 5, 6, 7, 8] },
    { id: 2, modules: [1, 2, 3, 4] },
    { id: 3, modules: [5, 6, 7, 8] },
    { id: 4, modules: [1, 2] },
    { id: 5, modules: [3, 4] },
    ...[1, 2, 3, 4, 5, 6, 7, 8].map((m) => ({ id: 7 + m, modules: [m] })),
  ];
  await mkdir(join(root, 'bin'), { recursive: true });
  await mkdir(join(root, 'fm'), { recursive: true });
  await writeFile(
    join(root, 'host.json'),
    JSON.stringify({
      hostId: 'sim-test',
      board: 'B200',
      productName: 'NVIDIA B200',
      pciVendorId: '0x10de',
      pciDeviceId: '0x2901',
      driverVersion: '580.95.05',
      fabricManagerVersion: '580.95.05',
      kernelModule: 'open',
      gpus: gpus.map((g, i) => ({ pciAddress: g.pciAddress, moduleId: g.moduleId, uuid: `GPU-sim-${g.moduleId}`, serial: `16540240${i}`, iommuGroup: 20 + i })),
      partitions,
    }),
  );
  await writeFile(join(root, 'fm', 'state.json'), JSON.stringify({ active, faults: {} }));
  for (const name of ['nvidia', 'vfio-pci']) await mkdir(join(root, 'sys', 'bus', 'pci', 'drivers', name), { recursive: true });
  for (const g of gpus) {
    const dev = join(root, 'sys', 'bus', 'pci', 'devices', g.pciAddress);
    await mkdir(dev, { recursive: true });
    if (g.driver) await symlink(`../../drivers/${g.driver}`, join(dev, 'driver'));
  }
  const bin = join(root, 'bin', 'nvidia-smi');
  await writeFile(bin, `#!/bin/sh\nGPUVM_SIM_ROOT='${root}'\nexport GPUVM_SIM_ROOT\nexec '${process.execPath}' '${NVIDIA_SMI_MJS}' "$@"\n`);
  await chmod(bin, 0o755);
  return { root, bin };
}

describe('simulated nvidia-smi', () => {
  it('prints GPUs on nvidia only, in both formats, which the parsers read alike', async () => {
    const { bin } = await makeSimRoot(SIM_GPUS, [5]); // partition 5 = modules 3, 4
    const text = await execa(bin, ['-q'], { timeout: 10_000 });
    const xml = await execa(bin, ['-q', '-x'], { timeout: 10_000 });
    const fromText = parseNvidiaSmiText(text.stdout);
    const fromXml = parseNvidiaSmiXml(xml.stdout);
    expect(fromText).toEqual(fromXml);

    expect(fromText.driverVersion).toBe('580.95.05');
    expect(text.stdout).toMatch(/^Attached GPUs {2,}: 4$/m);
    expect(fromText.gpus.map((g) => [g.pciAddress, g.busId, g.moduleId])).toEqual([
      ['0000:17:00.0', '00000000:17:00.0', 3],
      ['0000:3d:00.0', '00000000:3D:00.0', 1],
      ['0000:9a:00.0', '00000000:9A:00.0', 8],
      ['0000:ba:00.0', '00000000:BA:00.0', 6],
    ]);
    for (const g of fromText.gpus) {
      expect(g.productName).toBe('NVIDIA B200');
      expect(g.peerType).toBe('Switch Connected');
      expect(g.uuid).toBe(`GPU-sim-${g.moduleId}`);
      // Only module 3 is in the active partition among the GPUs printed.
      expect(g.fabric).toEqual(g.moduleId === 3 ? { state: 'Completed', status: 'Success' } : { state: 'In Progress', status: 'N/A' });
    }
  });

  it('keeps the real capture’s sections, order and key padding', async () => {
    const { bin } = await makeSimRoot(SIM_GPUS.slice(0, 1), []);
    const keysOf = (text: string) => text.split('\n').map((l) => l.replace(/ *: .*$/, '')).filter((l) => !l.startsWith('GPU 0'));
    const sim = await execa(bin, ['-q'], { timeout: 10_000 });
    const real = await readFile(join(CAPTURES, 'h100-sxm-nvidia-smi-q.txt'), 'utf8');
    expect(keysOf(`${sim.stdout}\n`)).toEqual(keysOf(real));
  });

  it('answers "No devices were found" (exit 6) when every GPU is on vfio-pci; query() gives an empty report', async () => {
    const { bin } = await makeSimRoot(SIM_GPUS.map((g) => ({ ...g, driver: 'vfio-pci' })), []);
    const r = await execa(bin, ['-q'], { timeout: 10_000, reject: false });
    expect(r.exitCode).toBe(6);
    expect(await new NvidiaSmi({ bin, timeoutMs: 10_000 }).query()).toEqual({ driverVersion: null, cudaVersion: null, gpus: [] });
  });

  it('exits 2 with a clear message when GPUVM_SIM_ROOT is unset', async () => {
    const env = { ...process.env };
    delete env.GPUVM_SIM_ROOT;
    const r = await execa(process.execPath, [NVIDIA_SMI_MJS, '-q'], { env, extendEnv: false, reject: false, timeout: 10_000 });
    expect(r.exitCode).toBe(2);
    expect(r.stderr).toContain('GPUVM_SIM_ROOT');
  });
});

describe('NvidiaSmi adapter', () => {
  it('queries the simulator through -q -x', async () => {
    const { bin } = await makeSimRoot(SIM_GPUS, [2]); // modules 1-4
    const report = await new NvidiaSmi({ bin, timeoutMs: 10_000 }).query();
    expect(report.gpus.map((g) => [g.moduleId, g.fabric?.state])).toEqual([
      [3, 'Completed'],
      [1, 'Completed'],
      [8, 'In Progress'],
      [6, 'In Progress'],
    ]);
  });

  it('reports the driver failure fault as failed with exit 9', async () => {
    const { root, bin } = await makeSimRoot(SIM_GPUS, []);
    await writeFile(join(root, 'faults.json'), JSON.stringify({ nvidiaSmi: { fail: true } }));
    const err = await rejection(new NvidiaSmi({ bin, timeoutMs: 10_000 }).query());
    expect(err.code).toBe('failed');
    expect(err.exitCode).toBe(9);
    expect(err.message).toContain("couldn't communicate with the NVIDIA driver");
    expect(err.message).toContain(bin);
  });

  it('kills a hung nvidia-smi at the timeout', async () => {
    const { root, bin } = await makeSimRoot(SIM_GPUS, []);
    await writeFile(join(root, 'faults.json'), JSON.stringify({ nvidiaSmi: { hangMs: 5_000 } }));
    const started = Date.now();
    const err = await rejection(new NvidiaSmi({ bin, timeoutMs: 300 }).query());
    expect(err.code).toBe('timeout');
    expect(Date.now() - started).toBeLessThan(3_000);
  });

  it('reports a missing binary as spawn-failed and garbage as bad-output', async () => {
    expect((await rejection(new NvidiaSmi({ bin: join(tmp, 'no-such-nvidia-smi') }).query())).code).toBe('spawn-failed');
    const garbage = join(tmp, 'garbage-nvidia-smi.sh');
    await writeFile(garbage, '#!/bin/sh\necho "<html>oops</html>"\n');
    await chmod(garbage, 0o755);
    expect((await rejection(new NvidiaSmi({ bin: garbage }).query())).code).toBe('bad-output');
  });
});
