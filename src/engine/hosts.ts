/**
 * Host registration: the first start on a host records its inventory on the host stream and one
 * REGISTER per partition, in one transaction. Later starts find the host known and keep its
 * recorded inventory (the GPUs may be on vfio-pci under running VMs, invisible to nvidia-smi);
 * each cycle re-verifies the module mapping while the GPUs are back on the host driver.
 */
import type { Kysely } from 'kysely';
import { hostStream, partitionStream, type HostContext } from '../../machines/index.ts';
import { takeInventory, type HostAdapters } from '../host/host.ts';
import type { Logger } from '../log.ts';
import type { Database } from '../store/schema.ts';
import { applyEvent, inTransaction, loadSnapshot, type EffectPolicy } from './commands.ts';

export async function registerHost(
  db: Kysely<Database>,
  host: HostAdapters,
  policy: EffectPolicy,
  log: Logger,
): Promise<{ registered: boolean; context: HostContext }> {
  const existing = await loadSnapshot(db, hostStream(host.hostId));
  if (existing.snapshot) return { registered: false, context: existing.snapshot.context as unknown as HostContext };

  const inventory = await takeInventory(host);
  const pci = new Map(inventory.gpus.map((g) => [g.moduleId, g.pciAddress]));
  const meta = { actor: 'gpuvm:register', correlationId: hostStream(host.hostId), causationId: null };
  const context = await inTransaction(db, async (tx) => {
    const result = await applyEvent(tx, hostStream(host.hostId), { type: 'REGISTER', hostId: host.hostId, simulated: host.simulated, inventory }, meta, policy);
    if (result.kind !== 'changed') throw new Error(`host ${host.hostId} was registered concurrently`);
    for (const p of inventory.partitions) {
      await applyEvent(
        tx,
        partitionStream(host.hostId, p.id),
        { type: 'REGISTER', hostId: host.hostId, partitionId: p.id, gpus: p.modules.map((m) => ({ moduleId: m, pciAddress: pci.get(m)! })) },
        meta,
        policy,
      );
    }
    return result.snapshot.context as unknown as HostContext;
  });
  log.info({ hostId: host.hostId, board: inventory.board, gpus: inventory.gpus.length, partitions: inventory.partitions.length }, 'host registered');
  return { registered: true, context };
}
