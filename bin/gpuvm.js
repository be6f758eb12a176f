#!/usr/bin/env node
// gpuvm runs its TypeScript sources through tsx: no build step between a checkout and a run.
import { register } from 'tsx/esm/api';

// What gpuvm writes (the embedded database, the run and fence folders, logs) is its owner's alone.
process.umask(0o077);
register();
await import('../src/cli/main.ts');
