/** `gpuvm serve` as a real child process, for tests that kill it. */
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import { waitUntil } from './env.ts';

const BIN = fileURLToPath(new URL('../../bin/gpuvm.js', import.meta.url));

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
    srv.on('error', reject);
  });
}

export interface ServeChild {
  url: string;
  proc: ChildProcess;
  output: () => string;
  kill: (signal?: NodeJS.Signals) => Promise<void>;
}

export async function startServeChild(opts: {
  dataDir: string;
  port: number;
  databaseUrl?: string;
  env?: Record<string, string>;
  extraArgs?: string[];
  /** 'ready' (default): until health says ok; 'answering': as soon as it answers (it may still be starting). */
  waitFor?: 'ready' | 'answering';
}): Promise<ServeChild> {
  const env: Record<string, string> = {
    ...(process.env as Record<string, string>),
    GPUVM_POWERDOWN_TIMEOUT_MS: '300',
    GPUVM_BACKOFF_BASE_MS: '20',
    GPUVM_BACKOFF_MAX_MS: '200',
    GPUVM_POLL_MS: '200',
    GPUVM_MONITOR_INTERVAL_MS: '100',
    GPUVM_VM_MEMORY_MIB: '64',
    GPUVM_LOG_LEVEL: 'info',
    ...opts.env,
  };
  delete env.DATABASE_URL;
  if (opts.databaseUrl) env.DATABASE_URL = opts.databaseUrl;
  const proc = spawn(process.execPath, [BIN, 'serve', '--port', String(opts.port), '--data-dir', opts.dataDir, ...(opts.extraArgs ?? [])], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  const url = `http://127.0.0.1:${opts.port}`;
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  try {
    await waitUntil(
      'gpuvm serve to answer',
      async () => {
        if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`gpuvm serve exited (${proc.exitCode ?? proc.signalCode}):\n${out.slice(-2000)}`);
        // Answering is not enough: creates get 503 until the first reconciliation has judged the host.
        return fetch(`${url}/v1/health`).then(
          async (r) => r.ok && (opts.waitFor === 'answering' || ((await r.json()) as { status?: string }).status === 'ok'),
          () => false,
        );
      },
      60_000,
      100,
    );
  } catch (err) {
    // One that never answered must not outlive the test (it would hold its port and poll on).
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    throw err;
  }
  return {
    url,
    proc,
    output: () => out,
    kill: async (signal = 'SIGKILL') => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await exited;
    },
  };
}

export async function http<T = any>(base: string, method: string, path: string, body?: unknown): Promise<{ status: number; body: T }> {
  const res = await fetch(base + path, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}
