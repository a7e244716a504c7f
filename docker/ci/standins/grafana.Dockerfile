# Stand-in for grafana/grafana (scripts/compose-images; docs/demo.md). Not Grafana: a small Python
# server that loads the provisioned datasources and dashboards as Grafana would, and answers
# /api/health, /api/search, /api/dashboards/uid/UID and /api/datasources. No UI.
FROM debian:bookworm-slim
COPY debian-apt.sh /usr/local/bin/debian-apt
RUN debian-apt python3-minimal python3-yaml wget \
 && useradd --system --uid 472 --user-group --home-dir /var/lib/grafana --create-home grafana
COPY grafana_standin.py /usr/local/bin/grafana_standin.py
USER grafana
EXPOSE 3000
ENTRYPOINT ["python3", "/usr/local/bin/grafana_standin.py"]
