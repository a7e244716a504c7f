//! Kafka's v2 record batch (the `RecordBatch` of Kafka's protocol guide),
//! encoded by hand in one pass into one buffer of the right size. Pure.
//!
//! Why not kafka-protocol's `RecordBatchEncoder`: it needs a `Record` per
//! record, each with its own `IndexMap` of headers, and grows its buffer as
//! it writes; that was a third of the own producer's instructions a message
//! (docs/benchmarks.md). Its `IndexMap` also merged headers of the same
//! name, where MQTT v5 user properties may repeat a name. The bytes are
//! the same as its encoder's for distinct header names (tested below).

use bytes::{BufMut, Bytes, BytesMut};

use super::request::{EncodeError, OutRecord};
use crate::kafka::fetch::fetch_codec::put_uvarint;

/// Bytes before the first record: base offset (8), batch length (4),
/// partition leader epoch (4), magic (1), CRC (4), attributes (2), last
/// offset delta (4), base and max timestamp (8 + 8), producer id (8),
/// producer epoch (2), base sequence (4), record count (4).
const HEAD: usize = 61;
/// Where the CRC-32C starts: the attributes, to the batch's end.
const CRC_FROM: usize = 21;
const CRC_AT: usize = 17;
const LENGTH_AT: usize = 8;
/// The batch length counts from the partition leader epoch on.
const LENGTH_FROM: usize = 12;

/// Who writes the batch and from which sequence number.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

/// The batch of `records`: no compression, creation timestamps, not
/// transactional, offsets 0.., sequences from `stamp.base_sequence`.
pub fn encode(stamp: Stamp, records: &[OutRecord]) -> Result<Bytes, EncodeError> {
    let count = i32::try_from(records.len()).map_err(|_| too_large("records in one batch"))?;
    let base_ts = records.iter().map(|r| r.timestamp_ms).min().unwrap_or(0);
    let max_ts = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    let bodies = records
        .iter()
        .enumerate()
        .map(|(i, r)| body_len(r, i, base_ts))
        .collect::<Result<Vec<usize>, EncodeError>>()?;
    let total = HEAD
        + bodies
            .iter()
            .map(|b| varint_len(*b as i64) + b)
            .sum::<usize>();
    let length = i32::try_from(total - LENGTH_FROM).map_err(|_| too_large("batch"))?;
    let mut buf = BytesMut::with_capacity(total);
    buf.put_i64(0);
    buf.put_i32(length);
    buf.put_i32(-1);
    buf.put_i8(2);
    buf.put_u32(0); // the CRC, filled in below
    buf.put_i16(0);
    buf.put_i32(count.saturating_sub(1));
    buf.put_i64(base_ts);
    buf.put_i64(max_ts);
    buf.put_i64(stamp.producer_id);
    buf.put_i16(stamp.producer_epoch);
    buf.put_i32(stamp.base_sequence);
    buf.put_i32(count);
    for (i, (r, body)) in records.iter().zip(&bodies).enumerate() {
        put_record(&mut buf, r, i, base_ts, *body);
    }
    debug_assert_eq!(buf.len(), total);
    let crc = crc32c::crc32c(&buf[CRC_FROM..]);
    buf[CRC_AT..CRC_FROM].copy_from_slice(&crc.to_be_bytes());
    debug_assert_eq!(&buf[LENGTH_AT..LENGTH_FROM], &length.to_be_bytes());
    Ok(buf.freeze())
}

fn too_large(what: &str) -> EncodeError {
    EncodeError(format!("too large to encode: {what}"))
}

/// A length as Kafka writes it (-1: null), bounded by i32.
fn len_of(n: usize, what: &str) -> Result<i64, EncodeError> {
    i32::try_from(n).map(i64::from).map_err(|_| too_large(what))
}

/// A record's bytes after its own length varint.
fn body_len(r: &OutRecord, index: usize, base_ts: i64) -> Result<usize, EncodeError> {
    let opt = |b: &Option<Bytes>, what| match b {
        None => Ok(1),
        Some(b) => Ok(varint_len(len_of(b.len(), what)?) + b.len()),
    };
    let mut n = 1 // attributes
        + varint_len(r.timestamp_ms.saturating_sub(base_ts))
        + varint_len(len_of(index, "records in one batch")?)
        + opt(&r.key, "key")?
        + opt(&r.value, "value")?
        + varint_len(len_of(r.headers.len(), "headers")?);
    for (k, v) in &r.headers {
        n += varint_len(len_of(k.len(), "header name")?) + k.len();
        n += varint_len(len_of(v.len(), "header value")?) + v.len();
    }
    len_of(n, "record")?;
    Ok(n)
}

/// Writes one record; `body_len` checked every length.
fn put_record(buf: &mut BytesMut, r: &OutRecord, index: usize, base_ts: i64, body: usize) {
    let put_bytes = |buf: &mut BytesMut, b: &[u8]| {
        put_varint(buf, b.len() as i64);
        buf.put_slice(b);
    };
    put_varint(buf, body as i64);
    buf.put_i8(0);
    put_varint(buf, r.timestamp_ms.saturating_sub(base_ts));
    put_varint(buf, index as i64);
    for part in [&r.key, &r.value] {
        match part {
            None => put_varint(buf, -1),
            Some(b) => put_bytes(buf, b),
        }
    }
    put_varint(buf, r.headers.len() as i64);
    for (k, v) in &r.headers {
        put_bytes(buf, k.as_bytes());
        put_bytes(buf, v);
    }
}

/// Zig-zag, then 7 bits a byte (Kafka's varint and varlong alike).
fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn varint_len(n: i64) -> usize {
    let bits = 64 - zigzag(n).leading_zeros() as usize;
    bits.max(1).div_ceil(7)
}

fn put_varint(buf: &mut BytesMut, n: i64) {
    put_uvarint(buf, zigzag(n));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::indexmap::IndexMap;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
        TimestampType,
    };

    const STAMP: Stamp = Stamp {
        producer_id: 4242,
        producer_epoch: 7,
        base_sequence: 2_147_483_646,
    };

    fn records() -> Vec<OutRecord> {
        let big = Bytes::from(vec![b'x'; 70_000]);
        vec![
            OutRecord {
                key: Some(Bytes::from_static(b"plate/AB123CD")),
                value: Some(Bytes::from_static(b"{\"lat\":45.1}")),
                headers: vec![("mqtt.qos".into(), Bytes::from_static(b"1"))],
                timestamp_ms: 1_700_000_000_500,
            },
            OutRecord {
                key: None,
                value: None,
                headers: vec![],
                timestamp_ms: 1_700_000_000_000,
            },
            OutRecord {
                key: Some(Bytes::new()),
                value: Some(big.clone()),
                headers: vec![("a".into(), big), ("b".into(), Bytes::new())],
                timestamp_ms: 1_700_000_090_000,
            },
        ]
    }

    /// kafka-protocol's encoding of the same batch.
    fn reference(stamp: Stamp, records: &[OutRecord]) -> Bytes {
        let records: Vec<Record> = records
            .iter()
            .enumerate()
            .map(|(i, r)| Record {
                transactional: false,
                control: false,
                partition_leader_epoch: -1,
                producer_id: stamp.producer_id,
                producer_epoch: stamp.producer_epoch,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: stamp.base_sequence.wrapping_add(i as i32),
                timestamp: r.timestamp_ms,
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| (StrBytes::from_string(k.to_string()), Some(v.clone())))
                    .collect::<IndexMap<_, _>>(),
            })
            .collect();
        let mut buf = BytesMut::new();
        let options = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(&mut buf, &records, &options).expect("reference encodes");
        buf.freeze()
    }

    #[test]
    fn the_bytes_are_kafka_protocols_for_the_same_records() {
        let rs = records();
        for n in 1..=rs.len() {
            assert_eq!(
                encode(STAMP, &rs[..n]).expect("encodes"),
                reference(STAMP, &rs[..n])
            );
        }
    }

    #[test]
    fn headers_of_the_same_name_are_all_written() {
        let r = OutRecord {
            key: None,
            value: None,
            headers: vec![
                ("region".into(), Bytes::from_static(b"north")),
                ("region".into(), Bytes::from_static(b"east")),
            ],
            timestamp_ms: 1,
        };
        let mut bytes = encode(STAMP, &[r]).expect("encodes");
        // After the record's length: attributes 0, timestamp and offset
        // deltas 0, null key and value (-1), then 2 headers (zig-zag 4).
        assert_eq!(&bytes[HEAD + 1..HEAD + 7], &[0, 0, 0, 1, 1, 4]);
        RecordBatchDecoder::decode(&mut bytes).expect("a valid batch, CRC included");
    }

    #[test]
    fn varints_are_zigzag_seven_bits_a_byte() {
        for (n, bytes) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (63, vec![126]),
            (64, vec![128, 1]),
            (-65, vec![129, 1]),
            (300, vec![216, 4]),
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, n);
            assert_eq!(&buf[..], &bytes[..], "{n}");
            assert_eq!(varint_len(n), bytes.len(), "{n}");
        }
    }
}
