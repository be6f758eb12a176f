/**
 * The `gpuvm` command. `serve` runs the service; every other command is a client of its HTTP API
 * (embedded PGlite admits one process, so the CLI never opens the database itself — except
 * `migrate`, which is for a stopped service or a shared Postgres).
 * Errors print one line and exit 1; read commands take --json.
 */
import { Command, CommanderError } from 'commander';
import { HOST_ID_PATTERN, loadConfig, type Config } from '../config.ts';
import { migrate, openDb } from '../store/db.ts';
import { lockDataDir } from '../store/data-dir.ts';
import type { VmRow } from '../store/projections.ts';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { userInfo } from 'node:os';
import { randomUUID } from 'node:crypto';
import { duration, table, time } from './format.ts';
import { registerDoctor } from './doctor.ts';
import { registerReplayCommands } from './replay.ts';
import { registerHostCommands } from './hosts.ts';
import { SIM_BOARDS, type SimBoard } from '../host/sim/sim-host.ts';

class CliError extends Error {}

function serviceUrl(opts: { url?: string }): string {
  return (opts.url ?? process.env.GPUVM_URL ?? `http://127.0.0.1:${process.env.GPUVM_PORT ?? 7070}`).replace(/\/+$/, '');
}

class ServiceError extends CliError {
  constructor(
    message: string,
    readonly status: number | null,
    readonly retryAfterMs: number | null = null,
  ) {
    super(message);
  }
}

async function call<T>(base: string, method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<T> {
  let res: Response;
  try {
    res = await fetch(base + path, {
      method,
      headers: { ...(body === undefined ? {} : { 'content-type': 'application/json' }), 'x-gpuvm-actor': `cli:${process.env.USER ?? userInfo().username}`, ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ServiceError(`cannot reach the gpuvm service at ${base} (is \`gpuvm serve\` running? set --url or GPUVM_URL)`, null);
  }
  const text = await res.text();
  let parsed: any;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    throw new ServiceError(`the service at ${base} answered ${res.status} with something that is not JSON`, res.status);
  }
  if (!res.ok) {
    const retryAfter = Number(res.headers.get('retry-after'));
    throw new ServiceError(parsed?.error?.message ?? `the service answered ${res.status}`, res.status, Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : null);
  }
  return parsed as T;
}

/**
 * A create, sent with an Idempotency-Key and sent again with the same key when its answer may have
 * been lost (no answer, a 5xx) or the service is starting (503): the service returns the VM that key
 * made, so a retry never makes a second VM.
 */
async function createWithRetry<T>(base: string, path: string, body: unknown, timeoutMs = 30_000): Promise<T> {
  const key = randomUUID();
  const deadline = Date.now() + timeoutMs;
  for (let pause = 250; ; pause = Math.min(pause * 2, 2000)) {
    try {
      return await call<T>(base, 'POST', path, body, { 'idempotency-key': key });
    } catch (err) {
      const retryable = err instanceof ServiceError && (err.status === null || err.status >= 500);
      const wait = (err instanceof ServiceError && err.retryAfterMs) || pause;
      if (!retryable || Date.now() + wait > deadline) throw err;
      if (err.status === 503) process.stderr.write(`${err.message}\n`);
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}

/** A VM as the API sends it: the projection row, its timestamps as ISO strings. */
type VmJson = Omit<VmRow, 'created_at' | 'updated_at'> & { created_at: string; updated_at: string; status?: string };

const print = (s: string): void => void process.stdout.write(s + '\n');
const json = (v: unknown): void => print(JSON.stringify(v, null, 2));

function vmTable(vms: VmJson[]): string {
  return table(
    ['ID', 'NAME', 'STATE', 'HOST', 'GPUS', 'PARTITION', 'MODULES', 'CREATED'],
    vms.map((v) => [v.id, v.name, stateOf(v), v.host_id, v.gpu_count, v.partition_id, v.gpus.map((g) => g.moduleId).join(','), time(v.created_at)]),
  );
}

/** The VM's state, or `unknown (last <state>)` while its host's agent is unheard. */
function stateOf(v: VmJson): string {
  return v.status === 'unknown' ? `unknown (last ${v.state}; host unreachable)` : v.state;
}

function vmDetail(v: VmJson): string {
  const lines = [
    `id:         ${v.id}`,
    `name:       ${v.name}`,
    `state:      ${stateOf(v)}${v.reason ? ` (${v.reason})` : ''}`,
    `host:       ${v.host_id}`,
    `partition:  ${v.partition_id}`,
    `qemu pid:   ${v.qemu_pid ?? '-'}`,
    `created:    ${time(v.created_at)}`,
    `updated:    ${time(v.updated_at)}`,
    `gpus:`,
    ...v.gpus.map((g, i) => `  ${i}: module ${g.moduleId}  ${g.pciAddress}`),
  ];
  return lines.join('\n');
}

/** Waits until the VM reaches one of `states`, printing each state it passes through (long polls: no sleep between steps). */
async function waitFor(base: string, id: string, states: string[], timeoutMs: number): Promise<VmJson> {
  const deadline = Date.now() + timeoutMs;
  let vm = await call<VmJson>(base, 'GET', `/v1/vms/${id}`);
  let last = '';
  for (;;) {
    if (vm.state !== last) process.stderr.write(`${id}: ${vm.state}${vm.reason ? ` (${vm.reason})` : ''}\n`);
    last = vm.state;
    if (states.includes(vm.state)) return vm;
    const left = deadline - Date.now();
    if (left <= 0) throw new CliError(`timed out after ${timeoutMs / 1000}s waiting for ${id} to be ${states.join(' or ')} (now ${vm.state})`);
    const from = vm.state;
    do {
      const seconds = Math.max(1, Math.min(30, Math.ceil((deadline - Date.now()) / 1000)));
      vm = await call<VmJson>(base, 'GET', `/v1/vms/${id}?changedFrom=${encodeURIComponent(from)}&waitSeconds=${seconds}`);
    } while (vm.state === from && Date.now() < deadline);
  }
}

function simBoard(name: string): SimBoard {
  if (!(SIM_BOARDS as readonly string[]).includes(name)) throw new CliError(`unknown board ${JSON.stringify(name)}: one of ${SIM_BOARDS.join(', ')}`);
  return name as SimBoard;
}

/** `--sim-hosts N --sim-board b200,h100`, checked; undefined for the default single simulated host. */
function simFleetOption(count: string | undefined, boards: string | undefined): { count: number; boards: SimBoard[] } | undefined {
  if (count === undefined && boards === undefined) return undefined;
  const n = count === undefined ? 1 : Number(count);
  if (!Number.isInteger(n) || n < 1 || n > 64) throw new CliError(`--sim-hosts must be a whole number from 1 to 64 (got ${JSON.stringify(count)})`);
  return { count: n, boards: (boards ?? 'b200').split(',').map((b) => simBoard(b.trim())) };
}

/** Stops a running node on SIGINT or SIGTERM, then exits. */
function stopOnSignal(node: { log: { info(o: object, m: string): void }; stop(): Promise<void> }): void {
  const shutdown = async (signal: string) => {
    node.log.info({ signal }, 'stopping');
    await node.stop();
    process.exit(0);
  };
  process.once('SIGINT', () => void shutdown('SIGINT'));
  process.once('SIGTERM', () => void shutdown('SIGTERM'));
}

function program(): Command {
  const cli = new Command('gpuvm')
    .description('GPU VMs on NVIDIA HGX hosts in Shared NVSwitch Multitenancy')
    .option('--url <url>', 'the gpuvm service (default GPUVM_URL or http://127.0.0.1:7070)')
    .showHelpAfterError()
    .exitOverride();

  cli
    .command('serve')
    .description('run the service: the HTTP API and placement for every host in the database, and the agent of the local host (simulated host and embedded database by default)')
    .option('--port <port>', 'API port (default 7070)')
    .option('--listen <host>', 'API address (default 127.0.0.1)')
    .option('--data-dir <dir>', 'where the embedded database and the simulated host live (default ./.gpuvm)')
    .option('--database-url <url>', 'use this Postgres instead of the embedded database')
    .option('--host-id <id>', 'this host (default sim-b200)')
    .option('--config <file>', 'drive a real host described by this file (see docs/real-host.md); default: the simulated host')
    .option('--sim-hosts <n>', 'run a simulated fleet: n simulated hosts, named sim-<board>-<i>, each with its agent')
    .option('--sim-board <boards>', `board(s) of the simulated hosts, taken in turn: ${SIM_BOARDS.join(', ')} (default b200; e.g. b200,h100)`)
    .option('--no-agent', 'an API node only: the agents run elsewhere (`gpuvm agent`; needs Postgres)')
    .action(async (o) => {
      const { loadHostConfig } = await import('../host/host-config.ts');
      const hostConfig = o.config ? await loadHostConfig(o.config) : undefined;
      const config = loadConfig({ port: o.port, listenHost: o.listen, dataDir: o.dataDir, databaseUrl: o.databaseUrl, hostId: hostConfig?.hostId ?? o.hostId });
      const service = await import('../service.ts');
      let node: { log: { info(o: object, m: string): void }; stop(): Promise<void> };
      if (o.agent === false) {
        if (o.config || o.simHosts || o.simBoard) throw new CliError('--no-agent runs no host: drop --config, --sim-hosts and --sim-board');
        node = await service.startApiNode(config);
      } else {
        const simHosts = simFleetOption(o.simHosts, o.simBoard);
        if (simHosts && o.config) throw new CliError('--sim-hosts and --config exclude each other: a real host is one host');
        // Serves while it starts: health says `starting` and creates get 503 until the first reconciliation.
        node = await service.startService(config, { hostConfig, simHosts, waitReady: false });
      }
      stopOnSignal(node);
    });

  cli
    .command('agent')
    .description("run one host's agent: its effects, monitors, health checks and reconciliation, against a shared Postgres; serves nothing")
    .requiredOption('--host-id <id>', 'the host this agent runs (with --config, it must match the file)')
    .option('--config <file>', 'a real host described by this file (see docs/real-host.md); default: a simulated host')
    .option('--sim-board <board>', `the simulated host's board: ${SIM_BOARDS.join(', ')} (default b200)`)
    .option('--data-dir <dir>', 'where the simulated host lives (default ./.gpuvm)')
    .option('--database-url <url>', 'the fleet\'s Postgres (default DATABASE_URL)')
    .action(async (o) => {
      const { loadHostConfig } = await import('../host/host-config.ts');
      const hostConfig = o.config ? await loadHostConfig(o.config) : undefined;
      if (hostConfig && hostConfig.hostId !== o.hostId) throw new CliError(`--host-id ${o.hostId} does not match the config file's hostId ${hostConfig.hostId}`);
      if (hostConfig && o.simBoard) throw new CliError('--sim-board is for a simulated host; drop it with --config');
      const config = loadConfig({ dataDir: o.dataDir, databaseUrl: o.databaseUrl, hostId: o.hostId });
      if (!config.databaseUrl) {
        throw new CliError('gpuvm agent needs a shared Postgres (DATABASE_URL or --database-url): the embedded database serves one process, and `gpuvm serve` runs the local agent itself');
      }
      const board = o.simBoard === undefined ? undefined : simBoard(o.simBoard);
      const { startAgentNode } = await import('../service.ts');
      stopOnSignal(await startAgentNode(config, { hostConfig, sim: hostConfig ? undefined : { hostId: config.hostId, board } }));
    });

  cli
    .command('migrate')
    .description('apply database migrations (the service also does this at start)')
    .option('--data-dir <dir>')
    .option('--database-url <url>')
    .action(async (o) => {
      const config: Config = loadConfig({ dataDir: o.dataDir, databaseUrl: o.databaseUrl });
      // The embedded database lives in the data folder, which one gpuvm process holds at a time.
      const folder = config.databaseUrl ? null : lockDataDir(config.dataDir, 'migrate');
      try {
        const db = await openDb({ databaseUrl: config.databaseUrl, pgliteDir: join(config.dataDir, 'pglite') });
        try {
          const result = await migrate(db);
          const applied = result.results?.filter((r) => r.status === 'Success').map((r) => r.migrationName) ?? [];
          print(applied.length ? `applied: ${applied.join(', ')}` : 'database is up to date');
        } finally {
          await db.close();
        }
      } finally {
        folder?.release();
      }
    });

  cli
    .command('sim-down')
    .description('stop what the simulated hosts keep running after the service stops: their VMs (QEMU) and their kernel processes')
    .option('--data-dir <dir>')
    .option('--host-id <id>', 'only this simulated host (default: every one in the data folder)')
    .action(async (o) => {
      const config = loadConfig({ dataDir: o.dataDir, hostId: o.hostId });
      const { Qemu } = await import('../host/qemu.ts');
      const { stopSimKernel } = await import('../host/sim/sim-host.ts');
      const list = (dir: string) => {
        try {
          return readdirSync(dir);
        } catch {
          return [];
        }
      };
      const hostIds = o.hostId ? [config.hostId] : list(join(config.dataDir, 'sim')).filter((id) => HOST_ID_PATTERN.test(id));
      if (hostIds.length === 0) return print(`no simulated host in ${config.dataDir}`);
      for (const hostId of hostIds) {
        const runRoot = join(config.dataDir, 'run', hostId);
        const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot, accel: 'tcg' });
        for (const id of list(runRoot)) {
          let how: string;
          try {
            how = await qemu.terminate(id);
          } catch (err) {
            // e.g. its pidfile or /proc could not be read: left alone, said, and the others still stopped.
            print(`${id}: QEMU not stopped: ${(err as Error).message}`);
            continue;
          }
          if (how !== 'not-running') print(`${id}: QEMU stopped (${how})`);
        }
        await stopSimKernel(join(config.dataDir, 'sim', hostId));
        print(`simulated host ${hostId} is down`);
      }
    });

  registerDoctor(cli);
  registerReplayCommands(cli, { call, serviceUrl });

  const vm = cli.command('vm').description('create, list, show and delete VMs');

  vm.command('create')
    .description('create a VM with 1, 2, 4 or 8 GPUs')
    .requiredOption('--gpus <n>', '1, 2, 4 or 8')
    .option('--name <name>', 'a name (letters, digits, . _ -)')
    .option('--host <id>', 'only on this host')
    .option('--board <board>', 'only on hosts of this board: b200, b300, h100, h200')
    .option('--wait', 'wait until the VM runs (or fails), printing its progress')
    .option('--timeout <seconds>', 'with --wait', '300')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const base = serviceUrl(cli.opts());
      const gpus = Number(o.gpus);
      if (!Number.isInteger(gpus)) throw new CliError(`--gpus must be 1, 2, 4 or 8 (got ${JSON.stringify(o.gpus)})`);
      let created = await createWithRetry<VmJson>(base, '/v1/vms', {
        gpus,
        ...(o.name === undefined ? {} : { name: o.name }),
        ...(o.host === undefined ? {} : { host: o.host }),
        ...(o.board === undefined ? {} : { board: o.board }),
      });
      if (o.wait) {
        created = await waitFor(base, created.id, ['running', 'failed', 'crashed', 'deleted'], Number(o.timeout) * 1000);
        if (created.state !== 'running') throw new CliError(`VM ${created.id} ended ${created.state}: ${created.reason ?? 'no reason recorded'}`);
      }
      if (o.json) json(created);
      else print(o.wait ? `${created.id} running on ${created.host_id} (partition ${created.partition_id}, modules ${created.gpus.map((g) => g.moduleId).join(',')})` : `${created.id} ${created.state} on ${created.host_id}`);
    });

  vm.command('ls')
    .description('list VMs')
    .option('--all', 'include deleted VMs')
    .option('--host <id>', 'only the VMs on this host')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const query = new URLSearchParams({ ...(o.all ? { all: 'true' } : {}), ...(o.host ? { host: o.host } : {}) }).toString();
      const { vms } = await call<{ vms: VmJson[] }>(serviceUrl(cli.opts()), 'GET', `/v1/vms${query ? `?${query}` : ''}`);
      if (o.json) json(vms);
      else print(vms.length ? vmTable(vms) : 'no VMs');
    });

  vm.command('show')
    .argument('<id>')
    .description('show one VM')
    .option('--json', 'print JSON')
    .action(async (id, o) => {
      const v = await call<VmJson>(serviceUrl(cli.opts()), 'GET', `/v1/vms/${encodeURIComponent(id)}`);
      if (o.json) json(v);
      else print(vmDetail(v));
    });

  vm.command('rm')
    .argument('<id>')
    .description('delete a VM: power it down, stop QEMU, return its GPUs and partition')
    .option('--wait', 'wait until it is deleted, printing its progress')
    .option('--timeout <seconds>', 'with --wait', '300')
    .option('--json', 'print JSON')
    .action(async (id, o) => {
      const base = serviceUrl(cli.opts());
      let v = await call<VmJson>(base, 'DELETE', `/v1/vms/${encodeURIComponent(id)}`);
      if (o.wait) v = await waitFor(base, v.id, ['deleted', 'failed'], Number(o.timeout) * 1000);
      if (o.json) json(v);
      else print(`${v.id} ${v.state}`);
    });

  registerHostCommands(cli, { call, serviceUrl });

  cli
    .command('history')
    .argument('<id>', 'a VM id')
    .description('every event of a VM and its partition: time, type, state before → after, step durations, effect tries')
    .option('--json', 'print JSON')
    .action(async (id, o) => {
      const h = await call<any>(serviceUrl(cli.opts()), 'GET', `/v1/vms/${encodeURIComponent(id)}/history`);
      if (o.json) {
        json(h);
        return;
      }
      print(`VM ${h.vm.id} (${h.vm.name}) — ${h.vm.state}${h.vm.reason ? ` (${h.vm.reason})` : ''}\n`);
      print(
        table(
          ['TIME', 'STREAM', 'EVENT', 'FROM → TO', 'STEP', 'ACTOR'],
          h.events.map((e: any) => [time(e.at), e.stream, e.type, `${e.from ?? '∅'} → ${e.to}`, duration(e.stepMs), e.actor]),
        ),
      );
      print('\nEffects:');
      print(
        table(
          ['EFFECT', 'STREAM', 'STATUS', 'TRIES', 'DURATION', 'NOTE / LAST ERROR'],
          h.effects.map((e: any) => [
            e.type,
            e.stream,
            e.status,
            `${e.attempts}/${e.maxAttempts}`,
            e.tries.length ? duration(new Date(e.tries.at(-1).finishedAt).getTime() - new Date(e.tries.at(-1).startedAt).getTime()) : '',
            e.lastError ?? e.note ?? '',
          ]),
        ),
      );
      const failedTries = h.effects.flatMap((e: any) => e.tries.filter((t: any) => t.outcome !== 'ok').map((t: any) => ({ ...t, type: e.type })));
      if (failedTries.length) {
        print('\nFailed tries:');
        print(table(['EFFECT', 'TRY', 'AT', 'OUTCOME', 'ERROR'], failedTries.map((t: any) => [t.type, t.attempt, time(t.startedAt), t.outcome, t.error])));
      }
    });

  return cli;
}

async function main(argv: string[]): Promise<void> {
  try {
    await program().parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) process.exit(err.exitCode);
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`gpuvm: ${message.split('\n')[0]}\n`);
    if (process.env.GPUVM_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    process.exit(1);
  }
}

await main(process.argv);
