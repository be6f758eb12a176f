/**
 * Adapter for `nvidia-smi -q` (text) and `nvidia-smi -q -x` (XML): the GPUs bound to the nvidia
 * driver, with the Module Id that Fabric Manager partitions are made of, and the fabric state.
 * The text form is parsed as a tree built from indentation and `key : value` lines, never by
 * column offsets: the padding width changes between driver releases.
 */
import { XMLParser } from 'fast-xml-parser';
import { pciAddressFromNvidiaBusId } from './pci.ts';
import { isRetryableSpawnError, runTool } from './tool.ts';

export interface NvidiaGpu {
  /** sysfs form, 0000:17:00.0 */
  pciAddress: string;
  /** as printed, 00000000:17:00.0 */
  busId: string;
  moduleId: number | null;
  productName: string;
  uuid: string | null;
  serial: string | null;
  peerType: string | null;
  fabric: { state: string; status: string } | null;
}

export interface NvidiaSmiReport {
  driverVersion: string | null;
  cudaVersion: string | null;
  gpus: NvidiaGpu[];
}

export type NvidiaSmiErrorCode = 'timeout' | 'failed' | 'bad-output' | 'spawn-failed';

export class NvidiaSmiError extends Error {
  override name = 'NvidiaSmiError';
  readonly code: NvidiaSmiErrorCode;
  readonly exitCode?: number;
  /** Set for spawn-failed: true when this process or the machine ran short (EMFILE, ENFILE, EAGAIN,
   *  ENOMEM), false for a missing or non-executable binary. Unset otherwise (the worker's default). */
  readonly retryable?: boolean;

  constructor(code: NvidiaSmiErrorCode, message: string, details: { exitCode?: number; cause?: unknown; retryable?: boolean } = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.code = code;
    if (details.exitCode !== undefined) this.exitCode = details.exitCode;
    if (details.retryable !== undefined) this.retryable = details.retryable;
  }
}

// ── shared field rules ───────────────────────────────────────────────────────
interface RawGpu {
  busId: string | undefined;
  productName: string | undefined;
  moduleId: string | undefined;
  uuid: string | undefined;
  serial: string | undefined;
  peerType: string | undefined;
  fabricState: string | undefined;
  fabricStatus: string | undefined;
  /** whether the block has a Fabric section at all */
  hasFabric: boolean;
}

function orNull(value: string | undefined): string | null {
  const v = value?.trim();
  return v === undefined || v === '' || v === 'N/A' ? null : v;
}

/** "N/A", absent or 0 (a GPU not on nvidia reports 0 or nothing) → null. */
function moduleIdOf(value: string | undefined, busId: string, source: string): number | null {
  const v = orNull(value);
  if (v === null) return null;
  if (!/^\d+$/.test(v)) throw new NvidiaSmiError('bad-output', `nvidia-smi ${source}: GPU ${busId} has Module Id ${JSON.stringify(v)}, not a number`);
  const n = Number(v);
  return n === 0 ? null : n;
}

function toGpu(raw: RawGpu, source: string): NvidiaGpu {
  const busId = raw.busId?.trim();
  if (!busId) throw new NvidiaSmiError('bad-output', `nvidia-smi ${source}: a GPU block has no bus id`);
  let pciAddress: string;
  try {
    pciAddress = pciAddressFromNvidiaBusId(busId);
  } catch (err) {
    throw new NvidiaSmiError('bad-output', `nvidia-smi ${source}: GPU bus id ${JSON.stringify(busId)} is not a PCI address`, { cause: err });
  }
  const productName = raw.productName?.trim();
  if (!productName) throw new NvidiaSmiError('bad-output', `nvidia-smi ${source}: GPU ${busId} has no Product Name`);
  return {
    pciAddress,
    busId,
    moduleId: moduleIdOf(raw.moduleId, busId, source),
    productName,
    uuid: orNull(raw.uuid),
    serial: orNull(raw.serial),
    peerType: orNull(raw.peerType),
    fabric: raw.hasFabric ? { state: raw.fabricState?.trim() ?? 'N/A', status: raw.fabricStatus?.trim() ?? 'N/A' } : null,
  };
}

function checkAttached(attached: string | undefined, found: number, source: string): void {
  if (attached === undefined) return;
  if (!/^\d+$/.test(attached.trim()) || Number(attached) !== found) {
    throw new NvidiaSmiError('bad-output', `nvidia-smi ${source}: "Attached GPUs" says ${JSON.stringify(attached)} but ${found} GPU block(s) were printed`);
  }
}

// ── text ─────────────────────────────────────────────────────────────────────
interface TextNode {
  key: string;
  value: string | undefined;
  indent: number;
  children: TextNode[];
}

/** `GPU 00000000:17:00.0` at the top level; the bus id is validated later, so a mangled one fails loudly. */
const GPU_HEADER = /^GPU\s+(\S+)$/;

/**
 * One node per non-empty line; a line's children are the lines below it indented deeper.
 * `key : value` lines split at the first ` :` followed by a space or the end of the line, so
 * values with colons (times, bus ids) stay whole.
 */
function textTree(text: string): TextNode {
  const root: TextNode = { key: '', value: undefined, indent: -1, children: [] };
  const stack: TextNode[] = [root];
  for (const rawLine of text.split(/\r?\n/)) {
    if (rawLine.trim() === '' || /^=+NVSMI LOG=+$/.test(rawLine.trim())) continue;
    const indent = rawLine.length - rawLine.replace(/^[ \t]+/, '').length;
    const line = rawLine.trim();
    const m = /^(.*?)\s+:(?:\s+(.*))?$/.exec(line);
    const node: TextNode = m
      ? { key: m[1]!.trim(), value: (m[2] ?? '').trim(), indent, children: [] }
      : { key: line, value: undefined, indent, children: [] };
    while (stack.length > 1 && stack[stack.length - 1]!.indent >= indent) stack.pop();
    stack[stack.length - 1]!.children.push(node);
    stack.push(node);
  }
  return root;
}

function child(node: TextNode | undefined, ...path: string[]): TextNode | undefined {
  let cur = node;
  for (const key of path) cur = cur?.children.find((c) => c.key === key);
  return cur;
}

function textValue(node: TextNode | undefined, ...path: string[]): string | undefined {
  return child(node, ...path)?.value;
}

/** Parses `nvidia-smi -q`. */
export function parseNvidiaSmiText(text: string): NvidiaSmiReport {
  const tree = textTree(text);
  const top = tree.children;
  const gpuNodes = top.filter((n) => n.value === undefined && GPU_HEADER.test(n.key));
  const driverNode = top.find((n) => n.key === 'Driver Version');
  if (!driverNode && gpuNodes.length === 0) {
    throw new NvidiaSmiError('bad-output', `nvidia-smi -q: output has neither "Driver Version" nor a GPU block: ${excerpt(text)}`);
  }
  const gpus = gpuNodes.map((g) =>
    toGpu(
      {
        busId: GPU_HEADER.exec(g.key)![1],
        productName: textValue(g, 'Product Name'),
        moduleId: textValue(g, 'Platform Info', 'Module Id'),
        uuid: textValue(g, 'GPU UUID'),
        serial: textValue(g, 'Serial Number'),
        peerType: textValue(g, 'Platform Info', 'Peer Type'),
        fabricState: textValue(g, 'Fabric', 'State'),
        fabricStatus: textValue(g, 'Fabric', 'Status'),
        hasFabric: child(g, 'Fabric') !== undefined,
      },
      '-q',
    ),
  );
  checkAttached(top.find((n) => n.key === 'Attached GPUs')?.value, gpus.length, '-q');
  return { driverVersion: orNull(driverNode?.value), cudaVersion: orNull(textValue(tree, 'CUDA Version')), gpus };
}

// ── XML ──────────────────────────────────────────────────────────────────────
const xmlParser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@_',
  // Keep every value a string: "0000" and "03" must not become numbers.
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: true,
  processEntities: true,
  // <gpu> is the only repeated element gpuvm reads; no nested element shares its name.
  isArray: (name) => name === 'gpu',
});

type XmlNode = Record<string, unknown>;

function xmlChild(node: unknown, ...path: string[]): unknown {
  let cur: unknown = node;
  for (const key of path) {
    if (cur === null || typeof cur !== 'object' || Array.isArray(cur)) return undefined;
    cur = (cur as XmlNode)[key];
  }
  return cur;
}

function xmlText(node: unknown, ...path: string[]): string | undefined {
  const v = xmlChild(node, ...path);
  if (typeof v === 'string') return v;
  // <tag attr="x">text</tag> parses to { '#text': 'text', '@_attr': 'x' }.
  if (v !== null && typeof v === 'object' && typeof (v as XmlNode)['#text'] === 'string') return (v as XmlNode)['#text'] as string;
  return undefined;
}

/** Parses `nvidia-smi -q -x`. */
export function parseNvidiaSmiXml(xml: string): NvidiaSmiReport {
  let doc: unknown;
  try {
    doc = xmlParser.parse(xml, true);
  } catch (err) {
    throw new NvidiaSmiError('bad-output', `nvidia-smi -q -x: not well-formed XML (${(err as Error).message}): ${excerpt(xml)}`, { cause: err });
  }
  const log = xmlChild(doc, 'nvidia_smi_log');
  if (log === undefined || log === null || typeof log !== 'object') {
    throw new NvidiaSmiError('bad-output', `nvidia-smi -q -x: no <nvidia_smi_log> element: ${excerpt(xml)}`);
  }
  const gpuList = xmlChild(log, 'gpu');
  const gpuNodes: unknown[] = Array.isArray(gpuList) ? gpuList : [];
  const gpus = gpuNodes.map((g) =>
    toGpu(
      {
        busId: xmlText(g, '@_id') ?? xmlText(g, 'pci', 'pci_bus_id'),
        productName: xmlText(g, 'product_name'),
        moduleId: xmlText(g, 'platformInfo', 'module_id'),
        uuid: xmlText(g, 'uuid'),
        serial: xmlText(g, 'serial'),
        peerType: xmlText(g, 'platformInfo', 'peer_type'),
        fabricState: xmlText(g, 'fabric', 'state'),
        fabricStatus: xmlText(g, 'fabric', 'status'),
        hasFabric: xmlChild(g, 'fabric') !== undefined,
      },
      '-q -x',
    ),
  );
  checkAttached(xmlText(log, 'attached_gpus'), gpus.length, '-q -x');
  return { driverVersion: orNull(xmlText(log, 'driver_version')), cudaVersion: orNull(xmlText(log, 'cuda_version')), gpus };
}

function excerpt(text: string, max = 200): string {
  const t = text.trim();
  if (t === '') return '(empty output)';
  return JSON.stringify(t.length > max ? `${t.slice(0, max)}…` : t);
}

// ── running the tool ─────────────────────────────────────────────────────────
/** NVML_ERROR_NOT_FOUND: nvidia-smi's answer when no GPU is bound to nvidia (all on vfio-pci). */
const EXIT_NO_DEVICES = 6;

export interface NvidiaSmiOptions {
  bin: string;
  timeoutMs?: number;
}

export class NvidiaSmi {
  private readonly bin: string;
  private readonly timeoutMs: number;

  constructor(opts: NvidiaSmiOptions) {
    if (!opts.bin) throw new NvidiaSmiError('failed', 'nvidia-smi: no binary path given');
    this.bin = opts.bin;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
  }

  /** Runs `nvidia-smi -q -x`. No GPU on the nvidia driver is an empty report, not an error. */
  async query(): Promise<NvidiaSmiReport> {
    const cmd = `nvidia-smi (${this.bin}) -q -x`;
    const result = await runTool(this.bin, ['-q', '-x'], { timeoutMs: this.timeoutMs, killGraceMs: 2_000, maxBytes: 64 * 1024 * 1024 });
    const { stdout, stderr } = result;
    if (result.timedOut) {
      throw new NvidiaSmiError('timeout', `${cmd}: no answer within ${this.timeoutMs} ms; the process was killed`);
    }
    if (result.spawnError) {
      const { code, message } = result.spawnError;
      const retryable = isRetryableSpawnError(result.spawnError);
      throw new NvidiaSmiError('spawn-failed', `${cmd}: could not start the binary (${code})${retryable ? ': out of resources, retrying later can help' : ''}`, {
        retryable,
        cause: Object.assign(new Error(message), { code }),
      });
    }
    if (result.overflow) throw new NvidiaSmiError('bad-output', `${cmd}: printed more than 64 MiB; the process was killed`);
    if (result.exitCode === null) throw new NvidiaSmiError('failed', `${cmd}: killed by ${result.signal ?? 'a signal'}`);
    if (result.exitCode === EXIT_NO_DEVICES && /No devices were found/i.test(stdout + stderr)) {
      return { driverVersion: null, cudaVersion: null, gpus: [] };
    }
    if (result.exitCode !== 0) {
      const said = [stdout.trim(), stderr.trim()].filter((s) => s !== '').join(' / ') || '(no output)';
      throw new NvidiaSmiError('failed', `${cmd}: exit ${result.exitCode}: ${said}`, { exitCode: result.exitCode });
    }
    try {
      return parseNvidiaSmiXml(stdout);
    } catch (err) {
      if (err instanceof NvidiaSmiError) throw new NvidiaSmiError(err.code, `${this.bin}: ${err.message}`, { exitCode: 0, cause: err });
      throw err;
    }
  }
}
