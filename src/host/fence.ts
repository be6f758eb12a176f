/**
 * Host-side fencing of actions that are not idempotent (fmpm -a/-d, driver rebinds, starting QEMU),
 * as Ubicloud's daemonizer names host jobs so they never run twice: the database fences the writes
 * of a stale agent, and this fences its acts on the host.
 *
 * Per key (a partition, a VM) a small file in the fence folder holds the stamp of the last action
 * run on it: the agent epoch and the stream version (generation) of the effect that ran it. An
 * action runs under an exclusive flock(2) of that file — so two tries on one partition never overlap
 * on the host — and only if its own stamp is not older than the recorded one: an action from a
 * stale epoch (an agent that lost its lock and has not noticed yet), or from an older cycle of the
 * partition, refuses to run. Every action is appended to `journal.jsonl` when it starts and ends,
 * the host's own record of what ran, under which epoch.
 */
import { appendFileSync, closeSync, ftruncateSync, mkdirSync, openSync, readSync, writeSync, constants as fsConstants, fstatSync } from 'node:fs';
import { join } from 'node:path';
import { flockWait } from '../flock.ts';

export const JOURNAL_FILE = 'journal.jsonl';
const KEY_PATTERN = /^[a-z0-9][a-z0-9-]{0,79}$/;

export interface FenceStamp {
  epoch: number;
  /** The stream version of the effect acting: later cycles of a partition have higher ones. */
  generation: number;
  effectId: string;
  attempt: number;
}

/** One line of the journal. */
export interface JournalLine extends FenceStamp {
  key: string;
  action: string;
  phase: 'start' | 'end' | 'refused';
  at: string;
  pid: number;
  outcome?: 'ok' | 'error';
  error?: string;
}

/** An action whose stamp is older than the one on record: it must not run. */
export class StaleActionError extends Error {
  override name = 'StaleActionError';
  readonly retryable = false;
  constructor(
    message: string,
    /** True when a newer agent epoch acted: the caller itself is stale, not just this effect. */
    readonly staleEpoch: boolean,
  ) {
    super(message);
  }
}

export class HostFence {
  constructor(readonly dir: string) {}

  /** Runs `action` under the key's lock if `stamp` is not older than the last recorded; records it in the journal. */
  async run<T>(key: string, action: string, stamp: FenceStamp, signal: AbortSignal, fn: () => Promise<T>): Promise<T> {
    if (!KEY_PATTERN.test(key)) throw new Error(`invalid fence key ${JSON.stringify(key)}`);
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const fd = openSync(join(this.dir, key), fsConstants.O_RDWR | fsConstants.O_CREAT, 0o600);
    try {
      await flockWait(fd, signal);
      const last = readStamp(fd);
      if (last && (last.epoch > stamp.epoch || last.generation > stamp.generation)) {
        this.journal({ ...stamp, key, action, phase: 'refused', at: new Date().toISOString(), pid: process.pid });
        throw new StaleActionError(
          `refusing ${action} on ${key}: ${last.effectId} (epoch ${last.epoch}, generation ${last.generation}) acted after this try was made (epoch ${stamp.epoch}, generation ${stamp.generation})`,
          last.epoch > stamp.epoch,
        );
      }
      // The last look before acting: a lease lost while waiting for the lock stops here.
      signal.throwIfAborted();
      writeStamp(fd, stamp);
      this.journal({ ...stamp, key, action, phase: 'start', at: new Date().toISOString(), pid: process.pid });
      try {
        const result = await fn();
        this.journal({ ...stamp, key, action, phase: 'end', outcome: 'ok', at: new Date().toISOString(), pid: process.pid });
        return result;
      } catch (err) {
        this.journal({ ...stamp, key, action, phase: 'end', outcome: 'error', error: String((err as Error)?.message ?? err).slice(0, 300), at: new Date().toISOString(), pid: process.pid });
        throw err;
      }
    } finally {
      closeSync(fd); // drops the lock
    }
  }

  private journal(line: JournalLine): void {
    appendFileSync(join(this.dir, JOURNAL_FILE), `${JSON.stringify(line)}\n`, { mode: 0o600 });
  }
}

function readStamp(fd: number): FenceStamp | null {
  const size = fstatSync(fd).size;
  if (size === 0) return null;
  const buf = Buffer.alloc(size);
  readSync(fd, buf, 0, size, 0);
  try {
    return JSON.parse(buf.toString('utf8')) as FenceStamp;
  } catch {
    // A torn write (a crash mid-write) holds no stamp: the next action writes one.
    return null;
  }
}

function writeStamp(fd: number, stamp: FenceStamp): void {
  ftruncateSync(fd, 0);
  writeSync(fd, JSON.stringify(stamp), 0);
}
