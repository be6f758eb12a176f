/**
 * The database restarts under a batch of lifecycles: gpuvm reconnects by itself (a new pool
 * connection, a new LISTEN connection, outcomes recorded once the database is back), and every
 * lifecycle completes with nothing duplicated or lost.
 */
import { execFile } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectInvariantsAtRest } from './support/invariants.ts';
import { startTestService, usingPostgres, waitUntil, type TestService } from './support/env.ts';

let t: TestService;

async function restartPostgres(): Promise<number> {
  const version = readdirSync('/etc/postgresql')[0]!;
  const started = Date.now();
  await promisify(execFile)('pg_ctlcluster', ['--skip-systemctl-redirect', version, 'main', 'restart', '-m', 'fast'], { timeout: 60_000 });
  return Date.now() - started;
}

/** Retries an API call across the restart: the service answers 500 while the database is down. */
async function retrying<T>(call: () => Promise<T>): Promise<T> {
  for (let i = 0; ; i++) {
    try {
      return await call();
    } catch (err) {
      if (i > 100) throw err;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

describe.runIf(usingPostgres)('Postgres restart under load (postgres)', () => {
  beforeAll(async () => {
    t = await startTestService();
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('completes every lifecycle across two database restarts, nothing duplicated or lost', async () => {
    const sizes = [1, 1, 2, 4];
    const vms: { id: string }[] = [];
    for (const gpus of sizes) vms.push(await t.service.vms.create({ gpus, actor: 'test' }));
    const downMs = await restartPostgres();
    const states = async () => Promise.all(vms.map((v) => retrying(() => t.service.vms.get(v.id)).then((r) => r.state)));
    await waitUntil('all running after the restart', async () => (await states()).every((s) => s === 'running'), 120_000, 200);

    for (const v of vms) await retrying(() => t.service.vms.delete(v.id, 'test'));
    await restartPostgres();
    await waitUntil('all deleted after the second restart', async () => (await states()).every((s) => s === 'deleted'), 120_000, 200);

    await expectInvariantsAtRest(t.service);
    // The workers' LISTEN connection came back too (polling alone would also finish the work).
    const { sql } = await import('kysely');
    const listening = await sql<{ n: string }>`select count(*)::text as n from pg_stat_activity where datname = current_database() and query ilike 'listen %'`.execute(t.service.db.kysely);
    expect(Number(listening.rows[0]!.n)).toBeGreaterThanOrEqual(1);
    for (const v of vms) {
      const h = await t.service.vms.history(v.id);
      const steps = h.events.filter((e) => e.stream === `vm:${v.id}`).map((e) => e.to);
      expect(steps).toEqual(['provisioning', 'starting', 'running', 'stopping', 'terminating', 'releasing', 'deleted']);
      // Every effect ran to done exactly once in the log: one successful try each.
      for (const e of h.effects) {
        expect(e.status, `${e.id}`).toBe('done');
        expect(e.tries.filter((tr) => tr.outcome === 'ok'), `${e.id}`).toHaveLength(1);
      }
    }
    console.log(`postgres-restart: 2 restarts (first took ${downMs} ms), ${vms.length} lifecycles completed`);
  }, 300_000);
});
