//! How long the next fetch may wait for more records (pure).
//!
//! A fetch answers as soon as it finds one record (`min_bytes` 1), so a quiet
//! topic's messages go out at once. Under load that makes a fetch for every
//! few producer batches, and each fetch costs its round trip, system calls,
//! wake-ups and a socket write per subscriber: at 16,000 msg/s a fetch that
//! waits up to 10 ms for more cut the read path's CPU per message by a third,
//! and 20 ms by about a sixth more (docs/benchmarks.md). So while records
//! arrive at `BUSY_RATE` or more, a fetch asks Kafka for `BUSY_MIN_BYTES` and
//! waits at most `busy_wait_ms` for them, as the batch lane lingers on the
//! write side; below half that rate nothing waits.
//!
//! The rate over `WINDOW`, not one answer's size, decides: one answer's
//! size swings with how the producers' batches fall across partitions and
//! fetches, and two answers close together at 1,000 msg/s look like a
//! burst (measured: end-to-end p99 1.0 -> 8.5 ms when one answer decided).

use std::time::{Duration, Instant};

/// Record bytes a second from which a topic's reader counts as busy: about
/// 8,000 msg/s of 500 bytes. Well above item 1 of issue #17's 1,000 msg/s,
/// whose end-to-end latency a wait would add to.
pub const BUSY_RATE: u64 = 4 << 20;
/// How long the rate is measured over before it is judged.
pub const WINDOW: Duration = Duration::from_millis(50);
/// What a busy fetch asks for before it answers (or its wait ends).
pub const BUSY_MIN_BYTES: i32 = 256 << 10;

/// `min_bytes` and `wait_ms` of the next fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub min_bytes: i32,
    pub wait_ms: i32,
}

/// One fetch loop's pace: created when it starts, told of every answer.
#[derive(Debug, Clone)]
pub struct FetchPace {
    /// How long Kafka holds a fetch that finds nothing (`fetch_wait_max_ms`).
    idle_wait_ms: i32,
    /// How long a busy fetch may wait for `BUSY_MIN_BYTES` (0: never waits).
    busy_wait_ms: i32,
    busy: bool,
    window_start: Instant,
    window_bytes: usize,
}

impl FetchPace {
    pub fn new(idle_wait_ms: i32, busy_wait_ms: i32, now: Instant) -> FetchPace {
        FetchPace {
            idle_wait_ms,
            busy_wait_ms,
            busy: false,
            window_start: now,
            window_bytes: 0,
        }
    }

    /// The next fetch's ask.
    pub fn ask(&self) -> Ask {
        if self.busy {
            Ask {
                min_bytes: BUSY_MIN_BYTES,
                // Never longer than an empty fetch would be held.
                wait_ms: self.busy_wait_ms.min(self.idle_wait_ms),
            }
        } else {
            Ask {
                min_bytes: 1,
                wait_ms: self.idle_wait_ms,
            }
        }
    }

    /// An answer with `record_bytes` of records came at `now`.
    pub fn answered(&mut self, record_bytes: usize, now: Instant) {
        self.window_bytes = self.window_bytes.saturating_add(record_bytes);
        let since = now.saturating_duration_since(self.window_start);
        if since < WINDOW {
            return;
        }
        let rate = bytes_per_s(self.window_bytes, since);
        self.window_start = now;
        self.window_bytes = 0;
        self.busy = self.busy_wait_ms > 0
            && if self.busy {
                rate >= BUSY_RATE / 2
            } else {
                rate >= BUSY_RATE
            };
    }
}

fn bytes_per_s(bytes: usize, over: Duration) -> u64 {
    let micros = over.as_micros().max(1);
    let rate = (bytes as u128).saturating_mul(1_000_000) / micros;
    u64::try_from(rate).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at_once() -> Ask {
        Ask {
            min_bytes: 1,
            wait_ms: 500,
        }
    }

    /// Answers of `bytes` every `every`, from `start`; the last ask.
    fn feed(p: &mut FetchPace, start: Instant, answers: &[(usize, Duration)]) -> Instant {
        let mut t = start;
        for &(bytes, every) in answers {
            t += every;
            p.answered(bytes, t);
        }
        t
    }

    #[test]
    fn a_quiet_topic_is_answered_at_the_first_record() {
        let t0 = Instant::now();
        let mut p = FetchPace::new(500, 5, t0);
        assert_eq!(p.ask(), at_once());
        // 1,000 msg/s of 570 bytes, one record per fetch.
        feed(&mut p, t0, &[(570, MS); 200]);
        assert_eq!(p.ask(), at_once());
    }

    #[test]
    fn answers_close_together_at_a_low_rate_are_not_a_burst() {
        let t0 = Instant::now();
        let mut p = FetchPace::new(500, 5, t0);
        // Two records 0.1 ms apart (5.7 MB/s between them), then the next
        // 1.9 ms later: 1,000 msg/s on average.
        let pair = [
            (570, Duration::from_micros(100)),
            (570, Duration::from_micros(1900)),
        ];
        let answers: Vec<_> = pair.iter().copied().cycle().take(200).collect();
        feed(&mut p, t0, &answers);
        assert_eq!(p.ask(), at_once());
    }

    #[test]
    fn a_busy_topic_waits_for_more_but_at_most_the_busy_wait() {
        let t0 = Instant::now();
        let mut p = FetchPace::new(500, 5, t0);
        // 16,000 msg/s of 570 bytes: 9 MB/s.
        feed(&mut p, t0, &[(45_600, 5 * MS); 10]);
        let busy = Ask {
            min_bytes: BUSY_MIN_BYTES,
            wait_ms: 5,
        };
        assert_eq!(p.ask(), busy);
    }

    #[test]
    fn the_rate_is_judged_once_a_window_has_passed() {
        let t0 = Instant::now();
        let mut p = FetchPace::new(500, 5, t0);
        feed(&mut p, t0, &[(1 << 20, MS)]);
        assert_eq!(p.ask(), at_once());
        feed(&mut p, t0 + MS, &[(0, WINDOW)]);
        assert_eq!(p.ask().min_bytes, BUSY_MIN_BYTES);
    }

    #[test]
    fn a_busy_spell_lasts_down_to_half_the_busy_rate() {
        let t0 = Instant::now();
        let mut p = FetchPace::new(500, 5, t0);
        let t = feed(&mut p, t0, &[(50_000, 5 * MS); 10]);
        // 3 MB/s: above half the busy rate, still busy.
        let t = feed(&mut p, t, &[(15_000, 5 * MS); 10]);
        assert_eq!(p.ask().min_bytes, BUSY_MIN_BYTES);
        // 1 MB/s: no longer.
        feed(&mut p, t, &[(5_000, 5 * MS); 10]);
        assert_eq!(p.ask(), at_once());
    }

    #[test]
    fn a_rate_between_the_two_thresholds_does_not_start_a_busy_spell() {
        let t0 = Instant::now();
        let mut p = FetchPace::new(500, 5, t0);
        feed(&mut p, t0, &[(15_000, 5 * MS); 40]);
        assert_eq!(p.ask(), at_once());
    }

    #[test]
    fn a_zero_busy_wait_never_waits() {
        let t0 = Instant::now();
        let mut p = FetchPace::new(500, 0, t0);
        feed(&mut p, t0, &[(1 << 20, WINDOW)]);
        assert_eq!(p.ask(), at_once());
    }

    #[test]
    fn the_busy_wait_never_exceeds_the_idle_wait() {
        let t0 = Instant::now();
        let mut p = FetchPace::new(3, 10, t0);
        feed(&mut p, t0, &[(1 << 20, WINDOW)]);
        assert_eq!(p.ask().wait_ms, 3);
    }
}
