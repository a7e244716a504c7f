//! Replay on subscribe, the connection's side: plan a replay (bounds,
//! Kafka offsets; `replay.rs` decides, `kafka/replay.rs` looks up), then run
//! it as a catch-up read (`kafka/catchup.rs`) that hands the filter to
//! fan-out once it has reached live delivery, with no gap and no duplicate.
//!
//! Bounded: `mqtt.replay_max_concurrent` replays per connection, each at
//! most `mqtt.replay_max_records` records, its history read at
//! `mqtt.replay_rate` records/s shared by the connection's replays, through one channel of
//! `mqtt.session_queue` deliveries that the connection takes only while the
//! client's window is open: a slow client pauses the Kafka read, nothing
//! is dropped.

use std::sync::Mutex;

use super::*;
use crate::kafka::catchup::Pace;
use crate::replay::{Bounds, ReplayError, ReplayStart, Window};
use crate::session::Offsets;
use crate::subscriptions::SubKey;

/// One running replay.
struct Running {
    /// The filter as the session stores it (no `$replay/` prefix).
    filter: String,
    handle: tokio::task::JoinHandle<()>,
    /// What to register live if the replay is stopped before it did.
    entry: (String, SubKey, SubEntry),
    /// The filter was unsubscribed from: not to be registered.
    removed: Arc<Mutex<Vec<String>>>,
}

/// The replays of one connection, the channel their deliveries share and
/// their common pace.
#[derive(Default)]
pub(super) struct Replays {
    running: Vec<Running>,
    pub(super) rx: Option<mpsc::Receiver<Delivery>>,
    tx: Option<mpsc::Sender<Delivery>>,
    bucket: Option<Arc<Mutex<TokenBucket>>>,
}

/// A replay as planned: where it starts, where its history ends (the high
/// watermarks it was planned at) and a note for the SUBACK reason string.
pub(super) struct Plan {
    pub(super) from: Offsets,
    pub(super) until: Offsets,
    pub(super) note: String,
}

impl Replays {
    /// Replays still running.
    pub(super) fn active(&mut self) -> usize {
        self.running.retain(|r| !r.handle.is_finished());
        self.running.len()
    }

    /// The client unsubscribed from `filter`: a replay of it must not hand it
    /// to fan-out (told before the index changes, see `register_if_caught_up`).
    pub(super) fn unsubscribed(&self, filter: &str) {
        for r in self.running.iter().filter(|r| r.filter == filter) {
            r.removed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(filter.to_string());
        }
    }

    /// Stops every replay at the end of the connection. One stopped before
    /// it reached live has its filter registered live from here, so a
    /// session taken over on this node keeps the subscription (a session
    /// resumed from Kafka catches up from its stored offsets as usual).
    pub(super) async fn stop(&mut self, node: &Node) {
        for r in self.running.drain(..) {
            r.handle.abort();
            let registered = r.handle.await.is_ok();
            let removed = r
                .removed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&r.filter);
            if !registered && !removed {
                let (filter, key, entry) = r.entry;
                if node.index_subscription(&filter, key, entry).is_ok() {
                    node.metrics().subscriptions.inc();
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// Where the replay of `inner` starts in each Kafka partition, and a
    /// note for the SUBACK reason string; refused when over a bound.
    pub(super) async fn plan_replay(
        &mut self,
        inner: &str,
        start: ReplayStart,
        now: i64,
    ) -> Result<Plan, ReplayError> {
        let node = self.node.clone();
        let limits = &node.config().mqtt;
        let max = limits.replay_max_concurrent;
        if self.replays_active() >= max {
            return Err(ReplayError::TooMany { max });
        }
        let lookback_s = limits.replay_max_lookback_s;
        let bounds = Bounds {
            max_lookback_ms: i64::try_from(lookback_s.saturating_mul(1000)).unwrap_or(i64::MAX),
            max_records: limits.replay_max_records,
        };
        let (oldest, mut clipped) = crate::replay::oldest_time(start, now, bounds);
        let topics = node.mapping().kafka_topics_for_filter(inner);
        let fan_out = node.fan_out_positions(&topics);
        let topics = topics.into_iter().map(str::to_string).collect();
        let found =
            crate::kafka::replay::partitions(&node.config().kafka, node.node_id(), topics, oldest)
                .await
                .map_err(|e| ReplayError::Kafka(format!("{e:#}")))?;
        let mut starts = Vec::with_capacity(found.len());
        let mut from = Offsets::default();
        let mut until = Offsets::default();
        for f in found {
            let key = (f.topic, f.partition);
            let w = Window {
                low: f.low,
                high: f.high,
                at_oldest: f.at_time,
                fan_out: fan_out.get(&key).copied().unwrap_or(f.high),
            };
            let (offset, cut) = crate::replay::start_offset(start, w);
            clipped |= cut;
            starts.push((offset, w));
            until.insert(key.clone(), f.high);
            from.insert(key, offset);
        }
        let records = crate::replay::check_size(&starts, bounds)?;
        let clip = if clipped {
            format!(", clipped to the {lookback_s} s lookback")
        } else {
            String::new()
        };
        Ok(Plan {
            from,
            until,
            note: format!("replay of {inner}: {records} records to read{clip}"),
        })
    }

    /// Starts the read from `from`; the filter goes to fan-out when it has
    /// reached live delivery (or live at once if the read fails).
    pub(super) fn spawn_replay(&mut self, inner: &str, key: SubKey, entry: SubEntry, plan: Plan) {
        let node = self.node.clone();
        let limits = &node.config().mqtt;
        let replays = &mut self.rare().replays;
        if replays.tx.is_none() {
            let (tx, rx) = mpsc::channel(limits.session_queue.max(1));
            replays.tx = Some(tx);
            replays.rx = Some(rx);
        }
        if replays.bucket.is_none() && limits.replay_rate > 0 {
            let bucket = TokenBucket::new(limits.replay_rate, limits.replay_rate, Instant::now());
            replays.bucket = Some(Arc::new(Mutex::new(bucket)));
        }
        let Some(tx) = replays.tx.clone() else {
            return;
        };
        let pace = replays.bucket.clone();
        let removed = Arc::new(Mutex::new(Vec::new()));
        let entries = vec![(inner.to_string(), key, entry)];
        let job = crate::kafka::catchup::CatchUp {
            client_id: self.session.client_id.clone(),
            from: plan.from,
            subscriptions: entries
                .iter()
                .map(|(f, _, e)| (f.clone(), e.options.clone(), e.identifier))
                .collect(),
            entries: entries.clone(),
            removed: removed.clone(),
            pace: pace.map(|bucket| Pace {
                bucket,
                until: plan.until,
            }),
            wait_drained: true,
        };
        let live = entries.clone();
        let handle = tokio::spawn(async move {
            let probe = tx.clone();
            let started = Instant::now();
            match node.catch_up(job, tx).await {
                Ok(()) => tracing::debug!(elapsed = ?started.elapsed(), "replay reached live"),
                // The connection is gone: nothing to hand over.
                Err(_) if probe.is_closed() => {}
                Err(e) => {
                    tracing::warn!(error = %e, "replay failed; the subscription continues live");
                    for (f, k, e) in live {
                        if node.index_subscription(&f, k, e).is_ok() {
                            node.metrics().subscriptions.inc();
                        }
                    }
                }
            }
        });
        let Some(entry) = entries.into_iter().next() else {
            return;
        };
        self.rare().replays.running.push(Running {
            filter: inner.to_string(),
            handle,
            entry,
            removed,
        });
    }
}
