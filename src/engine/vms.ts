/**
 * The commands and queries the API offers on VMs. Creating a VM claims a partition and records
 * the VM in one transaction; everything after that is driven by effects.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { sql, type Kysely } from 'kysely';
import { partitionStream, vmStream, type VmContext } from '../../machines/index.ts';
import { badRequest, conflict, GpuvmError, notFound } from '../errors.ts';
import { isUniqueViolation, readCorrelated, type Executor, type StoredEvent } from '../store/events.ts';
import { readEffectsWithTries } from '../store/effects.ts';
import { isClaimConflict, vmRow, type StreamSnapshot, type VmRow } from '../store/projections.ts';
import { PREPARED } from '../store/db.ts';
import type { Database } from '../store/schema.ts';
import { applyEvent, commitSteps, prepareStep, type EffectPolicy, type LocalWorker } from './commands.ts';
import { retrying } from './retrying.ts';
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
  /**
   * The client's key for this create (the Idempotency-Key header): a create with a key already used
   * answers with the VM that key made, so a client that retries — its first answer lost, or a 500 —
   * never makes a second VM. The CREATE event's causation is `request:<key>`, unique among CREATEs.
   */
  idempotencyKey?: string;
}

export const IDEMPOTENCY_KEY_PATTERN = /^[A-Za-z0-9._:-]{8,128}$/;

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
    /** The effect worker of this process: it runs the effects these requests write without a claim. */
    private readonly worker: LocalWorker | null = null,
    /** False until the service's first reconciliation has judged the host (see Service.ready). */
    private readonly ready: () => boolean = () => true,
  ) {}

  /** The VM a CREATE with this causation made, if one did. */
  private async createdBy(causationId: string): Promise<VmRow | null> {
    const row = await this.db.selectFrom('events').select('stream_id').where('causation_id', '=', causationId).where('type', '=', 'CREATE').executeTakeFirst();
    return row ? this.find(this.db, row.stream_id.slice('vm:'.length)) : null;
  }

  /** The VM an idempotency key made, if the request matches the one that made it. */
  private sameRequest(vm: VmRow, req: CreateVmRequest): VmRow {
    if (vm.gpu_count !== req.gpus || (req.name !== undefined && vm.name !== req.name)) {
      throw conflict('idempotency-key-reused', `Idempotency-Key ${req.idempotencyKey} already created VM ${vm.id} (${vm.gpu_count} GPU(s), name ${vm.name}); use a new key for a different request`);
    }
    return vm;
  }

  async create(req: CreateVmRequest): Promise<VmRow> {
    if (!(GPU_COUNTS as readonly number[]).includes(req.gpus)) {
      throw badRequest(`gpus must be 1, 2, 4 or 8 (got ${req.gpus})`);
    }
    const causationId = `request:${req.idempotencyKey ?? req.requestId ?? randomUUID()}`;
    if (req.idempotencyKey !== undefined) {
      const made = await this.createdBy(causationId);
      if (made) return this.sameRequest(made, req);
    }
    if (!this.ready()) throw new GpuvmError(503, 'starting', 'gpuvm is starting: its first reconciliation with the host is under way; retry in a moment');
    try {
      return await this.place(req, causationId);
    } catch (err) {
      if (req.idempotencyKey === undefined || (err instanceof GpuvmError && err.status < 500)) throw err;
      // The same key racing itself, or an ambiguous commit (the connection dropped after COMMIT):
      // the log says whether the VM was made.
      const made = await this.createdBy(causationId).catch(() => null);
      if (!made) throw err;
      // The write committed: the effects it handed to this process's worker start now, not after their lease.
      await this.worker?.adopt(made.id).catch(() => {});
      return this.sameRequest(made, req);
    }
  }

  private async place(req: CreateVmRequest, causationId: string): Promise<VmRow> {
    const vmId = newVmId();
    const name = req.name ?? vmId;
    // A concurrent create may claim overlapping modules first; the primary key on gpu_claims then
    // refuses ours, and we decide again on what is left.
    for (let attempt = 0; attempt < 50; attempt++) {
      try {
        // No transaction: the read below is advice, and the one statement that writes CLAIM and CREATE
        // together is guarded by the partition's stream version and the claims' primary key.
        const written = await retrying(async () => {
          // One read: the host's partitions, its claimed GPUs and its quarantined ones.
          const { rows: partitions } = await sql<{ partition_id: number; modules: number[]; state: string; claimed: number[]; quarantined: Record<string, unknown> | null }>`${sql.raw(PREPARED)}
            select p.partition_id, p.modules, p.state,
                   (select coalesce(json_agg(c.module_id), '[]') from gpu_claims c where c.host_id = ${this.hostId}) as claimed,
                   (select h.quarantined_modules from hosts h where h.id = ${this.hostId}) as quarantined
            from partitions p where p.host_id = ${this.hostId}`.execute(this.db);
          if (partitions.length === 0) throw notFound(`host ${this.hostId} is not registered`);
          const claimed = new Set(partitions[0]!.claimed);
          const quarantined = new Set(Object.keys(partitions[0]!.quarantined ?? {}).map(Number));
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
          const snapshots = this.worker?.snapshots;
          const claim = await prepareStep(this.db, pStream, { type: 'CLAIM', vmId }, meta, this.policy, { snapshots });
          // Another placement claimed it after we read the table: decide again on fresh state.
          if (claim.kind !== 'prepared') throw new PlacementRace();
          const ctx = claim.next.context as { gpus: { moduleId: number; pciAddress: string }[] };
          const created = await prepareStep(
            this.db,
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
            // A new id: the stream does not exist yet (should it, the insert at version 1 fails).
            { snapshot: null },
          );
          if (created.kind !== 'prepared') throw new Error(`vm ${vmId} could not be created`);
          return commitSteps(this.db, [claim, created], { snapshots, claimFor: this.worker?.claimOnWrite(), batcher: this.worker?.batcher });
        });
        crashPoint('event:CREATE:after-commit');
        for (const result of written) this.worker?.handOver(result);
        return vmRow(written[1]!.snapshot);
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
    const result = await retrying(() =>
      applyEvent(this.db, vmStream(vmId), { type: 'DELETE' }, { actor, correlationId: vmId, causationId: `request:${requestId}` }, this.policy, {
        snapshots: this.worker?.snapshots,
        batcher: this.worker?.batcher,
        claimFor: this.worker?.claimOnWrite(),
      }),
    );
    if (result.kind === 'rejected') {
      const snapshot = result.snapshot;
      if (!snapshot) throw notFound(`no VM ${vmId}`);
      const ctx = snapshot.context as unknown as VmContext;
      if (snapshot.state !== 'deleted' && ctx.deleteRequested) return vmRow(snapshot);
      throw conflict('bad-state', `VM ${vmId} is already ${snapshot.state}`);
    }
    crashPoint('event:DELETE:after-commit');
    this.worker?.handOver(result);
    return vmRow(result.snapshot);
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

  /**
   * The VM once its state is no longer `from` — at once if it already isn't — or as it is when
   * `timeoutMs` runs out: a long poll, so that a waiting client sees each step as it commits. Steps
   * this process commits are heard at once; anything else (another writer) by reading every 250 ms.
   */
  async awaitChange(vmId: string, from: string, timeoutMs: number): Promise<VmRow> {
    const deadline = Date.now() + timeoutMs;
    let heard: StreamSnapshot | null = null;
    let wake: () => void = () => {};
    const unwatch = this.worker?.snapshots.watch(vmStream(vmId), (s) => {
      if (s.state === from) return;
      heard = s;
      wake();
    });
    try {
      // Read after the watch is set: a step committed in between is either read here or heard. When
      // the last snapshot this process committed is still in `from`, there is nothing to read yet.
      const cached = this.worker?.snapshots.get(vmStream(vmId));
      let vm = cached?.state === from ? vmRow(cached) : await this.get(vmId);
      for (;;) {
        if (heard) return vmRow(heard);
        const left = deadline - Date.now();
        if (vm.state !== from || left <= 0) return vm;
        let timer: NodeJS.Timeout | undefined;
        await new Promise<void>((resolve) => {
          wake = resolve;
          timer = setTimeout(resolve, Math.min(250, left));
        });
        clearTimeout(timer);
        if (!heard) vm = await this.get(vmId);
      }
    } finally {
      unwatch?.();
    }
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
