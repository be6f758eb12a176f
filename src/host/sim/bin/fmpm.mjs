#!/usr/bin/env node
/**
 * Simulated `fmpm` (NVIDIA Fabric-Manager-Client sample tool 1.0.1) for a simulated HGX host.
 *
 * Same argv, stdout text and exit codes as the real tool: it prints its messages on stdout and
 * exits with the fmReturn_t value (negative) as an unsigned byte, e.g. -7 IN_USE -> 249.
 * Node builtins only, so a call costs one node start-up (~40 ms).
 *
 * State: <root>/fm/state.json { active: [ids], ... } — read-modify-write under an exclusive lock
 * file, written as temp + rename, so concurrent calls never lose an update.
 * Faults: <root>/faults.json key "fmpm": { down, hangMs, activateFails: {id: fmReturn},
 * deactivateFails: {id: fmReturn}, restartAfterActivate }. restartAfterActivate (true, or any
 * string token): right after a successful `-a`, Fabric Manager restarts as `restartFabricManager`
 * restarts it (forgets the active partitions, waits for --set-activated-list); once per token, or
 * for `true` once per write of faults.json (state.restartAfterActivateFired records which).
 *
 * Fabric Manager restarted in resiliency mode (`restartFabricManager` in sim-host.ts sets
 * state.awaitingActivatedList = { since, timeoutMs }): it waits for `--set-activated-list`, refusing
 * every other call with NOT_CONFIGURED (-8) meanwhile; if the window passes unanswered it exits
 * (state.exited: connect failures from then on) until it is restarted.
 */
import fs from 'node:fs';
import path from 'node:path';
import { readJson as readJsonOrExit, simRoot } from './sim-common.mjs';

const VERSION = '1.0.1';
const FM_MAX_FABRIC_PARTITIONS = 64;

// fmReturn_t (nv_fm_types.h)
const FM_ST_SUCCESS = 0;
const FM_ST_BADPARAM = -1;
const FM_ST_IN_USE = -7;
const FM_ST_PARTITION_ID_IN_USE = -17;
const FM_ST_PARTITION_ID_NOT_IN_USE = -18;
const FM_ST_CONNECTION_NOT_VALID = -9;
const FM_ST_NOT_CONFIGURED = -8;

// MAKE_FM_PARAM_VERSION(fmFabricPartitionList_v2, 1): sizeof = 12 + 64 * (12 + 16 * 128) = 131852.
const FM_FABRIC_PARTITION_LIST_VERSION = 131852 | (1 << 24);

/** A process exit code is the low byte of the int main() returns. */
function exitWith(fmReturn) {
  process.exit(fmReturn & 0xff);
}

function out(line) {
  process.stdout.write(`${line}\n`);
}

function sleepSync(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

const readJson = (file, fallback) => readJsonOrExit('fmpm', file, fallback);

function writeJsonAtomic(file, value) {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, `${JSON.stringify(value, null, 2)}\n`);
  fs.renameSync(tmp, file);
}

// ── JsonCpp StyledWriter ─────────────────────────────────────────────────────
// Keys sorted (Json::Value objects are std::map), 3-space indent, `"key" : value`, arrays of
// objects one element per line; the document ends with a newline.
function styled(value, indent = '') {
  const inner = `${indent}   `;
  if (Array.isArray(value)) {
    if (value.length === 0) return '[]';
    const isMultiline = value.some((v) => typeof v === 'object' && v !== null && (Array.isArray(v) ? v.length > 0 : Object.keys(v).length > 0));
    if (!isMultiline) return `[ ${value.map((v) => styled(v, indent)).join(', ')} ]`;
    return `[\n${value.map((v) => `${inner}${styled(v, inner)}`).join(',\n')}\n${indent}]`;
  }
  if (typeof value === 'object' && value !== null) {
    const keys = Object.keys(value).sort();
    if (keys.length === 0) return '{}';
    return `{\n${keys.map((k) => `${inner}${JSON.stringify(k)} : ${styled(value[k], inner)}`).join(',\n')}\n${indent}}`;
  }
  return JSON.stringify(value);
}

// ── simulated host ───────────────────────────────────────────────────────────
const root = simRoot('fmpm');
const hostFile = path.join(root, 'host.json');
const stateDir = path.join(root, 'fm');
const stateFile = path.join(stateDir, 'state.json');
const lockFile = path.join(stateDir, 'state.lock');

function loadHost() {
  try {
    const host = JSON.parse(fs.readFileSync(hostFile, 'utf8'));
    if (!Array.isArray(host.partitions)) throw new Error('no "partitions" array');
    return host;
  } catch (err) {
    process.stderr.write(`fmpm (gpuvm simulator): cannot read ${hostFile}: ${err.message}\n`);
    process.exit(2);
  }
}

function loadFaults() {
  const file = path.join(root, 'faults.json');
  const faults = readJson(file, {});
  const fmpm = faults && typeof faults.fmpm === 'object' && faults.fmpm !== null ? faults.fmpm : {};
  if (fmpm.restartAfterActivate === true) {
    let mtime = 0;
    try {
      mtime = fs.statSync(file).mtimeMs;
    } catch {}
    return { ...fmpm, restartAfterActivate: `written ${mtime}` };
  }
  return fmpm;
}

function readState() {
  const state = readJson(stateFile, null) ?? { active: [], faults: {} };
  if (!Array.isArray(state.active)) state.active = [];
  return state;
}

/**
 * Per-link line rate: 26562 MBps is what `fmpm -l` prints on HGX H100/H200 (NVLink 4, public
 * captures); NVLink 5 (B200/B300) doubles the per-link rate.
 */
function lineRateMBps(board) {
  return /^(B|GB)\d/i.test(String(board ?? 'B200')) ? 53125 : 26562;
}

/** Every HGX GPU has 18 NVLinks to the NVSwitches; a 1-GPU partition has no peers, so fmpm lists 0 of them. */
const NVLINKS_PER_GPU = 18;

// ── lock ─────────────────────────────────────────────────────────────────────
const LOCK_STALE_MS = 10_000;
const LOCK_WAIT_MS = 30_000;

function pidAlive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

/**
 * A lock is stale when its holder is gone (killed mid-update) or it is older than any update
 * could take. It is broken by renaming that exact inode away, so two breakers never both win.
 */
function breakIfStale() {
  let st;
  let holder;
  try {
    st = fs.statSync(lockFile);
    holder = Number.parseInt(fs.readFileSync(lockFile, 'utf8'), 10);
  } catch {
    return;
  }
  const stale = (Number.isInteger(holder) && holder > 0 && !pidAlive(holder)) || Date.now() - st.mtimeMs > LOCK_STALE_MS;
  if (!stale) return;
  const aside = `${lockFile}.stale.${process.pid}`;
  try {
    fs.renameSync(lockFile, aside);
  } catch {
    return;
  }
  const moved = fs.statSync(aside);
  if (moved.ino !== st.ino) {
    // Took a fresh lock someone acquired after our look: put it back.
    try {
      fs.linkSync(aside, lockFile);
    } catch {
      /* another holder already created a new lock; ours is gone either way */
    }
  }
  fs.rmSync(aside, { force: true });
}

function withStateLock(fn) {
  fs.mkdirSync(stateDir, { recursive: true });
  const deadline = Date.now() + LOCK_WAIT_MS;
  let fd;
  for (;;) {
    try {
      fd = fs.openSync(lockFile, 'wx');
      break;
    } catch (err) {
      if (err.code !== 'EEXIST') throw err;
      if (Date.now() > deadline) {
        process.stderr.write(`fmpm (gpuvm simulator): could not take ${lockFile} within ${LOCK_WAIT_MS} ms\n`);
        exitWith(FM_ST_CONNECTION_NOT_VALID);
      }
      breakIfStale();
      sleepSync(2 + Math.floor(Math.random() * 8));
    }
  }
  try {
    fs.writeSync(fd, String(process.pid));
    fs.closeSync(fd);
    return fn();
  } finally {
    fs.rmSync(lockFile, { force: true });
  }
}

// ── operations ───────────────────────────────────────────────────────────────
function partitionTable(host, active) {
  const rate = lineRateMBps(host.board);
  const partitions = host.partitions.map((p) => ({
    partitionId: p.id,
    isActive: active.includes(p.id) ? 1 : 0,
    numGpus: p.modules.length,
    gpuInfo: p.modules.map((m) => ({
      maxNumNvLinks: p.modules.length > 1 ? NVLINKS_PER_GPU : 0,
      numNvLinksAvailable: p.modules.length > 1 ? NVLINKS_PER_GPU : 0,
      nvlinkLineRateMBps: rate,
      pciBusId: '',
      physicalId: m,
      uuid: '',
    })),
  }));
  return {
    maxNumPartitions: FM_MAX_FABRIC_PARTITIONS,
    numPartitions: partitions.length,
    partitionInfo: partitions,
    version: FM_FABRIC_PARTITION_LIST_VERSION,
  };
}

function modulesOf(host, id) {
  return host.partitions.find((p) => p.id === id)?.modules ?? null;
}

function overlapsActive(host, id, active) {
  const mine = new Set(modulesOf(host, id));
  return active.some((other) => other !== id && (modulesOf(host, other) ?? []).some((m) => mine.has(m)));
}

function injected(table, id) {
  const v = table && typeof table === 'object' ? table[String(id)] : undefined;
  return Number.isInteger(v) && v < 0 ? v : null;
}

function activate(host, faults, id) {
  const forced = injected(faults.activateFails, id);
  const rc = forced ?? withStateLock(() => {
    const state = readState();
    if (!modulesOf(host, id)) return FM_ST_BADPARAM;
    if (state.active.includes(id)) return FM_ST_PARTITION_ID_IN_USE;
    if (overlapsActive(host, id, state.active)) return FM_ST_IN_USE;
    state.active = [...state.active, id].sort((a, b) => a - b);
    const token = faults.restartAfterActivate;
    if ((typeof token === 'string' || typeof token === 'number') && state.restartAfterActivateFired !== String(token)) {
      // The activation took; then Fabric Manager restarts before anyone confirms it.
      state.active = [];
      delete state.exited;
      state.awaitingActivatedList = { since: Date.now(), timeoutMs: 60_000 };
      state.restartAfterActivateFired = String(token);
    }
    writeJsonAtomic(stateFile, state);
    return FM_ST_SUCCESS;
  });
  if (rc !== FM_ST_SUCCESS) out(`Failed to activate partition. fmReturn: ${rc}`);
  return rc;
}

function deactivate(host, faults, id) {
  const forced = injected(faults.deactivateFails, id);
  const rc = forced ?? withStateLock(() => {
    const state = readState();
    if (!modulesOf(host, id)) return FM_ST_BADPARAM;
    if (!state.active.includes(id)) return FM_ST_PARTITION_ID_NOT_IN_USE;
    state.active = state.active.filter((a) => a !== id);
    writeJsonAtomic(stateFile, state);
    return FM_ST_SUCCESS;
  });
  if (rc !== FM_ST_SUCCESS) out(`Failed to deactivate partition. fmReturn: ${rc}`);
  return rc;
}

function setActivatedList(host, ids) {
  const rc = withStateLock(() => {
    if (!readState().awaitingActivatedList) return FM_ST_NOT_CONFIGURED;
    if (ids.some((id) => !modulesOf(host, id))) return FM_ST_BADPARAM;
    for (let i = 0; i < ids.length; i++) {
      if (overlapsActive(host, ids[i], ids.slice(0, i))) return FM_ST_IN_USE;
    }
    const state = readState();
    state.active = [...ids].sort((a, b) => a - b);
    delete state.awaitingActivatedList;
    writeJsonAtomic(stateFile, state);
    return FM_ST_SUCCESS;
  });
  if (rc !== FM_ST_SUCCESS) out(`Failed to set activated partitions. fmReturn: ${rc}`);
  return rc;
}

function list(host) {
  // A reader needs no lock: state.json is only ever replaced whole by rename.
  const state = readState();
  process.stdout.write(`${styled(partitionTable(host, state.active))}\n`);
  return FM_ST_SUCCESS;
}

// ── argv (same parsing and early exits as fmpm.cpp) ──────────────────────────
function usage() {
  out('-l : List partitions');
  out('-a <Partition ID> : Activate partition');
  out('-d <Partition ID> : Deactivate partition');
  out('--hostname : hostname or IP address (TCP socket) of Fabric Manager.');
  out('     If this option is not specified, the default is 127.0.0.1');
  out('--set-activated-list <Partition IDs> : Set a list of currently activated fabric partitions.');
  out('     Comma separated, no space! Used for Fabric Manager Resiliency Mode.');
  out('-v : Show version');
}

/** std::stoul: leading digits; anything else throws and the uncaught exception aborts. */
function stoul(text) {
  const m = /^\s*\+?(\d+)/.exec(text);
  if (!m) {
    process.stderr.write("terminate called after throwing an instance of 'std::invalid_argument'\n  what():  stoul\n");
    process.exit(134);
  }
  return Number.parseInt(m[1], 10);
}

function parseIdList(text) {
  const ids = [];
  for (const token of text.split(',').filter((t) => t !== '')) {
    const id = /^\d+$/.test(token) ? Number.parseInt(token, 10) : -1;
    if (id < 0 || id >= FM_MAX_FABRIC_PARTITIONS) {
      out(`Invalid partition Id ${token} was given.`);
      exitWith(FM_ST_BADPARAM);
    }
    if (!ids.includes(id)) ids.push(id);
  }
  return ids;
}

const argv = process.argv.slice(2);
if (argv.length === 0 || (argv.length === 1 && argv[0] === '-h')) {
  usage();
  process.exit(0);
}

let operation = 'help';
let partitionId = 0;
let idList = [];
for (let i = 0; i < argv.length; i++) {
  const arg = argv[i];
  if (arg === '-l') {
    operation = 'list';
  } else if (arg === '-a' || arg === '-d') {
    operation = arg === '-a' ? 'activate' : 'deactivate';
    if (i + 1 >= argv.length) {
      process.stderr.write(`Error: ${arg} option requires partition ID.\n`);
      process.exit(arg === '-a' ? 1 : FM_ST_BADPARAM & 0xff);
    }
    partitionId = stoul(argv[++i]);
    if (arg === '-a' && partitionId >= FM_MAX_FABRIC_PARTITIONS) {
      out('Invalid Partition ID.');
      exitWith(FM_ST_BADPARAM);
    }
  } else if (arg === '--set-activated-list') {
    operation = 'set-activated-list';
    if (i + 1 >= argv.length) {
      process.stderr.write('Error: --set-activated-list option requires list of partition IDs.\n');
      process.exit(1);
    }
    idList = parseIdList(argv[++i]);
  } else if (arg === '--hostname' || arg === '--unix-domain-socket') {
    // Accepted and ignored: the simulated Fabric Manager is the folder, not a socket.
    if (i + 1 >= argv.length) {
      process.stderr.write(`Error: ${arg} option requires user specified value.\n`);
      process.exit(1);
    }
    i++;
  } else if (arg === '-v') {
    out(VERSION);
    process.exit(0);
  } else {
    process.stderr.write('Invalid argument.\n\n');
    exitWith(FM_ST_BADPARAM);
  }
}

const host = loadHost();
const faults = loadFaults();
if (Number.isFinite(faults.hangMs) && faults.hangMs > 0) sleepSync(faults.hangMs);
if (faults.down === true) {
  // fmConnect() fails with FM_ST_CONNECTION_NOT_VALID when nothing listens on the FM port.
  out('Failed to connect to Fabric Manager instance.');
  exitWith(FM_ST_CONNECTION_NOT_VALID);
}

/** A restarted Fabric Manager: still waiting for the activated list, or gone after its window. */
function restartPhase() {
  const state = readState();
  if (state.exited) return 'exited';
  const w = state.awaitingActivatedList;
  if (!w) return 'running';
  if (Date.now() - w.since <= (w.timeoutMs ?? 60_000)) return 'waiting';
  withStateLock(() => {
    const s2 = readState();
    delete s2.awaitingActivatedList;
    s2.exited = true;
    writeJsonAtomic(stateFile, s2);
    return FM_ST_SUCCESS;
  });
  return 'exited';
}

const phase = restartPhase();
if (phase === 'exited') {
  out('Failed to connect to Fabric Manager instance.');
  exitWith(FM_ST_CONNECTION_NOT_VALID);
}
if (phase === 'waiting' && operation !== 'set-activated-list') {
  const what = operation === 'list' ? 'get partition list' : operation === 'activate' ? 'activate partition' : 'deactivate partition';
  out(`Failed to ${what}. fmReturn: ${FM_ST_NOT_CONFIGURED}`);
  exitWith(FM_ST_NOT_CONFIGURED);
}

let rc = FM_ST_SUCCESS;
if (operation === 'list') rc = list(host);
else if (operation === 'activate') rc = activate(host, faults, partitionId);
else if (operation === 'deactivate') rc = deactivate(host, faults, partitionId);
else if (operation === 'set-activated-list') rc = setActivatedList(host, idList);
exitWith(rc);
