# Stand-in for haproxy (scripts/compose-images; docs/demo.md): Debian's HAProxy, which is older
# than the official image's, with the Prometheus exporter built in. Same config path and user.
FROM debian:bookworm-slim
COPY debian-apt.sh /usr/local/bin/debian-apt
RUN debian-apt haproxy && mkdir -p /usr/local/etc/haproxy
USER haproxy
STOPSIGNAL SIGUSR1
ENTRYPOINT ["haproxy", "-W", "-db"]
CMD ["-f", "/usr/local/etc/haproxy/haproxy.cfg"]
