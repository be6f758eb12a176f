/**
 * flock(2): an exclusive lock on an open file, held until the descriptor is closed — and dropped by
 * the kernel when the holder dies, so a kill -9 never leaves a stale lock. Node has no binding of
 * its own; fs-ext (a small native addon) provides it, loaded on first use.
 */
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
let fsExt: { flockSync(fd: number, flags: 'exnb'): void } | undefined;

/** Takes the lock without waiting; false when another descriptor holds it. */
export function tryFlock(fd: number): boolean {
  fsExt ??= require('fs-ext') as { flockSync(fd: number, flags: 'exnb'): void };
  try {
    fsExt.flockSync(fd, 'exnb');
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EAGAIN' || code === 'EWOULDBLOCK') return false;
    throw err;
  }
}

/** Waits for the lock without blocking the event loop (polling every `pollMs`); throws when `signal` fires first. */
export async function flockWait(fd: number, signal: AbortSignal, pollMs = 20): Promise<void> {
  for (;;) {
    signal.throwIfAborted();
    if (tryFlock(fd)) return;
    await new Promise((r) => setTimeout(r, pollMs));
  }
}
