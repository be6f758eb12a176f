/**
 * `gpuvm doctor`: checks the host's prerequisites and prints each with its fix. It runs in the CLI
 * process against the host adapters directly (no service, no database), so it works before the
 * first `gpuvm serve` and while one runs. Exit code 1 when any check fails.
 */
import type { Command } from 'commander';
import { resolve } from 'node:path';
import pino from 'pino';
import { loadConfig } from '../config.ts';
import { runDoctor, type CheckResult } from '../host/doctor.ts';
import { openSimulatedHost } from '../host/host.ts';
import { loadHostConfig, openRealHost } from '../host/host-config.ts';
import { createLogger } from '../log.ts';
import { table } from './format.ts';

/** The human report: one row per check, and the fix under every warning or failure. */
export function formatDoctorReport(results: CheckResult[]): string {
  const lines = table(
    ['STATUS', 'CHECK', 'DETAIL'],
    results.map((r) => [r.status.toUpperCase(), r.id, r.detail]),
  ).split('\n');
  const out = [lines[0]!];
  results.forEach((r, i) => {
    out.push(lines[i + 1]!);
    if (r.status !== 'pass' && r.fix) out.push(`      FIX: ${r.fix}`);
  });
  const count = (s: CheckResult['status']) => results.filter((r) => r.status === s).length;
  out.push('', `${count('pass')} passed, ${count('warn')} warnings, ${count('fail')} failed`);
  return out.join('\n');
}

export function registerDoctor(cli: Command): void {
  cli
    .command('doctor')
    .description('check the host: IOMMU, vfio, Fabric Manager (reachable, mode 1, version), open kernel module, NVLSM, QEMU, GPU fabric state, Xid lines')
    .option('--json', 'print the checks as JSON')
    .option('--config <file>', 'check the real host this file describes (see docs/real-host.md); default: the simulated host')
    .option('--data-dir <dir>', 'where the simulated host lives (default ./.gpuvm)')
    .option('--host-id <id>', 'this host (default sim-b200)')
    .option('--kernel-log <file>', 'the kernel log to scan for Xid lines (default <host root>/var/log/kern.log)')
    .option('--require-nvidia-blacklist', 'also require "blacklist nvidia" in /etc/modprobe.d')
    .action(async (o) => {
      const config = loadConfig({ dataDir: o.dataDir, hostId: o.hostId });
      // stdout carries the report (or the JSON); adapter logs go to stderr, errors only.
      const log = createLogger('error', pino.destination({ dest: 2, sync: true }));
      const host = o.config
        ? openRealHost(await loadHostConfig(o.config), { bindTimeoutMs: config.bindTimeoutMs, toolTimeoutMs: config.toolTimeoutMs })
        : await openSimulatedHost(
            { hostId: config.hostId, dataDir: config.dataDir, qemuBin: config.qemuBin, bindTimeoutMs: config.bindTimeoutMs, toolTimeoutMs: config.toolTimeoutMs },
            log,
          );
      const results = await runDoctor(host, {
        ...(o.kernelLog === undefined ? {} : { kernelLog: resolve(o.kernelLog) }),
        ...(o.requireNvidiaBlacklist ? { requireNvidiaBlacklist: true } : {}),
      });
      process.stdout.write(`${o.json ? JSON.stringify(results, null, 2) : formatDoctorReport(results)}\n`);
      // exitCode rather than exit(): stdout may be a pipe still being written.
      if (results.some((r) => r.status === 'fail')) process.exitCode = 1;
    });
}
