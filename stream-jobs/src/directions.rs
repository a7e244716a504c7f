//! The `directions` job: two stages that run in every instance.
//!
//! 1. **aggregate** (consumer group `<group>`, scales with the partitions of the
//!    positions topic): keeps the latest state of each truck per partition and
//!    every interval publishes one [`PartialStats`] per caught-up partition to
//!    the partials topic (key `<positions topic>/<partition>`).
//! 2. **merge** (consumer group `<group>-merge` on the single-partition partials
//!    topic, so exactly one instance is active and the others are hot
//!    standbys): keeps the latest partial per source partition and every
//!    interval publishes the fleet-wide [`DirectionStats`] to the stats topic
//!    with key `fleet/stats/directions`.
//!
//! Splitting the work this way is what makes the totals right when several
//! instances share the partitions: no instance ever sees the whole fleet.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::agg::{parse_position, Aggregator, Applied, Merger, PartialStats};
use crate::metrics::JobMetrics;
use crate::window::{now_ms, CatchUp, RebalanceEvent, WindowContext};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Both stages (the normal deployment).
    All,
    /// Only the per-partition aggregation.
    Aggregate,
    /// Only the merge of partials into the published stats.
    Merge,
}

/// Live direction statistics of the fleet, published to Kafka.
#[derive(Parser, Clone, Debug)]
#[command(name = "directions", version, about)]
pub struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "LODESTREAM_KAFKA", default_value = "127.0.0.1:9092")]
    pub bootstrap: String,
    /// Topic with the truck positions (key `trucks/<plate>`, JSON value).
    #[arg(long, env = "LODESTREAM_POSITIONS_TOPIC", default_value = "trucks")]
    pub positions_topic: String,
    /// Topic the fleet-wide stats are published to.
    #[arg(long, env = "LODESTREAM_STATS_TOPIC", default_value = "fleet-stats")]
    pub stats_topic: String,
    /// Record key of the stats: the MQTT topic the broker maps it back to.
    #[arg(
        long,
        env = "DIRECTIONS_STATS_KEY",
        default_value = "fleet/stats/directions"
    )]
    pub stats_key: String,
    /// Internal single-partition topic carrying per-partition partial counts.
    #[arg(
        long,
        env = "DIRECTIONS_PARTIALS_TOPIC",
        default_value = "fleet-stats-partials"
    )]
    pub partials_topic: String,
    /// Consumer group of the aggregate stage; the merge stage uses `<group>-merge`.
    #[arg(
        long,
        env = "DIRECTIONS_GROUP",
        default_value = "lodestream-directions"
    )]
    pub group: String,
    /// How often partials and stats are published.
    #[arg(long, env = "DIRECTIONS_INTERVAL_MS", default_value_t = 1000)]
    pub interval_ms: u64,
    /// Trucks whose last record reached Kafka longer ago than this drop out.
    #[arg(long, env = "DIRECTIONS_STALE_AFTER_S", default_value_t = 30)]
    pub stale_after_s: u64,
    /// Longest wait for a newly assigned partition to replay its window before
    /// publishing anyway.
    #[arg(long, env = "DIRECTIONS_CATCHUP_TIMEOUT_S", default_value_t = 30)]
    pub catchup_timeout_s: u64,
    /// Which stages this instance runs.
    #[arg(long, env = "DIRECTIONS_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,
    /// Do not create the partials and stats topics if they are missing.
    #[arg(long, env = "DIRECTIONS_NO_CREATE_TOPICS")]
    pub no_create_topics: bool,
    /// Replication factor for topics this job creates (-1 = broker default).
    #[arg(long, env = "DIRECTIONS_REPLICATION", default_value_t = -1, allow_hyphen_values = true)]
    pub replication: i32,
    /// Serve Prometheus metrics on this address, path /metrics (empty: off).
    #[arg(long, env = "DIRECTIONS_METRICS_ADDR", default_value = "")]
    pub metrics_addr: String,
    /// Extra librdkafka properties (e.g. security.protocol=SASL_SSL), repeatable.
    #[arg(long = "kafka-opt", value_parser = parse_kv)]
    pub kafka_opts: Vec<(String, String)>,
}

pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

impl Args {
    fn stale_after_ms(&self) -> i64 {
        i64::try_from(self.stale_after_s.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    fn base_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.kafka_opts {
            c.set(k, v);
        }
        c
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.base_config();
        c.set("group.id", group)
            // Sticky cooperative assignment moves only the partitions that
            // must move, so a scale-out does not make every instance rebuild.
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Faster fail-over than the 45 s default when an instance dies.
            .set("session.timeout.ms", "10000")
            // Committed offsets are informational (lag monitoring): start
            // positions come from the time window, see WindowContext.
            .set("enable.auto.commit", "true")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Feeds directions_consumer_lag (WindowContext::stats).
            .set("statistics.interval.ms", "5000");
        for (k, v) in &self.kafka_opts {
            c.set(k, v);
        }
        c
    }
}

/// Runs the job until `shutdown` becomes true or a stage fails, serving
/// its metrics on `--metrics-addr` when set.
pub async fn run(args: Args, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let metrics = JobMetrics::new();
    if !args.metrics_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
        info!(addr = %args.metrics_addr, "Prometheus metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
    }
    run_with_metrics(args, shutdown, metrics).await
}

/// [`run`] counting into `metrics` (tests serve them themselves).
pub async fn run_with_metrics(
    args: Args,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<JobMetrics>,
) -> anyhow::Result<()> {
    if args.interval_ms == 0 {
        bail!("--interval-ms must be > 0");
    }
    if !args.no_create_topics {
        ensure_topics(&args).await;
    }
    let producer: FutureProducer = args
        .base_config()
        // Snapshots must not be reordered or duplicated by producer retries.
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .context("creating the Kafka producer")?;

    let mut tasks = tokio::task::JoinSet::new();
    if matches!(args.role, Role::All | Role::Aggregate) {
        tasks.spawn(aggregate(
            args.clone(),
            producer.clone(),
            shutdown.clone(),
            metrics.clone(),
        ));
    }
    if matches!(args.role, Role::All | Role::Merge) {
        tasks.spawn(merge(
            args.clone(),
            producer.clone(),
            shutdown.clone(),
            metrics.clone(),
        ));
    }
    while let Some(res) = tasks.join_next().await {
        // The first stage to fail stops the process: a half-running job would
        // publish plausible but wrong numbers.
        res.context("stage panicked")??;
    }
    Ok(())
}

async fn ensure_topics(args: &Args) {
    let admin: AdminClient<DefaultClientContext> = match args.base_config().create() {
        Ok(a) => a,
        Err(err) => {
            warn!(%err, "cannot create admin client; not creating topics");
            return;
        }
    };
    let repl = || TopicReplication::Fixed(args.replication);
    let topics = [
        // One partition: the merge stage must see every partial.
        NewTopic::new(&args.partials_topic, 1, repl())
            .set("cleanup.policy", "delete")
            .set("retention.ms", "3600000"),
        NewTopic::new(&args.stats_topic, 1, repl())
            .set("cleanup.policy", "delete")
            .set("retention.ms", "86400000"),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match admin.create_topics(&topics, &opts).await {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(t) => info!(topic = %t, "created topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, code)) => warn!(topic = %t, ?code, "cannot create topic"),
                }
            }
        }
        Err(err) => warn!(%err, "create_topics failed"),
    }
}

/// What a published record is, for `directions_records_out_total{topic}`.
#[derive(Clone, Copy)]
enum Out {
    Partials,
    Stats,
}

/// Sends without waiting for the broker: delivery is awaited in a background
/// task so a slow broker cannot stall consumption.
fn publish(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: Vec<u8>,
    out: (Out, &Arc<JobMetrics>),
) {
    let (kind, metrics) = (out.0, out.1.clone());
    send(producer, topic, key, payload, move |delivered| {
        if !delivered {
            metrics.publish_errors.inc();
            return;
        }
        let label = match kind {
            Out::Partials => "partials",
            Out::Stats => {
                metrics.snapshot_acked();
                "stats"
            }
        };
        metrics.records_out.with_label_values(&[label]).inc();
    });
}

/// Sends one record without waiting; failures are logged, and `done` learns
/// whether Kafka acknowledged it (the jobs' outputs are snapshots: the next
/// one replaces a lost one, so nothing is retried).
pub(crate) fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: Vec<u8>,
    done: impl FnOnce(bool) + Send + 'static,
) {
    let rec = FutureRecord::to(topic).key(key).payload(&payload);
    match producer.send_result(rec) {
        Ok(delivery) => {
            let topic = topic.to_owned();
            tokio::spawn(async move {
                match delivery.await {
                    Ok(Err((err, _))) => warn!(%err, %topic, "publish failed"),
                    Err(_) => warn!(%topic, "publish cancelled"),
                    Ok(Ok(_)) => return done(true),
                }
                done(false)
            });
        }
        Err((err, _)) => {
            warn!(%err, topic, "cannot enqueue record");
            done(false)
        }
    }
}

#[derive(Default)]
struct Counters {
    records: u64,
    inserted: u64,
    updated: u64,
    late: u64,
    expired: u64,
    unassigned: u64,
    invalid: u64,
}

async fn aggregate(
    args: Args,
    producer: FutureProducer,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<JobMetrics>,
) -> anyhow::Result<()> {
    let stale_ms = args.stale_after_ms();
    let consumer: StreamConsumer<WindowContext> = args
        .consumer_config(&args.group)
        .create_with_context(
            WindowContext::new(stale_ms).with_lag_metrics(metrics.clone(), "aggregate"),
        )
        .context("creating the positions consumer")?;
    consumer
        .subscribe(&[&args.positions_topic])
        .context("subscribing to the positions topic")?;
    info!(topic = %args.positions_topic, group = %args.group, "aggregate stage started");

    let mut agg = Aggregator::new(stale_ms);
    let mut catch = CatchUp::default();
    let mut partitions_total = 0i32;
    let mut tick = interval(Duration::from_millis(args.interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let catchup_max = Duration::from_secs(args.catchup_timeout_s);
    let mut n = Counters::default();
    let mut last_log = Instant::now();
    let mut last_meta: Option<Instant> = None;

    let apply_events = |agg: &mut Aggregator, catch: &mut CatchUp| {
        for ev in consumer.context().drain() {
            match ev {
                RebalanceEvent::Assigned(parts) => {
                    for a in parts {
                        agg.assign(a.partition);
                        catch.assigned(&a);
                    }
                }
                RebalanceEvent::Revoked(parts) => {
                    for p in parts {
                        agg.revoke(p);
                        catch.revoked(p);
                    }
                }
                RebalanceEvent::RevokedAll => {
                    agg.revoke_all();
                    catch.clear();
                }
            }
        }
    };

    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            m = consumer.recv() => {
                // Rebalance callbacks run inside recv(), before the records of
                // the new assignment are returned: apply them first.
                apply_events(&mut agg, &mut catch);
                let msg = match m {
                    Ok(msg) => msg,
                    Err(err) => {
                        warn!(%err, "consume error");
                        continue;
                    }
                };
                n.records += 1;
                metrics.records_in.with_label_values(&["aggregate"]).inc();
                let partition = msg.partition();
                catch.consumed(partition, msg.offset());
                let Some(payload) = msg.payload() else {
                    n.invalid += 1;
                    metrics.records_invalid.inc();
                    continue;
                };
                match parse_position(msg.key(), payload, msg.timestamp().to_millis()) {
                    Ok((id, obs)) => match agg.apply(partition, &id, obs, now_ms()) {
                        Applied::Inserted => n.inserted += 1,
                        Applied::Updated => n.updated += 1,
                        Applied::Late => n.late += 1,
                        Applied::Expired => n.expired += 1,
                        Applied::Unassigned => n.unassigned += 1,
                    },
                    Err(err) => {
                        n.invalid += 1;
                        metrics.records_invalid.inc();
                        debug!(%err, partition, offset = msg.offset(), "skipping record");
                    }
                }
            }
            _ = tick.tick() => {
                apply_events(&mut agg, &mut catch);
                catch.refresh(&consumer, catchup_max);
                if last_meta.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    // Partition count changes rarely; the lookup is a blocking
                    // round trip, so it is not done every tick.
                    last_meta = Some(Instant::now());
                    match consumer.fetch_metadata(Some(&args.positions_topic), Duration::from_secs(2)) {
                        Ok(md) => {
                            partitions_total = md
                                .topics()
                                .first()
                                .map(|t| t.partitions().len() as i32)
                                .unwrap_or(0);
                        }
                        Err(err) => debug!(%err, "metadata lookup failed"),
                    }
                }
                let now = now_ms();
                agg.evict_stale(now);
                metrics.trucks.set(i64::try_from(agg.trucks()).unwrap_or(i64::MAX));
                let mut parts: Vec<i32> = agg.assigned().filter(|p| catch.is_ready(*p)).collect();
                parts.sort_unstable();
                for p in parts {
                    let Some(counts) = agg.partition_counts(p) else { continue };
                    let partial = PartialStats { v: 1, ts_ms: now, partition: p, partitions: partitions_total, counts };
                    match serde_json::to_vec(&partial) {
                        Ok(json) => publish(&producer, &args.partials_topic, &format!("{}/{}", args.positions_topic, p), json, (Out::Partials, &metrics)),
                        Err(err) => warn!(%err, "cannot encode partial"),
                    }
                }
                if last_log.elapsed() >= Duration::from_secs(10) {
                    let secs = last_log.elapsed().as_secs_f64();
                    info!(
                        rate = format_args!("{:.0}/s", n.records as f64 / secs),
                        trucks = agg.trucks(),
                        partitions = ?{ let mut v: Vec<i32> = agg.assigned().collect(); v.sort_unstable(); v },
                        replaying = !catch.all_ready(),
                        inserted = n.inserted, updated = n.updated, late = n.late,
                        expired = n.expired, unassigned = n.unassigned, invalid = n.invalid,
                        "aggregate"
                    );
                    n = Counters::default();
                    last_log = Instant::now();
                }
            }
        }
    }
    info!("aggregate stage stopping");
    Ok(())
}

async fn merge(
    args: Args,
    producer: FutureProducer,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<JobMetrics>,
) -> anyhow::Result<()> {
    let stale_ms = args.stale_after_ms();
    let group = format!("{}-merge", args.group);
    let consumer: StreamConsumer<WindowContext> = args
        .consumer_config(&group)
        .create_with_context(
            WindowContext::new(stale_ms).with_lag_metrics(metrics.clone(), "merge"),
        )
        .context("creating the partials consumer")?;
    // Several partitions would split the partials between merge instances and
    // each would publish a partial "total".
    match consumer.fetch_metadata(Some(&args.partials_topic), Duration::from_secs(10)) {
        Ok(md) => {
            let n = md
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if n > 1 {
                bail!(
                    "partials topic {} has {n} partitions; it must have exactly 1",
                    args.partials_topic
                );
            }
        }
        Err(err) => warn!(%err, "cannot check the partials topic"),
    }
    consumer
        .subscribe(&[&args.partials_topic])
        .context("subscribing to the partials topic")?;
    info!(topic = %args.partials_topic, %group, "merge stage started");

    let mut merger = Merger::new(stale_ms);
    let mut catch = CatchUp::default();
    // Some(when) while this instance owns the partials partition.
    let mut active_since: Option<Instant> = None;
    let mut tick = interval(Duration::from_millis(args.interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let catchup_max = Duration::from_secs(args.catchup_timeout_s);
    let grace = Duration::from_millis(u64::try_from(stale_ms).unwrap_or(u64::MAX));
    let mut last_log = Instant::now();
    let mut published = 0u64;

    let apply_events = |merger: &mut Merger, catch: &mut CatchUp, active: &mut Option<Instant>| {
        for ev in consumer.context().drain() {
            match ev {
                // Cooperative rebalancing reports an empty assignment to
                // members whose partitions did not change: that must not reset
                // the merged state.
                RebalanceEvent::Assigned(parts) if parts.is_empty() => {}
                RebalanceEvent::Revoked(parts) if parts.is_empty() => {}
                RebalanceEvent::Assigned(parts) => {
                    // Newly owning the partials partition: rebuild from its
                    // window (replayed by WindowContext) before publishing.
                    merger.clear();
                    for a in &parts {
                        catch.assigned(a);
                    }
                    *active = Some(Instant::now());
                    metrics.merge_active.set(1);
                    info!("merge stage active");
                }
                RebalanceEvent::Revoked(_) | RebalanceEvent::RevokedAll => {
                    merger.clear();
                    catch.clear();
                    metrics.merge_active.set(0);
                    if active.take().is_some() {
                        info!("merge stage standing by");
                    }
                }
            }
        }
    };

    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            m = consumer.recv() => {
                apply_events(&mut merger, &mut catch, &mut active_since);
                let msg = match m {
                    Ok(msg) => msg,
                    Err(err) => {
                        warn!(%err, "consume error");
                        continue;
                    }
                };
                catch.consumed(msg.partition(), msg.offset());
                metrics.records_in.with_label_values(&["merge"]).inc();
                let Some(payload) = msg.payload() else { continue };
                match serde_json::from_slice::<PartialStats>(payload) {
                    Ok(p) if p.v == 1 => {
                        merger.apply(p);
                    }
                    Ok(p) => debug!(v = p.v, "unsupported partial version"),
                    Err(err) => debug!(%err, "skipping invalid partial"),
                }
            }
            _ = tick.tick() => {
                apply_events(&mut merger, &mut catch, &mut active_since);
                let Some(since) = active_since else { continue };
                catch.refresh(&consumer, catchup_max);
                if !catch.all_ready() {
                    continue;
                }
                let merged = merger.merge(now_ms());
                // Right after taking over, "nobody reported yet" is not the
                // same as "no trucks": wait one window before publishing zeros.
                if merged.reporting == 0 && since.elapsed() < grace {
                    continue;
                }
                match serde_json::to_vec(&merged.stats) {
                    Ok(json) => {
                        publish(&producer, &args.stats_topic, &args.stats_key, json, (Out::Stats, &metrics));
                        published += 1;
                    }
                    Err(err) => warn!(%err, "cannot encode stats"),
                }
                if last_log.elapsed() >= Duration::from_secs(10) {
                    let incomplete = merged.expected.is_some_and(|e| (merged.reporting as i32) < e);
                    info!(
                        trucks = merged.stats.trucks,
                        counts = ?merged.stats.counts,
                        reporting = merged.reporting,
                        expected = ?merged.expected,
                        incomplete,
                        published,
                        "merge"
                    );
                    last_log = Instant::now();
                }
            }
        }
    }
    info!("merge stage stopping");
    Ok(())
}
