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
import type { Database } from '../store/schema.ts';
import { applyEvent, commitSteps, prepareStep, type ApplyResult, type EffectPolicy, type LocalWorker } from './commands.ts';
import { retrying } from './retrying.ts';
import { GPU_COUNTS, place, type Demand, type GpuCount, type HostView, type PlacementDecision } from './placement.ts';
import { availability, readCandidates, readHostStatus, unreachableHosts, type BoardName, type FleetCandidates } from './fleet.ts';
import { crashPoint } from './crash-points.ts';

/** A VM in one of these has ended: it holds no GPUs and runs nothing. */
export const ENDED_STATES: readonly string[] = ['deleted', 'failed', 'crashed'];

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
  /** Only this host (`--host`), or only hosts of this board (`--board`). */
  hostId?: string;
  board?: BoardName;
  actor: string;
  requestId?: string;
  /**
   * The client's key for this create (the Idempotency-Key header): a create with a key already used
   * answers with the VM that key made, so a client that retries — its first answer lost, or a 500 —
   * never makes a second VM. The CREATE event's causation is `request:<key>`, unique among CREATEs.
   */
  idempotencyKey?: string;
}

/** A VM as the API shows it: its row, and `status` — its state, or `unknown` while its host's agent is unheard. */
export type VmView = VmRow & { status: string };

export interface VmServiceOptions {
  /** Sizes for a host whose agent published none (agents.vm_defaults). */
  defaults: VmDefaults;
  policy: EffectPolicy;
  /** The effect worker of each host whose agent runs in this process: it runs what these requests write at once. */
  localWorkers?: ReadonlyMap<string, LocalWorker>;
  /** An agent silent this long is unreachable: nothing is placed on its host and its VMs show `unknown`. */
  silentMs: number;
}

export const IDEMPOTENCY_KEY_PATTERN = /^[A-Za-z0-9._:-]{8,128}$/;

function newVmId(): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  return 'vm-' + Array.from(randomBytes(10), (b) => alphabet[b % alphabet.length]).join('');
}

/** The chosen partition was taken between reading the table and claiming it. */
class PlacementRace extends Error {}

/** Nothing fits but what this process's own creates are claiming. */
class OwnClaimsInFlight extends Error {}

export class VmService {
  private readonly policy: EffectPolicy;
  private readonly workers: ReadonlyMap<string, LocalWorker>;
  private demand: { mix: Demand; readAt: number } | null = null;
  /**
   * Modules this process is claiming right now, by host: a concurrent create of this process leaves
   * them alone instead of choosing the same best partition and losing the race for it (placement is
   * deterministic, so a burst of creates would otherwise all pick one partition, one winner a round).
   */
  private readonly claiming = new Map<string, Map<number, number>>();
  /** One promise per claim of this process under way, resolved when it ends. */
  private readonly claimsUnderWay = new Set<Promise<void>>();

  constructor(
    private readonly db: Kysely<Database>,
    private readonly opts: VmServiceOptions,
  ) {
    this.policy = opts.policy;
    this.workers = opts.localWorkers ?? new Map();
  }

  /** The local worker of the host a VM is on, if that host's agent runs in this process. */
  private async workerForVm(vmId: string): Promise<LocalWorker | undefined> {
    if (this.workers.size === 0) return undefined;
    for (const worker of this.workers.values()) if (worker.snapshots.get(vmStream(vmId))) return worker;
    const row = await this.db.selectFrom('vms').select('host_id').where('id', '=', vmId).executeTakeFirst();
    return row ? this.workers.get(row.host_id) : undefined;
  }

  /** The hosts as placement sees them from this process: less the modules its own creates are claiming. */
  private withClaiming(hosts: HostView[]): HostView[] {
    if (this.claiming.size === 0) return hosts;
    return hosts.map((h) => {
      const mine = this.claiming.get(h.hostId);
      return mine ? { ...h, unavailable: new Set([...h.unavailable, ...mine.keys()]) } : h;
    });
  }

  /** Marks modules as being claimed by this process until the returned function is called. */
  private claim(hostId: string, modules: number[]): () => void {
    let ended!: () => void;
    const underWay = new Promise<void>((resolve) => (ended = resolve));
    this.claimsUnderWay.add(underWay);
    let mine = this.claiming.get(hostId);
    if (!mine) this.claiming.set(hostId, (mine = new Map()));
    for (const m of modules) mine.set(m, (mine.get(m) ?? 0) + 1);
    return () => {
      for (const m of modules) {
        const n = mine.get(m)! - 1;
        if (n > 0) mine.set(m, n);
        else mine.delete(m);
      }
      if (mine.size === 0) this.claiming.delete(hostId);
      this.claimsUnderWay.delete(underWay);
      ended();
    };
  }

  /** The recent request mix (the last 1,000 creates by size), read at most every 10 s: what placement keeps room for. */
  private async recentDemand(): Promise<Demand> {
    if (this.demand && Date.now() - this.demand.readAt < 10_000) return this.demand.mix;
    const { rows } = await sql<{ gpu_count: number; n: string }>`
      select gpu_count, count(*)::text as n from (select gpu_count from vms order by created_at desc limit 1000) r group by gpu_count`.execute(this.db);
    const mix: Demand = Object.fromEntries(rows.map((r) => [r.gpu_count, Number(r.n)]));
    this.demand = { mix, readAt: Date.now() };
    return mix;
  }

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
    try {
      return await this.place(req, causationId);
    } catch (err) {
      if (req.idempotencyKey === undefined || (err instanceof GpuvmError && err.status < 500)) throw err;
      // The same key racing itself, or an ambiguous commit (the connection dropped after COMMIT):
      // the log says whether the VM was made.
      const made = await this.createdBy(causationId).catch(() => null);
      if (!made) throw err;
      // The write committed: the effects it handed to this process's worker start now, not after their lease.
      await this.workers.get(made.host_id)?.adopt(made.id).catch(() => {});
      return this.sameRequest(made, req);
    }
  }

  private async place(req: CreateVmRequest, causationId: string): Promise<VmRow> {
    const vmId = newVmId();
    const name = req.name ?? vmId;
    const size = req.gpus as GpuCount;
    const demand = await this.recentDemand();
    // A concurrent create may claim overlapping modules first; the primary key on gpu_claims then
    // refuses ours, and we decide again on what is left.
    for (let attempt = 0; attempt < 50; attempt++) {
      try {
        // No transaction: the read below is advice, and the one statement that writes CLAIM and CREATE
        // together is guarded by the partition's stream version and the claims' primary key.
        const written = await retrying(async () => {
          const fleet = await readCandidates(this.db, { size, hostId: req.hostId, board: req.board }, this.opts.silentMs);
          const decision = place(this.withClaiming(fleet.hosts), size, demand);
          if (!decision) {
            // Only this process's own creates in flight stand in the way: they may yet fail, so wait for them.
            if (this.claiming.size > 0 && place(fleet.hosts, size, demand)) throw new OwnClaimsInFlight();
            throw await this.noPlacement(req);
          }
          const release = this.claim(decision.chosen.hostId, decision.chosen.modules);
          try {
            return await this.claimAndCreate(req, { vmId, name, causationId }, decision, fleet, demand);
          } finally {
            release();
          }
        });
        crashPoint('event:CREATE:after-commit');
        for (const result of written.steps) written.worker?.handOver(result);
        return vmRow(written.steps[1]!.snapshot);
      } catch (err) {
        if (err instanceof OwnClaimsInFlight) {
          // Those under way now; later ones cannot starve this request.
          await Promise.all([...this.claimsUnderWay]);
          attempt--;
          continue;
        }
        if (err instanceof PlacementRace || isClaimConflict(err)) {
          // Lost to another API node: a short random pause spreads the retries of both.
          await new Promise((r) => setTimeout(r, Math.random() * Math.min(2 + attempt, 20)));
          continue;
        }
        if (isUniqueViolation(err, 'vms_live_name')) throw conflict('name-taken', `a VM named ${JSON.stringify(name)} already exists`);
        throw err;
      }
    }
    throw conflict('contention', 'could not place the VM: too many concurrent placements, try again');
  }

  /** The one statement that claims the chosen partition and creates the VM, with why it was chosen. */
  private async claimAndCreate(
    req: CreateVmRequest,
    vm: { vmId: string; name: string; causationId: string },
    decision: PlacementDecision,
    fleet: FleetCandidates,
    demand: Demand,
  ): Promise<{ steps: Extract<ApplyResult, { kind: 'changed' }>[]; worker: LocalWorker | undefined }> {
    const { vmId, name, causationId } = vm;
    const { chosen, runnerUp } = decision;
    const worker = this.workers.get(chosen.hostId);
    const defaults = { ...this.opts.defaults, ...(fleet.vmDefaults.get(chosen.hostId) ?? {}) } as VmDefaults;
    const pStream = partitionStream(chosen.hostId, chosen.partitionId);
    const meta = { actor: req.actor, correlationId: vmId, causationId };
    const snapshots = worker?.snapshots;
    // Why here: the policy's score and the runner-up, for an incident review.
    const placement = {
      policy: decision.policy,
      score: chosen.score,
      runnerUp: runnerUp ? { hostId: runnerUp.hostId, partitionId: runnerUp.partitionId, score: runnerUp.score } : null,
      candidates: fleet.hosts.length,
      demand,
    };
    const claim = await prepareStep(this.db, pStream, { type: 'CLAIM', vmId, placement }, meta, this.policy, { snapshots });
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
        hostId: chosen.hostId,
        partitionId: chosen.partitionId,
        gpus: [...ctx.gpus].sort((a, b) => a.moduleId - b.moduleId),
        memoryMiB: defaults.memoryMiB,
        vcpus: defaults.vcpus,
        powerdownTimeoutMs: defaults.powerdownTimeoutMs,
      },
      meta,
      this.policy,
      // A new id: the stream does not exist yet (should it, the insert at version 1 fails).
      { snapshot: null },
    );
    if (created.kind !== 'prepared') throw new Error(`vm ${vmId} could not be created`);
    const steps = await commitSteps(this.db, [claim, created], { snapshots, claimFor: worker?.claimOnWrite(), batcher: worker?.batcher });
    return { steps, worker };
  }

  /**
   * Why nothing could be placed, as an operator needs it: 503 while a host that could take the VM is
   * still starting (retry shortly), 404 for a pinned host that does not exist, else 409 no-capacity
   * naming what the fleet holds back.
   */
  private async noPlacement(req: CreateVmRequest): Promise<GpuvmError> {
    const hosts = await readHostStatus(this.db, this.opts.silentMs, req.hostId);
    if (req.hostId !== undefined && hosts.length === 0) return notFound(`no host ${req.hostId}`);
    const matching = req.board === undefined ? hosts : hosts.filter((h) => new RegExp(`\\b${req.board}\\b`, 'i').test(h.board));
    const where = req.hostId !== undefined ? `on host ${req.hostId}` : req.board !== undefined ? `on a ${req.board.toUpperCase()} host` : 'in the fleet';
    if (matching.length === 0) return conflict('no-capacity', `no capacity: no host ${where.replace(/^(on|in) (a |the )?/, '')}`);
    const by = new Map<string, string[]>();
    for (const h of matching) {
      const a = availability(h);
      by.set(a, [...(by.get(a) ?? []), h.id]);
    }
    if (by.has('starting') || by.has('registering')) {
      const starting = [...(by.get('starting') ?? []), ...(by.get('registering') ?? [])];
      return new GpuvmError(503, 'starting', `no capacity ${where} yet: host(s) ${starting.join(', ')} are starting (their agent's first reconciliation is under way); retry in a moment`);
    }
    const held = [...by].filter(([a]) => a !== 'ready').map(([a, ids]) => `${a}: ${ids.length > 3 ? `${ids.slice(0, 3).join(', ')} and ${ids.length - 3} more` : ids.join(', ')}`);
    const ready = by.get('ready') ?? [];
    // A few hosts taking VMs: say what each holds; a fleet: how many.
    let taking = `${ready.length} host${ready.length === 1 ? '' : 's'} taking VMs`;
    if (ready.length > 0 && ready.length <= 3) {
      const { rows } = await sql<{ id: string; claimed: string; quarantined: Record<string, unknown> }>`
        select h.id, (select count(*) from gpu_claims c where c.host_id = h.id)::text as claimed, h.quarantined_modules as quarantined
        from hosts h where h.id in (${sql.join(ready)}) order by h.id`.execute(this.db);
      taking = rows
        .map((r) => {
          const q = Object.keys(r.quarantined ?? {}).length;
          return `${r.id}: ${8 - Number(r.claimed)} of 8 modules unclaimed${q ? `, ${q} quarantined` : ''}`;
        })
        .join('; ');
    }
    return conflict('no-capacity', `no capacity: no free partition of ${req.gpus} GPU${req.gpus === 1 ? '' : 's'} ${where} (${taking}${held.length ? `; ${held.join('; ')}` : ''})`);
  }

  /** Accepted in every state but `deleted`; a repeat while deletion is under way changes nothing. */
  async delete(vmId: string, actor: string, requestId: string = randomUUID()): Promise<VmRow> {
    const worker = await this.workerForVm(vmId);
    const result = await retrying(() =>
      applyEvent(this.db, vmStream(vmId), { type: 'DELETE' }, { actor, correlationId: vmId, causationId: `request:${requestId}` }, this.policy, {
        snapshots: worker?.snapshots,
        batcher: worker?.batcher,
        claimFor: worker?.claimOnWrite(),
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
    worker?.handOver(result);
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
    const worker = await this.workerForVm(vmId);
    const unwatch = worker?.snapshots.watch(vmStream(vmId), (s) => {
      if (s.state === from) return;
      heard = s;
      wake();
    });
    try {
      // Read after the watch is set: a step committed in between is either read here or heard. When
      // the last snapshot this process committed is still in `from`, there is nothing to read yet.
      const cached = worker?.snapshots.get(vmStream(vmId));
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

  async list(opts: { includeDeleted?: boolean; hostId?: string } = {}): Promise<VmView[]> {
    let q = this.db.selectFrom('vms').selectAll().orderBy('created_at').orderBy('id');
    if (!opts.includeDeleted) q = q.where('state', '<>', 'deleted');
    if (opts.hostId !== undefined) q = q.where('host_id', '=', opts.hostId);
    return this.withStatus((await q.execute()) as VmRow[]);
  }

  /** One VM as the API shows it (see VmView). */
  async view(vm: VmRow): Promise<VmView> {
    return (await this.withStatus([vm]))[0]!;
  }

  /**
   * A live VM on a host whose agent is unheard shows `unknown`: its QEMU may be fine, and nothing can
   * say until the agent returns and reconciles. An ended VM shows its state.
   */
  private async withStatus(rows: VmRow[]): Promise<VmView[]> {
    const live = rows.filter((r) => !ENDED_STATES.includes(r.state));
    const unheard = live.length === 0 ? new Set<string>() : await unreachableHosts(this.db, this.opts.silentMs);
    return rows.map((r) => ({ ...r, status: !ENDED_STATES.includes(r.state) && unheard.has(r.host_id) ? 'unknown' : r.state }));
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
