/**
 * A check that runs every `intervalMs` and on demand (`kick`), never two passes at once, and never
 * lets a failed pass stop the next one. The QEMU monitor, the GPU health monitor and the Fabric
 * Manager guard are each one of these.
 */
import type { Logger } from '../log.ts';

export class Periodic {
  private timer: NodeJS.Timeout | null = null;
  private busy: Promise<void> | null = null;
  private again = false;
  private stopped = false;

  constructor(
    private readonly what: string,
    private readonly intervalMs: number,
    private readonly pass: () => Promise<unknown>,
    private readonly log: Logger,
  ) {}

  start(): void {
    this.timer = setInterval(() => this.kick(), this.intervalMs);
  }

  /** Runs a pass now, or right after the one under way: what prompted the kick may have come too late for it. */
  kick(): void {
    if (this.stopped) return;
    if (this.busy) {
      this.again = true;
      return;
    }
    this.again = false;
    this.busy = this.pass()
      .then(() => undefined)
      .catch((err) => this.log.error({ err: String(err) }, `${this.what} failed`))
      .finally(() => {
        this.busy = null;
        if (this.again) this.kick();
      });
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.stopped = true;
    await this.busy;
  }
}
