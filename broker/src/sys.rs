//! `$SYS` topics: the broker's figures as retained MQTT messages, with
//! Mosquitto's names where one exists (`$SYS/broker/clients/connected`, ...).
//!
//! Every `sys.interval_s` (default 10 s; 0 turns `$SYS` off) each node
//! publishes its own figures under `$SYS/broker/nodes/<node id>/<name>`,
//! read from the same counters `/metrics` serves (see [`FIGURES`] for
//! which). They are retained and expire after three intervals, so a node
//! that stops publishing drops out of the cluster within that time.
//!
//! Cluster totals under `$SYS/broker/<name>` are formed from what the nodes
//! published: every node sees the others' per-node figures in its copy of
//! the retained topic, and the live node with the smallest id publishes the
//! totals (its own current figures plus the others' latest). How each figure
//! combines is its [`Combine`]: counts add up (`clients/maximum` is then the
//! sum of each node's peak, an upper bound of the cluster's simultaneous
//! peak), `retained messages/count` is the same cluster-wide figure on every
//! node, the produce latency is the average weighted by each node's produce
//! count. Counters of a node that restarts start again from 0, as in
//! Mosquitto.
//!
//! The publishing node also deletes (empty retained payload) the expired
//! figures of departed nodes, so node ids that come and go (random ones,
//! by default) do not pile up in the retained topic.
//!
//! Reading `$SYS` is a subscription like any other, so the authorization
//! rules apply; and [MQTT-4.7.2-1] a filter starting with `#` or `+` never
//! matches a `$SYS` topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lodestream_mqtt::{Properties, QoS};
use serde::{Deserialize, Serialize};

use crate::message::Message;
use crate::metrics::Metrics;
use crate::node::{now_ms, Node};
use crate::retained::RetainedStore;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SysConfig {
    /// Seconds between two publications of the `$SYS` topics; 0 = off.
    pub interval_s: u64,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig { interval_s: 10 }
    }
}

pub const ROOT: &str = "$SYS/broker";

/// How a node figure combines into the cluster figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    Sum,
    /// The same cluster-wide value on every node: the largest is the newest.
    Max,
    /// Average weighted by the figure at this index of [`FIGURES`].
    WeightedBy(usize),
}

/// Every published figure: topic under `$SYS/broker[/nodes/<id>]`, how it
/// combines, and (in the help) the `/metrics` series it is read from.
pub const FIGURES: [(&str, Combine); 13] = [
    ("clients/connected", Combine::Sum),    // lodestream_connections
    ("clients/disconnected", Combine::Sum), // lodestream_sessions - lodestream_connections
    ("clients/maximum", Combine::Sum),      // lodestream_connections_max
    ("clients/total", Combine::Sum),        // lodestream_sessions
    ("messages/received", Combine::Sum),    // lodestream_packets_received_total{type="publish"}
    ("messages/sent", Combine::Sum),        // lodestream_packets_sent_total{type="publish"}
    ("bytes/received", Combine::Sum),       // lodestream_bytes_received_total
    ("bytes/sent", Combine::Sum),           // lodestream_bytes_sent_total
    ("subscriptions/count", Combine::Sum),  // lodestream_subscriptions
    ("retained messages/count", Combine::Max), // lodestream_retained_messages
    ("kafka/produce/count", Combine::Sum),  // lodestream_publish_to_kafka_seconds_count
    // 1000 * lodestream_publish_to_kafka_seconds_sum / _count (0 before any)
    ("kafka/produce/latency/avg_ms", Combine::WeightedBy(10)),
    ("kafka/consumer/lag", Combine::Sum), // sum of lodestream_kafka_consumer_lag
];

/// One node's figures, in the order of [`FIGURES`].
#[derive(Debug, Clone, PartialEq)]
pub struct Figures(pub [f64; FIGURES.len()]);

impl Figures {
    /// The node's figures now (call [`Metrics::refresh`] first).
    pub fn read(m: &Metrics) -> Figures {
        use prometheus::core::Collector;
        let connected = m.connections.get() as f64;
        let sessions = m.sessions.get() as f64;
        let h = &m.publish_to_kafka_seconds;
        let count = h.get_sample_count() as f64;
        let avg_ms = if count > 0.0 {
            1000.0 * h.get_sample_sum() / count
        } else {
            0.0
        };
        let lag: i64 = m
            .consumer_lag
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|s| s.get_gauge().get_value() as i64)
            .sum();
        Figures([
            connected,
            (sessions - connected).max(0.0),
            m.connections_max.get() as f64,
            sessions,
            m.packets_in.with_label_values(&["publish"]).get() as f64,
            m.packets_out.with_label_values(&["publish"]).get() as f64,
            m.bytes_in.get() as f64,
            m.bytes_out.get() as f64,
            m.subscriptions.get() as f64,
            m.retained_messages.get() as f64,
            count,
            avg_ms,
            lag as f64,
        ])
    }

    /// A node's figures from its published payloads; `None` when one is
    /// missing or not a number (a node mid-way through publishing).
    pub fn parse(payload_of: impl Fn(&str) -> Option<Bytes>) -> Option<Figures> {
        let mut v = [0.0; FIGURES.len()];
        for (slot, (name, _)) in v.iter_mut().zip(FIGURES) {
            let p = payload_of(name)?;
            *slot = std::str::from_utf8(&p).ok()?.trim().parse().ok()?;
        }
        Some(Figures(v))
    }

    /// The cluster's figures from every live node's.
    pub fn combine(nodes: &[Figures]) -> Figures {
        let mut out = [0.0; FIGURES.len()];
        for (i, (_, how)) in FIGURES.iter().enumerate() {
            out[i] = match how {
                Combine::Sum => nodes.iter().map(|n| n.0[i]).sum(),
                Combine::Max => nodes.iter().map(|n| n.0[i]).fold(0.0, f64::max),
                Combine::WeightedBy(w) => {
                    let weight: f64 = nodes.iter().map(|n| n.0[*w]).sum();
                    if weight > 0.0 {
                        nodes.iter().map(|n| n.0[i] * n.0[*w]).sum::<f64>() / weight
                    } else {
                        0.0
                    }
                }
            };
        }
        Figures(out)
    }
}

/// Integers without a fraction, others with three decimals.
pub fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

/// A node id as one topic level: characters that would change the topic's
/// structure become `_`.
pub fn node_level(id: &str) -> String {
    id.chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// `(topic, payload)` of one node's publication.
pub fn node_topics(node: &str, f: &Figures, uptime: Duration) -> Vec<(String, String)> {
    let base = format!("{ROOT}/nodes/{}", node_level(node));
    let mut out: Vec<(String, String)> = FIGURES
        .iter()
        .zip(f.0)
        .map(|((name, _), v)| (format!("{base}/{name}"), format_value(v)))
        .collect();
    out.push((
        format!("{base}/uptime"),
        format!("{} seconds", uptime.as_secs()),
    ));
    out.push((format!("{base}/version"), version()));
    out
}

/// `(topic, payload)` of the cluster totals.
pub fn cluster_topics(total: &Figures, nodes: usize) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = FIGURES
        .iter()
        .zip(total.0)
        .map(|((name, _), v)| (format!("{ROOT}/{name}"), format_value(v)))
        .collect();
    out.push((format!("{ROOT}/nodes/count"), nodes.to_string()));
    out.push((format!("{ROOT}/version"), version()));
    out
}

fn version() -> String {
    format!("lodestream {}", env!("CARGO_PKG_VERSION"))
}

/// The other live nodes' latest figures, by node level, from the retained
/// store (expired ones, i.e. nodes silent for three intervals, are gone).
pub fn peers(retained: &RetainedStore, own: &str, now: i64) -> Vec<(String, Figures)> {
    let mut out = Vec::new();
    let probe = format!("{ROOT}/nodes/+/{}", FIGURES[0].0);
    for m in retained.matching(&probe, now) {
        let Some(id) = m.topic.split('/').nth(3) else {
            continue;
        };
        if id == own {
            continue;
        }
        let prefix = format!("{ROOT}/nodes/{id}/");
        let found = retained.matching(&format!("{prefix}#"), now);
        let figures = Figures::parse(|name| {
            found
                .iter()
                .find(|m| m.topic.strip_prefix(&prefix) == Some(name))
                .map(|m| m.payload.clone())
        });
        if let Some(f) = figures {
            out.push((id.to_string(), f));
        }
    }
    out
}

/// Publishes the `$SYS` topics every `sys.interval_s` until shutdown.
pub async fn run(node: Arc<Node>) {
    let every = node.config().sys.interval_s;
    if every == 0 {
        return;
    }
    let started = Instant::now();
    let own = node_level(&node.config().node_id);
    let mut shutdown = node.shutting_down();
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let expiry = u32::try_from(every.saturating_mul(3)).unwrap_or(u32::MAX);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        node.metrics().refresh(node.retained().len());
        let mine = Figures::read(node.metrics());
        let mut topics = node_topics(&own, &mine, started.elapsed());
        let peers = peers(node.retained(), &own, now_ms());
        if peers.iter().all(|(id, _)| id.as_str() > own.as_str()) {
            let mut all: Vec<Figures> = peers.into_iter().map(|(_, f)| f).collect();
            all.push(mine);
            topics.extend(cluster_topics(&Figures::combine(&all), all.len()));
            let gone = node
                .retained()
                .expired(&format!("{ROOT}/nodes/#"), now_ms());
            topics.extend(gone.into_iter().map(|t| (t, String::new())));
        }
        publish(&node, topics, expiry).await;
    }
}

/// Writes retained QoS 0 messages through Kafka like any PUBLISH (so every
/// node's subscribers and retained copy get them), without counting them as
/// client produce latency. Failures are logged: the next interval retries.
async fn publish(node: &Node, topics: Vec<(String, String)>, expiry_s: u32) {
    for (topic, payload) in topics {
        let msg = Arc::new(Message {
            topic,
            payload: Bytes::from(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties {
                message_expiry_interval: Some(expiry_s),
                ..Properties::default()
            }
            .into(),
            publisher: None,
            timestamp_ms: now_ms(),
        });
        let sent = match node.send(&msg, None, crate::kafka::Lane::Batch).await {
            Ok(sent) => sent.delivered().await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => node.retained().apply(msg),
            Err(e) => {
                tracing::warn!(topic = %msg.topic, error = %e, "$SYS publication failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(f: impl Fn(usize) -> f64) -> Figures {
        let mut v = [0.0; FIGURES.len()];
        for (i, slot) in v.iter_mut().enumerate() {
            *slot = f(i);
        }
        Figures(v)
    }

    #[test]
    fn published_payloads_parse_back_to_the_same_figures() {
        let f = figures(|i| i as f64 * 1.5);
        let topics = node_topics("n1", &f, Duration::from_secs(7));
        let parsed = Figures::parse(|name| {
            topics
                .iter()
                .find(|(t, _)| t == &format!("$SYS/broker/nodes/n1/{name}"))
                .map(|(_, p)| Bytes::from(p.clone()))
        });
        assert_eq!(parsed, Some(f));
        assert!(topics.contains(&("$SYS/broker/nodes/n1/uptime".into(), "7 seconds".into())));
        assert_eq!(Figures::parse(|_| None), None);
    }

    #[test]
    fn cluster_figures_sum_counts_keep_shared_ones_and_weigh_latency() {
        let idx = |name: &str| FIGURES.iter().position(|(n, _)| *n == name).unwrap();
        let (conn, retained) = (idx("clients/connected"), idx("retained messages/count"));
        let (count, lat) = (
            idx("kafka/produce/count"),
            idx("kafka/produce/latency/avg_ms"),
        );
        let mut a = figures(|_| 0.0);
        let mut b = figures(|_| 0.0);
        (a.0[conn], b.0[conn]) = (2.0, 3.0);
        (a.0[retained], b.0[retained]) = (10.0, 11.0);
        (a.0[count], b.0[count]) = (100.0, 300.0);
        (a.0[lat], b.0[lat]) = (4.0, 8.0);
        let t = Figures::combine(&[a, b]);
        assert_eq!(t.0[conn], 5.0);
        assert_eq!(t.0[retained], 11.0);
        assert_eq!(t.0[count], 400.0);
        assert_eq!(t.0[lat], 7.0);
        assert_eq!(Figures::combine(&[]).0[lat], 0.0);
    }

    #[test]
    fn node_ids_cannot_change_the_topic_structure() {
        assert_eq!(node_level("a/b+#"), "a_b__");
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(2.5), "2.500");
    }
}
