/** Every migration, in order. Kysely's Migrator applies the ones a database has not seen yet. */
import type { Migration } from 'kysely';
import * as initial from './0001_initial.ts';

export const migrations: Record<string, Migration> = {
  '0001_initial': initial,
};
