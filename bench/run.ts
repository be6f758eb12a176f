/**
 * Runs every figure script in turn, each in its own Node process (a fresh heap, and DBOS is a
 * per-process singleton), passing the command-line options through. Scripts not written yet are
 * skipped with a note.
 *
 *   node --import tsx bench/run.ts [options passed to every figure, e.g. --lifecycles-16=320]
 *
 * Figures 1 and 6 (bench/lifecycle.ts) run their references — DBOS Transact and pgbench — in the
 * same invocation, so each ratio is measured side by side.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const FIGURES: { script: string; what: string }[] = [
  { script: 'lifecycle.ts', what: 'figures 1 and 6: lifecycle throughput on Postgres and PGlite, against DBOS and pgbench' },
  { script: 'handoff.ts', what: 'figure 2: step hand-off latency under load' },
  { script: 'recovery.ts', what: 'figure 3: recovery after SIGKILL' },
  { script: 'replay.ts', what: 'figure 4: replay rate' },
  { script: 'qemu-overhead.ts', what: 'figure 5: real QEMU overhead' },
  { script: 'fragmentation.ts', what: 'figure 7: fragmentation, a fleet simulation through the real placement' },
  { script: 'placement-scale.ts', what: 'figure 8: create latency with 1, 10, 100 and 1,000 hosts' },
  { script: 'agents-throughput.ts', what: 'figure 9: lifecycles/s with 1, 2, 4 and 8 agents, placed fleet-wide' },
];

const tsx = createRequire(import.meta.url).resolve('tsx');

function runScript(file: string): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', tsx, file, ...process.argv.slice(2)], { stdio: 'inherit' });
    child.on('exit', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
    child.on('error', () => resolve(1));
  });
}

async function main(): Promise<void> {
  const outcomes: { script: string; result: string }[] = [];
  for (const f of FIGURES) {
    const file = fileURLToPath(new URL(`./${f.script}`, import.meta.url));
    if (!existsSync(file)) {
      outcomes.push({ script: f.script, result: 'not written yet' });
      continue;
    }
    console.log(`\n════ bench/${f.script} — ${f.what}\n`);
    const started = Date.now();
    const code = await runScript(file);
    outcomes.push({ script: f.script, result: `${code === 0 ? 'ok' : `failed (exit ${code})`} in ${((Date.now() - started) / 1000).toFixed(0)} s` });
  }
  console.log('\n════ summary');
  for (const o of outcomes) console.log(`  bench/${o.script.padEnd(18)} ${o.result}`);
  if (outcomes.some((o) => o.result.startsWith('failed'))) process.exitCode = 1;
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
