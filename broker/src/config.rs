//! Broker configuration: defaults, then a TOML file, then environment
//! variables (`LODESTREAM_SECTION__KEY`, e.g. `LODESTREAM_KAFKA__BOOTSTRAP_SERVERS`,
//! and `LODESTREAM_NODE_ID`), then command-line flags, each a figment layer.
//! `Config::validate` runs once, turns every mistake into one clear message
//! before any socket is opened, and returns the `Validated` configuration
//! the node starts from. An empty string disables an optional address or
//! file (so environment variables and flags can switch one off).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::mapping::{valid_kafka_topic, Mapping, MappingError, Rule};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Mapping(#[from] MappingError),
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unique per node; a random one is generated when empty.
    pub node_id: String,
    pub listeners: Listeners,
    pub kafka: KafkaConfig,
    pub mqtt: MqttLimits,
    pub log: LogConfig,
    pub auth: crate::auth::AuthConfig,
    pub acl: AclConfig,
    pub tls: crate::transport::TlsConfig,
    pub ws: crate::transport::WsConfig,
    pub sys: crate::sys::SysConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Authorization rules file (TOML, see docs/examples/acl.toml); none =
    /// every client may publish and subscribe to everything.
    #[serde(deserialize_with = "empty_is_none")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Listeners {
    /// Plain MQTT over TCP; none (or "") disables it.
    #[serde(deserialize_with = "empty_is_none")]
    pub tcp: Option<SocketAddr>,
    /// MQTT over TLS (needs `[tls]`); none disables it.
    #[serde(deserialize_with = "empty_is_none")]
    pub tls: Option<SocketAddr>,
    /// MQTT over WebSocket (path `[ws] path`); none disables it.
    #[serde(deserialize_with = "empty_is_none")]
    pub ws: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS (needs `[tls]`); none disables it.
    #[serde(deserialize_with = "empty_is_none")]
    pub wss: Option<SocketAddr>,
    /// Prometheus `/metrics`, `/health`, `/ready`; none disables it.
    #[serde(deserialize_with = "empty_is_none")]
    pub metrics: Option<SocketAddr>,
    /// Every MQTT connection (tcp, tls, ws, wss) starts with a PROXY
    /// protocol v1/v2 header naming the client (HAProxy `send-proxy`);
    /// connections without one are closed. Enable only behind such a proxy.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// Where PUBLISHes that match no rule go.
    pub default_topic: String,
    /// Ordered `kafkaTopic:mqttPattern` rules; first match wins. Also accepts
    /// one comma-separated string (handy in environment variables).
    #[serde(deserialize_with = "rules_from_list_or_csv")]
    pub mappings: Vec<String>,
    /// Compacted topic holding retained messages (key = MQTT topic).
    pub retained_topic: String,
    /// Compacted topic holding session state (key = client id).
    pub sessions_topic: String,
    /// Compacted topic of node heartbeats (key = node id).
    pub nodes_topic: String,
    pub heartbeat_interval_ms: u64,
    /// A node silent this long is dead: a survivor adopts its sessions and
    /// publishes their wills.
    pub node_timeout_ms: u64,
    /// Create missing message/retained topics at start-up.
    pub create_topics: bool,
    pub topic_partitions: i32,
    /// Replication of created topics; 0 = decided from the cluster: 3 (with
    /// `min.insync.replicas` 2) when Kafka has at least 3 brokers, else the
    /// broker count.
    pub replication_factor: i32,
    /// The batch lane's linger (ms): a batching window each record waits
    /// out. PUBLISHes take the fast lane instead (no linger, one request in
    /// flight) while the node publishes under `fast_lane_below` msg/s, or
    /// when their client is paced by the acknowledgements (`kafka/lanes.rs`).
    pub linger_ms: u32,
    /// The batch lane's produce requests in flight per Kafka broker
    /// connection (librdkafka `max.in.flight.requests.per.connection`, 1-5
    /// with idempotence).
    pub max_in_flight: u32,
    /// Node-wide msg/s under which PUBLISHes skip the linger (0: never, one
    /// producer). Above it the linger saves CPU (docs/benchmarks.md).
    pub fast_lane_below: u32,
    /// While every PUBLISH of the node takes the batch lane at 200 msg/s or
    /// more, a worker pauses this long (µs) before it sleeps, so that one
    /// wake-up handles what arrives meanwhile (`kafka/wake_pause.rs`); adds
    /// up to about three times this to those PUBACKs. 0: never; at most
    /// 10,000.
    pub wake_pause_us: u32,
    /// How long a produce may take before it fails (and the QoS>0 PUBLISH
    /// stays unacknowledged).
    pub delivery_timeout_ms: u32,
    /// Consumer `fetch.wait.max.ms`: how long Kafka holds a fetch that finds
    /// no new record. Kafka answers as soon as a record arrives, so this does
    /// not add latency; a short wait only makes idle readers poll more
    /// (measured: same end-to-end p50/p99 at 20 and 500 ms).
    pub fetch_wait_max_ms: u32,
    /// How long a fan-out fetch may wait for more records while its topic's
    /// records arrive at 4 MiB/s or more (0: never waits). Under load it
    /// saves a fetch, its wake-ups and a write per subscriber for every few
    /// records (`kafka/fetch/pace.rs`); below that rate nothing waits.
    pub fetch_busy_wait_ms: u32,
    /// Fan-out readers use the broker's own fetch client (`kafka/fetch/`)
    /// when Kafka is reached over plaintext; `false` keeps librdkafka's
    /// consumer for them too. TLS or SASL to Kafka always uses librdkafka.
    pub native_fetch: bool,
    /// Messages (and retained messages) are written by the broker's own
    /// idempotent producer (`kafka/produce/`, docs/own-producer.md) when
    /// Kafka is reached over plaintext: one request per Kafka broker for
    /// all its partitions, no producer threads. `false`: librdkafka, with
    /// its two lanes. Session records always go through librdkafka.
    pub own_producer: bool,
    /// Extra librdkafka properties, applied to producer and consumers.
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttLimits {
    /// Largest packet accepted from a client, bytes (fixed header included).
    pub max_packet_size: u32,
    /// Inbound QoS 1/2 PUBLISHes a client may have unacknowledged; advertised
    /// as MQTT 5 Receive Maximum, exceeding it is a protocol error (0x93).
    /// Also the bound on a connection's QoS 0 writes awaiting Kafka: past
    /// it the connection's socket is not read until one is over.
    pub receive_maximum: u16,
    /// Outbound QoS 1/2 deliveries in flight per client when the client does
    /// not ask for less (v3 clients get this many).
    pub max_inflight_out: u16,
    /// Messages queued per session between Kafka fan-out and the socket. At
    /// the limit the session leaves fan-out and reads Kafka itself from the
    /// first message that did not fit, until it has caught up (nothing is
    /// dropped); see `max_lagging_sessions`.
    pub session_queue: usize,
    /// Sessions of this node reading Kafka themselves at once because their
    /// queue overflowed; each is one librdkafka consumer (threads, a small
    /// fetch buffer). Past it an overflow drops (counted): QoS 0 quietly, a
    /// QoS 1/2 message by closing the connection with 0x97 (quota exceeded)
    /// so the client knows; its session resumes from its stored offsets.
    pub max_lagging_sessions: usize,
    pub max_connections: usize,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_s: u64,
    /// Upper bound for a session's expiry interval (s); 3.1.1 persistent
    /// sessions get this value.
    pub max_session_expiry_s: u32,
    /// Server Keep Alive imposed on v5 clients asking for more (0 = accept).
    pub max_keep_alive_s: u16,
    pub topic_alias_maximum: u16,
    pub max_topic_levels: usize,
    pub max_subscriptions_per_client: usize,
    /// Members of cluster-wide shared subscriptions (`$share/<g>/<f>`) on
    /// this node; each is one Kafka consumer-group member (a librdkafka
    /// client with its own threads). Past it, SUBACK 0x97 (quota exceeded).
    pub max_shared_members: usize,
    /// Seconds a write to a client may block before it is disconnected.
    pub write_timeout_s: u64,
    /// PUBLISH packets per second a client may send (0 = unlimited). Over
    /// the rate the connection is simply not read until tokens refill
    /// (TCP back-pressure): nothing is dropped, nobody is disconnected.
    pub max_publish_rate: u32,
    /// Persistent sessions remembered by this node (bounded map).
    pub max_sessions: usize,
    /// Deliveries to a persistent session that no session write in Kafka
    /// covers yet, plus the unacknowledged ones the last write records
    /// (both are re-sent after a crash); at the limit deliveries to it pause
    /// until the next write lands. Bounds what a node's death re-delivers (about this many plus
    /// what is in flight) at a cost in per-session throughput (this many per
    /// session-write latency). 0: unbounded (a death re-delivers what
    /// arrived during one or two session writes, at least 16).
    pub max_unsaved_deliveries: usize,
    /// Replay on subscribe (`replay.rs`): how far back (s) a replay may
    /// reach; an older start is clipped to it (SUBACK reason string says
    /// so). 0 turns replay off (SUBACK 0x83).
    pub replay_max_lookback_s: u64,
    /// Records one replay may read (summed over the Kafka partitions its
    /// filter reads, matching or not); a bigger request is refused with
    /// SUBACK 0x97 before anything is read.
    pub replay_max_records: u64,
    /// Records per second the replays of one connection read together from
    /// their history, up to the high watermarks at SUBSCRIBE (0 =
    /// unlimited); over it the read waits, nothing is dropped. Past the
    /// history a replay chases live messages unpaced, so it reaches live.
    pub replay_rate: u32,
    /// Replays running at once per connection; one more is refused with
    /// SUBACK 0x97.
    pub replay_max_concurrent: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` env-filter syntax, e.g. `info,lodestream_broker=debug`.
    pub level: String,
    pub json: bool,
}

impl Default for Listeners {
    fn default() -> Self {
        // Same default ports as the broker this one replaces: MQTT 1883, monitoring 1884.
        let any = |port: u16| Some(SocketAddr::from(([0, 0, 0, 0], port)));
        Listeners {
            tcp: any(1883),
            tls: None,
            // Same WebSocket port as the broker this one replaces.
            ws: any(1893),
            wss: None,
            metrics: any(1884),
            proxy_protocol: false,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            default_topic: "mqtt_messages".into(),
            mappings: Vec::new(),
            retained_topic: "lodestream.retained".into(),
            sessions_topic: "lodestream.sessions".into(),
            nodes_topic: "lodestream.nodes".into(),
            heartbeat_interval_ms: 1000,
            node_timeout_ms: 10_000,
            create_topics: true,
            topic_partitions: 3,
            replication_factor: 0,
            linger_ms: 5,
            max_in_flight: 5,
            fast_lane_below: 2000,
            wake_pause_us: 2000,
            delivery_timeout_ms: 30_000,
            fetch_wait_max_ms: 500,
            fetch_busy_wait_ms: 20,
            native_fetch: true,
            own_producer: true,
            properties: BTreeMap::new(),
        }
    }
}

impl Default for MqttLimits {
    fn default() -> Self {
        MqttLimits {
            max_packet_size: 1024 * 1024,
            receive_maximum: 256,
            max_inflight_out: 64,
            session_queue: 1000,
            max_lagging_sessions: 32,
            max_connections: 200_000,
            connect_timeout_s: 10,
            max_session_expiry_s: 7 * 24 * 3600,
            max_keep_alive_s: 0,
            topic_alias_maximum: 64,
            max_topic_levels: 32,
            max_subscriptions_per_client: 256,
            max_shared_members: 64,
            write_timeout_s: 30,
            max_publish_rate: 0,
            max_sessions: 1_000_000,
            max_unsaved_deliveries: 0,
            replay_max_lookback_s: 24 * 3600,
            replay_max_records: 100_000,
            replay_rate: 10_000,
            replay_max_concurrent: 4,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            json: false,
        }
    }
}

/// An optional value written as a string; "" means none. The error names
/// the value, and figment adds the key.
pub(crate) fn empty_is_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}"))),
    }
}

/// A configuration that passed `Config::validate`, with what validation
/// built from it. The node starts only from this.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    pub mapping: Mapping,
}

fn rules_from_list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match ListOrCsv::deserialize(d)? {
        ListOrCsv::List(v) => v,
        ListOrCsv::Csv(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

impl Config {
    /// Defaults <- optional TOML file <- `LODESTREAM_*` environment <-
    /// `flags`, the command-line layer (`Serialized::defaults(cli)` with the
    /// config's key names; `Figment::new()` for none).
    pub fn load(file: Option<&Path>, flags: impl figment::Provider) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        // A setting is `LODESTREAM_<SECTION>__<KEY>` (or the one top-level
        // scalar, `LODESTREAM_NODE_ID`); other `LODESTREAM_*` variables
        // belong to other programs (`LODESTREAM_CONFIG`, `LODESTREAM_UI_*`).
        fig = fig.merge(
            Env::prefixed("LODESTREAM_")
                .filter(|k| k.as_str().contains("__") || k == "node_id")
                .split("__"),
        );
        fig = fig.merge(flags);
        let cfg: Config = fig.extract().map_err(Box::new)?;
        Ok(cfg)
    }

    /// Checks cross-field rules and builds the topic mapping; the only way
    /// to a `Validated` configuration.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        let mapping = self.check()?;
        Ok(Validated {
            config: self,
            mapping,
        })
    }

    fn check(&self) -> Result<Mapping, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let l = &self.listeners;
        if (l.tls.is_some() || l.wss.is_some())
            && (self.tls.cert.is_none() || self.tls.key.is_none())
        {
            return bad("listeners.tls / listeners.wss need tls.cert and tls.key".into());
        }
        if self.ws.max_message_size < self.mqtt.max_packet_size as usize {
            return bad(format!(
                "ws.max_message_size ({}) must be at least mqtt.max_packet_size ({})",
                self.ws.max_message_size, self.mqtt.max_packet_size
            ));
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return bad("kafka.bootstrap_servers is empty".into());
        }
        // librdkafka refuses more than 5 with idempotence (ordering).
        if !(1..=5).contains(&self.kafka.max_in_flight) {
            return bad("kafka.max_in_flight must be 1 to 5 (idempotent producer)".into());
        }
        // A pause is latency added to PUBACKs: bounded well under a second.
        if self.kafka.wake_pause_us > 10_000 {
            return bad("kafka.wake_pause_us must be at most 10000".into());
        }
        for (name, t) in [
            ("kafka.default_topic", &self.kafka.default_topic),
            ("kafka.retained_topic", &self.kafka.retained_topic),
            ("kafka.sessions_topic", &self.kafka.sessions_topic),
            ("kafka.nodes_topic", &self.kafka.nodes_topic),
        ] {
            if !valid_kafka_topic(t) {
                return bad(format!("{name} = {t:?} is not a valid Kafka topic name"));
            }
        }
        let m = &self.mqtt;
        if m.max_packet_size < 64 || m.max_packet_size > 268_435_460 {
            return bad(format!(
                "mqtt.max_packet_size = {} must be within 64..=268435460",
                m.max_packet_size
            ));
        }
        if m.receive_maximum == 0 || m.max_inflight_out == 0 {
            return bad("mqtt.receive_maximum and mqtt.max_inflight_out must be at least 1".into());
        }
        if m.session_queue == 0 || m.max_connections == 0 || m.max_sessions == 0 {
            return bad(
                "mqtt.session_queue, max_connections and max_sessions must be at least 1".into(),
            );
        }
        if self.kafka.topic_partitions < 1 || self.kafka.replication_factor < 0 {
            return bad(
                "kafka.topic_partitions must be at least 1, kafka.replication_factor at least 0 (auto)"
                    .into(),
            );
        }
        let rules = self
            .kafka
            .mappings
            .iter()
            .map(|r| Rule::parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Mapping::new(rules, self.kafka.default_topic.clone()))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let v = Config::default().validate().unwrap();
        assert_eq!(v.mapping.default_topic(), "mqtt_messages");
    }

    #[test]
    fn toml_and_env_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "b.toml",
                r#"
                node_id = "n1"
                [kafka]
                default_topic = "d"
                mappings = ["k1:cars/speed/+", "k2:cars/#"]
                [mqtt]
                receive_maximum = 10
                "#,
            )?;
            jail.set_env("LODESTREAM_MQTT__SESSION_QUEUE", "7");
            jail.set_env("LODESTREAM_KAFKA__MAPPINGS", "a:x/#,b:y/+");
            jail.set_env("LODESTREAM_KAFKA", "127.0.0.1:9092");
            jail.set_env("LODESTREAM_CONFIG", "b.toml");
            jail.set_env("LODESTREAM_UI_MQTT_URL", "ws://x/mqtt");
            jail.set_env("LODESTREAM_LISTENERS__WS", "");
            let c = Config::load(Some(Path::new("b.toml")), Figment::new())
                .map_err(|e| e.to_string())?;
            assert_eq!(c.node_id, "n1");
            assert_eq!(c.mqtt.receive_maximum, 10);
            assert_eq!(c.mqtt.session_queue, 7);
            assert_eq!(c.kafka.mappings, vec!["a:x/#", "b:y/+"]);
            assert_eq!(c.listeners.ws, None);
            let v = c.validate().map_err(|e| e.to_string())?;
            assert_eq!(v.mapping.kafka_topic_for("y/1"), "b");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("b.toml", "[mqtt]\nrecieve_maximum = 3\n")?;
            let e = Config::load(Some(Path::new("b.toml")), Figment::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains("recieve_maximum"), "{e}");
            Ok(())
        });
        let mut c = Config::default();
        c.kafka.mappings = vec!["oops".into()];
        assert!(c.validate().unwrap_err().to_string().contains("oops"));
        for bad in [0, 6] {
            let mut c = Config::default();
            c.kafka.max_in_flight = bad;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("kafka.max_in_flight"), "{e}");
        }
        let mut c = Config::default();
        c.kafka.wake_pause_us = 10_001;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("kafka.wake_pause_us"), "{e}");
        figment::Jail::expect_with(|jail| {
            jail.set_env("LODESTREAM_LISTENERS__TCP", "localhost");
            let e = Config::load(None, Figment::new()).unwrap_err().to_string();
            assert!(
                e.to_lowercase().contains("listeners.tcp") && e.contains("localhost"),
                "{e}"
            );
            Ok(())
        });
        assert!(Config::load(Some(Path::new("/nonexistent.toml")), Figment::new()).is_err());
    }

    /// Flags are the last layer: a flag given wins over file and
    /// environment, a flag left out changes nothing.
    #[test]
    fn flags_override_environment_as_a_layer() {
        #[derive(Serialize)]
        struct Flags {
            listeners: BTreeMap<&'static str, &'static str>,
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("LODESTREAM_LISTENERS__TCP", "127.0.0.1:1");
            jail.set_env("LODESTREAM_NODE_ID", "from-env");
            let flags = Flags {
                listeners: BTreeMap::from([("tcp", "127.0.0.1:2"), ("metrics", "")]),
            };
            let c = Config::load(None, Serialized::defaults(flags)).map_err(|e| e.to_string())?;
            assert_eq!(c.listeners.tcp, Some("127.0.0.1:2".parse().unwrap()));
            assert_eq!(c.listeners.metrics, None);
            assert_eq!(c.node_id, "from-env");
            Ok(())
        });
    }
}
