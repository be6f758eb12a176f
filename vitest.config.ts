import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Tests that share the local Postgres or spawn QEMU run one file at a time on 2 cores.
    fileParallelism: false,
  },
});
