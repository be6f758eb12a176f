/**
 * Writes test/fixtures/histories/<scenario>.jsonl: the whole log of a fresh service after one
 * lifecycle scenario on the simulated host, as today's code writes it. test/history-fixtures.test.ts
 * replays them through today's machines, so a machine change that folds old histories differently
 * fails CI. Run once when a machine version is added, and commit the output:
 *
 *   npx tsx test/support/write-history-fixtures.ts [scenario …]
 *
 * Each file: one `meta` line, every event in commit-safe log order (`event`), every outbox row
 * (`effect`: id, stream, type, params) and every stream's final snapshot (`snapshot`).
 */
import { appendFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LOG_START, readLog } from '../../src/store/events.ts';
import { loadSimHost, writeFaults } from '../../src/host/sim/sim-host.ts';
import { startTestService, waitUntil, type TestService } from './env.ts';

export const FIXTURES_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'histories');

type Scenario = { description: string; run: (t: TestService) => Promise<void> };

const simRoot = (t: TestService) => join(t.dataDir, 'sim', t.service.host.hostId);
const until = (t: TestService, id: string, state: string) =>
  waitUntil(`${id} to be ${state}`, async () => (await t.service.vms.get(id)).state === state, 60_000);

async function api(t: TestService, method: string, path: string, body?: object): Promise<unknown> {
  const res = await fetch(t.service.url + path, { method, headers: body ? { 'content-type': 'application/json' } : {}, body: body ? JSON.stringify(body) : undefined });
  const answer = await res.json();
  if (!res.ok) throw new Error(`${method} ${path} answered ${res.status}: ${JSON.stringify(answer)}`);
  return answer;
}

export const SCENARIOS: Record<string, Scenario> = {
  normal: {
    description: 'a 2-GPU VM created, running, deleted',
    run: async (t) => {
      const vm = await t.service.vms.create({ gpus: 2, name: 'normal', actor: 'fixture' });
      await until(t, vm.id, 'running');
      await t.service.vms.delete(vm.id, 'fixture');
      await until(t, vm.id, 'deleted');
    },
  },
  'activation-failure': {
    description: 'fmpm -a fails on every partition: the partition unwinds, the VM fails with the reason, then is deleted',
    run: async (t) => {
      await writeFaults(simRoot(t), { fmpm: { activateFails: Object.fromEntries(Array.from({ length: 15 }, (_, i) => [String(i + 1), -24])) } });
      const vm = await t.service.vms.create({ gpus: 1, actor: 'fixture' });
      await until(t, vm.id, 'failed');
      await writeFaults(simRoot(t), { fmpm: {} });
      await t.service.vms.delete(vm.id, 'fixture');
      await until(t, vm.id, 'deleted');
    },
  },
  'qemu-crash': {
    description: 'a 4-GPU VM whose QEMU is killed: crashed, partition returned, then deleted',
    run: async (t) => {
      const vm = await t.service.vms.create({ gpus: 4, actor: 'fixture' });
      await until(t, vm.id, 'running');
      const { pid } = await t.service.host.qemu.status(vm.id);
      process.kill(pid!, 'SIGKILL');
      await until(t, vm.id, 'crashed');
      await t.service.vms.delete(vm.id, 'fixture');
      await until(t, vm.id, 'deleted');
    },
  },
  'delete-while-provisioning': {
    description: 'one VM deleted while provisioning, another while starting (twice)',
    run: async (t) => {
      const a = await t.service.vms.create({ gpus: 1, actor: 'fixture' });
      await t.service.vms.delete(a.id, 'fixture');
      const b = await t.service.vms.create({ gpus: 2, actor: 'fixture' });
      await until(t, b.id, 'starting');
      await t.service.vms.delete(b.id, 'fixture');
      await t.service.vms.delete(b.id, 'fixture');
      await until(t, a.id, 'deleted');
      await until(t, b.id, 'deleted');
    },
  },
  quarantine: {
    description: 'partition 8 fails twice and is quarantined, then cleared; a GPU with an Xid is quarantined, then cleared',
    run: async (t) => {
      await writeFaults(simRoot(t), { fmpm: { activateFails: { '8': -24 } } });
      for (let i = 0; i < 2; i++) {
        const vm = await t.service.vms.create({ gpus: 1, actor: 'fixture' });
        await until(t, vm.id, 'failed');
        await t.service.vms.delete(vm.id, 'fixture');
        await until(t, vm.id, 'deleted');
      }
      await writeFaults(simRoot(t), { fmpm: {} });
      await api(t, 'POST', `/v1/hosts/${t.service.host.hostId}/clear-quarantine`, { partitionId: 8 });

      const gpu = (await loadSimHost(simRoot(t))).gpus[2]!;
      const [domain, bus, dev] = gpu.pciAddress.split(/[:.]/);
      appendFileSync(
        join(simRoot(t), 'var', 'log', 'kern.log'),
        `Nov 23 03:12:01 hgx kernel: NVRM: Xid (PCI:${domain}:${bus}:${dev}): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n`,
      );
      await t.service.health.check();
      await api(t, 'POST', `/v1/hosts/${t.service.host.hostId}/clear-quarantine`, { moduleId: gpu.moduleId });

      const vm = await t.service.vms.create({ gpus: 1, actor: 'fixture' });
      await until(t, vm.id, 'running');
      await t.service.vms.delete(vm.id, 'fixture');
      await until(t, vm.id, 'deleted');
    },
  },
  drift: {
    description: 'partition 5 activated by hand, module 6 left on vfio-pci under a stray QEMU: reconciliation repairs all three',
    run: async (t) => {
      const { host } = t.service;
      await t.service.reconciler.reconcile(); // the start-up pass, done before the drift is made
      const gpu6 = (await loadSimHost(simRoot(t))).gpus.find((g) => g.moduleId === 6)!;
      await host.fmpm.activate(5);
      await host.sysfs.bindGroupToVfio(gpu6.pciAddress);
      await host.qemu.start({ vmId: 'vm-stray00001', memoryMiB: 64, vcpus: 1, gpus: [gpu6.pciAddress], gpuDevice: host.gpuDevice });
      await t.service.reconciler.reconcile();
      const db = t.service.db.kysely;
      await waitUntil('repairs done', async () => (await db.selectFrom('partitions').select('state').where('state', 'in', ['repairing', 'unrepaired']).execute()).length === 0, 30_000);
    },
  },
};

/** Runs one scenario in a fresh service and returns its log as JSON lines. */
export async function recordScenario(name: string): Promise<string> {
  const scenario = SCENARIOS[name];
  if (!scenario) throw new Error(`no scenario ${JSON.stringify(name)}; known: ${Object.keys(SCENARIOS).join(', ')}`);
  const t = await startTestService();
  try {
    await scenario.run(t);
    const db = t.service.db.kysely;
    // At rest: nothing in flight (a powerdown timer may still be due; it changes nothing once it fires).
    await waitUntil('the outbox to settle', async () => (await db.selectFrom('effects').select('id').where('status', 'in', ['pending', 'running']).execute()).length === 0, 30_000);
    const lines: unknown[] = [{ kind: 'meta', scenario: name, description: scenario.description, writtenBy: 'test/support/write-history-fixtures.ts' }];
    for (let cursor = LOG_START; ; ) {
      const page = await readLog(db, cursor, 1000);
      if (page.events.length === 0) break;
      cursor = page.next;
      for (const e of page.events) lines.push({ kind: 'event', ...e, recordedAt: e.recordedAt.toISOString() });
    }
    for (const e of await db.selectFrom('effects').select(['id', 'stream_id', 'type', 'params']).orderBy('id').execute()) {
      lines.push({ kind: 'effect', id: e.id, streamId: e.stream_id, type: e.type, params: e.params });
    }
    for (const s of await db.selectFrom('streams').selectAll().orderBy('stream_id').execute()) {
      lines.push({ kind: 'snapshot', streamId: s.stream_id, machine: s.machine, machineVersion: s.machine_version, version: s.version, state: s.state, context: s.context });
    }
    return lines.map((l) => JSON.stringify(l)).join('\n') + '\n';
  } finally {
    await t.cleanup();
  }
}

async function main(names: string[]): Promise<void> {
  mkdirSync(FIXTURES_DIR, { recursive: true });
  for (const name of names.length ? names : Object.keys(SCENARIOS)) {
    const text = await recordScenario(name);
    writeFileSync(join(FIXTURES_DIR, `${name}.jsonl`), text);
    process.stdout.write(`${name}: ${text.split('\n').length - 1} lines\n`);
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main(process.argv.slice(2));
