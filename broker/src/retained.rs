//! Retained messages [MQTT-3.3.1-5..11]. The truth is a compacted Kafka
//! topic keyed by MQTT topic (an empty value, a tombstone, deletes); every
//! node keeps a materialised copy in memory, fed by a reader of that topic,
//! and serves SUBSCRIBEs from it.
//!
//! Memory bound: one entry per retained topic, sized by its payload. The
//! store is as large as the compacted topic; operators bound it with the
//! number of distinct topics clients may retain on (authorization rules).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::kafka::Record;
use crate::message::Message;

#[derive(Default)]
pub struct RetainedStore {
    map: RwLock<HashMap<String, Arc<Message>>>,
}

impl RetainedStore {
    pub fn new() -> RetainedStore {
        RetainedStore::default()
    }

    /// Applies a message a client published with RETAIN set: an empty
    /// payload removes the topic's retained message [MQTT-3.3.1-6/7].
    pub fn apply(&self, msg: Arc<Message>) {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            m.remove(&msg.topic);
        } else {
            m.insert(msg.topic.clone(), msg);
        }
    }

    /// Applies a record of the retained topic (key = MQTT topic).
    pub fn apply_record(&self, rec: Record) {
        let msg = match rec.message(None) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(offset = rec.offset, error = %e, "retained record skipped");
                return;
            }
        };
        self.apply(Arc::new(Message {
            retain: true,
            ..msg
        }));
    }

    /// Unexpired retained messages whose topic matches `filter`.
    pub fn matching(&self, filter: &str, now_ms: i64) -> Vec<Arc<Message>> {
        let m = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<Message>> = m
            .values()
            .filter(|msg| {
                lodestream_mqtt::topic::matches(filter, &msg.topic) && !msg.is_expired(now_ms)
            })
            .cloned()
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// Topics matching `filter` whose retained message has expired (still
    /// held: expiry only hides a message, nothing deletes it by itself).
    pub fn expired(&self, filter: &str, now_ms: i64) -> Vec<String> {
        let m = self.map.read().unwrap_or_else(|e| e.into_inner());
        m.values()
            .filter(|msg| {
                msg.is_expired(now_ms) && lodestream_mqtt::topic::matches(filter, &msg.topic)
            })
            .map(|msg| msg.topic.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use lodestream_mqtt::{Properties, QoS};

    fn msg(topic: &str, payload: &'static [u8], expiry: Option<u32>) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                message_expiry_interval: expiry,
                ..Properties::default()
            }
            .into(),
            publisher: None,
            timestamp_ms: 0,
        })
    }

    /// [MQTT-3.3.1-5] replace, [MQTT-3.3.1-6/7] empty payload deletes.
    #[test]
    fn replace_and_delete() {
        let s = RetainedStore::new();
        s.apply(msg("a/b", b"1", None));
        s.apply(msg("a/b", b"2", None));
        s.apply(msg("a/c", b"3", None));
        let got = s.matching("a/+", 0);
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].payload[..], b"2");
        s.apply(msg("a/b", b"", None));
        assert_eq!(s.matching("#", 0).len(), 1);
    }

    /// [MQTT-3.3.2-5] an expired retained message is not sent.
    #[test]
    fn expired_not_served() {
        let s = RetainedStore::new();
        s.apply(msg("x", b"1", Some(10)));
        assert_eq!(s.matching("x", 9_999).len(), 1);
        assert!(s.matching("x", 10_000).is_empty());
    }
}
