//! Consumer-group plumbing shared by both stages: on every partition
//! assignment, start reading the partition at the first record whose Kafka
//! timestamp is within the look-back window (offsets_for_times), instead of at
//! the committed offset, and tell the processing loop which partitions came
//! and went so it can rebuild or drop their state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A partition handed to us, with where we start and where "caught up" is.
#[derive(Clone, Debug)]
pub struct Assigned {
    pub partition: i32,
    /// First offset to read; None = start at the end (window is empty).
    pub start: Option<i64>,
    /// High watermark at assignment time; None if it could not be fetched.
    pub high_watermark: Option<i64>,
}

#[derive(Clone, Debug)]
pub enum RebalanceEvent {
    Assigned(Vec<Assigned>),
    Revoked(Vec<i32>),
    /// Error or lost assignment: everything we had is gone.
    RevokedAll,
}

/// Consumer context that rewinds newly assigned partitions to `now − lookback`.
pub struct WindowContext {
    lookback_ms: i64,
    timeout: Duration,
    events: Mutex<Vec<RebalanceEvent>>,
    /// Where librdkafka's statistics report the consumer lag, and as which stage.
    lag: Option<(std::sync::Arc<crate::metrics::JobMetrics>, &'static str)>,
}

impl WindowContext {
    pub fn new(lookback_ms: i64) -> Self {
        WindowContext {
            lookback_ms,
            timeout: Duration::from_secs(10),
            events: Mutex::new(Vec::new()),
            lag: None,
        }
    }

    /// Reports this consumer's lag as `directions_consumer_lag{stage}`.
    pub fn with_lag_metrics(
        mut self,
        metrics: std::sync::Arc<crate::metrics::JobMetrics>,
        stage: &'static str,
    ) -> Self {
        self.lag = Some((metrics, stage));
        self
    }

    /// Takes the rebalance events recorded since the last call, in order.
    pub fn drain(&self) -> Vec<RebalanceEvent> {
        match self.events.lock() {
            Ok(mut ev) => std::mem::take(&mut *ev),
            // A panic while holding the lock cannot leave the Vec invalid.
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    fn push(&self, e: RebalanceEvent) {
        match self.events.lock() {
            Ok(mut ev) => ev.push(e),
            Err(poisoned) => poisoned.into_inner().push(e),
        }
    }

    /// Rewrites the offsets in `tpl` to the start of the window.
    fn position_at_window(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> Vec<Assigned> {
        if tpl.count() == 0 {
            // Cooperative rebalances hand unchanged members an empty list.
            return Vec::new();
        }
        let since = now_ms() - self.lookback_ms;
        let mut query = TopicPartitionList::new();
        for e in tpl.elements() {
            // offsets_for_times takes the timestamp in the offset field.
            if let Err(err) =
                query.add_partition_offset(e.topic(), e.partition(), Offset::Offset(since))
            {
                warn!(%err, "cannot build offsets_for_times query");
            }
        }
        let found: HashMap<(String, i32), Option<i64>> =
            match consumer.offsets_for_times(query, self.timeout) {
                Ok(res) => res
                    .elements()
                    .iter()
                    .filter(|e| e.error().is_ok())
                    .map(|e| {
                        let off = match e.offset() {
                            Offset::Offset(o) => Some(o),
                            // -1 / End: no record at or after `since`.
                            _ => None,
                        };
                        ((e.topic().to_owned(), e.partition()), off)
                    })
                    .collect(),
                Err(err) => {
                    warn!(%err, "offsets_for_times failed; reading partitions from the beginning");
                    HashMap::new()
                }
            };
        let mut out = Vec::new();
        let elements: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        for (topic, partition) in elements {
            let (offset, start) = match found.get(&(topic.clone(), partition)) {
                Some(Some(o)) => (Offset::Offset(*o), Some(*o)),
                Some(None) => (Offset::End, None),
                // Lookup failed: the beginning is always correct because
                // records outside the window are discarded on ingest; it is
                // only slower.
                None => (Offset::Beginning, Some(0)),
            };
            if let Err(err) = tpl.set_partition_offset(&topic, partition, offset) {
                warn!(%err, %topic, partition, "cannot set start offset");
            }
            let high_watermark = match consumer.fetch_watermarks(&topic, partition, self.timeout) {
                Ok((_low, high)) => Some(high),
                Err(err) => {
                    warn!(%err, %topic, partition, "cannot fetch watermarks");
                    None
                }
            };
            info!(%topic, partition, ?offset, ?high_watermark, "assigned: replaying window");
            out.push(Assigned {
                partition,
                start,
                high_watermark,
            });
        }
        out
    }
}

impl ClientContext for WindowContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some((metrics, stage)) = &self.lag {
            metrics.observe_lag(stage, &statistics);
        }
    }
}

impl ConsumerContext for WindowContext {
    // Replaces the default handler (which assigns at the committed offsets) so
    // the start offsets are set *before* the assignment takes effect: no record
    // from a stale position is ever fetched, and no seek race exists.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result: KafkaResult<()> = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let assigned = self.position_at_window(consumer, tpl);
                // Record the event before assigning so the processing loop
                // sees it before any record of these partitions.
                self.push(RebalanceEvent::Assigned(assigned));
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                info!(?parts, lost = consumer.assignment_lost(), "revoked");
                if cooperative {
                    self.push(RebalanceEvent::Revoked(parts));
                    consumer.incremental_unassign(tpl)
                } else {
                    self.push(RebalanceEvent::RevokedAll);
                    consumer.unassign()
                }
            }
            other => {
                error!(?other, "rebalance error; dropping the whole assignment");
                self.push(RebalanceEvent::RevokedAll);
                consumer.unassign()
            }
        };
        if let Err(err) = result {
            error!(%err, "applying the rebalance failed");
        }
    }
}

/// Tracks whether each assigned partition has replayed its window, so a stage
/// does not publish half-rebuilt numbers after a rebalance.
#[derive(Debug, Default)]
pub struct CatchUp {
    pending: HashMap<i32, (i64, Instant)>,
}

impl CatchUp {
    pub fn assigned(&mut self, a: &Assigned) {
        match (a.start, a.high_watermark) {
            (Some(start), Some(hw)) if start < hw => {
                self.pending.insert(a.partition, (hw, Instant::now()));
            }
            // Empty window or unknown watermark: nothing to wait for.
            _ => {
                self.pending.remove(&a.partition);
            }
        }
    }

    pub fn revoked(&mut self, partition: i32) {
        self.pending.remove(&partition);
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// A record at `offset` was processed.
    pub fn consumed(&mut self, partition: i32, offset: i64) {
        if let Some((hw, _)) = self.pending.get(&partition) {
            if offset + 1 >= *hw {
                self.done(partition);
            }
        }
    }

    fn done(&mut self, partition: i32) {
        if let Some((hw, since)) = self.pending.remove(&partition) {
            info!(partition, high_watermark = hw, elapsed = ?since.elapsed(), "window replayed");
        }
    }

    /// Uses the consumer's positions (covers transaction markers and other
    /// offsets that never reach the application) and a deadline.
    pub fn refresh<C: ConsumerContext>(&mut self, consumer: &impl Consumer<C>, max_wait: Duration) {
        if self.pending.is_empty() {
            return;
        }
        if let Ok(pos) = consumer.position() {
            for e in pos.elements() {
                if let (Offset::Offset(o), Some((hw, _))) =
                    (e.offset(), self.pending.get(&e.partition()))
                {
                    if o >= *hw {
                        self.done(e.partition());
                    }
                }
            }
        }
        self.pending.retain(|p, (_, since)| {
            let waiting = since.elapsed() < max_wait;
            if !waiting {
                warn!(
                    partition = p,
                    "window replay not finished in time; publishing anyway"
                );
            }
            waiting
        });
    }

    pub fn is_ready(&self, partition: i32) -> bool {
        !self.pending.contains_key(&partition)
    }

    pub fn all_ready(&self) -> bool {
        self.pending.is_empty()
    }
}
