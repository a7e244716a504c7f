//! Cluster-wide shared subscriptions, the connection's side: the session's
//! `$share/<g>/<f>` subscriptions are members of the node's groups
//! (`shared_groups.rs`), joined at SUBSCRIBE (the SUBACK waits until the
//! group's Kafka consumer group has a position) or when a session holding
//! them connects, and left at UNSUBSCRIBE or at the end of the connection.
//!
//! A delivery is finished (its Kafka group may commit past it) when the
//! client acknowledged it (PUBACK, PUBCOMP, an error PUBREC), when it went
//! out at QoS 0, or when policy dropped it (expired, withheld by a rule,
//! too large for the client). At the end of the connection the unfinished
//! ones are handed back to the group.
//!
//! Bounded: the deliveries of all the connection's shared subscriptions
//! share one channel of `mqtt.session_queue`, taken only while the
//! client's window is open; a full one makes the group pick another
//! member, or wait.

use std::sync::Arc;

use lodestream_mqtt::SubscriptionOptions;

use super::*;
use crate::shared_groups::{GroupKey, JoinError, Slot};

#[derive(Default)]
pub(super) struct Shares {
    /// Groups joined, by the filter as subscribed (`$share/<g>/<f>`).
    joined: HashMap<String, GroupKey>,
    pub(super) rx: Option<mpsc::Receiver<Delivery>>,
    tx: Option<mpsc::Sender<Delivery>>,
    /// Deliveries in flight, by packet id.
    open: HashMap<u16, Delivery>,
}

impl Shares {
    /// The client finished packet `id` (PUBACK, PUBCOMP, error PUBREC).
    pub(super) fn finished(&mut self, id: u16) {
        if let Some(a) = self.open.remove(&id).and_then(|d| d.share) {
            a.finish();
        }
    }

    /// A shared delivery now in flight as packet `id`.
    pub(super) fn in_flight(&mut self, id: u16, d: Delivery) {
        self.open.insert(id, d);
    }

    /// The client unsubscribed `filter`: its member leaves the group. What
    /// is already queued here is still delivered and finished.
    pub(super) fn leave(&mut self, node: &Node, filter: &str, conn_id: u64) {
        if let Some(key) = self.joined.remove(filter) {
            node.leave_shared(&key, conn_id, Vec::new());
        }
    }

    /// The end of the connection: every group is left, and the deliveries
    /// not finished (queued, in `backlog`, in flight) go back to their
    /// groups for the node's other members.
    pub(super) fn leave_all(
        &mut self,
        node: &Node,
        conn_id: u64,
        backlog: &mut VecDeque<Delivery>,
    ) {
        let mut unfinished: Vec<Delivery> = self.open.drain().map(|(_, d)| d).collect();
        unfinished.extend(backlog.iter().filter(|d| d.share.is_some()).cloned());
        backlog.retain(|d| d.share.is_none());
        if let Some(rx) = self.rx.as_mut() {
            // Closed first: a group waiting to send here gets an error and
            // picks another member, instead of landing a delivery after the
            // drain, where nobody would finish or return it.
            rx.close();
            while let Ok(d) = rx.try_recv() {
                unfinished.push(d);
            }
        }
        for (_, key) in self.joined.drain() {
            let (mine, rest): (Vec<Delivery>, Vec<Delivery>) = unfinished
                .into_iter()
                .partition(|d| d.share.as_ref().is_some_and(|a| a.group() == &key));
            unfinished = rest;
            node.leave_shared(&key, conn_id, mine);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// Joins the group of the shared subscription `filter` (`shared` is
    /// it parsed); returns once its Kafka group has a position, so the
    /// SUBACK covers what is published after it.
    pub(super) async fn join_shared(
        &mut self,
        filter: &str,
        shared: SharedFilter,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    ) -> Result<(), JoinError> {
        let node = self.node.clone();
        let conn_id = self.conn_id;
        let shares = &mut self.rare().shares;
        // A re-SUBSCRIBE replaces the member (new options).
        shares.leave(&node, filter, conn_id);
        let tx = match &shares.tx {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(node.config().mqtt.session_queue.max(1));
                shares.rx = Some(rx);
                shares.tx = Some(tx.clone());
                tx
            }
        };
        let key: GroupKey = Arc::new((shared.group, shared.filter));
        let slot = Slot {
            conn_id: self.conn_id,
            client_id: self.session.client_id.clone(),
            options,
            identifier,
            tx,
        };
        node.join_shared(key.clone(), slot).await?;
        self.rare().shares.joined.insert(filter.to_string(), key);
        Ok(())
    }

    /// A session that connects with shared subscriptions rejoins their groups.
    pub(super) async fn join_shared_subscriptions(&mut self) {
        let shared: Vec<(String, SharedFilter, Subscription)> = self
            .session
            .subscriptions
            .iter()
            .filter_map(|(f, s)| SharedFilter::parse(f).map(|p| (f.clone(), p, s.clone())))
            .collect();
        for (filter, parsed, sub) in shared {
            if let Err(e) = self
                .join_shared(&filter, parsed, sub.options, sub.identifier)
                .await
            {
                tracing::warn!(client_id = %self.session.client_id, filter = %filter, error = %e, "shared subscription not resumed");
            }
        }
    }
}
