/**
 * One gpuvm per data folder and one agent per host, between real processes: a second `gpuvm serve`
 * is refused with one line naming the holder, exits non-zero and writes nothing; the data folder
 * is its owner's alone.
 */
import { execFile } from 'node:child_process';
import { lstatSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, startServeChild, type ServeChild } from './support/child.ts';
import { freshDatabaseUrl, tempDir, usingPostgres } from './support/env.ts';

const BIN = fileURLToPath(new URL('../bin/gpuvm.js', import.meta.url));

/** Every file and folder under `dir` (symbolic links, as in the simulated sysfs, not followed) with its mode and modification time. */
function walk(dir: string, out = new Map<string, { mode: number; mtimeMs: number }>()): Map<string, { mode: number; mtimeMs: number }> {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    const st = lstatSync(path, { throwIfNoEntry: false });
    if (!st || st.isSymbolicLink()) continue;
    out.set(path, { mode: st.mode, mtimeMs: st.mtimeMs });
    if (st.isDirectory()) walk(path, out);
  }
  return out;
}

async function runSecond(args: string[], env: Record<string, string>): Promise<{ code: number; stderr: string }> {
  const childEnv: Record<string, string> = { ...(process.env as Record<string, string>), ...env };
  if (!env.DATABASE_URL) delete childEnv.DATABASE_URL;
  try {
    await promisify(execFile)(process.execPath, [BIN, ...args], { env: childEnv, timeout: 60_000 });
    return { code: 0, stderr: '' };
  } catch (err) {
    const e = err as { code?: number; stderr?: string };
    return { code: e.code ?? -1, stderr: e.stderr ?? '' };
  }
}

describe(`one gpuvm per data folder, one agent per host (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  const dataDir = tempDir('gpuvm-one-');
  let db: { url: string | undefined; drop: () => Promise<void> };
  let first: ServeChild;

  beforeAll(async () => {
    db = await freshDatabaseUrl();
    first = await startServeChild({ dataDir, port: await freePort(), databaseUrl: db.url, env: { GPUVM_QEMU: fileURLToPath(new URL('../src/host/sim/bin/qemu-standin.mjs', import.meta.url)) } });
  }, 90_000);
  afterAll(async () => {
    await first?.kill('SIGTERM');
    await promisify(execFile)(process.execPath, [BIN, 'sim-down', '--data-dir', dataDir]).catch(() => {});
    await db?.drop();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('keeps the data folder to its owner: 0700, nothing in it writable by group or others', () => {
    expect(statSync(dataDir).mode & 0o777).toBe(0o700);
    const open = [...walk(dataDir)].filter(([, st]) => (st.mode & 0o022) !== 0).map(([path, st]) => `${path} ${(st.mode & 0o777).toString(8)}`);
    expect(open).toEqual([]);
  });

  it('refuses a second `gpuvm serve` on the same data folder with one line, and it writes nothing', async () => {
    const before = walk(dataDir);
    const second = await runSecond(['serve', '--port', String(await freePort()), '--data-dir', dataDir], db.url ? { DATABASE_URL: db.url } : {});
    expect(second.code).not.toBe(0);
    expect(second.stderr).toMatch(new RegExp(`^gpuvm: the data folder ${dataDir} is in use by \`gpuvm serve\` \\(pid ${first.proc.pid} on [^,]+, since [0-9T:.Z-]+\\); stop it first, or give this one another --data-dir\\n$`));
    // Nothing was written: the first one's files are as they were (its own writes aside, which touch the database folder).
    const after = walk(dataDir);
    const added = [...after.keys()].filter((p) => !before.has(p) && !p.includes(`${join(dataDir, 'pglite')}/`) && !p.includes(join(dataDir, 'fence')));
    expect(added).toEqual([]);
  }, 60_000);

  it.runIf(usingPostgres)('refuses a second agent for the same host on the same Postgres, naming the holder, before it writes', async () => {
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    try {
      const count = async () => Number((await client.query('select count(*)::int as n from events')).rows[0].n);
      const events = await count();
      const otherDir = tempDir('gpuvm-one-b-');
      try {
        const second = await runSecond(['serve', '--port', String(await freePort()), '--data-dir', otherDir], { DATABASE_URL: db.url! });
        expect(second.code).not.toBe(0);
        expect(second.stderr).toMatch(new RegExp(`^gpuvm: host sim-b200 already has a running agent: \`gpuvm serve\` \\(pid ${first.proc.pid} on [^,]+, epoch 1, since `));
        expect(second.stderr.split('\n').filter(Boolean)).toHaveLength(1);
      } finally {
        await promisify(execFile)(process.execPath, [BIN, 'sim-down', '--data-dir', otherDir]).catch(() => {});
        rmSync(otherDir, { recursive: true, force: true });
      }
      expect(await count()).toBe(events);
      expect((await client.query('select epoch::int, pid from agents')).rows).toEqual([{ epoch: 1, pid: first.proc.pid }]);
    } finally {
      await client.end();
    }
  }, 90_000);
});
