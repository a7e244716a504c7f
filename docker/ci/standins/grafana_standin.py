"""Stand-in for the grafana/grafana image in the CI compose run (docs/demo.md).

Not Grafana: it loads the provisioning files the way Grafana does (datasources, and dashboard
providers of type `file`), refuses to start when they are broken, and answers the few API calls
scripts/compose_check.py makes: /api/health, /api/datasources, /api/search and
/api/dashboards/uid/UID. The real image's web UI is not there.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

PROVISIONING = Path(os.environ.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning"))
PORT = int(os.environ.get("GF_SERVER_HTTP_PORT", "3000"))
VERSION = "stand-in"


def load_yaml_dir(path):
    """Every *.yml / *.yaml file of a provisioning directory, parsed (Grafana reads both)."""
    docs = []
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".yml", ".yaml"):
                docs.append(yaml.safe_load(f.read_text()) or {})
    return docs


def load_datasources():
    out = []
    for doc in load_yaml_dir(PROVISIONING / "datasources"):
        for ds in doc.get("datasources") or []:
            for key in ("name", "type", "url"):
                if not ds.get(key):
                    raise ValueError(f"datasource without {key}: {ds}")
            out.append(ds)
    return out


def load_dashboards():
    """uid -> (folder, dashboard JSON) from every `file` provider."""
    dashboards = {}
    for doc in load_yaml_dir(PROVISIONING / "dashboards"):
        for provider in doc.get("providers") or []:
            if provider.get("type", "file") != "file":
                continue
            path = Path(provider["options"]["path"])
            for f in sorted(path.glob("**/*.json")):
                dash = json.loads(f.read_text())
                uid = dash.get("uid") or f.stem
                dashboards[uid] = (provider.get("folder", ""), dash)
    return dashboards


class Handler(BaseHTTPRequestHandler):
    datasources = []
    dashboards = {}

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/api/health":
            self.send_json(200, {"database": "ok", "version": VERSION})
        elif path == "/api/datasources":
            self.send_json(200, self.datasources)
        elif path == "/api/search":
            self.send_json(200, [
                {"uid": uid, "title": d.get("title", ""), "folderTitle": folder, "type": "dash-db"}
                for uid, (folder, d) in self.dashboards.items()
            ])
        elif path.startswith("/api/dashboards/uid/"):
            found = self.dashboards.get(path.rsplit("/", 1)[1])
            if found:
                self.send_json(200, {"dashboard": found[1], "meta": {"folderTitle": found[0]}})
            else:
                self.send_json(404, {"message": "Dashboard not found"})
        else:
            self.send_json(404, {"message": "Not found (Grafana stand-in: API subset only)"})

    def log_message(self, fmt, *args):
        sys.stderr.write("grafana-standin: " + (fmt % args) + "\n")


def main():
    Handler.datasources = load_datasources()
    Handler.dashboards = load_dashboards()
    print(f"grafana-standin: {len(Handler.datasources)} datasources, "
          f"{len(Handler.dashboards)} dashboards, port {PORT}", file=sys.stderr, flush=True)
    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()


if __name__ == "__main__":
    main()
