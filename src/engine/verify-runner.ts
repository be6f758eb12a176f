/**
 * Runs `gpuvm verify` for the API on a worker thread (verify-worker.ts), one at a time per process.
 * This thread only holds verify's repeatable-read, read-only transaction and runs the queries the
 * worker sends; folding, checking and comparing happen there, so requests keep being served.
 *
 * A second verify while one runs is refused (429, code `busy`) rather than queued: a verify holds a
 * snapshot open and a core busy for as long as the log is long, queued ones would pile up behind it
 * on a slow client's retries, and the answer of one that is already running is no older than the
 * operator's next try.
 */
import { Worker } from 'node:worker_threads';
import { CompiledQuery, type Kysely } from 'kysely';
import { GpuvmError } from '../errors.ts';
import type { Database } from '../store/schema.ts';
import { BOOTSTRAP, tsxEsmApi } from './rebuild.ts';
import type { VerifyReport } from './verify.ts';
import type { FromMain, ToMain } from './verify-worker.ts';

export class VerifyBusyError extends GpuvmError {
  constructor() {
    super(429, 'busy', 'a verify is already running in this service; try again when it has finished');
    this.name = 'VerifyBusyError';
  }
}

export class VerifyRunner {
  private worker: Worker | null = null;
  private closed = false;

  constructor(private readonly db: Kysely<Database>) {}

  get running(): boolean {
    return this.worker !== null;
  }

  /** The report, as verifyHistory's; VerifyBusyError while another runs. */
  async run(): Promise<VerifyReport> {
    if (this.closed) throw new GpuvmError(503, 'shutting-down', 'the service is shutting down');
    if (this.worker) throw new VerifyBusyError();
    const worker = new Worker(BOOTSTRAP, { eval: true, workerData: { tsx: tsxEsmApi(), entry: new URL('./verify-worker.ts', import.meta.url).href } });
    this.worker = worker;
    try {
      return await this.db
        .transaction()
        .setIsolationLevel('repeatable read')
        .setAccessMode('read only')
        .execute(
          (tx) =>
            new Promise<VerifyReport>((resolve, reject) => {
              const reply = (m: FromMain) => worker.postMessage(m);
              worker.on('message', (m: ToMain) => {
                if (m.kind === 'done') resolve(m.report);
                else if (m.kind === 'failed') reject(Object.assign(new Error(`verify failed: ${m.message}`), { stack: m.stack }));
                else {
                  tx.executeQuery(CompiledQuery.raw(m.sql, [...m.parameters])).then(
                    (r) => reply({ id: m.id, rows: r.rows as unknown[], numAffectedRows: r.numAffectedRows }),
                    (err: unknown) => reply({ id: m.id, error: err instanceof Error ? err.message : String(err) }),
                  );
                }
              });
              worker.on('error', reject);
              worker.on('exit', (code) => reject(new Error(`the verify worker exited (code ${code}) before it answered`)));
            }),
        );
    } finally {
      this.worker = null;
      await worker.terminate();
    }
  }

  /** Stops a running verify (its request fails). */
  async close(): Promise<void> {
    this.closed = true;
    await this.worker?.terminate();
  }
}
