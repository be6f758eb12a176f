import { sql, type Kysely } from 'kysely';

/** GPU quarantine on the hosts projection: module id → { reason, source }. */
export async function up(db: Kysely<any>): Promise<void> {
  await sql`alter table hosts add column quarantined_modules jsonb not null default '{}'::jsonb`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await sql`alter table hosts drop column quarantined_modules`.execute(db);
}
