//! Wake-up coalescing (pure; `main.rs` calls `before_sleep` from the
//! runtime's `on_thread_park`).
//!
//! Thousands of sparse publishers wake a node once for nearly every
//! PUBLISH, and each wake-up costs more in the kernel (the sleep, the task
//! switch) than the PUBLISH costs in user space. While every write of the
//! node takes the batch lane at `MIN_RATE` msg/s or more, a worker pauses
//! `kafka.wake_pause_us` before it sleeps: what arrived meanwhile (other
//! PUBLISHes, Kafka's answers, timers) is handled in one wake-up. Those
//! writes wait out the linger anyway; the pause adds up to about three
//! times itself to a PUBACK (the read, the linger's timer, Kafka's answer).
//!
//! A single fast-lane write (a client waiting for its acknowledgements, or
//! a quiet node) stops the pauses at once, so a latency-bound client never
//! waits for them; a window of the lane policy decides again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Batch-lane writes a second from which wake-ups are coalesced: below it
/// a node wakes rarely enough that a pause would save little.
pub const MIN_RATE: u64 = 200;

/// The node's pause before a worker sleeps.
pub struct WakePause {
    /// `kafka.wake_pause_us`; zero: never pause.
    pause: Duration,
    epoch: Instant,
    /// When a window last decided to pause (nanoseconds after `epoch`,
    /// plus one); 0: not pausing.
    since: AtomicU64,
    /// The decision lapses when no window closed for this long (the node
    /// went quiet: no write closes one).
    fresh_for: Duration,
}

impl WakePause {
    pub fn new(pause: Duration, window: Duration, now: Instant) -> WakePause {
        WakePause {
            pause,
            epoch: now,
            since: AtomicU64::new(0),
            fresh_for: 2 * window,
        }
    }

    /// A window of the lane policy closed: `rate` writes a second, `fast`
    /// of them in the fast lane.
    pub fn window(&self, now: Instant, rate: u64, fast: u64) {
        let on = !self.pause.is_zero() && fast == 0 && rate >= MIN_RATE;
        let at = if on {
            self.nanos(now).saturating_add(1)
        } else {
            0
        };
        self.since.store(at, Ordering::Relaxed);
    }

    /// A fast-lane write: no pause from now on, until a window decides again.
    pub fn fast_write(&self) {
        // Read first: a node of fast-lane clients calls this per PUBLISH,
        // and a store each time would bounce the line between workers.
        if self.since.load(Ordering::Relaxed) != 0 {
            self.since.store(0, Ordering::Relaxed);
        }
    }

    /// How long a worker pauses before it sleeps: zero unless coalescing.
    pub fn before_sleep(&self, now: Instant) -> Duration {
        let since = self.since.load(Ordering::Relaxed);
        if since == 0 {
            return Duration::ZERO;
        }
        let age = self.nanos(now).saturating_sub(since - 1);
        if age > self.fresh_for.as_nanos() as u64 {
            return Duration::ZERO;
        }
        self.pause
    }

    fn nanos(&self, now: Instant) -> u64 {
        nanos_after(self.epoch, now)
    }
}

/// `t` in nanoseconds after `epoch` (0 before it): an instant kept in an
/// atomic (here and in `lanes.rs`).
pub(super) fn nanos_after(epoch: Instant, t: Instant) -> u64 {
    let d = t.saturating_duration_since(epoch);
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAUSE: Duration = Duration::from_millis(2);
    const WINDOW: Duration = Duration::from_millis(100);

    fn pause() -> (WakePause, Instant) {
        let t0 = Instant::now();
        (WakePause::new(PAUSE, WINDOW, t0), t0)
    }

    #[test]
    fn sparse_publishers_at_the_minimum_rate_coalesce_wake_ups() {
        let (p, t0) = pause();
        assert_eq!(
            p.before_sleep(t0),
            Duration::ZERO,
            "off until a window decides"
        );
        p.window(t0 + WINDOW, MIN_RATE, 0);
        assert_eq!(p.before_sleep(t0 + WINDOW), PAUSE);
    }

    #[test]
    fn a_quiet_node_does_not_pause() {
        let (p, t0) = pause();
        p.window(t0 + WINDOW, MIN_RATE - 1, 0);
        assert_eq!(p.before_sleep(t0 + WINDOW), Duration::ZERO);
    }

    #[test]
    fn a_fast_lane_write_stops_the_pauses_at_once() {
        let (p, t0) = pause();
        p.window(t0 + WINDOW, 10_000, 0);
        p.fast_write();
        assert_eq!(p.before_sleep(t0 + WINDOW), Duration::ZERO);
        // And a window with fast-lane writes in it keeps them off.
        p.window(t0 + 2 * WINDOW, 10_000, 1);
        assert_eq!(p.before_sleep(t0 + 2 * WINDOW), Duration::ZERO);
    }

    #[test]
    fn the_decision_lapses_when_no_window_closes() {
        let (p, t0) = pause();
        p.window(t0 + WINDOW, 10_000, 0);
        assert_eq!(p.before_sleep(t0 + 3 * WINDOW), PAUSE);
        assert_eq!(
            p.before_sleep(t0 + 3 * WINDOW + Duration::from_millis(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_zero_pause_is_off() {
        let t0 = Instant::now();
        let p = WakePause::new(Duration::ZERO, WINDOW, t0);
        p.window(t0 + WINDOW, 10_000, 0);
        assert_eq!(p.before_sleep(t0 + WINDOW), Duration::ZERO);
    }
}
