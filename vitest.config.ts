import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Tests that share the local Postgres or spawn QEMU run one file at a time on 2 cores.
    fileParallelism: false,
    // In CI, also write a JSON report: .ci/run prints the plain "N passed, N failed" line from it.
    reporters: process.env.CI ? ['default', ['json', { outputFile: '.test-report.json' }]] : ['default'],
  },
});
