/**
 * The simulated kernel: a long-running process that makes `<simRoot>/sys` behave like Linux sysfs
 * for PCI driver binding, so the real sysfs adapter runs unchanged against a folder.
 *
 *   node --import tsx src/host/sim/kernel.ts <simRoot>
 *
 * It reacts to writes in the control files (`drivers/<name>/unbind|bind`, `drivers_probe`,
 * `devices/<bdf>/driver_override|reset`), moves the `driver` symlinks as the kernel would, keeps
 * `<simRoot>/dev/vfio/<N>` in step with the IOMMU groups, and writes one line per action or
 * refused write to `<simRoot>/kernel.log` (a real write would have failed with that errno; the
 * adapter sees the non-change when it reads the link back). Faults come from
 * `<simRoot>/faults.json` key "sysfs", re-read on every action.
 *
 * fs.watch wakes it at once; a rescan every 50 ms catches the events fs.watch misses. Whatever is
 * pending when it starts (written while it was down) is handled by the first scan.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const PCI_ADDRESS = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/;
const RESCAN_MS = 50;
const VFIO = 'vfio-pci';

/** The id tables of the simulated modules. vfio-pci has none: it binds only through driver_override. */
const ID_TABLES: Record<string, { vendor?: string; classPrefix: string }> = {
  nvidia: { vendor: '0x10de', classPrefix: '0x0302' }, // 3D controller
  snd_hda_intel: { classPrefix: '0x0403' }, // HD audio
};

interface SysfsFaults {
  unbindBusy: string[];
  probeDelayMs: number;
  probeFails: string[];
}

export class SimKernel {
  private readonly pci: string;
  private readonly devicesDir: string;
  private readonly driversDir: string;
  private readonly groupsDir: string;
  private readonly vfioDir: string;
  private readonly logFile: string;
  private readonly pidFile: string;
  private readonly watchers: fs.FSWatcher[] = [];
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly lastOverride = new Map<string, string | null>();
  private interval: NodeJS.Timeout | undefined;
  private scanning = false;
  private rescan = false;

  constructor(readonly root: string) {
    this.pci = path.join(root, 'sys', 'bus', 'pci');
    this.devicesDir = path.join(this.pci, 'devices');
    this.driversDir = path.join(this.pci, 'drivers');
    this.groupsDir = path.join(root, 'sys', 'kernel', 'iommu_groups');
    this.vfioDir = path.join(root, 'dev', 'vfio');
    this.logFile = path.join(root, 'kernel.log');
    this.pidFile = path.join(root, 'kernel.pid');
  }

  start(): void {
    if (!fs.existsSync(this.devicesDir)) throw new Error(`${this.devicesDir} does not exist: build the simulated host first`);
    for (const bdf of this.devices()) this.lastOverride.set(bdf, this.readOverride(bdf));
    this.log(`kernel started (pid ${process.pid})`);
    this.scan();
    const watch = (dir: string) => {
      try {
        const w = fs.watch(dir, () => this.scan());
        w.on('error', () => undefined); // the periodic rescan covers a watcher that dies
        this.watchers.push(w);
      } catch {
        /* same: the periodic rescan covers it */
      }
    };
    watch(this.pci);
    for (const name of this.drivers()) watch(path.join(this.driversDir, name));
    for (const bdf of this.devices()) watch(path.join(this.devicesDir, bdf));
    this.interval = setInterval(() => this.scan(), RESCAN_MS);
    fs.writeFileSync(this.pidFile, `${process.pid}\n`);
  }

  stop(): void {
    if (this.interval) clearInterval(this.interval);
    for (const w of this.watchers) w.close();
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    try {
      if (fs.readFileSync(this.pidFile, 'utf8').trim() === String(process.pid)) fs.rmSync(this.pidFile, { force: true });
    } catch {
      /* no pidfile: nothing to remove */
    }
    this.log(`kernel stopped (pid ${process.pid})`);
  }

  // ── scan ──────────────────────────────────────────────────────────────────
  /** One pass over every control file. Never re-entered: a wake-up during a pass runs one more pass. */
  scan(): void {
    if (this.scanning) {
      this.rescan = true;
      return;
    }
    this.scanning = true;
    try {
      do {
        this.rescan = false;
        this.scanOnce();
      } while (this.rescan);
    } catch (err) {
      this.log(`scan error: ${err instanceof Error ? err.message : String(err)}`);
    } finally {
      this.scanning = false;
    }
  }

  private scanOnce(): void {
    const devices = this.devices();
    for (const bdf of devices) this.syncOverride(bdf);
    for (const name of this.drivers()) {
      this.consume(path.join(this.driversDir, name, 'unbind'), (token) => this.unbind(name, token));
      this.consume(path.join(this.driversDir, name, 'bind'), (token) => this.requestAttach(token, name, `bind via ${name}/bind`));
    }
    this.consume(path.join(this.pci, 'drivers_probe'), (token) => this.probe(token));
    for (const bdf of devices) this.consume(path.join(this.devicesDir, bdf, 'reset'), (token) => this.reset(bdf, token));
    this.syncVfioGroups();
  }

  /**
   * Takes what was written to a control file and empties it before acting, so a write that lands
   * after this read is kept for the next pass rather than truncated away.
   */
  private consume(file: string, handle: (token: string) => void): void {
    let fd: number;
    try {
      fd = fs.openSync(file, 'r+');
    } catch {
      return;
    }
    let text: string;
    try {
      if (fs.fstatSync(fd).size === 0) return;
      text = fs.readFileSync(fd, 'utf8');
      fs.ftruncateSync(fd, 0);
    } finally {
      fs.closeSync(fd);
    }
    for (const token of text.split('\n').map((l) => l.trim()).filter((l) => l !== '')) handle(token);
  }

  // ── actions ───────────────────────────────────────────────────────────────
  private unbind(driver: string, bdf: string): void {
    if (!this.isDevice(bdf)) return this.log(`unbind ${bdf} from ${driver}: ENODEV (no such device)`);
    const current = this.driverOf(bdf);
    if (current !== driver) return this.log(`unbind ${bdf} from ${driver}: ENODEV (bound to ${current ?? 'no driver'})`);
    if (this.faults().unbindBusy.includes(bdf)) return this.log(`unbind ${bdf} from ${driver}: EBUSY (injected fault), still bound`);
    fs.rmSync(path.join(this.devicesDir, bdf, 'driver'), { force: true });
    fs.rmSync(path.join(this.driversDir, driver, bdf), { force: true });
    this.log(`unbind ${bdf} from ${driver}: unbound`);
  }

  private probe(bdf: string): void {
    if (!this.isDevice(bdf)) return this.log(`drivers_probe ${bdf}: ENODEV (no such device)`);
    const current = this.driverOf(bdf);
    if (current !== null) return this.log(`drivers_probe ${bdf}: already bound to ${current}, nothing to do`);
    this.requestAttach(bdf, null, 'drivers_probe');
  }

  /** Attaches now, or after probeDelayMs (an asynchronous probe); the match is decided when it runs. */
  private requestAttach(bdf: string, requested: string | null, via: string): void {
    const delay = this.faults().probeDelayMs;
    if (delay <= 0) return this.attach(bdf, requested, via);
    this.log(`${via} ${bdf}: probe deferred ${delay} ms`);
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      try {
        this.attach(bdf, requested, via);
        this.syncVfioGroups();
      } catch (err) {
        this.log(`${via} ${bdf}: error ${err instanceof Error ? err.message : String(err)}`);
      }
    }, delay);
    this.timers.add(timer);
  }

  private attach(bdf: string, requested: string | null, via: string): void {
    if (!PCI_ADDRESS.test(bdf) || !this.isDevice(bdf)) return this.log(`${via} ${bdf}: ENODEV (no such device)`);
    const current = this.driverOf(bdf);
    if (current !== null) return this.log(`${via} ${bdf}: ${requested ? 'EBUSY' : 'nothing to do'} (bound to ${current})`);
    const override = this.readOverride(bdf);
    const driver = requested ?? override ?? this.idTableMatch(bdf);
    if (driver === null) return this.log(`${via} ${bdf}: no driver matches, left unbound`);
    if (!fs.existsSync(path.join(this.driversDir, driver))) return this.log(`${via} ${bdf}: driver ${driver} is not loaded, left unbound`);
    const matches = override !== null ? override === driver : this.idTableMatches(driver, bdf);
    if (!matches) return this.log(`${via} ${bdf}: ENODEV (${driver} does not match the device${override ? `, override is ${override}` : ''})`);
    if (driver === VFIO && this.faults().probeFails.includes(bdf)) return this.log(`${via} ${bdf}: ${driver} probe failed -EIO (injected fault), left unbound`);
    fs.symlinkSync(path.join('..', '..', 'drivers', driver), path.join(this.devicesDir, bdf, 'driver'));
    fs.rmSync(path.join(this.driversDir, driver, bdf), { force: true });
    fs.symlinkSync(path.join('..', '..', 'devices', bdf), path.join(this.driversDir, driver, bdf));
    this.log(`${via} ${bdf}: bound to ${driver}`);
  }

  private reset(bdf: string, token: string): void {
    if (token !== '1') return this.log(`reset ${bdf}: EINVAL (wrote ${JSON.stringify(token)})`);
    this.log(`reset ${bdf}: function reset done`);
  }

  /** The file holds the value, as the kernel's attribute does; an empty write reads back "(null)". */
  private syncOverride(bdf: string): void {
    const file = path.join(this.devicesDir, bdf, 'driver_override');
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch {
      return;
    }
    const trimmed = text.trim();
    if (trimmed === '' && text !== '') fs.writeFileSync(file, '(null)\n');
    const value = trimmed === '' || trimmed === '(null)' ? null : trimmed;
    if (this.lastOverride.get(bdf) !== value) {
      this.lastOverride.set(bdf, value);
      this.log(`driver_override ${bdf}: ${value ?? '(null)'}`);
    }
  }

  /** /dev/vfio/<N> exists while every device of group N is bound to vfio-pci. */
  private syncVfioGroups(): void {
    let groups: string[];
    try {
      groups = fs.readdirSync(this.groupsDir);
    } catch {
      return;
    }
    for (const group of groups) {
      let members: string[];
      try {
        members = fs.readdirSync(path.join(this.groupsDir, group, 'devices'));
      } catch {
        continue;
      }
      const viable = members.length > 0 && members.every((bdf) => this.driverOf(bdf) === VFIO);
      const node = path.join(this.vfioDir, group);
      const exists = fs.existsSync(node);
      if (viable && !exists) {
        fs.mkdirSync(this.vfioDir, { recursive: true });
        fs.writeFileSync(node, '');
        this.log(`vfio: group ${group} viable, created dev/vfio/${group}`);
      } else if (!viable && exists) {
        fs.rmSync(node, { force: true });
        this.log(`vfio: group ${group} no longer all on vfio-pci, removed dev/vfio/${group}`);
      }
    }
  }

  // ── reads ─────────────────────────────────────────────────────────────────
  private devices(): string[] {
    try {
      return fs.readdirSync(this.devicesDir).filter((d) => PCI_ADDRESS.test(d));
    } catch {
      return [];
    }
  }

  private drivers(): string[] {
    try {
      return fs.readdirSync(this.driversDir).filter((d) => /^[a-zA-Z0-9_.-]{1,64}$/.test(d));
    } catch {
      return [];
    }
  }

  private isDevice(bdf: string): boolean {
    return PCI_ADDRESS.test(bdf) && fs.existsSync(path.join(this.devicesDir, bdf));
  }

  private driverOf(bdf: string): string | null {
    try {
      return path.basename(fs.readlinkSync(path.join(this.devicesDir, bdf, 'driver')));
    } catch {
      return null;
    }
  }

  private readOverride(bdf: string): string | null {
    try {
      const v = fs.readFileSync(path.join(this.devicesDir, bdf, 'driver_override'), 'utf8').trim();
      return v === '' || v === '(null)' ? null : v;
    } catch {
      return null;
    }
  }

  private attr(bdf: string, name: string): string {
    try {
      return fs.readFileSync(path.join(this.devicesDir, bdf, name), 'utf8').trim().toLowerCase();
    } catch {
      return '';
    }
  }

  private idTableMatches(driver: string, bdf: string): boolean {
    const entry = ID_TABLES[driver];
    if (!entry) return false;
    if (entry.vendor && this.attr(bdf, 'vendor') !== entry.vendor) return false;
    return this.attr(bdf, 'class').startsWith(entry.classPrefix);
  }

  private idTableMatch(bdf: string): string | null {
    return this.drivers().find((d) => this.idTableMatches(d, bdf)) ?? null;
  }

  private faults(): SysfsFaults {
    let raw: unknown;
    try {
      raw = JSON.parse(fs.readFileSync(path.join(this.root, 'faults.json'), 'utf8'));
    } catch {
      raw = {};
    }
    const s = (raw && typeof raw === 'object' && 'sysfs' in raw ? (raw as { sysfs: unknown }).sysfs : {}) as Record<string, unknown> | null;
    const list = (v: unknown) => (Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : []);
    const delay = s && typeof s.probeDelayMs === 'number' && Number.isFinite(s.probeDelayMs) ? s.probeDelayMs : 0;
    return { unbindBusy: list(s?.unbindBusy), probeFails: list(s?.probeFails), probeDelayMs: delay };
  }

  private log(line: string): void {
    fs.appendFileSync(this.logFile, `${new Date().toISOString()} ${line}\n`);
  }
}

/** True when a process with this pid exists (EPERM: it exists but is not ours). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function main(): void {
  const rootArg = process.argv[2];
  if (!rootArg) {
    process.stderr.write('usage: node --import tsx src/host/sim/kernel.ts <simRoot>\n');
    process.exit(2);
  }
  const root = path.resolve(rootArg);
  const pidFile = path.join(root, 'kernel.pid');
  try {
    const other = Number.parseInt(fs.readFileSync(pidFile, 'utf8'), 10);
    if (Number.isInteger(other) && other > 0 && other !== process.pid && pidAlive(other)) {
      process.stderr.write(`simulated kernel: another kernel (pid ${other}) already runs for ${root}\n`);
      process.exit(1);
    }
  } catch {
    /* no pidfile: first start */
  }
  const kernel = new SimKernel(root);
  const shutdown = () => {
    kernel.stop();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  kernel.start();
}

// Run only as the entry point, so tests may import SimKernel.
if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
