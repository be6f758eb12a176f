/**
 * The sysfs adapter: PCI driver binding, IOMMU groups, reset and BAR sizes, read and written the
 * way the kernel expects (DESIGN §2.3). The same code runs on a real host (root '/') and on a
 * simulated host (root <simRoot>, a folder a simulated kernel keeps behaving like sysfs).
 *
 * Every write is verified by reading the effect back: a write to `drivers_probe` succeeds even
 * when no driver attached, and probing can be asynchronous. No step ever leaves a GPU with no
 * driver: a failed bind puts the old driver back and reports the original failure.
 */
import { constants as fsConstants } from 'node:fs';
import { access, readFile, readdir, readlink, stat, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { isPciAddress, parsePciAddress } from './pci.ts';

export type SysfsErrorCode = 'ENODEV' | 'EBUSY' | 'EINVAL' | 'EACCES' | 'timeout' | 'no-driver' | 'unknown';

export class SysfsError extends Error {
  override name = 'SysfsError';
  constructor(
    readonly code: SysfsErrorCode,
    readonly pciAddress: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export interface SysfsOptions {
  /** '/' on a real host; the simulated host's folder otherwise. */
  root: string;
  /** How long a bind or unbind may take to show in the `driver` link (default 10000). */
  bindTimeoutMs?: number;
  /** How often the `driver` link is re-read while waiting (default 10). */
  pollMs?: number;
}

export interface BarRegion {
  /** Line number in `resource`: 0–5 the BARs, 6 the expansion ROM. */
  index: number;
  start: bigint;
  end: bigint;
  flags: bigint;
  sizeBytes: bigint;
}

/** Driver names go into paths: nothing that could climb out of drivers/. */
const DRIVER_NAME_PATTERN = /^[a-zA-Z0-9_.-]{1,64}$/;
const VFIO_DRIVER = 'vfio-pci';
/** A short, non-fatal wait for a cleared override to read back as "(null)". */
const OVERRIDE_SETTLE_MAX_MS = 1000;

function errnoOf(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

function mapErrno(errno: string | undefined): SysfsErrorCode {
  switch (errno) {
    case 'ENODEV':
    case 'ENOENT':
    case 'ENXIO':
      return 'ENODEV';
    case 'EBUSY':
      return 'EBUSY';
    case 'EINVAL':
      return 'EINVAL';
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return 'EACCES';
    default:
      return 'unknown';
  }
}

/** Validates before anything touches the file system; a bad address is EINVAL, not an fs error. */
function checkAddress(value: string): string {
  if (!isPciAddress(value)) {
    throw new SysfsError('EINVAL', String(value), `invalid PCI address ${JSON.stringify(value)}: expected DDDD:BB:SS.F in lower-case hex, e.g. 0000:17:00.0`);
  }
  return parsePciAddress(value);
}

function checkDriverName(driver: string, pciAddress: string): string {
  if (typeof driver !== 'string' || !DRIVER_NAME_PATTERN.test(driver)) {
    throw new SysfsError('EINVAL', pciAddress, `invalid driver name ${JSON.stringify(driver)} for ${pciAddress}: expected ${DRIVER_NAME_PATTERN.source}`);
  }
  return driver;
}

function parseHex(text: string, file: string, pciAddress: string): bigint {
  if (!/^0x[0-9a-fA-F]{1,16}$/.test(text)) throw new SysfsError('unknown', pciAddress, `unexpected value ${JSON.stringify(text)} in ${file}`);
  return BigInt(text);
}

export class Sysfs {
  readonly root: string;
  readonly bindTimeoutMs: number;
  readonly pollMs: number;
  /** drivers_probe is shared by every device: one mutating operation at a time. */
  private tail: Promise<unknown> = Promise.resolve();

  constructor(opts: SysfsOptions) {
    this.root = opts.root;
    this.bindTimeoutMs = opts.bindTimeoutMs ?? 10_000;
    this.pollMs = opts.pollMs ?? 10;
  }

  // ── paths (only ever built from validated addresses and driver names) ─────────
  private get pciDir(): string {
    return join(this.root, 'sys', 'bus', 'pci');
  }
  private deviceDir(bdf: string): string {
    return join(this.pciDir, 'devices', bdf);
  }
  private driverDir(driver: string): string {
    return join(this.pciDir, 'drivers', driver);
  }

  // ── reads ─────────────────────────────────────────────────────────────────
  async driverOf(pciAddress: string): Promise<string | null> {
    const bdf = checkAddress(pciAddress);
    return this.readDriver(bdf);
  }

  async iommuGroup(pciAddress: string): Promise<{ group: number; devices: string[] }> {
    const bdf = checkAddress(pciAddress);
    await this.requireDevice(bdf);
    const link = join(this.deviceDir(bdf), 'iommu_group');
    let target: string;
    try {
      target = await readlink(link);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') {
        throw new SysfsError('ENODEV', bdf, `${bdf} has no IOMMU group (${link} is missing): is the IOMMU on (intel_iommu=on / amd_iommu=on)?`, { cause: err });
      }
      throw this.fsError(err, bdf, `reading ${link}`);
    }
    const name = basename(target);
    if (!/^\d{1,6}$/.test(name)) throw new SysfsError('unknown', bdf, `${link} points at ${JSON.stringify(target)}, not an IOMMU group number`);
    const group = Number.parseInt(name, 10);
    const membersDir = join(this.root, 'sys', 'kernel', 'iommu_groups', String(group), 'devices');
    let entries: string[];
    try {
      entries = await readdir(membersDir);
    } catch (err) {
      throw this.fsError(err, bdf, `listing ${membersDir}`);
    }
    const bad = entries.filter((e) => !isPciAddress(e));
    if (bad.length > 0) throw new SysfsError('unknown', bdf, `IOMMU group ${group} of ${bdf} lists entries that are not PCI addresses: ${bad.join(', ')}`);
    if (!entries.includes(bdf)) throw new SysfsError('unknown', bdf, `IOMMU group ${group} (${membersDir}) does not list ${bdf}`);
    return { group, devices: entries.sort() };
  }

  async barRegions(pciAddress: string): Promise<BarRegion[]> {
    const bdf = checkAddress(pciAddress);
    const file = join(this.deviceDir(bdf), 'resource');
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      throw this.fsError(err, bdf, `reading ${file}`);
    }
    const regions: BarRegion[] = [];
    const lines = text.split('\n').filter((l) => l.trim() !== '');
    lines.forEach((line, index) => {
      const fields = line.trim().split(/\s+/);
      if (fields.length !== 3) throw new SysfsError('unknown', bdf, `unexpected line ${index + 1} in ${file}: ${JSON.stringify(line)}`);
      const [start, end, flags] = fields.map((f) => parseHex(f, file, bdf)) as [bigint, bigint, bigint];
      // Unused regions read as all zeros.
      if (start === 0n && end === 0n) return;
      if (end < start) throw new SysfsError('unknown', bdf, `region ${index} in ${file} ends before it starts: ${line}`);
      regions.push({ index, start, end, flags, sizeBytes: end - start + 1n });
    });
    return regions;
  }

  async vfioGroupReady(group: number): Promise<boolean> {
    if (!Number.isSafeInteger(group) || group < 0) throw new SysfsError('EINVAL', '', `invalid IOMMU group number ${String(group)}`);
    try {
      await access(join(this.root, 'dev', 'vfio', String(group)), fsConstants.F_OK);
      return true;
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return false;
      throw this.fsError(err, '', `checking /dev/vfio/${group}`);
    }
  }

  // ── writes (serialized; argument checks run first, before any fs access) ──────
  async bindDriver(pciAddress: string, driver: string): Promise<'bound' | 'already'> {
    const bdf = checkAddress(pciAddress);
    checkDriverName(driver, bdf);
    return this.serialized(() => this.bindOne(bdf, driver));
  }

  async bindGroupToVfio(pciAddress: string): Promise<{ group: number; changed: string[] }> {
    const bdf = checkAddress(pciAddress);
    return this.serialized(async () => {
      const { group, devices } = await this.iommuGroup(bdf);
      const changed: string[] = [];
      // The GPU first: if it cannot move, nothing else in its group has been touched.
      for (const dev of [bdf, ...devices.filter((d) => d !== bdf)]) {
        if ((await this.bindOne(dev, VFIO_DRIVER)) === 'bound') changed.push(dev);
      }
      return { group, changed };
    });
  }

  async bindGroupToHost(pciAddress: string, hostDriver: string): Promise<{ group: number; changed: string[] }> {
    const bdf = checkAddress(pciAddress);
    checkDriverName(hostDriver, bdf);
    return this.serialized(async () => {
      const { group, devices } = await this.iommuGroup(bdf);
      const changed: string[] = [];
      // The GPU first: if it cannot go back, the group stays whole on vfio-pci.
      if ((await this.bindOne(bdf, hostDriver)) === 'bound') changed.push(bdf);
      for (const dev of devices.filter((d) => d !== bdf)) {
        if (await this.releaseToDefault(dev)) changed.push(dev);
      }
      return { group, changed };
    });
  }

  async reset(pciAddress: string): Promise<void> {
    const bdf = checkAddress(pciAddress);
    return this.serialized(async () => {
      await this.requireDevice(bdf);
      await this.write(join(this.deviceDir(bdf), 'reset'), '1\n', bdf);
    });
  }

  // ── internals ─────────────────────────────────────────────────────────────
  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn, fn);
    this.tail = run.catch(() => undefined);
    return run;
  }

  private fsError(err: unknown, bdf: string, doing: string): SysfsError {
    if (err instanceof SysfsError) return err;
    const errno = errnoOf(err);
    const detail = err instanceof Error ? err.message : String(err);
    return new SysfsError(mapErrno(errno), bdf, `${doing}${bdf ? ` (PCI ${bdf})` : ''} failed: ${detail}`, { cause: err });
  }

  private async requireDevice(bdf: string): Promise<void> {
    try {
      await stat(this.deviceDir(bdf));
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') throw new SysfsError('ENODEV', bdf, `no PCI device ${bdf} (${this.deviceDir(bdf)} does not exist)`, { cause: err });
      throw this.fsError(err, bdf, `looking up ${this.deviceDir(bdf)}`);
    }
  }

  private async readDriver(bdf: string): Promise<string | null> {
    try {
      return basename(await readlink(join(this.deviceDir(bdf), 'driver')));
    } catch (err) {
      if (errnoOf(err) !== 'ENOENT') throw this.fsError(err, bdf, 'reading the driver link');
      await this.requireDevice(bdf);
      return null;
    }
  }

  private async readOverride(bdf: string): Promise<string | null> {
    const file = join(this.deviceDir(bdf), 'driver_override');
    let text: string;
    try {
      text = (await readFile(file, 'utf8')).trim();
    } catch (err) {
      throw this.fsError(err, bdf, `reading ${file}`);
    }
    return text === '' || text === '(null)' ? null : text;
  }

  private async write(file: string, value: string, bdf: string): Promise<void> {
    try {
      await writeFile(file, value);
    } catch (err) {
      throw this.fsError(err, bdf, `writing ${JSON.stringify(value.trim())} to ${file}`);
    }
  }

  private async setOverride(bdf: string, driver: string): Promise<void> {
    await this.write(join(this.deviceDir(bdf), 'driver_override'), `${driver}\n`, bdf);
  }

  /** Clears the override; waits briefly until it reads back unset, so a later write cannot race it. */
  private async clearOverride(bdf: string): Promise<void> {
    const file = join(this.deviceDir(bdf), 'driver_override');
    await this.write(file, '\n', bdf);
    const deadline = Date.now() + Math.min(this.bindTimeoutMs, OVERRIDE_SETTLE_MAX_MS);
    while (Date.now() < deadline) {
      const text = (await readFile(file, 'utf8').catch(() => '(null)')).trim();
      if (text !== '') return;
      await sleep(this.pollMs);
    }
  }

  /** Polls the `driver` link until `done` holds or the bind timeout passes; returns the last reading. */
  private async waitForDriver(bdf: string, done: (driver: string | null) => boolean): Promise<{ ok: boolean; driver: string | null }> {
    const deadline = Date.now() + this.bindTimeoutMs;
    for (;;) {
      const driver = await this.readDriver(bdf);
      if (done(driver)) return { ok: true, driver };
      if (Date.now() >= deadline) return { ok: false, driver };
      await sleep(this.pollMs);
    }
  }

  private async requireDriverLoaded(driver: string, bdf: string): Promise<void> {
    try {
      await stat(this.driverDir(driver));
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') throw new SysfsError('ENODEV', bdf, `cannot bind ${bdf} to ${driver}: driver ${driver} is not loaded (${this.driverDir(driver)} is missing; modprobe it)`, { cause: err });
      throw this.fsError(err, bdf, `looking up driver ${driver}`);
    }
  }

  private async unbindFrom(bdf: string, current: string): Promise<void> {
    checkDriverName(current, bdf);
    await this.write(join(this.driverDir(current), 'unbind'), `${bdf}\n`, bdf);
    const gone = await this.waitForDriver(bdf, (d) => d === null);
    if (!gone.ok) {
      throw new SysfsError('timeout', bdf, `unbinding ${bdf} from ${current}: still bound to ${gone.driver} after ${this.bindTimeoutMs} ms (device busy?)`);
    }
  }

  /** override → unbind → drivers_probe → wait for the link. Throws without rolling back. */
  private async moveTo(bdf: string, driver: string, current: string | null): Promise<void> {
    await this.setOverride(bdf, driver);
    if (current !== null) await this.unbindFrom(bdf, current);
    await this.write(join(this.pciDir, 'drivers_probe'), `${bdf}\n`, bdf);
    const bound = await this.waitForDriver(bdf, (d) => d !== null);
    if (!bound.ok) throw new SysfsError('no-driver', bdf, `probing ${bdf} for ${driver}: no driver attached within ${this.bindTimeoutMs} ms`);
    if (bound.driver !== driver) throw new SysfsError('EBUSY', bdf, `probing ${bdf} for ${driver}: ${bound.driver} took the device instead`);
    await this.clearOverride(bdf);
  }

  private async bindOne(bdf: string, driver: string): Promise<'bound' | 'already'> {
    const current = await this.readDriver(bdf);
    if (current === driver) return 'already';
    await this.requireDriverLoaded(driver, bdf);
    try {
      await this.moveTo(bdf, driver, current);
      return 'bound';
    } catch (err) {
      const failure = this.fsError(err, bdf, `binding ${bdf} to ${driver}`);
      await this.rollBack(bdf, current, failure);
      throw failure;
    }
  }

  /** Puts the device back on the driver it had (never leaves a GPU with none); notes a failed rollback on `failure`. */
  private async rollBack(bdf: string, previous: string | null, failure: SysfsError): Promise<void> {
    try {
      const now = await this.readDriver(bdf);
      if (previous === null) {
        await this.clearOverride(bdf);
        return;
      }
      if (now === previous) {
        await this.clearOverride(bdf);
        return;
      }
      await this.moveTo(bdf, previous, now);
    } catch (err) {
      const why = err instanceof Error ? err.message : String(err);
      failure.message += `; rolling back to ${previous} ALSO failed: ${why}`;
    }
  }

  /**
   * A non-GPU function of the group goes back to whatever driver the kernel's id tables give it:
   * clear the override, unbind from vfio-pci, probe. A function with no default driver is left
   * unbound, as Linux leaves it at boot. Returns whether anything was written.
   */
  private async releaseToDefault(bdf: string): Promise<boolean> {
    const current = await this.readDriver(bdf);
    const override = await this.readOverride(bdf);
    if (current !== VFIO_DRIVER && override !== VFIO_DRIVER) return false;
    if (override !== null) await this.clearOverride(bdf);
    if (current === VFIO_DRIVER) await this.unbindFrom(bdf, current);
    if (current === null || current === VFIO_DRIVER) {
      await this.write(join(this.pciDir, 'drivers_probe'), `${bdf}\n`, bdf);
      const bound = await this.waitForDriver(bdf, (d) => d !== null);
      if (bound.driver === VFIO_DRIVER) throw new SysfsError('EBUSY', bdf, `releasing ${bdf} from vfio-pci: it was bound to vfio-pci again`);
    }
    return true;
  }
}
