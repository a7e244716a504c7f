#!/bin/sh
# Builds the ui binary and the front-end, serves the page on a free local port
# and runs the browser test against it. Extra arguments go to browser.mjs
# (e.g. --expect-broker, and LODESTREAM_UI_MQTT_URL=... for a real broker).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
static=$(dirname "$here")
root=$(dirname "$static")
cd "$static"
[ -d node_modules ] || npm ci --no-audit --no-fund
npm run -s build
[ -f data/italy-regions.geojson ] || npm run -s regions
cd "$root"
cargo build -q -p ui
port=${UI_TEST_PORT:-18080}
# With --fake-broker PORT the page must be configured for that broker; with
# neither a fake nor a configured broker, point at a closed port so the test
# sees a clean connection failure whatever else runs on this machine.
prev=""
for a in "$@"; do
  if [ "$prev" = "--fake-broker" ]; then LODESTREAM_UI_MQTT_URL="ws://127.0.0.1:$a/mqtt"; fi
  prev=$a
done
export LODESTREAM_UI_MQTT_URL="${LODESTREAM_UI_MQTT_URL:-ws://127.0.0.1:18999/mqtt}"
# Roads layer: the file scripts/osrm-local prepare made, unless the caller chose one.
roads="$root/.cache/osrm/data/${OSRM_DATASET:-italy-synth}/roads.geojson"
if [ -z "${LODESTREAM_UI_ROADS:-}" ] && [ -f "$roads" ]; then export LODESTREAM_UI_ROADS="$roads"; fi
"$root/target/debug/ui" --listen "127.0.0.1:$port" --static-dir "$static" &
ui_pid=$!
trap 'kill $ui_pid 2>/dev/null || true' EXIT INT TERM
i=0
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do
  i=$((i + 1)); [ $i -lt 100 ] || { echo "ui did not start"; exit 1; }
  sleep 0.1
done
node "$here/browser.mjs" "http://127.0.0.1:$port/" "$@"
