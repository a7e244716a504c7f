#!/bin/sh
# Entrypoint of the apache/kafka stand-in. Like the official image: every KAFKA_* variable
# (except the JVM ones) becomes a server property (prefix dropped, lower case, "___" -> "-",
# "__" -> "_", "_" -> "."); CLUSTER_ID formats the KRaft storage on first start.
set -eu
props=/opt/kafka/config/server.properties
: > "$props"
env | grep '^KAFKA_' | grep -Ev '^KAFKA_(HEAP_OPTS|OPTS|JVM_PERFORMANCE_OPTS|LOG4J_OPTS|GC_LOG_OPTS|JMX_OPTS)=' \
  | while IFS='=' read -r name value; do
      key=$(printf '%s' "${name#KAFKA_}" | tr 'A-Z' 'a-z' | sed -e 's/___/-/g' -e 's/__/@/g' -e 's/_/./g' -e 's/@/_/g')
      printf '%s=%s\n' "$key" "$value" >> "$props"
    done
data=${KAFKA_LOG_DIRS:-/var/lib/kafka/data}
if [ ! -f "$data/meta.properties" ]; then
  /opt/kafka/bin/kafka-tool.sh kafka.tools.StorageTool format --ignore-formatted \
    --cluster-id "${CLUSTER_ID:?CLUSTER_ID is required to format the storage}" --config "$props"
fi
# shellcheck disable=SC2086  # KAFKA_HEAP_OPTS holds several flags
exec java ${KAFKA_HEAP_OPTS:--Xmx1g} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
  -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties \
  -cp '/opt/kafka/libs/*' kafka.Kafka "$props"
