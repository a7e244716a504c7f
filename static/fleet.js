// Pure logic of the fleet page, without DOM or network, so Node can test it
// (static/test/fleet.test.mjs): the binary all-trucks snapshot and its plate
// directory (format: stream-jobs/src/snapshot.rs), the fade rules for silent
// trucks, and the part of a route that lies ahead of a truck.

/** A truck silent this long is drawn faded. */
export const FADE_AFTER_S = 30;
/** A truck silent this long is no longer drawn. */
export const GONE_AFTER_S = 120;

export const SNAPSHOT_VERSION = 1;
const HEADER_LEN = 52;
const RECORD_LEN = 6;

/**
 * Decodes a `fleet/stats/snapshot` payload. Returns null when it is not a
 * well-formed v1 snapshot (a viewer must not trust the wire).
 * @param {Uint8Array} buf
 */
export function decodeSnapshot(buf) {
  if (!(buf instanceof Uint8Array) || buf.length < HEADER_LEN || buf[0] !== SNAPSHOT_VERSION) return null;
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const epoch = dv.getUint32(4, true);
  const count = dv.getUint32(8, true);
  if (buf.length !== HEADER_LEN + count * RECORD_LEN) return null;
  const ts = Number(dv.getBigInt64(12, true));
  const lonMin = dv.getFloat64(20, true);
  const latMin = dv.getFloat64(28, true);
  const lonMax = dv.getFloat64(36, true);
  const latMax = dv.getFloat64(44, true);
  if (![lonMin, latMin, lonMax, latMax].every(Number.isFinite)) return null;
  const lon = new Float64Array(count);
  const lat = new Float64Array(count);
  const age = new Uint8Array(count);
  const flags = new Uint8Array(count);
  for (let i = 0, o = HEADER_LEN; i < count; i++, o += RECORD_LEN) {
    lon[i] = lonMin + ((lonMax - lonMin) * dv.getUint16(o, true)) / 65535;
    lat[i] = latMin + ((latMax - latMin) * dv.getUint16(o + 2, true)) / 65535;
    age[i] = buf[o + 4];
    flags[i] = buf[o + 5];
  }
  return { epoch, count, ts, lon, lat, age, flags };
}

/** Stopped bit of a snapshot record's flags. */
export const isStoppedFlag = (f) => (f & 1) === 1;

/**
 * Encodes a snapshot exactly as the `fleet-snapshot` job does (used by the
 * test double of the broker and by the round-trip test).
 * @param {{epoch:number, ts:number, trucks:{lon:number, lat:number, age:number, stopped:boolean, sector:number}[]}} s
 */
export function encodeSnapshot({ epoch, ts, trucks }) {
  let b = [Infinity, Infinity, -Infinity, -Infinity];
  for (const t of trucks) b = [Math.min(b[0], t.lon), Math.min(b[1], t.lat), Math.max(b[2], t.lon), Math.max(b[3], t.lat)];
  if (!trucks.length) b = [0, 0, 1e-6, 1e-6];
  b[2] = Math.max(b[2], b[0] + 1e-6);
  b[3] = Math.max(b[3], b[1] + 1e-6);
  const buf = new Uint8Array(HEADER_LEN + trucks.length * RECORD_LEN);
  const dv = new DataView(buf.buffer);
  buf[0] = SNAPSHOT_VERSION;
  dv.setUint32(4, epoch, true);
  dv.setUint32(8, trucks.length, true);
  dv.setBigInt64(12, BigInt(Math.round(ts)), true);
  b.forEach((v, i) => dv.setFloat64(20 + 8 * i, v, true));
  const scale = (v, lo, hi) => Math.max(0, Math.min(65535, Math.round(((v - lo) / (hi - lo)) * 65535)));
  trucks.forEach((t, i) => {
    const o = HEADER_LEN + i * RECORD_LEN;
    dv.setUint16(o, scale(t.lon, b[0], b[2]), true);
    dv.setUint16(o + 2, scale(t.lat, b[1], b[3]), true);
    buf[o + 4] = Math.max(0, Math.min(255, Math.floor(t.age)));
    buf[o + 5] = t.stopped ? 1 : (t.sector & 7) << 1;
  });
  return buf;
}

/**
 * Decodes a `fleet/stats/plates` payload: {epoch, plates} or null.
 * @param {Uint8Array} buf
 */
export function decodePlates(buf) {
  if (!(buf instanceof Uint8Array) || buf.length < 12 || buf[0] !== SNAPSHOT_VERSION) return null;
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const epoch = dv.getUint32(4, true);
  const count = dv.getUint32(8, true);
  const text = new TextDecoder().decode(buf.subarray(12));
  const plates = count === 0 ? [] : text.split('\n');
  if (plates.length !== count) return null;
  return { epoch, plates };
}

/** Encodes a plate directory (test double and tests). */
export function encodePlates(epoch, plates) {
  const body = new TextEncoder().encode(plates.join('\n'));
  const buf = new Uint8Array(12 + body.length);
  const dv = new DataView(buf.buffer);
  buf[0] = SNAPSHOT_VERSION;
  dv.setUint32(4, epoch, true);
  dv.setUint32(8, plates.length, true);
  buf.set(body, 12);
  return buf;
}

/** 'live', 'silent' (drawn faded) or 'gone' (not drawn) after `silentS` seconds without news. */
export function fadeState(silentS) {
  if (silentS >= GONE_AFTER_S) return 'gone';
  if (silentS >= FADE_AFTER_S) return 'silent';
  return 'live';
}

/**
 * Picks up to `n` plates to follow from a directory and the snapshot of the
 * same epoch: trucks that are moving and reported within the last 5 s,
 * spread evenly over the slots (slots follow first sight, so this spreads
 * them over the fleet rather than taking the first depot).
 */
export function pickFollow(plates, snap, n, exclude = new Set()) {
  if (!snap || !plates || n <= 0) return [];
  const ok = [];
  const m = Math.min(plates.length, snap.count);
  for (let i = 0; i < m; i++) {
    if (snap.age[i] <= 5 && !isStoppedFlag(snap.flags[i]) && !exclude.has(plates[i])) ok.push(plates[i]);
  }
  if (ok.length <= n) return ok;
  const out = [];
  for (let k = 0; k < n; k++) out.push(ok[Math.floor((k * ok.length) / n)]);
  return out;
}

/**
 * Parses a `trucks/<plate>/route` message: {"v":1,"plate":..,"ts_ms":..,"coords":[[lon,lat],..]}
 * (the route the truck drives now, in GeoJSON order). Null when malformed.
 */
export function parseRoute(payload) {
  let m;
  try {
    m = JSON.parse(typeof payload === 'string' ? payload : new TextDecoder().decode(payload));
  } catch {
    return null;
  }
  if (!m || !Array.isArray(m.coords) || m.coords.length < 2) return null;
  const coords = m.coords.filter(
    (c) => Array.isArray(c) && c.length >= 2 && Number.isFinite(c[0]) && Number.isFinite(c[1]),
  );
  if (coords.length < 2) return null;
  return { plate: typeof m.plate === 'string' ? m.plate : null, ts: Number(m.ts_ms) || 0, coords };
}

/**
 * The part of `coords` ahead of the point (lon, lat): from the closest point
 * on the route (projected onto its nearest segment) to the end. Distances in
 * a local equirectangular frame, enough at truck scale.
 */
export function routeAhead(coords, lon, lat) {
  if (!coords || coords.length < 2) return [];
  const k = Math.cos((lat * Math.PI) / 180);
  let best = 0;
  let bestD = Infinity;
  let bestP = coords[0];
  for (let i = 0; i + 1 < coords.length; i++) {
    const [ax, ay] = coords[i];
    const [bx, by] = coords[i + 1];
    const dx = (bx - ax) * k;
    const dy = by - ay;
    const len2 = dx * dx + dy * dy;
    let t = len2 > 0 ? (((lon - ax) * k) * dx + (lat - ay) * dy) / len2 : 0;
    t = Math.max(0, Math.min(1, t));
    const px = ax + (bx - ax) * t;
    const py = ay + (by - ay) * t;
    const d = ((lon - px) * k) ** 2 + (lat - py) ** 2;
    if (d < bestD) {
      bestD = d;
      best = i;
      bestP = [px, py];
    }
  }
  return [bestP, ...coords.slice(best + 1)];
}
