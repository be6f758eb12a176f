/**
 * Named crash points, compiled in and inert unless GPUVM_CRASH_AT names what to do:
 *   GPUVM_CRASH_AT=<point>          kill -9 this process when it reaches <point>;
 *   GPUVM_CRASH_AT=walk:<file>      kill -9 at the first point not yet listed in <file>, after
 *                                   appending it there: restarted again and again with the same
 *                                   setting, the process dies once at every point a lifecycle reaches.
 * Points: `effect:<type>:before-action`, `effect:<type>:after-action` (the host was changed, the
 * outcome not yet committed), `event:<type>:after-commit`. A kill inside a transaction is a kill
 * before its commit. The crash-at-every-step test drives this; nothing else sets the variable.
 */
import { appendFileSync, closeSync, fsyncSync, openSync, readFileSync } from 'node:fs';

const setting = process.env.GPUVM_CRASH_AT ?? '';

export function crashPoint(name: string): void {
  if (setting === '') return;
  if (setting.startsWith('walk:')) {
    const file = setting.slice('walk:'.length);
    let visited: string[] = [];
    try {
      visited = readFileSync(file, 'utf8').split('\n');
    } catch {}
    if (visited.includes(name)) return;
    appendFileSync(file, `${name}\n`);
    const fd = openSync(file, 'r');
    fsyncSync(fd);
    closeSync(fd);
  } else if (setting !== name) {
    return;
  }
  process.kill(process.pid, 'SIGKILL');
}
