//! SUBSCRIBE and UNSUBSCRIBE: the fan-out index, Kafka readers, retained
//! messages, and replay on subscribe (`connection/replay.rs`).

use super::*;
use crate::replay::{ReplayError, ReplayStart};
use crate::shared_groups::JoinError;
use lodestream_mqtt::SubscriptionOptions;

/// A SUBACK reason string longer than this is cut (it only explains).
const NOTES_MAX: usize = 512;

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    pub(super) async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let identifier = s.properties.subscription_identifiers.first().copied();
        let now = now_ms();
        // Properties belong to the packet: a replay they ask for applies to
        // every filter of this SUBSCRIBE. 3.1.1 has no properties.
        let asked = if self.v5() {
            crate::replay::from_properties(&s.properties.user_properties, now)
        } else {
            Ok(None)
        };
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut notes: Vec<String> = Vec::new();
        for (filter, opts) in s.filters {
            let (reason, note) = self
                .subscribe_one(filter, opts, identifier, &asked, now)
                .await;
            reasons.push(reason);
            notes.extend(note);
        }
        self.persist_soon();
        let mut reason_string = (self.v5() && !notes.is_empty()).then(|| notes.join("; "));
        if let Some(r) = reason_string.as_mut() {
            if r.len() > NOTES_MAX {
                let mut cut = NOTES_MAX;
                while !r.is_char_boundary(cut) {
                    cut -= 1;
                }
                r.truncate(cut);
            }
        }
        let mut ack = Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reasons,
            properties: Properties {
                reason_string,
                ..Properties::default()
            },
        });
        // A reason string may not take the SUBACK over the client's maximum.
        let too_big = lodestream_mqtt::encoded_len(&ack, self.version)
            .map_or(true, |n| n > self.client_max_packet);
        if let (true, Packet::SubAck(a)) = (too_big, &mut ack) {
            a.properties.reason_string = None;
        }
        self.io.send(&ack);
        Ok(())
    }

    /// One filter of a SUBSCRIBE: its SUBACK reason code and, for a replay,
    /// a note for the SUBACK reason string.
    async fn subscribe_one(
        &mut self,
        filter: String,
        opts: SubscriptionOptions,
        identifier: Option<u32>,
        asked: &Result<Option<ReplayStart>, ReplayError>,
        now: i64,
    ) -> (ReasonCode, Option<String>) {
        let node = self.node.clone();
        // Every refused replay is counted with its reason.
        let refuse = |e: ReplayError| {
            node.metrics().replays.with_label_values(&[e.label()]).inc();
            (e.reason_code(), Some(e.to_string()))
        };
        let (filter, replay) = match replay_asked(filter, asked, now) {
            Ok(r) => r,
            Err(e) => return refuse(e),
        };
        let limits = &self.node.config().mqtt;
        // Shared subscriptions are honoured for 3.1.1 clients too (as
        // other brokers do), so `$share/...` means the same in both
        // versions and is stored, matched and removed one way.
        let shared = SharedFilter::parse(&filter);
        if filter.starts_with(lodestream_mqtt::topic::SHARE_PREFIX) && shared.is_none() {
            return (ReasonCode::TopicFilterInvalid, None);
        }
        if replay.is_some() && lodestream_mqtt::topic::validate_topic_filter(&filter).is_err() {
            return (ReasonCode::TopicFilterInvalid, None);
        }
        let (key, inner) = sub_key(&self.session.client_id, &filter);
        let acl = self.node.acl();
        if !acl.check(&self.identity, Action::Subscribe, &filter) {
            return (ReasonCode::NotAuthorized, None);
        }
        if replay.is_some() {
            if let Err(e) = self.replay_allowed(&filter, shared.is_some()) {
                return refuse(e);
            }
        }
        if inner.split('/').count() > limits.max_topic_levels {
            return (ReasonCode::TopicFilterInvalid, None);
        }
        let existed = self.session.subscriptions.contains_key(&filter);
        if !existed && self.session.subscriptions.len() >= limits.max_subscriptions_per_client {
            return (ReasonCode::QuotaExceeded, None);
        }
        if let Some(parsed) = shared {
            return self
                .subscribe_shared(filter, parsed, opts, identifier)
                .await;
        }
        if let Err(e) = self.node.ensure_readers(inner).await {
            tracing::warn!(filter = %filter, error = %e, "cannot read Kafka for subscription");
            return (ReasonCode::UnspecifiedError, None);
        }
        let entry = SubEntry::new(opts.clone(), identifier, self.session.mailbox.clone());
        let mut note = None;
        if let Some(start) = replay {
            // Planned (and possibly refused) before the subscription changes.
            let plan = match self.plan_replay(inner, start, now).await {
                Ok(plan) => plan,
                Err(e) => return refuse(e),
            };
            note = Some(plan.note.clone());
            // The replay registers the filter with fan-out when it reaches
            // live; a live entry of the same filter would deliver twice.
            self.node.unindex_subscription(inner, &key);
            if let Some(c) = &self.catchup {
                // A resumed session still catching up: the replay, not the
                // catch-up, hands this filter to fan-out.
                c.unsubscribed(&filter);
            }
            self.spawn_replay(inner, key, entry, plan);
            self.node
                .metrics()
                .replays
                .with_label_values(&["started"])
                .inc();
        } else {
            if let Err(e) = self.node.index_subscription(inner, key, entry) {
                tracing::debug!(filter = %filter, error = %e, "invalid filter");
                return (ReasonCode::TopicFilterInvalid, None);
            }
            if !existed {
                self.node.metrics().subscriptions.inc();
            }
        }
        // Remember from where this subscription reads, so a resumed
        // session re-reads Kafka from here.
        let topics = self.node.mapping().kafka_topics_for_filter(inner);
        for (k, v) in self.node.fan_out_positions(&topics) {
            self.session.offsets.entry(k).or_insert(v);
        }
        self.session.subscriptions.insert(
            filter.clone(),
            Subscription {
                options: opts.clone(),
                identifier,
            },
        );
        // Retained messages are history too: a replay sends the records
        // themselves, in Kafka order, instead of a retained copy out of it.
        if replay.is_none() {
            self.queue_retained(inner, &opts, existed, identifier, now);
        }
        (granted(opts.qos), note)
    }

    /// A cluster-wide shared subscription: a Kafka consumer-group member
    /// (`shared.rs`) instead of a fan-out entry; no retained messages
    /// [MQTT-4.8.2-*].
    async fn subscribe_shared(
        &mut self,
        filter: String,
        shared: SharedFilter,
        opts: SubscriptionOptions,
        identifier: Option<u32>,
    ) -> (ReasonCode, Option<String>) {
        match self
            .join_shared(&filter, shared, opts.clone(), identifier)
            .await
        {
            Ok(()) => {}
            Err(JoinError::Quota(_)) => return (ReasonCode::QuotaExceeded, None),
            Err(JoinError::Kafka(e)) => {
                tracing::warn!(filter = %filter, error = %e, "cannot join the shared subscription's Kafka group");
                return (ReasonCode::UnspecifiedError, None);
            }
        }
        self.session.subscriptions.insert(
            filter,
            Subscription {
                options: opts.clone(),
                identifier,
            },
        );
        (granted(opts.qos), None)
    }

    /// Whether this client may replay `filter` (after it may subscribe to it).
    fn replay_allowed(&self, filter: &str, shared: bool) -> Result<(), ReplayError> {
        // The group's other members got those messages.
        if shared {
            return Err(ReplayError::Shared);
        }
        if self.node.config().mqtt.replay_max_lookback_s == 0 {
            return Err(ReplayError::Disabled);
        }
        if !self
            .node
            .acl()
            .check(&self.identity, Action::Replay, filter)
        {
            return Err(ReplayError::NotAuthorized);
        }
        Ok(())
    }

    /// [MQTT-3.3.1-9..11] retained messages, per Retain Handling (a
    /// shared subscription never comes here: `subscribe_shared`).
    fn queue_retained(
        &mut self,
        inner: &str,
        opts: &SubscriptionOptions,
        existed: bool,
        identifier: Option<u32>,
        now: i64,
    ) {
        let send_retained = match opts.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendIfNew => !existed,
            RetainHandling::DoNotSend => false,
        };
        if !send_retained {
            return;
        }
        for m in self.node.retained().matching(inner, now) {
            self.backlog.push_back(Delivery {
                source: None,
                qos: m.qos.min(opts.qos),
                msg: m,
                retain: true,
                subscription_ids: identifier.into_iter().collect(),
                share: None,
            });
        }
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for filter in u.filters {
            // A 3.1.1 client unsubscribes the string it subscribed.
            let filter = match crate::replay::from_prefix(&filter, 0) {
                Ok(Some(r)) => r.filter.to_string(),
                _ => filter,
            };
            if self.session.subscriptions.remove(&filter).is_some() {
                // Told before the index changes (see `register_if_caught_up`).
                if let Some(c) = &self.catchup {
                    c.unsubscribed(&filter);
                }
                if let Some(r) = &mut self.rare {
                    r.replays.unsubscribed(&filter);
                    r.shares.leave(&self.node, &filter, self.conn_id);
                }
                let (key, inner) = sub_key(&self.session.client_id, &filter);
                self.node.unindex_subscription(inner, &key);
                reasons.push(ReasonCode::Success);
            } else {
                reasons.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        self.persist_soon();
        self.io.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reasons: if self.v5() { reasons } else { Vec::new() },
            properties: Properties::default(),
        }));
    }
}

/// SUBACK's reason code for a granted subscription.
fn granted(qos: QoS) -> ReasonCode {
    match qos {
        QoS::AtMostOnce => ReasonCode::Success,
        QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
        QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
    }
}

/// The filter without a `$replay/<spec>/` prefix, and the replay asked for
/// on it, by that prefix or by the packet's user properties (`asked`).
fn replay_asked(
    filter: String,
    asked: &Result<Option<ReplayStart>, ReplayError>,
    now: i64,
) -> Result<(String, Option<ReplayStart>), ReplayError> {
    let prefixed = crate::replay::from_prefix(&filter, now)?;
    match (prefixed, asked) {
        (_, Err(e)) => Err(e.clone()),
        (Some(_), Ok(Some(_))) => Err(ReplayError::BadPrefix(
            "a $replay/ filter and a replay user property in one SUBSCRIBE".into(),
        )),
        (Some(r), Ok(None)) => Ok((r.filter.to_string(), Some(r.start))),
        (None, Ok(start)) => Ok((filter, *start)),
    }
}
