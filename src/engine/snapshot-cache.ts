/** The committed-snapshot cache a process's writers share (see SnapshotCache). */
import type { StreamSnapshot } from '../store/projections.ts';

/**
 * The snapshots this process committed, so that the next step of a stream need not read its
 * snapshot back, and so that a request waiting for a VM hears of its steps at once (`watch`).
 * A snapshot that another writer has since moved past is harmless: the step's insert at version+1
 * then fails with ConcurrencyError, the entry is dropped, and the retry reads the stream. Only
 * committed snapshots are kept, so an entry is never ahead of the log. Bounded: the oldest go first.
 */
export class SnapshotCache {
  private readonly entries = new Map<string, StreamSnapshot>();
  private readonly watchers = new Map<string, Set<(snapshot: StreamSnapshot) => void>>();
  constructor(private readonly max = 10_000) {}

  get(streamId: string): StreamSnapshot | undefined {
    return this.entries.get(streamId);
  }

  /** Call only once `snapshot` is committed. An older version than the one kept is ignored (a late hand-over). */
  remember(snapshot: StreamSnapshot): void {
    const kept = this.entries.get(snapshot.streamId);
    if (kept && kept.version > snapshot.version) return;
    this.entries.delete(snapshot.streamId);
    this.entries.set(snapshot.streamId, snapshot);
    if (this.entries.size > this.max) this.entries.delete(this.entries.keys().next().value!);
    for (const watcher of this.watchers.get(snapshot.streamId) ?? []) watcher(snapshot);
  }

  forget(streamId: string): void {
    this.entries.delete(streamId);
  }

  /** Calls `watcher` with every snapshot of the stream this process commits from now on; returns the unwatch function. */
  watch(streamId: string, watcher: (snapshot: StreamSnapshot) => void): () => void {
    let set = this.watchers.get(streamId);
    if (!set) this.watchers.set(streamId, (set = new Set()));
    set.add(watcher);
    return () => {
      set.delete(watcher);
      if (set.size === 0) this.watchers.delete(streamId);
    };
  }
}
