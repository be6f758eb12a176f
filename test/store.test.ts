import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Db } from '../src/store/db.ts';
import { appendEvents, ConcurrencyError, DuplicateCausationError, readLog, readStream, type NewEvent } from '../src/store/events.ts';
import { openFreshDb, usingPostgres } from './support/db.ts';

const event = (type: string, causationId: string | null = null): NewEvent => ({
  type,
  data: { n: 1 },
  stateBefore: 'a',
  stateAfter: 'b',
  machine: 'vm',
  machineVersion: 1,
  causationId,
  correlationId: 'c1',
  actor: 'test',
  recordedAt: new Date(),
});

describe(`event store (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  let db: Db;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ db, close } = await openFreshDb());
  });
  afterAll(() => close());

  it('appends with an expected version and reads the stream back in order', async () => {
    await appendEvents(db.kysely, 'vm:s1', 0, [event('A'), event('B')]);
    await appendEvents(db.kysely, 'vm:s1', 2, [event('C')]);
    const read = await readStream(db.kysely, 'vm:s1');
    expect(read.map((e) => [e.type, e.streamVersion])).toEqual([['A', 1], ['B', 2], ['C', 3]]);
    expect(read[0]!.txId).toMatch(/^\d+$/);
    expect(read[0]!.data).toEqual({ n: 1 });
  });

  it('refuses an append at a stale version with ConcurrencyError, writing nothing', async () => {
    await expect(appendEvents(db.kysely, 'vm:s1', 1, [event('X')])).rejects.toBeInstanceOf(ConcurrencyError);
    expect((await readStream(db.kysely, 'vm:s1')).map((e) => e.type)).toEqual(['A', 'B', 'C']);
  });

  it('of two concurrent appends at one version exactly one wins', async () => {
    const results = await Promise.allSettled(
      [0, 1, 2, 3, 4].map((i) => db.kysely.transaction().execute((tx) => appendEvents(tx, 'vm:race', 0, [event(`W${i}`)]))),
    );
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    for (const r of results.filter((r) => r.status === 'rejected')) expect((r as PromiseRejectedResult).reason).toBeInstanceOf(ConcurrencyError);
    expect(await readStream(db.kysely, 'vm:race')).toHaveLength(1);
  });

  it('refuses a second event with the same causation on a stream', async () => {
    await appendEvents(db.kysely, 'vm:c', 0, [event('A', 'effect:1')]);
    await expect(appendEvents(db.kysely, 'vm:c', 1, [event('B', 'effect:1')])).rejects.toBeInstanceOf(DuplicateCausationError);
  });

  it('reads the global log across streams in a stable order, page by page', async () => {
    // Positions crossing a power of ten in one transaction: the order must be numeric, not textual.
    await appendEvents(db.kysely, 'vm:many', 0, Array.from({ length: 12 }, (_, i) => event(`M${i}`)));
    const all = [];
    let cursor;
    for (;;) {
      const page = await readLog(db.kysely, cursor, 2);
      if (page.events.length === 0) break;
      all.push(...page.events);
      cursor = page.next;
    }
    const total = await db.kysely.selectFrom('events').select((eb) => eb.fn.countAll<string>().as('n')).executeTakeFirstOrThrow();
    expect(all).toHaveLength(Number(total.n));
    expect(new Set(all.map((e) => e.position)).size).toBe(all.length);
    const order = all.map((e) => [BigInt(e.txId), BigInt(e.position)] as const);
    for (let i = 1; i < order.length; i++) {
      const [[t0, p0], [t1, p1]] = [order[i - 1]!, order[i]!];
      expect(t0 < t1 || (t0 === t1 && p0 < p1), `log order at ${i}: (${t0}, ${p0}) then (${t1}, ${p1})`).toBe(true);
    }
    expect(all.filter((e) => e.streamId === 'vm:many').map((e) => e.type)).toEqual(Array.from({ length: 12 }, (_, i) => `M${i}`));
  });

  it.runIf(usingPostgres)('never skips an event whose transaction commits late', async () => {
    const late = await db.kysely.startTransaction().execute();
    await appendEvents(late, 'vm:late', 0, [event('LATE')]);
    await appendEvents(db.kysely, 'vm:early', 0, [event('EARLY')]); // commits first, later position
    const start = await readLog(db.kysely, undefined, 10_000);
    // While the late transaction is open, nothing at or after its transaction id is handed out.
    expect(start.events.map((e) => e.type)).not.toContain('EARLY');
    await late.commit().execute();
    const after = await readLog(db.kysely, start.next, 10_000);
    expect(after.events.map((e) => e.type)).toEqual(['LATE', 'EARLY']);
  });
});
