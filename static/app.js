// Lodestream fleet demo page.
//
// Map: MapLibre with an offline GeoJSON basemap (Natural Earth countries +
// Italian regions) and the roads OSRM routes on (/data/roads.geojson, made at
// data-prepare time), served by the ui binary; online raster tiles only when
// asked for with ?tiles=URL. Data: MQTT over WebSocket (MQTT.js) with the
// read-only identity injected by the server:
//   * fleet/stats/snapshot: every truck once a second in ~6 bytes (the
//     `fleet-snapshot` job), drawn as a WebGL circle layer, plus its plate
//     directory fleet/stats/plates;
//   * trucks/<plate> and trucks/<plate>/route only for the followed trucks;
//   * fleet/stats/directions from the `directions` Kafka job.
// So a tab receives about 100 KB/s at 15,000 trucks instead of several MB/s.
// Throughput figures come from the ui server (/throughput.json), which
// scrapes the brokers' /metrics.
//
// window.__lodestream exposes the page state for the browser test.

// MapLibre 6 ESM has named exports only (no default).
import * as maplibregl from './vendor/maplibre-gl/maplibre-gl.mjs';
import mqtt from './vendor/mqtt/mqtt.esm.js';
import {
  decodePlates, decodeSnapshot, encodeSnapshot, fadeState, isStoppedFlag, parseRoute, pickFollow, routeAhead, GONE_AFTER_S,
} from './fleet.js';

const SECTORS = ['N', 'NE', 'E', 'SE', 'S', 'SW', 'W', 'NW'];
const ITALY_BOUNDS = [[6.0, 36.3], [19.0, 47.2]];

function readConfig() {
  const el = document.getElementById('lodestream-config');
  let cfg = {};
  try {
    cfg = JSON.parse(el ? el.textContent : '{}');
  } catch (e) {
    console.error('bad config', e);
  }
  const q = new URLSearchParams(location.search);
  const follow = (q.get('follow') || '')
    .split(',')
    .map((p) => p.trim().toUpperCase())
    .filter(Boolean);
  return {
    // Deliberately not overridable from the URL: a crafted link must not send
    // even the public viewer identity to another host.
    mqttUrl: cfg.mqtt_url || 'ws://localhost:8083/mqtt',
    username: cfg.mqtt_username || undefined,
    password: cfg.mqtt_password || undefined,
    prefix: cfg.topic_prefix || 'trucks/',
    statsTopic: cfg.stats_topic || 'fleet/stats/directions',
    snapshotTopic: cfg.snapshot_topic || 'fleet/stats/snapshot',
    platesTopic: cfg.plates_topic || 'fleet/stats/plates',
    followCount: Number(cfg.follow) || 15,
    follow,
    tiles: q.get('tiles') || cfg.tiles || null,
  };
}

const cfg = readConfig();
/** The MQTT.js client, once created (declared first: follow() uses it). */
let client = null;

// State read by the browser test (and handy in the devtools console).
const L = (window.__lodestream = {
  ready: false, // map style + basemap GeoJSON loaded
  connected: false,
  connectError: null, // last connection error text, if any
  trucksSeen: 0,
  msgs: 0,
  msgsPerSec: 0,
  badMsgs: 0,
  statsReceived: 0,
  lastStats: null,
  pauseSnapshots: false,
  followed: [],
  snapshots: 0, // all-trucks snapshots received
  snapshotTrucks: 0, // trucks in the last snapshot (all drawn)
  snapshotFaded: 0, // of which silent >= 30 s (drawn faded)
  platesEpoch: null,
  roads: null, // number of road features drawn, or an error text
  routesDrawn: 0, // followed trucks with their route ahead on the map
  bytes: 0, // MQTT bytes received by this tab
  bytesPerSec: 0,
  throughput: null, // last /throughput.json
  silentFollowed: [], // followed plates silent >= 30 s (faded)
  goneFollowed: [], // followed plates silent >= 2 min (marker removed)
  publishDenied: null, // null = not tried, true/false after tryPublish()
  publishResult: null,
  config: { ...cfg, password: cfg.password ? '***' : undefined },
  tryPublish: null,
});

// ---------------------------------------------------------------- map

const style = {
  version: 8,
  sources: {
    countries: {
      type: 'geojson',
      data: '/static/data/countries.geojson',
      attribution: 'Natural Earth',
    },
    regions: {
      type: 'geojson',
      data: '/static/data/italy-regions.geojson',
      attribution: 'openpolis/ISTAT CC-BY-4.0',
    },
    roads: { type: 'geojson', data: { type: 'FeatureCollection', features: [] }, attribution: '© OpenStreetMap contributors (ODbL) / ISTAT' },
    all: { type: 'geojson', data: { type: 'FeatureCollection', features: [] } },
    route: { type: 'geojson', data: { type: 'FeatureCollection', features: [] } },
    waypoint: { type: 'geojson', data: { type: 'FeatureCollection', features: [] } },
  },
  layers: [
    { id: 'sea', type: 'background', paint: { 'background-color': '#b8d5e8' } },
    {
      id: 'countries-fill',
      type: 'fill',
      source: 'countries',
      paint: {
        'fill-color': ['match', ['get', 'name'], 'Italy', '#fbfaf6', '#ebe8df'],
      },
    },
    { id: 'regions-fill', type: 'fill', source: 'regions', paint: { 'fill-color': '#fbfaf6' } },
    {
      id: 'regions-line',
      type: 'line',
      source: 'regions',
      paint: { 'line-color': '#b9b2a3', 'line-width': 0.8, 'line-dasharray': [3, 2] },
    },
    {
      id: 'countries-line',
      type: 'line',
      source: 'countries',
      paint: { 'line-color': '#9c9484', 'line-width': 1 },
    },
    {
      // Roads under the trucks; property c: 0 motorway .. 5 other, 6 ferry.
      id: 'roads',
      type: 'line',
      source: 'roads',
      layout: { 'line-cap': 'round', 'line-join': 'round' },
      paint: {
        'line-color': ['match', ['get', 'c'], 0, '#d9a441', 1, '#e0b86a', 6, '#7fa6c4', '#c9c2b4'],
        'line-width': ['interpolate', ['linear'], ['zoom'], 5, ['match', ['get', 'c'], 0, 1.4, 1, 1.1, 0.5], 12,
          ['match', ['get', 'c'], 0, 5, 1, 4, 2.5]],
        'line-dasharray': ['match', ['get', 'c'], 6, ['literal', [2, 2]], ['literal', [1, 0]]],
      },
    },
  ],
};

if (cfg.tiles) {
  // Optional online raster tiles, drawn over the offline basemap.
  style.sources.tiles = {
    type: 'raster',
    tiles: [cfg.tiles],
    tileSize: 256,
    attribution: '© OpenStreetMap contributors (ODbL)',
  };
  style.layers.push({ id: 'tiles', type: 'raster', source: 'tiles' });
}
style.layers.push(
  {
    // Every truck, from the snapshot. a = seconds since its last record:
    // faded from 30 s, gone at 2 min (the job drops it then too).
    id: 'all-trucks',
    type: 'circle',
    source: 'all',
    filter: ['<', ['get', 'a'], GONE_AFTER_S],
    paint: {
      'circle-radius': ['interpolate', ['linear'], ['zoom'], 5, 1.6, 10, 4],
      'circle-color': ['case', ['get', 'st'], '#8a8f96', '#d35400'],
      'circle-opacity': ['interpolate', ['linear'], ['get', 'a'], 29, 0.8, 30, 0.3, GONE_AFTER_S, 0.08],
    },
  },
  {
    id: 'route-line',
    type: 'line',
    source: 'route',
    layout: { 'line-cap': 'round', 'line-join': 'round' },
    paint: {
      'line-color': ['case', ['get', 'sel'], '#e67e22', '#0b6bcb'],
      'line-width': ['case', ['get', 'sel'], 4, 2],
      'line-opacity': ['case', ['get', 'sel'], 0.95, 0.55],
    },
  },
  {
    id: 'waypoint-line',
    type: 'line',
    source: 'waypoint',
    paint: { 'line-color': '#e67e22', 'line-width': 3, 'line-dasharray': [2, 1] },
  },
  {
    id: 'waypoint-dot',
    type: 'circle',
    source: 'waypoint',
    filter: ['==', ['geometry-type'], 'Point'],
    paint: { 'circle-radius': 5, 'circle-color': '#fff', 'circle-stroke-color': '#e67e22', 'circle-stroke-width': 2 },
  },
);

const map = new maplibregl.Map({
  container: 'map',
  style,
  bounds: ITALY_BOUNDS,
  fitBoundsOptions: { padding: 10 },
  attributionControl: false,
  maxZoom: 16,
});
map.addControl(new maplibregl.NavigationControl({ showCompass: false }), 'top-left');
map.addControl(new maplibregl.ScaleControl({ unit: 'metric' }), 'bottom-left');
map.addControl(
  new maplibregl.AttributionControl({
    compact: false,
    // Routes of the simulated trucks come from OpenStreetMap data.
    customAttribution: '© OpenStreetMap contributors (ODbL)',
  }),
  'bottom-right',
);

map.on('load', () => {
  // 'load' fires once the style and the first GeoJSON tiles are in.
  L.ready = true;
  document.body.dataset.mapReady = '1';
  loadRoads();
});

/** Roads are fetched here (not by the source) so a missing file is reported, not silent. */
async function loadRoads() {
  try {
    const r = await fetch('/data/roads.geojson');
    if (!r.ok) throw new Error(`${r.status} ${(await r.text()).slice(0, 80)}`);
    const gj = await r.json();
    map.getSource('roads').setData(gj);
    L.roads = Array.isArray(gj.features) ? gj.features.length : 0;
  } catch (e) {
    L.roads = `no roads: ${e && e.message ? e.message : e}`;
    console.warn(L.roads);
  }
}
map.on('error', (e) => console.warn('map error', e && e.error ? e.error.message : e));

// ---------------------------------------------------------------- trucks

/** plate -> latest position {lat, lon, next, speed, heading, state, ts} of a followed truck */
const trucks = new Map();
/** plate -> route the truck drives now ([[lon, lat], ..]), from trucks/<plate>/route */
const routes = new Map();
/** Latest snapshot and the plate directories by epoch (the last few). */
let snap = null;
const directories = new Map();
/** plate -> followed marker state */
const followed = new Map();
let selected = null;
let autoFollow = cfg.follow.length === 0;

function plateOf(topic, msg) {
  if (msg && typeof msg.plate === 'string' && msg.plate) return msg.plate.toUpperCase();
  return topic.slice(cfg.prefix.length).toUpperCase();
}

function isStopped(t) {
  return t.state === 'resting' || (typeof t.speed === 'number' && t.speed < 1);
}

function follow(plate, fly) {
  plate = plate.toUpperCase();
  if (!followed.has(plate)) {
    const el = document.createElement('div');
    el.className = 'truck';
    el.innerHTML = '<div class="arrow"></div><div class="plate"></div>';
    el.querySelector('.plate').textContent = plate;
    el.title = `Truck ${plate}`;
    el.addEventListener('click', (ev) => {
      ev.stopPropagation();
      select(plate);
    });
    const f = { plate, el, marker: new maplibregl.Marker({ element: el, subpixelPositioning: true }), on: false, from: null, to: null, t0: 0, dur: 1, heardAt: Date.now(), fade: 'live' };
    followed.set(plate, f);
    subscribeFollowed([plate]);
    const t = trucks.get(plate);
    if (t) place(f, t, true);
    renderFollowed();
  }
  if (fly) {
    const t = trucks.get(plate);
    if (t) map.flyTo({ center: [t.lon, t.lat], zoom: Math.max(map.getZoom(), 9) });
  }
  L.followed = [...followed.keys()];
}

function unfollow(plate) {
  const f = followed.get(plate);
  if (!f) return;
  f.marker.remove();
  followed.delete(plate);
  trucks.delete(plate);
  routes.delete(plate);
  if (client && client.connected) client.unsubscribe(followTopics([plate]));
  if (selected === plate) select(null);
  L.followed = [...followed.keys()];
  followedDirty = true;
}

/** The live topics of followed trucks: position and route ahead. */
function followTopics(plates) {
  return plates.flatMap((p) => [`${cfg.prefix}${p}`, `${cfg.prefix}${p}/route`]);
}

function subscribeFollowed(plates) {
  if (!client || !client.connected || !plates.length) return;
  client.subscribe(followTopics(plates), { qos: 0 }, (err, granted) => {
    const refused = (granted || []).filter((g) => g.qos >= 0x80);
    if (err || refused.length) console.warn('follow subscription refused', err || refused);
  });
}

/** Start a smooth move of a followed marker towards the truck's new position. */
function place(f, t, jump) {
  const now = performance.now();
  const cur = f.on ? currentPos(f, now) : [t.lon, t.lat];
  // Glide over about one update interval so markers keep moving between
  // messages instead of jumping (trucks publish every 0.5–2 s).
  const gap = f.lastAt ? now - f.lastAt : 1000;
  f.lastAt = now;
  f.from = jump ? [t.lon, t.lat] : cur;
  f.to = [t.lon, t.lat];
  f.t0 = now;
  f.dur = Math.min(3000, Math.max(250, gap));
  if (!f.on) {
    f.marker.setLngLat(f.to).addTo(map);
    f.on = true;
  }
  f.heardAt = Date.now();
  f.el.classList.toggle('stopped', isStopped(t));
  if (typeof t.heading === 'number') f.el.querySelector('.arrow').style.transform = `rotate(${t.heading}deg)`;
}

function currentPos(f, now) {
  const k = Math.min(1, (now - f.t0) / f.dur);
  return [f.from[0] + (f.to[0] - f.from[0]) * k, f.from[1] + (f.to[1] - f.from[1]) * k];
}

function animate() {
  const now = performance.now();
  for (const f of followed.values()) {
    if (f.on && now - f.t0 <= f.dur + 50) f.marker.setLngLat(currentPos(f, now));
  }
  if (selected) updateWaypoint();
  requestAnimationFrame(animate);
}
requestAnimationFrame(animate);

function select(plate) {
  selected = selected === plate ? null : plate;
  for (const f of followed.values()) f.el.classList.toggle('sel', f.plate === selected);
  renderFollowed();
  updateWaypoint();
  if (selected) {
    const t = trucks.get(selected);
    if (t) map.easeTo({ center: [t.lon, t.lat] });
  }
}

let lastWaypointKey = '';
function updateWaypoint() {
  const src = map.getSource('waypoint');
  if (!src) return;
  const t = selected && trucks.get(selected);
  const f = selected && followed.get(selected);
  if (!t || !t.next || !f || !f.on) {
    if (lastWaypointKey !== '') {
      src.setData({ type: 'FeatureCollection', features: [] });
      lastWaypointKey = '';
    }
    return;
  }
  const pos = currentPos(f, performance.now());
  const key = `${pos[0].toFixed(5)},${pos[1].toFixed(5)},${t.next.lon},${t.next.lat}`;
  if (key === lastWaypointKey) return;
  lastWaypointKey = key;
  const nxt = [t.next.lon, t.next.lat];
  src.setData({
    type: 'FeatureCollection',
    features: [
      { type: 'Feature', properties: {}, geometry: { type: 'LineString', coordinates: [pos, nxt] } },
      { type: 'Feature', properties: {}, geometry: { type: 'Point', coordinates: nxt } },
    ],
  });
}

function onTruck(topic, payload) {
  let m;
  try {
    m = JSON.parse(new TextDecoder().decode(payload));
  } catch {
    L.badMsgs++;
    return;
  }
  if (!m || typeof m.lat !== 'number' || typeof m.lon !== 'number') {
    L.badMsgs++;
    return;
  }
  const plate = plateOf(topic, m);
  const prev = trucks.get(plate);
  // Same rule as the Kafka job: an older event time never overwrites a newer one.
  if (prev && typeof m.ts_ms === 'number' && prev.ts > m.ts_ms) return;
  const t = {
    lat: m.lat,
    lon: m.lon,
    next: m.next && typeof m.next.lat === 'number' ? m.next : null,
    speed: m.speed_kmh,
    heading: m.heading_deg,
    state: m.state,
    ts: m.ts_ms || Date.now(),
  };
  const f = followed.get(plate);
  if (!f) return; // only followed trucks are subscribed; a late message after unfollow
  trucks.set(plate, t);
  place(f, t, false);
  followedDirty = true;
}

function onRoute(topic, payload) {
  const plate = topic.slice(cfg.prefix.length, -'/route'.length).toUpperCase();
  // An empty (retained) payload means the truck has no route now: it rests or waits for one.
  if (payload.length === 0) {
    routes.delete(plate);
    routesDirty = true;
    return;
  }
  const r = parseRoute(payload);
  if (!r || !followed.has(plate)) {
    if (!r) L.badMsgs++;
    return;
  }
  routes.set(plate, r.coords);
  routesDirty = true;
}

/** The route ahead of every followed truck that has one; the selected one drawn bold. */
let routesDirty = false;
function pushRoutes() {
  const src = map.getSource('route');
  if (!src) return;
  const features = [];
  for (const [plate, coords] of routes) {
    const f = followed.get(plate);
    const t = trucks.get(plate);
    if (!f || !f.on || !t) continue;
    const pos = currentPos(f, performance.now());
    const ahead = routeAhead(coords, pos[0], pos[1]);
    if (ahead.length < 2) continue;
    features.push({ type: 'Feature', properties: { plate, sel: plate === selected }, geometry: { type: 'LineString', coordinates: ahead } });
  }
  src.setData({ type: 'FeatureCollection', features });
  L.routesDrawn = features.length;
  routesDirty = false;
}

// ---------------------------------------------------------------- all trucks (snapshot)

function onSnapshot(payload) {
  const s = decodeSnapshot(payload);
  if (!s) {
    L.badMsgs++;
    return;
  }
  // Two job instances may publish the same second twice: keep the newest.
  if (L.pauseSnapshots || (snap && s.ts < snap.ts)) return;
  snap = s;
  L.snapshots++;
  L.snapshotTrucks = s.count;
  L.trucksSeen = s.count;
  const features = new Array(s.count);
  let faded = 0;
  for (let i = 0; i < s.count; i++) {
    if (s.age[i] >= 30) faded++;
    features[i] = {
      type: 'Feature',
      id: i,
      properties: { s: i, a: s.age[i], st: isStoppedFlag(s.flags[i]) },
      geometry: { type: 'Point', coordinates: [s.lon[i], s.lat[i]] },
    };
  }
  L.snapshotFaded = faded;
  const src = map.getSource('all');
  if (src && showAll) src.setData({ type: 'FeatureCollection', features });
  autoFollowFromSnapshot();
}

function onPlates(payload) {
  const d = decodePlates(payload);
  if (!d) {
    L.badMsgs++;
    return;
  }
  directories.set(d.epoch, d.plates);
  // Keep the last few epochs: a snapshot may still refer to the previous one.
  for (const e of directories.keys()) if (directories.size > 3 && e !== d.epoch) directories.delete(e);
  L.platesEpoch = d.epoch;
  autoFollowFromSnapshot();
}

/** Plate of snapshot slot i, when the directory of the snapshot's epoch is known. */
function plateOfSlot(i) {
  const plates = snap && directories.get(snap.epoch);
  return plates && i < plates.length ? plates[i] : null;
}

function autoFollowFromSnapshot() {
  if (!autoFollow || !snap || followed.size >= cfg.followCount) return;
  const plates = directories.get(snap.epoch);
  if (!plates) return;
  for (const p of pickFollow(plates, snap, cfg.followCount - followed.size, new Set(followed.keys()))) follow(p, false);
}

// ---------------------------------------------------------------- sidebar

const $ = (id) => document.getElementById(id);
let followedDirty = true;

function renderFollowed() {
  const ul = $('followed');
  ul.replaceChildren();
  for (const plate of followed.keys()) {
    const t = trucks.get(plate);
    const li = document.createElement('li');
    li.className = (plate === selected ? 'sel ' : '') + (t ? '' : 'nodata');
    const name = document.createElement('span');
    name.textContent = plate;
    const info = document.createElement('span');
    const fade = followed.get(plate).fade;
    if (fade !== 'live') li.classList.add(fade);
    info.textContent = fade !== 'live' && t ? fade : t ? (isStopped(t) ? 'stopped' : `${Math.round(t.speed || 0)} km/h`) : '—';
    li.append(name, info);
    li.addEventListener('click', () => {
      follow(plate, true);
      select(plate);
    });
    ul.append(li);
  }
  followedDirty = false;
}

function setConn(kind, text) {
  const el = $('conn');
  el.className = `conn conn-${kind}`;
  el.textContent = text;
  el.title = text;
}

// Polar-area compass rose: wedge radius ∝ sqrt(count) so areas compare fairly.
const rose = $('rose');
const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  (parent || rose).append(e);
  return e;
}
for (const r of [30, 60, 90]) svg('circle', { class: 'ring', r });
const wedges = SECTORS.map((s, i) => {
  const a = (i * 45 - 90) * (Math.PI / 180);
  svg('line', { class: 'axis', x1: 0, y1: 0, x2: 92 * Math.cos(a), y2: 92 * Math.sin(a) });
  svg('text', { class: 'lbl', x: 102 * Math.cos(a), y: 102 * Math.sin(a) }).textContent = s;
  return svg('path', { class: 'wedge', d: '' });
});
svg('circle', { class: 'hub', r: 17 });
const hubN = svg('text', { class: 'hub-n', x: 0, y: -2 });
hubN.textContent = '–';
svg('text', { class: 'hub-l', x: 0, y: 9 }).textContent = 'stopped';

function wedgePath(i, r) {
  if (r <= 18) return '';
  const a0 = (i * 45 - 22.5 - 90) * (Math.PI / 180);
  const a1 = (i * 45 + 22.5 - 90) * (Math.PI / 180);
  const p = (a, rr) => `${(rr * Math.cos(a)).toFixed(2)},${(rr * Math.sin(a)).toFixed(2)}`;
  return `M${p(a0, 18)} L${p(a0, r)} A${r},${r} 0 0 1 ${p(a1, r)} L${p(a1, 18)} A18,18 0 0 0 ${p(a0, 18)} Z`;
}

function renderStats(s) {
  const c = s.counts || {};
  const max = Math.max(1, ...SECTORS.map((k) => c[k] || 0));
  SECTORS.forEach((k, i) => {
    const r = 18 + 72 * Math.sqrt((c[k] || 0) / max);
    wedges[i].setAttribute('d', wedgePath(i, r));
  });
  hubN.textContent = String(c.stopped ?? '–');
  const rows = [...SECTORS, 'stopped'];
  const maxAll = Math.max(1, ...rows.map((k) => c[k] || 0));
  const table = $('dir-table');
  table.replaceChildren();
  for (const k of rows) {
    const tr = document.createElement('tr');
    const n = c[k] || 0;
    tr.innerHTML = '<td></td><td><div class="bar"></div></td><td></td>';
    tr.children[0].textContent = k;
    const bar = tr.querySelector('.bar');
    bar.style.width = `${(100 * n) / maxAll}%`;
    if (k === 'stopped') bar.classList.add('stopped');
    tr.children[2].textContent = n.toLocaleString('en-US');
    table.append(tr);
  }
  $('fig-active').textContent = (s.trucks ?? 0).toLocaleString('en-US');
}
renderStats({ counts: {} });
$('fig-active').textContent = '–';

function onStats(payload) {
  let s;
  try {
    s = JSON.parse(new TextDecoder().decode(payload));
  } catch {
    L.badMsgs++;
    return;
  }
  if (!s || typeof s.counts !== 'object') return;
  // Snapshots are idempotent; ignore one older than what is shown.
  if (L.lastStats && typeof s.ts_ms === 'number' && s.ts_ms < L.lastStats.ts_ms) return;
  L.statsReceived++;
  L.lastStats = s;
  renderStats(s);
}

/** Followed trucks silent for 30 s fade; after 2 min their marker goes (and an auto-followed one is replaced). */
function fadeFollowed() {
  const now = Date.now();
  const silent = [];
  const gone = [];
  for (const f of [...followed.values()]) {
    const state = fadeState((now - f.heardAt) / 1000);
    if (state !== f.fade) {
      f.fade = state;
      f.el.classList.toggle('silent', state === 'silent');
      if (state === 'gone' && f.on) {
        f.marker.remove();
        f.on = false;
      }
      followedDirty = true;
    }
    if (state === 'silent') silent.push(f.plate);
    if (state === 'gone') gone.push(f.plate);
  }
  L.silentFollowed = silent;
  L.goneFollowed = gone;
  if (autoFollow) {
    for (const p of gone) unfollow(p);
    autoFollowFromSnapshot();
  }
}

const fmt = (n, digits = 0) =>
  typeof n === 'number' && Number.isFinite(n) ? n.toLocaleString('en-US', { maximumFractionDigits: digits }) : '–';

async function pollThroughput() {
  try {
    const r = await fetch('/throughput.json', { cache: 'no-store' });
    if (!r.ok) return;
    const t = await r.json();
    L.throughput = t;
    $('tp-in').textContent = fmt(t.mqtt_in_per_s);
    $('tp-out').textContent = fmt(t.mqtt_out_per_s);
    $('tp-kw').textContent = fmt(t.kafka_written_per_s);
    $('tp-kr').textContent = fmt(t.kafka_read_per_s);
    $('tp-lag').textContent = fmt(t.consumer_lag);
    $('tp-nodes').textContent = t.nodes ? `${t.nodes_up}/${t.nodes} nodes` : 'no broker metrics configured';
  } catch (e) {
    $('tp-nodes').textContent = 'ui server unreachable';
  }
}
pollThroughput();
setInterval(pollThroughput, 2000);

// Once a second: rates, ages, fading, sidebar list and routes.
let lastMsgs = 0;
let lastBytes = 0;
let lastTick = performance.now();
setInterval(() => {
  // Timers fire late on a busy page: divide by the time that really passed.
  const now = performance.now();
  const secs = Math.max(0.001, (now - lastTick) / 1000);
  L.msgsPerSec = Math.round((L.msgs - lastMsgs) / secs);
  L.bytesPerSec = Math.round((L.bytes - lastBytes) / secs);
  lastMsgs = L.msgs;
  lastBytes = L.bytes;
  lastTick = now;
  $('fig-kbps').textContent = fmt(L.bytesPerSec / 1024);
  $('fig-seen').textContent = L.trucksSeen.toLocaleString('en-US');
  $('fig-rate').textContent = L.msgsPerSec.toLocaleString('en-US');
  if (L.lastStats && typeof L.lastStats.ts_ms === 'number') {
    const age = Math.max(0, Math.round((Date.now() - L.lastStats.ts_ms) / 1000));
    $('stats-age').textContent = age <= 1 ? 'live' : `${age}s ago`;
  }
  fadeFollowed();
  if (followedDirty) renderFollowed();
  if (routes.size || routesDirty) pushRoutes();
}, 1000);

let showAll = $('toggle-all').checked;
$('toggle-all').addEventListener('change', (e) => {
  showAll = e.target.checked;
  if (map.getLayer('all-trucks')) map.setLayoutProperty('all-trucks', 'visibility', showAll ? 'visible' : 'none');
});

$('search').addEventListener('submit', (e) => {
  e.preventDefault();
  const plate = $('search-input').value.trim().toUpperCase();
  if (!/^[A-Z0-9-]{1,16}$/.test(plate)) {
    $('search-msg').textContent = 'Enter a plate (letters and digits).';
    return;
  }
  autoFollow = false; // the user now decides who is followed
  follow(plate, true);
  select(plate);
  $('search-msg').textContent = trucks.has(plate) ? '' : `${plate} not seen yet; it will appear when it reports.`;
  $('search-input').value = '';
});

// A click on a dot follows that truck (when its plate is known); elsewhere it clears the selection.
map.on('click', (e) => {
  const hit = map.getLayer('all-trucks') ? map.queryRenderedFeatures(e.point, { layers: ['all-trucks'] }) : [];
  const plate = hit.length ? plateOfSlot(hit[0].properties.s) : null;
  if (!plate) {
    select(null);
    return;
  }
  autoFollow = false;
  follow(plate, false);
  select(plate);
});
map.on('mouseenter', 'all-trucks', () => (map.getCanvas().style.cursor = 'pointer'));
map.on('mouseleave', 'all-trucks', () => (map.getCanvas().style.cursor = ''));

// ---------------------------------------------------------------- MQTT

try {
  client = mqtt.connect(cfg.mqttUrl, {
    protocolVersion: 5,
    clientId: `lodestream-ui-${Math.random().toString(16).slice(2, 10)}`,
    username: cfg.username,
    password: cfg.password,
    clean: true,
    keepalive: 30,
    connectTimeout: 10_000,
    reconnectPeriod: 5_000,
  });
} catch (e) {
  L.connectError = String(e && e.message ? e.message : e);
  setConn('failed', `MQTT: ${L.connectError}`);
}

if (client) {
  client.on('connect', () => {
    L.connected = true;
    L.connectError = null;
    setConn('connected', 'live');
    // Not trucks/+: the whole fleet comes as one snapshot a second, and only
    // the followed trucks live (see the top of this file).
    client.subscribe(
      [cfg.snapshotTopic, cfg.platesTopic, cfg.statsTopic, ...followTopics([...followed.keys()])],
      { qos: 0 },
      (err, granted) => {
        const refused = (granted || []).filter((g) => g.qos >= 0x80);
        if (err || refused.length) {
          setConn('failed', `subscribe refused: ${err ? err.message : refused.map((g) => g.topic).join(', ')}`);
        }
      },
    );
  });
  client.on('message', (topic, payload) => {
    L.msgs++;
    if (topic === cfg.snapshotTopic) onSnapshot(payload);
    else if (topic === cfg.platesTopic) onPlates(payload);
    else if (topic === cfg.statsTopic) onStats(payload);
    else if (topic.startsWith(cfg.prefix) && topic.endsWith('/route')) onRoute(topic, payload);
    else if (topic.startsWith(cfg.prefix)) onTruck(topic, payload);
  });
  // Bytes this tab receives, about: PUBLISH payload + topic + headers, other packets a few bytes.
  client.on('packetreceive', (p) => {
    L.bytes += p.cmd === 'publish' && p.payload ? p.payload.length + p.topic.length + 6 : 4;
  });
  client.on('error', (err) => {
    // Auth failures arrive as CONNACK errors; socket failures as 'error' too.
    L.connectError = String(err && err.message ? err.message : err);
    setConn('failed', `MQTT: ${L.connectError}`);
  });
  client.on('close', () => {
    const wasConnected = L.connected;
    L.connected = false;
    if (wasConnected) {
      setConn('connecting', 'reconnecting…');
      return;
    }
    // Browsers give WebSocket failures no detail: say what we know.
    if (!L.connectError) L.connectError = `cannot reach ${cfg.mqttUrl}`;
    setConn('failed', `offline: ${L.connectError} (retrying)`);
  });
  client.on('offline', () => {
    L.connected = false;
  });
}

/**
 * Tries to publish with the page's read-only identity. The broker must refuse:
 * MQTT 5 PUBACK with reason 0x87 (Not authorized) at QoS 1, or a disconnect.
 * Resolves to {denied, reason}; also stored in __lodestream.publishDenied.
 */
/** Test/debug hook: centre the map on a truck at a given zoom. */
L.focus = (plate, zoom = 12) => {
  const t = trucks.get(String(plate).toUpperCase());
  if (!t) return false;
  map.jumpTo({ center: [t.lon, t.lat], zoom });
  return true;
};

/** Test hook: pixel distance between each followed marker and its truck. */
L.markerOffsets = () => {
  const box = map.getContainer().getBoundingClientRect();
  const out = [];
  for (const f of followed.values()) {
    const t = trucks.get(f.plate);
    if (!t || !f.on) continue;
    const p = map.project([t.lon, t.lat]);
    const r = f.el.getBoundingClientRect();
    out.push(Math.hypot(r.x + r.width / 2 - box.x - p.x, r.y + r.height / 2 - box.y - p.y));
  }
  return out;
};

/**
 * Test hook: where each moving followed marker is drawn now ([lon, lat]).
 * Read as coordinates, not pixels: MapLibre rounds marker positions to whole
 * pixels, and a city truck covers a tenth of one in 120 ms at zoom 13.
 */
L.markerLngLats = () =>
  [...followed.values()]
    .filter((f) => f.on && !f.el.classList.contains('stopped'))
    .map((f) => [f.plate, f.marker.getLngLat().toArray()]);

/** Test hook: latest position of a followed truck. */
L.position = (plate) => {
  const t = trucks.get(String(plate).toUpperCase());
  return t ? { lon: t.lon, lat: t.lat, next: t.next } : null;
};

/** Test hook: features of a layer drawn in the current view. */
L.renderedCount = (layer) => (map.getLayer(layer) ? map.queryRenderedFeatures({ layers: [layer] }).length : -1);
/** Test hook: resolves once the map has drawn everything it is loading (or after `ms`). */
L.idle = (ms = 10_000) =>
  new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    map.once('idle', () => {
      clearTimeout(t);
      resolve(true);
    });
    map.triggerRepaint();
  });
/** Test hook: what the all-trucks layer has to draw, to explain a count of 0. */
L.snapshotView = () => {
  let box = null;
  let drawable = 0;
  for (let i = 0; snap && i < snap.count; i++) {
    const [x, y] = [snap.lon[i], snap.lat[i]];
    box = box ? [Math.min(box[0], x), Math.min(box[1], y), Math.max(box[2], x), Math.max(box[3], y)] : [x, y, x, y];
    if (snap.age[i] < GONE_AFTER_S) drawable++;
  }
  return {
    zoom: +map.getZoom().toFixed(2),
    view: map.getBounds().toArray().flat().map((v) => +v.toFixed(2)),
    box,
    drawable,
    showAll,
    tilesLoaded: map.areTilesLoaded(),
    inSourceTiles: map.querySourceFeatures('all').length, // 0 here: the data never reached the tiles
  };
};

/** Test hook: pretend a followed truck has been silent for `secs` seconds, then apply the fade rules. */
L.simulateSilence = (plate, secs) => {
  const f = followed.get(String(plate).toUpperCase());
  if (!f) return null;
  f.heardAt = Date.now() - secs * 1000;
  const wasAuto = autoFollow;
  autoFollow = false; // keep the plate followed so its state can be read back
  fadeFollowed();
  autoFollow = wasAuto;
  return { fade: f.fade, markerOnMap: f.on && f.el.isConnected, silentClass: f.el.classList.contains('silent') };
};

/**
 * Test hook: show a hand-made snapshot (trucks: [{lon, lat, age, stopped}]) and stop
 * live ones until resumeSnapshots(), so the fade rules of the all-trucks layer can be checked.
 */
L.injectSnapshot = (list) => {
  L.pauseSnapshots = false;
  snap = null;
  const trucks = list.map((t) => ({ sector: 0, ...t }));
  onSnapshot(encodeSnapshot({ epoch: 0, ts: Date.now(), trucks }));
  L.pauseSnapshots = true;
};
L.resumeSnapshots = () => {
  L.pauseSnapshots = false;
};

/** Test/debug hook: back to the whole of Italy. */
L.showItaly = () => map.fitBounds(ITALY_BOUNDS, { padding: 10, animate: false });

L.tryPublish = (topic = `${cfg.prefix}UITEST01`, timeoutMs = 5000) =>
  new Promise((resolve) => {
    const done = (denied, reason) => {
      L.publishDenied = denied;
      L.publishResult = reason;
      resolve({ denied, reason });
    };
    if (!client || !client.connected) {
      done(null, 'not connected');
      return;
    }
    let settled = false;
    const onClose = () => {
      if (!settled) {
        settled = true;
        done(true, 'disconnected by broker');
      }
    };
    client.once('close', onClose);
    const timer = setTimeout(() => {
      if (!settled) {
        settled = true;
        client.removeListener('close', onClose);
        done(null, 'no PUBACK within timeout');
      }
    }, timeoutMs);
    const body = JSON.stringify({ v: 1, plate: 'UITEST01', lat: 0, lon: 0, ts_ms: Date.now(), state: 'resting' });
    client.publish(topic, body, { qos: 1 }, (err) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      client.removeListener('close', onClose);
      if (err) {
        const code = typeof err.code === 'number' ? `0x${err.code.toString(16)}` : '';
        done(true, `${err.message}${code ? ` (${code})` : ''}`);
      } else {
        done(false, 'PUBACK success: the broker accepted a publish from the read-only identity');
      }
    });
  });

// ?follow=PLATES: follow these instead of picking from the snapshot (last: follow() needs the whole page set up).
for (const plate of cfg.follow) follow(plate, false);
