import { sql, type Kysely } from 'kysely';

/**
 * A fleet on one database:
 * - hosts.state: the host machine's state (registered, ready, cordoned, draining, maintenance,
 *   removed), hosts.silent_since: when an API node found its agent silent (null while it is heard).
 *   Placement reads both; they are projections of the host stream like every other column.
 * - agents.ready_at: when the agent of the current epoch finished its first reconciliation; null
 *   while it is starting. Nothing is placed on a host whose agent has not judged it.
 *   agents.vm_defaults: the VM sizes and powerdown timeout of the host's config, for API nodes that
 *   place there without reading that config.
 * - Indexes for the fleet's reads: a host's live VMs (drain, rm, capacity), the recent request mix.
 */
export async function up(db: Kysely<any>): Promise<void> {
  await sql`alter table hosts add column state text not null default 'registered', add column silent_since timestamptz`.execute(db);
  await sql`update hosts set state = s.state #>> '{}' from streams s where s.stream_id = 'host:' || hosts.id`.execute(db);
  await sql`alter table agents add column ready_at timestamptz, add column vm_defaults jsonb`.execute(db);
  await sql`create index vms_live_by_host on vms (host_id) where state <> 'deleted'`.execute(db);
  await sql`create index vms_created on vms (created_at)`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await sql`drop index vms_created`.execute(db);
  await sql`drop index vms_live_by_host`.execute(db);
  await sql`alter table agents drop column ready_at, drop column vm_defaults`.execute(db);
  await sql`alter table hosts drop column state, drop column silent_since`.execute(db);
}
