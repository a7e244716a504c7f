#!/bin/sh
# Entrypoint of the broker image: creates the demo's MQTT users on first start (argon2 hashes
# written by `broker passwd`), then runs the broker with the given arguments.
#
#   DEMO_MQTT_USERS                "user:password ..." (default "trucksim:trucksim viewer:viewer");
#                                  empty: create no users
#   LODESTREAM_AUTH__PASSWORD_FILE where the users go (only when set and the file is missing/empty)
#
# (Not LODESTREAM_*: every LODESTREAM_* variable is a broker configuration key.)
set -eu
users=${DEMO_MQTT_USERS-trucksim:trucksim viewer:viewer}
file=${LODESTREAM_AUTH__PASSWORD_FILE:-}
if [ -n "$file" ] && [ ! -s "$file" ] && [ -n "$users" ]; then
  mkdir -p "$(dirname "$file")"
  for pair in $users; do
    broker passwd "$file" "${pair%%:*}" --password "${pair#*:}"
  done
fi
exec broker "$@"
