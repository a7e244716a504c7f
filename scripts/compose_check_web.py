"""HTTP and browser checks of the compose run (scripts/compose_check.py): Prometheus targets,
the Grafana stand-in's provisioning, and the map in headless Chromium."""

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def check_prometheus(check, wait_for, base):
    """Every scrape target up (brokers, truck-sim, balancer, and whatever else prometheus.yml lists)."""
    def all_up():
        targets = get_json(f"{base}/api/v1/targets?state=active")["data"]["activeTargets"]
        return targets if targets and all(t["health"] == "up" for t in targets) else None
    targets = wait_for("every Prometheus target up", all_up, 60, 3)
    if not targets:
        targets = get_json(f"{base}/api/v1/targets?state=active")["data"]["activeTargets"]
    detail = ", ".join(f"{t['labels'].get('job')}/{t['labels'].get('instance')}={t['health']}" for t in targets)
    check("every Prometheus target is up", bool(targets) and all(t["health"] == "up" for t in targets), detail)


def check_grafana(check, base):
    health = get_json(f"{base}/api/health")
    dashboards = get_json(f"{base}/api/search")
    sources = get_json(f"{base}/api/datasources")
    check("Grafana answers with the provisioned datasource and dashboards",
          health.get("database") == "ok" and dashboards and any(s["url"] == "http://prometheus:9090" for s in sources),
          f"{len(dashboards)} dashboards: {', '.join(d['title'] for d in dashboards)}")


def run_node(args, log, env=None):
    with open(log, "w") as f:
        return subprocess.run(["node", *args], cwd=ROOT / "static", stdout=f, stderr=subprocess.STDOUT,
                              timeout=600, env={**os.environ, **(env or {})}).returncode


def check_browser(check, url, out, trucks, route_as):
    """The page served by the ui container, driving MQTT over the balancer's WebSocket port:
    live trucks (at least 95% of the fleet, at most 300 KB/s into the tab), followed trucks,
    direction counts, the throughput panel (the ui scrapes the brokers), a refused publish.
    route_as: "ws-url,user,password" of the trucksim identity, for a followed truck's route
    when none has one published yet (static/test/browser.mjs --route-as)."""
    log = out / "browser-test.log"
    args = ["test/browser.mjs", url, "--expect-broker", "--expect-throughput", "--trucks", str(trucks),
            "--route-as", route_as, "--out", str(out / "compose-ui.png")]
    # The ui container serves roads (LODESTREAM_UI_ROADS in docker-compose.yml): check them.
    rc = run_node(args, log, {"LODESTREAM_UI_ROADS": "/osrm/roads.geojson"})
    lines = log.read_text().splitlines()
    summary = next((ln for ln in reversed(lines) if ln.endswith(" failed")), "no summary")
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    check("the map (ui container, WebSocket through the balancer) works in headless Chromium",
          rc == 0, f"browser test: {summary} {fails[:3]} (log {log.relative_to(ROOT)})")
    shots = Path(os.environ.get("SCREENSHOT_DIR", out))
    shots.mkdir(parents=True, exist_ok=True)
    country, truck = out / "screenshot.png", out / "screenshot-truck.png"
    zoom = os.environ.get("SCREENSHOT_TRUCK_ZOOM", "14")
    rc = run_node(["test/screenshots.mjs", url, str(country), str(truck), "--truck-zoom", zoom], out / "screenshots.log")
    ok = rc == 0 and country.stat().st_size > 0 and truck.stat().st_size > 0 if rc == 0 else False
    if ok and shots != out:
        shutil.copy(country, shots / "screenshot.png")
        shutil.copy(truck, shots / "screenshot-truck.png")
    check("screenshots of the whole country and of a followed truck", ok,
          f"{country.relative_to(ROOT)}, {truck.relative_to(ROOT)}" + (f", copied to {shots}" if ok and shots != out else ""))
