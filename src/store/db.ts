/**
 * Opens the database: Postgres over `pg` when a URL is given, otherwise embedded PGlite with its
 * data in a folder. Both speak the same SQL through Kysely; the few things Kysely does not cover
 * (LISTEN/NOTIFY) are here too, so nothing else in gpuvm knows which one it runs on.
 */
import { mkdirSync } from 'node:fs';
import { PGlite } from '@electric-sql/pglite';
import { Kysely, Migrator, PostgresDialect, type MigrationResultSet } from 'kysely';
import pg from 'pg';
import { migrations } from '../../migrations/index.ts';
import { PGliteDialect } from './pglite-dialect.ts';
import type { Database } from './schema.ts';

export const EFFECTS_CHANNEL = 'gpuvm_effects';

export interface DbOptions {
  /** postgres://… ; when absent, PGlite in `pgliteDir` (or in memory when pgliteDir is 'memory://'). */
  databaseUrl?: string;
  pgliteDir?: string;
  poolSize?: number;
}

export interface Db {
  kysely: Kysely<Database>;
  kind: 'postgres' | 'pglite';
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
  // A dropped connection (Postgres restart) surfaces as an error on an idle client; the pool
  // discards that client and the next query opens a new one.
  pool.on('error', () => {});
  const kysely = new Kysely<Database>({ dialect: new PostgresDialect({ pool }) });
  const listeners = new Set<pg.Client>();
  return {
    kysely,
    kind: 'postgres',
    async listen(channel, onNotify) {
      const client = new pg.Client({ connectionString: url });
      client.on('error', () => {});
      await client.connect();
      listeners.add(client);
      client.on('notification', (msg) => {
        if (msg.channel === channel) onNotify(msg.payload ?? '');
      });
      await client.query(`listen ${pg.escapeIdentifier(channel)}`);
      return async () => {
        listeners.delete(client);
        await client.end().catch(() => {});
      };
    },
    async close() {
      for (const client of listeners) await client.end().catch(() => {});
      await kysely.destroy();
    },
  };
}

async function openPGlite(dir: string): Promise<Db> {
  if (!dir.startsWith('memory://')) mkdirSync(dir, { recursive: true });
  const pglite = new PGlite(dir);
  await pglite.waitReady;
  const kysely = new Kysely<Database>({ dialect: new PGliteDialect(pglite) });
  return {
    kysely,
    kind: 'pglite',
    async listen(channel, onNotify) {
      const unsubscribe = await pglite.listen(channel, onNotify);
      return async () => unsubscribe();
    },
    async close() {
      await kysely.destroy();
    },
  };
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
