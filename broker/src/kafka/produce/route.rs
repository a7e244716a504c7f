//! Where a record goes: its partition, picked from its key as librdkafka
//! picks it, and that partition's leader, from Metadata (pure: the lookup
//! itself is the sender's).

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use kafka_protocol::messages::MetadataResponse;

use crate::kafka::fetch::host_port;

/// The partition of `key` among `count`, as librdkafka's default
/// partitioner (`consistent_random`) picks it: CRC-32 of the key, modulo
/// the partition count. Nodes that write with either producer must agree,
/// or one key's records would spread over partitions and lose their order.
/// An empty key, which librdkafka places at random, goes to partition 0
/// here (MQTT topic names, and so the keys mapped from them, are never
/// empty).
pub fn partition_for_key(key: &[u8], count: i32) -> i32 {
    if count <= 0 {
        return 0;
    }
    // In range: the modulo of a positive i32.
    (crc32fast::hash(key) % count as u32) as i32
}

/// The partitions of the topics written so far and their leaders, as the
/// last Metadata answer gave them.
#[derive(Debug, Default)]
pub struct Routes {
    /// Per topic, each partition's leader (by index; `None`: no leader).
    topics: HashMap<Arc<str>, Vec<Option<i32>>>,
    brokers: HashMap<i32, String>,
}

impl Routes {
    /// The topic's partition count, once Metadata has named it.
    pub fn partitions(&self, topic: &str) -> Option<i32> {
        let n = self.topics.get(topic)?.len();
        i32::try_from(n).ok().filter(|&n| n > 0)
    }

    /// The broker id leading `partition` of `topic`, if one is known.
    pub fn leader(&self, topic: &str, partition: i32) -> Option<i32> {
        let index = usize::try_from(partition).ok()?;
        let leader = (*self.topics.get(topic)?.get(index)?)?;
        self.brokers.contains_key(&leader).then_some(leader)
    }

    pub fn address(&self, broker: i32) -> Option<&str> {
        self.brokers.get(&broker).map(String::as_str)
    }

    /// Takes in a Metadata answer: the brokers it names, and each topic it
    /// answered without error (a topic it could not describe keeps what
    /// was known of it).
    pub fn update(&mut self, md: &MetadataResponse) {
        if !md.brokers.is_empty() {
            self.brokers = md
                .brokers
                .iter()
                .map(|b| (b.node_id.0, host_port(b.host.as_str(), b.port)))
                .collect();
        }
        for t in &md.topics {
            let Some(name) = t.name.as_ref() else {
                continue;
            };
            if t.error_code != 0 || t.partitions.is_empty() {
                continue;
            }
            let mut leaders = vec![None; t.partitions.len()];
            for p in &t.partitions {
                let slot = usize::try_from(p.partition_index)
                    .ok()
                    .and_then(|i| leaders.get_mut(i));
                if let Some(slot) = slot {
                    *slot = (p.error_code == 0 && p.leader_id.0 >= 0).then_some(p.leader_id.0);
                }
            }
            self.topics.insert(Arc::from(name.0.as_str()), leaders);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::metadata_response::{
        MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
    };
    use kafka_protocol::messages::{BrokerId, TopicName};
    use kafka_protocol::protocol::StrBytes;

    fn md(leaders: &[i32], topic_error: i16) -> MetadataResponse {
        let partitions = leaders
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                MetadataResponsePartition::default()
                    .with_partition_index(i as i32)
                    .with_leader_id(BrokerId(l))
            })
            .collect();
        MetadataResponse::default()
            .with_brokers(vec![
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(1))
                    .with_host(StrBytes::from_static_str("k1"))
                    .with_port(9092),
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(2))
                    .with_host(StrBytes::from_static_str("::1"))
                    .with_port(9093),
            ])
            .with_topics(vec![MetadataResponseTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str("t"))))
                .with_error_code(topic_error)
                .with_partitions(partitions)])
    }

    #[test]
    fn keys_are_placed_as_librdkafkas_default_partitioner_places_them() {
        // CRC-32 (IEEE, as zlib's) of "trucks/AB123CD" is 0xa7374cd6; an
        // integration test compares with librdkafka's own placement.
        assert_eq!(crc32fast::hash(b"trucks/AB123CD"), 0xa737_4cd6);
        assert_eq!(
            partition_for_key(b"trucks/AB123CD", 3),
            (0xa737_4cd6u32 % 3) as i32
        );
        assert_eq!(partition_for_key(b"", 3), 0);
        assert_eq!(partition_for_key(b"x", 0), 0);
    }

    #[test]
    fn each_partition_is_routed_to_its_leader() {
        let mut r = Routes::default();
        assert_eq!(r.partitions("t"), None);
        r.update(&md(&[1, 2, -1], 0));
        assert_eq!(r.partitions("t"), Some(3));
        assert_eq!(r.leader("t", 0), Some(1));
        assert_eq!(r.leader("t", 1), Some(2));
        assert_eq!(r.leader("t", 2), None, "leaderless");
        assert_eq!(r.leader("t", 3), None, "no such partition");
        assert_eq!(r.address(1), Some("k1:9092"));
        assert_eq!(r.address(2), Some("[::1]:9093"));
    }

    #[test]
    fn a_topic_answered_with_an_error_keeps_what_was_known() {
        let mut r = Routes::default();
        r.update(&md(&[1, 1], 0));
        r.update(&md(&[2], 5));
        assert_eq!(r.partitions("t"), Some(2));
        assert_eq!(r.leader("t", 1), Some(1));
        r.update(&md(&[2, 2, 2], 0));
        assert_eq!(r.partitions("t"), Some(3), "partitions added");
        assert_eq!(r.leader("t", 0), Some(2), "leader moved");
    }
}
