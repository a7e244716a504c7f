//! The QoS 1/2 PUBLISHes a connection waits on Kafka for, answered in the
//! order they were received [MQTT-4.6.0-2].
//!
//! Why not `FuturesOrdered` of boxed futures (as before): each PUBLISH cost
//! two allocations (the boxed future, the set's task node) and each report
//! two wake-ups (the set's task node, then the connection). Here the queue
//! polls only its oldest write: a later one cannot be answered before it
//! anyway, and once the oldest is in, the next are polled in turn (most are
//! in already: Kafka answers a batch at once).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use lodestream_mqtt::QoS;

use crate::kafka::{ProduceError, Sent};
use crate::message::Message;

/// A PUBLISH whose Kafka write is over.
pub(super) struct AckDone {
    pub packet_id: u16,
    pub qos: QoS,
    pub result: Result<(), ProduceError>,
    pub msg: Arc<Message>,
    pub started: Instant,
    /// A retransmission found already written in Kafka: acknowledge only.
    pub duplicate: bool,
}

/// One waiting PUBLISH: its write's reports, unless the outcome is known.
struct Waiting {
    sent: Option<Sent>,
    done: AckDone,
}

#[derive(Default)]
pub(super) struct Acks(VecDeque<Waiting>);

impl Acks {
    /// Queues a PUBLISH whose write was handed to Kafka (`Ok`) or refused.
    pub fn push_sent(&mut self, sent: Result<Sent, ProduceError>, mut done: AckDone) {
        let sent = match sent {
            Ok(sent) => Some(sent),
            Err(e) => {
                done.result = Err(e);
                None
            }
        };
        self.0.push_back(Waiting { sent, done });
    }

    /// Queues a PUBLISH whose outcome is already known (`done.result`).
    pub fn push_done(&mut self, done: AckDone) {
        self.0.push_back(Waiting { sent: None, done });
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The oldest PUBLISH once its write is over; `None` when none waits.
    /// Cancel safe (usable in `select!`).
    pub fn next(&mut self) -> impl Future<Output = Option<AckDone>> + '_ {
        poll_fn(|cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<AckDone>> {
        let Some(oldest) = self.0.front_mut() else {
            return Poll::Ready(None);
        };
        if let Some(sent) = oldest.sent.as_mut() {
            oldest.done.result = ready!(sent.poll_delivered(cx));
        }
        Poll::Ready(self.0.pop_front().map(|w| w.done))
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use tokio::sync::oneshot;

    use super::*;
    use crate::kafka::Produced;

    type Report = oneshot::Sender<Result<Produced, ProduceError>>;

    fn done(packet_id: u16) -> AckDone {
        AckDone {
            packet_id,
            qos: QoS::AtLeastOnce,
            result: Ok(()),
            msg: Arc::new(Message {
                topic: "t".into(),
                payload: Default::default(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
                publisher: None,
                timestamp_ms: 0,
            }),
            started: Instant::now(),
            duplicate: false,
        }
    }

    fn written(acks: &mut Acks, packet_id: u16) -> Report {
        let (tx, rx) = oneshot::channel();
        let sent = Sent {
            record: rx,
            retained: None,
        };
        acks.push_sent(Ok(sent), done(packet_id));
        tx
    }

    fn landed(tx: Report) {
        let _ = tx.send(Ok(Produced {
            partition: 0,
            offset: 0,
        }));
    }

    fn ready_ids(acks: &mut Acks) -> Vec<u16> {
        std::iter::from_fn(|| acks.next().now_or_never().flatten())
            .map(|d| d.packet_id)
            .collect()
    }

    /// [MQTT-4.6.0-2]: acknowledgements leave in the order the PUBLISHes
    /// came, whatever order Kafka reports them in.
    #[test]
    fn a_later_report_waits_for_the_oldest_write() {
        let mut acks = Acks::default();
        let first = written(&mut acks, 1);
        let second = written(&mut acks, 2);
        acks.push_done(done(3));
        landed(second);
        assert_eq!(ready_ids(&mut acks), Vec::<u16>::new());
        landed(first);
        assert_eq!(ready_ids(&mut acks), vec![1, 2, 3]);
        assert!(acks.is_empty());
        assert!(matches!(acks.next().now_or_never(), Some(None)));
    }

    /// A refused write and a lost report are answered in their turn, as
    /// failures.
    #[test]
    fn failures_are_answered_in_order() {
        let mut acks = Acks::default();
        let lost = written(&mut acks, 1);
        acks.push_sent(Err(ProduceError::Canceled), done(2));
        assert_eq!(acks.len(), 2);
        drop(lost);
        let outcomes: Vec<(u16, bool)> =
            std::iter::from_fn(|| acks.next().now_or_never().flatten())
                .map(|d| (d.packet_id, d.result.is_ok()))
                .collect();
        assert_eq!(outcomes, vec![(1, false), (2, false)]);
    }

    /// A RETAIN message is over once both its records are written.
    #[test]
    fn a_retained_message_waits_for_both_records() {
        let mut acks = Acks::default();
        let (record, record_rx) = oneshot::channel();
        let (retained, retained_rx) = oneshot::channel();
        let sent = Sent {
            record: record_rx,
            retained: Some(retained_rx),
        };
        acks.push_sent(Ok(sent), done(1));
        landed(record);
        assert_eq!(ready_ids(&mut acks), Vec::<u16>::new());
        landed(retained);
        assert_eq!(ready_ids(&mut acks), vec![1]);
    }
}
