/** A fresh database per test file: PGlite in memory, or a new database on DATABASE_URL's server. */
import pg from 'pg';
import { migrate, openDb, type Db } from '../../src/store/db.ts';

export const usingPostgres = Boolean(process.env.DATABASE_URL);

/** A database URL of a brand-new database on the test Postgres, or undefined for PGlite. */
export async function freshDatabaseUrl(): Promise<{ url: string | undefined; drop: () => Promise<void> }> {
  const base = process.env.DATABASE_URL;
  if (!base) return { url: undefined, drop: async () => {} };
  const name = `gpuvm_t_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
  const admin = new pg.Client({ connectionString: base });
  await admin.connect();
  await admin.query(`create database ${name}`);
  await admin.end();
  const url = new URL(base);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    drop: async () => {
      const c = new pg.Client({ connectionString: base });
      await c.connect();
      await c.query(`drop database if exists ${name} with (force)`);
      await c.end();
    },
  };
}

/** A migrated database of the test file's own (see freshDatabaseUrl); `close` closes and drops it. */
export async function openFreshDb(): Promise<{ db: Db; close: () => Promise<void> }> {
  const fresh = await freshDatabaseUrl();
  const db = await openDb({ databaseUrl: fresh.url, pgliteDir: 'memory://' });
  await migrate(db);
  return {
    db,
    close: async () => {
      await db.close();
      await fresh.drop();
    },
  };
}
