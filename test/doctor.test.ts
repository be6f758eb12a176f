/**
 * `gpuvm doctor` against the simulated B200 host: healthy, then each host fault injected by
 * changing the environment (files, faults.json) and shown to fail exactly its own check with a fix
 * that says what to do. Also the Xid line parser on real-format lines, and the CLI's exit codes.
 */
import { execFile } from 'node:child_process';
import { access, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { execa } from 'execa';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CHECKS, parseXidLines, runDoctor, type CheckResult } from '../src/host/doctor.ts';
import { openSimulatedHost, type HostAdapters } from '../src/host/host.ts';
import { clearHostFaults, HOST_FAULTS, HostFaultError, injectHostFault, type HostFault } from '../src/host/sim/host-files.ts';
import { createSimHost, stopSimKernel } from '../src/host/sim/sim-host.ts';

const BIN = fileURLToPath(new URL('../bin/gpuvm.js', import.meta.url));
const HOST_ID = 'sim-b200';
const DRIVER = '580.95.05';

let dataDir: string;
let root: string;
let host: HostAdapters;

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(tmpdir(), 'gpuvm-doctor-'));
  root = path.join(dataDir, 'sim', HOST_ID);
  // The same adapters `gpuvm doctor` builds: createSimHost + startSimKernel behind them.
  host = await openSimulatedHost({ hostId: HOST_ID, dataDir, bindTimeoutMs: 3_000, toolTimeoutMs: 10_000 }, pino({ level: 'silent' }));
});

afterAll(async () => {
  await stopSimKernel(root).catch(() => undefined);
  await rm(dataDir, { recursive: true, force: true });
});

function byId(results: CheckResult[]): Map<string, CheckResult> {
  return new Map(results.map((r) => [r.id, r]));
}

/** Every check but `except` passes; describes the ones that do not, so a failure message says which. */
function othersPass(results: CheckResult[], except: string[]): void {
  const others = results.filter((r) => !except.includes(r.id) && r.status !== 'pass');
  expect(others.map((r) => `${r.id}: ${r.status}: ${r.detail}`)).toEqual([]);
}

describe('doctor on the simulated host', () => {
  afterEach(async () => {
    await clearHostFaults(root);
  });

  it('passes every check on a healthy host, in the documented order', async () => {
    const results = await runDoctor(host);
    expect(results.map((r) => r.id)).toEqual(Object.keys(CHECKS));
    othersPass(results, []);
    const r = byId(results);
    expect(r.get('iommu')!.detail).toBe('intel_iommu=on iommu=pt');
    expect(r.get('open-kernel-module')!.detail).toContain(`open kernel module ${DRIVER} (B200)`);
    expect(r.get('fabric-manager-version')!.detail).toBe(`Fabric Manager ${DRIVER} = guest image driver ${DRIVER}`);
    expect(r.get('fabric-manager')!.detail).toMatch(/^answers: 15 partitions/);
    expect(r.get('gpu-fabric')!.detail).toMatch(/^8 GPUs on nvidia: 8 In Progress/);
    const version = await host.qemu.version();
    expect(r.get('qemu')!.detail).toMatch(
      version.major < 10 || (version.major === 10 && version.minor < 1)
        ? new RegExp(`^QEMU ${version.major}\\.${version.minor}\\.${version.micro} < 10\\.1: x-no-mmap=true will be set on every GPU; vfio-pci has .*x-no-mmap`)
        : /≥ 10\.1/,
    );
    for (const c of results) expect(c.fix).toBeNull();
  });

  const cases: { fault: HostFault; id: keyof typeof CHECKS; detail: RegExp; fix: RegExp }[] = [
    { fault: 'no-iommu', id: 'iommu', detail: /neither intel_iommu=on nor amd_iommu=on/, fix: /intel_iommu=on .*iommu=pt .*update-grub and reboot/ },
    { fault: 'vfio-missing', id: 'vfio-modules', detail: /not loaded: vfio_pci/, fix: /modprobe -a vfio vfio_iommu_type1 vfio_pci/ },
    { fault: 'fabric-manager-down', id: 'fabric-manager', detail: /cannot reach Fabric Manager/, fix: /systemctl start nvidia-fabricmanager/ },
    { fault: 'fabric-mode-0', id: 'fabric-mode', detail: /FABRIC_MODE=0/, fix: /set FABRIC_MODE=1 in .*fabricmanager\.cfg, then systemctl restart nvidia-fabricmanager/ },
    { fault: 'proprietary-module', id: 'open-kernel-module', detail: /proprietary kernel module 580\.95\.05.*B200 works only with the open module/, fix: /nvidia-open/ },
    {
      fault: 'fabric-manager-version-mismatch',
      id: 'fabric-manager-version',
      detail: /Fabric Manager 570\.195\.03 ≠ guest image driver 580\.95\.05/,
      fix: /install nvidia-fabricmanager 580\.95\.05 .*or rebuild the guest image with nvidia-open 570\.195\.03/,
    },
    { fault: 'no-nvlsm', id: 'nvlsm', detail: /opt\/nvidia\/nvlsm\/sbin\/nvlsm is missing.*B200 needs NVLSM/, fix: /apt install nvlsm/ },
    { fault: 'gpu-fabric-failed', id: 'gpu-fabric', detail: /GPU 0000:17:00\.0 \(module \d\): fabric Completed \/ Insufficient Resources/, fix: /keep VMs off 0000:17:00\.0/ },
    { fault: 'xid', id: 'xid', detail: /GPU 0000:17:00\.0: Xid 79 \(1 line; last: .*GPU has fallen off the bus\.\)/, fix: /keep VMs off 0000:17:00\.0.*reboot/ },
  ];

  it('has a case for every fault', () => {
    expect(cases.map((c) => c.fault).sort()).toEqual([...HOST_FAULTS].sort());
  });

  it.each(cases)('$fault fails only $id, with its fix', async ({ fault, id, detail, fix }) => {
    await injectHostFault(root, fault);
    const results = await runDoctor(host);
    const r = byId(results).get(id)!;
    expect(r.status, r.detail).toBe('fail');
    expect(r.detail).toMatch(detail);
    expect(r.fix).toMatch(fix);
    othersPass(results, [id]);

    await clearHostFaults(root);
    expect(byId(await runDoctor(host)).get(id)!.status).toBe('pass');
  });

  it('names the GPU the fault was injected on, several faults at once', async () => {
    await injectHostFault(root, 'gpu-fabric-failed', { pciAddress: '0000:bb:00.0' });
    await injectHostFault(root, 'xid', { pciAddress: '0000:bb:00.0' });
    await injectHostFault(root, 'xid', { pciAddress: '0000:bb:00.0' });
    const r = byId(await runDoctor(host));
    expect(r.get('gpu-fabric')).toMatchObject({ status: 'fail' });
    expect(r.get('gpu-fabric')!.detail).toMatch(/^GPU 0000:bb:00\.0 /);
    expect(r.get('xid')!.detail).toMatch(/^GPU 0000:bb:00\.0: Xid 79 \(2 lines/);
    await expect(injectHostFault(root, 'xid', { pciAddress: '0000:01:00.0' })).rejects.toBeInstanceOf(HostFaultError);
  });

  it('keeps injected faults when the simulated host is opened again', async () => {
    await injectHostFault(root, 'no-iommu');
    await injectHostFault(root, 'vfio-missing');
    await injectHostFault(root, 'no-nvlsm');
    await createSimHost({ root, hostId: HOST_ID }); // what every `gpuvm serve` / `gpuvm doctor` does
    expect(await readFile(path.join(root, 'proc', 'cmdline'), 'utf8')).not.toContain('iommu');
    await expect(access(path.join(root, 'sys', 'module', 'vfio_pci'))).rejects.toThrow();
    await expect(access(path.join(root, 'opt', 'nvidia', 'nvlsm', 'sbin', 'nvlsm'))).rejects.toThrow();
    await clearHostFaults(root);
    await access(path.join(root, 'sys', 'module', 'vfio_pci'));
    await access(path.join(root, 'opt', 'nvidia', 'nvlsm', 'sbin', 'nvlsm'));
  });

  it('warns when iommu=pt is missing or no guest image driver version is configured', async () => {
    await writeFile(path.join(root, 'proc', 'cmdline'), 'BOOT_IMAGE=/boot/vmlinuz ro intel_iommu=on\n');
    const r = byId(await runDoctor({ ...host, vmDefaults: {} }));
    expect(r.get('iommu')).toMatchObject({ status: 'warn', fix: expect.stringMatching(/add iommu=pt/) });
    expect(r.get('fabric-manager-version')).toMatchObject({ status: 'warn', fix: expect.stringMatching(/imageDriverVersion/) });
    expect(r.get('fabric-manager-version')!.detail).toContain(`Fabric Manager ${DRIVER}; no guest image driver version`);
  });

  it('requires blacklist nvidia only when asked', async () => {
    const modprobe = path.join(root, 'etc', 'modprobe.d');
    expect(byId(await runDoctor(host)).get('nvidia-blacklist')!.detail).toMatch(/^not required: GPUs rest on the nvidia driver/);
    const required = byId(await runDoctor(host, { requireNvidiaBlacklist: true })).get('nvidia-blacklist')!;
    expect(required).toMatchObject({ status: 'fail', fix: expect.stringMatching(/blacklist nvidia.*update-initramfs/s) });
    await mkdir(modprobe, { recursive: true });
    await writeFile(path.join(modprobe, 'blacklist-nvidia.conf'), 'blacklist nouveau\nblacklist nvidia_drm\n');
    expect(byId(await runDoctor(host, { requireNvidiaBlacklist: true })).get('nvidia-blacklist')!.status).toBe('fail'); // nvidia_drm is not nvidia
    await writeFile(path.join(modprobe, 'blacklist-nvidia.conf'), 'blacklist nouveau\nblacklist nvidia\n');
    expect(byId(await runDoctor(host, { requireNvidiaBlacklist: true })).get('nvidia-blacklist')).toMatchObject({ status: 'pass' });
    await rm(path.join(modprobe, 'blacklist-nvidia.conf'));
  });

  it('reads the kernel log it is given, and warns when there is none', async () => {
    const log = path.join(dataDir, 'messages');
    await writeFile(log, 'Jan 15 14:30:45 dgx-01 kernel: NVRM: Xid (PCI:0000:dd:00): 48, pid=\'<unknown>\', name=<unknown>, An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 6, subpartition 0.\n');
    expect(byId(await runDoctor(host, { kernelLog: log })).get('xid')!.detail).toMatch(/^GPU 0000:dd:00\.0: Xid 48/);
    const missing = byId(await runDoctor(host, { kernelLog: path.join(dataDir, 'no-such-log') })).get('xid')!;
    expect(missing).toMatchObject({ status: 'warn', fix: expect.stringMatching(/--kernel-log/) });
  });

  it('turns a check that throws into a fail with the message, not a stack', async () => {
    const broken = { ...host, fmpm: { list: async () => { throw new TypeError('fmpm adapter exploded'); } } } as unknown as HostAdapters;
    const r = byId(await runDoctor(broken)).get('fabric-manager')!;
    expect(r).toMatchObject({ status: 'fail', detail: 'check failed unexpectedly: fmpm adapter exploded' });
  });

  it('runs the simulated nv-fabricmanager like the real one', async () => {
    const { stdout } = await execa(host.fabricManagerBin, ['--version']);
    expect(stdout).toBe(`Fabric Manager version is : ${DRIVER}`);
    const other = await execa(host.fabricManagerBin, ['-c', '/usr/share/nvidia/nvswitch/fabricmanager.cfg'], { reject: false });
    expect(other.exitCode).toBe(1);
  });
});

describe('parseXidLines', () => {
  it('reads real kernel log formats, with and without the function, and skips the rest', () => {
    const text = [
      "Oct 14 09:40:02 hgx-7 kernel: [ 8675.309421] NVRM: Xid (PCI:0000:17:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
      'Aug 19 21:36:23 fedora kernel: NVRM: Xid (PCI:0000:23:00): 120, GSP task exception: load access page fault (cause:0xd) @ pc:0x13636b2, partition:2#0, task:3, gfid: 0',
      'kernel: NVRM: Xid (PCI:0000:3b:00.0): 94, Ch 00000008',
      "Apr 09 10:00:03 host kernel: NVRM: Xid (PCI:0000:B9:00): 74, pid=<unknown>, name=<unknown>, NVLink: fatal error detected on link 6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)",
      'kernel: NVRM: Xid (PCI:000f:01:00): 13, pid=4242, name=python3, Graphics Exception',
      '2026-08-15T14:32:10+0000 host kernel: NVRM: Xid (PCI:0000:01:00): 109, name=IL2Series.exe, channel 0x00000028, errorString CTX SWITCH TIMEOUT, Info 0x1c022',
      'Apr 09 10:00:01 host kernel: NVRM: VM: invalid mmap',
      'kernel: nvidia-nvswitch2: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 32 egress non-posted PRIV error',
      'Apr 09 10:00:04 host kernel: BTRFS info (device nvme0n1p3): bdev /dev/nvme0n1p3 errs: wr 0, rd 21',
    ].join('\n');
    expect(parseXidLines(text).map(({ pciAddress, xid }) => [pciAddress, xid])).toEqual([
      ['0000:17:00.0', 79],
      ['0000:23:00.0', 120],
      ['0000:3b:00.0', 94],
      ['0000:b9:00.0', 74],
      ['000f:01:00.0', 13],
      ['0000:01:00.0', 109],
    ]);
    expect(parseXidLines(text)[0]!.line).toBe("Oct 14 09:40:02 hgx-7 kernel: [ 8675.309421] NVRM: Xid (PCI:0000:17:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.");
    expect(parseXidLines('')).toEqual([]);
  });
});

describe('gpuvm doctor (CLI)', () => {
  async function doctor(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    try {
      const { stdout, stderr } = await promisify(execFile)(process.execPath, [BIN, 'doctor', '--data-dir', dataDir, ...args], { timeout: 60_000 });
      return { code: 0, stdout, stderr };
    } catch (err) {
      const e = err as { code: number; stdout: string; stderr: string };
      return { code: e.code, stdout: e.stdout, stderr: e.stderr };
    }
  }

  it('exits 0 on a healthy host and 1 with a fault, as JSON and as a table', async () => {
    const healthy = await doctor('--json');
    expect(healthy.code, healthy.stderr).toBe(0);
    const checks = JSON.parse(healthy.stdout) as CheckResult[];
    expect(checks.map((c) => [c.id, c.status])).toEqual(Object.keys(CHECKS).map((id) => [id, 'pass']));

    await injectHostFault(root, 'fabric-mode-0');
    try {
      const broken = await doctor('--json');
      expect(broken.code).toBe(1);
      expect((JSON.parse(broken.stdout) as CheckResult[]).filter((c) => c.status !== 'pass').map((c) => c.id)).toEqual(['fabric-mode']);

      const table = await doctor();
      expect(table.code).toBe(1);
      const lines = table.stdout.split('\n');
      expect(lines[0]).toMatch(/^STATUS\s+CHECK\s+DETAIL$/);
      const at = lines.findIndex((l) => /^FAIL\s+fabric-mode\s+.*FABRIC_MODE=0/.test(l));
      expect(at, table.stdout).toBeGreaterThan(0);
      expect(lines[at + 1]).toMatch(/^\s+FIX: set FABRIC_MODE=1 in /);
      expect(table.stdout).toMatch(/10 passed, 0 warnings, 1 failed/);
      expect(table.stderr).toBe('');
    } finally {
      await clearHostFaults(root);
    }
  });
});
