/**
 * A fleet in one process: `gpuvm serve --sim-hosts 2 --sim-board b200,h100` — two simulated hosts
 * of different boards, each with its agent, one API placing across both. Given / when / then.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FleetWatch } from '../src/engine/fleet-watch.ts';
import { startService, type Service } from '../src/service.ts';
import { stopSimKernel, writeFaults } from '../src/host/sim/sim-host.ts';
import { freshDatabaseUrl, quietLog, tempDir, testConfig, waitUntil } from './support/env.ts';

let service: Service;
let dataDir: string;
let drop: () => Promise<void>;

async function api(method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> {
  const res = await fetch(service.url + path, {
    method,
    headers: { ...(body === undefined ? {} : { 'content-type': 'application/json' }), 'x-gpuvm-actor': 'fleet-test' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

const untilState = (id: string, states: string[]) =>
  waitUntil(`${id} in ${states.join('|')}`, async () => {
    const r = await api('GET', `/v1/vms/${id}`);
    return states.includes(r.body.state) ? r.body : null;
  });

beforeAll(async () => {
  dataDir = tempDir();
  const db = await freshDatabaseUrl();
  drop = db.drop;
  service = await startService(testConfig(dataDir, db.url, { agentHeartbeatMs: 200, agentSilentMs: 60_000 }), {
    log: quietLog,
    simHosts: { count: 2, boards: ['b200', 'h100'] },
  });
});

afterAll(async () => {
  if (service) {
    for (const a of service.agents) for (const vm of await a.host.qemu.running().catch(() => [])) await a.host.qemu.terminate(vm.vmId).catch(() => {});
    await service.stop();
    for (const a of service.agents) await stopSimKernel(join(dataDir, 'sim', a.hostId)).catch(() => {});
  }
  await drop?.();
  rmSync(dataDir, { recursive: true, force: true });
});

describe('a simulated fleet of two boards in one process', () => {
  it('registers both hosts ready, each with its own board and partition table', async () => {
    const { body } = await api('GET', '/v1/hosts');
    expect(body.hosts.map((h: any) => [h.id, h.state, h.availability])).toEqual([
      ['sim-b200-1', 'ready', 'ready'],
      ['sim-h100-2', 'ready', 'ready'],
    ]);
    expect(body.hosts[0].board).toMatch(/B200/);
    expect(body.hosts[1].board).toMatch(/H100/);
    const { body: p } = await api('GET', '/v1/partitions');
    const ids = (host: string) => p.partitions.filter((x: any) => x.host_id === host).map((x: any) => x.partition_id);
    expect(ids('sim-b200-1')).toEqual(Array.from({ length: 15 }, (_, i) => i + 1));
    expect(ids('sim-h100-2')).toEqual(Array.from({ length: 15 }, (_, i) => i));
  });

  it('counts capacity by activatable partitions, per host and for the fleet', async () => {
    const { body } = await api('GET', '/v1/capacity');
    expect(body.fleet).toEqual({ 1: 16, 2: 8, 4: 4, 8: 2 });
    expect(body.hosts.map((h: any) => h.placeable)).toEqual([
      { 1: 8, 2: 4, 4: 2, 8: 1 },
      { 1: 8, 2: 4, 4: 2, 8: 1 },
    ]);
  });

  it('pins a VM to a host or a board, and explains each placement in its CLAIM event', async () => {
    const pinned = await api('POST', '/v1/vms', { gpus: 1, host: 'sim-h100-2' });
    expect(pinned.status).toBe(202);
    expect(pinned.body.host_id).toBe('sim-h100-2');
    const byBoard = await api('POST', '/v1/vms', { gpus: 2, board: 'b200' });
    expect(byBoard.body.host_id).toBe('sim-b200-1');
    const free = await api('POST', '/v1/vms', { gpus: 1 });
    expect(free.status).toBe(202);

    const { body: history } = await api('GET', `/v1/vms/${free.body.id}/history`);
    const claim = history.events.find((e: any) => e.type === 'CLAIM');
    expect(claim.actor).toBe('api:fleet-test');
    expect(claim.data.placement).toMatchObject({ score: expect.any(Number), candidates: 2 });
    expect(claim.data.placement.runnerUp).toMatchObject({ hostId: expect.any(String), partitionId: expect.any(Number), score: expect.any(Number) });
    expect(claim.data.placement.runnerUp.score).toBeGreaterThanOrEqual(claim.data.placement.score);

    const { body: c } = await api('GET', '/v1/capacity');
    expect(c.fleet[8]).toBe(0);
    for (const vm of [pinned.body, byBoard.body, free.body]) await untilState(vm.id, ['running']);
    for (const vm of [pinned.body, byBoard.body, free.body]) await api('DELETE', `/v1/vms/${vm.id}`);
    for (const vm of [pinned.body, byBoard.body, free.body]) await untilState(vm.id, ['deleted']);
  });

  it('refuses a pin to an unknown host (404) or a malformed board (400)', async () => {
    expect((await api('POST', '/v1/vms', { gpus: 1, host: 'nope' })).status).toBe(404);
    expect((await api('POST', '/v1/vms', { gpus: 1, board: 'a100' })).status).toBe(400);
  });

  it('cordons a host: nothing is placed there until it is uncordoned; both recorded with their actor', async () => {
    const cordoned = await api('POST', '/v1/hosts/sim-b200-1/cordon', { reason: 'fan noise' });
    expect(cordoned.body.host.state).toBe('cordoned');
    const refused = await api('POST', '/v1/vms', { gpus: 8, host: 'sim-b200-1' });
    expect(refused.status).toBe(409);
    expect(refused.body.error.message).toMatch(/cordoned: sim-b200-1/);
    const vm = await api('POST', '/v1/vms', { gpus: 8 });
    expect(vm.body.host_id).toBe('sim-h100-2');
    const { body: cap } = await api('GET', '/v1/capacity');
    expect(cap.fleet).toEqual({ 1: 0, 2: 0, 4: 0, 8: 0 });
    expect((await api('POST', '/v1/hosts/sim-b200-1/uncordon')).body.host.state).toBe('ready');
    const events = await service.db.kysely.selectFrom('events').select(['type', 'actor']).where('stream_id', '=', 'host:sim-b200-1').where('type', 'in', ['CORDON', 'UNCORDON']).execute();
    expect(events).toEqual([
      { type: 'CORDON', actor: 'api:fleet-test' },
      { type: 'UNCORDON', actor: 'api:fleet-test' },
    ]);
    await untilState(vm.body.id, ['running']);
    await api('DELETE', `/v1/vms/${vm.body.id}`);
    await untilState(vm.body.id, ['deleted']);
  });

  it('drains a host with --delete-vms: its VMs end, then it is in maintenance; rm refuses a host with VMs', async () => {
    const vm = await api('POST', '/v1/vms', { gpus: 4, host: 'sim-h100-2' });
    await untilState(vm.body.id, ['running']);
    const rm = await api('DELETE', '/v1/hosts/sim-h100-2');
    expect(rm.status).toBe(409);
    expect(rm.body.error.message).toMatch(/not empty \(1 live VM, 4 claimed GPUs\)/);

    const drain = await api('POST', '/v1/hosts/sim-h100-2/drain', { deleteVms: true, reason: 'firmware' });
    expect(drain.body.deletedVms).toEqual([vm.body.id]);
    expect(drain.body.host.state).toBe('draining');
    await untilState(vm.body.id, ['deleted']);
    await waitUntil('maintenance', async () => (await api('GET', '/v1/hosts')).body.hosts.find((h: any) => h.id === 'sim-h100-2').state === 'maintenance');
    expect((await api('POST', '/v1/vms', { gpus: 1, host: 'sim-h100-2' })).status).toBe(409);
    expect((await api('POST', '/v1/hosts/sim-h100-2/uncordon')).body.host.state).toBe('ready');
  });

  it('a silent agent makes its host unreachable: its VMs show unknown, nothing is placed; back only once it has reconciled', async () => {
    const vm = await api('POST', '/v1/vms', { gpus: 1, host: 'sim-b200-1' });
    await untilState(vm.body.id, ['running']);
    // Given Fabric Manager down on that host: its agent cannot judge the host until it is back.
    const simRoot = join(dataDir, 'sim', 'sim-b200-1');
    await writeFaults(simRoot, { fmpm: { down: true } });
    // When an API node whose limit every heartbeat exceeds looks at the fleet:
    const strict = new FleetWatch(service.db.kysely, { maxAttempts: () => 3 }, { intervalMs: 3_600_000, silentMs: 0, log: quietLog });
    expect((await strict.pass()).silent).toEqual(['sim-b200-1', 'sim-h100-2']);
    // Then its VMs show unknown, their recorded state kept, and nothing is placed there.
    const shown = await api('GET', `/v1/vms/${vm.body.id}`);
    expect([shown.body.status, shown.body.state]).toEqual(['unknown', 'running']);
    expect((await api('GET', '/v1/vms')).body.vms.find((v: any) => v.id === vm.body.id).status).toBe('unknown');
    const refused = await api('POST', '/v1/vms', { gpus: 1, host: 'sim-b200-1' });
    expect([refused.status, refused.body.error.message]).toEqual([409, expect.stringMatching(/unreachable: sim-b200-1/)]);
    expect((await api('GET', '/v1/hosts')).body.hosts.find((h: any) => h.id === 'sim-b200-1').availability).toBe('unreachable');
    await new Promise((r) => setTimeout(r, 600));
    expect((await api('GET', `/v1/vms/${vm.body.id}`)).body.status).toBe('unknown');
    // When Fabric Manager is back, the agent reconciles and records AGENT_BACK.
    await writeFaults(simRoot, { fmpm: {} });
    await waitUntil('AGENT_BACK', async () => {
      const rows = await service.db.kysely.selectFrom('events').select(['type', 'actor']).where('stream_id', '=', 'host:sim-b200-1').where('type', 'in', ['AGENT_SILENT', 'AGENT_BACK']).orderBy('position').execute();
      return rows.length === 2 && rows[1]!.type === 'AGENT_BACK' ? rows : null;
    }).then((rows) => expect(rows).toEqual([{ type: 'AGENT_SILENT', actor: 'gpuvm:fleet-watch' }, { type: 'AGENT_BACK', actor: 'gpuvm:agent' }]));
    expect((await api('GET', `/v1/vms/${vm.body.id}`)).body.status).toBe('running');
    await api('DELETE', `/v1/vms/${vm.body.id}`);
    await untilState(vm.body.id, ['deleted']);
  });

  it('removes an empty host; it is then gone from placement and from host ls', async () => {
    await api('POST', '/v1/hosts/sim-h100-2/drain', {});
    await waitUntil('maintenance', async () => (await api('GET', '/v1/hosts')).body.hosts.find((h: any) => h.id === 'sim-h100-2')?.state === 'maintenance');
    const rm = await api('DELETE', '/v1/hosts/sim-h100-2');
    expect(rm.body.host.state).toBe('removed');
    expect((await api('GET', '/v1/hosts')).body.hosts.map((h: any) => h.id)).toEqual(['sim-b200-1']);
    expect((await api('GET', '/v1/hosts?all=true')).body.hosts.map((h: any) => h.id)).toEqual(['sim-b200-1', 'sim-h100-2']);
    expect((await api('POST', '/v1/vms', { gpus: 1, host: 'sim-h100-2' })).status).toBe(409);
  });
});
