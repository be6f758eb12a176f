/**
 * The fleet as operators run it (Postgres): three `gpuvm agent` processes on three simulated hosts
 * of different boards and two `gpuvm serve --no-agent` API nodes, all on one database. Random creates
 * and deletes of every size from both API nodes, while one agent is killed (-9) mid-lifecycle and
 * restarted, another is stopped (SIGSTOP) past the heartbeat limit and continued, and a third is
 * cordoned and drained under load. After the run: every host at rest as its log says, `verify`
 * clean, and no GPU module ever claimed by two partitions at once, read from the whole log.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { partitionHoldsClaim } from '../machines/index.ts';
import { Fmpm } from '../src/host/fmpm.ts';
import { Qemu } from '../src/host/qemu.ts';
import { Sysfs } from '../src/host/sysfs.ts';
import { mulberry32 as rng } from '../src/seeded-random.ts';
import { loadSimHost, stopSimKernel } from '../src/host/sim/sim-host.ts';
import { openDb, type Db } from '../src/store/db.ts';
import { freePort, http } from './support/child.ts';
import { freshDatabaseUrl, tempDir, usingPostgres, waitUntil } from './support/env.ts';

const BIN = fileURLToPath(new URL('../bin/gpuvm.js', import.meta.url));
const HEARTBEAT_MS = 250;
// Above the event-loop stalls of five node processes and three simulated kernels on CI's two cores.
const SILENT_MS = 4000;
const HOSTS = [
  { id: 'fleet-b200', board: 'b200' },
  { id: 'fleet-h100', board: 'h100' },
  { id: 'fleet-b300', board: 'b300' },
] as const;

const ENV = {
  GPUVM_POWERDOWN_TIMEOUT_MS: '300',
  GPUVM_BACKOFF_BASE_MS: '20',
  GPUVM_BACKOFF_MAX_MS: '200',
  GPUVM_POLL_MS: '200',
  GPUVM_MONITOR_INTERVAL_MS: '100',
  GPUVM_VM_MEMORY_MIB: '64',
  GPUVM_AGENT_HEARTBEAT_MS: String(HEARTBEAT_MS),
  GPUVM_AGENT_SILENT_MS: String(SILENT_MS),
  // A killed agent's leases come back to its successor at once (its worker is seen dead), whatever their length.
  GPUVM_LEASE_MS: '20000',
  GPUVM_EFFECT_MAX_ATTEMPTS: '8',
  GPUVM_LOG_LEVEL: 'info',
};

interface Proc {
  name: string;
  proc: ChildProcess;
  out: () => string;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

function spawnGpuvm(name: string, args: string[], databaseUrl: string): Proc {
  const env: Record<string, string> = { ...(process.env as Record<string, string>), ...ENV, DATABASE_URL: databaseUrl };
  const proc = spawn(process.execPath, [BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (d) => (out = (out + d).slice(-200_000)));
  proc.stderr!.on('data', (d) => (out = (out + d).slice(-200_000)));
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  return {
    name,
    proc,
    out: () => out,
    async kill(signal = 'SIGKILL') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await exited;
    },
  };
}


const procs: Proc[] = [];
const dirs: string[] = [];
let dropDb: (() => Promise<void>) | null = null;
let db: Db | null = null;

afterAll(async () => {
  for (const p of procs) p.proc.kill('SIGCONT');
  for (const p of procs) await p.kill('SIGKILL');
  for (const [i, h] of HOSTS.entries()) {
    const dir = dirs[i];
    if (!dir) continue;
    const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot: join(dir, 'run', h.id), accel: 'tcg' });
    for (const q of await qemu.running().catch(() => [])) await qemu.terminate(q.vmId).catch(() => {});
    await stopSimKernel(join(dir, 'sim', h.id)).catch(() => {});
  }
  await db?.close();
  await dropDb?.();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

describe.skipIf(!usingPostgres)('a fleet of 3 agent processes and 2 API nodes on one Postgres', () => {
  it('places, survives kill -9, SIGSTOP past the heartbeat limit, cordon and drain, and ends at rest with a clean log', async () => {
    const seed = Number(process.env.GPUVM_FLEET_SEED ?? Math.floor(Math.random() * 2 ** 31));
    const random = rng(seed);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)]!;
    const notes: string[] = [`seed ${seed}`];
    const note = (s: string) => notes.push(`${new Date().toISOString().slice(11, 23)} ${s}`);
    const fresh = await freshDatabaseUrl();
    dropDb = fresh.drop;
    const url = fresh.url!;

    const agentArgs = (i: number) => ['agent', '--host-id', HOSTS[i]!.id, '--sim-board', HOSTS[i]!.board, '--data-dir', dirs[i]!];
    for (const [i, h] of HOSTS.entries()) {
      dirs[i] = tempDir('gpuvm-fa-');
      procs[i] = spawnGpuvm(`agent ${h.id}`, agentArgs(i), url);
    }
    const apis: string[] = [];
    for (let i = 0; i < 2; i++) {
      const port = await freePort();
      dirs.push(tempDir('gpuvm-fapi-'));
      procs.push(spawnGpuvm(`api ${i}`, ['serve', '--no-agent', '--port', String(port), '--data-dir', dirs.at(-1)!], url));
      apis.push(`http://127.0.0.1:${port}`);
    }
    const api = (method: string, path: string, body?: unknown, node = pick(apis)) => http<any>(node, method, path, body);
    const failWith = (what: string) => new Error(`${what}\n${notes.join('\n')}\n${procs.map((p) => `--- ${p.name}\n${p.out().slice(-3000)}`).join('\n')}`);
    const hostsNow = async () => (await api('GET', '/v1/hosts')).body.hosts as { id: string; state: string; availability: string }[];

    try {
      await waitUntil('every host ready on both API nodes', async () => {
        for (const node of apis) {
          const r = await http<any>(node, 'GET', '/v1/hosts').catch(() => null);
          if (!r || r.status !== 200 || r.body.hosts.length !== 3 || r.body.hosts.some((h: any) => h.availability !== 'ready')) return false;
        }
        return true;
      }, 90_000, 200);
      note('fleet ready');

      const vms = new Map<string, { host: string; gpus: number }>();
      const createdOn = (vm: any) => vms.set(vm.id, { host: vm.host_id, gpus: vm.gpu_count });
      const placedWhile: { vm: string; host: string; excluded: string[] }[] = [];
      /** One random step of load: a create of any size (sometimes pinned to a board), or a delete. */
      /** VMs a phase watches: the load leaves them alone. */
      const kept = new Set<string>();
      const step = async (excluded: string[] = []) => {
        const live = [...vms.keys()].filter((id) => !kept.has(id));
        if (live.length > 0 && random() < 0.4) {
          const id = pick(live);
          const r = await api('DELETE', `/v1/vms/${id}`);
          if (r.status === 202) vms.delete(id);
          note(`delete ${id}: ${r.status}`);
          return;
        }
        const gpus = pick([1, 1, 1, 2, 2, 4, 8]);
        const board = random() < 0.2 ? pick(['b200', 'h100', 'b300']) : undefined;
        const r = await api('POST', '/v1/vms', { gpus, ...(board ? { board } : {}) });
        if (r.status === 202) {
          createdOn(r.body);
          placedWhile.push({ vm: r.body.id, host: r.body.host_id, excluded });
        } else if (r.status !== 409 && r.status !== 503) throw failWith(`create answered ${r.status}: ${JSON.stringify(r.body)}`);
        note(`create ${gpus}${board ? ` on ${board}` : ''}: ${r.status} ${r.status === 202 ? `${r.body.id} on ${r.body.host_id}` : r.body.error.code}`);
      };
      /** Deletes the VMs on `host` until it can take a VM of `gpus` (the load may have filled it). */
      const makeRoom = async (host: string, gpus: number) => {
        for (const [id, v] of vms) {
          if (v.host !== host) continue;
          await api('DELETE', `/v1/vms/${id}`);
          vms.delete(id);
        }
        await waitUntil(`room for ${gpus} GPU(s) on ${host}`, async () => {
          const c = (await api('GET', '/v1/capacity')).body.hosts.find((h: any) => h.hostId === host);
          return c && c.placeable[gpus] > 0;
        }, 60_000, 200);
      };
      const load = async (n: number, excluded: string[] = []) => {
        for (let i = 0; i < n; i++) {
          await step(excluded);
          await new Promise((r) => setTimeout(r, 50 + random() * 150));
        }
      };

      // 1. Load.
      await load(25);

      // 2. kill -9 an agent mid-lifecycle, then restart it: its successor (a new epoch) finishes the work.
      const victim = 0;
      await makeRoom(HOSTS[victim].id, 2);
      const pinned = await api('POST', '/v1/vms', { gpus: 2, host: HOSTS[victim].id });
      expect(pinned.status, JSON.stringify(pinned.body)).toBe(202);
      createdOn(pinned.body);
      kept.add(pinned.body.id);
      await new Promise((r) => setTimeout(r, random() * 400));
      await procs[victim]!.kill('SIGKILL');
      note(`killed agent ${HOSTS[victim].id} (-9) with ${pinned.body.id} ${(await api('GET', `/v1/vms/${pinned.body.id}`)).body.state}`);
      await load(5);
      procs[victim] = spawnGpuvm(`agent ${HOSTS[victim].id} (restarted)`, agentArgs(victim), url);
      await waitUntil(`${pinned.body.id} running after the restart`, async () => {
        const s = (await api('GET', `/v1/vms/${pinned.body.id}`)).body.state;
        if (s === 'failed' || s === 'crashed') throw failWith(`${pinned.body.id} ended ${s} after the agent's restart`);
        return s === 'running';
      }, 60_000, 200);
      note('restarted agent finished the lifecycle');

      // 3. SIGSTOP an agent past the heartbeat limit: its host is unreachable, nothing is placed there,
      //    its VMs show unknown; SIGCONT: it reconciles and is back.
      const stopped = 1;
      const stoppedHost = HOSTS[stopped].id;
      await makeRoom(stoppedHost, 1);
      const onStopped = await api('POST', '/v1/vms', { gpus: 1, host: stoppedHost });
      expect(onStopped.status, JSON.stringify(onStopped.body)).toBe(202);
      createdOn(onStopped.body);
      kept.add(onStopped.body.id);
      await waitUntil(`${onStopped.body.id} running`, async () => (await api('GET', `/v1/vms/${onStopped.body.id}`)).body.state === 'running', 60_000, 100);
      procs[stopped]!.proc.kill('SIGSTOP');
      note(`SIGSTOP agent ${stoppedHost}`);
      await waitUntil(`${stoppedHost} unreachable`, async () => (await hostsNow()).find((h) => h.id === stoppedHost)?.availability === 'unreachable', SILENT_MS * 10, 100);
      for (const node of apis) {
        const vm = (await http<any>(node, 'GET', `/v1/vms/${onStopped.body.id}`)).body;
        expect([vm.status, vm.state]).toEqual(['unknown', 'running']);
        const refused = await http<any>(node, 'POST', '/v1/vms', { gpus: 1, host: stoppedHost });
        expect(refused.status).toBe(409);
        expect(refused.body.error.message).toMatch(new RegExp(`unreachable: ${stoppedHost}`));
      }
      await load(10, [stoppedHost]);
      procs[stopped]!.proc.kill('SIGCONT');
      note(`SIGCONT agent ${stoppedHost}`);
      await waitUntil(`${stoppedHost} back`, async () => {
        const vm = (await api('GET', `/v1/vms/${onStopped.body.id}`)).body;
        return vm.status === 'running' && (await hostsNow()).find((h) => h.id === stoppedHost)?.availability === 'ready';
      }, 30_000, 100);
      const back = await db_events(url, `host:${stoppedHost}`, ['AGENT_SILENT', 'AGENT_BACK']);
      expect(back.slice(-2).map((e) => `${e.type} by ${e.actor}`)).toEqual(['AGENT_SILENT by gpuvm:fleet-watch', 'AGENT_BACK by gpuvm:agent']);

      kept.clear();

      // 4. Cordon one host and drain another during load.
      const cordoned = HOSTS[2].id;
      expect((await api('POST', `/v1/hosts/${cordoned}/cordon`, { reason: 'fleet test' })).body.host.state).toBe('cordoned');
      await load(10, [cordoned]);
      const drained = HOSTS[0].id;
      const drain = await api('POST', `/v1/hosts/${drained}/drain`, { deleteVms: true, reason: 'fleet test' });
      expect(drain.status, JSON.stringify(drain.body)).toBe(200);
      for (const id of drain.body.deletedVms) vms.delete(id);
      note(`drain ${drained}: deleting ${drain.body.deletedVms.join(', ')}`);
      await load(10, [cordoned, drained]);
      await waitUntil(`${drained} in maintenance`, async () => (await hostsNow()).find((h) => h.id === drained)?.state === 'maintenance', 60_000, 200);
      for (const h of [cordoned, drained]) expect((await api('POST', `/v1/hosts/${h}/uncordon`)).body.host.state).toBe('ready');
      await load(10);

      // Nothing was placed on a host while it was excluded (unreachable, cordoned, draining).
      expect(placedWhile.filter((p) => p.excluded.includes(p.host))).toEqual([]);

      // 5. Everything deleted; every VM ends deleted (none failed).
      for (const id of vms.keys()) await api('DELETE', `/v1/vms/${id}`);
      await waitUntil('every VM deleted', async () => (await api('GET', '/v1/vms')).body.vms.length === 0, 120_000, 250);
      const all = (await api('GET', '/v1/vms?all=true')).body.vms as any[];
      expect(all.filter((v) => v.state !== 'deleted').map((v) => `${v.id} ${v.state} ${v.reason}`)).toEqual([]);
      note(`${all.length} VMs over the run`);
      expect(all.length).toBeGreaterThan(20);
      expect(new Set(all.map((v) => v.host_id)).size).toBe(3);

      // 6. At rest, each host as its log says: no partition active, every GPU on nvidia, no QEMU, no claim.
      db = await openDb({ databaseUrl: url });
      await waitUntil('no claim left', async () => (await db!.kysely.selectFrom('gpu_claims').select('module_id').execute()).length === 0, 30_000, 200);
      for (const [i, h] of HOSTS.entries()) {
        const sim = await loadSimHost(join(dirs[i]!, 'sim', h.id));
        const active = (await new Fmpm({ bin: sim.fmpmBin }).list()).partitions.filter((p) => p.isActive).map((p) => p.partitionId);
        expect(active, `${h.id} active partitions`).toEqual([]);
        const sysfs = new Sysfs({ root: sim.sysfsRoot });
        for (const g of sim.gpus) expect(await sysfs.driverOf(g.pciAddress), `${h.id} ${g.pciAddress}`).toBe('nvidia');
        const qemu = new Qemu({ bin: 'qemu-system-x86_64', runRoot: join(dirs[i]!, 'run', h.id), accel: 'tcg' });
        expect((await qemu.running()).map((q) => q.vmId), `${h.id} QEMUs`).toEqual([]);
      }

      // 7. verify: every stream refolds to its projection, every invariant of the log holds.
      const verify = await api('POST', '/v1/verify');
      expect(verify.body.problems, JSON.stringify(verify.body.problems)).toEqual([]);
      expect(verify.body.ok).toBe(true);

      // 8. No GPU module held by two partitions at once, fleet-wide, over the whole log.
      const { rows } = await db.kysely
        .selectFrom('events')
        .innerJoin('streams', 'streams.stream_id', 'events.stream_id')
        .select(['events.stream_id', 'events.state_before', 'events.state_after', 'streams.context'])
        .where('events.stream_id', 'like', 'partition:%')
        .orderBy('events.position')
        .execute()
        .then((r) => ({ rows: r }));
      const held = new Map<string, string>();
      let claims = 0;
      for (const e of rows) {
        const ctx = e.context as { hostId: string; gpus: { moduleId: number }[] };
        const before = e.state_before !== null && partitionHoldsClaim(e.state_before as string);
        const after = partitionHoldsClaim(e.state_after as string);
        for (const g of ctx.gpus) {
          const key = `${ctx.hostId}/${g.moduleId}`;
          if (!before && after) {
            expect(held.get(key), `module ${key} claimed by ${e.stream_id} while ${held.get(key)} held it`).toBeUndefined();
            held.set(key, e.stream_id);
            claims++;
          } else if (before && !after) held.delete(key);
        }
      }
      expect(held.size).toBe(0);
      expect(claims).toBeGreaterThan(20);
      note(`${claims} module claims over the log, none overlapping`);
      console.log(notes.join('\n'));
    } catch (err) {
      if (err instanceof Error && !err.message.includes('--- agent')) throw failWith(err.message);
      throw err;
    }
  }, 420_000);
});

async function db_events(url: string, streamId: string, types: string[]): Promise<{ type: string; actor: string }[]> {
  const d = await openDb({ databaseUrl: url });
  try {
    return await d.kysely.selectFrom('events').select(['type', 'actor']).where('stream_id', '=', streamId).where('type', 'in', types).orderBy('position').execute();
  } finally {
    await d.close();
  }
}
