/**
 * `gpuvm doctor`: the host prerequisites of DESIGN §2.5, one check each, on a real host or on the
 * simulated one. Checks read files under `host.fsRoot` ('/' on a real host) and ask the same
 * adapters the engine uses; they never change the host. Each returns pass/warn/fail with what is
 * wrong and what to do about it; a check that throws becomes a fail carrying the error message.
 */
import { constants as fsConstants } from 'node:fs';
import { access, readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { FmpmError, type FmpmErrorCode } from './fmpm.ts';
import type { HostAdapters } from './host.ts';
import type { NvidiaSmiReport } from './nvidia-smi.ts';
import { parsePciAddress } from './pci.ts';
import { buildQemuArgs, needsNoMmap, vfioPropertiesUsed } from './qemu.ts';
import { isRetryableSpawnError, runTool } from './tool.ts';

export type CheckStatus = 'pass' | 'warn' | 'fail';

export interface CheckResult {
  id: string;
  title: string;
  status: CheckStatus;
  detail: string;
  fix: string | null;
}

export interface DoctorOptions {
  /** Also require `blacklist nvidia` in /etc/modprobe.d (hosts whose GPUs should boot on vfio-pci). */
  requireNvidiaBlacklist?: boolean;
  /** Absolute path of the kernel log; default `<fsRoot>/var/log/kern.log`. */
  kernelLog?: string;
}

/** The checks in the order they run and print. */
export const CHECKS = {
  iommu: 'IOMMU on the kernel command line',
  'vfio-modules': 'vfio kernel modules loaded',
  'nvidia-blacklist': 'nvidia driver blacklisting',
  'fabric-manager': 'Fabric Manager reachable (fmpm -l)',
  'fabric-mode': 'Fabric Manager in shared NVSwitch mode (FABRIC_MODE=1)',
  'open-kernel-module': 'NVIDIA open kernel module',
  'fabric-manager-version': 'Fabric Manager version = guest image driver version',
  nvlsm: 'NVLink Subnet Manager (NVLSM)',
  qemu: 'QEMU version, x-no-mmap and vfio-pci properties',
  'gpu-fabric': 'GPU fabric state (nvidia-smi)',
  xid: 'Xid errors in the kernel log',
} as const;

export type CheckId = keyof typeof CHECKS;

/** Where the files the checks read live on a Linux host (joined under fsRoot). */
export const HOST_FILES = {
  cmdline: '/proc/cmdline',
  modules: '/sys/module',
  modprobeDir: '/etc/modprobe.d',
  fabricManagerCfg: '/usr/share/nvidia/nvswitch/fabricmanager.cfg',
  nvidiaVersion: '/proc/driver/nvidia/version',
  /** Where the `nvlsm` package installs the binary Fabric Manager starts on B200. */
  nvlsm: '/opt/nvidia/nvlsm/sbin/nvlsm',
  kernelLog: '/var/log/kern.log',
} as const;

export const VFIO_MODULES = ['vfio', 'vfio_iommu_type1', 'vfio_pci'] as const;

const FM_VERSION_TIMEOUT_MS = 15_000;
/** QEMU releases from 10.1 map huge BARs quickly; before that gpuvm sets x-no-mmap=true. */
const NO_MMAP_FIXED_IN = '10.1';
const FM_SERVICE = 'nvidia-fabricmanager';

// ── parsing (pure) ───────────────────────────────────────────────────────────

export interface XidLine {
  /** sysfs form; function 0 when the log line gives none (the usual `PCI:0000:17:00`). */
  pciAddress: string;
  xid: number;
  line: string;
}

/**
 * `NVRM: Xid (PCI:0000:17:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.`
 * with or without a syslog/dmesg prefix, the `PCI:` tag, or the function number.
 */
const XID_PATTERN = /NVRM: Xid \((?:PCI:)?([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})(?:\.([0-7]))?\):\s*(\d+)/;

export function parseXidLines(text: string): XidLine[] {
  const found: XidLine[] = [];
  for (const raw of text.split('\n')) {
    const m = XID_PATTERN.exec(raw);
    if (!m) continue;
    const domain = parseInt(m[1]!, 16);
    if (domain > 0xffff) continue;
    const candidate = `${domain.toString(16).padStart(4, '0')}:${m[2]!.toLowerCase()}:${m[3]!.toLowerCase()}.${m[4] ?? '0'}`;
    found.push({ pciAddress: parsePciAddress(candidate), xid: Number(m[5]), line: raw.trim() });
  }
  return found;
}

/** `key=value` settings of fabricmanager.cfg, comments skipped; a later line wins, as FM reads it. */
export function parseFabricManagerCfg(text: string): Map<string, string> {
  const settings = new Map<string, string>();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const eq = line.indexOf('=');
    if (eq <= 0) continue;
    settings.set(line.slice(0, eq).trim(), line.slice(eq + 1).trim());
  }
  return settings;
}

/** `nv-fabricmanager --version` prints `Fabric Manager version is : 580.95.05`. */
export function parseFabricManagerVersion(text: string): string | null {
  return /Fabric Manager version is\s*:\s*(\d+(?:\.\d+)+)/.exec(text)?.[1] ?? null;
}

/** First line of /proc/driver/nvidia/version: open or proprietary module, and its version. */
export function parseNvidiaModuleVersion(text: string): { open: boolean; version: string | null; line: string } {
  const line = text.split('\n')[0]!.trim();
  const version = /Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)/.exec(line)?.[1] ?? null;
  return { open: /Open Kernel Module/.test(line), version, line };
}

/** "NVIDIA B200" → B200, "NVIDIA H100 80GB HBM3" → H100. */
export function boardOf(productName: string): string | null {
  return /\b(G?[A-Z]\d{2,3})\b/.exec(productName.replace(/^NVIDIA\s+/i, ''))?.[1]?.toUpperCase() ?? null;
}

/** Blackwell HGX boards: open kernel module only, NVLSM beside Fabric Manager. */
function isBlackwell(board: string): boolean {
  return /^G?B\d{3}$/.test(board);
}

// ── running ──────────────────────────────────────────────────────────────────

interface Context {
  host: HostAdapters;
  opts: DoctorOptions;
  file: (hostPath: string) => string;
  smi: () => Promise<NvidiaSmiReport>;
  board: () => Promise<{ board: string | null; why: string }>;
}

type Check = (ctx: Context) => Promise<Omit<CheckResult, 'id' | 'title'>>;

const pass = (detail: string) => ({ status: 'pass' as const, detail, fix: null });
const warn = (detail: string, fix: string | null) => ({ status: 'warn' as const, detail, fix });
const fail = (detail: string, fix: string | null) => ({ status: 'fail' as const, detail, fix });

const message = (err: unknown) => (err instanceof Error ? err.message : String(err));

async function readText(file: string): Promise<string | null> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return null;
    throw err;
  }
}

async function exists(file: string): Promise<boolean> {
  return access(file).then(
    () => true,
    () => false,
  );
}

const checks: Record<CheckId, Check> = {
  async iommu({ file }) {
    const cmdlineFile = file(HOST_FILES.cmdline);
    const text = await readText(cmdlineFile);
    if (text === null) return fail(`cannot read ${cmdlineFile}`, 'doctor needs /proc mounted to read the kernel command line');
    const args = new Set(text.trim().split(/\s+/));
    const enabled = ['intel_iommu=on', 'amd_iommu=on'].find((a) => args.has(a));
    const grub = 'in /etc/default/grub (GRUB_CMDLINE_LINUX_DEFAULT), then update-grub and reboot';
    if (!enabled) {
      return fail(`${cmdlineFile} has neither intel_iommu=on nor amd_iommu=on: the IOMMU is off, so vfio-pci cannot pass GPUs to VMs`, `add intel_iommu=on (Intel) or amd_iommu=on (AMD) and iommu=pt ${grub}`);
    }
    if (!args.has('iommu=pt')) {
      return warn(`${enabled} is set but iommu=pt is not: host DMA goes through IOMMU translation (slower host I/O)`, `add iommu=pt ${grub}`);
    }
    return pass(`${enabled} iommu=pt`);
  },

  async 'vfio-modules'({ file }) {
    const missing: string[] = [];
    for (const name of VFIO_MODULES) if (!(await exists(path.join(file(HOST_FILES.modules), name)))) missing.push(name);
    if (missing.length > 0) {
      return fail(
        `not loaded: ${missing.join(', ')} (no ${missing.map((m) => path.join(file(HOST_FILES.modules), m)).join(', ')})`,
        `modprobe -a ${VFIO_MODULES.join(' ')}; to load them at boot: printf '%s\\n' ${VFIO_MODULES.join(' ')} > /etc/modules-load.d/vfio.conf`,
      );
    }
    return pass(`${VFIO_MODULES.join(', ')} loaded`);
  },

  async 'nvidia-blacklist'({ file, opts }) {
    const dir = file(HOST_FILES.modprobeDir);
    const names = (await readdir(dir).catch(() => [] as string[])).filter((n) => n.endsWith('.conf')).sort();
    const blacklisting: string[] = [];
    for (const name of names) {
      const text = (await readText(path.join(dir, name))) ?? '';
      if (text.split('\n').some((l) => /^\s*blacklist\s+nvidia\s*(#.*)?$/.test(l))) blacklisting.push(path.join(dir, name));
    }
    if (!opts.requireNvidiaBlacklist) {
      const seen = blacklisting.length > 0 ? `; ${blacklisting.join(', ')} blacklists nvidia, so it must be loaded explicitly` : '';
      return pass(`not required: GPUs rest on the nvidia driver between tenants in this design (inventory, fabric state)${seen}`);
    }
    if (blacklisting.length === 0) {
      return fail(
        `no "blacklist nvidia" line in ${dir}/*.conf, but this host is configured to require it`,
        `printf 'blacklist nouveau\\nblacklist nvidia\\nblacklist nvidia_drm\\n' > /etc/modprobe.d/blacklist-nvidia.conf; update-initramfs -u; reboot`,
      );
    }
    return pass(`blacklisted in ${blacklisting.join(', ')}`);
  },

  async 'fabric-manager'({ host }) {
    try {
      const table = await host.fmpm.list();
      const active = table.partitions.filter((p) => p.isActive).map((p) => p.partitionId);
      return pass(`answers: ${table.partitions.length} partitions, ${active.length ? `active ${active.join(', ')}` : 'none active'}`);
    } catch (err) {
      if (!(err instanceof FmpmError)) throw err;
      return fail(err.message, err.code === 'spawn-failed' && err.retryable ? SHORT_OF_RESOURCES_FIX : fmpmFix(err.code));
    }
  },

  async 'fabric-mode'({ file }) {
    const cfg = file(HOST_FILES.fabricManagerCfg);
    const text = await readText(cfg);
    const restart = `systemctl restart ${FM_SERVICE} (Fabric Manager reads the file only at start)`;
    if (text === null) return fail(`${cfg} does not exist`, `install nvidia-fabricmanager, set FABRIC_MODE=1 in ${cfg}, then ${restart}`);
    const mode = parseFabricManagerCfg(text).get('FABRIC_MODE');
    if (mode === undefined) return fail(`${cfg} has no FABRIC_MODE setting (Fabric Manager then starts in mode 0, bare metal)`, `add FABRIC_MODE=1 to ${cfg}, then ${restart}`);
    if (mode !== '1') {
      const what = mode === '0' ? 'bare metal / full passthrough' : mode === '2' ? 'vGPU multitenancy' : 'unknown';
      return fail(`${cfg} has FABRIC_MODE=${mode} (${what}); shared NVSwitch multitenancy needs 1`, `set FABRIC_MODE=1 in ${cfg}, then ${restart}`);
    }
    return pass(`FABRIC_MODE=1 in ${cfg}`);
  },

  async 'open-kernel-module'({ file, board }) {
    const versionFile = file(HOST_FILES.nvidiaVersion);
    const { board: b, why } = await board();
    const required = b !== null && isBlackwell(b);
    const text = await readText(versionFile);
    const install = 'install the open kernel module of the same driver version (apt install nvidia-open, or nvidia-driver-<branch>-server-open) and reboot';
    if (text === null) {
      const detail = `${versionFile} does not exist: the nvidia kernel module is not loaded`;
      return required ? fail(detail, `load it (modprobe nvidia) or ${install}`) : warn(detail, 'modprobe nvidia');
    }
    const mod = parseNvidiaModuleVersion(text);
    const version = mod.version ? ` ${mod.version}` : '';
    if (mod.open) return pass(`open kernel module${version}${b ? ` (${b})` : ''}`);
    const detail = `proprietary kernel module${version}: "${mod.line}"`;
    if (required) return fail(`${detail}; ${b} works only with the open module (nvidia-open)`, install);
    if (b === null) return warn(`${detail}; board unknown (${why}), and B200/B300 need the open module`, install);
    return warn(`${detail}; fine on ${b}, but B200/B300 need the open module`, null);
  },

  async 'fabric-manager-version'({ host, smi }) {
    const bin = host.fabricManagerBin;
    const r = await runTool(bin, ['--version'], { timeoutMs: FM_VERSION_TIMEOUT_MS, killGraceMs: 2_000, maxBytes: 1024 * 1024 });
    const out = `${r.stdout}\n${r.stderr}`.trim();
    if (r.timedOut) return fail(`${bin} --version did not answer within ${FM_VERSION_TIMEOUT_MS} ms`, null);
    if (r.spawnError) {
      const fix = isRetryableSpawnError(r.spawnError)
        ? SHORT_OF_RESOURCES_FIX
        : `install nvidia-fabricmanager (it provides ${path.basename(bin)}) in the version of the host driver`;
      return fail(`cannot run ${bin} --version (${r.spawnError.code})`, fix);
    }
    if (r.exitCode === null) return fail(`${bin} --version was killed by ${r.signal ?? 'a signal'}${r.overflow ? ' (it printed more than 1 MiB)' : ''}`, `reinstall nvidia-fabricmanager`);
    const fm = parseFabricManagerVersion(out);
    if (r.exitCode !== 0 || fm === null) {
      return fail(`${bin} --version (exit ${r.exitCode}) printed no "Fabric Manager version is : X": ${JSON.stringify(out.slice(0, 200))}`, `reinstall nvidia-fabricmanager`);
    }
    // FM refuses to start unless it equals the host driver too; say so when nvidia-smi knows it.
    const hostDriver = await smi().then(
      (s) => s.driverVersion,
      () => null,
    );
    const driverNote = hostDriver && hostDriver !== fm ? `; the host driver is ${hostDriver}, and Fabric Manager must equal it too` : '';
    const image = host.vmDefaults.imageDriverVersion;
    if (!image) {
      return warn(
        `Fabric Manager ${fm}; no guest image driver version is configured, so gpuvm cannot refuse an image with another driver${driverNote}`,
        `configure the guest image's driver version (vm.imageDriverVersion in the host config file: the nvidia-open version installed in the image, which must be ${fm})`,
      );
    }
    if (image !== fm) {
      return fail(
        `Fabric Manager ${fm} ≠ guest image driver ${image}: CUDA in the guests will fail to initialize${driverNote}`,
        `install nvidia-fabricmanager ${image} with the same host driver (apt install nvidia-fabricmanager=${image}-1), or rebuild the guest image with nvidia-open ${fm}`,
      );
    }
    if (driverNote) return fail(`Fabric Manager ${fm} = guest image driver ${image}${driverNote}`, `install the host driver ${fm}, or nvidia-fabricmanager ${hostDriver}`);
    return pass(`Fabric Manager ${fm} = guest image driver ${image}`);
  },

  async nvlsm({ file, board }) {
    const bin = file(HOST_FILES.nvlsm);
    const present = await access(bin, fsConstants.X_OK).then(
      () => true,
      () => false,
    );
    const { board: b, why } = await board();
    const fix = `apt install nvlsm, then systemctl restart ${FM_SERVICE} (Fabric Manager starts NVLSM on B200/B300)`;
    if (present) return pass(`${bin} present`);
    if (b !== null && isBlackwell(b)) return fail(`${bin} is missing or not executable; ${b} needs NVLSM beside Fabric Manager`, fix);
    if (b === null) return warn(`${bin} is missing; board unknown (${why}), and B200/B300 need NVLSM`, fix);
    return pass(`not needed on ${b}`);
  },

  async qemu({ host }) {
    let version;
    try {
      version = await host.qemu.version();
    } catch (err) {
      return fail(message(err), 'install QEMU (apt install qemu-system-x86) or point gpuvm at one (GPUVM_QEMU)');
    }
    const v = `${version.major}.${version.minor}.${version.micro}`;
    const noMmap = needsNoMmap(version);
    const decision = noMmap
      ? `QEMU ${v} < ${NO_MMAP_FIXED_IN}: x-no-mmap=true will be set on every GPU`
      : `QEMU ${v} ≥ ${NO_MMAP_FIXED_IN}: GPU BARs are mmapped (no x-no-mmap)`;
    // The vfio-pci properties of the command line gpuvm would build with this QEMU.
    const args = buildQemuArgs(
      { vmId: 'doctor', memoryMiB: 1024, vcpus: 1, gpus: ['0000:00:00.0'], gpuDevice: 'vfio-pci' },
      { version, runDir: '/run/gpuvm-doctor', accel: 'kvm' },
    );
    const used = [...vfioPropertiesUsed(args)].sort();
    let available: Set<string>;
    try {
      available = await host.qemu.vfioPciProperties();
    } catch (err) {
      return fail(`${decision}; but cannot list vfio-pci properties: ${message(err)}`, 'install a QEMU built with vfio-pci (apt install qemu-system-x86)');
    }
    const missing = used.filter((p) => !available.has(p));
    if (missing.length > 0) {
      return fail(`${decision}; but this QEMU's vfio-pci has no ${missing.join(', ')}`, `install a QEMU whose vfio-pci has ${missing.join(', ')} (apt install qemu-system-x86)`);
    }
    const sim = host.gpuDevice === 'stand-in' ? '; simulated host: stand-in devices take the GPUs\' place' : '';
    return pass(`${decision}; vfio-pci has ${used.join(', ')}${sim}`);
  },

  async 'gpu-fabric'({ smi }) {
    let report: NvidiaSmiReport;
    try {
      report = await smi();
    } catch (err) {
      return fail(message(err), 'is the nvidia driver loaded? (lsmod | grep nvidia; dmesg | grep NVRM)');
    }
    if (report.gpus.length === 0) {
      return warn('nvidia-smi sees no GPU on the nvidia driver (all in VMs on vfio-pci?): fabric state not checked', null);
    }
    const bad: string[] = [];
    const odd: string[] = [];
    const counts = new Map<string, number>();
    for (const g of report.gpus) {
      const who = `GPU ${g.pciAddress}${g.moduleId !== null ? ` (module ${g.moduleId})` : ''}`;
      const f = g.fabric;
      if (!f || f.state === 'N/A' || f.state === 'Not Supported') {
        bad.push(`${who} reports no fabric state`);
        continue;
      }
      if (f.state === 'Failed' || (f.state === 'Completed' && f.status !== 'Success')) {
        bad.push(`${who}: fabric ${f.state} / ${f.status}`);
        continue;
      }
      if (f.state === 'Completed' || f.state === 'In Progress') {
        const key = f.state === 'Completed' ? 'Completed/Success' : 'In Progress (outside an active partition)';
        counts.set(key, (counts.get(key) ?? 0) + 1);
        continue;
      }
      odd.push(`${who}: fabric ${f.state} / ${f.status}`);
    }
    const summary = `${report.gpus.length} GPUs on nvidia: ${[...counts].map(([k, n]) => `${n} ${k}`).join(', ') || 'none healthy'}`;
    if (bad.length > 0) {
      const gpus = bad.map((b) => /^GPU (\S+)/.exec(b)![1]!);
      return fail(
        `${bad.join('; ')}${odd.length ? `; ${odd.join('; ')}` : ''}`,
        `keep VMs off ${gpus.join(', ')}: read Fabric → Health in nvidia-smi -q -i ${gpus[0]} and the Fabric Manager log (/var/log/fabricmanager.log); reset the GPU or restart ${FM_SERVICE} (reboot if that fails), then re-run gpuvm doctor`,
      );
    }
    if (odd.length > 0) return warn(`${summary}; ${odd.join('; ')}`, `is ${FM_SERVICE} running? (systemctl status ${FM_SERVICE})`);
    return pass(summary);
  },

  async xid({ file, opts }) {
    const log = opts.kernelLog ?? file(HOST_FILES.kernelLog);
    const text = await readText(log);
    if (text === null) {
      return warn(`${log} does not exist: Xid lines not checked`, 'name the kernel log with --kernel-log (e.g. /var/log/messages), or have rsyslog write kern.log');
    }
    const xids = parseXidLines(text);
    if (xids.length === 0) return pass(`no Xid lines in ${log}`);
    const byGpu = new Map<string, { xids: Set<number>; lines: number; last: string }>();
    for (const x of xids) {
      const e = byGpu.get(x.pciAddress) ?? { xids: new Set<number>(), lines: 0, last: '' };
      e.xids.add(x.xid);
      e.lines++;
      e.last = x.line;
      byGpu.set(x.pciAddress, e);
    }
    const parts = [...byGpu].map(([pci, e]) => `GPU ${pci}: Xid ${[...e.xids].join(', ')} (${e.lines} line${e.lines > 1 ? 's' : ''}; last: ${e.last})`);
    return fail(
      `${parts.join('; ')} in ${log}`,
      `keep VMs off ${[...byGpu.keys()].join(', ')} (gpuvm quarantines them); look the Xid up in NVIDIA's Xid catalog (79: fell off the bus → reboot the host), reset the GPU or reboot; the lines stay in ${log} until it rotates`,
    );
  },
};

const SHORT_OF_RESOURCES_FIX = 'this process ran short of file descriptors or memory: re-run, and raise its limits (ulimit -n, LimitNOFILE=) if it recurs';

function fmpmFix(code: FmpmErrorCode): string | null {
  switch (code) {
    case 'cannot-connect':
    case 'connection-not-valid':
      return `start Fabric Manager: systemctl start ${FM_SERVICE} (journalctl -u ${FM_SERVICE} says why it stopped)`;
    case 'timeout':
      return `Fabric Manager did not answer: systemctl status ${FM_SERVICE}; after a restart in resiliency mode it waits for the active partition list (gpuvm sends it)`;
    case 'not-configured':
    case 'uninitialized':
      return `Fabric Manager is still starting or not in shared NVSwitch mode: wait a minute and re-run; check FABRIC_MODE=1`;
    case 'spawn-failed':
      return 'install fmpm (the Fabric-Manager-Client sample tool) where gpuvm looks for it';
    case 'bad-output':
      return 'fmpm printed something gpuvm cannot read: use the fmpm 1.0.1 sample tool';
    default:
      return `systemctl status ${FM_SERVICE}; journalctl -u ${FM_SERVICE}`;
  }
}

function memo<T>(fn: () => Promise<T>): () => Promise<T> {
  let p: Promise<T> | undefined;
  return () => (p ??= fn());
}

export async function runDoctor(host: HostAdapters, opts: DoctorOptions = {}): Promise<CheckResult[]> {
  const smi = memo(() => host.nvidiaSmi.query());
  const ctx: Context = {
    host,
    opts,
    file: (hostPath) => path.join(host.fsRoot, hostPath),
    smi,
    board: memo(async () => {
      try {
        const names = [...new Set((await smi()).gpus.map((g) => g.productName))];
        if (names.length === 0) return { board: null, why: 'nvidia-smi sees no GPU on nvidia' };
        return { board: boardOf(names[0]!), why: names.join(', ') };
      } catch (err) {
        return { board: null, why: `nvidia-smi failed: ${message(err)}` };
      }
    }),
  };
  return Promise.all(
    (Object.keys(CHECKS) as CheckId[]).map(async (id): Promise<CheckResult> => {
      try {
        return { id, title: CHECKS[id], ...(await checks[id](ctx)) };
      } catch (err) {
        return { id, title: CHECKS[id], status: 'fail', detail: `check failed unexpectedly: ${message(err)}`, fix: null };
      }
    }),
  );
}
