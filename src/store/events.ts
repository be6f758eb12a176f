/**
 * The event log: append with an expected stream version, read a stream, read the global log.
 */
import { sql, type Kysely, type Transaction } from 'kysely';
import type { Database } from './schema.ts';

export type Executor = Kysely<Database> | Transaction<Database>;

export interface NewEvent {
  type: string;
  data: Record<string, unknown>;
  stateBefore: unknown;
  stateAfter: unknown;
  machine: string;
  machineVersion: number;
  causationId: string | null;
  correlationId: string;
  actor: string;
  recordedAt: Date;
}

export interface StoredEvent extends NewEvent {
  position: string;
  streamId: string;
  streamVersion: number;
  txId: string;
}

/** Another writer appended to the stream first. Reload and decide again. */
export class ConcurrencyError extends Error {
  constructor(
    readonly streamId: string,
    readonly expectedVersion: number,
  ) {
    super(`stream ${streamId} moved past version ${expectedVersion} while this command was decided`);
    this.name = 'ConcurrencyError';
  }
}

/** An event with this causation was already appended to the stream (a re-delivered effect). */
export class DuplicateCausationError extends Error {
  constructor(
    readonly streamId: string,
    readonly causationId: string,
  ) {
    super(`stream ${streamId} already holds the event caused by ${causationId}`);
    this.name = 'DuplicateCausationError';
  }
}

/** A Postgres unique violation (23505) on the named constraint. */
export function isUniqueViolation(err: unknown, constraint: string): boolean {
  const e = err as { code?: string; constraint?: string };
  return e?.code === '23505' && e.constraint === constraint;
}

/** Maps a unique violation on the log's guards to the typed errors above; rethrows anything else. */
export function mapAppendError(err: unknown, streamId: string, expectedVersion: number, causationId: string | null): never {
  if (isUniqueViolation(err, 'events_stream_version')) throw new ConcurrencyError(streamId, expectedVersion);
  if (isUniqueViolation(err, 'events_stream_causation') && causationId) throw new DuplicateCausationError(streamId, causationId);
  throw err;
}

/**
 * Appends events at expectedVersion+1…; exactly one of two concurrent appends at the same version
 * commits, the other gets ConcurrencyError (its transaction is then aborted and must be retried).
 */
export async function appendEvents(
  db: Executor,
  streamId: string,
  expectedVersion: number,
  events: NewEvent[],
): Promise<{ version: number; positions: string[] }> {
  if (events.length === 0) return { version: expectedVersion, positions: [] };
  try {
    const rows = await db
      .insertInto('events')
      .values(
        events.map((e, i) => ({
          stream_id: streamId,
          stream_version: expectedVersion + 1 + i,
          type: e.type,
          data: JSON.stringify(e.data),
          state_before: e.stateBefore === null ? null : JSON.stringify(e.stateBefore),
          state_after: JSON.stringify(e.stateAfter),
          machine: e.machine,
          machine_version: e.machineVersion,
          causation_id: e.causationId,
          correlation_id: e.correlationId,
          actor: e.actor,
          recorded_at: e.recordedAt,
        })),
      )
      .returning(sql<string>`position::text`.as('position'))
      .execute();
    return { version: expectedVersion + events.length, positions: rows.map((r) => r.position) };
  } catch (err) {
    mapAppendError(err, streamId, expectedVersion, events[0]!.causationId);
  }
}

const eventColumns = [
  sql<string>`position::text`.as('position'),
  'stream_id',
  'stream_version',
  'type',
  'data',
  'state_before',
  'state_after',
  'machine',
  'machine_version',
  'causation_id',
  'correlation_id',
  'actor',
  'recorded_at',
  sql<string>`tx_id::text`.as('tx_id'),
] as const;

type EventRow = {
  position: string;
  stream_id: string;
  stream_version: number;
  type: string;
  data: Record<string, unknown>;
  state_before: unknown;
  state_after: unknown;
  machine: string;
  machine_version: number;
  causation_id: string | null;
  correlation_id: string;
  actor: string;
  recorded_at: Date;
  tx_id: string;
};

export function toStoredEvent(r: EventRow): StoredEvent {
  return {
    position: r.position,
    streamId: r.stream_id,
    streamVersion: r.stream_version,
    type: r.type,
    data: r.data,
    stateBefore: r.state_before,
    stateAfter: r.state_after,
    machine: r.machine,
    machineVersion: r.machine_version,
    causationId: r.causation_id,
    correlationId: r.correlation_id,
    actor: r.actor,
    recordedAt: new Date(r.recorded_at),
    txId: r.tx_id,
  };
}

export async function readStream(db: Executor, streamId: string, opts: { toVersion?: number } = {}): Promise<StoredEvent[]> {
  let q = db.selectFrom('events').select(eventColumns).where('stream_id', '=', streamId);
  if (opts.toVersion !== undefined) q = q.where('stream_version', '<=', opts.toVersion);
  const rows = await q.orderBy('stream_version').execute();
  return rows.map((r) => toStoredEvent(r as EventRow));
}

/**
 * Events grouped by stream, each list in version order: of the named streams (each present, maybe
 * empty), or of every stream when `streamIds` is omitted.
 */
export async function readStreams(db: Executor, streamIds?: string[]): Promise<Map<string, StoredEvent[]>> {
  const byStream = new Map<string, StoredEvent[]>((streamIds ?? []).map((id) => [id, []]));
  if (streamIds?.length === 0) return byStream;
  let q = db.selectFrom('events').select(eventColumns);
  if (streamIds) q = q.where('stream_id', 'in', streamIds);
  const rows = await q.orderBy('stream_id').orderBy('stream_version').orderBy('events.position').execute();
  for (const r of rows) {
    const e = toStoredEvent(r as EventRow);
    let list = byStream.get(e.streamId);
    if (!list) byStream.set(e.streamId, (list = []));
    list.push(e);
  }
  return byStream;
}

export async function readCorrelated(db: Executor, correlationId: string): Promise<StoredEvent[]> {
  const rows = await db
    .selectFrom('events')
    .select(eventColumns)
    .where('correlation_id', '=', correlationId)
    .orderBy('events.position')
    .execute();
  return rows.map((r) => toStoredEvent(r as EventRow));
}

export interface LogCursor {
  txId: string;
  position: string;
}

export const LOG_START: LogCursor = { txId: '0', position: '0' };

/**
 * Reads the global log after `cursor` in commit-safe order. Positions are taken when a row is
 * inserted, not when it commits, so a reader that followed positions alone could pass a position
 * whose transaction commits later and never see it. Reading only transactions older than the
 * oldest one still running (pg_snapshot_xmin), ordered by transaction id then position, makes
 * every event visible exactly once, in a stable order. A reader of one repeatable-read snapshot
 * (verify) passes `inSnapshot` and reads every event the snapshot holds.
 */
export async function readLog(
  db: Executor,
  cursor: LogCursor = LOG_START,
  limit = 1000,
  opts: { inSnapshot?: boolean } = {},
): Promise<{ events: StoredEvent[]; next: LogCursor }> {
  let q = db
    .selectFrom('events')
    .select(eventColumns)
    .where(sql<boolean>`(tx_id, position) > (${cursor.txId}::xid8, ${cursor.position}::bigint)`);
  // `inSnapshot`: the caller pages within one repeatable-read transaction, whose every visible event
  // is committed and where nothing commits under it, so every visible event is read, in the same
  // order; the xmin bound would leave out those of transactions that began after one still open.
  if (!opts.inSnapshot) q = q.where(sql<boolean>`tx_id < pg_snapshot_xmin(pg_current_snapshot())`);
  const rows = await q
    // Qualified: a bare name would sort by the selected text aliases (tx_id::text, position::text),
    // and '10' sorts before '9'.
    .orderBy('events.tx_id')
    .orderBy('events.position')
    .limit(limit)
    .execute();
  const events = rows.map((r) => toStoredEvent(r as EventRow));
  const last = events.at(-1);
  return { events, next: last ? { txId: last.txId, position: last.position } : cursor };
}

/**
 * Every event in stream order, (stream_id, stream_version), in keyset pages of `pageSize`: a stream
 * may span pages. For a pass over the whole log in constant memory; run it in one repeatable-read
 * transaction for a consistent picture.
 */
export async function* scanStreams(db: Executor, pageSize = 1000): AsyncGenerator<StoredEvent[]> {
  let after: StoredEvent | null = null;
  for (;;) {
    let q = db.selectFrom('events').select(eventColumns);
    if (after) q = q.where(sql<boolean>`(stream_id, stream_version) > (${after.streamId}, ${after.streamVersion})`);
    const rows = await q.orderBy('stream_id').orderBy('stream_version').limit(pageSize).execute();
    if (rows.length === 0) return;
    const page = rows.map((r) => toStoredEvent(r as EventRow));
    after = page[page.length - 1]!;
    yield page;
    if (rows.length < pageSize) return;
  }
}
