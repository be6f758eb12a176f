/**
 * Opens the database: Postgres over `pg` when a URL is given, otherwise embedded PGlite with its
 * data in a folder. Both speak the same SQL through Kysely; the few things Kysely does not cover
 * (LISTEN/NOTIFY) are here too, so nothing else in gpuvm knows which one it runs on.
 */
import { createHash } from 'node:crypto';
import { chmodSync, lstatSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Kysely, Migrator, PostgresDialect, type MigrationResultSet } from 'kysely';
import pg from 'pg';
import { migrations } from '../../migrations/index.ts';
import { PGliteDialect } from './pglite-dialect.ts';
import type { Database } from './schema.ts';

export const EFFECTS_CHANNEL = 'gpuvm_effects';

/**
 * Marks a statement the engine runs at every step (a step's write, a claim, an effect's close): on
 * Postgres it is prepared once per connection and then only executed, so the server does not parse
 * and plan the same text again for every step. Put it first in the statement's text.
 */
export const PREPARED = '/* prepared */ ';

/** Makes `client` send marked statements as named (prepared) ones; the name is the text's hash. */
function prepareMarked(client: pg.Client): void {
  const query = client.query.bind(client) as (...args: unknown[]) => unknown;
  const names = new Map<string, string>();
  client.query = ((text: unknown, values?: unknown, callback?: unknown) => {
    if (typeof text !== 'string' || !text.startsWith(PREPARED) || !Array.isArray(values)) return query(text, values, callback);
    let name = names.get(text);
    if (name === undefined) {
      // Bounded: the engine's marked statements come in a few dozen shapes.
      if (names.size >= 500) return query(text, values, callback);
      names.set(text, (name = `gpuvm_${createHash('sha1').update(text).digest('hex').slice(0, 24)}`));
    }
    return query({ name, text, values }, callback);
  }) as typeof client.query;
}

export interface DbOptions {
  /** postgres://… ; when absent, PGlite in `pgliteDir` (or in memory when pgliteDir is 'memory://'). */
  databaseUrl?: string;
  pgliteDir?: string;
  poolSize?: number;
}

/**
 * A connection of its own, for what must live exactly as long as one database session: the agent's
 * advisory lock (src/engine/agent.ts). `closed` fires when the connection is lost — and with it
 * every session lock it held.
 */
export interface Session {
  query<R = Record<string, unknown>>(text: string, values?: unknown[]): Promise<{ rows: R[]; rowCount: number }>;
  readonly closed: AbortSignal;
  close(): Promise<void>;
}

export interface Db {
  kysely: Kysely<Database>;
  kind: 'postgres' | 'pglite';
  /** A dedicated connection (Postgres); on PGlite, the one session every caller shares. */
  openSession(): Promise<Session>;
  /** Subscribes to a NOTIFY channel; returns the unsubscribe function. */
  listen(channel: string, onNotify: (payload: string) => void): Promise<() => Promise<void>>;
  close(): Promise<void>;
}

export async function openDb(opts: DbOptions): Promise<Db> {
  if (opts.databaseUrl) return openPostgres(opts.databaseUrl, opts.poolSize ?? 10);
  return openPGlite(opts.pgliteDir ?? 'memory://');
}

// int8 (bigserial positions) and xid8 come back as strings from pg; keep them that way on both.
pg.types.setTypeParser(20, (v) => v);

async function openPostgres(url: string, poolSize: number): Promise<Db> {
  const pool = new pg.Pool({ connectionString: url, max: poolSize });
  // A dropped connection (Postgres restarting) surfaces as an 'error' event on its client. On an
  // idle client the pool discards it; on a checked-out one between two queries nothing listens,
  // and an unheard 'error' would take the process down. Listen on every client: the next query on
  // it fails instead, and the caller's retry gets a fresh connection.
  pool.on('error', () => {});
  pool.on('connect', (client) => {
    client.on('error', () => {});
    prepareMarked(client);
  });
  const kysely = new Kysely<Database>({ dialect: new PostgresDialect({ pool }) });
  const listeners = new Set<pg.Client>();
  let closing = false;
  return {
    kysely,
    kind: 'postgres',
    async openSession() {
      const closed = new AbortController();
      const client = new pg.Client({ connectionString: url });
      client.on('error', (err) => closed.abort(err));
      client.once('end', () => closed.abort(new Error('the database connection ended')));
      try {
        await client.connect();
      } catch (err) {
        await client.end().catch(() => {});
        throw err;
      }
      return {
        query: async (text, values) => {
          const r = await client.query(text, values);
          return { rows: r.rows, rowCount: r.rowCount ?? 0 };
        },
        closed: closed.signal,
        close: () => client.end().catch(() => {}),
      };
    },
    async listen(channel, onNotify) {
      // A dedicated connection; when it drops (Postgres restarting), it is opened again after a
      // pause. Notifications sent meanwhile are lost, which the workers' polling covers.
      let stopped = false;
      let client: pg.Client | null = null;
      const connect = async (): Promise<void> => {
        while (!stopped && !closing) {
          const c = new pg.Client({ connectionString: url });
          c.on('error', () => {});
          c.on('notification', (msg) => {
            if (msg.channel === channel) onNotify(msg.payload ?? '');
          });
          try {
            await c.connect();
            await c.query(`listen ${pg.escapeIdentifier(channel)}`);
          } catch {
            await c.end().catch(() => {});
            await new Promise((r) => setTimeout(r, 1000));
            continue;
          }
          client = c;
          listeners.add(c);
          c.once('end', () => {
            listeners.delete(c);
            if (!stopped && !closing) void connect();
          });
          return;
        }
      };
      await connect();
      return async () => {
        stopped = true;
        if (client) {
          listeners.delete(client);
          await client.end().catch(() => {});
        }
      };
    },
    async close() {
      closing = true;
      for (const client of listeners) await client.end().catch(() => {});
      await kysely.destroy();
    },
  };
}

async function openPGlite(dir: string): Promise<Db> {
  if (!dir.startsWith('memory://')) mkdirSync(dir, { recursive: true, mode: 0o700 });
  // Loaded only here: a service on Postgres never pays for the embedded database's import.
  const { PGlite } = await import('@electric-sql/pglite');
  const pglite = new PGlite(dir);
  await pglite.waitReady;
  if (!dir.startsWith('memory://')) ownerOnly(dir);
  const kysely = new Kysely<Database>({ dialect: new PGliteDialect(pglite) });
  return {
    kysely,
    kind: 'pglite',
    async openSession() {
      // One process owns the folder (src/store/data-dir.ts) and PGlite is one session: never lost.
      return {
        query: async <R,>(text: string, values?: unknown[]) => {
          const r = await pglite.query<R>(text, values);
          return { rows: r.rows, rowCount: r.affectedRows ?? r.rows.length };
        },
        closed: new AbortController().signal,
        close: async () => {},
      };
    },
    async listen(channel, onNotify) {
      const unsubscribe = await pglite.listen(channel, onNotify);
      return async () => unsubscribe();
    },
    async close() {
      await kysely.destroy();
    },
  };
}

/**
 * PGlite unpacks a new database's files readable and writable by everyone (0666), whatever the
 * umask; later files follow the umask. The data folder is its owner's alone: take group and others'
 * bits off everything in it (symbolic links aside).
 */
function ownerOnly(dir: string): void {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.isSymbolicLink()) continue;
    const path = join(dir, entry.name);
    const mode = lstatSync(path).mode & 0o777;
    if ((mode & 0o077) !== 0) chmodSync(path, mode & 0o700);
    if (entry.isDirectory()) ownerOnly(path);
  }
}

export async function migrate(db: Db): Promise<MigrationResultSet> {
  const migrator = new Migrator({
    db: db.kysely,
    provider: { getMigrations: async () => migrations },
  });
  const result = await migrator.migrateToLatest();
  if (result.error) throw result.error;
  return result;
}
