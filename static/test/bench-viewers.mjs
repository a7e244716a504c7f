// Viewer cost of the fleet page (issue 16, "light for viewers"), measured in
// headless Chromium against a running demo (scripts/demo):
//
//   1. brokers' CPU with no tab open (baseline);
//   2. one tab: bytes/s it receives over its WebSocket (CDP Network.webSocketFrameReceived),
//      its renderer process's CPU (/proc/<pid>/stat), trucks drawn and followed;
//   3. ten tabs: the brokers' CPU again.
//
// Usage: node test/bench-viewers.mjs URL --broker-ports P1,P2 [--tabs 10] [--seconds 30] [--json PATH]
//   --broker-ports  the brokers' metrics (or any listening) ports, to find their pids with `ss -ltnp`
// Prints one line per figure and a JSON summary; exit 1 if a limit is exceeded
// (300 KB/s per tab, renderer < 50% of a core, brokers +10% with 10 tabs).
// Env: CHROMIUM (default /usr/bin/chromium).

import { execFileSync } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import puppeteer from 'puppeteer-core';

const argv = process.argv.slice(2);
const opt = (name, def) => {
  const i = argv.indexOf(name);
  return i >= 0 && i + 1 < argv.length ? argv[i + 1] : def;
};
const url = argv.find((a) => /^https?:\/\//.test(a)) || 'http://127.0.0.1:8080/';
const brokerPorts = opt('--broker-ports', '').split(',').filter(Boolean).map(Number);
const tabs = Number(opt('--tabs', '10'));
const seconds = Number(opt('--seconds', '30'));
const jsonOut = opt('--json', null);
const CLK_TCK = 100; // USER_HZ on Linux
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function pidOnPort(port) {
  const out = execFileSync('ss', ['-ltnpH', `sport = :${port}`], { encoding: 'utf8' });
  const m = /pid=(\d+)/.exec(out);
  if (!m) throw new Error(`no process listens on port ${port} (or it belongs to another user)`);
  return Number(m[1]);
}

/** CPU seconds (user + system) of a process, from /proc/PID/stat. */
async function cpuSeconds(pid) {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

/** Share of one core each pid used over `secs` seconds, measured now. */
async function cpuOver(pids, secs) {
  const t0 = performance.now();
  const a = await Promise.all(pids.map(cpuSeconds));
  await sleep(secs * 1000);
  const b = await Promise.all(pids.map(cpuSeconds));
  const wall = (performance.now() - t0) / 1000;
  return pids.map((_, i) => (b[i] - a[i]) / wall);
}

/** Every process below `pid` (Chromium's renderers hang off its zygote, not off the browser). */
function childrenOf(pid) {
  const rows = execFileSync('ps', ['-e', '-o', 'pid=,ppid=,args='], { encoding: 'utf8' })
    .split('\n').filter(Boolean).map((l) => {
      const [p, pp, ...rest] = l.trim().split(/\s+/);
      return { pid: Number(p), ppid: Number(pp), args: rest.join(' ') };
    });
  const out = [];
  const todo = [pid];
  while (todo.length) {
    const parent = todo.pop();
    for (const r of rows) if (r.ppid === parent) { out.push(r); todo.push(r.pid); }
  }
  return out;
}

async function openTab(browser) {
  const page = await browser.newPage();
  await page.goto(url, { waitUntil: 'load', timeout: 600_000 });
  await page.waitForFunction(() => window.__lodestream && window.__lodestream.snapshots >= 2, { timeout: 600_000 });
  return page;
}

const sum = (xs) => xs.reduce((a, b) => a + b, 0);
const pct = (x) => `${(100 * x).toFixed(1)}%`;

const brokerPids = brokerPorts.map(pidOnPort);
console.log(`brokers: pids ${brokerPids.join(', ')}; page ${url}; ${seconds} s per phase`);
const profile = await mkdtemp(join(tmpdir(), 'lodestream-bench-'));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', `--user-data-dir=${profile}`,
    '--window-size=1400,900', '--renderer-process-limit=20'],
  defaultViewport: { width: 1400, height: 900 },
});
const r = { url, seconds, tabs };
try {
  // 1. No tab.
  const idle = await cpuOver(brokerPids, seconds);
  r.broker_cpu_0_tabs = sum(idle);
  console.log(`brokers, 0 tabs: ${pct(r.broker_cpu_0_tabs)} of a core (${idle.map(pct).join(' + ')})`);

  // 2. One tab.
  const page = await openTab(browser);
  // Chromium may reuse the first blank tab's renderer or keep a spare one: every renderer is
  // measured and the busiest is the tab's (the only page doing work); the others are printed.
  const renderers = childrenOf(browser.process().pid).filter((c) => c.args.includes('--type=renderer'));
  const gpu = childrenOf(browser.process().pid).find((c) => c.args.includes('--type=gpu-process'));
  const cdp = await page.createCDPSession();
  await cdp.send('Network.enable');
  let wsBytes = 0;
  let frames = 0;
  cdp.on('Network.webSocketFrameReceived', (e) => {
    const d = e.response.payloadData || '';
    // opcode 2 (binary) frames come base64-encoded; text frames as they are.
    wsBytes += e.response.opcode === 2 ? Math.floor((d.length * 3) / 4) - (d.endsWith('==') ? 2 : d.endsWith('=') ? 1 : 0) : Buffer.byteLength(d);
    frames++;
  });
  await sleep(3000); // settle: first snapshot, follow subscriptions
  wsBytes = 0;
  frames = 0;
  const pids = [...renderers.map((c) => c.pid), ...(gpu ? [gpu.pid] : [])];
  const t0 = performance.now();
  const counter0 = await page.evaluate(() => window.__lodestream.bytes);
  const cpu = await cpuOver(pids, seconds);
  const wall = (performance.now() - t0) / 1000;
  const s = await page.evaluate(() => ({ ...window.__lodestream, tryPublish: undefined, config: undefined }));
  r.ws_bytes_per_s = wsBytes / wall;
  r.ws_frames_per_s = frames / wall;
  r.page_counter_bytes_per_s = (s.bytes - counter0) / wall;
  const rcpu = cpu.slice(0, renderers.length);
  r.renderer_cpu = rcpu.length ? Math.max(...rcpu) : null;
  r.other_new_renderers_cpu = rcpu.length > 1 ? rcpu.filter((x) => x !== r.renderer_cpu) : [];
  r.gpu_cpu = gpu ? cpu[cpu.length - 1] : null;
  r.trucks_on_map = s.snapshotTrucks;
  r.followed = s.followed.length;
  r.followed_with_data = (await page.$$eval('.truck', (els) => els.length));
  console.log(`1 tab: WebSocket ${(r.ws_bytes_per_s / 1024).toFixed(1)} KB/s in ${r.ws_frames_per_s.toFixed(1)} frames/s `
    + `(page counter ${(r.page_counter_bytes_per_s / 1024).toFixed(1)} KB/s)`);
  console.log(`1 tab: renderer ${r.renderer_cpu === null ? 'not found' : pct(r.renderer_cpu)} of a core, `
    + `GPU process (software GL) ${r.gpu_cpu === null ? 'not found' : pct(r.gpu_cpu)}`
    + `${r.other_new_renderers_cpu.length ? `, other renderers ${r.other_new_renderers_cpu.map(pct).join(', ')}` : ''}`);
  console.log(`1 tab: ${r.trucks_on_map} trucks on the map, ${r.followed} followed, ${r.followed_with_data} live markers`);

  // 3. Ten tabs.
  // One after the other: opened together on a saturated 2-core machine (15,000
  // trucks, Kafka, two brokers), nine software-GL pages got no snapshot in 3 min.
  for (let i = 1; i < tabs; i += 1) await openTab(browser);
  await sleep(3000);
  const busy = await cpuOver(brokerPids, seconds);
  r.broker_cpu_n_tabs = sum(busy);
  r.broker_cpu_change = (r.broker_cpu_n_tabs - r.broker_cpu_0_tabs) / r.broker_cpu_0_tabs;
  console.log(`brokers, ${tabs} tabs: ${pct(r.broker_cpu_n_tabs)} of a core (${busy.map(pct).join(' + ')}), `
    + `change ${r.broker_cpu_change >= 0 ? '+' : ''}${pct(r.broker_cpu_change)}`);
} finally {
  await browser.close();
  await rm(profile, { recursive: true, force: true });
}
r.limits = {
  ws_le_300_kb_s: r.ws_bytes_per_s <= 300 * 1024,
  renderer_lt_50pct: r.renderer_cpu !== null && r.renderer_cpu < 0.5,
  brokers_change_le_10pct: r.broker_cpu_change <= 0.1,
};
console.log(JSON.stringify(r));
if (jsonOut) await writeFile(jsonOut, `${JSON.stringify(r, null, 2)}\n`);
process.exit(Object.values(r.limits).every(Boolean) ? 0 : 1);
