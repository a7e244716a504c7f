#!/bin/sh
# secret-env CMD [ARGS...]: for every variable NAME_PASSWORD_FILE, exports NAME_PASSWORD with the
# content of that file (the *_FILE convention of official images), unsets NAME_PASSWORD_FILE, and
# runs CMD. The demo's truck-sim and ui read their generated MQTT passwords this way.
set -eu
for var in $(env | sed -n 's/^\([A-Za-z0-9_]*_PASSWORD\)_FILE=.*/\1/p'); do
  eval "path=\${${var}_FILE}"
  # shellcheck disable=SC2154  # set by the eval above
  if [ ! -r "$path" ]; then
    echo "secret-env: ${var}_FILE=$path is not readable" >&2
    exit 1
  fi
  value=$(cat "$path")
  export "$var=$value"
  unset "${var}_FILE"
done
exec "$@"
