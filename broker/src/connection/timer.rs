//! The connection loop's one timer: keep alive, the periodic session write
//! and the rate limit's pause share it.
//!
//! Re-armed only when the deadline to meet comes earlier than the armed one.
//! A later deadline waits until the armed one fires: the loop then finds
//! nothing due and arms the new one. Keep alive moves with every packet, and
//! a timer made afresh at every turn of the loop entered and left tokio's
//! timer wheel each time (two locks a turn, about 1k instructions); this way
//! a busy connection re-arms about once per keep-alive period.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Poll};
use std::time::Instant;

use tokio::time::Sleep;

#[derive(Default)]
pub(super) struct LoopTimer {
    /// Made at the first deadline; boxed so that an idle connection's loop
    /// state does not carry it inline.
    sleep: Option<Pin<Box<Sleep>>>,
    /// What `sleep` is set to; `None` once it fired (or before the first).
    armed: Option<Instant>,
}

impl LoopTimer {
    /// Makes sure the timer fires at or before `due`; false when there is
    /// nothing to wait for.
    pub(super) fn arm(&mut self, due: Option<Instant>) -> bool {
        let Some(due) = due else {
            return false;
        };
        if self.armed.is_none_or(|a| due < a) {
            let at = tokio::time::Instant::from_std(due);
            match &mut self.sleep {
                Some(s) => s.as_mut().reset(at),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = Some(due);
        }
        true
    }

    /// Resolves when the armed deadline passes (never if none is armed).
    pub(super) fn fired(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let (Some(sleep), Some(_)) = (self.sleep.as_mut(), self.armed) else {
                return Poll::Pending;
            };
            ready!(sleep.as_mut().poll(cx));
            self.armed = None;
            Poll::Ready(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_re_arms_a_later_one_waits_for_the_armed_one() {
        let start = Instant::now();
        let mut t = LoopTimer::default();
        assert!(!t.arm(None));
        assert!(t.arm(Some(start + Duration::from_secs(10))));
        // Earlier: re-armed.
        assert!(t.arm(Some(start + Duration::from_secs(5))));
        // Later: the armed 5 s stays.
        assert!(t.arm(Some(start + Duration::from_secs(20))));
        t.fired().await;
        let waited = tokio::time::Instant::now() - tokio::time::Instant::from_std(start);
        assert_eq!(waited.as_secs(), 5);
        // Fired: the next deadline is armed whatever it is.
        assert!(t.arm(Some(start + Duration::from_secs(20))));
        t.fired().await;
        let waited = tokio::time::Instant::now() - tokio::time::Instant::from_std(start);
        assert_eq!(waited.as_secs(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_armed_it_never_fires() {
        let mut t = LoopTimer::default();
        let r = tokio::time::timeout(Duration::from_secs(3600), t.fired()).await;
        assert!(r.is_err());
    }
}
