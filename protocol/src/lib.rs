//! Pure MQTT protocol logic for Lodestream: no sockets, no Kafka.
//!
//! * [`packet`]: the packet data types (re-exported at the crate root).
//! * [`codec`]: strict encoder/decoder for MQTT 3.1, 3.1.1 and 5.0.
//! * [`topic`]: topic name/filter validation, matching, shared subscriptions.
//! * [`trie`]: subscription index for fanning out messages to matching filters.
pub mod codec;
pub mod packet;
pub mod topic;
pub mod trie;

pub use codec::{
    encode, encode_publish, encode_publish_within, encoded_len, publish_encoded_len, DecodeError,
    Decoder, EncodeError,
};
pub use packet::*;
pub use topic::{SharedFilter, TopicError};
pub use trie::TopicTrie;
