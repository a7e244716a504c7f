//! An idempotent Produce request: one v2 record batch per partition, all
//! partitions of one Kafka broker in one request (librdkafka sends one
//! request per partition). Pure: building, not sending.

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::record_batch::{self, Stamp};

/// The Produce version sent: flexible, topics by name (v13 names them by
/// id), and what Kafka 4 still accepts.
pub const PRODUCE_VERSION: i16 = 12;
/// InitProducerId with the current id and epoch, for bumps (KIP-360).
pub const INIT_PRODUCER_ID_VERSION: i16 = 4;

/// Who writes: the producer id and epoch from InitProducerId.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    pub id: i64,
    pub epoch: i16,
}

impl ProducerIdentity {
    /// The next epoch, as Kafka's Java client bumps it for a producer
    /// without a transactional id: Kafka takes a higher epoch of a known
    /// producer id when each partition's sequences start again at 0.
    /// `false` at the last epoch: a new producer id is needed instead.
    pub fn bump_epoch(&mut self) -> bool {
        match self.epoch.checked_add(1) {
            Some(e) => {
                self.epoch = e;
                true
            }
            None => false,
        }
    }
}

/// A record header: its name (one of the broker's `mqtt.*` names, so not
/// allocated per record, or a user property's) and value.
pub type Header = (std::borrow::Cow<'static, str>, Bytes);

/// One record to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    pub timestamp_ms: i64,
}

impl OutRecord {
    /// Its bytes of key, value and headers: what it holds of the
    /// producer's bounds (a batch's encoding adds a few bytes a record).
    pub fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let key = self.key.as_ref().map_or(0, |k| k.len());
        key + self.value.as_ref().map_or(0, |v| v.len()) + headers
    }
}

/// One partition's sealed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionBatch {
    pub topic: String,
    pub partition: i32,
    pub base_sequence: i32,
    pub records: Vec<OutRecord>,
}

#[derive(Debug, thiserror::Error)]
#[error("encoding a record batch: {0}")]
pub struct EncodeError(pub String);

/// The v2 record batch of `batch`, stamped with `who` and its sequences.
pub fn encode_batch(who: ProducerIdentity, batch: &PartitionBatch) -> Result<Bytes, EncodeError> {
    let stamp = Stamp {
        producer_id: who.id,
        producer_epoch: who.epoch,
        base_sequence: batch.base_sequence,
    };
    record_batch::encode(stamp, &batch.records)
}

/// A sealed batch, encoded once: a retry sends the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub topic: StrBytes,
    pub partition: i32,
    pub bytes: Bytes,
}

impl Encoded {
    pub fn new(who: ProducerIdentity, batch: &PartitionBatch) -> Result<Encoded, EncodeError> {
        Ok(Encoded {
            topic: StrBytes::from_string(batch.topic.clone()),
            partition: batch.partition,
            bytes: encode_batch(who, batch)?,
        })
    }
}

/// One request for every batch, `acks=all`, Kafka waiting at most
/// `timeout_ms` for the in-sync replicas.
pub fn produce_request(batches: &[Encoded], timeout_ms: i32) -> ProduceRequest {
    let mut topics: Vec<TopicProduceData> = Vec::new();
    for b in batches {
        // `Bytes` clones: reference counts, not copies.
        let data = PartitionProduceData::default()
            .with_index(b.partition)
            .with_records(Some(b.bytes.clone()));
        let name = TopicName(b.topic.clone());
        match topics.iter_mut().find(|t| t.name == name) {
            Some(t) => t.partition_data.push(data),
            None => topics.push(
                TopicProduceData::default()
                    .with_name(name)
                    .with_partition_data(vec![data]),
            ),
        }
    }
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(timeout_ms)
        .with_topic_data(topics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    fn batch(partition: i32, base_sequence: i32, n: usize) -> PartitionBatch {
        PartitionBatch {
            topic: "t".into(),
            partition,
            base_sequence,
            records: (0..n)
                .map(|i| OutRecord {
                    key: Some(Bytes::from(format!("k/{i}"))),
                    value: Some(Bytes::from(format!("v{i}"))),
                    headers: vec![("mqtt.qos".into(), Bytes::from_static(b"1"))],
                    timestamp_ms: 1_700_000_000_000 + i as i64,
                })
                .collect(),
        }
    }

    #[test]
    fn a_batch_carries_the_producer_and_consecutive_sequences() {
        let who = ProducerIdentity { id: 42, epoch: 3 };
        let mut bytes = encode_batch(who, &batch(0, 7, 3)).expect("encodes");
        let set = RecordBatchDecoder::decode(&mut bytes).expect("decodes");
        let seqs: Vec<i32> = set.records.iter().map(|r| r.sequence).collect();
        assert_eq!(seqs, [7, 8, 9]);
        assert!(set
            .records
            .iter()
            .all(|r| r.producer_id == 42 && r.producer_epoch == 3));
        assert_eq!(set.records[2].key.as_deref(), Some(&b"k/2"[..]));
    }

    #[test]
    fn all_partitions_of_a_topic_go_in_one_request() {
        let who = ProducerIdentity { id: 1, epoch: 0 };
        let encoded =
            [batch(0, 0, 1), batch(2, 5, 2)].map(|b| Encoded::new(who, &b).expect("encodes"));
        let req = produce_request(&encoded, 30_000);
        assert_eq!(req.acks, -1, "acks=all");
        assert_eq!(req.topic_data.len(), 1);
        let parts: Vec<i32> = req.topic_data[0]
            .partition_data
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(parts, [0, 2]);
    }
}
