/**
 * Durable timers live as long as the state that set them (machines/index.ts `timers`, applyEvent in
 * src/engine/commands.ts): the VM's powerdown timer is cancelled by the step that leaves `stopping`
 * before it falls due, and is left alone by steps that stay.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vmStream } from '../machines/index.ts';
import { applyEvent, type CommandMeta } from '../src/engine/commands.ts';
import { verifyHistory } from '../src/engine/verify.ts';
import type { Db } from '../src/store/db.ts';
import { openFreshDb, usingPostgres } from './support/db.ts';

const policy = { maxAttempts: () => 3 };
const meta = (causationId: string): CommandMeta => ({ actor: 'test', correlationId: 'vm-t', causationId });

describe(`durable timers end with their state (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  let db: Db;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ db, close } = await openFreshDb());
  });
  afterAll(() => close());

  const apply = (vm: string, event: { type: string; [k: string]: unknown }, cause: string) => applyEvent(db.kysely, vmStream(vm), event, meta(cause), policy);
  const effects = (vm: string) => db.kysely.selectFrom('effects').select(['type', 'status', 'note']).where('stream_id', '=', vmStream(vm)).orderBy('id').execute();

  /** A VM brought to `stopping`: its powerdown and its powerdown timer are pending. */
  async function stopping(vm: string): Promise<void> {
    const gpus = [{ moduleId: 1, pciAddress: '0000:1b:00.0' }];
    await apply(vm, { type: 'CREATE', vmId: vm, name: vm, hostId: 'h1', partitionId: 8, gpus, memoryMiB: 1024, vcpus: 1, powerdownTimeoutMs: 30_000 }, `create-${vm}`);
    await apply(vm, { type: 'PARTITION_READY' }, `ready-${vm}`);
    await apply(vm, { type: 'QEMU_STARTED', pid: 4242 }, `started-${vm}`);
    await apply(vm, { type: 'DELETE' }, `delete-${vm}`);
  }

  it('QEMU_EXITED while stopping cancels the pending powerdown timer, with the reason, and nothing else', async () => {
    await stopping('vm-a');
    // DELETE again while stopping changes no state: the timer stays.
    await apply('vm-a', { type: 'DELETE' }, 'delete-again');
    expect((await effects('vm-a')).filter((e) => e.type === 'powerdownTimer')).toEqual([{ type: 'powerdownTimer', status: 'pending', note: null }]);

    await apply('vm-a', { type: 'QEMU_EXITED', how: 'process gone' }, 'monitor@5');
    const after = await effects('vm-a');
    expect(after.find((e) => e.type === 'powerdownTimer')).toEqual({ type: 'powerdownTimer', status: 'cancelled', note: 'cancelled: vm left stopping (QEMU_EXITED) before it fell due' });
    // The powerdown itself is not a timer: it stays for its worker.
    expect(after.find((e) => e.type === 'powerdownQemu')!.status).toBe('pending');
    expect(after.find((e) => e.type === 'releasePartition')!.status).toBe('pending');
    expect((await verifyHistory(db.kysely)).problems).toEqual([]);
  });

  it('a powerdown that failed for good (EFFECT_FAILED → terminating) cancels the timer too', async () => {
    await stopping('vm-b');
    await apply('vm-b', { type: 'EFFECT_FAILED', effect: 'powerdownQemu', error: 'QMP gone' }, 'failed-b');
    expect((await effects('vm-b')).find((e) => e.type === 'powerdownTimer')!.status).toBe('cancelled');
  });
});
