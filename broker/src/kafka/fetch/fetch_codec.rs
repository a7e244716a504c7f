//! Fetch v12, the one request a fetch loop sends over and over: its body
//! written and its response read by hand (pure).
//!
//! Why not `kafka_protocol` here, as for Metadata and ListOffsets: at one
//! record per fetch, encoding the request and decoding the response into
//! its owned structures took about 3.3k instructions a response, a fifth of
//! the read path's cost per record (docs/benchmarks.md). The layout is
//! Kafka's `FetchRequest.json` / `FetchResponse.json` at version 12
//! (flexible: compact arrays and strings, tagged fields); the tests check
//! both against `kafka_protocol`'s encoder and decoder.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const VERSION: i16 = 12;

/// What one fetch asks of a leader: one topic, each partition from an offset.
pub struct FetchSpec<'a> {
    pub wait_ms: i32,
    pub min_bytes: i32,
    pub max_bytes: i32,
    pub partition_max_bytes: i32,
    /// 0 read_uncommitted, 1 read_committed.
    pub isolation_level: i8,
    pub topic: &'a str,
    /// `(partition, fetch offset)`.
    pub partitions: &'a [(i32, i64)],
}

/// Writes the request body (after the request header).
pub fn encode_request(spec: &FetchSpec<'_>, out: &mut BytesMut) {
    out.put_i32(-1); // replica_id: a consumer
    out.put_i32(spec.wait_ms);
    out.put_i32(spec.min_bytes);
    out.put_i32(spec.max_bytes);
    out.put_i8(spec.isolation_level);
    out.put_i32(0); // session_id: no fetch session
    out.put_i32(-1); // session_epoch: FINAL_EPOCH, full fetch
    put_uvarint(out, 2); // one topic
    put_uvarint(out, spec.topic.len() as u64 + 1);
    out.put_slice(spec.topic.as_bytes());
    put_uvarint(out, spec.partitions.len() as u64 + 1);
    for &(partition, offset) in spec.partitions {
        out.put_i32(partition);
        out.put_i32(-1); // current_leader_epoch: unknown
        out.put_i64(offset);
        out.put_i32(-1); // last_fetched_epoch
        out.put_i64(-1); // log_start_offset: a consumer's
        out.put_i32(spec.partition_max_bytes);
        put_uvarint(out, 0); // tagged fields
    }
    put_uvarint(out, 0); // the topic's tagged fields
    put_uvarint(out, 1); // forgotten_topics_data: none
    put_uvarint(out, 1); // rack_id: ""
    put_uvarint(out, 0); // tagged fields
}

/// One partition's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionAnswer {
    pub partition: i32,
    pub error_code: i16,
    /// `(producer_id, first_offset)` of transactions aborted in range.
    pub aborted: Vec<(i64, i64)>,
    pub records: Option<Bytes>,
}

impl PartitionAnswer {
    /// Size of the record batches returned.
    pub fn record_bytes(&self) -> usize {
        self.records.as_ref().map_or(0, Bytes::len)
    }
}

/// A response body Kafka should not have sent (or a truncated one).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed Fetch v12 response: {0}")]
pub struct Malformed(&'static str);

/// The top-level error code and every partition's answer (all topics).
pub fn decode_response(mut b: Bytes) -> Result<(i16, Vec<PartitionAnswer>), Malformed> {
    let b = &mut b;
    need(b, 10, "header fields")?;
    b.advance(4); // throttle_time_ms
    let error_code = b.get_i16();
    b.advance(4); // session_id
    let mut out = Vec::new();
    for _ in 0..compact_len(b)?.unwrap_or(0) {
        skip_compact_bytes(b)?; // topic name: one topic was asked for
        for _ in 0..compact_len(b)?.unwrap_or(0) {
            out.push(partition(b)?);
        }
        skip_tagged(b)?;
    }
    skip_tagged(b)?;
    Ok((error_code, out))
}

fn partition(b: &mut Bytes) -> Result<PartitionAnswer, Malformed> {
    need(b, 30, "partition fields")?;
    let partition = b.get_i32();
    let error_code = b.get_i16();
    b.advance(24); // high watermark, last stable offset, log start offset
    let mut aborted = Vec::new();
    for _ in 0..compact_len(b)?.unwrap_or(0) {
        need(b, 16, "aborted transaction")?;
        aborted.push((b.get_i64(), b.get_i64()));
        skip_tagged(b)?;
    }
    need(b, 4, "preferred read replica")?;
    b.advance(4);
    let records = match compact_len(b)? {
        None => None,
        Some(n) => {
            need(b, n, "records")?;
            Some(b.split_to(n))
        }
    };
    skip_tagged(b)?;
    Ok(PartitionAnswer {
        partition,
        error_code,
        aborted,
        records,
    })
}

fn need(b: &Bytes, n: usize, what: &'static str) -> Result<(), Malformed> {
    if b.remaining() < n {
        return Err(Malformed(what));
    }
    Ok(())
}

/// An unsigned varint of at most 5 bytes (a 32-bit length or tag).
fn uvarint(b: &mut Bytes) -> Result<u64, Malformed> {
    super::batches::uvarint(b, 5).ok_or(Malformed("varint truncated or longer than 5 bytes"))
}

/// A compact array's or bytes' length; `None` for null (encoded 0).
fn compact_len(b: &mut Bytes) -> Result<Option<usize>, Malformed> {
    let n = uvarint(b)?;
    let n = usize::try_from(n).map_err(|_| Malformed("length"))?;
    Ok(n.checked_sub(1))
}

fn skip_compact_bytes(b: &mut Bytes) -> Result<(), Malformed> {
    let n = compact_len(b)?.unwrap_or(0);
    need(b, n, "string")?;
    b.advance(n);
    Ok(())
}

/// Tagged fields (KIP-482): none of them changes what this client does.
fn skip_tagged(b: &mut Bytes) -> Result<(), Malformed> {
    for _ in 0..uvarint(b)? {
        uvarint(b)?; // tag
        let size = usize::try_from(uvarint(b)?).map_err(|_| Malformed("tagged field"))?;
        need(b, size, "tagged field")?;
        b.advance(size);
    }
    Ok(())
}

/// Kafka's unsigned varint: 7 bits a byte, low bits first.
pub(crate) fn put_uvarint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::fetch_response::{
        AbortedTransaction, FetchableTopicResponse, LeaderIdAndEpoch, PartitionData,
    };
    use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, ProducerId, TopicName};
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

    #[test]
    fn the_request_reads_back_as_kafka_protocols_fetch_v12() {
        let spec = FetchSpec {
            wait_ms: 500,
            min_bytes: 1 << 10,
            max_bytes: 16 << 20,
            partition_max_bytes: 1 << 20,
            isolation_level: 1,
            topic: "mqtt_messages",
            partitions: &[(0, 42), (2, 300_000_000_000)],
        };
        let mut buf = BytesMut::new();
        encode_request(&spec, &mut buf);
        let got = FetchRequest::decode(&mut buf.freeze(), VERSION).expect("decodes");
        let partitions = spec
            .partitions
            .iter()
            .map(|&(p, o)| {
                FetchPartition::default()
                    .with_partition(p)
                    .with_fetch_offset(o)
                    .with_partition_max_bytes(1 << 20)
            })
            .collect();
        let want = FetchRequest::default()
            .with_max_wait_ms(500)
            .with_min_bytes(1 << 10)
            .with_max_bytes(16 << 20)
            .with_isolation_level(1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("mqtt_messages")))
                .with_partitions(partitions)]);
        assert_eq!(got, want);
    }

    fn encoded(resp: &FetchResponse) -> Bytes {
        let mut buf = BytesMut::new();
        resp.encode(&mut buf, VERSION).expect("encodes");
        buf.freeze()
    }

    #[test]
    fn a_response_with_records_aborted_transactions_tags_and_errors_is_read() {
        let records = Bytes::from_static(b"batch bytes");
        let with_data = PartitionData::default()
            .with_partition_index(0)
            .with_high_watermark(10)
            .with_aborted_transactions(Some(vec![AbortedTransaction::default()
                .with_producer_id(ProducerId(7))
                .with_first_offset(3)]))
            // A tagged field (current_leader), which must be skipped.
            .with_current_leader(
                LeaderIdAndEpoch::default()
                    .with_leader_id(BrokerId(1))
                    .with_leader_epoch(5),
            )
            .with_records(Some(records.clone()));
        let out_of_range = PartitionData::default()
            .with_partition_index(1)
            .with_error_code(1)
            .with_records(None);
        let resp = FetchResponse::default()
            .with_error_code(0)
            .with_responses(vec![FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_static_str("t")))
                .with_partitions(vec![with_data, out_of_range])]);
        let (code, parts) = decode_response(encoded(&resp)).expect("decodes");
        assert_eq!(code, 0);
        assert_eq!(
            parts,
            [
                PartitionAnswer {
                    partition: 0,
                    error_code: 0,
                    aborted: vec![(7, 3)],
                    records: Some(records),
                },
                PartitionAnswer {
                    partition: 1,
                    error_code: 1,
                    aborted: vec![],
                    records: None,
                },
            ]
        );
    }

    #[test]
    fn a_top_level_error_and_no_topics_are_read() {
        let resp = FetchResponse::default().with_error_code(56);
        assert_eq!(decode_response(encoded(&resp)), Ok((56, vec![])));
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let resp = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str("t")))
            .with_partitions(vec![PartitionData::default()
                .with_aborted_transactions(Some(vec![AbortedTransaction::default()]))
                .with_records(Some(Bytes::from_static(b"0123456789")))])]);
        let full = encoded(&resp);
        for cut in 0..full.len() {
            assert!(decode_response(full.slice(..cut)).is_err(), "cut at {cut}");
        }
        assert!(decode_response(full).is_ok());
    }
}
