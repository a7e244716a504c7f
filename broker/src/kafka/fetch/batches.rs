//! One partition's fetched bytes, batch by batch: which records a
//! `read_committed` reader may see, and the offset to fetch next. Pure
//! logic over the v2 record-batch format (Kafka's `DefaultRecordBatch`).
//!
//! Records are parsed here, not by `kafka_protocol`'s decoder: it builds
//! an owned record with an `IndexMap` of headers each time (~3k
//! instructions a record on the fan-out path); this parser slices the
//! fetch response instead. `kafka_protocol`'s codecs still decompress.

use std::collections::HashSet;

use bytes::{Buf, Bytes};
use kafka_protocol::compression::{Decompressor, Gzip, Lz4, Snappy, Zstd};

/// Bytes of a v2 batch header before its records.
const HEADER_LEN: usize = 61;
/// `batchLength` counts from the field after it (offset 12).
const LENGTH_END: usize = 12;
const ATTR_CODEC: i16 = 0x07;
const ATTR_LOG_APPEND_TIME: i16 = 1 << 3;
const ATTR_TRANSACTIONAL: i16 = 1 << 4;
const ATTR_CONTROL: i16 = 1 << 5;
/// Control record type of an abort marker (the key is version, type).
const CONTROL_ABORT: i16 = 0;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("record batch at offset {offset}: magic {magic} (only v2 is read)")]
    Magic { offset: i64, magic: i8 },
    #[error("record batch at offset {offset}: length {length} is invalid")]
    Length { offset: i64, length: i32 },
    #[error("record batch at offset {offset}: {reason}")]
    Decode { offset: i64, reason: String },
}

/// What a batch header says about the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub base_offset: i64,
    pub last_offset: i64,
    pub producer_id: i64,
    pub transactional: bool,
    pub control: bool,
    attributes: i16,
}

/// One record, its key, value and headers slices of the fetch response
/// (or of the decompressed batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(Bytes, Option<Bytes>)>,
}

/// Splits `records` into whole batches. A trailing batch cut short by the
/// fetch's size limit is left out: the next fetch starts at it again.
pub fn split(mut records: Bytes) -> Result<Vec<(Header, Bytes)>, BatchError> {
    let mut out = Vec::new();
    while records.len() >= HEADER_LEN {
        let h = &records[..HEADER_LEN];
        let base_offset = (&h[0..8]).get_i64();
        let length = (&h[8..12]).get_i32();
        let magic = h[16] as i8;
        if magic != 2 {
            return Err(BatchError::Magic {
                offset: base_offset,
                magic,
            });
        }
        let total = usize::try_from(length)
            .ok()
            .and_then(|l| l.checked_add(LENGTH_END))
            .filter(|&t| t >= HEADER_LEN)
            .ok_or(BatchError::Length {
                offset: base_offset,
                length,
            })?;
        if records.len() < total {
            break;
        }
        let attributes = (&h[21..23]).get_i16();
        let header = Header {
            base_offset,
            last_offset: base_offset + i64::from((&h[23..27]).get_i32()),
            producer_id: (&h[43..51]).get_i64(),
            transactional: attributes & ATTR_TRANSACTIONAL != 0,
            control: attributes & ATTR_CONTROL != 0,
            attributes,
        };
        out.push((header, records.split_to(total)));
    }
    Ok(out)
}

/// The records of one batch (CRC checked, decompressed).
#[cfg(test)]
pub fn decode(header: &Header, batch: Bytes) -> Result<Vec<Fetched>, BatchError> {
    let mut out = Vec::new();
    decode_into(header, batch, &mut out)?;
    Ok(out)
}

/// The records of one batch (CRC checked, decompressed), put in `out`
/// (emptied first; after an error it may hold the records read before it,
/// which the caller drops).
///
/// Why into a vector the caller keeps: a batch's records in a new vector
/// each time is an allocation of several KiB, and glibc consolidates its
/// fast bins (the records freed since) before every such one: 5 % of the
/// read path's profile samples at 16,000 msg/s (docs/benchmarks.md).
pub fn decode_into(
    header: &Header,
    batch: Bytes,
    out: &mut Vec<Fetched>,
) -> Result<(), BatchError> {
    out.clear();
    let err = |reason: String| BatchError::Decode {
        offset: header.base_offset,
        reason,
    };
    // `split` made sure the header is whole.
    let crc = (&batch[17..21]).get_u32();
    if crc32c::crc32c(&batch[21..]) != crc {
        return Err(err("CRC mismatch".into()));
    }
    let max_timestamp = (&batch[35..43]).get_i64();
    let base_timestamp = (&batch[27..35]).get_i64();
    let count = (&batch[57..61]).get_i32();
    let mut body = batch.slice(HEADER_LEN..);
    let codec = match header.attributes & ATTR_CODEC {
        0 => None,
        1 => Some(Compression::Gzip),
        2 => Some(Compression::Snappy),
        3 => Some(Compression::Lz4),
        4 => Some(Compression::Zstd),
        c => return Err(err(format!("unknown compression codec {c}"))),
    };
    if let Some(c) = codec {
        body = decompress(&mut body, c).map_err(|e| err(format!("{c:?}: {e}")))?;
    }
    let log_append = header.attributes & ATTR_LOG_APPEND_TIME != 0;
    out.reserve(usize::try_from(count).unwrap_or(0).min(4096));
    for _ in 0..count {
        let mut r = record(&mut body, header.base_offset, base_timestamp)
            .ok_or_else(|| err("truncated record".into()))?;
        if log_append {
            r.timestamp = max_timestamp;
        }
        out.push(r);
    }
    Ok(())
}

/// One record at the start of `body` (`DefaultRecord`), `body` moved past it.
fn record(body: &mut Bytes, base_offset: i64, base_timestamp: i64) -> Option<Fetched> {
    // Parsed on a plain slice; only the fields handed over become `Bytes`
    // (`slice_ref`): each `Bytes` split takes and gives back a reference
    // count, together 3 % of the read path's profile at 16,000 records/s.
    let mut at: &[u8] = body;
    let len = usize::try_from(varint(&mut at)?).ok()?;
    let mut r = at.get(..len)?;
    let rest = at.len() - len;
    r = r.get(1..)?; // attributes: unused
    let timestamp = base_timestamp.checked_add(varint(&mut r)?)?;
    let offset = base_offset.checked_add(varint(&mut r)?)?;
    let key = bytes_field(&mut r)?.map(|k| body.slice_ref(k));
    let value = bytes_field(&mut r)?.map(|v| body.slice_ref(v));
    let n = usize::try_from(varint(&mut r)?).ok()?;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let k = body.slice_ref(bytes_field(&mut r)??);
        headers.push((k, bytes_field(&mut r)?.map(|v| body.slice_ref(v))));
    }
    body.advance(body.len() - rest);
    Some(Fetched {
        offset,
        timestamp,
        key,
        value,
        headers,
    })
}

/// A varint-length byte field; length -1 is null (`Some(None)`).
fn bytes_field<'a>(b: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    match varint(b)? {
        -1 => Some(None),
        n => {
            let n = usize::try_from(n).ok()?;
            let field = b.get(..n)?;
            *b = &b[n..];
            Some(Some(field))
        }
    }
}

/// A zig-zag varint (Kafka's `ByteUtils.readVarlong`), at most 10 bytes.
fn varint(b: &mut &[u8]) -> Option<i64> {
    let raw = uvarint_in(b, 10)?;
    Some((raw >> 1) as i64 ^ -((raw & 1) as i64))
}

/// An unsigned varint of at most `max_len` bytes; `None` when truncated or
/// longer. The protocol's compact lengths and tags (5 bytes, `fetch_codec`)
/// use it.
pub(super) fn uvarint(b: &mut Bytes, max_len: usize) -> Option<u64> {
    let mut at: &[u8] = b;
    let raw = uvarint_in(&mut at, max_len)?;
    b.advance(b.len() - at.len());
    Some(raw)
}

/// `uvarint` on a slice: record fields (zig-zag, 10 bytes) use it directly.
fn uvarint_in(b: &mut &[u8], max_len: usize) -> Option<u64> {
    let mut raw = 0u64;
    for i in 0..max_len {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        raw |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(raw);
        }
    }
    None
}

/// Batch codecs (attribute bits 0-2).
#[derive(Debug, Clone, Copy)]
enum Compression {
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// Largest raw snappy block accepted (Kafka's own limit on a batch is
/// `message.max.bytes`, 1 MiB by default, compressed).
const MAX_DECOMPRESSED: usize = 128 << 20;

/// The header of Java's (xerial) framed snappy.
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";

/// kafka-protocol's codecs, except raw (unframed) snappy as librdkafka
/// writes it: kafka-protocol 0.17 consumes 16 bytes looking for the xerial
/// header and then fails on what is left.
fn decompress(buf: &mut Bytes, c: Compression) -> anyhow::Result<Bytes> {
    let all = |b: &mut Bytes| Ok(b.split_to(b.len()));
    match c {
        Compression::Snappy if !buf.starts_with(XERIAL_MAGIC) => {
            let raw = all(buf)?;
            let len = snap::raw::decompress_len(&raw)?;
            // The length is the batch's word: do not let it size memory.
            anyhow::ensure!(len <= MAX_DECOMPRESSED, "snappy block of {len} bytes");
            let mut out = vec![0; len];
            snap::raw::Decoder::new().decompress(&raw, &mut out)?;
            Ok(out.into())
        }
        Compression::Snappy => Snappy::decompress(buf, all),
        Compression::Gzip => Gzip::decompress(buf, all),
        Compression::Lz4 => Lz4::decompress(buf, all),
        Compression::Zstd => Zstd::decompress(buf, all),
    }
}

/// `read_committed` for one fetched partition, as Kafka's own consumer
/// does it: the fetch response lists the aborted transactions in its range
/// (producer id, first offset); a transactional batch of a producer whose
/// transaction was aborted at or before it is skipped until that
/// producer's abort marker.
#[derive(Debug, Default)]
pub struct Committed {
    /// By first offset, the latest first: the next to open is at the end.
    pending: Vec<(i64, i64)>,
    aborted: HashSet<i64>,
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand its records over (from the fetch offset on).
    Deliver,
    /// Skip it: a control batch, or data of an aborted transaction.
    Skip,
}

impl Committed {
    pub fn new(aborted: impl IntoIterator<Item = (i64, i64)>) -> Self {
        let mut pending: Vec<(i64, i64)> = aborted.into_iter().collect();
        pending.sort_by_key(|&(_, first)| std::cmp::Reverse(first));
        Committed {
            pending,
            aborted: HashSet::new(),
        }
    }

    /// `abort_marker`: for a control batch, whether it marks an abort (its
    /// record's key, decoded only for control batches).
    pub fn judge(&mut self, h: &Header, abort_marker: impl FnOnce() -> bool) -> Verdict {
        if h.producer_id >= 0 {
            while let Some(&(pid, first)) = self.pending.last() {
                if first > h.last_offset {
                    break;
                }
                self.aborted.insert(pid);
                self.pending.pop();
            }
            if h.control {
                if abort_marker() {
                    self.aborted.remove(&h.producer_id);
                }
            } else if h.transactional && self.aborted.contains(&h.producer_id) {
                return Verdict::Skip;
            }
        }
        if h.control {
            Verdict::Skip
        } else {
            Verdict::Deliver
        }
    }
}

/// Whether a control batch's first record is an abort marker.
pub fn is_abort_marker(records: &[Fetched]) -> bool {
    records
        .first()
        .and_then(|r| r.key.as_ref())
        .filter(|k| k.len() >= 4)
        .is_some_and(|k| (&k[2..4]).get_i16() == CONTROL_ABORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
        TimestampType,
    };

    fn record(offset: i64, pid: i64, txn: bool, control: bool, key: &[u8]) -> Record {
        Record {
            transactional: txn,
            control,
            partition_leader_epoch: 0,
            producer_id: pid,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset,
            // One batch holds records whose offset - sequence agree.
            sequence: offset as i32,
            timestamp: 1,
            key: Some(Bytes::copy_from_slice(key)),
            value: Some(Bytes::from_static(b"v")),
            headers: Default::default(),
        }
    }

    fn batch(recs: &[Record], compression: Compression) -> Bytes {
        let mut buf = BytesMut::new();
        let opts = RecordEncodeOptions {
            version: 2,
            compression,
        };
        RecordBatchEncoder::encode(&mut buf, recs.iter(), &opts).expect("encode");
        buf.freeze()
    }

    fn concat(parts: &[Bytes]) -> Bytes {
        parts.concat().into()
    }

    #[test]
    fn splits_whole_batches_and_leaves_a_cut_one_for_the_next_fetch() {
        let a = batch(
            &[
                record(0, -1, false, false, b"a"),
                record(1, -1, false, false, b"b"),
            ],
            Compression::None,
        );
        let b = batch(&[record(2, -1, false, false, b"c")], Compression::Lz4);
        let all = concat(&[a.clone(), b.clone()]);
        let cut = all.slice(..all.len() - 3);
        let got = split(cut).expect("split");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.base_offset, got[0].0.last_offset), (0, 1));
        let got = split(all).expect("split");
        assert_eq!(got.len(), 2);
        let recs = decode(&got[1].0, got[1].1.clone()).expect("decode");
        assert_eq!(recs[0].offset, 2);
        assert_eq!(recs[0].key.as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn records_parse_as_kafka_protocol_decodes_them() {
        let mut recs: Vec<Record> = (0..3)
            .map(|i| record(40 + i, -1, false, false, b"key"))
            .collect();
        recs[0].headers.insert(
            StrBytes::from_static_str("mqtt.qos"),
            Some(Bytes::from_static(b"1")),
        );
        recs[0]
            .headers
            .insert(StrBytes::from_static_str("empty"), None);
        recs[1].key = None;
        recs[2].value = None;
        recs[2].timestamp = 99;
        for c in [Compression::None, Compression::Gzip] {
            let b = batch(&recs, c);
            let theirs = RecordBatchDecoder::decode(&mut b.clone())
                .expect("theirs")
                .records;
            let got = split(b).expect("split");
            let ours = decode(&got[0].0, got[0].1.clone()).expect("ours");
            assert_eq!(ours.len(), theirs.len());
            for (o, t) in ours.iter().zip(&theirs) {
                assert_eq!((o.offset, o.timestamp), (t.offset, t.timestamp));
                assert_eq!((&o.key, &o.value), (&t.key, &t.value));
                let th: Vec<(Bytes, Option<Bytes>)> = t
                    .headers
                    .iter()
                    .map(|(k, v)| (Bytes::copy_from_slice(k.as_bytes()), v.clone()))
                    .collect();
                assert_eq!(o.headers, th);
            }
        }
    }

    #[test]
    fn varints_are_zigzag_and_bounded() {
        let mut b: &[u8] = &[
            0x01, 0x02, 0xac, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x01,
        ];
        assert_eq!(varint(&mut b), Some(-1));
        assert_eq!(varint(&mut b), Some(1));
        assert_eq!(varint(&mut b), Some(150));
        assert_eq!(varint(&mut b), None, "longer than 10 bytes");
        assert_eq!(varint(&mut &[0x80][..]), None, "truncated");
    }

    #[test]
    fn every_compression_codec_decodes() {
        for c in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let b = batch(&[record(5, -1, false, false, b"k")], c);
            let got = split(b).expect("split");
            let recs = decode(&got[0].0, got[0].1.clone()).expect("decode");
            assert_eq!(recs[0].value.as_deref(), Some(&b"v"[..]), "{c:?}");
        }
    }

    #[test]
    fn raw_snappy_as_librdkafka_writes_it_decodes() {
        let plain = batch(&[record(3, -1, false, false, b"k")], Compression::None);
        // The records section follows the 61-byte header; compress it raw
        // and set the codec bits (2 = snappy), then fix the CRC.
        let mut b = plain[..HEADER_LEN].to_vec();
        let body = snap::raw::Encoder::new()
            .compress_vec(&plain[HEADER_LEN..])
            .expect("compress");
        b.extend_from_slice(&body);
        let len = i32::try_from(b.len() - LENGTH_END).expect("len");
        b[8..12].copy_from_slice(&len.to_be_bytes());
        b[22] = (b[22] & !0x07) | 2;
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        let got = split(Bytes::from(b)).expect("split");
        let recs = decode(&got[0].0, got[0].1.clone()).expect("decode");
        assert_eq!(recs[0].key.as_deref(), Some(&b"k"[..]));
    }

    #[test]
    fn a_raw_snappy_length_beyond_the_bound_is_refused_before_allocating() {
        // Varint 1 GiB, then nothing: decompress_len believes the header.
        let mut claim = Bytes::from_static(&[0x80, 0x80, 0x80, 0x80, 0x04, 0x00]);
        let err = super::decompress(&mut claim, super::Compression::Snappy).expect_err("bounded");
        assert!(err.to_string().contains("snappy block"), "{err}");
    }

    #[test]
    fn a_corrupted_batch_is_an_error_not_a_panic() {
        let b = batch(&[record(0, -1, false, false, b"k")], Compression::None);
        let mut bad = b.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let got = split(Bytes::from(bad)).expect("split");
        assert!(decode(&got[0].0, got[0].1.clone()).is_err());
        let mut magic = b.to_vec();
        magic[16] = 1;
        assert!(matches!(
            split(Bytes::from(magic)),
            Err(BatchError::Magic { .. })
        ));
        let mut len = b.to_vec();
        len[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(matches!(
            split(Bytes::from(len)),
            Err(BatchError::Length { .. })
        ));
    }

    fn header(base: i64, last: i64, pid: i64, txn: bool, control: bool) -> Header {
        Header {
            base_offset: base,
            last_offset: last,
            producer_id: pid,
            transactional: txn,
            control,
            attributes: 0,
        }
    }

    #[test]
    fn aborted_transactions_are_skipped_up_to_their_marker() {
        // Producer 7's transaction from offset 10 was aborted (marker at
        // 13); producer 8's (offsets 11, 14) committed. After its abort
        // marker, producer 7's next transaction (15) is visible.
        use Verdict::{Deliver, Skip};
        let mut c = Committed::new([(7, 10)]);
        // (first, last offset, producer, transactional, control, abort marker, verdict)
        let batches = [
            (0, 9, -1, false, false, false, Deliver),
            (10, 10, 7, true, false, false, Skip),
            (11, 11, 8, true, false, false, Deliver),
            (12, 12, 7, true, false, false, Skip),
            (13, 13, 7, true, true, true, Skip),
            (14, 14, 8, true, true, false, Skip),
            (15, 15, 7, true, false, false, Deliver),
        ];
        for (base, last, pid, txn, control, abort, want) in batches {
            let h = header(base, last, pid, txn, control);
            assert_eq!(c.judge(&h, || abort), want, "batch at {base}");
        }
    }

    #[test]
    fn control_records_decode_as_abort_or_commit_markers() {
        let marker = |key: &'static [u8]| Fetched {
            offset: 0,
            timestamp: 0,
            key: Some(Bytes::from_static(key)),
            value: None,
            headers: vec![],
        };
        let abort = [marker(&[0, 0, 0, 0])];
        let commit = [marker(&[0, 0, 0, 1])];
        assert!(is_abort_marker(&abort));
        assert!(!is_abort_marker(&commit));
        assert!(!is_abort_marker(&[]));
    }
}
