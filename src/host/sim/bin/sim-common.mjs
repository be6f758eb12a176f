/**
 * What every simulated host tool starts with: the simulated host's folder (GPUVM_SIM_ROOT, set by the
 * wrapper script in <simRoot>/bin/) and JSON reads that fail the way a tool does — a message on
 * stderr and exit code 2 — rather than with a stack trace.
 */
import fs from 'node:fs';

/** The sim root, or exit 2 naming the tool when it is run directly instead of through its wrapper. */
export function simRoot(tool) {
  const root = process.env.GPUVM_SIM_ROOT;
  if (!root) {
    process.stderr.write(`${tool} (gpuvm simulator): GPUVM_SIM_ROOT is not set; run it through <simRoot>/bin/${tool}\n`);
    process.exit(2);
  }
  return root;
}

/** Parsed JSON; `fallback` when the file does not exist (if given); exit 2 on anything else. */
export function readJson(tool, file, fallback) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    if (err && err.code === 'ENOENT' && fallback !== undefined) return fallback;
    process.stderr.write(`${tool} (gpuvm simulator): cannot read ${file}: ${err.message}\n`);
    process.exit(2);
  }
}
