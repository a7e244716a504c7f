//! Cluster-wide shared subscriptions, the Kafka side: each member of
//! `$share/<g>/<f>`, on whichever node, brings one consumer to the Kafka
//! consumer group `lodestream-share/<g>/<f>` over the Kafka topics `f`
//! reads. Kafka gives each partition to one consumer, so while the members
//! are healthy every record reaches exactly one node, whose members take
//! turns (`shared_groups.rs`). A consumer commits a partition's position
//! only past records finished by the member that got them
//! (`shared_progress.rs`), so when a member leaves, or its node dies (after
//! the group's session timeout), the partition's next owner re-reads what
//! was not finished: at least once, nothing lost.
//!
//! Across nodes the balance is per partition: records of one key (the MQTT
//! topic, or a rule's key template) always go to one node; a node's share
//! is its consumers' share of the partitions, and consumers beyond the
//! partition count wait idle, as in any Kafka consumer group.
//!
//! The group is Kafka's: its position outlives its members (up to Kafka's
//! offset retention) and its lag shows in Kafka's own tools.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::reader::Record;
use crate::config::KafkaConfig;
use crate::mapping::Mapping;
use crate::shared_groups::{hand_out, GroupKey, GroupRun, Offer};
use crate::shared_progress::{Partition, ShareAck, SharedProgress};

/// Kafka's lowest group session timeout by default
/// (`group.min.session.timeout.ms`): a dead node's members are replaced
/// after this long.
const SESSION_TIMEOUT_MS: &str = "6000";
/// Kafka lookups while a member starts.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often finished positions are committed (asynchronously): what a
/// dead member's partitions re-read on top of its unfinished records.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// The Kafka consumer group of `$share/<group>/<filter>`.
pub fn group_id(group: &str, filter: &str) -> String {
    format!("lodestream-share/{group}/{filter}")
}

struct ShareContext {
    progress: Arc<Mutex<SharedProgress>>,
    /// This node's partitions assigned to members (all groups).
    partitions: IntGauge,
}

impl ShareContext {
    fn progress(&self) -> std::sync::MutexGuard<'_, SharedProgress> {
        lock(&self.progress)
    }
}

/// A panic while holding the lock leaves consistent bookkeeping.
fn lock(progress: &Mutex<SharedProgress>) -> std::sync::MutexGuard<'_, SharedProgress> {
    progress.lock().unwrap_or_else(|e| e.into_inner())
}

impl ClientContext for ShareContext {}

impl ConsumerContext for ShareContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = r else {
            return;
        };
        // Commit what the member finished before the partition moves on,
        // so its next owner starts there (the rest it reads again).
        let mut commit = Vec::new();
        {
            let mut p = self.progress();
            for e in tpl.elements() {
                let partition: Partition = (Arc::from(e.topic()), e.partition());
                // Counted only if it was ours: the close after a member
                // left revokes what `leave` already forgot.
                let Some(moved) = p.revoked(&partition) else {
                    continue;
                };
                self.partitions.dec();
                commit.extend(moved.map(|at| (partition, at)));
            }
        }
        if let Err(e) = commit_list(consumer, commit, CommitMode::Sync) {
            tracing::warn!(error = %e, "shared subscription: commit before revoke failed; its next owner re-reads more");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            let mut p = self.progress();
            for e in tpl.elements() {
                if p.assigned((Arc::from(e.topic()), e.partition())) {
                    self.partitions.inc();
                }
            }
        }
    }
}

type ShareConsumer = StreamConsumer<ShareContext>;

fn consumer(
    cfg: &KafkaConfig,
    node_id: &str,
    key: &GroupKey,
    progress: Arc<Mutex<SharedProgress>>,
    partitions: IntGauge,
) -> KafkaResult<ShareConsumer> {
    let mut c = super::client_config(cfg, &format!("lodestream-share-{node_id}"));
    c.set("group.id", group_id(&key.0, &key.1))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Only where the group has no position (a partition added later, or
        // one trimmed by retention): nothing existing is skipped.
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", "1000")
        // A member whose client does not take deliveries for this long
        // leaves the group, and its partitions go to the others.
        .set("max.poll.interval.ms", "60000");
    c.create_with_context(ShareContext {
        progress,
        partitions,
    })
}

/// Gives a new group a position at the partitions' ends, before the first
/// member joins, so the SUBACK of the first member covers every message
/// published after it. A group that has positions keeps them. (Blocking.)
fn init_positions(c: &ShareConsumer, topics: &[String]) -> KafkaResult<()> {
    let mut all = TopicPartitionList::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), LOOKUP_TIMEOUT)?;
        for topic in md.topics() {
            for p in topic.partitions() {
                all.add_partition(t, p.id());
            }
        }
    }
    let committed = c.committed_offsets(all, LOOKUP_TIMEOUT)?;
    let mut start = TopicPartitionList::new();
    for e in committed.elements() {
        if !matches!(e.offset(), Offset::Offset(_)) {
            let (_, high) = c.fetch_watermarks(e.topic(), e.partition(), LOOKUP_TIMEOUT)?;
            start.add_partition_offset(e.topic(), e.partition(), Offset::Offset(high))?;
        }
    }
    if start.count() > 0 {
        // Refused while the group has members: they joined after setting
        // the positions themselves.
        if let Err(e) = c.commit(&start, CommitMode::Sync) {
            tracing::debug!(error = %e, "shared subscription group already active");
        }
    }
    Ok(())
}

/// What a group's Kafka member needs besides the group (`shared_groups.rs`).
pub struct Run {
    pub node_id: String,
    pub topics: Vec<String>,
    pub mapping: Mapping,
    pub partitions: IntGauge,
    pub group: GroupRun,
}

/// Joins the Kafka group (setting a new group's position first), then
/// hands records to the node's members until stopped; then commits what
/// was finished and leaves the group.
pub async fn run(cfg: KafkaConfig, r: Run) {
    let progress = Arc::new(Mutex::new(SharedProgress::default()));
    let g = r.group;
    let (node_id, topics, key) = (r.node_id.clone(), r.topics.clone(), g.key.clone());
    let (gauge, prog) = (r.partitions.clone(), progress.clone());
    let started = tokio::task::spawn_blocking(move || -> KafkaResult<ShareConsumer> {
        let consumer = consumer(&cfg, &node_id, &key, prog, gauge)?;
        init_positions(&consumer, &topics)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
        Ok(consumer)
    })
    .await;
    let consumer = match started {
        Ok(Ok(c)) => Arc::new(c),
        Ok(Err(e)) => return failed(g, e.to_string()),
        Err(e) => return failed(g, e.to_string()),
    };
    let _ = g.ready.send(Ok(()));
    let mut stop = g.stop;
    let mut tick = tokio::time::interval(COMMIT_EVERY);
    loop {
        let offer = tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                commit(&consumer, &progress, CommitMode::Async);
                continue;
            }
            m = consumer.recv() => match m {
                Ok(m) => match offer(&g.key, &r.mapping, &progress, &Record::copy_of(&m)) {
                    Some(o) => o,
                    None => continue,
                },
                Err(e) => {
                    tracing::warn!(group = %g.key.0, error = %e, "shared subscription read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        // No member left: the group is being stopped; the offer stays
        // unfinished for the partition's next owner.
        tokio::select! {
            _ = &mut stop => break,
            _ = hand_out(&g.members, offer) => {}
        }
    }
    leave(consumer, progress, r.partitions).await;
}

fn failed(g: GroupRun, why: String) {
    tracing::warn!(group = %g.key.0, filter = %g.key.1, error = %why, "shared subscription could not join its Kafka consumer group");
    let _ = g.ready.send(Err(why));
}

/// Commits what was finished and leaves the group (blocking calls).
async fn leave(
    consumer: Arc<ShareConsumer>,
    progress: Arc<Mutex<SharedProgress>>,
    gauge: IntGauge,
) {
    let _ = tokio::task::spawn_blocking(move || {
        let last = lock(&progress).positions();
        if let Err(e) = commit_list(&*consumer, last, CommitMode::Sync) {
            tracing::debug!(error = %e, "shared subscription: last commit failed; the next owner re-reads more");
        }
        // Forgotten before the close revokes them (that revoke then finds
        // nothing to count or commit again).
        let n = lock(&progress).forget_all();
        gauge.sub(n as i64);
        consumer.unsubscribe();
        drop(consumer);
    })
    .await;
}

fn commit(c: &ShareConsumer, progress: &Mutex<SharedProgress>, mode: CommitMode) {
    let moved = lock(progress).to_commit();
    if let Err(e) = commit_list(c, moved, mode) {
        tracing::debug!(error = %e, "shared subscription commit failed; the next one covers it");
    }
}

/// Commits these positions (nothing to do for none); the one way every
/// commit of a member is built, from its loop, its leave and a revoke.
fn commit_list<C: Consumer<ShareContext>>(
    c: &C,
    list: Vec<(Partition, i64)>,
    mode: CommitMode,
) -> KafkaResult<()> {
    if list.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), at) in list {
        tpl.add_partition_offset(&t, p, Offset::Offset(at))?;
    }
    c.commit(&tpl, mode)
}

/// The offer of record `rec` to the group, or `None` when it is not for
/// it (then it is finished at once, so the position moves past it).
fn offer(
    key: &GroupKey,
    mapping: &Mapping,
    progress: &Arc<Mutex<SharedProgress>>,
    rec: &Record,
) -> Option<Offer> {
    let partition: Partition = (Arc::from(rec.topic.as_str()), rec.partition);
    let mut p = lock(progress);
    // A record fetched just before its partition was revoked: its next
    // owner delivers it.
    let ticket = p.handed_out(&partition, rec.offset)?;
    let msg = rec
        .message(Some(mapping))
        .ok()
        .filter(|msg| lodestream_mqtt::topic::matches(&key.1, &msg.topic));
    let Some(msg) = msg else {
        p.finished(&ticket);
        return None;
    };
    drop(p);
    Some(Offer {
        msg: Arc::new(msg),
        ack: ShareAck::new(progress.clone(), ticket, key.clone()),
    })
}
