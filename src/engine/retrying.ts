/**
 * Retrying a unit of work that lost a race: each try decides again on fresh state (the log's version
 * key, a serialization failure or a deadlock turned it away).
 */
import type { Kysely } from 'kysely';
import { ConcurrencyError, type Executor } from '../store/events.ts';
import type { Database } from '../store/schema.ts';

/** Serialization failures and deadlocks are worth a retry, like a lost optimistic race. */
function isRetryable(err: unknown): boolean {
  if (err instanceof ConcurrencyError) return true;
  const code = (err as { code?: string })?.code;
  return code === '40001' || code === '40P01';
}

/**
 * Runs `work` again from scratch when it lost a race (another writer moved a stream it read, a
 * serialization failure, a deadlock). Each try decides again on fresh state.
 */
export async function retrying<T>(work: () => Promise<T>, opts: { retries?: number } = {}): Promise<T> {
  const retries = opts.retries ?? 20;
  for (let attempt = 0; ; attempt++) {
    try {
      return await work();
    } catch (err) {
      if (!isRetryable(err) || attempt >= retries) throw err;
      // A short randomised pause spreads out writers that collided on the same stream.
      await new Promise((r) => setTimeout(r, Math.random() * Math.min(50, 2 ** attempt)));
    }
  }
}

/** Runs `work` in a transaction, retried as a whole (see retrying). */
export function inTransaction<T>(db: Kysely<Database>, work: (tx: Executor) => Promise<T>, opts: { retries?: number } = {}): Promise<T> {
  return retrying(() => db.transaction().execute(work), opts);
}
