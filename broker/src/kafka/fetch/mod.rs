//! The fan-out reader's own Kafka fetch client: fetch requests on the
//! tokio worker, records handed over straight from the response buffer.
//!
//! Why not librdkafka here: its consumer parses each fetch on its broker
//! thread, queues every record as an op, and our task pops them one by one
//! and has each record's headers parsed into a list again; at one record per
//! fetch that was ~25k instructions a record across the two threads
//! (docs/benchmarks.md). The other readers (sessions, retained, nodes,
//! catch-up) keep librdkafka: they read little once loaded.
//!
//! Used when Kafka is reached over plaintext (`usable`); TLS or SASL to
//! Kafka, which only librdkafka's properties configure, keep the librdkafka
//! reader. Reads `read_committed`, as librdkafka does by default.

mod batches;
pub(crate) mod fetch_codec;
mod pace;
pub(crate) mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    BrokerId, ListOffsetsRequest, MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use tokio::task::JoinSet;

use crate::config::KafkaConfig;
use crate::session::mailbox::Wakes;
pub use batches::Fetched;
use batches::{Committed, Verdict};
use fetch_codec::{FetchSpec, PartitionAnswer};
use pace::FetchPace;
use wire::KafkaConn;

const METADATA_VERSION: i16 = 12;
const LIST_OFFSETS_VERSION: i16 = 7;
/// ListOffsets timestamps meaning "log start" and "log end".
const EARLIEST: i64 = -2;
const LATEST: i64 = -1;
/// Per fetch and per partition, as librdkafka's `fetch.max.bytes` /
/// `max.partition.fetch.bytes` bound its prefetch: one response in memory.
const FETCH_MAX_BYTES: i32 = 16 << 20;
const PARTITION_MAX_BYTES: i32 = 1 << 20;
/// How long Kafka may take beyond the fetch's own wait.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// A partition without a leader is looked up again this often.
const LEADERLESS_RECHECK: Duration = Duration::from_secs(1);

const OFFSET_OUT_OF_RANGE: i16 = 1;
/// ListOffsets isolation levels: the high watermark, or the last stable
/// offset (no record of an open transaction at or past it).
const READ_UNCOMMITTED: i8 = 0;
const READ_COMMITTED: i8 = 1;

/// Whether this client can reach Kafka as configured: plaintext only.
pub(crate) fn usable(cfg: &KafkaConfig) -> bool {
    cfg.native_fetch && plaintext(cfg)
}

/// Whether Kafka is reached without TLS or SASL, which only librdkafka
/// speaks here.
pub(crate) fn plaintext(cfg: &KafkaConfig) -> bool {
    cfg.properties.iter().all(|(k, v)| {
        let k = k.to_ascii_lowercase();
        if k == "security.protocol" {
            v.eq_ignore_ascii_case("plaintext")
        } else {
            !(k.starts_with("ssl.") || k.starts_with("sasl."))
        }
    })
}

/// Reads every partition of `topic` from `starts` on, forever (abort the
/// handle to stop), calling `on_records(partition, records, wakes)` with
/// each record batch's committed records from the fetch offset on (in
/// offset order, never empty); `wakes` is flushed after each fetch response.
pub fn spawn<F>(
    cfg: &KafkaConfig,
    node_id: &str,
    topic: &str,
    starts: HashMap<i32, i64>,
    on_records: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(i32, &[Fetched], &mut Wakes) + Send + 'static,
{
    let ctx = Arc::new(Ctx::new(cfg, node_id, topic));
    let shared = Arc::new(Mutex::new(Reading {
        offsets: starts,
        on_records,
        wakes: Wakes::default(),
        decoded: Vec::new(),
    }));
    tokio::spawn(run(ctx, shared))
}

/// Each partition of `topic` and its end as a `read_committed` reader sees
/// it (the last stable offset), asked of the partition's leader: where a
/// reader starts that must miss nothing written from now on. Fails while a
/// partition has no leader (right after the topic's creation); callers retry.
pub async fn end_offsets(
    cfg: &KafkaConfig,
    node_id: &str,
    topic: &str,
) -> anyhow::Result<HashMap<i32, i64>> {
    let ctx = Ctx::new(cfg, node_id, topic);
    let (by_leader, leaderless) = leaders(&ctx, None).await?;
    if leaderless {
        anyhow::bail!("a partition of Kafka topic {topic} has no leader");
    }
    if by_leader.is_empty() {
        anyhow::bail!("Kafka topic {topic} has no partitions");
    }
    let mut ends = HashMap::new();
    for (addr, parts) in by_leader {
        let mut conn = KafkaConn::connect(&addr, &ctx.client_id).await?;
        ends.extend(list_offsets(&ctx, &mut conn, &parts, LATEST, READ_COMMITTED).await?);
    }
    Ok(ends)
}

/// `bootstrap.servers` as librdkafka reads it: comma-separated
/// `host:port`, each optionally with a `plaintext://` scheme.
pub(crate) fn bootstrap_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(|s| s.trim())
        .map(|s| s.split_once("://").map_or(s, |(_, rest)| rest).to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A broker's address from metadata; an IPv6 literal needs brackets.
pub(crate) fn host_port(host: &str, port: i32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

struct Ctx {
    bootstrap: Vec<String>,
    client_id: String,
    topic: String,
    idle_wait_ms: i32,
    busy_wait_ms: i32,
}

impl Ctx {
    fn new(cfg: &KafkaConfig, node_id: &str, topic: &str) -> Ctx {
        Ctx {
            bootstrap: bootstrap_addrs(&cfg.bootstrap_servers),
            client_id: format!("lodestream-reader-{topic}-{node_id}"),
            topic: topic.to_string(),
            idle_wait_ms: i32::try_from(cfg.fetch_wait_max_ms).unwrap_or(i32::MAX),
            busy_wait_ms: i32::try_from(cfg.fetch_busy_wait_ms).unwrap_or(i32::MAX),
        }
    }
}

/// What the fetch loops of one topic share: the next offset of each
/// partition and the callback. Updated only between awaits, so an aborted
/// loop never leaves an offset past what was handed over.
struct Reading<F> {
    offsets: HashMap<i32, i64>,
    on_records: F,
    wakes: Wakes,
    /// One batch's records at a time (`batches::decode_into`).
    decoded: Vec<Fetched>,
}

/// Records' room kept between batches (a batch has at most 4,096 records
/// reserved ahead, about 400 KiB).
const KEEP_DECODED: usize = 1024;

/// Looks up the leaders, runs one fetch loop per leader until one of them
/// fails (a connection lost, a leader moved), then starts over.
async fn run<F>(ctx: Arc<Ctx>, shared: Arc<Mutex<Reading<F>>>)
where
    F: FnMut(i32, &[Fetched], &mut Wakes) + Send + 'static,
{
    let mut delay = RETRY_MIN;
    loop {
        let began = Instant::now();
        let partitions: Vec<i32> = lock(&shared).offsets.keys().copied().collect();
        match leaders(&ctx, Some(&partitions)).await {
            Ok((by_leader, leaderless)) => {
                let mut set = JoinSet::new();
                for (addr, parts) in by_leader {
                    set.spawn(fetch_loop(ctx.clone(), addr, parts, shared.clone()));
                }
                if leaderless {
                    set.spawn(async {
                        tokio::time::sleep(LEADERLESS_RECHECK).await;
                        anyhow::anyhow!("a partition had no leader")
                    });
                }
                if let Some(Ok(e)) = set.join_next().await {
                    tracing::warn!(topic = %ctx.topic, error = %e, "Kafka fetch interrupted; looking up leaders again");
                }
            }
            Err(e) => {
                tracing::warn!(topic = %ctx.topic, error = %e, "Kafka metadata lookup failed");
            }
        }
        delay = if began.elapsed() > Duration::from_secs(10) {
            RETRY_MIN
        } else {
            (delay * 2).min(RETRY_MAX)
        };
        tokio::time::sleep(delay).await;
    }
}

fn lock<F>(m: &Mutex<Reading<F>>) -> std::sync::MutexGuard<'_, Reading<F>> {
    // A panic in a callback must not stop the topic's delivery for good.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Leaders = (HashMap<String, Vec<i32>>, bool);

/// `partitions` (all of the topic's when `None`) grouped by their leader's
/// address, and whether any partition had none.
async fn leaders(ctx: &Ctx, partitions: Option<&[i32]>) -> anyhow::Result<Leaders> {
    let md = metadata(ctx).await?;
    let topic = md
        .topics
        .iter()
        .find(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == ctx.topic))
        .ok_or_else(|| anyhow::anyhow!("no metadata for Kafka topic {}", ctx.topic))?;
    if topic.error_code != 0 {
        anyhow::bail!("Kafka topic {}: error {}", ctx.topic, topic.error_code);
    }
    let addrs: HashMap<i32, String> = md
        .brokers
        .iter()
        .map(|b| (b.node_id.0, host_port(b.host.as_str(), b.port)))
        .collect();
    let leader_of: HashMap<i32, i32> = topic
        .partitions
        .iter()
        .map(|p| (p.partition_index, p.leader_id.0))
        .collect();
    let all: Vec<i32> = leader_of.keys().copied().collect();
    let (mut by_leader, mut leaderless) = (HashMap::<String, Vec<i32>>::new(), false);
    for &p in partitions.unwrap_or(&all) {
        match leader_of.get(&p).and_then(|l| addrs.get(l)) {
            Some(addr) => by_leader.entry(addr.clone()).or_default().push(p),
            None => leaderless = true,
        }
    }
    Ok((by_leader, leaderless))
}

/// Metadata for the topic from the first bootstrap server that answers.
async fn metadata(ctx: &Ctx) -> anyhow::Result<MetadataResponse> {
    let topics = std::slice::from_ref(&ctx.topic);
    metadata_of(&ctx.bootstrap, &ctx.client_id, topics, false).await
}

/// Metadata for `topics` from the first of `bootstrap` that answers. A
/// producer's lookup lets Kafka create a missing topic where Kafka allows
/// it (`auto.create.topics.enable`), as librdkafka's producer does.
pub(crate) async fn metadata_of(
    bootstrap: &[String],
    client_id: &str,
    topics: &[String],
    auto_create: bool,
) -> anyhow::Result<MetadataResponse> {
    let wanted = topics
        .iter()
        .map(|t| {
            MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
        })
        .collect();
    let req = MetadataRequest::default()
        .with_topics(Some(wanted))
        .with_allow_auto_topic_creation(auto_create);
    let mut last = anyhow::anyhow!("no bootstrap server configured");
    for addr in bootstrap {
        let answer = async {
            let mut conn = KafkaConn::connect(addr, client_id).await?;
            conn.request(&req, METADATA_VERSION, REQUEST_TIMEOUT).await
        };
        match answer.await {
            Ok(md) => return Ok(md),
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}

/// Fetches `parts` from one leader until something goes wrong.
async fn fetch_loop<F>(
    ctx: Arc<Ctx>,
    addr: String,
    parts: Vec<i32>,
    shared: Arc<Mutex<Reading<F>>>,
) -> anyhow::Error
where
    F: FnMut(i32, &[Fetched], &mut Wakes) + Send + 'static,
{
    let mut conn = match KafkaConn::connect(&addr, &ctx.client_id).await {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    // Each turn only moves the offsets.
    let mut positions: Vec<(i32, i64)> = parts.iter().map(|&p| (p, 0)).collect();
    let mut pace = FetchPace::new(ctx.idle_wait_ms, ctx.busy_wait_ms, Instant::now());
    loop {
        let ask = pace.ask();
        let timeout = REQUEST_TIMEOUT + Duration::from_millis(ask.wait_ms.unsigned_abs().into());
        {
            let offsets = &lock(&shared).offsets;
            for (p, at) in positions.iter_mut() {
                *at = offsets.get(p).copied().unwrap_or(*at);
            }
        }
        let spec = FetchSpec {
            wait_ms: ask.wait_ms,
            min_bytes: ask.min_bytes,
            max_bytes: FETCH_MAX_BYTES,
            partition_max_bytes: PARTITION_MAX_BYTES,
            isolation_level: READ_COMMITTED,
            topic: &ctx.topic,
            partitions: &positions,
        };
        let (error_code, answers) = match conn.fetch(&spec, timeout).await {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        if error_code != 0 {
            return anyhow::anyhow!("fetch from {addr}: Kafka error {error_code}");
        }
        let record_bytes = answers.iter().map(PartitionAnswer::record_bytes).sum();
        pace.answered(record_bytes, Instant::now());
        let mut out_of_range = Vec::new();
        {
            let mut reading = lock(&shared);
            for p in answers {
                match reading.take(&ctx.topic, p) {
                    Ok(Taken::Records) => {}
                    Ok(Taken::OutOfRange(part)) => out_of_range.push(part),
                    Err(e) => return e,
                }
            }
            reading.wakes.flush();
        }
        for part in out_of_range {
            if let Err(e) = resume_in_range(&ctx, &mut conn, part, &shared).await {
                return e;
            }
        }
    }
}

/// A fetch offset Kafka no longer (or not yet) has: behind the log start
/// (retention) it resumes there, as the librdkafka readers do
/// (`auto.offset.reset = earliest`); past the log end (a truncated log) at
/// the end. Asked of the leader: an out-of-range answer carries neither.
async fn resume_in_range<F>(
    ctx: &Ctx,
    conn: &mut KafkaConn,
    part: i32,
    shared: &Mutex<Reading<F>>,
) -> anyhow::Result<()> {
    let (earliest, latest) = (
        list_offset(ctx, conn, part, EARLIEST).await?,
        list_offset(ctx, conn, part, LATEST).await?,
    );
    let unchanged = {
        let mut reading = lock(shared);
        let Some(offset) = reading.offsets.get_mut(&part) else {
            return Ok(());
        };
        let resume = (*offset).clamp(earliest, latest.max(earliest));
        tracing::warn!(topic = %ctx.topic, partition = part, offset = *offset, resume, "fetch offset out of range");
        std::mem::replace(offset, resume) == resume
    };
    if unchanged {
        // In range by the leader's own list (a race with retention, or a
        // new leader catching up): try again shortly rather than at once.
        tokio::time::sleep(RETRY_MIN).await;
    }
    Ok(())
}

/// Where `timestamp` puts `part`, by its high watermark for `LATEST`.
async fn list_offset(
    ctx: &Ctx,
    conn: &mut KafkaConn,
    part: i32,
    timestamp: i64,
) -> anyhow::Result<i64> {
    let offsets = list_offsets(ctx, conn, &[part], timestamp, READ_UNCOMMITTED).await?;
    offsets
        .get(&part)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no offset for partition {part}"))
}

/// Where `timestamp` (`EARLIEST`, `LATEST`) puts each of `parts`, all led
/// by the broker behind `conn`.
async fn list_offsets(
    ctx: &Ctx,
    conn: &mut KafkaConn,
    parts: &[i32],
    timestamp: i64,
    isolation_level: i8,
) -> anyhow::Result<HashMap<i32, i64>> {
    let partitions = parts
        .iter()
        .map(|&p| {
            ListOffsetsPartition::default()
                .with_partition_index(p)
                .with_timestamp(timestamp)
        })
        .collect();
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_isolation_level(isolation_level)
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(StrBytes::from_string(ctx.topic.clone())))
            .with_partitions(partitions)]);
    let resp = conn
        .request(&req, LIST_OFFSETS_VERSION, REQUEST_TIMEOUT)
        .await?;
    let mut offsets = HashMap::new();
    for p in resp.topics.iter().flat_map(|t| &t.partitions) {
        if p.error_code != 0 {
            anyhow::bail!(
                "offsets of partition {}: Kafka error {}",
                p.partition_index,
                p.error_code
            );
        }
        offsets.insert(p.partition_index, p.offset);
    }
    if let Some(p) = parts.iter().find(|p| !offsets.contains_key(p)) {
        anyhow::bail!("no offset for partition {p}");
    }
    Ok(offsets)
}

/// What `take` did with a partition's answer.
enum Taken {
    Records,
    /// The fetch offset is out of range: look up where to resume.
    OutOfRange(i32),
}

impl<F> Reading<F>
where
    F: FnMut(i32, &[Fetched], &mut Wakes),
{
    /// Hands over one partition's committed records from its fetch offset
    /// on, and moves the offset past them. An error asks for the leaders
    /// again.
    fn take(&mut self, topic: &str, p: PartitionAnswer) -> anyhow::Result<Taken> {
        let part = p.partition;
        let Some(&offset) = self.offsets.get(&part) else {
            return Ok(Taken::Records);
        };
        match p.error_code {
            0 => {}
            OFFSET_OUT_OF_RANGE => return Ok(Taken::OutOfRange(part)),
            code => anyhow::bail!("partition {part}: Kafka error {code}"),
        }
        let Some(records) = p.records else {
            return Ok(Taken::Records);
        };
        let mut committed = Committed::new(p.aborted.iter().copied());
        let mut next = offset;
        for (header, batch) in batches::split(records)? {
            next = next.max(header.last_offset + 1);
            if header.last_offset < offset {
                continue;
            }
            self.batch(topic, part, offset, &header, batch, &mut committed);
        }
        self.release_decoded();
        self.offsets.insert(part, next);
        Ok(Taken::Records)
    }

    fn batch(
        &mut self,
        topic: &str,
        part: i32,
        offset: i64,
        header: &batches::Header,
        batch: bytes::Bytes,
        committed: &mut Committed,
    ) {
        let Reading {
            decoded,
            on_records,
            wakes,
            ..
        } = self;
        if let Err(e) = batches::decode_into(header, batch, decoded) {
            // A batch that fails its CRC cannot be delivered; say so loudly
            // and go on, as re-fetching it would fail forever.
            tracing::error!(topic, partition = part, error = %e, "record batch skipped");
            return;
        }
        if committed.judge(header, || batches::is_abort_marker(decoded)) == Verdict::Skip {
            return;
        }
        // A batch's records are in offset order; the first fetch of a
        // batch may start inside it.
        let from = decoded.partition_point(|r| r.offset < offset);
        if let Some(records) = decoded.get(from..).filter(|r| !r.is_empty()) {
            on_records(part, records, wakes);
        }
    }

    /// Empties `decoded` once a partition's batches are handed over: its
    /// records hold parts of the response, whose buffer the next fetch
    /// reuses only when nothing holds it.
    fn release_decoded(&mut self) {
        self.decoded.clear();
        if self.decoded.capacity() > KEEP_DECODED {
            self.decoded = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_lists_and_broker_addresses_parse_as_librdkafka_reads_them() {
        assert_eq!(
            bootstrap_addrs(" a:9092, PLAINTEXT://b:9093,,"),
            ["a:9092", "b:9093"]
        );
        assert_eq!(host_port("k1", 9092), "k1:9092");
        assert_eq!(host_port("::1", 9092), "[::1]:9092");
    }

    #[test]
    fn tls_or_sasl_to_kafka_keeps_librdkafka() {
        let mut cfg = KafkaConfig::default();
        assert!(usable(&cfg));
        cfg.properties
            .insert("security.protocol".into(), "PLAINTEXT".into());
        assert!(usable(&cfg));
        cfg.properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        assert!(!usable(&cfg));
        cfg.properties.clear();
        cfg.properties
            .insert("ssl.ca.location".into(), "/ca.pem".into());
        assert!(!usable(&cfg));
        cfg.properties.clear();
        cfg.native_fetch = false;
        assert!(!usable(&cfg));
    }
}
