/**
 * PCI addresses in sysfs form (`0000:17:00.0`). Every address that reaches a path, a command
 * line or a QEMU argument passes through `parsePciAddress` first.
 */
export const PCI_ADDRESS_PATTERN = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/;

export class InvalidPciAddressError extends Error {
  constructor(readonly value: string) {
    super(`invalid PCI address ${JSON.stringify(value)}: expected DDDD:BB:SS.F in lower-case hex, e.g. 0000:17:00.0`);
    this.name = 'InvalidPciAddressError';
  }
}

export function isPciAddress(value: unknown): value is string {
  return typeof value === 'string' && PCI_ADDRESS_PATTERN.test(value);
}

export function parsePciAddress(value: string): string {
  if (!isPciAddress(value)) throw new InvalidPciAddressError(value);
  return value;
}

/** nvidia-smi prints `00000000:17:00.0` (8-digit domain, upper-case hex); sysfs uses `0000:17:00.0`. */
export function pciAddressFromNvidiaBusId(busId: string): string {
  const m = /^([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$/.exec(busId.trim());
  if (!m) throw new InvalidPciAddressError(busId);
  const domain = m[1]!.slice(-4).toLowerCase();
  if (parseInt(m[1]!, 16) > 0xffff) throw new InvalidPciAddressError(busId);
  return parsePciAddress(`${domain}:${m[2]!.toLowerCase()}:${m[3]!.toLowerCase()}.${m[4]}`);
}
