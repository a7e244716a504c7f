#!/usr/bin/env python3
"""A third-party client's view of PUBACK and end-to-end latency.

loadsim speaks MQTT through this repository's own codec; this probe uses
Eclipse paho-mqtt instead, so its figures show whether loadsim's agree with
what an outside client sees (docs/benchmarks.md, "A third-party client").

Each of --clients publishers sends QoS 1 PUBLISHes with one message in
flight: at --rate msg/s each (0: the next one as soon as the PUBACK is
in), for --duration-s seconds after a 2 s warm-up; one subscriber on the
publishers' topics timestamps arrivals. Prints msg/s, PUBACK and
end-to-end p50 / p90 / p99 / max in ms.

    python3 scripts/paho_probe.py --port 1883 [--transport websockets --path /mqtt]
"""

import argparse
import statistics
import struct
import sys
import threading
import time
import uuid

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

WARMUP_S = 2.0


def pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(name, values_ms):
    return (
        f"{name}: p50 {pct(values_ms, 0.50):.1f} p90 {pct(values_ms, 0.90):.1f} "
        f"p99 {pct(values_ms, 0.99):.1f} max {max(values_ms, default=float('nan')):.1f} ms "
        f"({len(values_ms)} samples)"
    )


def new_client(args, name):
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"paho-probe-{name}-{uuid.uuid4().hex[:8]}",
        transport=args.transport,
    )
    if args.transport == "websockets":
        c.ws_set_options(path=args.path)
    return c


class Publisher(threading.Thread):
    """One client, one QoS 1 message in flight."""

    def __init__(self, args, index, start_at, stop_at):
        super().__init__(daemon=True)
        self.args, self.index = args, index
        self.start_at, self.stop_at = start_at, stop_at
        self.acked = threading.Event()
        self.latencies_ms = []
        self.sent = 0
        self.topic = f"{args.topic}/{index}"

    def run(self):
        c = new_client(self.args, f"pub{self.index}")
        c.on_publish = lambda *_: self.acked.set()
        c.connect(self.args.host, self.args.port, keepalive=30)
        c.loop_start()
        interval = 1.0 / self.args.rate if self.args.rate > 0 else 0.0
        next_at = time.monotonic()
        while time.monotonic() < self.stop_at:
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
            self.acked.clear()
            t0 = time.perf_counter()
            payload = struct.pack("!d", time.time()) + b"x" * (self.args.payload - 8)
            c.publish(self.topic, payload, qos=1)
            if not self.acked.wait(10):
                print(f"publisher {self.index}: no PUBACK within 10 s", file=sys.stderr)
                break
            if time.monotonic() >= self.start_at:
                self.latencies_ms.append((time.perf_counter() - t0) * 1000)
                self.sent += 1
        c.loop_stop()
        c.disconnect()


def subscribe(args, start_at, e2e_ms):
    c = new_client(args, "sub")
    ready = threading.Event()

    def on_message(_c, _u, msg):
        if time.monotonic() >= start_at and len(msg.payload) >= 8:
            sent = struct.unpack("!d", msg.payload[:8])[0]
            e2e_ms.append((time.time() - sent) * 1000)

    c.on_message = on_message
    c.on_subscribe = lambda *_: ready.set()
    c.connect(args.host, args.port, keepalive=30)
    c.subscribe(f"{args.topic}/#", qos=1)
    c.loop_start()
    if not ready.wait(10):
        sys.exit("subscriber: no SUBACK within 10 s")
    return c


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--transport", choices=["tcp", "websockets"], default="tcp")
    p.add_argument("--path", default="/mqtt", help="WebSocket path")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--rate", type=float, default=1000.0, help="msg/s per client; 0 = closed loop")
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--payload", type=int, default=500)
    p.add_argument("--topic", default=f"paho-probe/{uuid.uuid4().hex[:8]}")
    args = p.parse_args()
    if args.payload < 8:
        sys.exit("--payload must be at least 8 bytes (the send time)")
    start_at = time.monotonic() + WARMUP_S
    stop_at = start_at + args.duration_s
    e2e_ms = []
    sub = subscribe(args, start_at, e2e_ms)
    pubs = [Publisher(args, i, start_at, stop_at) for i in range(args.clients)]
    for t in pubs:
        t.start()
    for t in pubs:
        t.join()
    time.sleep(1.0)  # the last deliveries
    sub.loop_stop()
    sub.disconnect()
    acks = [v for t in pubs for v in t.latencies_ms]
    sent = sum(t.sent for t in pubs)
    print(f"paho-mqtt {paho.mqtt.__version__} probe: "
          f"{args.clients} client(s), rate {args.rate or 'closed loop'}, {args.transport}, "
          f"{args.duration_s:.0f} s: {sent / args.duration_s:.1f} msg/s acknowledged, "
          f"{len(e2e_ms)} delivered")
    print(summary("PUBACK latency", acks))
    print(summary("end-to-end latency", e2e_ms))
    if acks:
        print(f"PUBACK mean {statistics.fmean(acks):.2f} ms")


if __name__ == "__main__":
    main()
