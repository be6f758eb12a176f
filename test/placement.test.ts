/**
 * Fleet placement (src/engine/placement.ts): capacity per size is counted in partitions, not in free
 * GPUs, on both boards' tables, and place() chooses the candidate that loses the least placeable
 * capacity under the request mix, packs onto used hosts, keeps 8-GPU islands whole, honours only
 * 'free' partitions and breaks ties the same way every time.
 */
import { describe, expect, it } from 'vitest';
import { capacityOf, choosePartition, place, type HostView, type PartitionCandidate } from '../src/engine/placement.ts';

type Board = 'B200' | 'H100';

/** The default tables of DESIGN.md §2.1, every partition free. */
function table(board: Board): PartitionCandidate[] {
  const b200 = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [5, 6, 7, 8], [1, 2], [3, 4], [5, 6], [7, 8], [1], [2], [3], [4], [5], [6], [7], [8]];
  const h100 = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [5, 6, 7, 8], [1, 3], [2, 4], [5, 7], [6, 8], [1], [2], [3], [4], [5], [6], [7], [8]];
  const first = board === 'B200' ? 1 : 0;
  return (board === 'B200' ? b200 : h100).map((modules, i) => ({ partitionId: first + i, modules, state: 'free' }));
}

/** Single-module partition id on each board. */
const single = (board: Board, module: number) => (board === 'B200' ? 7 : 6) + module;

/**
 * A host whose `inUse` partitions run VMs (state 'ready', their modules claimed), with `quarantined`
 * modules, and other partitions put in the given states.
 */
function host(hostId: string, board: Board, o: { inUse?: number[]; quarantined?: number[]; states?: Record<number, string> } = {}): HostView {
  const partitions = table(board).map((p) => ({ ...p, state: o.inUse?.includes(p.partitionId) ? 'ready' : (o.states?.[p.partitionId] ?? 'free') }));
  const claimed = partitions.filter((p) => o.inUse?.includes(p.partitionId)).flatMap((p) => p.modules);
  return { hostId, board: `NVIDIA ${board}`, partitions, unavailable: new Set([...claimed, ...(o.quarantined ?? [])]) };
}

const MIX = { 1: 40, 2: 30, 4: 20, 8: 10 };

describe('capacityOf', () => {
  it('given an empty host of either board, when counted, then it holds 8 singles, 4 pairs, 2 quads, 1 whole', () => {
    for (const board of ['B200', 'H100'] as const) expect(capacityOf(host('h', board))).toEqual({ 1: 8, 2: 4, 4: 2, 8: 1 });
  });

  it('given an H100 with singles on modules 1 and 2, when counted, then both pairs of island 1–4 are gone', () => {
    const h = host('h', 'H100', { inUse: [single('H100', 1), single('H100', 2)] });
    expect(capacityOf(h)).toEqual({ 1: 6, 2: 2, 4: 1, 8: 0 });
  });

  it('given an H100 with singles on modules 1 and 3, when counted, then pair {2,4} is still there', () => {
    const h = host('h', 'H100', { inUse: [single('H100', 1), single('H100', 3)] });
    expect(capacityOf(h)).toEqual({ 1: 6, 2: 3, 4: 1, 8: 0 });
  });

  it('given a B200 with the same singles, when counted, then its pairs follow its own table', () => {
    expect(capacityOf(host('h', 'B200', { inUse: [single('B200', 1), single('B200', 2)] }))).toEqual({ 1: 6, 2: 3, 4: 1, 8: 0 });
    expect(capacityOf(host('h', 'B200', { inUse: [single('B200', 1), single('B200', 3)] }))).toEqual({ 1: 6, 2: 2, 4: 1, 8: 0 });
  });

  it('given a quarantined module, when counted, then every partition containing it is lost', () => {
    expect(capacityOf(host('h', 'B200', { quarantined: [5] }))).toEqual({ 1: 7, 2: 3, 4: 1, 8: 0 });
  });

  it('given partitions not free (quarantined, broken), when counted, then they do not count even with their modules available', () => {
    const h = host('h', 'H100', { states: { 0: 'quarantined', 3: 'broken', [single('H100', 8)]: 'quarantined' } });
    expect(capacityOf(h)).toEqual({ 1: 7, 2: 3, 4: 2, 8: 0 });
  });
});

describe('place', () => {
  it('given an empty B200, when placing, then the score is the expected GPUs of capacity lost minus n', () => {
    // A single breaks one pair, one quad and the whole: 0.4·1 + 0.3·2 + 0.2·4 + 0.1·8 − 1.
    expect(place([host('h', 'B200')], 1, MIX)?.chosen.score).toBeCloseTo(1.6, 9);
    // A whole host takes exactly what it uses.
    expect(place([host('h', 'B200')], 8, MIX)?.chosen.score).toBe(0);
  });

  it('given a B200 with a single on module 3, when placing another single, then it completes pair {3,4}: {1,2} and island 5–8 stay whole', () => {
    const d = place([host('h', 'B200', { inUse: [single('B200', 3)] })], 1, MIX)!;
    expect(d.chosen).toMatchObject({ hostId: 'h', partitionId: single('B200', 4), modules: [4] });
    expect(d.chosen.score).toBeCloseTo(-0.6, 9);
  });

  it('given an empty host and a host running a pair, when placing a quad, then it goes to the used host and the empty one stays whole', () => {
    const used = host('z-used', 'B200', { inUse: [4] });
    const d = place([host('a-empty', 'B200'), used], 4, MIX)!;
    expect(d.chosen).toMatchObject({ hostId: 'z-used', partitionId: 3, modules: [5, 6, 7, 8] });
  });

  it('given two hosts where the candidates lose the same, when placing, then the most used host wins over the lower id', () => {
    // Module 2 beside the single on 1 loses only itself on both hosts; 'b' also runs a pair on {5,6}.
    const less = host('a', 'B200', { inUse: [single('B200', 1)] });
    const more = host('b', 'B200', { inUse: [single('B200', 1), 6] });
    const d = place([less, more], 1, MIX)!;
    expect(d.chosen).toMatchObject({ hostId: 'b', partitionId: single('B200', 2) });
    expect(d.runnerUp).toMatchObject({ hostId: 'a', partitionId: single('B200', 2), score: d.chosen.score });
  });

  it('given an H100 with a single on module 1, when placing a second single, then it takes module 3 and keeps pair {2,4} alive', () => {
    const d = place([host('h', 'H100', { inUse: [single('H100', 1)] })], 1, MIX)!;
    expect(d.chosen).toMatchObject({ partitionId: single('H100', 3), modules: [3] });
    expect(capacityOf(host('h', 'H100', { inUse: [single('H100', 1), d.chosen.partitionId] }))[2]).toBe(3);
  });

  it('given a host where the single fills a hole and a fuller host where it breaks a pair, then the hole wins; the runner-up is the best on another partition', () => {
    const holey = host('h2', 'H100', { inUse: [single('H100', 1)] }); // module 3: −0.6
    const fuller = host('h1', 'B200', { inUse: [single('B200', 1), single('B200', 2)] }); // module 3 breaks {3,4}: 0
    const d = place([fuller, holey], 1, MIX)!;
    expect(d.chosen).toMatchObject({ hostId: 'h2', partitionId: single('H100', 3) });
    expect(d.chosen.score).toBeCloseTo(-0.6, 9);
    // At score 0: h2's module 2 (6 GPUs left free) and h1's module 3 (5 left): packing picks h1.
    expect(d.runnerUp).toEqual({ hostId: 'h1', partitionId: single('B200', 3), modules: [3], score: 0 });
    expect(d.policy).toMatch(/fgd/);
  });

  it('given a mix with no small VMs, when placing a pair, then the score weighs only the sizes in demand', () => {
    // Only 4s are asked for: any pair on an empty B200 loses one quad (4 GPUs) and uses 2.
    expect(place([host('h', 'B200')], 2, { 4: 1 })!.chosen.score).toBe(2);
    // An empty or all-zero mix is the default one.
    expect(place([host('h', 'B200')], 1, { 1: 0, 2: 0 })!.chosen.score).toBeCloseTo(1.6, 9);
  });

  it('given partitions not free, when placing, then only free ones are candidates', () => {
    const states = Object.fromEntries([1, 2, 3, 4, 5, 6, 7].map((m) => [single('B200', m), m % 2 ? 'quarantined' : 'broken']));
    const d = place([host('h', 'B200', { states })], 1, MIX)!;
    expect(d.chosen).toMatchObject({ partitionId: single('B200', 8), modules: [8] });
    expect(d.runnerUp).toBeNull();
    // A partition claimed by another VM is not free even if its modules were (wrongly) reported available.
    expect(place([host('h', 'B200', { states: { 1: 'claimed' } })], 8, MIX)).toBeNull();
  });

  it('given nothing that fits, when placing, then it returns null', () => {
    expect(place([], 1, MIX)).toBeNull();
    expect(place([host('h', 'B200', { quarantined: [8] })], 8, MIX)).toBeNull();
    expect(place([host('h', 'H100', { inUse: [single('H100', 1), single('H100', 2), 2] })], 4, MIX)).toBeNull();
    expect(place([host('h', 'H100', { inUse: [single('H100', 1), single('H100', 2)] }), host('g', 'B200', { inUse: [2, 3] })], 2, MIX)).toMatchObject({ chosen: { hostId: 'h', partitionId: 5 } });
  });

  it('given identical hosts, when placing in any input order, then ties go to the lowest host id, then partition id', () => {
    const hosts = [host('c', 'B200'), host('a', 'B200'), host('b', 'B200')];
    const d = place(hosts, 1, MIX)!;
    expect(d.chosen).toMatchObject({ hostId: 'a', partitionId: 8 });
    expect(d.runnerUp).toMatchObject({ hostId: 'a', partitionId: 9 });
    expect(place([...hosts].reverse(), 1, MIX)).toEqual(d);
  });
});

describe('choosePartition (one host)', () => {
  it('given the host table, when choosing, then it returns the table entry place() would claim', () => {
    const h = host('h', 'H100', { inUse: [single('H100', 1)] });
    const chosen = choosePartition(h.partitions, h.unavailable, 1);
    expect(chosen).toBe(h.partitions.find((p) => p.partitionId === single('H100', 3)));
    expect(choosePartition(h.partitions, h.unavailable, 8)).toBeNull();
    expect(choosePartition(h.partitions, h.unavailable, 3)).toBeNull();
  });
});
