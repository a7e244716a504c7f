"""Checks the broker with Eclipse paho-mqtt 2.x (MQTT 3.1.1 and 5.0).

Usage: paho_check.py PORT TOPIC_PREFIX
Exits non-zero with a message on the first failed expectation.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port = int(sys.argv[1])
prefix = sys.argv[2]


def fail(msg):
    print("FAIL:", msg, flush=True)
    sys.exit(1)


def run(protocol, label):
    got = []
    subscribed = threading.Event()
    arrived = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code != 0:
            fail(f"{label}: connect refused {reason_code}")
        c.subscribe(f"{prefix}/{label}/#", qos=1)

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        subscribed.set()

    def on_message(c, userdata, msg):
        got.append(msg)
        if len(got) == 3:
            arrived.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-sub-{label}-{prefix}", protocol=protocol)
    sub.on_connect = on_connect
    sub.on_subscribe = on_subscribe
    sub.on_message = on_message
    sub.connect("127.0.0.1", port, keepalive=30)
    sub.loop_start()
    if not subscribed.wait(10):
        fail(f"{label}: no SUBACK")

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-pub-{label}-{prefix}", protocol=protocol)
    pub.connect("127.0.0.1", port, keepalive=30)
    pub.loop_start()
    props = None
    if protocol == mqtt.MQTTv5:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "text/plain"
        props.UserProperty = [("k", "v")]
    for qos in (0, 1, 2):
        info = pub.publish(f"{prefix}/{label}/q{qos}", f"hello {qos}", qos=qos, properties=props)
        info.wait_for_publish(10)
        if not info.is_published():
            fail(f"{label}: QoS {qos} publish not acknowledged")
    if not arrived.wait(15):
        fail(f"{label}: got {len(got)} of 3 messages")
    topics = sorted(m.topic for m in got)
    if topics != [f"{prefix}/{label}/q0", f"{prefix}/{label}/q1", f"{prefix}/{label}/q2"]:
        fail(f"{label}: wrong topics {topics}")
    for m in got:
        want_qos = min(int(m.topic[-1]), 1)
        if m.qos != want_qos:
            fail(f"{label}: {m.topic} arrived with QoS {m.qos}, want {want_qos}")
        if protocol == mqtt.MQTTv5:
            if getattr(m.properties, "ContentType", None) != "text/plain":
                fail(f"{label}: content type lost")
            if ("k", "v") not in getattr(m.properties, "UserProperty", []):
                fail(f"{label}: user property lost")
    pub.disconnect()
    sub.disconnect()
    pub.loop_stop()
    sub.loop_stop()
    print(f"ok {label}", flush=True)


run(mqtt.MQTTv311, "v311")
run(mqtt.MQTTv5, "v5")
