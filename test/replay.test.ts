/**
 * Incident replay, verify and export, on a real lifecycle on the simulated host: what the log says
 * a VM and its host looked like at a moment, that a tampered history is caught and named by stream
 * and event, and the same over HTTP and the CLI.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { sql, type Kysely } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostStream, machines, partitionStream, streamKind, vmStream } from '../machines/index.ts';
import { effectId } from '../src/engine/commands.ts';
import { decide } from '../src/engine/decide.ts';
import { exportIncident, type IncidentRecord } from '../src/engine/export.ts';
import { rebuildProjections, verifyProjections, type FoldedStream } from '../src/engine/rebuild.ts';
import { replayHost, replayVm } from '../src/engine/replay.ts';
import { formatProblem, verifyHistory, type HistoryProblem } from '../src/engine/verify.ts';
import { GpuvmError } from '../src/errors.ts';
import { migrate, openDb, type Db } from '../src/store/db.ts';
import { appendEvents, readCorrelated, readStream } from '../src/store/events.ts';
import type { StreamSnapshot, VmRow } from '../src/store/projections.ts';
import type { Database } from '../src/store/schema.ts';
import { hostPicture, type HostPicture } from './support/invariants.ts';
import { freshDatabaseUrl, startTestService, usingPostgres, waitUntil, type TestService } from './support/env.ts';

const BIN = fileURLToPath(new URL('../bin/gpuvm.js', import.meta.url));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let t: TestService;
let db: Kysely<Database>;
let vm: VmRow;
/** A moment while the VM ran, and what the host really looked like then. */
let t1: Date;
let atT1: HostPicture;

const until = (id: string, state: string) => waitUntil(`${id} to be ${state}`, async () => (await t.service.vms.get(id)).state === state, 60_000);
const hostId = () => t.service.host.hostId;
const summary = (ps: HistoryProblem[]) => ps.map((p) => [p.code, p.streamId, p.event?.version ?? null, p.event?.type ?? null]);

async function api(method: string, path: string): Promise<{ status: number; type: string; text: string; body: any }> {
  const res = await fetch(t.service.url + path, { method });
  const text = await res.text();
  let body: any = null;
  try {
    body = JSON.parse(text);
  } catch {}
  return { status: res.status, type: res.headers.get('content-type') ?? '', text, body };
}

async function gpuvm(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [BIN, '--url', t.service.url, ...args], { timeout: 60_000 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

/** An event row as stored, to put back exactly (position, transaction id and time included). */
async function storedEventRow(streamId: string, version: number) {
  const { rows } = await sql<Record<string, string | null>>`
    select position::text as position, stream_id, stream_version::text as stream_version, type, data::text as data,
           state_before::text as state_before, state_after::text as state_after, machine, machine_version::text as machine_version,
           causation_id, correlation_id, actor, recorded_at::text as recorded_at, tx_id::text as tx_id
    from events where stream_id = ${streamId} and stream_version = ${version}`.execute(db);
  return rows[0]!;
}

async function putBack(r: Record<string, string | null>): Promise<void> {
  await sql`insert into events (position, stream_id, stream_version, type, data, state_before, state_after, machine, machine_version,
                                causation_id, correlation_id, actor, recorded_at, tx_id)
            values (${r.position}::bigint, ${r.stream_id}, ${r.stream_version}::int, ${r.type}, ${r.data}::jsonb, ${r.state_before}::jsonb,
                    ${r.state_after}::jsonb, ${r.machine}, ${r.machine_version}::int, ${r.causation_id}, ${r.correlation_id}, ${r.actor},
                    ${r.recorded_at}::timestamptz, ${r.tx_id}::xid8)`.execute(db);
}

describe(`incident replay, verify and export (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    t = await startTestService();
    db = t.service.db.kysely;
    const created = await t.service.vms.create({ gpus: 2, name: 'incident', actor: 'test' });
    await until(created.id, 'running');
    vm = await t.service.vms.get(created.id);
    atT1 = await hostPicture(t.service);
    // Strictly after every event so far, at the millisecond precision times are compared at.
    await sleep(5);
    t1 = new Date();
    await sleep(5);
    await t.service.vms.delete(vm.id, 'test');
    await until(vm.id, 'deleted');
    // At rest: a due powerdown timer fires and changes nothing; nothing may move while history is tampered with.
    await waitUntil('the outbox to settle', async () => (await db.selectFrom('effects').select('id').where('status', 'in', ['pending', 'running']).execute()).length === 0);
  }, 120_000);
  afterAll(async () => {
    await t?.cleanup();
  });

  it('replays the VM and its partition as they were while it ran, and now', async () => {
    const then = await replayVm(db, vm.id, { time: t1 });
    expect(then.vm.state).toBe('running');
    expect(then.vm.context).toMatchObject({ vmId: vm.id, partitionId: vm.partition_id, qemuPid: expect.any(Number) });
    expect(then.vm.lastEvent.type).toBe('QEMU_STARTED');
    expect(then.partition?.streamId).toBe(partitionStream(hostId(), vm.partition_id));
    expect(then.partition?.state).toBe('ready');
    expect(then.partition?.context.vmId).toBe(vm.id);

    const now = await replayVm(db, vm.id, {});
    expect(now.vm.state).toBe('deleted');
    expect(now.partition?.state).toBe('free');
    expect(now.partition?.context.vmId).toBeNull();

    // By position: the partition's BOUND_VFIO commits with the PARTITION_READY it delivers to the VM,
    // so at its position the partition is ready and the VM already starting (never ready and still provisioning).
    const pEvents = await readStream(db, partitionStream(hostId(), vm.partition_id));
    const boundVfio = pEvents.find((e) => e.type === 'BOUND_VFIO')!;
    const atBind = await replayVm(db, vm.id, { position: boundVfio.position });
    expect([atBind.vm.state, atBind.vm.lastEvent.type, atBind.partition?.state]).toEqual(['starting', 'PARTITION_READY', 'ready']);

    // Before CREATE's transaction the VM did not exist: 404, saying when it was created. (The position
    // just below CREATE is its partition's CLAIM, in the same transaction: a replay there shows both.)
    const create = (await readStream(db, vmStream(vm.id)))[0]!;
    const txStart = (await sql<{ p: string }>`select min(position)::text as p from events where tx_id = ${create.txId}::xid8`.execute(db)).rows[0]!.p;
    const before = replayVm(db, vm.id, { position: String(BigInt(txStart) - 1n) });
    await expect(before).rejects.toBeInstanceOf(GpuvmError);
    await expect(before).rejects.toMatchObject({ status: 404, message: expect.stringMatching(new RegExp(`^no VM ${vm.id} at position \\d+: it was created at`)) });
    await expect(replayVm(db, 'vm-0000000000', {})).rejects.toMatchObject({ status: 404, message: 'no VM vm-0000000000' });
  });

  it('cuts a position replay at the end of the transaction that wrote the position, never inside one', async () => {
    const vmS = vmStream(vm.id);
    const pS = partitionStream(hostId(), vm.partition_id);
    const vmEvents = await readStream(db, vmS);
    const pEvents = await readStream(db, pS);
    // Transactions that wrote to both streams (the CLAIM with the CREATE, an outcome with the message it delivers).
    const shared = [...new Set(vmEvents.map((e) => e.txId))].filter((tx) => pEvents.some((e) => e.txId === tx));
    expect(shared.length).toBeGreaterThan(0);
    for (const tx of shared) {
      const { rows } = await sql<{ position: string }>`select position::text as position from events where tx_id = ${tx}::xid8 order by position`.execute(db);
      expect(rows.length, `transaction ${tx}`).toBeGreaterThan(1);
      const through = rows.at(-1)!.position;
      const upTo = (events: typeof vmEvents) => events.filter((e) => BigInt(e.txId) <= BigInt(tx)).at(-1)!.streamVersion;
      // Every position the transaction wrote replays the whole transaction, and none of later ones.
      for (const { position } of rows) {
        const r = await replayVm(db, vm.id, { position });
        expect([r.vm.version, r.partition?.version], `position ${position} of transaction ${tx}`).toEqual([upTo(vmEvents), upTo(pEvents)]);
        expect(r.at).toEqual({ time: null, position, through });
      }
      const h = await api('GET', `/v1/replay/vm/${vm.id}?position=${rows[0]!.position}`);
      expect(h.body.at.through).toBe(through);
    }
    const first = (await sql<{ p: string }>`select min(position)::text as p from events where tx_id = ${shared[0]}::xid8`.execute(db)).rows[0]!.p;
    const cli = await gpuvm('replay', 'vm', vm.id, '--position', first);
    expect(cli.code, cli.stderr).toBe(0);
    expect(cli.stdout).toMatch(/at position \d+ \(cut at the end of its transaction: through position \d+\)/);
    // A time cut is whole by transaction already: a statement's events share its now().
    const { rows: split } = await sql<{ n: string }>`select count(*)::text as n from (select tx_id from events group by tx_id having count(distinct recorded_at) > 1) x`.execute(db);
    expect(split[0]!.n).toBe('0');
  }, 60_000);

  it('replays the host: active partitions, GPU drivers and VMs then match what the host really showed', async () => {
    const then = await replayHost(db, hostId(), { time: t1 });
    expect(then.activePartitions).toEqual([{ partitionId: vm.partition_id, state: 'ready', vmId: vm.id, modules: expect.any(Array) }]);
    expect(then.activePartitions.map((p) => p.partitionId)).toEqual(atT1.activePartitions);
    expect(then.gpus).toHaveLength(8);
    for (const g of then.gpus) expect(g.driver, `module ${g.moduleId} ${g.pciAddress}`).toBe(atT1.drivers[g.pciAddress]);
    const held = then.gpus.filter((g) => g.vmId === vm.id);
    expect(held.map((g) => g.moduleId).sort()).toEqual(vm.gpus.map((g) => g.moduleId).sort());
    expect(held.every((g) => g.driver === 'vfio-pci' && g.partitionId === vm.partition_id)).toBe(true);
    expect(then.vms).toEqual([{ id: vm.id, state: 'running', partitionId: vm.partition_id }]);
    expect(then.quarantinedModules).toEqual({});

    const now = await replayHost(db, hostId(), {});
    expect(now.activePartitions).toEqual([]);
    expect(now.vms).toEqual([]);
    expect(now.gpus.every((g) => g.driver === 'nvidia' && g.vmId === null)).toBe(true);
    await expect(replayHost(db, 'no-such-host', {})).rejects.toMatchObject({ status: 404 });
  });

  it('verify finds nothing wrong in a healthy history', async () => {
    const report = await verifyHistory(db);
    expect(report.problems).toEqual([]);
    expect(report.streams).toBe(17); // host, 15 partitions, the VM
    expect(report.events).toBe(Number((await sql<{ n: string }>`select count(*)::text as n from events`.execute(db)).rows[0]!.n));
  });

  it('verify names the stream and event of a tampered projection row, event data, state_after, and a deleted event', async () => {
    const vmS = vmStream(vm.id);
    const pS = partitionStream(hostId(), vm.partition_id);
    const vmEvents = await readStream(db, vmS);
    const last = vmEvents.at(-1)!;
    expect([last.streamVersion, last.type]).toEqual([7, 'PARTITION_RELEASED']);

    // (a) a projection row
    await sql`update vms set state = 'running', reason = 'edited' where id = ${vm.id}`.execute(db);
    try {
      const { problems } = await verifyHistory(db);
      expect(summary(problems)).toEqual([['projection-mismatch', vmS, 7, 'PARTITION_RELEASED']]);
      expect(problems[0]!.event!.position).toBe(last.position);
      expect(formatProblem(problems[0]!)).toBe(
        `${vmS} v7 (position ${last.position}, PARTITION_RELEASED): vms row differs from the fold through v7: reason stored "edited", fold gives null; state stored "running", fold gives "deleted"`,
      );
    } finally {
      await sql`update vms set state = 'deleted', reason = null where id = ${vm.id}`.execute(db);
    }
    expect((await verifyHistory(db)).problems).toEqual([]);

    // (b) an event's data: the CLAIM names another VM. Its prepareGpus effect no longer matches the outbox.
    const claim = (await readStream(db, pS)).find((e) => e.type === 'CLAIM')!;
    await sql`update events set data = jsonb_set(data, '{vmId}', '"vm-zzzzzzzzzz"') where position = ${claim.position}::bigint`.execute(db);
    try {
      const { problems } = await verifyHistory(db);
      expect(summary(problems)).toEqual([['effect-mismatch', pS, claim.streamVersion, 'CLAIM']]);
      // Pages of 3 and 1 events split streams across pages: the same report.
      expect(await verifyHistory(db, { pageSize: 3 })).toEqual(await verifyHistory(db));
      expect(await verifyHistory(db, { pageSize: 1 })).toEqual(await verifyHistory(db));
      expect(problems[0]!.event!.position).toBe(claim.position);
      expect(problems[0]!.message).toContain('vm-zzzzzzzzzz');
    } finally {
      await sql`update events set data = jsonb_set(data, '{vmId}', ${JSON.stringify(vm.id)}::jsonb) where position = ${claim.position}::bigint`.execute(db);
    }

    // (b) an event's recorded state_after
    const started = vmEvents.find((e) => e.type === 'QEMU_STARTED')!;
    await sql`update events set state_after = '"failed"' where position = ${started.position}::bigint`.execute(db);
    try {
      const { problems } = await verifyHistory(db);
      expect(summary(problems)).toEqual([['state-mismatch', vmS, started.streamVersion, 'QEMU_STARTED']]);
      expect(problems[0]!.message).toBe('recorded state_after "failed" but replay gives "running"');
    } finally {
      await sql`update events set state_after = '"running"' where position = ${started.position}::bigint`.execute(db);
    }

    // (c) an event deleted from the middle of a stream: the next one names the gap
    const del = vmEvents.find((e) => e.type === 'DELETE')!;
    const after = vmEvents.find((e) => e.streamVersion === del.streamVersion + 1)!;
    const row = await storedEventRow(vmS, del.streamVersion);
    await sql`delete from events where position = ${del.position}::bigint`.execute(db);
    try {
      const { problems } = await verifyHistory(db);
      expect(summary(problems)).toEqual([['version-gap', vmS, after.streamVersion, after.type]]);
      expect(problems[0]!.event!.position).toBe(after.position);
      expect(problems[0]!.message).toBe(`version ${after.streamVersion} follows version ${del.streamVersion - 1}: version ${del.streamVersion} is missing`);
    } finally {
      await putBack(row);
    }
    expect((await verifyHistory(db)).problems).toEqual([]);
  });

  it('rebuilds the same on worker threads and from pages that split streams, and names the same differences', async () => {
    const inProcess = await verifyProjections(db, { workers: 0 });
    expect(inProcess.differences).toEqual([]);
    expect(inProcess.streams).toBe(17);
    // Pages of 3 events split streams and hold pages within one stream; pages of 1 change stream at a page edge.
    expect(await verifyProjections(db, { workers: 2, pageSize: 3 })).toEqual(inProcess);
    expect(await verifyProjections(db, { workers: 0, pageSize: 1 })).toEqual(inProcess);

    // Each stream's snapshot from the worker threads alone is decide()'s, applied event by event.
    const folded = new Map<string, FoldedStream>();
    const stats = await rebuildProjections(db, (f) => folded.set(f.streamId, f), { workers: 2, pageSize: 3, callerFolds: false });
    expect(stats).toMatchObject({ streams: 17, events: inProcess.events, workers: 2, foldedHere: 0 });
    expect(folded.size).toBe(17);
    for (const streamId of [vmStream(vm.id), partitionStream(hostId(), vm.partition_id), hostStream(hostId())]) {
      const events = await readStream(db, streamId);
      let snap = null as StreamSnapshot | null;
      for (const e of events) {
        const d = decide(streamId, snap, { ...e.data, type: e.type });
        if (d.kind !== 'changed') throw new Error(`${streamId} v${e.streamVersion} does not apply (${d.kind})`);
        snap = { streamId, kind: streamKind(streamId), machineVersion: e.machineVersion, version: e.streamVersion, state: d.stateAfter, context: d.context, createdAt: snap?.createdAt ?? e.recordedAt, updatedAt: e.recordedAt };
      }
      const f = folded.get(streamId)!;
      expect('error' in f).toBe(false);
      if ('error' in f) continue;
      expect(f.snapshot).toEqual(snap);
    }

    // A tampered row, and a stream that no longer folds: the same differences on either path.
    const pS = partitionStream(hostId(), vm.partition_id);
    const claim = (await readStream(db, pS)).find((e) => e.type === 'CLAIM')!;
    await sql`update vms set reason = 'edited' where id = ${vm.id}`.execute(db);
    await sql`update events set type = 'NOT_AN_EVENT' where position = ${claim.position}::bigint`.execute(db);
    try {
      const tampered = await verifyProjections(db, { workers: 0 });
      expect(tampered.differences.map((d) => [d.streamId, d.table])).toEqual([
        [pS, 'events'],
        [vmStream(vm.id), 'vms'],
      ]);
      expect(tampered.differences[0]!.rebuilt).toMatch(/NOT_AN_EVENT does not apply/);
      expect(await verifyProjections(db, { workers: 2, pageSize: 3, callerFolds: false })).toEqual(tampered);
    } finally {
      await sql`update events set type = 'CLAIM' where position = ${claim.position}::bigint`.execute(db);
      await sql`update vms set reason = null where id = ${vm.id}`.execute(db);
    }
    expect((await verifyProjections(db, { workers: 0 })).differences).toEqual([]);
  });

  it('exports the incident: every correlated event, every effect and every try, as records', async () => {
    const records: IncidentRecord[] = [];
    for await (const r of exportIncident(db, vm.id)) records.push(r);
    const events = records.filter((r) => r.kind === 'event');
    expect(events.map((e) => e.position)).toEqual((await readCorrelated(db, vm.id)).map((e) => e.position));
    expect(new Set(events.map((e) => e.streamId))).toEqual(new Set([vmStream(vm.id), partitionStream(hostId(), vm.partition_id)]));
    const effects = records.filter((r) => r.kind === 'effect');
    expect(effects.map((e) => e.type)).toEqual(expect.arrayContaining(['prepareGpus', 'activatePartition', 'bindVfio', 'startQemu', 'terminateQemu', 'bindHost', 'deactivatePartition', 'releasePartition']));
    // Each try follows its effect.
    let current: string | null = null;
    for (const r of records) {
      if (r.kind === 'effect') current = r.id;
      if (r.kind === 'attempt') expect(r.effectId).toBe(current);
    }
    const started = records.findIndex((r) => r.kind === 'effect' && r.type === 'startQemu');
    expect(records[started + 1]).toMatchObject({ kind: 'attempt', attempt: 1, outcome: 'ok' });
    await expect(exportIncident(db, 'vm-0000000000').next()).rejects.toMatchObject({ status: 404 });
  });

  it('serves replay, verify and export over HTTP, refusing bad parameters with 400 and unknown ids with 404', async () => {
    const r = await api('GET', `/v1/replay/vm/${vm.id}?at=${encodeURIComponent(t1.toISOString())}`);
    expect(r.status).toBe(200);
    expect([r.body.vm.state, r.body.partition.state]).toEqual(['running', 'ready']);
    const h = await api('GET', `/v1/replay/host/${hostId()}?at=${encodeURIComponent(t1.toISOString())}`);
    expect(h.status).toBe(200);
    expect(h.body.vms).toEqual([{ id: vm.id, state: 'running', partitionId: vm.partition_id }]);

    const bad: [string, number, RegExp][] = [
      [`/v1/replay/vm/${vm.id}?at=yesterday`, 400, /^at must be an ISO 8601 time with a zone/],
      [`/v1/replay/vm/${vm.id}?at=2025-02-30T00:00:00Z`, 400, /^at must be an ISO 8601 time/],
      [`/v1/replay/vm/${vm.id}?at=2025-01-02T03:04:05`, 400, /^at must be an ISO 8601 time with a zone/],
      [`/v1/replay/vm/${vm.id}?position=12a`, 400, /^position must be a log position/],
      [`/v1/replay/vm/${vm.id}?position=-1`, 400, /^position must be a log position/],
      [`/v1/replay/vm/${vm.id}?position=1&position=2`, 400, /^give position once/],
      [`/v1/replay/vm/${vm.id}?position=1&at=2025-01-02T03:04:05Z`, 400, /^give at or position, not both/],
      [`/v1/replay/vm/${vm.id}?when=now`, 400, /^unknown query parameter\(s\): when/],
      ['/v1/replay/vm/not-a-vm', 400, /^invalid VM id "not-a-vm"/],
      ['/v1/replay/vm/vm-0000000000', 404, /^no VM vm-0000000000$/],
      [`/v1/replay/vm/${vm.id}?position=1`, 404, new RegExp(`^no VM ${vm.id} at position 1: it was created at`)],
      ['/v1/replay/host/Not_A_Host', 400, /^invalid host id/],
      ['/v1/replay/host/no-such-host', 404, /^no host no-such-host$/],
      ['/v1/replay/host/sim-b200?at=1999-01-01T00:00:00Z', 404, /^host sim-b200 was not registered yet at 1999-01-01T00:00:00.000Z/],
      ['/v1/vms/vm-0000000000/export', 404, /^no VM vm-0000000000$/],
      ['/v1/vms/nope/export', 400, /^invalid VM id/],
    ];
    for (const [path, status, message] of bad) {
      const res = await api('GET', path);
      expect(res.status, path).toBe(status);
      expect(res.body?.error?.message, path).toMatch(message);
    }

    const v = await api('POST', '/v1/verify');
    expect(v.status).toBe(200);
    expect(v.body).toMatchObject({ ok: true, streams: 17, problems: [], lines: [] });

    // One verify at a time per process (it runs on a worker thread): a second one while it runs is 429.
    // The request thread stays free meanwhile: a health check answers while the worker loads and checks.
    const first = api('POST', '/v1/verify');
    await sleep(20);
    const [second, health] = await Promise.all([api('POST', '/v1/verify'), api('GET', '/v1/health')]);
    expect(second.status).toBe(429);
    expect(second.body).toEqual({ error: { code: 'busy', message: expect.stringMatching(/^a verify is already running/) } });
    expect(health.status).toBe(200);
    expect((await first).body).toMatchObject({ ok: true, streams: 17, problems: [] });
    expect((await api('POST', '/v1/verify')).status).toBe(200);

    const x = await api('GET', `/v1/vms/${vm.id}/export`);
    expect(x.status).toBe(200);
    expect(x.type).toMatch(/^application\/x-ndjson/);
    const lines = x.text.trimEnd().split('\n').map((l) => JSON.parse(l));
    expect(lines[0]).toMatchObject({ kind: 'event', type: 'CLAIM', correlationId: vm.id });
    expect(new Set(lines.map((l) => l.kind))).toEqual(new Set(['event', 'effect', 'attempt']));
  });

  it('CLI: replay prints the moment, verify exits 0 then 1 naming stream and event, export writes JSON lines', async () => {
    const when = t1.toISOString().replace('T', ' ').replace('Z', ''); // as `gpuvm history` prints times
    const dir = mkdtempSync(join(tmpdir(), 'gpuvm-export-'));
    try {
      const file = join(dir, 'bundle.jsonl');
      // Read-only commands side by side: each is a node process of its own.
      const [rvm, rhost, badAt, ok, toFile, toStdout, missing] = await Promise.all([
        gpuvm('replay', 'vm', vm.id, '--at', when),
        gpuvm('replay', 'host', hostId(), '--at', t1.toISOString(), '--json'),
        gpuvm('replay', 'vm', vm.id, '--at', 'tuesday'),
        gpuvm('verify'),
        gpuvm('export', vm.id, '--out', file),
        gpuvm('export', vm.id),
        gpuvm('export', 'vm-0000000000'),
      ]);
      expect(rvm.code, rvm.stderr).toBe(0);
      expect(rvm.stdout).toMatch(new RegExp(`^VM ${vm.id} \\(incident\\) at ${when}: running\\n`));
      expect(rvm.stdout).toMatch(new RegExp(`\\npartition ${vm.partition_id}: ready \\(held by ${vm.id}\\)`));
      expect(rhost.code, rhost.stderr).toBe(0);
      expect(JSON.parse(rhost.stdout).activePartitions.map((p: { partitionId: number }) => p.partitionId)).toEqual([vm.partition_id]);
      expect(badAt.code).toBe(1);
      expect(badAt.stderr).toMatch(/^gpuvm: at must be an ISO 8601 time with a zone.*\n$/);

      expect(ok.code, ok.stderr).toBe(0);
      expect(ok.stdout).toMatch(/^ok: 17 streams, \d+ events, no problems\n$/);

      expect(toFile.code, toFile.stderr).toBe(0);
      const fromFile = readFileSync(file, 'utf8').trimEnd().split('\n').map((l) => JSON.parse(l));
      expect(toStdout.code, toStdout.stderr).toBe(0);
      expect(toStdout.stdout.trimEnd().split('\n').map((l) => JSON.parse(l))).toEqual(fromFile);
      expect(fromFile.filter((l) => l.kind === 'event')).toHaveLength((await readCorrelated(db, vm.id)).length);
      expect([missing.code, missing.stderr]).toEqual([1, 'gpuvm: no VM vm-0000000000\n']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }

    const last = (await readStream(db, vmStream(vm.id))).at(-1)!;
    await sql`update vms set gpu_count = 8 where id = ${vm.id}`.execute(db);
    try {
      const bad = await gpuvm('verify');
      expect(bad.code).toBe(1);
      expect(bad.stdout).toBe(
        `${vmStream(vm.id)} v7 (position ${last.position}, PARTITION_RELEASED): vms row differs from the fold through v7: gpu_count stored 8, fold gives 2\n`,
      );
      expect(bad.stderr).toMatch(/^gpuvm: verify found 1 problem\(s\) in 17 streams, \d+ events\n$/);
    } finally {
      await sql`update vms set gpu_count = 2 where id = ${vm.id}`.execute(db);
    }
  }, 120_000);
});

/**
 * The invariants over the whole history, on histories that are each valid stream by stream but
 * impossible together — as a lost constraint or a bug in the engine would leave them. Written
 * straight into a fresh database: every event as the engine records it (decided by today's
 * machines, with its outbox rows), without the projections whose constraints would refuse them.
 */
describe(`verify's invariants over the global log (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  let store: Db;
  let storeUrl: string | undefined;
  let drop = async () => {};
  const snaps = new Map<string, StreamSnapshot>();
  const host = 'inv-host';

  async function record(streamId: string, event: { type: string; [k: string]: unknown }, correlationId: string) {
    const before = snaps.get(streamId) ?? null;
    const d = decide(streamId, before, event);
    if (d.kind !== 'changed') throw new Error(`${streamId}: ${event.type} does not apply (${d.kind})`);
    const kind = streamKind(streamId);
    const { type, ...data } = event;
    const version = (before?.version ?? 0) + 1;
    await appendEvents(store.kysely, streamId, version - 1, [
      { type, data, stateBefore: d.stateBefore, stateAfter: d.stateAfter, machine: kind, machineVersion: machines[kind].version, causationId: null, correlationId, actor: 'test', recordedAt: new Date() },
    ]);
    for (const [i, e] of d.effects.entries()) {
      await store.kysely
        .insertInto('effects')
        .values({ id: effectId(streamId, version, i), stream_id: streamId, host_id: host, type: e.type, params: JSON.stringify(e.params), correlation_id: correlationId, status: 'done', due_at: new Date(), max_attempts: 1, created_at: new Date() })
        .execute();
    }
    const now = new Date();
    snaps.set(streamId, { streamId, kind, machineVersion: machines[kind].version, version, state: d.stateAfter, context: d.context, createdAt: before?.createdAt ?? now, updatedAt: now });
  }
  const gpu = (m: number) => ({ moduleId: m, pciAddress: `0000:${(0x10 + m).toString(16)}:00.0` });
  const invariantProblems = async () => (await verifyHistory(store.kysely)).problems.filter((p) => !['projection-mismatch', 'orphan-row'].includes(p.code));

  beforeAll(async () => {
    const fresh = await freshDatabaseUrl();
    drop = fresh.drop;
    storeUrl = fresh.url;
    store = await openDb({ databaseUrl: fresh.url, pgliteDir: 'memory://' });
    await migrate(store);
    const p1 = partitionStream(host, 1);
    const p2 = partitionStream(host, 2);
    const p3 = partitionStream(host, 3);
    await record(hostStream(host), { type: 'REGISTER', hostId: host, simulated: true, inventory: { board: 'B200', gpus: [1, 2, 3, 4].map(gpu), partitions: [] } }, hostStream(host));
    await record(p1, { type: 'REGISTER', hostId: host, partitionId: 1, gpus: [gpu(1), gpu(2)] }, hostStream(host));
    await record(p2, { type: 'REGISTER', hostId: host, partitionId: 2, gpus: [gpu(2), gpu(3)] }, hostStream(host));
    await record(p3, { type: 'REGISTER', hostId: host, partitionId: 3, gpus: [gpu(4)] }, hostStream(host));

    const create = (vmId: string, partitionId: number, gpus: ReturnType<typeof gpu>[]) =>
      record(vmStream(vmId), { type: 'CREATE', vmId, name: vmId, hostId: host, partitionId, gpus, memoryMiB: 64, vcpus: 1, powerdownTimeoutMs: 300 }, vmId);
    // vm-aaaaaaaaaa runs on partition 1; partition 2 overlaps it on module 2 and is claimed anyway.
    await record(p1, { type: 'CLAIM', vmId: 'vm-aaaaaaaaaa' }, 'vm-aaaaaaaaaa');
    await create('vm-aaaaaaaaaa', 1, [gpu(1), gpu(2)]);
    for (const type of ['GPUS_READY', 'ACTIVATED', 'CONFIRMED_ACTIVE', 'BOUND_VFIO']) await record(p1, type === 'ACTIVATED' ? { type, outcome: 'activated' } : { type }, 'vm-aaaaaaaaaa');
    await record(vmStream('vm-aaaaaaaaaa'), { type: 'PARTITION_READY' }, 'vm-aaaaaaaaaa');
    await record(vmStream('vm-aaaaaaaaaa'), { type: 'QEMU_STARTED', pid: 4242 }, 'vm-aaaaaaaaaa');
    await record(p2, { type: 'CLAIM', vmId: 'vm-bbbbbbbbbb' }, 'vm-bbbbbbbbbb');
    // Partition 1 is torn down under its running VM: released and deactivated while QEMU runs.
    await record(p1, { type: 'RELEASE', vmId: 'vm-aaaaaaaaaa' }, 'vm-aaaaaaaaaa');
    await record(p1, { type: 'BOUND_HOST' }, 'vm-aaaaaaaaaa');
    await record(p1, { type: 'DEACTIVATED', outcome: 'deactivated' }, 'vm-aaaaaaaaaa');
    // vm-cccccccccc is deleted while its partition 3 never leaves preparing.
    await record(p3, { type: 'CLAIM', vmId: 'vm-cccccccccc' }, 'vm-cccccccccc');
    await create('vm-cccccccccc', 3, [gpu(4)]);
    await record(vmStream('vm-cccccccccc'), { type: 'DELETE' }, 'vm-cccccccccc');
    await record(vmStream('vm-cccccccccc'), { type: 'PARTITION_RELEASED' }, 'vm-cccccccccc');
  });
  afterAll(async () => {
    await store?.close();
    await drop();
  });

  it('names the event that claimed a module twice, deactivated a partition under a live VM, and a deleted VM whose partition never returned', async () => {
    const problems = await invariantProblems();
    const position = async (streamId: string, type: string) => (await readStream(store.kysely, streamId)).find((e) => e.type === type)!.position;
    expect(summary(problems)).toEqual([
      ['module-claimed-twice', partitionStream(host, 2), 2, 'CLAIM'],
      ['deactivated-under-live-vm', partitionStream(host, 1), 9, 'DEACTIVATED'],
      ['partition-not-returned', vmStream('vm-cccccccccc'), 3, 'PARTITION_RELEASED'],
    ]);
    expect(problems[0]!.event!.position).toBe(await position(partitionStream(host, 2), 'CLAIM'));
    expect(problems[0]!.message).toMatch(/GPU module 2 on host inv-host claimed for VM vm-bbbbbbbbbb while partition:inv-host:1 \(ready, VM vm-aaaaaaaaaa\) still holds it/);
    expect(problems[1]!.message).toBe('partition 1 deactivated while its VM vm-aaaaaaaaaa was running (its QEMU may still run)');
    expect(problems[2]!.message).toMatch(/^VM vm-cccccccccc is deleted but its partition 3 never returned: at the end of the log it is preparing/);
    // Stream by stream, every event replays as recorded: only the whole history shows these.
    expect(problems.every((p) => p.code !== 'state-mismatch' && p.code !== 'event-rejected' && p.code !== 'effect-mismatch')).toBe(true);
  });

  // Needs a second connection holding a transaction open while others commit; PGlite has one
  // connection, where no transaction is ever open under another, so every event is below xmin there.
  it.skipIf(!usingPostgres)('checks the invariants over every event of its snapshot, also those above pg_snapshot_xmin (a transaction still open began before them)', async () => {
    const { default: pg } = await import('pg');
    const held = new pg.Client({ connectionString: storeUrl });
    await held.connect();
    try {
      await held.query('begin');
      await held.query('select pg_current_xact_id()'); // takes a transaction id: xmin stays at or below it until it ends
      // Partition 4 overlaps partition 2 on module 3, and is claimed while partition 2 holds it.
      const p4 = partitionStream(host, 4);
      await record(p4, { type: 'REGISTER', hostId: host, partitionId: 4, gpus: [gpu(3)] }, hostStream(host));
      await record(p4, { type: 'CLAIM', vmId: 'vm-dddddddddd' }, 'vm-dddddddddd');
      const { rows } = await sql<{ above: boolean }>`select bool_and(tx_id >= pg_snapshot_xmin(pg_current_snapshot())) as above from events where stream_id = ${p4}`.execute(store.kysely);
      expect(rows[0]!.above).toBe(true);
      const report = await verifyHistory(store.kysely);
      expect(report.events).toBe(Number((await sql<{ n: string }>`select count(*)::text as n from events`.execute(store.kysely)).rows[0]!.n));
      const problems = report.problems.filter((p) => !['projection-mismatch', 'orphan-row'].includes(p.code));
      expect(summary(problems)).toEqual([
        ['module-claimed-twice', partitionStream(host, 2), 2, 'CLAIM'],
        ['deactivated-under-live-vm', partitionStream(host, 1), 9, 'DEACTIVATED'],
        ['module-claimed-twice', p4, 2, 'CLAIM'],
        ['partition-not-returned', vmStream('vm-cccccccccc'), 3, 'PARTITION_RELEASED'],
      ]);
      expect(problems[2]!.message).toMatch(/GPU module 3 on host inv-host claimed for VM vm-dddddddddd while partition:inv-host:2 \(preparing, VM vm-bbbbbbbbbb\) still holds it/);
    } finally {
      await held.query('rollback').catch(() => {});
      await held.end();
    }
  });
});
