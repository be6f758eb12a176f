import { sql, type Kysely } from 'kysely';

/** A partition repairing drift holds its GPUs' claims with no VM: gpu_claims.vm_id becomes nullable. */
export async function up(db: Kysely<any>): Promise<void> {
  await sql`alter table gpu_claims alter column vm_id drop not null`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await sql`delete from gpu_claims where vm_id is null`.execute(db);
  await sql`alter table gpu_claims alter column vm_id set not null`.execute(db);
}
