/**
 * Figure 2 — step hand-off latency: from an effect becoming due to its handler starting, under
 * load (16 concurrent lifecycles on two in-memory hosts, Postgres; see bench/lifecycle.ts).
 *
 * "Due" is the commit of the transaction that inserted the effect (or its due_at, for a durable
 * timer, if later). "Handler starts" is when the worker's claim returns it — the worker launches
 * the handler in that same tick — or, for an effect handed over directly (born leased to, or
 * claimed by, the worker whose transaction inserted it: its first try's started_at equals its
 * created_at), when that transaction's COMMIT returns, which is when the worker launches it.
 * Nothing in src/ is changed to measure it; three clocks are read, and each figure names its own:
 *
 *   client:  this process's round-trip recorder (bench/lib.ts) notes when the inserting
 *            transaction sent COMMIT and when its answer came back, and when the claim that
 *            returned the effect came back. The commit happens between "sent" and "answered", so
 *            claim − sent is an upper bound of the hand-off and claim − answered a lower bound.
 *   timers:  a timer (powerdownTimer) is due at due_at, written by the database (its now() +
 *            delay); the server is on this machine, so due_at and the client clock read the same
 *            system clock: claim returned − due_at.
 *   server:  effect_attempts.started_at (the claim statement's now()) − effects.due_at (now() of
 *            the inserting transaction, i.e. its start): an upper bound that also counts the rest
 *            of the inserting transaction; kept as a cross-check needing no client clock.
 *
 *   node --import tsx bench/handoff.ts [--handoff-concurrency=16] [--handoff-lifecycles=800]
 */
import { sql } from 'kysely';
import { measureGpuvm, printGaps } from './lifecycle.ts';
import { BENCH_MARK, dropStaleDatabases, fmt, isMain, option, printTable, roundTrips, summarize, type Summary } from './lib.ts';

interface EffectTimes {
  id: string;
  type: string;
  due_ms: number;
  created_ms: number;
  started_ms: number | null;
}

export interface HandoffResult {
  concurrency: number;
  lifecycles: number;
  /** Every immediate effect, client clock: handler start − COMMIT sent (upper bound). */
  upper: Summary;
  /** Every immediate effect, client clock: handler start − COMMIT answered (lower bound). */
  lower: Summary;
  /** Effects handed over directly (born leased to, or claimed by, the worker whose transaction
   *  inserted them): upper bound only — the lower bound is 0 by construction. */
  direct: Summary;
  /** Effects found through NOTIFY → wake → claim: upper and lower bounds. */
  notifyUpper: Summary;
  notifyLower: Summary;
  /** Durable timers: claim returned − due_at. */
  timers: Summary;
  /** Server clock, NOTIFY path: claim's now() − inserting transaction's now() (upper bound). */
  server: Summary;
  byType: { type: string; path: string; upper: Summary }[];
  unmatched: number;
  lifecyclesPerSec: number;
}

export async function measureHandoff(opts: { concurrency: number; lifecycles: number }): Promise<HandoffResult & { measurement: Awaited<ReturnType<typeof measureGpuvm<EffectTimes[]>>> }> {
  roundTrips();
  const m = await measureGpuvm<EffectTimes[]>({
    kind: 'postgres',
    concurrency: opts.concurrency,
    lifecycles: opts.lifecycles,
    recordEffects: true,
    label: `postgres c=${opts.concurrency} (hand-off)`,
    inspect: async (g) =>
      (
        await sql<EffectTimes>`${sql.raw(BENCH_MARK)}
          select e.id, e.type, extract(epoch from e.due_at) * 1000 as due_ms, extract(epoch from e.created_at) * 1000 as created_ms,
                 extract(epoch from a.started_at) * 1000 as started_ms
          from effects e left join effect_attempts a on a.effect_id = e.id and a.attempt = 1`.execute(g.db)
      ).rows,
  });
  const all = { upper: [] as number[], lower: [] as number[] };
  const direct: number[] = [];
  const notify = { upper: [] as number[], lower: [] as number[] };
  const timers: number[] = [];
  const server: number[] = [];
  const byType = new Map<string, number[]>();
  let unmatched = 0;
  for (const e of m.inspected ?? []) {
    const commit = m.effects.commits.get(e.id);
    if (!commit) continue; // not inserted during the measured run (warm-up)
    const dueMs = Number(e.due_ms);
    const createdMs = Number(e.created_ms);
    // Claimed in the transaction that inserted it (its try started at that transaction's now()):
    // the worker launches it when that COMMIT returns.
    const handedOver = e.started_ms !== null && Math.abs(Number(e.started_ms) - createdMs) < 0.001;
    const start = handedOver ? commit.acked : m.effects.claims.get(e.id);
    if (start === undefined) {
      unmatched++;
      continue;
    }
    if (dueMs - createdMs > 0.5) {
      timers.push(start - Math.max(dueMs, commit.sent));
      continue;
    }
    const upper = start - commit.sent;
    const lower = start - commit.acked;
    all.upper.push(upper);
    all.lower.push(lower);
    if (handedOver) direct.push(upper);
    else {
      notify.upper.push(upper);
      notify.lower.push(lower);
      if (e.started_ms !== null) server.push(Number(e.started_ms) - dueMs);
    }
    const key = `${e.type}\u0000${handedOver ? 'direct' : 'NOTIFY → claim'}`;
    if (!byType.has(key)) byType.set(key, []);
    byType.get(key)!.push(upper);
  }
  return {
    concurrency: opts.concurrency,
    lifecycles: opts.lifecycles,
    upper: summarize(all.upper),
    lower: summarize(all.lower),
    direct: summarize(direct),
    notifyUpper: summarize(notify.upper),
    notifyLower: summarize(notify.lower),
    timers: summarize(timers),
    server: summarize(server),
    byType: [...byType]
      .map(([key, v]) => ({ type: key.split('\u0000')[0]!, path: key.split('\u0000')[1]!, upper: summarize(v) }))
      .sort((a, b) => b.upper.p99 - a.upper.p99),
    unmatched,
    lifecyclesPerSec: m.run.lifecyclesPerSec,
    measurement: m,
  };
}

const row = (what: string, s: Summary) => ({ measure: what, n: s.n, p50: fmt(s.p50, 2), p90: fmt(s.p90, 2), p99: fmt(s.p99, 2), max: fmt(s.max, 2), mean: fmt(s.mean, 2) });

export function printHandoff(r: HandoffResult): void {
  printTable(`figure 2: step hand-off latency, ms, ${r.concurrency} concurrent lifecycles (${r.lifecycles} lifecycles, ${fmt(r.lifecyclesPerSec, 2)}/s)`, [
    row('all effects: handler start − COMMIT sent (upper bound)', r.upper),
    row('all effects: handler start − COMMIT answered (lower bound)', r.lower),
    row('  handed over in the inserting tx: COMMIT round trip (upper)', r.direct),
    row('  NOTIFY → claim: claim returned − COMMIT sent (upper)', r.notifyUpper),
    row('  NOTIFY → claim: claim returned − COMMIT answered (lower)', r.notifyLower),
    row('timers: claim returned − due_at', r.timers),
    row('server clock, NOTIFY path: claim now() − inserting tx now()', r.server),
  ]);
  printTable(
    'by effect type and path (upper bound, ms), worst p99 first',
    r.byType.map((t) => ({ effect: t.type, path: t.path, n: t.upper.n, p50: fmt(t.upper.p50, 2), p99: fmt(t.upper.p99, 2), max: fmt(t.upper.max, 2) })),
  );
  if (r.unmatched > 0) console.log(`  ${r.unmatched} effect(s) inserted during the run had no claim recorded`);
  const p99 = r.upper.p99;
  console.log(`\nfigure 2 goal: p99 < 10 ms — upper-bound p99 ${fmt(p99, 2)} ms, lower-bound p99 ${fmt(r.lower.p99, 2)} ms: ${p99 < 10 ? 'met' : r.lower.p99 < 10 ? 'met on the lower bound only' : 'missed'}`);
}

async function main(): Promise<void> {
  await dropStaleDatabases();
  // Own option names: bench/run.ts passes every flag to every figure (--concurrency is a list in lifecycle.ts).
  const concurrency = option('handoff-concurrency', 16);
  // Long enough for steady state: a short run measures start-up (JIT, first prepares) as much as hand-offs.
  const r = await measureHandoff({ concurrency, lifecycles: option('handoff-lifecycles', Math.max(100, 50 * concurrency)) });
  printHandoff(r);
  printGaps(r.measurement);
}

if (isMain(import.meta.url)) {
  main().catch((err) => {
    console.error(err);
    process.exitCode = 1;
  });
}
