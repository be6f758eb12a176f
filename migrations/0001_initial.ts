import { sql, type Kysely } from 'kysely';

/**
 * The log, the outbox and the projections.
 * - events: append-only; (stream_id, stream_version) unique is the optimistic-concurrency guard;
 *   (stream_id, causation_id) unique makes effect deliveries idempotent; tx_id lets readers of the
 *   global log stay below the oldest running transaction so no late commit is skipped.
 * - streams: each stream's latest snapshot (a projection, rebuildable by folding its events).
 * - effects / effect_attempts: the outbox and its audit of every try.
 * - vms, partitions, gpu_claims, hosts: read projections; gpu_claims' primary key is the rule that
 *   no GPU module is ever claimed twice.
 */
export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    create table events (
      position bigserial primary key,
      stream_id text not null,
      stream_version integer not null,
      type text not null,
      data jsonb not null,
      state_before jsonb,
      state_after jsonb not null,
      machine text not null,
      machine_version integer not null,
      causation_id text,
      correlation_id text not null,
      actor text not null,
      recorded_at timestamptz not null,
      tx_id xid8 not null default pg_current_xact_id(),
      constraint events_stream_version unique (stream_id, stream_version)
    )`.execute(db);
  await sql`create unique index events_stream_causation on events (stream_id, causation_id) where causation_id is not null`.execute(db);
  await sql`create index events_correlation on events (correlation_id, position)`.execute(db);
  await sql`create index events_tx on events (tx_id, position)`.execute(db);

  await sql`
    create table streams (
      stream_id text primary key,
      machine text not null,
      machine_version integer not null,
      version integer not null,
      state jsonb not null,
      context jsonb not null,
      created_at timestamptz not null,
      updated_at timestamptz not null
    )`.execute(db);

  await sql`
    create table effects (
      id text primary key,
      stream_id text not null,
      host_id text not null,
      type text not null,
      params jsonb not null,
      correlation_id text not null,
      status text not null check (status in ('pending', 'running', 'done', 'failed')),
      due_at timestamptz not null,
      attempts integer not null default 0,
      max_attempts integer not null,
      lease_owner text,
      lease_until timestamptz,
      claimed_at timestamptz,
      last_error text,
      note text,
      created_at timestamptz not null,
      completed_at timestamptz
    )`.execute(db);
  await sql`create index effects_due on effects (host_id, due_at) where status in ('pending', 'running')`.execute(db);
  await sql`create index effects_correlation on effects (correlation_id)`.execute(db);

  await sql`
    create table effect_attempts (
      effect_id text not null references effects (id),
      attempt integer not null,
      worker text not null,
      started_at timestamptz not null,
      finished_at timestamptz not null,
      outcome text not null check (outcome in ('ok', 'error', 'lost')),
      error text,
      primary key (effect_id, attempt)
    )`.execute(db);

  await sql`
    create table hosts (
      id text primary key,
      simulated boolean not null,
      board text not null,
      inventory jsonb not null,
      registered_at timestamptz not null
    )`.execute(db);

  await sql`
    create table vms (
      id text primary key,
      name text not null,
      host_id text not null,
      gpu_count integer not null,
      partition_id integer not null,
      gpus jsonb not null,
      state text not null,
      reason text,
      qemu_pid integer,
      created_at timestamptz not null,
      updated_at timestamptz not null
    )`.execute(db);
  await sql`create unique index vms_live_name on vms (name) where state <> 'deleted'`.execute(db);

  await sql`
    create table partitions (
      host_id text not null,
      partition_id integer not null,
      modules jsonb not null,
      size integer not null,
      state text not null,
      vm_id text,
      failure text,
      updated_at timestamptz not null,
      primary key (host_id, partition_id)
    )`.execute(db);

  await sql`
    create table gpu_claims (
      host_id text not null,
      module_id integer not null,
      partition_id integer not null,
      vm_id text not null,
      primary key (host_id, module_id)
    )`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['gpu_claims', 'partitions', 'vms', 'hosts', 'effect_attempts', 'effects', 'streams', 'events']) {
    await sql`drop table if exists ${sql.table(table)}`.execute(db);
  }
}
