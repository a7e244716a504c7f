//! Prometheus metrics of one node. Names follow the `lodestream_` prefix;
//! counters end in `_total`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// `lodestream_packets_{received,sent}_total`: one counter per MQTT packet
/// type, looked up by a `match` on the type name. `IntCounterVec::
/// with_label_values` hashes the label and takes a lock on every call, and
/// these two are counted for every packet.
pub struct PacketCounters {
    vec: IntCounterVec,
    by_kind: [IntCounter; PACKET_KINDS.len()],
}

/// `lodestream_mqtt::Packet::kind` of every packet type.
const PACKET_KINDS: [&str; 15] = [
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

impl PacketCounters {
    fn new(r: &Registry, name: &str, help: &str) -> PacketCounters {
        let vec = counter_vec(r, name, help, &["type"]);
        let by_kind = PACKET_KINDS.map(|k| vec.with_label_values(&[k]));
        PacketCounters { vec, by_kind }
    }

    /// The counter of packet type `labels[0]` (same call as on an
    /// `IntCounterVec`, so call sites read the same).
    pub fn with_label_values(&self, labels: &[&str]) -> std::borrow::Cow<'_, IntCounter> {
        let i = match labels {
            [k] => PACKET_KINDS.iter().position(|p| p == k),
            _ => None,
        };
        match i {
            Some(i) => std::borrow::Cow::Borrowed(&self.by_kind[i]),
            // Not a packet type: counted all the same, the slow way.
            None => std::borrow::Cow::Owned(self.vec.with_label_values(labels)),
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub connect_rejected: IntCounterVec,
    pub sessions: IntGauge,
    pub subscriptions: IntGauge,
    /// Members of cluster-wide shared subscriptions on this node, and the
    /// Kafka partitions their consumer groups gave them.
    pub shared_members: IntGauge,
    /// Sessions reading Kafka because fan-out outran them, and how often
    /// one started to (`connection/lagging.rs`).
    pub lagging_sessions: IntGauge,
    pub lagging_total: IntCounterVec,
    pub shared_partitions: IntGauge,
    pub packets_in: PacketCounters,
    pub packets_out: PacketCounters,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub published_to_kafka: IntCounterVec,
    pub kafka_produce_errors: IntCounter,
    pub publish_to_kafka_seconds: Histogram,
    pub kafka_records_read: IntCounterVec,
    pub delivered: IntCounter,
    pub dropped_messages: IntCounterVec,
    pub auth_failures: IntCounter,
    pub publish_throttled: IntCounter,
    /// Pauses a worker took before sleeping (`kafka/wake_pause.rs`).
    pub wake_pauses: IntCounter,
    /// Replays on subscribe by result: `started` or why refused.
    pub replays: IntCounterVec,
    pub qos2_duplicates_suppressed: IntCounter,
    pub consumer_lag: prometheus::IntGaugeVec,
    pub disconnects: IntCounterVec,
    pub retry_give_ups: IntCounterVec,
    pub session_writes_abandoned: IntCounter,
    /// Highest `connections` since start; set from `peak` by [`Metrics::refresh`].
    pub connections_max: IntGauge,
    peak: std::sync::atomic::AtomicI64,
    pub retained_messages: IntGauge,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
    let g = prometheus::IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn publish_latency_histogram(r: &Registry) -> Histogram {
    let name = "lodestream_publish_to_kafka_seconds";
    let h = Histogram::with_opts(
        HistogramOpts::new(
            name,
            "Time from a QoS>0 PUBLISH received to Kafka's acknowledgement",
        )
        .buckets(vec![
            0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ]),
    )
    .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

/// How connections, retries and background writes ended (split from
/// [`Metrics::new`] to keep it short).
fn ending_metrics(r: &Registry) -> (IntCounterVec, IntCounterVec, IntCounter) {
    (
        counter_vec(
            r,
            "lodestream_disconnects_total",
            "Connections closed, by reason",
            &["reason"],
        ),
        counter_vec(
            r,
            "lodestream_retry_give_ups_total",
            "Operations given up after their last retry (retry.rs), by operation",
            &["what"],
        ),
        counter(
            r,
            "lodestream_session_writes_abandoned_total",
            "Background session-record writes given up after their last retry",
        ),
    )
}

/// Sessions fan-out outran, now reading Kafka themselves.
fn lagging_metrics(r: &Registry) -> (IntGauge, IntCounterVec) {
    (
        gauge(
            r,
            "lodestream_lagging_sessions",
            "Sessions whose queue overflowed, now reading Kafka themselves until caught up (one Kafka consumer each)",
        ),
        counter_vec(
            r,
            "lodestream_lagging_total",
            "Session queue overflows by outcome: read_kafka (nothing dropped) or refused (over mqtt.max_lagging_sessions: dropped)",
            &["result"],
        ),
    )
}

/// Cluster-wide shared subscriptions: members and their partitions.
fn shared_metrics(r: &Registry) -> (IntGauge, IntGauge) {
    (
        gauge(
            r,
            "lodestream_shared_members",
            "Members of cluster-wide shared subscriptions on this node (one Kafka consumer each)",
        ),
        gauge(
            r,
            "lodestream_shared_partitions",
            "Kafka partitions the shared subscriptions' consumer groups gave this node's members",
        ),
    )
}

/// Deliberate pauses: a client's rate limit, a worker's wake-up coalescing.
fn pause_metrics(r: &Registry) -> (IntCounter, IntCounter) {
    (
        counter(
            r,
            "lodestream_publish_throttled_total",
            "Times a client hit mqtt.max_publish_rate and its socket was paused",
        ),
        counter(
            r,
            "lodestream_wake_pauses_total",
            "Times a worker paused kafka.wake_pause_us before sleeping, to handle what arrives meanwhile in one wake-up",
        ),
    )
}

impl Metrics {
    /// Registration only fails on a programming error (duplicate or invalid
    /// name, fixed at compile time), hence the panics: they fire in every test.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let (disconnects, retry_give_ups, session_writes_abandoned) = ending_metrics(&r);
        let (shared_members, shared_partitions) = shared_metrics(&r);
        let (lagging_sessions, lagging_total) = lagging_metrics(&r);
        let (publish_throttled, wake_pauses) = pause_metrics(&r);
        Metrics {
            shared_members,
            lagging_sessions,
            lagging_total,
            shared_partitions,
            connections: gauge(&r, "lodestream_connections", "Open MQTT connections"),
            connections_total: counter(
                &r,
                "lodestream_connections_total",
                "Accepted MQTT connections",
            ),
            connect_rejected: counter_vec(
                &r,
                "lodestream_connect_rejected_total",
                "CONNECTs refused, by reason",
                &["reason"],
            ),
            sessions: gauge(
                &r,
                "lodestream_sessions",
                "Sessions known to this node (online and offline)",
            ),
            subscriptions: gauge(
                &r,
                "lodestream_subscriptions",
                "Subscriptions held by this node",
            ),
            packets_in: PacketCounters::new(
                &r,
                "lodestream_packets_received_total",
                "MQTT packets received",
            ),
            packets_out: PacketCounters::new(
                &r,
                "lodestream_packets_sent_total",
                "MQTT packets sent",
            ),
            bytes_in: counter(&r, "lodestream_bytes_received_total", "MQTT bytes received"),
            bytes_out: counter(&r, "lodestream_bytes_sent_total", "MQTT bytes sent"),
            published_to_kafka: counter_vec(
                &r,
                "lodestream_published_to_kafka_total",
                "Records written to Kafka, by Kafka topic",
                &["topic"],
            ),
            kafka_produce_errors: counter(
                &r,
                "lodestream_kafka_produce_errors_total",
                "Kafka writes that failed (the PUBLISH was not acknowledged as success)",
            ),
            publish_to_kafka_seconds: publish_latency_histogram(&r),
            kafka_records_read: counter_vec(
                &r,
                "lodestream_kafka_records_read_total",
                "Records read from Kafka for fan-out, by Kafka topic",
                &["topic"],
            ),
            delivered: counter(
                &r,
                "lodestream_messages_delivered_total",
                "PUBLISHes sent to subscribers",
            ),
            dropped_messages: counter_vec(
                &r,
                "lodestream_messages_dropped_total",
                "Messages not delivered, by reason",
                &["reason"],
            ),
            qos2_duplicates_suppressed: counter(
                &r,
                "lodestream_qos2_duplicates_suppressed_total",
                "Retransmitted QoS 2 PUBLISHes found already written in Kafka after a session moved nodes",
            ),
            auth_failures: counter(
                &r,
                "lodestream_auth_failures_total",
                "Failed authentications",
            ),
            publish_throttled,
            wake_pauses,
            replays: counter_vec(
                &r,
                "lodestream_replays_total",
                "Replays on subscribe: started, or refused and why",
                &["result"],
            ),
            consumer_lag: gauge_vec(
                &r,
                "lodestream_kafka_consumer_lag",
                "Records in Kafka not yet read for fan-out, by Kafka topic (sum over partitions)",
                &["topic"],
            ),
            disconnects,
            retry_give_ups,
            session_writes_abandoned,
            connections_max: gauge(
                &r,
                "lodestream_connections_max",
                "Highest number of simultaneously open MQTT connections since start",
            ),
            peak: std::sync::atomic::AtomicI64::new(0),
            retained_messages: gauge(
                &r,
                "lodestream_retained_messages",
                "Retained messages (cluster-wide: every node holds them all)",
            ),
            registry: r,
        }
    }

    /// Counts an accepted connection and remembers the peak.
    pub fn connection_opened(&self) {
        self.connections.inc();
        self.peak
            .fetch_max(self.connections.get(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the gauges derived from other state; called before each scrape
    /// and each `$SYS` publication so both show the same.
    pub fn refresh(&self, retained: usize) {
        self.connections_max
            .set(self.peak.load(std::sync::atomic::Ordering::Relaxed));
        self.retained_messages
            .set(i64::try_from(retained).unwrap_or(i64::MAX));
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
