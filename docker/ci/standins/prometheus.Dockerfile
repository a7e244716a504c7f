# Stand-in for prom/prometheus (scripts/compose-images; docs/demo.md): Debian's Prometheus, an
# older release, with wget for the healthcheck as in the official image (busybox there).
FROM debian:bookworm-slim
COPY debian-apt.sh /usr/local/bin/debian-apt
RUN debian-apt prometheus wget && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
VOLUME /prometheus
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
