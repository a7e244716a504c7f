//! The end of a connection: the socket closed, Kafka writes settled, the
//! backlog requeued, then the session released (`session::release`).

use super::*;

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// Undelivered work goes back in front of the session's queue, in order,
    /// for whoever resumes the session (QoS 1/2 in the backlog were never
    /// started). What does not fit is dropped and counted; dropping QoS 1/2
    /// flags the session like a fan-out overflow, so its next connection is
    /// closed with 0x97 instead of silently missing them.
    pub(super) fn requeue_backlog(&mut self) {
        let backlog = std::mem::take(&mut self.backlog);
        for d in self.session.inbox.requeue_front(backlog) {
            let reason = if d.qos == QoS::AtMostOnce {
                "connection_closed_qos0"
            } else {
                self.session
                    .mailbox
                    .flags
                    .overflowed
                    .store(true, Ordering::Relaxed);
                "connection_closed"
            };
            self.node
                .metrics()
                .dropped_messages
                .with_label_values(&[reason])
                .inc();
        }
    }

    /// Tells the client why it is closed (v5 DISCONNECT), flushes and
    /// closes the socket.
    pub(super) async fn close_socket(&mut self, end: &End) {
        match end {
            End::Server(r, why) => {
                tracing::debug!(client_id = %self.session.client_id, peer = %self.peer, reason = ?r, why, "closing connection");
                if self.v5() {
                    let r = if reason_allowed_in("disconnect", *r) {
                        *r
                    } else {
                        ReasonCode::UnspecifiedError
                    };
                    self.io.send(&Packet::Disconnect(Disconnect {
                        reason: r,
                        properties: Properties {
                            reason_string: Some(why.clone()),
                            ..Properties::default()
                        },
                    }));
                }
            }
            End::TakenOver { .. } | End::TakenOverRemote(_) if self.v5() => {
                // [MQTT-3.1.4-3]
                self.io.send(&Packet::Disconnect(Disconnect::new(
                    ReasonCode::SessionTakenOver,
                )));
            }
            End::Io(e) => {
                tracing::debug!(client_id = %self.session.client_id, peer = %self.peer, error = %e, "connection lost")
            }
            _ => {}
        }
        // After a write failure or timeout, another flush would only block
        // for the write timeout again.
        if !matches!(end, End::Io(_)) {
            let _ = self.io.flush().await;
        }
        let _ = self.io.wr.shutdown().await;
    }

    /// Lets in-flight Kafka writes settle before the session is handed on.
    pub(super) async fn settle_acks(&mut self, end: &End) {
        // Let in-flight Kafka writes settle so QoS 2 ids that reached Kafka
        // stay known: a retransmission after reconnect is then not written twice.
        let settle = if matches!(end, End::TakenOver { .. } | End::TakenOverRemote(_)) {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        let deadline = tokio::time::Instant::now() + settle;
        if let Some(q) = self.qos0.take() {
            // Counted and applied (a retained QoS 0 message) as before,
            // without holding the session up.
            let node = self.node.clone();
            tokio::spawn(async move {
                let mut q = q;
                while let Some(done) = q.next().await {
                    super::publish::qos0_outcome(&node, done);
                }
            });
        }
        while !self.acks.is_empty() {
            match tokio::time::timeout_at(deadline, self.acks.next()).await {
                Ok(Some(done)) => {
                    if done.result.is_ok() && done.qos == QoS::ExactlyOnce {
                        self.session.inbound_qos2.written(done.packet_id);
                    }
                    if done.result.is_ok() && !done.duplicate && done.msg.retain {
                        self.node.retained().apply(done.msg);
                    }
                }
                _ => break,
            }
        }
    }

    /// Closes the connection, then releases the session (hand-off, park,
    /// will, tombstone: `session::release`).
    pub(super) async fn finish(mut self, end: End) {
        let node = self.node.clone();
        node.metrics()
            .disconnects
            .with_label_values(&[end.label()])
            .inc();
        self.close_socket(&end).await;
        // Before the session is released: no replay may hand a filter to
        // fan-out after `release` has taken the session's out.
        if let Some(r) = &mut self.rare {
            r.replays.stop(&node).await;
            // Their open deliveries go to the groups' other members.
            r.shares.leave_all(&node, self.conn_id, &mut self.backlog);
        }
        self.settle_acks(&end).await;
        self.requeue_backlog();
        let leaving = Leaving {
            session: self.session,
            conn_id: self.conn_id,
            will_delay: self.will_delay,
            catching_up: self.catchup.is_some(),
            ctrl: self.ctrl,
        };
        release(&node, leaving, end.into_session_end()).await;
    }
}
