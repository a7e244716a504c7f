//! The `fleet-snapshot` job: reads every partition of the positions topic
//! (no consumer group: each instance sees the whole fleet) and once a second
//! publishes the binary [`crate::snapshot`] of all trucks to the stats topic,
//! plus the plate directory every few seconds. The broker maps both back to
//! MQTT (`fleet/stats/snapshot`, `fleet/stats/plates`).
//!
//! It holds no state worth keeping: on start it replays the last
//! `drop_after_s` seconds of the topic, so a restart shows the same fleet
//! after a few seconds. Two instances publish the same snapshot twice, which
//! is harmless (a viewer keeps the newest by `ts_ms`). Records are sent
//! without waiting for Kafka: a snapshot superseded a second later is not
//! worth blocking the consumer for.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::agg::parse_position;
use crate::directions::{parse_kv, send};
use crate::snapshot::{plate_of_key, Applied, FleetState};
use crate::window::now_ms;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "fleet-snapshot",
    version,
    about = "Per-second binary snapshot of the whole fleet"
)]
pub struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "LODESTREAM_KAFKA", default_value = "127.0.0.1:9092")]
    pub bootstrap: String,
    /// Topic with the truck positions (key `trucks/<plate>`, JSON value).
    #[arg(long, env = "LODESTREAM_POSITIONS_TOPIC", default_value = "trucks")]
    pub positions_topic: String,
    /// Key prefix of position records; deeper keys (`trucks/<plate>/route`) are skipped.
    #[arg(long, env = "SNAPSHOT_KEY_PREFIX", default_value = "trucks/")]
    pub key_prefix: String,
    /// Topic the snapshots are published to (mapped to MQTT `fleet/stats/#`).
    #[arg(long, env = "LODESTREAM_STATS_TOPIC", default_value = "fleet-stats")]
    pub stats_topic: String,
    /// Record key, and so MQTT topic, of the snapshots.
    #[arg(long, env = "SNAPSHOT_KEY", default_value = "fleet/stats/snapshot")]
    pub snapshot_key: String,
    /// Record key, and so MQTT topic, of the plate directory.
    #[arg(
        long,
        env = "SNAPSHOT_PLATES_KEY",
        default_value = "fleet/stats/plates"
    )]
    pub plates_key: String,
    /// How often a snapshot is published.
    #[arg(long, env = "SNAPSHOT_INTERVAL_MS", default_value_t = 1000)]
    pub interval_ms: u64,
    /// The plate directory is published every this many snapshots, and at once when its epoch changes.
    #[arg(long, env = "SNAPSHOT_PLATES_EVERY", default_value_t = 5)]
    pub plates_every: u32,
    /// A truck silent this long leaves the snapshot (viewers fade it from 30 s).
    #[arg(long, env = "SNAPSHOT_DROP_AFTER_S", default_value_t = 120)]
    pub drop_after_s: u64,
    /// At most this many trucks (6 bytes each in a snapshot); further new trucks are left out and counted.
    #[arg(long, env = "SNAPSHOT_MAX_TRUCKS", default_value_t = 100_000)]
    pub max_trucks: usize,
    /// Extra librdkafka properties (e.g. security.protocol=SASL_SSL), repeatable.
    #[arg(long = "kafka-opt", value_parser = parse_kv)]
    pub kafka_opts: Vec<(String, String)>,
}

impl Args {
    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.kafka_opts {
            c.set(k, v);
        }
        c
    }

    fn drop_after_ms(&self) -> i64 {
        i64::try_from(self.drop_after_s.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

#[derive(Default, Debug)]
struct Counters {
    records: u64,
    applied: u64,
    late: u64,
    skipped: u64,
    full: u64,
}

/// Runs until `shutdown` becomes true.
pub async fn run(args: Args, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    if args.interval_ms == 0 || args.max_trucks == 0 {
        bail!("--interval-ms and --max-trucks must be > 0");
    }
    let consumer: StreamConsumer = args
        .config()
        // Required by librdkafka; nothing is committed, partitions are assigned by hand.
        .set("group.id", "lodestream-fleet-snapshot")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the positions consumer")?;
    let producer: FutureProducer = args
        .config()
        .set("linger.ms", "5")
        .create()
        .context("creating the Kafka producer")?;
    let mut partitions = assign_from_window(&consumer, &args).await?;
    info!(topic = %args.positions_topic, partitions, "fleet-snapshot started");

    let mut fleet = FleetState::new(args.max_trucks, args.drop_after_ms());
    let mut tick = interval(Duration::from_millis(args.interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut n = Counters::default();
    let (mut ticks, mut last_epoch, mut last_log) = (0u32, 0u32, Instant::now());
    let mut last_meta = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            m = consumer.recv() => match m {
                Ok(msg) => apply(&mut fleet, &mut n, &args.key_prefix, msg.key(), msg.payload(), msg.timestamp().to_millis()),
                Err(err) => warn!(%err, "consume error"),
            },
            _ = tick.tick() => {
                let now = now_ms();
                fleet.expire(now);
                let new_epoch = fleet.epoch() != last_epoch;
                if new_epoch || ticks % args.plates_every.max(1) == 0 {
                    send(&producer, &args.stats_topic, &args.plates_key, fleet.encode_plates(), |_| ());
                    last_epoch = fleet.epoch();
                }
                send(&producer, &args.stats_topic, &args.snapshot_key, fleet.encode_snapshot(now), |_| ());
                ticks = ticks.wrapping_add(1);
                if last_meta.elapsed() > Duration::from_secs(30) {
                    // New partitions of the positions topic are picked up from their start.
                    last_meta = Instant::now();
                    partitions = add_new_partitions(&consumer, &args, partitions);
                }
                if last_log.elapsed() > Duration::from_secs(30) {
                    last_log = Instant::now();
                    info!(trucks = fleet.len(), epoch = fleet.epoch(), records = n.records, applied = n.applied,
                          late = n.late, skipped = n.skipped, full = n.full, "fleet-snapshot progress");
                }
            }
        }
    }
    Ok(())
}

fn apply(
    fleet: &mut FleetState,
    n: &mut Counters,
    prefix: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    kafka_ts: Option<i64>,
) {
    n.records += 1;
    let key = key.and_then(|k| std::str::from_utf8(k).ok());
    let (Some(key), Some(payload)) = (key, payload) else {
        n.skipped += 1;
        return;
    };
    let Some(plate) = plate_of_key(key, prefix) else {
        n.skipped += 1;
        return;
    };
    match parse_position(Some(key.as_bytes()), payload, kafka_ts) {
        Ok((_, obs)) => match fleet.apply(plate, &obs) {
            Applied::Inserted | Applied::Updated => n.applied += 1,
            Applied::Late => n.late += 1,
            Applied::NoPosition => n.skipped += 1,
            Applied::Full => n.full += 1,
        },
        Err(err) => {
            n.skipped += 1;
            debug!(%err, key, "skipping record");
        }
    }
}

fn partition_count(consumer: &StreamConsumer, topic: &str) -> anyhow::Result<i32> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("fetching the positions topic's metadata")?;
    let n = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    Ok(i32::try_from(n).unwrap_or(i32::MAX))
}

/// Assigns every partition, starting `drop_after_s` ago so trucks that went
/// silent recently are still shown (and fade) after a restart. Waits for the
/// topic to exist.
async fn assign_from_window(consumer: &StreamConsumer, args: &Args) -> anyhow::Result<i32> {
    loop {
        // Right after the topic is created, its partitions may have no leader yet: retry.
        match window_offsets(consumer, args) {
            Ok(Some((parts, tpl))) => {
                consumer.assign(&tpl).context("assigning the partitions")?;
                return Ok(parts);
            }
            Ok(None) => info!(topic = %args.positions_topic, "waiting for the positions topic"),
            Err(err) => warn!(err = format!("{err:#}"), "waiting for Kafka"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Every partition at its first offset at or after `drop_after_s` ago (End
/// where there is none); `None` while the topic does not exist.
fn window_offsets(
    consumer: &StreamConsumer,
    args: &Args,
) -> anyhow::Result<Option<(i32, TopicPartitionList)>> {
    let topic = &args.positions_topic;
    let parts = partition_count(consumer, topic)?;
    if parts == 0 {
        return Ok(None);
    }
    let since = now_ms() - args.drop_after_ms();
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Offset(since))
            .context("building the assignment")?;
    }
    let tpl = consumer
        .offsets_for_times(tpl, Duration::from_secs(10))
        .context("looking up the offsets of the replay window")?;
    Ok(Some((parts, tpl)))
}

fn add_new_partitions(consumer: &StreamConsumer, args: &Args, known: i32) -> i32 {
    let topic = &args.positions_topic;
    let now = match partition_count(consumer, topic) {
        Ok(n) if n > known => n,
        Ok(_) => return known,
        Err(err) => {
            warn!(%err, "partition check failed");
            return known;
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in known..now {
        if let Err(err) = tpl.add_partition_offset(topic, p, Offset::Beginning) {
            warn!(%err, "cannot add partition {p}");
            return known;
        }
    }
    match consumer.incremental_assign(&tpl) {
        Ok(()) => {
            info!(
                from = known,
                to = now,
                "positions topic grew: reading the new partitions"
            );
            now
        }
        Err(err) => {
            warn!(%err, "cannot assign the new partitions");
            known
        }
    }
}
