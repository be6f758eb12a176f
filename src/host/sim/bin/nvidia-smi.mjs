#!/usr/bin/env node
/**
 * Simulated `nvidia-smi` for a simulated HGX host (B200, B300, H100, H200): `-q` (text) and `-q -x` (XML), modeled
 * line for line on a real capture (fixtures/host-captures/h100-sxm-nvidia-smi-q.*), with the
 * sections, indentation and key spelling of driver 580.
 *
 * Like the real tool it reports only GPUs bound to the `nvidia` driver (the sysfs `driver` link of
 * <root>/sys/bus/pci/devices/<bdf>), and the Fabric block reads Completed/Success for a GPU whose
 * module is in an active partition (<root>/fm/state.json), In Progress/N/A otherwise (FABRIC_MODE=1).
 * Faults: <root>/faults.json key "nvidiaSmi": { fail: true } → driver communication failure (exit 9);
 * { hangMs: N } → answers after N ms; { fabricFailed: [pciAddress] } → those GPUs report fabric
 * State Completed with Status Insufficient Resources (a failed fabric registration). Node builtins only.
 */
import fs from 'node:fs';
import path from 'node:path';
import { readJson as readJsonOrExit, simRoot } from './sim-common.mjs';

const NVML_ERROR_NOT_FOUND = 6;
const NVML_ERROR_DRIVER_NOT_LOADED = 9;

const TOOL = 'nvidia-smi';
const root = simRoot(TOOL);
const readJson = (file, fallback) => readJsonOrExit(TOOL, file, fallback);

// ── argv ─────────────────────────────────────────────────────────────────────
let query = false;
let xml = false;
let unknown = false;
for (const arg of process.argv.slice(2)) {
  if (arg === '-q' || arg === '--query') query = true;
  else if (arg === '-x' || arg === '--xml-format') xml = true;
  else unknown = true;
}
if (!query || unknown) {
  process.stdout.write("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n\n");
  process.exit(2);
}

// ── host state ───────────────────────────────────────────────────────────────
const host = readJson(path.join(root, 'host.json'));
const faults = readJson(path.join(root, 'faults.json'), {});
const smiFaults = faults && typeof faults.nvidiaSmi === 'object' && faults.nvidiaSmi !== null ? faults.nvidiaSmi : {};
if (Number.isFinite(smiFaults.hangMs) && smiFaults.hangMs > 0) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, smiFaults.hangMs);
}
if (smiFaults.fail === true) {
  process.stdout.write("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running.\n\n");
  process.exit(NVML_ERROR_DRIVER_NOT_LOADED);
}

function driverOf(bdf) {
  try {
    return path.basename(fs.readlinkSync(path.join(root, 'sys', 'bus', 'pci', 'devices', bdf, 'driver')));
  } catch {
    return null;
  }
}

const state = readJson(path.join(root, 'fm', 'state.json'), { active: [] });
const activeModules = new Set();
for (const id of Array.isArray(state.active) ? state.active : []) {
  const p = (host.partitions ?? []).find((x) => x.id === id);
  for (const m of p?.modules ?? []) activeModules.add(m);
}

const BDF = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/;
const fabricFailed = new Set(Array.isArray(smiFaults.fabricFailed) ? smiFaults.fabricFailed.filter((a) => BDF.test(String(a))) : []);
const allGpus = Array.isArray(host.gpus) ? host.gpus : [];
for (const g of allGpus) {
  if (!BDF.test(String(g?.pciAddress))) {
    process.stderr.write(`nvidia-smi (gpuvm simulator): host.json names a GPU with invalid pciAddress ${JSON.stringify(g?.pciAddress)}\n`);
    process.exit(2);
  }
}
const gpus = allGpus
  .map((g, minor) => ({ ...g, minor }))
  .filter((g) => driverOf(g.pciAddress) === 'nvidia')
  .sort((a, b) => a.pciAddress.localeCompare(b.pciAddress));

if (gpus.length === 0) {
  process.stdout.write('No devices were found\n');
  process.exit(NVML_ERROR_NOT_FOUND);
}

// ── values ───────────────────────────────────────────────────────────────────
/**
 * What differs per board. H100: fixtures/host-captures/h100-sxm-nvidia-smi-q.txt. B200: the B200
 * write-up. H200, B300: product name, FB size, sub-system id and power from public nvidia-smi
 * output; part numbers follow their sibling's pattern with their own device id (no capture).
 * `bar1MiB` must equal the sysfs BAR2 size sim-host.ts lays out.
 */
const BLACKWELL = {
  architecture: 'Blackwell',
  vbios: '97.00.B9.00.4E',
  boardPartNumber: '692-2G525-0220-000',
  gpuPartNumber: '2901-886-A1',
  inforomImage: 'G525.0220.00.03',
  subSystemId: '1999',
  pcieDeviceMax: '6',
  fbTotalMiB: 183359,
  fbReservedMiB: 1029,
  bar1MiB: 262144,
  powerLimit: '1000.00 W',
  clocks: { graphics: 1965, memory: 3996, video: 1680 },
};
const HOPPER = {
  architecture: 'Hopper',
  vbios: '96.00.DA.00.0C',
  boardPartNumber: '695-2G520-0200-000',
  gpuPartNumber: '2330-885-A1',
  inforomImage: 'G520.0200.00.05',
  subSystemId: '16C1',
  pcieDeviceMax: '5',
  fbTotalMiB: 81559,
  fbReservedMiB: 480,
  bar1MiB: 131072,
  powerLimit: '700.00 W',
  clocks: { graphics: 1980, memory: 2619, video: 1545 },
};
const BOARD_FACTS = {
  B200: BLACKWELL,
  B300: { ...BLACKWELL, gpuPartNumber: '3182-886-A1', fbTotalMiB: 275040, powerLimit: '1100.00 W' },
  H100: HOPPER,
  H200: { ...HOPPER, gpuPartNumber: '2335-885-A1', subSystemId: '18BE', fbTotalMiB: 143771, bar1MiB: 262144, clocks: { ...HOPPER.clocks, memory: 3201 } },
};

const boardName = String(host.board ?? 'B200').toUpperCase();
const board = BOARD_FACTS[boardName];
if (!board) {
  process.stderr.write(`nvidia-smi (gpuvm simulator): host.json names unknown board ${JSON.stringify(host.board)}\n`);
  process.exit(2);
}
const productName = host.productName ?? 'NVIDIA B200';
const driverVersion = host.driverVersion ?? '580.95.05';
const cudaVersion = host.cudaVersion ?? '13.0';
const deviceId = `${String(host.pciDeviceId ?? '0x2901').replace(/^0x/i, '').toUpperCase().padStart(4, '0')}10DE`;
const mhz = (n) => `${n} MHz`;
const mib = (n) => `${n} MiB`;
const fbFreeMiB = board.fbTotalMiB - board.fbReservedMiB;
const DAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const now = new Date();
const two = (n) => String(n).padStart(2, '0');
const timestamp = `${DAYS[now.getDay()]} ${MONTHS[now.getMonth()]} ${two(now.getDate())} ${two(now.getHours())}:${two(now.getMinutes())}:${two(now.getSeconds())} ${now.getFullYear()}`;

/** 0000:1a:00.0 → 00000000:1A:00.0, as nvidia-smi prints it (8-digit domain, upper-case hex). */
function busIdOf(bdf) {
  return `0000${bdf}`.toUpperCase();
}

function gpuFacts(g) {
  const inActive = activeModules.has(g.moduleId);
  // A failed registration still reads Completed; the status carries the NVML error string.
  const failed = fabricFailed.has(g.pciAddress);
  return {
    busId: busIdOf(g.pciAddress),
    bus: g.pciAddress.slice(5, 7).toUpperCase(),
    device: g.pciAddress.slice(8, 10).toUpperCase(),
    domain: g.pciAddress.slice(0, 4).toUpperCase(),
    uuid: g.uuid ?? 'N/A',
    serial: g.serial ?? 'N/A',
    moduleId: String(g.moduleId ?? 'N/A'),
    minor: String(g.minor),
    fabricState: failed || inActive ? 'Completed' : 'In Progress',
    fabricStatus: failed ? 'Insufficient Resources' : inActive ? 'Success' : 'N/A',
    partitionAssigned: inActive && !failed,
    guid: `0x${(0xa000 + (g.moduleId ?? 0)).toString(16)}00000000${g.pciAddress.slice(5, 7)}`,
  };
}

// ── text (`nvidia-smi -q`) ───────────────────────────────────────────────────
// An entry is [key, value], [key, [children]] (a section) or [key, value, [children]].
function textBlock(f) {
  const na = 'N/A';
  const c = board.clocks;
  const power = (limit) => [
    ['Average Power Draw', limit ? '182.37 W' : na],
    ['Instantaneous Power Draw', limit ? '183.10 W' : na],
    ['Current Power Limit', limit ?? na],
    ['Requested Power Limit', limit ?? na],
    ['Default Power Limit', limit ?? na],
    ['Min Power Limit', limit ? '200.00 W' : na],
    ['Max Power Limit', limit ?? na],
  ];
  const ecc = (extra) => [
    ['SRAM Correctable', '0'],
    ['SRAM Uncorrectable Parity', '0'],
    ['SRAM Uncorrectable SEC-DED', '0'],
    ['DRAM Correctable', '0'],
    ['DRAM Uncorrectable', '0'],
    ...extra,
  ];
  return [
    ['Product Name', productName],
    ['Product Brand', 'NVIDIA'],
    ['Product Architecture', board.architecture],
    ['Display Mode', 'Requested functionality has been deprecated'],
    ['Display Attached', 'No'],
    ['Display Active', 'Disabled'],
    ['Persistence Mode', 'Enabled'],
    ['Addressing Mode', 'None'],
    ['MIG Mode', [['Current', 'Disabled'], ['Pending', 'Disabled']]],
    ['Accounting Mode', 'Disabled'],
    ['Accounting Mode Buffer Size', '4000'],
    ['Driver Model', [['Current', na], ['Pending', na]]],
    ['Serial Number', f.serial],
    ['GPU UUID', f.uuid],
    ['GPU PDI', '0x0000000000000000'],
    ['Minor Number', f.minor],
    ['VBIOS Version', board.vbios],
    ['MultiGPU Board', 'No'],
    ['Board ID', `0x${f.bus.toLowerCase()}00`],
    ['Board Part Number', board.boardPartNumber],
    ['GPU Part Number', board.gpuPartNumber],
    ['FRU Part Number', na],
    ['Platform Info', [
      ['Chassis Serial Number', na],
      ['Slot Number', na],
      ['Tray Index', na],
      ['Host ID', '1'],
      ['Peer Type', 'Switch Connected'],
      ['Module Id', f.moduleId],
      ['GPU Fabric GUID', f.guid],
    ]],
    ['Inforom Version', [
      ['Image Version', board.inforomImage],
      ['OEM Object', '2.1'],
      ['ECC Object', '7.16'],
      ['Power Management Object', na],
    ]],
    ['Inforom BBX Object Flush', [['Latest Timestamp', na], ['Latest Duration', na]]],
    ['GPU Operation Mode', [['Current', na], ['Pending', na]]],
    ['GPU C2C Mode', 'Disabled'],
    ['GPU Virtualization Mode', [
      ['Virtualization Mode', 'Pass-Through'],
      ['Host VGPU Mode', na],
      ['vGPU Heterogeneous Mode', na],
    ]],
    ['GPU Recovery Action', 'None'],
    ['GSP Firmware Version', driverVersion],
    ['IBMNPU', [['Relaxed Ordering Mode', na]]],
    ['PCI', [
      ['Bus', `0x${f.bus}`],
      ['Device', `0x${f.device}`],
      ['Domain', `0x${f.domain}`],
      ['Base Classcode', '0x3'],
      ['Sub Classcode', '0x2'],
      ['Device Id', `0x${deviceId}`],
      ['Bus Id', f.busId],
      ['Sub System Id', `0x${board.subSystemId}10DE`],
      ['GPU Link Info', [
        ['PCIe Generation', [
          ['Max', '5'],
          ['Current', '5'],
          ['Device Current', '5'],
          ['Device Max', board.pcieDeviceMax],
          ['Host Max', '5'],
        ]],
        ['Link Width', [['Max', '16x'], ['Current', '16x']]],
      ]],
      ['Bridge Chip', [['Type', na], ['Firmware', na]]],
      ['Replays Since Reset', '0'],
      ['Replay Number Rollovers', '0'],
      ['Tx Throughput', '0 KB/s'],
      ['Rx Throughput', '0 KB/s'],
      ['Atomic Caps Outbound', na],
      ['Atomic Caps Inbound', na],
    ]],
    ['Fan Speed', na],
    ['Performance State', 'P0'],
    ['Clocks Event Reasons', [
      ['Idle', 'Active'],
      ['Applications Clocks Setting', 'Not Active'],
      ['SW Power Cap', 'Not Active'],
      ['HW Slowdown', 'Not Active', [
        ['HW Thermal Slowdown', 'Not Active'],
        ['HW Power Brake Slowdown', 'Not Active'],
      ]],
      ['Sync Boost', 'Not Active'],
      ['SW Thermal Slowdown', 'Not Active'],
      ['Display Clock Setting', 'Not Active'],
    ]],
    ['Clocks Event Reasons Counters', [
      ['SW Power Capping', '0 us'],
      ['Sync Boost', '0 us'],
      ['SW Thermal Slowdown', '0 us'],
      ['HW Thermal Slowdown', '0 us'],
      ['HW Power Braking', '0 us'],
    ]],
    ['Sparse Operation Mode', 'Disabled'],
    ['FB Memory Usage', [['Total', mib(board.fbTotalMiB)], ['Reserved', mib(board.fbReservedMiB)], ['Used', '0 MiB'], ['Free', mib(fbFreeMiB)]]],
    ['BAR1 Memory Usage', [['Total', mib(board.bar1MiB)], ['Used', '1 MiB'], ['Free', mib(board.bar1MiB - 1)]]],
    ['Conf Compute Protected Memory Usage', [['Total', '0 MiB'], ['Used', '0 MiB'], ['Free', '0 MiB']]],
    ['Compute Mode', 'Default'],
    ['Utilization', [
      ['GPU', '0 %'],
      ['Memory', '0 %'],
      ['Encoder', '0 %'],
      ['Decoder', '0 %'],
      ['JPEG', '0 %'],
      ['OFA', '0 %'],
    ]],
    ['Encoder Stats', [['Active Sessions', '0'], ['Average FPS', '0'], ['Average Latency', '0']]],
    ['FBC Stats', [['Active Sessions', '0'], ['Average FPS', '0'], ['Average Latency', '0']]],
    ['DRAM Encryption Mode', [['Current', 'Disabled'], ['Pending', 'Disabled']]],
    ['ECC Mode', [['Current', 'Enabled'], ['Pending', 'Enabled']]],
    ['ECC Errors', [
      ['Volatile', ecc([])],
      ['Aggregate', ecc([['SRAM Threshold Exceeded', 'No']])],
      ['Aggregate Uncorrectable SRAM Sources', [
        ['SRAM L2', '0'],
        ['SRAM SM', '0'],
        ['SRAM Microcontroller', '0'],
        ['SRAM PCIE', '0'],
        ['SRAM Other', '0'],
      ]],
      ['Channel Repair Pending', 'No'],
      ['TPC Repair Pending', 'No'],
      ['Unrepairable Memory', 'No'],
    ]],
    ['Retired Pages', [['Single Bit ECC', na], ['Double Bit ECC', na], ['Pending Page Blacklist', na]]],
    ['Remapped Rows', [
      ['Correctable Error', '0'],
      ['Inactive Correctable Error', '0'],
      ['Uncorrectable Error', '0'],
      ['Inactive Uncorrectable Error', '0'],
      ['Pending', 'No'],
      ['Remapping Failure Occurred', 'No'],
      ['Bank Remap Availability Histogram', [
        ['Max', '2560 bank(s)'],
        ['High', '0 bank(s)'],
        ['Partial', '0 bank(s)'],
        ['Low', '0 bank(s)'],
        ['None', '0 bank(s)'],
      ]],
    ]],
    ['Temperature', [
      ['GPU Current Temp', '33 C'],
      ['GPU T.Limit Temp', '54 C'],
      ['GPU Shutdown T.Limit Temp', '-7 C'],
      ['GPU Slowdown T.Limit Temp', '-2 C'],
      ['GPU Max Operating T.Limit Temp', '0 C'],
      ['GPU Target Temperature', na],
      ['Memory Current Temp', '35 C'],
      ['Memory Max Operating T.Limit Temp', '0 C'],
    ]],
    ['GPU Power Readings', power(board.powerLimit)],
    // The trailing space is in the real output.
    ['GPU Memory Power Readings ', [['Average Power Draw', '61.20 W'], ['Instantaneous Power Draw', na]]],
    ['Module Power Readings', power(null)],
    ['Power Smoothing', 'Disabled'],
    ['Workload Power Profiles', [['Requested Profiles', na], ['Enforced Profiles', na]]],
    ['Clocks', [['Graphics', mhz(c.graphics)], ['SM', mhz(c.graphics)], ['Memory', mhz(c.memory)], ['Video', mhz(c.video)]]],
    ['Applications Clocks', [['Graphics', mhz(c.graphics)], ['Memory', mhz(c.memory)]]],
    ['Default Applications Clocks', [['Graphics', mhz(c.graphics)], ['Memory', mhz(c.memory)]]],
    ['Deferred Clocks', [['Memory', na]]],
    ['Max Clocks', [['Graphics', mhz(c.graphics)], ['SM', mhz(c.graphics)], ['Memory', mhz(c.memory)], ['Video', mhz(c.video)]]],
    ['Max Customer Boost Clocks', [['Graphics', mhz(c.graphics)]]],
    ['Clock Policy', [['Auto Boost', na], ['Auto Boost Default', na]]],
    ['Fabric', [
      ['State', f.fabricState],
      ['Status', f.fabricStatus],
      ['CliqueId', '0'],
      ['ClusterUUID', '00000000-0000-0000-0000-000000000000'],
      ['Health', [
        ['Summary', 'Healthy'],
        ['Bandwidth', 'Full'],
        ['Route Recovery in progress', 'False'],
        ['Route Unhealthy', 'False'],
        ['Access Timeout Recovery', 'False'],
        ['Incorrect Configuration', 'None'],
        ['Partition Assigned', f.partitionAssigned ? 'True' : 'False'],
      ]],
    ]],
    ['Processes', 'None'],
    ['Capabilities', [['EGM', 'disabled']]],
  ];
}

/** Keys are padded so every ` : ` sits in column 55, whatever the depth (4 spaces a level). */
function renderText(entries, depth, lines) {
  const indent = '    '.repeat(depth);
  for (const [key, second, third] of entries) {
    if (Array.isArray(second)) {
      lines.push(`${indent}${key}`);
      renderText(second, depth + 1, lines);
    } else {
      lines.push(`${`${indent}${key}`.padEnd(55)}: ${second}`);
      if (third) renderText(third, depth + 1, lines);
    }
  }
}

function printText() {
  const lines = ['', '==============NVSMI LOG==============', ''];
  renderText([['Timestamp', timestamp], ['Driver Version', driverVersion], ['CUDA Version', cudaVersion]], 0, lines);
  lines.push('');
  renderText([['Attached GPUs', String(gpus.length)]], 0, lines);
  for (const g of gpus) {
    const f = gpuFacts(g);
    lines.push(`GPU ${f.busId}`);
    renderText(textBlock(f), 1, lines);
    lines.push('');
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}

// ── XML (`nvidia-smi -q -x`) ─────────────────────────────────────────────────
// An element is [tag, text], [tag, [children]] or [tag, { attrs, children | text | block }].
function xmlBlock(f) {
  const na = 'N/A';
  const c = board.clocks;
  const ecc = (extra) => [
    ['sram_correctable', '0'],
    ['sram_uncorrectable_parity', '0'],
    ['sram_uncorrectable_secded', '0'],
    ['dram_correctable', '0'],
    ['dram_uncorrectable', '0'],
    ...extra,
  ];
  const power = (limit) => [
    ['power_state', 'P0'],
    ['average_power_draw', limit ? '182.37 W' : na],
    ['instant_power_draw', limit ? '183.10 W' : na],
    ['current_power_limit', limit ?? na],
    ['requested_power_limit', limit ?? na],
    ['default_power_limit', limit ?? na],
    ['min_power_limit', limit ? '200.00 W' : na],
    ['max_power_limit', limit ?? na],
  ];
  return [
    ['product_name', productName],
    ['product_brand', 'NVIDIA'],
    ['product_architecture', board.architecture],
    ['display_mode', 'Requested functionality has been deprecated'],
    ['display_attached', 'No'],
    ['display_active', 'Disabled'],
    ['persistence_mode', 'Enabled'],
    ['addressing_mode', 'None'],
    ['mig_mode', [['current_mig', 'Disabled'], ['pending_mig', 'Disabled']]],
    ['mig_devices', { block: 'None' }],
    ['accounting_mode', 'Disabled'],
    ['accounting_mode_buffer_size', '4000'],
    ['driver_model', [['current_dm', na], ['pending_dm', na]]],
    ['serial', f.serial],
    ['uuid', f.uuid],
    ['pdi', '0x0000000000000000'],
    ['minor_number', f.minor],
    ['vbios_version', board.vbios],
    ['multigpu_board', 'No'],
    ['board_id', `0x${f.bus.toLowerCase()}00`],
    ['board_part_number', board.boardPartNumber],
    ['gpu_part_number', board.gpuPartNumber],
    ['gpu_fru_part_number', na],
    ['platformInfo', [
      ['chassis_serial_number', na],
      ['slot_number', na],
      ['tray_index', na],
      ['host_id', '1'],
      ['peer_type', 'Switch Connected'],
      ['module_id', f.moduleId],
      ['gpu_fabric_guid', f.guid],
    ]],
    ['inforom_version', [
      ['img_version', board.inforomImage],
      ['oem_object', '2.1'],
      ['ecc_object', '7.16'],
      ['pwr_object', na],
    ]],
    ['inforom_bbx_flush', [['latest_timestamp', na], ['latest_duration', na]]],
    ['gpu_operation_mode', [['current_gom', na], ['pending_gom', na]]],
    ['c2c_mode', 'Disabled'],
    ['gpu_virtualization_mode', [
      ['virtualization_mode', 'Pass-Through'],
      ['host_vgpu_mode', na],
      ['vgpu_heterogeneous_mode', na],
    ]],
    ['gpu_recovery_action', 'None'],
    ['gsp_firmware_version', driverVersion],
    ['ibmnpu', [['relaxed_ordering_mode', na]]],
    ['pci', [
      ['pci_bus', f.bus],
      ['pci_device', f.device],
      ['pci_domain', f.domain],
      ['pci_base_class', '3'],
      ['pci_sub_class', '2'],
      ['pci_device_id', deviceId],
      ['pci_bus_id', f.busId],
      ['pci_sub_system_id', `${board.subSystemId}10DE`],
      ['pci_gpu_link_info', [
        ['pcie_gen', [
          ['max_link_gen', '5'],
          ['current_link_gen', '5'],
          ['device_current_link_gen', '5'],
          ['max_device_link_gen', board.pcieDeviceMax],
          ['max_host_link_gen', '5'],
        ]],
        ['link_widths', [['max_link_width', '16x'], ['current_link_width', '16x']]],
      ]],
      ['pci_bridge_chip', [['bridge_chip_type', na], ['bridge_chip_fw', na]]],
      ['replay_counter', '0'],
      ['replay_rollover_counter', '0'],
      ['tx_util', '0 KB/s'],
      ['rx_util', '0 KB/s'],
      ['atomic_caps_outbound', na],
      ['atomic_caps_inbound', na],
    ]],
    ['fan_speed', na],
    ['performance_state', 'P0'],
    ['clocks_event_reasons', [
      ['clocks_event_reason_gpu_idle', 'Active'],
      ['clocks_event_reason_applications_clocks_setting', 'Not Active'],
      ['clocks_event_reason_sw_power_cap', 'Not Active'],
      ['clocks_event_reason_hw_slowdown', 'Not Active'],
      ['clocks_event_reason_hw_thermal_slowdown', 'Not Active'],
      ['clocks_event_reason_hw_power_brake_slowdown', 'Not Active'],
      ['clocks_event_reason_sync_boost', 'Not Active'],
      ['clocks_event_reason_sw_thermal_slowdown', 'Not Active'],
      ['clocks_event_reason_display_clocks_setting', 'Not Active'],
    ]],
    ['clocks_event_reasons_counters', [
      ['clocks_event_reasons_counters_sw_power_cap', '0 us'],
      ['clocks_event_reasons_counters_sync_boost', '0 us'],
      ['clocks_event_reasons_counters_sw_therm_slowdown', '0 us'],
      ['clocks_event_reasons_counters_hw_therm_slowdown', '0 us'],
      ['clocks_event_reasons_counters_hw_power_brake', '0 us'],
    ]],
    ['sparse_operation_mode', 'Disabled'],
    ['fb_memory_usage', [['total', mib(board.fbTotalMiB)], ['reserved', mib(board.fbReservedMiB)], ['used', '0 MiB'], ['free', mib(fbFreeMiB)]]],
    ['bar1_memory_usage', [['total', mib(board.bar1MiB)], ['used', '1 MiB'], ['free', mib(board.bar1MiB - 1)]]],
    ['cc_protected_memory_usage', [['total', '0 MiB'], ['used', '0 MiB'], ['free', '0 MiB']]],
    ['compute_mode', 'Default'],
    ['utilization', [
      ['gpu_util', '0 %'],
      ['memory_util', '0 %'],
      ['encoder_util', '0 %'],
      ['decoder_util', '0 %'],
      ['jpeg_util', '0 %'],
      ['ofa_util', '0 %'],
    ]],
    ['encoder_stats', [['session_count', '0'], ['average_fps', '0'], ['average_latency', '0']]],
    ['fbc_stats', [['session_count', '0'], ['average_fps', '0'], ['average_latency', '0']]],
    ['dram_encryption_mode', [['current_dram_encryption', 'Disabled'], ['pending_dram_encryption', 'Disabled']]],
    ['ecc_mode', [['current_ecc', 'Enabled'], ['pending_ecc', 'Enabled']]],
    ['ecc_errors', [
      ['volatile', ecc([])],
      ['aggregate', ecc([['sram_threshold_exceeded', 'No']])],
      ['aggregate_uncorrectable_sram_sources', [
        ['sram_l2', '0'],
        ['sram_sm', '0'],
        ['sram_microcontroller', '0'],
        ['sram_pcie', '0'],
        ['sram_other', '0'],
      ]],
      ['channel_repair_pending', 'No'],
      ['tpc_repair_pending', 'No'],
      ['unrepairable_memory', 'No'],
    ]],
    ['retired_pages', [
      ['multiple_single_bit_retirement', [['retired_count', na], ['retired_pagelist', na]]],
      ['double_bit_retirement', [['retired_count', na], ['retired_pagelist', na]]],
      ['pending_blacklist', na],
      ['pending_retirement', na],
    ]],
    ['remapped_rows', [
      ['remapped_row_corr', '0'],
      ['remapped_row_corr_inactive', '0'],
      ['remapped_row_unc', '0'],
      ['remapped_row_unc_inactive', '0'],
      ['remapped_row_pending', 'No'],
      ['remapped_row_failure', 'No'],
      ['row_remapper_histogram', [
        ['row_remapper_histogram_max', '2560 bank(s)'],
        ['row_remapper_histogram_high', '0 bank(s)'],
        ['row_remapper_histogram_partial', '0 bank(s)'],
        ['row_remapper_histogram_low', '0 bank(s)'],
        ['row_remapper_histogram_none', '0 bank(s)'],
      ]],
    ]],
    ['temperature', [
      ['gpu_temp', '33 C'],
      ['gpu_temp_tlimit', '54 C'],
      ['gpu_temp_max_tlimit_threshold', '-7 C'],
      ['gpu_temp_slow_tlimit_threshold', '-2 C'],
      ['gpu_temp_max_gpu_tlimit_threshold', '0 C'],
      ['gpu_target_temperature', na],
      ['memory_temp', '35 C'],
      ['gpu_temp_max_mem_tlimit_threshold', '0 C'],
    ]],
    ['supported_gpu_target_temp', [['gpu_target_temp_min', na], ['gpu_target_temp_max', na]]],
    ['gpu_power_readings', power(board.powerLimit)],
    ['gpu_memory_power_readings', [['average_power_draw', '61.20 W'], ['instant_power_draw', na]]],
    ['module_power_readings', power(null)],
    ['power_smoothing', 'Disabled'],
    ['power_profiles', [['power_profile_requested_profiles', na], ['power_profile_enforced_profiles', na]]],
    ['clocks', [['graphics_clock', mhz(c.graphics)], ['sm_clock', mhz(c.graphics)], ['mem_clock', mhz(c.memory)], ['video_clock', mhz(c.video)]]],
    ['applications_clocks', [['graphics_clock', mhz(c.graphics)], ['mem_clock', mhz(c.memory)]]],
    ['default_applications_clocks', [['graphics_clock', mhz(c.graphics)], ['mem_clock', mhz(c.memory)]]],
    ['deferred_clocks', [['mem_clock', na]]],
    ['max_clocks', [['graphics_clock', mhz(c.graphics)], ['sm_clock', mhz(c.graphics)], ['mem_clock', mhz(c.memory)], ['video_clock', mhz(c.video)]]],
    ['max_customer_boost_clocks', [['graphics_clock', mhz(c.graphics)]]],
    ['clock_policy', [['auto_boost', na], ['auto_boost_default', na]]],
    ['fabric', [
      ['state', f.fabricState],
      ['status', f.fabricStatus],
      ['cliqueId', '0'],
      ['clusterUuid', '00000000-0000-0000-0000-000000000000'],
      ['health', [
        ['summary', 'Healthy'],
        ['bandwidth', 'Full'],
        ['route_recovery_in_progress', 'False'],
        ['route_unhealthy', 'False'],
        ['access_timeout_recovery', 'False'],
        ['incorrect_configuration', 'None'],
        ['partition_assigned', f.partitionAssigned ? 'True' : 'False'],
      ]],
    ]],
    ['supported_clocks', [
      ['supported_mem_clock', [['value', mhz(c.memory)], ...graphicsClocks()]],
      ['supported_mem_clock', [['value', '1593 MHz'], ...graphicsClocks()]],
    ]],
    ['processes', []],
    ['accounted_processes', []],
    ['capabilities', [['egm', 'disabled']]],
  ];
}

/** The real list runs in 15 MHz steps from the boost clock down to 345 MHz. */
function graphicsClocks() {
  const out = [];
  for (let n = board.clocks.graphics; n >= 345; n -= 15) out.push(['supported_graphics_clock', mhz(n)]);
  return out;
}

function esc(text) {
  return String(text).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function renderXml(elements, depth, lines) {
  const indent = '\t'.repeat(depth);
  for (const [tag, content] of elements) {
    const spec = Array.isArray(content) ? { children: content } : typeof content === 'object' ? content : { text: content };
    const attrs = Object.entries(spec.attrs ?? {}).map(([k, v]) => ` ${k}="${esc(v)}"`).join('');
    if (spec.children) {
      lines.push(`${indent}<${tag}${attrs}>`);
      renderXml(spec.children, depth + 1, lines);
      lines.push(`${indent}</${tag}>`);
    } else if (spec.block !== undefined) {
      lines.push(`${indent}<${tag}${attrs}>`, `${indent}\t${esc(spec.block)}`, `${indent}</${tag}>`);
    } else {
      lines.push(`${indent}<${tag}${attrs}>${esc(spec.text)}</${tag}>`);
    }
  }
}

function printXml() {
  const lines = ['<?xml version="1.0" ?>', '<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v13.dtd">', '<nvidia_smi_log>'];
  renderXml(
    [
      ['timestamp', timestamp],
      ['driver_version', driverVersion],
      ['cuda_version', cudaVersion],
      ['attached_gpus', String(gpus.length)],
    ],
    1,
    lines,
  );
  for (const g of gpus) {
    const f = gpuFacts(g);
    renderXml([['gpu', { attrs: { id: f.busId }, children: xmlBlock(f) }]], 1, lines);
  }
  lines.push('', '</nvidia_smi_log>');
  process.stdout.write(`${lines.join('\n')}\n`);
}

if (xml) printXml();
else printText();
