import { defineConfig } from 'vitest/config';

/**
 * Test files that never open a database (adapters, simulators, machines, stored histories). With
 * DATABASE_URL set, the run is about the Postgres path, so they are left to the embedded run.
 */
const DATABASE_FREE = ['doctor', 'fmpm', 'history-fixtures', 'host-config', 'machines', 'nvidia-smi', 'qemu', 'qmp', 'reachability', 'sim-host', 'sysfs'];

// The tests start many Node processes (simulated tools, the QEMU stand-in, `gpuvm serve` children);
// none makes a TLS connection, and loading an extra CA bundle roughly doubles each one's start.
delete process.env.NODE_EXTRA_CA_CERTS;

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    exclude: process.env.DATABASE_URL ? DATABASE_FREE.map((name) => `test/${name}.test.ts`) : [],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Tests that share the local Postgres or spawn QEMU run one file at a time on 2 cores.
    fileParallelism: false,
    // In CI, also write a JSON report: .ci/run prints the plain "N passed, N failed" line from it.
    reporters: process.env.CI ? ['default', ['json', { outputFile: '.test-report.json' }]] : ['default'],
  },
});
