/**
 * Old histories keep replaying: logs written by an earlier gpuvm (test/fixtures/histories, produced
 * by test/support/write-history-fixtures.ts) are folded through today's machines. A machine change
 * that folds a stored history differently — a guard, a target, an assignment, an effect's params —
 * fails here; such a change must bump the machine version (and keep the old one replayable, or not
 * list it in REPLAYABLE_MACHINE_VERSIONS) instead of silently rewriting the past.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { streamKind } from '../machines/index.ts';
import { effectId } from '../src/engine/commands.ts';
import { decide, fold, sameJson } from '../src/engine/decide.ts';
import { checkStream, REPLAYABLE_MACHINE_VERSIONS } from '../src/engine/verify.ts';
import type { StoredEvent } from '../src/store/events.ts';
import type { StreamSnapshot } from '../src/store/projections.ts';

/** Written by test/support/write-history-fixtures.ts; committed, never rewritten by tests. */
const FIXTURES_DIR = fileURLToPath(new URL('./fixtures/histories/', import.meta.url));

interface Fixture {
  name: string;
  streams: Map<string, StoredEvent[]>;
  effects: Map<string, { type: string; params: unknown }>;
  snapshots: Map<string, { state: unknown; context: unknown; version: number; machineVersion: number }>;
}

function loadFixture(file: string): Fixture {
  const streams = new Map<string, StoredEvent[]>();
  const effects = new Map<string, { type: string; params: unknown }>();
  const snapshots: Fixture['snapshots'] = new Map();
  for (const line of readFileSync(join(FIXTURES_DIR, file), 'utf8').split('\n')) {
    if (!line.trim()) continue;
    const r = JSON.parse(line);
    if (r.kind === 'event') {
      const e: StoredEvent = { ...r, recordedAt: new Date(r.recordedAt) };
      delete (e as { kind?: string }).kind;
      streams.set(e.streamId, [...(streams.get(e.streamId) ?? []), e]);
    } else if (r.kind === 'effect') effects.set(r.id, { type: r.type, params: r.params });
    else if (r.kind === 'snapshot') snapshots.set(r.streamId, r);
  }
  for (const list of streams.values()) list.sort((a, b) => a.streamVersion - b.streamVersion);
  return { name: file.replace(/\.jsonl$/, ''), streams, effects, snapshots };
}

const files = readdirSync(FIXTURES_DIR).filter((f) => f.endsWith('.jsonl')).sort();
const fixtures = files.map(loadFixture);
const allEvents = (f: Fixture) => [...f.streams.values()].flat();

describe('stored histories replay through today’s machines', () => {
  it('has a fixture for every recorded scenario, each a full log from host registration', () => {
    expect(files).toEqual(['activation-failure.jsonl', 'delete-while-provisioning.jsonl', 'drift.jsonl', 'normal.jsonl', 'qemu-crash.jsonl', 'quarantine.jsonl']);
    for (const f of fixtures) {
      expect(f.streams.get('host:sim-b200')?.[0]?.type, f.name).toBe('REGISTER');
      expect([...f.streams.keys()].filter((s) => s.startsWith('partition:')), f.name).toHaveLength(15);
      expect(f.snapshots.size, f.name).toBe(f.streams.size);
    }
  });

  it('covers the paths it is meant to: each scenario reached its states', () => {
    const reached = (name: string) => new Set(allEvents(fixtures.find((f) => f.name === name)!).map((e) => `${e.streamId.split(':')[0]} ${e.type} ${e.stateBefore} → ${e.stateAfter}`));
    expect(reached('normal')).toContain('vm QEMU_STARTED starting → running');
    expect(reached('normal')).toContain('vm PARTITION_RELEASED releasing → deleted');
    expect(reached('activation-failure')).toContain('partition EFFECT_FAILED activating → unbinding');
    expect(reached('activation-failure')).toContain('vm PARTITION_FAILED provisioning → failed');
    expect(reached('qemu-crash')).toContain('vm QEMU_EXITED running → releasing');
    expect(reached('qemu-crash')).toContain('vm PARTITION_RELEASED releasing → crashed');
    expect(reached('delete-while-provisioning')).toContain('vm DELETE provisioning → releasing');
    expect(reached('delete-while-provisioning')).toContain('partition GPUS_READY preparing → unbinding');
    expect(reached('delete-while-provisioning')).toContain('vm QEMU_STARTED starting → stopping');
    expect(reached('quarantine')).toContain('partition CONFIRMED_INACTIVE confirmingInactive → quarantined');
    expect(reached('quarantine')).toContain('partition CLEAR_QUARANTINE quarantined → free');
    expect(reached('quarantine')).toContain('host GPU_UNHEALTHY registered → registered');
    expect(reached('drift')).toContain('partition DRIFT_DETECTED free → repairing');
    expect(reached('drift')).toContain('partition REPAIRED repairing → free');
    expect(reached('drift')).toContain('host DRIFT_DETECTED registered → registered');
    expect(reached('drift')).toContain('host STRAY_QEMU_STOPPED registered → registered');
  });

  describe.each(fixtures.map((f) => [f.name, f] as const))('%s', (_name, f) => {
    it('every event applies, to the recorded state before, giving the recorded state after and the recorded effects', () => {
      let checked = 0;
      for (const [streamId, events] of f.streams) {
        let snap = null as StreamSnapshot | null;
        expect(
          events.map((e) => e.streamVersion),
          `${streamId} versions`,
        ).toEqual(events.map((_, i) => i + 1));
        for (const e of events) {
          const where = `${f.name}: ${streamId} v${e.streamVersion} ${e.type}`;
          expect(e.stateBefore ?? null, where).toEqual(snap?.state ?? null);
          const d = decide(streamId, snap, { ...e.data, type: e.type });
          expect(d.kind === 'rejected' ? d.reason : d.kind, where).toBe('changed');
          if (d.kind !== 'changed') return;
          expect(d.stateAfter, where).toEqual(e.stateAfter);
          // The outbox rows this event wrote, by index: what today's machine asks for must be the same.
          const recorded = [...f.effects.keys()].filter((id) => id.startsWith(`${streamId}@${e.streamVersion}#`)).sort((a, b) => a.length - b.length || a.localeCompare(b));
          expect(recorded, `${where} effect ids`).toEqual(d.effects.map((_, i) => effectId(streamId, e.streamVersion, i)));
          expect(d.effects.map((x) => ({ type: x.type, params: JSON.parse(JSON.stringify(x.params)) })), `${where} effects`).toEqual(recorded.map((id) => f.effects.get(id)));
          snap = { streamId, kind: streamKind(streamId), machineVersion: e.machineVersion, version: e.streamVersion, state: d.stateAfter, context: d.context, createdAt: snap?.createdAt ?? e.recordedAt, updatedAt: e.recordedAt };
          checked++;
        }
      }
      expect(checked).toBe(allEvents(f).length);
    });

    it('folding each stream ends in the recorded final state and context', () => {
      for (const [streamId, events] of f.streams) {
        const snap = fold(streamId, events)!;
        const last = events.at(-1)!;
        const recorded = f.snapshots.get(streamId)!;
        expect(snap.state, streamId).toEqual(last.stateAfter);
        expect(snap.state, streamId).toEqual(recorded.state);
        expect(snap.version, streamId).toBe(recorded.version);
        expect(sameJson(snap.context, recorded.context), `${streamId} context: replayed ${JSON.stringify(snap.context)}`).toBe(true);
      }
    });

    it("every event's machine version is today's or one today's code declares it replays", () => {
      for (const e of allEvents(f)) {
        const kind = streamKind(e.streamId);
        expect(e.machine).toBe(kind);
        expect(REPLAYABLE_MACHINE_VERSIONS[kind], `${e.streamId} v${e.streamVersion}`).toContain(e.machineVersion);
      }
    });

    it('gpuvm verify finds nothing wrong in it', () => {
      const problems = [...f.streams].flatMap(([streamId, events]) => checkStream(streamId, events, f.effects).problems);
      expect(problems).toEqual([]);
    });
  });
});
