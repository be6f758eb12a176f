/** The machines alone: pure folds, no database. Every lifecycle path and every refusal. */
import { describe, expect, it } from 'vitest';
import { decide, type MachineEvent } from '../src/engine/decide.ts';
import type { StreamSnapshot } from '../src/store/projections.ts';
import { effectNames } from '../machines/index.ts';
import { createHandlers, type Handlers } from '../src/engine/handlers.ts';
import type { HostAdapters } from '../src/host/host.ts';

function run(streamId: string, events: MachineEvent[]) {
  let snap = null as StreamSnapshot | null;
  const effects: string[][] = [];
  const states: string[] = [];
  for (const e of events) {
    const d = decide(streamId, snap, e);
    if (d.kind === 'rejected') throw new Error(d.reason);
    if (d.kind === 'changed') {
      snap = { streamId, kind: 'vm', machineVersion: 1, version: (snap?.version ?? 0) + 1, state: d.stateAfter, context: d.context, createdAt: new Date(0), updatedAt: new Date(0) };
      effects.push(d.effects.map((x) => x.type));
    } else effects.push([]);
    states.push(snap!.state);
  }
  return { snap: snap!, effects, states };
}

const gpus = [{ moduleId: 1, pciAddress: '0000:17:00.0' }, { moduleId: 2, pciAddress: '0000:3d:00.0' }];
const create: MachineEvent = { type: 'CREATE', vmId: 'vm-aaaaaaaaaa', name: 'x', hostId: 'h', partitionId: 4, gpus, memoryMiB: 64, vcpus: 1, powerdownTimeoutMs: 100 };
const register: MachineEvent = { type: 'REGISTER', hostId: 'h', partitionId: 4, gpus };

describe('partition machine', () => {
  it('walks claim → prepare → activate → confirm → bind → ready → release path → free, in order', () => {
    const r = run('partition:h:4', [
      register, { type: 'CLAIM', vmId: 'vm-1' }, { type: 'GPUS_READY' }, { type: 'ACTIVATED', outcome: 'activated' }, { type: 'CONFIRMED_ACTIVE' },
      { type: 'BOUND_VFIO' }, { type: 'RELEASE', vmId: 'vm-1' }, { type: 'BOUND_HOST' }, { type: 'DEACTIVATED', outcome: 'deactivated' }, { type: 'CONFIRMED_INACTIVE' },
    ]);
    expect(r.states).toEqual(['free', 'preparing', 'activating', 'confirmingActive', 'binding', 'ready', 'unbinding', 'deactivating', 'confirmingInactive', 'free']);
    expect(r.effects.flat()).toEqual(['prepareGpus', 'activatePartition', 'confirmActive', 'bindVfio', 'notifyVm', 'bindHost', 'deactivatePartition', 'confirmInactive', 'notifyVm']);
    expect(r.snap.context.vmId).toBeNull();
  });

  it('unwinds through the release path when activation fails, and tells the VM why', () => {
    const r = run('partition:h:4', [register, { type: 'CLAIM', vmId: 'vm-1' }, { type: 'GPUS_READY' }, { type: 'EFFECT_FAILED', effect: 'activatePartition', error: 'fmReturn -8' }, { type: 'BOUND_HOST' }, { type: 'DEACTIVATED', outcome: 'already-inactive' }]);
    expect(r.states.slice(3)).toEqual(['unbinding', 'deactivating', 'confirmingInactive']);
    const d = decide('partition:h:4', r.snap, { type: 'CONFIRMED_INACTIVE' });
    expect(d.kind === 'changed' && d.effects[0]).toMatchObject({ type: 'notifyVm', params: { notice: 'PARTITION_FAILED', reason: 'activatePartition: fmReturn -8' } });
  });

  it('remembers a RELEASE during start-up and honours it when the step completes', () => {
    const r = run('partition:h:4', [register, { type: 'CLAIM', vmId: 'vm-1' }, { type: 'RELEASE', vmId: 'vm-1' }, { type: 'GPUS_READY' }]);
    expect(r.states.at(-1)).toBe('unbinding');
  });

  it('refuses a RELEASE from a VM that does not hold the partition, and a second CLAIM', () => {
    const r = run('partition:h:4', [register, { type: 'CLAIM', vmId: 'vm-1' }]);
    expect(decide('partition:h:4', r.snap, { type: 'RELEASE', vmId: 'vm-2' }).kind).toBe('rejected');
    expect(decide('partition:h:4', r.snap, { type: 'CLAIM', vmId: 'vm-2' }).kind).toBe('rejected');
  });
});

describe('vm machine', () => {
  it('runs create → running → delete → deleted with the stop sequence', () => {
    const r = run('vm:x', [create, { type: 'PARTITION_READY' }, { type: 'QEMU_STARTED', pid: 42 }, { type: 'DELETE' }, { type: 'POWERDOWN_TIMEOUT' }, { type: 'QEMU_EXITED', how: 'quit' }, { type: 'PARTITION_RELEASED' }]);
    expect(r.states).toEqual(['provisioning', 'starting', 'running', 'stopping', 'terminating', 'releasing', 'deleted']);
    expect(r.effects).toEqual([[], ['startQemu'], [], ['powerdownQemu', 'powerdownTimer'], ['terminateQemu'], ['releasePartition'], []]);
  });

  it('ends failed with the partition’s reason', () => {
    const r = run('vm:x', [create, { type: 'PARTITION_FAILED', reason: 'activatePartition: in-use' }]);
    expect(r.snap.state).toBe('failed');
    expect(r.snap.context.reason).toBe('activatePartition: in-use');
  });

  it('becomes crashed when QEMU dies on its own, after returning the partition', () => {
    const r = run('vm:x', [create, { type: 'PARTITION_READY' }, { type: 'QEMU_STARTED', pid: 42 }, { type: 'QEMU_EXITED', how: 'process gone' }, { type: 'PARTITION_RELEASED' }]);
    expect(r.states.slice(-2)).toEqual(['releasing', 'crashed']);
    expect(r.effects.at(-2)).toEqual(['releasePartition']);
  });

  it('accepts DELETE in every state but deleted', () => {
    const paths: MachineEvent[][] = [
      [create],
      [create, { type: 'PARTITION_READY' }],
      [create, { type: 'PARTITION_READY' }, { type: 'QEMU_STARTED', pid: 1 }],
      [create, { type: 'PARTITION_FAILED', reason: 'x' }],
      [create, { type: 'PARTITION_READY' }, { type: 'QEMU_STARTED', pid: 1 }, { type: 'QEMU_EXITED', how: 'x' }],
      [create, { type: 'PARTITION_READY' }, { type: 'QEMU_STARTED', pid: 1 }, { type: 'QEMU_EXITED', how: 'x' }, { type: 'PARTITION_RELEASED' }],
    ];
    for (const p of paths) {
      const r = run('vm:x', p);
      expect(decide('vm:x', r.snap, { type: 'DELETE' }).kind, r.snap.state).toBe('changed');
    }
    const done = run('vm:x', [create, { type: 'DELETE' }, { type: 'PARTITION_RELEASED' }]);
    expect(done.snap.state).toBe('deleted');
    expect(decide('vm:x', done.snap, { type: 'DELETE' }).kind).toBe('rejected');
  });

  it('honours a DELETE that arrived while QEMU was starting', () => {
    const r = run('vm:x', [create, { type: 'PARTITION_READY' }, { type: 'DELETE' }, { type: 'QEMU_STARTED', pid: 1 }]);
    expect(r.snap.state).toBe('stopping');
  });

  it('refuses events the state cannot take, with a message naming the state', () => {
    const r = run('vm:x', [create]);
    const d = decide('vm:x', r.snap, { type: 'QEMU_STARTED', pid: 1 });
    expect(d).toMatchObject({ kind: 'rejected', state: 'provisioning' });
    expect(d.kind === 'rejected' && d.reason).toContain('provisioning');
  });
});

describe('partition quarantine', () => {
  const failCycle: MachineEvent[] = [
    { type: 'CLAIM', vmId: 'vm-1' }, { type: 'GPUS_READY' }, { type: 'EFFECT_FAILED', effect: 'activatePartition', error: 'x' },
    { type: 'BOUND_HOST' }, { type: 'DEACTIVATED', outcome: 'already-inactive' }, { type: 'CONFIRMED_INACTIVE' },
  ];
  const goodCycle: MachineEvent[] = [
    { type: 'CLAIM', vmId: 'vm-2' }, { type: 'GPUS_READY' }, { type: 'ACTIVATED', outcome: 'activated' }, { type: 'CONFIRMED_ACTIVE' }, { type: 'BOUND_VFIO' },
    { type: 'RELEASE', vmId: 'vm-2' }, { type: 'BOUND_HOST' }, { type: 'DEACTIVATED', outcome: 'deactivated' }, { type: 'CONFIRMED_INACTIVE' },
  ];

  it('quarantines after two failed cycles in a row, not after failures separated by a good cycle', () => {
    expect(run('partition:h:4', [register, ...failCycle]).snap.state).toBe('free');
    const twice = run('partition:h:4', [register, ...failCycle, ...failCycle]);
    expect(twice.snap.state).toBe('quarantined');
    expect(decide('partition:h:4', twice.snap, { type: 'CLAIM', vmId: 'vm-9' }).kind).toBe('rejected');
    expect(run('partition:h:4', [register, ...failCycle, ...goodCycle, ...failCycle]).snap.state).toBe('free');
    const cleared = run('partition:h:4', [register, ...failCycle, ...failCycle, { type: 'CLEAR_QUARANTINE', by: 'op' }]);
    expect(cleared.snap.state).toBe('free');
    expect(cleared.snap.context.consecutiveFailures).toBe(0);
  });
});

describe('partition drift repair', () => {
  const drift = (kind: string): MachineEvent => ({ type: 'DRIFT_DETECTED', drift: kind, detail: 'seen on the host', strayQemu: ['vm-stray00001'] });
  const failCycle: MachineEvent[] = [
    { type: 'CLAIM', vmId: 'vm-1' }, { type: 'GPUS_READY' }, { type: 'EFFECT_FAILED', effect: 'activatePartition', error: 'x' },
    { type: 'BOUND_HOST' }, { type: 'DEACTIVATED', outcome: 'already-inactive' }, { type: 'CONFIRMED_INACTIVE' },
  ];

  it('repairs a free partition with one effect, holding its claims, and returns it free', () => {
    const r = run('partition:h:4', [register, drift('active-without-owner'), { type: 'REPAIRED', actions: ['fmpm -d 4'] }]);
    expect(r.states).toEqual(['free', 'repairing', 'free']);
    const d = decide('partition:h:4', run('partition:h:4', [register]).snap, drift('active-without-owner'));
    expect(d.kind === 'changed' && d.effects).toEqual([
      { type: 'repairPartition', params: { hostId: 'h', partitionId: 4, gpus, strayQemu: ['vm-stray00001'], drift: 'active-without-owner' } },
    ]);
    // While repairing, no VM can claim it.
    expect(decide('partition:h:4', run('partition:h:4', [register, drift('active-without-owner')]).snap, { type: 'CLAIM', vmId: 'vm-2' }).kind).toBe('rejected');
  });

  it('returns a quarantined partition to quarantine after its repair', () => {
    const r = run('partition:h:4', [register, ...failCycle, ...failCycle, drift('active-without-owner'), { type: 'REPAIRED', actions: [] }]);
    expect(r.states.slice(-3)).toEqual(['quarantined', 'repairing', 'quarantined']);
  });

  it('keeps the claims of a failed repair and tries again on the next drift', () => {
    const r = run('partition:h:4', [register, drift('gpu-off-host-driver'), { type: 'EFFECT_FAILED', effect: 'repairPartition', error: 'EBUSY' }]);
    expect(r.snap.state).toBe('unrepaired');
    expect(decide('partition:h:4', r.snap, { type: 'CLAIM', vmId: 'vm-2' }).kind).toBe('rejected');
    const again = run('partition:h:4', [register, drift('gpu-off-host-driver'), { type: 'EFFECT_FAILED', effect: 'repairPartition', error: 'EBUSY' }, drift('repair-retry'), { type: 'REPAIRED', actions: [] }]);
    expect(again.states.slice(-2)).toEqual(['repairing', 'free']);
    expect(again.snap.context.failure).toBeNull();
  });

  it('refuses drift on a partition a VM holds: its own steps observe the host', () => {
    const held = run('partition:h:4', [register, { type: 'CLAIM', vmId: 'vm-1' }]);
    expect(decide('partition:h:4', held.snap, drift('active-without-owner')).kind).toBe('rejected');
  });
});

describe('host machine', () => {
  const reg: MachineEvent = { type: 'REGISTER', hostId: 'h', simulated: true, inventory: { board: 'B200', gpus: [], partitions: [] } };
  const bad: MachineEvent = { type: 'GPU_UNHEALTHY', moduleId: 3, pciAddress: '0000:17:00.0', source: 'xid', reason: 'Xid 79' };
  it('quarantines a module once and clears it', () => {
    const r = run('host:h', [reg, bad]);
    expect(r.snap.context.quarantinedModules).toEqual({ '3': { reason: 'Xid 79', source: 'xid' } });
    expect(decide('host:h', r.snap, bad).kind).toBe('rejected');
    expect(run('host:h', [reg, bad, { type: 'CLEAR_QUARANTINE', moduleId: 3, by: 'op' }]).snap.context.quarantinedModules).toEqual({});
    expect(decide('host:h', run('host:h', [reg]).snap, { type: 'CLEAR_QUARANTINE', moduleId: null, by: 'op' }).kind).toBe('rejected');
  });

  it('stops a QEMU that belongs to no VM, and only records drift it cannot repair', () => {
    const stray: MachineEvent = { type: 'DRIFT_DETECTED', drift: 'qemu-without-vm', detail: 'QEMU pid 7', vmId: 'vm-stray00001', partitionId: null };
    const d = decide('host:h', run('host:h', [reg]).snap, stray);
    expect(d.kind === 'changed' && d.effects).toEqual([{ type: 'stopStrayQemu', params: { hostId: 'h', vmId: 'vm-stray00001' } }]);
    const report: MachineEvent = { type: 'DRIFT_DETECTED', drift: 'partition-inactive-under-vm', detail: 'partition 4', vmId: null, partitionId: 4 };
    const r = decide('host:h', run('host:h', [reg]).snap, report);
    expect(r.kind === 'changed' && r.effects).toEqual([]);
    expect(run('host:h', [reg, stray, report]).snap.context.driftsDetected).toBe(2);
  });
});

describe('vm effect failures name their effect', () => {
  const toTerminating: MachineEvent[] = [create, { type: 'PARTITION_READY' }, { type: 'QEMU_STARTED', pid: 42 }, { type: 'DELETE' }, { type: 'POWERDOWN_TIMEOUT' }];

  it('ignores a late powerdownQemu failure once terminating, and releases on the QEMU_EXITED that follows', () => {
    // Given a VM the powerdown timer moved to terminating while its powerdown QMP hung
    const r = run('vm:x', toTerminating);
    // When the powerdown's failure arrives late
    const late = decide('vm:x', r.snap, { type: 'EFFECT_FAILED', effect: 'powerdownQemu', error: 'QMP timeout' });
    // Then it is refused, and terminateQemu's QEMU_EXITED still releases the partition
    expect(late.kind).toBe('rejected');
    expect(run('vm:x', [...toTerminating, { type: 'QEMU_EXITED', how: 'SIGKILL' }, { type: 'PARTITION_RELEASED' }]).states.slice(-2)).toEqual(['releasing', 'deleted']);
  });

  it('keeps the partition held when QEMU will not die, until it is seen gone or an operator retries', () => {
    // Given terminateQemu failed for good
    const r = run('vm:x', [...toTerminating, { type: 'EFFECT_FAILED', effect: 'terminateQemu', error: 'still alive after SIGKILL' }]);
    // Then the VM waits in stopFailed, asking for no release
    expect(r.snap.state).toBe('stopFailed');
    expect(r.effects.at(-1)).toEqual([]);
    // When the monitor sees QEMU gone, it releases; when an operator deletes again, it terminates again
    expect(run('vm:x', [...toTerminating, { type: 'EFFECT_FAILED', effect: 'terminateQemu', error: 'x' }, { type: 'QEMU_EXITED', how: 'process gone' }]).effects.at(-1)).toEqual(['releasePartition']);
    const retry = run('vm:x', [...toTerminating, { type: 'EFFECT_FAILED', effect: 'terminateQemu', error: 'x' }, { type: 'DELETE' }]);
    expect(retry.snap.state).toBe('terminating');
    expect(retry.effects.at(-1)).toEqual(['terminateQemu']);
  });

  it('ends the VM when releasePartition fails for good, saying the partition is left held', () => {
    const r = run('vm:x', [...toTerminating, { type: 'QEMU_EXITED', how: 'quit' }, { type: 'EFFECT_FAILED', effect: 'releasePartition', error: 'QEMU status unknown' }]);
    expect(r.snap.state).toBe('deleted');
    expect(r.snap.context.reason).toBe('releasePartition: QEMU status unknown; partition 4 is left held for a repair');
    const crashed = run('vm:x', [create, { type: 'PARTITION_READY' }, { type: 'QEMU_STARTED', pid: 1 }, { type: 'QEMU_EXITED', how: 'gone' }, { type: 'EFFECT_FAILED', effect: 'releasePartition', error: 'x' }]);
    expect(crashed.snap.state).toBe('failed');
    expect(decide('vm:x', crashed.snap, { type: 'EFFECT_FAILED', effect: 'startQemu', error: 'x' }).kind).toBe('rejected');
  });

  it('refuses a startQemu failure outside starting and a stale one inside the release path', () => {
    const starting = run('vm:x', [create, { type: 'PARTITION_READY' }]);
    expect(decide('vm:x', starting.snap, { type: 'EFFECT_FAILED', effect: 'powerdownQemu', error: 'x' }).kind).toBe('rejected');
    expect(decide('vm:x', starting.snap, { type: 'EFFECT_FAILED', effect: 'startQemu', error: 'x' })).toMatchObject({ kind: 'changed', stateAfter: 'terminating' });
  });
});

describe('partition effect failures, repair and registration', () => {
  const ready: MachineEvent[] = [register, { type: 'CLAIM', vmId: 'vm-1' }, { type: 'GPUS_READY' }, { type: 'ACTIVATED', outcome: 'activated' }, { type: 'CONFIRMED_ACTIVE' }, { type: 'BOUND_VFIO' }];
  const broken: MachineEvent[] = [...ready, { type: 'RELEASE', vmId: 'vm-1' }, { type: 'EFFECT_FAILED', effect: 'bindHost', error: 'EBUSY' }];

  it('takes EFFECT_FAILED only for the step in flight', () => {
    const activating = run('partition:h:4', [register, { type: 'CLAIM', vmId: 'vm-1' }, { type: 'GPUS_READY' }]);
    expect(decide('partition:h:4', activating.snap, { type: 'EFFECT_FAILED', effect: 'prepareGpus', error: 'x' }).kind).toBe('rejected');
    expect(decide('partition:h:4', activating.snap, { type: 'EFFECT_FAILED', effect: 'activatePartition', error: 'x' })).toMatchObject({ stateAfter: 'unbinding' });
  });

  it('lets an operator repair a broken partition: it waits for the VM’s QEMU, and the failed cycle counts', () => {
    // Given a partition broken while releasing
    const r = run('partition:h:4', broken);
    expect(r.snap.state).toBe('broken');
    // When an operator repairs it
    const d = decide('partition:h:4', r.snap, { type: 'REPAIR', by: 'op' });
    // Then it repairs, waiting for vm-1's QEMU, and ends free with the claim and the VM dropped
    expect(d.kind === 'changed' && d.effects).toEqual([{ type: 'repairPartition', params: { hostId: 'h', partitionId: 4, gpus, strayQemu: ['vm-1'], drift: 'operator-repair' } }]);
    const done = run('partition:h:4', [...broken, { type: 'REPAIR', by: 'op' }, { type: 'REPAIRED', actions: [] }]);
    expect(done.snap.state).toBe('free');
    expect(done.snap.context).toMatchObject({ vmId: null, failure: null, drift: null, consecutiveFailures: 1 });
    // A second such cycle in a row quarantines it
    const again = run('partition:h:4', [...broken, { type: 'REPAIR', by: 'op' }, { type: 'REPAIRED', actions: [] }, ...broken.slice(1), { type: 'REPAIR', by: 'op' }, { type: 'REPAIRED', actions: [] }]);
    expect(again.snap.state).toBe('quarantined');
    expect(decide('partition:h:4', run('partition:h:4', [register]).snap, { type: 'REPAIR', by: 'op' }).kind).toBe('rejected');
  });

  it('repairs a ready partition whose VM ended, after that VM’s QEMU is gone', () => {
    const drift: MachineEvent = { type: 'DRIFT_DETECTED', drift: 'vm-ended', detail: 'vm-1 is failed', strayQemu: ['vm-1'] };
    expect(decide('partition:h:4', run('partition:h:4', ready).snap, { ...drift, drift: 'active-without-owner' }).kind).toBe('rejected');
    const r = run('partition:h:4', [...ready, drift, { type: 'REPAIRED', actions: [] }]);
    expect(r.states.slice(-2)).toEqual(['repairing', 'free']);
    expect(r.snap.context.vmId).toBeNull();
  });

  it('registers a partition found active straight into repairing', () => {
    const r = run('partition:h:4', [{ ...register, active: true, strayQemu: [] }]);
    expect(r.snap.state).toBe('repairing');
    expect(r.effects[0]).toEqual(['repairPartition']);
    expect(run('partition:h:4', [{ ...register, active: false }]).snap.state).toBe('free');
  });

  it('refuses RELEASE in free and DELETE on a deleted or never-created VM (root handlers do not leak)', () => {
    expect(decide('partition:h:4', run('partition:h:4', [register]).snap, { type: 'RELEASE', vmId: 'vm-1' }).kind).toBe('rejected');
    expect(decide('vm:x', null, { type: 'DELETE' }).kind).toBe('rejected');
  });
});

describe('the effect boundary: machine → handler → outcome', () => {
  it('every effect each machine declares has a handler, and every handler answers an effect', () => {
    const declared = (['vm', 'partition', 'host'] as const).flatMap(effectNames).sort();
    expect(declared).toContain('startQemu');
    expect(declared).toContain('repairPartition');
    expect(declared).not.toContain('rememberDelete'); // an assign action: a context update, not an effect
    expect(Object.keys(createHandlers({} as HostAdapters)).sort()).toEqual(declared);
  });

  it('is typed end to end (checked by tsc: an outcome its stream cannot take does not compile)', () => {
    // @ts-expect-error BOGUS is not an event of the partition machine
    const bad: Handlers['bindVfio'] = async () => ({ deliver: { streamId: 'partition:h:1', event: { type: 'BOGUS' } } });
    // @ts-expect-error startQemu's params carry the GPUs, memory and vCPUs
    const wrong: Handlers['startQemu'] = async (p: { vmId: string; other: number }) => ({ note: String(p.other) });
    const good: Handlers['bindVfio'] = async () => ({ deliver: { streamId: 'partition:h:1', event: { type: 'BOUND_VFIO' } } });
    expect([bad, wrong, good]).toHaveLength(3);
  });
});

