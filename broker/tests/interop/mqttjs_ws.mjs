// Checks the broker's WebSocket listener with MQTT.js (the `mqtt` npm
// package, as browsers and Node services use it): MQTT 5 over ws://,
// SUBSCRIBE QoS 1, PUBLISH QoS 1 with properties, and the message coming
// back through Kafka.
//
// Usage: node mqttjs_ws.mjs URL TOPIC_PREFIX
//   e.g. node mqttjs_ws.mjs ws://127.0.0.1:1893/mqtt js-1234
// Prints "ok mqttjs" and exits 0, or prints "FAIL: ..." and exits 1.
// Needs `npm ci` in this directory (package-lock.json pins mqtt).
import mqtt from "mqtt";

const [url, prefix] = process.argv.slice(2);
if (!url || !prefix) {
  console.log("FAIL: usage: node mqttjs_ws.mjs URL TOPIC_PREFIX");
  process.exit(2);
}

function fail(msg) {
  console.log(`FAIL: ${msg}`);
  process.exit(1);
}

// Whatever happens, never hang the calling test.
const watchdog = setTimeout(() => fail("timed out after 20 s"), 20_000);

const client = await mqtt
  .connectAsync(url, {
    protocolVersion: 5,
    clientId: `mqttjs-${prefix}`,
    clean: true,
    keepalive: 30,
    connectTimeout: 10_000,
    reconnectPeriod: 0,
  })
  .catch((e) => fail(`connect: ${e.message}`));

const topic = `${prefix}/js/1`;
const arrived = new Promise((resolve) => {
  client.on("message", (t, payload, packet) => {
    if (t === topic) resolve({ payload: payload.toString(), packet });
  });
});

const granted = await client
  .subscribeAsync(`${prefix}/#`, { qos: 1 })
  .catch((e) => fail(`subscribe: ${e.message}`));
if (granted.length !== 1 || granted[0].qos !== 1) {
  fail(`SUBACK: expected granted QoS 1, got ${JSON.stringify(granted)}`);
}

const puback = await client
  .publishAsync(topic, "hello from mqtt.js", {
    qos: 1,
    properties: {
      contentType: "text/plain",
      userProperties: { origin: "mqttjs" },
    },
  })
  .catch((e) => fail(`publish: ${e.message}`));
if (puback && puback.reasonCode !== undefined && puback.reasonCode !== 0) {
  fail(`PUBACK reason code ${puback.reasonCode}`);
}

const { payload, packet } = await arrived;
if (payload !== "hello from mqtt.js") fail(`payload ${JSON.stringify(payload)}`);
if (packet.qos !== 1) fail(`delivered with QoS ${packet.qos}, want 1`);
const props = packet.properties || {};
if (props.contentType !== "text/plain") fail(`content type lost: ${JSON.stringify(props)}`);
if (!props.userProperties || props.userProperties.origin !== "mqttjs") {
  fail(`user property lost: ${JSON.stringify(props)}`);
}

await client.endAsync();
clearTimeout(watchdog);
console.log("ok mqttjs");
