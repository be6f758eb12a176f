/**
 * `gpuvm serve --config FILE` (real-host mode), driven against a simulated host's executables and
 * sysfs folder: registration from the configured binaries, and refusals at start that name the field.
 */
import { execFile } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QEMU_STANDIN } from '../src/host/host.ts';
import { createSimHost, type SimHostInfo } from '../src/host/sim/sim-host.ts';
import { freePort, http, startServeChild } from './support/child.ts';
import { freshDatabaseUrl, tempDir, usingPostgres } from './support/env.ts';

const BIN = fileURLToPath(new URL('../bin/gpuvm.js', import.meta.url));
const dir = tempDir();
let sim: SimHostInfo;

async function serveFails(configFile: string): Promise<string> {
  try {
    await promisify(execFile)(process.execPath, [BIN, 'serve', '--config', configFile, '--port', '0', '--data-dir', join(dir, 'data-fail')], { timeout: 60_000 });
  } catch (err) {
    const e = err as { code: number; stderr: string };
    expect(e.code).toBe(1);
    return e.stderr;
  }
  throw new Error('gpuvm serve started with a bad config');
}

function config(overrides: Record<string, unknown> = {}): string {
  const file = join(dir, `host-${Math.random().toString(36).slice(2)}.json`);
  const base = {
    hostId: 'hgx-sim-01',
    board: 'B200',
    binaries: { fmpm: sim.fmpmBin, nvidiaSmi: sim.nvidiaSmiBin, fabricManager: join(sim.root, 'bin', 'nv-fabricmanager'), qemu: QEMU_STANDIN },
    sysfsRoot: sim.sysfsRoot,
    fsRoot: sim.root,
    runDir: join(dir, 'run'),
    qemu: { accel: 'tcg' },
    vm: { memoryMiB: 128, vcpus: 1, imageDriverVersion: '580.95.05' },
  };
  writeFileSync(file, JSON.stringify({ ...base, ...overrides }, null, 2));
  return file;
}

describe(`gpuvm serve --config (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    sim = await createSimHost({ root: join(dir, 'sim') });
  });
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  it('registers the configured host from its fmpm and nvidia-smi, checking expectedGpus', async () => {
    const db = await freshDatabaseUrl();
    const expectedGpus = sim.gpus.map((g) => ({ moduleId: g.moduleId, pciAddress: g.pciAddress }));
    const child = await startServeChild({ dataDir: join(dir, 'data'), port: await freePort(), databaseUrl: db.url, extraArgs: ['--config', config({ expectedGpus })] });
    try {
      const hosts = (await http(child.url, 'GET', '/v1/hosts')).body.hosts;
      expect(hosts).toHaveLength(1);
      expect(hosts[0]).toMatchObject({ id: 'hgx-sim-01', board: 'NVIDIA B200', simulated: false });
      expect(hosts[0].gpus).toEqual([...expectedGpus].sort((a, b) => a.moduleId - b.moduleId));
      const health = (await http(child.url, 'GET', '/v1/health')).body;
      expect(health.qemu).toMatch(/vfio-pci/);
      expect((await http(child.url, 'GET', '/v1/partitions')).body.partitions).toHaveLength(15);
    } finally {
      await child.kill('SIGTERM');
      await db.drop();
    }
  });

  it('refuses at start, naming the field: unknown binary, bad PCI address, a mapping that does not match the GPUs', async () => {
    expect(await serveFails(config({ binaries: { fmpm: '/nonexistent/fmpm' } }))).toMatch(/^gpuvm: binaries\.fmpm: .*\/nonexistent\/fmpm/);
    expect(await serveFails(config({ expectedGpus: [{ moduleId: 1, pciAddress: '0000:17:00' }] }))).toMatch(/^gpuvm: expectedGpus\.0\.pciAddress: /);
    const swapped = sim.gpus.map((g, i) => ({ moduleId: sim.gpus[(i + 1) % sim.gpus.length]!.moduleId, pciAddress: g.pciAddress }));
    const err = await serveFails(config({ expectedGpus: swapped }));
    expect(err).toMatch(/^gpuvm: .*module/i);
    expect(err.trim().split('\n')).toHaveLength(1);
  });
});
