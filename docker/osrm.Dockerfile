# syntax=docker/dockerfile:1.7
# OSRM for the fleet demo: `osrm-init` (one-shot: download + extract + partition + customize into a
# volume) and `osrm` (osrm-routed --algorithm mld) both run this image; see docker/osrm/osrm-demo.sh.
#
# OSRM comes from the PyPI wheel osrm-bindings, which bundles static osrm-* executables and the
# stock profiles (x86_64 and aarch64 wheels). It is the same OSRM release scripts/osrm-local uses,
# so the truck profile derived by routing/make_truck_lua.py (which fails loudly when car.lua
# changes) is verified once for both. Build context: the repository root.
FROM python:3.12-slim-bookworm

ARG OSRM_BINDINGS_VERSION=26.10.0

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

# Executables and profiles only: --no-deps, the Python bindings are never imported.
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps --only-binary=:all: \
      --target /opt/osrm-bindings "osrm-bindings==${OSRM_BINDINGS_VERSION}" \
 && for exe in /opt/osrm-bindings/osrm/bin/osrm-*; do ln -s "$exe" /usr/local/bin/; done \
 && osrm-routed --version

# pyosmium + shapely for the map's roads layer (routing/make_roads_geojson.py, run by `init`).
RUN pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: "osmium==4.3.2" "shapely==2.*"

COPY routing/make_truck_lua.py routing/make_synth_italy.py routing/make_roads_geojson.py /opt/routing/

# truck.lua next to a copy of lib/ (the profile loads require('lib/...')).
RUN mkdir -p /opt/profiles \
 && cp -r /opt/osrm-bindings/osrm/share/profiles/lib /opt/profiles/lib \
 && python3 /opt/routing/make_truck_lua.py /opt/osrm-bindings/osrm/share/profiles/car.lua /opt/profiles/truck.lua

COPY docker/osrm/osrm-demo.sh /usr/local/bin/osrm-demo

VOLUME /data
EXPOSE 5000
ENTRYPOINT ["osrm-demo"]
CMD ["serve"]
