/**
 * Placement across a fleet: which host and which Fabric Manager partition a VM of n GPUs gets.
 * Pure and in memory; the guarantee is in the database: the claim rows' primary key (host,
 * module) and the partition stream's version make two concurrent requests collide, and the loser
 * decides again on fresh state.
 *
 * A candidate is a partition of exactly n modules whose state is 'free' and whose modules are all
 * available (not claimed by a partition in use, not quarantined). The tables come from each host
 * (`fmpm -l`), never from the board name: B200 and H100 tables differ (H100's pairs {1,3} and
 * {2,4} interleave inside the island 1–4, B200's {1,2} and {3,4} do not).
 *
 * Policy: partition-aware fragmentation gradient descent (FGD, Weng et al., USENIX ATC '23), then
 * packing. A host's fragmentation under the request mix p (the recent demand, normalised) is the
 * expected number of its free GPUs a request drawn from p could not use:
 *
 *   F(host) = Σ_s p(s) · (free GPUs − s · cap_s)
 *
 * where cap_s is capacityOf(host)[s]: disjoint free partitions of size s, so partition-aware (on an
 * H100, singles on modules 1 and 2 leave two free GPUs in the island but no pair). The **score** of
 * a candidate is how much placing the VM there changes F of its host:
 *
 *   score = F(after) − F(before) = Σ_s p(s) · s · (cap_s before − cap_s after) − n
 *
 * in GPUs, lower is better, and it may be negative: −n + (expected GPUs of placeable capacity
 * lost). 0 = the VM took exactly what it used (an 8-GPU VM on an empty host; a single beside
 * another in an island whose pairs are all gone already); positive = it also broke larger
 * partitions the mix asks for; negative = it used GPUs the mix could not have used anyway (the
 * leftovers of a broken pair or island), which is what a good placement looks for. An incident
 * reviewer compares it with the runner-up's (the next best candidate, on another partition or
 * host): "chose a score of −0.6 over 1.6" reads as "filled a hole instead of breaking a whole
 * host".
 *
 * Ties (equal score) go to packing: the host left with the fewest free GPUs (the most used one), so
 * empty hosts and whole 8-GPU islands stay whole; then the lowest host id, then the lowest
 * partition id. Deterministic for a given input.
 *
 * On the two default tables a candidate's losses are nested (a single that breaks a quad also
 * breaks its pair, one that breaks the whole host also breaks its quad), so for any mix that
 * weighs every size the ranking is "break the smallest block you can", and the mix sets the score's
 * value, not the order. It changes the order when a size is absent from the mix, and on tables
 * that are not nested.
 *
 * Cost: per host one pass over its table, and per candidate one pass to recount capacities with
 * bit masks (module m is bit m − 1): about 0.1 ms for 64 hosts × 15 partitions.
 */
export const GPU_COUNTS = [1, 2, 4, 8] as const;

export type GpuCount = 1 | 2 | 4 | 8;

export interface PartitionCandidate {
  partitionId: number;
  modules: number[];
  state: string;
}

export interface HostView {
  hostId: string;
  /** Product name, e.g. 'NVIDIA B200'; informative only: the table below is what placement reads. */
  board: string;
  /** The host's whole table with each partition's state. */
  partitions: PartitionCandidate[];
  /** Modules claimed or quarantined. */
  unavailable: Set<number>;
}

/** Recent request mix: relative weight of each size (need not sum to 1; all-zero/empty means a default mix). */
export type Demand = Partial<Record<GpuCount, number>>;

export interface Placement {
  hostId: string;
  partitionId: number;
  modules: number[];
  /** Change of the host's expected unplaceable GPUs under the mix (see the file comment); lower is better. */
  score: number;
}

export interface PlacementDecision {
  policy: string;
  chosen: Placement;
  runnerUp: Placement | null;
}

export const POLICY = 'partition-fgd: min Δ expected unplaceable GPUs; ties: fewest free GPUs left on host, host id, partition id';

/**
 * The mix used when no recent demand is known: 40/30/20/10 by count for 1/2/4/8 GPUs, many small
 * VMs and a few whole hosts (the assumption bench/fragmentation.ts also runs with).
 */
export const DEFAULT_DEMAND: Record<GpuCount, number> = { 1: 0.4, 2: 0.3, 4: 0.2, 8: 0.1 };

/** The mix as probabilities over GPU_COUNTS; negative or non-finite weights count as 0. */
export function demandWeights(demand: Demand): Record<GpuCount, number> {
  const w = GPU_COUNTS.map((s) => {
    const v = demand[s];
    return v !== undefined && Number.isFinite(v) && v > 0 ? v : 0;
  });
  const total = w.reduce((a, b) => a + b, 0);
  if (total === 0) return { ...DEFAULT_DEMAND };
  return { 1: w[0]! / total, 2: w[1]! / total, 4: w[2]! / total, 8: w[3]! / total };
}

// ── one host's table as bit masks ────────────────────────────────────────────

interface Part {
  p: PartitionCandidate;
  mask: number;
  size: number;
}

interface Table {
  /** Partitions whose state is 'free' and whose modules are all available. */
  eligible: Part[];
  /** Available modules of the host (in any partition of its table). */
  avail: number;
  /** Per size in GPU_COUNTS: are the table's partitions of that size pairwise disjoint (the usual case)? */
  disjoint: boolean[];
}

function moduleBit(m: number): number {
  if (!Number.isInteger(m) || m < 1 || m > 31) throw new RangeError(`module id ${m} outside 1–31`);
  return 1 << (m - 1);
}

function readTable(host: HostView): Table {
  let all = 0;
  let unavailable = 0;
  for (const m of host.unavailable) if (Number.isInteger(m) && m >= 1 && m <= 31) unavailable |= moduleBit(m);
  const parts: Part[] = [];
  const seen = GPU_COUNTS.map(() => 0);
  const disjoint = GPU_COUNTS.map(() => true);
  for (const p of host.partitions) {
    let mask = 0;
    for (const m of p.modules) mask |= moduleBit(m);
    all |= mask;
    const k = GPU_COUNTS.indexOf(p.modules.length as GpuCount);
    if (k >= 0) {
      if (seen[k]! & mask) disjoint[k] = false;
      seen[k]! |= mask;
    }
    parts.push({ p, mask, size: p.modules.length });
  }
  const avail = all & ~unavailable;
  const eligible = parts.filter((x) => x.p.state === 'free' && (x.mask & ~avail) === 0);
  return { eligible, avail, disjoint };
}

/** Most pairwise-disjoint masks among `masks` (exact; only reached for tables with overlapping partitions of one size). */
function maxDisjoint(masks: number[], i = 0, used = 0): number {
  if (i >= masks.length) return 0;
  const skip = maxDisjoint(masks, i + 1, used);
  const m = masks[i]!;
  return m & used ? skip : Math.max(skip, 1 + maxDisjoint(masks, i + 1, used | m));
}

/** Capacity per size (index into GPU_COUNTS) of the eligible partitions that avoid `taken`. */
function capacities(t: Table, taken: number, out: number[]): number[] {
  out.fill(0);
  let overlapping: number[][] | null = null;
  for (const x of t.eligible) {
    if (x.mask & taken) continue;
    const k = GPU_COUNTS.indexOf(x.size as GpuCount);
    if (k < 0) continue;
    if (t.disjoint[k]) out[k]!++;
    else ((overlapping ??= GPU_COUNTS.map(() => []))[k]!).push(x.mask);
  }
  if (overlapping) overlapping.forEach((masks, k) => masks.length && (out[k] = maxDisjoint(masks)));
  return out;
}

function popcount(x: number): number {
  let n = 0;
  for (; x; x &= x - 1) n++;
  return n;
}

// ── the policy ───────────────────────────────────────────────────────────────

/** Per size, how many VMs of that size can be placed on this host now (max number of disjoint free partitions of that size whose modules are all available). Never "free GPUs ≥ n". */
export function capacityOf(host: HostView): Record<GpuCount, number> {
  const c = capacities(readTable(host), 0, [0, 0, 0, 0]);
  return { 1: c[0]!, 2: c[1]!, 4: c[2]!, 8: c[3]! };
}

interface Ranked extends Placement {
  /** Packing key: available GPUs left on the host after this placement. */
  freeAfter: number;
}

function better(a: Ranked, b: Ranked): boolean {
  if (a.score !== b.score) return a.score < b.score;
  if (a.freeAfter !== b.freeAfter) return a.freeAfter < b.freeAfter;
  if (a.hostId !== b.hostId) return a.hostId < b.hostId;
  return a.partitionId < b.partitionId;
}

/** Rounded so that sums of the same terms in another order compare equal (ties stay ties). */
const round = (x: number): number => Math.round(x * 1e9) / 1e9 + 0;

export function place(hosts: HostView[], size: GpuCount, demand: Demand): PlacementDecision | null {
  const p = demandWeights(demand);
  const weight = GPU_COUNTS.map((s) => p[s] * s); // GPUs of expected use per partition of size s
  let best: Ranked | null = null;
  let second: Ranked | null = null;
  const before = [0, 0, 0, 0];
  const after = [0, 0, 0, 0];
  for (const host of hosts) {
    const t = readTable(host);
    let computed = false;
    for (const x of t.eligible) {
      if (x.size !== size) continue;
      if (!computed) {
        capacities(t, 0, before);
        computed = true;
      }
      capacities(t, x.mask, after);
      let lost = 0;
      for (let k = 0; k < GPU_COUNTS.length; k++) lost += weight[k]! * (before[k]! - after[k]!);
      const c: Ranked = {
        hostId: host.hostId,
        partitionId: x.p.partitionId,
        modules: [...x.p.modules].sort((a, b) => a - b),
        score: round(lost - size),
        freeAfter: popcount(t.avail & ~x.mask),
      };
      if (!best || better(c, best)) {
        second = best;
        best = c;
      } else if (!second || better(c, second)) second = c;
    }
  }
  if (!best) return null;
  const strip = ({ freeAfter: _, ...rest }: Ranked): Placement => rest;
  return { policy: POLICY, chosen: strip(best), runnerUp: second ? strip(second) : null };
}

/**
 * Single-host placement (the callers that know their host): the partition to claim, or null. The
 * same policy as place(), with the default mix.
 */
export function choosePartition(all: PartitionCandidate[], unavailableModules: Set<number>, size: number): PartitionCandidate | null {
  if (!GPU_COUNTS.includes(size as GpuCount)) return null;
  const d = place([{ hostId: '', board: '', partitions: all, unavailable: unavailableModules }], size as GpuCount, {});
  return d ? (all.find((p) => p.partitionId === d.chosen.partitionId) ?? null) : null;
}
