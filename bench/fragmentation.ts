/**
 * Figure 7: fragmentation. A trace-driven simulation of a fleet of HGX hosts in Shared NVSwitch
 * Multitenancy — half with the B200 partition table, half with the H100 one — fed the same trace of
 * VM requests under each placement policy: gpuvm's `place()` (src/engine/placement.ts) against
 * Ubicloud's allocator, first-fit (the lowest partition id on the first host that fits), best-fit,
 * random, and an oracle that may repack every running VM (BENCHMARKS.md, figure 7, says why each).
 * No I/O: hosts are HostView objects whose partition states and unavailable modules change as VMs
 * come and go, as the placement query would report them.
 *
 *   node --import tsx bench/fragmentation.ts   # --seed=N --seeds=1 --hosts=300 --days=70 --warmup-days=14 --load=1.0
 *                                              # --mix=40,30,20,10 --median-hours=8 --sigma=1.5 --window=1000
 */
import { performance } from 'node:perf_hooks';
import { SHORTLIST } from '../src/engine/fleet.ts';
import { mulberry32 as rng } from '../src/seeded-random.ts';
import { capacityOf, place, type Demand, type GpuCount, type HostView, type PartitionCandidate } from '../src/engine/placement.ts';
import { fmt, option, printTable, runMain } from './lib.ts';

const SIZES: GpuCount[] = [1, 2, 4, 8];

// ── the fleet ────────────────────────────────────────────────────────────────

/** DESIGN.md §2.1: the default tables, in the order `fmpm -l` lists them (by partition id). */
const TABLES = {
  B200: { first: 1, modules: [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [5, 6, 7, 8], [1, 2], [3, 4], [5, 6], [7, 8], [1], [2], [3], [4], [5], [6], [7], [8]] },
  H100: { first: 0, modules: [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [5, 6, 7, 8], [1, 3], [2, 4], [5, 7], [6, 8], [1], [2], [3], [4], [5], [6], [7], [8]] },
};

interface SimHost {
  view: HostView;
  /** Available GPUs (8 minus claimed). */
  free: number;
}

/** Host i: B200 table when i is even, H100 when odd (alternating, so host order favours neither). */
function fleet(n: number): SimHost[] {
  return Array.from({ length: n }, (_, i) => {
    const board = i % 2 === 0 ? 'B200' : 'H100';
    const t = TABLES[board];
    const partitions: PartitionCandidate[] = t.modules.map((modules, k) => ({ partitionId: t.first + k, modules, state: 'free' }));
    return { view: { hostId: `h${String(i).padStart(4, '0')}`, board: `NVIDIA ${board}`, partitions, unavailable: new Set<number>() }, free: 8 };
  });
}

/** A free partition of exactly n modules, all available: what every policy may choose from. */
const fits = (h: HostView, p: PartitionCandidate, n: number): boolean => p.state === 'free' && p.modules.length === n && p.modules.every((m) => !h.unavailable.has(m));

// ── the trace ────────────────────────────────────────────────────────────────


interface Request {
  at: number; // hours
  gpus: GpuCount;
  hours: number;
}

interface TraceOptions {
  seed: number;
  hosts: number;
  hours: number;
  load: number;
  mix: number[];
  medianHours: number;
  sigma: number;
}

/**
 * Poisson arrivals at the rate that offers `load` × the fleet's GPUs on average; sizes drawn from
 * the mix by count; lifetimes lognormal (median, sigma), independent of size.
 */
function trace(o: TraceOptions): Request[] {
  const r = rng(o.seed);
  const total = o.mix.reduce((a, b) => a + b, 0);
  const p = o.mix.map((w) => w / total);
  const meanGpus = SIZES.reduce((s, n, k) => s + n * p[k]!, 0);
  const meanHours = o.medianHours * Math.exp((o.sigma * o.sigma) / 2);
  const rate = (o.load * o.hosts * 8) / (meanGpus * meanHours); // requests per hour
  const out: Request[] = [];
  for (let at = -Math.log(1 - r()) / rate; at < o.hours; at += -Math.log(1 - r()) / rate) {
    let u = r();
    let k = 0;
    while (k < SIZES.length - 1 && u >= p[k]!) u -= p[k++]!;
    const normal = Math.sqrt(-2 * Math.log(1 - r())) * Math.cos(2 * Math.PI * r());
    out.push({ at, gpus: SIZES[k]!, hours: o.medianHours * Math.exp(o.sigma * normal) });
  }
  return out;
}

// ── the policies ─────────────────────────────────────────────────────────────

interface Choice {
  host: number;
  partitionId: number;
}

interface Policy {
  name: string;
  /** Where to put a VM of n GPUs, or null; `demand` is the recent request mix. */
  choose(hosts: SimHost[], n: GpuCount, demand: Demand): Choice | null;
}

/** First host in host order that fits, lowest partition id there (= first in table order: `fmpm -l` lists by id). */
const firstFit: Policy = {
  name: 'first-fit',
  choose(hosts, n) {
    for (let i = 0; i < hosts.length; i++) {
      const h = hosts[i]!.view;
      const p = h.partitions.find((q) => fits(h, q, n));
      if (p) return { host: i, partitionId: p.partitionId };
    }
    return null;
  },
};

/**
 * Ubicloud's allocator (ubicloud/ubicloud scheduling/allocator.rb, read 2026-12): every host that
 * fits gets `score = target − u` (u = mean utilization after placement over CPU, memory, storage
 * and GPUs; `1 + (u − target)` once over target) + the spread of those utilizations + a random
 * 0–0.1, the lowest score wins, and on the host the lowest free partition id
 * (`GpuPartition.order(:partition_id)`). Here CPU, memory and storage are taken to grow with
 * the GPUs (an assumption: a VM's share of the host's GPUs), and its GPU term counts one GPU, as the code does (`(used + 1) /
 * total`). Target 0.72, random 0.1: the production config.
 */
function ubicloudAllocator(seed: number): Policy {
  const r = rng(seed);
  const target = 0.72;
  return {
    name: 'ubicloud allocator',
    choose(hosts, n) {
      let best: Choice | null = null;
      let bestScore = Infinity;
      for (let i = 0; i < hosts.length; i++) {
        const s = hosts[i]!;
        if (s.free < n) continue;
        const p = s.view.partitions.find((q) => fits(s.view, q, n));
        if (!p) continue;
        const used = 8 - s.free;
        const util = [(used + n) / 8, (used + n) / 8, (used + n) / 8, (used + 1) / 8];
        const u = util.reduce((a, b) => a + b, 0) / util.length;
        let score = target - u;
        if (score < 0) score = -score + 1;
        score += Math.max(...util) - Math.min(...util) + r() * 0.1;
        if (score < bestScore) {
          best = { host: i, partitionId: p.partitionId };
          bestScore = score;
        }
      }
      return best;
    },
  };
}

/** The host with the fewest free GPUs that fits (ties: host order), lowest partition id there. */
const bestFit: Policy = {
  name: 'best-fit',
  choose(hosts, n) {
    let best: Choice | null = null;
    let bestFree = Infinity;
    for (let i = 0; i < hosts.length; i++) {
      const s = hosts[i]!;
      if (s.free < n || s.free >= bestFree) continue;
      const p = s.view.partitions.find((q) => fits(s.view, q, n));
      if (p) {
        best = { host: i, partitionId: p.partitionId };
        bestFree = s.free;
      }
    }
    return best;
  },
};

/** A fitting (host, partition) pair drawn uniformly, from its own seeded generator. */
function randomPolicy(seed: number): Policy {
  const r = rng(seed);
  return {
    name: 'random',
    choose(hosts, n) {
      const all: Choice[] = [];
      hosts.forEach((s, i) => s.free >= n && s.view.partitions.forEach((p) => fits(s.view, p, n) && all.push({ host: i, partitionId: p.partitionId })));
      return all.length ? all[Math.floor(r() * all.length)]! : null;
    },
  };
}

/**
 * gpuvm: as the service places (src/engine/fleet.ts readCandidates, then place()): the SHORTLIST
 * most-used hosts that have a fitting partition, then place() over them with the recent mix.
 */
function gpuvmPolicy(timing: { calls: number; ms: number }): Policy {
  const index = new Map<string, number>();
  return {
    name: 'gpuvm place()',
    choose(hosts, n, demand) {
      if (index.size === 0) hosts.forEach((s, i) => index.set(s.view.hostId, i));
      const t0 = performance.now();
      const fitting = hosts.filter((s) => s.free >= n && s.view.partitions.some((p) => fits(s.view, p, n)));
      fitting.sort((a, b) => b.view.unavailable.size - a.view.unavailable.size || (a.view.hostId < b.view.hostId ? -1 : a.view.hostId > b.view.hostId ? 1 : 0));
      const d = place(
        fitting.slice(0, SHORTLIST).map((s) => s.view),
        n,
        demand,
      );
      timing.ms += performance.now() - t0;
      timing.calls++;
      return d ? { host: index.get(d.chosen.hostId)!, partitionId: d.chosen.partitionId } : null;
    },
  };
}

// ── the simulation ───────────────────────────────────────────────────────────

interface Result {
  policy: string;
  requests: number;
  refused: number;
  /** Refused while the fleet had at least n free GPUs: capacity was there, in the wrong shape. */
  fragRefused: number;
  fragBySize: Record<GpuCount, number>;
  gpuHours: number;
  /** Mean over daily samples of the fleet's free whole hosts (capacityOf(host)[8]), and of its free GPUs. */
  wholeHostsFree: number;
  freeGpus: number;
}

/** A binary min-heap of departures by time. */
class Departures {
  private readonly h: { at: number; host: number; partitionId: number; gpus: number }[] = [];
  get size(): number {
    return this.h.length;
  }
  peek() {
    return this.h[0];
  }
  push(x: { at: number; host: number; partitionId: number; gpus: number }): void {
    const h = this.h;
    h.push(x);
    for (let i = h.length - 1; i > 0; ) {
      const parent = (i - 1) >> 1;
      if (h[parent]!.at <= h[i]!.at) break;
      [h[parent], h[i]] = [h[i]!, h[parent]!];
      i = parent;
    }
  }
  pop() {
    const h = this.h;
    const top = h[0];
    const last = h.pop()!;
    if (h.length > 0) {
      h[0] = last;
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && h[l]!.at < h[m]!.at) m = l;
        if (r < h.length && h[r]!.at < h[m]!.at) m = r;
        if (m === i) break;
        [h[m], h[i]] = [h[i]!, h[m]!];
        i = m;
      }
    }
    return top;
  }
}

/**
 * Runs one policy over the trace. `null` policy = the oracle: it may repack every running VM, and
 * with sizes 1/2/4/8 on these tables a repack always succeeds (placing in decreasing size fills
 * each host's aligned islands, pairs and singles exactly), so it refuses only when the fleet has
 * fewer than n free GPUs.
 */
function simulate(policy: Policy | null, requests: Request[], o: { hosts: number; warmup: number; end: number; window: number }): { res: Result; hosts: SimHost[] } {
  const hosts = fleet(o.hosts);
  const departures = new Departures();
  let fleetFree = o.hosts * 8;
  const res: Result = { policy: policy?.name ?? 'oracle (repacks all)', requests: 0, refused: 0, fragRefused: 0, fragBySize: { 1: 0, 2: 0, 4: 0, 8: 0 }, gpuHours: 0, wholeHostsFree: 0, freeGpus: 0 };
  // The recent request mix, as place() would get it from the API's recent creates (asked, not served).
  const recent: GpuCount[] = [];
  const counts: Record<GpuCount, number> = { 1: 0, 2: 0, 4: 0, 8: 0 };
  let samples = 0;
  let nextSample = o.warmup;
  const release = (d: { host: number; partitionId: number; gpus: number }) => {
    fleetFree += d.gpus;
    if (!policy) return;
    const s = hosts[d.host]!;
    const p = s.view.partitions.find((q) => q.partitionId === d.partitionId)!;
    p.state = 'free';
    for (const m of p.modules) s.view.unavailable.delete(m);
    s.free += d.gpus;
  };
  for (const req of requests) {
    while (departures.size && departures.peek()!.at <= req.at) release(departures.pop()!);
    while (nextSample <= req.at && nextSample < o.end) {
      // Daily: what the fleet could still take, by capacityOf (partitions, not free GPUs).
      if (policy) res.wholeHostsFree += hosts.reduce((a, s) => a + capacityOf(s.view)[8], 0);
      res.freeGpus += fleetFree;
      samples++;
      nextSample += 24;
    }
    const measuring = req.at >= o.warmup;
    let choice: Choice | null = null;
    if (policy) {
      choice = policy.choose(hosts, req.gpus, counts);
      if (choice) {
        const s = hosts[choice.host]!;
        const p = s.view.partitions.find((q) => q.partitionId === choice!.partitionId)!;
        if (!fits(s.view, p, req.gpus)) throw new Error(`${policy.name} chose ${s.view.hostId}/${p.partitionId}, which does not fit`);
        p.state = 'ready';
        for (const m of p.modules) s.view.unavailable.add(m);
        s.free -= req.gpus;
      }
    }
    const accepted = policy ? choice !== null : fleetFree >= req.gpus;
    if (measuring) {
      res.requests++;
      if (!accepted) {
        res.refused++;
        if (fleetFree >= req.gpus) {
          res.fragRefused++;
          res.fragBySize[req.gpus]++;
        }
      }
    }
    if (accepted) {
      fleetFree -= req.gpus;
      departures.push({ at: req.at + req.hours, host: choice?.host ?? -1, partitionId: choice?.partitionId ?? -1, gpus: req.gpus });
      // GPU-hours inside the measured window [warmup, end].
      res.gpuHours += req.gpus * Math.max(0, Math.min(o.end, req.at + req.hours) - Math.max(o.warmup, req.at));
    }
    recent.push(req.gpus);
    counts[req.gpus]++;
    if (recent.length > o.window) counts[recent.shift()!]--;
  }
  res.wholeHostsFree /= samples || 1;
  res.freeGpus /= samples || 1;
  return { res, hosts };
}

/** place() on a fleet snapshot of `n` hosts: mean and p99 µs per call over every size. */
function timePlace(hosts: SimHost[], n: number, calls: number, demand: Demand): { hosts: number; mean: number; p99: number } {
  const views = hosts.slice(0, n).map((s) => s.view);
  const us: number[] = [];
  for (let i = 0; i < calls; i++) {
    const t0 = performance.now();
    place(views, SIZES[i % 4]!, demand);
    us.push((performance.now() - t0) * 1000);
  }
  us.sort((a, b) => a - b);
  return { hosts: views.length, mean: us.reduce((a, b) => a + b, 0) / us.length, p99: us[Math.floor(us.length * 0.99)]! };
}

/** Sums runs of one policy over several seeds (means for the sampled columns). */
function add(into: Result | undefined, r: Result, runs: number): Result {
  if (!into) return { ...r, fragBySize: { ...r.fragBySize }, wholeHostsFree: r.wholeHostsFree / runs, freeGpus: r.freeGpus / runs };
  into.requests += r.requests;
  into.refused += r.refused;
  into.fragRefused += r.fragRefused;
  for (const n of SIZES) into.fragBySize[n] += r.fragBySize[n];
  into.gpuHours += r.gpuHours;
  into.wholeHostsFree += r.wholeHostsFree / runs;
  into.freeGpus += r.freeGpus / runs;
  return into;
}

async function main(): Promise<void> {
  const seed = option('seed', 20261124);
  const seeds = option('seeds', 1);
  const base = {
    hosts: option('hosts', 300),
    hours: option('days', 70) * 24,
    load: option('load', 1.0),
    mix: option('mix', '40,30,20,10').split(',').map(Number),
    medianHours: option('median-hours', 8),
    sigma: option('sigma', 1.5),
  };
  const warmup = option('warmup-days', 14) * 24;
  const window = option('window', 1000);
  if (base.mix.length !== 4 || base.mix.some((w) => !(w >= 0))) throw new Error('--mix takes 4 weights, for 1, 2, 4 and 8 GPUs');
  const started = performance.now();
  console.log(
    `seed ${seed}${seeds > 1 ? ` … ${seed + seeds - 1} (${seeds} traces, summed)` : ''} (--seed=N / BENCH_SEED, --seeds=K); ${base.hosts} hosts (B200 and H100 tables alternating), ${base.hours / 24} days, the first ${warmup / 24} not measured`,
  );
  const timing = { calls: 0, ms: 0 };
  const sim = { hosts: base.hosts, warmup, end: base.hours, window };
  let totals: (Result | undefined)[] = [];
  let gpuvmHosts: SimHost[] = [];
  for (let k = 0; k < seeds; k++) {
    const requests = trace({ ...base, seed: seed + k });
    const byGpus = SIZES.map((n) => requests.filter((r) => r.gpus === n).length);
    console.log(
      `  trace ${seed + k}: ${requests.length} requests (1/2/4/8 GPUs: ${byGpus.join('/')}), offered load ${base.load} × ${base.hosts * 8} GPUs, lifetimes lognormal median ${base.medianHours} h, sigma ${base.sigma} (mean ${fmt(base.medianHours * Math.exp((base.sigma * base.sigma) / 2))} h)`,
    );
    // The random policies draw from their own generators, so the trace stays the same for all.
    const policies: (Policy | null)[] = [ubicloudAllocator(seed + k + 1000), firstFit, bestFit, randomPolicy(seed + k + 2000), gpuvmPolicy(timing), null];
    const runs = policies.map((p) => simulate(p, requests, sim));
    totals = runs.map((r, i) => add(totals[i], r.res, seeds));
    gpuvmHosts = runs[4]!.hosts;
  }
  const results = totals as Result[];
  const [ubi, ff] = [results[0]!, results[1]!];
  const oracle = results.at(-1)!;
  const ratio = (a: number, b: number) => (b === 0 ? (a === 0 ? '–' : '∞') : `${fmt(a / b, 2)}×`);
  printTable(
    `Same trace${seeds > 1 ? 's' : ''}, ${ubi.requests} measured requests; fragmentation refusal = refused while the fleet had ≥ n free GPUs`,
    results.map((r) => ({
      policy: r.policy,
      'frag. refusals': r.fragRefused,
      '1/2/4/8': SIZES.map((n) => r.fragBySize[n]).join('/'),
      'vs ubicloud': ratio(r.fragRefused, ubi.fragRefused),
      'vs first-fit': ratio(r.fragRefused, ff.fragRefused),
      'all refusals': r.refused,
      '% refused': fmt((100 * r.refused) / r.requests, 2),
      'GPU-hours served': Math.round(r.gpuHours),
      'of oracle': `${fmt((100 * r.gpuHours) / oracle.gpuHours, 2)} %`,
      'free GPUs': fmt(r.freeGpus, 0),
      'whole hosts free': r.policy.startsWith('oracle') ? '–' : fmt(r.wholeHostsFree, 1),
    })),
  );
  console.log('  (free GPUs, whole hosts free: means of daily samples; whole hosts by capacityOf(host)[8])');
  // Speed: the calls made in the simulation, then a 64-host snapshot of the last gpuvm run's end state.
  const t64 = timePlace(gpuvmHosts, 64, 4000, { 1: 4, 2: 3, 4: 2, 8: 1 });
  console.log(
    `\nplace(): ${fmt((1000 * timing.ms) / timing.calls, 0)} µs per call over ${base.hosts} hosts (${timing.calls} calls in the simulation); ${t64.hosts} hosts × 15 partitions: mean ${fmt(t64.mean, 0)} µs, p99 ${fmt(t64.p99, 0)} µs`,
  );
  console.log(`run time ${fmt((performance.now() - started) / 1000, 1)} s`);
}

runMain(import.meta.url, main);
