/**
 * Message effects (MESSAGE_EFFECTS in machines/index.ts) delivered with the step that sends them
 * (applyEvent in src/engine/commands.ts): the partition's notifyVm is written in the statement of
 * BOUND_VFIO when the VM accepts it, and left to the outbox when it does not.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { partitionStream, vmStream } from '../machines/index.ts';
import { applyEvent, type CommandMeta } from '../src/engine/commands.ts';
import { SnapshotCache } from '../src/engine/snapshot-cache.ts';
import { verifyHistory } from '../src/engine/verify.ts';
import { ConcurrencyError, readStream } from '../src/store/events.ts';
import type { Db } from '../src/store/db.ts';
import { openFreshDb, usingPostgres } from './support/db.ts';

const policy = { maxAttempts: () => 3 };
const meta = (causationId: string): CommandMeta => ({ actor: 'test', correlationId: 'c', causationId });
/** Partition n's one GPU: module n (the claims' key is host and module). */
const gpusOf = (n: number) => [{ moduleId: n, pciAddress: `0000:${(0x10 + n).toString(16)}:00.0` }];

describe(`message effects delivered with their step (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  let db: Db;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ db, close } = await openFreshDb());
  });
  afterAll(() => close());

  /** Partition `n` of host h1 claimed by VM `vm` and brought to `binding` (the step before its notice). */
  async function toBinding(n: number, vm: string, snapshots?: SnapshotCache): Promise<string> {
    const p = partitionStream('h1', n);
    const apply = (stream: string, event: { type: string; [k: string]: unknown }, cause: string) => applyEvent(db.kysely, stream, event, meta(cause), policy, { snapshots });
    await apply(p, { type: 'REGISTER', hostId: 'h1', partitionId: n, gpus: gpusOf(n) }, `r${n}`);
    await apply(p, { type: 'CLAIM', vmId: vm }, `claim-${vm}`);
    await apply(vmStream(vm), { type: 'CREATE', vmId: vm, name: vm, hostId: 'h1', partitionId: n, gpus: gpusOf(n), memoryMiB: 1024, vcpus: 1, powerdownTimeoutMs: 1000 }, `create-${vm}`);
    await apply(p, { type: 'GPUS_READY' }, `g-${vm}`);
    await apply(p, { type: 'ACTIVATED', outcome: 'activated' }, `a-${vm}`);
    await apply(p, { type: 'CONFIRMED_ACTIVE' }, `ca-${vm}`);
    return p;
  }

  const effect = (id: string) => db.kysely.selectFrom('effects').selectAll().where('id', '=', id).executeTakeFirstOrThrow();

  it('a notice the VM accepts is written with the sender\'s step: one statement, the effect done with its try', async () => {
    const snapshots = new SnapshotCache();
    const p = await toBinding(1, 'vm-a', snapshots);
    const result = await applyEvent(db.kysely, p, { type: 'BOUND_VFIO' }, meta('b-vm-a'), policy, { snapshots });
    expect(result.kind).toBe('changed');

    const [bound] = (await readStream(db.kysely, p)).slice(-1);
    const vmEvents = await readStream(db.kysely, vmStream('vm-a'));
    const ready = vmEvents.at(-1)!;
    const noticeId = `${p}@${bound!.streamVersion}#0`;
    expect(ready).toMatchObject({ type: 'PARTITION_READY', causationId: noticeId, actor: 'effect:notifyVm', stateAfter: 'starting' });
    // The same statement: the same transaction and the same now().
    expect(ready.txId).toBe(bound!.txId);
    expect(ready.recordedAt.getTime()).toBe(bound!.recordedAt.getTime());
    const notice = await effect(noticeId);
    expect(notice).toMatchObject({ type: 'notifyVm', status: 'done', attempts: 1, note: `delivered PARTITION_READY to ${vmStream('vm-a')} in the statement of BOUND_VFIO` });
    const tries = await db.kysely.selectFrom('effect_attempts').selectAll().where('effect_id', '=', noticeId).execute();
    expect(tries.map((t) => [t.attempt, t.outcome])).toEqual([[1, 'ok']]);
    // The VM's own next effect (startQemu) is an ordinary one; the cache holds both new snapshots.
    expect((await effect(`${vmStream('vm-a')}@${ready.streamVersion}#0`)).status).toBe('pending');
    expect(snapshots.get(vmStream('vm-a'))?.state).toBe('starting');
    expect(snapshots.get(p)?.state).toBe('ready');
    // The history reads as if a worker had delivered it.
    expect((await verifyHistory(db.kysely)).problems).toEqual([]);
  });

  it('a notice the VM refuses stays in the outbox for a worker, and nothing is written to the VM', async () => {
    const p = await toBinding(2, 'vm-b');
    // Deleted while provisioning: the VM is releasing and refuses PARTITION_READY.
    await applyEvent(db.kysely, vmStream('vm-b'), { type: 'DELETE' }, meta('del-vm-b'), policy);
    const before = await readStream(db.kysely, vmStream('vm-b'));
    await applyEvent(db.kysely, p, { type: 'BOUND_VFIO' }, meta('b-vm-b'), policy);
    expect(await readStream(db.kysely, vmStream('vm-b'))).toEqual(before);
    const [bound] = (await readStream(db.kysely, p)).slice(-1);
    expect(await effect(`${p}@${bound!.streamVersion}#0`)).toMatchObject({ type: 'notifyVm', status: 'pending', attempts: 0, note: null });
  });

  it('a VM that moved after its snapshot was cached fails the whole statement; the retry decides on the stored VM', async () => {
    const snapshots = new SnapshotCache();
    const p = await toBinding(3, 'vm-c', snapshots);
    // Another writer (not through this cache) deletes the VM: the cached `provisioning` is stale.
    await applyEvent(db.kysely, vmStream('vm-c'), { type: 'DELETE' }, meta('del-vm-c'), policy);
    const partitionBefore = await readStream(db.kysely, p);
    await expect(applyEvent(db.kysely, p, { type: 'BOUND_VFIO' }, meta('b-vm-c'), policy, { snapshots })).rejects.toBeInstanceOf(ConcurrencyError);
    // Nothing of either step was written, and both entries were dropped from the cache.
    expect(await readStream(db.kysely, p)).toEqual(partitionBefore);
    expect(snapshots.get(p)).toBeUndefined();
    expect(snapshots.get(vmStream('vm-c'))).toBeUndefined();
    // Decided again on stored state: the VM refuses, so the partition's step lands alone.
    await applyEvent(db.kysely, p, { type: 'BOUND_VFIO' }, meta('b-vm-c'), policy, { snapshots });
    const [bound] = (await readStream(db.kysely, p)).slice(-1);
    expect(bound!.type).toBe('BOUND_VFIO');
    expect((await effect(`${p}@${bound!.streamVersion}#0`)).status).toBe('pending');
  });
});
