//! From CONNECT to CONNACK: the checks before a session is touched, the
//! claim (`session::lifecycle`), the connection's initial state.

use super::*;

/// A CONNECT that passed the checks before its session is claimed.
pub(super) struct Admitted {
    identity: Identity,
    client_id: Arc<str>,
    /// The server chose the client id.
    assigned: bool,
    expiry_s: u32,
}

/// What `Conn::new` takes over from the CONNECT handshake.
pub(super) struct Opening {
    identity: Identity,
    peer: SocketAddr,
    conn_id: u64,
    session: Box<Session>,
    ctrl: crate::session::mailbox::Receiver<Control>,
    present: bool,
    /// Keep alive in force (the server's when it overrode the client's).
    keep_alive: u16,
    will_delay: u32,
    /// When a QoS 2 retransmission scan may decide (see `session::lifecycle`).
    scan_settled_ms: Option<i64>,
}

/// A resumed session may be used by a different identity than the one that
/// subscribed: keep only what this identity may subscribe to.
pub(super) fn drop_unauthorized_subscriptions(
    node: &Node,
    identity: &Identity,
    session: &mut Session,
    from_record: bool,
) {
    let acl = node.acl();
    let denied: Vec<String> = session
        .subscriptions
        .keys()
        .filter(|f| !acl.check(identity, Action::Subscribe, f))
        .cloned()
        .collect();
    for f in denied {
        tracing::info!(client_id = %session.client_id, filter = %f, "resumed subscription not authorized for this identity; dropped");
        session.subscriptions.remove(&f);
        if !from_record {
            let (key, inner) = sub_key(&session.client_id, &f);
            node.unindex_subscription(inner, &key);
        }
    }
}

/// CONNACK properties for a v5 client (none for 3.1.1) and the keep alive
/// in force; `assigned` is the client id the server chose, if it did.
pub(super) fn connack_properties(
    c: &Connect,
    limits: &crate::config::MqttLimits,
    assigned: Option<&str>,
    expiry_s: u32,
) -> (Properties, u16) {
    let mut keep_alive = c.keep_alive;
    let mut props = Properties::default();
    if !c.protocol.is_v5() {
        return (props, keep_alive);
    }
    if limits.max_keep_alive_s > 0 && (keep_alive == 0 || keep_alive > limits.max_keep_alive_s) {
        keep_alive = limits.max_keep_alive_s;
        props.server_keep_alive = Some(keep_alive);
    }
    props.assigned_client_identifier = assigned.map(str::to_string);
    if c.properties.session_expiry_interval.unwrap_or(0) != expiry_s {
        props.session_expiry_interval = Some(expiry_s);
    }
    props.receive_maximum = Some(limits.receive_maximum);
    props.maximum_packet_size = Some(limits.max_packet_size);
    props.topic_alias_maximum = Some(limits.topic_alias_maximum);
    props.retain_available = Some(1);
    props.wildcard_subscription_available = Some(1);
    props.subscription_identifier_available = Some(1);
    props.shared_subscription_available = Some(1);
    (props, keep_alive)
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// The checks before a session is touched: enhanced authentication,
    /// the connection limit, the client id and session expiry, the login and
    /// the will's topic. `None`: refused (CONNACK sent).
    pub(super) async fn admit(
        io: &mut Io<S>,
        c: &Connect,
        peer: SocketAddr,
        transport: Transport,
        cert_identity: Option<String>,
    ) -> Option<Admitted> {
        let node = io.node.clone();
        let limits = &node.config().mqtt;
        let v5 = c.protocol.is_v5();
        if v5 && c.properties.authentication_method.is_some() {
            // Enhanced authentication is not offered [MQTT-4.12.0-1].
            io.refuse(ReasonCode::BadAuthenticationMethod, "auth_method")
                .await;
            return None;
        }
        if node.over_connection_limit() {
            io.refuse(ReasonCode::ServerBusy, "max_connections").await;
            return None;
        }
        let assigned = c.client_id.is_empty();
        let client_id: Arc<str> = if assigned {
            Arc::from(format!("auto-{}", uuid::Uuid::new_v4().simple()))
        } else {
            Arc::from(c.client_id.as_str())
        };
        let expiry_s = if v5 {
            c.properties
                .session_expiry_interval
                .unwrap_or(0)
                .min(limits.max_session_expiry_s)
        } else if c.clean_start {
            0
        } else {
            limits.max_session_expiry_s
        };
        // Authenticate before touching the registry: a failed login must not
        // take over an existing session.
        let identity = match node
            .authenticate(
                &client_id,
                c.username.as_deref(),
                c.password.as_deref(),
                cert_identity.as_deref(),
                peer.ip(),
            )
            .await
        {
            Ok(id) => id,
            Err(reason) => {
                node.metrics().auth_failures.inc();
                tracing::info!(%peer, client_id = %client_id, ?transport, ?reason, "authentication failed");
                io.refuse(reason, "auth").await;
                return None;
            }
        };
        if let Some(w) = &c.will {
            if !node.acl().check(&identity, Action::Publish, &w.topic) {
                io.refuse(ReasonCode::NotAuthorized, "will_not_authorized")
                    .await;
                return None;
            }
        }
        Some(Admitted {
            identity,
            client_id,
            assigned,
            expiry_s,
        })
    }

    /// Validates CONNECT, claims the session and sends CONNACK.
    pub(super) async fn accept(
        mut io: Io<S>,
        c: Connect,
        peer: SocketAddr,
        transport: Transport,
        cert_identity: Option<String>,
    ) -> Option<Conn<S>> {
        let node = io.node.clone();
        let limits = &node.config().mqtt;
        let Admitted {
            identity,
            client_id,
            assigned,
            expiry_s,
        } = Self::admit(&mut io, &c, peer, transport, cert_identity).await?;
        let conn_id = node.next_conn_id();
        let Claimed {
            mut session,
            present,
            from_record,
            ctrl,
            scan_settled_ms,
        } = match crate::session::lifecycle::claim(&node, &client_id, conn_id, c.clean_start).await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(%peer, client_id = %client_id, error = %e, "CONNECT refused");
                let (reason, label) = e.reason();
                io.refuse(reason, label).await;
                return None;
            }
        };
        if present {
            drop_unauthorized_subscriptions(&node, &identity, &mut session, from_record);
        }
        node.count_sessions();
        if session.mailbox.flags.overflowed.load(Ordering::Relaxed) {
            // Left set: the event loop closes this connection with 0x97, as
            // for any overflow of the session queue.
            tracing::warn!(client_id = %client_id, "session queue overflowed before this connection: QoS 1/2 messages were dropped");
        }
        session.expiry_s = expiry_s;
        session.will = c.will.clone().map(Box::new);
        let will_delay = c
            .will
            .as_ref()
            .and_then(|w| w.properties.will_delay_interval)
            .unwrap_or(0);
        let (props, keep_alive) =
            connack_properties(&c, limits, assigned.then_some(&*client_id), expiry_s);
        // The claim in the sessions topic is the fencing point: only after
        // Kafka holds it does the client get CONNACK.
        if let Err(e) = crate::session::lifecycle::record_claim(&node, &session).await {
            tracing::warn!(client_id = %client_id, error = %e, "cannot record session in Kafka; refusing CONNECT");
            node.metrics()
                .connect_rejected
                .with_label_values(&["kafka"])
                .inc();
            io.send(&connack(false, ReasonCode::ServerUnavailable));
            let _ = io.flush().await;
            crate::session::lifecycle::unclaim(&node, &client_id, conn_id);
            return None;
        }
        io.send(&Packet::ConnAck(ConnAck {
            session_present: present,
            reason: ReasonCode::Success,
            properties: props,
        }));
        tracing::debug!(%peer, client_id = %client_id, version = ?c.protocol, present, "client connected");
        let mut conn = Conn::new(
            io,
            &c,
            Opening {
                identity,
                peer,
                conn_id,
                session,
                ctrl,
                present,
                keep_alive,
                will_delay,
                scan_settled_ms,
            },
        );
        // [MQTT-4.4.0-1] resend unacknowledged PUBLISH (DUP) and PUBREL in order.
        for (id, flow) in conn.session.outbound.resend() {
            match flow {
                OutFlow::Published(p) => conn.io.send(&Packet::Publish(*p)),
                OutFlow::Released => conn.io.send(&Packet::PubRel(Ack::new(id))),
            }
        }
        if from_record {
            conn.start_catch_up().await;
        }
        conn.join_shared_subscriptions().await;
        Some(conn)
    }

    /// The connection's state once CONNACK is queued.
    pub(super) fn new(io: Io<S>, c: &Connect, o: Opening) -> Conn<S> {
        let node = io.node.clone();
        let limits = &node.config().mqtt;
        let v5 = c.protocol.is_v5();
        let client_receive_max = if v5 {
            c.properties
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(limits.max_inflight_out)
        } else {
            limits.max_inflight_out
        } as usize;
        Conn {
            identity: o.identity,
            node: node.clone(),
            peer: o.peer,
            conn_id: o.conn_id,
            version: c.protocol,
            session: o.session,
            ctrl: o.ctrl,
            keep_alive: (o.keep_alive > 0)
                .then(|| Duration::from_millis(o.keep_alive as u64 * 1500)),
            last_recv: Instant::now(),
            acks: Acks::default(),
            publisher: None,
            lane: Default::default(),
            last_ack: None,
            last_publish: None,
            peak_in_flight: 0,
            qos0: None,
            scans_left: if o.present {
                limits.receive_maximum as usize
            } else {
                0
            },
            scan_settled_ms: o.scan_settled_ms,
            held: Vec::new(),
            held_needs_sync: false,
            sync_wanted: false,
            syncing: None,
            client_alias_max: if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            client_receive_max,
            client_max_packet: c
                .properties
                .maximum_packet_size
                .map(|m| m as usize)
                .unwrap_or(usize::MAX),
            backlog: VecDeque::new(),
            catchup: None,
            rare: None,
            dirty: false,
            acked_since_sync: 0,
            unsaved: 0,
            unsaved_max: limits.max_unsaved_deliveries,
            landed_outbound: 0,
            bucket: (limits.max_publish_rate > 0).then(|| {
                Box::new(TokenBucket::new(
                    limits.max_publish_rate,
                    limits.max_publish_rate,
                    Instant::now(),
                ))
            }),
            throttled_until: None,
            timer: Default::default(),
            prepaid: false,
            will_delay: o.will_delay,
            io,
        }
    }
}
