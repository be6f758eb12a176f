/**
 * Replay: fold every stream from the log and compare what comes out with the stored snapshot and
 * read rows. Used by tests and by `gpuvm verify` (verify.ts); a difference names the stream. A
 * stream that does not fold is a difference on table `events`; a row no stream accounts for is a
 * difference with `rebuilt: null`.
 */
import type { Kysely } from 'kysely';
import { hostStream, partitionStream, streamKind, vmStream } from '../../machines/index.ts';
import { readStream } from '../store/events.ts';
import { claimRows, hostRow, partitionRow, vmRow, type StreamSnapshot } from '../store/projections.ts';
import type { Database } from '../store/schema.ts';
import { canonical, fold, sameJson } from './decide.ts';

export interface Difference {
  streamId: string;
  table: string;
  stored: unknown;
  rebuilt: unknown;
}

function plain(row: object | undefined | null): unknown {
  if (!row) return null;
  return canonical(JSON.parse(JSON.stringify(row)));
}

export async function verifyProjections(db: Kysely<Database>): Promise<{ streams: number; events: number; differences: Difference[] }> {
  const differences: Difference[] = [];
  const streamIds = (await db.selectFrom('events').select('stream_id').distinct().execute()).map((r) => r.stream_id);
  const rebuiltClaims: object[] = [];
  const unfoldable = new Set<string>();
  let events = 0;
  for (const streamId of streamIds.sort()) {
    const log = await readStream(db, streamId);
    events += log.length;
    let snap: StreamSnapshot;
    try {
      snap = fold(streamId, log) as StreamSnapshot;
    } catch (err) {
      // A stream that does not fold has no rebuilt rows to compare; say so and check the others.
      differences.push({ streamId, table: 'events', stored: `${log.length} events`, rebuilt: err instanceof Error ? err.message : String(err) });
      if (streamKind(streamId) === 'partition') unfoldable.add(streamId);
      continue;
    }
    const stored = await db.selectFrom('streams').selectAll().where('stream_id', '=', streamId).executeTakeFirst();
    const rebuiltStream = {
      stream_id: snap.streamId,
      machine: snap.kind,
      machine_version: snap.machineVersion,
      version: snap.version,
      state: snap.state,
      context: snap.context,
      created_at: snap.createdAt,
      updated_at: snap.updatedAt,
    };
    if (!sameJson(plain(stored), plain(rebuiltStream))) differences.push({ streamId, table: 'streams', stored: plain(stored), rebuilt: plain(rebuiltStream) });

    if (snap.kind === 'vm') {
      const row = vmRow(snap);
      const storedRow = await db.selectFrom('vms').selectAll().where('id', '=', row.id).executeTakeFirst();
      if (!sameJson(plain(storedRow), plain(row))) differences.push({ streamId, table: 'vms', stored: plain(storedRow), rebuilt: plain(row) });
    } else if (snap.kind === 'partition') {
      const row = partitionRow(snap);
      const storedRow = await db
        .selectFrom('partitions')
        .selectAll()
        .where('host_id', '=', row.host_id)
        .where('partition_id', '=', row.partition_id)
        .executeTakeFirst();
      if (!sameJson(plain(storedRow), plain(row))) differences.push({ streamId, table: 'partitions', stored: plain(storedRow), rebuilt: plain(row) });
      rebuiltClaims.push(...claimRows(snap));
    } else {
      const row = hostRow(snap);
      const storedRow = await db.selectFrom('hosts').selectAll().where('id', '=', row.id).executeTakeFirst();
      if (!sameJson(plain(storedRow), plain(row))) differences.push({ streamId, table: 'hosts', stored: plain(storedRow), rebuilt: plain(row) });
    }
  }
  const key = (c: any) => `${c.host_id}/${c.module_id}`;
  const storedClaims = (await db.selectFrom('gpu_claims').selectAll().execute())
    .filter((c) => !unfoldable.has(partitionStream(c.host_id, c.partition_id)))
    .map(plain)
    .sort((a: any, b: any) => key(a).localeCompare(key(b)));
  const rebuilt = rebuiltClaims.map(plain).sort((a: any, b: any) => key(a).localeCompare(key(b)));
  if (!sameJson(storedClaims, rebuilt)) differences.push({ streamId: '*', table: 'gpu_claims', stored: storedClaims, rebuilt });

  // Rows no stream accounts for: nothing in the log could have written them.
  const known = new Set(streamIds);
  const orphan = (streamId: string, table: string, stored: object) => {
    if (!known.has(streamId)) differences.push({ streamId, table, stored: plain(stored), rebuilt: null });
  };
  for (const r of await db.selectFrom('streams').selectAll().execute()) orphan(r.stream_id, 'streams', r);
  for (const r of await db.selectFrom('vms').selectAll().execute()) orphan(vmStream(r.id), 'vms', r);
  for (const r of await db.selectFrom('partitions').selectAll().execute()) orphan(partitionStream(r.host_id, r.partition_id), 'partitions', r);
  for (const r of await db.selectFrom('hosts').selectAll().execute()) orphan(hostStream(r.id), 'hosts', r);
  return { streams: streamIds.length, events, differences };
}
