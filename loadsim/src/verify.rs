//! The Kafka check: which acknowledged messages really landed in Kafka.
//!
//! Before the first PUBLISH the high watermark of every partition of the
//! target topic is recorded; after the run (once the watermarks stop
//! moving) the records between those offsets are read and every record of
//! this run (run id in the payload header) is matched against the
//! acknowledged sequence numbers of each client. `lost` = acknowledged but
//! not found; it must be 0.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::client::ClientResult;
use crate::stats::KafkaCheck;

/// A set of sequence numbers stored as sorted, disjoint, half-open ranges.
/// Acknowledgements arrive in order, so a client's set is usually one range.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqRanges {
    ranges: Vec<(u32, u32)>,
    /// Set by an out-of-order push; `normalize` sorts and merges.
    unsorted: bool,
}

impl SeqRanges {
    pub fn push(&mut self, seq: u32) {
        match self.ranges.last_mut() {
            Some(last) if last.1 == seq => last.1 += 1,
            Some(last) if seq > last.1 => self.ranges.push((seq, seq + 1)),
            None => self.ranges.push((seq, seq + 1)),
            Some(_) => {
                // Out of order or repeated (not expected from MQTT, handled anyway).
                self.ranges.push((seq, seq + 1));
                self.unsorted = true;
            }
        }
    }

    /// Sorts and merges ranges (needed only after out-of-order pushes).
    pub fn normalize(&mut self) {
        if !self.unsorted {
            return;
        }
        self.ranges.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len());
        for &(a, b) in &self.ranges {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        self.ranges = out;
        self.unsorted = false;
    }

    pub fn len(&self) -> u64 {
        let mut c = self.clone();
        c.normalize();
        c.ranges.iter().map(|(a, b)| u64::from(b - a)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many of the set's numbers are in `sorted_unique`.
    pub fn count_present(&self, sorted_unique: &[u32]) -> u64 {
        let mut c = self.clone();
        c.normalize();
        c.ranges
            .iter()
            .map(|&(a, b)| {
                let lo = sorted_unique.partition_point(|&x| x < a);
                let hi = sorted_unique.partition_point(|&x| x < b);
                (hi - lo) as u64
            })
            .sum()
    }
}

/// Counts of the comparison between what clients did and what Kafka holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub landed: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub acked: u64,
    pub lost: u64,
    pub published_not_landed: u64,
}

/// Compares client `i`'s results with the sequence numbers found for it in
/// Kafka (`landed[i]`, any order, duplicates allowed; sorted in place).
pub fn compare(results: &[ClientResult], landed: &mut [Vec<u32>]) -> Tally {
    let mut t = Tally::default();
    for (i, r) in results.iter().enumerate() {
        let seqs = match landed.get_mut(i) {
            Some(s) => s,
            None => &mut Vec::new(),
        };
        t.landed += seqs.len() as u64;
        seqs.sort_unstable();
        seqs.dedup();
        t.unique += seqs.len() as u64;
        if !r.acked.is_empty() {
            let acked = r.acked.len();
            t.acked += acked;
            t.lost += acked - r.acked.count_present(seqs);
        }
        let published_landed = seqs.partition_point(|&s| s < r.published) as u64;
        t.published_not_landed += u64::from(r.published) - published_landed;
    }
    t.duplicates = t.landed - t.unique;
    t
}

fn consumer(bootstrap: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("log_level", "3")
        .create()
        .context("creating the Kafka consumer")
}

/// High watermark of every partition of `topic`; empty when the topic does
/// not exist yet.
pub fn high_watermarks(bootstrap: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let c = consumer(bootstrap, "loadsim-watermarks")?;
    let timeout = Duration::from_secs(10);
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("Kafka metadata of {topic} from {bootstrap}"))?;
    let mut out = BTreeMap::new();
    for t in md.topics() {
        if let Some(e) = t.error() {
            let e: RDKafkaErrorCode = e.into();
            if e == RDKafkaErrorCode::UnknownTopicOrPartition {
                return Ok(out);
            }
            anyhow::bail!("Kafka topic {topic}: {e}");
        }
        for p in t.partitions() {
            let (_, high) = c
                .fetch_watermarks(topic, p.id(), timeout)
                .with_context(|| format!("watermarks of {topic}/{}", p.id()))?;
            out.insert(p.id(), high);
        }
    }
    Ok(out)
}

/// Watermarks once they stopped moving for `quiet` (records still in a
/// producer queue, e.g. QoS 0, get time to land), at most `max_wait`.
pub fn settled_watermarks(
    bootstrap: &str,
    topic: &str,
    quiet: Duration,
    max_wait: Duration,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let deadline = Instant::now() + max_wait;
    let mut last = high_watermarks(bootstrap, topic)?;
    loop {
        std::thread::sleep(quiet);
        let now = high_watermarks(bootstrap, topic)?;
        if now == last || Instant::now() >= deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// Reads every record in `[start, end)` of each partition (a partition
/// missing from `start` is read from its beginning) and hands each payload
/// to `f`. Returns (records read, complete).
pub fn scan(
    bootstrap: &str,
    topic: &str,
    start: &BTreeMap<i32, i64>,
    end: &BTreeMap<i32, i64>,
    timeout: Duration,
    mut f: impl FnMut(&[u8]),
) -> anyhow::Result<(u64, bool)> {
    let c = consumer(bootstrap, "loadsim-verify")?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    for (&p, &hi) in end {
        let lo = start.get(&p).copied().unwrap_or(0);
        if hi > lo {
            tpl.add_partition_offset(topic, p, Offset::Offset(lo))?;
            remaining.insert(p, hi);
        }
    }
    if remaining.is_empty() {
        return Ok((0, true));
    }
    c.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut n = 0u64;
    while !remaining.is_empty() && Instant::now() < deadline {
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let p = m.partition();
                let Some(&hi) = remaining.get(&p) else {
                    continue;
                };
                if m.offset() < hi {
                    n += 1;
                    if let Some(v) = m.payload() {
                        f(v);
                    }
                }
                if m.offset() + 1 >= hi {
                    remaining.remove(&p);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) => eprintln!("loadsim: Kafka read error: {e}"),
            None => {
                // Offsets may skip (compaction, control records): trust the position.
                if let Ok(pos) = c.position() {
                    for e in pos.elements() {
                        if let (Offset::Offset(o), Some(&hi)) =
                            (e.offset(), remaining.get(&e.partition()))
                        {
                            if o >= hi {
                                remaining.remove(&e.partition());
                            }
                        }
                    }
                }
            }
        }
    }
    Ok((n, remaining.is_empty()))
}

/// The whole check for one loadsim process (blocking; run off the runtime).
#[allow(clippy::too_many_arguments)]
pub fn check(
    bootstrap: &str,
    topic: &str,
    start: &BTreeMap<i32, i64>,
    run_id: &str,
    first_index: u32,
    results: &[ClientResult],
    timeout: Duration,
) -> anyhow::Result<KafkaCheck> {
    let t0 = Instant::now();
    let end = settled_watermarks(
        bootstrap,
        topic,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )?;
    let mut landed: Vec<Vec<u32>> = vec![Vec::new(); results.len()];
    let (scanned, complete) = scan(bootstrap, topic, start, &end, timeout, |v| {
        if let Some(h) = crate::payload::parse_header(v) {
            if h.run_id == run_id {
                if let Some(i) = h.index.checked_sub(first_index) {
                    if let Some(l) = landed.get_mut(i as usize) {
                        l.push(h.seq);
                    }
                }
            }
        }
    })?;
    let t = compare(results, &mut landed);
    Ok(KafkaCheck {
        topic: topic.to_string(),
        records_scanned: scanned,
        landed: t.landed,
        unique: t.unique,
        duplicates: t.duplicates,
        acked: t.acked,
        lost: t.lost,
        published_not_landed: t.published_not_landed,
        complete,
        scan_secs: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(seqs: &[u32]) -> SeqRanges {
        let mut r = SeqRanges::default();
        for s in seqs {
            r.push(*s);
        }
        r
    }

    #[test]
    fn ranges_compress_in_order_acks() {
        let r = ranges(&(0..1000).collect::<Vec<_>>());
        assert_eq!(r.ranges, vec![(0, 1000)]);
        assert_eq!(r.len(), 1000);
        let r = ranges(&[0, 1, 2, 5, 6, 9]);
        assert_eq!(r.ranges, vec![(0, 3), (5, 7), (9, 10)]);
        assert_eq!(r.len(), 6);
        assert!(SeqRanges::default().is_empty());
        assert_eq!(SeqRanges::default().len(), 0);
    }

    #[test]
    fn ranges_handle_out_of_order_and_repeats() {
        let mut r = ranges(&[5, 6, 1, 2, 6, 3, 0]);
        assert_eq!(r.len(), 6); // {0,1,2,3,5,6}
        r.normalize();
        assert_eq!(r.ranges, vec![(0, 4), (5, 7)]);
    }

    #[test]
    fn count_present_uses_range_bounds() {
        let r = ranges(&[0, 1, 2, 3, 10, 11]);
        assert_eq!(r.count_present(&[]), 0);
        assert_eq!(r.count_present(&[0, 1, 2, 3, 10, 11]), 6);
        assert_eq!(r.count_present(&[1, 3, 4, 5, 9, 11, 12]), 3);
    }

    #[test]
    fn compare_counts_lost_duplicates_and_unacked() {
        let results = vec![
            // Client 0: published 5, acked 0..4 (seq 4 in flight at the end).
            ClientResult {
                published: 5,
                acked: ranges(&[0, 1, 2, 3]),
                unacked: 1,
            },
            // Client 1: QoS 0 style, nothing acked.
            ClientResult {
                published: 3,
                acked: SeqRanges::default(),
                unacked: 0,
            },
            // Client 2: acked 0..3 but seq 1 is missing from Kafka.
            ClientResult {
                published: 3,
                acked: ranges(&[0, 1, 2]),
                unacked: 0,
            },
        ];
        let mut landed = vec![
            vec![3, 0, 1, 2, 2, 4], // one duplicate, the unacked one landed too
            vec![0, 2],             // QoS 0: seq 1 never landed
            vec![2, 0],
        ];
        let t = compare(&results, &mut landed);
        assert_eq!(
            t,
            Tally {
                landed: 10,
                unique: 9,
                duplicates: 1,
                acked: 7,
                lost: 1,
                published_not_landed: 2,
            }
        );
    }

    #[test]
    fn compare_with_fewer_landed_lists_than_clients() {
        let results = vec![ClientResult {
            published: 2,
            acked: ranges(&[0, 1]),
            unacked: 0,
        }];
        let t = compare(&results, &mut []);
        assert_eq!(t.lost, 2);
        assert_eq!(t.published_not_landed, 2);
    }
}
