// The two README screenshots, taken from a running demo (scripts/compose-check does it against
// the compose run): the whole country, then zoomed in on a followed truck.
//
// Usage: node test/screenshots.mjs URL OUT_COUNTRY.png OUT_TRUCK.png [--settle-ms N] [--truck-zoom Z]
//   --truck-zoom Z  zoom of the followed-truck picture (default 14: city streets; about 9 shows
//                   the route ahead among the roads of a region)
// Env: CHROMIUM (default /usr/bin/chromium). Exit 1 when the page shows no live trucks.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import puppeteer from 'puppeteer-core';

const [url, outCountry, outTruck] = process.argv.slice(2);
const opt = (name, def) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : def;
};
const settleMs = opt('--settle-ms', 8000);
const truckZoom = opt('--truck-zoom', 14);
if (!url || !outCountry || !outTruck) {
  console.error('usage: node test/screenshots.mjs URL OUT_COUNTRY.png OUT_TRUCK.png [--settle-ms N] [--truck-zoom Z]');
  process.exit(2);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const profile = await mkdtemp(join(tmpdir(), 'lodestream-shots-'));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--no-first-run',
    '--disable-background-networking', `--user-data-dir=${profile}`, '--window-size=1400,900'],
  defaultViewport: { width: 1400, height: 900 },
});
let status = 0;
try {
  const page = await browser.newPage();
  await page.goto(url, { waitUntil: 'load', timeout: 60_000 });
  await page.waitForFunction(() => window.__lodestream && window.__lodestream.ready, { timeout: 90_000 });
  await page.waitForFunction(() => window.__lodestream.trucksSeen > 0 && window.__lodestream.followed.length > 0,
    { timeout: 60_000 });
  // Let every truck report at least once and the stats panel fill in.
  await sleep(settleMs);
  await page.evaluate(() => window.__lodestream.showItaly());
  await sleep(1500);
  await page.screenshot({ path: outCountry });
  // The followed truck with the most roads drawn around it (not one on a ferry at sea).
  const candidates = await page.evaluate(() => window.__lodestream.followed.slice(0, 6));
  let plate = candidates[0];
  let most = -1;
  for (const p of candidates) {
    await page.evaluate((q, z) => window.__lodestream.focus(q, z), p, truckZoom);
    await sleep(1500);
    const roads = await page.evaluate(() => window.__lodestream.renderedCount('roads'));
    if (roads > most) [plate, most] = [p, roads];
  }
  await page.evaluate((p, z) => window.__lodestream.focus(p, z), plate, truckZoom);
  await sleep(3000);
  await page.screenshot({ path: outTruck });
  const st = await page.evaluate(() => ({ trucks: window.__lodestream.trucksSeen, followed: window.__lodestream.followed.length }));
  console.log(`screenshots: ${outCountry} (${st.trucks} trucks), ${outTruck} (following ${plate})`);
} catch (e) {
  console.error(`screenshots failed: ${e.message}`);
  status = 1;
} finally {
  await browser.close();
  await rm(profile, { recursive: true, force: true });
}
process.exit(status);
