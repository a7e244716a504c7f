"""Eclipse paho-mqtt 2.x over WebSocket (MQTT 5): provokes one kind of
server-initiated DISCONNECT and reports whether paho saw the broker's
DISCONNECT packet (and its reason code) before the connection ended.

Usage: paho_ws_disconnect.py PORT CASE CLIENT_ID
CASE:
  receive_max  floods QoS 1 PUBLISHes without waiting for PUBACKs (paho does
               not apply the server's Receive Maximum), expecting 0x93
  too_large    publishes one PUBLISH bigger than the broker's Maximum Packet
               Size while a flood of small QoS 0 PUBLISHes runs, expecting 0x95
  wait         connects, prints "connected", and waits (up to 60 s) for the
               broker to end the connection (take-over 0x8E, shutdown 0x8B)
               while publishing QoS 0 messages as load
Prints one line "disconnect from_server=True|False reason=N" (N decimal)
(and for "wait" the seconds from "connected" to the end); exits non-zero
when the connection did not end within 60 s. PAHO_DEBUG_LOG=FILE logs
paho's packets (except PUBLISH) to FILE.
"""
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

port = int(sys.argv[1])
case = sys.argv[2]
client_id = sys.argv[3]

done = threading.Event()
connected = threading.Event()
result = {}


def on_connect(c, userdata, flags, reason_code, properties):
    if reason_code != 0:
        print(f"FAIL: connect refused {reason_code}", flush=True)
        sys.exit(1)
    connected.set()


def on_disconnect(c, userdata, flags, reason_code, properties):
    result["at"] = time.monotonic()
    result["from_server"] = flags.is_disconnect_packet_from_server
    result["reason"] = int(reason_code.value)
    done.set()


c = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=client_id,
    protocol=mqtt.MQTTv5,
    transport="websockets",
)
c.ws_set_options(path="/mqtt")
if os.environ.get("PAHO_DEBUG_LOG"):
    import logging

    logging.basicConfig(filename=os.environ["PAHO_DEBUG_LOG"], level=logging.DEBUG)
    log = logging.getLogger("paho")
    log.addFilter(lambda r: "PUBLISH" not in r.msg)
    c.enable_logger(log)
# No client-side limit: the flood must reach the broker's Receive Maximum.
c.max_inflight_messages_set(0)
c.max_queued_messages_set(0)
c.on_connect = on_connect
c.on_disconnect = on_disconnect
c.connect("127.0.0.1", port, keepalive=60)
c.loop_start()
if not connected.wait(15):
    print("FAIL: no CONNACK", flush=True)
    sys.exit(1)


def flood(qos, until):
    # Bursts with short pauses: unpaced, paho's network thread only writes
    # (its write loop never empties the queue) and never reads the broker's
    # DISCONNECT, which would test paho rather than the broker.
    n = 0
    while not done.is_set() and time.monotonic() < until:
        c.publish(f"flood/{client_id}", b"x" * 64, qos=qos)
        n += 1
        if n % 50 == 0:
            time.sleep(0.002)


deadline = time.monotonic() + 60
if case == "receive_max":
    flood(1, deadline)
elif case == "too_large":
    threading.Thread(target=flood, args=(0, deadline), daemon=True).start()
    time.sleep(0.3)
    c.publish(f"big/{client_id}", b"y" * 64 * 1024, qos=1)
elif case == "wait":
    started = time.monotonic()
    print("connected", flush=True)
    threading.Thread(target=flood, args=(0, deadline), daemon=True).start()
else:
    print(f"FAIL: unknown case {case}", flush=True)
    sys.exit(2)

if not done.wait(max(0.0, deadline - time.monotonic())):
    print("FAIL: the broker did not end the connection within 60 s", flush=True)
    sys.exit(1)
c.loop_stop()
print(
    f"disconnect from_server={result['from_server']} reason={result['reason']}",
    flush=True,
)
if case == "wait":
    print(f"after {result['at'] - started:.3f} s", flush=True)
