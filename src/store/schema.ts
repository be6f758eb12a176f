/** Table types for Kysely. jsonb columns are written as JSON text and read back parsed. */
import type { ColumnType, Generated } from 'kysely';

type Json<T> = ColumnType<T, string, string>;
type Timestamp = ColumnType<Date, Date | string, Date | string>;

export interface EventsTable {
  position: ColumnType<string, never, never>;
  stream_id: string;
  stream_version: number;
  type: string;
  data: Json<Record<string, unknown>>;
  state_before: Json<unknown> | null;
  state_after: Json<unknown>;
  machine: string;
  machine_version: number;
  causation_id: string | null;
  correlation_id: string;
  actor: string;
  recorded_at: Timestamp;
  tx_id: ColumnType<string, never, never>;
}

export interface StreamsTable {
  stream_id: string;
  machine: string;
  machine_version: number;
  version: number;
  state: Json<unknown>;
  context: Json<Record<string, unknown>>;
  created_at: Timestamp;
  updated_at: Timestamp;
}

/** `cancelled`: a durable timer whose state was left before it fell due (it never ran). */
export type EffectStatus = 'pending' | 'running' | 'done' | 'failed' | 'cancelled';

export interface EffectsTable {
  id: string;
  stream_id: string;
  host_id: string;
  type: string;
  params: Json<Record<string, unknown>>;
  correlation_id: string;
  status: EffectStatus;
  due_at: Timestamp;
  attempts: Generated<number>;
  max_attempts: number;
  lease_owner: string | null;
  lease_until: Timestamp | null;
  /** The epoch of the agent holding the lease (see AgentsTable). */
  lease_epoch: string | null;
  /** "Not yet" answers so far: waits on a deadline that did not count as tries. */
  waits: Generated<number>;
  waiting_since: Timestamp | null;
  claimed_at: Timestamp | null;
  last_error: string | null;
  note: string | null;
  created_at: Timestamp;
  completed_at: Timestamp | null;
}

export interface EffectAttemptsTable {
  effect_id: string;
  attempt: number;
  worker: string;
  started_at: Timestamp;
  finished_at: Timestamp;
  /** 'waiting': a "not yet" answer, which does not count against the budget. */
  outcome: 'ok' | 'error' | 'lost' | 'waiting';
  error: string | null;
  epoch: string | null;
  /** 0 for a try that counts; n for the effect's n-th wait. */
  wait: Generated<number>;
}

/** One row per host: its current agent's epoch, and who holds it. */
export interface AgentsTable {
  host_id: string;
  epoch: string;
  pid: number;
  machine: string;
  command: string;
  started_at: Timestamp;
  heartbeat_at: Timestamp;
  /** When this epoch's agent finished its first reconciliation; null while it starts. */
  ready_at: Timestamp | null;
  /** The host's VM defaults as its agent's config gives them (memoryMiB, vcpus, powerdownTimeoutMs). */
  vm_defaults: Json<Record<string, unknown>> | null;
}

export interface HostsTable {
  id: string;
  simulated: boolean;
  board: string;
  inventory: Json<Record<string, unknown>>;
  registered_at: Timestamp;
  quarantined_modules: Json<Record<string, { reason: string; source: string }>>;
  /** The host machine's state (machines/host.ts). */
  state: string;
  /** When its agent was found silent; null while it is heard. */
  silent_since: Timestamp | null;
}

export interface VmsTable {
  id: string;
  name: string;
  host_id: string;
  gpu_count: number;
  partition_id: number;
  gpus: Json<{ moduleId: number; pciAddress: string }[]>;
  state: string;
  reason: string | null;
  qemu_pid: number | null;
  created_at: Timestamp;
  updated_at: Timestamp;
}

export interface PartitionsTable {
  host_id: string;
  partition_id: number;
  modules: Json<number[]>;
  size: number;
  state: string;
  vm_id: string | null;
  failure: string | null;
  updated_at: Timestamp;
}

export interface GpuClaimsTable {
  host_id: string;
  module_id: number;
  partition_id: number;
  /** Null while a drift repair holds the GPUs (no VM). */
  vm_id: string | null;
}

export interface Database {
  events: EventsTable;
  streams: StreamsTable;
  effects: EffectsTable;
  effect_attempts: EffectAttemptsTable;
  hosts: HostsTable;
  vms: VmsTable;
  partitions: PartitionsTable;
  gpu_claims: GpuClaimsTable;
  agents: AgentsTable;
}
