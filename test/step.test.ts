/**
 * The step writer (src/store/step.ts): many streams' steps in one statement, each step all or
 * nothing, and group commit that gives every caller its own answer.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sql } from 'kysely';
import { EFFECTS_CHANNEL, type Db } from '../src/store/db.ts';
import { ConcurrencyError, readStream } from '../src/store/events.ts';
import { NOW, StepBatcher, writeSteps, type StepWrite } from '../src/store/step.ts';
import { openFreshDb, usingPostgres } from './support/db.ts';
import { waitUntil } from './support/env.ts';

/** A step of a made-up VM stream: event, snapshot, vms row and `effects` new pending effects. */
function vmStep(vm: string, version: number, state: string, opts: { effects?: number; closes?: StepWrite['closes'] } = {}): StepWrite {
  return {
    streamId: `vm:${vm}`,
    expectedVersion: version - 1,
    event: { type: `TO_${state.toUpperCase()}`, data: { n: version }, stateBefore: version === 1 ? null : 'before', stateAfter: state, machine: 'vm', machineVersion: 1, causationId: opts.closes?.effectId ?? null, correlationId: vm, actor: 'test' },
    stream: { machine: 'vm', machineVersion: 1, version, state, context: { vmId: vm }, createdAt: version === 1 ? NOW : new Date('2026-01-01T00:00:00Z') },
    readRow: { table: 'vms', row: { id: vm, name: vm, host_id: 'h1', gpu_count: 1, partition_id: 0, gpus: [], state, reason: null, qemu_pid: null, created_at: version === 1 ? NOW : new Date('2026-01-01T00:00:00Z'), updated_at: NOW } },
    claims: null,
    effects: Array.from({ length: opts.effects ?? 0 }, (_, i) => ({ id: `vm:${vm}@${version}#${i}`, hostId: 'h1', type: 'noop', params: { i }, delayMs: 0, maxAttempts: 3, leasedTo: null, deliveredBy: null, note: null })),
    leaseMs: 0,
    leaseEpoch: null,
    notifyHost: null,
    closes: opts.closes ?? null,
    closesWith: null,
    cancelTimers: null,
  };
}

describe(`step writer (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  let db: Db;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ db, close } = await openFreshDb());
    // Closes are fenced by the host's agent epoch (src/engine/agent.ts): w1 runs under epoch 1 of h1.
    await sql`insert into agents (host_id, epoch, pid, machine, command, started_at, heartbeat_at) values ('h1', 1, 1, 'test', 'test', now(), now())`.execute(db.kysely);
  });
  afterAll(() => close());

  const count = async (table: 'events' | 'effects' | 'vms' | 'streams' | 'effect_attempts') =>
    Number((await sql<{ n: string }>`select count(*)::text as n from ${sql.table(table)}`.execute(db.kysely)).rows[0]!.n);

  it('writes the steps of several streams in one statement, each with its snapshot, read row and effects', async () => {
    const written = await writeSteps(db.kysely, [vmStep('a', 1, 'provisioning', { effects: 2 }), vmStep('b', 1, 'provisioning'), vmStep('c', 1, 'provisioning', { effects: 1 })]);
    expect(written.every((w) => w !== null)).toBe(true);
    // One statement, one transaction: one time for all.
    expect(new Set(written.map((w) => w!.now.getTime())).size).toBe(1);
    expect((await readStream(db.kysely, 'vm:a')).map((e) => e.type)).toEqual(['TO_PROVISIONING']);
    const vms = await db.kysely.selectFrom('vms').select(['id', 'state', 'created_at']).orderBy('id').execute();
    expect(vms.map((v) => [v.id, v.state])).toEqual([['a', 'provisioning'], ['b', 'provisioning'], ['c', 'provisioning']]);
    expect(new Date(vms[0]!.created_at).getTime()).toBe(written[0]!.now.getTime());
    const effects = await db.kysely.selectFrom('effects').select(['id', 'stream_id', 'status', 'correlation_id']).orderBy('id').execute();
    expect(effects).toEqual([
      { id: 'vm:a@1#0', stream_id: 'vm:a', status: 'pending', correlation_id: 'a' },
      { id: 'vm:a@1#1', stream_id: 'vm:a', status: 'pending', correlation_id: 'a' },
      { id: 'vm:c@1#0', stream_id: 'vm:c', status: 'pending', correlation_id: 'c' },
    ]);
    const stream = await db.kysely.selectFrom('streams').selectAll().where('stream_id', '=', 'vm:b').executeTakeFirstOrThrow();
    expect(stream).toMatchObject({ version: 1, state: 'provisioning', context: { vmId: 'b' } });
  });

  it('writes nothing of a step whose effect lease is gone, and the rest of the statement', async () => {
    // Lease vm:a@1#0 to w1; vm:a@1#1 stays pending (no lease to close).
    await sql`update effects set status = 'running', lease_owner = 'w1', lease_epoch = 1, attempts = 1, claimed_at = now() where id = 'vm:a@1#0'`.execute(db.kysely);
    const close = (effectId: string) => ({ effectId, workerId: 'w1', epoch: 1, attempt: 1, status: 'done' as const, error: null, note: null });
    const before = { events: await count('events'), tries: await count('effect_attempts') };
    const written = await writeSteps(db.kysely, [vmStep('a', 2, 'starting', { closes: close('vm:a@1#0') }), vmStep('c', 2, 'starting', { closes: close('vm:c@1#0'), effects: 1 })]);
    expect(written[0]).not.toBeNull();
    expect(written[1]).toBeNull();
    expect(await count('events')).toBe(before.events + 1);
    expect(await count('effect_attempts')).toBe(before.tries + 1);
    expect((await db.kysely.selectFrom('vms').select('state').where('id', '=', 'c').executeTakeFirstOrThrow()).state).toBe('provisioning');
    expect(await db.kysely.selectFrom('effects').select('id').where('id', '=', 'vm:c@2#0').executeTakeFirst()).toBeUndefined();
    expect((await db.kysely.selectFrom('effects').select(['status', 'completed_at']).where('id', '=', 'vm:a@1#0').executeTakeFirstOrThrow()).status).toBe('done');
  });

  it('group commit: concurrent steps share statements, and a step that lost its race fails alone', async () => {
    const batcher = new StepBatcher(db.kysely);
    const ids = Array.from({ length: 12 }, (_, i) => `g${i}`);
    const first = await Promise.all(ids.map((id) => batcher.write([vmStep(id, 1, 'provisioning')]).then((r) => r[0])));
    expect(first.every((w) => w !== null)).toBe(true);
    // The first went alone; the others waited for it and shared what came next.
    expect(batcher.stats.steps).toBe(12);
    expect(batcher.stats.statements).toBeLessThan(12);

    // g3's step is decided on a stale version: it fails with ConcurrencyError, the others land.
    const statements = batcher.stats.statements;
    const second = await Promise.allSettled(ids.map((id) => batcher.write([vmStep(id, id === 'g3' ? 1 : 2, 'starting')])));
    expect(second.filter((r) => r.status === 'fulfilled')).toHaveLength(11);
    const failed = second[3] as PromiseRejectedResult;
    expect(failed.status).toBe('rejected');
    expect(failed.reason).toBeInstanceOf(ConcurrencyError);
    expect((failed.reason as ConcurrencyError).streamId).toBe('vm:g3');
    expect(batcher.stats.statements).toBeGreaterThan(statements);
    const states = await db.kysely.selectFrom('vms').select(['id', 'state']).where('id', 'in', ids).orderBy('id').execute();
    expect(states.filter((s) => s.state === 'starting')).toHaveLength(11);
    expect(states.find((s) => s.id === 'g3')!.state).toBe('provisioning');
  });

  it('never puts two steps of one stream in one statement', async () => {
    const batcher = new StepBatcher(db.kysely);
    const results = await Promise.allSettled([batcher.write([vmStep('s', 1, 'provisioning')]), batcher.write([vmStep('s', 2, 'starting')]), batcher.write([vmStep('t', 1, 'provisioning')]), batcher.write([vmStep('s', 3, 'running')])]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled', 'fulfilled']);
    expect((await readStream(db.kysely, 'vm:s')).map((e) => e.streamVersion)).toEqual([1, 2, 3]);
    // s@1 alone; then s@2 with t@1 (s@3 held back); then s@3. No statement failed and was split.
    expect(batcher.stats).toEqual({ steps: 4, statements: 3 });
  });

  it('a step and the message it delivers: one statement, the message effect born done with its try, and nothing of either on a lost lease', async () => {
    await writeSteps(db.kysely, [vmStep('m1', 1, 'provisioning', { effects: 1 }), vmStep('m2', 1, 'provisioning')]);
    await sql`update effects set status = 'running', lease_owner = 'w1', lease_epoch = 1, attempts = 1, claimed_at = now() where id = 'vm:m1@1#0'`.execute(db.kysely);
    const close = { effectId: 'vm:m1@1#0', workerId: 'w1', epoch: 1, attempt: 1, status: 'done' as const, error: null, note: null };
    // m1's step sends a message (its effect #0) that m2's step delivers in the same statement.
    const unit = () => {
      const sender = vmStep('m1', 2, 'starting', { closes: close, effects: 1 });
      sender.effects[0]!.deliveredBy = 'w1';
      sender.effects[0]!.note = 'delivered TO_STARTING to vm:m2';
      const receiver = vmStep('m2', 2, 'starting', { effects: 1 });
      receiver.event.causationId = 'vm:m1@2#0';
      receiver.closesWith = close.effectId;
      return [sender, receiver];
    };

    // A lost lease: neither step, nor the message, nor the receiver's effect is written.
    await sql`update effects set lease_owner = 'w2' where id = 'vm:m1@1#0'`.execute(db.kysely);
    const before = { events: await count('events'), effects: await count('effects'), tries: await count('effect_attempts') };
    expect(await writeSteps(db.kysely, unit())).toEqual([null, null]);
    expect({ events: await count('events'), effects: await count('effects'), tries: await count('effect_attempts') }).toEqual(before);

    await sql`update effects set lease_owner = 'w1' where id = 'vm:m1@1#0'`.execute(db.kysely);
    const batcher = new StepBatcher(db.kysely);
    const written = await batcher.write(unit());
    expect(written.every((w) => w !== null)).toBe(true);
    expect(batcher.stats).toEqual({ steps: 2, statements: 1 });
    const message = await db.kysely.selectFrom('effects').selectAll().where('id', '=', 'vm:m1@2#0').executeTakeFirstOrThrow();
    expect(message).toMatchObject({ status: 'done', attempts: 1, lease_owner: null, note: 'delivered TO_STARTING to vm:m2' });
    expect(message.completed_at).not.toBeNull();
    const tries = await db.kysely.selectFrom('effect_attempts').selectAll().where('effect_id', '=', 'vm:m1@2#0').execute();
    expect(tries.map((t) => [t.attempt, t.worker, t.outcome])).toEqual([[1, 'w1', 'ok']]);
    // The receiver's own effect is an ordinary pending one.
    expect((await db.kysely.selectFrom('effects').select('status').where('id', '=', 'vm:m2@2#0').executeTakeFirstOrThrow()).status).toBe('pending');
    const [, received] = await Promise.all([readStream(db.kysely, 'vm:m1'), readStream(db.kysely, 'vm:m2')]);
    expect(received.map((e) => [e.type, e.causationId])).toEqual([['TO_PROVISIONING', null], ['TO_STARTING', 'vm:m1@2#0']]);
  });

  it('a step that leaves effects pending for another process notifies its host at commit; one with nothing to say does not', async () => {
    const heard: string[] = [];
    const unlisten = await db.listen(EFFECTS_CHANNEL, (host) => heard.push(host));
    try {
      const quiet = vmStep('n1', 1, 'provisioning', { effects: 1 });
      await writeSteps(db.kysely, [quiet]);
      const loud = vmStep('n2', 1, 'provisioning', { effects: 1 });
      loud.notifyHost = 'h7';
      await writeSteps(db.kysely, [loud]);
      await waitUntil('the notification', async () => heard.length > 0, 5000, 10);
      expect(heard).toEqual(['h7']);
    } finally {
      await unlisten();
    }
  });

  it("a step that leaves its state cancels the stream's pending timers, and nothing else", async () => {
    const first = vmStep('k1', 1, 'stopping', { effects: 3 });
    first.effects[0]!.params = { delayMs: 60_000 }; // a timer, pending
    first.effects[0]!.delayMs = 60_000;
    first.effects[1]!.params = { delayMs: 60_000 }; // a timer, running below
    first.effects[1]!.delayMs = 60_000;
    first.effects[2]!.delayMs = 60_000; // not a timer: an effect waiting to retry, say
    const other = vmStep('k2', 1, 'stopping', { effects: 1 });
    other.effects[0]!.params = { delayMs: 60_000 };
    other.effects[0]!.delayMs = 60_000;
    await writeSteps(db.kysely, [first, other]);
    await sql`update effects set status = 'running', lease_owner = 'w1', lease_epoch = 1, attempts = 1, claimed_at = now() where id = 'vm:k1@1#1'`.execute(db.kysely);

    const leave = vmStep('k1', 2, 'releasing');
    leave.cancelTimers = 'cancelled: vm left stopping (QEMU_EXITED) before it fell due';
    await writeSteps(db.kysely, [leave]);
    const rows = await db.kysely.selectFrom('effects').select(['id', 'status', 'note']).where('id', 'in', ['vm:k1@1#0', 'vm:k1@1#1', 'vm:k1@1#2', 'vm:k2@1#0']).orderBy('id').execute();
    expect(rows).toEqual([
      { id: 'vm:k1@1#0', status: 'cancelled', note: 'cancelled: vm left stopping (QEMU_EXITED) before it fell due' },
      { id: 'vm:k1@1#1', status: 'running', note: null },
      { id: 'vm:k1@1#2', status: 'pending', note: null },
      { id: 'vm:k2@1#0', status: 'pending', note: null },
    ]);
    const tries = await db.kysely.selectFrom('effect_attempts').select('effect_id').where('effect_id', '=', 'vm:k1@1#0').execute();
    expect(tries).toEqual([]);
  });

  it('a unit whose second stream moved fails whole, and the error names that stream', async () => {
    await writeSteps(db.kysely, [vmStep('u1', 1, 'provisioning'), vmStep('u2', 1, 'provisioning')]);
    const batcher = new StepBatcher(db.kysely);
    const results = await Promise.allSettled([batcher.write([vmStep('u1', 2, 'starting'), vmStep('u2', 1, 'starting')]), batcher.write([vmStep('u3', 1, 'provisioning')])]);
    expect(results[0]!.status).toBe('rejected');
    expect(((results[0] as PromiseRejectedResult).reason as ConcurrencyError).streamId).toBe('vm:u2');
    expect(results[1]!.status).toBe('fulfilled');
    expect((await readStream(db.kysely, 'vm:u1')).map((e) => e.streamVersion)).toEqual([1]);
  });
});
