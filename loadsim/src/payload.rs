//! Message payloads: a short machine-readable header followed by random,
//! dictionary-like words, 400–600 bytes in total by default.
//!
//! Header (ASCII, space separated, ends with a space):
//! `LS1 <run-id> <client-index> <seq> <sent-unix-µs> `
//!
//! The run id lets the Kafka check count only this run's records, the
//! index and sequence number identify each message exactly (duplicates and
//! losses), and the send timestamp gives subscribers the end-to-end latency.
//! Generation is pure (no I/O) so it is unit tested.

use bytes::{BufMut, Bytes, BytesMut};
use rand::Rng;

/// First token of every payload.
pub const MAGIC: &str = "LS1";

/// Words for the random text: common English and telemetry-ish terms.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "from",
    "this",
    "have",
    "or",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "each",
    "she",
    "do",
    "how",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "truck",
    "route",
    "depot",
    "driver",
    "engine",
    "speed",
    "fuel",
    "pressure",
    "temperature",
    "sensor",
    "reading",
    "battery",
    "voltage",
    "signal",
    "latitude",
    "longitude",
    "heading",
    "altitude",
    "cargo",
    "trailer",
    "brake",
    "tyre",
    "load",
    "delivery",
    "warehouse",
    "highway",
    "junction",
    "bridge",
    "tunnel",
    "weather",
    "rain",
    "north",
    "south",
    "east",
    "west",
    "morning",
    "evening",
    "status",
    "alarm",
    "door",
    "open",
    "closed",
    "moving",
    "stopped",
    "idle",
    "gear",
    "clutch",
    "mileage",
    "service",
    "schedule",
    "arrival",
    "departure",
    "customer",
    "invoice",
    "pallet",
    "container",
    "refrigerated",
    "humidity",
    "vibration",
    "odometer",
    "firmware",
    "gateway",
    "network",
    "packet",
    "stream",
    "kafka",
    "broker",
    "message",
    "topic",
    "partition",
    "offset",
    "record",
    "consumer",
    "producer",
    "window",
    "latency",
    "throughput",
    "quality",
    "river",
    "mountain",
    "valley",
    "coast",
    "harbour",
    "city",
    "village",
    "market",
    "station",
    "platform",
    "signalbox",
    "lantern",
    "compass",
    "anchor",
    "horizon",
    "meadow",
    "orchard",
    "granite",
    "copper",
    "silver",
    "amber",
    "crimson",
    "violet",
    "golden",
    "quiet",
    "rapid",
    "steady",
    "gentle",
    "bright",
    "shadow",
    "thunder",
    "whisper",
    "journey",
    "harvest",
    "beacon",
    "voyage",
];

/// The header fields of a payload, as parsed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub run_id: &'a str,
    pub index: u32,
    pub seq: u32,
    /// Microseconds since the Unix epoch when the publisher sent it.
    pub sent_us: u64,
}

/// Appends the header (with its trailing space) to `out`.
pub fn write_header(out: &mut BytesMut, h: &Header<'_>) {
    use std::fmt::Write as _;
    // Writing into a BytesMut cannot fail.
    let _ = write!(
        out,
        "{MAGIC} {} {} {} {} ",
        h.run_id, h.index, h.seq, h.sent_us
    );
}

/// Parses the header at the start of a payload; `None` for payloads that
/// were not produced by loadsim (or are truncated/corrupt).
pub fn parse_header(payload: &[u8]) -> Option<Header<'_>> {
    let mut it = payload.splitn(6, |b| *b == b' ');
    if it.next()? != MAGIC.as_bytes() {
        return None;
    }
    let run_id = std::str::from_utf8(it.next()?).ok()?;
    let num = |b: &[u8]| -> Option<u64> {
        if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(b).ok()?.parse().ok()
    };
    let index = u32::try_from(num(it.next()?)?).ok()?;
    let seq = u32::try_from(num(it.next()?)?).ok()?;
    let sent_us = num(it.next()?)?;
    // A header must end with a space (the body, possibly empty, follows).
    it.next()?;
    if run_id.is_empty() {
        return None;
    }
    Some(Header {
        run_id,
        index,
        seq,
        sent_us,
    })
}

/// Random words separated by single spaces, exactly `len` ASCII bytes (the
/// last word may be cut).
pub fn random_words<R: Rng + ?Sized>(rng: &mut R, len: usize) -> String {
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    s.truncate(len);
    s
}

/// Builds payloads quickly: random text is generated once into a pool and
/// each message takes a random slice of a random pool entry.
pub struct PayloadGen {
    pool: Vec<String>,
    min: usize,
    max: usize,
}

impl PayloadGen {
    /// `pool` entries of random text; payload sizes uniform in `min..=max`.
    pub fn new<R: Rng + ?Sized>(rng: &mut R, pool: usize, min: usize, max: usize) -> PayloadGen {
        let (min, max) = (min.min(max), max.max(min));
        let pool = (0..pool.max(1))
            .map(|_| random_words(rng, 2 * max + 1))
            .collect();
        PayloadGen { pool, min, max }
    }

    /// A payload for message `seq` of client `index`: header, then body up
    /// to a random total size within the configured bounds (a header longer
    /// than that is never cut).
    pub fn make<R: Rng + ?Sized>(&self, rng: &mut R, h: &Header<'_>) -> Bytes {
        let total = rng.gen_range(self.min..=self.max);
        let mut out = BytesMut::with_capacity(total.max(64));
        write_header(&mut out, h);
        let body_len = total.saturating_sub(out.len());
        let entry = &self.pool[rng.gen_range(0..self.pool.len())];
        // Entries are longer than `max`, so `body_len <= entry.len()`.
        let body_len = body_len.min(entry.len());
        let start = rng.gen_range(0..=entry.len() - body_len);
        out.put_slice(&entry.as_bytes()[start..start + body_len]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn header_round_trip() {
        let h = Header {
            run_id: "r1a2b3",
            index: 99_999,
            seq: 7,
            sent_us: 1_754_000_000_123_456,
        };
        let mut b = BytesMut::new();
        write_header(&mut b, &h);
        b.put_slice(b"some words follow");
        assert_eq!(parse_header(&b), Some(h));
        // Header alone (empty body) is still valid.
        let mut b = BytesMut::new();
        write_header(&mut b, &h);
        assert_eq!(parse_header(&b), Some(h));
    }

    #[test]
    fn foreign_and_corrupt_payloads_are_rejected() {
        for p in [
            &b""[..],
            b"hello world",
            b"LS1",
            b"LS1 run",
            b"LS1 run 1 2 3",      // no trailing space: truncated
            b"LS1 run x 2 3 body", // index not a number
            b"LS1 run 1 -2 3 body",
            b"LS1 run 99999999999 2 3 body", // index > u32
            b"LS2 run 1 2 3 body",
            b"LS1  1 2 3 body", // empty run id
        ] {
            assert_eq!(parse_header(p), None, "{:?}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn random_words_have_exact_length_and_are_words() {
        let mut rng = SmallRng::seed_from_u64(1);
        for len in [0, 1, 5, 400, 600] {
            let s = random_words(&mut rng, len);
            assert_eq!(s.len(), len);
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b == b' '));
            assert!(!s.contains("  "));
        }
        let s = random_words(&mut rng, 500);
        let words: Vec<&str> = s.split(' ').collect();
        assert!(words.len() > 40, "{}", words.len());
        // All but the possibly-cut last word come from the dictionary.
        for w in &words[..words.len() - 1] {
            assert!(WORDS.contains(w), "{w}");
        }
    }

    #[test]
    fn payloads_are_within_bounds_random_and_parseable() {
        let mut rng = SmallRng::seed_from_u64(2);
        let g = PayloadGen::new(&mut rng, 16, 400, 600);
        let mut sizes = std::collections::HashSet::new();
        let mut bodies = std::collections::HashSet::new();
        for seq in 0..2000u32 {
            let h = Header {
                run_id: "abcd1234",
                index: 3,
                seq,
                sent_us: 1_700_000_000_000_000 + seq as u64,
            };
            let p = g.make(&mut rng, &h);
            assert!((400..=600).contains(&p.len()), "{}", p.len());
            assert_eq!(parse_header(&p), Some(h));
            assert!(std::str::from_utf8(&p).is_ok());
            sizes.insert(p.len());
            bodies.insert(p.slice(40..).to_vec());
        }
        assert!(sizes.len() > 150, "sizes not spread: {}", sizes.len());
        assert!(bodies.len() > 1900, "bodies repeat: {}", bodies.len());
    }

    #[test]
    fn long_header_is_never_cut() {
        let mut rng = SmallRng::seed_from_u64(3);
        let g = PayloadGen::new(&mut rng, 2, 10, 20);
        let h = Header {
            run_id: "a-rather-long-run-identifier",
            index: 1,
            seq: 2,
            sent_us: 3,
        };
        let p = g.make(&mut rng, &h);
        assert_eq!(parse_header(&p), Some(h));
    }
}
