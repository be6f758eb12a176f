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
import { LOG_START, readLog, readStreams, type Executor, type StoredEvent } from '../store/events.ts';
import type { StreamSnapshot } from '../store/projections.ts';
import type { Database } from '../store/schema.ts';
import { effectId } from './commands.ts';
import { decide, sameJson } from './decide.ts';
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
  host: [machines.host.version],
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

/**
 * Folds one stream event by event and checks each against what was recorded. Stops at the first
 * event that does not replay as recorded (later ones would only repeat the divergence).
 * Pure: `effects` is the outbox by effect id.
 */
export function checkStream(
  streamId: string,
  events: StoredEvent[],
  effects: ReadonlyMap<string, RecordedEffect>,
): { problems: HistoryProblem[]; steps: Map<string, Step> } {
  const problems: HistoryProblem[] = [];
  const steps = new Map<string, Step>();
  const problem = (code: ProblemCode, e: StoredEvent, message: string) => problems.push({ code, streamId, event: ref(e), message });
  let kind: StreamKind;
  try {
    kind = streamKind(streamId);
  } catch (err) {
    if (events[0]) problem('unknown-machine', events[0], (err as Error).message);
    return { problems, steps };
  }

  let snap = null as StreamSnapshot | null;
  let diverged = false;
  for (const e of events) {
    // Machine versions are checked on every event, even past a divergence.
    if (e.machine !== kind) problem('unknown-machine', e, `recorded by machine ${show(e.machine)} on a ${kind} stream`);
    else if (!replaysMachineVersion(kind, e.machineVersion)) {
      problem(
        'unknown-machine-version',
        e,
        `recorded by ${kind} machine version ${e.machineVersion}; today's code replays version(s) ${REPLAYABLE_MACHINE_VERSIONS[kind].join(', ')}`,
      );
    }
    if (diverged) continue;

    const expected: number = (snap?.version ?? 0) + 1;
    if (e.streamVersion !== expected) {
      problem(
        'version-gap',
        e,
        e.streamVersion > expected
          ? `version ${e.streamVersion} follows version ${expected - 1}: ${e.streamVersion - expected === 1 ? `version ${expected} is` : `versions ${expected}..${e.streamVersion - 1} are`} missing`
          : `version ${e.streamVersion} repeats or goes back after version ${expected - 1}`,
      );
      diverged = true;
      continue;
    }
    const stateBefore = snap?.state ?? null;
    if (!sameJson(e.stateBefore ?? null, stateBefore)) {
      problem('state-mismatch', e, `recorded state_before ${show(e.stateBefore)} but the replayed state before it is ${show(stateBefore)}`);
      diverged = true;
      continue;
    }
    const d = decide(streamId, snap, { ...e.data, type: e.type });
    if (d.kind === 'rejected') {
      problem('event-rejected', e, `does not apply on replay: ${d.reason} (recorded ${show(e.stateBefore)} → ${show(e.stateAfter)})`);
      diverged = true;
      continue;
    }
    if (d.kind === 'unchanged') {
      problem('event-no-op', e, `replays as a no-op in state ${d.state}: today's machine would not have recorded it`);
      diverged = true;
      continue;
    }
    if (!sameJson(e.stateAfter, d.stateAfter)) {
      problem('state-mismatch', e, `recorded state_after ${show(e.stateAfter)} but replay gives ${show(d.stateAfter)}`);
      diverged = true;
      continue;
    }
    const effectProblem = compareEffects(streamId, e.streamVersion, d.effects, effects);
    if (effectProblem) {
      problem('effect-mismatch', e, effectProblem);
      diverged = true;
      continue;
    }
    snap = {
      streamId,
      kind,
      machineVersion: e.machineVersion,
      version: e.streamVersion,
      state: d.stateAfter,
      context: d.context,
      createdAt: snap?.createdAt ?? e.recordedAt,
      updatedAt: e.recordedAt,
    };
    steps.set(e.position, stepOf(snap));
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


/** Walks the global log in commit-safe order with each event's replayed step; checks the invariants. */
async function checkInvariants(db: Executor, steps: ReadonlyMap<string, Step>, lastEvent: (streamId: string) => EventRef | null): Promise<HistoryProblem[]> {
  const problems: HistoryProblem[] = [];
  const current = new Map<string, Step>();
  const holders = new Map<string, string>(); // host/module → partition stream holding its claim
  const deletedAt = new Map<string, EventRef>(); // vm stream → its `deleted` event

  for (let cursor = LOG_START; ; ) {
    const page = await readLog(db, cursor, 1000);
    if (page.events.length === 0) break;
    cursor = page.next;
    for (const e of page.events) {
      const step = steps.get(e.position);
      if (!step) {
        // Past a divergence already reported on its stream: from here on its state is unknown, so
        // it neither holds GPUs nor vouches for its VM in the checks below.
        current.delete(e.streamId);
        for (const [key, holder] of holders) if (holder === e.streamId) holders.delete(key);
        deletedAt.delete(e.streamId);
        continue;
      }
      const previous = current.get(step.streamId);
      // Two transactions can commit a stream's versions out of transaction-id order; keep the newest.
      if (previous && previous.version > step.version) continue;
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

/** Verifies the whole history in one consistent snapshot of the database. */
export async function verifyHistory(db: Kysely<Database>): Promise<VerifyReport> {
  return db
    .transaction()
    .setIsolationLevel('repeatable read')
    .setAccessMode('read only')
    .execute(async (tx) => {
      const byStream = await readStreams(tx);
      const effectRows = await tx.selectFrom('effects').select(['id', 'stream_id', 'type', 'params']).execute();
      const effects = new Map(effectRows.map((r) => [r.id, { type: r.type, params: r.params }]));

      const problems: HistoryProblem[] = [];
      const steps = new Map<string, Step>();
      const diverged = new Set<string>();
      let events = 0;
      for (const [streamId, list] of byStream) {
        events += list.length;
        const checked = checkStream(streamId, list, effects);
        problems.push(...checked.problems);
        if (checked.problems.some((p) => p.code !== 'unknown-machine-version')) diverged.add(streamId);
        for (const [position, step] of checked.steps) steps.set(position, step);
      }
      const lastEvent = (streamId: string): EventRef | null => {
        const e = byStream.get(streamId)?.at(-1);
        return e ? ref(e) : null;
      };

      // Outbox rows no event asked for (the per-event check above only looks up expected ids).
      for (const r of effectRows) {
        const m = /^(.*)@(\d+)#(\d+)$/.exec(r.id);
        const list = m ? byStream.get(m[1]!) : undefined;
        if (!m || !list) {
          problems.push({ code: 'orphan-row', streamId: r.stream_id, event: lastEvent(r.stream_id), message: `effects row ${r.id} (${r.type}) belongs to no event` });
          continue;
        }
        if (diverged.has(m[1]!)) continue;
        const e = list.find((x) => x.streamVersion === Number(m[2]));
        if (!e) problems.push({ code: 'orphan-row', streamId: m[1]!, event: lastEvent(m[1]!), message: `effects row ${r.id} (${r.type}) names version ${m[2]}, which the stream does not hold` });
      }

      const { differences } = await verifyProjections(tx);
      for (const d of differences) {
        // A stream that does not fold was named above, at the event where it stops.
        if (d.table === 'events' && diverged.has(d.streamId)) continue;
        if (d.table === 'events') {
          problems.push({ code: 'event-rejected', streamId: d.streamId, event: lastEvent(d.streamId), message: String(d.rebuilt) });
          continue;
        }
        problems.push(...projectionProblems(d, lastEvent));
      }

      problems.push(...(await checkInvariants(tx, steps, lastEvent)));
      return { streams: byStream.size, events, problems };
    });
}
