/**
 * The simulated host as each HGX board, read back through the real adapters (fmpm, nvidia-smi,
 * sysfs), and the host config's `board` checked against what nvidia-smi reports at inventory.
 * Expected values are written out here, not taken from sim-host.ts, so a wrong table there fails.
 */
import { execa } from 'execa';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { boardOf } from '../src/host/doctor.ts';
import { Fmpm } from '../src/host/fmpm.ts';
import { openRealHost, parseHostConfig } from '../src/host/host-config.ts';
import { InventoryError, openSimulatedHost, takeInventory } from '../src/host/host.ts';
import { NvidiaSmi } from '../src/host/nvidia-smi.ts';
import { createSimHost, loadSimHost, SIM_BOARDS, SimHostError, stopSimKernel, type SimBoard, type SimHostInfo } from '../src/host/sim/sim-host.ts';
import { Sysfs } from '../src/host/sysfs.ts';

const MiB = 1n << 20n;
const GiB = 1n << 30n;

const singles = (firstId: number) => [1, 2, 3, 4, 5, 6, 7, 8].map((m) => [firstId + m - 1, [m]] as [number, number[]]);
/** DESIGN §2.1. */
const BLACKWELL_TABLE: [number, number[]][] = [
  [1, [1, 2, 3, 4, 5, 6, 7, 8]],
  [2, [1, 2, 3, 4]],
  [3, [5, 6, 7, 8]],
  [4, [1, 2]],
  [5, [3, 4]],
  [6, [5, 6]],
  [7, [7, 8]],
  ...singles(8),
];
const HOPPER_TABLE: [number, number[]][] = [
  [0, [1, 2, 3, 4, 5, 6, 7, 8]],
  [1, [1, 2, 3, 4]],
  [2, [5, 6, 7, 8]],
  [3, [1, 3]],
  [4, [2, 4]],
  [5, [5, 7]],
  [6, [6, 8]],
  ...singles(7),
];

interface Expected {
  configBoard: string;
  productName: string;
  deviceId: string;
  table: [number, number[]][];
  lineRateMBps: number;
  bar0: bigint;
  bar2: bigint;
  fbTotalMiB: number;
}

const EXPECTED: Record<SimBoard, Expected> = {
  b200: { configBoard: 'B200', productName: 'NVIDIA B200', deviceId: '2901', table: BLACKWELL_TABLE, lineRateMBps: 53125, bar0: 64n * MiB, bar2: 256n * GiB, fbTotalMiB: 183359 },
  b300: { configBoard: 'B300', productName: 'NVIDIA B300 SXM6 AC', deviceId: '3182', table: BLACKWELL_TABLE, lineRateMBps: 53125, bar0: 64n * MiB, bar2: 256n * GiB, fbTotalMiB: 275040 },
  h100: { configBoard: 'H100', productName: 'NVIDIA H100 80GB HBM3', deviceId: '2330', table: HOPPER_TABLE, lineRateMBps: 26562, bar0: 16n * MiB, bar2: 128n * GiB, fbTotalMiB: 81559 },
  h200: { configBoard: 'H200', productName: 'NVIDIA H200', deviceId: '2335', table: HOPPER_TABLE, lineRateMBps: 26562, bar0: 16n * MiB, bar2: 256n * GiB, fbTotalMiB: 143771 },
};

const temps: string[] = [];
async function tempDir(): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'gpuvm-boards-'));
  temps.push(dir);
  return dir;
}
afterAll(async () => {
  for (const dir of temps) await rm(dir, { recursive: true, force: true });
});

/** The config-file route a real host takes, pointed at a simulated host's binaries and sysfs. */
function realHostOn(sim: SimHostInfo, configBoard: string) {
  const cfg = parseHostConfig(
    {
      hostId: 'boards',
      board: configBoard,
      binaries: { fmpm: sim.fmpmBin, nvidiaSmi: sim.nvidiaSmiBin, fabricManager: path.join(sim.root, 'bin', 'nv-fabricmanager'), qemu: '/usr/bin/qemu-system-x86_64' },
      sysfsRoot: sim.sysfsRoot,
      fsRoot: sim.root,
      runDir: path.join(sim.root, 'run'),
    },
    { checkFiles: false },
  );
  return { cfg, host: openRealHost(cfg, { toolTimeoutMs: 15_000, bindTimeoutMs: 3000 }) };
}

describe.each(SIM_BOARDS)('a simulated %s host', (board) => {
  const want = EXPECTED[board];

  it('lists its own partition table, NVLink counts and line rate through fmpm -l', async () => {
    const sim = await createSimHost({ root: path.join(await tempDir(), 'host'), board });
    expect(sim.board).toBe(board);
    expect(sim.partitions.map((p) => [p.id, p.modules])).toEqual(want.table);

    const table = await new Fmpm({ bin: sim.fmpmBin, timeoutMs: 15_000 }).list();
    expect(table.partitions.map((p) => [p.partitionId, p.gpus.map((g) => g.physicalId)])).toEqual(want.table);
    for (const p of table.partitions) {
      // A single GPU has no NVLink peers inside its partition.
      const links = p.numGpus > 1 ? 18 : 0;
      for (const g of p.gpus) expect(g, `partition ${p.partitionId}`).toMatchObject({ maxNumNvLinks: links, numNvLinksAvailable: links, nvlinkLineRateMBps: want.lineRateMBps });
    }
    expect(table.partitions.filter((p) => p.numGpus === 1)).toHaveLength(8);
  });

  it('reports its product name, device id and memory through nvidia-smi, and matching sysfs', async () => {
    const sim = await createSimHost({ root: path.join(await tempDir(), 'host'), board });
    const report = await new NvidiaSmi({ bin: sim.nvidiaSmiBin, timeoutMs: 15_000 }).query();
    expect(report.gpus).toHaveLength(8);
    for (const g of report.gpus) expect(g.productName).toBe(want.productName);
    expect(boardOf(want.productName)).toBe(want.configBoard);

    const xml = (await execa(sim.nvidiaSmiBin, ['-q', '-x'], { timeout: 15_000 })).stdout;
    const all = (tag: string) => [...xml.matchAll(new RegExp(`<${tag}>([^<]*)</${tag}>`, 'g'))].map((m) => m[1] ?? '');
    expect(all('pci_device_id')).toEqual(Array(8).fill(`${want.deviceId}10DE`));
    for (const part of all('gpu_part_number')) expect(part.startsWith(`${want.deviceId}-`)).toBe(true);
    const text = (await execa(sim.nvidiaSmiBin, ['-q'], { timeout: 15_000 })).stdout;
    expect(text.match(/Device Id\s+: (\S+)/g)).toHaveLength(8);
    expect(text).toContain(`: 0x${want.deviceId}10DE`);
    expect(text).toMatch(new RegExp(`FB Memory Usage\\n\\s+Total\\s+: ${want.fbTotalMiB} MiB`));
    const bar1MiB = Number(/BAR1 Memory Usage\n\s+Total\s+: (\d+) MiB/.exec(text)![1]);

    const sysfs = new Sysfs({ root: sim.sysfsRoot });
    for (const gpu of sim.gpus) {
      const dir = path.join(sim.root, 'sys', 'bus', 'pci', 'devices', gpu.pciAddress);
      expect(await readFile(path.join(dir, 'device'), 'utf8')).toBe(`0x${want.deviceId}\n`);
      expect((await sysfs.barRegions(gpu.pciAddress)).map((b) => [b.index, b.sizeBytes])).toEqual([
        [0, want.bar0],
        [2, want.bar2],
        [4, 32n * MiB],
      ]);
    }
    // nvidia-smi's BAR1 is the framebuffer aperture sysfs lists as BAR 2.
    expect(BigInt(bar1MiB) * MiB).toBe(want.bar2);
  });

  it('registers under its own board and is refused under any other', async () => {
    const sim = await createSimHost({ root: path.join(await tempDir(), 'host'), board });
    const { cfg, host } = realHostOn(sim, want.configBoard);
    const inv = await takeInventory(host, { expectedBoard: cfg.board });
    expect(inv.board).toBe(want.productName);
    expect(inv.partitions.map((p) => [p.id, p.modules])).toEqual(want.table);

    for (const other of SIM_BOARDS.filter((b) => b !== board)) {
      const err = await takeInventory(realHostOn(sim, EXPECTED[other].configBoard).host, { expectedBoard: EXPECTED[other].configBoard }).catch((e: unknown) => e);
      expect(err, other).toBeInstanceOf(InventoryError);
      expect((err as InventoryError).code).toBe('board-mismatch');
      expect((err as InventoryError).message).toContain(`configured as board ${EXPECTED[other].configBoard}`);
      expect((err as InventoryError).message).toContain(`${want.productName} (${want.configBoard})`);
    }
  });
});

describe('a simulated host folder is one board', () => {
  it('refuses to reopen a folder as another board, naming both, and reopens it as its own', async () => {
    const root = path.join(await tempDir(), 'host');
    const h100 = await createSimHost({ root, board: 'h100' });
    const before = await readFile(path.join(root, 'host.json'), 'utf8');
    for (const asked of [undefined, 'b200', 'h200'] as const) {
      const err = await createSimHost({ root, board: asked }).catch((e: unknown) => e);
      expect(err, String(asked)).toBeInstanceOf(SimHostError);
      expect((err as SimHostError).code).toBe('board-mismatch');
      expect((err as SimHostError).message).toContain('H100');
      expect((err as SimHostError).message).toContain((asked ?? 'b200').toUpperCase());
    }
    expect(await readFile(path.join(root, 'host.json'), 'utf8')).toBe(before);
    expect(await createSimHost({ root, board: 'h100' })).toEqual(h100);
  });

  it('reads a host.json without a board as the B200 it was', async () => {
    const root = path.join(await tempDir(), 'host');
    await createSimHost({ root });
    const json = JSON.parse(await readFile(path.join(root, 'host.json'), 'utf8')) as Record<string, unknown>;
    expect(json.board).toBe('B200');
    delete json.board;
    await writeFile(path.join(root, 'host.json'), JSON.stringify(json));
    expect((await loadSimHost(root)).board).toBe('b200');
    await expect(createSimHost({ root, board: 'h100' })).rejects.toMatchObject({ code: 'board-mismatch' });
  });

  it('refuses an unknown board in host.json and in the options', async () => {
    const root = path.join(await tempDir(), 'host');
    await createSimHost({ root });
    const json = JSON.parse(await readFile(path.join(root, 'host.json'), 'utf8')) as Record<string, unknown>;
    await writeFile(path.join(root, 'host.json'), JSON.stringify({ ...json, board: 'A100' }));
    await expect(loadSimHost(root)).rejects.toMatchObject({ code: 'bad-host-json', message: expect.stringContaining('board') });
    await expect(createSimHost({ root: path.join(await tempDir(), 'host'), board: 'a100' as SimBoard })).rejects.toMatchObject({ code: 'bad-board' });
  });
});

describe('openSimulatedHost', () => {
  it('builds the board it is given and says so', async () => {
    const dataDir = await tempDir();
    const lines: string[] = [];
    const log = pino({ level: 'info' }, { write: (line: string) => lines.push(line) });
    const host = await openSimulatedHost({ hostId: 'sim-h100', dataDir, board: 'h100', bindTimeoutMs: 3000, toolTimeoutMs: 15_000 }, log);
    try {
      const ready = lines.map((l) => JSON.parse(l) as { msg: string; board?: string }).find((l) => l.msg.endsWith('host ready'));
      expect(ready).toMatchObject({ msg: 'simulated H100 host ready', board: 'h100' });
      expect((await host.nvidiaSmi.query()).gpus[0]!.productName).toBe('NVIDIA H100 80GB HBM3');
    } finally {
      await stopSimKernel(host.fsRoot);
    }
  });
});

describe('boardOf', () => {
  it('names the board of each product name nvidia-smi prints', () => {
    expect(['NVIDIA B200', 'NVIDIA B300 SXM6 AC', 'NVIDIA H100 80GB HBM3', 'NVIDIA H200'].map(boardOf)).toEqual(['B200', 'B300', 'H100', 'H200']);
  });
});
