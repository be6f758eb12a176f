/**
 * No dead ends (DESIGN.md 3.3, invariant 7): from every state a machine can reach, under every event
 * it accepts and EFFECT_FAILED of every effect it declares, a rest state with every resource returned
 * is still reachable. The walk is derived from each machine's own definition: its states, the event
 * types it accepts, and its effects (the actions it declares, less assign actions). Only the event
 * payloads are written here, and every event type the machine accepts must have some.
 */
import { describe, expect, it } from 'vitest';
import { machines, partitionHoldsClaim, type StreamKind } from '../machines/index.ts';
import { canonical, decide, type MachineEvent } from '../src/engine/decide.ts';
import type { StreamSnapshot } from '../src/store/projections.ts';

const gpus = [{ moduleId: 1, pciAddress: '0000:17:00.0' }];
const DRIFTS = ['active-without-owner', 'gpu-off-host-driver', 'repair-retry', 'vm-ended', 'active-at-registration', 'operator-repair', 'qemu-without-vm', 'partition-inactive-under-vm', 'gpu-not-on-vfio-under-vm', 'unrepairable'];

/** Concrete payloads for each event type, given the context they are sent in (RELEASE comes from the holder, or not). */
const PAYLOADS: Record<StreamKind, Record<string, (ctx: Record<string, unknown>) => MachineEvent[]>> = {
  vm: {
    CREATE: () => [{ type: 'CREATE', vmId: 'vm-1', name: 'x', hostId: 'h', partitionId: 4, gpus, memoryMiB: 64, vcpus: 1, powerdownTimeoutMs: 100 }],
    DELETE: () => [{ type: 'DELETE' }],
    PARTITION_READY: () => [{ type: 'PARTITION_READY' }],
    PARTITION_FAILED: () => [{ type: 'PARTITION_FAILED', reason: 'activatePartition: x' }],
    PARTITION_RELEASED: () => [{ type: 'PARTITION_RELEASED' }],
    QEMU_STARTED: () => [{ type: 'QEMU_STARTED', pid: 7 }],
    QEMU_EXITED: () => [{ type: 'QEMU_EXITED', how: 'gone' }],
    POWERDOWN_TIMEOUT: () => [{ type: 'POWERDOWN_TIMEOUT' }],
  },
  partition: {
    REGISTER: () => [false, true].map((active) => ({ type: 'REGISTER', hostId: 'h', partitionId: 4, gpus, active, strayQemu: [] })),
    CLAIM: () => [{ type: 'CLAIM', vmId: 'vm-1' }],
    GPUS_READY: () => [{ type: 'GPUS_READY' }],
    ACTIVATED: () => [{ type: 'ACTIVATED', outcome: 'activated' }],
    CONFIRMED_ACTIVE: () => [{ type: 'CONFIRMED_ACTIVE' }],
    BOUND_VFIO: () => [{ type: 'BOUND_VFIO' }],
    RELEASE: (ctx) => [{ type: 'RELEASE', vmId: (ctx.vmId as string | null) ?? 'vm-1' }, { type: 'RELEASE', vmId: 'vm-other' }],
    BOUND_HOST: () => [{ type: 'BOUND_HOST' }],
    DEACTIVATED: () => [{ type: 'DEACTIVATED', outcome: 'deactivated' }],
    CONFIRMED_INACTIVE: () => [{ type: 'CONFIRMED_INACTIVE' }],
    CLEAR_QUARANTINE: () => [{ type: 'CLEAR_QUARANTINE', by: 'op' }],
    DRIFT_DETECTED: () => DRIFTS.map((drift) => ({ type: 'DRIFT_DETECTED', drift, detail: 'seen', strayQemu: ['vm-stray'] })),
    REPAIRED: () => [{ type: 'REPAIRED', actions: [] }],
    REPAIR: () => [{ type: 'REPAIR', by: 'op' }],
  },
  host: {
    REGISTER: () => [{ type: 'REGISTER', hostId: 'h', simulated: true, inventory: { board: 'B200', gpus, partitions: [{ id: 4, modules: [1] }] } }],
    GPU_UNHEALTHY: () => [{ type: 'GPU_UNHEALTHY', moduleId: 1, pciAddress: gpus[0]!.pciAddress, source: 'xid', reason: 'Xid 79' }],
    CLEAR_QUARANTINE: () => [1, null].map((moduleId) => ({ type: 'CLEAR_QUARANTINE', moduleId, by: 'op' })),
    FABRIC_MANAGER_RESTARTED: () => [{ type: 'FABRIC_MANAGER_RESTARTED', activatedList: [4] }],
    DRIFT_DETECTED: () => DRIFTS.flatMap((drift) => [null, 'vm-stray'].map((vmId) => ({ type: 'DRIFT_DETECTED', drift, detail: 'seen', vmId, partitionId: null }))),
    STRAY_QEMU_STOPPED: () => [{ type: 'STRAY_QEMU_STOPPED', vmId: 'vm-stray', how: 'quit' }],
    READY: () => [{ type: 'READY' }],
    CORDON: () => [{ type: 'CORDON', by: 'op', reason: null }],
    UNCORDON: () => [{ type: 'UNCORDON', by: 'op' }],
    DRAIN: () => [false, true].map((deleteVms) => ({ type: 'DRAIN', by: 'op', reason: 'maintenance', deleteVms })),
    DRAINED: () => [{ type: 'DRAINED' }],
    REMOVE: () => [{ type: 'REMOVE', by: 'op' }],
    AGENT_SILENT: () => [{ type: 'AGENT_SILENT', lastHeartbeat: '2026-12-08T00:00:00.000Z', limitMs: 30000 }],
    AGENT_BACK: () => [{ type: 'AGENT_BACK', epoch: 2 }],
  },
};

type AnyMachine = { events: string[]; root: { states: Record<string, unknown> }; implementations: { actions: Record<string, unknown> } };
const machineOf = (kind: StreamKind) => machines[kind].machine as unknown as AnyMachine;

/** The machine's effects: its declared actions, less the assign actions (context updates, not effects). */
function effectsOf(kind: StreamKind): string[] {
  return Object.entries(machineOf(kind).implementations.actions)
    .filter(([, a]) => (a as { type?: string }).type !== 'xstate.assign')
    .map(([name]) => name);
}

function eventsFor(kind: StreamKind, ctx: Record<string, unknown>): MachineEvent[] {
  return machineOf(kind).events.flatMap((type) => {
    if (type === 'EFFECT_FAILED') return effectsOf(kind).map((effect) => ({ type, effect, error: 'failed for good' }));
    const make = PAYLOADS[kind][type];
    if (!make) throw new Error(`no payload for ${kind} event ${type}: add one to PAYLOADS`);
    return make(ctx);
  });
}

/**
 * The VM's resource is its partition: claimed with CREATE, returned when the partition says so
 * (PARTITION_RELEASED, or PARTITION_FAILED: it unwound itself). A VM may also end with it held if
 * the partition machine takes back a ready partition under an ended VM (the reconciler's vm-ended
 * drift), which is asked of the partition machine itself here.
 */
function partitionTakesBackFromEndedVm(): boolean {
  let snap: StreamSnapshot | null = null;
  const ready: MachineEvent[] = [
    { type: 'REGISTER', hostId: 'h', partitionId: 4, gpus }, { type: 'CLAIM', vmId: 'vm-1' }, { type: 'GPUS_READY' },
    { type: 'ACTIVATED', outcome: 'activated' }, { type: 'CONFIRMED_ACTIVE' }, { type: 'BOUND_VFIO' },
  ];
  for (const e of ready) snap = step('partition', snap, e)!;
  expect(snap!.state).toBe('ready');
  return step('partition', snap, { type: 'DRIFT_DETECTED', drift: 'vm-ended', detail: 'vm-1 ended', strayQemu: ['vm-1'] }) !== null;
}

interface Node {
  key: string;
  snap: StreamSnapshot | null;
  /** VM only: its partition not yet returned. */
  held: boolean;
  /** How the walk first got here, for the failure message. */
  path: string[];
}

function step(kind: StreamKind, snap: StreamSnapshot | null, e: MachineEvent): StreamSnapshot | null {
  const streamId = `${kind}:x`;
  const d = decide(streamId, snap, e);
  if (d.kind !== 'changed') return null;
  return { streamId, kind, machineVersion: machines[kind].version, version: (snap?.version ?? 0) + 1, state: d.stateAfter, context: d.context, createdAt: new Date(0), updatedAt: new Date(0) };
}

/** State plus context, numbers capped (cycle and event counters only grow): the walk stays finite. */
function keyOf(snap: StreamSnapshot | null, held: boolean): string {
  if (!snap) return 'new';
  const capped = JSON.stringify(canonical(snap.context), (_k, v) => (typeof v === 'number' && v > 3 ? 3 : v));
  return `${snap.state} ${held ? 'held ' : ''}${capped}`;
}

function walk(kind: StreamKind, atRest: (n: Node) => boolean) {
  const start: Node = { key: 'new', snap: null, held: false, path: [] };
  const nodes = new Map<string, Node>([[start.key, start]]);
  const from = new Map<string, Set<string>>(); // key → keys it steps to
  const queue = [start];
  let transitions = 0;
  while (queue.length > 0) {
    const n = queue.shift()!;
    const out = new Set<string>();
    for (const e of eventsFor(kind, n.snap?.context ?? {})) {
      const next = step(kind, n.snap, e);
      if (!next) continue;
      transitions++;
      const held = kind === 'vm' && (e.type === 'CREATE' || (n.held && e.type !== 'PARTITION_RELEASED' && e.type !== 'PARTITION_FAILED'));
      const key = keyOf(next, held);
      out.add(key);
      if (!nodes.has(key)) {
        const label = e.type === 'EFFECT_FAILED' ? `EFFECT_FAILED(${String(e.effect)})` : e.type;
        const m: Node = { key, snap: next, held, path: [...n.path, `${label} → ${next.state}`] };
        nodes.set(key, m);
        queue.push(m);
      }
    }
    from.set(n.key, out);
  }
  // Backwards from the rest nodes: which nodes can still get there.
  const reachesRest = new Set([...nodes.values()].filter(atRest).map((n) => n.key));
  for (let grew = true; grew; ) {
    grew = false;
    for (const [key, outs] of from) {
      if (!reachesRest.has(key) && [...outs].some((k) => reachesRest.has(k))) {
        reachesRest.add(key);
        grew = true;
      }
    }
  }
  const deadEnds = [...nodes.values()].filter((n) => !reachesRest.has(n.key)).map((n) => `${n.snap?.state ?? 'new'} via ${n.path.join(', ')}`);
  const states = new Set([...nodes.values()].map((n) => n.snap?.state ?? 'new'));
  return { nodes: nodes.size, transitions, states, deadEnds };
}

describe('no dead ends: from every reachable state, a rest state with every resource returned is reachable', () => {
  it('declares effects the walk fails', () => {
    expect(effectsOf('vm')).toEqual(expect.arrayContaining(['startQemu', 'powerdownQemu', 'terminateQemu', 'releasePartition']));
    expect(effectsOf('vm')).not.toContain('rememberDelete');
    expect(effectsOf('partition')).toEqual(expect.arrayContaining(['prepareGpus', 'bindHost', 'repairPartition', 'notifyVm']));
    expect(effectsOf('host')).toEqual(['stopStrayQemu']);
  });

  it('vm: `deleted` with its partition returned (or handed to the partition’s vm-ended repair)', () => {
    const handover = partitionTakesBackFromEndedVm();
    const r = walk('vm', (n) => n.snap?.state === 'deleted' && (!n.held || handover));
    console.log(`vm: ${r.nodes} (state, context) reached over ${r.transitions} transitions; states ${[...r.states].join(' ')}`);
    expect(r.deadEnds).toEqual([]);
    expect([...r.states].sort()).toEqual(Object.keys(machineOf('vm').root.states).sort());
    expect(r.nodes).toBeGreaterThan(20);
  });

  it('partition: `free` or `quarantined`, holding no claim and no VM', () => {
    const r = walk('partition', (n) => (n.snap?.state === 'free' || n.snap?.state === 'quarantined') && n.snap.context.vmId === null && !partitionHoldsClaim(n.snap.state));
    console.log(`partition: ${r.nodes} (state, context) reached over ${r.transitions} transitions; states ${[...r.states].join(' ')}`);
    expect(r.deadEnds).toEqual([]);
    expect([...r.states].sort()).toEqual(Object.keys(machineOf('partition').root.states).sort());
    expect(r.nodes).toBeGreaterThan(50);
  });

  it('host: `ready` with its agent heard, or `removed`', () => {
    const r = walk('host', (n) => (n.snap?.state === 'ready' && !n.snap.context.silentSince) || n.snap?.state === 'removed');
    console.log(`host: ${r.nodes} (state, context) reached over ${r.transitions} transitions; states ${[...r.states].join(' ')}`);
    expect(r.deadEnds).toEqual([]);
    expect([...r.states].sort()).toEqual(Object.keys(machineOf('host').root.states).sort());
    expect(r.nodes).toBeGreaterThan(2);
  });
});
