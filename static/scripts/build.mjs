// Copies the browser builds of our npm dependencies into static/vendor/ and
// converts Natural Earth countries (world-atlas) into a clipped Mediterranean
// GeoJSON in static/data/. Everything the page loads is then served by the ui
// binary: nothing comes from a CDN at run time.
//
// Usage: npm run build   (after npm ci)

import { mkdir, copyFile, readFile, writeFile, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { feature } from 'topojson-client';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const nm = join(root, 'node_modules');
const vendor = join(root, 'vendor');
const data = join(root, 'data');

// MapLibre 6 is ESM-only and loads its worker relative to the main module,
// so all three .mjs files must sit side by side.
const copies = [
  ['maplibre-gl/dist/maplibre-gl.mjs', 'maplibre-gl/maplibre-gl.mjs'],
  ['maplibre-gl/dist/maplibre-gl-worker.mjs', 'maplibre-gl/maplibre-gl-worker.mjs'],
  ['maplibre-gl/dist/maplibre-gl-shared.mjs', 'maplibre-gl/maplibre-gl-shared.mjs'],
  ['maplibre-gl/dist/maplibre-gl.css', 'maplibre-gl/maplibre-gl.css'],
  ['maplibre-gl/LICENSE.txt', 'maplibre-gl/LICENSE.txt'],
  // MQTT.js browser bundle (ESM, includes its own Buffer/process shims).
  ['mqtt/dist/mqtt.esm.js', 'mqtt/mqtt.esm.js'],
  ['mqtt/LICENSE.md', 'mqtt/LICENSE.md'],
];

// Longitude/latitude box around Italy and the central Mediterranean. Polygons
// are clipped to it so e.g. Russia does not ship in full.
const BOX = { w: -12, s: 28, e: 40, n: 56 };

async function exists(p) {
  try { await stat(p); return true; } catch { return false; }
}

// Sutherland–Hodgman clipping of one ring against one box edge.
function clipEdge(ring, inside, cut) {
  const out = [];
  for (let i = 0; i < ring.length; i++) {
    const cur = ring[i];
    const prev = ring[(i + ring.length - 1) % ring.length];
    const ci = inside(cur), pi = inside(prev);
    if (ci) {
      if (!pi) out.push(cut(prev, cur));
      out.push(cur);
    } else if (pi) {
      out.push(cut(prev, cur));
    }
  }
  return out;
}

function clipRing(ring) {
  const lerpX = (x) => (a, b) => [x, a[1] + ((b[1] - a[1]) * (x - a[0])) / (b[0] - a[0])];
  const lerpY = (y) => (a, b) => [a[0] + ((b[0] - a[0]) * (y - a[1])) / (b[1] - a[1]), y];
  let r = ring.slice(0, -1); // open ring
  r = clipEdge(r, (p) => p[0] >= BOX.w, lerpX(BOX.w));
  r = clipEdge(r, (p) => p[0] <= BOX.e, lerpX(BOX.e));
  r = clipEdge(r, (p) => p[1] >= BOX.s, lerpY(BOX.s));
  r = clipEdge(r, (p) => p[1] <= BOX.n, lerpY(BOX.n));
  if (r.length < 3) return null;
  r = r.map(([x, y]) => [Math.round(x * 1e4) / 1e4, Math.round(y * 1e4) / 1e4]);
  r.push(r[0]);
  return r;
}

function clipPolygon(rings) {
  const outer = clipRing(rings[0]);
  if (!outer) return null;
  return [outer, ...rings.slice(1).map(clipRing).filter(Boolean)];
}

function clipGeometry(g) {
  if (!g) return null;
  const polys = g.type === 'Polygon' ? [g.coordinates] : g.type === 'MultiPolygon' ? g.coordinates : [];
  const kept = polys.map(clipPolygon).filter(Boolean);
  if (kept.length === 0) return null;
  return kept.length === 1 ? { type: 'Polygon', coordinates: kept[0] } : { type: 'MultiPolygon', coordinates: kept };
}

async function main() {
  for (const [from, to] of copies) {
    const src = join(nm, from);
    if (!(await exists(src))) throw new Error(`missing ${src}: run npm ci first`);
    const dst = join(vendor, to);
    await mkdir(dirname(dst), { recursive: true });
    await copyFile(src, dst);
  }

  const topo = JSON.parse(await readFile(join(nm, 'world-atlas/countries-50m.json'), 'utf8'));
  const fc = feature(topo, topo.objects.countries);
  const features = [];
  for (const f of fc.features) {
    const geometry = clipGeometry(f.geometry);
    if (geometry) features.push({ type: 'Feature', properties: { name: f.properties?.name ?? '' }, geometry });
  }
  await mkdir(data, { recursive: true });
  const out = join(data, 'countries.geojson');
  await writeFile(out, JSON.stringify({
    type: 'FeatureCollection',
    attribution: 'Natural Earth (public domain) via world-atlas',
    features,
  }));
  const size = (await stat(out)).size;
  console.log(`vendor: ${copies.length} files; ${out}: ${features.length} countries, ${(size / 1024).toFixed(0)} KB`);
  if (!(await exists(join(data, 'italy-regions.geojson')))) {
    console.log('note: data/italy-regions.geojson missing; run `npm run regions` (needs Python 3)');
  }
}

main().catch((e) => {
  console.error(e.message);
  process.exit(1);
});
