"""Checks of the fleet demo running under docker compose (started by scripts/compose-check).

  compose_check.py ports               exit 1, naming them, when a published port is taken
  compose_check.py run                 every check against the running project
  compose_check.py gone                after `down -v`: no container, network or volume left

Environment: COMPOSE_FILES (colon-separated, default docker-compose.yml), TRUCKS (the fleet
size the project was started with), COMPOSE_CHECK_OUT (target/compose-check), SCREENSHOT_DIR
(docs: where screenshot.png and screenshot-truck.png go), CHROMIUM.

"Acknowledged", for the take-over check: a QoS 1 PUBLISH of a probe client (paho-mqtt,
MQTT 5, user trucksim, through the balancer) for which the client received a PUBACK with a
success reason code. Every such message must be in Kafka `trucks` afterwards.
Ends with "N passed, N failed"; exit 1 on any failure.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "lodestream"
FILES = os.environ.get("COMPOSE_FILES", "docker-compose.yml").split(":")
OUT = Path(os.environ.get("COMPOSE_CHECK_OUT", ROOT / "target/compose-check"))
TRUCKS = int(os.environ.get("TRUCKS", "0"))
HOST = "127.0.0.1"
INIT_JOBS = {"osrm-init", "mqtt-users"}
TAKEOVER_LIMIT_S = 10.0

results = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    results["passed" if ok else "failed"] += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name}{' — ' + detail if detail else ''}", flush=True)
    return ok


def compose(*args, **kw):
    cmd = ["docker", "compose", "-p", PROJECT]
    for f in FILES:
        cmd += ["-f", str(ROOT / f)]
    return subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, **kw)


def config():
    res = compose("--profile", "tools", "config", "--format", "json")
    if res.returncode != 0:
        raise SystemExit(f"docker compose config failed: {res.stderr}")
    return json.loads(res.stdout)


def published_port(cfg, service, target):
    for p in cfg["services"][service].get("ports", []):
        if int(p["target"]) == target:
            return int(p["published"])
    raise SystemExit(f"{service} publishes no port for {target}")


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_for(what, fn, timeout, interval=1.0):
    """Polls fn() until it returns a truthy value or `timeout` seconds pass; returns the last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(interval)
    print(f"     (gave up waiting for {what} after {timeout} s)", flush=True)
    return value


# ---------------------------------------------------------------- ports --

def holder(port):
    """", held by PROGRAM (pid N)" for a listening TCP port, from ss; "" when ss cannot tell."""
    try:
        out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    procs = sorted(set(re.findall(r'\("([^"]+)",pid=(\d+)', out)))
    return ", held by " + ", ".join(f"{name} (pid {pid})" for name, pid in procs) if procs else ""


def cmd_ports():
    taken = []
    for name, spec in sorted(config()["services"].items()):
        for p in spec.get("ports", []):
            addr = p.get("host_ip") or "0.0.0.0"
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((addr, int(p["published"])))
                except OSError as e:
                    taken.append(f"{addr}:{p['published']} ({name}): {e.strerror}{holder(int(p['published']))}")
    for t in taken:
        print(f"port taken: {t}", file=sys.stderr)
    if taken:
        print("(free them, or wait for whatever holds them, then run again)", file=sys.stderr)
    return 1 if taken else 0


# ----------------------------------------------------------- containers --

def check_services(cfg):
    res = compose("ps", "-a", "--format", "json")
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    if rows and isinstance(rows[0], list):
        rows = rows[0]
    by_service = {r["Service"]: r for r in rows}
    for name, spec in sorted(cfg["services"].items()):
        if "tools" in spec.get("profiles", []):
            continue
        row = by_service.get(name)
        if row is None:
            check(f"service {name} exists", False, "no container")
        elif name in INIT_JOBS:
            check(f"init job {name} completed", row["State"] == "exited" and row.get("ExitCode") == 0,
                  f"{row['State']}, exit code {row.get('ExitCode')}")
        elif "healthcheck" in spec or row.get("Health"):
            check(f"service {name} healthy", row.get("Health") == "healthy", f"{row['State']} {row.get('Health')}")
        else:
            check(f"service {name} running (it has no healthcheck)", row["State"] == "running", row["State"])


def broker_metric(port, name):
    total = 0.0
    for line in http_get(f"http://{HOST}:{port}/metrics").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_fleet_connected(cfg):
    ports = [published_port(cfg, b, 1884) for b in ("broker-1", "broker-2")]
    conns = wait_for(f"{TRUCKS} connections", lambda: (
        c if sum(c := [broker_metric(p, "lodestream_connections") for p in ports]) >= TRUCKS else None), 240, 2)
    check("the whole fleet is connected through the balancer", bool(conns),
          f"connections per node {conns}, fleet {TRUCKS}")
    return ports


def mqtt_users():
    """name -> password, from the one time mqtt-users printed them."""
    out = compose("logs", "--no-log-prefix", "mqtt-users").stdout
    users = {}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("MQTT users of this demo"):
            for entry in lines[i + 1:]:
                parts = entry.split()
                if len(parts) == 2:
                    users[parts[0]] = parts[1]
    check("mqtt-users printed the generated passwords once",
          sorted(users) == ["trucksim", "viewer"] and all(len(p) >= 16 for p in users.values())
          and out.count("MQTT users of this demo") == 1, f"users {sorted(users)}")
    return users


def main_run():
    from compose_check_kafka import check_kafka_keys
    from compose_check_mqtt import check_directions, check_viewer_refused, check_takeover
    from compose_check_web import check_browser, check_prometheus, check_grafana

    OUT.mkdir(parents=True, exist_ok=True)
    cfg = config()
    check_services(cfg)
    metrics_ports = wait_fleet_connected(cfg)
    users = mqtt_users()
    mqtt_port = published_port(cfg, "lb", 1883)
    check_kafka_keys(compose, check, TRUCKS)
    check_directions(check, HOST, mqtt_port, TRUCKS)
    check_viewer_refused(check, HOST, mqtt_port, users.get("viewer", ""))
    check_prometheus(check, wait_for, f"http://{HOST}:{published_port(cfg, 'prometheus', 9090)}")
    check_grafana(check, f"http://{HOST}:{published_port(cfg, 'grafana', 3000)}")
    route_as = f"ws://{HOST}:{published_port(cfg, 'lb', 1893)}/mqtt,trucksim,{users.get('trucksim', '')}"
    check_browser(check, f"http://{HOST}:{published_port(cfg, 'ui', 8080)}/", OUT, TRUCKS, route_as)
    check_takeover(check, compose, HOST, mqtt_port, users.get("trucksim", ""), metrics_ports, TRUCKS,
                   TAKEOVER_LIMIT_S)
    print(f"compose check: {results['passed']} passed, {results['failed']} failed", flush=True)
    return 1 if results["failed"] else 0


def cmd_gone():
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind, cmd in (("container", ["docker", "ps", "-a", "-q", "--filter", label]),
                      ("network", ["docker", "network", "ls", "-q", "--filter", label]),
                      ("volume", ["docker", "volume", "ls", "-q", "--filter", label])):
        left = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        check(f"down -v left no {kind}", not left, " ".join(left))
    print(f"compose down check: {results['passed']} passed, {results['failed']} failed", flush=True)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    handlers = {"ports": cmd_ports, "run": main_run, "gone": cmd_gone}
    if command not in handlers:
        raise SystemExit(__doc__)
    sys.exit(handlers[command]())
