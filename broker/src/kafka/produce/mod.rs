//! The broker's own idempotent producer (docs/own-producer.md): messages
//! on plaintext Kafka go through `own::OwnProducer` (`kafka.own_producer`);
//! `producer.rs` (librdkafka) writes everything else.

pub mod client;
pub mod epoch;
pub mod own;
pub mod request;
pub mod route;
pub mod sender;
pub mod sequence;
