#!/usr/bin/env node
// A stand-in for qemu-system-x86_64, used when QEMU is not installed. It accepts the command line
// gpuvm generates (ignoring what it does not need), writes the pidfile, and speaks enough QMP for
// gpuvm's adapter and tests: the answers and event order copy QEMU 7.2's.
// Plain ESM, node builtins only.
import { createServer } from 'node:net';
import { readFileSync, unlinkSync, writeFileSync } from 'node:fs';

const VERSION = { major: 7, minor: 2, micro: 0 };
const PACKAGE = 'gpuvm qemu-standin';
const PROG = 'qemu-system-x86_64';

// `qemu-system-x86_64 -device vfio-pci,help` of QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18).
const VFIO_PCI_HELP = `vfio-pci options:
  acpi-index=<uint32>    -  (default: 0)
  addr=<int32>           - Slot and optional function number, example: 06.0 or 06 (default: -1)
  bootindex=<int32>
  display=<OnOffAuto>    - on/off/auto (default: "off")
  failover_pair_id=<str>
  host=<str>             - Address (bus/device/function) of the host device, example: 04:10.0
  multifunction=<bool>   - on/off (default: false)
  rombar=<uint32>        -  (default: 1)
  romfile=<str>
  romsize=<uint32>       -  (default: 4294967295)
  sysfsdev=<str>
  x-balloon-allowed=<bool> -  (default: false)
  x-enable-migration=<bool> -  (default: false)
  x-igd-gms=<uint32>     -  (default: 0)
  x-igd-opregion=<bool>  - on/off (default: false)
  x-intx-mmap-timeout-ms=<uint32> -  (default: 1100)
  x-msix-relocation=<OffAutoPCIBAR> - off/auto/bar0/bar1/bar2/bar3/bar4/bar5 (default: "off")
  x-no-geforce-quirks=<bool> -  (default: false)
  x-no-kvm-intx=<bool>   -  (default: false)
  x-no-kvm-ioeventfd=<bool> -  (default: false)
  x-no-kvm-msi=<bool>    -  (default: false)
  x-no-kvm-msix=<bool>   -  (default: false)
  x-no-mmap=<bool>       -  (default: false)
  x-no-vfio-ioeventfd=<bool> -  (default: false)
  x-nv-gpudirect-clique=<uint4> - NVIDIA GPUDirect Clique ID (0 - 15)
  x-pci-device-id=<uint32> -  (default: 4294967295)
  x-pci-sub-device-id=<uint32> -  (default: 4294967295)
  x-pci-sub-vendor-id=<uint32> -  (default: 4294967295)
  x-pci-vendor-id=<uint32> -  (default: 4294967295)
  x-pcie-extcap-init=<bool> - on/off (default: true)
  x-pcie-lnksta-dllla=<bool> - on/off (default: true)
  x-pre-copy-dirty-page-tracking=<OnOffAuto> - on/off/auto (default: "on")
  x-req=<bool>           - on/off (default: true)
  x-vga=<bool>           - on/off (default: false)
  xres=<uint32>          -  (default: 0)
  yres=<uint32>          -  (default: 0)
`;

const EDU_HELP = `edu options:
  acpi-index=<uint32>    -  (default: 0)
  addr=<int32>           - Slot and optional function number, example: 06.0 or 06 (default: -1)
  dma_mask=<uint64>
  failover_pair_id=<str>
  multifunction=<bool>   - on/off (default: false)
  rombar=<uint32>        -  (default: 1)
  romfile=<str>
  romsize=<uint32>       -  (default: 4294967295)
  x-pcie-extcap-init=<bool> - on/off (default: true)
`;

const DEVICE_HELP = { 'vfio-pci': VFIO_PCI_HELP, edu: EDU_HELP };
/** Device types this stand-in accepts on -device; a pcie-root-port provides a bus named after its id. */
const KNOWN_DEVICES = new Set(['vfio-pci', 'edu', 'pci-testdev', 'pcie-root-port']);

/** Options that take no value; every other option takes exactly one. */
const FLAG_OPTIONS = new Set([
  '-nodefaults', '-S', '-no-reboot', '-no-shutdown', '-enable-kvm', '-nographic', '-no-user-config',
  '-no-hpet', '-no-acpi', '-snapshot', '-daemonize', '-version', '--version', '-h', '-help', '--help',
]);

function die(message) {
  process.stderr.write(`${PROG}: ${message}\n`);
  process.exit(1);
}

/** QEMU option string → [first, {key: value}] with `,,` as a literal comma. */
function parseOptString(text, implicitKey) {
  const parts = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ',' && text[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (text[i] === ',') {
      parts.push(cur);
      cur = '';
    } else cur += text[i];
  }
  parts.push(cur);
  const props = {};
  let first;
  parts.forEach((p, i) => {
    const eq = p.indexOf('=');
    if (i === 0 && eq < 0) first = p;
    else if (eq < 0) props[p] = 'on';
    else props[p.slice(0, eq)] = p.slice(eq + 1);
  });
  if (first !== undefined && implicitKey) props[implicitKey] = first;
  return { first, props };
}

// ------------------------------------------------------------------------------------------
// Command line

const argv = process.argv.slice(2);
const opts = { devices: [], flags: new Set() };
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (!a.startsWith('-')) die(`${a}: disk images given without an option are not supported by the gpuvm stand-in`);
  if (a === '--version' || a === '-version') {
    process.stdout.write(`QEMU emulator version ${VERSION.major}.${VERSION.minor}.${VERSION.micro} (${PACKAGE})\n` +
      'Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n');
    process.exit(0);
  }
  if (FLAG_OPTIONS.has(a)) {
    opts.flags.add(a);
    continue;
  }
  const value = argv[i + 1];
  if (value === undefined) die(`${a}: requires an argument`);
  i++;
  const name = a.replace(/^--/, '-');
  if (name === '-device') {
    if (value === 'help') {
      process.stdout.write([...KNOWN_DEVICES].map((d) => `name "${d}", bus PCI`).join('\n') + '\n');
      process.exit(0);
    }
    const { first: driver, props } = parseOptString(value);
    if (props.help !== undefined || value.endsWith(',?')) {
      const help = DEVICE_HELP[driver];
      if (!help) die(`-device ${value}: Device '${driver}' not found`);
      process.stdout.write(help);
      process.exit(0);
    }
    opts.devices.push({ driver, props, text: value });
  } else {
    opts[name] = value;
  }
}

if (opts.flags.has('-daemonize')) die('-daemonize is not supported by the gpuvm stand-in');
const pidfile = opts['-pidfile'];
let qmpPath;
if (opts['-qmp'] !== undefined) {
  const m = /^unix:(.*)$/s.exec(opts['-qmp']);
  if (!m) die(`-qmp ${opts['-qmp']}: only unix sockets are supported by the gpuvm stand-in`);
  const { first, props } = parseOptString(m[1]);
  if (!first) die(`-qmp ${opts['-qmp']}: missing socket path`);
  if (!(props.server === 'on' || props.server === 'true')) die(`-qmp ${opts['-qmp']}: only server=on is supported`);
  qmpPath = first;
}
const machine = opts['-machine'] === undefined ? {} : parseOptString(opts['-machine'], 'type').props;
if (machine.type !== undefined && machine.type !== 'q35' && !machine.type.startsWith('pc-q35')) {
  die(`-machine ${opts['-machine']}: the gpuvm stand-in only models q35`);
}

// Device placement, checked the way QEMU checks it: unique ids, buses that exist, one device per slot.
const ROOT_BUS = '/machine/q35/pcie.0';
const devices = new Map(); // id -> { driver, parentBus, props }
const busSlots = new Map(); // bus path -> Set of addr strings
for (const d of opts.devices) {
  if (!KNOWN_DEVICES.has(d.driver)) die(`-device ${d.text}: Device '${d.driver}' not found`);
  const id = d.props.id;
  if (id !== undefined && devices.has(id)) die(`-device ${d.text}: Duplicate device ID '${id}'`);
  let parentBus = ROOT_BUS;
  const bus = d.props.bus;
  if (bus !== undefined && bus !== 'pcie.0') {
    const port = devices.get(bus);
    if (!port || port.driver !== 'pcie-root-port') die(`-device ${d.text}: Bus '${bus}' not found`);
    parentBus = `/machine/peripheral/${bus}/${bus}`;
  }
  if (d.driver === 'vfio-pci' && !/^([0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/.test(d.props.host ?? '')) {
    die(`-device ${d.text}: vfio ${d.props.host ?? ''}: no such host device`);
  }
  if (d.props.addr !== undefined) {
    const slots = busSlots.get(parentBus) ?? new Set();
    const addr = Number(d.props.addr.split('.')[0]);
    if (slots.has(addr)) die(`-device ${d.text}: PCI: slot ${addr} function 0 not available for ${d.driver}, in use by another device`);
    // A root port's secondary bus has a single slot, 0.
    if (parentBus !== ROOT_BUS && addr !== 0) die(`-device ${d.text}: PCI: slot ${addr} function 0 not available for ${d.driver}`);
    slots.add(addr);
    busSlots.set(parentBus, slots);
  }
  if (id !== undefined) devices.set(id, { driver: d.driver, parentBus, props: d.props });
}

// ------------------------------------------------------------------------------------------
// Pidfile and lifetime

function processHoldsPidfile(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (/^\S+ \(.*\) Z/s.test(stat)) return false;
    const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return args.some((x, i) => x === pidfile && args[i - 1] === '-pidfile');
  } catch {
    return false;
  }
}

if (pidfile) {
  // QEMU locks its pidfile; the closest we get is refusing while another live holder exists.
  let other;
  try {
    other = Number(readFileSync(pidfile, 'utf8').trim());
  } catch {
    other = 0;
  }
  if (other > 0 && other !== process.pid && processHoldsPidfile(other)) {
    die(`Cannot lock pid file ${pidfile}: Resource temporarily unavailable`);
  }
  try {
    writeFileSync(pidfile, `${process.pid}\n`);
  } catch (err) {
    die(`Failed to write pid file ${pidfile}: ${err.message}`);
  }
}

let runState = opts.flags.has('-S') ? 'prelaunch' : 'running';
let powerdownPending = false;
let exiting = false;

function cleanupFiles() {
  for (const f of [pidfile, qmpPath]) {
    if (!f) continue;
    try {
      unlinkSync(f);
    } catch {
      // gone already
    }
  }
}

function exitNow(code = 0) {
  if (exiting) return;
  exiting = true;
  cleanupFiles();
  // Let queued socket writes flush before the process ends.
  setTimeout(() => process.exit(code), 20);
}

// ------------------------------------------------------------------------------------------
// QMP

let client = null; // { socket, negotiated }

function timestamp() {
  const ms = Date.now();
  return { seconds: Math.floor(ms / 1000), microseconds: (ms % 1000) * 1000 };
}

function send(obj) {
  if (client && !client.socket.destroyed) client.socket.write(`${JSON.stringify(obj)}\r\n`);
}

function emit(event, data) {
  const msg = { timestamp: timestamp(), event };
  if (data !== undefined) msg.data = data;
  send(msg);
}

function guestPowerOff() {
  // A guest OS reacting to the ACPI power button: it shuts down and QEMU exits (or, with
  // -no-shutdown, stops).
  emit('SHUTDOWN', { guest: true, reason: 'guest-shutdown' });
  if (opts.flags.has('-no-shutdown')) {
    runState = 'shutdown';
    emit('STOP');
  } else {
    exitNow(0);
  }
}

/**
 * Faults for tests, re-read on each command: the JSON file named by GPUVM_STANDIN_FAULTS,
 * `{ "hangPowerdown": ["vm-…", …] }` — a listed VM (its `-name guest=<vmId>`) is hung: it swallows
 * system_powerdown (no reply, no POWERDOWN, no SHUTDOWN) and ignores SIGTERM, so a powerdown try
 * outlives the powerdown timer and fails late on its QMP timeout. No variable or no file: no faults.
 */
const NO_REPLY = Symbol('no reply');
const guestName = opts['-name'] === undefined ? undefined : parseOptString(opts['-name'], 'guest').props.guest;
function hangsPowerdown() {
  const file = process.env.GPUVM_STANDIN_FAULTS;
  if (!file || !guestName) return false;
  try {
    const faults = JSON.parse(readFileSync(file, 'utf8'));
    return Array.isArray(faults?.hangPowerdown) && faults.hangPowerdown.includes(guestName);
  } catch {
    return false;
  }
}

function qmpError(cls, desc) {
  return { error: { class: cls, desc } };
}

function handleCommand(cmd, args) {
  switch (cmd) {
    case 'qmp_capabilities':
      return qmpError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
    case 'query-status':
      return { return: { status: runState, singlestep: false, running: runState === 'running' } };
    case 'query-version':
      return { return: { qemu: { ...VERSION }, package: PACKAGE } };
    case 'system_powerdown':
      // A fault for tests: a guest (and a QEMU) that never answers the power button.
      if (hangsPowerdown()) return NO_REPLY;
      emit('POWERDOWN');
      if (runState === 'running') setTimeout(guestPowerOff, 100);
      else powerdownPending = true; // a stopped guest handles the button once resumed
      return { return: {} };
    case 'cont':
      if (runState === 'shutdown') {
        return qmpError('GenericError', "Resetting the Virtual Machine is required");
      }
      if (runState !== 'running') {
        runState = 'running';
        emit('RESUME');
        if (powerdownPending) {
          powerdownPending = false;
          setTimeout(guestPowerOff, 100);
        }
      }
      return { return: {} };
    case 'stop':
      if (runState === 'running') {
        runState = 'paused';
        emit('STOP');
      }
      return { return: {} };
    case 'quit':
      emit('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
      exitNow(0);
      return { return: {} };
    case 'qom-get':
      return qomGet(args ?? {});
    default:
      return qmpError('CommandNotFound', `The command ${cmd} has not been found`);
  }
}

function qomGet(args) {
  if (typeof args.path !== 'string') return qmpError('GenericError', "Parameter 'path' is missing");
  if (typeof args.property !== 'string') return qmpError('GenericError', "Parameter 'property' is missing");
  const m = /^\/machine\/peripheral\/([^/]+)$/.exec(args.path);
  const dev = m ? devices.get(m[1]) : undefined;
  if (!dev) return qmpError('DeviceNotFound', `Device '${args.path}' not found`);
  switch (args.property) {
    case 'parent_bus':
      return { return: dev.parentBus };
    case 'type':
      return { return: dev.driver };
    case 'realized':
      return { return: true };
    case 'addr': {
      const a = dev.props.addr;
      if (a === undefined) return { return: -1 };
      const [slot, fn] = a.split('.');
      return { return: (Number(slot) << 3) | Number(fn ?? 0) };
    }
    default:
      return qmpError('GenericError', `Property '${dev.driver}.${args.property}' not found`);
  }
}

function handleLine(c, line) {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    send(qmpError('GenericError', 'JSON parse error, invalid literal'));
    return;
  }
  const idPart = msg && Object.hasOwn(msg, 'id') ? { id: msg.id } : {};
  if (!msg || typeof msg !== 'object' || typeof msg.execute !== 'string') {
    send({ ...qmpError('GenericError', "QMP input member 'execute' is missing"), ...idPart });
    return;
  }
  let reply;
  if (!c.negotiated) {
    if (msg.execute === 'qmp_capabilities') {
      c.negotiated = true;
      reply = { return: {} };
    } else {
      reply = qmpError('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
  } else {
    reply = handleCommand(msg.execute, msg.arguments);
  }
  if (reply === NO_REPLY) return;
  send({ ...reply, ...idPart });
}

if (qmpPath) {
  try {
    unlinkSync(qmpPath); // QEMU replaces a stale socket file
  } catch {
    // none
  }
  const server = createServer((socket) => {
    if (client) {
      // One client at a time.
      socket.destroy();
      return;
    }
    const c = { socket, negotiated: false, buffer: '' };
    client = c;
    socket.setEncoding('utf8');
    socket.on('data', (chunk) => {
      c.buffer += chunk;
      let nl;
      while ((nl = c.buffer.indexOf('\n')) >= 0) {
        const line = c.buffer.slice(0, nl).trim();
        c.buffer = c.buffer.slice(nl + 1);
        if (line) handleLine(c, line);
      }
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      if (client === c) client = null;
    });
    send({ QMP: { version: { qemu: { ...VERSION }, package: PACKAGE }, capabilities: ['oob'] } });
  });
  server.on('error', (err) => die(`-qmp ${opts['-qmp']}: Failed to bind socket to ${qmpPath}: ${err.message}`));
  server.listen(qmpPath);
}

for (const [signal, num] of [['SIGTERM', 15], ['SIGINT', 2], ['SIGHUP', 1]]) {
  process.on(signal, () => {
    // A hung QEMU (the same fault): its main loop never gets to the signal; only SIGKILL ends it.
    if (signal === 'SIGTERM' && hangsPowerdown()) return;
    process.stderr.write(`${PROG}: terminating on signal ${num}\n`);
    emit('SHUTDOWN', { guest: false, reason: 'host-signal' });
    exitNow(0);
  });
}

// Keep running like a VM would, until quit, a signal or a guest power-off.
setInterval(() => {}, 1 << 30);
