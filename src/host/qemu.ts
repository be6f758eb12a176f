/**
 * QEMU adapter: builds the command line, detects version and vfio-pci properties, starts a VM
 * detached (it must outlive gpuvm), finds it again through its pidfile, and stops it.
 *
 * Per-VM files live in `<runRoot>/<vmId>/`: `qemu.pid`, `qmp.sock`, `qemu.log`.
 *
 * Topology (DESIGN §2.4): GPU number N (0-based, in `spec.gpus` order) gets its own root port
 *   -device pcie-root-port,id=rpN,chassis=N+1,slot=N+1,bus=pcie.0
 *   -device vfio-pci,host=<bdf>,id=gpuN,bus=rpN,addr=0x0[,x-no-mmap=true]
 * Ids rp0..rp7 match gpu0..gpu7 so "gpuN behind rpN" reads directly; chassis and slot start at
 * 1 because 0 is the pcie-root-port default and means "unset" to some guests.
 */
import { constants as fsConstants, openSync, closeSync, type Dirent } from 'node:fs';
import { access, mkdir, readdir, readFile, rm, unlink, writeFile } from 'node:fs/promises';
import { delimiter, isAbsolute, join, resolve } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { parsePciAddress } from './pci.ts';
import { MAX_UNIX_SOCKET_PATH_BYTES, QmpClient, QmpError } from './qmp.ts';
import { isRetryableSpawnError, runTool } from './tool.ts';

export const VM_ID_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;

export interface QemuVersion {
  major: number;
  minor: number;
  micro: number;
  text: string;
}

export interface QemuVmSpec {
  vmId: string;
  memoryMiB: number;
  vcpus: number;
  /** PCI addresses, in the order they go into the VM (gpu0, gpu1, …). */
  gpus: string[];
  gpuDevice: 'vfio-pci' | 'stand-in';
  /** Directory on a hugetlbfs mount; memory is then a preallocated shared file backend. */
  hugepagesPath?: string;
  /** qcow2 image attached as a virtio disk. */
  diskImage?: string;
  /** Passed to `-bios`. */
  firmware?: string;
}

export interface QemuOptions {
  bin: string;
  /** Where process facts are read (`<procRoot>/<pid>/stat`, `…/cmdline`); default '/proc'. For tests. */
  procRoot?: string;
  /** Per-VM directories are `<runRoot>/<vmId>/`. */
  runRoot: string;
  accel: 'kvm' | 'tcg';
  forceNoMmap?: boolean;
  /** QEMU device used in place of vfio-pci when `gpuDevice` is 'stand-in' (default 'edu'). */
  standInDevice?: string;
  /** How long start() waits for the pidfile, QMP and `query-status` (default 60 s). */
  startTimeoutMs?: number;
  /** Appended after the generated arguments by start(). */
  extraArgs?: string[];
  /** How long powerdown() waits for QMP to answer system_powerdown (default 30 s, QmpClient's). */
  qmpCommandTimeoutMs?: number;
}

export type QemuErrorCode =
  | 'spawn'
  | 'start-timeout'
  | 'exited'
  | 'bad-property'
  | 'bad-spec'
  | 'qmp'
  | 'not-running'
  | 'stop-timeout'
  /** cleanup() or start() refused: the VM's QEMU is still alive (or exiting). */
  | 'still-running'
  /** The pidfile or /proc could not be read: whether QEMU lives is not known. Retry; never proceed. */
  | 'unknown'
  /** `--version` or `-device …,help` printed something we cannot read. */
  | 'bad-output';

/** Codes where waiting and trying again can help; the others keep the worker's default handling. */
const RETRYABLE_CODES: ReadonlySet<QemuErrorCode> = new Set(['unknown', 'still-running', 'stop-timeout']);

export class QemuError extends Error {
  /** true for 'unknown', 'still-running' and 'stop-timeout' (and a probe that could not be spawned for
   *  lack of resources); unset (the worker's default) otherwise. */
  readonly retryable?: boolean;
  constructor(
    readonly code: QemuErrorCode,
    message: string,
    readonly vmId?: string,
    options?: { cause?: unknown; retryable?: boolean },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'QemuError';
    const retryable = options?.retryable ?? (RETRYABLE_CODES.has(code) ? true : undefined);
    if (retryable !== undefined) this.retryable = retryable;
  }
}

/**
 * What an observation of a VM's QEMU found (DESIGN §3.2):
 *  - `alive`: the pidfile names a process that is not a zombie and whose cmdline carries this VM's
 *    `-pidfile`, or whose cmdline is empty (an exiting process: it may still hold VFIO fds);
 *  - `gone`: no pidfile, no such process, a zombie, or a pid recycled by another program;
 *  - `unknown`: the pidfile or /proc could not be read (`error` says why). Retry; never proceed.
 */
export type QemuLiveness = 'alive' | 'gone' | 'unknown';

export interface QemuStatus {
  state: QemuLiveness;
  /** The process when alive; the pidfile's pid when unknown, if it could be read; null when gone. */
  pid: number | null;
  qmpStatus?: string;
  /** Why the observation failed (state `unknown` only). */
  error?: string;
}

/** A QEMU found under the run folder that was not observed gone. */
export type RunningQemu =
  | { vmId: string; state: 'alive'; pid: number }
  | { vmId: string; state: 'unknown'; pid: number | null; error: string };

const DEFAULT_STAND_IN_DEVICE = 'edu';
const DEFAULT_START_TIMEOUT_MS = 60_000;
const PROBE_TIMEOUT_MS = 15_000;
const POLL_MS = 50;
/** Options `-device` parses itself rather than passing to the device; `-device X,help` does not list them. */
const GENERIC_DEVICE_OPTIONS = new Set(['driver', 'bus', 'id']);
const DEVICE_NAME_PATTERN = /^[a-z][a-z0-9-]*$/;
const MAX_GPUS = 16;
const MAX_VCPUS = 255; // q35 without an IOMMU for interrupt remapping
const MIN_MEMORY_MIB = 64;
const MAX_MEMORY_MIB = 16 * 1024 * 1024; // 16 TiB

export const PIDFILE_NAME = 'qemu.pid';
export const QMP_SOCKET_NAME = 'qmp.sock';
export const LOG_NAME = 'qemu.log';

// ---------------------------------------------------------------------------------------------
// Pure helpers

/** QEMU 10.1 fixed the slow mapping of huge BARs; older versions need `x-no-mmap=true`. */
export function needsNoMmap(version: QemuVersion): boolean {
  return version.major < 10 || (version.major === 10 && version.minor < 1);
}

/** From `qemu-system-x86_64 --version`, e.g. `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`. */
export function parseQemuVersion(text: string): QemuVersion {
  const m = /QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?[^\n]*/.exec(text);
  if (!m) throw new QemuError('bad-output', `unrecognised QEMU --version output: ${JSON.stringify(text.slice(0, 200))}`);
  return { major: Number(m[1]), minor: Number(m[2]), micro: Number(m[3] ?? 0), text: m[0].trim() };
}

/** Property names from `-device <driver>,help` (lines like `  x-no-mmap=<bool>  - …`). */
export function parseDeviceProperties(helpText: string): Set<string> {
  const props = new Set<string>();
  for (const line of helpText.split('\n')) {
    const m = /^\s+([A-Za-z][A-Za-z0-9_.-]*)=/.exec(line);
    if (m) props.add(m[1]!);
  }
  return props;
}

/** QEMU option strings use `,` as separator; a literal comma is written `,,`. */
function optValue(value: string): string {
  return value.replaceAll(',', ',,');
}

function badSpec(vmId: string | undefined, message: string): QemuError {
  return new QemuError('bad-spec', vmId ? `VM ${vmId}: ${message}` : message, vmId);
}

function checkPath(vmId: string, what: string, value: string | undefined): void {
  if (value === undefined) return;
  if (typeof value !== 'string' || !isAbsolute(value) || /[\0\n]/.test(value)) {
    throw badSpec(vmId, `${what} must be an absolute path without NUL or newline, got ${JSON.stringify(value)}`);
  }
}

export function validateVmId(vmId: string): void {
  if (typeof vmId !== 'string' || !VM_ID_PATTERN.test(vmId)) {
    throw badSpec(undefined, `invalid VM id ${JSON.stringify(vmId)}: expected ${VM_ID_PATTERN.source}`);
  }
}

/** The `-device` properties (excluding id/bus/driver) that gpuvm sets on vfio-pci for this command line. */
export function vfioPropertiesUsed(args: readonly string[]): Set<string> {
  const used = new Set<string>();
  for (let i = 0; i < args.length - 1; i++) {
    if (args[i] !== '-device' || !args[i + 1]!.startsWith('vfio-pci,')) continue;
    for (const part of args[i + 1]!.replaceAll(',,', '\0').split(',').slice(1)) {
      const key = part.split('=')[0]!;
      if (!GENERIC_DEVICE_OPTIONS.has(key)) used.add(key);
    }
  }
  return used;
}

/**
 * The full argv (without the binary) for one VM. Pure: validates the VM id, every PCI address,
 * numbers and paths, and refuses a QMP socket path longer than a unix socket allows.
 */
export function buildQemuArgs(
  spec: QemuVmSpec,
  ctx: { version: QemuVersion; runDir: string; accel: 'kvm' | 'tcg'; forceNoMmap?: boolean; standInDevice?: string },
): string[] {
  validateVmId(spec.vmId);
  const { vmId } = spec;
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < MIN_MEMORY_MIB || spec.memoryMiB > MAX_MEMORY_MIB) {
    throw badSpec(vmId, `memoryMiB must be an integer in ${MIN_MEMORY_MIB}..${MAX_MEMORY_MIB}, got ${spec.memoryMiB}`);
  }
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > MAX_VCPUS) {
    throw badSpec(vmId, `vcpus must be an integer in 1..${MAX_VCPUS}, got ${spec.vcpus}`);
  }
  if (!Array.isArray(spec.gpus) || spec.gpus.length > MAX_GPUS) {
    throw badSpec(vmId, `gpus must be a list of at most ${MAX_GPUS} PCI addresses`);
  }
  const gpus = spec.gpus.map((a) => {
    try {
      return parsePciAddress(a);
    } catch (err) {
      throw new QemuError('bad-spec', `VM ${vmId}: ${(err as Error).message}`, vmId, { cause: err });
    }
  });
  const duplicate = gpus.find((a, i) => gpus.indexOf(a) !== i);
  if (duplicate) throw badSpec(vmId, `GPU ${duplicate} listed twice`);
  if (spec.gpuDevice !== 'vfio-pci' && spec.gpuDevice !== 'stand-in') {
    throw badSpec(vmId, `gpuDevice must be 'vfio-pci' or 'stand-in', got ${JSON.stringify(spec.gpuDevice)}`);
  }
  if (ctx.accel !== 'kvm' && ctx.accel !== 'tcg') throw badSpec(vmId, `accel must be 'kvm' or 'tcg', got ${JSON.stringify(ctx.accel)}`);
  const standIn = ctx.standInDevice ?? DEFAULT_STAND_IN_DEVICE;
  if (!DEVICE_NAME_PATTERN.test(standIn)) throw badSpec(vmId, `invalid stand-in device name ${JSON.stringify(standIn)}`);
  checkPath(vmId, 'runDir', ctx.runDir);
  checkPath(vmId, 'hugepagesPath', spec.hugepagesPath);
  checkPath(vmId, 'diskImage', spec.diskImage);
  checkPath(vmId, 'firmware', spec.firmware);

  const pidfile = join(ctx.runDir, PIDFILE_NAME);
  const qmpSocket = join(ctx.runDir, QMP_SOCKET_NAME);
  const socketBytes = Buffer.byteLength(qmpSocket);
  if (socketBytes > MAX_UNIX_SOCKET_PATH_BYTES) {
    throw badSpec(
      vmId,
      `QMP socket path ${qmpSocket} is ${socketBytes} bytes; unix sockets allow at most ${MAX_UNIX_SOCKET_PATH_BYTES} — choose a shorter runRoot`,
    );
  }

  const args: string[] = ['-name', `guest=${vmId}`];
  args.push('-machine', spec.hugepagesPath ? 'q35,memory-backend=mem0' : 'q35');
  args.push('-accel', ctx.accel);
  // Under KVM the guest should see the host CPU (features the GPU driver and CUDA probe for).
  if (ctx.accel === 'kvm') args.push('-cpu', 'host');
  args.push('-m', `${spec.memoryMiB}M`);
  if (spec.hugepagesPath) {
    args.push(
      '-object',
      `memory-backend-file,id=mem0,size=${spec.memoryMiB}M,mem-path=${optValue(spec.hugepagesPath)},share=on,prealloc=on`,
    );
  }
  args.push('-smp', String(spec.vcpus));
  args.push('-nodefaults', '-display', 'none', '-serial', 'none');
  args.push('-pidfile', pidfile);
  args.push('-qmp', `unix:${optValue(qmpSocket)},server=on,wait=off`);
  if (spec.firmware) args.push('-bios', spec.firmware);
  if (spec.diskImage) args.push('-drive', `file=${optValue(spec.diskImage)},if=virtio,format=qcow2`);

  const noMmap = spec.gpuDevice === 'vfio-pci' && (ctx.forceNoMmap === true || needsNoMmap(ctx.version));
  gpus.forEach((address, n) => {
    args.push('-device', `pcie-root-port,id=rp${n},chassis=${n + 1},slot=${n + 1},bus=pcie.0`);
    if (spec.gpuDevice === 'vfio-pci') {
      args.push('-device', `vfio-pci,host=${address},id=gpu${n},bus=rp${n},addr=0x0${noMmap ? ',x-no-mmap=true' : ''}`);
    } else {
      args.push('-device', `${standIn},id=gpu${n},bus=rp${n},addr=0x0`);
    }
  });
  return args;
}

/** `/proc/<pid>/stat`: the state letter follows the last `)` (comm may itself contain parentheses);
 *  `flags` (field 9) when the line has it. */
export function parseProcStat(text: string): { pid: number; comm: string; state: string; flags?: number } {
  const open = text.indexOf('(');
  const close = text.lastIndexOf(')');
  if (open < 0 || close < open) throw new Error(`unreadable /proc stat line: ${JSON.stringify(text.slice(0, 100))}`);
  const rest = text.slice(close + 1).trim().split(/\s+/);
  const pid = Number(text.slice(0, open).trim());
  const state = rest[0] ?? '';
  if (!Number.isSafeInteger(pid) || pid <= 0 || !/^[A-Za-z]$/.test(state)) {
    throw new Error(`unreadable /proc stat line: ${JSON.stringify(text.slice(0, 100))}`);
  }
  const flags = rest[6] !== undefined && /^\d+$/.test(rest[6]) ? Number(rest[6]) : undefined;
  return { pid, comm: text.slice(open + 1, close), state, ...(flags === undefined ? {} : { flags }) };
}

/** `qemu-system-x86_64` on PATH, or null. */
export async function findQemuBinary(): Promise<string | null> {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, 'qemu-system-x86_64');
    try {
      await access(candidate, fsConstants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// Process inspection

/** PF_KTHREAD in /proc/<pid>/stat flags: a kernel thread (empty cmdline, never a QEMU). */
const PF_KTHREAD = 0x00200000;

/**
 * One observation of a VM's QEMU (see QemuStatus). `confirmed`: the cmdline names this VM's
 * pidfile, so signals may go to `pid`; an exiting process (empty cmdline) is alive but unconfirmed.
 */
type Observation =
  | { state: 'alive'; pid: number; argv: string[]; confirmed: boolean }
  | { state: 'gone'; pid: null; why: string }
  | { state: 'unknown'; pid: number | null; error: string };

const errnoOf = (err: unknown): string | undefined => (err as NodeJS.ErrnoException)?.code;
const describeErr = (err: unknown): string => (err instanceof Error ? err.message : String(err));

async function readPidfile(path: string): Promise<{ pid: number } | { absent: true } | { error: string }> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    // No pidfile (with or without its folder): QEMU removes it when it exits, and a VM that never
    // started has none. Any other failure (EMFILE, EACCES, EISDIR, EIO…) tells nothing.
    if (errnoOf(err) === 'ENOENT') return { absent: true };
    return { error: `cannot read pidfile ${path}: ${describeErr(err)}` };
  }
  const t = text.trim();
  const pid = /^\d{1,10}$/.test(t) ? Number(t) : 0;
  if (pid <= 0 || pid > 0x3fffffff) return { error: `pidfile ${path} holds ${JSON.stringify(text.slice(0, 40))}, not a pid` };
  return { pid };
}

/** The process behind `pid`, judged against the VM's pidfile (rules at QemuStatus). */
async function inspectProcess(procRoot: string, pid: number, pidfile: string): Promise<Observation> {
  const gone = (why: string): Observation => ({ state: 'gone', pid: null, why });
  const unknown = (what: string, err: unknown): Observation => ({ state: 'unknown', pid, error: `cannot read ${what}: ${describeErr(err)}` });
  const isGone = (err: unknown) => errnoOf(err) === 'ENOENT' || errnoOf(err) === 'ESRCH';

  const statPath = join(procRoot, String(pid), 'stat');
  let stat: ReturnType<typeof parseProcStat>;
  try {
    stat = parseProcStat(await readFile(statPath, 'utf8'));
  } catch (err) {
    return isGone(err) ? gone(`no process ${pid}`) : unknown(statPath, err);
  }
  if (stat.state === 'Z' || stat.state === 'X' || stat.state === 'x') return gone(`process ${pid} is a zombie`); // its files are closed
  const cmdlinePath = join(procRoot, String(pid), 'cmdline');
  let cmdline: string;
  try {
    cmdline = await readFile(cmdlinePath, 'utf8');
  } catch (err) {
    return isGone(err) ? gone(`no process ${pid}`) : unknown(cmdlinePath, err);
  }
  if (cmdline === '') {
    // A kernel thread took the pid; otherwise the process is exiting: Linux empties cmdline when it
    // drops its memory, before it closes its files (VFIO fds included). Alive, identity unconfirmed.
    if (stat.flags !== undefined && (stat.flags & PF_KTHREAD) !== 0) return gone(`pid ${pid} is a kernel thread now`);
    return { state: 'alive', pid, argv: [], confirmed: false };
  }
  const argv = cmdline.split('\0');
  if (argv.at(-1) === '') argv.pop();
  // A recycled pid belongs to some other program and does not match.
  const matches = argv.some((a, i) => a === pidfile && argv[i - 1] === '-pidfile');
  return matches ? { state: 'alive', pid, argv, confirmed: true } : gone(`pid ${pid} is another program now`);
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

async function tail(path: string, maxChars = 2_000): Promise<string> {
  try {
    const text = await readFile(path, 'utf8');
    return text.slice(-maxChars).trim();
  } catch {
    return '';
  }
}

// ---------------------------------------------------------------------------------------------

export class Qemu {
  readonly #opts: QemuOptions & { runRoot: string; procRoot: string };
  readonly #exitListeners: ((vmId: string) => void)[] = [];
  #version: Promise<QemuVersion> | undefined;
  #vfioProps: Promise<Set<string>> | undefined;
  /** Serialises start/terminate per VM within this process. */
  readonly #locks = new Map<string, Promise<unknown>>();

  constructor(opts: QemuOptions) {
    if (!opts.bin) throw new QemuError('bad-spec', 'QEMU binary path is empty');
    if (opts.runRoot.includes('\0')) throw new QemuError('bad-spec', `invalid runRoot ${JSON.stringify(opts.runRoot)}`);
    this.#opts = { ...opts, runRoot: resolve(opts.runRoot), procRoot: opts.procRoot ?? '/proc' };
  }

  version(): Promise<QemuVersion> {
    this.#version ??= this.#probe(['--version']).then(parseQemuVersion);
    this.#version.catch(() => (this.#version = undefined));
    return this.#version;
  }

  vfioPciProperties(): Promise<Set<string>> {
    this.#vfioProps ??= this.#probe(['-device', 'vfio-pci,help']).then((out) => {
      const props = parseDeviceProperties(out);
      if (props.size === 0) {
        throw new QemuError('bad-output', `${this.#opts.bin} -device vfio-pci,help listed no properties: ${out.slice(0, 200)}`);
      }
      return props;
    });
    this.#vfioProps.catch(() => (this.#vfioProps = undefined));
    return this.#vfioProps;
  }

  async #probe(args: string[]): Promise<string> {
    const cmd = `${this.#opts.bin} ${args.join(' ')}`;
    const r = await runTool(this.#opts.bin, args, { timeoutMs: PROBE_TIMEOUT_MS, maxBytes: 4 * 1024 * 1024 });
    if (r.spawnError) {
      const { code, message } = r.spawnError;
      const retryable = isRetryableSpawnError(r.spawnError);
      throw new QemuError('spawn', `${cmd} failed: cannot start it (${code}: ${message})`, undefined, { cause: Object.assign(new Error(message), { code }), retryable });
    }
    let why: string | null = null;
    if (r.timedOut) why = `no answer within ${PROBE_TIMEOUT_MS} ms; the process was killed`;
    else if (r.overflow) why = 'it printed more than 4 MiB; the process was killed';
    else if (r.exitCode === null) why = `killed by ${r.signal ?? 'a signal'}`;
    else if (r.exitCode !== 0) why = `exit ${r.exitCode}: ${[r.stdout.trim(), r.stderr.trim()].filter((t) => t !== '').join(' / ').slice(0, 500) || '(no output)'}`;
    if (why) throw new QemuError('spawn', `${cmd} failed: ${why}`);
    return `${r.stdout}\n${r.stderr}`;
  }

  runDir(vmId: string): string {
    validateVmId(vmId);
    return join(this.#opts.runRoot, vmId);
  }

  #paths(vmId: string) {
    const dir = this.runDir(vmId);
    return { dir, pidfile: join(dir, PIDFILE_NAME), qmpSocket: join(dir, QMP_SOCKET_NAME), log: join(dir, LOG_NAME) };
  }

  /** One observation: pidfile, then /proc. Never throws for a failed read: that is `unknown`. */
  async #observe(vmId: string): Promise<Observation> {
    const { pidfile } = this.#paths(vmId);
    const read = await readPidfile(pidfile);
    if ('absent' in read) return { state: 'gone', pid: null, why: `no pidfile ${pidfile}` };
    if ('error' in read) return { state: 'unknown', pid: null, error: read.error };
    return inspectProcess(this.#opts.procRoot, read.pid, pidfile);
  }

  #unknownError(vmId: string, o: { pid: number | null; error: string }, refusing: string): QemuError {
    const pid = o.pid === null ? '' : ` (pid ${o.pid})`;
    return new QemuError('unknown', `VM ${vmId}: cannot tell whether QEMU${pid} is alive — ${o.error}; ${refusing}`, vmId);
  }

  #withLock<T>(vmId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.#locks.get(vmId) ?? Promise.resolve();
    const next = prev.catch(() => undefined).then(fn);
    const settled = next.catch(() => undefined);
    this.#locks.set(vmId, settled);
    void settled.then(() => {
      if (this.#locks.get(vmId) === settled) this.#locks.delete(vmId);
    });
    return next;
  }

  /** Observe first: a live QEMU for this VM (pidfile + /proc) is returned as is, with `args` read
   *  from its /proc cmdline. Otherwise spawn it detached and wait for pidfile, QMP and
   *  `query-status`. Serialised per VM within this process. */
  async start(spec: QemuVmSpec): Promise<{ pid: number; alreadyRunning: boolean; args: string[] }> {
    validateVmId(spec?.vmId);
    return this.#withLock(spec.vmId, () => this.#start(spec));
  }

  async #start(spec: QemuVmSpec): Promise<{ pid: number; alreadyRunning: boolean; args: string[] }> {
    const { vmId } = spec;
    const paths = this.#paths(vmId);

    // Observe first: a QEMU left by an earlier gpuvm (or an earlier attempt) is the VM. Only an
    // observed `gone` lets a new one start: a second QEMU must never race the first for the GPUs.
    const existing = await this.#observe(vmId);
    if (existing.state === 'unknown') throw this.#unknownError(vmId, existing, 'not starting another QEMU');
    if (existing.state === 'alive') {
      if (existing.confirmed) return { pid: existing.pid, alreadyRunning: true, args: existing.argv.slice(1) };
      throw new QemuError('still-running', `VM ${vmId}: pid ${existing.pid} of its pidfile is exiting (empty cmdline); not starting another QEMU until it is gone`, vmId);
    }

    const version = await this.version();
    const args = [
      ...buildQemuArgs(spec, {
        version,
        runDir: paths.dir,
        accel: this.#opts.accel,
        forceNoMmap: this.#opts.forceNoMmap,
        standInDevice: this.#opts.standInDevice,
      }),
      ...(this.#opts.extraArgs ?? []),
    ];
    if (spec.gpuDevice === 'vfio-pci') {
      const available = await this.vfioPciProperties();
      const missing = [...vfioPropertiesUsed(args)].filter((p) => !available.has(p));
      if (missing.length > 0) {
        throw new QemuError(
          'bad-property',
          `VM ${vmId}: ${this.#opts.bin} (${version.text}) has no vfio-pci propert${missing.length > 1 ? 'ies' : 'y'} ${missing.join(', ')}`,
          vmId,
        );
      }
    }

    await mkdir(paths.dir, { recursive: true, mode: 0o700 });
    // Stale files from a dead QEMU would make us think the new one is already up.
    await unlink(paths.pidfile).catch(() => undefined);
    await unlink(paths.qmpSocket).catch(() => undefined);
    await writeFile(paths.log, `--- gpuvm start ${new Date().toISOString()}: ${this.#opts.bin} ${args.join(' ')}\n`, { flag: 'a' });

    const logFd = openSync(paths.log, 'a');
    let child: ChildProcess;
    try {
      // node's spawn rather than runTool here: QEMU's stdout and stderr go straight to the log
      // file (a pipe through our process would SIGPIPE QEMU when gpuvm dies). Detached in its own
      // session, QEMU outlives gpuvm; the pidfile is how a later gpuvm finds it. No timeout on the
      // process itself (it runs for the life of the VM); start-up is bounded below.
      child = spawn(this.#opts.bin, args, { detached: true, stdio: ['ignore', logFd, logFd], cwd: paths.dir });
    } catch (err) {
      throw new QemuError('spawn', `VM ${vmId}: cannot spawn ${this.#opts.bin}: ${(err as Error).message}`, vmId, { cause: err });
    } finally {
      closeSync(logFd);
    }
    const proc: { exited: { code: number | null; signal: string | null; failure?: string } | null } = { exited: null };
    child.once('error', (err) => {
      // ENOENT/EACCES: the binary never ran.
      proc.exited ??= { code: null, signal: null, failure: err.message };
    });
    child.once('exit', (code, signal) => {
      proc.exited ??= { code, signal };
      for (const listener of this.#exitListeners) listener(vmId);
    });
    child.unref();

    const timeoutMs = this.#opts.startTimeoutMs ?? DEFAULT_START_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    const fail = async (err: QemuError): Promise<never> => {
      // A QEMU that did not come up properly must not linger holding the GPUs.
      if (proc.exited === null && child.pid !== undefined) {
        try {
          process.kill(child.pid, 'SIGKILL');
        } catch {
          // already gone
        }
        const until = Date.now() + 5_000;
        while (proc.exited === null && Date.now() < until) await sleep(POLL_MS);
      }
      throw err;
    };
    const exitedError = async (e: NonNullable<typeof proc.exited>): Promise<QemuError> => {
      if (e.failure) return new QemuError('spawn', `VM ${vmId}: cannot run ${this.#opts.bin}: ${e.failure}`, vmId);
      const how = e.signal ? `signal ${e.signal}` : `code ${e.code}`;
      return new QemuError('exited', `VM ${vmId}: QEMU exited during start (${how}); ${paths.log}:\n${await tail(paths.log)}`, vmId);
    };

    let live: { pid: number } | null = null;
    while (!live) {
      if (proc.exited) return fail(await exitedError(proc.exited));
      if (Date.now() > deadline) {
        return fail(new QemuError('start-timeout', `VM ${vmId}: no pidfile ${paths.pidfile} within ${timeoutMs} ms`, vmId));
      }
      const o = await this.#observe(vmId);
      if (o.state === 'alive' && o.confirmed) live = o;
      else await sleep(POLL_MS);
    }

    let qmpStatus: string | undefined;
    while (qmpStatus === undefined) {
      if (proc.exited) return fail(await exitedError(proc.exited));
      const left = deadline - Date.now();
      if (left <= 0) {
        return fail(new QemuError('start-timeout', `VM ${vmId}: QMP ${paths.qmpSocket} not answering within ${timeoutMs} ms`, vmId));
      }
      let qmp: QmpClient | undefined;
      try {
        qmp = await QmpClient.connect(paths.qmpSocket, { timeoutMs: left });
        const st = await qmp.execute<{ status: string; running: boolean }>('query-status', undefined, { timeoutMs: Math.max(1, deadline - Date.now()) });
        qmpStatus = st.status;
      } catch (err) {
        // The socket appears a moment after the pidfile; retry until the deadline.
        if (!(err instanceof QmpError) || err.code === 'command') {
          return fail(new QemuError('qmp', `VM ${vmId}: query-status failed: ${(err as Error).message}`, vmId, { cause: err }));
        }
        await sleep(POLL_MS);
      } finally {
        await qmp?.close();
      }
    }
    if (qmpStatus !== 'running' && qmpStatus !== 'prelaunch') {
      return fail(new QemuError('qmp', `VM ${vmId}: QEMU pid ${live.pid} reports status ${qmpStatus}, expected running`, vmId));
    }
    return { pid: live.pid, alreadyRunning: false, args };
  }

  /** alive / gone / unknown, by the rules at QemuStatus. With `queryQmp`, also asks a live QEMU
   *  for its run state (left unset if QMP does not answer). */
  async status(vmId: string, opts: { queryQmp?: boolean; timeoutMs?: number } = {}): Promise<QemuStatus> {
    const o = await this.#observe(vmId);
    if (o.state === 'gone') return { state: 'gone', pid: null };
    if (o.state === 'unknown') return { state: 'unknown', pid: o.pid, error: o.error };
    const status: QemuStatus = { state: 'alive', pid: o.pid };
    if (opts.queryQmp) {
      let qmp: QmpClient | undefined;
      try {
        qmp = await QmpClient.connect(this.#paths(vmId).qmpSocket, { timeoutMs: opts.timeoutMs ?? 2_000 });
        status.qmpStatus = (await qmp.execute<{ status: string }>('query-status', undefined, { timeoutMs: opts.timeoutMs ?? 2_000 })).status;
      } catch {
        // QMP busy (one client at a time) or QEMU exiting: the process facts still stand.
      } finally {
        await qmp?.close();
      }
    }
    return status;
  }

  /**
   * Calls `listener` when a QEMU this process started exits, so the monitor hears of it at once.
   * A QEMU found after a restart is not our child: only the monitor's poll sees it go.
   */
  onExit(listener: (vmId: string) => void): void {
    this.#exitListeners.push(listener);
  }

  /**
   * Every QEMU under the run folder not observed `gone`, by VM id: what the host runs, whatever the
   * log says. A VM whose observation failed is listed as `unknown` (with its pidfile's pid if read),
   * never dropped: that would read as evidence the QEMU is gone. A run folder that cannot be listed
   * throws.
   */
  async running(): Promise<RunningQemu[]> {
    let entries: Dirent[];
    try {
      entries = await readdir(this.#opts.runRoot, { withFileTypes: true });
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return [];
      throw err;
    }
    const found: RunningQemu[] = [];
    // Only folders can hold a pidfile; a stray file named like a VM is no QEMU.
    const names = entries.filter((e) => e.isDirectory() && VM_ID_PATTERN.test(e.name)).map((e) => e.name);
    for (const vmId of names.sort()) {
      const o = await this.#observe(vmId);
      if (o.state === 'alive') found.push({ vmId, state: 'alive', pid: o.pid });
      else if (o.state === 'unknown') found.push({ vmId, state: 'unknown', pid: o.pid, error: o.error });
    }
    return found;
  }

  /** A negotiated QMP connection to a running VM; the caller closes it. */
  async connect(vmId: string, opts: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const live = await this.#observe(vmId);
    if (live.state === 'unknown') throw this.#unknownError(vmId, live, 'not connecting to QMP');
    if (live.state === 'gone') throw new QemuError('not-running', `VM ${vmId}: no running QEMU (pidfile ${this.#paths(vmId).pidfile})`, vmId);
    try {
      return await QmpClient.connect(this.#paths(vmId).qmpSocket, { timeoutMs: opts.timeoutMs ?? 5_000 });
    } catch (err) {
      throw new QemuError('qmp', `VM ${vmId} (pid ${live.pid}): ${(err as Error).message}`, vmId, { cause: err });
    }
  }

  /** Press the ACPI power button. The guest decides what to do; the caller waits and times out. */
  async powerdown(vmId: string): Promise<'sent' | 'not-running'> {
    const first = await this.#observe(vmId);
    if (first.state === 'gone') return 'not-running';
    if (first.state === 'unknown') throw this.#unknownError(vmId, first, 'not pressing the power button');
    let qmp: QmpClient | undefined;
    try {
      qmp = await this.connect(vmId);
      await qmp.execute('system_powerdown', undefined, { timeoutMs: this.#opts.qmpCommandTimeoutMs });
      return 'sent';
    } catch (err) {
      // 'not-running' only from an observed `gone`; a failed read after a failed QMP call is unknown.
      const after = await this.#observe(vmId);
      if (after.state === 'gone') return 'not-running';
      if (after.state === 'unknown') throw this.#unknownError(vmId, after, `system_powerdown failed (${(err as Error).message})`);
      throw err instanceof QemuError ? err : new QemuError('qmp', `VM ${vmId}: system_powerdown failed: ${(err as Error).message}`, vmId, { cause: err });
    } finally {
      await qmp?.close();
    }
  }

  /**
   * quit over QMP → wait → SIGTERM → wait → SIGKILL → wait; resolves once the process is observed
   * gone. 'not-running' only from an observation of `gone`; a failed observation throws
   * QemuError('unknown') (retryable). Each signal goes only to a pid whose /proc cmdline still
   * names this VM's pidfile; an exiting process (empty cmdline) is waited for, never signalled.
   */
  async terminate(vmId: string, opts: { quitTimeoutMs?: number; termTimeoutMs?: number } = {}): Promise<'not-running' | 'quit' | 'sigterm' | 'sigkill'> {
    validateVmId(vmId);
    return this.#withLock(vmId, () => this.#terminate(vmId, opts));
  }

  async #terminate(vmId: string, opts: { quitTimeoutMs?: number; termTimeoutMs?: number }): Promise<'not-running' | 'quit' | 'sigterm' | 'sigkill'> {
    const quitTimeoutMs = opts.quitTimeoutMs ?? 10_000;
    const termTimeoutMs = opts.termTimeoutMs ?? 10_000;
    const first = await this.#observe(vmId);
    if (first.state === 'gone') return 'not-running';
    if (first.state === 'unknown') throw this.#unknownError(vmId, first, 'not stopping it');
    const { pid } = first;

    let last = first as Observation;
    /** Gone, or the pidfile now names another process (a new QEMU of this VM is not ours to stop). */
    const goneWithin = async (ms: number): Promise<boolean> => {
      const until = Date.now() + ms;
      for (;;) {
        last = await this.#observe(vmId);
        if (last.state === 'gone' || (last.state === 'alive' && last.pid !== pid)) return true;
        if (Date.now() >= until) return false;
        await sleep(POLL_MS);
      }
    };

    if (!first.confirmed) {
      // Exiting already (empty cmdline): whose it is cannot be confirmed, so no signal; wait.
      if (await goneWithin(quitTimeoutMs + termTimeoutMs)) return 'not-running';
      if (last.state === 'unknown') throw this.#unknownError(vmId, last, 'not stopping it');
      throw new QemuError('stop-timeout', `VM ${vmId}: pid ${pid} of its pidfile is still exiting (empty cmdline) after ${quitTimeoutMs + termTimeoutMs} ms; not signalling a process whose identity cannot be confirmed`, vmId);
    }

    // 1. quit over QMP, all within quitTimeoutMs. QMP busy (one client at a time) or hung:
    //    fall through to signals.
    const quitDeadline = Date.now() + quitTimeoutMs;
    let qmp: QmpClient | undefined;
    try {
      qmp = await QmpClient.connect(this.#paths(vmId).qmpSocket, { timeoutMs: quitTimeoutMs });
    } catch {
      // not reachable over QMP
    }
    if (qmp) {
      try {
        await qmp.execute('quit', undefined, { timeoutMs: Math.max(1, quitDeadline - Date.now()) });
      } catch {
        // 'closed' is normal: QEMU may exit before its reply is read.
      } finally {
        await qmp.close();
      }
      if (await goneWithin(Math.max(0, quitDeadline - Date.now()))) return 'quit';
    }

    // 2./3. Signals, re-checking identity each time so a recycled pid is never hit.
    let previous: 'quit' | 'sigterm' = 'quit';
    for (const [signal, waitMs, result] of [
      ['SIGTERM', termTimeoutMs, 'sigterm'],
      ['SIGKILL', 10_000, 'sigkill'],
    ] as const) {
      const now = await this.#observe(vmId);
      if (now.state === 'gone' || (now.state === 'alive' && now.pid !== pid)) return previous; // it went away on its own just now
      if (now.state === 'unknown') throw this.#unknownError(vmId, now, `not sending ${signal} to pid ${pid}`);
      if (now.confirmed) {
        try {
          process.kill(pid, signal);
        } catch {
          // exited between the check and the signal
        }
      } // else exiting (empty cmdline): no signal to an unconfirmed pid; wait for it
      if (await goneWithin(waitMs)) return result;
      if (result === 'sigterm') previous = result;
    }
    if (last.state === 'unknown') throw this.#unknownError(vmId, last, 'cannot confirm it stopped');
    throw new QemuError('stop-timeout', `VM ${vmId}: QEMU pid ${pid} still alive after SIGKILL`, vmId);
  }

  /** Remove the VM's run directory (pidfile, QMP socket, log) once its QEMU is observed gone:
   *  removing them from under a live QEMU would orphan it. */
  async cleanup(vmId: string): Promise<void> {
    const o = await this.#observe(vmId);
    if (o.state === 'alive') throw new QemuError('still-running', `VM ${vmId}: QEMU pid ${o.pid} still running; terminate it before cleanup`, vmId);
    if (o.state === 'unknown') throw this.#unknownError(vmId, o, `not removing ${this.#paths(vmId).dir}`);
    await rm(this.#paths(vmId).dir, { recursive: true, force: true });
  }
}
