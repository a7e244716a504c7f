// Unit tests of static/fleet.js (pure page logic): node --test static/test/fleet.test.mjs
import test from 'node:test';
import assert from 'node:assert/strict';
import {
  decodeSnapshot, encodeSnapshot, decodePlates, encodePlates, fadeState, pickFollow,
  parseRoute, routeAhead, isStoppedFlag, FADE_AFTER_S, GONE_AFTER_S,
} from '../fleet.js';

test('snapshot round trip keeps positions within 0.0002 degree, ages and flags', () => {
  const trucks = [
    { lon: 6.6, lat: 36.6, age: 0, stopped: false, sector: 2 },
    { lon: 18.5, lat: 47.1, age: 45, stopped: true, sector: 0 },
    { lon: 12.4964, lat: 41.9028, age: 300, stopped: false, sector: 7 },
  ];
  const s = decodeSnapshot(encodeSnapshot({ epoch: 7, ts: 1_700_000_000_123, trucks }));
  assert.equal(s.epoch, 7);
  assert.equal(s.count, 3);
  assert.equal(s.ts, 1_700_000_000_123);
  trucks.forEach((t, i) => {
    assert.ok(Math.abs(s.lon[i] - t.lon) < 2e-4 && Math.abs(s.lat[i] - t.lat) < 2e-4, `truck ${i}`);
  });
  assert.deepEqual([...s.age], [0, 45, 255]);
  assert.equal(isStoppedFlag(s.flags[1]), true);
  assert.equal(s.flags[2] >> 1, 7);
});

test('malformed snapshots are refused, not half-read', () => {
  const good = encodeSnapshot({ epoch: 1, ts: 1, trucks: [{ lon: 9, lat: 45, age: 0, stopped: false, sector: 0 }] });
  assert.equal(decodeSnapshot(good.subarray(0, good.length - 1)), null, 'truncated');
  const v2 = good.slice();
  v2[0] = 2;
  assert.equal(decodeSnapshot(v2), null, 'unknown version');
  assert.equal(decodeSnapshot(new Uint8Array(10)), null, 'short');
});

test('the snapshot header and record sizes match the Rust encoder (52 + 6 bytes a truck)', () => {
  const buf = encodeSnapshot({ epoch: 1, ts: 1, trucks: Array(10).fill({ lon: 9, lat: 45, age: 0, stopped: true, sector: 0 }) });
  assert.equal(buf.length, 52 + 60);
});

test('plate directory round trip, and a count mismatch is refused', () => {
  const d = decodePlates(encodePlates(3, ['AB123CD', 'EF456GH']));
  assert.deepEqual(d, { epoch: 3, plates: ['AB123CD', 'EF456GH'] });
  assert.deepEqual(decodePlates(encodePlates(1, [])), { epoch: 1, plates: [] });
  const bad = encodePlates(3, ['A', 'B']);
  new DataView(bad.buffer).setUint32(8, 3, true);
  assert.equal(decodePlates(bad), null);
});

test('trucks fade after 30 s of silence and disappear after 2 min', () => {
  assert.equal(FADE_AFTER_S, 30);
  assert.equal(GONE_AFTER_S, 120);
  assert.equal(fadeState(0), 'live');
  assert.equal(fadeState(29.9), 'live');
  assert.equal(fadeState(30), 'silent');
  assert.equal(fadeState(119.9), 'silent');
  assert.equal(fadeState(120), 'gone');
});

test('pickFollow takes moving, recently heard trucks spread over the slots', () => {
  const plates = Array.from({ length: 100 }, (_, i) => `P${i}`);
  const trucks = plates.map((_, i) => ({ lon: 9, lat: 45, age: i % 10 === 0 ? 40 : 0, stopped: i % 10 === 1, sector: 0 }));
  const snap = decodeSnapshot(encodeSnapshot({ epoch: 1, ts: 1, trucks }));
  const got = pickFollow(plates, snap, 15, new Set(['P2']));
  assert.equal(got.length, 15);
  assert.equal(new Set(got).size, 15);
  for (const p of got) {
    const i = Number(p.slice(1));
    assert.ok(i % 10 !== 0 && i % 10 !== 1 && p !== 'P2', p);
  }
  assert.ok(Number(got[14].slice(1)) > 80, 'spread to the end of the list');
});

test('route ahead starts at the truck, projected on its segment, and keeps the rest', () => {
  const coords = [[9, 45], [9.1, 45], [9.2, 45], [9.2, 45.1]];
  const ahead = routeAhead(coords, 9.15, 45.001);
  assert.ok(Math.abs(ahead[0][0] - 9.15) < 1e-9 && Math.abs(ahead[0][1] - 45) < 1e-9);
  assert.deepEqual(ahead.slice(1), [[9.2, 45], [9.2, 45.1]]);
  assert.deepEqual(routeAhead(coords, 8.5, 45)[0], [9, 45], 'before the start: the whole route');
  assert.deepEqual(routeAhead([[1, 1]], 1, 1), []);
});

test('parseRoute accepts the documented message and refuses malformed ones', () => {
  const r = parseRoute(JSON.stringify({ v: 1, plate: 'AB123CD', ts_ms: 5, coords: [[9, 45], [9.1, 45.1]] }));
  assert.deepEqual(r, { plate: 'AB123CD', ts: 5, coords: [[9, 45], [9.1, 45.1]] });
  assert.equal(parseRoute('{"coords":[[9,45]]}'), null);
  assert.equal(parseRoute('not json'), null);
  assert.equal(parseRoute(new TextEncoder().encode('{"coords":[[9,"x"],[1]]}')), null);
});
