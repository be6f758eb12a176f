/**
 * The host files `gpuvm doctor` reads, laid out in a simulated host's folder as a healthy HGX B200
 * host shows them (kernel command line, loaded modules, driver version, Fabric Manager config,
 * kernel log, NVLSM), and the named faults that break one prerequisite each.
 *
 * A fault changes the environment only — a file, or a faults.json key read by the simulated
 * binaries — never gpuvm's code path, so doctor (and the engine) meet it exactly as on a real host.
 */
import { chmod, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { parsePciAddress } from '../pci.ts';
import type { SimHostInfo } from './sim-host.ts';

export type HostFault =
  | 'no-iommu'
  | 'vfio-missing'
  | 'fabric-manager-down'
  | 'fabric-mode-0'
  | 'proprietary-module'
  | 'fabric-manager-version-mismatch'
  | 'no-nvlsm'
  | 'gpu-fabric-failed'
  | 'xid';

export const HOST_FAULTS: readonly HostFault[] = [
  'no-iommu',
  'vfio-missing',
  'fabric-manager-down',
  'fabric-mode-0',
  'proprietary-module',
  'fabric-manager-version-mismatch',
  'no-nvlsm',
  'gpu-fabric-failed',
  'xid',
];

export interface HostFaultOptions {
  /** gpu-fabric-failed, xid: the GPU (default: the first in PCI order). */
  pciAddress?: string;
  /** fabric-manager-version-mismatch: the version nv-fabricmanager reports (default 570.195.03). */
  version?: string;
}

export class HostFaultError extends Error {
  override name = 'HostFaultError';
  constructor(
    readonly code: 'unknown-fault' | 'unknown-gpu' | 'bad-version',
    message: string,
  ) {
    super(message);
  }
}

type HostFacts = Pick<SimHostInfo, 'hostId' | 'driverVersion'>;

/** Relative to the sim root; the same paths doctor reads under a real host's '/'. */
const FILES = {
  cmdline: 'proc/cmdline',
  modules: 'sys/module',
  nvidiaVersion: 'proc/driver/nvidia/version',
  fabricManagerCfg: 'usr/share/nvidia/nvswitch/fabricmanager.cfg',
  kernelLog: 'var/log/kern.log',
  nvlsm: 'opt/nvidia/nvlsm/sbin/nvlsm',
  modprobeDir: 'etc/modprobe.d',
} as const;

const LOADED_MODULES = ['vfio', 'vfio_iommu_type1', 'vfio_pci', 'nvidia'];
const KERNEL = '6.8.0-87-generic';
const DEFAULT_MISMATCHED_FM_VERSION = '570.195.03';

// ── file contents ────────────────────────────────────────────────────────────
function cmdline(iommu: boolean): string {
  const base = `BOOT_IMAGE=/boot/vmlinuz-${KERNEL} root=UUID=4f2c8e1a-6b1d-4c53-9a0e-3d7b5e9f0c21 ro quiet splash`;
  return `${base}${iommu ? ' intel_iommu=on iommu=pt' : ''} vt.handoff=7\n`;
}

/** /proc/driver/nvidia/version as driver 580.95.05 prints it (open or proprietary build). */
function nvidiaVersion(driverVersion: string, open: boolean): string {
  const first = open
    ? `NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  ${driverVersion}  Release Build  (dvs-builder@U22-I3-B17-02-5)  Tue Sep 23 09:55:41 UTC 2025`
    : `NVRM version: NVIDIA UNIX x86_64 Kernel Module  ${driverVersion}  Tue Sep 23 09:49:18 UTC 2025`;
  return `${first}\nGCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04) \n`;
}

/** The settings of the file the nvidia-fabricmanager package installs, in shared NVSwitch mode. */
function fabricManagerCfg(mode: number): string {
  return [
    '# NVIDIA Fabric Manager configuration file.',
    '# Note: This configuration file is read during Fabric Manager service startup. So, Fabric Manager ',
    '# service restart is required for new settings to take effect.',
    '',
    '# Description: Fabric Manager logging levels (0 off .. 4 INFO and above)',
    'LOG_LEVEL=4',
    '',
    '# Description: Filename for Fabric Manager logs',
    'LOG_FILE_NAME=/var/log/fabricmanager.log',
    '',
    '# Description: Append to an existing log file or overwrite the logs',
    'LOG_APPEND_TO_LOG=1',
    '',
    '# Description: Max size of log file (in MB)',
    'LOG_FILE_MAX_SIZE=1024',
    '',
    '# Description: Redirect all the logs to syslog instead of logging to file',
    'LOG_USE_SYSLOG=0',
    '',
    '# Description: daemonize Fabric Manager on start-up',
    'DAEMONIZE=1',
    '',
    '# Description: Network interface to listen for Global and Local Fabric Manager communication',
    'BIND_INTERFACE_IP=127.0.0.1',
    '',
    '# Description: Starting TCP port number for Global and Local Fabric Manager communication',
    'STARTING_TCP_PORT=16000',
    '',
    '# Description: Fabric Manager Operating Mode',
    '# Possible Values:',
    '#    0  - Start Fabric Manager in Bare metal or Full pass through virtualization mode',
    '#    1  - Start Fabric Manager in Shared NVSwitch multitenancy mode.',
    '#    2  - Start Fabric Manager in vGPU based multitenancy mode.',
    `FABRIC_MODE=${mode}`,
    '',
    '# Description: Restart Fabric Manager after exit. Applicable only in Shared NVSwitch or vGPU based multitenancy mode',
    'FABRIC_MODE_RESTART=0',
    '',
    '# Description: Filename to save Fabric Manager states (shared NVSwitch or vGPU multitenancy mode only)',
    'STATE_FILE_NAME=/tmp/fabricmanager.state',
    '',
    '# Description: Network interface to listen for Fabric Manager SDK/API to communicate with running FM instance.',
    'FM_CMD_BIND_INTERFACE=127.0.0.1',
    '',
    '# Description: TCP port number for Fabric Manager SDK/API to communicate with running FM instance.',
    'FM_CMD_PORT_NUMBER=6666',
    '',
    '# Description: Fabric Manager does not exit when facing failures',
    'FM_STAY_RESIDENT_ON_FAILURES=0',
    '',
    '# Description: Degraded mode options',
    'ACCESS_LINK_FAILURE_MODE=0',
    'TRUNK_LINK_FAILURE_MODE=0',
    'NVSWITCH_FAILURE_MODE=0',
    '',
    '# Description: Control running CUDA jobs behavior when Fabric Manager service is stopped or terminated',
    'ABORT_CUDA_JOBS_ON_FM_EXIT=1',
    '',
    '# Description: Absolute directory path containing Fabric Manager topology files',
    'TOPOLOGY_FILE_PATH=/usr/share/nvidia/nvswitch',
    '',
  ].join('\n');
}

function kernelLogBase(host: HostFacts): string {
  const at = (s: string) => `Oct 14 09:12:${s} ${host.hostId} kernel: `;
  return [
    `${at('01')}[    0.000000] Linux version ${KERNEL} (buildd@lcy02-amd64-011) (x86_64-linux-gnu-gcc-13 (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0) #88-Ubuntu SMP PREEMPT_DYNAMIC`,
    `${at('01')}[    0.000000] Command line: ${cmdline(true).trim()}`,
    `${at('01')}[    0.812345] DMAR: IOMMU enabled`,
    `${at('05')}[    4.102938] VFIO - User Level meta-driver version: 0.3`,
    `${at('06')}[    5.771204] nvidia: module license 'Dual MIT/GPL' taints kernel.`,
    `${at('06')}[    5.903311] NVRM: loading NVIDIA UNIX Open Kernel Module for x86_64  ${host.driverVersion}  Release Build  (dvs-builder@U22-I3-B17-02-5)  Tue Sep 23 09:55:41 UTC 2025`,
    `${at('09')}[    8.410057] nvidia-nvswitch: Probing device 0000:05:00.0, Vendor Id = 0x10de, Device Id = 0x2901`,
    '',
  ].join('\n');
}

const NVLSM_STUB = `#!/bin/sh
# gpuvm simulated host: stands where the nvlsm package installs NVLSM. Fabric Manager starts the
# real one on B200; on the simulated host nothing needs to run.
echo "nvlsm (gpuvm simulated host): not a real NVLink Subnet Manager" >&2
exit 1
`;

// ── helpers ──────────────────────────────────────────────────────────────────
async function writeIfMissing(file: string, text: string, mode?: number): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  try {
    await writeFile(file, text, { flag: 'wx', ...(mode === undefined ? {} : { mode }) });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    return;
  }
  if (mode !== undefined) await chmod(file, mode); // the umask may have trimmed it
}

async function overwrite(file: string, text: string, mode?: number): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.${Date.now()}.tmp`;
  await writeFile(tmp, text, mode === undefined ? undefined : { mode });
  if (mode !== undefined) await chmod(tmp, mode);
  await rename(tmp, file);
}

async function readHostJson(root: string): Promise<{ hostId: string; driverVersion: string; gpus: string[] }> {
  // Imported here, not at the top: sim-host.ts imports this module.
  const { loadSimHost } = await import('./sim-host.ts');
  const info = await loadSimHost(root);
  return { hostId: info.hostId, driverVersion: info.driverVersion, gpus: info.gpus.map((g) => g.pciAddress).sort() };
}

/** Sets (or, with null, removes) fields inside one top-level faults.json key, keeping the others. */
async function patchFaults(root: string, key: string, patch: Record<string, unknown>): Promise<void> {
  const { writeFaults } = await import('./sim-host.ts');
  let current: Record<string, unknown> = {};
  try {
    const all: unknown = JSON.parse(await readFile(path.join(root, 'faults.json'), 'utf8'));
    const entry = all && typeof all === 'object' ? (all as Record<string, unknown>)[key] : undefined;
    if (entry && typeof entry === 'object' && !Array.isArray(entry)) current = { ...(entry as Record<string, unknown>) };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete current[k];
    else current[k] = v;
  }
  await writeFaults(root, { [key]: Object.keys(current).length > 0 ? current : null });
}

const moduleDir = (name: string) => path.join(FILES.modules, name);

/** Host files removed by a fault (paths relative to the root), from faults.json `hostFiles.absent`. */
async function absentFiles(root: string): Promise<string[]> {
  try {
    const all = JSON.parse(await readFile(path.join(root, 'faults.json'), 'utf8')) as { hostFiles?: { absent?: unknown } } | null;
    const list = all?.hostFiles?.absent;
    return Array.isArray(list) ? list.filter((x): x is string => typeof x === 'string') : [];
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
}

/** Removes a host file (or module directory) and records it so a later layout leaves it absent. */
async function removeHostFile(root: string, rel: string): Promise<void> {
  const absent = new Set(await absentFiles(root));
  absent.add(rel);
  await patchFaults(root, 'hostFiles', { absent: [...absent].sort() });
  await rm(path.join(root, rel), { recursive: true, force: true });
}

function pickGpu(gpus: string[], requested: string | undefined): string {
  if (requested === undefined) return gpus[0]!;
  const pci = parsePciAddress(requested);
  if (!gpus.includes(pci)) throw new HostFaultError('unknown-gpu', `the simulated host has no GPU ${pci} (GPUs: ${gpus.join(', ')})`);
  return pci;
}

/** Syslog time of now, e.g. `Oct 14 09:12:01`. */
function syslogTime(d: Date): string {
  const month = d.toLocaleString('en-US', { month: 'short', timeZone: 'UTC' });
  return `${month} ${String(d.getUTCDate()).padStart(2, ' ')} ${d.toISOString().slice(11, 19)}`;
}

// ── public API ───────────────────────────────────────────────────────────────

/**
 * Writes the healthy host files that are missing; files already there (and injected faults) stay.
 * A file a fault removed is listed in faults.json `hostFiles.absent` and is not written back.
 */
export async function layOutHostFiles(root: string, info: HostFacts): Promise<void> {
  const absent = new Set(await absentFiles(root));
  const lay = async (rel: string, text: string, mode?: number) => {
    if (!absent.has(rel)) await writeIfMissing(path.join(root, rel), text, mode);
  };
  await lay(FILES.cmdline, cmdline(true));
  for (const m of LOADED_MODULES) {
    if (!absent.has(moduleDir(m))) await lay(path.join(moduleDir(m), 'initstate'), 'live\n');
  }
  await lay(FILES.nvidiaVersion, nvidiaVersion(info.driverVersion, true));
  await lay(FILES.fabricManagerCfg, fabricManagerCfg(1));
  await lay(FILES.kernelLog, kernelLogBase(info));
  await lay(FILES.nvlsm, NVLSM_STUB, 0o755);
  await mkdir(path.join(root, FILES.modprobeDir), { recursive: true });
}

export async function injectHostFault(root: string, fault: HostFault, opts: HostFaultOptions = {}): Promise<void> {
  const abs = path.resolve(root);
  const file = (rel: string) => path.join(abs, rel);
  const host = await readHostJson(abs);
  switch (fault) {
    case 'no-iommu':
      return overwrite(file(FILES.cmdline), cmdline(false));
    case 'vfio-missing':
      return removeHostFile(abs, moduleDir('vfio_pci'));
    case 'fabric-manager-down':
      return patchFaults(abs, 'fmpm', { down: true });
    case 'fabric-mode-0':
      return overwrite(file(FILES.fabricManagerCfg), fabricManagerCfg(0));
    case 'proprietary-module':
      return overwrite(file(FILES.nvidiaVersion), nvidiaVersion(host.driverVersion, false));
    case 'fabric-manager-version-mismatch': {
      const version = opts.version ?? DEFAULT_MISMATCHED_FM_VERSION;
      if (!/^\d+\.\d+(\.\d+)?$/.test(version)) throw new HostFaultError('bad-version', `not a driver version: ${JSON.stringify(version)}`);
      return patchFaults(abs, 'fabricManager', { version });
    }
    case 'no-nvlsm':
      return removeHostFile(abs, FILES.nvlsm);
    case 'gpu-fabric-failed': {
      const pci = pickGpu(host.gpus, opts.pciAddress);
      const current = await readFile(file('faults.json'), 'utf8').then(
        (t) => (JSON.parse(t) as { nvidiaSmi?: { fabricFailed?: unknown } }).nvidiaSmi?.fabricFailed,
        () => undefined,
      );
      const failed = new Set(Array.isArray(current) ? current.filter((x): x is string => typeof x === 'string') : []);
      failed.add(pci);
      return patchFaults(abs, 'nvidiaSmi', { fabricFailed: [...failed].sort() });
    }
    case 'xid': {
      const pci = pickGpu(host.gpus, opts.pciAddress);
      // The driver names the GPU without the function: (PCI:0000:17:00).
      const line = `${syslogTime(new Date())} ${host.hostId} kernel: [ 8675.309421] NVRM: Xid (PCI:${pci.slice(0, -2)}): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n`;
      await mkdir(path.dirname(file(FILES.kernelLog)), { recursive: true });
      return writeFile(file(FILES.kernelLog), line, { flag: 'a' });
    }
    default:
      throw new HostFaultError('unknown-fault', `unknown host fault ${JSON.stringify(fault)} (known: ${HOST_FAULTS.join(', ')})`);
  }
}

/** Undoes every host fault: healthy files rewritten, the fault keys of faults.json removed (other faults stay). */
export async function clearHostFaults(root: string): Promise<void> {
  const abs = path.resolve(root);
  const file = (rel: string) => path.join(abs, rel);
  const host = await readHostJson(abs);
  await patchFaults(abs, 'hostFiles', { absent: null });
  await overwrite(file(FILES.cmdline), cmdline(true));
  for (const m of LOADED_MODULES) await writeIfMissing(file(path.join(moduleDir(m), 'initstate')), 'live\n');
  await overwrite(file(FILES.nvidiaVersion), nvidiaVersion(host.driverVersion, true));
  await overwrite(file(FILES.fabricManagerCfg), fabricManagerCfg(1));
  await overwrite(file(FILES.kernelLog), kernelLogBase(host));
  await overwrite(file(FILES.nvlsm), NVLSM_STUB, 0o755);
  await patchFaults(abs, 'fmpm', { down: null });
  await patchFaults(abs, 'fabricManager', { version: null });
  await patchFaults(abs, 'nvidiaSmi', { fabricFailed: null });
}
