//! Adaptive linger: which of the node's two message producers a PUBLISH
//! goes through (pure; `Node::send` holds the producers).
//!
//! - The **fast lane** (`linger.ms` 0, one request in flight) sends a lone
//!   record at once and batches only what arrives while its request is out:
//!   a PUBACK costs one Kafka round trip.
//! - The **batch lane** (`kafka.linger_ms`, `kafka.max_in_flight`) waits
//!   the linger. At thousands of msg/s that is far cheaper: with linger 0
//!   librdkafka wakes its broker thread for nearly every record, which cost
//!   +65 % broker CPU at 5,000 msg/s from 200 clients (docs/benchmarks.md).
//!
//! A write takes the fast lane:
//! - always when its client is paced by our acknowledgements
//!   (`paced_by_acks`) and published within one linger of its last one:
//!   batching would cap such a client at its window per linger;
//! - while the node publishes fewer than `kafka.fast_lane_below` msg/s,
//!   unless its client publishes sparsely (its previous PUBLISH more than
//!   `SPARSE_GAP` ago, or none). A sparse client's record is a lone one:
//!   sent at once it costs a Kafka request of its own, and no client waits
//!   on it to publish its next. Thousands of sparse clients on one node
//!   share requests in the batch lane instead: 39-47 µs of broker CPU a
//!   message against 68-74 in the fast lane at 1,430 msg/s from 14,300
//!   clients, and a third of Kafka's CPU (docs/benchmarks.md).
//!
//! A connection changes lanes only when none of its writes is in flight,
//! so its messages reach Kafka in order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::wake_pause::{nanos_after, WakePause};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lane {
    Fast,
    #[default]
    Batch,
}

/// Window over which the node's publish rate is measured.
const WINDOW: Duration = Duration::from_millis(100);
const WINDOW_NANOS: u64 = WINDOW.as_nanos() as u64;
/// A client whose previous PUBLISH is older than this publishes sparsely.
pub const SPARSE_GAP: Duration = Duration::from_secs(1);

/// The node-wide part of the decision: the recent publish rate, with
/// hysteresis (back to the fast lane below 80 % of the threshold).
pub struct LanePolicy {
    /// msg/s; 0: no fast lane.
    fast_below: u64,
    /// The batch lane's linger: a client that publishes sooner than this
    /// after its last acknowledgement is waiting for each one.
    linger: Duration,
    count: AtomicU64,
    /// Of `count`, the fast lane's.
    fast: AtomicU64,
    window: Mutex<Instant>,
    /// When the window is due to close (nanoseconds after `epoch`): read
    /// by every write, written once a window. Why: a `try_lock` by every
    /// write was a compare-and-swap on a line both workers write.
    closes_at: AtomicU64,
    epoch: Instant,
    busy: AtomicBool,
    /// Decided at each window (`wake_pause.rs`).
    wake_pause: WakePause,
}

impl LanePolicy {
    /// `wake_pause`: `kafka.wake_pause_us` (zero: never).
    pub fn new(
        fast_below: u64,
        linger: Duration,
        wake_pause: Duration,
        now: Instant,
    ) -> LanePolicy {
        LanePolicy {
            fast_below,
            linger,
            count: AtomicU64::new(0),
            fast: AtomicU64::new(0),
            window: Mutex::new(now),
            closes_at: AtomicU64::new(nanos_after(now, now + WINDOW)),
            epoch: now,
            busy: AtomicBool::new(false),
            wake_pause: WakePause::new(wake_pause, WINDOW, now),
        }
    }

    /// How long a worker pauses before it sleeps (`wake_pause.rs`).
    pub fn wake_pause(&self, now: Instant) -> Duration {
        self.wake_pause.before_sleep(now)
    }

    /// Counts one write (for the rate) and closes the window when due.
    pub fn count(&self, now: Instant, lane: Lane) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if lane == Lane::Fast {
            // A window closing on another worker at the same moment may
            // miss this write and decide to pause; the next window (100 ms)
            // counts it and stops that.
            self.fast.fetch_add(1, Ordering::Relaxed);
            self.wake_pause.fast_write();
        }
        if nanos_after(self.epoch, now) < self.closes_at.load(Ordering::Relaxed) {
            return;
        }
        // Once per window one caller does the sums; the others go on.
        let Ok(mut start) = self.window.try_lock() else {
            return;
        };
        let elapsed = now.saturating_duration_since(*start);
        if elapsed < WINDOW {
            return;
        }
        let n = self.count.swap(0, Ordering::Relaxed);
        let fast = self.fast.swap(0, Ordering::Relaxed);
        *start = now;
        let closes_at = nanos_after(self.epoch, now + WINDOW);
        self.closes_at.store(closes_at, Ordering::Relaxed);
        let rate = n.saturating_mul(1000) / (elapsed.as_millis().max(1) as u64);
        self.wake_pause.window(now, rate, fast);
        let busy = if self.busy.load(Ordering::Relaxed) {
            rate.saturating_mul(10) >= self.fast_below.saturating_mul(8)
        } else {
            rate >= self.fast_below
        };
        self.busy.store(busy, Ordering::Relaxed);
    }

    /// Busy, unless no write closed a window for two (the node went quiet):
    /// the last window started two windows ago once its due close
    /// (`closes_at`, one window after its start) is a window past. Read
    /// without the window's lock, as `count` reads it.
    fn busy(&self, now: Instant) -> bool {
        if !self.busy.load(Ordering::Relaxed) {
            return false;
        }
        let quiet_from = self
            .closes_at
            .load(Ordering::Relaxed)
            .saturating_add(WINDOW_NANOS);
        nanos_after(self.epoch, now) < quiet_from
    }

    /// The lane for a connection's next write when none of its writes is
    /// in flight; `last_ack`: when it last got a PUBACK/PUBREC (for a
    /// client paced by them); `previous`: its PUBLISH before this one.
    pub fn choose(
        &self,
        now: Instant,
        last_ack: Option<Instant>,
        previous: Option<Instant>,
    ) -> Lane {
        if self.fast_below == 0 {
            return Lane::Batch;
        }
        let within =
            |t: Option<Instant>, d| t.is_some_and(|t| now.saturating_duration_since(t) <= d);
        let waits_for_acks = within(last_ack, self.linger);
        let sparse = !within(previous, SPARSE_GAP);
        if waits_for_acks || (!sparse && !self.busy(now)) {
            Lane::Fast
        } else {
            Lane::Batch
        }
    }
}

/// Writes in flight from which a client counts as keeping a window full.
/// The batch lane would cap such a window at 16 per linger (about 2,700
/// msg/s at 5 ms); a client publishing at its own pace below that rate has
/// fewer in flight.
const DEEP_WINDOW: usize = 16;

/// Whether a client is paced by our acknowledgements, from the most
/// writes it had in flight at a PUBLISH since its last lane choice: one
/// that publishes only with nothing in flight (stop-and-wait, as many
/// device SDKs do) or one that keeps a deep window full. One with a few
/// writes in flight publishes at its own pace, however soon after an
/// acknowledgement: it batches (a fast lane for it cost 70 µs of CPU per
/// message instead of 21, docs/benchmarks.md).
pub fn paced_by_acks(peak_in_flight: usize) -> bool {
    peak_in_flight == 0 || peak_in_flight >= DEEP_WINDOW
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_and_wait_and_deep_windows_are_paced_by_acks() {
        assert!(paced_by_acks(0), "publishes only with nothing in flight");
        assert!(paced_by_acks(DEEP_WINDOW));
        assert!(paced_by_acks(64), "keeps a window of 64 full");
    }

    #[test]
    fn a_client_with_a_few_writes_in_flight_publishes_at_its_own_pace() {
        for peak in 1..DEEP_WINDOW {
            assert!(!paced_by_acks(peak), "peak {peak}");
        }
    }

    /// A policy with the defaults (fast below 2,000 msg/s, linger 5 ms).
    fn policy() -> (LanePolicy, Instant) {
        let t0 = Instant::now();
        (
            LanePolicy::new(2000, Duration::from_millis(5), Duration::ZERO, t0),
            t0,
        )
    }

    fn run(p: &LanePolicy, start: Instant, per_s: u64, secs: u64) -> Instant {
        let step = Duration::from_micros(1_000_000 / per_s);
        let mut t = start;
        for _ in 0..per_s * secs {
            t += step;
            p.count(t, Lane::Batch);
        }
        t
    }

    #[test]
    fn batch_lane_writes_coalesce_wake_ups_until_a_fast_lane_write() {
        let t0 = Instant::now();
        let pause = Duration::from_millis(2);
        let p = LanePolicy::new(2000, Duration::from_millis(5), pause, t0);
        let t = run(&p, t0, 1430, 1);
        assert_eq!(p.wake_pause(t), pause);
        p.count(t, Lane::Fast);
        assert_eq!(p.wake_pause(t), Duration::ZERO);
    }

    /// A client that published 10 ms ago: not sparse.
    fn recent(t: Instant) -> Option<Instant> {
        Some(t - Duration::from_millis(10))
    }

    #[test]
    fn below_the_threshold_clients_that_publish_often_are_fast() {
        let (p, t0) = policy();
        let t = run(&p, t0, 1000, 1);
        assert_eq!(p.choose(t, None, recent(t)), Lane::Fast);
    }

    #[test]
    fn a_sparse_client_batches_even_on_a_quiet_node() {
        let (p, t0) = policy();
        let t = run(&p, t0, 1000, 1);
        assert_eq!(p.choose(t, None, None), Lane::Batch, "its first PUBLISH");
        let ten_s_ago = Some(t - Duration::from_secs(10));
        assert_eq!(p.choose(t, None, ten_s_ago), Lane::Batch);
        let just_over = Some(t - SPARSE_GAP - Duration::from_millis(1));
        assert_eq!(p.choose(t, None, just_over), Lane::Batch);
    }

    #[test]
    fn a_client_waiting_for_each_ack_is_fast_whatever_else() {
        let (p, t0) = policy();
        let t = run(&p, t0, 5000, 1);
        let acked = Some(t - Duration::from_micros(300));
        assert_eq!(p.choose(t, acked, None), Lane::Fast);
    }

    #[test]
    fn above_it_open_loop_clients_batch_and_waiting_clients_stay_fast() {
        let (p, t0) = policy();
        let t = run(&p, t0, 5000, 1);
        assert_eq!(p.choose(t, None, recent(t)), Lane::Batch);
        assert_eq!(
            p.choose(t, Some(t - Duration::from_millis(40)), recent(t)),
            Lane::Batch
        );
        assert_eq!(
            p.choose(t, Some(t - Duration::from_micros(300)), recent(t)),
            Lane::Fast
        );
    }

    #[test]
    fn hysteresis_back_to_fast_only_below_eighty_percent() {
        let (p, t0) = policy();
        let t = run(&p, t0, 5000, 1);
        let t = run(&p, t, 1800, 1);
        assert_eq!(
            p.choose(t, None, recent(t)),
            Lane::Batch,
            "1,800/s is above 80 %"
        );
        let t = run(&p, t, 1000, 1);
        assert_eq!(p.choose(t, None, recent(t)), Lane::Fast);
    }

    #[test]
    fn a_node_gone_quiet_is_not_busy() {
        let (p, t0) = policy();
        let t = run(&p, t0, 5000, 1);
        let t = t + Duration::from_secs(1);
        assert_eq!(p.choose(t, None, recent(t)), Lane::Fast);
    }

    #[test]
    fn no_fast_lane_when_off() {
        let t0 = Instant::now();
        let p = LanePolicy::new(0, Duration::from_millis(5), Duration::ZERO, t0);
        assert_eq!(p.choose(t0, Some(t0), Some(t0)), Lane::Batch);
    }
}
