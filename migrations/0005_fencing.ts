import { sql, type Kysely } from 'kysely';

/**
 * Fencing (one agent per host, epochs) and waiting without spending tries:
 * - `agents`: per host, the epoch of its current agent and who holds it. Each agent start takes the
 *   next epoch; a write from an older epoch is refused (effects.lease_epoch must be the current one).
 * - effects.lease_epoch: the epoch of the agent holding the lease; effects.waits and waiting_since:
 *   "not yet" answers (Fabric Manager starting, a QEMU still exiting) that did not count as tries.
 * - effect_attempts.epoch, and `wait`: 0 for a try that counts, n for the n-th wait (outcome 'waiting').
 * - One CREATE per request id (the Idempotency-Key): a retried create finds the VM it made.
 */
export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    create table agents (
      host_id text primary key,
      epoch bigint not null,
      pid integer not null,
      machine text not null,
      command text not null,
      started_at timestamptz not null,
      heartbeat_at timestamptz not null
    )`.execute(db);
  await sql`alter table effects add column lease_epoch bigint, add column waits integer not null default 0, add column waiting_since timestamptz`.execute(db);
  await sql`alter table effect_attempts add column epoch bigint, add column wait integer not null default 0`.execute(db);
  await sql`alter table effect_attempts drop constraint effect_attempts_pkey`.execute(db);
  await sql`alter table effect_attempts add primary key (effect_id, attempt, wait)`.execute(db);
  await sql`alter table effect_attempts drop constraint effect_attempts_outcome_check`.execute(db);
  await sql`alter table effect_attempts add constraint effect_attempts_outcome_check check (outcome in ('ok', 'error', 'lost', 'waiting'))`.execute(db);
  await sql`create unique index events_create_request on events (causation_id) where type = 'CREATE'`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await sql`drop index events_create_request`.execute(db);
  await sql`delete from effect_attempts where outcome = 'waiting'`.execute(db);
  await sql`alter table effect_attempts drop constraint effect_attempts_outcome_check`.execute(db);
  await sql`alter table effect_attempts add constraint effect_attempts_outcome_check check (outcome in ('ok', 'error', 'lost'))`.execute(db);
  await sql`alter table effect_attempts drop constraint effect_attempts_pkey`.execute(db);
  await sql`alter table effect_attempts add primary key (effect_id, attempt)`.execute(db);
  await sql`alter table effect_attempts drop column epoch, drop column wait`.execute(db);
  await sql`alter table effects drop column lease_epoch, drop column waits, drop column waiting_since`.execute(db);
  await sql`drop table agents`.execute(db);
}
