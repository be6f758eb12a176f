/**
 * Run under a low open-file limit (`prlimit --nofile=N:N node --import tsx this-file BIN`): opens
 * files until EMFILE, then calls Fmpm.list() with every descriptor taken, and prints one JSON line
 * per call. A crash (an unhandled 'error' event of a ChildProcess) prints nothing and exits non-zero.
 * After freeing the descriptors it lists again, to show the adapter still works.
 */
import { closeSync, openSync } from 'node:fs';
import { Fmpm, FmpmError } from '../../src/host/fmpm.ts';

const bin = process.argv[2];
if (!bin) throw new Error('usage: fmpm-emfile.ts <fmpm binary>');
const fmpm = new Fmpm({ bin, timeoutMs: 10_000 });

const held: number[] = [];
for (;;) {
  try {
    held.push(openSync('/dev/null', 'r'));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EMFILE') throw err;
    break;
  }
}

const report = (what: string, r: Record<string, unknown>) => process.stdout.write(`${JSON.stringify({ what, ...r })}\n`);
try {
  const table = await fmpm.list();
  report('exhausted', { ok: true, numPartitions: table.numPartitions });
} catch (err) {
  const e = err as FmpmError;
  report('exhausted', { ok: false, isFmpmError: e instanceof FmpmError, code: e.code, retryable: e.retryable, message: e.message });
}
for (const fd of held.splice(0)) closeSync(fd);
try {
  const table = await fmpm.list();
  report('freed', { ok: true, numPartitions: table.numPartitions });
} catch (err) {
  report('freed', { ok: false, code: (err as FmpmError).code, message: (err as Error).message });
}
