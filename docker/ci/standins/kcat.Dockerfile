# Stand-in for edenhill/kcat (scripts/compose-images; docs/demo.md): Debian's kcat, same release.
FROM debian:bookworm-slim
COPY debian-apt.sh /usr/local/bin/debian-apt
RUN debian-apt kcat
ENTRYPOINT ["kcat"]
