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
import { Fmpm } from './fmpm.ts';
import { NvidiaSmi } from './nvidia-smi.ts';
import { findQemuBinary, Qemu } from './qemu.ts';
import { createSimHost, startSimKernel } from './sim/sim-host.ts';
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
}

export interface SimulatedHostOptions {
  hostId: string;
  dataDir: string;
  qemuBin?: string;
  bindTimeoutMs: number;
  toolTimeoutMs: number;
}

export const QEMU_STANDIN = fileURLToPath(new URL('./sim/bin/qemu-standin.mjs', import.meta.url));

export async function openSimulatedHost(opts: SimulatedHostOptions, log: Logger): Promise<HostAdapters> {
  const root = join(opts.dataDir, 'sim', opts.hostId);
  const sim = await createSimHost({ root, hostId: opts.hostId });
  const kernel = await startSimKernel(root);
  log.info({ hostId: opts.hostId, root, kernelPid: kernel.pid, started: kernel.started }, 'simulated B200 host ready');

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
    qemu: new Qemu({ bin: qemuBin, runRoot: join(opts.dataDir, 'run'), accel: 'tcg' }),
    gpuDevice: 'stand-in',
    hostDriver: 'nvidia',
    qemuDescription,
  };
}

export class InventoryError extends Error {
  override name = 'InventoryError';
}

/**
 * Takes the host's inventory while its GPUs rest on the host driver: module → PCI address from
 * nvidia-smi, the partition table from `fmpm -l` (never a built-in table: boards differ).
 * Refuses an inconsistent host with a message that names the problem.
 */
export async function takeInventory(host: HostAdapters): Promise<HostInventory> {
  const report = await host.nvidiaSmi.query();
  const table = await host.fmpm.list();
  const byModule = new Map<number, string>();
  for (const gpu of report.gpus) {
    if (gpu.moduleId === null) throw new InventoryError(`GPU ${gpu.pciAddress} reports no Module Id; is it bound to ${host.hostDriver}?`);
    const seen = byModule.get(gpu.moduleId);
    if (seen) throw new InventoryError(`two GPUs report Module Id ${gpu.moduleId}: ${seen} and ${gpu.pciAddress}`);
    byModule.set(gpu.moduleId, gpu.pciAddress);
  }
  for (const p of table.partitions) {
    for (const g of p.gpus) {
      if (!byModule.has(g.physicalId)) {
        throw new InventoryError(
          `partition ${p.partitionId} names module ${g.physicalId}, but no GPU on ${host.hostDriver} reports that Module Id (nvidia-smi saw ${[...byModule.keys()].sort().join(', ') || 'none'})`,
        );
      }
    }
  }
  return {
    board: report.gpus[0]?.productName ?? 'unknown',
    gpus: [...byModule.entries()].sort((a, b) => a[0] - b[0]).map(([moduleId, pciAddress]) => ({ moduleId, pciAddress })),
    partitions: table.partitions.map((p) => ({ id: p.partitionId, modules: p.gpus.map((g) => g.physicalId).sort((a, b) => a - b) })),
  };
}
