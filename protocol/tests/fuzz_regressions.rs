//! The fuzzers' decode invariants (protocol/fuzz, issue #9), replayed in the
//! ordinary test suite on stable Rust, without cargo-fuzz:
//!
//! * every committed seed in `protocol/fuzz/corpus/decode_*`, and
//! * every input in `protocol/fuzz/regressions/decode_*` (a crash the
//!   fuzzers found goes there, named after the bug; none so far),
//!
//! must decode without panicking; each decoded packet must re-encode to a
//! packet that decodes to itself, and decoding the same bytes in small
//! chunks must give the same packets and the same error.
//!
//! Kept to the codec's own dependencies: the structured targets
//! (`stream_split`, `topic`) are replayed by `cargo test` in protocol/fuzz.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use lodestream_mqtt::codec::MAX_PACKET_SIZE;
use lodestream_mqtt::*;

type Outcome = (Vec<Packet>, Result<(), DecodeError>);

fn decoder(version: Option<ProtocolVersion>) -> Decoder {
    let mut d = Decoder::new(MAX_PACKET_SIZE);
    if let Some(v) = version {
        d.set_version(v);
    }
    d
}

fn roundtrip(p: &Packet, version: ProtocolVersion, input: &Path) {
    let mut wire = BytesMut::new();
    encode(p, version, &mut wire).unwrap_or_else(|e| {
        panic!(
            "{}: decoded packet does not re-encode: {e}",
            input.display()
        )
    });
    let mut d = decoder((!matches!(p, Packet::Connect(_))).then_some(version));
    let mut b = wire.clone();
    let back = d.decode(&mut b);
    assert_eq!(back, Ok(Some(p.clone())), "{}: re-decode", input.display());
    assert!(b.is_empty());
}

fn one_shot(version: Option<ProtocolVersion>, data: &[u8], input: &Path) -> Outcome {
    let mut d = decoder(version);
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    loop {
        match d.decode(&mut buf) {
            Ok(Some(p)) => {
                roundtrip(&p, d.version().expect("version after a packet"), input);
                out.push(p);
            }
            Ok(None) => return (out, Ok(())),
            Err(e) => {
                let _ = e.reason_code();
                return (out, Err(e));
            }
        }
    }
}

fn chunked(version: Option<ProtocolVersion>, data: &[u8]) -> Outcome {
    let mut d = decoder(version);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    for &n in [1usize, 7, 2, 64, 3, 1, 13].iter().cycle() {
        if pos >= data.len() {
            break;
        }
        let end = (pos + n).min(data.len());
        buf.extend_from_slice(&data[pos..end]);
        pos = end;
        loop {
            match d.decode(&mut buf) {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    (out, Ok(()))
}

fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

fn replay(target: &str, version: Option<ProtocolVersion>) -> usize {
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        for input in inputs(dir, target) {
            let data = std::fs::read(&input).expect("read input");
            let whole = one_shot(version, &data, &input);
            assert_eq!(
                whole,
                chunked(version, &data),
                "{}: chunked",
                input.display()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn decode_v311_inputs() {
    assert!(replay("decode_v311", Some(ProtocolVersion::V311)) > 0);
}

#[test]
fn decode_v5_inputs() {
    assert!(replay("decode_v5", Some(ProtocolVersion::V5)) > 0);
}

#[test]
fn decode_connect_inputs() {
    assert!(replay("decode_connect", None) > 0);
}
