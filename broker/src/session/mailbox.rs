//! A session's mailbox: the bounded queue that fan-out fills and the
//! connection drains, with the calls of a tokio `mpsc` channel. Also each
//! connection's control queue (take-over, close).
//!
//! Why not tokio's channel: it allocates its first block of 32 slots when
//! it is created (32 × `Delivery` ≈ 2.5 KB), and every connection has a
//! session, although most clients (publishers) never subscribe. This queue
//! allocates on the first message and gives the memory back once drained
//! after a burst. Fan-out pushes from a reader task and the connection pops:
//! a short `Mutex` section each, uncontended in practice.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use futures::task::AtomicWaker;
pub use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

/// Slots kept after the queue drained; more than this is freed.
const KEEP_SLOTS: usize = 8;

struct State<T> {
    items: VecDeque<T>,
    receiver_alive: bool,
    senders: usize,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Whether `try_recv` has something to return (a message, or the news
    /// that no sender is left), kept with `state` under its lock. Why: a
    /// connection polls its inbox and its control queue at every turn of
    /// its loop, and both are nearly always empty; their locks cost 7 % of
    /// the broker's own cycles at 100,000 publishers (docs/benchmarks.md).
    ready: AtomicBool,
    /// The receiver's task, woken by every send.
    waker: AtomicWaker,
    bound: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `ready` from `s`; called under the lock after each change.
    fn changed(&self, s: &State<T>) {
        let ready = !s.items.is_empty() || s.senders == 0;
        self.ready.store(ready, Ordering::Release);
    }
}

/// Creates a queue holding at most `bound` (≥ 1) messages.
pub fn channel<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            receiver_alive: true,
            senders: 1,
        }),
        ready: AtomicBool::new(false),
        waker: AtomicWaker::new(),
        bound: bound.max(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

pub struct Sender<T>(Arc<Shared<T>>);

/// Receivers to wake once a batch of sends is done (`try_send_deferred`).
///
/// Why: a delivery woken alone costs its connection a task wake-up and a
/// socket write; fan-out dispatches every record Kafka already fetched
/// before it wakes anyone, so a subscriber writes them in one go. Whatever
/// is not flushed is woken on drop, so no receiver is left asleep.
#[derive(Default)]
pub struct Wakes(Vec<Waker>);

impl Wakes {
    /// Wakes every receiver collected so far.
    pub fn flush(&mut self) {
        for w in self.0.drain(..) {
            w.wake();
        }
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.flush();
    }
}

impl<T> Sender<T> {
    /// Queues `v` unless the queue is full or the receiver is gone.
    pub fn try_send(&self, v: T) -> Result<(), TrySendError<T>> {
        self.push(v)?;
        self.0.waker.wake();
        Ok(())
    }

    /// Queues `v` without waking anyone.
    fn push(&self, v: T) -> Result<(), TrySendError<T>> {
        let mut s = self.0.lock();
        if !s.receiver_alive {
            return Err(TrySendError::Closed(v));
        }
        if s.items.len() >= self.0.bound {
            return Err(TrySendError::Full(v));
        }
        s.items.push_back(v);
        self.0.changed(&s);
        Ok(())
    }

    /// Queues `v` like `try_send`, but leaves waking the receiver to
    /// `wakes`: a receiver sent several messages of one batch is woken once.
    pub fn try_send_deferred(&self, v: T, wakes: &mut Wakes) -> Result<(), TrySendError<T>> {
        self.push(v)?;
        // Taken: later sends of the batch find no waker, so each receiver
        // is in `wakes` at most once. It registers again when it next waits.
        if let Some(w) = self.0.waker.take() {
            wakes.0.push(w);
        }
        Ok(())
    }

    /// Free slots.
    pub fn capacity(&self) -> usize {
        self.0.bound.saturating_sub(self.0.lock().items.len())
    }

    /// Wakes the receiver's task for something other than a message (what,
    /// the task finds in its own state: a skip, `SessionFlags`).
    pub fn wake_receiver(&self) {
        self.0.waker.wake();
    }

    /// Registers the receiver's task for `wake_receiver` (and sends).
    pub fn register_receiver(&self, waker: &std::task::Waker) {
        self.0.waker.register(waker);
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        let mut s = self.0.lock();
        s.senders += 1;
        self.0.changed(&s);
        drop(s);
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut s = self.0.lock();
            s.senders -= 1;
            self.0.changed(&s);
            s.senders == 0
        };
        if last {
            // The receiver learns that nothing more will come.
            self.0.waker.wake();
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("mailbox::Sender")
            .field("bound", &self.0.bound)
            .finish_non_exhaustive()
    }
}

pub struct Receiver<T>(Arc<Shared<T>>);

impl<T> Receiver<T> {
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        if !self.0.ready.load(Ordering::Acquire) {
            return Err(TryRecvError::Empty);
        }
        let mut s = self.0.lock();
        match s.items.pop_front() {
            Some(v) => {
                if s.items.is_empty() && s.items.capacity() > KEEP_SLOTS {
                    s.items = VecDeque::new();
                }
                self.0.changed(&s);
                Ok(v)
            }
            None if s.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next message; `None` once every sender is gone and the queue is
    /// empty. Cancel safe (usable in `select!`).
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            match self.try_recv() {
                Ok(v) => return Poll::Ready(Some(v)),
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) => {}
            }
            self.0.waker.register(cx.waker());
            // A send between the check above and the registration woke
            // nobody: look again (`register` orders this read after it).
            match self.try_recv() {
                Ok(v) => Poll::Ready(Some(v)),
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().items.is_empty()
    }

    /// Messages queued now.
    pub fn len(&self) -> usize {
        self.0.lock().items.len()
    }

    /// Puts `older` (taken from this queue earlier, oldest first) back in
    /// front of what is queued, in order, as far as the bound allows; returns
    /// the newest of them that did not fit.
    pub fn requeue_front(&mut self, mut older: VecDeque<T>) -> VecDeque<T> {
        let mut s = self.0.lock();
        let fit = self.0.bound.saturating_sub(s.items.len()).min(older.len());
        let rest = older.split_off(fit);
        while let Some(v) = older.pop_back() {
            s.items.push_front(v);
        }
        self.0.changed(&s);
        rest
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut s = self.0.lock();
            s.receiver_alive = false;
            std::mem::take(&mut s.items)
        };
        // Dropped outside the lock.
        drop(items);
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("mailbox::Receiver")
            .field("bound", &self.0.bound)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fifo_with_full_and_closed() {
        let (tx, mut rx) = channel(2);
        assert_eq!(tx.capacity(), 2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!(tx.capacity(), 0);
        assert_eq!(rx.try_recv().unwrap(), 1);
        assert_eq!(rx.try_recv().unwrap(), 2);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        assert!(rx.is_empty());
        drop(rx);
        assert!(matches!(tx.try_send(4), Err(TrySendError::Closed(4))));
    }

    #[test]
    fn drained_queue_gives_its_memory_back() {
        let (tx, mut rx) = channel(1000);
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.0.lock().items.capacity(), 0);
    }

    /// A receiver sent several messages of one batch is woken once, when
    /// the batch is flushed, and sees them all.
    #[tokio::test]
    async fn deferred_sends_wake_the_receiver_once_at_flush() {
        let (tx, mut rx) = channel(8);
        let mut wakes = Wakes::default();
        let waiter = tokio::spawn(async move {
            let first = rx.recv().await;
            let rest: Vec<i32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            (first, rest)
        });
        // One thread: the waiter runs (and registers) only when we yield.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        tx.try_send_deferred(1, &mut wakes).unwrap();
        tx.try_send_deferred(2, &mut wakes).unwrap();
        tx.try_send_deferred(3, &mut wakes).unwrap();
        assert_eq!(wakes.0.len(), 1, "one wake for three sends");
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "nobody woken before the flush");
        wakes.flush();
        let (first, rest) = waiter.await.unwrap();
        assert_eq!(first, Some(1));
        assert_eq!(rest, vec![2, 3]);
    }

    #[tokio::test]
    async fn recv_waits_for_a_send_and_ends_with_the_last_sender() {
        let (tx, mut rx) = channel(4);
        let tx2 = tx.clone();
        let t = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx2.try_send(7).unwrap();
        });
        assert_eq!(rx.recv().await, Some(7));
        t.await.unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    /// A receiver that waits without taking the lock (`ready`) still sees
    /// every send racing its registration: sends from another thread, each
    /// waited for, never leave it asleep; the last sender's drop ends it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_sends_never_leave_a_waiting_receiver_asleep() {
        const N: u32 = 20_000;
        let (tx, mut rx) = channel(1);
        let sender = std::thread::spawn(move || {
            for i in 0..N {
                let mut v = i;
                // Full: the receiver has not taken the last one yet.
                while let Err(TrySendError::Full(back)) = tx.try_send(v) {
                    v = back;
                    std::hint::spin_loop();
                }
            }
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            let mut got = Vec::new();
            while let Some(v) = rx.recv().await {
                got.push(v);
            }
            got
        })
        .await
        .expect("a send was missed: the receiver slept");
        sender.join().unwrap();
        assert_eq!(got, (0..N).collect::<Vec<_>>());
    }

    /// Undelivered work handed back by a closing connection goes in front
    /// of newer messages (issue #14: `Conn::finish` appended it).
    #[test]
    fn requeue_front_keeps_order_and_bound() {
        let (tx, mut rx) = channel(5);
        for v in [10, 11, 12] {
            tx.try_send(v).unwrap();
        }
        let rest = rx.requeue_front(VecDeque::from([1, 2, 3]));
        assert_eq!(rest, VecDeque::from([3]), "the newest that did not fit");
        let got: Vec<i32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(got, vec![1, 2, 10, 11, 12]);
    }
}
