/**
 * Incident replay over HTTP:
 *
 *   GET  /v1/replay/vm/:id?at=ISO | ?position=N    the VM and its partition as of that moment
 *   GET  /v1/replay/host/:id?at=ISO | ?position=N  active partitions, GPU drivers, VMs on the host then
 *   POST /v1/verify                                 refold the whole history; { ok, streams, events, problems }
 *                                                   (on a worker thread, one at a time: 429 `busy` while one runs)
 *   GET  /v1/vms/:id/export                         the VM's incident bundle (application/x-ndjson)
 *
 * Without at/position a replay is of the end of the log. Bad parameters are 400, unknown ids 404.
 */
import { Readable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import type { Kysely } from 'kysely';
import { badRequest, notFound } from '../errors.ts';
import { exportIncident, type IncidentRecord } from '../engine/export.ts';
import { parseIsoTime, POSITION_PATTERN, replayHost, replayVm, type ReplayPoint } from '../engine/replay.ts';
import { formatProblem } from '../engine/verify.ts';
import { VerifyRunner } from '../engine/verify-runner.ts';
import { VM_ID_PATTERN } from '../engine/vms.ts';
import type { Database } from '../store/schema.ts';
import { HOST_ID_PATTERN } from '../config.ts';

/** The same rule as the other host routes: what a host id may look like. */

const quote = (v: string) => JSON.stringify(v.slice(0, 80));

function vmIdParam(raw: string): string {
  if (!VM_ID_PATTERN.test(raw)) throw badRequest(`invalid VM id ${quote(raw)}: expected vm- and 10 letters or digits`);
  return raw;
}

function hostIdParam(raw: string): string {
  if (!HOST_ID_PATTERN.test(raw)) throw badRequest(`invalid host id ${quote(raw)}: expected lower-case letters, digits and '-'`);
  return raw;
}

/** `?at=ISO` or `?position=N` (or neither: the end of the log); anything else is a 400. */
export function replayPointFromQuery(query: unknown): ReplayPoint {
  const q = (query ?? {}) as Record<string, unknown>;
  const unknown = Object.keys(q).filter((k) => k !== 'at' && k !== 'position');
  if (unknown.length) throw badRequest(`unknown query parameter(s): ${unknown.join(', ')}; expected at=ISO-TIME or position=N`);
  for (const k of ['at', 'position']) {
    if (q[k] !== undefined && typeof q[k] !== 'string') throw badRequest(`give ${k} once`);
  }
  const at = q.at as string | undefined;
  const position = q.position as string | undefined;
  if (at !== undefined && position !== undefined) throw badRequest('give at or position, not both');
  if (at !== undefined) {
    const time = parseIsoTime(at);
    if (!time) throw badRequest(`at must be an ISO 8601 time with a zone, e.g. 2025-01-02T03:04:05.678Z (got ${quote(at)})`);
    return { time };
  }
  if (position !== undefined) {
    if (!POSITION_PATTERN.test(position)) throw badRequest(`position must be a log position: 1 to 18 decimal digits (got ${quote(position)})`);
    return { position };
  }
  return {};
}

function ndjson(first: IncidentRecord, rest: AsyncIterator<IncidentRecord>): Readable {
  return Readable.from(
    (async function* () {
      yield JSON.stringify(first) + '\n';
      for (let r = await rest.next(); !r.done; r = await rest.next()) yield JSON.stringify(r.value) + '\n';
    })(),
  );
}

export function registerReplayRoutes(app: FastifyInstance, deps: { db: Kysely<Database> }): void {
  app.get('/v1/replay/vm/:id', async (req) => {
    const id = vmIdParam((req.params as { id: string }).id);
    return replayVm(deps.db, id, replayPointFromQuery(req.query));
  });

  app.get('/v1/replay/host/:id', async (req) => {
    const id = hostIdParam((req.params as { id: string }).id);
    return replayHost(deps.db, id, replayPointFromQuery(req.query));
  });

  const verifier = new VerifyRunner(deps.db);
  app.addHook('onClose', () => verifier.close());
  app.post('/v1/verify', async () => {
    const report = await verifier.run();
    return { ok: report.problems.length === 0, ...report, lines: report.problems.map(formatProblem) };
  });

  app.get('/v1/vms/:id/export', async (req, reply) => {
    const id = vmIdParam((req.params as { id: string }).id);
    const records = exportIncident(deps.db, id);
    // The first record is read before answering, so an unknown VM is a 404 and not a cut-off stream.
    const first = await records.next();
    if (first.done) throw notFound(`no VM ${id}`);
    return reply
      .header('content-type', 'application/x-ndjson; charset=utf-8')
      .header('content-disposition', `attachment; filename="${id}.incident.jsonl"`)
      .send(ndjson(first.value, records));
  });
}
