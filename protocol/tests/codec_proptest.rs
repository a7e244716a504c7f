//! Property tests for the codec: round trips of arbitrary valid packets in
//! every version, `encoded_len` agreement, robustness against arbitrary
//! input, and stream splitting.

use bytes::{Bytes, BytesMut};
use lodestream_mqtt::codec::MAX_PACKET_SIZE;
use lodestream_mqtt::topic::{validate_topic_filter, SharedFilter};
use lodestream_mqtt::*;
use proptest::prelude::*;

// ----- strategies -----------------------------------------------------------

fn arb_string() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![4 => prop::char::range('a', 'z'), 1 => any::<char>()],
        0..8,
    )
    .prop_map(|v| v.into_iter().filter(|c| *c != '\0').collect())
}

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn arb_topic() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9 $é]{0,3}", 1..4)
        .prop_map(|l| l.join("/"))
        .prop_filter("non-empty", |t| !t.is_empty())
}

fn arb_filter(v5: bool) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(
            prop_oneof![3 => "[a-z0-9$]{0,3}", 1 => Just("+".to_string())],
            1..4,
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(mut levels, hash, shared)| {
            if hash {
                levels.push("#".into());
            }
            let f = levels.join("/");
            if v5 && shared {
                format!("$share/grp/{f}")
            } else {
                f
            }
        })
        .prop_filter("valid filter", |f| {
            validate_topic_filter(f).is_ok()
                && (!f.starts_with("$share/") || SharedFilter::parse(f).is_some())
        })
}

fn arb_qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn arb_packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

/// Where a property list appears (test-side copy of spec table 2-4, kept
/// independent of the codec's own table on purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Connect,
    ConnAck,
    Publish,
    Will,
    PubAck,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

fn allowed(id: u8, ctx: Ctx) -> bool {
    use Ctx::*;
    match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(ctx, Publish | Will),
        0x0B => matches!(ctx, Publish | Subscribe),
        0x11 => matches!(ctx, Connect | ConnAck | Disconnect),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => ctx == ConnAck,
        0x15 | 0x16 => matches!(ctx, Connect | ConnAck | Auth),
        0x17 | 0x19 => ctx == Connect,
        0x18 => ctx == Will,
        0x1C => matches!(ctx, ConnAck | Disconnect),
        0x1F => matches!(
            ctx,
            ConnAck | PubAck | SubAck | UnsubAck | Disconnect | Auth
        ),
        0x21 | 0x22 | 0x27 => matches!(ctx, Connect | ConnAck),
        0x23 => ctx == Publish,
        0x26 => true,
        _ => false,
    }
}

const IDS: [u8; 27] = [
    0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1C,
    0x1F, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A,
];

type Item = (usize, u32, String, String, Bytes, String);

fn build_props(ctx: Ctx, items: Vec<Item>) -> Properties {
    let mut p = Properties::default();
    for (i, n, s1, s2, b, t) in items {
        let id = IDS[i % IDS.len()];
        if !allowed(id, ctx) {
            continue;
        }
        let bit = (n % 2) as u8;
        match id {
            0x01 => p.payload_format_indicator = Some(bit),
            0x02 => p.message_expiry_interval = Some(n),
            0x03 => p.content_type = Some(s1),
            0x08 => p.response_topic = Some(t),
            0x09 => p.correlation_data = Some(b),
            0x0B if ctx == Ctx::Publish || p.subscription_identifiers.is_empty() => {
                p.subscription_identifiers.push(n % 268_435_455 + 1);
            }
            0x11 => p.session_expiry_interval = Some(n),
            0x12 => p.assigned_client_identifier = Some(s1),
            0x13 => p.server_keep_alive = Some(n as u16),
            0x15 => p.authentication_method = Some(s1),
            0x16 => p.authentication_data = Some(b),
            0x17 => p.request_problem_information = Some(bit),
            0x18 => p.will_delay_interval = Some(n),
            0x19 => p.request_response_information = Some(bit),
            0x1A => p.response_information = Some(s1),
            0x1C => p.server_reference = Some(s1),
            0x1F => p.reason_string = Some(s1),
            0x21 => p.receive_maximum = Some((n % 65_535 + 1) as u16),
            0x22 => p.topic_alias_maximum = Some(n as u16),
            0x23 => p.topic_alias = Some((n % 65_535 + 1) as u16),
            0x24 => p.maximum_qos = Some(bit),
            0x25 => p.retain_available = Some(bit),
            0x26 => p.user_properties.push((s1, s2)),
            0x27 => p.maximum_packet_size = Some(n.max(1)),
            0x28 => p.wildcard_subscription_available = Some(bit),
            0x29 => p.subscription_identifier_available = Some(bit),
            0x2A => p.shared_subscription_available = Some(bit),
            _ => {}
        }
    }
    if ctx == Ctx::Connect && p.authentication_data.is_some() && p.authentication_method.is_none() {
        p.authentication_method = Some("m".into());
    }
    p
}

fn arb_props(v5: bool, ctx: Ctx) -> BoxedStrategy<Properties> {
    if !v5 {
        return Just(Properties::default()).boxed();
    }
    prop::collection::vec(
        (
            0..IDS.len(),
            any::<u32>(),
            arb_string(),
            arb_string(),
            arb_bytes(),
            arb_topic(),
        ),
        0..6,
    )
    .prop_map(move |items| build_props(ctx, items))
    .boxed()
}

fn pick(codes: &'static [ReasonCode]) -> BoxedStrategy<ReasonCode> {
    prop::sample::select(codes).boxed()
}

use ReasonCode as R;
const CONNACK_V5: &[R] = &[
    R::Success,
    R::UnspecifiedError,
    R::MalformedPacket,
    R::ProtocolError,
    R::ImplementationSpecificError,
    R::UnsupportedProtocolVersion,
    R::ClientIdentifierNotValid,
    R::BadUserNameOrPassword,
    R::NotAuthorized,
    R::ServerUnavailable,
    R::ServerBusy,
    R::Banned,
    R::BadAuthenticationMethod,
    R::TopicNameInvalid,
    R::PacketTooLarge,
    R::QuotaExceeded,
    R::PayloadFormatInvalid,
    R::RetainNotSupported,
    R::QoSNotSupported,
    R::UseAnotherServer,
    R::ServerMoved,
    R::ConnectionRateExceeded,
];
const CONNACK_V3: &[R] = &[
    R::Success,
    R::UnsupportedProtocolVersion,
    R::ClientIdentifierNotValid,
    R::ServerUnavailable,
    R::BadUserNameOrPassword,
    R::NotAuthorized,
];
const PUBACK: &[R] = &[
    R::Success,
    R::NoMatchingSubscribers,
    R::UnspecifiedError,
    R::ImplementationSpecificError,
    R::NotAuthorized,
    R::TopicNameInvalid,
    R::PacketIdentifierInUse,
    R::QuotaExceeded,
    R::PayloadFormatInvalid,
];
const PUBREL: &[R] = &[R::Success, R::PacketIdentifierNotFound];
const SUBACK_V5: &[R] = &[
    R::Success,
    R::GrantedQoS1,
    R::GrantedQoS2,
    R::UnspecifiedError,
    R::ImplementationSpecificError,
    R::NotAuthorized,
    R::TopicFilterInvalid,
    R::PacketIdentifierInUse,
    R::QuotaExceeded,
    R::SharedSubscriptionsNotSupported,
    R::SubscriptionIdentifiersNotSupported,
    R::WildcardSubscriptionsNotSupported,
];
const SUBACK_V3: &[R] = &[
    R::Success,
    R::GrantedQoS1,
    R::GrantedQoS2,
    R::UnspecifiedError,
];
const UNSUBACK: &[R] = &[
    R::Success,
    R::NoSubscriptionExisted,
    R::UnspecifiedError,
    R::ImplementationSpecificError,
    R::NotAuthorized,
    R::TopicFilterInvalid,
    R::PacketIdentifierInUse,
];
const DISCONNECT: &[R] = &[
    R::Success,
    R::DisconnectWithWillMessage,
    R::UnspecifiedError,
    R::MalformedPacket,
    R::ProtocolError,
    R::ImplementationSpecificError,
    R::NotAuthorized,
    R::ServerBusy,
    R::ServerShuttingDown,
    R::KeepAliveTimeout,
    R::SessionTakenOver,
    R::TopicFilterInvalid,
    R::TopicNameInvalid,
    R::ReceiveMaximumExceeded,
    R::TopicAliasInvalid,
    R::PacketTooLarge,
    R::MessageRateTooHigh,
    R::QuotaExceeded,
    R::AdministrativeAction,
    R::PayloadFormatInvalid,
    R::RetainNotSupported,
    R::QoSNotSupported,
    R::UseAnotherServer,
    R::ServerMoved,
    R::SharedSubscriptionsNotSupported,
    R::ConnectionRateExceeded,
    R::MaximumConnectTime,
    R::SubscriptionIdentifiersNotSupported,
    R::WildcardSubscriptionsNotSupported,
];
const AUTH: &[R] = &[R::Success, R::ContinueAuthentication, R::ReAuthenticate];

fn arb_connect(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let will = (
        arb_topic(),
        arb_bytes(),
        arb_qos(),
        any::<bool>(),
        arb_props(v5, Ctx::Will),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        arb_string(),
        prop::option::of(will),
        prop::option::of(arb_string()),
        prop::option::of(arb_bytes()),
        arb_props(v5, Ctx::Connect),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                let mut c = Connect {
                    protocol: version,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                };
                if !v5 {
                    // 3.1.1 rules [MQTT-3.1.2-22] [MQTT-3.1.3-8].
                    if c.username.is_none() {
                        c.password = None;
                    }
                    if c.client_id.is_empty() {
                        c.clean_start = true;
                    }
                }
                Packet::Connect(Box::new(c))
            },
        )
        .boxed()
}

fn arb_ack(v5: bool, codes: &'static [ReasonCode], ctx: Ctx) -> BoxedStrategy<Ack> {
    let reason = if v5 {
        pick(codes)
    } else {
        Just(R::Success).boxed()
    };
    (arb_packet_id(), reason, arb_props(v5, ctx))
        .prop_map(|(packet_id, reason, properties)| Ack {
            packet_id,
            reason,
            properties,
        })
        .boxed()
}

/// Any valid packet for `version` that decodes back to itself.
fn arb_packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let connack = (
        any::<bool>(),
        pick(if v5 { CONNACK_V5 } else { CONNACK_V3 }),
        arb_props(v5, Ctx::ConnAck),
    )
        .prop_map(|(sp, reason, properties)| {
            Packet::ConnAck(ConnAck {
                session_present: sp && reason == R::Success,
                reason,
                properties,
            })
        })
        .boxed();
    let publish = (
        any::<bool>(),
        arb_qos(),
        any::<bool>(),
        arb_topic(),
        arb_packet_id(),
        arb_bytes(),
        arb_props(v5, Ctx::Publish),
        any::<bool>(),
    )
        .prop_map(
            move |(dup, qos, retain, topic, id, payload, properties, alias_only)| {
                let qos0 = qos == QoS::AtMostOnce;
                let topic = if v5 && alias_only && properties.topic_alias.is_some() {
                    String::new()
                } else {
                    topic
                };
                Packet::Publish(Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    packet_id: (!qos0).then_some(id),
                    payload,
                    properties,
                })
            },
        )
        .boxed();
    let options =
        (arb_qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(move |(qos, nl, rap, rh)| {
            if !v5 {
                return SubscriptionOptions::qos(qos);
            }
            SubscriptionOptions {
                qos,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: match rh {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendIfNew,
                    _ => RetainHandling::DoNotSend,
                },
            }
        });
    let subscribe = (
        arb_packet_id(),
        prop::collection::vec((arb_filter(v5), options), 1..4),
        arb_props(v5, Ctx::Subscribe),
    )
        .prop_map(|(packet_id, mut filters, properties)| {
            for (f, o) in &mut filters {
                if f.starts_with("$share/") {
                    o.no_local = false;
                }
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        })
        .boxed();
    let suback = (
        arb_packet_id(),
        prop::collection::vec(pick(if v5 { SUBACK_V5 } else { SUBACK_V3 }), 1..4),
        arb_props(v5, Ctx::SubAck),
    )
        .prop_map(|(packet_id, reasons, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties,
            })
        })
        .boxed();
    let unsubscribe = (
        arb_packet_id(),
        prop::collection::vec(arb_filter(v5), 1..4),
        arb_props(v5, Ctx::Unsubscribe),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        })
        .boxed();
    let unsuback = (
        arb_packet_id(),
        prop::collection::vec(pick(UNSUBACK), 1..4),
        arb_props(v5, Ctx::UnsubAck),
    )
        .prop_map(move |(packet_id, reasons, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reasons: if v5 { reasons } else { Vec::new() },
                properties,
            })
        })
        .boxed();
    let disconnect = (
        if v5 {
            pick(DISCONNECT)
        } else {
            Just(R::Success).boxed()
        },
        arb_props(v5, Ctx::Disconnect),
    )
        .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
        .boxed();
    let mut arms: Vec<BoxedStrategy<Packet>> = vec![
        arb_connect(version),
        connack,
        publish,
        arb_ack(v5, PUBACK, Ctx::PubAck)
            .prop_map(Packet::PubAck)
            .boxed(),
        // PUBREC shares PUBACK's reason codes; PUBREL/PUBCOMP share theirs.
        // All four allow the same properties.
        arb_ack(v5, PUBACK, Ctx::PubAck)
            .prop_map(Packet::PubRec)
            .boxed(),
        arb_ack(v5, PUBREL, Ctx::PubAck)
            .prop_map(Packet::PubRel)
            .boxed(),
        arb_ack(v5, PUBREL, Ctx::PubAck)
            .prop_map(Packet::PubComp)
            .boxed(),
        subscribe,
        suback,
        unsubscribe,
        unsuback,
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect,
    ];
    if v5 {
        arms.push(
            (pick(AUTH), arb_props(v5, Ctx::Auth))
                .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
                .boxed(),
        );
    }
    prop::strategy::Union::new(arms).boxed()
}

fn arb_version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![
        Just(ProtocolVersion::V31),
        Just(ProtocolVersion::V311),
        Just(ProtocolVersion::V5)
    ]
}

fn decoder_for(p: &Packet, version: ProtocolVersion) -> Decoder {
    let mut d = Decoder::new(MAX_PACKET_SIZE);
    if !matches!(p, Packet::Connect(_)) {
        d.set_version(version);
    }
    d
}

/// A CONNECT followed by other packets of the same version.
fn arb_session() -> impl Strategy<Value = (ProtocolVersion, Vec<Packet>)> {
    arb_version().prop_flat_map(|v| {
        (
            Just(v),
            arb_connect(v),
            prop::collection::vec(
                arb_packet(v).prop_filter("no connect", |p| !matches!(p, Packet::Connect(_))),
                0..8,
            ),
        )
            .prop_map(|(v, c, mut rest)| {
                rest.insert(0, c);
                (v, rest)
            })
    })
}

// ----- properties -----------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// decode(encode(p)) == p, and encoded_len == bytes written, for every
    /// packet type in every version.
    #[test]
    fn round_trip((version, packet) in arb_version().prop_flat_map(|v| (Just(v), arb_packet(v)))) {
        let mut out = BytesMut::new();
        encode(&packet, version, &mut out).unwrap();
        prop_assert_eq!(encoded_len(&packet, version).unwrap(), out.len());
        if let Packet::Publish(p) = &packet {
            prop_assert_eq!(publish_encoded_len(&p.borrowed(), version).unwrap(), out.len());
            // A borrowed PUBLISH encodes to the same bytes.
            let mut borrowed = BytesMut::new();
            encode_publish(&p.borrowed(), version, &mut borrowed).unwrap();
            prop_assert_eq!(&borrowed, &out);
            // Within a maximum it fits exactly: the same bytes, appended;
            // one byte short: nothing appended [MQTT-3.1.2-25].
            let mut within = BytesMut::from(&b"prefix"[..]);
            let len = out.len();
            prop_assert_eq!(encode_publish_within(&p.borrowed(), version, len, &mut within).unwrap(), Some(len));
            prop_assert_eq!(&within[6..], &out[..]);
            prop_assert_eq!(encode_publish_within(&p.borrowed(), version, len - 1, &mut within).unwrap(), None);
            prop_assert_eq!(within.len(), 6 + len);
            // A broker's per-delivery fields over a message's own properties
            // (other values there) encode to the same bytes.
            let mut base = p.properties.clone();
            base.message_expiry_interval = base.message_expiry_interval.map_or(Some(7), |_| None);
            base.subscription_identifiers = vec![9];
            base.topic_alias = Some(3);
            let per = PerDelivery {
                message_expiry_interval: p.properties.message_expiry_interval,
                subscription_identifiers: &p.properties.subscription_identifiers,
                topic_alias: p.properties.topic_alias,
            };
            let over = PublishRef { properties: &base, per_delivery: Some(per), ..p.borrowed() };
            let mut delivered = BytesMut::new();
            encode_publish(&over, version, &mut delivered).unwrap();
            prop_assert_eq!(&delivered, &out);
        }
        let mut d = decoder_for(&packet, version);
        let decoded = d.decode(&mut out).unwrap();
        prop_assert_eq!(decoded, Some(packet.clone()));
        prop_assert!(out.is_empty());
        if let Packet::Connect(c) = &packet {
            prop_assert_eq!(d.version(), Some(c.protocol));
        }
    }

    /// Appending to a non-empty buffer writes exactly encoded_len bytes.
    #[test]
    fn encode_appends((version, packet) in arb_version().prop_flat_map(|v| (Just(v), arb_packet(v)))) {
        let mut out = BytesMut::from(&b"prefix"[..]);
        encode(&packet, version, &mut out).unwrap();
        prop_assert_eq!(out.len(), 6 + encoded_len(&packet, version).unwrap());
        prop_assert_eq!(&out[..6], b"prefix");
    }

    /// A valid stream split at arbitrary points decodes to the same packets.
    #[test]
    fn split_stream_decodes_identically(
        (version, packets) in arb_session(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut wire = BytesMut::new();
        for p in &packets {
            encode(p, version, &mut wire).unwrap();
        }
        let wire = wire.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut d = Decoder::new(MAX_PACKET_SIZE);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&wire[at..p]);
            at = p;
            while let Some(packet) = d.decode(&mut buf).unwrap() {
                got.push(packet);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, packets);
    }

    /// Arbitrary bytes never make the decoder panic, and a `None` never
    /// consumes input.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        version in prop::option::of(arb_version()),
        max in prop_oneof![Just(MAX_PACKET_SIZE), 0u32..300],
    ) {
        let mut d = Decoder::new(max);
        if let Some(v) = version {
            d.set_version(v);
        }
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match d.decode(&mut buf) {
                Ok(Some(_)) => prop_assert!(buf.len() < before),
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before);
                    break;
                }
                Err(e) => {
                    let _ = e.reason_code();
                    let _ = e.to_string();
                    break;
                }
            }
        }
    }

    /// Mutating one byte of a valid packet never panics, and whatever still
    /// decodes re-encodes (the decoder only accepts what the encoder can write).
    #[test]
    fn mutated_packets_never_panic(
        (version, packet) in arb_version().prop_flat_map(|v| (Just(v), arb_packet(v))),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut out = BytesMut::new();
        encode(&packet, version, &mut out).unwrap();
        let i = at.index(out.len());
        out[i] = byte;
        let mut d = decoder_for(&packet, version);
        if let Ok(Some(p)) = d.decode(&mut out) {
            let v = d.version().unwrap_or(version);
            let mut again = BytesMut::new();
            prop_assert!(encode(&p, v, &mut again).is_ok(), "{:?}", p);
        }
    }
}
