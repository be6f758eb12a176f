/**
 * QMP (QEMU Machine Protocol) client over a unix socket.
 *
 * Wire format: one JSON object per line. The server speaks first with a greeting, the client
 * must send `qmp_capabilities` before anything else, replies carry the `id` of their command,
 * and asynchronous events may arrive at any time — including before the reply to the command
 * that caused them. QEMU serves one client at a time (a second connection gets no greeting
 * until the first leaves), so callers open a connection per operation and close it.
 */
import { connect as netConnect, type Socket } from 'node:net';
import { StringDecoder } from 'node:string_decoder';

/** sun_path is 108 bytes including the terminating NUL. */
export const MAX_UNIX_SOCKET_PATH_BYTES = 107;

export type QmpErrorCode = 'connect' | 'greeting' | 'timeout' | 'closed' | 'command';

export class QmpError extends Error {
  constructor(
    readonly code: QmpErrorCode,
    message: string,
    /** QMP error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, …) for code 'command'. */
    readonly errorClass?: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'QmpError';
  }
}

export interface QmpEvent {
  event: string;
  data?: unknown;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package?: string };
  capabilities?: string[];
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

interface EventWaiter {
  name: string;
  resolve: (e: QmpEvent) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
const DEFAULT_COMMAND_TIMEOUT_MS = 30_000;

export class QmpClient {
  readonly events: QmpEvent[] = [];
  readonly closed: Promise<void>;

  #greeting: QmpGreeting | undefined;
  #nextId = 1;
  readonly #pending = new Map<string, Pending>();
  readonly #listeners = new Set<(e: QmpEvent) => void>();
  readonly #waiters = new Set<EventWaiter>();
  readonly #decoder = new StringDecoder('utf8');
  #buffer = '';
  #isClosed = false;
  #closeReason: string | undefined;
  #onGreeting: ((g: QmpGreeting) => void) | undefined;
  #onEarlyFailure: ((err: QmpError) => void) | undefined;

  private constructor(
    readonly socketPath: string,
    private readonly socket: Socket,
  ) {
    this.closed = new Promise<void>((resolve) => {
      socket.once('close', () => {
        this.#handleClose();
        resolve();
      });
    });
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    // Errors after connection are followed by 'close'; the close handler reports them.
    socket.on('error', (err) => {
      this.#closeReason ??= `socket error: ${err.message}`;
    });
  }

  get greeting(): QmpGreeting {
    if (!this.#greeting) throw new QmpError('greeting', `QMP ${this.socketPath}: no greeting received`);
    return this.#greeting;
  }

  /** Connect, read the greeting and negotiate capabilities, all within `timeoutMs`. */
  static async connect(socketPath: string, opts: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    if (Buffer.byteLength(socketPath) > MAX_UNIX_SOCKET_PATH_BYTES) {
      throw new QmpError(
        'connect',
        `QMP socket path ${socketPath} is ${Buffer.byteLength(socketPath)} bytes; unix sockets allow at most ${MAX_UNIX_SOCKET_PATH_BYTES}`,
      );
    }
    const deadline = Date.now() + timeoutMs;

    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = netConnect({ path: socketPath });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new QmpError('timeout', `QMP ${socketPath}: connect timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new QmpError('connect', `QMP ${socketPath}: cannot connect (${err.code ?? err.message})`, undefined, { cause: err }));
      });
    });

    const client = new QmpClient(socketPath, socket);
    try {
      await client.#readGreeting(Math.max(0, deadline - Date.now()), timeoutMs);
      await client.execute('qmp_capabilities', undefined, { timeoutMs: Math.max(1, deadline - Date.now()) });
    } catch (err) {
      socket.destroy();
      throw err;
    }
    return client;
  }

  #readGreeting(timeoutMs: number, totalMs: number): Promise<QmpGreeting> {
    return new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#onGreeting = undefined;
        this.#onEarlyFailure = undefined;
        // QEMU accepts a second connection at the kernel level but stays silent until the
        // first client leaves; this is what that looks like from here.
        reject(new QmpError('timeout', `QMP ${this.socketPath}: no greeting within ${totalMs} ms (is another client connected?)`));
      }, timeoutMs);
      this.#onGreeting = (g) => {
        clearTimeout(timer);
        resolve(g);
      };
      this.#onEarlyFailure = (err) => {
        clearTimeout(timer);
        reject(err);
      };
    });
  }

  /** Run one command; each call gets a unique id and its reply is matched by that id. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.#isClosed) {
      return Promise.reject(new QmpError('closed', `QMP ${this.socketPath}: connection closed; cannot run ${command}`));
    }
    const id = `gpuvm-${this.#nextId++}`;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    const message: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) message.arguments = args;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new QmpError('timeout', `QMP ${this.socketPath}: ${command} got no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(`${JSON.stringify(message)}\n`);
    });
  }

  /** Subscribe to events as they arrive; returns the unsubscribe function. */
  onEvent(fn: (e: QmpEvent) => void): () => void {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }

  /** Resolves with the earliest event of that name received on this connection, waiting if none yet. */
  waitForEvent(name: string, timeoutMs: number): Promise<QmpEvent> {
    const seen = this.events.find((e) => e.event === name);
    if (seen) return Promise.resolve(seen);
    if (this.#isClosed) {
      return Promise.reject(new QmpError('closed', `QMP ${this.socketPath}: connection closed before event ${name}`));
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.#waiters.delete(waiter);
          reject(new QmpError('timeout', `QMP ${this.socketPath}: no ${name} event within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.#waiters.add(waiter);
    });
  }

  async close(): Promise<void> {
    if (!this.#isClosed) {
      this.#closeReason ??= 'closed by client';
      this.socket.end();
      // A peer that never acknowledges the FIN must not hold us up.
      const force = setTimeout(() => this.socket.destroy(), 1_000);
      await this.closed;
      clearTimeout(force);
    }
  }

  #onData(chunk: Buffer): void {
    this.#buffer += this.#decoder.write(chunk);
    let newline: number;
    while ((newline = this.#buffer.indexOf('\n')) >= 0) {
      const line = this.#buffer.slice(0, newline).trim();
      this.#buffer = this.#buffer.slice(newline + 1);
      if (line === '') continue;
      let message: unknown;
      try {
        message = JSON.parse(line);
      } catch {
        this.#protocolViolation(`malformed JSON from server: ${line.slice(0, 200)}`);
        return;
      }
      this.#dispatch(message);
      if (this.#isClosed) return;
    }
  }

  #dispatch(message: unknown): void {
    if (typeof message !== 'object' || message === null || Array.isArray(message)) {
      this.#protocolViolation(`unexpected message from server: ${JSON.stringify(message).slice(0, 200)}`);
      return;
    }
    const m = message as Record<string, unknown>;

    if (!this.#greeting) {
      const g = m.QMP as QmpGreeting | undefined;
      const v = g?.version?.qemu;
      if (!g || typeof v?.major !== 'number' || typeof v.minor !== 'number' || typeof v.micro !== 'number') {
        const err = new QmpError('greeting', `QMP ${this.socketPath}: expected a greeting, got ${JSON.stringify(m).slice(0, 200)}`);
        this.#onEarlyFailure?.(err);
        this.#closeReason ??= err.message;
        this.socket.destroy();
        return;
      }
      this.#greeting = g;
      this.#onGreeting?.(g);
      return;
    }

    if (typeof m.event === 'string') {
      const event: QmpEvent = { event: m.event };
      if ('data' in m) event.data = m.data;
      if (m.timestamp && typeof m.timestamp === 'object') event.timestamp = m.timestamp as QmpEvent['timestamp'];
      this.events.push(event);
      for (const fn of this.#listeners) fn(event);
      for (const w of [...this.#waiters]) {
        if (w.name === event.event) {
          clearTimeout(w.timer);
          this.#waiters.delete(w);
          w.resolve(event);
        }
      }
      return;
    }

    if ('return' in m || 'error' in m) {
      const pending = this.#takePending(m.id);
      if (!pending) return; // reply to a command that already timed out
      clearTimeout(pending.timer);
      if ('error' in m) {
        const e = (m.error ?? {}) as { class?: unknown; desc?: unknown };
        const cls = typeof e.class === 'string' ? e.class : 'GenericError';
        const desc = typeof e.desc === 'string' ? e.desc : JSON.stringify(m.error);
        pending.reject(new QmpError('command', `QMP ${this.socketPath}: ${pending.command} failed: ${cls}: ${desc}`, cls));
      } else {
        pending.resolve(m.return);
      }
    }
    // Anything else (unknown keys) is ignored, as the QMP spec asks of clients.
  }

  /** By id; a reply without id (QEMU could not parse the request) belongs to the oldest command,
   *  since QEMU answers in order outside out-of-band mode. */
  #takePending(id: unknown): Pending | undefined {
    const key = typeof id === 'string' ? id : id === undefined ? this.#pending.keys().next().value : undefined;
    if (key === undefined) return undefined;
    const pending = this.#pending.get(key);
    this.#pending.delete(key);
    return pending;
  }

  #protocolViolation(reason: string): void {
    this.#closeReason ??= reason;
    this.socket.destroy();
  }

  #handleClose(): void {
    if (this.#isClosed) return;
    this.#isClosed = true;
    const why = this.#closeReason ?? 'server closed the connection';
    if (!this.#greeting) {
      this.#onEarlyFailure?.(new QmpError('greeting', `QMP ${this.socketPath}: connection closed before greeting (${why})`));
    }
    for (const p of this.#pending.values()) {
      clearTimeout(p.timer);
      p.reject(new QmpError('closed', `QMP ${this.socketPath}: ${p.command} interrupted: ${why}`));
    }
    this.#pending.clear();
    for (const w of this.#waiters) {
      clearTimeout(w.timer);
      w.reject(new QmpError('closed', `QMP ${this.socketPath}: connection closed before event ${w.name} (${why})`));
    }
    this.#waiters.clear();
  }
}
