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
