import { sql, type Kysely } from 'kysely';

/**
 * A durable timer lives as long as the state that set it: when its stream leaves that state before
 * it falls due, the step that leaves cancels it (status `cancelled`). The step finds its stream's
 * pending effects through a partial index, which holds only pending rows.
 */
export async function up(db: Kysely<any>): Promise<void> {
  await sql`alter table effects drop constraint effects_status_check`.execute(db);
  await sql`alter table effects add constraint effects_status_check check (status in ('pending', 'running', 'done', 'failed', 'cancelled'))`.execute(db);
  await sql`create index effects_stream_pending on effects (stream_id) where status = 'pending'`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await sql`drop index effects_stream_pending`.execute(db);
  await sql`update effects set status = 'done' where status = 'cancelled'`.execute(db);
  await sql`alter table effects drop constraint effects_status_check`.execute(db);
  await sql`alter table effects add constraint effects_status_check check (status in ('pending', 'running', 'done', 'failed'))`.execute(db);
}
