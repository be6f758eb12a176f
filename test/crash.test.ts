/**
 * Crash resume with a real process kill: `gpuvm serve` runs as a child process and is SIGKILLed
 * in the middle of provisioning (partition activated, vfio binding under way) and again in the
 * middle of teardown. A new process resumes from the log; every VM reaches the state it would
 * have reached without the kill and the host shows nothing leaked.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Fmpm } from '../src/host/fmpm.ts';
import { Qemu } from '../src/host/qemu.ts';
import { loadSimHost, stopSimKernel, writeFaults } from '../src/host/sim/sim-host.ts';
import { Sysfs } from '../src/host/sysfs.ts';
import { freshDatabaseUrl, tempDir, usingPostgres, waitUntil } from './support/env.ts';
import { freePort, http, startServeChild, type ServeChild } from './support/child.ts';

const dataDir = tempDir();
const simRoot = join(dataDir, 'sim', 'sim-b200');
let child: ServeChild | null = null;
let dropDb = async () => {};

afterAll(async () => {
  await child?.kill();
  const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot: join(dataDir, 'run', 'sim-b200'), accel: 'tcg' });
  const { readdirSync } = await import('node:fs');
  for (const id of (() => { try { return readdirSync(join(dataDir, 'run', 'sim-b200')); } catch { return []; } })()) await qemu.terminate(id).catch(() => {});
  await stopSimKernel(simRoot).catch(() => {});
  await dropDb();
  rmSync(dataDir, { recursive: true, force: true });
});

async function vm(id: string) {
  return (await http(child!.url, 'GET', `/v1/vms/${id}`)).body;
}

async function partitionStates(id: string): Promise<string[]> {
  const h = await http(child!.url, 'GET', `/v1/vms/${id}/history`);
  return h.body.events.filter((e: { stream: string }) => e.stream.startsWith('partition:')).map((e: { to: string }) => e.to);
}

describe(`crash resume with SIGKILL (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  it('resumes provisioning and teardown after kill -9 and leaks nothing on the host', async () => {
    const db = await freshDatabaseUrl();
    dropDb = db.drop;
    const port = await freePort();
    child = await startServeChild({ dataDir, port, databaseUrl: db.url });

    // Slow the simulated kernel's probe so vfio binding takes a while: a window to kill in.
    await writeFaults(simRoot, { sysfs: { probeDelayMs: 400 } });
    const a = (await http(child.url, 'POST', '/v1/vms', { gpus: 2, name: 'crash-a' })).body;
    const b = (await http(child.url, 'POST', '/v1/vms', { gpus: 1, name: 'crash-b' })).body;
    expect(a.id).toBeTruthy();
    expect(b.id).toBeTruthy();

    // Kill once the partition is active and its GPUs are being bound to vfio-pci.
    await waitUntil('partition of crash-a binding', async () => (await partitionStates(a.id)).includes('binding'), 60_000, 20);
    const sim = await loadSimHost(simRoot);
    const fmpm = new Fmpm({ bin: sim.fmpmBin });
    const activeAtKill = (await fmpm.list()).partitions.filter((p) => p.isActive).map((p) => p.partitionId);
    expect(activeAtKill).toContain((await vm(a.id)).partition_id);
    await child.kill('SIGKILL');

    await writeFaults(simRoot, { sysfs: {} });
    child = await startServeChild({ dataDir, port, databaseUrl: db.url });
    await waitUntil('both VMs running after restart', async () => (await vm(a.id)).state === 'running' && (await vm(b.id)).state === 'running', 90_000, 100);

    // Kill again in the middle of a teardown.
    await http(child.url, 'DELETE', `/v1/vms/${a.id}`);
    await waitUntil('crash-a stopping', async () => ['stopping', 'terminating', 'releasing'].includes((await vm(a.id)).state), 30_000, 10);
    await child.kill('SIGKILL');
    child = await startServeChild({ dataDir, port, databaseUrl: db.url });
    await waitUntil('crash-a deleted', async () => (await vm(a.id)).state === 'deleted', 90_000, 100);
    expect((await vm(b.id)).state).toBe('running');

    // The host shows exactly one active partition, two... one GPU on vfio-pci, one QEMU: b's.
    const bRow = await vm(b.id);
    const table = await fmpm.list();
    expect(table.partitions.filter((p) => p.isActive).map((p) => p.partitionId)).toEqual([bRow.partition_id]);
    const sysfs = new Sysfs({ root: sim.sysfsRoot });
    for (const g of sim.gpus) {
      const expected = bRow.gpus.some((x: { pciAddress: string }) => x.pciAddress === g.pciAddress) ? 'vfio-pci' : 'nvidia';
      expect(await sysfs.driverOf(g.pciAddress), g.pciAddress).toBe(expected);
    }
    const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot: join(dataDir, 'run', 'sim-b200'), accel: 'tcg' });
    expect((await qemu.status(a.id)).state).toBe('gone');
    expect((await qemu.status(b.id)).state).toBe('alive');

    // Every effect finished; the history shows the lost tries of the killed process.
    const ha = await http(child.url, 'GET', `/v1/vms/${a.id}/history`);
    const lost = ha.body.effects.flatMap((e: { tries: { outcome: string }[] }) => e.tries).filter((t: { outcome: string }) => t.outcome === 'lost');
    expect(lost.length).toBeGreaterThan(0);
    expect(ha.body.effects.every((e: { status: string }) => e.status === 'done')).toBe(true);

    await http(child.url, 'DELETE', `/v1/vms/${b.id}`);
    await waitUntil('crash-b deleted', async () => (await vm(b.id)).state === 'deleted', 60_000, 100);
    expect((await fmpm.list()).partitions.filter((p) => p.isActive)).toEqual([]);
    for (const g of sim.gpus) expect(await sysfs.driverOf(g.pciAddress)).toBe('nvidia');
    expect((await qemu.status(b.id)).state).toBe('gone');
  }, 300_000);
});
