/**
 * Adapter for `fmpm`, NVIDIA's Fabric-Manager-Client sample tool (1.0.1), in Shared NVSwitch
 * Multitenancy. The tool prints its failures on stdout (`Failed to activate partition. fmReturn: -7`)
 * and exits with the negative fmReturn_t as a byte (-7 → 249); both are read here, the printed
 * value first.
 */
import { z } from 'zod';
import { isRetryableSpawnError, runTool } from './tool.ts';

export interface FmpmGpu {
  physicalId: number;
  pciBusId: string;
  uuid: string;
  maxNumNvLinks: number;
  numNvLinksAvailable: number;
  nvlinkLineRateMBps: number;
}

export interface FmpmPartition {
  partitionId: number;
  isActive: boolean;
  numGpus: number;
  gpus: FmpmGpu[];
}

export interface FmpmPartitionTable {
  maxNumPartitions: number;
  numPartitions: number;
  version: number;
  partitions: FmpmPartition[];
}

export type FmpmErrorCode =
  | 'already-active'
  | 'already-inactive'
  | 'in-use'
  | 'uninitialized'
  | 'not-configured'
  | 'connection-not-valid'
  | 'resource-in-another-partition'
  | 'bad-param'
  | 'cannot-connect'
  | 'timeout'
  | 'bad-output'
  | 'spawn-failed'
  | 'unknown';

/** fmReturn_t values (nv_fm_types.h) that gpuvm tells apart. */
export const FM_RETURN = {
  BADPARAM: -1,
  UNINITIALIZED: -4,
  IN_USE: -7,
  NOT_CONFIGURED: -8,
  CONNECTION_NOT_VALID: -9,
  PARTITION_ID_IN_USE: -17,
  PARTITION_ID_NOT_IN_USE: -18,
  RESOURCE_USED_IN_ANOTHER_PARTITION: -24,
} as const;

const CODE_BY_FM_RETURN = new Map<number, FmpmErrorCode>([
  [FM_RETURN.BADPARAM, 'bad-param'],
  [FM_RETURN.UNINITIALIZED, 'uninitialized'],
  [FM_RETURN.IN_USE, 'in-use'],
  [FM_RETURN.NOT_CONFIGURED, 'not-configured'],
  [FM_RETURN.CONNECTION_NOT_VALID, 'connection-not-valid'],
  [FM_RETURN.PARTITION_ID_IN_USE, 'already-active'],
  [FM_RETURN.PARTITION_ID_NOT_IN_USE, 'already-inactive'],
  [FM_RETURN.RESOURCE_USED_IN_ANOTHER_PARTITION, 'resource-in-another-partition'],
]);

const RETRYABLE: ReadonlySet<FmpmErrorCode> = new Set([
  'not-configured',
  'cannot-connect',
  'uninitialized',
  'connection-not-valid',
  'timeout',
]);

export interface FmpmErrorDetails {
  fmReturn?: number;
  exitCode?: number;
  partitionId?: number;
  cause?: unknown;
  /** Overrides the code's default (spawn-failed is retryable when the machine ran short: EMFILE…). */
  retryable?: boolean;
}

export class FmpmError extends Error {
  override name = 'FmpmError';
  readonly code: FmpmErrorCode;
  readonly fmReturn?: number;
  readonly exitCode?: number;
  readonly partitionId?: number;
  /** true when retrying later can help (not-configured, cannot-connect, uninitialized, connection-not-valid,
   *  timeout; spawn-failed for EMFILE, ENFILE, EAGAIN, ENOMEM) */
  readonly retryable: boolean;

  constructor(code: FmpmErrorCode, message: string, details: FmpmErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.code = code;
    if (details.fmReturn !== undefined) this.fmReturn = details.fmReturn;
    if (details.exitCode !== undefined) this.exitCode = details.exitCode;
    if (details.partitionId !== undefined) this.partitionId = details.partitionId;
    this.retryable = details.retryable ?? RETRYABLE.has(code);
  }
}

// ── parsing `fmpm -l` ────────────────────────────────────────────────────────
const count = z.number().int().nonnegative();

const gpuSchema = z.object({
  maxNumNvLinks: count,
  numNvLinksAvailable: count,
  nvlinkLineRateMBps: count,
  pciBusId: z.string(),
  physicalId: count,
  uuid: z.string(),
});

const partitionSchema = z
  .object({
    gpuInfo: z.array(gpuSchema),
    isActive: z.union([z.literal(0), z.literal(1)]),
    numGpus: count,
    partitionId: count,
  })
  .refine((p) => p.numGpus === p.gpuInfo.length, { message: 'numGpus differs from the length of gpuInfo' });

const tableSchema = z
  .object({
    maxNumPartitions: count,
    numPartitions: count,
    // JsonCpp writes an empty Json::arrayValue as [], and the tool always sets the key.
    partitionInfo: z.array(partitionSchema),
    version: count,
  })
  .refine((t) => t.numPartitions === t.partitionInfo.length, { message: 'numPartitions differs from the length of partitionInfo' })
  .refine((t) => new Set(t.partitionInfo.map((p) => p.partitionId)).size === t.partitionInfo.length, {
    message: 'a partitionId appears twice',
  });

/**
 * The JSON document of `fmpm -l`. StyledWriter puts the opening brace alone on the first line;
 * lines before it (a library banner some builds print) are skipped, nothing else is forgiven.
 */
function jsonDocument(stdout: string): string {
  const lines = stdout.split('\n');
  const start = lines.findIndex((l) => l.trim() === '{');
  return (start > 0 ? lines.slice(start).join('\n') : stdout).trim();
}

export function parsePartitionTable(stdout: string): FmpmPartitionTable {
  let raw: unknown;
  try {
    raw = JSON.parse(jsonDocument(stdout));
  } catch (err) {
    throw new FmpmError('bad-output', `fmpm -l printed no valid JSON (${(err as Error).message}): ${excerpt(stdout)}`, { cause: err });
  }
  const parsed = tableSchema.safeParse(raw);
  if (!parsed.success) {
    const issues = parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
    throw new FmpmError('bad-output', `fmpm -l printed an unexpected partition table: ${issues}`);
  }
  const t = parsed.data;
  return {
    maxNumPartitions: t.maxNumPartitions,
    numPartitions: t.numPartitions,
    version: t.version,
    partitions: t.partitionInfo.map((p) => ({
      partitionId: p.partitionId,
      isActive: p.isActive === 1,
      numGpus: p.numGpus,
      gpus: p.gpuInfo.map((g) => ({
        physicalId: g.physicalId,
        pciBusId: g.pciBusId,
        uuid: g.uuid,
        maxNumNvLinks: g.maxNumNvLinks,
        numNvLinksAvailable: g.numNvLinksAvailable,
        nvlinkLineRateMBps: g.nvlinkLineRateMBps,
      })),
    })),
  };
}

function excerpt(text: string, max = 200): string {
  const t = text.trim();
  if (t === '') return '(empty output)';
  return JSON.stringify(t.length > max ? `${t.slice(0, max)}…` : t);
}

// ── running the tool ─────────────────────────────────────────────────────────
/** FM_MAX_FABRIC_PARTITIONS is 64; gpuvm accepts ids below 1000 and lets Fabric Manager judge the rest. */
const MAX_PARTITION_ID = 999;
/** `ip[:port]`, a hostname, or `[v6]:port` — never something the tool could read as an option. */
const HOSTNAME_PATTERN = /^(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$/;
const CONNECT_FAILURE = 'Failed to connect to Fabric Manager instance.';

export interface FmpmOptions {
  bin: string;
  hostname?: string;
  timeoutMs?: number;
}

type Operation = { args: string[]; what: string; partitionId?: number };

export class Fmpm {
  private readonly bin: string;
  private readonly hostArgs: string[];
  private readonly timeoutMs: number;

  constructor(opts: FmpmOptions) {
    if (!opts.bin) throw new FmpmError('bad-param', 'fmpm: no binary path given');
    this.bin = opts.bin;
    if (opts.hostname !== undefined && !HOSTNAME_PATTERN.test(opts.hostname)) {
      throw new FmpmError('bad-param', `fmpm (${opts.bin}): invalid --hostname ${JSON.stringify(opts.hostname)}: expected ip[:port]`);
    }
    this.hostArgs = opts.hostname === undefined ? [] : ['--hostname', opts.hostname];
    this.timeoutMs = opts.timeoutMs ?? 30_000;
  }

  async list(): Promise<FmpmPartitionTable> {
    const stdout = await this.run({ args: ['-l'], what: 'listing partitions' });
    try {
      return parsePartitionTable(stdout);
    } catch (err) {
      if (err instanceof FmpmError) throw new FmpmError(err.code, `${this.bin}: ${err.message}`, { exitCode: 0, cause: err });
      throw err;
    }
  }

  /** Whether `fmpm -l` shows the partition active; FmpmError('bad-param') if the table has no such id. */
  async isActive(partitionId: number): Promise<boolean> {
    const id = this.checkId(partitionId, 'querying');
    const table = await this.list();
    const p = table.partitions.find((x) => x.partitionId === id);
    if (!p) {
      throw new FmpmError(
        'bad-param',
        `fmpm (${this.bin}) -l: partition ${id} is not in the partition table (ids: ${table.partitions.map((x) => x.partitionId).join(', ') || 'none'})`,
        { partitionId: id },
      );
    }
    return p.isActive;
  }

  /** Idempotent: 'already-active' becomes success only after list() confirms isActive. */
  async activate(partitionId: number): Promise<'activated' | 'already-active'> {
    const id = this.checkId(partitionId, 'activating');
    try {
      await this.run({ args: ['-a', String(id)], what: 'activating', partitionId: id });
      return 'activated';
    } catch (err) {
      if (err instanceof FmpmError && err.code === 'already-active') {
        if (await this.confirm(id, true, err)) return 'already-active';
      }
      throw err;
    }
  }

  /** Idempotent: 'already-inactive' becomes success only after list() confirms the partition inactive. */
  async deactivate(partitionId: number): Promise<'deactivated' | 'already-inactive'> {
    const id = this.checkId(partitionId, 'deactivating');
    try {
      await this.run({ args: ['-d', String(id)], what: 'deactivating', partitionId: id });
      return 'deactivated';
    } catch (err) {
      // Some Fabric Manager releases answer a deactivate of an inactive partition with
      // UNINITIALIZED instead of PARTITION_ID_NOT_IN_USE; the table decides.
      if (err instanceof FmpmError && (err.code === 'already-inactive' || err.code === 'uninitialized')) {
        if (await this.confirm(id, false, err)) return 'already-inactive';
      }
      throw err;
    }
  }

  /**
   * Declares the active partitions after Fabric Manager restarted in resiliency mode
   * (`--set-activated-list 1,5`). An empty list declares that none is active.
   */
  async setActivatedList(partitionIds: number[]): Promise<void> {
    const ids = partitionIds.map((id) => this.checkId(id, 'declaring active'));
    // fmpm 1.0.1 loops forever on a repeated id (its parser skips the strtok on duplicates).
    const dup = ids.find((id, i) => ids.indexOf(id) !== i);
    if (dup !== undefined) {
      throw new FmpmError('bad-param', `fmpm (${this.bin}) --set-activated-list: partition ${dup} is listed twice`, { partitionId: dup });
    }
    await this.run({ args: ['--set-activated-list', ids.join(',')], what: `declaring partitions [${ids.join(',')}] active` });
  }

  private checkId(partitionId: number, what: string): number {
    if (!Number.isSafeInteger(partitionId) || partitionId < 0 || partitionId > MAX_PARTITION_ID) {
      throw new FmpmError(
        'bad-param',
        `fmpm (${this.bin}): refusing ${what} partition ${String(partitionId)}: a partition id is an integer from 0 to ${MAX_PARTITION_ID}`,
      );
    }
    return partitionId;
  }

  /**
   * Confirms through `fmpm -l` the state an "already" answer claims. A table that disagrees, or a
   * failing list, keeps the original error (with the list's finding in its message).
   */
  private async confirm(id: number, wantActive: boolean, original: FmpmError): Promise<boolean> {
    let active: boolean;
    try {
      active = await this.isActive(id);
    } catch (err) {
      original.message += `; confirming with fmpm -l failed: ${(err as Error).message}`;
      return false;
    }
    if (active === wantActive) return true;
    original.message += `; but fmpm -l shows partition ${id} ${active ? 'active' : 'inactive'}`;
    return false;
  }

  private async run(op: Operation): Promise<string> {
    const argv = [...this.hostArgs, ...op.args];
    const cmd = `fmpm (${this.bin}) ${op.args.join(' ')}`;
    const subject = op.partitionId === undefined ? '' : ` partition ${op.partitionId}`;
    const base = { partitionId: op.partitionId };
    const result = await runTool(this.bin, argv, { timeoutMs: this.timeoutMs, killGraceMs: 2_000, maxBytes: 16 * 1024 * 1024 });
    const { stdout, stderr } = result;

    if (result.timedOut) {
      throw new FmpmError('timeout', `${cmd}: no answer within ${this.timeoutMs} ms while ${op.what}${subject}; the process was killed`, base);
    }
    if (result.spawnError) {
      // Out of descriptors or memory here is ours to wait out (retryable); a missing or
      // non-executable binary is not.
      const { code, message } = result.spawnError;
      const retryable = isRetryableSpawnError(result.spawnError);
      throw new FmpmError('spawn-failed', `${cmd}: could not start the binary (${code}) while ${op.what}${subject}${retryable ? ': out of resources, retrying later can help' : ''}`, {
        ...base,
        retryable,
        cause: Object.assign(new Error(message), { code }),
      });
    }
    if (result.overflow) {
      throw new FmpmError('bad-output', `${cmd}: printed more than 16 MiB while ${op.what}${subject}; the process was killed`, base);
    }
    if (result.exitCode === null) {
      throw new FmpmError('unknown', `${cmd}: killed by ${result.signal ?? 'a signal'} while ${op.what}${subject}`, base);
    }
    if (result.exitCode === 0) return stdout;

    const exitCode = result.exitCode;
    const printed = /fmReturn:\s*(-?\d+)/.exec(stdout);
    // The exit status is the low byte of the negative fmReturn_t: 249 → -7.
    const fmReturn = printed ? Number(printed[1]) : exitCode >= 128 ? exitCode - 256 : undefined;
    const said = [stdout.trim(), stderr.trim()].filter((s) => s !== '').join(' / ') || '(no output)';
    const details = { ...base, exitCode, ...(fmReturn === undefined ? {} : { fmReturn }) };
    const fmText = fmReturn === undefined ? 'no fmReturn' : `fmReturn ${fmReturn}`;

    if (stdout.includes(CONNECT_FAILURE)) {
      throw new FmpmError(
        'cannot-connect',
        `${cmd}: cannot reach Fabric Manager${this.hostArgs[1] ? ` at ${this.hostArgs[1]}` : ''} while ${op.what}${subject} (${fmText}, exit ${exitCode}): is nvidia-fabricmanager running?`,
        details,
      );
    }
    const code = (fmReturn !== undefined && CODE_BY_FM_RETURN.get(fmReturn)) || 'unknown';
    throw new FmpmError(code, `${cmd}: ${op.what}${subject} failed with ${fmText} (${code}, exit ${exitCode}): ${said}`, details);
  }
}
