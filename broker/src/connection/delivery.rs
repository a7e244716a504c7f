//! Kafka -> client: catch-up of a resumed session, the backlog, the
//! outbound window and one delivery's PUBLISH.

use super::*;

/// Bytes of PUBLISHes one drain of the backlog writes before it lets the
/// socket take them (the turn ends after the packet that passes it).
const WBUF_BURST: usize = 64 * 1024;

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// Re-reads what a resumed session missed from Kafka, from its stored
    /// offsets, then hands it to fan-out (see `kafka/catchup.rs`).
    pub(super) async fn start_catch_up(&mut self) {
        let entries = index_entries(&self.session);
        for (inner, _, _) in &entries {
            if let Err(e) = self.node.ensure_readers(inner).await {
                tracing::warn!(filter = %inner, error = %e, "cannot read Kafka for resumed subscription");
            }
        }
        let from = self.session.offsets.clone();
        self.spawn_catch_up(from, entries, None);
    }

    /// Reads the session's plain subscriptions (`entries`, not in fan-out)
    /// from Kafka at `from` into `self.catchup`, then registers them with
    /// fan-out. `permit` (a lagging session's) is held until then.
    pub(super) fn spawn_catch_up(
        &mut self,
        from: crate::session::Offsets,
        entries: Vec<(String, crate::subscriptions::SubKey, SubEntry)>,
        permit: Option<crate::node::LaggingPermit>,
    ) {
        let node = self.node.clone();
        // Unsubscribes during an earlier catch-up do not concern this one:
        // `entries` are the subscriptions as they are now.
        let removed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let plain = entries
            .iter()
            .filter(|(_, key, _)| key.share_group.is_none())
            .map(|(inner, _, entry)| (inner.clone(), entry.options.clone(), entry.identifier))
            .collect();
        let job = crate::kafka::catchup::CatchUp {
            client_id: self.session.client_id.clone(),
            from,
            subscriptions: plain,
            entries: entries.clone(),
            removed: removed.clone(),
            pace: None,
            wait_drained: false,
        };
        let (tx, rx) = mpsc::channel(node.config().mqtt.session_queue.max(1));
        self.catchup = Some(super::CatchUpRead { rx, removed });
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            match node.catch_up(job, tx).await {
                Ok(_) => tracing::debug!(elapsed = ?started.elapsed(), "session caught up"),
                Err(e) => {
                    // Without a catch-up the session still gets live messages.
                    tracing::warn!(error = %e, "catch-up failed; subscribing live only");
                    for (f, k, e) in entries {
                        let _ = node.index_subscription(&f, k, e);
                    }
                }
            }
        });
    }

    pub(super) fn window_open(&self) -> bool {
        self.session.outbound.len() < self.client_receive_max && self.unsaved_ok()
    }

    /// Under `mqtt.max_unsaved_deliveries` (or it does not apply).
    pub(super) fn unsaved_ok(&self) -> bool {
        self.unsaved_max == 0
            || self.session.expiry_s == 0
            || self.unsaved + self.landed_outbound < self.unsaved_max
    }

    /// Sends queued deliveries while the outbound window has room; also pulls
    /// whatever is already waiting in the mailbox, to batch writes.
    pub(super) fn drain_backlog(&mut self) {
        // One clock reading and one look at the rules for a turn's
        // deliveries (at most 64 KiB of them): both cost more than the rest
        // of a small delivery's checks.
        let now = now_ms();
        let acl = self.node.acl();
        let mut sized = false;
        loop {
            if !self.window_open() || self.held_len() >= HELD_MAX {
                return;
            }
            let d = match self.backlog.pop_front() {
                Some(d) => d,
                // A catch-up's deliveries are batched the same way: one
                // loop turn (and flush) per record held a catch-up to a
                // few thousand records a second.
                None if self.catchup.is_some() => {
                    match self.catchup.as_mut().map(|c| c.rx.try_recv()) {
                        Some(Ok(d)) => d,
                        // Empty, or closed (the event loop sees that).
                        _ => return,
                    }
                }
                None => match self.session.inbox.try_recv() {
                    Ok(d) => d,
                    Err(_) => return,
                },
            };
            let before = self.io.wbuf.len();
            self.deliver(d, now, &acl);
            if !sized {
                sized = true;
                self.size_wbuf_for_burst(self.io.wbuf.len() - before);
            }
            if self.io.wbuf.len() > WBUF_BURST {
                return;
            }
        }
    }

    /// Makes room in the write buffer for the deliveries waiting behind
    /// one of `one` bytes, up to a turn's `WBUF_BURST`: grown by doubling
    /// from empty (`Io::flush` frees it after each burst), its bytes were
    /// copied about twice over, 2.6 % of the read path's instructions. At
    /// most what the burst would have grown it to.
    fn size_wbuf_for_burst(&mut self, one: usize) {
        let waiting = self.backlog.len() + self.session.inbox.len();
        let want = one.saturating_mul(waiting).min(WBUF_BURST + one);
        self.io.wbuf.reserve(want);
    }

    /// Sends one message to the client; `now` is the expiry clock.
    pub(super) fn deliver(&mut self, d: Delivery, now: i64, acl: &crate::acl::Acl) {
        self.advance_offsets(&d);
        let msg = &d.msg;
        if msg.is_expired(now) {
            return self.discard(&d, "expired");
        }
        // A deny rule with `overlap = "filter"` granted an overlapping
        // filter: its topics are withheld here, where live, catch-up and
        // retained deliveries all pass (offsets above still advance).
        if !acl.may_deliver(&self.identity, &msg.topic) {
            return self.discard(&d, "acl_filtered");
        }
        let packet_id = if d.qos > QoS::AtMostOnce {
            match self.session.outbound.next_packet_id() {
                Some(id) => Some(id),
                None => {
                    self.backlog.push_front(d);
                    return;
                }
            }
        } else {
            None
        };
        if packet_id.is_some() || self.holding() {
            return self.deliver_checked(d, packet_id, now);
        }
        // QoS 0 written now: encoded from the message itself, no owned
        // PUBLISH (its topic, payload handle and properties were copies per
        // delivery on the read path), and sized as it is encoded.
        let (topic, alias, new_alias) = self.alias_for(&msg.topic);
        let mut wire = view(&d, None, topic);
        if self.v5() {
            wire.per_delivery = Some(PerDelivery {
                message_expiry_interval: msg.remaining_expiry(now),
                subscription_identifiers: &d.subscription_ids,
                topic_alias: alias,
            });
        }
        match self.io.send_publish_within(&wire, self.client_max_packet) {
            Ok(true) => {}
            Ok(false) => return self.discard(&d, "too_large_for_client"),
            Err(e) => return self.unencodable(&d, e),
        }
        if new_alias {
            self.remember_alias(&msg.topic, alias);
        }
        if let Some(a) = &d.share {
            // QoS 0 is done once written.
            a.finish();
        }
        self.node.metrics().delivered.inc();
    }

    /// A delivery that is stored (QoS 1/2) or queued behind held packets:
    /// checked against the client's maximum packet size before its flow
    /// starts, so a discarded message never holds a packet id. Its largest
    /// form is checked [MQTT-3.1.2-25]: the full name, with the alias it
    /// would set now (a resend after a reconnect carries no alias).
    fn deliver_checked(&mut self, d: Delivery, packet_id: Option<u16>, now: i64) {
        // MQTT 3.1.1 has no properties: none are built for it.
        let mut properties = if self.v5() {
            Properties {
                message_expiry_interval: d.msg.remaining_expiry(now),
                subscription_identifiers: d.subscription_ids.clone(),
                ..Properties::clone(&d.msg.properties)
            }
        } else {
            Properties::default()
        };
        let (_, alias, new_alias) = self.alias_for(&d.msg.topic);
        properties.topic_alias = alias.filter(|_| new_alias);
        let largest = PublishRef {
            properties: &properties,
            ..view(&d, packet_id, &d.msg.topic)
        };
        let checked = lodestream_mqtt::publish_encoded_len(&largest, self.version);
        match checked {
            Ok(size) if size > self.client_max_packet => {
                return self.discard(&d, "too_large_for_client")
            }
            Ok(_) => {}
            Err(e) => return self.unencodable(&d, e),
        }
        properties.topic_alias = None;
        let wire = Publish {
            dup: false,
            qos: d.qos,
            retain: d.retain,
            topic: d.msg.topic.clone(),
            packet_id,
            payload: d.msg.payload.clone(),
            properties,
        };
        self.deliver_owned(d, wire)
    }

    /// Readers only pass on records that make a valid PUBLISH
    /// (`Message::try_from_record`); this is the last guard.
    fn unencodable(&self, d: &Delivery, e: lodestream_mqtt::EncodeError) {
        tracing::error!(topic = %d.msg.topic, error = %e, "delivery cannot be encoded; discarded");
        self.discard(d, "unencodable")
    }

    /// A delivery's place in Kafka becomes the session's resume point.
    fn advance_offsets(&mut self, d: &Delivery) {
        let Some(src) = &d.source else {
            return;
        };
        let key = crate::session::state::PartitionRef(&src.topic, src.partition);
        let offsets = &mut self.session.offsets;
        match offsets.get_mut(&key) {
            Some(next) => *next = (*next).max(src.offset + 1),
            None => {
                offsets.insert((src.topic.clone(), src.partition), src.offset + 1);
            }
        }
        self.dirty = true;
        self.unsaved += 1;
    }

    /// Sends a QoS 1/2 delivery (starting its flow) or a QoS 0 one that
    /// queues behind held packets.
    fn deliver_owned(&mut self, d: Delivery, mut wire: Publish) {
        let packet_id = wire.packet_id;
        // Stored without alias (aliases do not survive a reconnect); QoS 0
        // keeps no copy.
        let stored = packet_id.map(|_| wire.clone());
        let (sent, alias) = self.aliased(&wire.topic);
        if sent.is_empty() {
            wire.topic.clear();
        }
        wire.properties.topic_alias = alias;
        let exactly_once = d.qos == QoS::ExactlyOnce;
        match (packet_id.zip(stored), &d.share) {
            (Some((id, full)), share) => {
                self.session.outbound.start(id, full);
                if share.is_some() {
                    self.rare().shares.in_flight(id, d);
                }
            }
            // QoS 0 is done once written.
            (None, Some(a)) => a.finish(),
            (None, None) => {}
        }
        // [MQTT-4.3.3] exactly once to a QoS 2 subscriber: the flow (and the
        // offsets past it) must be in Kafka before the client can see it, so
        // a node that takes the session over resends it with the same id.
        self.emit(Packet::Publish(wire), exactly_once);
        self.node.metrics().delivered.inc();
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// The topic name and topic alias a PUBLISH of `topic` carries
    /// [MQTT-3.3.2-8]: the first PUBLISH of a topic sets an alias the client
    /// accepts (name and alias), later ones send the alias alone (an empty
    /// name); without one, the name alone.
    fn aliased<'t>(&mut self, topic: &'t str) -> (&'t str, Option<u16>) {
        let (name, alias, new) = self.alias_for(topic);
        if new {
            self.remember_alias(topic, alias);
        }
        (name, alias)
    }

    /// `aliased` without remembering a new alias (the bool: it is new), for
    /// a PUBLISH that may yet be discarded: a client that never got the
    /// PUBLISH setting an alias cannot resolve it later.
    fn alias_for<'t>(&mut self, topic: &'t str) -> (&'t str, Option<u16>, bool) {
        if self.client_alias_max == 0 {
            return (topic, None, false);
        }
        let max = self.client_alias_max as usize;
        let aliases = &self.rare().aliases_out;
        if let Some(a) = aliases.get(topic) {
            return ("", Some(*a), false);
        }
        if aliases.len() >= max {
            return (topic, None, false);
        }
        (topic, Some(aliases.len() as u16 + 1), true)
    }

    fn remember_alias(&mut self, topic: &str, alias: Option<u16>) {
        if let Some(a) = alias {
            self.rare().aliases_out.insert(topic.to_string(), a);
        }
    }

    /// A delivery dropped by policy: counted, and finished for a shared
    /// subscription's group (dropped is done with, not lost).
    fn discard(&self, d: &Delivery, reason: &str) {
        self.node
            .metrics()
            .dropped_messages
            .with_label_values(&[reason])
            .inc();
        if let Some(a) = &d.share {
            a.finish();
        }
    }
}

/// The PUBLISH that sends `d`, borrowed from its message (its properties
/// as they are: a v5 delivery sets `per_delivery`).
fn view<'a>(d: &'a Delivery, packet_id: Option<u16>, topic: &'a str) -> PublishRef<'a> {
    PublishRef {
        dup: false,
        qos: d.qos,
        retain: d.retain,
        topic,
        packet_id,
        payload: &d.msg.payload,
        properties: &d.msg.properties,
        per_delivery: None,
    }
}
