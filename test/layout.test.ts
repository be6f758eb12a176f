/**
 * Acceptance: on the simulated host, 1-, 2-, 4- and 8-GPU VMs get QEMU command lines whose
 * vfio/root-port layout follows the partition's modules in module order, each mapped to its own
 * PCI address. Module ids are shuffled against PCI order in the simulation, so a mapping that
 * followed PCI order (or the wrong module) fails here. The expected mapping is read from the
 * simulated host's own host.json, not from anything gpuvm recorded.
 */
import { readFile, readlink } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildQemuArgs, parseDeviceProperties, parseQemuVersion, vfioPropertiesUsed, type QemuVmSpec } from '../src/host/qemu.ts';
import { expectInvariantsAtRest } from './support/invariants.ts';
import { startTestService, waitUntil, type TestService } from './support/env.ts';

const here = (p: string) => fileURLToPath(new URL(p, import.meta.url));

interface SimHostJson {
  gpus: { pciAddress: string; moduleId: number }[];
  partitions: { id: number; modules: number[] }[];
}

interface StartQemuParams {
  vmId: string;
  memoryMiB: number;
  vcpus: number;
  gpus: { moduleId: number; pciAddress: string }[];
}

let t: TestService;
let hostJson: SimHostJson;
const simRoot = () => path.join(t.dataDir, 'sim', t.service.host.hostId);
const vmState = async (id: string) => (await t.service.vms.get(id)).state;
const until = (id: string, state: string, ms = 120_000) => waitUntil(`${id} to be ${state}`, async () => (await vmState(id)) === state, ms);

/** The values of every `flag` in argv, in order. */
function valuesOf(argv: string[], flag: string): string[] {
  return argv.flatMap((a, i) => (a === flag && i + 1 < argv.length ? [argv[i + 1]!] : []));
}

/** The partition's modules in module order, each with its PCI address — from host.json alone. */
function expectedGpus(partitionId: number): { moduleId: number; pciAddress: string }[] {
  const partition = hostJson.partitions.find((p) => p.id === partitionId);
  if (!partition) throw new Error(`host.json has no partition ${partitionId}`);
  return [...partition.modules]
    .sort((a, b) => a - b)
    .map((moduleId) => {
      const gpu = hostJson.gpus.find((g) => g.moduleId === moduleId);
      if (!gpu) throw new Error(`host.json has no GPU with module ${moduleId}`);
      return { moduleId, pciAddress: gpu.pciAddress };
    });
}

async function driverInSimSysfs(pciAddress: string): Promise<string> {
  return path.basename(await readlink(path.join(simRoot(), 'sys', 'bus', 'pci', 'devices', pciAddress, 'driver')));
}

describe('QEMU layout of 1-, 2-, 4- and 8-GPU VMs on the simulated host', () => {
  beforeAll(async () => {
    t = await startTestService();
    hostJson = JSON.parse(await readFile(path.join(simRoot(), 'host.json'), 'utf8')) as SimHostJson;
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('the simulation numbers modules out of PCI order (so the checks below can tell a wrong mapping)', () => {
    const byModule = [...hostJson.gpus].sort((a, b) => a.moduleId - b.moduleId).map((g) => g.pciAddress);
    const byPci = hostJson.gpus.map((g) => g.pciAddress).sort();
    expect(byModule).toHaveLength(8);
    expect(byModule).not.toEqual(byPci);
  });

  it.each([1, 2, 4, 8])('%i-GPU VM: gpuN behind rpN on pcie.0, gpuN = the N-th module of the partition at its own address', async (size) => {
    const { service } = t;
    const created = await service.vms.create({ gpus: size, name: `layout-${size}`, actor: 'test' });
    await until(created.id, 'running');
    const vm = await service.vms.get(created.id);
    const expected = expectedGpus(vm.partition_id);
    expect(expected).toHaveLength(size);

    // gpuvm's own records agree with host.json: the VM's GPUs in module order, at host.json's addresses.
    expect(vm.gpus).toEqual(expected);
    // …and the host agrees: exactly those GPUs moved to vfio-pci, every other one rests on nvidia.
    for (const g of hostJson.gpus) {
      const wanted = expected.some((e) => e.pciAddress === g.pciAddress) ? 'vfio-pci' : 'nvidia';
      expect(await driverInSimSysfs(g.pciAddress), `driver of ${g.pciAddress} (module ${g.moduleId})`).toBe(wanted);
    }

    // The running QEMU's command line, from /proc.
    const { pid, state } = await service.host.qemu.status(vm.id);
    expect(state).toBe('alive');
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter((a, i, all) => i < all.length - 1 || a !== '');
    const machine = valuesOf(argv, '-machine');
    expect(machine).toHaveLength(1);
    expect(machine[0]).toMatch(/^q35(,|$)/);
    const devices = valuesOf(argv, '-device');
    const rootPorts = devices.filter((d) => d.startsWith('pcie-root-port,'));
    const gpuDevices = devices.filter((d) => /(^|,)id=gpu\d+(,|$)/.test(d));
    expect(rootPorts).toHaveLength(size);
    expect(gpuDevices).toHaveLength(size);
    for (let i = 0; i < size; i++) {
      const rp = devices.findIndex((d) => new RegExp(`^pcie-root-port,id=rp${i},(.*,)?bus=pcie\\.0(,|$)`).test(d));
      const gpu = devices.findIndex((d) => new RegExp(`^[a-z][a-z0-9-]*,id=gpu${i},bus=rp${i},addr=0x0(,|$)`).test(d));
      expect(rp, `root port rp${i} on pcie.0`).toBeGreaterThanOrEqual(0);
      expect(gpu, `gpu${i} on rp${i}`).toBeGreaterThan(rp);
    }

    // What the startQemu effect handed the adapter: its GPUs are the partition's modules in module
    // order, and rebuilding the stand-in command line from these params reproduces argv exactly
    // (same VM, memory, vCPUs, defaults, GPU count). The stand-in line carries no host address,
    // so the address of gpuN is asserted on the vfio-pci line built from the same spec below.
    const effect = await service.db.kysely
      .selectFrom('effects')
      .select(['params'])
      .where('correlation_id', '=', vm.id)
      .where('type', '=', 'startQemu')
      .executeTakeFirstOrThrow();
    const params = effect.params as unknown as StartQemuParams;
    expect(params.gpus).toEqual(expected);
    const spec: QemuVmSpec = {
      vmId: vm.id,
      memoryMiB: params.memoryMiB,
      vcpus: params.vcpus,
      gpus: params.gpus.map((g) => g.pciAddress),
      gpuDevice: 'stand-in',
      ...service.host.vmDefaults,
    };
    const version = await service.host.qemu.version();
    const standIn = buildQemuArgs(spec, { version, runDir: service.host.qemu.runDir(vm.id), accel: 'tcg' });
    expect(argv.slice(argv.indexOf('-name'))).toEqual(standIn);

    // The real-host command line for the same spec: vfio-pci with module k's address behind rpN, in
    // module order, and x-no-mmap=true because QEMU 7.2 is older than 10.1.
    const qemu72 = parseQemuVersion(await readFile(here('./fixtures/qemu/version-7.2.txt'), 'utf8'));
    const real = buildQemuArgs({ ...spec, gpuDevice: 'vfio-pci' }, { version: qemu72, runDir: service.host.qemu.runDir(vm.id), accel: 'kvm' });
    const vfio = valuesOf(real, '-device').filter((d) => d.startsWith('vfio-pci,'));
    expect(vfio).toEqual(expected.map((g, i) => `vfio-pci,host=${g.pciAddress},id=gpu${i},bus=rp${i},addr=0x0,x-no-mmap=true`));
    const realDevices = valuesOf(real, '-device');
    for (let i = 0; i < size; i++) {
      expect(realDevices.indexOf(vfio[i]!)).toBeGreaterThan(realDevices.findIndex((d) => d.startsWith(`pcie-root-port,id=rp${i},`)));
    }
    // Every vfio-pci property gpuvm sets exists in QEMU 7.2's vfio-pci.
    const props = parseDeviceProperties(await readFile(here('./fixtures/qemu/vfio-pci-help-7.2.txt'), 'utf8'));
    for (const p of vfioPropertiesUsed(real)) expect(props.has(p), `vfio-pci property ${p}`).toBe(true);

    // The topology QEMU built (real QEMU or the stand-in): gpuN's bus is rpN's, rpN sits on pcie.0.
    const qmp = await service.host.qemu.connect(vm.id, { timeoutMs: 10_000 });
    try {
      for (let i = 0; i < size; i++) {
        expect(await qmp.execute<string>('qom-get', { path: `/machine/peripheral/gpu${i}`, property: 'parent_bus' })).toBe(`/machine/peripheral/rp${i}/rp${i}`);
        expect(await qmp.execute<string>('qom-get', { path: `/machine/peripheral/rp${i}`, property: 'parent_bus' })).toBe('/machine/q35/pcie.0');
      }
    } finally {
      await qmp.close();
    }

    await service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    await expectInvariantsAtRest(service);
  });
});
