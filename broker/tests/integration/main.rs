//! The broker's integration tests, built as one test binary (one link of
//! librdkafka instead of one per file) on ripgrep's pattern. Each module is
//! one area; `common` holds the shared helpers (a broker per test against a
//! real Kafka, Kafka readers and producers, metrics scraping), `common::raw`
//! a raw MQTT client and `common::packets` the packet builders.
//!
//! Run one area or one test with a filter:
//! `cargo test -p lodestream-broker --test integration sessions::`.
//! Tests run in parallel threads of this one process; each starts its own
//! node with topic names unique to it.
//!
//! Adding a test file: put it in this directory as `NAME.rs`, add `mod NAME;`
//! below, and in the file write `use crate::common;` (and `use
//! crate::common::raw;`) where a stand-alone test file had `mod common;`.

mod common;

mod catchup_records;
mod clean_session_discard;
mod cluster;
mod exactly_once;
mod example_config;
mod faults;
mod hostile_clients;
mod interop_clients;
mod kafka_outage;
mod malformed_input;
mod metrics_endpoint;
mod operations;
mod publish_to_kafka;
mod security_matrix;
mod session_lifecycle;
mod sessions;
mod subscribe_from_kafka;
mod transports_security;
