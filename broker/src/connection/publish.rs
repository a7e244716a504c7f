//! Client -> Kafka: a PUBLISH's topic alias, authorization, QoS 2
//! de-duplication, the Kafka write and its acknowledgement.

use futures::FutureExt;

use super::*;
use crate::kafka::Sent;

/// A PUBLISH's Kafka write, prepared: the lane is chosen once, whether
/// the write goes at once or waits for room.
pub(super) struct PendingWrite {
    packet_id: u16,
    msg: Arc<Message>,
    flow: Option<Qos2Flow>,
    started: Instant,
    lane: crate::kafka::Lane,
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// A PUBLISH, as far as it goes without waiting: `Some` is the rest,
    /// for `on_slow` (a QoS 2 first transmission, a write that must wait).
    pub(super) fn on_publish(&mut self, mut p: Publish) -> Result<Option<Slow>, End> {
        self.resolve_topic(&mut p)?;
        if !self.authorize_publish(&p) {
            return Ok(None);
        }
        let v5 = self.v5();
        if p.qos > QoS::AtMostOnce {
            let in_flight = self.acks.len() + self.session.inbound_qos2.received_len();
            if v5 && in_flight >= self.node.config().mqtt.receive_maximum as usize {
                return Err(End::Server(
                    ReasonCode::ReceiveMaximumExceeded,
                    "more unacknowledged QoS 1/2 PUBLISHes than Receive Maximum".into(),
                ));
            }
        }
        if p.qos == QoS::ExactlyOnce {
            return Ok(Some(Slow::Qos2(p)));
        }
        let w = self.prepare_write(p, None);
        Ok(self.write_now(w).map(Slow::Write))
    }

    /// The rest of a QoS 2 first transmission: its de-duplication may read
    /// Kafka.
    pub(super) async fn on_qos2_publish(&mut self, p: Publish) -> Result<(), End> {
        if let Some(flow) = self.qos2_first_transmission(&p).await? {
            let w = self.prepare_write(p, Some(flow));
            if let Some(w) = self.write_now(w) {
                self.write_when_room(w).await;
            }
        }
        Ok(())
    }

    /// Topic alias resolution [MQTT-3.3.2-7..10] and topic checks.
    pub(super) fn resolve_topic(&mut self, p: &mut Publish) -> Result<(), End> {
        if !p.properties.subscription_identifiers.is_empty() {
            // [MQTT-3.3.4-6]
            return Err(End::Server(
                ReasonCode::ProtocolError,
                "PUBLISH from a client carries a subscription identifier".into(),
            ));
        }
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.node.config().mqtt.topic_alias_maximum {
                // [MQTT-3.3.2-9/10]
                return Err(End::Server(
                    ReasonCode::TopicAliasInvalid,
                    format!("topic alias {alias}"),
                ));
            }
            if p.topic.is_empty() {
                match self.rare.as_ref().and_then(|r| r.aliases_in.get(&alias)) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(End::Server(
                            ReasonCode::ProtocolError,
                            format!("unknown topic alias {alias}"),
                        ))
                    }
                }
            } else {
                self.rare().aliases_in.insert(alias, p.topic.clone());
            }
        } else if p.topic.is_empty() {
            return Err(End::Server(
                ReasonCode::TopicNameInvalid,
                "empty topic".into(),
            ));
        }
        if p.topic.split('/').count() > self.node.config().mqtt.max_topic_levels {
            return Err(End::Server(
                ReasonCode::TopicNameInvalid,
                format!(
                    "more than {} topic levels",
                    self.node.config().mqtt.max_topic_levels
                ),
            ));
        }
        Ok(())
    }

    /// Authorization: false when the PUBLISH is refused (acknowledged as
    /// the protocol version allows, never written to Kafka).
    pub(super) fn authorize_publish(&mut self, p: &Publish) -> bool {
        let v5 = self.v5();
        let packet_id = p.packet_id.unwrap_or(0);
        if !self
            .node
            .acl()
            .check(&self.identity, Action::Publish, &p.topic)
        {
            // Never written to Kafka. MQTT 5 says why; 3.1.1 cannot, so the
            // client gets the normal acknowledgement [MQTT-3.3.5-2].
            self.node
                .metrics()
                .dropped_messages
                .with_label_values(&["not_authorized"])
                .inc();
            let reason = if v5 {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::Success
            };
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.emit(Packet::PubAck(ack_with(packet_id, reason, None)), false)
                }
                QoS::ExactlyOnce => {
                    if !v5 {
                        // Completes with PUBREL/PUBCOMP like any QoS 2 flow.
                        self.session.inbound_qos2.received_unwritten(packet_id);
                    }
                    self.emit(Packet::PubRec(ack_with(packet_id, reason, None)), false);
                }
            }
            return false;
        }
        true
    }

    /// QoS 2 de-duplication: the flow to write for a first transmission;
    /// `None` for a retransmission, acknowledged without a second write.
    pub(super) async fn qos2_first_transmission(
        &mut self,
        p: &Publish,
    ) -> Result<Option<Qos2Flow>, End> {
        let packet_id = p.packet_id.unwrap_or(0);
        // [MQTT-4.3.3-9/10] a known id is a retransmission: never written twice.
        if self.qos2_pending(packet_id) {
            return Ok(None);
        }
        if self.session.inbound_qos2.is_received(packet_id) {
            self.emit(Packet::PubRec(Ack::new(packet_id)), false);
            return Ok(None);
        }
        if p.dup && self.scans_left > 0 && self.session.expiry_s > 0 {
            self.scans_left -= 1;
            if let Some(seq) = Box::pin(self.written_before(&p.topic, packet_id)).await? {
                self.session.inbound_qos2.found_written(packet_id, seq);
                self.node.metrics().qos2_duplicates_suppressed.inc();
                let msg = Arc::new(Message {
                    properties: Default::default(),
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    qos: p.qos,
                    retain: false,
                    publisher: None,
                    timestamp_ms: now_ms(),
                });
                // Queued behind earlier acknowledgements [MQTT-4.6.0-2].
                self.acks.push_done(AckDone {
                    packet_id,
                    qos: QoS::ExactlyOnce,
                    result: Ok(()),
                    msg,
                    started: Instant::now(),
                    duplicate: true,
                });
                return Ok(None);
            }
        }
        let seq = self.session.inbound_qos2.begin(packet_id, p.dup, now_ms());
        self.dirty = true;
        Ok(Some(Qos2Flow { packet_id, seq }))
    }

    /// A PUBLISH's message, its lane and the time its write starts.
    fn prepare_write(&mut self, p: Publish, flow: Option<Qos2Flow>) -> PendingWrite {
        let packet_id = p.packet_id.unwrap_or(0);
        let msg = Arc::new(Message {
            properties: Message::forwardable_properties(&p.properties),
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            publisher: Some(
                self.publisher
                    .get_or_insert_with(|| {
                        bytes::Bytes::copy_from_slice(self.session.client_id.as_bytes())
                    })
                    .clone(),
            ),
            timestamp_ms: now_ms(),
        });
        let started = Instant::now();
        let lane = self.lane_for_next_write(started);
        PendingWrite {
            packet_id,
            msg,
            flow,
            started,
            lane,
        }
    }

    /// Hands the write to Kafka if it can go without waiting; else gives it
    /// back for `write_when_room`.
    fn write_now(&mut self, w: PendingWrite) -> Option<PendingWrite> {
        match self.node.try_send(&w.msg, w.flow, w.lane) {
            Some(sent) => {
                self.track_write(w, sent);
                None
            }
            None => Some(w),
        }
    }

    /// Waits for the producer's room (back-pressure), then writes.
    pub(super) async fn write_when_room(&mut self, w: PendingWrite) {
        let sent = self.node.send(&w.msg, w.flow, w.lane).await;
        self.track_write(w, sent);
    }

    /// Keeps a handed-over write's outcome: QoS 1/2 acknowledgements wait
    /// for Kafka in order; a QoS 0 write counts against its bound.
    fn track_write(&mut self, w: PendingWrite, sent: Result<Sent, ProduceError>) {
        let PendingWrite {
            packet_id,
            msg,
            started,
            ..
        } = w;
        let qos = msg.qos;
        if qos == QoS::AtMostOnce {
            match sent {
                Ok(sent) => {
                    // Nobody waits for a QoS 0 write, but its outcome is
                    // still counted, and it counts against the bound.
                    self.qos0
                        .get_or_insert_with(Default::default)
                        .push(Box::pin(async move {
                            sent.delivered().await?;
                            Ok(msg)
                        }));
                }
                Err(e) => {
                    self.node.metrics().kafka_produce_errors.inc();
                    tracing::warn!(error = %e, "QoS 0 message not written to Kafka");
                }
            }
            return;
        }
        if qos == QoS::ExactlyOnce {
            self.rare().pending_qos2.insert(packet_id);
        }
        let done = AckDone {
            packet_id,
            qos,
            result: Ok(()),
            msg,
            started,
            duplicate: false,
        };
        self.acks.push_sent(sent, done);
    }

    /// The lane of the next Kafka write: the current one while any write of
    /// this connection is in flight (order), else the node's choice.
    fn lane_for_next_write(&mut self, now: Instant) -> crate::kafka::Lane {
        let in_flight = self.acks.len() + self.qos0_in_kafka();
        let previous = self.last_publish.replace(now);
        if in_flight == 0 {
            let waits = crate::kafka::lanes::paced_by_acks(self.peak_in_flight.into());
            let last_ack = if waits { self.last_ack } else { None };
            self.lane = self.node.lanes().choose(now, last_ack, previous);
            self.peak_in_flight = 0;
        }
        let seen = u16::try_from(in_flight).unwrap_or(u16::MAX);
        self.peak_in_flight = self.peak_in_flight.max(seen);
        self.lane
    }

    /// For a retransmitted QoS 2 PUBLISH of an id the restored session does
    /// not know: the sequence number of its first transmission if the
    /// previous owner wrote it to Kafka without recording that.
    pub(super) async fn written_before(
        &mut self,
        topic: &str,
        packet_id: u16,
    ) -> Result<Option<u64>, End> {
        if let Some(wait) = self
            .scan_settled_ms
            .map(|at| at - now_ms())
            .filter(|w| *w > 0)
        {
            tracing::debug!(client_id = %self.session.client_id, wait_ms = wait, "QoS 2 scan waits for the previous owner's last writes");
            tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
        }
        let now = now_ms();
        let bound = self.session.inbound_qos2.bound(now);
        let req = crate::kafka::qos2_scan::ScanRequest {
            topic: self.node.mapping().kafka_topic_for(topic),
            client_id: &self.session.client_id,
            packet_id,
            since_ms: bound.since_ms,
        };
        match crate::kafka::qos2_scan::find_writes(
            &self.node.config().kafka,
            &self.node.config().node_id,
            self.node.metrics(),
            req,
        )
        .await
        {
            Ok(seqs) => Ok(seqs
                .into_iter()
                .filter(|s| {
                    self.session
                        .inbound_qos2
                        .is_unrecorded_write(packet_id, *s, now)
                })
                .max()),
            Err(e) => {
                // Unverifiable: writing could duplicate, acknowledging could
                // lose. The client retransmits after reconnecting.
                tracing::warn!(client_id = %self.session.client_id, error = %e, "cannot check a QoS 2 retransmission against Kafka");
                Err(End::Server(
                    ReasonCode::UnspecifiedError,
                    "cannot check a QoS 2 retransmission against Kafka".into(),
                ))
            }
        }
    }

    /// Handles `first` and every acknowledgement already in after it: Kafka
    /// acknowledges a whole batch at once, and its PUBACKs then leave in
    /// one socket write, not one each (which cost a `writev` per message).
    pub(super) fn on_kafka_acks(&mut self, first: AckDone) -> Result<(), End> {
        self.on_kafka_ack(first)?;
        // A pending poll here leaves a no-op waker registered; harmless, as
        // the event loop polls `acks` again before it waits.
        while let Some(Some(done)) = self.acks.next().now_or_never() {
            self.on_kafka_ack(done)?;
        }
        Ok(())
    }

    /// QoS 0 writes this connection has in flight.
    pub(super) fn qos0_in_kafka(&self) -> usize {
        self.qos0.as_ref().map_or(0, |q| q.len())
    }

    /// A QoS 0 write finished, and any others already finished with it.
    pub(super) fn on_qos0_written(&mut self, first: Qos0Done) {
        qos0_outcome(&self.node, first);
        while let Some(Some(done)) = self.qos0.as_mut().and_then(|q| q.next().now_or_never()) {
            qos0_outcome(&self.node, done);
        }
    }

    /// Kafka answered for a QoS 1/2 PUBLISH: acknowledge it now, in the order
    /// received [MQTT-4.6.0-2] (`Acks` keeps that order).
    fn on_kafka_ack(&mut self, done: AckDone) -> Result<(), End> {
        let id = done.packet_id;
        if let (QoS::ExactlyOnce, Some(r)) = (done.qos, &mut self.rare) {
            r.pending_qos2.remove(&id);
        }
        match done.result {
            Ok(()) if done.duplicate => {
                self.emit(Packet::PubRec(Ack::new(id)), false);
                Ok(())
            }
            Ok(()) => {
                self.node
                    .metrics()
                    .publish_to_kafka_seconds
                    .observe(done.started.elapsed().as_secs_f64());
                if done.msg.retain {
                    self.node.retained().apply(done.msg);
                }
                self.last_ack = Some(Instant::now());
                if done.qos == QoS::AtLeastOnce {
                    self.emit(Packet::PubAck(Ack::new(id)), false);
                } else {
                    self.session.inbound_qos2.written(id);
                    self.emit(Packet::PubRec(Ack::new(id)), false);
                }
                Ok(())
            }
            Err(e) => {
                // A failed QoS 2 write stays unconfirmed in `inbound_qos2`:
                // it may still have landed (a delivery timeout is ambiguous).
                self.node.metrics().kafka_produce_errors.inc();
                tracing::warn!(client_id = %self.session.client_id, error = %e, "Kafka write failed; PUBLISH not acknowledged as success");
                if done.qos == QoS::ExactlyOnce && self.session.expiry_s > 0 {
                    // A failed write may still land (a timed-out request can
                    // reach Kafka late). An error PUBREC would end the flow and
                    // a resend would be a new message; closing makes the
                    // client retransmit with DUP after reconnecting, and the
                    // Kafka scan then tells whether the first one landed.
                    return Err(End::Server(
                        ReasonCode::UnspecifiedError,
                        format!("Kafka write failed: {e}"),
                    ));
                }
                if self.v5() {
                    let a = ack_with(
                        id,
                        ReasonCode::UnspecifiedError,
                        Some(format!("Kafka write failed: {e}")),
                    );
                    self.emit(
                        if done.qos == QoS::AtLeastOnce {
                            Packet::PubAck(a)
                        } else {
                            Packet::PubRec(a)
                        },
                        false,
                    );
                    Ok(())
                } else {
                    // 3.1.1 has no negative ack: close so the client retransmits.
                    Err(End::Io(format!("Kafka write failed: {e}")))
                }
            }
        }
    }
}

/// What is left to do once a QoS 0 write is over: a retained message joins
/// the retained store (read-your-writes), a failure is counted.
pub(super) fn qos0_outcome(node: &Node, done: Qos0Done) {
    match done {
        Ok(msg) if msg.retain => node.retained().apply(msg),
        Ok(_) => {}
        Err(_) => node.metrics().kafka_produce_errors.inc(),
    }
}
