/** Every migration, in order. Kysely's Migrator applies the ones a database has not seen yet. */
import type { Migration } from 'kysely';
import * as initial from './0001_initial.ts';
import * as quarantine from './0002_quarantine.ts';
import * as driftRepair from './0003_drift_repair.ts';
import * as timerCancelled from './0004_timer_cancelled.ts';
import * as fencing from './0005_fencing.ts';
import * as fleet from './0006_fleet.ts';

export const migrations: Record<string, Migration> = {
  '0001_initial': initial,
  '0002_quarantine': quarantine,
  '0003_drift_repair': driftRepair,
  '0004_timer_cancelled': timerCancelled,
  '0005_fencing': fencing,
  '0006_fleet': fleet,
};
