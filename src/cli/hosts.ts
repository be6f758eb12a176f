/**
 * `gpuvm host …` and `gpuvm capacity`: the fleet's hosts, their place in it (cordon, drain,
 * maintenance, removal) and what each can still take — over the service's HTTP API.
 */
import type { Command } from 'commander';
import { table, time } from './format.ts';
import type { ServiceClient } from './replay.ts';

const print = (s: string): void => void process.stdout.write(s + '\n');
const json = (v: unknown): void => print(JSON.stringify(v, null, 2));
const SIZES = ['1', '2', '4', '8'] as const;

interface HostJson {
  id: string;
  board: string;
  simulated: boolean;
  registeredAt: string;
  state: string;
  availability: string;
  cordon: { by: string; reason: string | null; drain: boolean; deleteVms: boolean } | null;
  agent: { epoch: number; lastHeartbeat: string; readyAt: string | null } | null;
  silentSince: string | null;
  free: Record<string, number>;
  liveVms: number;
  gpus: { moduleId: number; pciAddress: string }[];
  quarantinedModules: Record<string, { reason: string; source: string }>;
  quarantinedPartitions: { partitionId: number; failure: string | null }[];
}

/** "1:8 2:4 4:2 8:1": VMs of each size placeable (GPUs:VMs), sizes with none left out. */
function sizes(free: Record<string, number>): string {
  return SIZES.filter((n) => free[n]! > 0).map((n) => `${n}:${free[n]}`).join(' ') || '-';
}

function ago(iso: string | null | undefined): string {
  if (!iso) return '-';
  const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
  return s < 120 ? `${s}s ago` : s < 7200 ? `${Math.round(s / 60)}m ago` : time(iso);
}

export function registerHostCommands(cli: Command, client: ServiceClient): void {
  const url = () => client.serviceUrl(cli.opts());
  const host = cli.command('host').description('hosts: their place in the fleet, their GPUs and what is quarantined');

  host
    .command('ls')
    .description('list hosts: state, board, VMs placeable by size (GPUS:COUNT), live VMs, last agent heartbeat')
    .option('--all', 'include removed hosts')
    .option('--gpus', 'also each host\'s GPUs (module → PCI address) and what is quarantined')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const { hosts } = await client.call<{ hosts: HostJson[] }>(url(), 'GET', `/v1/hosts${o.all ? '?all=true' : ''}`);
      if (o.json) return json(hosts);
      if (hosts.length === 0) return print('no hosts');
      print(
        table(
          ['HOST', 'STATE', 'BOARD', 'FREE (GPUS:VMS)', 'VMS', 'HEARTBEAT', 'NOTE'],
          hosts.map((h) => [
            h.id,
            h.availability === h.state || h.availability === 'ready' ? h.state : `${h.state}, ${h.availability}`,
            `${h.board}${h.simulated ? ' (sim)' : ''}`,
            sizes(h.free),
            h.liveVms,
            ago(h.agent?.lastHeartbeat),
            [
              h.cordon ? `${h.cordon.drain ? 'drained' : 'cordoned'} by ${h.cordon.by}${h.cordon.reason ? `: ${h.cordon.reason}` : ''}` : '',
              Object.keys(h.quarantinedModules).length ? `quarantined modules ${Object.keys(h.quarantinedModules).join(',')}` : '',
              h.quarantinedPartitions.length ? `quarantined partitions ${h.quarantinedPartitions.map((p) => p.partitionId).join(',')}` : '',
            ]
              .filter(Boolean)
              .join('; '),
          ]),
        ),
      );
      if (!o.gpus) return;
      for (const h of hosts) {
        print(`\n${h.id}  ${h.board}${h.simulated ? ' (simulated)' : ''}  registered ${time(h.registeredAt)}`);
        print(
          table(
            ['MODULE', 'PCI ADDRESS', 'HEALTH'],
            h.gpus.map((g) => {
              const q = h.quarantinedModules[String(g.moduleId)];
              return [g.moduleId, g.pciAddress, q ? `quarantined (${q.source}): ${q.reason}` : 'ok'];
            }),
          ),
        );
        for (const p of h.quarantinedPartitions) print(`partition ${p.partitionId} quarantined: ${p.failure ?? 'failed twice'}`);
      }
    });

  const lifecycle = (name: string, description: string) =>
    host
      .command(name)
      .argument('<host>', 'host id')
      .description(description)
      .option('--json', 'print JSON');

  lifecycle('cordon', 'stop placing new VMs on a host (its VMs keep running)')
    .option('--reason <text>', 'why, for the record')
    .action(async (id, o) => {
      const r = await client.call<any>(url(), 'POST', `/v1/hosts/${encodeURIComponent(id)}/cordon`, o.reason ? { reason: o.reason } : {});
      if (o.json) return json(r);
      print(`${id} ${r.host.state}: no new VMs are placed on it`);
    });

  lifecycle('uncordon', 'place VMs on a host again (also ends maintenance, or calls a drain off)').action(async (id, o) => {
    const r = await client.call<any>(url(), 'POST', `/v1/hosts/${encodeURIComponent(id)}/uncordon`, {});
    if (o.json) return json(r);
    print(`${id} ${r.host.state}`);
  });

  lifecycle('drain', 'cordon a host, then wait for its VMs to end; it goes to maintenance once they have')
    .option('--reason <text>', 'why, for the record')
    .option('--delete-vms', 'delete its VMs now (GPU VMs cannot be live-migrated: their tenants lose them)')
    .option('--wait', 'wait until the host is in maintenance')
    .option('--timeout <seconds>', 'with --wait', '600')
    .action(async (id, o) => {
      const timeout = Number(o.timeout);
      if (!Number.isFinite(timeout) || timeout <= 0) throw new Error(`--timeout must be a number of seconds (got ${JSON.stringify(o.timeout)})`);
      const r = await client.call<any>(url(), 'POST', `/v1/hosts/${encodeURIComponent(id)}/drain`, { ...(o.reason ? { reason: o.reason } : {}), deleteVms: o.deleteVms === true });
      if (!o.json) {
        print(`${id} ${r.host.state}: no new VMs; ${r.deletedVms.length ? `deleting ${r.deletedVms.length} VM(s): ${r.deletedVms.join(', ')}` : 'waiting for its VMs to end (GPU VMs cannot be live-migrated; --delete-vms ends them)'}`);
      }
      let state = r.host.state as string;
      if (o.wait) {
        const deadline = Date.now() + timeout * 1000;
        while (state === 'draining') {
          if (Date.now() > deadline) throw new Error(`timed out after ${timeout}s: host ${id} is still draining`);
          await new Promise((resolve) => setTimeout(resolve, 1000));
          const { hosts } = await client.call<{ hosts: HostJson[] }>(url(), 'GET', '/v1/hosts?all=true');
          state = hosts.find((h) => h.id === id)?.state ?? 'gone';
        }
        if (!o.json) print(`${id} ${state}`);
      }
      if (o.json) json({ ...r, host: { ...r.host, state } });
    });

  lifecycle('rm', 'remove an empty host from the fleet (no VM, no claimed GPU: drain it first)').action(async (id, o) => {
    const r = await client.call<any>(url(), 'DELETE', `/v1/hosts/${encodeURIComponent(id)}`);
    if (o.json) return json(r);
    print(`${id} ${r.host.state}`);
  });

  host
    .command('clear-quarantine')
    .argument('<host>', 'host id')
    .description('return a quarantined GPU module or partition to service (after the operator fixed it)')
    .option('--module <id>', 'a GPU module id (1-8)')
    .option('--partition <id>', 'a partition id')
    .option('--all', 'everything quarantined on the host')
    .option('--json', 'print JSON')
    .action(async (hostId, o) => {
      const body = o.all ? { all: true } : o.module !== undefined ? { moduleId: Number(o.module) } : o.partition !== undefined ? { partitionId: Number(o.partition) } : {};
      const cleared = await client.call<{ modules: number[]; partitions: number[] }>(url(), 'POST', `/v1/hosts/${encodeURIComponent(hostId)}/clear-quarantine`, body);
      if (o.json) return json(cleared);
      print(`cleared on ${hostId}: modules [${cleared.modules.join(', ')}], partitions [${cleared.partitions.join(', ')}]`);
    });

  host
    .command('repair')
    .argument('<host>', 'host id')
    .description('repair a broken or unrepaired partition: wait for its QEMU to be gone, GPUs back to the host driver, fmpm -d')
    .requiredOption('--partition <id>', 'a partition id')
    .option('--json', 'print JSON')
    .action(async (hostId, o) => {
      const p = await client.call<any>(url(), 'POST', `/v1/hosts/${encodeURIComponent(hostId)}/repair`, { partitionId: Number(o.partition) });
      if (o.json) return json(p);
      print(`partition ${p.partition_id} on ${hostId} is ${p.state}: GPUs (modules ${p.modules.join(', ')}) back to the host driver, then fmpm -d`);
    });

  cli
    .command('capacity')
    .description('VMs of 1, 2, 4 and 8 GPUs that can be placed now, per host and for the fleet (activatable partitions only)')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const c = await client.call<{ fleet: Record<string, number>; hosts: { hostId: string; board: string; availability: string; placeable: Record<string, number>; free: Record<string, number>; liveVms: number }[] }>(url(), 'GET', '/v1/capacity');
      if (o.json) return json(c);
      print(
        table(
          ['HOST', 'BOARD', 'TAKES VMS', ...SIZES.map((n) => `${n} GPU`), 'VMS'],
          [
            ...c.hosts.map((h) => [h.hostId, h.board, h.availability === 'ready' ? 'yes' : `no (${h.availability})`, ...SIZES.map((n) => h.placeable[n]), h.liveVms]),
            ['fleet', '', '', ...SIZES.map((n) => c.fleet[n]), c.hosts.reduce((a, h) => a + h.liveVms, 0)],
          ],
        ),
      );
      const held = c.hosts.filter((h) => h.availability !== 'ready' && SIZES.some((n) => h.free[n]! > 0));
      if (held.length) print(`\nheld back (not taking VMs): ${held.map((h) => `${h.hostId} (${h.availability}) ${sizes(h.free)}`).join('; ')}`);
    });
}
