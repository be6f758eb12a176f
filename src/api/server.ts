/**
 * The HTTP JSON API, on loopback by default. The CLI is its main client: with embedded PGlite only
 * one process may open the database, so everything goes through the service.
 *
 *   GET    /v1/health               service, host and database facts
 *   POST   /v1/vms                  { gpus: 1|2|4|8, name?, host?, board? } → 202 the VM (provisioning); an
 *                                   Idempotency-Key header makes a retry return the same VM;
 *                                   503 + Retry-After while the service starts
 *   GET    /v1/vms[?all=true&host=H] live VMs (all=true includes deleted ones); each VM's `status` is
 *                                   its state, or `unknown` while its host's agent is unheard
 *   GET    /v1/vms/:id              one VM
 *          [?changedFrom=STATE&waitSeconds=N]  long poll: answers once the VM is no longer in
 *                                   STATE, or after N seconds (≤ 60) with the VM as it is
 *   DELETE /v1/vms/:id              → 202 the VM (stopping / releasing / deleted)
 *   GET    /v1/vms/:id/history      every event of the VM and its partition, with effect tries
 *   GET    /v1/partitions           the host's partitions and who holds them
 *   GET    /v1/hosts[?all=true]     hosts: state, whether they take VMs, agent heartbeat, free sizes,
 *                                   GPUs and what is quarantined (all=true includes removed hosts)
 *   POST   /v1/hosts/:id/cordon     { reason? } no new VMs; /uncordon takes them again (also ends
 *                                   maintenance or calls a drain off)
 *   POST   /v1/hosts/:id/drain      { reason?, deleteVms? } cordon, then maintenance once its VMs ended
 *   DELETE /v1/hosts/:id            remove an empty host
 *   GET    /v1/capacity             VMs of 1, 2, 4, 8 GPUs placeable now, per host and for the fleet
 *   POST   /v1/hosts/:id/clear-quarantine  { moduleId } | { partitionId } | { all: true }
 *   POST   /v1/hosts/:id/repair    { partitionId } → 202 the partition (repairing), if broken or unrepaired
 *
 * Errors are `{ "error": { "code", "message" } }` with 400/404/409; nothing is written on error.
 */
import { randomUUID } from 'node:crypto';
import Fastify, { type FastifyInstance } from 'fastify';
import { z } from 'zod';
import { badRequest, GpuvmError } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { VmService } from '../engine/vms.ts';
import { IDEMPOTENCY_KEY_PATTERN, VM_ID_PATTERN, VM_NAME_PATTERN } from '../engine/vms.ts';
import type { Kysely } from 'kysely';
import type { Database } from '../store/schema.ts';
import type { EffectPolicy } from '../engine/commands.ts';
import { changeHost, clearQuarantine, listHosts, repairPartition, type HostLifecycleCommand } from '../engine/hosts.ts';
import { registerReplayRoutes } from './replay-routes.ts';
import { HOST_ID_PATTERN } from '../config.ts';
import { BOARD_NAMES, readCapacity } from '../engine/fleet.ts';

export interface ApiDeps {
  vms: VmService;
  db: Kysely<Database>;
  policy: EffectPolicy;
  log: Logger;
  health: () => Promise<Record<string, unknown>>;
  /** An agent unheard this long makes its host unreachable. */
  silentMs: number;
}

const createVmBody = z
  .object({
    gpus: z.number({ error: 'gpus must be a number: 1, 2, 4 or 8' }).int('gpus must be a whole number: 1, 2, 4 or 8'),
    name: z
      .string({ error: 'name must be a string' })
      .max(63, 'name is longer than 63 characters')
      .regex(VM_NAME_PATTERN, "name may hold only letters, digits, '.', '_' and '-', and starts with a letter or digit")
      .optional(),
    host: z.string({ error: 'host must be a host id' }).regex(HOST_ID_PATTERN, 'host must be a host id: lower-case letters, digits and dashes').optional(),
    board: z.enum(BOARD_NAMES, { error: `board must be one of ${BOARD_NAMES.join(', ')}` }).optional(),
  })
  .strict();


const clearQuarantineBody = z
  .object({
    moduleId: z.number().int().min(1).max(8).optional(),
    partitionId: z.number().int().min(0).max(999).optional(),
    all: z.literal(true).optional(),
  })
  .strict();

const repairBody = z.object({ partitionId: z.number().int().min(0).max(999) }).strict();

function parseBody<T>(schema: z.ZodType<T>, body: unknown): T {
  if (body === undefined || body === null || typeof body !== 'object' || Array.isArray(body)) throw badRequest('expected a JSON object body');
  const result = schema.safeParse(body);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    const field = issue.path.join('.');
    throw badRequest(issue.code === 'unrecognized_keys' ? `unknown field(s): ${(issue as { keys: string[] }).keys.join(', ')}` : `${field ? field + ': ' : ''}${issue.message}`);
  }
  return result.data;
}

const hostLifecycleBody = z
  .object({
    reason: z.string().max(200, 'reason is longer than 200 characters').optional(),
    deleteVms: z.boolean().optional(),
  })
  .strict();

function hostIdParam(req: { params: unknown }): string {
  const hostId = (req.params as { id: string }).id;
  if (!HOST_ID_PATTERN.test(hostId)) throw badRequest(`invalid host id ${JSON.stringify(hostId.slice(0, 80))}`);
  return hostId;
}

function vmId(raw: string): string {
  if (!VM_ID_PATTERN.test(raw)) throw badRequest(`invalid VM id ${JSON.stringify(raw.slice(0, 80))}: expected vm- and 10 letters or digits`);
  return raw;
}

export async function buildApi(deps: ApiDeps): Promise<FastifyInstance> {
  const app = Fastify({ logger: false, bodyLimit: 64 * 1024, genReqId: () => randomUUID() });

  app.setErrorHandler((err: any, req, reply) => {
    if (err instanceof GpuvmError) {
      if (err.status === 503) reply.header('retry-after', '1');
      return reply.status(err.status).send({ error: { code: err.code, message: err.message } });
    }
    if (typeof err?.statusCode === 'number' && err.statusCode >= 400 && err.statusCode < 500) {
      const message = err.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || err instanceof SyntaxError ? `malformed JSON body: ${err.message}` : err.message;
      return reply.status(err.statusCode).send({ error: { code: 'bad-request', message } });
    }
    deps.log.error({ err: String(err?.stack ?? err), requestId: req.id, url: req.url }, 'request failed');
    return reply.status(500).send({ error: { code: 'internal', message: `internal error (request ${req.id}); see the service log` } });
  });
  app.setNotFoundHandler((req, reply) => reply.status(404).send({ error: { code: 'not-found', message: `no route ${req.method} ${req.url}` } }));

  const actor = (req: { headers: Record<string, unknown> }) => `api:${String(req.headers['x-gpuvm-actor'] ?? 'anonymous').slice(0, 64)}`;

  app.get('/v1/health', async () => deps.health());

  app.post('/v1/vms', async (req, reply) => {
    const body = parseBody(createVmBody, req.body);
    const key = req.headers['idempotency-key'];
    if (key !== undefined && (typeof key !== 'string' || !IDEMPOTENCY_KEY_PATTERN.test(key))) {
      throw badRequest('Idempotency-Key must be 8 to 128 letters, digits or . _ : - (a UUID will do)');
    }
    const vm = await deps.vms.create({ gpus: body.gpus, name: body.name, hostId: body.host, board: body.board, actor: actor(req), requestId: req.id, idempotencyKey: key });
    return reply.status(202).send(await deps.vms.view(vm));
  });

  app.get('/v1/vms', async (req) => {
    const query = req.query as Record<string, string | undefined>;
    if (query.host !== undefined && !HOST_ID_PATTERN.test(query.host)) throw badRequest(`invalid host id ${JSON.stringify(query.host.slice(0, 80))}`);
    return { vms: await deps.vms.list({ includeDeleted: query.all === 'true', hostId: query.host }) };
  });

  app.get('/v1/vms/:id', async (req) => {
    const id = vmId((req.params as { id: string }).id);
    const query = req.query as Record<string, string | undefined>;
    if (query.changedFrom === undefined) return deps.vms.view(await deps.vms.get(id));
    if (!/^[a-z][a-z_-]{0,31}$/.test(query.changedFrom)) throw badRequest(`changedFrom must be a VM state such as provisioning or running (got ${JSON.stringify(query.changedFrom.slice(0, 40))})`);
    const seconds = Number(query.waitSeconds ?? 30);
    if (!Number.isInteger(seconds) || seconds < 0 || seconds > 60) throw badRequest(`waitSeconds must be a whole number from 0 to 60 (got ${JSON.stringify(query.waitSeconds)})`);
    return deps.vms.view(await deps.vms.awaitChange(id, query.changedFrom, seconds * 1000));
  });

  app.delete('/v1/vms/:id', async (req, reply) => {
    const vm = await deps.vms.delete(vmId((req.params as { id: string }).id), actor(req), req.id);
    return reply.status(202).send(await deps.vms.view(vm));
  });

  app.get('/v1/vms/:id/history', async (req) => deps.vms.history(vmId((req.params as { id: string }).id)));

  app.get('/v1/partitions', async () => ({
    partitions: await deps.db.selectFrom('partitions').selectAll().orderBy('host_id').orderBy('partition_id').execute(),
  }));

  app.get('/v1/hosts', async (req) => {
    const all = (req.query as Record<string, string>).all === 'true';
    return { hosts: (await listHosts(deps.db, deps.silentMs)).filter((h) => all || h.state !== 'removed') };
  });

  app.get('/v1/capacity', async () => {
    const { hosts, fleet } = await readCapacity(deps.db, deps.silentMs);
    return { fleet, hosts: hosts.filter((h) => h.availability !== 'removed') };
  });

  const lifecycle = (path: string, command: (body: Record<string, unknown>) => HostLifecycleCommand) =>
    app.post(`/v1/hosts/:id/${path}`, async (req) => {
      const body = req.body === undefined || req.body === null ? {} : parseBody(hostLifecycleBody, req.body);
      return changeHost(deps.db, hostIdParam(req), command(body), actor(req), deps.policy, req.id);
    });
  lifecycle('cordon', (b) => ({ type: 'cordon', reason: (b.reason as string | undefined) ?? null }));
  lifecycle('uncordon', () => ({ type: 'uncordon' }));
  lifecycle('drain', (b) => ({ type: 'drain', reason: (b.reason as string | undefined) ?? null, deleteVms: b.deleteVms === true }));
  app.delete('/v1/hosts/:id', async (req) => changeHost(deps.db, hostIdParam(req), { type: 'remove' }, actor(req), deps.policy, req.id));

  app.post('/v1/hosts/:id/clear-quarantine', async (req) => {
    const body = parseBody(clearQuarantineBody, req.body);
    const hostId = (req.params as { id: string }).id;
    if (!HOST_ID_PATTERN.test(hostId)) throw badRequest(`invalid host id ${JSON.stringify(hostId.slice(0, 80))}`);
    const given = [body.moduleId !== undefined, body.partitionId !== undefined, body.all === true].filter(Boolean).length;
    if (given !== 1) throw badRequest('give exactly one of moduleId, partitionId or all: true');
    return clearQuarantine(deps.db, hostId, body, actor(req), deps.policy);
  });

  app.post('/v1/hosts/:id/repair', async (req, reply) => {
    const body = parseBody(repairBody, req.body);
    const hostId = (req.params as { id: string }).id;
    if (!HOST_ID_PATTERN.test(hostId)) throw badRequest(`invalid host id ${JSON.stringify(hostId.slice(0, 80))}`);
    return reply.status(202).send(await repairPartition(deps.db, hostId, body.partitionId, actor(req), deps.policy));
  });

  registerReplayRoutes(app, { db: deps.db });
  return app;
}
