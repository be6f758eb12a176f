/**
 * The tool runner every adapter spawns its tool through (src/host/tool.ts): exit codes, signals,
 * output capture and its cap, the timeout's SIGTERM then SIGKILL, and spawn failures as data.
 */
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isRetryableSpawnError, runTool } from '../src/host/tool.ts';

const NODE = process.execPath;
const node = (code: string) => ['-e', code];

describe('runTool', () => {
  let tmp: string;
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'gpuvm-tool-'));
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it('collects stdout and stderr and the exit code, with argv passed as is (no shell)', async () => {
    const r = await runTool(NODE, [...node('process.stdout.write(JSON.stringify(process.argv.slice(1))); process.stderr.write("warn"); process.exit(3)'), '$(id)', 'a b', ';rm'], { timeoutMs: 10_000 });
    expect(r).toEqual({ exitCode: 3, signal: null, stdout: '["$(id)","a b",";rm"]', stderr: 'warn', timedOut: false, overflow: false });
  });

  it('exit 0 and stdin ignored (a read sees end of file at once)', async () => {
    const r = await runTool(NODE, node('let n = 0; process.stdin.on("data", (c) => (n += c.length)).on("end", () => console.log("stdin bytes", n))'), { timeoutMs: 10_000 });
    expect(r).toMatchObject({ exitCode: 0, stdout: 'stdin bytes 0\n', timedOut: false });
  });

  it('reports death by a signal', async () => {
    const r = await runTool(NODE, node('process.kill(process.pid, "SIGKILL")'), { timeoutMs: 10_000 });
    expect(r).toMatchObject({ exitCode: null, signal: 'SIGKILL', timedOut: false });
  });

  it('times out with SIGTERM', async () => {
    const started = Date.now();
    const r = await runTool(NODE, node('console.log("started"); setInterval(() => {}, 1000)'), { timeoutMs: 300 });
    expect(r).toMatchObject({ exitCode: null, signal: 'SIGTERM', timedOut: true, stdout: 'started\n' });
    expect(Date.now() - started).toBeLessThan(3_000);
  });

  it('follows with SIGKILL after the grace when SIGTERM is ignored', async () => {
    const started = Date.now();
    const r = await runTool(NODE, node('process.on("SIGTERM", () => console.log("ignoring SIGTERM")); console.log("up"); setInterval(() => {}, 1000)'), { timeoutMs: 300, killGraceMs: 300 });
    expect(r).toMatchObject({ exitCode: null, signal: 'SIGKILL', timedOut: true });
    expect(r.stdout).toContain('ignoring SIGTERM');
    expect(Date.now() - started).toBeLessThan(3_000);
  });

  it('caps the output: past maxBytes the tool is killed and its output cut there', async () => {
    const r = await runTool(NODE, node('const b = "x".repeat(65536); (function w() { while (process.stdout.write(b)); process.stdout.once("drain", w); })()'), { timeoutMs: 10_000, maxBytes: 100_000 });
    expect(r.overflow).toBe(true);
    expect(r.stdout.length).toBe(100_000);
    expect(r.exitCode).toBe(null);
    expect(r.timedOut).toBe(false);
  });

  it('does not wait for a grandchild that keeps the pipes open after the tool exits', async () => {
    const script = join(tmp, 'leaves-a-child.sh');
    const grandchild = join(tmp, 'grandchild.pid');
    writeFileSync(script, `#!/bin/sh\necho parent\nsleep 30 &\necho $! > '${grandchild}'\nexit 0\n`);
    chmodSync(script, 0o755);
    const started = Date.now();
    const r = await runTool(script, [], { timeoutMs: 10_000 });
    process.kill(Number(readFileSync(grandchild, 'utf8')), 'SIGKILL');
    expect(r).toMatchObject({ exitCode: 0, stdout: 'parent\n', timedOut: false });
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it('a missing binary or one that is not executable is a spawnError, not a throw, and not retryable', async () => {
    const missing = await runTool(join(tmp, 'no-such-tool'), ['-l'], { timeoutMs: 10_000 });
    expect(missing).toMatchObject({ exitCode: null, signal: null, timedOut: false, spawnError: { code: 'ENOENT' } });
    expect(missing.spawnError!.message).toContain('no-such-tool');
    expect(isRetryableSpawnError(missing.spawnError)).toBe(false);

    const plain = join(tmp, 'not-executable');
    writeFileSync(plain, '#!/bin/sh\necho hi\n');
    chmodSync(plain, 0o644);
    const denied = await runTool(plain, [], { timeoutMs: 10_000 });
    expect(denied.spawnError?.code).toBe('EACCES');
    expect(isRetryableSpawnError(denied.spawnError)).toBe(false);
  });

  it('a synchronous spawn throw (invalid argument) is a spawnError too', async () => {
    const r = await runTool(NODE, ['a\0b'], { timeoutMs: 10_000 });
    expect(r.spawnError?.code).toBe('ERR_INVALID_ARG_VALUE');
    expect(isRetryableSpawnError(r.spawnError)).toBe(false);
  });

  it('resource exhaustion codes are the retryable ones', () => {
    for (const code of ['EMFILE', 'ENFILE', 'EAGAIN', 'ENOMEM']) expect(isRetryableSpawnError({ code })).toBe(true);
    for (const code of ['ENOENT', 'EACCES', 'ENOEXEC', 'UNKNOWN']) expect(isRetryableSpawnError({ code })).toBe(false);
    expect(isRetryableSpawnError(undefined)).toBe(false);
  });
});
