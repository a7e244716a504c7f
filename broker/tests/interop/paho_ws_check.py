"""Checks the broker's WebSocket listener with Eclipse paho-mqtt 2.x
(transport="websockets", path /mqtt), MQTT 3.1.1 and 5.0: SUBSCRIBE QoS 1,
PUBLISH QoS 1, and the message coming back through Kafka.

Usage: paho_ws_check.py PORT TOPIC_PREFIX
Prints "ok ws v311" and "ok ws v5"; exits non-zero with a message on the
first failed expectation.
"""
import sys
import threading

import paho.mqtt.client as mqtt

port = int(sys.argv[1])
prefix = sys.argv[2]


def fail(msg):
    print("FAIL:", msg, flush=True)
    sys.exit(1)


def client(label, role, protocol):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"paho-ws-{role}-{label}-{prefix}",
        protocol=protocol,
        transport="websockets",
    )
    c.ws_set_options(path="/mqtt")
    return c


def run(protocol, label):
    topic = f"{prefix}/{label}/ws"
    connected = threading.Event()
    subscribed = threading.Event()
    arrived = threading.Event()
    got = []
    problems = []

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code != 0:
            problems.append(f"connect refused {reason_code}")
        connected.set()

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        if [int(rc.value) for rc in reason_codes] != [1]:
            problems.append(f"SUBACK {reason_codes}, want granted QoS 1")
        subscribed.set()

    def on_message(c, userdata, msg):
        got.append(msg)
        arrived.set()

    sub = client(label, "sub", protocol)
    sub.on_connect = on_connect
    sub.on_subscribe = on_subscribe
    sub.on_message = on_message
    sub.connect("127.0.0.1", port, keepalive=30)
    sub.loop_start()
    if not connected.wait(10):
        fail(f"{label}: no CONNACK over websockets")
    if problems:
        fail(f"{label}: {problems}")
    sub.subscribe(f"{prefix}/{label}/#", qos=1)
    if not subscribed.wait(10):
        fail(f"{label}: no SUBACK")
    if problems:
        fail(f"{label}: {problems}")

    pub = client(label, "pub", protocol)
    pub.connect("127.0.0.1", port, keepalive=30)
    pub.loop_start()
    info = pub.publish(topic, f"hello over websockets {label}", qos=1)
    info.wait_for_publish(10)
    if not info.is_published():
        fail(f"{label}: QoS 1 publish not acknowledged")
    if not arrived.wait(15):
        fail(f"{label}: message did not come back")
    m = got[0]
    if m.topic != topic or m.payload != f"hello over websockets {label}".encode() or m.qos != 1:
        fail(f"{label}: got {m.topic} {m.payload!r} QoS {m.qos}")
    pub.disconnect()
    sub.disconnect()
    pub.loop_stop()
    sub.loop_stop()
    print(f"ok ws {label}", flush=True)


run(mqtt.MQTTv311, "v311")
run(mqtt.MQTTv5, "v5")
