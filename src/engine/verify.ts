/**
 * `gpuvm verify`: is the stored history one that today's code would have written?
 *
 * 1. Every stream, event by event: versions contiguous from 1, a machine version today's code still
 *    replays, and today's machine taking the event from the replayed state to the recorded
 *    `state_after`, asking for exactly the effects recorded in the outbox for it.
 * 2. Every projection row equals the row rebuilt from the fold (verifyProjections).
 * 3. Invariants over the whole history, in global log order: no GPU module claimed by two
 *    partitions at once; no partition deactivated while its VM's QEMU may live; every deleted VM's
 *    partition returned.
 * Each problem names the stream and the event (version, position, type) where it shows.
 */
import type { Kysely } from 'kysely';
import { machines, partitionHoldsClaim, partitionStream, qemuMayLive, streamKind, type PartitionContext, type StreamKind, type VmContext } from '../../machines/index.ts';
import { LOG_START, readLog, readStream, scanStreams, type Executor, type StoredEvent } from '../store/events.ts';
import type { StreamSnapshot } from '../store/projections.ts';
import type { Database } from '../store/schema.ts';
import { effectId, parseEffectId } from './commands.ts';
import { decide, sameJson, type Decision } from './decide.ts';
import { verifyProjections, type Difference } from './rebuild.ts';

/**
 * Machine versions today's machines replay, by stream kind: today's version, plus an older one only
 * when today's machine folds histories written by it exactly as that version did (the history
 * fixtures test holds it to that). A machine change that folds old histories differently bumps the
 * version and does not list the old one here.
 */
export const REPLAYABLE_MACHINE_VERSIONS: Readonly<Record<StreamKind, readonly number[]>> = {
  // vm 1 and partition 1: version 2 folds their histories as they did, except an EFFECT_FAILED
  // version 1 took in a state not waiting for that effect (or a terminateQemu failure, now
  // `stopFailed`): those are the dead ends version 2 removes, and verify reports such a history as
  // diverging from today's machine, which is what an operator should look at.
  vm: [1, machines.vm.version],
  partition: [1, machines.partition.version],
  // host 1: version 2 adds the fleet lifecycle around `registered` and folds version 1's events as it did.
  host: [1, machines.host.version],
};

export function replaysMachineVersion(kind: StreamKind, version: number): boolean {
  return REPLAYABLE_MACHINE_VERSIONS[kind].includes(version);
}

export type ProblemCode =
  | 'version-gap'
  | 'unknown-machine'
  | 'unknown-machine-version'
  | 'event-rejected'
  | 'event-no-op'
  | 'state-mismatch'
  | 'effect-mismatch'
  | 'projection-mismatch'
  | 'orphan-row'
  | 'module-claimed-twice'
  | 'deactivated-under-live-vm'
  | 'partition-not-returned';

export interface EventRef {
  version: number;
  position: string;
  type: string;
}

export interface HistoryProblem {
  code: ProblemCode;
  streamId: string;
  /** The event where the problem shows; null only for a row that no stream accounts for. */
  event: EventRef | null;
  message: string;
}

export interface VerifyReport {
  streams: number;
  events: number;
  problems: HistoryProblem[];
}

/** One line for an operator: stream, event, what is wrong. */
export function formatProblem(p: HistoryProblem): string {
  const where = p.event ? `${p.streamId} v${p.event.version} (position ${p.event.position}, ${p.event.type})` : `${p.streamId} (no event)`;
  return `${where}: ${p.message}`;
}

const ref = (e: StoredEvent): EventRef => ({ version: e.streamVersion, position: e.position, type: e.type });
const show = (v: unknown) => JSON.stringify(v) ?? 'undefined';

/** What the invariants need from a stream after one of its events. */
interface Step {
  streamId: string;
  kind: StreamKind;
  version: number;
  state: string;
  hostId: string;
  /** partition: the claimant; vm: itself. */
  vmId: string | null;
  partitionId: number;
  modules: number[];
}

interface RecordedEffect {
  type: string;
  params: unknown;
}

/** The outbox rows by effect id; `null` when planning (see StreamChecker.check). */
type Outbox = ReadonlyMap<string, RecordedEffect>;

/**
 * Folds one stream event by event, fed in version order, and checks each against what was recorded.
 * Stops at the first event that does not replay as recorded (later ones would only repeat the
 * divergence). Holds only the stream's current snapshot, so a stream may arrive over many pages.
 */
class StreamChecker {
  private readonly kind: StreamKind | null;
  private readonly kindError: string | null = null;
  private snap = null as StreamSnapshot | null;
  private diverged = false;
  private seen = false;
  /** Events at or past this version have no replayed step (the stream diverged there). */
  stepsBelow = Infinity;
  /** A problem other than an unknown machine version was found. */
  failed = false;

  constructor(readonly streamId: string) {
    let kind: StreamKind | null = null;
    try {
      kind = streamKind(streamId);
    } catch (err) {
      this.kindError = (err as Error).message;
      this.stepsBelow = 0;
    }
    this.kind = kind;
  }

  /** A copy to plan a page with: which outbox rows its checks will look up. */
  clone(): StreamChecker {
    return Object.assign(Object.create(StreamChecker.prototype) as StreamChecker, this);
  }

  /**
   * Checks the next event; returns its replayed step, or null past a divergence. With `outbox` null
   * it only plans: it takes the recorded effects to match, adds the outbox ids the real check will
   * look up to `wanted` and keeps each decision in `decisions` for the real check to reuse (it
   * reaches each decided event with the same snapshot, since it diverges no earlier).
   */
  check(e: StoredEvent, outbox: Outbox | null, problems: HistoryProblem[], decisions: Map<StoredEvent, Decision>, wanted?: Set<string>): Step | null {
    const streamId = this.streamId;
    const problem = (code: ProblemCode, message: string) => {
      if (code !== 'unknown-machine-version') this.failed = true;
      problems.push({ code, streamId, event: ref(e), message });
    };
    const first = !this.seen;
    this.seen = true;
    const kind = this.kind;
    if (kind === null) {
      if (first) problem('unknown-machine', this.kindError!);
      return null;
    }
    // Machine versions are checked on every event, even past a divergence.
    if (e.machine !== kind) problem('unknown-machine', `recorded by machine ${show(e.machine)} on a ${kind} stream`);
    else if (!replaysMachineVersion(kind, e.machineVersion)) {
      problem(
        'unknown-machine-version',
        `recorded by ${kind} machine version ${e.machineVersion}; today's code replays version(s) ${REPLAYABLE_MACHINE_VERSIONS[kind].join(', ')}`,
      );
    }
    if (this.diverged) return null;
    const diverge = (code: ProblemCode, message: string): null => {
      problem(code, message);
      this.diverged = true;
      this.stepsBelow = e.streamVersion;
      return null;
    };

    const snap = this.snap;
    const expected: number = (snap?.version ?? 0) + 1;
    if (e.streamVersion !== expected) {
      return diverge(
        'version-gap',
        e.streamVersion > expected
          ? `version ${e.streamVersion} follows version ${expected - 1}: ${e.streamVersion - expected === 1 ? `version ${expected} is` : `versions ${expected}..${e.streamVersion - 1} are`} missing`
          : `version ${e.streamVersion} repeats or goes back after version ${expected - 1}`,
      );
    }
    const stateBefore = snap?.state ?? null;
    if (!sameJson(e.stateBefore ?? null, stateBefore)) {
      return diverge('state-mismatch', `recorded state_before ${show(e.stateBefore)} but the replayed state before it is ${show(stateBefore)}`);
    }
    let d = decisions.get(e);
    if (!d) decisions.set(e, (d = decide(streamId, snap, { ...e.data, type: e.type })));
    if (d.kind === 'rejected') return diverge('event-rejected', `does not apply on replay: ${d.reason} (recorded ${show(e.stateBefore)} → ${show(e.stateAfter)})`);
    if (d.kind === 'unchanged') return diverge('event-no-op', `replays as a no-op in state ${d.state}: today's machine would not have recorded it`);
    if (!sameJson(e.stateAfter, d.stateAfter)) return diverge('state-mismatch', `recorded state_after ${show(e.stateAfter)} but replay gives ${show(d.stateAfter)}`);
    if (outbox) {
      const effectProblem = compareEffects(streamId, e.streamVersion, d.effects, outbox);
      if (effectProblem) return diverge('effect-mismatch', effectProblem);
    } else {
      // compareEffects looks up ids #0..#n for n replayed effects.
      for (let i = 0; i <= d.effects.length; i++) wanted?.add(effectId(streamId, e.streamVersion, i));
    }
    this.snap = snapshotAfter(streamId, kind, snap, e, d);
    return stepOf(this.snap);
  }
}

function snapshotAfter(streamId: string, kind: StreamKind, before: StreamSnapshot | null, e: StoredEvent, d: Extract<Decision, { kind: 'changed' }>): StreamSnapshot {
  return {
    streamId,
    kind,
    machineVersion: e.machineVersion,
    version: e.streamVersion,
    state: d.stateAfter,
    context: d.context,
    createdAt: before?.createdAt ?? e.recordedAt,
    updatedAt: e.recordedAt,
  };
}

/**
 * Folds one stream event by event and checks each against what was recorded (StreamChecker).
 * Pure: `effects` is the outbox by effect id.
 */
export function checkStream(
  streamId: string,
  events: StoredEvent[],
  effects: ReadonlyMap<string, RecordedEffect>,
): { problems: HistoryProblem[]; steps: Map<string, Step> } {
  const problems: HistoryProblem[] = [];
  const steps = new Map<string, Step>();
  const checker = new StreamChecker(streamId);
  const decisions = new Map<StoredEvent, Decision>();
  for (const e of events) {
    const step = checker.check(e, effects, problems, decisions);
    if (step) steps.set(e.position, step);
  }
  return { problems, steps };
}

/** The effects a replayed event asks for against the outbox rows recorded for it (stream@version#i). */
function compareEffects(
  streamId: string,
  version: number,
  replayed: { type: string; params: Record<string, unknown> }[],
  recorded: ReadonlyMap<string, RecordedEffect>,
): string | null {
  for (let i = 0; ; i++) {
    const id = effectId(streamId, version, i);
    const want = replayed[i];
    const got = recorded.get(id);
    if (!want && !got) return null;
    if (!want) return `the outbox holds effect ${id} (${got!.type}) but replay asks for no such effect`;
    if (!got) return `replay asks for effect ${want.type} (${id}) but the outbox has no such row`;
    const params = JSON.parse(JSON.stringify(want.params));
    if (got.type !== want.type || !sameJson(got.params, params)) {
      return `effect ${id}: recorded ${got.type} ${show(got.params)} but replay asks for ${want.type} ${show(params)}`;
    }
  }
}

function stepOf(s: StreamSnapshot): Step {
  if (s.kind === 'partition') {
    const c = s.context as unknown as PartitionContext;
    return { streamId: s.streamId, kind: s.kind, version: s.version, state: s.state, hostId: c.hostId, vmId: c.vmId, partitionId: c.partitionId, modules: c.gpus.map((g) => g.moduleId) };
  }
  if (s.kind === 'vm') {
    const c = s.context as unknown as VmContext;
    return { streamId: s.streamId, kind: s.kind, version: s.version, state: s.state, hostId: c.hostId, vmId: c.vmId, partitionId: c.partitionId, modules: [] };
  }
  return { streamId: s.streamId, kind: s.kind, version: s.version, state: s.state, hostId: String(s.context.hostId), vmId: null, partitionId: -1, modules: [] };
}

/** Who a partition's claim is for: a VM, or a drift repair (no VM). */
const claimant = (vmId: string | null) => (vmId ? `VM ${vmId}` : 'a drift repair');


/** What verify keeps of a stream after its first pass: its last event, and how far it replays. */
interface StreamInfo {
  last: EventRef;
  /** A problem other than an unknown machine version: the stream does not replay as recorded. */
  failed: boolean;
  /** Events at or past this version have no replayed step (StreamChecker.stepsBelow). */
  stepsBelow: number;
}

/**
 * Walks the global log in commit order — (tx_id, position), every event of the snapshot — with each
 * event's replayed step; checks the invariants. Holds one snapshot per stream, not a step per event:
 * each stream is refolded as its events come (the first pass checked that they replay up to
 * `stepsBelow`). A stream whose versions two transactions committed out of transaction-id order is
 * caught up from the log for the newer one; the older one is then passed over, as before.
 */
async function checkInvariants(db: Executor, streams: ReadonlyMap<string, StreamInfo>, lastEvent: (streamId: string) => EventRef | null): Promise<HistoryProblem[]> {
  const problems: HistoryProblem[] = [];
  const current = new Map<string, Step>();
  const holders = new Map<string, string>(); // host/module → partition stream holding its claim
  const deletedAt = new Map<string, EventRef>(); // vm stream → its `deleted` event
  const folds = new Map<string, StreamSnapshot>(); // stream → its snapshot, as far as refolded

  const apply = (snap: StreamSnapshot | null, e: StoredEvent): StreamSnapshot => {
    const d = decide(e.streamId, snap, { ...e.data, type: e.type });
    if (d.kind !== 'changed') throw new Error(`${e.streamId} v${e.streamVersion} replayed in the first pass but not now (${d.kind})`);
    return snapshotAfter(e.streamId, streamKind(e.streamId), snap, e, d);
  };
  /** The stream's step after `e`, folding from the snapshot held (or from the log where it is behind or ahead). */
  const stepAfter = async (e: StoredEvent): Promise<Step> => {
    let snap = folds.get(e.streamId) ?? null;
    const ahead = snap !== null && snap.version >= e.streamVersion;
    if (ahead) snap = null;
    if ((snap?.version ?? 0) < e.streamVersion - 1) {
      const from = snap?.version ?? 0;
      for (const m of await readStream(db, e.streamId, { toVersion: e.streamVersion - 1 })) if (m.streamVersion > from) snap = apply(snap, m);
    }
    snap = apply(snap, e);
    if (!ahead) folds.set(e.streamId, snap);
    return stepOf(snap);
  };

  for (let cursor = LOG_START; ; ) {
    // Every event of verify's snapshot, not only those below its xmin: all of them were folded above.
    const page = await readLog(db, cursor, 1000, { inSnapshot: true });
    if (page.events.length === 0) break;
    cursor = page.next;
    for (const e of page.events) {
      if (e.streamVersion >= (streams.get(e.streamId)?.stepsBelow ?? 0)) {
        // Past a divergence already reported on its stream: from here on its state is unknown, so
        // it neither holds GPUs nor vouches for its VM in the checks below.
        current.delete(e.streamId);
        for (const [key, holder] of holders) if (holder === e.streamId) holders.delete(key);
        deletedAt.delete(e.streamId);
        continue;
      }
      const previous = current.get(e.streamId);
      // Two transactions can commit a stream's versions out of transaction-id order; keep the newest.
      if (previous && previous.version > e.streamVersion) continue;
      const step = await stepAfter(e);
      current.set(step.streamId, step);

      if (step.kind === 'partition') {
        const holds = partitionHoldsClaim(step.state);
        const held = previous !== undefined && partitionHoldsClaim(previous.state);
        for (const m of holds === held ? [] : step.modules) {
          const key = `${step.hostId}/${m}`;
          const holder = holders.get(key);
          if (holds) {
            if (holder && holder !== step.streamId) {
              const other = current.get(holder);
              problems.push({
                code: 'module-claimed-twice',
                streamId: step.streamId,
                event: ref(e),
                message: `GPU module ${m} on host ${step.hostId} claimed for ${claimant(step.vmId)} while ${holder} (${other?.state}, ${claimant(other?.vmId ?? null)}) still holds it`,
              });
            } else holders.set(key, step.streamId);
          } else if (holder === step.streamId) holders.delete(key);
        }
        if (e.type === 'DEACTIVATED' && step.vmId) {
          const vm = current.get(`vm:${step.vmId}`);
          // A VM whose QEMU may be alive needs its partition active under it.
          if (vm && qemuMayLive(vm.state)) {
            problems.push({
              code: 'deactivated-under-live-vm',
              streamId: step.streamId,
              event: ref(e),
              message: `partition ${step.partitionId} deactivated while its VM ${step.vmId} was ${vm.state} (its QEMU may still run)`,
            });
          }
        }
      } else if (step.kind === 'vm' && step.state === 'deleted' && !deletedAt.has(step.streamId)) {
        deletedAt.set(step.streamId, ref(e));
      }
    }
  }

  for (const [vmStreamId, event] of deletedAt) {
    const vm = current.get(vmStreamId);
    if (!vm) continue;
    const pStreamId = partitionStream(vm.hostId, vm.partitionId);
    const p = current.get(pStreamId);
    if (p && p.vmId === vm.vmId && partitionHoldsClaim(p.state)) {
      problems.push({
        code: 'partition-not-returned',
        streamId: vmStreamId,
        event,
        message: `VM ${vm.vmId} is deleted but its partition ${vm.partitionId} never returned: at the end of the log it is ${p.state}, still holding the VM's GPUs (${pStreamId} ${describeRef(lastEvent(pStreamId))})`,
      });
    }
  }
  return problems;
}

const describeRef = (r: EventRef | null) => (r ? `v${r.version}, position ${r.position}, ${r.type}` : 'no event');

/** A projection difference as a problem on the stream's latest event. */
function projectionProblems(d: Difference, lastEvent: (streamId: string) => EventRef | null): HistoryProblem[] {
  if (d.table === 'gpu_claims' && d.streamId === '*') {
    const key = (c: any) => `${c.host_id}/${c.module_id}`;
    const stored = new Map((d.stored as any[]).map((c) => [key(c), c]));
    const rebuilt = new Map((d.rebuilt as any[]).map((c) => [key(c), c]));
    const out: HistoryProblem[] = [];
    for (const k of new Set([...stored.keys(), ...rebuilt.keys()])) {
      const s = stored.get(k);
      const r = rebuilt.get(k);
      if (sameJson(s, r)) continue;
      const owner = r ?? s;
      const streamId = partitionStream(owner.host_id, owner.partition_id);
      out.push({
        code: 'projection-mismatch',
        streamId,
        event: lastEvent(streamId),
        message: `gpu_claims row for module ${owner.module_id} on host ${owner.host_id}: stored ${show(s ?? null)} but the fold gives ${show(r ?? null)}`,
      });
    }
    return out;
  }
  if (d.rebuilt === null) {
    return [{ code: 'orphan-row', streamId: d.streamId, event: lastEvent(d.streamId), message: `${d.table} row ${show(d.stored)} has no events behind it` }];
  }
  const stored = (d.stored ?? null) as Record<string, unknown> | null;
  const rebuilt = d.rebuilt as Record<string, unknown>;
  const fields = stored
    ? [...new Set([...Object.keys(stored), ...Object.keys(rebuilt)])].filter((k) => !sameJson(stored[k], rebuilt[k]))
    : [];
  const what = stored
    ? fields.map((k) => `${k} stored ${show(stored[k])}, fold gives ${show(rebuilt[k])}`).join('; ')
    : `the row is missing (fold gives ${show(rebuilt)})`;
  const last = lastEvent(d.streamId);
  return [
    {
      code: 'projection-mismatch',
      streamId: d.streamId,
      event: last,
      message: `${d.table} row differs from the fold through v${last?.version ?? '?'}: ${what}`,
    },
  ];
}

/** Events per page of each pass over the log, and outbox rows per page of the orphan check. */
export const VERIFY_PAGE = 1000;

/** Verifies the whole history in one consistent snapshot of the database. */
export async function verifyHistory(db: Kysely<Database>, opts: { pageSize?: number } = {}): Promise<VerifyReport> {
  return db
    .transaction()
    .setIsolationLevel('repeatable read')
    .setAccessMode('read only')
    .execute((tx) => verifySnapshot(tx, opts));
}

/**
 * verifyHistory's work, inside the caller's repeatable-read transaction. Memory is bounded by the
 * number of streams, not of events: the log is read in pages, twice (stream order for the per-stream
 * checks, commit order for the invariants), and the outbox rows a page's events ask for are read with
 * it; the orphan check pages the outbox by id.
 */
export async function verifySnapshot(tx: Executor, opts: { pageSize?: number } = {}): Promise<VerifyReport> {
  const pageSize = opts.pageSize ?? VERIFY_PAGE;
  const problems: HistoryProblem[] = [];
  const streams = new Map<string, StreamInfo>();
  let events = 0;

  // 1. Each stream, in stream order. A page is planned first (which outbox rows its checks look up),
  // then those rows are read by id, then it is checked.
  let checker: StreamChecker | null = null;
  let last: EventRef | null = null;
  const finish = () => {
    if (checker && last) streams.set(checker.streamId, { last, failed: checker.failed, stepsBelow: checker.stepsBelow });
  };
  for await (const page of scanStreams(tx, pageSize)) {
    const decisions = new Map<StoredEvent, Decision>();
    const wanted = new Set<string>();
    const planners = new Map<string, StreamChecker>();
    for (const e of page) {
      let planner = planners.get(e.streamId);
      if (!planner) planners.set(e.streamId, (planner = checker?.streamId === e.streamId ? checker.clone() : new StreamChecker(e.streamId)));
      planner.check(e, null, [], decisions, wanted);
    }
    const outbox = new Map<string, RecordedEffect>();
    const ids = [...wanted];
    for (let i = 0; i < ids.length; i += pageSize) {
      const rows = await tx.selectFrom('effects').select(['id', 'type', 'params']).where('id', 'in', ids.slice(i, i + pageSize)).execute();
      for (const r of rows) outbox.set(r.id, { type: r.type, params: r.params });
    }
    for (const e of page) {
      if (checker?.streamId !== e.streamId) {
        finish();
        checker = new StreamChecker(e.streamId);
      }
      checker.check(e, outbox, problems, decisions);
      last = ref(e);
      events++;
    }
  }
  finish();
  const lastEvent = (streamId: string): EventRef | null => streams.get(streamId)?.last ?? null;

  // Outbox rows no event asked for (the per-event check above only looks up expected ids). A stream
  // that replays holds exactly versions 1..last (a gap would be a problem).
  for (let after: string | null = null; ; ) {
    let q = tx.selectFrom('effects').select(['id', 'stream_id', 'type']);
    if (after !== null) q = q.where('id', '>', after);
    const rows = await q.orderBy('id').limit(pageSize).execute();
    if (rows.length === 0) break;
    after = rows[rows.length - 1]!.id;
    for (const r of rows) {
      const m = parseEffectId(r.id);
      const info = m ? streams.get(m.streamId) : undefined;
      if (!m || !info) {
        problems.push({ code: 'orphan-row', streamId: r.stream_id, event: lastEvent(r.stream_id), message: `effects row ${r.id} (${r.type}) belongs to no event` });
        continue;
      }
      if (info.failed) continue;
      if (!(m.version >= 1 && m.version <= info.last.version)) {
        problems.push({ code: 'orphan-row', streamId: m.streamId, event: info.last, message: `effects row ${r.id} (${r.type}) names version ${m.version}, which the stream does not hold` });
      }
    }
    if (rows.length < pageSize) break;
  }

  const { differences } = await verifyProjections(tx);
  for (const d of differences) {
    // A stream that does not fold was named above, at the event where it stops.
    if (d.table === 'events' && streams.get(d.streamId)?.failed) continue;
    if (d.table === 'events') {
      problems.push({ code: 'event-rejected', streamId: d.streamId, event: lastEvent(d.streamId), message: String(d.rebuilt) });
      continue;
    }
    problems.push(...projectionProblems(d, lastEvent));
  }

  problems.push(...(await checkInvariants(tx, streams, lastEvent)));
  return { streams: streams.size, events, problems };
}
