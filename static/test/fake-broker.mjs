// Test double for the Lodestream broker's MQTT-over-WebSocket listener, so the
// page can be exercised in a browser before (or without) the real broker.
//
// It speaks just enough MQTT 5 (via mqtt-packet, the codec MQTT.js uses):
// CONNECT with username/password check, SUBSCRIBE, PINGREQ, DISCONNECT, and it
// applies the same authorization the real broker will: the viewer identity may
// subscribe but not publish (QoS 1 PUBLISH → PUBACK reason 0x87). It simulates
// `trucks` trucks that report once per second, and publishes direction stats
// on fleet/stats/directions like the `directions` job, the binary all-trucks
// snapshot and plate directory like the `fleet-snapshot` job (encoded by
// static/fleet.js), and on a subscription to trucks/<plate>/route a route
// ahead of that truck, as truck-sim does (retained).
//
// Only listens on 127.0.0.1. Usable standalone: node test/fake-broker.mjs [port] [trucks]

import http from 'node:http';
import mqttPacket from 'mqtt-packet';
import { WebSocketServer } from 'ws';
import { encodePlates, encodeSnapshot } from '../fleet.js';

const SECTORS = ['N', 'NE', 'E', 'SE', 'S', 'SW', 'W', 'NW'];
const NOT_AUTHORIZED = 0x87;
const BAD_CREDENTIALS = 0x86;

function topicMatches(filter, topic) {
  const f = filter.split('/');
  const t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= t.length) return false;
    if (f[i] !== '+' && f[i] !== t[i]) return false;
  }
  return f.length === t.length;
}

// Deterministic PRNG so screenshots are comparable between runs.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

// Rough land boxes of Italy so most trucks start on land.
const BOXES = [
  [7.6, 44.7, 12.1, 45.8], // Po valley
  [11.1, 42.3, 13.4, 43.5], // centre
  [14.6, 40.7, 16.4, 41.4], // south
  [16.1, 38.7, 16.5, 39.5], // Calabria
  [13.1, 37.35, 14.7, 37.85], // Sicily
  [8.7, 39.6, 9.4, 40.6], // Sardinia
];

export function startFakeBroker({ port = 0, trucks = 2000, username = 'viewer', password = 'viewer' } = {}) {
  const rand = rng(42);
  const fleet = [];
  for (let i = 0; i < trucks; i++) {
    const b = BOXES[i % BOXES.length];
    const letters = 'ABCDEF';
    const az = 'ABCDEFGHJKLMNPRSTVWXYZ';
    const plate =
      letters[Math.floor(rand() * 6)] + letters[Math.floor(rand() * 6)] +
      String(100 + Math.floor(rand() * 900)) +
      az[Math.floor(rand() * az.length)] + az[Math.floor(rand() * az.length)] + (i % 10);
    fleet.push({
      plate,
      lat: b[1] + rand() * (b[3] - b[1]),
      lon: b[0] + rand() * (b[2] - b[0]),
      heading: rand() * 360,
      speed: 60 + rand() * 30,
      resting: rand() < 0.08,
    });
  }

  const clients = new Set();
  const stats = { connects: 0, refusedPublishes: 0, sent: 0 };

  function send(c, packet) {
    if (c.ws.readyState !== 1) return;
    c.ws.send(mqttPacket.generate(packet, { protocolVersion: c.version }));
  }

  function deliver(topic, payload) {
    for (const c of clients) {
      if (!c.connected) continue;
      if (c.filters.some((f) => topicMatches(f, topic))) {
        send(c, { cmd: 'publish', topic, payload, qos: 0, retain: false });
        stats.sent++;
      }
    }
  }

  const server = http.createServer((_, res) => {
    res.writeHead(404);
    res.end();
  });
  const wss = new WebSocketServer({
    server,
    path: '/mqtt',
    handleProtocols: (protocols) => (protocols.has('mqtt') ? 'mqtt' : false),
  });
  wss.on('connection', (ws) => {
    const c = { ws, version: 5, connected: false, filters: [] };
    clients.add(c);
    // Start with a v5 parser; a 3.1.1 CONNECT is still parsed correctly.
    const parser = mqttPacket.parser({ protocolVersion: 5 });
    parser.on('error', () => ws.close());
    parser.on('packet', (p) => {
      switch (p.cmd) {
        case 'connect': {
          c.version = p.protocolVersion;
          stats.connects++;
          const ok = p.username === username && String(p.password ?? '') === password;
          if (c.version === 5) send(c, { cmd: 'connack', sessionPresent: false, reasonCode: ok ? 0 : BAD_CREDENTIALS });
          else send(c, { cmd: 'connack', sessionPresent: false, returnCode: ok ? 0 : 4 });
          if (!ok) ws.close();
          c.connected = ok;
          break;
        }
        case 'subscribe':
          c.filters.push(...p.subscriptions.map((s) => s.topic));
          send(c, {
            cmd: 'suback',
            messageId: p.messageId,
            granted: p.subscriptions.map(() => 0),
          });
          for (const { topic } of p.subscriptions) {
            const m = /^trucks\/([^/+#]+)\/route$/.exec(topic);
            const t = m && fleet.find((x) => x.plate === m[1]);
            if (t) send(c, { cmd: 'publish', topic, payload: JSON.stringify(routeOf(t)), qos: 0, retain: true });
          }
          break;
        case 'unsubscribe':
          c.filters = c.filters.filter((f) => !p.unsubscriptions.includes(f));
          send(c, { cmd: 'unsuback', messageId: p.messageId, granted: p.unsubscriptions.map(() => 0) });
          break;
        case 'publish':
          // The viewer may not publish anything.
          stats.refusedPublishes++;
          if (p.qos === 1) {
            if (c.version === 5) send(c, { cmd: 'puback', messageId: p.messageId, reasonCode: NOT_AUTHORIZED });
            else ws.close(); // 3.1.1 has no negative PUBACK: disconnect
          } else if (p.qos === 2) {
            send(c, { cmd: 'pubrec', messageId: p.messageId, reasonCode: NOT_AUTHORIZED });
          }
          break;
        case 'pingreq':
          send(c, { cmd: 'pingresp' });
          break;
        case 'disconnect':
          ws.close();
          break;
        default:
          break;
      }
    });
    ws.on('message', (data) => parser.parse(Buffer.from(data)));
    ws.on('close', () => clients.delete(c));
    ws.on('error', () => {});
  });

  // Each truck reports once per second; spread over 10 slices of 100 ms.
  let slice = 0;
  let seconds = 0;
  // 20 km ahead along the heading, bending a little: what truck-sim's route message looks like.
  const routeOf = (t) => {
    const coords = [[t.lon, t.lat]];
    let [lon, lat, h] = [t.lon, t.lat, t.heading];
    for (let k = 0; k < 20; k++) {
      lat += 0.009 * Math.cos((h * Math.PI) / 180);
      lon += (0.009 * Math.sin((h * Math.PI) / 180)) / Math.cos((lat * Math.PI) / 180);
      h += 4;
      coords.push([lon, lat]);
    }
    return { v: 1, plate: t.plate, ts_ms: Date.now(), coords };
  };
  const tick = setInterval(() => {
    const now = Date.now();
    for (let i = slice; i < fleet.length; i += 10) {
      const t = fleet[i];
      if (!t.resting) {
        const d = (t.speed / 3600) * 1 * 0.009 * 4; // a bit faster than life so movement is visible
        t.lat += d * Math.cos((t.heading * Math.PI) / 180);
        t.lon += (d * Math.sin((t.heading * Math.PI) / 180)) / Math.cos((t.lat * Math.PI) / 180);
        t.heading = (t.heading + (rand() - 0.5) * 6 + 360) % 360;
      }
      const next = {
        lat: t.lat + 0.02 * Math.cos((t.heading * Math.PI) / 180),
        lon: t.lon + 0.02 * Math.sin((t.heading * Math.PI) / 180),
      };
      const msg = {
        v: 1, plate: t.plate, lat: t.lat, lon: t.lon, next,
        speed_kmh: t.resting ? 0 : t.speed, heading_deg: t.heading,
        ts: new Date(now).toISOString(), ts_ms: now, state: t.resting ? 'resting' : 'driving',
      };
      deliver(`trucks/${t.plate}`, JSON.stringify(msg));
    }
    slice = (slice + 1) % 10;
    if (slice === 0) {
      const counts = Object.fromEntries([...SECTORS, 'stopped'].map((k) => [k, 0]));
      for (const t of fleet) {
        if (t.resting) counts.stopped++;
        else counts[SECTORS[Math.floor(((t.heading + 22.5) % 360) / 45)]]++;
      }
      deliver('fleet/stats/directions', JSON.stringify({ v: 1, ts_ms: now, counts, trucks: fleet.length }));
      const sector = (t) => Math.floor(((t.heading + 22.5) % 360) / 45);
      const snapTrucks = fleet.map((t) => ({ lon: t.lon, lat: t.lat, age: 0, stopped: t.resting, sector: sector(t) }));
      deliver('fleet/stats/snapshot', Buffer.from(encodeSnapshot({ epoch: 1, ts: now, trucks: snapTrucks })));
      if (seconds++ % 5 === 0) deliver('fleet/stats/plates', Buffer.from(encodePlates(1, fleet.map((t) => t.plate))));
    }
  }, 100);

  return new Promise((resolve) => {
    server.listen(port, '127.0.0.1', () => {
      const addr = server.address();
      resolve({
        port: addr.port,
        url: `ws://127.0.0.1:${addr.port}/mqtt`,
        stats,
        close: () =>
          new Promise((r) => {
            clearInterval(tick);
            for (const c of clients) c.ws.terminate();
            wss.close();
            server.close(() => r());
          }),
      });
    });
  });
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const b = await startFakeBroker({ port: Number(process.argv[2] || 18083), trucks: Number(process.argv[3] || 2000) });
  console.log(`fake broker on ${b.url}`);
}
