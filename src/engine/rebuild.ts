/**
 * Replay: fold every stream from the log and compare what comes out with the stored snapshot and
 * read rows. Used by tests now and by `gpuvm verify` later; a difference names the stream.
 */
import type { Kysely } from 'kysely';
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
  let events = 0;
  for (const streamId of streamIds.sort()) {
    const log = await readStream(db, streamId);
    events += log.length;
    const snap = fold(streamId, log) as StreamSnapshot;
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
  const storedClaims = (await db.selectFrom('gpu_claims').selectAll().execute()).map(plain).sort((a: any, b: any) => key(a).localeCompare(key(b)));
  const rebuilt = rebuiltClaims.map(plain).sort((a: any, b: any) => key(a).localeCompare(key(b)));
  if (!sameJson(storedClaims, rebuilt)) differences.push({ streamId: '*', table: 'gpu_claims', stored: storedClaims, rebuilt });
  return { streams: streamIds.length, events, differences };
}
