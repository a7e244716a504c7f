"""MQTT checks of the compose run (scripts/compose_check.py): direction counts through the
balancer, the viewer's refused publish, and the take-over after `docker kill` of a broker."""

import json
import struct
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from compose_check_kafka import is_position, read_trucks_topic

PROBES = 8
PROBE_RATE_HZ = 20
NOT_AUTHORIZED = 0x87


def client(client_id, user=None, password=None):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if user:
        c.username_pw_set(user, password)
    return c


def snapshot_count(payload):
    """Trucks in a fleet/stats/snapshot v1 payload (format: stream-jobs/src/snapshot.rs), or None."""
    header, record = 52, 6
    if len(payload) < header or payload[0] != 1:
        return None
    count = struct.unpack_from("<I", payload, 8)[0]
    return count if len(payload) == header + count * record else None


def check_directions(check, host, port, trucks):
    """fleet/stats/directions and the map's fleet/stats/snapshot, as an anonymous subscriber
    through the balancer (both come from Kafka `fleet-stats`, written by the two stream jobs)."""
    got = {}
    done = threading.Event()
    c = client("ci-directions")
    c.on_connect = lambda cl, *_: cl.subscribe("fleet/stats/#", qos=0)

    def on_message(_c, _u, msg):
        got.setdefault(msg.topic, msg.payload)
        if {"fleet/stats/directions", "fleet/stats/snapshot"} <= got.keys():
            done.set()
    c.on_message = on_message
    c.connect(host, port, keepalive=30)
    c.loop_start()
    done.wait(60)
    c.loop_stop()
    c.disconnect()
    payload = got.get("fleet/stats/directions")
    if payload is None:
        check("direction counts arrive over MQTT through the balancer", False,
              f"nothing on fleet/stats/directions in 60 s (topics seen: {sorted(got)})")
    else:
        try:
            stats = json.loads(payload)
            counted = stats["trucks"]
            ok = counted > 0 and sum(stats["counts"].values()) == counted
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            ok, counted = False, f"bad payload ({e})"
        check("direction counts arrive over MQTT through the balancer", ok,
              f"fleet/stats/directions: {counted} trucks counted (fleet {trucks})")
    snap = got.get("fleet/stats/snapshot")
    count = snapshot_count(snap) if snap is not None else None
    check("the fleet snapshot (fleet-snapshot service) arrives over MQTT through the balancer",
          count is not None and count > 0,
          "nothing in 60 s" if snap is None else f"{count} trucks in a {len(snap)}-byte snapshot (fleet {trucks})")


def check_viewer_refused(check, host, port, password):
    """The viewer may subscribe but not publish: a QoS 1 PUBLISH gets PUBACK 0x87 (MQTT 5)."""
    result = {}
    done = threading.Event()
    c = client("ci-viewer-publish", "viewer", password)

    def on_connect(cl, _u, _f, reason, _p):
        result["connack"] = reason.value
        if not reason.is_failure:
            cl.publish("trucks/CI-FORGED", b"{}", qos=1)
        else:
            done.set()

    def on_publish(_c, _u, _mid, reason, _p):
        result["puback"] = reason.value
        done.set()
    c.on_connect, c.on_publish = on_connect, on_publish
    c.connect(host, port, keepalive=30)
    c.loop_start()
    done.wait(20)
    c.loop_stop()
    c.disconnect()
    check("the viewer logs in with its generated password", result.get("connack") == 0, f"CONNACK {result.get('connack')}")
    check("the viewer's publish is refused (PUBACK 0x87 Not authorized)", result.get("puback") == NOT_AUTHORIZED,
          f"PUBACK {result.get('puback')}")


class Probe:
    """A QoS 1 publisher of numbered positions; remembers which numbers got a success PUBACK."""

    def __init__(self, index, host, port, password):
        self.topic = f"trucks/CI-PROBE-{index}"
        self.seq_by_mid = {}
        self.acked_mids = []          # appended by paho's network thread
        self.disconnects = 0
        self.c = client(f"ci-probe-{index}", "trucksim", password)
        self.c.reconnect_delay_set(0.2, 1)
        self.c.on_publish = lambda _c, _u, mid, reason, _p: (
            None if reason.is_failure else self.acked_mids.append(mid))
        self.stopping = False
        self.c.on_disconnect = lambda *_: None if self.stopping else setattr(self, "disconnects", self.disconnects + 1)
        self.c.connect(host, port, keepalive=10)
        self.c.loop_start()

    def publish(self, seq):
        now = time.time()
        payload = json.dumps({"v": 1, "plate": self.topic.rsplit("/", 1)[1], "lat": 43.7384, "lon": 7.4246,
                              "next": {"lat": 43.7384, "lon": 7.4246}, "speed_kmh": 0.0, "heading_deg": 0.0,
                              "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                              "ts_ms": int(now * 1000), "state": "resting", "seq": seq})
        info = self.c.publish(self.topic, payload, qos=1)
        self.seq_by_mid[info.mid] = seq

    def acked(self):
        return {self.seq_by_mid[m] for m in list(self.acked_mids) if m in self.seq_by_mid}

    def stop(self):
        self.stopping = True    # our own DISCONNECT is not a cut-off
        self.c.loop_stop()
        self.c.disconnect()


def publish_probes(probes, seconds, start_seq):
    seq = start_seq
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for p in probes:
            p.publish(seq)
        seq += 1
        time.sleep(1.0 / PROBE_RATE_HZ)
    return seq


def served_again(records, t_kill_ms, limit_s):
    """Per truck that published in the 5 s before the kill: seconds until its first record after it."""
    before, after = set(), {}
    for key, ts, _p, _o, _v, _k in records:
        if "CI-PROBE" in key or not is_position(key):
            continue
        if t_kill_ms - 5000 <= ts < t_kill_ms:
            before.add(key)
        elif ts >= t_kill_ms:
            after[key] = min(after.get(key, ts), ts)
    delays = {k: (after[k] - t_kill_ms) / 1000 if k in after else float("inf") for k in before}
    late = sorted(k for k, d in delays.items() if d > limit_s)
    return delays, late


def check_takeover(check, compose, host, port, password, metrics_ports, trucks, limit_s):
    from compose_check import broker_metric
    conns = [broker_metric(p, "lodestream_connections") for p in metrics_ports]
    victim, survivor = (0, 1) if conns[0] >= conns[1] else (1, 0)
    name = f"broker-{victim + 1}"
    probes = [Probe(i, host, port, password) for i in range(PROBES)]
    seq = publish_probes(probes, 5, 0)
    t_kill_ms = int(time.time() * 1000)
    kill = subprocess.run(["docker", "kill", f"lodestream-{name}-1"], capture_output=True, text=True)
    check(f"docker kill {name} (it held {conns[victim]:.0f} of {sum(conns):.0f} connections)",
          kill.returncode == 0, kill.stderr.strip())
    publish_probes(probes, limit_s + 5, seq)
    time.sleep(3)   # the last PUBACKs
    for p in probes:
        p.stop()
    records = read_trucks_topic(compose)
    delays, late = served_again(records, t_kill_ms, limit_s)
    slowest = max(delays.values(), default=float("inf"))
    check(f"after the kill every truck publishes again within {limit_s:.0f} s", bool(delays) and not late,
          f"{len(delays)} trucks, slowest {slowest:.1f} s, late: {' '.join(late[:5])}")
    survivor_conns = broker_metric(metrics_ports[survivor], "lodestream_connections")
    check(f"broker-{survivor + 1} serves the whole fleet", survivor_conns >= trucks,
          f"{survivor_conns:.0f} connections, fleet {trucks}")
    in_kafka = {}
    for key, _ts, _p, _o, value, _k in records:
        if "CI-PROBE" in key:
            try:
                in_kafka.setdefault(key, set()).add(json.loads(value)["seq"])
            except (ValueError, KeyError):
                pass
    acked = sum(len(p.acked()) for p in probes)
    missing = {p.topic: sorted(p.acked() - in_kafka.get(p.topic, set())) for p in probes}
    missing = {k: v for k, v in missing.items() if v}
    cut = sum(1 for p in probes if p.disconnects)
    check("no acknowledged position is missing from Kafka", acked > 0 and not missing,
          f"{acked} acknowledged by {PROBES} probes ({cut} were cut off by the kill), missing {missing}")
    check("the kill cut off at least one probe (the check exercised a take-over)", cut > 0, f"{cut} of {PROBES}")
