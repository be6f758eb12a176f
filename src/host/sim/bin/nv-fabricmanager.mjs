#!/usr/bin/env node
/**
 * Simulated `nv-fabricmanager` for a simulated HGX host: only what `gpuvm doctor` asks of it,
 * `--version` / `-v`, printed as the real binary prints it (`Fabric Manager version is : 580.95.05`).
 * The version is host.json `fabricManagerVersion` (else `driverVersion`); faults.json
 * `fabricManager.version` overrides it, to simulate a Fabric Manager that differs from the guest
 * image's driver. The simulated host runs no daemon (the fmpm simulator plays Fabric Manager), so
 * any other invocation says so and exits 1. Node builtins only.
 */
import path from 'node:path';
import { readJson as readJsonOrExit, simRoot } from './sim-common.mjs';

const TOOL = 'nv-fabricmanager';
const root = simRoot(TOOL);
const readJson = (file, fallback) => readJsonOrExit(TOOL, file, fallback);

const args = process.argv.slice(2);
if (args.length === 1 && (args[0] === '-v' || args[0] === '--version')) {
  const host = readJson(path.join(root, 'host.json'));
  const faults = readJson(path.join(root, 'faults.json'), {});
  const injected = faults && typeof faults.fabricManager === 'object' && faults.fabricManager !== null ? faults.fabricManager.version : undefined;
  const version = typeof injected === 'string' && injected !== '' ? injected : (host.fabricManagerVersion ?? host.driverVersion);
  if (typeof version !== 'string' || version === '') {
    process.stderr.write(`nv-fabricmanager (gpuvm simulator): ${path.join(root, 'host.json')} names no fabricManagerVersion or driverVersion\n`);
    process.exit(2);
  }
  process.stdout.write(`Fabric Manager version is : ${version}\n`);
  process.exit(0);
}

process.stderr.write(
  `nv-fabricmanager (gpuvm simulator): only --version is simulated; the simulated host runs no Fabric Manager daemon (its fmpm simulator answers for it). Got: ${JSON.stringify(args)}\n`,
);
process.exit(1);
