#!/bin/sh
# Entrypoint of the broker image.
#
#   broker-entrypoint init-users   (the compose service mqtt-users) on first start: a password for
#                                  each user of DEMO_MQTT_USERS, random unless given, into
#                                  LODESTREAM_AUTH__PASSWORD_FILE (argon2 hashes, `broker passwd`)
#                                  and NAME.password beside it, printed once; later starts only
#                                  say that the users exist. Exit 0.
#   broker-entrypoint ARGS...      runs the broker; when DEMO_MQTT_USERS is set and the password
#                                  file is missing, creates those users first (as before: the
#                                  broker image used on its own).
#
#   DEMO_MQTT_USERS                "name[:password] ..."; a name alone gets a random password
#   LODESTREAM_AUTH__PASSWORD_FILE where the users go
#
# (Not LODESTREAM_*: every LODESTREAM_* variable is a broker configuration key.)
set -eu
users=${DEMO_MQTT_USERS-}
file=${LODESTREAM_AUTH__PASSWORD_FILE:-}

# 24 random characters from [A-Za-z0-9]: about 140 bits.
random_password() {
  tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 24
}

create_users() {
  dir=$(dirname "$file")
  mkdir -p "$dir"
  printed=""
  for entry in $users; do
    name=${entry%%:*}
    case "$entry" in *:*) password=${entry#*:} ;; *) password=$(random_password) ;; esac
    broker passwd "$file.tmp" "$name" --password "$password" > /dev/null
    # Readable by the demo's other containers (same uid 10001), which read their own password.
    (umask 077 && printf '%s' "$password" > "$dir/$name.password")
    printed="$printed  $name  $password\n"
  done
  mv "$file.tmp" "$file"
  printf 'MQTT users of this demo, created now (printed only this once; kept in %s):\n%b' "$dir" "$printed"
}

if [ "${1:-}" = init-users ]; then
  [ -n "$file" ] || { echo "init-users: LODESTREAM_AUTH__PASSWORD_FILE is not set" >&2; exit 1; }
  if [ -s "$file" ]; then
    echo "MQTT users exist (created at first start; their passwords were printed then, and are in $(dirname "$file")/NAME.password)"
  elif [ -z "$users" ]; then
    echo "init-users: DEMO_MQTT_USERS is empty, no users created"
  else
    create_users
  fi
  exit 0
fi
if [ -n "$file" ] && [ ! -s "$file" ] && [ -n "$users" ]; then
  create_users > /dev/null
fi
exec broker "$@"
