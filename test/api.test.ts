/** The HTTP API: the happy path and every kind of bad input (4xx, a clear message, nothing written). */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestService, usingPostgres, waitUntil, type TestService } from './support/env.ts';

let t: TestService;

async function api(method: string, path: string, body?: string | object, headers: Record<string, string> = {}) {
  const res = await fetch(t.service.url + path, {
    method,
    headers: body === undefined ? headers : { 'content-type': 'application/json', ...headers },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

async function rowCounts() {
  const db = t.service.db.kysely;
  const count = async (table: 'events' | 'vms' | 'effects' | 'gpu_claims') =>
    Number((await db.selectFrom(table).select((eb) => eb.fn.countAll<string>().as('n')).executeTakeFirstOrThrow()).n);
  return { events: await count('events'), vms: await count('vms'), effects: await count('effects'), claims: await count('gpu_claims') };
}

describe(`HTTP API (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    t = await startTestService();
  });
  afterAll(async () => {
    await t?.cleanup();
  });

  it('refuses bad input with 4xx and a clear message, writing nothing', async () => {
    const before = await rowCounts();
    const cases: [string, string, string | object | undefined, number, RegExp][] = [
      ['POST', '/v1/vms', '{"gpus": 2,', 400, /malformed JSON/],
      ['POST', '/v1/vms', { gpus: 3 }, 400, /gpus must be 1, 2, 4 or 8 \(got 3\)/],
      ['POST', '/v1/vms', { gpus: 0 }, 400, /gpus must be 1, 2, 4 or 8 \(got 0\)/],
      ['POST', '/v1/vms', { gpus: 1.5 }, 400, /whole number/],
      ['POST', '/v1/vms', { gpus: '2' }, 400, /gpus must be a number/],
      ['POST', '/v1/vms', {}, 400, /gpus/],
      ['POST', '/v1/vms', { gpus: 1, name: '../../etc/passwd' }, 400, /name may hold only/],
      ['POST', '/v1/vms', { gpus: 1, name: 'a/b' }, 400, /name may hold only/],
      ['POST', '/v1/vms', { gpus: 1, name: 'x'.repeat(10_240) }, 400, /longer than 63/],
      ['POST', '/v1/vms', { gpus: 1, extra: true }, 400, /unknown field/],
      ['POST', '/v1/vms', '[1,2]', 400, /JSON object/],
      ['GET', '/v1/vms/vm-0000000000', undefined, 404, /no VM vm-0000000000/],
      ['DELETE', '/v1/vms/vm-0000000000', undefined, 404, /no VM vm-0000000000/],
      ['GET', '/v1/vms/..%2F..%2Fetc', undefined, 400, /invalid VM id/],
      ['GET', '/v1/vms/vm-0000000000/history', undefined, 404, /no VM/],
      ['GET', '/v1/nothing', undefined, 404, /no route/],
      ['GET', '/v1/vms/vm-0000000000?changedFrom=running', undefined, 404, /no VM vm-0000000000/],
      ['GET', '/v1/vms/vm-0000000000?changedFrom=..%2Fx', undefined, 400, /changedFrom must be a VM state/],
      ['GET', '/v1/vms/vm-0000000000?changedFrom=running&waitSeconds=61', undefined, 400, /waitSeconds must be a whole number from 0 to 60/],
      ['GET', '/v1/vms/vm-0000000000?changedFrom=running&waitSeconds=1.5', undefined, 400, /waitSeconds/],
    ];
    for (const [method, path, body, status, message] of cases) {
      const res = await api(method, path, body);
      expect(res.status, `${method} ${path} ${JSON.stringify(body)?.slice(0, 40)}`).toBe(status);
      expect(res.body.error.message).toMatch(message);
    }
    expect(await rowCounts()).toEqual(before);
  });

  it('refuses a body over the size limit', async () => {
    const res = await api('POST', '/v1/vms', JSON.stringify({ gpus: 1, name: 'x'.repeat(200_000) }));
    expect(res.status).toBe(413);
  });

  it('creates, lists, shows, deletes a VM and shows its history', async () => {
    const created = await api('POST', '/v1/vms', { gpus: 2, name: 'api-vm' });
    expect(created.status).toBe(202);
    const id = created.body.id as string;
    expect(id).toMatch(/^vm-[a-z0-9]{10}$/);
    expect((await api('POST', '/v1/vms', { gpus: 1, name: 'api-vm' })).status).toBe(409);
    await waitUntil('running', async () => (await api('GET', `/v1/vms/${id}`)).body.state === 'running');
    const list = await api('GET', '/v1/vms');
    expect(list.body.vms.map((v: { id: string }) => v.id)).toEqual([id]);
    const del = await api('DELETE', `/v1/vms/${id}`);
    expect(del.status).toBe(202);
    expect(del.body.state).toBe('stopping');
    await waitUntil('deleted', async () => (await api('GET', `/v1/vms/${id}`)).body.state === 'deleted');
    expect((await api('DELETE', `/v1/vms/${id}`)).status).toBe(409);
    expect((await api('GET', '/v1/vms')).body.vms).toEqual([]);
    expect((await api('GET', '/v1/vms?all=true')).body.vms).toHaveLength(1);
    const history = await api('GET', `/v1/vms/${id}/history`);
    expect(history.body.events[0]).toMatchObject({ type: 'CLAIM', from: 'free', to: 'preparing' });
    expect(history.body.events.at(-1)).toMatchObject({ type: 'PARTITION_RELEASED', to: 'deleted' });
    expect(history.body.effects.length).toBeGreaterThan(10);
    expect(history.body.effects.every((e: { tries: unknown[] }) => e.tries.length >= 1)).toBe(true);
  });

  it('long-polls a VM: each answer is the next state it reaches, none is skipped for lack of a change', async () => {
    const created = await api('POST', '/v1/vms', { gpus: 1, name: 'long-poll' });
    const id = created.body.id as string;
    const seen = [created.body.state as string];
    for (let i = 0; i < 50 && seen.at(-1) !== 'running'; i++) {
      const res = await api('GET', `/v1/vms/${id}?changedFrom=${seen.at(-1)}&waitSeconds=20`);
      expect(res.status).toBe(200);
      // Answered before the 20 s ran out, so with a new state.
      expect(res.body.state).not.toBe(seen.at(-1));
      seen.push(res.body.state);
    }
    expect(seen.at(-1)).toBe('running');
    // Already changed: answered at once. No change within the wait: the VM as it is.
    expect((await api('GET', `/v1/vms/${id}?changedFrom=provisioning&waitSeconds=60`)).body.state).toBe('running');
    const started = Date.now();
    expect((await api('GET', `/v1/vms/${id}?changedFrom=running&waitSeconds=1`)).body.state).toBe('running');
    expect(Date.now() - started).toBeGreaterThanOrEqual(900);
    await api('DELETE', `/v1/vms/${id}`);
    let state = 'running';
    while (state !== 'deleted') state = (await api('GET', `/v1/vms/${id}?changedFrom=${state}&waitSeconds=20`)).body.state;
  });
});
