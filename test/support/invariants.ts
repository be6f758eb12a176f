/**
 * DESIGN §3.3 invariants, checked against the simulated host and the database at rest.
 */
import { expect } from 'vitest';
import { verifyProjections } from '../../src/engine/rebuild.ts';
import type { Service } from '../../src/service.ts';

export interface HostPicture {
  activePartitions: number[];
  drivers: Record<string, string | null>;
  liveQemu: string[];
}

export async function hostPicture(service: Service): Promise<HostPicture> {
  const { host } = service;
  const table = await host.fmpm.list();
  const inventory = await service.db.kysely.selectFrom('hosts').select('inventory').where('id', '=', host.hostId).executeTakeFirstOrThrow();
  const gpus = (inventory.inventory as unknown as { gpus: { pciAddress: string }[] }).gpus;
  const drivers: Record<string, string | null> = {};
  for (const g of gpus) drivers[g.pciAddress] = await host.sysfs.driverOf(g.pciAddress);
  const liveQemu = (await host.qemu.running()).map((q) => q.vmId);
  return { activePartitions: table.partitions.filter((p) => p.isActive).map((p) => p.partitionId).sort((a, b) => a - b), drivers, liveQemu: liveQemu.sort() };
}

/** Invariants 1, 3 and 4 at rest (no VM between steps). */
export async function expectInvariantsAtRest(service: Service): Promise<HostPicture> {
  const db = service.db.kysely;
  const vms = await db.selectFrom('vms').selectAll().execute();
  const moving = vms.filter((v) => !['running', 'deleted', 'failed', 'crashed'].includes(v.state));
  expect(moving.map((v) => `${v.id}:${v.state}`), 'VMs still between steps').toEqual([]);

  const running = vms.filter((v) => v.state === 'running');
  const picture = await hostPicture(service);
  // 3: every active partition belongs to exactly one live VM; no QEMU without a VM.
  expect(picture.activePartitions).toEqual(running.map((v) => v.partition_id).sort((a, b) => a - b));
  expect(picture.liveQemu).toEqual(running.map((v) => v.id).sort());
  // 3: GPUs on vfio-pci only under a running VM; never a GPU with no driver.
  const vfio = new Set(running.flatMap((v) => v.gpus.map((g) => g.pciAddress)));
  for (const [pci, driver] of Object.entries(picture.drivers)) {
    expect(driver, `driver of ${pci}`).toBe(vfio.has(pci) ? 'vfio-pci' : 'nvidia');
  }
  // 1: claims are exactly the running VMs' modules, each once (the primary key enforces "once").
  const claims = await db.selectFrom('gpu_claims').selectAll().execute();
  expect(claims.map((c) => `${c.module_id}:${c.vm_id}`).sort()).toEqual(running.flatMap((v) => v.gpus.map((g) => `${g.moduleId}:${v.id}`)).sort());
  // 4: folding every stream reproduces every projection row.
  const verify = await verifyProjections(db);
  expect(verify.differences).toEqual([]);
  // Nothing left to do in the outbox.
  const open = await db.selectFrom('effects').select(['id', 'type', 'status']).where('status', 'in', ['pending', 'running']).where('type', '!=', 'powerdownTimer').execute();
  expect(open).toEqual([]);
  return picture;
}
