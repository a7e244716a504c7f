//! The broker's integration tests, built as one test binary (one link of
//! librdkafka instead of one per file) on ripgrep's pattern. Each module is
//! one area; `common` holds the shared helpers (a broker per test against a
//! real Kafka, Kafka readers and producers, metrics scraping), `common::raw`
//! a raw MQTT client and `common::packets` the packet builders.
//!
//! Run one area or one test with a filter:
//! `cargo test -p lodestream-broker --test integration sessions::`.
//! Tests run in parallel threads of this one process; each starts its own
//! node with topic names unique to it. A test that measures the whole
//! process (fds, RSS) re-runs itself alone: `common::in_own_process`.
//!
//! Folding in a stand-alone test file `broker/tests/NAME.rs`: `git mv` it
//! into this directory, add `mod NAME;` below, and in the file replace
//! `mod common;` with `use crate::common;` (and the `mod raw { include!(..) }`
//! block with `use crate::common::raw;`).

mod common;

mod acl_hide_one_topic;
mod catchup_records;
mod clean_session_discard;
mod cluster;
mod exactly_once;
mod example_config;
mod fanout_reader;
mod faults;
mod hostile_clients;
mod interop_clients;
mod jwt_auth;
mod kafka_outage;
mod key_templates;
mod malformed_input;
mod metrics_endpoint;
mod operations;
mod own_producer;
mod publish_to_kafka;
mod qos2_scan_late_write;
mod redelivery_after_node_death;
mod replay_on_subscribe;
mod replicated_kafka;
mod rolling_restart;
mod security_matrix;
mod session_lifecycle;
mod sessions;
mod shared_across_nodes;
mod subscribe_from_kafka;
mod sys_topics;
mod transports_security;
mod unknown_protocol_level;
mod ws_disconnect_order;
