/**
 * Every option gpuvm has, with its default, in one place. Environment variables override the
 * defaults; command-line flags override both (see src/cli).
 *
 * | option                | env                         | default                          |
 * |-----------------------|-----------------------------|----------------------------------|
 * | dataDir               | GPUVM_DATA_DIR              | ./.gpuvm                         |
 * | databaseUrl           | DATABASE_URL                | (unset: embedded PGlite in dataDir/pglite) |
 * | listenHost            | GPUVM_LISTEN_HOST           | 127.0.0.1                        |
 * | port                  | GPUVM_PORT                  | 7070                             |
 * | hostId                | GPUVM_HOST_ID               | sim-b200                         |
 * | vmMemoryMiB           | GPUVM_VM_MEMORY_MIB         | 256 (simulated host)             |
 * | vmVcpus               | GPUVM_VM_VCPUS              | 1                                |
 * | powerdownTimeoutMs    | GPUVM_POWERDOWN_TIMEOUT_MS  | 30000; 3000 on the simulated host, whose firmware-only guests ignore the power button |
 * | effectMaxAttempts     | GPUVM_EFFECT_MAX_ATTEMPTS   | 5                                |
 * | backoffBaseMs         | GPUVM_BACKOFF_BASE_MS       | 200                              |
 * | backoffMaxMs          | GPUVM_BACKOFF_MAX_MS        | 10000                            |
 * | leaseMs               | GPUVM_LEASE_MS              | 30000                            |
 * | notYetMs              | GPUVM_NOT_YET_MS            | 120000 ("not yet" answers wait this long before they count as failed tries; Fabric Manager's restart window is 60 s) |
 * | agentHeartbeatMs      | GPUVM_AGENT_HEARTBEAT_MS    | 5000 (the agent lock's connection is checked and its heartbeat written this often) |
 * | agentSilentMs         | GPUVM_AGENT_SILENT_MS       | 30000 (an agent unheard this long makes its host unreachable: nothing placed, its VMs `unknown`; more than the heartbeat) |
 * | pollMs                | GPUVM_POLL_MS               | 1000                             |
 * | workerConcurrency     | GPUVM_WORKER_CONCURRENCY    | 16                               |
 * | monitorIntervalMs     | GPUVM_MONITOR_INTERVAL_MS   | 500                              |
 * | healthIntervalMs      | GPUVM_HEALTH_INTERVAL_MS    | 10000 (Xid lines, fabric state)  |
 * | fabricManagerCheckMs  | GPUVM_FM_CHECK_MS           | 5000 (answers a restarted FM within its 60 s window) |
 * | reconcileIntervalMs   | GPUVM_RECONCILE_INTERVAL_MS | 30000 (log vs host; also once at start) |
 * | qemuBin               | GPUVM_QEMU                  | qemu-system-x86_64 on PATH, else the QMP stand-in |
 * | bindTimeoutMs         | GPUVM_BIND_TIMEOUT_MS       | 10000                            |
 * | toolTimeoutMs         | GPUVM_TOOL_TIMEOUT_MS       | 30000 (fmpm, nvidia-smi; QMP system_powerdown on the simulated host) |
 * | logLevel              | GPUVM_LOG_LEVEL             | info                             |
 */
import { resolve } from 'node:path';
import { z } from 'zod';

export interface Config {
  dataDir: string;
  databaseUrl: string | undefined;
  listenHost: string;
  port: number;
  hostId: string;
  vmMemoryMiB: number;
  vmVcpus: number;
  /** Unset: 30000 on a real host, 3000 on the simulated one (see the table). */
  powerdownTimeoutMs: number | undefined;
  effectMaxAttempts: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
  leaseMs: number;
  notYetMs: number;
  agentHeartbeatMs: number;
  agentSilentMs: number;
  pollMs: number;
  workerConcurrency: number;
  monitorIntervalMs: number;
  healthIntervalMs: number;
  fabricManagerCheckMs: number;
  reconcileIntervalMs: number;
  qemuBin: string | undefined;
  bindTimeoutMs: number;
  toolTimeoutMs: number;
  logLevel: string;
}

/** A host id: it names streams (`host:<id>`) and folders, so it is kept to a safe alphabet. */
export const HOST_ID_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

const schema = z.object({
  dataDir: z.string().min(1),
  databaseUrl: z.string().regex(/^postgres(ql)?:\/\//, 'must be a postgres:// URL').optional(),
  listenHost: z.string().min(1),
  port: int(0, 65535),
  hostId: z.string().regex(HOST_ID_PATTERN, 'lower-case letters, digits and dashes, at most 63'),
  vmMemoryMiB: int(64, 4 * 1024 * 1024),
  vmVcpus: int(1, 1024),
  powerdownTimeoutMs: int(0, 3_600_000).optional(),
  effectMaxAttempts: int(1, 100),
  backoffBaseMs: int(1, 600_000),
  backoffMaxMs: int(1, 3_600_000),
  leaseMs: int(100, 3_600_000),
  notYetMs: int(0, 86_400_000),
  agentHeartbeatMs: int(10, 600_000),
  agentSilentMs: int(50, 3_600_000),
  pollMs: int(10, 600_000),
  workerConcurrency: int(1, 1024),
  monitorIntervalMs: int(10, 600_000),
  healthIntervalMs: int(10, 3_600_000),
  fabricManagerCheckMs: int(10, 50_000),
  reconcileIntervalMs: int(10, 86_400_000),
  qemuBin: z.string().min(1).optional(),
  bindTimeoutMs: int(10, 600_000),
  toolTimeoutMs: int(10, 600_000),
  logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']),
});

export class ConfigError extends Error {
  override name = 'ConfigError';
}

export function loadConfig(overrides: Partial<Record<keyof Config, unknown>> = {}, env: NodeJS.ProcessEnv = process.env): Config {
  const raw = {
    dataDir: env.GPUVM_DATA_DIR ?? './.gpuvm',
    databaseUrl: env.DATABASE_URL || undefined,
    listenHost: env.GPUVM_LISTEN_HOST ?? '127.0.0.1',
    port: env.GPUVM_PORT ?? 7070,
    hostId: env.GPUVM_HOST_ID ?? 'sim-b200',
    vmMemoryMiB: env.GPUVM_VM_MEMORY_MIB ?? 256,
    vmVcpus: env.GPUVM_VM_VCPUS ?? 1,
    powerdownTimeoutMs: env.GPUVM_POWERDOWN_TIMEOUT_MS || undefined,
    effectMaxAttempts: env.GPUVM_EFFECT_MAX_ATTEMPTS ?? 5,
    backoffBaseMs: env.GPUVM_BACKOFF_BASE_MS ?? 200,
    backoffMaxMs: env.GPUVM_BACKOFF_MAX_MS ?? 10_000,
    leaseMs: env.GPUVM_LEASE_MS ?? 30_000,
    notYetMs: env.GPUVM_NOT_YET_MS ?? 120_000,
    agentHeartbeatMs: env.GPUVM_AGENT_HEARTBEAT_MS ?? 5000,
    agentSilentMs: env.GPUVM_AGENT_SILENT_MS ?? 30_000,
    pollMs: env.GPUVM_POLL_MS ?? 1000,
    workerConcurrency: env.GPUVM_WORKER_CONCURRENCY ?? 16,
    monitorIntervalMs: env.GPUVM_MONITOR_INTERVAL_MS ?? 500,
    healthIntervalMs: env.GPUVM_HEALTH_INTERVAL_MS ?? 10_000,
    fabricManagerCheckMs: env.GPUVM_FM_CHECK_MS ?? 5000,
    reconcileIntervalMs: env.GPUVM_RECONCILE_INTERVAL_MS ?? 30_000,
    qemuBin: env.GPUVM_QEMU || undefined,
    bindTimeoutMs: env.GPUVM_BIND_TIMEOUT_MS ?? 10_000,
    toolTimeoutMs: env.GPUVM_TOOL_TIMEOUT_MS ?? 30_000,
    logLevel: env.GPUVM_LOG_LEVEL ?? 'info',
    ...Object.fromEntries(Object.entries(overrides).filter(([, v]) => v !== undefined)),
  };
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new ConfigError(`invalid configuration: ${issue.path.join('.')}: ${issue.message}`);
  }
  if (parsed.data.agentSilentMs <= parsed.data.agentHeartbeatMs) {
    throw new ConfigError(
      `invalid configuration: agentSilentMs (${parsed.data.agentSilentMs}) must be more than agentHeartbeatMs (${parsed.data.agentHeartbeatMs}): a host would be found silent between two heartbeats`,
    );
  }
  return { ...parsed.data, dataDir: resolve(parsed.data.dataDir) } as Config;
}
