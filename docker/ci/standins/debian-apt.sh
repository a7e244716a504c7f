#!/bin/sh
# apt-get install without recommends, then drop the package lists (as the official images do).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$@" > /dev/null
rm -rf /var/lib/apt/lists/*
