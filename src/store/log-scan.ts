/**
 * The whole log in stream order — (stream_id, stream_version), the order a fold needs — in keyset
 * pages over the events_stream_version index, for replaying every stream (rebuild, verify).
 *
 * Only what a fold reads, and as cheap for the client to decode as Postgres can make it: `data` stays
 * JSON text (whoever folds parses it, maybe on another thread; pg would parse it on this one) and the
 * time is epoch milliseconds (a float8, not a timestamptz string for pg to parse into a Date).
 * Keyset pages, not a cursor: the same SQL on Postgres and PGlite, inside or outside a transaction.
 * The next page is asked for before the caller is handed this one, so the database and the wire work
 * while the caller processes.
 */
import { sql } from 'kysely';
import type { Executor } from './events.ts';

/** One event as a fold reads it, undecoded. */
export interface RawEvent {
  stream_id: string;
  stream_version: number;
  type: string;
  /** The event's data, as JSON text. */
  data: string;
  machine_version: number;
  /** recorded_at as epoch milliseconds, truncated as pg's Date parsing truncates microseconds. */
  recorded_ms: number;
}

export const DEFAULT_SCAN_PAGE = 5000;

function page(db: Executor, after: RawEvent | null, limit: number): Promise<RawEvent[]> {
  const where = after ? sql`where (stream_id, stream_version) > (${after.stream_id}, ${after.stream_version})` : sql``;
  return sql<RawEvent>`
    select stream_id, stream_version, type, data::text as data, machine_version,
           floor(extract(epoch from recorded_at) * 1000)::float8 as recorded_ms
    from events ${where}
    order by stream_id, stream_version
    limit ${limit}`
    .execute(db)
    .then((r) => r.rows);
}

/**
 * Every event, in pages of `pageSize`, in (stream_id, stream_version) order. A stream may span two
 * pages. Run it in one repeatable-read transaction for a consistent picture of the log.
 */
export async function* scanLogByStream(db: Executor, pageSize = DEFAULT_SCAN_PAGE): AsyncGenerator<RawEvent[]> {
  let next = page(db, null, pageSize);
  for (;;) {
    const rows = await next;
    if (rows.length === 0) return;
    // A short page is the last one: no query for an empty page after it.
    next = rows.length < pageSize ? Promise.resolve([]) : page(db, rows[rows.length - 1]!, pageSize);
    // A caller that stops early leaves this request unawaited: its failure is not an unhandled one.
    next.catch(() => {});
    yield rows;
  }
}
