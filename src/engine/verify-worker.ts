/**
 * `gpuvm verify` on a worker thread (verify-runner.ts starts it): the fold and the checks run here,
 * off the service's request thread. The database stays with the main thread, which holds verify's
 * repeatable-read transaction and runs each query this thread sends it (over Postgres or PGlite
 * alike: PGlite has one connection, in the main thread). Kysely here has a driver that relays
 * compiled queries; its transaction is the main thread's, already open.
 */
import { parentPort } from 'node:worker_threads';
import {
  Kysely,
  PostgresAdapter,
  PostgresIntrospector,
  PostgresQueryCompiler,
  type CompiledQuery,
  type DatabaseConnection,
  type Driver,
  type QueryResult,
} from 'kysely';
import type { Database } from '../store/schema.ts';
import { verifySnapshot, type VerifyReport } from './verify.ts';

export type ToMain =
  | { kind: 'query'; id: number; sql: string; parameters: readonly unknown[] }
  | { kind: 'done'; report: VerifyReport }
  | { kind: 'failed'; message: string; stack?: string };
export type FromMain = { id: number; rows: unknown[]; numAffectedRows?: bigint } | { id: number; error: string };

const port = parentPort!;
const send = (m: ToMain) => port.postMessage(m);
let nextId = 0;
const waiting = new Map<number, { resolve: (r: QueryResult<any>) => void; reject: (e: Error) => void }>();

port.on('message', (m: FromMain) => {
  const w = waiting.get(m.id);
  waiting.delete(m.id);
  if (!w) return;
  if ('error' in m) w.reject(new Error(m.error));
  else w.resolve({ rows: m.rows, numAffectedRows: m.numAffectedRows });
});

const relay: DatabaseConnection = {
  executeQuery<R>(q: CompiledQuery): Promise<QueryResult<R>> {
    const id = nextId++;
    return new Promise((resolve, reject) => {
      waiting.set(id, { resolve, reject });
      send({ kind: 'query', id, sql: q.sql, parameters: q.parameters });
    });
  },
  streamQuery() {
    throw new Error('the verify worker relays whole queries only');
  },
};

/** The main thread opened the transaction and ends it: begin/commit/rollback here are no-ops. */
class RelayDriver implements Driver {
  async init() {}
  async acquireConnection() {
    return relay;
  }
  async beginTransaction() {}
  async commitTransaction() {}
  async rollbackTransaction() {}
  async releaseConnection() {}
  async destroy() {}
}

const db = new Kysely<Database>({
  dialect: {
    createAdapter: () => new PostgresAdapter(),
    createDriver: () => new RelayDriver(),
    createQueryCompiler: () => new PostgresQueryCompiler(),
    createIntrospector: (k) => new PostgresIntrospector(k),
  },
});

db.transaction()
  .execute((tx) => verifySnapshot(tx))
  .then(
    (report) => send({ kind: 'done', report }),
    (err: unknown) => send({ kind: 'failed', message: err instanceof Error ? err.message : String(err), stack: err instanceof Error ? err.stack : undefined }),
  );
