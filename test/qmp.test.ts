import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QmpClient, QmpError } from '../src/host/qmp.ts';

const GREETING = { QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3' }, capabilities: ['oob'] } };
const line = (o: unknown) => `${JSON.stringify(o)}\r\n`; // QEMU ends lines with CRLF
const ts = { seconds: 1795471320, microseconds: 711674 };

interface Received {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
}

/** A fake QMP server: sends the greeting (or not), negotiates, and hands every later command to `onCommand`. */
class FakeQmp {
  readonly received: Received[] = [];
  readonly sockets: Socket[] = [];
  server!: Server;
  constructor(
    readonly path: string,
    readonly onCommand: (cmd: Received, socket: Socket) => void = () => {},
    readonly opts: { greeting?: string | null } = {},
  ) {}

  async listen(): Promise<void> {
    this.server = createServer((socket) => {
      this.sockets.push(socket);
      socket.on('error', () => {});
      if (this.opts.greeting !== null) socket.write(this.opts.greeting ?? line(GREETING));
      let buf = '';
      socket.setEncoding('utf8');
      socket.on('data', (chunk: string) => {
        buf += chunk;
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const msg = JSON.parse(buf.slice(0, nl)) as Received;
          buf = buf.slice(nl + 1);
          this.received.push(msg);
          if (msg.execute === 'qmp_capabilities') socket.write(line({ return: {}, id: msg.id }));
          else this.onCommand(msg, socket);
        }
      });
    });
    await new Promise<void>((resolve) => this.server.listen(this.path, resolve));
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

let dir: string;
let fake: FakeQmp | undefined;
const clients: QmpClient[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'gpuvm-qmp-'));
});
afterEach(async () => {
  for (const c of clients.splice(0)) await c.close();
  await fake?.close();
  fake = undefined;
  rmSync(dir, { recursive: true, force: true });
});

async function serve(onCommand?: FakeQmp['onCommand'], opts?: FakeQmp['opts']): Promise<FakeQmp> {
  fake = new FakeQmp(join(dir, 'qmp.sock'), onCommand, opts);
  await fake.listen();
  return fake;
}

async function connect(timeoutMs = 2_000): Promise<QmpClient> {
  const c = await QmpClient.connect(fake!.path, { timeoutMs });
  clients.push(c);
  return c;
}

async function rejection(p: Promise<unknown>): Promise<QmpError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(QmpError);
    return err as QmpError;
  }
  throw new Error('expected a rejection');
}

describe('QmpClient', () => {
  it('reads the greeting and negotiates capabilities before anything else', async () => {
    const f = await serve((cmd, s) => s.write(line({ return: { status: 'running', singlestep: false, running: true }, id: cmd.id })));
    const c = await connect();
    expect(c.greeting.version.qemu).toEqual({ major: 7, minor: 2, micro: 22 });
    expect(f.received.map((r) => r.execute)).toEqual(['qmp_capabilities']);
    expect(f.received[0]!.arguments).toBeUndefined();
    const st = await c.execute<{ status: string }>('query-status');
    expect(st.status).toBe('running');
    expect(f.received.map((r) => r.execute)).toEqual(['qmp_capabilities', 'query-status']);
  });

  it('gives every command a unique id and matches replies by id, even out of order', async () => {
    const held: Received[] = [];
    const f = await serve((cmd, s) => {
      held.push(cmd);
      if (held.length === 2) {
        // Answer the second command first.
        s.write(line({ return: `answer-${held[1]!.arguments!.n}`, id: held[1]!.id }));
        s.write(line({ return: `answer-${held[0]!.arguments!.n}`, id: held[0]!.id }));
      }
    });
    const c = await connect();
    const [a, b] = await Promise.all([c.execute('echo', { n: 1 }), c.execute('echo', { n: 2 })]);
    expect(a).toBe('answer-1');
    expect(b).toBe('answer-2');
    const ids = f.received.map((r) => r.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.every((id) => id !== undefined)).toBe(true);
  });

  it('keeps an event that arrives before the reply to the command that caused it', async () => {
    await serve((cmd, s) => {
      if (cmd.execute === 'stop') {
        s.write(line({ timestamp: ts, event: 'STOP' }) + line({ return: {}, id: cmd.id }));
      } else if (cmd.execute === 'quit') {
        s.write(line({ timestamp: ts, event: 'SHUTDOWN', data: { guest: false, reason: 'host-qmp-quit' } }));
        s.write(line({ return: {}, id: cmd.id }));
      }
    });
    const c = await connect();
    const seen: string[] = [];
    const off = c.onEvent((e) => seen.push(e.event));
    await c.execute('stop');
    // The event was processed before the reply resolved the command.
    expect(c.events.map((e) => e.event)).toEqual(['STOP']);
    expect(c.events[0]!.timestamp).toEqual(ts);
    const stop = await c.waitForEvent('STOP', 10); // already received: no waiting
    expect(stop.event).toBe('STOP');
    off();
    await c.execute('quit');
    expect(seen).toEqual(['STOP']); // unsubscribed before SHUTDOWN
    expect(c.events.map((e) => e.event)).toEqual(['STOP', 'SHUTDOWN']);
    expect(c.events[1]!.data).toEqual({ guest: false, reason: 'host-qmp-quit' });
  });

  it('waitForEvent resolves when the event arrives later, and times out otherwise', async () => {
    await serve((cmd, s) => {
      s.write(line({ return: {}, id: cmd.id }));
      setTimeout(() => s.write(line({ timestamp: ts, event: 'POWERDOWN' })), 50);
    });
    const c = await connect();
    const waiting = c.waitForEvent('POWERDOWN', 2_000);
    await c.execute('system_powerdown');
    expect((await waiting).event).toBe('POWERDOWN');
    const err = await rejection(c.waitForEvent('RESET', 100));
    expect(err.code).toBe('timeout');
    expect(err.message).toContain('RESET');
  });

  it('buffers messages split across writes, including inside a multi-byte character', async () => {
    const greeting = Buffer.from(line(GREETING));
    const f = await serve(
      (cmd, s) => {
        const payload = Buffer.from(
          line({ timestamp: ts, event: 'RESUME' }) + line({ return: { note: 'Grüße → ✓' }, id: cmd.id }),
        );
        // Cut in the middle of the 3-byte '→' and byte by byte around the line break.
        const cut = payload.indexOf(Buffer.from('→')) + 1;
        const pieces = [payload.subarray(0, 5), payload.subarray(5, cut), payload.subarray(cut, cut + 1), payload.subarray(cut + 1)];
        let delay = 0;
        for (const p of pieces) setTimeout(() => s.write(p), (delay += 15));
      },
      { greeting: null },
    );
    // Greeting itself in three pieces.
    const connecting = QmpClient.connect(f.path, { timeoutMs: 2_000 });
    await new Promise((r) => setTimeout(r, 30));
    const s = f.sockets[0]!;
    s.write(greeting.subarray(0, 7));
    await new Promise((r) => setTimeout(r, 15));
    s.write(greeting.subarray(7, 40));
    await new Promise((r) => setTimeout(r, 15));
    s.write(greeting.subarray(40));
    const c = await connecting;
    clients.push(c);
    expect(c.greeting.version.qemu.major).toBe(7);
    const r = await c.execute<{ note: string }>('cont');
    expect(r.note).toBe('Grüße → ✓');
    expect(c.events.map((e) => e.event)).toEqual(['RESUME']);
  });

  it('turns error replies into QmpError("command") carrying the QMP error class', async () => {
    await serve((cmd, s) =>
      s.write(line({ error: { class: 'DeviceNotFound', desc: "Device '/machine/peripheral/nope' not found" }, id: cmd.id })),
    );
    const c = await connect();
    const err = await rejection(c.execute('qom-get', { path: '/machine/peripheral/nope', property: 'parent_bus' }));
    expect(err.code).toBe('command');
    expect(err.errorClass).toBe('DeviceNotFound');
    expect(err.message).toContain('qom-get');
    expect(err.message).toContain("Device '/machine/peripheral/nope' not found");
  });

  it('times out a command with no reply, and ignores its late reply', async () => {
    let late: Received | undefined;
    await serve((cmd, s) => {
      if (cmd.execute === 'slow') late = cmd;
      else {
        if (late) s.write(line({ return: 'late', id: late.id }));
        s.write(line({ return: 'fast', id: cmd.id }));
      }
    });
    const c = await connect();
    const started = Date.now();
    const err = await rejection(c.execute('slow', undefined, { timeoutMs: 100 }));
    expect(err.code).toBe('timeout');
    expect(Date.now() - started).toBeGreaterThanOrEqual(90);
    expect(await c.execute('next')).toBe('fast');
  });

  it('times out connect when no greeting comes (QEMU busy with another client)', async () => {
    await serve(undefined, { greeting: null });
    const err = await rejection(QmpClient.connect(fake!.path, { timeoutMs: 150 }));
    expect(err.code).toBe('timeout');
    expect(err.message).toContain('greeting');
  });

  it('on server close: `closed` resolves, pending commands and waiters reject, later commands reject', async () => {
    await serve((cmd, s) => {
      if (cmd.execute === 'hang') setTimeout(() => s.destroy(), 50);
    });
    const c = await connect();
    const pending = c.execute('hang', undefined, { timeoutMs: 5_000 });
    const waiter = c.waitForEvent('SHUTDOWN', 5_000);
    const pendingErr = await rejection(pending);
    expect(pendingErr.code).toBe('closed');
    expect((await rejection(waiter)).code).toBe('closed');
    await c.closed;
    expect((await rejection(c.execute('query-status'))).code).toBe('closed');
  });

  it('refuses a socket path longer than 107 bytes, and reports a missing socket as connect', async () => {
    const long = `/tmp/${'x'.repeat(110)}/qmp.sock`;
    const err = await rejection(QmpClient.connect(long));
    expect(err.code).toBe('connect');
    expect(err.message).toContain('107');
    const missing = await rejection(QmpClient.connect(join(dir, 'nope.sock'), { timeoutMs: 500 }));
    expect(missing.code).toBe('connect');
    expect(missing.message).toContain('ENOENT');
  });

  it('rejects something that is not a QMP greeting', async () => {
    await serve(undefined, { greeting: line({ hello: 'world' }) });
    const err = await rejection(QmpClient.connect(fake!.path, { timeoutMs: 1_000 }));
    expect(err.code).toBe('greeting');
  });

  it('close() ends the connection and resolves `closed`', async () => {
    await serve();
    const c = await connect();
    await c.close();
    await c.closed;
    expect((await rejection(c.execute('query-status'))).code).toBe('closed');
  });
});
