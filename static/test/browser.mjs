// Browser test of the fleet page: loads the page served by the ui binary in
// headless Debian Chromium (software GL), checks the offline map renders and
// the MQTT state, and saves a screenshot.
//
// Usage: node test/browser.mjs [URL] [--expect-broker] [--fake-broker PORT] [--out PATH] [--wait-ms N]
//   URL              page to load (default http://127.0.0.1:8080/)
//   --expect-broker  a broker + truck-sim + directions job are running: expect
//                    live trucks and stats, and a refused test publish.
//                    Without it, expect a graceful connection failure.
//   --fake-broker P  start test/fake-broker.mjs on 127.0.0.1:P first (the ui
//                    must have been started with that WebSocket URL); implies
//                    --expect-broker.
//   --out PATH       screenshot path (default ../target/ui-screenshot.png)
//   --wait-ms N      extra time to let markers move before the screenshot
//   --trucks N       fleet size: every truck must be on the map (>= 95%) and the
//                    tab must receive at most 300 KB/s
//   --route-as URL,USER,PASS  with --expect-broker: if no followed truck has a
//                    route ahead within 10 s (truck-sim publishes them retained on
//                    trucks/<plate>/route), publish one for the first followed truck
//                    with this MQTT identity, in the documented format, and clear it after.
//   --expect-throughput  the ui scrapes broker metrics: the panel's figures must be > 0
// Env: CHROMIUM (default /usr/bin/chromium).
// Ends with a "N passed, N failed" line; exit code 1 on any failure.

import { mkdtemp, rm, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';
import mqtt from 'mqtt';
import { startFakeBroker } from './fake-broker.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const argv = process.argv.slice(2);
const flag = (name) => argv.includes(name);
const opt = (name, def) => {
  const i = argv.indexOf(name);
  return i >= 0 && i + 1 < argv.length ? argv[i + 1] : def;
};
const url = argv.find((a) => /^https?:\/\//.test(a)) || 'http://127.0.0.1:8080/';
const fakePort = opt('--fake-broker', null);
const expectBroker = flag('--expect-broker') || fakePort !== null;
const out = resolve(opt('--out', join(here, '../../target/ui-screenshot.png')));
const extraWait = Number(opt('--wait-ms', expectBroker ? '4000' : '0'));
const fleetSize = Number(opt('--trucks', '0'));
const routeAs = opt('--route-as', null);
const expectThroughput = flag('--expect-throughput');

let passed = 0;
let failed = 0;
function check(name, ok, detail = '') {
  if (ok) passed++;
  else failed++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${detail ? ` — ${detail}` : ''}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Issue 16: roads, all trucks from the snapshot, 15 followed live, route ahead, fading, throughput, bytes/s. */
async function checkMapWorthWatching(page) {
  const L = () => page.evaluate(() => ({ ...window.__lodestream, tryPublish: undefined }));
  // Roads around a followed truck (it drives on one), whatever the dataset's extent.
  await page.evaluate(() => window.__lodestream.focus(window.__lodestream.followed[0], 12));
  await page.waitForFunction(() => typeof window.__lodestream.roads === 'number' && window.__lodestream.roads > 0, { timeout: 20_000 }).catch(() => {});
  await sleep(1500);
  const roads = await page.evaluate(() => [window.__lodestream.roads, window.__lodestream.renderedCount('roads')]);
  await page.evaluate(() => window.__lodestream.showItaly());
  if (process.env.LODESTREAM_UI_ROADS) {
    check('roads layer drawn under the trucks (from the OSRM dataset)', roads[0] > 0 && roads[1] > 0, `${roads[0]} roads, ${roads[1]} drawn in view`);
  } else {
    console.log(`skip: roads check (no LODESTREAM_UI_ROADS; scripts/osrm-local prepare makes one); page says: ${roads[0]}`);
  }

  await page.waitForFunction(() => window.__lodestream.snapshots >= 2, { timeout: 20_000 }).catch(() => {});
  // The view just changed (showItaly): the dots are counted from a frame drawn at the new zoom,
  // which under software GL and load can take a few seconds to come. The count is the one of
  // the first frame that has dots: a second sample taken later races the next snapshot's tile
  // reload (one a second), a likely cause of a CI failure with 150 trucks in the snapshot,
  // tiles loaded and the view on them, but 0 counted (not reproduced in 4,000 samples of a
  // bare map under load, so the report below also says what the source's tiles hold).
  const countDots = () => page.waitForFunction(() => {
    const n = window.__lodestream.renderedCount('all-trucks');
    return n > 0 ? n : false;
  }, { timeout: 15_000, polling: 100 }).then((h) => h.jsonValue(), () => 0);
  let dots = await countDots();
  // Seen in CI on the Monaco demo right after start, and twice here after a 2,000-truck run:
  // no frame with dots in 15 s. Count again once the map is idle, and say what the layer had
  // to draw and what its source's tiles hold.
  if (dots === 0) {
    await page.evaluate(() => window.__lodestream.idle());
    dots = await countDots();
  }
  let s = await L();
  const view = dots > 0 ? '' : ` ${JSON.stringify(await page.evaluate(() => window.__lodestream.snapshotView()))}`;
  const enough = fleetSize ? s.snapshotTrucks >= fleetSize * 0.95 : s.snapshotTrucks > 0;
  check('every truck on the map from the snapshot', enough && dots > 0, `${s.snapshotTrucks} in the snapshot${fleetSize ? ` of ${fleetSize}` : ''}, ${dots} dots drawn, ${s.snapshots} snapshots${view}`);

  await page.waitForFunction(
    () => window.__lodestream.followed.length >= window.__lodestream.config.followCount,
    { timeout: 20_000 },
  ).catch(() => {});
  s = await L();
  const live = await page.evaluate(() => document.querySelectorAll('.truck').length);
  check(`${s.config.followCount} followed trucks, live (own topics)`, s.followed.length === s.config.followCount && live >= s.config.followCount - 1,
    `${s.followed.length} followed, ${live} markers`);

  // Route ahead: truck-sim's retained trucks/<plate>/route, or one this test publishes.
  await page.waitForFunction(() => window.__lodestream.routesDrawn > 0, { timeout: 10_000 }).catch(() => {});
  let published = null;
  if ((await L()).routesDrawn === 0 && routeAs) published = await publishRoute(page);
  if (published) await page.waitForFunction(() => window.__lodestream.routesDrawn > 0, { timeout: 15_000 }).catch(() => {});
  s = await L();
  // Counted from the first frame that draws a route, as the dots above: a single sample races
  // the routes' setData each second (CI: 15 routes, 0 counted).
  const routeDrawn = await page.waitForFunction(() => {
    const n = window.__lodestream.renderedCount('route-line');
    return n > 0 ? n : false;
  }, { timeout: 10_000, polling: 100 }).then((h) => h.jsonValue(), () => 0);
  check('a followed truck shows its route ahead', s.routesDrawn > 0 && routeDrawn > 0,
    `${s.routesDrawn} routes, ${routeDrawn} drawn${published ? ` (test route published for ${published.plate})` : ''}`);
  if (published) await published.clear();

  // Fading: followed trucks after 30 s / 2 min of silence ...
  const plate = s.followed[s.followed.length - 1];
  const f30 = await page.evaluate((p) => window.__lodestream.simulateSilence(p, 31), plate);
  const f120 = await page.evaluate((p) => window.__lodestream.simulateSilence(p, 121), plate);
  check('a followed truck silent 30 s fades, after 2 min its marker goes',
    f30 && f30.fade === 'silent' && f30.silentClass && f30.markerOnMap && f120.fade === 'gone' && !f120.markerOnMap,
    `${JSON.stringify(f30)} ${JSON.stringify(f120)}`);
  // ... and the all-trucks layer: ages from the snapshot.
  await page.evaluate(() => {
    window.__lodestream.injectSnapshot([
      { lon: 12.0, lat: 42.5, age: 0, stopped: false },
      { lon: 12.6, lat: 42.0, age: 45, stopped: false },
      { lon: 13.0, lat: 41.8, age: 130, stopped: true },
    ]);
  });
  await sleep(1200);
  const inj = await page.evaluate(() => [window.__lodestream.renderedCount('all-trucks'), window.__lodestream.snapshotFaded]);
  await page.evaluate(() => window.__lodestream.resumeSnapshots());
  check('snapshot dots: silent 30 s drawn faded, 2 min gone', inj[0] === 2 && inj[1] === 2, `${inj[0]} of 3 drawn, ${inj[1]} faded`);

  if (expectThroughput) {
    await page.waitForFunction(() => window.__lodestream.throughput && window.__lodestream.throughput.mqtt_in_per_s > 0, { timeout: 15_000 }).catch(() => {});
    const t = (await L()).throughput || {};
    const shown = await page.$$eval('[id^="tp-"]', (els) => els.map((e) => e.textContent));
    check('throughput panel: MQTT in/out, Kafka records/s and lag shown, rates > 0',
      t.mqtt_in_per_s > 0 && t.mqtt_out_per_s > 0 && t.kafka_written_per_s > 0 && t.kafka_read_per_s > 0 && t.consumer_lag >= 0
        && shown.every((x) => x !== '–'), `${JSON.stringify(t)} shown ${shown.join(' | ')}`);
  }
  if (fleetSize) {
    await sleep(3000);
    const bps = (await L()).bytesPerSec;
    check('one tab receives at most 300 KB/s', bps > 0 && bps <= 300 * 1024, `${(bps / 1024).toFixed(1)} KB/s (page counter)`);
  }
}

/** Publishes a retained route for the first followed truck, as truck-sim documents it. */
async function publishRoute(page) {
  const [url, username, password] = routeAs.split(',');
  const t = await page.evaluate(() => {
    const p = window.__lodestream.followed[0];
    return { plate: p, pos: window.__lodestream.position(p) };
  });
  if (!t.pos) return null;
  const { lon, lat, next } = t.pos;
  const n = next || { lon: lon + 0.01, lat: lat + 0.01 };
  const coords = [[lon, lat], [n.lon, n.lat]];
  for (let k = 1; k <= 10; k++) coords.push([n.lon + (n.lon - lon) * k, n.lat + (n.lat - lat) * k + 0.002 * k]);
  const topic = `trucks/${t.plate}/route`;
  const c = await mqtt.connectAsync(url, { protocolVersion: 5, username, password, reconnectPeriod: 0, connectTimeout: 10_000 });
  await c.publishAsync(topic, JSON.stringify({ v: 1, plate: t.plate, ts_ms: Date.now(), coords }), { qos: 1, retain: true });
  return {
    plate: t.plate,
    clear: async () => {
      await c.publishAsync(topic, '', { qos: 1, retain: true });
      await c.endAsync();
    },
  };
}

const fake = fakePort !== null ? await startFakeBroker({ port: Number(fakePort) }) : null;
if (fake) console.log(`fake broker on ${fake.url}`);

const profile = await mkdtemp(join(tmpdir(), 'lodestream-chromium-'));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--use-angle=swiftshader',
    '--enable-unsafe-swiftshader',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
    `--user-data-dir=${profile}`,
    '--window-size=1400,900',
  ],
  defaultViewport: { width: 1400, height: 900 },
});

const pageErrors = [];
const badResponses = [];
const consoleErrors = [];
try {
  const page = await browser.newPage();
  page.on('pageerror', (e) => pageErrors.push(String(e.message || e)));
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  page.on('response', (r) => {
    // Same-origin assets must all load: the page fetches nothing else.
    if (r.url().startsWith(new URL(url).origin) && r.status() >= 400) badResponses.push(`${r.status()} ${r.url()}`);
  });
  const started = Date.now();
  await page.goto(url, { waitUntil: 'load', timeout: 60_000 });

  await page.waitForFunction(() => window.__lodestream && window.__lodestream.ready, { timeout: 90_000 }).catch(() => {});
  const readyMs = Date.now() - started;
  const ready = await page.evaluate(() => !!(window.__lodestream && window.__lodestream.ready));
  check('map style and offline basemap loaded', ready, `${readyMs} ms`);

  // Did the basemap actually draw? Look for the land colour in the canvas.
  const land = await page.evaluate(() => {
    const c = document.querySelector('#map canvas');
    if (!c) return { found: false };
    const gl = c.getContext('webgl2', { preserveDrawingBuffer: true }) || c.getContext('webgl');
    return { found: true, w: c.width, h: c.height, gl: !!gl };
  });
  check('map canvas present', land.found, JSON.stringify(land));

  // Connection: either live (with a broker) or a graceful failure.
  await page
    .waitForFunction(() => window.__lodestream.connected || window.__lodestream.connectError, { timeout: 30_000 })
    .catch(() => {});
  const st = await page.evaluate(() => ({ ...window.__lodestream, tryPublish: undefined }));
  const pill = await page.$eval('#conn', (e) => ({ cls: e.className, text: e.textContent }));

  if (expectBroker) {
    check('connected to the broker over WebSocket', st.connected, st.connectError || '');
    await page.waitForFunction(() => window.__lodestream.trucksSeen > 0, { timeout: 30_000 }).catch(() => {});
    await page.waitForFunction(() => window.__lodestream.statsReceived > 0, { timeout: 30_000 }).catch(() => {});
    await new Promise((r) => setTimeout(r, extraWait));
    const s2 = await page.evaluate(() => ({ ...window.__lodestream, tryPublish: undefined }));
    check('truck positions received', s2.trucksSeen > 0, `trucksSeen=${s2.trucksSeen} msgs=${s2.msgs} msgs/s=${s2.msgsPerSec}`);
    check('direction stats received', s2.statsReceived > 0, JSON.stringify(s2.lastStats));
    check('followed trucks', s2.followed.length > 0, s2.followed.join(','));
    const markers = await page.$$eval('.truck', (els) => els.length);
    check('truck markers on the map', markers > 0, `${markers} markers`);
    // Smooth movement: between two consecutive animation frames a followed
    // marker moves, and is drawn where its truck's last report is not (on its
    // way there). A marker that jumped to each report would always sit on the
    // latest one; one that is not animated would not move between frames.
    // Frames, not a fixed time: software GL under load draws only a few a
    // second, and then a new report arrives between almost any two frames.
    await page.evaluate(() => window.__lodestream.focus(window.__lodestream.followed[0], 13));
    await new Promise((r) => setTimeout(r, 800));
    const glide = await page.evaluate(async () => {
      const L = window.__lodestream;
      const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
      const same = (a, b) => a[0] === b[0] && a[1] === b[1];
      let best = { moved: 0, of: 0, pairs: 0, frameMs: 0 };
      const t0 = performance.now();
      for (let n = 1; n <= 10 && performance.now() - t0 < 10_000; n++) {
        await frame();
        const a = new Map(L.markerLngLats());
        const ta = performance.now();
        await frame();
        const frameMs = Math.round(performance.now() - ta);
        const b = L.markerLngLats();
        const moved = b.filter(([p, q]) => {
          const r = L.position(p);
          return a.has(p) && !same(a.get(p), q) && r && !same([r.lon, r.lat], q);
        }).length;
        best = { moved, of: b.length, pairs: n, frameMs };
        if (moved > 0) break;
      }
      return best;
    });
    check('followed markers glide between updates', glide.moved > 0,
      `${glide.moved}/${glide.of} moved between two frames and sit between reports (${glide.pairs} pair(s), ${glide.frameMs} ms a frame)`);
    const pub = await page.evaluate(() => window.__lodestream.tryPublish());
    check('broker refuses a publish from the read-only identity', pub.denied === true, pub.reason);
    // For the screenshot: all-trucks layer on, one truck selected (waypoint line).
    await page.evaluate(() => window.__lodestream.showItaly());
    // The all-trucks layer is on by default; make sure it is (an earlier run's state does not persist, but be explicit).
    await page.$eval('#toggle-all', (e) => { if (!e.checked) e.click(); });
    const first = await page.$('.truck:not(.stopped)');
    if (first) await first.click();
    await page.evaluate(() => window.__lodestream.showItaly());
    await new Promise((r) => setTimeout(r, 1500));
    // Markers must sit on their trucks: compare marker centres with the
    // projected positions of the same trucks.
    const off = await page.evaluate(() => window.__lodestream.markerOffsets());
    check('markers are drawn at their trucks\' positions', off.length > 0 && Math.max(...off) < 25, `max offset ${Math.max(...off).toFixed(1)} px over ${off.length}`);
    const wp = await page.evaluate(() => document.querySelectorAll('.truck.sel').length);
    check('clicking a truck selects it (waypoint line)', wp === 1);
    await checkMapWorthWatching(page);
  } else {
    check('reports the connection failure', !st.connected && !!st.connectError, st.connectError || '');
    check('status pill shows the failure', pill.cls.includes('conn-failed'), pill.text);
    const pub = await page.evaluate(() => window.__lodestream.tryPublish());
    check('test publish reports "not connected" without a broker', pub.denied === null, pub.reason);
  }
  check('no uncaught page errors', pageErrors.length === 0, pageErrors.join(' | '));
  check('all same-origin requests succeeded', badResponses.length === 0, badResponses.join(' | '));
  if (consoleErrors.length) console.log(`console errors (not failures): ${consoleErrors.slice(0, 5).join(' | ')}`);

  await mkdir(dirname(out), { recursive: true });
  await page.screenshot({ path: out });
  console.log(`screenshot: ${out}`);
} finally {
  await browser.close();
  if (fake) {
    console.log(`fake broker: ${fake.stats.sent} messages sent, ${fake.stats.refusedPublishes} publishes refused`);
    await fake.close();
  }
  await rm(profile, { recursive: true, force: true });
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
