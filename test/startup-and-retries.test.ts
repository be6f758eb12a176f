/**
 * What a client and a restarting service can count on (issue: safety core, findings 5 and 6):
 * creates wait for the first reconciliation (503 + Retry-After, health `starting`), an
 * Idempotency-Key makes a retried create return the VM it made, and an ambiguous commit (the
 * connection lost after COMMIT) is resolved by reading back — for a create, and for a worker's
 * outcome, whose follow-ups then run at once instead of after the lease.
 */
import { CompiledQuery } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startService, type Service } from '../src/service.ts';
import { stopSimKernel, writeFaults } from '../src/host/sim/sim-host.ts';
import { QEMU_STANDIN } from '../src/host/host.ts';
import { http } from './support/child.ts';
import { freshDatabaseUrl, quietLog, startTestService, tempDir, testConfig, usingPostgres, waitUntil, type TestService } from './support/env.ts';
import { rmSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Makes the next statement whose parameters carry `marker` fail on the client after the database
 * committed it, as a connection lost between COMMIT and its answer would.
 */
function loseAnswerOnce(service: Service, marker: string): { tripped: () => boolean } {
  const kysely = service.db.kysely as unknown as { executeQuery: (q: CompiledQuery, ...rest: unknown[]) => Promise<unknown> };
  const original = kysely.executeQuery.bind(kysely);
  let tripped = false;
  kysely.executeQuery = async (q: CompiledQuery, ...rest: unknown[]) => {
    const result = await original(q, ...rest);
    if (!tripped && q.sql.includes('insert into events') && q.parameters.some((p) => typeof p === 'string' && p.includes(marker))) {
      tripped = true;
      throw new Error('Connection terminated unexpectedly');
    }
    return result;
  };
  return { tripped: () => tripped };
}

describe(`start-up and client retries (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  let t: TestService;
  beforeAll(async () => {
    t = await startTestService({ qemuBin: QEMU_STANDIN, leaseMs: 20_000 });
  });
  afterAll(() => t?.cleanup());
  const api = (method: string, path: string, body?: unknown, headers: Record<string, string> = {}) =>
    fetch(t.service.url + path, { method, headers: { ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...headers }, body: body === undefined ? undefined : JSON.stringify(body) }).then(async (r) => ({
      status: r.status,
      headers: r.headers,
      body: (await r.json()) as any,
    }));

  it('an Idempotency-Key returns the VM it made, and refuses to make a different one', async () => {
    const key = 'a4d1c8f0-0000-4000-8000-000000000001';
    const first = await api('POST', '/v1/vms', { gpus: 1, name: 'idem-1' }, { 'idempotency-key': key });
    expect(first.status).toBe(202);
    const again = await api('POST', '/v1/vms', { gpus: 1, name: 'idem-1' }, { 'idempotency-key': key });
    expect(again.status).toBe(202);
    expect(again.body.id).toBe(first.body.id);
    const other = await api('POST', '/v1/vms', { gpus: 2 }, { 'idempotency-key': key });
    expect(other.status).toBe(409);
    expect(other.body.error.code).toBe('idempotency-key-reused');
    expect((await api('POST', '/v1/vms', { gpus: 1 }, { 'idempotency-key': 'no spaces' })).status).toBe(400);
    const vms = (await api('GET', '/v1/vms')).body.vms.filter((v: any) => v.name === 'idem-1');
    expect(vms).toHaveLength(1);
    await api('DELETE', `/v1/vms/${first.body.id}`);
    await waitUntil('the VM to be deleted', async () => (await api('GET', `/v1/vms/${first.body.id}`)).body.state === 'deleted');
  });

  it('a create whose commit answer was lost is read back: 202 with the VM, and one VM', async () => {
    const trap = loseAnswerOnce(t.service, '"type":"CREATE"');
    const key = 'a4d1c8f0-0000-4000-8000-000000000002';
    const started = Date.now();
    const created = await api('POST', '/v1/vms', { gpus: 1, name: 'ambiguous-1' }, { 'idempotency-key': key });
    expect(trap.tripped()).toBe(true);
    expect(created.status).toBe(202);
    expect(created.body.name).toBe('ambiguous-1');
    const retried = await api('POST', '/v1/vms', { gpus: 1, name: 'ambiguous-1' }, { 'idempotency-key': key });
    expect(retried.body.id).toBe(created.body.id);
    expect((await api('GET', '/v1/vms')).body.vms.filter((v: any) => v.name === 'ambiguous-1')).toHaveLength(1);
    await waitUntil('the VM to run', async () => (await api('GET', `/v1/vms/${created.body.id}`)).body.state === 'running', 30_000);
    // Its first effects were handed to the worker by the write whose answer was lost: they ran at once, not after the 20 s lease.
    expect(Date.now() - started).toBeLessThan(15_000);
    await api('DELETE', `/v1/vms/${created.body.id}`);
    await waitUntil('the VM to be deleted', async () => (await api('GET', `/v1/vms/${created.body.id}`)).body.state === 'deleted', 30_000);
  });

  it('a worker outcome whose commit answer was lost stands, and its follow-ups run at once (not after the 20 s lease)', async () => {
    const trap = loseAnswerOnce(t.service, '"type":"ACTIVATED"');
    const started = Date.now();
    const created = await api('POST', '/v1/vms', { gpus: 2 });
    expect(created.status).toBe(202);
    await waitUntil('the VM to run', async () => (await api('GET', `/v1/vms/${created.body.id}`)).body.state === 'running', 15_000);
    expect(trap.tripped()).toBe(true);
    expect(Date.now() - started).toBeLessThan(15_000);
    const history = (await api('GET', `/v1/vms/${created.body.id}/history`)).body;
    const activate = history.effects.find((e: any) => e.type === 'activatePartition');
    expect(activate.tries.map((x: any) => x.outcome)).toEqual(['ok']);
    expect(history.events.filter((e: any) => e.type === 'ACTIVATED')).toHaveLength(1);
    await api('DELETE', `/v1/vms/${created.body.id}`);
    await waitUntil('the VM to be deleted', async () => (await api('GET', `/v1/vms/${created.body.id}`)).body.state === 'deleted', 30_000);
  });
});

describe(`creates wait for the first reconciliation (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  it('health says starting and creates get 503 with Retry-After until the host has been judged', async () => {
    const dataDir = tempDir();
    const db = await freshDatabaseUrl();
    const config = testConfig(dataDir, db.url, { qemuBin: QEMU_STANDIN });
    let service = await startService(config, { log: quietLog });
    const simRoot = join(dataDir, 'sim', service.host.hostId);
    await service.stop();
    try {
      // Fabric Manager is down when the service comes back: its first reconciliation cannot judge the partitions.
      await writeFaults(simRoot, { fmpm: { down: true } });
      service = await startService(config, { log: quietLog, waitReady: false });
      const health = await http(service.url, 'GET', '/v1/health');
      expect(health.body.status).toBe('starting');
      const res = await fetch(`${service.url}/v1/vms`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ gpus: 1 }) });
      expect(res.status).toBe(503);
      expect(res.headers.get('retry-after')).toBe('1');
      expect(((await res.json()) as any).error.code).toBe('starting');
      await writeFaults(simRoot, { fmpm: null });
      await service.ready;
      expect((await http(service.url, 'GET', '/v1/health')).body.status).toBe('ok');
      const created = await http(service.url, 'POST', '/v1/vms', { gpus: 1 });
      expect(created.status).toBe(202);
      await http(service.url, 'DELETE', `/v1/vms/${created.body.id}`);
      await waitUntil('the VM to be deleted', async () => (await http(service.url, 'GET', `/v1/vms/${created.body.id}`)).body.state === 'deleted', 30_000);
    } finally {
      await service.stop();
      await stopSimKernel(simRoot).catch(() => {});
      await db.drop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  }, 90_000);
});

