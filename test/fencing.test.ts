/**
 * The engine's own faults (issue: safety core, finding 3 and 4): a try must stop when its lease is
 * gone, a worker never runs its own in-flight effect twice, a lost try counts against the budget,
 * an epoch a successor replaced writes nothing, and "not yet" waits without spending tries.
 * Each is driven on the real worker and database with effects written straight into the outbox.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { sql } from 'kysely';
import { HostAgent } from '../src/engine/agent.ts';
import { NotYetError } from '../src/engine/handlers.ts';
import { EffectWorker, type EffectHandlers } from '../src/engine/worker.ts';
import { SnapshotCache } from '../src/engine/snapshot-cache.ts';
import type { Db } from '../src/store/db.ts';
import { openFreshDb, usingPostgres } from './support/db.ts';
import { quietLog, waitUntil } from './support/env.ts';

const policy = { maxAttempts: () => 3, backoffBaseMs: 10, backoffMaxMs: 50 };

describe(`fencing of effect tries (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  let db: Db;
  let close: () => Promise<void>;
  let hostN = 0;
  const running: { worker: EffectWorker; agent: HostAgent }[] = [];

  beforeAll(async () => {
    ({ db, close } = await openFreshDb());
  });
  afterEach(async () => {
    for (const r of running.splice(0)) {
      await r.worker.stop();
      await r.agent.stop();
    }
  });
  afterAll(() => close());

  /** A worker of its own host (so tests do not share effects), with its agent. */
  async function startWorker(handlers: EffectHandlers, opts: { leaseMs?: number; notYetMs?: number; start?: boolean } = {}) {
    const hostId = `fx${++hostN}`;
    const agent = await HostAgent.start(db, hostId, { command: 'test', heartbeatMs: 50, log: quietLog });
    const worker = new EffectWorker(db, { hostId, agent, handlers, policy, leaseMs: opts.leaseMs ?? 600, notYetMs: opts.notYetMs ?? 60_000, pollMs: 50, concurrency: 4, log: quietLog });
    running.push({ worker, agent });
    if (opts.start !== false) await worker.start();
    return { hostId, agent, worker };
  }

  async function addEffect(hostId: string, id: string, type: string, maxAttempts = 3): Promise<string> {
    const effectId = `vm:${id}@1#0`;
    await sql`insert into effects (id, stream_id, host_id, type, params, correlation_id, status, due_at, attempts, max_attempts, created_at)
              values (${effectId}, ${`vm:${id}`}, ${hostId}, ${type}, '{}'::jsonb, ${id}, 'pending', now(), 0, ${maxAttempts}, now())`.execute(db.kysely);
    return effectId;
  }
  const effect = (id: string) => db.kysely.selectFrom('effects').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
  const tries = (id: string) => db.kysely.selectFrom('effect_attempts').selectAll().where('effect_id', '=', id).orderBy('attempt').orderBy('wait').execute();

  it('a "not yet" answer waits without spending a try, until its deadline', async () => {
    // Given a handler that says "not yet" six times, then succeeds, on an effect allowed 2 tries
    let calls = 0;
    const { hostId } = await startWorker({
      probe: async () => {
        if (++calls <= 6) throw new NotYetError('Fabric Manager is still starting');
        return { note: 'ok' };
      },
    });
    // When it runs
    const id = await addEffect(hostId, 'wait1', 'probe', 2);
    await waitUntil('the effect to finish', async () => (await effect(id)).status === 'done', 20_000);
    // Then it is done on its first counted try, with six waits on the record
    expect(await effect(id)).toMatchObject({ attempts: 1, waits: 6 });
    const t = await tries(id);
    expect(t.filter((x) => x.outcome === 'waiting')).toHaveLength(6);
    expect(t.filter((x) => x.outcome !== 'waiting').map((x) => [x.attempt, x.outcome])).toEqual([[1, 'ok']]);
  });

  it('a tool that could not be started for lack of descriptors is a wait, not a failed try', async () => {
    let calls = 0;
    const { hostId } = await startWorker({
      probe: async () => {
        if (++calls <= 3) throw new Error('fmpm -l: could not start the binary (EMFILE)', { cause: Object.assign(new Error('spawn EMFILE'), { code: 'EMFILE' }) });
        return { note: 'ok' };
      },
    });
    const id = await addEffect(hostId, 'emfile', 'probe', 1);
    await waitUntil('the effect to finish', async () => (await effect(id)).status === 'done', 20_000);
    expect(await effect(id)).toMatchObject({ attempts: 1, waits: 3 });
  });

  it('past the not-yet deadline, waits count as tries and the effect fails within its budget', async () => {
    const { hostId } = await startWorker({ probe: async () => Promise.reject(new NotYetError('never ready')) }, { notYetMs: 200 });
    const id = await addEffect(hostId, 'wait2', 'probe', 2);
    await waitUntil('the effect to fail', async () => (await effect(id)).status === 'failed', 20_000);
    const row = await effect(id);
    expect(row.attempts).toBe(2);
    expect(row.waits).toBeGreaterThan(0);
    expect((await tries(id)).filter((x) => x.outcome !== 'waiting').map((x) => x.attempt)).toEqual([1, 2]);
  });

  it('a try whose lease is taken is aborted before its next host action, and records nothing', async () => {
    // Given a handler that acts, then waits, then would act again if its signal allowed
    const acted: string[] = [];
    let sawAbort: (() => void) | null = null;
    const aborted = new Promise<void>((r) => (sawAbort = r));
    const { hostId } = await startWorker(
      {
        hold: async (_p, ctx) => {
          acted.push('first');
          await new Promise<void>((resolve) => {
            ctx.signal.addEventListener('abort', () => resolve(), { once: true });
            setTimeout(resolve, 5000);
          });
          if (ctx.signal.aborted) {
            sawAbort!();
            ctx.signal.throwIfAborted();
          }
          acted.push('second');
          return { note: 'done' };
        },
      },
      { leaseMs: 300 },
    );
    const id = await addEffect(hostId, 'steal', 'hold');
    await waitUntil('the first action', async () => acted.length === 1);
    // When another worker takes the lease (as after this one was paused past it)
    await sql`update effects set lease_owner = 'thief/x/1/a', lease_until = now() + interval '1 hour' where id = ${id}`.execute(db.kysely);
    // Then the renewal sees it and the handler is aborted before its second action
    await Promise.race([aborted, new Promise((_, reject) => setTimeout(() => reject(new Error('no abort within 2 s')), 2000))]);
    expect(acted).toEqual(['first']);
    await new Promise((r) => setTimeout(r, 300));
    const row = await effect(id);
    expect(row).toMatchObject({ status: 'running', lease_owner: 'thief/x/1/a' });
    expect(await tries(id)).toEqual([]);
  });

  it('never claims an effect it is running, even when its lease looks expired', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let runs = 0;
    const { hostId, worker } = await startWorker({
      slow: async () => {
        runs++;
        await gate;
        return { note: 'done' };
      },
    });
    const id = await addEffect(hostId, 'inflight', 'slow');
    await waitUntil('the try to start', async () => runs === 1);
    // The lease runs out in the database (renewals failing while Postgres restarts, say)
    await sql`update effects set lease_until = now() - interval '1 second' where id = ${id}`.execute(db.kysely);
    const { claimed } = await worker.claim(4);
    expect(claimed.map((c) => c.id)).not.toContain(id);
    release();
    await waitUntil('the effect to finish', async () => (await effect(id)).status === 'done');
    expect(runs).toBe(1);
    expect((await tries(id)).map((t) => [t.attempt, t.outcome])).toEqual([[1, 'ok']]);
  });

  it('a lost last try ends the effect in failure without running it again', async () => {
    let runs = 0;
    const { hostId } = await startWorker({ crashy: async () => ((runs++), { note: 'ran' }) });
    // Given an effect whose 3rd and last try was lost (its worker died mid-try)
    const id = await addEffect(hostId, 'lost', 'crashy', 3);
    await sql`update effects set status = 'running', attempts = 3, lease_owner = 'gone/x/999999/a', lease_epoch = 0,
                     lease_until = now() - interval '1 second', claimed_at = now() - interval '2 seconds' where id = ${id}`.execute(db.kysely);
    // When the worker claims it
    await waitUntil('the effect to fail', async () => (await effect(id)).status === 'failed');
    // Then it never ran a 4th try: the lost one is on record, and the failure says why
    expect(runs).toBe(0);
    const row = await effect(id);
    expect(row.attempts).toBe(3);
    expect(row.last_error).toMatch(/try 3 of 3 was lost/);
    expect((await tries(id)).map((t) => [t.attempt, t.outcome])).toEqual([[3, 'lost']]);
  });

  it('an agent whose epoch a successor replaced stops its tries and writes nothing under it', async () => {
    const acted: string[] = [];
    const { hostId, agent } = await startWorker({
      hold: async (_p, ctx) => {
        acted.push(`act (epoch ${ctx.effect.epoch})`);
        if (acted.length > 1) return { note: 'done' };
        await new Promise<void>((resolve) => {
          ctx.signal.addEventListener('abort', () => resolve(), { once: true });
          setTimeout(resolve, 3000);
        });
        acted.push(ctx.signal.aborted ? 'aborted' : 'not aborted');
        return { note: 'done' };
      },
    });
    const id = await addEffect(hostId, 'epoch', 'hold');
    await waitUntil('the first action', async () => acted.length === 1);
    const first = { epoch: agent.epoch, signal: agent.signal };
    // A successor took the host: the next epoch is recorded
    await sql`update agents set epoch = epoch + 1 where host_id = ${hostId}`.execute(db.kysely);
    // The heartbeat notices, the try in flight is aborted, and its outcome is refused
    await waitUntil('the heartbeat to notice', async () => first.signal.aborted, 3000);
    await waitUntil('the effect to be done under a later epoch', async () => (await effect(id)).status === 'done', 10_000);
    expect(acted.slice(0, 2)).toEqual([`act (epoch ${first.epoch})`, 'aborted']);
    const t = await tries(id);
    // The stale epoch's try is on record only as lost; the one that counts ran under the new epoch
    expect(t.map((x) => [x.attempt, x.outcome, Number(x.epoch)])).toEqual([
      [1, 'lost', first.epoch],
      [2, 'ok', agent.epoch],
    ]);
    expect(agent.epoch).toBeGreaterThan(first.epoch + 1);
  });

  it.runIf(usingPostgres)('a second agent for the same host is refused, naming the holder', async () => {
    const { hostId, agent } = await startWorker({}, { start: false });
    await expect(HostAgent.start(db, hostId, { command: 'serve', heartbeatMs: 50, log: quietLog })).rejects.toThrow(
      new RegExp(`host ${hostId} already has a running agent: \`gpuvm test\` \\(pid ${process.pid} on .*, epoch ${agent.epoch}, since `),
    );
    // Once the first lets go, the next takes the next epoch
    await agent.stop();
    const next = await HostAgent.start(db, hostId, { command: 'test', heartbeatMs: 50, log: quietLog });
    expect(next.epoch).toBe(agent.epoch + 1);
    await next.stop();
  });
});

describe('the committed-snapshot cache', () => {
  it('never moves back a version: a late hand-over of an older snapshot is ignored', () => {
    const cache = new SnapshotCache();
    const snap = (version: number, state: string) => ({ streamId: 'vm:a', kind: 'vm' as const, machineVersion: 2, version, state, context: {}, createdAt: new Date(0), updatedAt: new Date(0) });
    cache.remember(snap(5, 'running'));
    cache.remember(snap(4, 'starting'));
    expect(cache.get('vm:a')).toMatchObject({ version: 5, state: 'running' });
    cache.remember(snap(6, 'stopping'));
    expect(cache.get('vm:a')).toMatchObject({ version: 6, state: 'stopping' });
  });
});
