/**
 * A batch of whole streams from the log, packed to cross to a worker thread cheaply, and folded into
 * each stream's snapshot. Pure: the same code folds on the calling thread or on a worker
 * (fold-worker.ts). It imports no more than the fold needs, since a worker loads it all anew.
 *
 * Packed, not as row objects: a structured clone of an array of strings plus a transferred
 * Float64Array costs a quarter of cloning the same rows as objects, and the JSON of `data` is parsed
 * by whoever folds, not by the thread that reads.
 */
import { streamKind } from '../../machines/index.ts';
import type { RawEvent } from '../store/log-scan.ts';
import type { StreamSnapshot } from '../store/projections.ts';
import { fold, type FoldEvent } from './decide.ts';

/** Events of whole streams, in stream order: per event three strings and three numbers. */
export interface PackedEvents {
  /** stream_id, type, data (JSON text) of each event in turn. */
  text: string[];
  /** stream_version, machine_version, recorded_ms of each event in turn. */
  nums: Float64Array;
}

export function packEvents(rows: readonly RawEvent[]): PackedEvents {
  const text = new Array<string>(rows.length * 3);
  const nums = new Float64Array(rows.length * 3);
  for (let i = 0; i < rows.length; i++) {
    const r = rows[i]!;
    text[3 * i] = r.stream_id;
    text[3 * i + 1] = r.type;
    text[3 * i + 2] = r.data;
    nums[3 * i] = r.stream_version;
    nums[3 * i + 1] = r.machine_version;
    nums[3 * i + 2] = r.recorded_ms;
  }
  return { text, nums };
}

export type FoldResult =
  | { streamId: string; events: number; snapshot: StreamSnapshot }
  /** The stream does not fold (an event today's machine does not take, an unknown kind). */
  | { streamId: string; events: number; error: string };

function foldOne(streamId: string, events: FoldEvent[]): FoldResult {
  try {
    streamKind(streamId);
    return { streamId, events: events.length, snapshot: fold(streamId, events)! };
  } catch (err) {
    return { streamId, events: events.length, error: err instanceof Error ? err.message : String(err) };
  }
}

/** Folds every stream of the batch; each stream must be whole (all its events, in version order). */
export function foldPacked({ text, nums }: PackedEvents): FoldResult[] {
  const out: FoldResult[] = [];
  const n = nums.length / 3;
  let start = 0;
  while (start < n) {
    const streamId = text[3 * start]!;
    const events: FoldEvent[] = [];
    let i = start;
    for (; i < n && text[3 * i] === streamId; i++) {
      events.push({
        type: text[3 * i + 1]!,
        data: JSON.parse(text[3 * i + 2]!) as Record<string, unknown>,
        streamVersion: nums[3 * i]!,
        machineVersion: nums[3 * i + 1]!,
        recordedAt: new Date(nums[3 * i + 2]!),
      });
    }
    out.push(foldOne(streamId, events));
    start = i;
  }
  return out;
}
