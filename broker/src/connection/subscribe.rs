//! SUBSCRIBE and UNSUBSCRIBE: the fan-out index, Kafka readers, retained
//! messages.

use super::*;

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    pub(super) async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let identifier = s.properties.subscription_identifiers.first().copied();
        let limits = &self.node.config().mqtt;
        let mut reasons = Vec::with_capacity(s.filters.len());
        let now = now_ms();
        for (filter, opts) in s.filters {
            // Shared subscriptions are honoured for 3.1.1 clients too (as
            // other brokers do), so `$share/...` means the same in both
            // versions and is stored, matched and removed one way.
            let shared = SharedFilter::parse(&filter);
            if filter.starts_with(lodestream_mqtt::topic::SHARE_PREFIX) && shared.is_none() {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            let (key, inner) = sub_key(&self.session.client_id, &filter);
            if !self
                .node
                .acl()
                .check(&self.identity, Action::Subscribe, &filter)
            {
                reasons.push(ReasonCode::NotAuthorized);
                continue;
            }
            if inner.split('/').count() > limits.max_topic_levels {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            let existed = self.session.subscriptions.contains_key(&filter);
            if !existed && self.session.subscriptions.len() >= limits.max_subscriptions_per_client {
                reasons.push(ReasonCode::QuotaExceeded);
                continue;
            }
            if let Err(e) = self.node.ensure_readers(inner).await {
                tracing::warn!(filter = %filter, error = %e, "cannot read Kafka for subscription");
                reasons.push(ReasonCode::UnspecifiedError);
                continue;
            }
            let entry = SubEntry::new(
                opts.clone(),
                identifier,
                inner,
                self.session.mailbox.clone(),
            );
            if let Err(e) = self.node.index_subscription(inner, key, entry) {
                tracing::debug!(filter = %filter, error = %e, "invalid filter");
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if !existed {
                self.node.metrics().subscriptions.inc();
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
            reasons.push(match opts.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
            // [MQTT-3.3.1-9..11] retained messages, per Retain Handling; none
            // for shared subscriptions [MQTT-4.8.2-*].
            let send_retained = shared.is_none()
                && match opts.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendIfNew => !existed,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                for m in self.node.retained().matching(inner, now) {
                    self.backlog.push_back(Delivery {
                        source: None,
                        qos: m.qos.min(opts.qos),
                        msg: m,
                        retain: true,
                        subscription_ids: identifier.into_iter().collect(),
                    });
                }
            }
        }
        self.persist_soon();
        self.io.send(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reasons,
            properties: Properties::default(),
        }));
        Ok(())
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for filter in u.filters {
            if self.session.subscriptions.remove(&filter).is_some() {
                if self.catchup.is_some() {
                    self.catchup_removed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(filter.clone());
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
