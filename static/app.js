// Lodestream fleet demo page.
//
// Map: MapLibre with an offline GeoJSON basemap (Natural Earth countries +
// Italian regions) served by the ui binary; online raster tiles only when
// asked for with ?tiles=URL. Data: MQTT over WebSocket (MQTT.js) with the
// read-only identity injected by the server: trucks/+ positions and the
// fleet/stats/directions snapshots computed by the `directions` Kafka job.
//
// window.__lodestream exposes the page state for the browser test.

// MapLibre 6 ESM has named exports only (no default).
import * as maplibregl from './vendor/maplibre-gl/maplibre-gl.mjs';
import mqtt from './vendor/mqtt/mqtt.esm.js';

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
    followCount: Number(cfg.follow) || 15,
    follow,
    tiles: q.get('tiles') || cfg.tiles || null,
  };
}

const cfg = readConfig();

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
  followed: [],
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
    all: { type: 'geojson', data: { type: 'FeatureCollection', features: [] } },
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
    id: 'all-trucks',
    type: 'circle',
    source: 'all',
    layout: { visibility: 'none' },
    paint: {
      'circle-radius': ['interpolate', ['linear'], ['zoom'], 5, 1.6, 10, 4],
      'circle-color': ['case', ['get', 'stopped'], '#8a8f96', '#d35400'],
      'circle-opacity': 0.75,
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
});
map.on('error', (e) => console.warn('map error', e && e.error ? e.error.message : e));

// ---------------------------------------------------------------- trucks

/** plate -> latest position {lat, lon, next, speed, heading, state, ts} */
const trucks = new Map();
/** plate -> followed marker state */
const followed = new Map();
let selected = null;
let autoFollow = cfg.follow.length === 0;

for (const plate of cfg.follow) follow(plate, false);

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
    const f = { plate, el, marker: new maplibregl.Marker({ element: el, subpixelPositioning: true }), on: false, from: null, to: null, t0: 0, dur: 1 };
    followed.set(plate, f);
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
  trucks.set(plate, t);
  if (!prev) L.trucksSeen = trucks.size;
  if (autoFollow && !followed.has(plate) && followed.size < cfg.followCount) follow(plate, false);
  const f = followed.get(plate);
  if (f) {
    place(f, t, false);
    followedDirty = true;
  }
  allDirty = true;
}

// ---------------------------------------------------------------- sidebar

const $ = (id) => document.getElementById(id);
let followedDirty = true;
let allDirty = false;

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
    info.textContent = t ? (isStopped(t) ? 'stopped' : `${Math.round(t.speed || 0)} km/h`) : '—';
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

// Once a second: rates, ages, sidebar list and the all-trucks layer.
let lastMsgs = 0;
let lastTick = performance.now();
setInterval(() => {
  // Timers fire late on a busy page: divide by the time that really passed.
  const now = performance.now();
  const secs = Math.max(0.001, (now - lastTick) / 1000);
  L.msgsPerSec = Math.round((L.msgs - lastMsgs) / secs);
  lastMsgs = L.msgs;
  lastTick = now;
  $('fig-seen').textContent = L.trucksSeen.toLocaleString('en-US');
  $('fig-rate').textContent = L.msgsPerSec.toLocaleString('en-US');
  if (L.lastStats && typeof L.lastStats.ts_ms === 'number') {
    const age = Math.max(0, Math.round((Date.now() - L.lastStats.ts_ms) / 1000));
    $('stats-age').textContent = age <= 1 ? 'live' : `${age}s ago`;
  }
  if (followedDirty) renderFollowed();
  if (allDirty && showAll) pushAll();
}, 1000);

let showAll = false;
function pushAll() {
  const src = map.getSource('all');
  if (!src) return;
  const features = [];
  for (const [plate, t] of trucks) {
    features.push({
      type: 'Feature',
      properties: { plate, stopped: isStopped(t) },
      geometry: { type: 'Point', coordinates: [t.lon, t.lat] },
    });
  }
  src.setData({ type: 'FeatureCollection', features });
  allDirty = false;
}
$('toggle-all').addEventListener('change', (e) => {
  showAll = e.target.checked;
  if (map.getLayer('all-trucks')) map.setLayoutProperty('all-trucks', 'visibility', showAll ? 'visible' : 'none');
  if (showAll) pushAll();
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

map.on('click', () => select(null));

// ---------------------------------------------------------------- MQTT

let client = null;
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
    client.subscribe(
      [`${cfg.prefix}+`, cfg.statsTopic],
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
    if (topic === cfg.statsTopic) onStats(payload);
    else if (topic.startsWith(cfg.prefix)) onTruck(topic, payload);
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
