/**
 * Replay: rebuild every stream's snapshot and projection rows from the log, and compare them with the
 * stored tables. `verifyProjections` is used by tests and by `gpuvm verify` (verify.ts); a difference
 * names the stream. A stream that does not fold is a difference on table `events`; a row no stream
 * accounts for is a difference with `rebuilt: null`.
 *
 * One pass over the log in stream order (log-scan.ts), whole streams folded in batches — on worker
 * threads as well as this one when the log is large (fold-worker.ts), since streams are independent
 * and xstate's transition per event is most of the work — and each projection table read once, in
 * bulk.
 */
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { sql, type Selectable } from 'kysely';
import { hostStream, partitionStream, vmStream } from '../../machines/index.ts';
import type { Executor } from '../store/events.ts';
import type { HostsTable, PartitionsTable, StreamsTable, VmsTable } from '../store/schema.ts';
import { DEFAULT_SCAN_PAGE, scanLogByStream, type RawEvent } from '../store/log-scan.ts';
import { claimRows, readRowOf, type ClaimRow, type ReadRow, type StreamSnapshot } from '../store/projections.ts';
import { canonical, sameJson } from './decide.ts';
import { foldPacked, packEvents, type FoldResult, type PackedEvents } from './fold-batch.ts';
import type { FoldReply, FoldRequest } from './fold-worker.ts';

export type FoldedStream =
  | { streamId: string; events: number; snapshot: StreamSnapshot; read: ReadRow; claims: ClaimRow[] }
  /** The stream does not fold (an event today's machine does not take, an unknown kind). */
  | { streamId: string; events: number; error: string };

export interface Difference {
  streamId: string;
  table: string;
  stored: unknown;
  rebuilt: unknown;
}

export interface RebuildOptions {
  /**
   * Fold worker threads besides this one, which reads and folds too whenever no worker has room;
   * 0 folds on this thread only. Default: one per core but this one when the log holds at least
   * AUTO_WORKERS_FROM events by the planner's estimate (starting a worker costs a few hundred ms of
   * module loading and a JIT warm-up), else 0.
   */
  workers?: number;
  /** Events per page read from the log. */
  pageSize?: number;
  /** False: the calling thread only reads, and waits for a worker to have room. Default true. */
  callerFolds?: boolean;
}

interface RebuildHooks {
  /** Runs once the fold workers are starting and before the scan: their loading overlaps it. */
  beforeScan?: () => Promise<void>;
}

export const AUTO_WORKERS_FROM = 100_000;
/**
 * A fold allocates dozens of short-lived objects per xstate transition; a larger young generation than
 * a worker's default means fewer scavenges: about a fifth less CPU per event, measured.
 */
const WORKER_YOUNG_GENERATION_MB = 64;
/** Batches queued per worker: one folding, one waiting, so a worker never idles for the reader. */
const IN_FLIGHT_PER_WORKER = 2;

// ── worker pool ──────────────────────────────────────────────────────────────────────────────

/**
 * Worker threads do not inherit a loader registered in-process (bin/gpuvm.js registers tsx that
 * way), so each registers tsx itself before importing the TypeScript worker module.
 */
export const BOOTSTRAP = `
const { workerData } = require('node:worker_threads');
import(workerData.tsx).then((tsx) => { tsx.register(); return import(workerData.entry); });
`;

/** tsx's ESM register() (its CommonJS build resolves its own files wrongly from a worker). */
export function tsxEsmApi(): string {
  const require = createRequire(import.meta.url);
  const manifest = require.resolve('tsx/package.json');
  const pkg = require(manifest) as { exports: Record<string, { import: { default: string } }> };
  return pathToFileURL(join(dirname(manifest), pkg.exports['./esm/api']!.import.default)).href;
}

type Pending = { resolve: (r: { folded: FoldResult[]; ms: number }) => void; reject: (e: Error) => void };

class FoldPool {
  private readonly slots: { worker: Worker; ready: boolean; pending: Map<number, Pending> }[] = [];
  private nextId = 0;
  private failure: Error | null = null;
  private markLoaded!: () => void;
  /** Settles when a worker has loaded its modules, or one has failed (tryFold then throws). */
  readonly loaded = new Promise<void>((resolve) => (this.markLoaded = resolve));

  constructor(size: number) {
    const tsx = tsxEsmApi();
    const entry = new URL('./fold-worker.ts', import.meta.url).href;
    for (let i = 0; i < size; i++) {
      const worker = new Worker(BOOTSTRAP, { eval: true, workerData: { tsx, entry }, resourceLimits: { maxYoungGenerationSizeMb: WORKER_YOUNG_GENERATION_MB } });
      const slot = { worker, ready: false, pending: new Map<number, Pending>() };
      const fail = (err: Error) => {
        this.failure ??= err;
        this.markLoaded();
        for (const p of slot.pending.values()) p.reject(err);
        slot.pending.clear();
      };
      slot.worker.on('message', (reply: FoldReply) => {
        if ('ready' in reply) {
          slot.ready = true;
          this.markLoaded();
          return;
        }
        const p = slot.pending.get(reply.id);
        slot.pending.delete(reply.id);
        p?.resolve(reply);
      });
      slot.worker.on('error', fail);
      slot.worker.on('messageerror', fail);
      slot.worker.on('exit', (code) => fail(new Error(`fold worker exited (code ${code})`)));
      this.slots.push(slot);
    }
  }

  /**
   * Folds the batch on the least busy loaded worker with room for it; null when there is none (all
   * still loading, or each with IN_FLIGHT_PER_WORKER batches).
   */
  tryFold(packed: PackedEvents): Promise<{ folded: FoldResult[]; ms: number }> | null {
    if (this.failure) throw this.failure;
    let slot: (typeof this.slots)[number] | null = null;
    for (const s of this.slots) if (s.ready && s.pending.size < IN_FLIGHT_PER_WORKER && (!slot || s.pending.size < slot.pending.size)) slot = s;
    if (!slot) return null;
    const chosen = slot;
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      chosen.pending.set(id, { resolve, reject });
      const request: FoldRequest = { id, ...packed };
      chosen.worker.postMessage(request, [packed.nums.buffer as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    this.failure ??= new Error('fold pool closed');
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }
}

async function workerCount(db: Executor, asked: number | undefined): Promise<number> {
  if (asked !== undefined) return asked;
  const { rows } = await sql<{ n: number }>`select reltuples::float8 as n from pg_class where oid = 'events'::regclass`.execute(db);
  return (rows[0]?.n ?? 0) >= AUTO_WORKERS_FROM ? Math.max(1, availableParallelism() - 1) : 0;
}

// ── rebuild ──────────────────────────────────────────────────────────────────────────────────

/** A folded stream with the projection rows its snapshot maps to (projections.ts). */
function withRows(r: FoldResult): FoldedStream {
  if ('error' in r) return r;
  const { streamId, events, snapshot: s } = r;
  return { streamId, events, snapshot: s, read: readRowOf(s), claims: s.kind === 'partition' ? claimRows(s) : [] };
}

export interface RebuildStats {
  streams: number;
  events: number;
  /** Fold worker threads used (0: folded on the calling thread). */
  workers: number;
  /** Time spent folding, summed over the threads that folded. */
  foldMs: number;
  /** Events folded on the calling thread (while no worker had room or had loaded, or with no workers). */
  foldedHere: number;
}

/**
 * Folds every stream of the log and hands each one's snapshot and projection rows (or why it does
 * not fold) to `onStream`, in no particular order across batches. Run it in one repeatable-read
 * transaction for a consistent picture (verifyProjections does).
 */
export async function rebuildProjections(db: Executor, onStream: (folded: FoldedStream) => void, opts: RebuildOptions & RebuildHooks = {}): Promise<RebuildStats> {
  const workers = await workerCount(db, opts.workers);
  const pool = workers > 0 ? new FoldPool(workers) : null;
  const stats: RebuildStats = { streams: 0, events: 0, workers, foldMs: 0, foldedHere: 0 };
  const take = ({ folded, ms }: { folded: FoldResult[]; ms: number }) => {
    stats.foldMs += ms;
    for (const r of folded) {
      stats.streams++;
      stats.events += r.events;
      onStream(withRows(r));
    }
  };
  const inFlight = new Set<Promise<void>>();
  const dispatch = async (rows: RawEvent[]) => {
    if (rows.length === 0) return;
    const packed = packEvents(rows);
    for (;;) {
      const sent = pool?.tryFold(packed);
      if (sent) {
        const done: Promise<void> = sent.then(take);
        inFlight.add(done);
        // Removed once settled; a failure is awaited (and thrown) below or by the race.
        void done.then(
          () => inFlight.delete(done),
          () => {},
        );
        return;
      }
      if (!pool || opts.callerFolds !== false) break;
      // A worker's batch settling makes room; with none in flight, no worker has loaded yet.
      await (inFlight.size > 0 ? Promise.race(inFlight) : pool.loaded);
    }
    // No worker has room (or none has loaded its modules yet): this thread folds the batch itself,
    // which also holds the reader back until the workers catch up.
    const t0 = performance.now();
    const folded = foldPacked(packed);
    stats.foldedHere += rows.length;
    take({ folded, ms: performance.now() - t0 });
  };
  try {
    await opts.beforeScan?.();
    // The last stream of a page may go on in the next one: it is held back until it is whole.
    let tail: RawEvent[] = [];
    for await (const page of scanLogByStream(db, opts.pageSize ?? DEFAULT_SCAN_PAGE)) {
      const lastId = page[page.length - 1]!.stream_id;
      let cut = page.length;
      while (cut > 0 && page[cut - 1]!.stream_id === lastId) cut--;
      if (cut > 0) {
        await dispatch(tail.concat(page.slice(0, cut)));
        tail = page.slice(cut);
      } else if (tail.length > 0 && tail[0]!.stream_id !== lastId) {
        // The whole page is one stream, and the held-back one ended with the previous page.
        await dispatch(tail);
        tail = page;
      } else {
        tail = tail.concat(page);
      }
    }
    await dispatch(tail);
    await Promise.all(inFlight);
  } finally {
    await pool?.close();
  }
  return stats;
}

// ── verify ───────────────────────────────────────────────────────────────────────────────────

function plain(row: object | undefined | null): unknown {
  if (!row) return null;
  return canonical(JSON.parse(JSON.stringify(row)));
}

/**
 * Structurally equal in a way that implies equal JSON (Dates by time, keys holding undefined
 * ignored, key order ignored, as jsonb ignores it). Cheap; `sameRow` confirms a "no" with the JSON
 * comparison, so the answer is exactly sameJson's.
 */
function equalAsJson(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (a instanceof Date || b instanceof Date) return a instanceof Date && b instanceof Date && a.getTime() === b.getTime();
  if (Array.isArray(a) || Array.isArray(b)) {
    if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!equalAsJson(a[i], b[i])) return false;
    return true;
  }
  const x = a as Record<string, unknown>;
  const y = b as Record<string, unknown>;
  let keys = 0;
  for (const k in x) {
    if (x[k] === undefined) continue;
    keys++;
    if (!equalAsJson(x[k], y[k])) return false;
  }
  for (const k in y) if (y[k] !== undefined) keys--;
  return keys === 0;
}

const sameRow = (stored: unknown, rebuilt: unknown) => equalAsJson(stored, rebuilt) || sameJson(plain(stored as object), plain(rebuilt as object));

const claimKey = (c: ClaimRow) => `${c.host_id}/${c.module_id}`;
const byClaimKey = (a: ClaimRow, b: ClaimRow) => claimKey(a).localeCompare(claimKey(b));

export async function verifyProjections(db: Executor, opts: RebuildOptions = {}): Promise<{ streams: number; events: number; differences: Difference[] }> {
  // The log and the tables as of one moment.
  if (!db.isTransaction) {
    return db
      .transaction()
      .setIsolationLevel('repeatable read')
      .setAccessMode('read only')
      .execute((tx) => verifyProjections(tx, opts));
  }
  const stored = {
    streams: new Map<string, Selectable<StreamsTable>>(),
    vms: new Map<string, Selectable<VmsTable>>(),
    partitions: new Map<string, Selectable<PartitionsTable>>(),
    hosts: new Map<string, Selectable<HostsTable>>(),
  };
  const readStored = async () => {
    for (const r of await db.selectFrom('streams').selectAll().execute()) stored.streams.set(r.stream_id, r);
    for (const r of await db.selectFrom('vms').selectAll().execute()) stored.vms.set(vmStream(r.id), r);
    for (const r of await db.selectFrom('partitions').selectAll().execute()) stored.partitions.set(partitionStream(r.host_id, r.partition_id), r);
    for (const r of await db.selectFrom('hosts').selectAll().execute()) stored.hosts.set(hostStream(r.id), r);
  };
  const differences: Difference[] = [];
  const rebuiltClaims: ClaimRow[] = [];
  const unfoldable = new Set<string>();
  const known = new Set<string>();
  const compare = (streamId: string, table: string, storedRow: object | undefined, row: object) => {
    if (!sameRow(storedRow ?? null, row)) differences.push({ streamId, table, stored: plain(storedRow), rebuilt: plain(row) });
  };

  const { streams, events } = await rebuildProjections(
    db,
    (f) => {
      known.add(f.streamId);
      if ('error' in f) {
        // A stream that does not fold has no rebuilt rows to compare; say so and check the others.
        differences.push({ streamId: f.streamId, table: 'events', stored: `${f.events} events`, rebuilt: f.error });
        if (f.streamId.startsWith('partition:')) unfoldable.add(f.streamId);
        return;
      }
      const s = f.snapshot;
      compare(f.streamId, 'streams', stored.streams.get(f.streamId), {
        stream_id: s.streamId,
        machine: s.kind,
        machine_version: s.machineVersion,
        version: s.version,
        state: s.state,
        context: s.context,
        created_at: s.createdAt,
        updated_at: s.updatedAt,
      });
      compare(f.streamId, f.read.table, stored[f.read.table].get(f.streamId), f.read.row);
      for (const c of f.claims) rebuiltClaims.push(c);
    },
    { ...opts, beforeScan: readStored },
  );
  // Batches come back in any order; differences are listed by stream, as the streams sort.
  differences.sort((a, b) => (a.streamId < b.streamId ? -1 : a.streamId > b.streamId ? 1 : 0));

  const storedClaims = (await db.selectFrom('gpu_claims').selectAll().execute())
    .filter((c) => !unfoldable.has(partitionStream(c.host_id, c.partition_id)))
    .sort(byClaimKey);
  rebuiltClaims.sort(byClaimKey);
  if (!sameRow(storedClaims, rebuiltClaims)) {
    differences.push({ streamId: '*', table: 'gpu_claims', stored: storedClaims.map(plain), rebuilt: rebuiltClaims.map(plain) });
  }

  // Rows no stream accounts for: nothing in the log could have written them.
  for (const [table, rows] of Object.entries(stored)) {
    for (const [streamId, row] of rows) if (!known.has(streamId)) differences.push({ streamId, table, stored: plain(row), rebuilt: null });
  }
  return { streams, events, differences };
}
