/** The service's own start and stop: a start that fails half-way leaves nothing running behind it. */
import { createServer, type Server } from 'node:net';
import { rmSync } from 'node:fs';
import pg from 'pg';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { startService } from '../src/service.ts';
import { freshDatabaseUrl, tempDir, testConfig, usingPostgres } from './support/env.ts';

describe(`gpuvm serve start-up (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  it('a start that fails on a taken port stops its worker and monitors and closes every connection', async () => {
    const taken: Server = await new Promise((resolve) => {
      const s = createServer().listen(0, '127.0.0.1', () => resolve(s));
    });
    const port = (taken.address() as { port: number }).port;
    const dataDir = tempDir();
    const db = await freshDatabaseUrl();
    try {
      const lines: { level: number; msg: string }[] = [];
      const log = pino({ level: 'warn' }, { write: (line: string) => void lines.push(JSON.parse(line)) });
      await expect(startService(testConfig(dataDir, db.url, { port }), { log })).rejects.toThrow(/EADDRINUSE/);
      // Left running, the monitors (every 100 ms here) and the worker would fail against the closed database.
      const logged = lines.length;
      await new Promise((r) => setTimeout(r, 500));
      expect(lines.slice(logged).map((l) => l.msg)).toEqual([]);
      if (db.url) {
        // The worker's LISTEN connection and the pool are gone: nothing of the failed start still runs.
        const name = new URL(db.url).pathname.slice(1);
        const admin = new pg.Client({ connectionString: process.env.DATABASE_URL });
        await admin.connect();
        const { rows } = await admin.query('select count(*)::int as n from pg_stat_activity where datname = $1', [name]);
        await admin.end();
        expect(rows[0].n).toBe(0);
      }
    } finally {
      taken.close();
      const { stopSimKernel } = await import('../src/host/sim/sim-host.ts');
      await stopSimKernel(`${dataDir}/sim/sim-b200`).catch(() => {});
      await db.drop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
