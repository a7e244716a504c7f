# Stand-in for apache/kafka (built by scripts/compose-images; see docs/demo.md).
# Kafka's jars from Maven Central (the ones scripts/kafka-local fetched), Java from Debian, and
# an entrypoint that reads the same KAFKA_* variables as the official image's.
FROM debian:bookworm-slim
COPY debian-apt.sh /usr/local/bin/debian-apt
RUN debian-apt openjdk-17-jre-headless \
 && useradd --system --uid 1000 --user-group --home-dir /opt/kafka appuser \
 && mkdir -p /var/lib/kafka/data /opt/kafka/config \
 && chown -R appuser:appuser /var/lib/kafka /opt/kafka
COPY libs/ /opt/kafka/libs/
COPY kafka-standin.sh /opt/kafka/bin/kafka-standin.sh
COPY kafka-tool.sh /opt/kafka/bin/kafka-tool.sh
COPY log4j2.properties /opt/kafka/config/log4j2.properties
# The official image's CLI scripts that docker-compose.yml and docs/demo.md call.
RUN cd /opt/kafka/bin \
 && for t in broker-api-versions:org.apache.kafka.tools.BrokerApiVersionsCommand \
             topics:org.apache.kafka.tools.TopicCommand \
             consumer-groups:org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
             console-consumer:org.apache.kafka.tools.consumer.ConsoleConsumer \
             console-producer:org.apache.kafka.tools.ConsoleProducer \
             storage:kafka.tools.StorageTool; do \
      printf '#!/bin/sh\nexec /opt/kafka/bin/kafka-tool.sh %s "$@"\n' "${t#*:}" > "kafka-${t%%:*}.sh"; \
    done \
 && chmod 755 /opt/kafka/bin/*.sh
USER appuser
VOLUME /var/lib/kafka/data
EXPOSE 9092
ENTRYPOINT ["/opt/kafka/bin/kafka-standin.sh"]
