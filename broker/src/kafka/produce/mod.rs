//! The broker's own idempotent producer (docs/own-producer.md): messages
//! on plaintext Kafka go through `own::OwnProducer` (`kafka.own_producer`);
//! `producer.rs` (librdkafka) writes everything else.
//!
//! Its maps use `rustc_hash`: their keys (topic and partition, broker ids)
//! come from Kafka's metadata and our own mapping rules, not from clients,
//! and SipHash on every record's lookup was 8 % of its instructions.

pub mod client;
pub mod epoch;
pub mod own;
pub mod record_batch;
pub mod request;
pub mod route;
pub mod sender;
pub mod sequence;
