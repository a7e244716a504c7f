//! One retry policy for the broker's bounded retries of Kafka operations
//! (start offsets of a reader, a topic's configuration, the QoS 2 scan, a
//! will). Each failed try is logged; a final give-up is logged as an error
//! and counted in `lodestream_retry_give_ups_total{what}`, so an operation
//! that stopped trying is never silent.

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec};

/// How often and how long to retry one kind of operation.
#[derive(Debug, Clone)]
pub struct Retry {
    /// What is retried (log field and metric label).
    what: &'static str,
    /// Tries in all, the first one included (at least 1).
    attempts: u32,
    /// Wait after the first failure; doubled after each further one, up to `max_wait`.
    first_wait: Duration,
    max_wait: Duration,
    /// Stop retrying once this much time has passed since the first try.
    deadline: Option<Duration>,
    gave_up: IntCounter,
}

impl Retry {
    /// `attempts` tries with `wait` between them (no back-off); a give-up
    /// counts in `gave_up` under the label `what`.
    pub fn fixed(
        what: &'static str,
        attempts: u32,
        wait: Duration,
        gave_up: &IntCounterVec,
    ) -> Retry {
        Retry {
            what,
            attempts: attempts.max(1),
            first_wait: wait,
            max_wait: wait,
            deadline: None,
            gave_up: gave_up.with_label_values(&[what]),
        }
    }

    /// Wait doubles from `first` up to `max` between tries.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Retry {
        self.first_wait = first;
        self.max_wait = max.max(first);
        self
    }

    /// Gives up once `limit` has passed since the first try, even with tries left.
    pub fn within(mut self, limit: Duration) -> Retry {
        self.deadline = Some(limit);
        self
    }

    /// The wait after failed try number `attempt` (1-based).
    pub fn wait_after(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.first_wait
            .saturating_mul(1u32 << doublings)
            .min(self.max_wait)
    }

    /// Runs `op` until it succeeds or the policy is spent; returns the last
    /// error then. `label` identifies the instance in logs (a topic, a client id).
    pub async fn run<T, E, F, Fut>(&self, label: &str, mut op: F) -> Result<T, E>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let e = match op().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let wait = self.wait_after(attempt);
            let out_of_time = self.deadline.is_some_and(|d| started.elapsed() + wait >= d);
            if attempt >= self.attempts || out_of_time {
                self.gave_up.inc();
                tracing::error!(what = self.what, label, attempts = attempt, error = %e, "giving up after retries");
                return Err(e);
            }
            tracing::warn!(what = self.what, label, attempt, error = %e, "failed; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t", "t"), &["what"]).unwrap()
    }

    #[test]
    fn wait_doubles_up_to_the_cap() {
        let r = Retry::fixed("t", 10, Duration::ZERO, &counter())
            .backoff(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<u128> = (1..=4).map(|a| r.wait_after(a).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 350, 350]);
    }

    #[tokio::test]
    async fn gives_up_after_the_last_attempt_and_counts_it() {
        let gave_up = counter();
        let r = Retry::fixed("t", 3, Duration::from_millis(10), &gave_up);
        let mut tries = 0;
        let out: Result<(), String> = r
            .run("x", || {
                tries += 1;
                async { Err("down".to_string()) }
            })
            .await;
        assert_eq!(out, Err("down".into()));
        assert_eq!(tries, 3);
        assert_eq!(gave_up.with_label_values(&["t"]).get(), 1);
    }

    #[tokio::test]
    async fn success_after_failures_is_not_a_give_up() {
        let gave_up = counter();
        let r = Retry::fixed("t", 5, Duration::from_millis(10), &gave_up);
        let mut tries = 0;
        let out: Result<u32, String> = r
            .run("x", || {
                tries += 1;
                let n = tries;
                async move {
                    if n < 3 {
                        Err("down".into())
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(out, Ok(3));
        assert_eq!(gave_up.with_label_values(&["t"]).get(), 0);
    }

    #[tokio::test]
    async fn deadline_ends_retries_before_the_attempts_run_out() {
        let gave_up = counter();
        let r = Retry::fixed("t", 1000, Duration::from_millis(25), &gave_up)
            .within(Duration::from_millis(100));
        let mut tries = 0;
        let out: Result<(), &str> = r
            .run("x", || {
                tries += 1;
                async { Err("down") }
            })
            .await;
        assert!(out.is_err());
        // Real time on a loaded machine: sleeps may overshoot, never undershoot.
        assert!((2..=4).contains(&tries), "{tries}");
        assert_eq!(gave_up.with_label_values(&["t"]).get(), 1);
    }
}
