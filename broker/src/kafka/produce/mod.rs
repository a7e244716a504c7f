//! The broker's own idempotent producer (docs/own-producer.md): work in
//! progress on this branch; the broker still writes through `producer.rs`.

pub mod client;
pub mod epoch;
pub mod request;
pub mod sender;
pub mod sequence;
