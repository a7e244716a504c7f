#!/usr/bin/env python3
"""Sanity-check a capture of truck-sim messages (standard library only).

Capture with:  mosquitto_sub -p PORT -t 'trucks/#' -v > capture.txt
Check with:    check_positions.py capture.txt [--osrm http://127.0.0.1:5000] [--max-speed-kmh 90]

Checks, per message: schema v1 fields and types, plate format, topic == prefix/plate.
Route-ahead messages (topic prefix/plate/route, retained) are checked for their own schema:
`coords` of at least 2 [lon, lat] pairs ending at `dest`; an empty payload (a clear) is allowed.
Per truck, between consecutive messages: the implied speed (haversine distance over ts_ms
difference) is at most the max speed (+ tolerance); while driving, the heading matches the
bearing from the position to `next`. With --osrm, a sample of driving positions is snapped
with /nearest and must lie within --snap-tolerance-m of a road (all but
--max-off-fraction of them: positions on a ferry do not snap).
Exit status 1 if any check fails. Prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import urllib.request
from collections import defaultdict

PLATE = re.compile(r"^[A-HJ-NPR-TV-Z]{2}[0-9]{3}[A-HJ-NPR-TV-Z]{2}$")
FIELDS = {"v", "plate", "lat", "lon", "next", "speed_kmh", "heading_deg", "ts", "ts_ms", "state"}
ROUTE_FIELDS = {"v", "plate", "dest", "remaining_m", "ts", "ts_ms", "coords"}


def check_route(topic: str, payload: str, prefix: str) -> list[str]:
    """Problems with one route-ahead message (empty payload: the route was cleared)."""
    if not payload:
        return []
    try:
        m = json.loads(payload)
    except json.JSONDecodeError as e:
        return [f"bad JSON on {topic}: {e}"]
    if set(m) != ROUTE_FIELDS:
        return [f"{topic}: fields {sorted(m)}"]
    errs = []
    if m["v"] != 1 or not PLATE.match(m["plate"]) or topic != f"{prefix}/{m['plate']}/route":
        errs.append(f"{topic}: v/plate {m['v']} {m['plate']}")
    c = m["coords"]
    if len(c) < 2 or any(len(p) != 2 or not (-180 <= p[0] <= 180 and -90 <= p[1] <= 90) for p in c):
        errs.append(f"{topic}: coords must be >= 2 [lon, lat] pairs")
    elif abs(c[-1][0] - m["dest"]["lon"]) > 2e-5 or abs(c[-1][1] - m["dest"]["lat"]) > 2e-5:
        errs.append(f"{topic}: last coordinate {c[-1]} is not dest {m['dest']}")
    if m["remaining_m"] < 0:
        errs.append(f"{topic}: remaining_m {m['remaining_m']}")
    return errs


def haversine_m(lat1, lon1, lat2, lon2):
    r = 6371008.8
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


def bearing_deg(lat1, lon1, lat2, lon2):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    x = math.sin(dl) * math.cos(p2)
    y = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return (math.degrees(math.atan2(x, y)) + 360) % 360


def angle_diff(a, b):
    d = abs(a - b) % 360
    return min(d, 360 - d)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("capture")
    ap.add_argument("--prefix", default="trucks")
    ap.add_argument("--max-speed-kmh", type=float, default=90.0)
    ap.add_argument("--osrm")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--snap-tolerance-m", type=float, default=5.0)
    ap.add_argument("--max-off-fraction", type=float, default=0.02,
                    help="share of sampled positions allowed off the road (ferries are not snappable)")
    args = ap.parse_args()

    errors: list[str] = []
    by_plate: dict[str, list[dict]] = defaultdict(list)
    n = 0
    routes = 0
    with open(args.capture, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            topic, _, payload = line.partition(" ")
            if topic.endswith("/route"):
                routes += 1
                errors.extend(check_route(topic, payload, args.prefix))
                continue
            n += 1
            try:
                m = json.loads(payload)
            except json.JSONDecodeError as e:
                errors.append(f"bad JSON on {topic}: {e}")
                continue
            if set(m) != FIELDS:
                errors.append(f"{topic}: fields {sorted(m)}")
                continue
            if m["v"] != 1 or m["state"] not in ("driving", "resting"):
                errors.append(f"{topic}: v/state {m['v']} {m['state']}")
            if not PLATE.match(m["plate"]) or topic != f"{args.prefix}/{m['plate']}":
                errors.append(f"{topic}: plate {m['plate']}")
            if not (0 <= m["speed_kmh"] <= args.max_speed_kmh + 0.1):
                errors.append(f"{topic}: speed {m['speed_kmh']}")
            if not (0 <= m["heading_deg"] < 360):
                errors.append(f"{topic}: heading {m['heading_deg']}")
            by_plate[m["plate"]].append(m)

    speeds, heading_errs, driving = [], [], []
    for plate, msgs in by_plate.items():
        msgs.sort(key=lambda m: m["ts_ms"])
        for a, b in zip(msgs, msgs[1:]):
            dt = (b["ts_ms"] - a["ts_ms"]) / 1000
            if dt <= 0.2:
                continue
            v = haversine_m(a["lat"], a["lon"], b["lat"], b["lon"]) / dt * 3.6
            speeds.append(v)
            # Tolerance: tick jitter (the simulator uses its own clock for dt).
            if v > args.max_speed_kmh * 1.25 + 2:
                errors.append(f"{plate}: implied speed {v:.1f} km/h between {a['ts']} and {b['ts']}")
        for m in msgs:
            if m["state"] != "driving":
                continue
            driving.append(m)
            d = haversine_m(m["lat"], m["lon"], m["next"]["lat"], m["next"]["lon"])
            if d > 2.0:
                heading_errs.append(
                    angle_diff(m["heading_deg"], bearing_deg(m["lat"], m["lon"], m["next"]["lat"], m["next"]["lon"]))
                )
    bad_heading = [e for e in heading_errs if e > 5]
    if bad_heading:
        errors.append(f"{len(bad_heading)} heading(s) off the bearing to `next` by > 5 deg")

    snaps = []
    if args.osrm and driving:
        for m in random.Random(1).sample(driving, min(args.samples, len(driving))):
            url = f"{args.osrm}/nearest/v1/driving/{m['lon']},{m['lat']}?number=1"
            with urllib.request.urlopen(url, timeout=5) as r:
                ans = json.load(r)
            dist = ans["waypoints"][0]["distance"] if ans.get("code") == "Ok" else float("inf")
            snaps.append(dist)
        off = [d for d in snaps if d > args.snap_tolerance_m]
        if len(off) > args.max_off_fraction * len(snaps):
            errors.append(f"{len(off)}/{len(snaps)} sampled positions are > {args.snap_tolerance_m} m off the road")

    def pct(xs, q):
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    print(f"messages {n}, trucks {len(by_plate)}, driving msgs {len(driving)}, route messages {routes}")
    print(f"implied speed km/h: p50 {pct(speeds, .5):.1f} p95 {pct(speeds, .95):.1f} max {max(speeds, default=0):.1f}")
    print(f"reported speed km/h (driving): p50 {pct([m['speed_kmh'] for m in driving], .5):.1f} "
          f"max {max((m['speed_kmh'] for m in driving), default=0):.1f}")
    if heading_errs:
        print(f"heading vs bearing-to-next error deg: p50 {pct(heading_errs, .5):.2f} max {max(heading_errs):.2f}")
    if snaps:
        print(f"distance to nearest road m: p50 {pct(snaps, .5):.2f} p95 {pct(snaps, .95):.2f} max {max(snaps):.2f}")
    for e in errors[:20]:
        print("FAIL:", e)
    print("OK" if not errors else f"{len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
