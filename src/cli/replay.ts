/**
 * `gpuvm replay vm|host`, `gpuvm verify`, `gpuvm export`: incident work, over the service's HTTP API
 * like every other client command.
 */
import { createWriteStream } from 'node:fs';
import { once } from 'node:events';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Command } from 'commander';
import { table, time } from './format.ts';

export interface ServiceClient {
  call<T>(base: string, method: string, path: string, body?: unknown): Promise<T>;
  serviceUrl(opts: { url?: string }): string;
}

class ReplayCliError extends Error {
  override name = 'ReplayCliError';
}

interface Replayed {
  streamId: string;
  state: string;
  context: Record<string, any>;
  version: number;
  lastEvent: { position: string; type: string; recordedAt: string };
}

interface MomentJson {
  time: string | null;
  position: string | null;
  /** With a position: the last position of the transaction the cut ends with. */
  through: string | null;
}

interface VmReplayJson {
  vmId: string;
  at: MomentJson;
  vm: Replayed;
  partition: Replayed | null;
}

interface HostReplayJson {
  hostId: string;
  at: MomentJson;
  host: Replayed;
  activePartitions: { partitionId: number; state: string; vmId: string | null; modules: number[] }[];
  gpus: { moduleId: number; pciAddress: string; driver: string; partitionId: number | null; vmId: string | null }[];
  vms: { id: string; state: string; partitionId: number }[];
  quarantinedModules: Record<string, { reason: string; source: string }>;
  quarantinedPartitions: number[];
}

interface VerifyJson {
  ok: boolean;
  streams: number;
  events: number;
  problems: unknown[];
  lines: string[];
}

const print = (s: string): void => void process.stdout.write(s + '\n');
const json = (v: unknown): void => print(JSON.stringify(v, null, 2));

/**
 * The query for a moment. A time without a zone, as `gpuvm history` prints them
 * (`2025-01-02 03:04:05.678`), is UTC.
 */
export function momentQuery(o: { at?: string; position?: string }): string {
  if (o.at !== undefined && o.position !== undefined) throw new ReplayCliError('give --at or --position, not both');
  if (o.position !== undefined) return `?position=${encodeURIComponent(o.position)}`;
  if (o.at === undefined) return '';
  const at = /^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?$/.test(o.at) ? `${o.at.replace(' ', 'T')}Z` : o.at;
  return `?at=${encodeURIComponent(at)}`;
}

/** The moment as asked; a position says where its cut ended (it cuts at the end of a transaction). */
function moment(o: { at?: string; position?: string }, at?: MomentJson): string {
  if (o.position === undefined) return o.at !== undefined ? o.at : 'now';
  if (!at?.through) return `position ${o.position}`;
  return `position ${o.position} (cut at the end of its transaction: through position ${at.through})`;
}
const asOf = (r: Replayed) => `as of v${r.version} ${r.lastEvent.type}, recorded ${time(r.lastEvent.recordedAt)} (position ${r.lastEvent.position})`;

function vmReplayText(r: VmReplayJson, when: string): string {
  const c = r.vm.context;
  const gpus = (c.gpus as { moduleId: number; pciAddress: string }[]) ?? [];
  const lines = [
    `VM ${r.vmId} (${c.name}) at ${when}: ${r.vm.state}${c.reason ? ` (${c.reason})` : ''}`,
    `  ${asOf(r.vm)}`,
    `  host ${c.hostId}, partition ${c.partitionId}, qemu pid ${c.qemuPid ?? '-'}${c.deleteRequested ? ', delete requested' : ''}`,
    ...gpus.map((g, i) => `  gpu ${i}: module ${g.moduleId}  ${g.pciAddress}`),
  ];
  if (r.partition) {
    const p = r.partition.context;
    lines.push(
      `partition ${p.partitionId}: ${r.partition.state}${p.vmId ? ` (held by ${p.vmId}${p.vmId === r.vmId ? '' : ', another VM'})` : ' (unclaimed)'}, cycle ${p.cycle}${p.failure ? `, failure: ${p.failure}` : ''}`,
      `  ${asOf(r.partition)}`,
    );
  } else {
    lines.push('partition: none recorded then');
  }
  return lines.join('\n');
}

function hostReplayText(r: HostReplayJson, when: string): string {
  const out = [`host ${r.hostId} (${r.host.context.inventory?.board ?? 'unknown board'}) at ${when}`];
  out.push(
    r.activePartitions.length
      ? `active partitions: ${r.activePartitions.map((p) => `${p.partitionId} (${p.state}, ${p.vmId ?? 'no VM'}, modules ${p.modules.join(',')})`).join('; ')}`
      : 'active partitions: none',
  );
  out.push(
    table(
      ['MODULE', 'PCI ADDRESS', 'DRIVER', 'PARTITION', 'VM', 'HEALTH'],
      r.gpus.map((g) => {
        const q = r.quarantinedModules[String(g.moduleId)];
        return [g.moduleId, g.pciAddress, g.driver, g.partitionId, g.vmId, q ? `quarantined (${q.source}): ${q.reason}` : 'ok'];
      }),
    ),
  );
  out.push(r.vms.length ? table(['VM', 'STATE', 'PARTITION'], r.vms.map((v) => [v.id, v.state, v.partitionId])) : 'VMs: none');
  if (r.quarantinedPartitions.length) out.push(`quarantined partitions: ${r.quarantinedPartitions.join(', ')}`);
  return out.join('\n');
}

/** Streams the bundle to a file or stdout; the body is JSON lines, so `call` (JSON) does not fit. */
async function download(base: string, path: string, out: string | undefined): Promise<void> {
  let res: Response;
  try {
    res = await fetch(base + path);
  } catch {
    throw new ReplayCliError(`cannot reach the gpuvm service at ${base} (is \`gpuvm serve\` running? set --url or GPUVM_URL)`);
  }
  if (!res.ok || !res.body) {
    const text = await res.text();
    let message = `the service answered ${res.status}`;
    try {
      message = JSON.parse(text)?.error?.message ?? message;
    } catch {}
    throw new ReplayCliError(message);
  }
  const body = Readable.fromWeb(res.body as import('node:stream/web').ReadableStream<Uint8Array>);
  if (out !== undefined) {
    await pipeline(body, createWriteStream(out));
    return;
  }
  for await (const chunk of body) {
    if (!process.stdout.write(chunk)) await once(process.stdout, 'drain');
  }
}

export function registerReplayCommands(cli: Command, client: ServiceClient): void {
  const base = () => client.serviceUrl(cli.opts());

  const replay = cli.command('replay').description('replay the log: a VM, or a whole host, as it was at a moment');

  replay
    .command('vm')
    .argument('<id>', 'a VM id')
    .description("the VM's state and context, and its partition's, at a time or log position (default: now)")
    .option('--at <time>', 'ISO 8601 time (a time without a zone is UTC, as `gpuvm history` prints)')
    .option('--position <n>', 'a global log position')
    .option('--json', 'print JSON')
    .action(async (id: string, o) => {
      const r = await client.call<VmReplayJson>(base(), 'GET', `/v1/replay/vm/${encodeURIComponent(id)}${momentQuery(o)}`);
      if (o.json) json(r);
      else print(vmReplayText(r, moment(o, r.at)));
    });

  replay
    .command('host')
    .argument('<id>', 'a host id')
    .description('active partitions, which GPU was on which driver, and which VMs ran on the host at a moment (default: now)')
    .option('--at <time>', 'ISO 8601 time (a time without a zone is UTC, as `gpuvm history` prints)')
    .option('--position <n>', 'a global log position')
    .option('--json', 'print JSON')
    .action(async (id: string, o) => {
      const r = await client.call<HostReplayJson>(base(), 'GET', `/v1/replay/host/${encodeURIComponent(id)}${momentQuery(o)}`);
      if (o.json) json(r);
      else print(hostReplayText(r, moment(o, r.at)));
    });

  cli
    .command('verify')
    .description('refold every stream, rebuild the projections and check the invariants over the whole history; exit 1 on any problem')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const r = await client.call<VerifyJson>(base(), 'POST', '/v1/verify');
      if (o.json) json(r);
      else if (r.ok) print(`ok: ${r.streams} streams, ${r.events} events, no problems`);
      else for (const line of r.lines) print(line);
      if (!r.ok) throw new ReplayCliError(`verify found ${r.problems.length} problem(s) in ${r.streams} streams, ${r.events} events`);
    });

  cli
    .command('export')
    .argument('<id>', 'a VM id')
    .description("write the VM's incident bundle: its events, its partition's, every effect and every try, as JSON lines")
    .option('--out <file>', 'write to this file instead of stdout')
    .action(async (id: string, o) => {
      await download(base(), `/v1/vms/${encodeURIComponent(id)}/export`, o.out);
      if (o.out !== undefined) process.stderr.write(`wrote ${o.out}\n`);
    });
}
