/**
 * Placement on one host: a free partition of exactly the requested size whose modules are all
 * unclaimed and healthy. The choice is made in memory; the guarantee is in the database: the claim rows'
 * primary key (host, module) and the partition stream's version make two concurrent requests
 * collide, and the loser decides again on fresh state.
 */
export const GPU_COUNTS = [1, 2, 4, 8] as const;

export interface PartitionCandidate {
  partitionId: number;
  modules: number[];
  state: string;
}

/**
 * Picks the partition to claim, or null. Among free candidates of the right size it prefers the
 * one inside the smallest larger island that is already partly used, so small VMs pack together
 * and large partitions stay available; ties go to the lowest partition id.
 */
export function choosePartition(all: PartitionCandidate[], unavailableModules: Set<number>, size: number): PartitionCandidate | null {
  const candidates = all.filter(
    (p) => p.modules.length === size && p.state === 'free' && p.modules.every((m) => !unavailableModules.has(m)),
  );
  if (candidates.length === 0) return null;
  const packing = (p: PartitionCandidate): number => {
    const enclosing = all
      .filter((q) => q.modules.length > p.modules.length && p.modules.every((m) => q.modules.includes(m)))
      .sort((a, b) => a.modules.length - b.modules.length)[0];
    return enclosing ? enclosing.modules.filter((m) => unavailableModules.has(m)).length : 0;
  };
  return [...candidates].sort((a, b) => packing(b) - packing(a) || a.partitionId - b.partitionId)[0]!;
}

// ── interim fleet API (replaced by the anti-fragmentation policy) ──
export type GpuCount = 1 | 2 | 4 | 8;
export interface HostView { hostId: string; board: string; partitions: PartitionCandidate[]; unavailable: Set<number> }
export type Demand = Partial<Record<GpuCount, number>>;
export interface Placement { hostId: string; partitionId: number; modules: number[]; score: number }
export interface PlacementDecision { policy: string; chosen: Placement; runnerUp: Placement | null }
export function place(hosts: HostView[], size: GpuCount, _demand: Demand): PlacementDecision | null {
  const all: Placement[] = [];
  for (const h of hosts) {
    const p = choosePartition(h.partitions, h.unavailable, size);
    if (p) all.push({ hostId: h.hostId, partitionId: p.partitionId, modules: p.modules, score: 8 - h.unavailable.size });
  }
  all.sort((a, b) => a.score - b.score || a.hostId.localeCompare(b.hostId));
  return all[0] ? { policy: 'interim', chosen: all[0], runnerUp: all[1] ?? null } : null;
}
export function capacityOf(host: HostView): Record<GpuCount, number> {
  const out = { 1: 0, 2: 0, 4: 0, 8: 0 } as Record<GpuCount, number>;
  for (const p of host.partitions) if (p.state === 'free' && p.modules.every((m) => !host.unavailable.has(m))) out[p.modules.length as GpuCount]++;
  return out;
}
