# Stand-in for python:3.12-slim-bookworm, the base of docker/osrm.Dockerfile (scripts/compose-images;
# docs/demo.md): Debian's Python 3.11, and pip answered from /wheels (the wheels scripts/compose-images
# downloaded on the host), because containers here cannot reach PyPI.
FROM debian:bookworm-slim
COPY debian-apt.sh /usr/local/bin/debian-apt
RUN debian-apt python3 python3-pip python3-venv
COPY wheels/ /wheels/
ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_BREAK_SYSTEM_PACKAGES=1
CMD ["python3"]
