/**
 * A fold worker thread (rebuild.ts's FoldPool): says when it is loaded, then folds the packed batches
 * it is sent and sends back each stream's snapshot, tagged with the batch's id, and how long the
 * fold took.
 */
import { performance } from 'node:perf_hooks';
import { parentPort } from 'node:worker_threads';
import { foldPacked, type FoldResult, type PackedEvents } from './fold-batch.ts';

export interface FoldRequest extends PackedEvents {
  id: number;
}

export type FoldReply = { ready: true } | { id: number; folded: FoldResult[]; ms: number };

const reply = (r: FoldReply) => parentPort!.postMessage(r);

parentPort!.on('message', (request: FoldRequest) => {
  const t0 = performance.now();
  const folded = foldPacked(request);
  reply({ id: request.id, folded, ms: performance.now() - t0 });
});
reply({ ready: true });
