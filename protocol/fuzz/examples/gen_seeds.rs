//! Writes the seed corpus into corpus/<target>/ (run from anywhere:
//! `cargo run --example gen_seeds` in protocol/fuzz). Deterministic, so
//! re-running it only rewrites the same files.
use std::fs;
use std::path::Path;

use lodestream_mqtt::{Packet, ProtocolVersion};
use lodestream_mqtt_fuzz::{sample_packets, wire};

fn write(dir: &Path, name: &str, data: &[u8]) {
    fs::create_dir_all(dir).expect("mkdir");
    fs::write(dir.join(name), data).expect("write seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut count = 0;
    for (v, tag) in [
        (ProtocolVersion::V31, "v31"),
        (ProtocolVersion::V311, "v311"),
        (ProtocolVersion::V5, "v5"),
    ] {
        let packets = sample_packets(v);
        let mut session = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            let w = wire(p, v);
            session.extend_from_slice(&w);
            let name = format!("seed-{tag}-{i:02}-{}", p.kind());
            if let Packet::Connect(_) = p {
                write(&root.join("decode_connect"), &name, &w);
            } else if v == ProtocolVersion::V311 {
                write(&root.join("decode_v311"), &name, &w);
            } else if v == ProtocolVersion::V5 {
                write(&root.join("decode_v5"), &name, &w);
            } else {
                continue;
            }
            count += 1;
        }
        // A whole session: CONNECT followed by every other packet.
        write(
            &root.join("decode_connect"),
            &format!("seed-{tag}-session"),
            &session,
        );
        count += 1;
    }
    // stream_split and topic take structured input: any bytes are valid, so
    // a few fixed byte patterns make enough of a start.
    for (i, seed) in [
        &b"\x00\x01\x05abcdefghijklmnopqrstuvwxyz0123456789"[..],
        &[
            0x02, 0x01, 0x08, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0,
            0xC0, 0xD0, 0xE0, 0xF0, 0xFF, 0x01, 0x03, 0x07,
        ][..],
        &[0x01; 64][..],
        &[0xFF; 64][..],
    ]
    .into_iter()
    .enumerate()
    {
        write(&root.join("stream_split"), &format!("seed-{i}"), seed);
        write(&root.join("topic"), &format!("seed-{i}"), seed);
        count += 2;
    }
    // Topic seeds spelled out in the token alphabet.
    write(
        &root.join("topic"),
        "seed-wildcards",
        &[4, 1, 5, 2, 6, 7, 2, 0, 3, 4, 2, 1, 7, 1, 3],
    );
    count += 1;
    println!("wrote {count} seed files under {}", root.display());
}
