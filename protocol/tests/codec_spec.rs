//! Codec tests named after the spec statement they prove. Statement numbers
//! are MQTT 5.0 unless marked "(3.1.1)"; where both versions state the same
//! rule under different numbers, both are given.

use bytes::{Bytes, BytesMut};
use lodestream_mqtt::codec::{
    reason_allowed_in, v3_connack_code, v3_connack_reason, v3_suback_code, MAX_PACKET_SIZE,
};
use lodestream_mqtt::*;

const V31: Option<ProtocolVersion> = Some(ProtocolVersion::V31);
const V3: Option<ProtocolVersion> = Some(ProtocolVersion::V311);
const V5: Option<ProtocolVersion> = Some(ProtocolVersion::V5);

// ----- helpers --------------------------------------------------------------

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// Whole packet from first byte and body.
fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// Length-prefixed string/binary.
fn s(x: impl AsRef<[u8]>) -> Vec<u8> {
    let x = x.as_ref();
    let mut out = (x.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(x);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A CONNECT body: name, level, flags, keep alive 60, [properties], payload.
fn connect_body(name: &str, level: u8, flags: u8, props: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    let mut b = s(name);
    b.push(level);
    b.push(flags);
    b.extend([0, 60]);
    if let Some(p) = props {
        b.extend(varint(p.len()));
        b.extend_from_slice(p);
    }
    b.extend_from_slice(payload);
    b
}

fn decoder(v: Option<ProtocolVersion>) -> Decoder {
    let mut d = Decoder::new(MAX_PACKET_SIZE);
    if let Some(v) = v {
        d.set_version(v);
    }
    d
}

fn dec(v: Option<ProtocolVersion>, bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decoder(v).decode(&mut buf)
}

#[track_caller]
fn dec_ok(v: Option<ProtocolVersion>, bytes: &[u8]) -> Packet {
    let mut buf = BytesMut::from(bytes);
    let p = decoder(v)
        .decode(&mut buf)
        .expect("decode error")
        .expect("incomplete");
    assert!(buf.is_empty(), "packet not fully consumed");
    p
}

#[track_caller]
fn dec_err(v: Option<ProtocolVersion>, bytes: &[u8]) -> DecodeError {
    dec(v, bytes).expect_err("expected a decode error")
}

#[track_caller]
fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).expect("encode error");
    assert_eq!(encoded_len(p, v).unwrap(), out.len());
    out.to_vec()
}

#[track_caller]
fn enc_err(p: &Packet, v: ProtocolVersion) -> EncodeError {
    let mut out = BytesMut::from(&b"xx"[..]);
    let e = encode(p, v, &mut out).expect_err("expected an encode error");
    assert_eq!(&out[..], b"xx", "nothing appended on error");
    assert_eq!(encoded_len(p, v), Err(e.clone()));
    e
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        payload: Bytes::from_static(b"hi"),
        properties: Properties::default(),
    }
}

fn connect(protocol: ProtocolVersion) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: "c".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

// ----- golden vectors -------------------------------------------------------

#[track_caller]
fn golden(v: ProtocolVersion, bytes: &[u8], packet: Packet) {
    let dv = if matches!(packet, Packet::Connect(_)) {
        None
    } else {
        Some(v)
    };
    assert_eq!(dec_ok(dv, bytes), packet, "decode");
    assert_eq!(enc(&packet, v), bytes, "encode");
}

/// 3.1.1 section 3.1.2.10 example flags 0xCE: user name, password, will QoS 1,
/// will flag, clean session; keep alive 10.
#[test]
fn golden_connect_v311() {
    let bytes = [
        0x10, 0x23, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xCE, 0x00, 0x0A, 0x00, 0x03, b'a',
        b'b', b'c', 0x00, 0x03, b'w', b'/', b't', 0x00, 0x03, b'b', b'y', b'e', 0x00, 0x04, b'u',
        b's', b'e', b'r', 0x00, 0x02, b'p', b'w',
    ];
    let c = Connect {
        protocol: ProtocolVersion::V311,
        clean_start: true,
        keep_alive: 10,
        client_id: "abc".into(),
        will: Some(LastWill {
            topic: "w/t".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"pw")),
        properties: Properties::default(),
    };
    golden(ProtocolVersion::V311, &bytes, Packet::Connect(Box::new(c)));
}

/// MQTT 5 section 3.1.2.11 example variable header: properties = Session
/// Expiry Interval 10.
#[test]
fn golden_connect_v5() {
    let bytes = [
        0x10, 0x12, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x0A, 0x05, 0x11, 0x00,
        0x00, 0x00, 0x0A, 0x00, 0x00,
    ];
    let c = Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 10,
        client_id: String::new(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: Some(10),
            ..Properties::default()
        },
    };
    golden(ProtocolVersion::V5, &bytes, Packet::Connect(Box::new(c)));
}

#[test]
fn golden_connect_v31_mqisdp() {
    let bytes = pkt(0x10, &connect_body("MQIsdp", 3, 0x02, None, &s("c")));
    let p = dec_ok(None, &bytes);
    assert_eq!(p, Packet::Connect(Box::new(connect(ProtocolVersion::V31))));
    assert_eq!(enc(&p, ProtocolVersion::V31), bytes);
}

/// 3.1.1 section 3.3.2.3 example: topic "a/b", packet identifier 10.
#[test]
fn golden_publish() {
    let p = Packet::Publish(publish("a/b", QoS::AtLeastOnce, Some(10)));
    golden(
        ProtocolVersion::V311,
        &[
            0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i',
        ],
        p.clone(),
    );
    golden(
        ProtocolVersion::V5,
        &[
            0x32, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, 0x00, b'h', b'i',
        ],
        p,
    );
}

/// 3.1.1 section 3.8.3 example: "a/b" QoS 1, "c/d" QoS 2.
#[test]
fn golden_subscribe_v311() {
    let bytes = [
        0x82, 0x0E, 0x00, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x00, 0x03, b'c', b'/', b'd',
        0x02,
    ];
    let p = Packet::Subscribe(Subscribe {
        packet_id: 10,
        filters: vec![
            ("a/b".into(), SubscriptionOptions::qos(QoS::AtLeastOnce)),
            ("c/d".into(), SubscriptionOptions::qos(QoS::ExactlyOnce)),
        ],
        properties: Properties::default(),
    });
    golden(ProtocolVersion::V311, &bytes, p);
}

/// 3.1.1 section 3.9.3 example: granted QoS 0, granted QoS 2, failure.
#[test]
fn golden_suback_v311() {
    let p = Packet::SubAck(SubAck {
        packet_id: 10,
        reasons: vec![
            ReasonCode::Success,
            ReasonCode::GrantedQoS2,
            ReasonCode::UnspecifiedError,
        ],
        properties: Properties::default(),
    });
    golden(
        ProtocolVersion::V311,
        &[0x90, 0x05, 0x00, 0x0A, 0x00, 0x02, 0x80],
        p,
    );
}

#[test]
fn golden_small_packets() {
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        golden(v, &[0xC0, 0x00], Packet::PingReq);
        golden(v, &[0xD0, 0x00], Packet::PingResp);
        golden(
            v,
            &[0xE0, 0x00],
            Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
        );
        golden(v, &[0x40, 0x02, 0x00, 0x01], Packet::PubAck(Ack::new(1)));
        golden(v, &[0x50, 0x02, 0x00, 0x01], Packet::PubRec(Ack::new(1)));
        golden(v, &[0x62, 0x02, 0x00, 0x05], Packet::PubRel(Ack::new(5)));
        golden(v, &[0x70, 0x02, 0x00, 0x01], Packet::PubComp(Ack::new(1)));
    }
    let unsub = Packet::Unsubscribe(Unsubscribe {
        packet_id: 1,
        filters: vec!["a/b".into()],
        properties: Properties::default(),
    });
    golden(
        ProtocolVersion::V311,
        &[0xA2, 0x07, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b'],
        unsub.clone(),
    );
    golden(
        ProtocolVersion::V5,
        &[0xA2, 0x08, 0x00, 0x01, 0x00, 0x00, 0x03, b'a', b'/', b'b'],
        unsub,
    );
    golden(
        ProtocolVersion::V311,
        &[0xB0, 0x02, 0x00, 0x01],
        Packet::UnsubAck(UnsubAck {
            packet_id: 1,
            reasons: vec![],
            properties: Properties::default(),
        }),
    );
    golden(
        ProtocolVersion::V5,
        &[0xB0, 0x04, 0x00, 0x01, 0x00, 0x11],
        Packet::UnsubAck(UnsubAck {
            packet_id: 1,
            reasons: vec![ReasonCode::NoSubscriptionExisted],
            properties: Properties::default(),
        }),
    );
    golden(
        ProtocolVersion::V311,
        &[0x20, 0x02, 0x01, 0x00],
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason: ReasonCode::Success,
            properties: Properties::default(),
        }),
    );
}

// ----- fixed header ---------------------------------------------------------

/// [MQTT-3.1.0-1]
#[test]
fn mqtt_3_1_0_1_first_packet_must_be_connect() {
    for first in [0x20u8, 0x30, 0x40, 0x82, 0xC0, 0xE0, 0xF0] {
        assert_eq!(
            dec_err(None, &[first, 0x00]),
            DecodeError::FirstPacketNotConnect
        );
    }
    assert_eq!(
        DecodeError::FirstPacketNotConnect.reason_code(),
        ReasonCode::ProtocolError
    );
}

/// [MQTT-3.1.0-2]
#[test]
fn mqtt_3_1_0_2_second_connect_is_a_protocol_error() {
    let bytes = pkt(0x10, &connect_body("MQTT", 4, 0x02, None, &s("c")));
    let mut buf = BytesMut::from(&bytes[..]);
    buf.extend_from_slice(&bytes);
    let mut d = Decoder::new(1024);
    assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Connect(_)))));
    assert_eq!(d.version(), Some(ProtocolVersion::V311));
    assert_eq!(d.decode(&mut buf), Err(DecodeError::SecondConnect));
    assert_eq!(
        DecodeError::SecondConnect.reason_code(),
        ReasonCode::ProtocolError
    );
}

/// [MQTT-2.1.3-1] / [MQTT-2.2.2-1] [MQTT-2.2.2-2] (3.1.1): reserved flag bits
/// must have the listed values, anything else is malformed.
#[test]
fn mqtt_2_1_3_1_reserved_fixed_header_flags() {
    // Types whose flags must be 0000.
    for t in [2u8, 4, 5, 7, 9, 11, 12, 13, 14, 15] {
        for flags in 1..16u8 {
            let e = dec_err(V5, &[(t << 4) | flags, 0x00]);
            assert_eq!(
                e,
                DecodeError::InvalidReservedFlags {
                    packet_type: t,
                    flags
                }
            );
            assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
        }
    }
    // CONNECT flags 0000 too (checked before the first-packet rule allows it).
    assert_eq!(
        dec_err(None, &[0x11, 0x00]),
        DecodeError::InvalidReservedFlags {
            packet_type: 1,
            flags: 1
        }
    );
    assert_eq!(
        dec_err(V5, &[0x00, 0x00]),
        DecodeError::InvalidPacketType(0)
    );
}

/// [MQTT-3.6.1-1]
#[test]
fn mqtt_3_6_1_1_pubrel_flags_must_be_0010() {
    for flags in [0u8, 1, 3, 4, 8, 15] {
        assert_eq!(
            dec_err(V3, &[0x60 | flags, 0x02, 0x00, 0x01]),
            DecodeError::InvalidReservedFlags {
                packet_type: 6,
                flags
            }
        );
    }
    assert_eq!(
        dec_ok(V3, &[0x62, 0x02, 0x00, 0x01]),
        Packet::PubRel(Ack::new(1))
    );
}

/// [MQTT-3.8.1-1]
#[test]
fn mqtt_3_8_1_1_subscribe_flags_must_be_0010() {
    let body = cat(&[&[0, 1], &s("a"), &[0]]);
    assert!(dec(V3, &pkt(0x82, &body)).is_ok());
    for flags in [0u8, 1, 3, 8] {
        assert_eq!(
            dec_err(V3, &pkt(0x80 | flags, &body)),
            DecodeError::InvalidReservedFlags {
                packet_type: 8,
                flags
            }
        );
    }
}

/// [MQTT-3.10.1-1]
#[test]
fn mqtt_3_10_1_1_unsubscribe_flags_must_be_0010() {
    let body = cat(&[&[0, 1], &s("a")]);
    assert!(dec(V3, &pkt(0xA2, &body)).is_ok());
    assert_eq!(
        dec_err(V3, &pkt(0xA0, &body)),
        DecodeError::InvalidReservedFlags {
            packet_type: 10,
            flags: 0
        }
    );
}

/// [MQTT-3.14.1-1]
#[test]
fn mqtt_3_14_1_1_disconnect_reserved_bits() {
    assert_eq!(
        dec_err(V5, &[0xE1, 0x00]).reason_code(),
        ReasonCode::MalformedPacket
    );
}

/// [MQTT-3.15.1-1]
#[test]
fn mqtt_3_15_1_1_auth_reserved_bits() {
    assert!(matches!(
        dec_err(V5, &[0xF2, 0x00]),
        DecodeError::InvalidReservedFlags {
            packet_type: 15,
            ..
        }
    ));
}

/// AUTH (type 15) is reserved, so invalid, before MQTT 5.
#[test]
fn auth_is_not_a_v311_packet() {
    assert_eq!(
        dec_err(V3, &[0xF0, 0x00]),
        DecodeError::InvalidPacketType(15)
    );
    let a = Packet::Auth(Auth {
        reason: ReasonCode::Success,
        properties: Properties::default(),
    });
    assert!(matches!(
        enc_err(&a, ProtocolVersion::V311),
        EncodeError::NotSupportedInVersion { .. }
    ));
}

/// [MQTT-3.3.1-4]
#[test]
fn mqtt_3_3_1_4_publish_qos_3_is_malformed() {
    let body = cat(&[&s("a"), &[0, 1]]);
    let e = dec_err(V3, &pkt(0x36, &body));
    assert_eq!(e, DecodeError::InvalidQoS(3));
    assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
}

/// [MQTT-3.3.1-2]
#[test]
fn mqtt_3_3_1_2_dup_must_be_zero_for_qos0() {
    let e = dec_err(V3, &pkt(0x38, &s("a")));
    assert_eq!(e, DecodeError::DupWithQoS0);
    assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
    let mut p = publish("a", QoS::AtMostOnce, None);
    p.dup = true;
    assert_eq!(
        enc_err(&Packet::Publish(p), ProtocolVersion::V5),
        EncodeError::DupWithQoS0
    );
    // DUP with QoS 1 is fine.
    let p = dec_ok(V3, &pkt(0x3A, &cat(&[&s("a"), &[0, 7]])));
    assert!(matches!(p, Packet::Publish(Publish { dup: true, .. })));
}

/// Remaining length: at most 4 bytes (spec 2.1.4 / 1.5.5).
#[test]
fn remaining_length_at_most_four_bytes() {
    assert_eq!(
        dec_err(V3, &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
        DecodeError::MalformedRemainingLength
    );
    // A continuation bit on the 4th byte is an error even before a 5th byte arrives.
    assert_eq!(
        dec_err(V3, &[0x30, 0x80, 0x80, 0x80, 0x80]),
        DecodeError::MalformedRemainingLength
    );
    // Incomplete remaining length: wait.
    assert_eq!(dec(V3, &[0x30, 0x80, 0x80]), Ok(None));
}

/// Remaining length boundary values from spec 1.5.5 table 1-1 (3.1.1 table 2.4).
#[test]
fn remaining_length_boundaries() {
    let cases: &[(&[u8], u32)] = &[
        (&[0x00], 0),
        (&[0x7F], 127),
        (&[0x80, 0x01], 128),
        (&[0xFF, 0x7F], 16_383),
        (&[0x80, 0x80, 0x01], 16_384),
        (&[0xFF, 0xFF, 0x7F], 2_097_151),
        (&[0x80, 0x80, 0x80, 0x01], 2_097_152),
        (&[0xFF, 0xFF, 0xFF, 0x7F], 268_435_455),
    ];
    for (enc_len, value) in cases {
        let mut bytes = vec![0x30];
        bytes.extend_from_slice(enc_len);
        let size = 1 + enc_len.len() as u32 + value;
        // A limit one below the size reports the exact size, proving the decode.
        let mut d = Decoder::new(size - 1);
        d.set_version(ProtocolVersion::V311);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(DecodeError::PacketTooLarge {
                size,
                max: size - 1
            })
        );
    }
}

/// [MQTT-1.5.5-1]
#[test]
fn mqtt_1_5_5_1_variable_byte_integer_minimal_encoding() {
    // 0 encoded in two bytes.
    assert_eq!(
        dec_err(V3, &[0xC0, 0x80, 0x00]),
        DecodeError::MalformedRemainingLength
    );
    // Property length 0 encoded in two bytes.
    assert_eq!(
        dec_err(V5, &pkt(0x40, &[0x00, 0x01, 0x00, 0x80, 0x00])),
        DecodeError::MalformedVariableByteInteger
    );
}

/// [MQTT-3.2.2-15] / maximum packet size: rejected from the fixed header alone.
#[test]
fn packet_too_large_is_rejected_before_the_body_arrives() {
    let mut d = Decoder::new(100);
    d.set_version(ProtocolVersion::V5);
    // Remaining length 128 -> 131 bytes total, no body present.
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x01][..]);
    let e = d.decode(&mut buf).unwrap_err();
    assert_eq!(
        e,
        DecodeError::PacketTooLarge {
            size: 131,
            max: 100
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::PacketTooLarge);
    // Exactly at the limit is fine.
    d.set_max_packet_size(131);
    let mut body = cat(&[&s("a"), &[0]]);
    body.resize(128, b'x');
    let mut buf = BytesMut::from(&pkt(0x30, &body)[..]);
    assert_eq!(buf.len(), 131);
    assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Publish(_)))));
}

#[test]
fn incomplete_input_consumes_nothing() {
    let bytes = pkt(0x32, &cat(&[&s("a/b"), &[0, 1], b"payload"]));
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(decoder(V3).decode(&mut buf), Ok(None), "cut {cut}");
        assert_eq!(buf.len(), cut);
    }
}

#[test]
fn publish_payload_is_zero_copy() {
    let bytes = pkt(0x30, &cat(&[&s("a"), b"0123456789"]));
    let mut buf = BytesMut::from(&bytes[..]);
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let Ok(Some(Packet::Publish(p))) = decoder(V3).decode(&mut buf) else {
        panic!("expected publish");
    };
    assert_eq!(&p.payload[..], b"0123456789");
    let at = p.payload.as_ptr() as usize;
    assert!(
        at >= start && at < end,
        "payload points into the input buffer"
    );
}

#[test]
fn trailing_bytes_and_truncation_are_malformed() {
    assert_eq!(dec_err(V3, &[0xC0, 0x01, 0x00]), DecodeError::TrailingBytes);
    assert_eq!(
        dec_err(V3, &[0x40, 0x03, 0x00, 0x01, 0x00]),
        DecodeError::TrailingBytes
    );
    assert_eq!(dec_err(V3, &[0x40, 0x01, 0x00]), DecodeError::UnexpectedEof);
    // String length pointing past the end of the packet.
    assert_eq!(
        dec_err(V3, &pkt(0x30, &[0x00, 0x05, b'a'])),
        DecodeError::UnexpectedEof
    );
    assert_eq!(
        DecodeError::UnexpectedEof.reason_code(),
        ReasonCode::MalformedPacket
    );
}

// ----- UTF-8 ----------------------------------------------------------------

/// [MQTT-1.5.4-1] / [MQTT-1.5.3-1] (3.1.1): ill-formed UTF-8, including
/// encoded surrogates and overlong forms.
#[test]
fn mqtt_1_5_4_1_ill_formed_utf8_is_malformed() {
    for bad in [
        &[0xED, 0xA0, 0x80][..], // U+D800
        &[0xED, 0xBF, 0xBF][..], // U+DFFF
        &[0xC0, 0x80][..],       // overlong U+0000
        &[0xE0, 0x80, 0xAF][..], // overlong '/'
        &[0xFF][..],
        &[b'a', 0x80][..],
        &[0xF4, 0x90, 0x80, 0x80][..], // > U+10FFFF
    ] {
        let e = dec_err(V3, &pkt(0x30, &s(bad)));
        assert_eq!(e, DecodeError::InvalidUtf8, "{bad:x?}");
        assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
    }
}

/// [MQTT-1.5.4-2] / [MQTT-1.5.3-2] (3.1.1)
#[test]
fn mqtt_1_5_4_2_null_character_is_malformed() {
    let e = dec_err(V3, &pkt(0x30, &s(b"a\0b")));
    assert_eq!(e, DecodeError::ForbiddenUtf8Char(0));
    assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
    // In any string, e.g. a client identifier.
    let bytes = pkt(0x10, &connect_body("MQTT", 4, 0x02, None, &s(b"c\0")));
    assert_eq!(dec_err(None, &bytes), DecodeError::ForbiddenUtf8Char(0));
    // The encoder refuses to write one.
    let mut c = connect(ProtocolVersion::V311);
    c.client_id = "c\0".into();
    assert_eq!(
        enc_err(&Packet::Connect(Box::new(c)), ProtocolVersion::V311),
        EncodeError::NullCharacter
    );
}

/// [MQTT-1.5.4-3] / [MQTT-1.5.3-3] (3.1.1): a BOM is kept, not stripped.
#[test]
fn mqtt_1_5_4_3_bom_is_not_stripped() {
    let p = dec_ok(V3, &pkt(0x30, &s("\u{FEFF}a")));
    let Packet::Publish(p) = p else { panic!() };
    assert_eq!(p.topic, "\u{FEFF}a");
}

// ----- CONNECT --------------------------------------------------------------

/// [MQTT-3.1.2-1]
#[test]
fn mqtt_3_1_2_1_protocol_name() {
    let e = dec_err(
        None,
        &pkt(0x10, &connect_body("MQTX", 4, 0x02, None, &s("c"))),
    );
    assert_eq!(e, DecodeError::InvalidProtocolName);
    assert_eq!(e.reason_code(), ReasonCode::UnsupportedProtocolVersion);
    // "MQIsdp" only for level 3, "MQTT" only for 4 and 5.
    assert_eq!(
        dec_err(
            None,
            &pkt(0x10, &connect_body("MQIsdp", 4, 0x02, None, &s("c")))
        ),
        DecodeError::UnsupportedProtocolVersion(4)
    );
    assert_eq!(
        dec_err(
            None,
            &pkt(0x10, &connect_body("MQTT", 3, 0x02, None, &s("c")))
        ),
        DecodeError::UnsupportedProtocolVersion(3)
    );
}

/// [MQTT-3.1.2-2]: unsupported level -> CONNACK 0x84 (v5) / return code 1 (3.1.1).
#[test]
fn mqtt_3_1_2_2_unsupported_protocol_level() {
    let e = dec_err(
        None,
        &pkt(0x10, &connect_body("MQTT", 6, 0x02, None, &s("c"))),
    );
    assert_eq!(e, DecodeError::UnsupportedProtocolVersion(6));
    assert_eq!(e.reason_code(), ReasonCode::UnsupportedProtocolVersion);
    assert_eq!(v3_connack_code(e.reason_code()), 1);
}

/// [MQTT-3.1.2-3]
#[test]
fn mqtt_3_1_2_3_connect_reserved_flag_must_be_zero() {
    for (v, props) in [(4u8, None), (5, Some(&[][..]))] {
        let e = dec_err(
            None,
            &pkt(0x10, &connect_body("MQTT", v, 0x03, props, &s("c"))),
        );
        assert_eq!(e, DecodeError::InvalidConnectFlags);
        assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
    }
}

/// The version is known once the protocol level was read, so a broken
/// CONNECT can still be answered in the client's format.
#[test]
fn version_is_set_even_if_connect_fails_later() {
    let mut d = Decoder::new(1024);
    let mut buf =
        BytesMut::from(&pkt(0x10, &connect_body("MQTT", 5, 0x03, Some(&[]), &s("c")))[..]);
    assert!(d.decode(&mut buf).is_err());
    assert_eq!(d.version(), Some(ProtocolVersion::V5));
}

/// [MQTT-3.1.2-11] [MQTT-3.1.2-13] [MQTT-3.1.2-15]: with Will Flag 0, Will
/// QoS and Will Retain must be 0.
#[test]
fn mqtt_3_1_2_11_will_qos_and_retain_zero_without_will_flag() {
    for flags in [0x02 | 0x08, 0x02 | 0x10, 0x02 | 0x20] {
        for (v, props) in [(4u8, None), (5, Some(&[][..]))] {
            let e = dec_err(
                None,
                &pkt(0x10, &connect_body("MQTT", v, flags, props, &s("c"))),
            );
            assert_eq!(e, DecodeError::InvalidWillFlags);
            assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
        }
    }
}

/// [MQTT-3.1.2-12] (v5) / [MQTT-3.1.2-14] (3.1.1): Will QoS 3 is malformed.
#[test]
fn mqtt_3_1_2_14_will_qos_3_is_malformed() {
    let payload = cat(&[&s("c"), &s("w"), &s("x")]);
    let e = dec_err(
        None,
        &pkt(
            0x10,
            &connect_body("MQTT", 4, 0x02 | 0x04 | 0x18, None, &payload),
        ),
    );
    assert_eq!(e, DecodeError::InvalidQoS(3));
}

/// [MQTT-3.1.2-9] / [MQTT-3.1.3-9]: will topic and message present and
/// valid when the Will Flag is 1; will topics are topic names.
#[test]
fn mqtt_3_1_2_9_will_topic_and_message_present() {
    let e = dec_err(
        None,
        &pkt(0x10, &connect_body("MQTT", 4, 0x06, None, &s("c"))),
    );
    assert_eq!(e, DecodeError::UnexpectedEof);
    let payload = cat(&[&s("c"), &s("w/#"), &s("x")]);
    let e = dec_err(
        None,
        &pkt(0x10, &connect_body("MQTT", 4, 0x06, None, &payload)),
    );
    assert_eq!(
        e,
        DecodeError::InvalidTopicName(TopicError::WildcardInTopicName)
    );
    // v5: will properties come first.
    let payload = cat(&[&s("c"), &[0x05, 0x18, 0, 0, 0, 9], &s("w"), &s("x")]);
    let Packet::Connect(c) = dec_ok(
        None,
        &pkt(
            0x10,
            &connect_body("MQTT", 5, 0x06 | 0x20, Some(&[]), &payload),
        ),
    ) else {
        panic!()
    };
    let w = c.will.unwrap();
    assert_eq!(w.properties.will_delay_interval, Some(9));
    assert!(w.retain);
    assert_eq!(w.topic, "w");
}

/// [MQTT-3.1.2-22] (3.1.1): password flag without user name flag is
/// malformed in 3.1.1; MQTT 5 allows it (3.1.2.9).
#[test]
fn mqtt_3_1_2_22_password_without_username_v311_only() {
    let payload = cat(&[&s("c"), &s("pw")]);
    for (name, level) in [("MQTT", 4u8), ("MQIsdp", 3)] {
        let e = dec_err(
            None,
            &pkt(0x10, &connect_body(name, level, 0x42, None, &payload)),
        );
        assert_eq!(e, DecodeError::PasswordWithoutUsername);
    }
    let Packet::Connect(c) = dec_ok(
        None,
        &pkt(0x10, &connect_body("MQTT", 5, 0x42, Some(&[]), &payload)),
    ) else {
        panic!()
    };
    assert_eq!(c.username, None);
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));

    let mut c = connect(ProtocolVersion::V311);
    c.password = Some(Bytes::from_static(b"pw"));
    assert_eq!(
        enc_err(&Packet::Connect(Box::new(c)), ProtocolVersion::V311),
        EncodeError::PasswordWithoutUsername
    );
}

/// [MQTT-3.1.2-18..21] / [MQTT-3.1.3-1]: fields present exactly per flags, in order.
#[test]
fn mqtt_3_1_3_1_payload_fields_follow_flags() {
    // User name flag set, but no user name.
    let e = dec_err(
        None,
        &pkt(0x10, &connect_body("MQTT", 4, 0x82, None, &s("c"))),
    );
    assert_eq!(e, DecodeError::UnexpectedEof);
    // Extra field without flag.
    let e = dec_err(
        None,
        &pkt(
            0x10,
            &connect_body("MQTT", 4, 0x02, None, &cat(&[&s("c"), &s("u")])),
        ),
    );
    assert_eq!(e, DecodeError::TrailingBytes);
}

/// [MQTT-3.1.3-6]: a zero-length client id is allowed...
/// [MQTT-3.1.3-8] (3.1.1): ...but not with Clean Session 0: return code 2.
#[test]
fn mqtt_3_1_3_8_empty_client_id_requires_clean_session_v311() {
    assert!(dec(
        None,
        &pkt(0x10, &connect_body("MQTT", 4, 0x02, None, &s("")))
    )
    .is_ok());
    let e = dec_err(
        None,
        &pkt(0x10, &connect_body("MQTT", 4, 0x00, None, &s(""))),
    );
    assert_eq!(e, DecodeError::EmptyClientIdWithoutCleanSession);
    assert_eq!(e.reason_code(), ReasonCode::ClientIdentifierNotValid);
    assert_eq!(v3_connack_code(e.reason_code()), 2);
    // MQTT 5 leaves this to the server (it assigns an identifier).
    assert!(dec(
        None,
        &pkt(0x10, &connect_body("MQTT", 5, 0x00, Some(&[]), &s("")))
    )
    .is_ok());
}

// ----- CONNACK --------------------------------------------------------------

/// [MQTT-3.2.2-1]
#[test]
fn mqtt_3_2_2_1_connack_reserved_flags() {
    assert_eq!(
        dec_err(V3, &[0x20, 0x02, 0x02, 0x00]),
        DecodeError::InvalidConnAckFlags
    );
}

/// [MQTT-3.2.2-6] / [MQTT-3.2.2-4] (3.1.1)
#[test]
fn mqtt_3_2_2_6_session_present_zero_with_error_code() {
    assert_eq!(
        dec_err(V3, &[0x20, 0x02, 0x01, 0x05]),
        DecodeError::SessionPresentWithError
    );
    assert_eq!(
        dec_err(V5, &[0x20, 0x03, 0x01, 0x87, 0x00]),
        DecodeError::SessionPresentWithError
    );
    let c = Packet::ConnAck(ConnAck {
        session_present: true,
        reason: ReasonCode::NotAuthorized,
        properties: Properties::default(),
    });
    assert_eq!(
        enc_err(&c, ProtocolVersion::V5),
        EncodeError::SessionPresentWithError
    );
}

/// [MQTT-3.2.2-8] / 3.1.1 table 3.1: return codes.
#[test]
fn mqtt_3_2_2_8_connack_codes() {
    let table = [
        (ReasonCode::Success, 0u8),
        (ReasonCode::UnsupportedProtocolVersion, 1),
        (ReasonCode::ClientIdentifierNotValid, 2),
        (ReasonCode::ServerUnavailable, 3),
        (ReasonCode::BadUserNameOrPassword, 4),
        (ReasonCode::NotAuthorized, 5),
    ];
    for (reason, code) in table {
        assert_eq!(v3_connack_code(reason), code);
        assert_eq!(v3_connack_reason(code), Some(reason));
        let p = Packet::ConnAck(ConnAck {
            session_present: false,
            reason,
            properties: Properties::default(),
        });
        golden(ProtocolVersion::V311, &[0x20, 0x02, 0x00, code], p);
    }
    // Other v5 reasons map to the closest 3.1.1 code.
    assert_eq!(v3_connack_code(ReasonCode::ServerBusy), 3);
    assert_eq!(v3_connack_code(ReasonCode::Banned), 5);
    assert_eq!(v3_connack_code(ReasonCode::BadAuthenticationMethod), 4);
    assert_eq!(v3_connack_code(ReasonCode::MalformedPacket), 3);
    // 6..255 are reserved.
    assert_eq!(
        dec_err(V3, &[0x20, 0x02, 0x00, 0x06]),
        DecodeError::InvalidReasonCode {
            packet: "connack",
            code: 6
        }
    );
    // v5: codes outside table 3-1 are malformed; the encoder refuses them.
    assert!(matches!(
        dec_err(V5, &[0x20, 0x03, 0x00, 0x10, 0x00]),
        DecodeError::InvalidReasonCode { .. }
    ));
    let bad = Packet::ConnAck(ConnAck {
        session_present: false,
        reason: ReasonCode::GrantedQoS1,
        properties: Properties::default(),
    });
    assert!(matches!(
        enc_err(&bad, ProtocolVersion::V311),
        EncodeError::InvalidReasonCode { .. }
    ));
}

/// [MQTT-2.2.2-1]: no properties is a property length of zero.
#[test]
fn mqtt_2_2_2_1_empty_properties_are_a_zero_length() {
    let p = Packet::ConnAck(ConnAck {
        session_present: false,
        reason: ReasonCode::Success,
        properties: Properties::default(),
    });
    assert_eq!(enc(&p, ProtocolVersion::V5), [0x20, 0x03, 0x00, 0x00, 0x00]);
    // Missing property length in a v5 CONNACK is malformed.
    assert_eq!(
        dec_err(V5, &[0x20, 0x02, 0x00, 0x00]),
        DecodeError::UnexpectedEof
    );
}

// ----- PUBLISH --------------------------------------------------------------

/// [MQTT-3.3.2-2] / [MQTT-4.7.0-1]
#[test]
fn mqtt_3_3_2_2_topic_name_without_wildcards() {
    for t in ["a/+", "#", "a/b#"] {
        let e = dec_err(V3, &pkt(0x30, &s(t)));
        assert_eq!(
            e,
            DecodeError::InvalidTopicName(TopicError::WildcardInTopicName)
        );
        assert_eq!(e.reason_code(), ReasonCode::TopicNameInvalid);
        assert_eq!(
            enc_err(
                &Packet::Publish(publish(t, QoS::AtMostOnce, None)),
                ProtocolVersion::V5
            ),
            EncodeError::InvalidTopicName(TopicError::WildcardInTopicName)
        );
    }
}

/// [MQTT-4.7.3-1]: empty topic name is invalid, except MQTT 5 with a Topic Alias.
#[test]
fn mqtt_4_7_3_1_empty_topic_name_only_with_alias() {
    assert_eq!(
        dec_err(V3, &pkt(0x30, &s(""))),
        DecodeError::InvalidTopicName(TopicError::Empty)
    );
    assert_eq!(
        dec_err(V5, &pkt(0x30, &cat(&[&s(""), &[0]]))),
        DecodeError::InvalidTopicName(TopicError::Empty)
    );
    let p = dec_ok(V5, &pkt(0x30, &cat(&[&s(""), &[3, 0x23, 0, 7], b"x"])));
    let Packet::Publish(p) = p else { panic!() };
    assert_eq!(p.topic, "");
    assert_eq!(p.properties.topic_alias, Some(7));
    assert_eq!(
        enc(&Packet::Publish(p.clone()), ProtocolVersion::V5),
        pkt(0x30, &cat(&[&s(""), &[3, 0x23, 0, 7], b"x"]))
    );
    // Not encodable for 3.1.1, which has no aliases.
    assert_eq!(
        enc_err(&Packet::Publish(p), ProtocolVersion::V311),
        EncodeError::InvalidTopicName(TopicError::Empty)
    );
}

/// [MQTT-3.3.2-8]
#[test]
fn mqtt_3_3_2_8_topic_alias_zero_not_permitted() {
    let e = dec_err(V5, &pkt(0x30, &cat(&[&s("a"), &[3, 0x23, 0, 0]])));
    assert_eq!(e, DecodeError::ZeroTopicAlias);
    assert_eq!(e.reason_code(), ReasonCode::TopicAliasInvalid);
}

/// [MQTT-3.3.2-14]
#[test]
fn mqtt_3_3_2_14_response_topic_without_wildcards() {
    let props = cat(&[&[0x08], &s("r/+")]);
    let body = cat(&[&s("a"), &[props.len() as u8], &props]);
    assert_eq!(
        dec_err(V5, &pkt(0x30, &body)),
        DecodeError::InvalidTopicName(TopicError::WildcardInTopicName)
    );
}

/// [MQTT-2.2.1-3] [MQTT-2.2.1-4] / [MQTT-2.3.1-1] (3.1.1): non-zero packet
/// identifiers in QoS > 0 PUBLISH, SUBSCRIBE, UNSUBSCRIBE (and their acks).
#[test]
fn mqtt_2_2_1_3_packet_identifier_non_zero() {
    let cases: Vec<Vec<u8>> = vec![
        pkt(0x32, &cat(&[&s("a"), &[0, 0]])),
        pkt(0x82, &cat(&[&[0, 0], &s("a"), &[0]])),
        pkt(0xA2, &cat(&[&[0, 0], &s("a")])),
        vec![0x40, 0x02, 0x00, 0x00],
        vec![0x62, 0x02, 0x00, 0x00],
        vec![0x90, 0x03, 0x00, 0x00, 0x00],
        vec![0xB0, 0x02, 0x00, 0x00],
    ];
    for c in cases {
        let e = dec_err(V3, &c);
        assert_eq!(e, DecodeError::ZeroPacketId, "{c:x?}");
        assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
    }
    assert_eq!(
        enc_err(
            &Packet::Publish(publish("a", QoS::AtLeastOnce, Some(0))),
            ProtocolVersion::V311
        ),
        EncodeError::ZeroPacketId
    );
    assert_eq!(
        enc_err(&Packet::PubAck(Ack::new(0)), ProtocolVersion::V5),
        EncodeError::ZeroPacketId
    );
    assert_eq!(
        enc_err(
            &Packet::Publish(publish("a", QoS::ExactlyOnce, None)),
            ProtocolVersion::V311
        ),
        EncodeError::MissingPacketId
    );
}

/// [MQTT-2.2.1-2] / [MQTT-2.3.1-5] (3.1.1): no packet identifier with QoS 0.
#[test]
fn mqtt_2_2_1_2_no_packet_identifier_for_qos0() {
    assert_eq!(
        enc_err(
            &Packet::Publish(publish("a", QoS::AtMostOnce, Some(1))),
            ProtocolVersion::V5
        ),
        EncodeError::UnexpectedPacketId
    );
    // Decoding a QoS 0 publish never reads an identifier: the bytes are payload.
    let Packet::Publish(p) = dec_ok(V3, &pkt(0x30, &cat(&[&s("a"), &[0, 1]]))) else {
        panic!()
    };
    assert_eq!(p.packet_id, None);
    assert_eq!(&p.payload[..], &[0, 1]);
}

/// [MQTT-3.3.2-18]: user properties keep their order; [MQTT-3.3.4-4]:
/// several subscription identifiers in one PUBLISH.
#[test]
fn mqtt_3_3_2_18_user_property_order_and_multiple_subscription_ids() {
    // Subscription identifiers first: the order the encoder writes them in.
    let props = cat(&[
        &[0x0B, 0x01, 0x0B, 0xFF, 0xFF, 0xFF, 0x7F],
        &[0x26],
        &s("k"),
        &s("2"),
        &[0x26],
        &s("k"),
        &s("1"),
    ]);
    let body = cat(&[&s("a"), &[props.len() as u8], &props]);
    let Packet::Publish(p) = dec_ok(V5, &pkt(0x30, &body)) else {
        panic!()
    };
    assert_eq!(
        p.properties.user_properties,
        vec![("k".into(), "2".into()), ("k".into(), "1".into())]
    );
    assert_eq!(p.properties.subscription_identifiers, vec![1, 268_435_455]);
    assert_eq!(
        enc(&Packet::Publish(p), ProtocolVersion::V5),
        pkt(0x30, &body)
    );
}

// ----- properties -----------------------------------------------------------

fn v5_puback_with_props(props: &[u8]) -> Vec<u8> {
    pkt(0x40, &cat(&[&[0, 1, 0x00], &varint(props.len()), props]))
}

fn v5_connect_with_props(props: &[u8]) -> Vec<u8> {
    pkt(0x10, &connect_body("MQTT", 5, 0x02, Some(props), &s("c")))
}

/// Spec 2.2.2.2: "It is a Protocol Error to include ... more than once".
#[test]
fn duplicate_property_is_a_protocol_error() {
    let props = cat(&[&[0x1F], &s("a"), &[0x1F], &s("b")]);
    let e = dec_err(V5, &v5_puback_with_props(&props));
    assert_eq!(e, DecodeError::DuplicateProperty(0x1F));
    assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
    // Subscription identifier: repeatable in PUBLISH only.
    let body = cat(&[&[0, 1], &[4, 0x0B, 1, 0x0B, 2], &s("a"), &[0]]);
    assert_eq!(
        dec_err(V5, &pkt(0x82, &body)),
        DecodeError::DuplicateProperty(0x0B)
    );
    for dup in [
        &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2][..],
        &[0x21, 0, 1, 0x21, 0, 1][..],
        &[0x27, 0, 0, 0, 9, 0x27, 0, 0, 0, 9][..],
        &[0x17, 1, 0x17, 1][..],
    ] {
        assert!(matches!(
            dec_err(None, &v5_connect_with_props(dup)),
            DecodeError::DuplicateProperty(_)
        ));
    }
}

/// Spec 2.2.2.2 table 2-4: each property only in its packets.
#[test]
fn property_not_allowed_in_packet() {
    // Topic Alias in PUBACK.
    let e = dec_err(V5, &v5_puback_with_props(&[0x23, 0, 1]));
    assert_eq!(
        e,
        DecodeError::PropertyNotAllowed {
            packet: "puback",
            id: 0x23
        }
    );
    // Will Delay Interval in CONNECT (only in will properties).
    assert!(matches!(
        dec_err(None, &v5_connect_with_props(&[0x18, 0, 0, 0, 1])),
        DecodeError::PropertyNotAllowed { id: 0x18, .. }
    ));
    // Encoder: Reason String in PUBLISH.
    let mut p = publish("a", QoS::AtMostOnce, None);
    p.properties.reason_string = Some("x".into());
    assert_eq!(
        enc_err(&Packet::Publish(p), ProtocolVersion::V5),
        EncodeError::PropertyNotAllowed {
            packet: "publish",
            id: 0x1F
        }
    );
}

#[test]
fn unknown_property_is_malformed() {
    for id in [0x00u8, 0x04, 0x2B, 0x7F] {
        let e = dec_err(V5, &v5_puback_with_props(&[id, 0]));
        assert_eq!(e, DecodeError::UnknownProperty(u32::from(id)));
        assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
    }
}

/// Property values the spec calls a Protocol Error.
#[test]
fn invalid_property_values() {
    let cases: &[&[u8]] = &[
        &[0x21, 0, 0],       // Receive Maximum 0
        &[0x27, 0, 0, 0, 0], // Maximum Packet Size 0
        &[0x17, 2],          // Request Problem Information 2
        &[0x19, 2],          // Request Response Information 2
    ];
    for c in cases {
        let e = dec_err(None, &v5_connect_with_props(c));
        assert!(
            matches!(e, DecodeError::InvalidPropertyValue { .. }),
            "{c:x?}"
        );
        assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
    }
    // Payload Format Indicator 2.
    let body = cat(&[&s("a"), &[2, 0x01, 2]]);
    assert_eq!(
        dec_err(V5, &pkt(0x30, &body)),
        DecodeError::InvalidPropertyValue { id: 0x01 }
    );
    // Subscription Identifier 0.
    let body = cat(&[&[0, 1], &[2, 0x0B, 0], &s("a"), &[0]]);
    assert_eq!(
        dec_err(V5, &pkt(0x82, &body)),
        DecodeError::InvalidPropertyValue { id: 0x0B }
    );
    // CONNACK Maximum QoS 2.
    assert_eq!(
        dec_err(V5, &[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02]),
        DecodeError::InvalidPropertyValue { id: 0x24 }
    );
    // Encoder side.
    let mut c = connect(ProtocolVersion::V5);
    c.properties.receive_maximum = Some(0);
    assert_eq!(
        enc_err(&Packet::Connect(Box::new(c)), ProtocolVersion::V5),
        EncodeError::InvalidPropertyValue { id: 0x21 }
    );
    let mut p = publish("a", QoS::AtMostOnce, None);
    p.properties.subscription_identifiers = vec![268_435_456];
    assert!(matches!(
        enc_err(&Packet::Publish(p), ProtocolVersion::V5),
        EncodeError::ValueOutOfRange { .. }
    ));
}

/// Spec 3.1.2.11.10: Authentication Data without Authentication Method.
#[test]
fn auth_data_without_method_is_a_protocol_error() {
    let e = dec_err(None, &v5_connect_with_props(&cat(&[&[0x16], &s("d")])));
    assert_eq!(e, DecodeError::AuthDataWithoutMethod);
    assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
}

/// Property length must fit the packet and the properties must fill it exactly.
#[test]
fn property_length_accounting() {
    // Property length 5 but only 3 bytes follow.
    assert_eq!(
        dec_err(V5, &pkt(0x40, &[0, 1, 0x00, 5, 0x1F, 0, 0])),
        DecodeError::UnexpectedEof
    );
    // Property length 2 cuts a 3-byte Reason String property in the middle.
    assert_eq!(
        dec_err(V5, &pkt(0x40, &[0, 1, 0x00, 2, 0x1F, 0, 0])),
        DecodeError::UnexpectedEof
    );
}

// ----- acks, short forms, reason codes --------------------------------------

/// MQTT 5 3.4.2.1: remaining length 2 = Success without properties; 3 = no
/// property length.
#[test]
fn v5_ack_short_forms() {
    for first in [0x40u8, 0x50, 0x62, 0x70] {
        let p = dec_ok(V5, &[first, 0x02, 0x00, 0x09]);
        let a = match p {
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => a,
            _ => panic!(),
        };
        assert_eq!(a, Ack::new(9));
    }
    let a = dec_ok(V5, &[0x40, 0x03, 0x00, 0x09, 0x10]);
    let want = Ack {
        packet_id: 9,
        reason: ReasonCode::NoMatchingSubscribers,
        properties: Properties::default(),
    };
    assert_eq!(a, Packet::PubAck(want.clone()));
    assert_eq!(enc(&a, ProtocolVersion::V5), [0x40, 0x03, 0x00, 0x09, 0x10]);
    // Success with an explicit empty property list decodes the same.
    assert_eq!(
        dec_ok(V5, &[0x40, 0x04, 0x00, 0x09, 0x00, 0x00]),
        Packet::PubAck(Ack::new(9))
    );
    // With properties: full form.
    let mut with = want;
    with.properties.reason_string = Some("x".into());
    let bytes = [0x40, 0x08, 0x00, 0x09, 0x10, 0x04, 0x1F, 0x00, 0x01, b'x'];
    golden(ProtocolVersion::V5, &bytes, Packet::PubAck(with.clone()));
    // 3.1.1 drops reason and properties.
    assert_eq!(
        enc(&Packet::PubAck(with), ProtocolVersion::V311),
        [0x40, 0x02, 0x00, 0x09]
    );
}

/// MQTT 5 3.14.2.1 / 3.15.2.1: DISCONNECT and AUTH with remaining length 0
/// mean Success; DISCONNECT with 1 byte has no property length, AUTH must.
#[test]
fn v5_disconnect_and_auth_short_forms() {
    let d = Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver));
    golden(ProtocolVersion::V5, &[0xE0, 0x01, 0x8E], d);
    assert_eq!(
        dec_ok(V5, &[0xE0, 0x02, 0x8E, 0x00]),
        Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver))
    );
    let ok = Packet::Auth(Auth {
        reason: ReasonCode::Success,
        properties: Properties::default(),
    });
    golden(ProtocolVersion::V5, &[0xF0, 0x00], ok);
    assert_eq!(dec_err(V5, &[0xF0, 0x01, 0x18]), DecodeError::UnexpectedEof);
    let cont = Packet::Auth(Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: Properties {
            authentication_method: Some("m".into()),
            ..Properties::default()
        },
    });
    golden(
        ProtocolVersion::V5,
        &[0xF0, 0x06, 0x18, 0x04, 0x15, 0x00, 0x01, b'm'],
        cont,
    );
    // 3.1.1 DISCONNECT carries nothing.
    assert_eq!(dec_err(V3, &[0xE0, 0x01, 0x00]), DecodeError::TrailingBytes);
    assert_eq!(
        enc(
            &Packet::Disconnect(Disconnect::new(ReasonCode::ServerShuttingDown)),
            ProtocolVersion::V311
        ),
        [0xE0, 0x00]
    );
}

/// [MQTT-3.4.2-1] [MQTT-3.5.2-1] [MQTT-3.6.2-1] [MQTT-3.7.2-1]
/// [MQTT-3.9.3-2] [MQTT-3.11.3-2] [MQTT-3.14.2-1] [MQTT-3.15.2-1]: only the
/// packet's own reason codes; unknown codes are malformed.
#[test]
fn mqtt_3_4_2_1_reason_codes_per_packet() {
    // Unknown code.
    let e = dec_err(V5, &[0x40, 0x03, 0x00, 0x01, 0x03]);
    assert_eq!(
        e,
        DecodeError::InvalidReasonCode {
            packet: "puback",
            code: 0x03
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
    // Known code, wrong packet.
    let cases: &[&[u8]] = &[
        &[0x62, 0x03, 0x00, 0x01, 0x10], // PUBREL: NoMatchingSubscribers
        &[0x70, 0x03, 0x00, 0x01, 0x87], // PUBCOMP: NotAuthorized
        &[0x50, 0x03, 0x00, 0x01, 0x92], // PUBREC: PacketIdentifierNotFound
        &[0x90, 0x04, 0x00, 0x01, 0x00, 0x10], // SUBACK
        &[0xB0, 0x04, 0x00, 0x01, 0x00, 0x02], // UNSUBACK: GrantedQoS2
        &[0xE0, 0x01, 0x84],             // DISCONNECT: UnsupportedProtocolVersion
        &[0xF0, 0x02, 0x87, 0x00],       // AUTH: NotAuthorized
    ];
    for c in cases {
        assert!(
            matches!(dec_err(V5, c), DecodeError::InvalidReasonCode { .. }),
            "{c:x?}"
        );
    }
    let bad = Ack {
        packet_id: 1,
        reason: ReasonCode::NotAuthorized,
        properties: Properties::default(),
    };
    assert!(matches!(
        enc_err(&Packet::PubRel(bad.clone()), ProtocolVersion::V5),
        EncodeError::InvalidReasonCode { .. }
    ));
    assert!(reason_allowed_in("puback", ReasonCode::NotAuthorized));
    assert!(!reason_allowed_in("pubrel", ReasonCode::NotAuthorized));
    assert!(!reason_allowed_in("publish", ReasonCode::Success));
}

/// Every DecodeError reason code is usable in a v5 DISCONNECT, except the
/// two that only arise from CONNECT (sent in CONNACK instead).
#[test]
fn decode_error_reason_codes_fit_disconnect_or_connack() {
    let errors = [
        DecodeError::MalformedRemainingLength,
        DecodeError::PacketTooLarge { size: 2, max: 1 },
        DecodeError::SecondConnect,
        DecodeError::InvalidTopicName(TopicError::Empty),
        DecodeError::InvalidTopicFilter(TopicError::Empty),
        DecodeError::ZeroTopicAlias,
        DecodeError::UnsupportedProtocolVersion(9),
        DecodeError::EmptyClientIdWithoutCleanSession,
    ];
    for e in errors {
        let r = e.reason_code();
        assert!(
            reason_allowed_in("disconnect", r) || reason_allowed_in("connack", r),
            "{e:?}"
        );
    }
}

// ----- SUBSCRIBE / SUBACK / UNSUBSCRIBE ------------------------------------

/// [MQTT-3.8.3-2] / [MQTT-3.8.3-3] (3.1.1)
#[test]
fn mqtt_3_8_3_2_subscribe_needs_a_filter() {
    for (v, body) in [(V3, vec![0, 1]), (V5, vec![0, 1, 0])] {
        let e = dec_err(v, &pkt(0x82, &body));
        assert_eq!(
            e,
            DecodeError::EmptyPayload {
                packet: "subscribe"
            }
        );
        assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
    }
    let p = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![],
        properties: Properties::default(),
    });
    assert!(matches!(
        enc_err(&p, ProtocolVersion::V5),
        EncodeError::EmptyPayload { .. }
    ));
}

/// [MQTT-3.10.3-2]
#[test]
fn mqtt_3_10_3_2_unsubscribe_needs_a_filter() {
    assert_eq!(
        dec_err(V3, &pkt(0xA2, &[0, 1])),
        DecodeError::EmptyPayload {
            packet: "unsubscribe"
        }
    );
}

/// [MQTT-3.8.3-1] [MQTT-3.10.3-1] [MQTT-4.7.1-1] [MQTT-4.7.1-2]: filters are
/// checked for wildcard syntax.
#[test]
fn mqtt_4_7_1_1_filter_syntax_checked_in_subscribe_and_unsubscribe() {
    let e = dec_err(V3, &pkt(0x82, &cat(&[&[0, 1], &s("a/#/b"), &[0]])));
    assert_eq!(
        e,
        DecodeError::InvalidTopicFilter(TopicError::InvalidMultiLevelWildcard)
    );
    assert_eq!(e.reason_code(), ReasonCode::TopicFilterInvalid);
    assert_eq!(
        dec_err(V3, &pkt(0xA2, &cat(&[&[0, 1], &s("a+")]))),
        DecodeError::InvalidTopicFilter(TopicError::InvalidSingleLevelWildcard)
    );
    assert_eq!(
        dec_err(V3, &pkt(0x82, &cat(&[&[0, 1], &s(""), &[0]]))),
        DecodeError::InvalidTopicFilter(TopicError::Empty)
    );
}

/// [MQTT-3.8.3-5] (v5) / [MQTT-3.8.3-4] (3.1.1): reserved option bits and QoS 3.
#[test]
fn mqtt_3_8_3_5_subscription_options_reserved_bits() {
    // 3.1.1: everything above the QoS bits is reserved.
    for b in [0x04u8, 0x40, 0x80] {
        assert_eq!(
            dec_err(V3, &pkt(0x82, &cat(&[&[0, 1], &s("a"), &[b]]))),
            DecodeError::InvalidSubscriptionOptions(b)
        );
    }
    // v5: bits 6 and 7.
    for b in [0x40u8, 0x80] {
        let e = dec_err(V5, &pkt(0x82, &cat(&[&[0, 1, 0], &s("a"), &[b]])));
        assert_eq!(e, DecodeError::InvalidSubscriptionOptions(b));
        assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
    }
    assert_eq!(
        dec_err(V3, &pkt(0x82, &cat(&[&[0, 1], &s("a"), &[3]]))),
        DecodeError::InvalidQoS(3)
    );
    // v5 options all set.
    let Packet::Subscribe(sub) = dec_ok(V5, &pkt(0x82, &cat(&[&[0, 1, 0], &s("a"), &[0x2E]])))
    else {
        panic!()
    };
    assert_eq!(
        sub.filters,
        vec![(
            "a".to_string(),
            SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            }
        )]
    );
}

/// Spec 3.8.3.1: "It is a Protocol Error to send a Retain Handling value of 3".
#[test]
fn retain_handling_3_is_a_protocol_error() {
    let e = dec_err(V5, &pkt(0x82, &cat(&[&[0, 1, 0], &s("a"), &[0x30]])));
    assert_eq!(e, DecodeError::InvalidRetainHandling);
    assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
}

/// [MQTT-3.8.3-4]
#[test]
fn mqtt_3_8_3_4_no_local_on_shared_subscription() {
    let e = dec_err(
        V5,
        &pkt(0x82, &cat(&[&[0, 1, 0], &s("$share/g/a"), &[0x04]])),
    );
    assert_eq!(e, DecodeError::NoLocalOnSharedSubscription);
    assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
    let p = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            "$share/g/a".into(),
            SubscriptionOptions {
                no_local: true,
                ..SubscriptionOptions::qos(QoS::AtMostOnce)
            },
        )],
        properties: Properties::default(),
    });
    assert_eq!(
        enc_err(&p, ProtocolVersion::V5),
        EncodeError::NoLocalOnSharedSubscription
    );
}

/// [MQTT-4.8.2-1] [MQTT-4.8.2-2]: v5 shared subscription syntax; in 3.1.1
/// `$share` is not special.
#[test]
fn mqtt_4_8_2_1_shared_subscription_syntax_in_subscribe() {
    for bad in ["$share/g", "$share//a", "$share/g/"] {
        let e = dec_err(V5, &pkt(0x82, &cat(&[&[0, 1, 0], &s(bad), &[0]])));
        assert_eq!(
            e,
            DecodeError::InvalidTopicFilter(TopicError::InvalidSharedSubscription),
            "{bad}"
        );
    }
    assert!(dec(
        V5,
        &pkt(0x82, &cat(&[&[0, 1, 0], &s("$share/g/a/#"), &[0]]))
    )
    .is_ok());
    assert!(dec(V3, &pkt(0x82, &cat(&[&[0, 1], &s("$share/g"), &[0]]))).is_ok());
}

/// [MQTT-3.9.3-2] (3.1.1): SUBACK return codes other than 0x00, 0x01, 0x02,
/// 0x80 are reserved; every error reason maps to 0x80.
#[test]
fn mqtt_3_9_3_2_suback_return_codes() {
    assert_eq!(
        dec_err(V3, &[0x90, 0x03, 0x00, 0x01, 0x03]),
        DecodeError::InvalidReasonCode {
            packet: "suback",
            code: 3
        }
    );
    assert_eq!(
        dec_err(V3, &[0x90, 0x03, 0x00, 0x01, 0x87]),
        DecodeError::InvalidReasonCode {
            packet: "suback",
            code: 0x87
        }
    );
    assert_eq!(v3_suback_code(ReasonCode::NotAuthorized), Some(0x80));
    assert_eq!(v3_suback_code(ReasonCode::GrantedQoS1), Some(1));
    let p = Packet::SubAck(SubAck {
        packet_id: 1,
        reasons: vec![ReasonCode::NotAuthorized, ReasonCode::GrantedQoS1],
        properties: Properties::default(),
    });
    assert_eq!(
        enc(&p, ProtocolVersion::V311),
        [0x90, 0x04, 0x00, 0x01, 0x80, 0x01]
    );
    assert_eq!(
        enc(&p, ProtocolVersion::V5),
        [0x90, 0x05, 0x00, 0x01, 0x00, 0x87, 0x01]
    );
    assert_eq!(
        dec_err(V3, &[0x90, 0x02, 0x00, 0x01]),
        DecodeError::EmptyPayload { packet: "suback" }
    );
}

// ----- encoder limits and version handling ----------------------------------

#[test]
fn encoder_rejects_oversize_strings_and_packets() {
    let long = "a".repeat(65_536);
    let mut c = connect(ProtocolVersion::V311);
    c.client_id = long.clone();
    assert_eq!(
        enc_err(&Packet::Connect(Box::new(c)), ProtocolVersion::V311),
        EncodeError::StringTooLong { len: 65_536 }
    );
    let mut c = connect(ProtocolVersion::V311);
    c.username = Some("u".into());
    c.password = Some(Bytes::from(vec![0u8; 65_536]));
    assert_eq!(
        enc_err(&Packet::Connect(Box::new(c)), ProtocolVersion::V311),
        EncodeError::BinaryTooLong { len: 65_536 }
    );
    // Remaining length limit: topic "a" (3 bytes) + payload.
    let mut p = publish("a", QoS::AtMostOnce, None);
    p.payload = Bytes::from(vec![0u8; 268_435_455 - 3]);
    assert_eq!(
        encoded_len(&Packet::Publish(p.clone()), ProtocolVersion::V311),
        Ok(268_435_460)
    );
    p.payload = Bytes::from(vec![0u8; 268_435_455 - 2]);
    assert_eq!(
        publish_encoded_len(&p.borrowed(), ProtocolVersion::V311),
        Err(EncodeError::PacketTooLarge {
            remaining_length: 268_435_456
        })
    );
    assert_eq!(
        encoded_len(&Packet::Publish(p), ProtocolVersion::V311),
        Err(EncodeError::PacketTooLarge {
            remaining_length: 268_435_456
        })
    );
}

#[test]
fn v311_encoding_drops_v5_only_fields() {
    let mut p = publish("a", QoS::AtMostOnce, None);
    p.properties.user_properties.push(("k".into(), "v".into()));
    p.properties.message_expiry_interval = Some(5);
    let bytes = enc(&Packet::Publish(p.clone()), ProtocolVersion::V311);
    p.properties = Properties::default();
    assert_eq!(dec_ok(V3, &bytes), Packet::Publish(p));
    let sub = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            "a".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        )],
        properties: Properties::default(),
    });
    assert_eq!(
        enc(&sub, ProtocolVersion::V311),
        pkt(0x82, &cat(&[&[0, 1], &s("a"), &[1]]))
    );
    // CONNECT is encoded in its own version, whatever the argument says.
    let c = Packet::Connect(Box::new(connect(ProtocolVersion::V5)));
    assert_eq!(enc(&c, ProtocolVersion::V311), enc(&c, ProtocolVersion::V5));
    // MQTT 3.1 packets other than CONNECT are 3.1.1 packets.
    assert_eq!(dec_ok(V31, &[0xC0, 0x00]), Packet::PingReq);
}
