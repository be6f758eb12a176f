import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  Qemu,
  QemuError,
  VM_ID_PATTERN,
  buildQemuArgs,
  findQemuBinary,
  needsNoMmap,
  parseDeviceProperties,
  parseProcStat,
  parseQemuVersion,
  vfioPropertiesUsed,
  type QemuOptions,
  type QemuVersion,
  type QemuVmSpec,
} from '../src/host/qemu.ts';
import type { QmpClient } from '../src/host/qmp.ts';

const FIXTURES = resolve(import.meta.dirname, 'fixtures/qemu');
const REPO = resolve(import.meta.dirname, '..');
const STANDIN = join(REPO, 'src/host/sim/bin/qemu-standin.mjs');
const QEMU_TS = join(REPO, 'src/host/qemu.ts');
const V7_2: QemuVersion = { major: 7, minor: 2, micro: 22, text: 'QEMU emulator version 7.2.22' };
const V10_1: QemuVersion = { major: 10, minor: 1, micro: 0, text: 'QEMU emulator version 10.1.0' };
const RUN = '/run/gpuvm/vm-a';
const GPUS = ['0000:17:00.0', '0000:3d:00.0', '0000:60:00.0', '0000:70:00.0', '0000:98:00.0', '0000:bb:00.0', '0000:dd:00.0', '0000:ee:00.0'];

const COMMON = (vmId: string, runDir: string) => [
  '-nodefaults', '-display', 'none', '-serial', 'none',
  '-pidfile', `${runDir}/qemu.pid`,
  '-qmp', `unix:${runDir}/qmp.sock,server=on,wait=off`,
];

function spec(n: number, over: Partial<QemuVmSpec> = {}): QemuVmSpec {
  return { vmId: 'vm-a', memoryMiB: 4096, vcpus: 4, gpus: GPUS.slice(0, n), gpuDevice: 'vfio-pci', ...over };
}

function thrown(fn: () => unknown): QemuError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(QemuError);
    return err as QemuError;
  }
  throw new Error('expected a QemuError');
}

async function rejected(p: Promise<unknown>): Promise<QemuError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(QemuError);
    return err as QemuError;
  }
  throw new Error('expected a QemuError');
}

// ---------------------------------------------------------------------------------------------

describe('buildQemuArgs (golden)', () => {
  it('1 GPU, vfio-pci on QEMU 7.2: own root port, x-no-mmap, kvm with host CPU', () => {
    expect(buildQemuArgs(spec(1), { version: V7_2, runDir: RUN, accel: 'kvm' })).toEqual([
      '-name', 'guest=vm-a',
      '-machine', 'q35',
      '-accel', 'kvm',
      '-cpu', 'host',
      '-m', '4096M',
      '-smp', '4',
      ...COMMON('vm-a', RUN),
      '-device', 'pcie-root-port,id=rp0,chassis=1,slot=1,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:17:00.0,id=gpu0,bus=rp0,addr=0x0,x-no-mmap=true',
    ]);
  });

  it('2 GPUs on QEMU 10.1: no x-no-mmap unless forced', () => {
    const base = [
      '-name', 'guest=vm-a', '-machine', 'q35', '-accel', 'kvm', '-cpu', 'host', '-m', '4096M', '-smp', '4',
      ...COMMON('vm-a', RUN),
    ];
    expect(buildQemuArgs(spec(2), { version: V10_1, runDir: RUN, accel: 'kvm' })).toEqual([
      ...base,
      '-device', 'pcie-root-port,id=rp0,chassis=1,slot=1,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:17:00.0,id=gpu0,bus=rp0,addr=0x0',
      '-device', 'pcie-root-port,id=rp1,chassis=2,slot=2,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:3d:00.0,id=gpu1,bus=rp1,addr=0x0',
    ]);
    expect(buildQemuArgs(spec(2), { version: V10_1, runDir: RUN, accel: 'kvm', forceNoMmap: true })).toEqual([
      ...base,
      '-device', 'pcie-root-port,id=rp0,chassis=1,slot=1,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:17:00.0,id=gpu0,bus=rp0,addr=0x0,x-no-mmap=true',
      '-device', 'pcie-root-port,id=rp1,chassis=2,slot=2,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:3d:00.0,id=gpu1,bus=rp1,addr=0x0,x-no-mmap=true',
    ]);
  });

  it('4 GPUs as stand-ins under TCG: same ids and placement, no vfio options, no -cpu host', () => {
    const args = buildQemuArgs(spec(4, { gpuDevice: 'stand-in' }), { version: V7_2, runDir: RUN, accel: 'tcg' });
    expect(args).toEqual([
      '-name', 'guest=vm-a', '-machine', 'q35', '-accel', 'tcg', '-m', '4096M', '-smp', '4',
      ...COMMON('vm-a', RUN),
      '-device', 'pcie-root-port,id=rp0,chassis=1,slot=1,bus=pcie.0',
      '-device', 'edu,id=gpu0,bus=rp0,addr=0x0',
      '-device', 'pcie-root-port,id=rp1,chassis=2,slot=2,bus=pcie.0',
      '-device', 'edu,id=gpu1,bus=rp1,addr=0x0',
      '-device', 'pcie-root-port,id=rp2,chassis=3,slot=3,bus=pcie.0',
      '-device', 'edu,id=gpu2,bus=rp2,addr=0x0',
      '-device', 'pcie-root-port,id=rp3,chassis=4,slot=4,bus=pcie.0',
      '-device', 'edu,id=gpu3,bus=rp3,addr=0x0',
    ]);
    const testdev = buildQemuArgs(spec(1, { gpuDevice: 'stand-in' }), { version: V7_2, runDir: RUN, accel: 'tcg', standInDevice: 'pci-testdev' });
    expect(testdev.at(-1)).toBe('pci-testdev,id=gpu0,bus=rp0,addr=0x0');
  });

  it('8 GPUs with hugepages, disk and firmware', () => {
    const args = buildQemuArgs(
      spec(8, { memoryMiB: 1_843_200, vcpus: 224, hugepagesPath: '/dev/hugepages/gpuvm', diskImage: '/var/lib/gpuvm/img/a,b.qcow2', firmware: '/usr/share/ovmf/OVMF.fd' }),
      { version: V7_2, runDir: RUN, accel: 'kvm' },
    );
    expect(args).toEqual([
      '-name', 'guest=vm-a',
      '-machine', 'q35,memory-backend=mem0',
      '-accel', 'kvm', '-cpu', 'host',
      '-m', '1843200M',
      '-object', 'memory-backend-file,id=mem0,size=1843200M,mem-path=/dev/hugepages/gpuvm,share=on,prealloc=on',
      '-smp', '224',
      ...COMMON('vm-a', RUN),
      '-bios', '/usr/share/ovmf/OVMF.fd',
      '-drive', 'file=/var/lib/gpuvm/img/a,,b.qcow2,if=virtio,format=qcow2', // literal comma doubled
      '-device', 'pcie-root-port,id=rp0,chassis=1,slot=1,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:17:00.0,id=gpu0,bus=rp0,addr=0x0,x-no-mmap=true',
      '-device', 'pcie-root-port,id=rp1,chassis=2,slot=2,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:3d:00.0,id=gpu1,bus=rp1,addr=0x0,x-no-mmap=true',
      '-device', 'pcie-root-port,id=rp2,chassis=3,slot=3,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:60:00.0,id=gpu2,bus=rp2,addr=0x0,x-no-mmap=true',
      '-device', 'pcie-root-port,id=rp3,chassis=4,slot=4,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:70:00.0,id=gpu3,bus=rp3,addr=0x0,x-no-mmap=true',
      '-device', 'pcie-root-port,id=rp4,chassis=5,slot=5,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:98:00.0,id=gpu4,bus=rp4,addr=0x0,x-no-mmap=true',
      '-device', 'pcie-root-port,id=rp5,chassis=6,slot=6,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:bb:00.0,id=gpu5,bus=rp5,addr=0x0,x-no-mmap=true',
      '-device', 'pcie-root-port,id=rp6,chassis=7,slot=7,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:dd:00.0,id=gpu6,bus=rp6,addr=0x0,x-no-mmap=true',
      '-device', 'pcie-root-port,id=rp7,chassis=8,slot=8,bus=pcie.0',
      '-device', 'vfio-pci,host=0000:ee:00.0,id=gpu7,bus=rp7,addr=0x0,x-no-mmap=true',
    ]);
    expect(vfioPropertiesUsed(args)).toEqual(new Set(['host', 'addr', 'x-no-mmap']));
  });

  it('refuses bad PCI addresses, VM ids, numbers and paths', () => {
    const ctx = { version: V7_2, runDir: RUN, accel: 'kvm' as const };
    for (const bad of ['0000:17:00.8', '17:00.0', '0000:17:00.0,x-vga=on', '0000:1G:00.0', '0000:17:00.0 ']) {
      const err = thrown(() => buildQemuArgs(spec(1, { gpus: [bad] }), ctx));
      expect(err.code).toBe('bad-spec');
      expect(err.message).toContain(JSON.stringify(bad));
    }
    expect(thrown(() => buildQemuArgs(spec(2, { gpus: [GPUS[0]!, GPUS[0]!] }), ctx)).message).toContain('listed twice');
    for (const vmId of ['', 'VM-A', '-a', 'a_b', 'a/../b', 'x'.repeat(64), 'a,b']) {
      const err = thrown(() => buildQemuArgs(spec(1, { vmId }), ctx));
      expect(err.code).toBe('bad-spec');
      expect(VM_ID_PATTERN.test(vmId)).toBe(false);
    }
    expect(thrown(() => buildQemuArgs(spec(1, { memoryMiB: 10.5 }), ctx)).message).toContain('memoryMiB');
    expect(thrown(() => buildQemuArgs(spec(1, { vcpus: 0 }), ctx)).message).toContain('vcpus');
    expect(thrown(() => buildQemuArgs(spec(1, { hugepagesPath: 'relative/dir' }), ctx)).message).toContain('hugepagesPath');
    expect(thrown(() => buildQemuArgs(spec(1, { gpuDevice: 'stand-in' }), { ...ctx, standInDevice: 'edu,x=1' })).code).toBe('bad-spec');
  });

  it('refuses a QMP socket path over 107 bytes and accepts exactly 107', () => {
    const ctx = (runDir: string) => ({ version: V7_2, runDir, accel: 'tcg' as const });
    const fits = `/${'r'.repeat(107 - '/'.length - '/qmp.sock'.length)}`; // + '/qmp.sock' = 107 bytes
    expect(`${fits}/qmp.sock`).toHaveLength(107);
    expect(() => buildQemuArgs(spec(1), ctx(fits))).not.toThrow();
    const err = thrown(() => buildQemuArgs(spec(1), ctx(`${fits}r`)));
    expect(err.code).toBe('bad-spec');
    expect(err.message).toContain('108 bytes');
    expect(err.message).toContain('107');
    expect(err.vmId).toBe('vm-a');
  });
});

describe('version and property parsing', () => {
  it('parses real --version output', () => {
    const v = parseQemuVersion(readFileSync(join(FIXTURES, 'version-7.2.txt'), 'utf8'));
    expect(v).toEqual({ major: 7, minor: 2, micro: 22, text: 'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)' });
    expect(parseQemuVersion('QEMU emulator version 10.1.0\nCopyright …').major).toBe(10);
    expect(parseQemuVersion('QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1.4)')).toMatchObject({ major: 8, minor: 2, micro: 2 });
    expect(thrown(() => parseQemuVersion('qemu-img version 7.2.0')).code).toBe('bad-output');
  });

  it('needsNoMmap is true below 10.1 only', () => {
    const v = (major: number, minor: number) => ({ major, minor, micro: 0, text: '' });
    expect(needsNoMmap(v(7, 2))).toBe(true);
    expect(needsNoMmap(v(9, 2))).toBe(true);
    expect(needsNoMmap(v(10, 0))).toBe(true);
    expect(needsNoMmap(v(10, 1))).toBe(false);
    expect(needsNoMmap(v(11, 0))).toBe(false);
  });

  it('parses the real `-device vfio-pci,help` output of QEMU 7.2', () => {
    const props = parseDeviceProperties(readFileSync(join(FIXTURES, 'vfio-pci-help-7.2.txt'), 'utf8'));
    for (const p of ['host', 'addr', 'x-no-mmap', 'rombar', 'x-pci-device-id', 'sysfsdev']) expect(props.has(p)).toBe(true);
    expect(props.has('vfio-pci options:')).toBe(false);
    // `id` and `bus` are options of -device itself, not of the device: QEMU does not list them.
    expect(props.has('id')).toBe(false);
    expect(props.has('bus')).toBe(false);
    expect(props.size).toBe(36);
  });

  it('parseProcStat finds the state after the last parenthesis', () => {
    expect(parseProcStat('4242 (qemu-system-x86) S 1 4242 4242 0 -1')).toEqual({ pid: 4242, comm: 'qemu-system-x86', state: 'S' });
    expect(parseProcStat('77 (a) b) (c) Z 1 77').state).toBe('Z');
    expect(parseProcStat(readFileSync('/proc/self/stat', 'utf8')).pid).toBe(process.pid);
  });
});

// ---------------------------------------------------------------------------------------------
// Lifecycle against a binary: the real QEMU 7.2 and the stand-in.

const realQemuBin = await findQemuBinary();

function writeScript(dir: string, name: string, body: string): string {
  const path = join(dir, name);
  writeFileSync(path, `#!/bin/sh\n${body}\n`);
  chmodSync(path, 0o755);
  return path;
}

async function until<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

interface PciDevice {
  qdev_id: string;
  pci_bridge?: { bus: { secondary: number }; devices?: PciDevice[] };
}

function lifecycleSuite(label: string, kind: 'real' | 'standin') {
  describe(label, () => {
    let root: string;
    let bin: string;
    const vmIds = new Set<string>();
    const openClients: QmpClient[] = [];

    beforeAll(() => {
      root = mkdtempSync(join(tmpdir(), 'gpuvm-qemu-'));
      if (kind === 'real') {
        if (!realQemuBin) throw new Error('CI is set but qemu-system-x86_64 is not on PATH: install the qemu-system-x86 package');
        bin = realQemuBin;
      } else {
        bin = writeScript(root, 'qemu-system-x86_64', `exec '${process.execPath}' '${STANDIN}' "$@"`);
      }
    });

    const opts = (over: Partial<QemuOptions> = {}): QemuOptions => ({
      bin,
      runRoot: join(root, 'run'),
      accel: 'tcg',
      startTimeoutMs: 20_000,
      ...over,
    });
    const vmSpec = (vmId: string, gpus = 4): QemuVmSpec => {
      vmIds.add(vmId);
      return { vmId, memoryMiB: 128, vcpus: 1, gpus: GPUS.slice(0, gpus), gpuDevice: 'stand-in' };
    };

    afterEach(async () => {
      for (const c of openClients.splice(0)) await c.close();
      const q = new Qemu(opts());
      for (const vmId of vmIds) {
        await q.terminate(vmId, { quitTimeoutMs: 2_000, termTimeoutMs: 2_000 });
        await q.cleanup(vmId);
      }
      vmIds.clear();
    });
    afterAll(() => {
      if (root) rmSync(root, { recursive: true, force: true });
    });

    it('starts a 4-GPU VM with each gpuN behind its own root port rpN, not on pcie.0', async () => {
      const qemu = new Qemu(opts());
      const started = await qemu.start(vmSpec('topo'));
      expect(started.alreadyRunning).toBe(false);
      expect(started.args).toContain('edu,id=gpu3,bus=rp3,addr=0x0');
      expect(await qemu.status('topo', { queryQmp: true })).toEqual({ state: 'alive', pid: started.pid, qmpStatus: 'running' });

      const qmp = await qemu.connect('topo');
      openClients.push(qmp);
      const version = (await qmp.execute<{ qemu: { major: number; minor: number } }>('query-version')).qemu;
      expect([version.major, version.minor]).toEqual([7, 2]);
      for (let n = 0; n < 4; n++) {
        const gpuBus = await qmp.execute<string>('qom-get', { path: `/machine/peripheral/gpu${n}`, property: 'parent_bus' });
        expect(gpuBus).toBe(`/machine/peripheral/rp${n}/rp${n}`);
        const portBus = await qmp.execute<string>('qom-get', { path: `/machine/peripheral/rp${n}`, property: 'parent_bus' });
        expect(portBus).toBe('/machine/q35/pcie.0');
      }
      const missing = await qmp.execute('qom-get', { path: '/machine/peripheral/gpu4', property: 'parent_bus' }).catch((e: unknown) => e);
      expect(missing).toMatchObject({ code: 'command', errorClass: 'DeviceNotFound' });

      if (kind === 'real') {
        // Pause and resume (events may come before the replies), then let the firmware number
        // the buses: query-pci shows each gpuN alone behind rpN and none on bus 0. While the
        // firmware is still programming the ports' bus numbers, a read can show a device behind
        // another port; the enumeration is done when two reads in a row agree.
        await qmp.execute('stop');
        await qmp.waitForEvent('STOP', 5_000);
        await qmp.execute('cont');
        await qmp.waitForEvent('RESUME', 5_000);
        let previous = '';
        const bus0 = await until('firmware PCI enumeration', async () => {
          const buses = await qmp.execute<Array<{ bus: number; devices: PciDevice[] }>>('query-pci');
          const devs = buses.find((b) => b.bus === 0)?.devices ?? [];
          const ports = devs.filter((d) => /^rp\d$/.test(d.qdev_id));
          const seen = JSON.stringify(buses);
          const settled = seen === previous;
          previous = seen;
          return settled && ports.length === 4 && ports.every((p) => (p.pci_bridge?.devices?.length ?? 0) > 0) ? devs : undefined;
        }, 30_000);
        expect(bus0.some((d) => d.qdev_id.startsWith('gpu'))).toBe(false);
        for (let n = 0; n < 4; n++) {
          const port = bus0.find((d) => d.qdev_id === `rp${n}`)!;
          expect(port.pci_bridge!.devices!.map((d) => d.qdev_id)).toEqual([`gpu${n}`]);
        }
      }
    });

    it('a fresh Qemu instance finds the running VM through its pidfile; terminate quits it', async () => {
      const first = await new Qemu(opts()).start(vmSpec('again', 2));
      const fresh = new Qemu(opts()); // as after a gpuvm restart
      expect(await fresh.status('again')).toEqual({ state: 'alive', pid: first.pid });
      const second = await fresh.start(vmSpec('again', 2));
      expect(second).toMatchObject({ pid: first.pid, alreadyRunning: true });
      expect(second.args).toContain(join(root, 'run', 'again', 'qemu.pid'));

      await expect(fresh.cleanup('again')).rejects.toMatchObject({ code: 'still-running', vmId: 'again' });
      expect(await fresh.terminate('again')).toBe('quit');
      expect(await fresh.status('again')).toEqual({ state: 'gone', pid: null });
      expect(await fresh.terminate('again')).toBe('not-running');
      await fresh.cleanup('again');
      expect(existsSync(fresh.runDir('again'))).toBe(false);
    });

    it('QEMU outlives a SIGKILLed gpuvm, and the next gpuvm finds it', async () => {
      vmIds.add('orphan');
      const script = join(root, 'start-orphan.mts');
      writeFileSync(
        script,
        [
          `import { Qemu } from ${JSON.stringify(pathToFileURL(QEMU_TS).href)};`,
          `const q = new Qemu(${JSON.stringify(opts())});`,
          `const r = await q.start(${JSON.stringify({ ...vmSpec('orphan', 1) })});`,
          `process.stdout.write(JSON.stringify(r) + '\\n');`,
          `setInterval(() => {}, 1 << 30);`,
        ].join('\n'),
      );
      const gpuvm = spawn(process.execPath, ['--import', 'tsx', script], { cwd: REPO, stdio: ['ignore', 'pipe', 'inherit'] });
      const exited = new Promise((r) => gpuvm.once('exit', r));
      try {
        const firstLine = await new Promise<string>((resolveLine, reject) => {
          let out = '';
          gpuvm.stdout!.on('data', (chunk: Buffer) => {
            out += chunk.toString();
            if (out.includes('\n')) resolveLine(out.split('\n')[0]!);
          });
          gpuvm.once('exit', (code) => reject(new Error(`start script exited with ${code}`)));
        });
        const { pid } = JSON.parse(firstLine) as { pid: number };
        gpuvm.kill('SIGKILL');
        await exited;
        await new Promise((r) => setTimeout(r, 300));
        const fresh = new Qemu(opts());
        expect(await fresh.status('orphan', { queryQmp: true })).toEqual({ state: 'alive', pid, qmpStatus: 'running' });
        expect(await fresh.start(vmSpec('orphan', 1))).toMatchObject({ pid, alreadyRunning: true });
        expect(await fresh.terminate('orphan')).toBe('quit');
      } finally {
        if (gpuvm.exitCode === null && gpuvm.signalCode === null) gpuvm.kill('SIGKILL');
        await exited;
      }
    });

    it('one QMP client at a time: a second one is kept waiting or refused', async () => {
      const qemu = new Qemu(opts());
      await qemu.start(vmSpec('single', 1));
      const first = await qemu.connect('single');
      openClients.push(first);
      const second = await rejected(qemu.connect('single', { timeoutMs: 500 }));
      expect(second.code).toBe('qmp');
      expect(second.message).toMatch(kind === 'real' ? /no greeting within 500 ms/ : /closed before greeting/);
      await first.close();
      // The real QEMU may still be busy with the abandoned second connection for a moment.
      const again = await until('QMP free again', async () => qemu.connect('single', { timeoutMs: 1_000 }).catch(() => undefined), 10_000);
      openClients.push(again);
      expect(await again.execute<{ status: string }>('query-status')).toMatchObject({ status: 'running' });
    });

    it('paths with commas are escaped for QEMU option strings; file-backed memory is accepted', async () => {
      const runRoot = join(root, 'run,with,commas');
      const memDir = join(root, 'mem,dir');
      mkdirSync(memDir, { recursive: true });
      const qemu = new Qemu(opts({ runRoot }));
      const started = await qemu.start({ ...vmSpec('commas', 1), hugepagesPath: memDir });
      expect(started.args).toContain(`unix:${join(root, 'run,,with,,commas', 'commas', 'qmp.sock')},server=on,wait=off`);
      expect(await qemu.status('commas', { queryQmp: true })).toMatchObject({ state: 'alive', qmpStatus: 'running' });
      expect(await qemu.terminate('commas')).toBe('quit');
      await qemu.cleanup('commas');
      vmIds.delete('commas');
    });

    it('powerdown: the stand-in guest powers off; a firmware-only real VM ignores it', async () => {
      const qemu = new Qemu(opts());
      await qemu.start(vmSpec('pwr', 1));
      const qmp = await qemu.connect('pwr');
      const events: string[] = [];
      qmp.onEvent((e) => events.push(e.event));
      await qmp.execute('system_powerdown');
      await qmp.waitForEvent('POWERDOWN', 2_000);
      if (kind === 'standin') {
        const shutdown = await qmp.waitForEvent('SHUTDOWN', 2_000);
        expect(shutdown.data).toEqual({ guest: true, reason: 'guest-shutdown' });
        await qmp.closed;
        await until('stand-in exit', async () => (await qemu.status('pwr')).state === 'gone', 3_000);
        expect(await qemu.terminate('pwr')).toBe('not-running');
        expect(await qemu.powerdown('pwr')).toBe('not-running');
      } else {
        await qmp.close();
        // No guest OS: nothing reacts to the power button.
        expect(await qemu.powerdown('pwr')).toBe('sent');
        await new Promise((r) => setTimeout(r, 500));
        expect((await qemu.status('pwr')).state).toBe('alive');
        expect(await qemu.terminate('pwr')).toBe('quit');
      }
      expect(events[0]).toBe('POWERDOWN');
    });

    it('a SIGKILLed QEMU is not running, and start brings up a new one', async () => {
      const qemu = new Qemu(opts());
      const { pid } = await qemu.start(vmSpec('killed', 1));
      process.kill(pid, 'SIGKILL');
      await until('status not running', async () => (await qemu.status('killed')).state === 'gone', 5_000);
      expect(existsSync(join(qemu.runDir('killed'), 'qemu.pid'))).toBe(true); // stale pidfile stays
      const again = await new Qemu(opts()).start(vmSpec('killed', 1));
      expect(again.alreadyRunning).toBe(false);
      expect(again.pid).not.toBe(pid);
    });

    it('a pidfile naming a live process that is not this VM (recycled pid) does not count', async () => {
      const qemu = new Qemu(opts());
      const dir = qemu.runDir('recycled');
      vmIds.add('recycled');
      rmSync(dir, { recursive: true, force: true });
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, 'qemu.pid'), `${process.pid}\n`);
      expect(await qemu.status('recycled')).toEqual({ state: 'gone', pid: null });
      expect(await qemu.terminate('recycled')).toBe('not-running'); // and nobody got signalled
      const started = await qemu.start(vmSpec('recycled', 1));
      expect(started.alreadyRunning).toBe(false);
      expect(started.pid).not.toBe(process.pid);
    });

    it('terminate falls back to SIGTERM when QMP is taken by another client', async () => {
      const qemu = new Qemu(opts());
      await qemu.start(vmSpec('busy', 1));
      openClients.push(await qemu.connect('busy')); // QEMU serves one QMP client at a time
      expect(await qemu.terminate('busy', { quitTimeoutMs: 500, termTimeoutMs: 5_000 })).toBe('sigterm');
      expect((await qemu.status('busy')).state).toBe('gone');
    });

    it('terminate falls back to SIGKILL when QEMU does not react (SIGSTOPped)', async () => {
      const qemu = new Qemu(opts());
      const { pid } = await qemu.start(vmSpec('hung', 1));
      process.kill(pid, 'SIGSTOP');
      expect(await qemu.status('hung')).toEqual({ state: 'alive', pid }); // stopped is still alive
      expect(await qemu.terminate('hung', { quitTimeoutMs: 300, termTimeoutMs: 300 })).toBe('sigkill');
      expect((await qemu.status('hung')).state).toBe('gone');
    });

    it('a command line QEMU rejects fails start with `exited` and the log', async () => {
      const qemu = new Qemu(opts({ standInDevice: 'no-such-device' }));
      const err = await rejected(qemu.start(vmSpec('bad', 1)));
      expect(err.code).toBe('exited');
      expect(err.vmId).toBe('bad');
      expect(err.message).toContain("'no-such-device'");
      expect(readFileSync(join(qemu.runDir('bad'), 'qemu.log'), 'utf8')).toContain('no-such-device');
      expect((await qemu.status('bad')).state).toBe('gone');
    });

    it('a live QEMU whose pidfile cannot be read is unknown: not stopped, not cleaned up, not started twice', async () => {
      const qemu = new Qemu(opts());
      const { pid } = await qemu.start(vmSpec('blind', 1));
      const dir = qemu.runDir('blind');
      const pidfile = join(dir, 'qemu.pid');
      // EISDIR stands for any failed read (EMFILE, EACCES, EIO…); it works as root too.
      rmSync(pidfile);
      mkdirSync(pidfile);
      try {
        const status = await qemu.status('blind');
        expect(status).toMatchObject({ state: 'unknown', pid: null });
        expect(status.error).toMatch(/EISDIR/);
        expect(await qemu.running()).toContainEqual(expect.objectContaining({ vmId: 'blind', state: 'unknown' }));
        const cleanup = await rejected(qemu.cleanup('blind'));
        expect(cleanup).toMatchObject({ code: 'unknown', retryable: true, vmId: 'blind' });
        expect(existsSync(join(dir, 'qmp.sock'))).toBe(true); // the run folder stays: QEMU is not orphaned
        expect((await rejected(qemu.terminate('blind', { quitTimeoutMs: 300, termTimeoutMs: 300 }))).code).toBe('unknown');
        expect((await rejected(qemu.start(vmSpec('blind', 1)))).code).toBe('unknown');
        expect((await rejected(qemu.powerdown('blind'))).code).toBe('unknown');
        expect(() => process.kill(pid, 0)).not.toThrow(); // nobody signalled it
      } finally {
        rmSync(pidfile, { recursive: true, force: true });
        writeFileSync(pidfile, `${pid}\n`);
      }
      expect(await qemu.status('blind')).toEqual({ state: 'alive', pid });
      const qmp = await qemu.connect('blind'); // still answering: it never saw any of this
      openClients.push(qmp);
      expect(await qmp.execute<{ status: string }>('query-status')).toMatchObject({ status: 'running' });
    });

    it('a live QEMU whose /proc/PID/stat cannot be read is unknown, with its pid', async () => {
      const qemu = new Qemu(opts());
      const { pid } = await qemu.start(vmSpec('nostat', 1));
      const procRoot = mkdtempSync(join(root, 'proc-'));
      mkdirSync(join(procRoot, String(pid), 'stat'), { recursive: true }); // EISDIR
      writeFileSync(join(procRoot, String(pid), 'cmdline'), readFileSync(`/proc/${pid}/cmdline`));
      const blind = new Qemu(opts({ procRoot }));
      const status = await blind.status('nostat');
      expect(status).toMatchObject({ state: 'unknown', pid });
      expect(status.error).toContain(join(procRoot, String(pid), 'stat'));
      expect(await blind.running()).toContainEqual({ vmId: 'nostat', state: 'unknown', pid, error: status.error });
      expect((await rejected(blind.cleanup('nostat'))).code).toBe('unknown');
      expect(existsSync(join(qemu.runDir('nostat'), 'qemu.pid'))).toBe(true);
      expect((await rejected(blind.terminate('nostat', { quitTimeoutMs: 300, termTimeoutMs: 300 }))).code).toBe('unknown');
      expect((await rejected(blind.start(vmSpec('nostat', 1)))).code).toBe('unknown');
      expect(await qemu.status('nostat')).toEqual({ state: 'alive', pid });
    });

    it('vfio-pci: every property gpuvm passes exists in this binary', async () => {
      const qemu = new Qemu(opts());
      const props = await qemu.vfioPciProperties();
      const args = buildQemuArgs(spec(8), { version: await qemu.version(), runDir: '/r', accel: 'tcg', forceNoMmap: true });
      for (const p of vfioPropertiesUsed(args)) expect(props.has(p)).toBe(true);
      if (kind === 'standin') {
        expect(props).toEqual(parseDeviceProperties(readFileSync(join(FIXTURES, 'vfio-pci-help-7.2.txt'), 'utf8')));
      }
      if (kind === 'real') {
        // QEMU accepts every property and only then fails to open the (absent) host device.
        const err = await rejected(qemu.start({ ...vmSpec('vfio', 1), gpuDevice: 'vfio-pci' }));
        expect(err.code).toBe('exited');
        expect(err.message).toMatch(/vfio \S*0000:17:00\.0: no such host device/);
        expect(err.message).not.toMatch(/Property .* not found/);
      }
    });
  });
}

lifecycleSuite('with the stand-in QEMU', 'standin');
(realQemuBin || process.env.CI ? describe : describe.skip)('real QEMU', () => {
  lifecycleSuite(`with the real qemu-system-x86_64 (${realQemuBin ?? 'missing'})`, 'real');
});

describe('Qemu against a binary that lacks a property', () => {
  let root: string;
  beforeAll(() => {
    root = mkdtempSync(join(tmpdir(), 'gpuvm-qemu-'));
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it('refuses vfio-pci when x-no-mmap is needed but missing; spawn errors are typed', async () => {
    const help = readFileSync(join(FIXTURES, 'vfio-pci-help-7.2.txt'), 'utf8').replace(/^ {2}x-no-mmap=.*\n/m, '');
    writeFileSync(join(root, 'help.txt'), help);
    // A node script, so it needs nothing from PATH.
    const bin = join(root, 'old-qemu');
    writeFileSync(
      bin,
      `#!${process.execPath}\n` +
        `const a = process.argv.slice(2);\n` +
        `if (a[0] === '--version') console.log('QEMU emulator version 7.2.0');\n` +
        `else if (a[0] === '-device' && a[1] === 'vfio-pci,help') process.stdout.write(${JSON.stringify(help)});\n` +
        `else process.exit(1);\n`,
    );
    chmodSync(bin, 0o755);
    const qemu = new Qemu({ bin, runRoot: join(root, 'run'), accel: 'tcg' });
    expect((await qemu.vfioPciProperties()).has('x-no-mmap')).toBe(false);
    const err = await rejected(qemu.start({ vmId: 'old', memoryMiB: 128, vcpus: 1, gpus: [GPUS[0]!], gpuDevice: 'vfio-pci' }));
    expect(err.code).toBe('bad-property');
    expect(err.message).toContain('x-no-mmap');
    expect(err.message).toContain(bin);
    expect(existsSync(join(root, 'run', 'old'))).toBe(false); // refused before anything was created

    const none = new Qemu({ bin: join(root, 'does-not-exist'), runRoot: join(root, 'run'), accel: 'tcg' });
    expect((await rejected(none.version())).code).toBe('spawn');
  });
});

// ---------------------------------------------------------------------------------------------
// Observation rules (DESIGN §3.2: alive / gone / unknown) against a stand-in /proc.

describe('QEMU observation: alive / gone / unknown', () => {
  let root: string;
  let procRoot: string;
  let qemu: Qemu;
  /** A real process: its pid is what a fake /proc describes, so a stray signal would show. */
  let bystander: ReturnType<typeof spawn>;
  let pid: number;
  const NORMAL_FLAGS = 0x400100;
  const KTHREAD_FLAGS = 0x208040;

  beforeAll(() => {
    root = mkdtempSync(join(tmpdir(), 'gpuvm-qemu-obs-'));
    procRoot = join(root, 'proc');
    bystander = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1 << 30)'], { stdio: 'ignore' });
    pid = bystander.pid!;
  });
  afterAll(() => {
    bystander.kill('SIGKILL');
    rmSync(root, { recursive: true, force: true });
  });
  afterEach(() => {
    rmSync(procRoot, { recursive: true, force: true });
    rmSync(join(root, 'run'), { recursive: true, force: true });
  });

  const vmDir = (vmId: string) => join(root, 'run', vmId);
  function pidfile(vmId: string, text: string | null): string {
    mkdirSync(vmDir(vmId), { recursive: true });
    const path = join(vmDir(vmId), 'qemu.pid');
    if (text !== null) writeFileSync(path, text);
    return path;
  }
  /** `<procRoot>/<pid>/{stat,cmdline}`; null leaves a file out, 'dir' makes it a directory (EISDIR). */
  function proc(p: number, stat: string | null | 'dir', cmdline: string | null | 'dir'): void {
    const dir = join(procRoot, String(p));
    mkdirSync(dir, { recursive: true });
    for (const [name, body] of [['stat', stat], ['cmdline', cmdline]] as const) {
      if (body === 'dir') mkdirSync(join(dir, name));
      else if (body !== null) writeFileSync(join(dir, name), body);
    }
  }
  const statLine = (p: number, state: string, flags = NORMAL_FLAGS) => `${p} (qemu-system-x86) ${state} 1 ${p} ${p} 0 -1 ${flags} 0 0 0 0 1 2 0 0 20 0 3 0\n`;
  const qemuCmdline = (vmId: string) => ['qemu-system-x86_64', '-name', `guest=${vmId}`, '-pidfile', join(vmDir(vmId), 'qemu.pid'), ''].join('\0');
  const make = () => new Qemu({ bin: '/nonexistent/qemu-system-x86_64', runRoot: join(root, 'run'), accel: 'tcg', procRoot, startTimeoutMs: 1_000 });
  const stillAlive = () => expect(bystander.exitCode === null && bystander.signalCode === null).toBe(true);

  beforeEach(() => {
    mkdirSync(procRoot, { recursive: true });
    qemu = make();
  });

  it('no pidfile, its folder present or absent → gone; cleanup removes the folder', async () => {
    expect(await qemu.status('nofolder')).toEqual({ state: 'gone', pid: null });
    pidfile('nopid', null);
    expect(await qemu.status('nopid')).toEqual({ state: 'gone', pid: null });
    expect(await qemu.terminate('nopid')).toBe('not-running');
    expect(await qemu.powerdown('nopid')).toBe('not-running');
    expect(await qemu.running()).toEqual([]);
    await qemu.cleanup('nopid');
    expect(existsSync(vmDir('nopid'))).toBe(false);
  });

  it('a pidfile that cannot be read, or holds garbage → unknown; nothing destructive proceeds', async () => {
    mkdirSync(pidfile('eisdir', null)); // EISDIR
    pidfile('garbage', 'not-a-pid\n');
    pidfile('empty', '');
    for (const vmId of ['eisdir', 'garbage', 'empty']) {
      const status = await qemu.status(vmId);
      expect(status, vmId).toMatchObject({ state: 'unknown', pid: null });
      expect(status.error, vmId).toMatch(vmId === 'eisdir' ? /EISDIR/ : /not a pid/);
      const cleanup = await rejected(qemu.cleanup(vmId));
      expect(cleanup).toMatchObject({ code: 'unknown', retryable: true });
      expect(cleanup.message).toMatch(/cannot tell whether QEMU .*is alive/);
      expect(existsSync(vmDir(vmId)), vmId).toBe(true);
      expect((await rejected(qemu.terminate(vmId))).code).toBe('unknown');
      expect((await rejected(qemu.powerdown(vmId))).code).toBe('unknown');
      expect((await rejected(qemu.connect(vmId))).code).toBe('unknown');
      // No second QEMU: refused before the binary (absent here) is even looked at.
      expect((await rejected(qemu.start({ vmId, memoryMiB: 128, vcpus: 1, gpus: [], gpuDevice: 'stand-in' }))).code).toBe('unknown');
    }
    expect((await qemu.running()).map((q) => [q.vmId, q.state])).toEqual([['eisdir', 'unknown'], ['empty', 'unknown'], ['garbage', 'unknown']]);
  });

  it('/proc/PID missing → gone', async () => {
    pidfile('dead', `${pid}\n`);
    expect(await qemu.status('dead')).toEqual({ state: 'gone', pid: null });
    expect(await qemu.terminate('dead')).toBe('not-running');
    stillAlive();
  });

  it('a zombie → gone (it has released its files)', async () => {
    pidfile('zombie', `${pid}\n`);
    proc(pid, statLine(pid, 'Z'), '');
    expect(await qemu.status('zombie')).toEqual({ state: 'gone', pid: null });
    proc(pid, null, null);
    writeFileSync(join(procRoot, String(pid), 'stat'), statLine(pid, 'X'));
    expect(await qemu.status('zombie')).toEqual({ state: 'gone', pid: null });
    await qemu.cleanup('zombie');
    stillAlive();
  });

  it('stat readable, cmdline empty → alive (exiting, may hold VFIO fds), and never signalled', async () => {
    pidfile('dying', `${pid}\n`);
    proc(pid, statLine(pid, 'D'), '');
    expect(await qemu.status('dying')).toEqual({ state: 'alive', pid });
    expect(await qemu.running()).toEqual([{ vmId: 'dying', state: 'alive', pid }]);
    expect((await rejected(qemu.cleanup('dying'))).code).toBe('still-running');
    expect((await rejected(qemu.start({ vmId: 'dying', memoryMiB: 128, vcpus: 1, gpus: [], gpuDevice: 'stand-in' }))).code).toBe('still-running');
    const stop = await rejected(qemu.terminate('dying', { quitTimeoutMs: 100, termTimeoutMs: 100 }));
    expect(stop).toMatchObject({ code: 'stop-timeout', retryable: true });
    expect(stop.message).toMatch(/not signalling/);
    stillAlive();
    expect(existsSync(vmDir('dying'))).toBe(true);
  });

  it('an exiting process that finishes while terminate waits → not-running', async () => {
    pidfile('exiting', `${pid}\n`);
    proc(pid, statLine(pid, 'R'), '');
    setTimeout(() => rmSync(join(procRoot, String(pid)), { recursive: true, force: true }), 150);
    expect(await qemu.terminate('exiting', { quitTimeoutMs: 2_000, termTimeoutMs: 2_000 })).toBe('not-running');
    stillAlive();
  });

  it('a kernel thread (empty cmdline, PF_KTHREAD) took the pid → gone', async () => {
    pidfile('kthread', `${pid}\n`);
    proc(pid, statLine(pid, 'S', KTHREAD_FLAGS), '');
    expect(await qemu.status('kthread')).toEqual({ state: 'gone', pid: null });
  });

  it('a non-empty cmdline without this pidfile → gone (pid recycled); with it → alive', async () => {
    pidfile('recycled', `${pid}\n`);
    proc(pid, statLine(pid, 'S'), qemuCmdline('someone-else'));
    expect(await qemu.status('recycled')).toEqual({ state: 'gone', pid: null });
    expect(await qemu.terminate('recycled')).toBe('not-running');
    pidfile('someone-else', `${pid}\n`);
    expect(await qemu.status('someone-else')).toEqual({ state: 'alive', pid });
    stillAlive();
  });

  it('stat or cmdline that cannot be read, or a stat line that cannot be parsed → unknown, with the pid', async () => {
    pidfile('x', `${pid}\n`);
    for (const [stat, cmdline, why] of [
      ['dir', qemuCmdline('x'), /stat: EISDIR/],
      [statLine(pid, 'S'), 'dir', /cmdline: EISDIR/],
      ['garbage without parentheses', qemuCmdline('x'), /unreadable \/proc stat line/],
    ] as const) {
      rmSync(procRoot, { recursive: true, force: true });
      proc(pid, stat, cmdline);
      const status = await qemu.status('x');
      expect(status).toMatchObject({ state: 'unknown', pid });
      expect(status.error).toMatch(why);
      expect((await rejected(qemu.terminate('x', { quitTimeoutMs: 100, termTimeoutMs: 100 }))).code).toBe('unknown');
      expect((await rejected(qemu.cleanup('x'))).code).toBe('unknown');
    }
    stillAlive();
    expect(existsSync(vmDir('x'))).toBe(true);
  });

  it('running() keeps alive and unknown VMs, omits gone ones and stray files', async () => {
    pidfile('a-alive', `${pid}\n`);
    proc(pid, statLine(pid, 'S'), qemuCmdline('a-alive'));
    pidfile('b-gone', null);
    mkdirSync(pidfile('c-unknown', null));
    writeFileSync(join(root, 'run', 'd-file'), 'not a run folder');
    const found = await qemu.running();
    expect(found.map((q) => [q.vmId, q.state, q.pid])).toEqual([['a-alive', 'alive', pid], ['c-unknown', 'unknown', null]]);
  });
});
