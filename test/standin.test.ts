/**
 * Without qemu-system-x86_64 on PATH, gpuvm says so at start and runs VMs with the QMP stand-in,
 * through the same QEMU adapter.
 */
import { mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestService, usingPostgres, waitUntil, type TestService } from './support/env.ts';

let t: TestService;
let pathDir = '';

describe(`simulated host without QEMU installed (${usingPostgres ? 'postgres' : 'pglite'})`, () => {
  beforeAll(async () => {
    // A PATH that has node (the simulated tools run on it) and no qemu-system-x86_64.
    const path = process.env.PATH;
    pathDir = mkdtempSync(join(tmpdir(), 'gpuvm-path-'));
    symlinkSync(process.execPath, join(pathDir, 'node'));
    process.env.PATH = pathDir;
    try {
      t = await startTestService();
    } finally {
      process.env.PATH = path;
    }
  });
  afterAll(async () => {
    await t?.cleanup();
    if (pathDir) rmSync(pathDir, { recursive: true, force: true });
  });

  it('says it uses the stand-in and runs a full lifecycle with it', async () => {
    expect(t.service.host.qemuDescription).toMatch(/not installed: using the QMP stand-in/);
    const health = await (await fetch(`${t.service.url}/v1/health`)).json();
    expect(health.qemu).toMatch(/QMP stand-in/);
    const vm = await t.service.vms.create({ gpus: 4, actor: 'test' });
    await waitUntil('running', async () => (await t.service.vms.get(vm.id)).state === 'running');
    const status = await t.service.host.qemu.status(vm.id);
    expect(status.state).toBe('alive');
    await t.service.vms.delete(vm.id, 'test');
    await waitUntil('deleted', async () => (await t.service.vms.get(vm.id)).state === 'deleted');
    // The stand-in guest powers off on system_powerdown: no escalation to quit was needed.
    const h = await t.service.vms.history(vm.id);
    expect(h.events.filter((e) => e.stream === `vm:${vm.id}`).map((e) => e.to)).toEqual(['provisioning', 'starting', 'running', 'stopping', 'releasing', 'deleted']);
    expect((await t.service.host.qemu.status(vm.id)).state).toBe('gone');
  });
});
