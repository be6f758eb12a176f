/**
 * The host config file (`gpuvm serve --config FILE`): which binaries, folders and QEMU settings a
 * real HGX host uses. Parsed strictly — an unknown key is a typo that would otherwise silently
 * fall back to a default — and checked against the file system at start, so a wrong path is
 * refused before the first VM rather than at its QEMU start. Every error names the field.
 * Field-by-field reference: docs/real-host.md; a full example: examples/gpuvm-host.json.
 */
import { accessSync, constants as fsConstants, statSync, type Stats } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { dirname, isAbsolute, join } from 'node:path';
import { z } from 'zod';
import { HostFence } from './fence.ts';
import { Fmpm } from './fmpm.ts';
import type { HostAdapters } from './host.ts';
import { NvidiaSmi } from './nvidia-smi.ts';
import { parsePciAddress } from './pci.ts';
import { Qemu, LOG_NAME, PIDFILE_NAME, QMP_SOCKET_NAME } from './qemu.ts';
import { MAX_UNIX_SOCKET_PATH_BYTES } from './qmp.ts';
import { Sysfs } from './sysfs.ts';
import { HOST_ID_PATTERN } from '../config.ts';

export const BOARDS = ['B200', 'B300', 'H100', 'H200'] as const;
export type Board = (typeof BOARDS)[number];

export interface ExpectedGpu {
  moduleId: number;
  pciAddress: string;
}

/** The parsed, validated file, with every default filled in. */
export interface HostConfig {
  hostId: string;
  board: Board;
  binaries: { fmpm: string; nvidiaSmi: string; fabricManager: string; qemu: string };
  /** Passed to `fmpm --hostname`. */
  fabricManager: { address: string };
  /** The folder that holds `sys/` ('/' on a real host). */
  sysfsRoot: string;
  /** The folder that holds `proc/`, `etc/`, `usr/`, `var/` ('/' on a real host). */
  fsRoot: string;
  /** Per-VM QEMU pidfile, QMP socket and log live in `<runDir>/<vmId>/`. */
  runDir: string;
  qemu: { firmware?: string; forceNoMmap: boolean; accel: 'kvm' | 'tcg' };
  vm: {
    memoryMiB: number;
    vcpus: number;
    hugepages?: string;
    diskImage?: string;
    imageDriverVersion?: string;
    powerdownTimeoutMs: number;
  };
  /** When set, registration refuses a host whose nvidia-smi module → PCI mapping differs. */
  expectedGpus?: ExpectedGpu[];
}

export const HOST_CONFIG_DEFAULTS = {
  binaries: {
    fmpm: '/usr/bin/fmpm',
    nvidiaSmi: '/usr/bin/nvidia-smi',
    fabricManager: '/usr/bin/nv-fabricmanager',
    qemu: '/usr/bin/qemu-system-x86_64',
  },
  fabricManager: { address: '127.0.0.1:6666' },
  sysfsRoot: '/',
  fsRoot: '/',
  runDir: '/var/lib/gpuvm/run',
  qemu: { forceNoMmap: false, accel: 'kvm' },
  vm: { memoryMiB: 65_536, vcpus: 16, powerdownTimeoutMs: 30_000 },
} as const;

export type HostConfigErrorCode =
  /** The file cannot be read. */
  | 'unreadable'
  /** The file is not JSON. */
  | 'bad-json'
  /** A key the schema does not know (strict: typos are not ignored). */
  | 'unknown-key'
  /** Wrong type, out of range, bad format, duplicate. */
  | 'invalid'
  /** A configured path does not exist. */
  | 'missing'
  /** A binary that exists but cannot be executed, or a path of the wrong kind. */
  | 'not-executable'
  | 'not-a-file'
  | 'not-a-directory';

export class HostConfigError extends Error {
  override name = 'HostConfigError';
  /** Dotted path of the offending field (`binaries.fmpm`, `expectedGpus.2.pciAddress`); '' for the file as a whole. */
  readonly field: string;
  readonly code: HostConfigErrorCode;
  /** The config file, when the error came from loadHostConfig. */
  readonly file: string | undefined;
  /** The message without the field and file. */
  readonly detail: string;

  constructor(code: HostConfigErrorCode, field: string, detail: string, opts: { file?: string; cause?: unknown } = {}) {
    const where = opts.file === undefined ? '' : ` (in ${opts.file})`;
    super(`${field ? `${field}: ` : ''}${detail}${where}`, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.code = code;
    this.field = field;
    this.file = opts.file;
    this.detail = detail;
  }
}

// ── schema ───────────────────────────────────────────────────────────────────
const DRIVER_VERSION_PATTERN = /^\d+\.\d+(\.\d+)?$/;

const absolutePath = z
  .string()
  .min(1, 'must not be empty')
  .refine((p) => isAbsolute(p), 'must be an absolute path')
  .refine((p) => !/[\0\n]/.test(p), 'must not contain NUL or newline');

/** `fmpm --hostname` takes an IP address with an optional port: IPv4 `a.b.c.d[:port]` or `[v6][:port]`. */
export function isFabricManagerAddress(value: string): boolean {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+))(?::(\d{1,5}))?$/.exec(value);
  if (!m) return false;
  const ip = m[1] ?? m[2]!;
  // No IPv6 zone ids (`%eth0`): the Fmpm adapter, like the tool, takes a plain address.
  if (m[1] !== undefined ? isIP(ip) !== 6 || !/^[0-9A-Fa-f:.]+$/.test(ip) : isIP(ip) !== 4) return false;
  if (m[3] !== undefined) {
    const port = Number(m[3]);
    if (port < 1 || port > 65_535) return false;
  }
  return true;
}

const int = (min: number, max: number) =>
  z.number().int('must be a whole number').min(min, `must be at least ${min}`).max(max, `must be at most ${max}`);

const schema = z.strictObject({
  hostId: z.string().regex(HOST_ID_PATTERN, 'lower-case letters, digits and dashes, starting with a letter or digit, at most 63'),
  board: z.enum(BOARDS, { error: `must be one of ${BOARDS.join(', ')}` }),
  binaries: z
    .strictObject({
      fmpm: absolutePath.default(HOST_CONFIG_DEFAULTS.binaries.fmpm),
      nvidiaSmi: absolutePath.default(HOST_CONFIG_DEFAULTS.binaries.nvidiaSmi),
      fabricManager: absolutePath.default(HOST_CONFIG_DEFAULTS.binaries.fabricManager),
      qemu: absolutePath.default(HOST_CONFIG_DEFAULTS.binaries.qemu),
    })
    .prefault({}),
  fabricManager: z
    .strictObject({
      address: z
        .string()
        .refine(isFabricManagerAddress, 'must be an IP address with an optional port: 127.0.0.1:6666, 10.0.0.5 or [::1]:6666')
        .default(HOST_CONFIG_DEFAULTS.fabricManager.address),
    })
    .prefault({}),
  sysfsRoot: absolutePath.default(HOST_CONFIG_DEFAULTS.sysfsRoot),
  fsRoot: absolutePath.default(HOST_CONFIG_DEFAULTS.fsRoot),
  runDir: absolutePath.default(HOST_CONFIG_DEFAULTS.runDir),
  qemu: z
    .strictObject({
      firmware: absolutePath.optional(),
      forceNoMmap: z.boolean().default(HOST_CONFIG_DEFAULTS.qemu.forceNoMmap),
      accel: z.enum(['kvm', 'tcg'], { error: 'must be "kvm" or "tcg"' }).default(HOST_CONFIG_DEFAULTS.qemu.accel),
    })
    .prefault({}),
  vm: z
    .strictObject({
      // Bounds as buildQemuArgs enforces them (q35 without interrupt remapping: at most 255 vCPUs).
      memoryMiB: int(64, 16 * 1024 * 1024).default(HOST_CONFIG_DEFAULTS.vm.memoryMiB),
      vcpus: int(1, 255).default(HOST_CONFIG_DEFAULTS.vm.vcpus),
      hugepages: absolutePath.optional(),
      diskImage: absolutePath.optional(),
      imageDriverVersion: z.string().regex(DRIVER_VERSION_PATTERN, 'must be a driver version such as 580.95.05').optional(),
      powerdownTimeoutMs: int(0, 3_600_000).default(HOST_CONFIG_DEFAULTS.vm.powerdownTimeoutMs),
    })
    .prefault({}),
  expectedGpus: z
    .array(
      z.strictObject({
        moduleId: int(1, 8),
        // Format checked in checkSemantics with parsePciAddress, the rule every address in a path passes.
        pciAddress: z.string(),
      }),
    )
    .min(1, 'must list at least one GPU (or leave the key out)')
    .max(8, 'an HGX board has at most 8 GPUs')
    .optional(),
});

function typeName(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') return 'an object';
  return `${typeof value} ${JSON.stringify(value)}`;
}

const EXPECTED_NAMES: Record<string, string> = { object: 'an object', array: 'an array', int: 'a whole number', number: 'a number', boolean: 'true or false' };

const dotted = (path: readonly PropertyKey[]) => path.map(String).join('.');

/** Zod's first issue as a HostConfigError naming the field. */
function fromIssue(issue: z.core.$ZodIssue): HostConfigError {
  if (issue.code === 'unrecognized_keys') {
    const field = dotted([...issue.path, issue.keys[0]!]);
    return new HostConfigError('unknown-key', field, 'unknown key (see docs/real-host.md for the fields a host config takes)');
  }
  const field = dotted(issue.path);
  if (issue.code === 'invalid_type') {
    const input = (issue as { input?: unknown }).input;
    const expected = EXPECTED_NAMES[issue.expected] ?? `a ${issue.expected}`;
    if (field === '') return new HostConfigError('invalid', '', `a host config must be a JSON object, got ${typeName(input)}`);
    if (input === undefined) return new HostConfigError('invalid', field, `is required (${expected})`);
    return new HostConfigError('invalid', field, `must be ${expected}, got ${typeName(input)}`);
  }
  return new HostConfigError('invalid', field, issue.message);
}

// ── file checks ──────────────────────────────────────────────────────────────
function statOf(field: string, path: string, what: string): Stats {
  try {
    return statSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') throw new HostConfigError('missing', field, `${what} ${path} does not exist`, { cause: err });
    throw new HostConfigError('missing', field, `cannot look at ${what} ${path}: ${(err as Error).message}`, { cause: err });
  }
}

function canAccess(path: string, mode: number): boolean {
  try {
    accessSync(path, mode);
    return true;
  } catch {
    return false;
  }
}

function checkExecutable(field: string, path: string): void {
  const st = statOf(field, path, 'binary');
  if (!st.isFile()) throw new HostConfigError('not-a-file', field, `${path} is not a regular file`);
  if (!canAccess(path, fsConstants.X_OK)) throw new HostConfigError('not-executable', field, `${path} is not executable by this user`);
}

function checkReadableFile(field: string, path: string, what: string): void {
  const st = statOf(field, path, what);
  if (!st.isFile()) throw new HostConfigError('not-a-file', field, `${what} ${path} is not a regular file`);
  if (!canAccess(path, fsConstants.R_OK)) throw new HostConfigError('not-a-file', field, `${what} ${path} is not readable by this user`);
}

function checkDirectory(field: string, path: string, what: string): void {
  const st = statOf(field, path, what);
  if (!st.isDirectory()) throw new HostConfigError('not-a-directory', field, `${what} ${path} is not a directory`);
}

/** The longest VM id gpuvm issues (`vm-` + 10 characters, src/engine/vms.ts). */
const LONGEST_VM_ID = 'vm-0123456789';

function checkFiles(cfg: HostConfig): void {
  for (const key of ['fmpm', 'nvidiaSmi', 'fabricManager', 'qemu'] as const) checkExecutable(`binaries.${key}`, cfg.binaries[key]);
  checkDirectory('sysfsRoot', cfg.sysfsRoot, 'folder');
  const pciDevices = join(cfg.sysfsRoot, 'sys', 'bus', 'pci', 'devices');
  checkDirectory('sysfsRoot', pciDevices, 'PCI device folder');
  checkDirectory('fsRoot', cfg.fsRoot, 'folder');
  // runDir is created on the first VM start; one that exists must be a writable folder.
  if (canAccess(cfg.runDir, fsConstants.F_OK)) {
    checkDirectory('runDir', cfg.runDir, 'run folder');
    if (!canAccess(cfg.runDir, fsConstants.W_OK | fsConstants.X_OK)) {
      throw new HostConfigError('not-a-directory', 'runDir', `run folder ${cfg.runDir} is not writable by this user`);
    }
  }
  if (cfg.qemu.firmware !== undefined) checkReadableFile('qemu.firmware', cfg.qemu.firmware, 'firmware file');
  if (cfg.vm.diskImage !== undefined) checkReadableFile('vm.diskImage', cfg.vm.diskImage, 'disk image');
  if (cfg.vm.hugepages !== undefined) checkDirectory('vm.hugepages', cfg.vm.hugepages, 'hugepages path');
}

/** Checks that need more than one field or the shape of the whole list. */
function checkSemantics(cfg: HostConfig): void {
  const qmpSocket = join(cfg.runDir, LONGEST_VM_ID, QMP_SOCKET_NAME);
  const bytes = Buffer.byteLength(qmpSocket);
  if (bytes > MAX_UNIX_SOCKET_PATH_BYTES) {
    throw new HostConfigError(
      'invalid',
      'runDir',
      `too long: a VM's QMP socket (${qmpSocket}) would be ${bytes} bytes, unix sockets allow ${MAX_UNIX_SOCKET_PATH_BYTES}`,
    );
  }
  const gpus = cfg.expectedGpus ?? [];
  gpus.forEach((gpu, i) => {
    try {
      parsePciAddress(gpu.pciAddress);
    } catch (err) {
      throw new HostConfigError('invalid', `expectedGpus.${i}.pciAddress`, (err as Error).message, { cause: err });
    }
    const sameModule = gpus.findIndex((g) => g.moduleId === gpu.moduleId);
    if (sameModule !== i) {
      throw new HostConfigError('invalid', `expectedGpus.${i}.moduleId`, `module ${gpu.moduleId} is listed twice (also expectedGpus.${sameModule})`);
    }
    const sameAddress = gpus.findIndex((g) => g.pciAddress === gpu.pciAddress);
    if (sameAddress !== i) {
      throw new HostConfigError('invalid', `expectedGpus.${i}.pciAddress`, `PCI address ${gpu.pciAddress} is listed twice (also expectedGpus.${sameAddress})`);
    }
  });
}

// ── public API ───────────────────────────────────────────────────────────────
/**
 * Validates a parsed JSON value as a host config and fills in defaults. With `checkFiles` (the
 * default) every configured path is also checked: binaries exist and are executable, firmware
 * and disk image are readable files, hugepages and the roots are folders.
 */
export function parseHostConfig(json: unknown, opts: { checkFiles?: boolean } = {}): HostConfig {
  const parsed = schema.safeParse(json, { reportInput: true });
  if (!parsed.success) throw fromIssue(parsed.error.issues[0]!);
  const cfg = parsed.data as HostConfig;
  checkSemantics(cfg);
  if (opts.checkFiles ?? true) checkFiles(cfg);
  return cfg;
}

/** `{ line, column }` (1-based) of a character offset. */
function lineColumn(text: string, offset: number): { line: number; column: number } {
  const before = text.slice(0, Math.max(0, Math.min(offset, text.length)));
  const lines = before.split('\n');
  return { line: lines.length, column: lines.at(-1)!.length + 1 };
}

/** Reads and validates the file at `path` (files checked too); errors carry the file name. */
export async function loadHostConfig(path: string): Promise<HostConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new HostConfigError('unreadable', '', `cannot read host config ${path}: ${(err as Error).message}`, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    const message = (err as Error).message;
    // V8 reports an offset ("at position 42") or, in newer releases, also a line and column.
    const position = /position (\d+)/.exec(message);
    const offset = position ? Number(position[1]) : /end of JSON input/.test(message) ? text.length : null;
    const at = offset === null || /line \d+ column \d+/.test(message) ? '' : (({ line, column }) => ` at line ${line}, column ${column}`)(lineColumn(text, offset));
    throw new HostConfigError('bad-json', '', `host config ${path} is not valid JSON${at}: ${message}`, { cause: err });
  }
  try {
    return parseHostConfig(json);
  } catch (err) {
    if (err instanceof HostConfigError) throw new HostConfigError(err.code, err.field, err.detail, { file: path, cause: err.cause });
    throw err;
  }
}

export interface RealHostOptions {
  /** How long a sysfs bind/unbind may take to show (default 10000 ms). */
  bindTimeoutMs?: number;
  /** Timeout for each fmpm and nvidia-smi run (default 30000 ms). */
  toolTimeoutMs?: number;
}

/**
 * The adapters for a real host, built from a validated config. No I/O: binaries are run and
 * sysfs is read only when the service uses them (registration first).
 */
export function openRealHost(cfg: HostConfig, opts: RealHostOptions = {}): HostAdapters {
  const toolTimeoutMs = opts.toolTimeoutMs ?? 30_000;
  const accel = cfg.qemu.accel;
  const vmDefaults: HostAdapters['vmDefaults'] = {};
  if (cfg.vm.hugepages !== undefined) vmDefaults.hugepagesPath = cfg.vm.hugepages;
  if (cfg.vm.diskImage !== undefined) vmDefaults.diskImage = cfg.vm.diskImage;
  if (cfg.qemu.firmware !== undefined) vmDefaults.firmware = cfg.qemu.firmware;
  if (cfg.vm.imageDriverVersion !== undefined) vmDefaults.imageDriverVersion = cfg.vm.imageDriverVersion;
  return {
    hostId: cfg.hostId,
    simulated: false,
    fmpm: new Fmpm({ bin: cfg.binaries.fmpm, hostname: cfg.fabricManager.address, timeoutMs: toolTimeoutMs }),
    nvidiaSmi: new NvidiaSmi({ bin: cfg.binaries.nvidiaSmi, timeoutMs: toolTimeoutMs }),
    sysfs: new Sysfs({ root: cfg.sysfsRoot, bindTimeoutMs: opts.bindTimeoutMs ?? 10_000 }),
    qemu: new Qemu({ bin: cfg.binaries.qemu, runRoot: cfg.runDir, accel, forceNoMmap: cfg.qemu.forceNoMmap }),
    gpuDevice: 'vfio-pci',
    hostDriver: 'nvidia',
    qemuDescription:
      `QEMU at ${cfg.binaries.qemu} (${accel === 'kvm' ? 'KVM' : 'TCG'}), vfio-pci` +
      `${cfg.qemu.forceNoMmap ? ', x-no-mmap=true forced' : ''}; per-VM ${PIDFILE_NAME}, ${QMP_SOCKET_NAME}, ${LOG_NAME} in ${cfg.runDir}`,
    fsRoot: cfg.fsRoot,
    fabricManagerBin: cfg.binaries.fabricManager,
    // Beside the run folder (/var/lib/gpuvm/fence by default): it outlives every VM.
    fence: new HostFence(join(dirname(cfg.runDir), 'fence')),
    vmDefaults,
  };
}
