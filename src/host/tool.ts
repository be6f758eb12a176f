/**
 * Runs a host tool (fmpm, nvidia-smi, `qemu --version`, `nv-fabricmanager --version`) and returns
 * what happened as plain data; it never throws and never leaves an event unhandled, so each adapter
 * maps the result to its own errors.
 *
 * An argv array, never a shell; stdin ignored; stdout and stderr collected up to a byte cap (a tool
 * that prints more is killed: its output is not what the adapter reads); a timeout sends SIGTERM,
 * then SIGKILL after a grace. The 'error' listener is attached before anything else can happen:
 * a spawn that fails for lack of resources (EMFILE, ENFILE, EAGAIN, ENOMEM) is reported as
 * `spawnError`, like a missing binary, instead of crashing the process with an unhandled 'error'
 * event (execa 9 under EMFILE threw "subprocess.stdio is not iterable" and left that event unhandled).
 */
import { spawn, type ChildProcess } from 'node:child_process';

export interface ToolOptions {
  /** Wall-clock limit from the spawn; then SIGTERM, and SIGKILL after `killGraceMs`. */
  timeoutMs: number;
  /** Between SIGTERM and SIGKILL (default 2 s). */
  killGraceMs?: number;
  /** Per stream; more output kills the tool and sets `overflow` (default 16 MiB). */
  maxBytes?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

export interface ToolResult {
  /** null when the tool did not exit on its own (killed by a signal, or never started). */
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** The timeout fired and the tool was killed. */
  timedOut: boolean;
  /** A stream went past `maxBytes`: the tool was killed and its output cut there. */
  overflow: boolean;
  /** The tool could not be started (ENOENT, EACCES, EMFILE…): nothing ran. */
  spawnError?: { code: string; message: string };
}

/** Spawn failures that come from this process or the machine running short, not from the tool:
 *  trying again later can succeed. ENOENT, EACCES, ENOEXEC… are the binary's fault and stay. */
export const RETRYABLE_SPAWN_CODES: ReadonlySet<string> = new Set(['EMFILE', 'ENFILE', 'EAGAIN', 'ENOMEM']);

export function isRetryableSpawnError(spawnError: { code: string } | undefined): boolean {
  return spawnError !== undefined && RETRYABLE_SPAWN_CODES.has(spawnError.code);
}

const DEFAULT_KILL_GRACE_MS = 2_000;
const DEFAULT_MAX_BYTES = 16 * 1024 * 1024;
/** After the tool exits, how long its pipes may stay open (held by a child it left behind). */
const DRAIN_AFTER_EXIT_MS = 1_000;

function errCode(err: unknown): string {
  const code = (err as NodeJS.ErrnoException)?.code;
  return typeof code === 'string' && code !== '' ? code : 'UNKNOWN';
}

function errMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

export function runTool(bin: string, args: readonly string[], opts: ToolOptions): Promise<ToolResult> {
  return new Promise<ToolResult>((resolve) => {
    const maxBytes = opts.maxBytes ?? DEFAULT_MAX_BYTES;
    const graceMs = opts.killGraceMs ?? DEFAULT_KILL_GRACE_MS;
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const size = { out: 0, err: 0 };
    let timedOut = false;
    let overflow = false;
    let exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
    let done = false;
    const timers: NodeJS.Timeout[] = [];
    let child: ChildProcess | undefined;

    const finish = (spawnError?: ToolResult['spawnError']) => {
      if (done) return;
      done = true;
      for (const t of timers) clearTimeout(t);
      child?.stdout?.destroy();
      child?.stderr?.destroy();
      resolve({
        exitCode: exit?.code ?? null,
        signal: exit?.signal ?? null,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        timedOut,
        overflow,
        ...(spawnError ? { spawnError } : {}),
      });
    };

    const kill = (signal: NodeJS.Signals) => {
      try {
        child?.kill(signal);
      } catch {
        // already gone
      }
    };
    /** SIGTERM now, SIGKILL after the grace; and give up waiting a grace after that (a process in
     *  uninterruptible sleep may outlive SIGKILL for a while: the caller is not held hostage). */
    const stop = () => {
      kill('SIGTERM');
      timers.push(
        setTimeout(() => {
          kill('SIGKILL');
          timers.push(setTimeout(() => finish(), graceMs));
        }, graceMs),
      );
    };

    try {
      child = spawn(bin, [...args], { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env, cwd: opts.cwd });
    } catch (e) {
      // Synchronous failures: bad arguments, and on some Node versions resource exhaustion.
      finish({ code: errCode(e), message: errMessage(e) });
      return;
    }
    // First, before anything else: an 'error' without a listener would kill the whole process.
    child.on('error', (e) => {
      // No pid: it never started (ENOENT, EACCES, EMFILE…). Otherwise (a failed kill, say) the
      // exit or the timers settle the result.
      if (child?.pid === undefined) finish({ code: errCode(e), message: errMessage(e) });
    });

    const collect = (stream: NodeJS.ReadableStream | null, chunks: Buffer[], key: 'out' | 'err') => {
      if (!stream) return;
      stream.on('error', () => {
        // A broken pipe ends what we read; the exit still decides the result.
      });
      stream.on('data', (chunk: Buffer) => {
        if (overflow) return;
        const room = maxBytes - size[key];
        if (chunk.length > room) {
          chunks.push(chunk.subarray(0, Math.max(0, room)));
          size[key] = maxBytes;
          overflow = true;
          stop();
          return;
        }
        chunks.push(chunk);
        size[key] += chunk.length;
      });
    };
    collect(child.stdout, out, 'out');
    collect(child.stderr, err, 'err');

    child.on('exit', (code, signal) => {
      exit = { code, signal };
      // 'close' follows once both pipes end; a grandchild holding them open must not hold us.
      timers.push(setTimeout(() => finish(), DRAIN_AFTER_EXIT_MS));
    });
    child.on('close', (code, signal) => {
      exit ??= { code, signal };
      finish();
    });

    timers.push(
      setTimeout(() => {
        if (exit !== null || done) return;
        timedOut = true;
        stop();
      }, opts.timeoutMs),
    );
  });
}
