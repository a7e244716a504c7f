//! Everything that talks to Kafka: client settings, topic administration,
//! the shared producer and the per-topic readers. The rest of the broker
//! sees Kafka only through these types.

pub mod admin;
pub mod catchup;
mod consumer;
pub mod fetch;
pub mod lanes;
pub mod produce;
mod producer;
pub mod qos2_scan;
mod reader;
pub mod replay;
pub mod share_group;
pub mod wake_pause;

pub use admin::ensure_topics;
pub use lanes::{Lane, LanePolicy};
pub use producer::{DeliveryFuture, ProduceError, Produced, Producer, Sent};
pub use reader::{message_of, Record, StartAt, TopicReader};

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

/// Base librdkafka settings shared by every client of this node; user
/// properties from the config win over our defaults.
pub(crate) fn client_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", client_id)
        // Reconnect quickly after a Kafka restart.
        .set("reconnect.backoff.max.ms", "2000");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}
