/**
 * The data folder (`./.gpuvm` by default): the embedded database, the simulated host, the QEMU run
 * folders. Readable by its owner only (0700), and held by one gpuvm process at a time: an OS-level
 * exclusive lock (flock(2) on `<dataDir>/gpuvm.lock`), which the kernel drops when the holder dies,
 * so a kill -9 never leaves a stale lock. Two processes on one PGlite folder would diverge, and a
 * second `serve` would take the first one's VMs for strays; the second is refused before it writes.
 */
import { closeSync, chmodSync, ftruncateSync, mkdirSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { tryFlock } from '../flock.ts';

export const LOCK_FILE = 'gpuvm.lock';

export class DataDirBusyError extends Error {
  override name = 'DataDirBusyError';
}

export interface DataDirLock {
  dir: string;
  release(): void;
}

/** Creates the folder (0700) if needed, takes it away from group and others, and locks it; throws DataDirBusyError naming the holder. */
export function lockDataDir(dir: string, command: string): DataDirLock {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  // A folder made before this rule (or by hand) is closed to others now: its files may be 0644/0666.
  if ((statSync(dir).mode & 0o077) !== 0) chmodSync(dir, 0o700);
  const path = join(dir, LOCK_FILE);
  const fd = openSync(path, 'a+', 0o600);
  let locked: boolean;
  try {
    locked = tryFlock(fd);
  } catch (err) {
    closeSync(fd);
    throw err;
  }
  if (!locked) {
    closeSync(fd);
    throw new DataDirBusyError(`the data folder ${dir} is in use by ${describeHolder(path)}; stop it first, or give this one another --data-dir`);
  }
  // Who holds it, for the next one's error message (written only once the lock is ours).
  const holder = JSON.stringify({ pid: process.pid, machine: hostname(), command, since: new Date().toISOString() });
  ftruncateSync(fd, 0);
  writeSync(fd, `${holder}\n`, 0);
  let released = false;
  return {
    dir,
    release() {
      if (released) return;
      released = true;
      try {
        ftruncateSync(fd, 0);
      } catch {}
      closeSync(fd); // closing the descriptor drops the lock
    },
  };
}

function describeHolder(path: string): string {
  try {
    const h = JSON.parse(readFileSync(path, 'utf8')) as { pid: number; machine: string; command: string; since: string };
    return `\`gpuvm ${h.command}\` (pid ${h.pid} on ${h.machine}, since ${h.since})`;
  } catch {
    return 'another gpuvm process';
  }
}
