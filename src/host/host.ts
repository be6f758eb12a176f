/**
 * The host gpuvm drives: its adapters and how to take its inventory. On the embedded default the
 * host is simulated — simulated `fmpm` and `nvidia-smi` executables, a sysfs folder with a
 * simulated kernel behind it, and QEMU with stand-in devices — but the adapters are the same code
 * a real host uses; only the binaries and the sysfs root differ.
 */
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { HostInventory } from '../../machines/index.ts';
import type { Logger } from '../log.ts';
import { HostFence } from './fence.ts';
import { boardOf } from './doctor.ts';
import { Fmpm } from './fmpm.ts';
import { NvidiaSmi } from './nvidia-smi.ts';
import { findQemuBinary, Qemu } from './qemu.ts';
import { createSimHost, startSimKernel, type SimBoard } from './sim/sim-host.ts';
import { Sysfs } from './sysfs.ts';

export interface HostAdapters {
  hostId: string;
  simulated: boolean;
  fmpm: Fmpm;
  nvidiaSmi: NvidiaSmi;
  sysfs: Sysfs;
  qemu: Qemu;
  /** 'stand-in' puts an emulated PCI device where the GPU would be (simulation only). */
  gpuDevice: 'vfio-pci' | 'stand-in';
  /** The driver GPUs rest on between tenants. */
  hostDriver: string;
  /** What the start-up log says about the QEMU in use. */
  qemuDescription: string;
  /** Where the host's /proc, /etc, /usr and /var are read from: '/' on a real host, the sim folder otherwise. */
  fsRoot: string;
  /** `nv-fabricmanager`, asked for its version by `gpuvm doctor`. */
  fabricManagerBin: string;
  /** Host-side fencing of non-idempotent actions (fence.ts): one folder per host, beside the QEMU run folders. */
  fence: HostFence;
  /** Host-wide QEMU settings every VM gets (hugepages, disk image, firmware). */
  vmDefaults: { hugepagesPath?: string; diskImage?: string; firmware?: string; imageDriverVersion?: string };
}

export interface SimulatedHostOptions {
  hostId: string;
  dataDir: string;
  qemuBin?: string;
  bindTimeoutMs: number;
  toolTimeoutMs: number;
  /** The board the simulated host presents (default 'b200'). */
  board?: SimBoard;
}

export const QEMU_STANDIN = fileURLToPath(new URL('./sim/bin/qemu-standin.mjs', import.meta.url));

export async function openSimulatedHost(opts: SimulatedHostOptions, log: Logger): Promise<HostAdapters> {
  const root = join(opts.dataDir, 'sim', opts.hostId);
  const sim = await createSimHost({ root, hostId: opts.hostId, board: opts.board });
  const kernel = await startSimKernel(root);
  log.info({ hostId: opts.hostId, board: sim.board, root, kernelPid: kernel.pid, started: kernel.started }, `simulated ${sim.board.toUpperCase()} host ready`);

  let qemuBin = opts.qemuBin ?? (await findQemuBinary());
  let qemuDescription: string;
  if (qemuBin) {
    qemuDescription = `real QEMU at ${qemuBin} with stand-in PCI devices in place of the GPUs (TCG)`;
  } else {
    qemuBin = QEMU_STANDIN;
    qemuDescription = 'qemu-system-x86_64 is not installed: using the QMP stand-in process (apt-get install qemu-system-x86 for the real one)';
    log.warn({ hostId: opts.hostId }, qemuDescription);
  }
  return {
    hostId: opts.hostId,
    simulated: true,
    fmpm: new Fmpm({ bin: sim.fmpmBin, timeoutMs: opts.toolTimeoutMs }),
    nvidiaSmi: new NvidiaSmi({ bin: sim.nvidiaSmiBin, timeoutMs: opts.toolTimeoutMs }),
    sysfs: new Sysfs({ root: sim.sysfsRoot, bindTimeoutMs: opts.bindTimeoutMs }),
    // The simulated host's QMP answers as fast as its tools: a hung one fails after the tool timeout.
    // Per host: several simulated hosts may share a data folder (--sim-hosts), and each lists only its own QEMUs.
    qemu: new Qemu({ bin: qemuBin, runRoot: join(opts.dataDir, 'run', opts.hostId), accel: 'tcg', qmpCommandTimeoutMs: opts.toolTimeoutMs }),
    gpuDevice: 'stand-in',
    hostDriver: 'nvidia',
    qemuDescription,
    fsRoot: root,
    fabricManagerBin: join(root, 'bin', 'nv-fabricmanager'),
    fence: new HostFence(join(opts.dataDir, 'fence', opts.hostId)),
    vmDefaults: { imageDriverVersion: sim.driverVersion },
  };
}

export type InventoryErrorCode =
  /** nvidia-smi: a GPU without a Module Id, or two GPUs with one. */
  | 'bad-module-map'
  /** nvidia-smi's mapping differs from the configured `expectedGpus`. */
  | 'unexpected-mapping'
  /** nvidia-smi reports another board than the configured `board`. */
  | 'board-mismatch'
  /** `fmpm -l`: no partitions, a partition of a size gpuvm cannot place, or one naming an unknown module. */
  | 'bad-partition-table'
  /** sysfs: a GPU's IOMMU group or BARs cannot be read. */
  | 'sysfs';

export class InventoryError extends Error {
  override name = 'InventoryError';
  constructor(
    readonly code: InventoryErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** One GPU as registration records it. BAR sizes are decimal strings: bigint does not go into JSON. */
export type InventoryGpu = {
  moduleId: number;
  pciAddress: string;
  iommuGroup: number;
  bars: { index: number; sizeBytes: string }[];
};

export type TakenInventory = Omit<HostInventory, 'gpus'> & { gpus: InventoryGpu[] };

/** The inventory, and the partitions `fmpm -l` showed active while it was taken (not part of the stored inventory). */
export type InventoryTaken = TakenInventory & { activePartitions: number[] };

export interface InventoryOptions {
  /** The module → PCI mapping the operator expects (host config `expectedGpus`): any difference is refused. */
  expectedGpus?: readonly { moduleId: number; pciAddress: string }[];
  /** The board the operator expects (host config `board`, e.g. 'H100'): nvidia-smi reporting another is refused. */
  expectedBoard?: string;
}

/** VM sizes gpuvm places (1, 2, 4 or 8 GPUs); a partition of another size could never be used. */
const PLACEABLE_SIZES = new Set([1, 2, 4, 8]);
/** `resource` lines 0–5 are the BARs; line 6 is the expansion ROM. */
const LAST_BAR_INDEX = 5;

const numeric = (a: number, b: number) => a - b;

/**
 * Takes the host's inventory while its GPUs rest on the host driver: module → PCI address from
 * nvidia-smi, the partition table from `fmpm -l` (never a built-in table: boards differ), and per
 * GPU its IOMMU group and BAR sizes from sysfs. Refuses an inconsistent host with a message that
 * names the problem.
 */
export async function takeInventory(host: HostAdapters, opts: InventoryOptions = {}): Promise<InventoryTaken> {
  const report = await host.nvidiaSmi.query();
  const table = await host.fmpm.list();
  const byModule = new Map<number, string>();
  for (const gpu of report.gpus) {
    if (gpu.moduleId === null) {
      throw new InventoryError('bad-module-map', `GPU ${gpu.pciAddress} reports no Module Id; is it bound to ${host.hostDriver}?`);
    }
    const seen = byModule.get(gpu.moduleId);
    if (seen) throw new InventoryError('bad-module-map', `two GPUs report Module Id ${gpu.moduleId}: ${seen} and ${gpu.pciAddress}`);
    byModule.set(gpu.moduleId, gpu.pciAddress);
  }
  const seenModules = () => [...byModule.keys()].sort(numeric).join(', ') || 'none';

  if (opts.expectedBoard !== undefined) {
    // Every GPU, not the first: a board reporting two products is not the configured one either.
    const want = opts.expectedBoard.toUpperCase();
    const names = [...new Set(report.gpus.map((g) => g.productName))];
    const wrong = names.filter((n) => boardOf(n) !== want);
    if (names.length === 0 || wrong.length > 0) {
      const seen = names.map((n) => `${n} (${boardOf(n) ?? 'unknown board'})`).join(', ') || 'no GPU';
      throw new InventoryError('board-mismatch', `host ${host.hostId} is configured as board ${want}, but nvidia-smi reports ${seen}`);
    }
  }

  if (opts.expectedGpus) {
    // Every difference at once: an operator fixing a swapped cable or a wrong config wants the whole picture.
    const differences: string[] = [];
    const expected = new Map(opts.expectedGpus.map((g) => [g.moduleId, g.pciAddress]));
    for (const [moduleId, want] of [...expected].sort((a, b) => a[0] - b[0])) {
      const got = byModule.get(moduleId);
      if (got === undefined) differences.push(`module ${moduleId} expected at ${want}, but no GPU on ${host.hostDriver} reports Module Id ${moduleId}`);
      else if (got !== want) differences.push(`module ${moduleId} expected at ${want}, but nvidia-smi reports it at ${got}`);
    }
    for (const [moduleId, got] of [...byModule].sort((a, b) => a[0] - b[0])) {
      if (!expected.has(moduleId)) differences.push(`nvidia-smi reports module ${moduleId} at ${got}, which expectedGpus does not list`);
    }
    if (differences.length > 0) {
      throw new InventoryError('unexpected-mapping', `host ${host.hostId}: the GPUs differ from expectedGpus: ${differences.join('; ')}`);
    }
  }

  if (table.partitions.length === 0) {
    throw new InventoryError('bad-partition-table', `fmpm -l lists no partitions on host ${host.hostId}: is Fabric Manager running in Shared NVSwitch mode (FABRIC_MODE=1)?`);
  }
  for (const p of table.partitions) {
    const modules = p.gpus.map((g) => g.physicalId);
    if (!PLACEABLE_SIZES.has(modules.length)) {
      throw new InventoryError('bad-partition-table', `partition ${p.partitionId} has ${modules.length} GPU(s) (modules ${modules.join(', ') || 'none'}); gpuvm places only 1, 2, 4 or 8`);
    }
    const repeated = modules.find((m, i) => modules.indexOf(m) !== i);
    if (repeated !== undefined) throw new InventoryError('bad-partition-table', `partition ${p.partitionId} names module ${repeated} twice`);
    for (const m of modules) {
      if (!byModule.has(m)) {
        throw new InventoryError(
          'bad-partition-table',
          `partition ${p.partitionId} names module ${m}, but no GPU on ${host.hostDriver} reports that Module Id (nvidia-smi saw ${seenModules()})`,
        );
      }
    }
  }

  const gpus: InventoryGpu[] = [];
  for (const [moduleId, pciAddress] of [...byModule].sort((a, b) => a[0] - b[0])) {
    try {
      const { group } = await host.sysfs.iommuGroup(pciAddress);
      const bars = (await host.sysfs.barRegions(pciAddress))
        .filter((r) => r.index <= LAST_BAR_INDEX)
        .map((r) => ({ index: r.index, sizeBytes: r.sizeBytes.toString() }));
      gpus.push({ moduleId, pciAddress, iommuGroup: group, bars });
    } catch (err) {
      throw new InventoryError('sysfs', `module ${moduleId} (GPU ${pciAddress}): ${(err as Error).message}`, { cause: err });
    }
  }
  return {
    board: report.gpus[0]?.productName ?? 'unknown',
    gpus,
    partitions: table.partitions.map((p) => ({ id: p.partitionId, modules: p.gpus.map((g) => g.physicalId).sort(numeric) })),
    activePartitions: table.partitions.filter((p) => p.isActive).map((p) => p.partitionId),
  };
}
