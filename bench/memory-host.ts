/**
 * An in-memory B200 host for the benchmarks: the adapters the engine calls (fmpm, nvidia-smi,
 * sysfs, QEMU) keep real state — which partitions are active, which driver each PCI function is
 * on, which VMs have a QEMU "process" — but do no I/O, so a lifecycle measures orchestration only.
 *
 * The board's facts (GPU addresses, module ids, IOMMU groups and their second function, BAR
 * sizes, the 15-partition table of DESIGN §2.1, what nvidia-smi reports) are not restated here:
 * they are taken once per process from a simulated host (src/host/sim/sim-host.ts) built in a
 * temporary folder and read through the real adapters, then the folder is removed.
 *
 * QEMU "exits" the moment it gets system_powerdown, as a guest that honours the power button at
 * once would; nothing else ends it except terminate().
 */
import { mkdtempSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HostFence } from '../src/host/fence.ts';
import { Fmpm, FmpmError, FM_RETURN, type FmpmPartitionTable } from '../src/host/fmpm.ts';
import type { HostAdapters } from '../src/host/host.ts';
import { NvidiaSmi, type NvidiaSmiReport } from '../src/host/nvidia-smi.ts';
import { Qemu, QemuError, type QemuStatus, type QemuVmSpec, type RunningQemu } from '../src/host/qemu.ts';
import { createSimHost } from '../src/host/sim/sim-host.ts';
import { Sysfs, SysfsError, type BarRegion } from '../src/host/sysfs.ts';

/** The adapter methods the engine calls (handlers, registration, monitors); nothing else is needed. */
type EngineFmpm = Pick<Fmpm, 'list' | 'isActive' | 'activate' | 'deactivate' | 'setActivatedList'>;
type EngineNvidiaSmi = Pick<NvidiaSmi, 'query'>;
type EngineSysfs = Pick<Sysfs, 'driverOf' | 'iommuGroup' | 'barRegions' | 'vfioGroupReady' | 'bindGroupToVfio' | 'bindGroupToHost'>;
type EngineQemu = Pick<Qemu, 'start' | 'status' | 'running' | 'onExit' | 'powerdown' | 'terminate' | 'cleanup'>;

interface DeviceFacts {
  group: number;
  /** The driver the function is on when the host boots; a non-GPU function returns to it. */
  bootDriver: string;
  bars: BarRegion[];
}

/** What a B200 host shows gpuvm with no partition active, read once from the simulated host. */
export interface BoardFacts {
  table: FmpmPartitionTable;
  smi: NvidiaSmiReport;
  devices: Map<string, DeviceFacts>;
  groups: Map<number, string[]>;
}

let facts: Promise<BoardFacts> | null = null;

/** Builds a simulated B200 in a temp folder, reads it through the real adapters, removes it. */
export function boardFacts(): Promise<BoardFacts> {
  facts ??= (async () => {
    const root = await mkdtemp(join(tmpdir(), 'gpuvm-bench-board-'));
    try {
      const sim = await createSimHost({ root });
      const table = await new Fmpm({ bin: sim.fmpmBin }).list();
      const smi = await new NvidiaSmi({ bin: sim.nvidiaSmiBin }).query();
      const sysfs = new Sysfs({ root: sim.sysfsRoot });
      const devices = new Map<string, DeviceFacts>();
      const groups = new Map<number, string[]>();
      for (const gpu of sim.gpus) {
        const { group, devices: members } = await sysfs.iommuGroup(gpu.pciAddress);
        groups.set(group, members);
        for (const bdf of members) {
          const driver = await sysfs.driverOf(bdf);
          if (!driver) throw new Error(`simulated host: ${bdf} is on no driver at boot`);
          devices.set(bdf, { group, bootDriver: driver, bars: await sysfs.barRegions(bdf) });
        }
      }
      if (table.partitions.some((p) => p.isActive)) throw new Error('simulated host: a partition is active at boot');
      return { table, smi, devices, groups };
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  })();
  return facts;
}

/** Every adapter call, by `adapter.method`: how much host work a lifecycle asks for. */
export type CallCounts = Map<string, number>;

class MemoryFmpm implements EngineFmpm {
  readonly active = new Set<number>();
  constructor(
    private readonly board: BoardFacts,
    private readonly count: (what: string) => void,
  ) {}

  private modules(id: number): number[] {
    const p = this.board.table.partitions.find((x) => x.partitionId === id);
    if (!p) throw new FmpmError('bad-param', `fmpm (memory host): partition ${id} is not in the partition table`, { fmReturn: FM_RETURN.BADPARAM, partitionId: id });
    return p.gpus.map((g) => g.physicalId);
  }

  async list(): Promise<FmpmPartitionTable> {
    this.count('fmpm.list');
    return {
      ...this.board.table,
      partitions: this.board.table.partitions.map((p) => ({ ...p, isActive: this.active.has(p.partitionId), gpus: p.gpus.map((g) => ({ ...g })) })),
    };
  }

  async isActive(partitionId: number): Promise<boolean> {
    this.count('fmpm.isActive');
    this.modules(partitionId);
    return this.active.has(partitionId);
  }

  async activate(partitionId: number): Promise<'activated' | 'already-active'> {
    this.count('fmpm.activate');
    const mine = new Set(this.modules(partitionId));
    if (this.active.has(partitionId)) return 'already-active';
    // As Fabric Manager: a partition sharing a GPU with an active one cannot be activated.
    for (const other of this.active) {
      if (this.modules(other).some((m) => mine.has(m))) {
        throw new FmpmError('in-use', `fmpm (memory host) -a ${partitionId}: modules in use by active partition ${other}`, { fmReturn: FM_RETURN.IN_USE, partitionId });
      }
    }
    this.active.add(partitionId);
    return 'activated';
  }

  async deactivate(partitionId: number): Promise<'deactivated' | 'already-inactive'> {
    this.count('fmpm.deactivate');
    this.modules(partitionId);
    return this.active.delete(partitionId) ? 'deactivated' : 'already-inactive';
  }

  /** Fabric Manager never restarts here, so the guard never needs this; it replaces the set if called. */
  async setActivatedList(partitionIds: number[]): Promise<void> {
    this.count('fmpm.setActivatedList');
    for (const id of partitionIds) this.modules(id);
    this.active.clear();
    for (const id of partitionIds) this.active.add(id);
  }
}

class MemorySysfs implements EngineSysfs {
  /** PCI function → the driver it is bound to now. */
  readonly drivers = new Map<string, string | null>();
  constructor(
    private readonly board: BoardFacts,
    private readonly count: (what: string) => void,
  ) {
    for (const [bdf, d] of board.devices) this.drivers.set(bdf, d.bootDriver);
  }

  private device(pciAddress: string): DeviceFacts {
    const d = this.board.devices.get(pciAddress);
    if (!d) throw new SysfsError('ENODEV', pciAddress, `no PCI device ${pciAddress} on the memory host`);
    return d;
  }

  async driverOf(pciAddress: string): Promise<string | null> {
    this.count('sysfs.driverOf');
    this.device(pciAddress);
    return this.drivers.get(pciAddress) ?? null;
  }

  async iommuGroup(pciAddress: string): Promise<{ group: number; devices: string[] }> {
    this.count('sysfs.iommuGroup');
    const { group } = this.device(pciAddress);
    return { group, devices: [...this.board.groups.get(group)!] };
  }

  async barRegions(pciAddress: string): Promise<BarRegion[]> {
    this.count('sysfs.barRegions');
    return this.device(pciAddress).bars.map((b) => ({ ...b }));
  }

  /** /dev/vfio/<group> exists once every function of the group is on vfio-pci. */
  async vfioGroupReady(group: number): Promise<boolean> {
    this.count('sysfs.vfioGroupReady');
    const members = this.board.groups.get(group);
    return members !== undefined && members.every((bdf) => this.drivers.get(bdf) === 'vfio-pci');
  }

  async bindGroupToVfio(pciAddress: string): Promise<{ group: number; changed: string[] }> {
    this.count('sysfs.bindGroupToVfio');
    const { group } = this.device(pciAddress);
    const changed: string[] = [];
    for (const bdf of this.board.groups.get(group)!) {
      if (this.drivers.get(bdf) !== 'vfio-pci') {
        this.drivers.set(bdf, 'vfio-pci');
        changed.push(bdf);
      }
    }
    return { group, changed };
  }

  /** The GPU goes to the host driver; the other functions of its group back to their own. */
  async bindGroupToHost(pciAddress: string, hostDriver: string): Promise<{ group: number; changed: string[] }> {
    this.count('sysfs.bindGroupToHost');
    const { group } = this.device(pciAddress);
    const changed: string[] = [];
    for (const bdf of this.board.groups.get(group)!) {
      const want = bdf === pciAddress ? hostDriver : this.board.devices.get(bdf)!.bootDriver;
      if (this.drivers.get(bdf) !== want) {
        this.drivers.set(bdf, want);
        changed.push(bdf);
      }
    }
    return { group, changed };
  }
}

class MemoryNvidiaSmi implements EngineNvidiaSmi {
  constructor(
    private readonly board: BoardFacts,
    private readonly sysfs: MemorySysfs,
    private readonly fmpm: MemoryFmpm,
    private readonly count: (what: string) => void,
  ) {}

  /** Like the real tool: only GPUs on nvidia; fabric Completed/Success where the module's partition is active. */
  async query(): Promise<NvidiaSmiReport> {
    this.count('nvidiaSmi.query');
    const activeModules = new Set<number>();
    for (const p of this.board.table.partitions) if (this.fmpm.active.has(p.partitionId)) for (const g of p.gpus) activeModules.add(g.physicalId);
    return {
      ...this.board.smi,
      gpus: this.board.smi.gpus
        .filter((g) => this.sysfs.drivers.get(g.pciAddress) === 'nvidia')
        .map((g) => ({ ...g, fabric: g.moduleId !== null && activeModules.has(g.moduleId) ? { state: 'Completed', status: 'Success' } : g.fabric })),
    };
  }
}

class MemoryQemu implements EngineQemu {
  /** VM id → its QEMU "process". */
  readonly processes = new Map<string, { pid: number; spec: QemuVmSpec }>();
  private nextPid = 100_000;
  private readonly exitListeners: ((vmId: string) => void)[] = [];
  constructor(
    private readonly sysfs: MemorySysfs,
    private readonly count: (what: string) => void,
  ) {}

  async start(spec: QemuVmSpec): Promise<{ pid: number; alreadyRunning: boolean; args: string[] }> {
    this.count('qemu.start');
    const live = this.processes.get(spec.vmId);
    if (live) return { pid: live.pid, alreadyRunning: true, args: [] };
    // QEMU cannot open a GPU whose group is not on vfio-pci (only checked for real passthrough).
    if (spec.gpuDevice === 'vfio-pci') {
      const off = spec.gpus.find((g) => this.sysfs.drivers.get(g) !== 'vfio-pci');
      if (off) throw new QemuError('exited', `VM ${spec.vmId}: ${off} is not on vfio-pci`, spec.vmId);
    }
    const pid = this.nextPid++;
    this.processes.set(spec.vmId, { pid, spec });
    return { pid, alreadyRunning: false, args: [] };
  }

  async status(vmId: string): Promise<QemuStatus> {
    this.count('qemu.status');
    const live = this.processes.get(vmId);
    return live ? { state: 'alive', pid: live.pid } : { state: 'gone', pid: null };
  }

  /** As for a child process: told of an exit once it has happened (on the next turn of the event loop). */
  onExit(listener: (vmId: string) => void): void {
    this.exitListeners.push(listener);
  }

  private exited(vmId: string): void {
    setImmediate(() => {
      for (const listener of this.exitListeners) listener(vmId);
    });
  }

  /** Every live QEMU, as the reconciler asks. */
  async running(): Promise<RunningQemu[]> {
    this.count('qemu.running');
    return [...this.processes].map(([vmId, p]): RunningQemu => ({ vmId, state: 'alive', pid: p.pid })).sort((a, b) => a.vmId.localeCompare(b.vmId));
  }

  /** The guest honours the power button at once: the process is gone when this returns. */
  async powerdown(vmId: string): Promise<'sent' | 'not-running'> {
    this.count('qemu.powerdown');
    if (!this.processes.delete(vmId)) return 'not-running';
    this.exited(vmId);
    return 'sent';
  }

  async terminate(vmId: string): Promise<'not-running' | 'quit' | 'sigterm' | 'sigkill'> {
    this.count('qemu.terminate');
    if (!this.processes.delete(vmId)) return 'not-running';
    this.exited(vmId);
    return 'quit';
  }

  async cleanup(vmId: string): Promise<void> {
    this.count('qemu.cleanup');
    const live = this.processes.get(vmId);
    if (live) throw new QemuError('still-running', `VM ${vmId}: QEMU pid ${live.pid} still running; terminate it before cleanup`, vmId);
  }
}

export interface MemoryHost {
  adapters: HostAdapters;
  /** Partitions Fabric Manager has active now. */
  activePartitions: ReadonlySet<number>;
  /** PCI function → driver now. */
  drivers: ReadonlyMap<string, string | null>;
  /** VM ids with a live QEMU "process". */
  qemuProcesses: ReadonlyMap<string, { pid: number }>;
  calls: CallCounts;
}

export async function createMemoryHost(hostId: string): Promise<MemoryHost> {
  const board = await boardFacts();
  const calls: CallCounts = new Map();
  const count = (what: string) => calls.set(what, (calls.get(what) ?? 0) + 1);
  const fmpm = new MemoryFmpm(board, count);
  const sysfs = new MemorySysfs(board, count);
  const nvidiaSmi = new MemoryNvidiaSmi(board, sysfs, fmpm, count);
  const qemu = new MemoryQemu(sysfs, count);
  const adapters: HostAdapters = {
    hostId,
    simulated: true,
    // The adapter classes carry private fields, so a structurally equal object is not assignable:
    // these objects implement exactly the methods the engine calls (the Engine* picks above).
    fmpm: fmpm as unknown as Fmpm,
    nvidiaSmi: nvidiaSmi as unknown as NvidiaSmi,
    sysfs: sysfs as unknown as Sysfs,
    qemu: qemu as unknown as Qemu,
    gpuDevice: 'stand-in',
    hostDriver: 'nvidia',
    qemuDescription: 'in-memory QEMU (benchmark host): no process; exits at once on system_powerdown',
    // Nothing is read from here: the health monitor finds no kernel log and skips Xid lines.
    fsRoot: join(tmpdir(), 'gpuvm-bench-memory-host-has-no-files'),
    fabricManagerBin: 'nv-fabricmanager',
    // A real fence folder: the engine's host-side fencing costs what it costs on a host.
    fence: new HostFence(mkdtempSync(join(tmpdir(), `gpuvm-bench-fence-${hostId}-`))),
    vmDefaults: { imageDriverVersion: board.smi.driverVersion ?? undefined },
  };
  return { adapters, activePartitions: fmpm.active, drivers: sysfs.drivers, qemuProcesses: qemu.processes, calls };
}
