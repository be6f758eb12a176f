/**
 * An incident bundle for one VM: every event correlated with it (its own stream and its partition's
 * cycle), then every effect those events asked for, each followed by every try of it. One record
 * per JSON line, so the bundle can be grepped, diffed and loaded back as it is.
 */
import { sql, type Kysely } from 'kysely';
import { vmStream } from '../../machines/index.ts';
import { notFound } from '../errors.ts';
import { readEffectsWithTries } from '../store/effects.ts';
import { readCorrelated } from '../store/events.ts';
import type { Database } from '../store/schema.ts';

export interface EventRecord {
  kind: 'event';
  position: string;
  txId: string;
  streamId: string;
  version: number;
  type: string;
  data: Record<string, unknown>;
  stateBefore: unknown;
  stateAfter: unknown;
  machine: string;
  machineVersion: number;
  causationId: string | null;
  correlationId: string;
  actor: string;
  recordedAt: string;
}

export interface EffectRecord {
  kind: 'effect';
  id: string;
  streamId: string;
  hostId: string;
  type: string;
  params: Record<string, unknown>;
  correlationId: string;
  status: string;
  attempts: number;
  maxAttempts: number;
  dueAt: string;
  createdAt: string;
  completedAt: string | null;
  lastError: string | null;
  note: string | null;
}

export interface AttemptRecord {
  kind: 'attempt';
  effectId: string;
  attempt: number;
  worker: string;
  startedAt: string;
  finishedAt: string;
  outcome: string;
  error: string | null;
}

export type IncidentRecord = EventRecord | EffectRecord | AttemptRecord;

const iso = (d: Date | string) => new Date(d).toISOString();

/**
 * The bundle of a VM, record by record. Throws GpuvmError 404 (on the first `next()`) when the log
 * holds no such VM.
 */
export async function* exportIncident(db: Kysely<Database>, vmId: string): AsyncGenerator<IncidentRecord> {
  const known = await db.selectFrom('events').select(sql<number>`1`.as('one')).where('stream_id', '=', vmStream(vmId)).limit(1).executeTakeFirst();
  if (!known) throw notFound(`no VM ${vmId}`);

  for (const e of await readCorrelated(db, vmId)) {
    yield {
      kind: 'event',
      position: e.position,
      txId: e.txId,
      streamId: e.streamId,
      version: e.streamVersion,
      type: e.type,
      data: e.data,
      stateBefore: e.stateBefore,
      stateAfter: e.stateAfter,
      machine: e.machine,
      machineVersion: e.machineVersion,
      causationId: e.causationId,
      correlationId: e.correlationId,
      actor: e.actor,
      recordedAt: iso(e.recordedAt),
    };
  }

  for (const e of await readEffectsWithTries(db, vmId)) {
    yield {
      kind: 'effect',
      id: e.id,
      streamId: e.stream_id,
      hostId: e.host_id,
      type: e.type,
      params: e.params,
      correlationId: e.correlation_id,
      status: e.status,
      attempts: e.attempts,
      maxAttempts: e.max_attempts,
      dueAt: iso(e.due_at),
      createdAt: iso(e.created_at),
      completedAt: e.completed_at ? iso(e.completed_at) : null,
      lastError: e.last_error,
      note: e.note,
    };
    for (const a of e.tries) {
      yield {
        kind: 'attempt',
        effectId: a.effect_id,
        attempt: a.attempt,
        worker: a.worker,
        startedAt: iso(a.started_at),
        finishedAt: iso(a.finished_at),
        outcome: a.outcome,
        error: a.error,
      };
    }
  }
}
