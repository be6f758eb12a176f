/**
 * The commands and queries the API offers on VMs. Creating a VM claims a partition and records
 * the VM in one transaction; everything after that is driven by effects.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { sql, type Kysely } from 'kysely';
import { partitionStream, vmStream, type VmContext } from '../../machines/index.ts';
import { badRequest, conflict, notFound } from '../errors.ts';
import { isUniqueViolation, readCorrelated, type Executor, type StoredEvent } from '../store/events.ts';
import { readEffectsWithTries } from '../store/effects.ts';
import { isClaimConflict, type VmRow } from '../store/projections.ts';
import type { Database } from '../store/schema.ts';
import { applyEvent, inTransaction, loadSnapshot, type EffectPolicy } from './commands.ts';
import { choosePartition, GPU_COUNTS } from './placement.ts';
import { crashPoint } from './crash-points.ts';

export const VM_NAME_PATTERN = /^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$/;
export const VM_ID_PATTERN = /^vm-[a-z0-9]{10}$/;

export interface VmDefaults {
  memoryMiB: number;
  vcpus: number;
  powerdownTimeoutMs: number;
}

export interface CreateVmRequest {
  gpus: number;
  name?: string;
  actor: string;
  requestId?: string;
}

function newVmId(): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  return 'vm-' + Array.from(randomBytes(10), (b) => alphabet[b % alphabet.length]).join('');
}

/** The chosen partition was taken between reading the table and claiming it. */
class PlacementRace extends Error {}

export class VmService {
  constructor(
    private readonly db: Kysely<Database>,
    private readonly hostId: string,
    private readonly defaults: VmDefaults,
    private readonly policy: EffectPolicy,
    /** Called after a commit that wrote effects: the local worker claims them without waiting for NOTIFY. */
    private readonly effectsWritten: () => void = () => {},
  ) {}

  async create(req: CreateVmRequest): Promise<VmRow> {
    if (!(GPU_COUNTS as readonly number[]).includes(req.gpus)) {
      throw badRequest(`gpus must be 1, 2, 4 or 8 (got ${req.gpus})`);
    }
    const vmId = newVmId();
    const name = req.name ?? vmId;
    const causationId = `request:${req.requestId ?? randomUUID()}`;
    // A concurrent create may claim overlapping modules first; the primary key on gpu_claims then
    // refuses ours, and we decide again on what is left.
    for (let attempt = 0; attempt < 50; attempt++) {
      try {
        const vm = await inTransaction(this.db, async (tx) => {
          const partitions = await tx
            .selectFrom('partitions')
            .select(['partition_id', 'modules', 'state'])
            .where('host_id', '=', this.hostId)
            .execute();
          if (partitions.length === 0) throw notFound(`host ${this.hostId} is not registered`);
          const claims = await tx.selectFrom('gpu_claims').select('module_id').where('host_id', '=', this.hostId).execute();
          const host = await tx.selectFrom('hosts').select('quarantined_modules').where('id', '=', this.hostId).executeTakeFirst();
          const claimed = new Set(claims.map((c) => c.module_id));
          const quarantined = new Set(Object.keys(host?.quarantined_modules ?? {}).map(Number));
          // A quarantined GPU is as unavailable as a claimed one; a quarantined partition is not 'free'.
          const unavailable = new Set([...claimed, ...quarantined]);
          const chosen = choosePartition(
            partitions.map((p) => ({ partitionId: p.partition_id, modules: p.modules, state: p.state })),
            unavailable,
            req.gpus,
          );
          if (!chosen) {
            const held = quarantined.size ? `, ${quarantined.size} quarantined` : '';
            throw conflict(
              'no-capacity',
              `no capacity: no free partition of ${req.gpus} GPU(s) on host ${this.hostId} (${8 - claimed.size} of 8 modules unclaimed${held})`,
            );
          }
          const pStream = partitionStream(this.hostId, chosen.partitionId);
          const meta = { actor: req.actor, correlationId: vmId, causationId };
          const claim = await applyEvent(tx, pStream, { type: 'CLAIM', vmId }, meta, this.policy);
          // Another placement claimed it after we read the table: decide again on fresh state.
          if (claim.kind !== 'changed') throw new PlacementRace();
          const ctx = claim.snapshot.context as { gpus: { moduleId: number; pciAddress: string }[] };
          const created = await applyEvent(
            tx,
            vmStream(vmId),
            {
              type: 'CREATE',
              vmId,
              name,
              hostId: this.hostId,
              partitionId: chosen.partitionId,
              gpus: [...ctx.gpus].sort((a, b) => a.moduleId - b.moduleId),
              memoryMiB: this.defaults.memoryMiB,
              vcpus: this.defaults.vcpus,
              powerdownTimeoutMs: this.defaults.powerdownTimeoutMs,
            },
            meta,
            this.policy,
          );
          if (created.kind !== 'changed') throw new Error(`vm ${vmId} could not be created`);
          return (await this.find(tx, vmId))!;
        });
        crashPoint('event:CREATE:after-commit');
        this.effectsWritten();
        return vm;
      } catch (err) {
        if (err instanceof PlacementRace || isClaimConflict(err)) continue;
        if (isUniqueViolation(err, 'vms_live_name')) throw conflict('name-taken', `a VM named ${JSON.stringify(name)} already exists`);
        throw err;
      }
    }
    throw conflict('contention', 'could not place the VM: too many concurrent placements, try again');
  }

  /** Accepted in every state but `deleted`; a repeat while deletion is under way changes nothing. */
  async delete(vmId: string, actor: string, requestId: string = randomUUID()): Promise<VmRow> {
    const vm = await inTransaction(this.db, async (tx) => {
      const { snapshot } = await loadSnapshot(tx, vmStream(vmId));
      if (!snapshot) throw notFound(`no VM ${vmId}`);
      const result = await applyEvent(tx, vmStream(vmId), { type: 'DELETE' }, { actor, correlationId: vmId, causationId: `request:${requestId}` }, this.policy);
      if (result.kind === 'rejected') {
        const ctx = snapshot.context as unknown as VmContext;
        if (snapshot.state !== 'deleted' && ctx.deleteRequested) return (await this.find(tx, vmId))!;
        throw conflict('bad-state', `VM ${vmId} is already ${snapshot.state}`);
      }
      return (await this.find(tx, vmId))!;
    });
    crashPoint('event:DELETE:after-commit');
    this.effectsWritten();
    return vm;
  }

  async find(db: Executor, vmId: string): Promise<VmRow | null> {
    const row = await db.selectFrom('vms').selectAll().where('id', '=', vmId).executeTakeFirst();
    return (row as VmRow | undefined) ?? null;
  }

  async get(vmId: string): Promise<VmRow> {
    const vm = await this.find(this.db, vmId);
    if (!vm) throw notFound(`no VM ${vmId}`);
    return vm;
  }

  async list(opts: { includeDeleted?: boolean } = {}): Promise<VmRow[]> {
    let q = this.db.selectFrom('vms').selectAll().orderBy('created_at').orderBy('id');
    if (!opts.includeDeleted) q = q.where('state', '<>', 'deleted');
    return (await q.execute()) as VmRow[];
  }

  /** Every event of the VM and of its partition's cycle, and every try of every effect they asked for. */
  async history(vmId: string): Promise<{ vm: VmRow; events: HistoryEntry[]; effects: EffectHistory[] }> {
    const vm = await this.get(vmId);
    const events = await readCorrelated(this.db, vmId);
    const effects = await readEffectsWithTries(this.db, vmId);
    return {
      vm,
      events: events.map((e, i) => toHistoryEntry(e, events[i - 1])),
      effects: effects.map((e) => ({
        id: e.id,
        stream: e.stream_id,
        type: e.type,
        status: e.status,
        attempts: e.attempts,
        maxAttempts: e.max_attempts,
        lastError: e.last_error,
        note: e.note,
        createdAt: new Date(e.created_at),
        completedAt: e.completed_at ? new Date(e.completed_at) : null,
        tries: e.tries.map((a) => ({
          attempt: a.attempt,
          worker: a.worker,
          startedAt: new Date(a.started_at),
          finishedAt: new Date(a.finished_at),
          outcome: a.outcome,
          error: a.error,
        })),
      })),
    };
  }

  async countByState(): Promise<Record<string, number>> {
    const rows = await this.db
      .selectFrom('vms')
      .select(['state', sql<string>`count(*)::text`.as('n')])
      .groupBy('state')
      .execute();
    return Object.fromEntries(rows.map((r) => [r.state, Number(r.n)]));
  }
}

export interface HistoryEntry {
  position: string;
  at: Date;
  stream: string;
  version: number;
  type: string;
  from: string | null;
  to: string;
  actor: string;
  data: Record<string, unknown>;
  /** Time since the previous event of this history: how long the step took. */
  stepMs: number | null;
}

export interface EffectHistory {
  id: string;
  stream: string;
  type: string;
  status: string;
  attempts: number;
  maxAttempts: number;
  lastError: string | null;
  note: string | null;
  createdAt: Date;
  completedAt: Date | null;
  tries: { attempt: number; worker: string; startedAt: Date; finishedAt: Date; outcome: string; error: string | null }[];
}

function toHistoryEntry(e: StoredEvent, previous: StoredEvent | undefined): HistoryEntry {
  return {
    position: e.position,
    at: e.recordedAt,
    stream: e.streamId,
    version: e.streamVersion,
    type: e.type,
    from: (e.stateBefore as string | null) ?? null,
    to: e.stateAfter as string,
    actor: e.actor,
    data: e.data,
    stepMs: previous ? e.recordedAt.getTime() - previous.recordedAt.getTime() : null,
  };
}
