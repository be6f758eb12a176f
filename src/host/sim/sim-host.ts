/**
 * Builds a simulated HGX host (B200, B300, H100 or H200) in a folder and starts/stops its simulated kernel.
 *
 * The folder holds what a real host would show gpuvm: a sysfs tree (devices, drivers, IOMMU
 * groups, `driver` symlinks), `dev/vfio`, `bin/fmpm` / `bin/nvidia-smi` / `bin/nv-fabricmanager`
 * wrappers around the simulators, and the host files `gpuvm doctor` reads (host-files.ts). `host.json` describes the board once; everything else reads it and never writes it.
 * Module ids are a seeded shuffle of 1..8 against PCI order, as on real boards.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { chmod, mkdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { isPciAddress, parsePciAddress } from '../pci.ts';
import { layOutHostFiles } from './host-files.ts';
import { pidAlive } from './kernel.ts';
import { mulberry32 } from '../../seeded-random.ts';

export const SIM_BOARDS = ['b200', 'b300', 'h100', 'h200'] as const;
export type SimBoard = (typeof SIM_BOARDS)[number];

export interface SimHostOptions {
  root: string;
  hostId?: string;
  /** The HGX board the host presents (default 'b200'); an existing folder must hold the same one. */
  board?: SimBoard;
  /** Shuffles module ids against PCI order; the default is fixed so hosts are reproducible. */
  seed?: number;
}

export interface SimHostInfo {
  root: string;
  hostId: string;
  board: SimBoard;
  fmpmBin: string;
  nvidiaSmiBin: string;
  sysfsRoot: string;
  /** The host driver and Fabric Manager version the simulated host reports. */
  driverVersion: string;
  gpus: { pciAddress: string; moduleId: number; iommuGroup: number }[];
  partitions: { id: number; modules: number[] }[];
}

export class SimHostError extends Error {
  override name = 'SimHostError';
  constructor(
    readonly code: 'bad-host-json' | 'bad-board' | 'board-mismatch' | 'kernel-start-failed' | 'kernel-stop-failed',
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

const DEFAULT_HOST_ID = 'sim-b200';
const DEFAULT_SEED = 0x5eed_b200;
/** PCI addresses of the eight GPUs in the B200 write-up, in PCI order. */
const GPU_ADDRESSES = ['0000:17:00.0', '0000:3d:00.0', '0000:60:00.0', '0000:70:00.0', '0000:98:00.0', '0000:bb:00.0', '0000:dd:00.0', '0000:ed:00.0'];
/** IOMMU group numbers in the spread a real host shows (one per GPU; bridges take the gaps). */
const IOMMU_GROUPS = [21, 36, 51, 66, 81, 96, 111, 126];
/** The GPU whose IOMMU group also holds a second function, so group handling is exercised. */
const SHARED_GROUP_GPU = '0000:bb:00.0';
const SIBLING = { pciAddress: '0000:bb:00.1', vendor: '0x10de', device: '0x22e8', class: '0x040300', driver: 'snd_hda_intel' };
const DRIVERS = ['nvidia', 'vfio-pci', 'snd_hda_intel'];
const singles = (firstId: number) => [1, 2, 3, 4, 5, 6, 7, 8].map((m) => ({ id: firstId + m - 1, modules: [m] }));
/** DESIGN §2.1, B200/B300 default 8-GPU table. */
const BLACKWELL_PARTITIONS: { id: number; modules: number[] }[] = [
  { id: 1, modules: [1, 2, 3, 4, 5, 6, 7, 8] },
  { id: 2, modules: [1, 2, 3, 4] },
  { id: 3, modules: [5, 6, 7, 8] },
  { id: 4, modules: [1, 2] },
  { id: 5, modules: [3, 4] },
  { id: 6, modules: [5, 6] },
  { id: 7, modules: [7, 8] },
  ...singles(8),
];
/** DESIGN §2.1, H100/H200 default 8-GPU table: other ids, and pairs {1,3} {2,4} rather than neighbours. */
const HOPPER_PARTITIONS: { id: number; modules: number[] }[] = [
  { id: 0, modules: [1, 2, 3, 4, 5, 6, 7, 8] },
  { id: 1, modules: [1, 2, 3, 4] },
  { id: 2, modules: [5, 6, 7, 8] },
  { id: 3, modules: [1, 3] },
  { id: 4, modules: [2, 4] },
  { id: 5, modules: [5, 7] },
  { id: 6, modules: [6, 8] },
  ...singles(7),
];

const MiB = 1n << 20n;
const GiB = 1n << 30n;

interface BoardSpec {
  /** host.json's `board`, as the host config spells it. */
  name: 'B200' | 'B300' | 'H100' | 'H200';
  /** As nvidia-smi prints it. */
  productName: string;
  pciDeviceId: string;
  partitions: { id: number; modules: number[] }[];
  /** BAR0 (registers) and BAR2 (framebuffer aperture, nvidia-smi's BAR1); BAR4 is 32 MiB on all four. */
  bar0: bigint;
  bar2: bigint;
}

/**
 * Device ids: DESIGN §2.1, and 10de:2335 for the H200 (its nvidia-smi Device Id 0x233510DE).
 * BARs: H100 from fixtures/host-captures/h100-sxm-sysfs.txt, whose note gives H200 and B200 a
 * 256 GiB BAR2; B300 is assumed to match B200 (no capture).
 */
const BOARD_SPECS: Record<SimBoard, BoardSpec> = {
  b200: { name: 'B200', productName: 'NVIDIA B200', pciDeviceId: '0x2901', partitions: BLACKWELL_PARTITIONS, bar0: 64n * MiB, bar2: 256n * GiB },
  b300: { name: 'B300', productName: 'NVIDIA B300 SXM6 AC', pciDeviceId: '0x3182', partitions: BLACKWELL_PARTITIONS, bar0: 64n * MiB, bar2: 256n * GiB },
  h100: { name: 'H100', productName: 'NVIDIA H100 80GB HBM3', pciDeviceId: '0x2330', partitions: HOPPER_PARTITIONS, bar0: 16n * MiB, bar2: 128n * GiB },
  h200: { name: 'H200', productName: 'NVIDIA H200', pciDeviceId: '0x2335', partitions: HOPPER_PARTITIONS, bar0: 16n * MiB, bar2: 256n * GiB },
};
/** 64-bit prefetchable memory BAR, as the H100 capture shows. */
const BAR_FLAGS = 0x14220cn;
const BAR_FLAGS_NONPREFETCH = 0x40200n;

const SIM_DIR = path.dirname(fileURLToPath(import.meta.url));
const KERNEL_SCRIPT = path.join(SIM_DIR, 'kernel.ts');
const FMPM_SCRIPT = path.join(SIM_DIR, 'bin', 'fmpm.mjs');
const NVIDIA_SMI_SCRIPT = path.join(SIM_DIR, 'bin', 'nvidia-smi.mjs');
const NV_FABRICMANAGER_SCRIPT = path.join(SIM_DIR, 'bin', 'nv-fabricmanager.mjs');

const hostJsonSchema = z.object({
  hostId: z.string().min(1),
  // Written as the host config spells it ('B200'); a host.json from before boards existed is a B200.
  board: z
    .string()
    .transform((b) => b.toLowerCase())
    .pipe(z.enum(SIM_BOARDS, { error: `must be one of ${SIM_BOARDS.map((b) => b.toUpperCase()).join(', ')}` }))
    .default('b200'),
  driverVersion: z.string().regex(/^\d+\.\d+(\.\d+)?$/),
  gpus: z
    .array(
      z.object({
        pciAddress: z.string().refine(isPciAddress, 'not a PCI address'),
        moduleId: z.number().int().positive(),
        iommuGroup: z.number().int().nonnegative(),
      }),
    )
    .min(1),
  partitions: z.array(z.object({ id: z.number().int().nonnegative(), modules: z.array(z.number().int().positive()).min(1) })).min(1),
});


/** A seeded permutation of 1..8 that is never the identity (real boards never number in PCI order). */
function shuffledModules(random: () => number): number[] {
  for (;;) {
    const m = [1, 2, 3, 4, 5, 6, 7, 8];
    for (let i = m.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [m[i], m[j]] = [m[j]!, m[i]!];
    }
    if (m.some((v, i) => v !== i + 1)) return m;
  }
}

function hex(random: () => number, digits: number): string {
  let s = '';
  for (let i = 0; i < digits; i++) s += Math.floor(random() * 16).toString(16);
  return s;
}

// ── file helpers ─────────────────────────────────────────────────────────────
async function exists(p: string): Promise<boolean> {
  try {
    await fs.promises.lstat(p);
    return true;
  } catch {
    return false;
  }
}

async function writeAtomic(file: string, text: string, mode?: number): Promise<void> {
  const tmp = `${file}.${process.pid}.${Date.now()}.tmp`;
  await writeFile(tmp, text, mode === undefined ? undefined : { mode });
  if (mode !== undefined) await chmod(tmp, mode);
  await rename(tmp, file);
}

function resourceFile(bars: { index: number; start: bigint; size: bigint; flags: bigint }[]): string {
  const h = (v: bigint) => `0x${v.toString(16).padStart(16, '0')}`;
  const lines: string[] = [];
  for (let i = 0; i < 7; i++) {
    const bar = bars.find((b) => b.index === i);
    lines.push(bar ? `${h(bar.start)} ${h(bar.start + bar.size - 1n)} ${h(bar.flags)}` : `${h(0n)} ${h(0n)} ${h(0n)}`);
  }
  return `${lines.join('\n')}\n`;
}

/** BAR2 framebuffer, then BAR4 (32 MiB), then BAR0 registers; each GPU in its own 512 GiB window. */
function gpuBars(i: number, spec: BoardSpec): { index: number; start: bigint; size: bigint; flags: bigint }[] {
  const base = 0x2000_0000_0000n + BigInt(i) * 0x80_0000_0000n;
  return [
    { index: 2, start: base, size: spec.bar2, flags: BAR_FLAGS },
    { index: 4, start: base + spec.bar2, size: 32n * MiB, flags: BAR_FLAGS },
    { index: 0, start: base + spec.bar2 + 64n * MiB, size: spec.bar0, flags: BAR_FLAGS },
  ];
}

const shellQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/** The simulated tools make no TLS connections: an extra CA bundle would only slow every call's start. */
function wrapper(root: string, script: string): string {
  return `#!/bin/sh\n# gpuvm simulated host: written by sim-host.ts\nGPUVM_SIM_ROOT=${shellQuote(root)}\nexport GPUVM_SIM_ROOT\nunset NODE_EXTRA_CA_CERTS\nexec node ${shellQuote(script)} "$@"\n`;
}

interface DeviceSpec {
  pciAddress: string;
  vendor: string;
  device: string;
  class: string;
  driver: string;
  iommuGroup: number;
  resource: string;
}

async function buildSysfs(root: string, devices: DeviceSpec[]): Promise<void> {
  const sys = path.join(root, 'sys');
  const pci = path.join(sys, 'bus', 'pci');
  await rm(sys, { recursive: true, force: true });
  await rm(path.join(root, 'dev'), { recursive: true, force: true });
  await mkdir(path.join(pci, 'devices'), { recursive: true });
  await mkdir(path.join(root, 'dev', 'vfio'), { recursive: true });
  await writeFile(path.join(pci, 'drivers_probe'), '');
  for (const driver of DRIVERS) {
    const dir = path.join(pci, 'drivers', driver);
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'bind'), '');
    await writeFile(path.join(dir, 'unbind'), '');
  }
  for (const d of devices) {
    const bdf = parsePciAddress(d.pciAddress);
    const dir = path.join(pci, 'devices', bdf);
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'vendor'), `${d.vendor}\n`);
    await writeFile(path.join(dir, 'device'), `${d.device}\n`);
    await writeFile(path.join(dir, 'class'), `${d.class}\n`);
    await writeFile(path.join(dir, 'driver_override'), '(null)\n');
    await writeFile(path.join(dir, 'reset'), '');
    await writeFile(path.join(dir, 'resource'), d.resource);
    const groupDevices = path.join(sys, 'kernel', 'iommu_groups', String(d.iommuGroup), 'devices');
    await mkdir(groupDevices, { recursive: true });
    await symlink(path.join('..', '..', '..', '..', 'kernel', 'iommu_groups', String(d.iommuGroup)), path.join(dir, 'iommu_group'));
    await symlink(path.join('..', '..', '..', '..', 'bus', 'pci', 'devices', bdf), path.join(groupDevices, bdf));
    await symlink(path.join('..', '..', 'drivers', d.driver), path.join(dir, 'driver'));
    await symlink(path.join('..', '..', 'devices', bdf), path.join(pci, 'drivers', d.driver, bdf));
  }
}

async function writeWrappers(root: string): Promise<void> {
  const bin = path.join(root, 'bin');
  await mkdir(bin, { recursive: true });
  for (const [name, script] of [['fmpm', FMPM_SCRIPT], ['nvidia-smi', NVIDIA_SMI_SCRIPT], ['nv-fabricmanager', NV_FABRICMANAGER_SCRIPT]] as const) {
    const file = path.join(bin, name);
    const text = wrapper(root, script);
    const current = await readFile(file, 'utf8').catch(() => null);
    // Rewritten only when it differs (the project folder moved), so an existing host stays put.
    if (current !== text) await writeAtomic(file, text, 0o755);
  }
}

// ── public API ───────────────────────────────────────────────────────────────
export async function createSimHost(opts: SimHostOptions): Promise<SimHostInfo> {
  const root = path.resolve(opts.root);
  const hostFile = path.join(root, 'host.json');
  const board = opts.board ?? 'b200';
  if (!(SIM_BOARDS as readonly string[]).includes(board)) {
    throw new SimHostError('bad-board', `unknown simulated board ${JSON.stringify(board)}: expected one of ${SIM_BOARDS.join(', ')}`);
  }
  await mkdir(root, { recursive: true });
  if (await exists(hostFile)) {
    const existing = await loadSimHost(root);
    // A folder is one board for life: its sysfs, BARs and tables were laid out for that board.
    if (existing.board !== board) {
      throw new SimHostError(
        'board-mismatch',
        `simulated host ${root} is a ${existing.board.toUpperCase()} host, not the ${board.toUpperCase()} asked for; use another folder (or remove this one)`,
      );
    }
    await writeWrappers(root);
    // Hosts built before doctor's files existed get them; present files (and faults) stay.
    await layOutHostFiles(root, existing);
    return existing;
  }
  const spec = BOARD_SPECS[board];
  const hostId = opts.hostId ?? DEFAULT_HOST_ID;
  const random = mulberry32(opts.seed ?? DEFAULT_SEED);
  const modules = shuffledModules(random);
  const gpus = GPU_ADDRESSES.map((pciAddress, i) => ({
    pciAddress,
    moduleId: modules[i]!,
    uuid: `GPU-${hex(random, 8)}-${hex(random, 4)}-${hex(random, 4)}-${hex(random, 4)}-${hex(random, 12)}`,
    serial: `16529240${String(Math.floor(random() * 100_000)).padStart(5, '0')}`,
    iommuGroup: IOMMU_GROUPS[i]!,
  }));
  const devices: DeviceSpec[] = gpus.map((g, i) => ({
    pciAddress: g.pciAddress,
    vendor: '0x10de',
    device: spec.pciDeviceId,
    class: '0x030200',
    driver: 'nvidia',
    iommuGroup: g.iommuGroup,
    resource: resourceFile(gpuBars(i, spec)),
  }));
  const shared = gpus.find((g) => g.pciAddress === SHARED_GROUP_GPU)!;
  devices.push({
    ...SIBLING,
    iommuGroup: shared.iommuGroup,
    resource: resourceFile([{ index: 0, start: 0xe000_0000n + 0x4000n * BigInt(GPU_ADDRESSES.indexOf(SHARED_GROUP_GPU)), size: 16n * 1024n, flags: BAR_FLAGS_NONPREFETCH }]),
  });
  await buildSysfs(root, devices);
  await writeWrappers(root);
  const host = {
    hostId,
    board: spec.name,
    productName: spec.productName,
    pciVendorId: '0x10de',
    pciDeviceId: spec.pciDeviceId,
    driverVersion: '580.95.05',
    fabricManagerVersion: '580.95.05',
    kernelModule: 'open',
    gpus,
    partitions: spec.partitions,
  };
  await layOutHostFiles(root, { hostId, driverVersion: host.driverVersion });
  // Written last: its presence means the host is complete.
  await writeAtomic(hostFile, `${JSON.stringify(host, null, 2)}\n`);
  return loadSimHost(root);
}

export async function loadSimHost(root: string): Promise<SimHostInfo> {
  const abs = path.resolve(root);
  const hostFile = path.join(abs, 'host.json');
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(hostFile, 'utf8'));
  } catch (err) {
    throw new SimHostError('bad-host-json', `cannot read simulated host ${hostFile}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  const parsed = hostJsonSchema.safeParse(raw);
  if (!parsed.success) {
    throw new SimHostError('bad-host-json', `simulated host ${hostFile} is malformed: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  }
  const host = parsed.data;
  return {
    root: abs,
    hostId: host.hostId,
    board: host.board,
    fmpmBin: path.join(abs, 'bin', 'fmpm'),
    nvidiaSmiBin: path.join(abs, 'bin', 'nvidia-smi'),
    sysfsRoot: abs,
    driverVersion: host.driverVersion,
    gpus: host.gpus.map((g) => ({ pciAddress: g.pciAddress, moduleId: g.moduleId, iommuGroup: g.iommuGroup })),
    partitions: host.partitions.map((p) => ({ id: p.id, modules: [...p.modules] })),
  };
}

// ── the kernel process ───────────────────────────────────────────────────────

/**
 * Is `pid` this root's simulated kernel? Checked through /proc so a pid reused by some other
 * process after a crash is never signalled; without /proc, liveness is all we can know.
 */
function isKernelOf(pid: number, root: string): boolean {
  if (!Number.isInteger(pid) || pid <= 0 || !pidAlive(pid)) return false;
  let cmdline: string;
  try {
    cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return !fs.existsSync('/proc/self');
  }
  const args = cmdline.split('\0');
  return args.includes(KERNEL_SCRIPT) && args.includes(root);
}

async function readPid(root: string): Promise<number | null> {
  try {
    const pid = Number.parseInt(await readFile(path.join(root, 'kernel.pid'), 'utf8'), 10);
    return Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

async function tail(file: string, lines = 8): Promise<string> {
  const text = await readFile(file, 'utf8').catch(() => '');
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

const KERNEL_START_TIMEOUT_MS = 20_000;
const KERNEL_STOP_TIMEOUT_MS = 5_000;

export async function startSimKernel(root: string): Promise<{ pid: number; started: boolean }> {
  const abs = path.resolve(root);
  const running = await readPid(abs);
  if (running !== null && isKernelOf(running, abs)) return { pid: running, started: false };
  await rm(path.join(abs, 'kernel.pid'), { force: true });

  // A daemon, not a command: spawned detached and left running, so no tool timeout applies.
  const tsx = createRequire(import.meta.url).resolve('tsx');
  const logFile = path.join(abs, 'kernel.log');
  const out = fs.openSync(logFile, 'a');
  let child;
  try {
    child = spawn(process.execPath, ['--import', tsx, KERNEL_SCRIPT, abs], { detached: true, stdio: ['ignore', out, out], cwd: abs });
  } finally {
    fs.closeSync(out);
  }
  let exited: number | null = null;
  child.on('exit', (code, signal) => {
    exited = code ?? (signal ? 128 : 1);
  });
  child.on('error', () => {
    exited = 1;
  });
  child.unref();
  const pid = child.pid;
  const deadline = Date.now() + KERNEL_START_TIMEOUT_MS;
  while (pid !== undefined && exited === null && Date.now() < deadline) {
    if ((await readPid(abs)) === pid) return { pid, started: true };
    await sleep(20);
  }
  if (pid !== undefined && exited === null) process.kill(pid, 'SIGKILL');
  throw new SimHostError(
    'kernel-start-failed',
    `simulated kernel for ${abs} did not start (${exited !== null ? `exited with ${exited}` : `no ${path.join(abs, 'kernel.pid')} within ${KERNEL_START_TIMEOUT_MS} ms`}); ${logFile} ends:\n${await tail(logFile)}`,
  );
}

export async function stopSimKernel(root: string): Promise<void> {
  const abs = path.resolve(root);
  const pidFile = path.join(abs, 'kernel.pid');
  const pid = await readPid(abs);
  if (pid === null) return;
  if (!isKernelOf(pid, abs)) {
    await rm(pidFile, { force: true }); // stale: its kernel is gone
    return;
  }
  process.kill(pid, 'SIGTERM');
  const deadline = Date.now() + KERNEL_STOP_TIMEOUT_MS;
  while (pidAlive(pid) && Date.now() < deadline) await sleep(20);
  if (pidAlive(pid)) {
    process.kill(pid, 'SIGKILL');
    const killDeadline = Date.now() + KERNEL_STOP_TIMEOUT_MS;
    while (pidAlive(pid) && Date.now() < killDeadline) await sleep(20);
    if (pidAlive(pid)) throw new SimHostError('kernel-stop-failed', `simulated kernel pid ${pid} for ${abs} survived SIGKILL`);
  }
  await rm(pidFile, { force: true });
}

/** Merges per top-level key ("fmpm", "sysfs", "nvidiaSmi"); a null value removes that key. Atomic. */
export async function writeFaults(root: string, faults: Record<string, unknown>): Promise<void> {
  const file = path.join(path.resolve(root), 'faults.json');
  let current: Record<string, unknown> = {};
  try {
    const parsed: unknown = JSON.parse(await readFile(file, 'utf8'));
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) current = parsed as Record<string, unknown>;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  for (const [key, value] of Object.entries(faults)) {
    if (value === null || value === undefined) delete current[key];
    else current[key] = value;
  }
  await writeAtomic(file, `${JSON.stringify(current, null, 2)}\n`);
}

/** For tests and tools: whether this root's kernel runs now. */
export async function simKernelRunning(root: string): Promise<number | null> {
  const abs = path.resolve(root);
  const pid = await readPid(abs);
  return pid !== null && isKernelOf(pid, abs) ? pid : null;
}

/**
 * Simulates Fabric Manager restarting in resiliency mode: it forgets which partitions are active
 * and waits `timeoutMs` (60 s on a real host) for `fmpm --set-activated-list`, refusing other calls;
 * unanswered, it exits. `{ running: true }` brings back a Fabric Manager that exited.
 */
export async function restartFabricManager(root: string, opts: { timeoutMs?: number } = {}): Promise<void> {
  const file = path.join(path.resolve(root), 'fm', 'state.json');
  let state: Record<string, unknown> = { active: [] };
  try {
    state = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  state.active = [];
  delete state.exited;
  state.awaitingActivatedList = { since: Date.now(), timeoutMs: opts.timeoutMs ?? 60_000 };
  await mkdir(path.dirname(file), { recursive: true });
  await writeAtomic(file, `${JSON.stringify(state, null, 2)}\n`);
}
