#!/usr/bin/env python3
"""Measures a running truck-sim: memory (RSS) and what its routes are made of.

Started by scripts/bench-trucksim once truck-sim runs. Phases:
1. ramp: until every truck is started and (nearly) every truck has its first
   route (routes_ok_total >= 98 % of --trucks, nothing queued for OSRM);
2. steady: --steady-secs more, sampling RSS every second.
Reads VmRSS/VmHWM from /proc/PID/status and the simulator's Prometheus
metrics. Prints a summary and writes it as JSON to --out.

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import urllib.request


def proc_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(rest.split()[0])
    return out


SAMPLE = re.compile(r"^truck_sim_([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$")


def metrics(url: str) -> dict[str, float]:
    # Generous: on a loaded machine a busy simulator answers slowly.
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--metrics", required=True, help="http://host:port/metrics of truck-sim")
    ap.add_argument("--trucks", type=int, required=True)
    ap.add_argument("--steady-secs", type=float, default=60)
    ap.add_argument("--ramp-timeout-secs", type=float, default=1200)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    t0 = time.monotonic()
    m: dict[str, float] = {}
    ramp_rss = []
    while True:
        time.sleep(2)
        try:
            m = metrics(args.metrics)
        except OSError as e:
            print(f"bench: metrics not yet available ({e})", file=sys.stderr)
            continue
        rss = proc_kib(args.pid)
        ramp_rss.append(rss["VmRSS"])
        spawned, ok = m.get("trucks_spawned", 0), m.get("routes_ok_total", 0)
        queued, conn = m.get("routes_queued", 0), m.get("mqtt_connected", 0)
        elapsed = time.monotonic() - t0
        if int(elapsed) % 20 < 2:
            print(f"bench: {elapsed:5.0f} s spawned {spawned:.0f} routes {ok:.0f} queued {queued:.0f} "
                  f"connected {conn:.0f} rss {rss['VmRSS'] / 1024:.0f} MiB", file=sys.stderr)
        if spawned >= args.trucks and ok >= 0.98 * args.trucks and queued == 0:
            break
        if elapsed > args.ramp_timeout_secs:
            print("bench: ramp did not finish in time", file=sys.stderr)
            return 1
    ramp_secs = time.monotonic() - t0
    m0, t_steady = m, time.monotonic()
    steady = []
    while time.monotonic() - t_steady < args.steady_secs:
        time.sleep(1)
        steady.append(proc_kib(args.pid)["VmRSS"])
    m1 = metrics(args.metrics)
    secs = time.monotonic() - t_steady
    status = proc_kib(args.pid)
    received = m1.get('route_points_total{stage="received"}', 0)
    kept = m1.get('route_points_total{stage="kept"}', 0)
    km = m1.get("route_length_meters_total", 0) / 1000
    routes = max(m1.get("routes_ok_total", 0) - m1.get("route_cache_hits_total", 0), 1)
    result = {
        "label": args.label,
        "trucks": args.trucks,
        "ramp_secs": round(ramp_secs),
        "rss_mib_steady_median": round(statistics.median(steady) / 1024),
        "rss_mib_steady_max": round(max(steady) / 1024),
        "rss_mib_peak": round(status["VmHWM"] / 1024),
        "connected": m1.get("mqtt_connected", 0),
        "msgs_per_s": round((m1.get("messages_published_total", 0) - m0.get("messages_published_total", 0)) / secs),
        "routes": m1.get("routes_ok_total", 0),
        "route_km_mean": round(km / routes),
        "route_points_per_km_received": round(received / km, 1) if km else None,
        "route_points_per_km_kept": round(kept / km, 2) if km else None,
        "route_cache_mib": round(m1.get("route_cache_bytes", 0) / 2**20, 1),
        "kib_per_truck": round(statistics.median(steady) / args.trucks, 1),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    for k, v in result.items():
        print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
