#!/bin/sh
# kafka-tool.sh CLASS ARGS...: one Kafka CLI tool, as the official bin/kafka-*.sh scripts run them.
set -eu
cls=$1; shift
exec java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
  -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties -Dlog4j2.level=WARN \
  -cp '/opt/kafka/libs/*' "$cls" "$@"
