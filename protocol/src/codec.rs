//! Strict encoder and decoder for MQTT 3.1 (level 3), 3.1.1 (level 4) and
//! 5.0 (level 5).
//!
//! Decoding is direction-agnostic: every packet type is decoded (a broker
//! must itself reject packets a client may not send, such as CONNACK, or a
//! Subscription Identifier in a client PUBLISH [MQTT-3.3.4-6]). Everything
//! the spec defines as malformed or as a protocol error *within one packet*
//! is rejected here, with a [`DecodeError`] that maps to the reason code to
//! report ([`DecodeError::reason_code`]).
//!
//! Encoding validates the packet the same way, so the encoder never writes a
//! packet this decoder would reject (an [`EncodeError`] instead).
//!
//! Version-specific behaviour:
//! * MQTT 3.1 and 3.1.1 have no properties and (except CONNACK and SUBACK) no
//!   reason codes: the encoder drops them, the decoder yields empty
//!   properties and `Success`.
//! * CONNACK in 3.x carries a return code, see [`v3_connack_code`].
//! * SUBACK in 3.x carries 0x00/0x01/0x02 or 0x80; every error reason code
//!   is encoded as 0x80 and decoded as `UnspecifiedError`.
//! * AUTH does not exist before MQTT 5.
//! * Variable byte integers (remaining length, property lengths,
//!   subscription identifiers) must use the minimum number of bytes
//!   [MQTT-1.5.5-1]; this is applied to all versions.

use crate::packet::*;
use crate::topic::{self, SharedFilter, TopicError};
use bytes::{Buf, Bytes, BytesMut};

/// Largest value of a variable byte integer (and of the remaining length).
pub const MAX_VARIABLE_BYTE_INTEGER: u32 = 268_435_455;
/// Largest possible packet on the wire: 1 byte type, 4 bytes remaining
/// length, 268,435,455 bytes of body.
pub const MAX_PACKET_SIZE: u32 = 1 + 4 + MAX_VARIABLE_BYTE_INTEGER;

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed remaining length (more than 4 bytes or not minimally encoded)")]
    MalformedRemainingLength,
    #[error("malformed variable byte integer [MQTT-1.5.5-1]")]
    MalformedVariableByteInteger,
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge { size: u32, max: u32 },
    #[error("invalid control packet type {0}")]
    InvalidPacketType(u8),
    #[error(
        "invalid fixed header flags {flags:#06b} for packet type {packet_type} [MQTT-2.2.2-1]"
    )]
    InvalidReservedFlags { packet_type: u8, flags: u8 },
    #[error("invalid QoS {0} [MQTT-3.3.1-4]")]
    InvalidQoS(u8),
    #[error("DUP flag set on a QoS 0 PUBLISH [MQTT-3.3.1-2]")]
    DupWithQoS0,
    #[error("packet ends before all its fields were read")]
    UnexpectedEof,
    #[error("bytes left over after the last field of the packet")]
    TrailingBytes,
    #[error("string is not well-formed UTF-8 [MQTT-1.5.4-1]")]
    InvalidUtf8,
    #[error("string contains forbidden character U+{0:04X} [MQTT-1.5.4-2]")]
    ForbiddenUtf8Char(u32),
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    #[error("property {0:#04x} included more than once")]
    DuplicateProperty(u8),
    #[error("property {id:#04x} is not allowed in {packet}")]
    PropertyNotAllowed { packet: &'static str, id: u8 },
    #[error("invalid value for property {id:#04x}")]
    InvalidPropertyValue { id: u8 },
    #[error("Topic Alias 0 is not permitted [MQTT-3.3.2-8]")]
    ZeroTopicAlias,
    #[error("Authentication Data without Authentication Method")]
    AuthDataWithoutMethod,
    #[error("protocol name is not \"MQTT\" (or \"MQIsdp\" for level 3) [MQTT-3.1.2-1]")]
    InvalidProtocolName,
    #[error("unsupported protocol level {0} [MQTT-3.1.2-2]")]
    UnsupportedProtocolVersion(u8),
    #[error("first packet is not CONNECT [MQTT-3.1.0-1]")]
    FirstPacketNotConnect,
    #[error("second CONNECT on the connection [MQTT-3.1.0-2]")]
    SecondConnect,
    #[error("CONNECT reserved flag is not 0 [MQTT-3.1.2-3]")]
    InvalidConnectFlags,
    #[error("Will QoS or Will Retain set without the Will Flag [MQTT-3.1.2-11]")]
    InvalidWillFlags,
    #[error("Password Flag set without User Name Flag (MQTT 3.1.1) [MQTT-3.1.2-22]")]
    PasswordWithoutUsername,
    #[error("zero-length Client Identifier with Clean Session 0 (MQTT 3.1.1) [MQTT-3.1.3-8]")]
    EmptyClientIdWithoutCleanSession,
    #[error("CONNACK reserved flags are not 0 [MQTT-3.2.2-1]")]
    InvalidConnAckFlags,
    #[error("CONNACK with Session Present and an error code [MQTT-3.2.2-6]")]
    SessionPresentWithError,
    #[error("invalid topic name: {0}")]
    InvalidTopicName(TopicError),
    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(TopicError),
    #[error("packet identifier 0 [MQTT-2.2.1-3]")]
    ZeroPacketId,
    #[error("{packet} without payload entries [MQTT-3.8.3-2]")]
    EmptyPayload { packet: &'static str },
    #[error("reserved bits set in subscription options {0:#04x} [MQTT-3.8.3-5]")]
    InvalidSubscriptionOptions(u8),
    #[error("Retain Handling 3 is a protocol error")]
    InvalidRetainHandling,
    #[error("No Local set on a shared subscription [MQTT-3.8.3-4]")]
    NoLocalOnSharedSubscription,
    #[error("reason code {code:#04x} is not valid in {packet}")]
    InvalidReasonCode { packet: &'static str, code: u8 },
}

impl DecodeError {
    /// The MQTT 5 reason code to send in DISCONNECT (or CONNACK while
    /// decoding CONNECT). Every value is valid in a v5 DISCONNECT except
    /// `UnsupportedProtocolVersion` and `ClientIdentifierNotValid`, which
    /// only arise while decoding CONNECT (answer with CONNACK; for 3.1.1
    /// [`v3_connack_code`] turns them into return codes 1 and 2).
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            // A wrong protocol name most likely means another protocol (or
            // a future MQTT); 0x84 is what [MQTT-3.1.2-1] suggests.
            InvalidProtocolName | UnsupportedProtocolVersion(_) => {
                ReasonCode::UnsupportedProtocolVersion
            }
            EmptyClientIdWithoutCleanSession => ReasonCode::ClientIdentifierNotValid,
            InvalidTopicName(_) => ReasonCode::TopicNameInvalid,
            InvalidTopicFilter(_) => ReasonCode::TopicFilterInvalid,
            ZeroTopicAlias => ReasonCode::TopicAliasInvalid,
            // The spec calls these "Protocol Error".
            DuplicateProperty(_)
            | PropertyNotAllowed { .. }
            | InvalidPropertyValue { .. }
            | AuthDataWithoutMethod
            | FirstPacketNotConnect
            | SecondConnect
            | SessionPresentWithError
            | ZeroPacketId
            | EmptyPayload { .. }
            | InvalidRetainHandling
            | NoLocalOnSharedSubscription => ReasonCode::ProtocolError,
            MalformedRemainingLength
            | MalformedVariableByteInteger
            | InvalidPacketType(_)
            | InvalidReservedFlags { .. }
            | InvalidQoS(_)
            | DupWithQoS0
            | UnexpectedEof
            | TrailingBytes
            | InvalidUtf8
            | ForbiddenUtf8Char(_)
            | UnknownProperty(_)
            | InvalidConnectFlags
            | InvalidWillFlags
            | PasswordWithoutUsername
            | InvalidConnAckFlags
            | InvalidSubscriptionOptions(_)
            | InvalidReasonCode { .. } => ReasonCode::MalformedPacket,
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    #[error("string of {len} bytes is longer than 65535 bytes")]
    StringTooLong { len: usize },
    #[error("binary data of {len} bytes is longer than 65535 bytes")]
    BinaryTooLong { len: usize },
    #[error("string contains U+0000")]
    NullCharacter,
    #[error("remaining length {remaining_length} exceeds 268,435,455")]
    PacketTooLarge { remaining_length: usize },
    #[error("{what} is out of range")]
    ValueOutOfRange { what: &'static str },
    #[error("invalid topic name: {0}")]
    InvalidTopicName(TopicError),
    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(TopicError),
    #[error("packet identifier 0")]
    ZeroPacketId,
    #[error("QoS > 0 PUBLISH without packet identifier")]
    MissingPacketId,
    #[error("QoS 0 PUBLISH with a packet identifier")]
    UnexpectedPacketId,
    #[error("DUP set on a QoS 0 PUBLISH")]
    DupWithQoS0,
    #[error("reason code {code:?} is not valid in {packet}")]
    InvalidReasonCode {
        packet: &'static str,
        code: ReasonCode,
    },
    #[error("property {id:#04x} is not allowed in {packet}")]
    PropertyNotAllowed { packet: &'static str, id: u8 },
    #[error("invalid value for property {id:#04x}")]
    InvalidPropertyValue { id: u8 },
    #[error("{packet} needs at least one entry")]
    EmptyPayload { packet: &'static str },
    #[error("CONNACK with Session Present and an error code")]
    SessionPresentWithError,
    #[error("password without user name is not allowed in MQTT 3.1.1")]
    PasswordWithoutUsername,
    #[error("empty client identifier requires clean session in MQTT 3.1.1")]
    EmptyClientIdWithoutCleanSession,
    #[error("No Local on a shared subscription")]
    NoLocalOnSharedSubscription,
    #[error("Authentication Data without Authentication Method")]
    AuthDataWithoutMethod,
    #[error("{packet} does not exist in {version:?}")]
    NotSupportedInVersion {
        packet: &'static str,
        version: ProtocolVersion,
    },
}

// ---------------------------------------------------------------------------
// Reason codes per packet type (MQTT 5 tables) and 3.x return codes
// ---------------------------------------------------------------------------

const CONNACK_REASONS: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_REASONS: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_REASONS: &[u8] = &[0x00, 0x92];
const SUBACK_REASONS: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_REASONS: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_REASONS: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_REASONS: &[u8] = &[0x00, 0x18, 0x19];

/// Reason codes an MQTT 5 packet type may carry, by the kind name used in
/// [`Packet::kind`]; `None` for packets without reason codes.
/// The MQTT 5 reason codes defined for a packet kind (as named by
/// [`Packet::kind`]), `None` for kinds that carry no reason code.
pub fn allowed_reasons(kind: &str) -> Option<&'static [u8]> {
    Some(match kind {
        "connack" => CONNACK_REASONS,
        "puback" | "pubrec" => PUBACK_REASONS,
        "pubrel" | "pubcomp" => PUBREL_REASONS,
        "suback" => SUBACK_REASONS,
        "unsuback" => UNSUBACK_REASONS,
        "disconnect" => DISCONNECT_REASONS,
        "auth" => AUTH_REASONS,
        _ => return None,
    })
}

/// Is `reason` one of the MQTT 5 reason codes defined for `packet`
/// ("connack", "puback", "pubrec", "pubrel", "pubcomp", "suback", "unsuback",
/// "disconnect", "auth", as returned by [`Packet::kind`])?
pub fn reason_allowed_in(packet: &str, reason: ReasonCode) -> bool {
    allowed_reasons(packet).is_some_and(|l| l.contains(&(reason as u8)))
}

/// MQTT 3.1.1 CONNACK return code for a reason code.
///
/// | return code | reason codes |
/// |---|---|
/// | 0 Accepted | `Success` |
/// | 1 unacceptable protocol version | `UnsupportedProtocolVersion` |
/// | 2 identifier rejected | `ClientIdentifierNotValid` |
/// | 3 server unavailable | `ServerUnavailable`, `ServerBusy`, `UseAnotherServer`, `ServerMoved`, `ConnectionRateExceeded`, `QuotaExceeded` and every other error (the server cannot serve the client right now) |
/// | 4 bad user name or password | `BadUserNameOrPassword`, `BadAuthenticationMethod` |
/// | 5 not authorized | `NotAuthorized`, `Banned` |
pub fn v3_connack_code(reason: ReasonCode) -> u8 {
    match reason {
        ReasonCode::Success => 0,
        ReasonCode::UnsupportedProtocolVersion => 1,
        ReasonCode::ClientIdentifierNotValid => 2,
        ReasonCode::BadUserNameOrPassword | ReasonCode::BadAuthenticationMethod => 4,
        ReasonCode::NotAuthorized | ReasonCode::Banned => 5,
        _ => 3,
    }
}

/// Inverse of [`v3_connack_code`] for the six defined return codes.
pub fn v3_connack_reason(code: u8) -> Option<ReasonCode> {
    Some(match code {
        0 => ReasonCode::Success,
        1 => ReasonCode::UnsupportedProtocolVersion,
        2 => ReasonCode::ClientIdentifierNotValid,
        3 => ReasonCode::ServerUnavailable,
        4 => ReasonCode::BadUserNameOrPassword,
        5 => ReasonCode::NotAuthorized,
        _ => return None,
    })
}

/// MQTT 3.1.1 SUBACK return code: granted QoS, or 0x80 for any error.
/// `None` for reason codes that are neither (not valid in a SUBACK).
pub fn v3_suback_code(reason: ReasonCode) -> Option<u8> {
    match reason {
        ReasonCode::Success => Some(0),
        ReasonCode::GrantedQoS1 => Some(1),
        ReasonCode::GrantedQoS2 => Some(2),
        r if r.is_error() => Some(0x80),
        _ => None,
    }
}

fn v3_suback_reason(code: u8) -> Option<ReasonCode> {
    Some(match code {
        0 => ReasonCode::Success,
        1 => ReasonCode::GrantedQoS1,
        2 => ReasonCode::GrantedQoS2,
        0x80 => ReasonCode::UnspecifiedError,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Properties table (MQTT 5 section 2.2.2.2)
// ---------------------------------------------------------------------------

/// Where a property list appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Connect,
    ConnAck,
    Publish,
    Will,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl Ctx {
    fn name(self) -> &'static str {
        match self {
            Ctx::Connect => "connect",
            Ctx::ConnAck => "connack",
            Ctx::Publish => "publish",
            Ctx::Will => "will properties",
            Ctx::PubAck => "puback",
            Ctx::PubRec => "pubrec",
            Ctx::PubRel => "pubrel",
            Ctx::PubComp => "pubcomp",
            Ctx::Subscribe => "subscribe",
            Ctx::SubAck => "suback",
            Ctx::Unsubscribe => "unsubscribe",
            Ctx::UnsubAck => "unsuback",
            Ctx::Disconnect => "disconnect",
            Ctx::Auth => "auth",
        }
    }
}

mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// `None` for unknown identifiers, else whether the property may appear in `ctx`.
fn property_allowed(pid: u8, ctx: Ctx) -> Option<bool> {
    use Ctx::*;
    let allowed: &[Ctx] = match pid {
        id::PAYLOAD_FORMAT_INDICATOR
        | id::MESSAGE_EXPIRY_INTERVAL
        | id::CONTENT_TYPE
        | id::RESPONSE_TOPIC
        | id::CORRELATION_DATA => &[Publish, Will],
        id::SUBSCRIPTION_IDENTIFIER => &[Publish, Subscribe],
        id::SESSION_EXPIRY_INTERVAL => &[Connect, ConnAck, Disconnect],
        id::ASSIGNED_CLIENT_IDENTIFIER
        | id::SERVER_KEEP_ALIVE
        | id::RESPONSE_INFORMATION
        | id::MAXIMUM_QOS
        | id::RETAIN_AVAILABLE
        | id::WILDCARD_SUBSCRIPTION_AVAILABLE
        | id::SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | id::SHARED_SUBSCRIPTION_AVAILABLE => &[ConnAck],
        id::AUTHENTICATION_METHOD | id::AUTHENTICATION_DATA => &[Connect, ConnAck, Auth],
        id::REQUEST_PROBLEM_INFORMATION | id::REQUEST_RESPONSE_INFORMATION => &[Connect],
        id::WILL_DELAY_INTERVAL => &[Will],
        id::SERVER_REFERENCE => &[ConnAck, Disconnect],
        id::REASON_STRING => &[
            ConnAck, PubAck, PubRec, PubRel, PubComp, SubAck, UnsubAck, Disconnect, Auth,
        ],
        id::RECEIVE_MAXIMUM | id::TOPIC_ALIAS_MAXIMUM | id::MAXIMUM_PACKET_SIZE => {
            &[Connect, ConnAck]
        }
        id::TOPIC_ALIAS => &[Publish],
        id::USER_PROPERTY => return Some(true),
        _ => return None,
    };
    Some(allowed.contains(&ctx))
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Parses a variable byte integer from the front of `data`.
/// `Ok(None)`: incomplete; `Err(())`: more than 4 bytes or not minimal.
fn parse_varint(data: &[u8]) -> Result<Option<(u32, usize)>, ()> {
    let mut value: u32 = 0;
    for (i, &b) in data.iter().take(4).enumerate() {
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            // A trailing 0x00 byte means a shorter encoding existed [MQTT-1.5.5-1].
            if i > 0 && b == 0 {
                return Err(());
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if data.len() >= 4 {
        Err(())
    } else {
        Ok(None)
    }
}

/// Checked reads over one packet body; `Bytes` so slices are zero-copy.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::UnexpectedEof);
        }
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(DecodeError::UnexpectedEof);
        }
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::UnexpectedEof);
        }
        Ok(self.buf.get_u32())
    }

    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::UnexpectedEof);
        }
        Ok(self.buf.split_to(n))
    }

    fn varint(&mut self) -> Result<u32, DecodeError> {
        match parse_varint(&self.buf) {
            Ok(Some((v, n))) => {
                self.buf.advance(n);
                Ok(v)
            }
            Ok(None) => Err(DecodeError::UnexpectedEof),
            Err(()) => Err(DecodeError::MalformedVariableByteInteger),
        }
    }

    fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        // std's UTF-8 validation rejects overlong forms and encoded
        // surrogates (U+D800..U+DFFF) [MQTT-1.5.4-1]; a BOM is kept as-is
        // [MQTT-1.5.4-3].
        let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(DecodeError::ForbiddenUtf8Char(0));
        }
        Ok(s.to_owned())
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

fn flag(v: u8, what: u8) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::InvalidPropertyValue { id: what }),
    }
}

fn decode_properties(r: &mut Reader, ctx: Ctx) -> Result<Properties, DecodeError> {
    let len = r.varint()?;
    let mut pr = Reader {
        buf: r.take(len as usize)?,
    };
    let mut p = Properties::default();
    let mut seen: u64 = 0;
    while pr.remaining() > 0 {
        let raw_id = pr.varint()?;
        let pid = u8::try_from(raw_id).map_err(|_| DecodeError::UnknownProperty(raw_id))?;
        match property_allowed(pid, ctx) {
            None => return Err(DecodeError::UnknownProperty(raw_id)),
            Some(false) => {
                return Err(DecodeError::PropertyNotAllowed {
                    packet: ctx.name(),
                    id: pid,
                })
            }
            Some(true) => {}
        }
        let repeatable =
            pid == id::USER_PROPERTY || (pid == id::SUBSCRIPTION_IDENTIFIER && ctx == Ctx::Publish);
        if !repeatable {
            // Known identifiers are all < 64.
            let bit = 1u64 << (pid & 63);
            if seen & bit != 0 {
                return Err(DecodeError::DuplicateProperty(pid));
            }
            seen |= bit;
        }
        match pid {
            id::PAYLOAD_FORMAT_INDICATOR => {
                let v = pr.u8()?;
                flag(v, pid)?;
                p.payload_format_indicator = Some(v);
            }
            id::MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(pr.u32()?),
            id::CONTENT_TYPE => p.content_type = Some(pr.string()?),
            id::RESPONSE_TOPIC => {
                let t = pr.string()?;
                // [MQTT-3.3.2-14]: a topic name, so no wildcards.
                topic::validate_topic_name(&t).map_err(DecodeError::InvalidTopicName)?;
                p.response_topic = Some(t);
            }
            id::CORRELATION_DATA => p.correlation_data = Some(pr.binary()?),
            id::SUBSCRIPTION_IDENTIFIER => {
                let v = pr.varint()?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue { id: pid });
                }
                p.subscription_identifiers.push(v);
            }
            id::SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(pr.u32()?),
            id::ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(pr.string()?),
            id::SERVER_KEEP_ALIVE => p.server_keep_alive = Some(pr.u16()?),
            id::AUTHENTICATION_METHOD => p.authentication_method = Some(pr.string()?),
            id::AUTHENTICATION_DATA => p.authentication_data = Some(pr.binary()?),
            id::REQUEST_PROBLEM_INFORMATION => {
                let v = pr.u8()?;
                flag(v, pid)?;
                p.request_problem_information = Some(v);
            }
            id::WILL_DELAY_INTERVAL => p.will_delay_interval = Some(pr.u32()?),
            id::REQUEST_RESPONSE_INFORMATION => {
                let v = pr.u8()?;
                flag(v, pid)?;
                p.request_response_information = Some(v);
            }
            id::RESPONSE_INFORMATION => p.response_information = Some(pr.string()?),
            id::SERVER_REFERENCE => p.server_reference = Some(pr.string()?),
            id::REASON_STRING => p.reason_string = Some(pr.string()?),
            id::RECEIVE_MAXIMUM => {
                let v = pr.u16()?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue { id: pid });
                }
                p.receive_maximum = Some(v);
            }
            id::TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(pr.u16()?),
            id::TOPIC_ALIAS => {
                let v = pr.u16()?;
                if v == 0 {
                    return Err(DecodeError::ZeroTopicAlias);
                }
                p.topic_alias = Some(v);
            }
            id::MAXIMUM_QOS => {
                let v = pr.u8()?;
                flag(v, pid)?;
                p.maximum_qos = Some(v);
            }
            id::RETAIN_AVAILABLE => {
                let v = pr.u8()?;
                flag(v, pid)?;
                p.retain_available = Some(v);
            }
            id::USER_PROPERTY => {
                let k = pr.string()?;
                let v = pr.string()?;
                p.user_properties.push((k, v));
            }
            id::MAXIMUM_PACKET_SIZE => {
                let v = pr.u32()?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue { id: pid });
                }
                p.maximum_packet_size = Some(v);
            }
            id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                let v = pr.u8()?;
                flag(v, pid)?;
                p.wildcard_subscription_available = Some(v);
            }
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                let v = pr.u8()?;
                flag(v, pid)?;
                p.subscription_identifier_available = Some(v);
            }
            id::SHARED_SUBSCRIPTION_AVAILABLE => {
                let v = pr.u8()?;
                flag(v, pid)?;
                p.shared_subscription_available = Some(v);
            }
            _ => return Err(DecodeError::UnknownProperty(raw_id)),
        }
    }
    if ctx == Ctx::Connect && p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(DecodeError::AuthDataWithoutMethod);
    }
    Ok(p)
}

fn decode_reason(code: u8, packet: &'static str) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(code)
        .filter(|r| reason_allowed_in(packet, *r))
        .ok_or(DecodeError::InvalidReasonCode { packet, code })
}

fn nonzero_packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::ZeroPacketId),
        id => Ok(id),
    }
}

/// Validates a SUBSCRIBE/UNSUBSCRIBE filter; in v5 `$share/` filters must be
/// valid shared subscriptions. Returns whether the filter is shared.
fn check_filter(filter: &str, v5: bool) -> Result<bool, DecodeError> {
    topic::validate_topic_filter(filter).map_err(DecodeError::InvalidTopicFilter)?;
    if v5 && topic::is_shared(filter) {
        if SharedFilter::parse(filter).is_none() {
            return Err(DecodeError::InvalidTopicFilter(
                TopicError::InvalidSharedSubscription,
            ));
        }
        return Ok(true);
    }
    Ok(false)
}

/// Incremental, stateful MQTT packet decoder for one connection.
#[derive(Debug, Clone)]
pub struct Decoder {
    version: Option<ProtocolVersion>,
    max_packet_size: u32,
}

impl Default for Decoder {
    /// No version yet, spec maximum packet size.
    fn default() -> Self {
        Decoder::new(MAX_PACKET_SIZE)
    }
}

impl Decoder {
    /// `max_packet_size` = whole packet size limit in bytes (fixed header included).
    pub fn new(max_packet_size: u32) -> Decoder {
        Decoder {
            version: None,
            max_packet_size,
        }
    }

    /// Before a CONNECT has been decoded, only CONNECT is accepted
    /// [MQTT-3.1.0-1]; decoding a CONNECT sets the version.
    ///
    /// The version is set as soon as a valid protocol name and level were
    /// read, even if the rest of the CONNECT then fails to decode, so the
    /// caller can answer with a CONNACK in the client's format.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// Sets the version, e.g. for a client-side decoder (which never sees a
    /// CONNECT). With a version set, a CONNECT is rejected as a second
    /// CONNECT [MQTT-3.1.0-2].
    pub fn set_version(&mut self, v: ProtocolVersion) {
        self.version = Some(v);
    }

    pub fn max_packet_size(&self) -> u32 {
        self.max_packet_size
    }

    pub fn set_max_packet_size(&mut self, n: u32) {
        self.max_packet_size = n;
    }

    fn v5(&self) -> bool {
        self.version.is_some_and(ProtocolVersion::is_v5)
    }

    /// Decode one packet from the front of `buf`, consuming its bytes.
    /// `Ok(None)` = need more bytes (nothing consumed).
    ///
    /// The fixed header is checked (packet type, flags, first-packet rule,
    /// size limit) as soon as it is readable, without waiting for the body.
    /// After an error the connection must be closed; how much of `buf` was
    /// consumed is then unspecified.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let packet_type = first >> 4;
        let flags = first & 0x0F;
        self.check_fixed_header(packet_type, flags)?;

        let Some((remaining, len_bytes)) = parse_varint(buf.get(1..).unwrap_or_default())
            .map_err(|()| DecodeError::MalformedRemainingLength)?
        else {
            return Ok(None);
        };
        let header_len = 1 + len_bytes;
        // Cannot overflow: remaining <= 268,435,455.
        let total = header_len as u64 + u64::from(remaining);
        if total > u64::from(self.max_packet_size) {
            return Err(DecodeError::PacketTooLarge {
                size: u32::try_from(total).unwrap_or(u32::MAX),
                max: self.max_packet_size,
            });
        }
        let total = header_len + remaining as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let mut body = buf.split_to(total).freeze();
        body.advance(header_len);
        let mut r = Reader { buf: body };
        let packet = self.decode_body(packet_type, flags, &mut r)?;
        r.finish()?;
        Ok(Some(packet))
    }

    fn check_fixed_header(&self, packet_type: u8, flags: u8) -> Result<(), DecodeError> {
        if packet_type == 0 {
            return Err(DecodeError::InvalidPacketType(0));
        }
        match (self.version, packet_type) {
            (None, CONNECT) => {}
            (None, _) => return Err(DecodeError::FirstPacketNotConnect),
            (Some(_), CONNECT) => return Err(DecodeError::SecondConnect),
            (Some(v), AUTH) if !v.is_v5() => return Err(DecodeError::InvalidPacketType(AUTH)),
            _ => {}
        }
        match packet_type {
            PUBLISH => {
                let qos = (flags >> 1) & 0b11;
                if qos == 3 {
                    return Err(DecodeError::InvalidQoS(qos));
                }
                if qos == 0 && flags & 0b1000 != 0 {
                    return Err(DecodeError::DupWithQoS0);
                }
            }
            PUBREL | SUBSCRIBE | UNSUBSCRIBE => {
                if flags != 0b0010 {
                    return Err(DecodeError::InvalidReservedFlags { packet_type, flags });
                }
            }
            _ => {
                if flags != 0 {
                    return Err(DecodeError::InvalidReservedFlags { packet_type, flags });
                }
            }
        }
        Ok(())
    }

    fn decode_body(
        &mut self,
        packet_type: u8,
        flags: u8,
        r: &mut Reader,
    ) -> Result<Packet, DecodeError> {
        let v5 = self.v5();
        Ok(match packet_type {
            CONNECT => Packet::Connect(Box::new(self.decode_connect(r)?)),
            CONNACK => Packet::ConnAck(decode_connack(r, v5)?),
            PUBLISH => Packet::Publish(decode_publish(r, flags, v5)?),
            PUBACK => Packet::PubAck(decode_ack(r, v5, Ctx::PubAck)?),
            PUBREC => Packet::PubRec(decode_ack(r, v5, Ctx::PubRec)?),
            PUBREL => Packet::PubRel(decode_ack(r, v5, Ctx::PubRel)?),
            PUBCOMP => Packet::PubComp(decode_ack(r, v5, Ctx::PubComp)?),
            SUBSCRIBE => Packet::Subscribe(decode_subscribe(r, v5)?),
            SUBACK => Packet::SubAck(decode_suback(r, v5)?),
            UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(r, v5)?),
            UNSUBACK => Packet::UnsubAck(decode_unsuback(r, v5)?),
            PINGREQ => Packet::PingReq,
            PINGRESP => Packet::PingResp,
            DISCONNECT => Packet::Disconnect(decode_disconnect(r, v5)?),
            AUTH => Packet::Auth(decode_auth(r)?),
            other => return Err(DecodeError::InvalidPacketType(other)),
        })
    }

    fn decode_connect(&mut self, r: &mut Reader) -> Result<Connect, DecodeError> {
        let name = r.string()?;
        let level = r.u8()?;
        let protocol = match (name.as_str(), level) {
            ("MQTT", 4) => ProtocolVersion::V311,
            ("MQTT", 5) => ProtocolVersion::V5,
            ("MQIsdp", 3) => ProtocolVersion::V31,
            ("MQTT", _) | ("MQIsdp", _) => {
                return Err(DecodeError::UnsupportedProtocolVersion(level))
            }
            _ => return Err(DecodeError::InvalidProtocolName),
        };
        self.version = Some(protocol);
        let v5 = protocol.is_v5();

        let flags = r.u8()?;
        if flags & 0x01 != 0 {
            return Err(DecodeError::InvalidConnectFlags);
        }
        let clean_start = flags & 0x02 != 0;
        let will_flag = flags & 0x04 != 0;
        let will_qos_bits = (flags >> 3) & 0b11;
        let will_retain = flags & 0x20 != 0;
        let password_flag = flags & 0x40 != 0;
        let username_flag = flags & 0x80 != 0;
        if !will_flag && (will_qos_bits != 0 || will_retain) {
            return Err(DecodeError::InvalidWillFlags);
        }
        let will_qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::InvalidQoS(will_qos_bits))?;
        if !v5 && password_flag && !username_flag {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive = r.u16()?;
        let properties = if v5 {
            decode_properties(r, Ctx::Connect)?
        } else {
            Properties::default()
        };

        let client_id = r.string()?;
        if !v5 && client_id.is_empty() && !clean_start {
            return Err(DecodeError::EmptyClientIdWithoutCleanSession);
        }
        let will = if will_flag {
            let properties = if v5 {
                decode_properties(r, Ctx::Will)?
            } else {
                Properties::default()
            };
            let topic = r.string()?;
            topic::validate_topic_name(&topic).map_err(DecodeError::InvalidTopicName)?;
            let payload = r.binary()?;
            Some(LastWill {
                topic,
                payload,
                qos: will_qos,
                retain: will_retain,
                properties,
            })
        } else {
            None
        };
        let username = if username_flag {
            Some(r.string()?)
        } else {
            None
        };
        let password = if password_flag {
            Some(r.binary()?)
        } else {
            None
        };
        Ok(Connect {
            protocol,
            clean_start,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
        })
    }
}

fn decode_connack(r: &mut Reader, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::InvalidConnAckFlags);
    }
    let session_present = flags & 0x01 != 0;
    let code = r.u8()?;
    let reason = if v5 {
        decode_reason(code, "connack")?
    } else {
        v3_connack_reason(code).ok_or(DecodeError::InvalidReasonCode {
            packet: "connack",
            code,
        })?
    };
    if session_present && reason != ReasonCode::Success {
        return Err(DecodeError::SessionPresentWithError);
    }
    let properties = if v5 {
        decode_properties(r, Ctx::ConnAck)?
    } else {
        Properties::default()
    };
    Ok(ConnAck {
        session_present,
        reason,
        properties,
    })
}

fn decode_publish(r: &mut Reader, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    let qos_bits = (flags >> 1) & 0b11;
    let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
    let dup = flags & 0b1000 != 0;
    let retain = flags & 0b0001 != 0;
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(nonzero_packet_id(r)?)
    };
    let properties = if v5 {
        decode_properties(r, Ctx::Publish)?
    } else {
        Properties::default()
    };
    // An empty topic name is how MQTT 5 says "use the Topic Alias".
    if !(topic.is_empty() && properties.topic_alias.is_some()) {
        topic::validate_topic_name(&topic).map_err(DecodeError::InvalidTopicName)?;
    }
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        // Zero-copy: a slice of the frame.
        payload: r.rest(),
        properties,
    })
}

fn decode_ack(r: &mut Reader, v5: bool, ctx: Ctx) -> Result<Ack, DecodeError> {
    let packet_id = nonzero_packet_id(r)?;
    if !v5 {
        return Ok(Ack::new(packet_id));
    }
    // Remaining length 2: Success, no properties; 3: no property length.
    let reason = if r.remaining() == 0 {
        ReasonCode::Success
    } else {
        decode_reason(r.u8()?, ctx.name())?
    };
    let properties = if r.remaining() == 0 {
        Properties::default()
    } else {
        decode_properties(r, ctx)?
    };
    Ok(Ack {
        packet_id,
        reason,
        properties,
    })
}

fn decode_subscription_options(b: u8, v5: bool) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = if v5 { 0b1100_0000 } else { 0b1111_1100 };
    if b & reserved != 0 {
        return Err(DecodeError::InvalidSubscriptionOptions(b));
    }
    let qos_bits = b & 0b11;
    let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
    let retain_handling = match (b >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::InvalidRetainHandling),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: b & 0b0100 != 0,
        retain_as_published: b & 0b1000 != 0,
        retain_handling,
    })
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = nonzero_packet_id(r)?;
    let properties = if v5 {
        decode_properties(r, Ctx::Subscribe)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string()?;
        let options = decode_subscription_options(r.u8()?, v5)?;
        let shared = check_filter(&filter, v5)?;
        if shared && options.no_local {
            return Err(DecodeError::NoLocalOnSharedSubscription);
        }
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptyPayload {
            packet: "subscribe",
        });
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = nonzero_packet_id(r)?;
    let properties = if v5 {
        decode_properties(r, Ctx::SubAck)?
    } else {
        Properties::default()
    };
    let mut reasons = Vec::with_capacity(r.remaining());
    while r.remaining() > 0 {
        let code = r.u8()?;
        let reason = if v5 {
            decode_reason(code, "suback")?
        } else {
            v3_suback_reason(code).ok_or(DecodeError::InvalidReasonCode {
                packet: "suback",
                code,
            })?
        };
        reasons.push(reason);
    }
    if reasons.is_empty() {
        return Err(DecodeError::EmptyPayload { packet: "suback" });
    }
    Ok(SubAck {
        packet_id,
        reasons,
        properties,
    })
}

fn decode_unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = nonzero_packet_id(r)?;
    let properties = if v5 {
        decode_properties(r, Ctx::Unsubscribe)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string()?;
        check_filter(&filter, v5)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptyPayload {
            packet: "unsubscribe",
        });
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = nonzero_packet_id(r)?;
    if !v5 {
        return Ok(UnsubAck {
            packet_id,
            reasons: Vec::new(),
            properties: Properties::default(),
        });
    }
    let properties = decode_properties(r, Ctx::UnsubAck)?;
    let mut reasons = Vec::with_capacity(r.remaining());
    while r.remaining() > 0 {
        reasons.push(decode_reason(r.u8()?, "unsuback")?);
    }
    if reasons.is_empty() {
        return Err(DecodeError::EmptyPayload { packet: "unsuback" });
    }
    Ok(UnsubAck {
        packet_id,
        reasons,
        properties,
    })
}

fn decode_disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    if !v5 || r.remaining() == 0 {
        return Ok(Disconnect::new(ReasonCode::Success));
    }
    let reason = decode_reason(r.u8()?, "disconnect")?;
    // Remaining length 1: no property length [MQTT 5 3.14.2.2.1].
    let properties = if r.remaining() == 0 {
        Properties::default()
    } else {
        decode_properties(r, Ctx::Disconnect)?
    };
    Ok(Disconnect { reason, properties })
}

fn decode_auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    if r.remaining() == 0 {
        return Ok(Auth {
            reason: ReasonCode::Success,
            properties: Properties::default(),
        });
    }
    let reason = decode_reason(r.u8()?, "auth")?;
    // Unlike DISCONNECT, AUTH has no short form with only a reason code.
    let properties = decode_properties(r, Ctx::Auth)?;
    Ok(Auth { reason, properties })
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Output of the body writer: the real buffer, or a byte counter used to
/// compute lengths before writing (so both passes share one code path and
/// `encoded_len` always agrees with `encode`).
trait Sink {
    fn emit(&mut self, data: &[u8]);

    fn byte(&mut self, b: u8) {
        self.emit(&[b]);
    }
    fn u16(&mut self, v: u16) {
        self.emit(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.emit(&v.to_be_bytes());
    }
}

impl Sink for BytesMut {
    fn emit(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }
}

struct Counter(usize);

impl Sink for Counter {
    fn emit(&mut self, data: &[u8]) {
        self.0 += data.len();
    }
}

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint<S: Sink>(s: &mut S, v: u32, what: &'static str) -> Result<(), EncodeError> {
    if v > MAX_VARIABLE_BYTE_INTEGER {
        return Err(EncodeError::ValueOutOfRange { what });
    }
    let mut v = v;
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        s.byte(b);
        if v == 0 {
            return Ok(());
        }
    }
}

fn put_str<S: Sink>(s: &mut S, v: &str) -> Result<(), EncodeError> {
    let len = u16::try_from(v.len()).map_err(|_| EncodeError::StringTooLong { len: v.len() })?;
    if v.contains('\0') {
        return Err(EncodeError::NullCharacter);
    }
    s.u16(len);
    s.emit(v.as_bytes());
    Ok(())
}

fn put_binary<S: Sink>(s: &mut S, v: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(v.len()).map_err(|_| EncodeError::BinaryTooLong { len: v.len() })?;
    s.u16(len);
    s.emit(v);
    Ok(())
}

fn put_topic_name<S: Sink>(s: &mut S, v: &str) -> Result<(), EncodeError> {
    // The check covers U+0000: `put_str` would scan for it again.
    topic::validate_topic_name(v).map_err(EncodeError::InvalidTopicName)?;
    put_binary(s, v.as_bytes())
}

fn put_filter<S: Sink>(s: &mut S, v: &str, v5: bool) -> Result<bool, EncodeError> {
    topic::validate_topic_filter(v).map_err(EncodeError::InvalidTopicFilter)?;
    let shared = v5 && topic::is_shared(v);
    if shared && SharedFilter::parse(v).is_none() {
        return Err(EncodeError::InvalidTopicFilter(
            TopicError::InvalidSharedSubscription,
        ));
    }
    put_str(s, v)?;
    Ok(shared)
}

fn nonzero(id: u16) -> Result<u16, EncodeError> {
    if id == 0 {
        Err(EncodeError::ZeroPacketId)
    } else {
        Ok(id)
    }
}

fn check_reason(packet: &'static str, code: ReasonCode) -> Result<u8, EncodeError> {
    if reason_allowed_in(packet, code) {
        Ok(code as u8)
    } else {
        Err(EncodeError::InvalidReasonCode { packet, code })
    }
}

/// Writes one property header after checking it may appear in `ctx`.
fn prop_id<S: Sink>(s: &mut S, ctx: Ctx, pid: u8) -> Result<(), EncodeError> {
    if property_allowed(pid, ctx) != Some(true) {
        return Err(EncodeError::PropertyNotAllowed {
            packet: ctx.name(),
            id: pid,
        });
    }
    s.byte(pid);
    Ok(())
}

fn prop_flag<S: Sink>(s: &mut S, ctx: Ctx, pid: u8, v: Option<u8>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        if v > 1 {
            return Err(EncodeError::InvalidPropertyValue { id: pid });
        }
        prop_id(s, ctx, pid)?;
        s.byte(v);
    }
    Ok(())
}

fn prop_u16<S: Sink>(s: &mut S, ctx: Ctx, pid: u8, v: Option<u16>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        prop_id(s, ctx, pid)?;
        s.u16(v);
    }
    Ok(())
}

fn prop_u32<S: Sink>(s: &mut S, ctx: Ctx, pid: u8, v: Option<u32>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        prop_id(s, ctx, pid)?;
        s.u32(v);
    }
    Ok(())
}

fn prop_str<S: Sink>(s: &mut S, ctx: Ctx, pid: u8, v: &Option<String>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        prop_id(s, ctx, pid)?;
        put_str(s, v)?;
    }
    Ok(())
}

fn prop_bin<S: Sink>(s: &mut S, ctx: Ctx, pid: u8, v: &Option<Bytes>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        prop_id(s, ctx, pid)?;
        put_binary(s, v)?;
    }
    Ok(())
}

/// Property list contents without the length prefix; with `d`, its three
/// fields in place of `p`'s (one writer, so a borrowed delivery encodes to
/// the bytes of the owned one).
fn put_property_list<S: Sink>(
    s: &mut S,
    p: &Properties,
    ctx: Ctx,
    d: Option<&PerDelivery<'_>>,
) -> Result<(), EncodeError> {
    let expiry = d.map_or(p.message_expiry_interval, |d| d.message_expiry_interval);
    let subscription_ids = d.map_or(&p.subscription_identifiers[..], |d| {
        d.subscription_identifiers
    });
    let topic_alias = d.map_or(p.topic_alias, |d| d.topic_alias);
    prop_flag(
        s,
        ctx,
        id::PAYLOAD_FORMAT_INDICATOR,
        p.payload_format_indicator,
    )?;
    prop_u32(s, ctx, id::MESSAGE_EXPIRY_INTERVAL, expiry)?;
    prop_str(s, ctx, id::CONTENT_TYPE, &p.content_type)?;
    if let Some(t) = &p.response_topic {
        prop_id(s, ctx, id::RESPONSE_TOPIC)?;
        put_topic_name(s, t)?;
    }
    prop_bin(s, ctx, id::CORRELATION_DATA, &p.correlation_data)?;
    if ctx != Ctx::Publish && subscription_ids.len() > 1 {
        return Err(EncodeError::InvalidPropertyValue {
            id: id::SUBSCRIPTION_IDENTIFIER,
        });
    }
    for &sid in subscription_ids {
        if sid == 0 {
            return Err(EncodeError::InvalidPropertyValue {
                id: id::SUBSCRIPTION_IDENTIFIER,
            });
        }
        prop_id(s, ctx, id::SUBSCRIPTION_IDENTIFIER)?;
        put_varint(s, sid, "subscription identifier")?;
    }
    prop_u32(
        s,
        ctx,
        id::SESSION_EXPIRY_INTERVAL,
        p.session_expiry_interval,
    )?;
    prop_str(
        s,
        ctx,
        id::ASSIGNED_CLIENT_IDENTIFIER,
        &p.assigned_client_identifier,
    )?;
    prop_u16(s, ctx, id::SERVER_KEEP_ALIVE, p.server_keep_alive)?;
    prop_str(s, ctx, id::AUTHENTICATION_METHOD, &p.authentication_method)?;
    prop_bin(s, ctx, id::AUTHENTICATION_DATA, &p.authentication_data)?;
    prop_flag(
        s,
        ctx,
        id::REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information,
    )?;
    prop_u32(s, ctx, id::WILL_DELAY_INTERVAL, p.will_delay_interval)?;
    prop_flag(
        s,
        ctx,
        id::REQUEST_RESPONSE_INFORMATION,
        p.request_response_information,
    )?;
    prop_str(s, ctx, id::RESPONSE_INFORMATION, &p.response_information)?;
    prop_str(s, ctx, id::SERVER_REFERENCE, &p.server_reference)?;
    prop_str(s, ctx, id::REASON_STRING, &p.reason_string)?;
    if p.receive_maximum == Some(0) {
        return Err(EncodeError::InvalidPropertyValue {
            id: id::RECEIVE_MAXIMUM,
        });
    }
    prop_u16(s, ctx, id::RECEIVE_MAXIMUM, p.receive_maximum)?;
    prop_u16(s, ctx, id::TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum)?;
    if topic_alias == Some(0) {
        return Err(EncodeError::InvalidPropertyValue {
            id: id::TOPIC_ALIAS,
        });
    }
    prop_u16(s, ctx, id::TOPIC_ALIAS, topic_alias)?;
    prop_flag(s, ctx, id::MAXIMUM_QOS, p.maximum_qos)?;
    prop_flag(s, ctx, id::RETAIN_AVAILABLE, p.retain_available)?;
    for (k, v) in &p.user_properties {
        prop_id(s, ctx, id::USER_PROPERTY)?;
        put_str(s, k)?;
        put_str(s, v)?;
    }
    if p.maximum_packet_size == Some(0) {
        return Err(EncodeError::InvalidPropertyValue {
            id: id::MAXIMUM_PACKET_SIZE,
        });
    }
    prop_u32(s, ctx, id::MAXIMUM_PACKET_SIZE, p.maximum_packet_size)?;
    prop_flag(
        s,
        ctx,
        id::WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    )?;
    prop_flag(
        s,
        ctx,
        id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifier_available,
    )?;
    prop_flag(
        s,
        ctx,
        id::SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    )?;
    if ctx == Ctx::Connect && p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(EncodeError::AuthDataWithoutMethod);
    }
    Ok(())
}

fn put_properties<S: Sink>(s: &mut S, p: &Properties, ctx: Ctx) -> Result<(), EncodeError> {
    put_properties_with(s, p, ctx, None)
}

fn put_properties_with<S: Sink>(
    s: &mut S,
    p: &Properties,
    ctx: Ctx,
    d: Option<&PerDelivery<'_>>,
) -> Result<(), EncodeError> {
    let mut c = Counter(0);
    put_property_list(&mut c, p, ctx, d)?;
    let len = u32::try_from(c.0).unwrap_or(u32::MAX);
    put_varint(s, len, "property length")?;
    put_property_list(s, p, ctx, d)
}

fn publish_first_byte(p: &PublishRef<'_>) -> u8 {
    (PUBLISH << 4) | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain)
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => CONNECT << 4,
        Packet::ConnAck(_) => CONNACK << 4,
        Packet::Publish(p) => publish_first_byte(&p.borrowed()),
        Packet::PubAck(_) => PUBACK << 4,
        Packet::PubRec(_) => PUBREC << 4,
        Packet::PubRel(_) => (PUBREL << 4) | 0b0010,
        Packet::PubComp(_) => PUBCOMP << 4,
        Packet::Subscribe(_) => (SUBSCRIBE << 4) | 0b0010,
        Packet::SubAck(_) => SUBACK << 4,
        Packet::Unsubscribe(_) => (UNSUBSCRIBE << 4) | 0b0010,
        Packet::UnsubAck(_) => UNSUBACK << 4,
        Packet::PingReq => PINGREQ << 4,
        Packet::PingResp => PINGRESP << 4,
        Packet::Disconnect(_) => DISCONNECT << 4,
        Packet::Auth(_) => AUTH << 4,
    }
}

fn put_connect<S: Sink>(s: &mut S, c: &Connect) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    match c.protocol {
        ProtocolVersion::V31 => {
            put_str(s, "MQIsdp")?;
            s.byte(3);
        }
        ProtocolVersion::V311 => {
            put_str(s, "MQTT")?;
            s.byte(4);
        }
        ProtocolVersion::V5 => {
            put_str(s, "MQTT")?;
            s.byte(5);
        }
    }
    if !v5 {
        if c.password.is_some() && c.username.is_none() {
            return Err(EncodeError::PasswordWithoutUsername);
        }
        if c.client_id.is_empty() && !c.clean_start {
            return Err(EncodeError::EmptyClientIdWithoutCleanSession);
        }
    }
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    s.byte(flags);
    s.u16(c.keep_alive);
    if v5 {
        put_properties(s, &c.properties, Ctx::Connect)?;
    }
    put_str(s, &c.client_id)?;
    if let Some(w) = &c.will {
        if v5 {
            put_properties(s, &w.properties, Ctx::Will)?;
        }
        put_topic_name(s, &w.topic)?;
        put_binary(s, &w.payload)?;
    }
    if let Some(u) = &c.username {
        put_str(s, u)?;
    }
    if let Some(p) = &c.password {
        put_binary(s, p)?;
    }
    Ok(())
}

fn put_connack<S: Sink>(s: &mut S, c: &ConnAck, v5: bool) -> Result<(), EncodeError> {
    let code = check_reason("connack", c.reason)?;
    if c.session_present && c.reason != ReasonCode::Success {
        return Err(EncodeError::SessionPresentWithError);
    }
    s.byte(u8::from(c.session_present));
    if v5 {
        s.byte(code);
        put_properties(s, &c.properties, Ctx::ConnAck)?;
    } else {
        s.byte(v3_connack_code(c.reason));
    }
    Ok(())
}

fn put_publish<S: Sink>(s: &mut S, p: &PublishRef<'_>, v5: bool) -> Result<(), EncodeError> {
    match (p.qos, p.packet_id) {
        (QoS::AtMostOnce, Some(_)) => return Err(EncodeError::UnexpectedPacketId),
        (QoS::AtMostOnce, None) if p.dup => return Err(EncodeError::DupWithQoS0),
        (QoS::AtLeastOnce | QoS::ExactlyOnce, None) => return Err(EncodeError::MissingPacketId),
        _ => {}
    }
    if v5 && p.topic.is_empty() && p.topic_alias().is_some() {
        put_str(s, "")?;
    } else {
        put_topic_name(s, p.topic)?;
    }
    if let Some(id) = p.packet_id {
        s.u16(nonzero(id)?);
    }
    if v5 {
        put_properties_with(s, p.properties, Ctx::Publish, p.per_delivery.as_ref())?;
    }
    s.emit(p.payload);
    Ok(())
}

fn put_ack<S: Sink>(s: &mut S, a: &Ack, v5: bool, ctx: Ctx) -> Result<(), EncodeError> {
    s.u16(nonzero(a.packet_id)?);
    if !v5 {
        return Ok(());
    }
    let code = check_reason(ctx.name(), a.reason)?;
    // Short forms: 2 bytes for Success without properties, 3 without properties.
    if a.properties.is_empty() {
        if a.reason != ReasonCode::Success {
            s.byte(code);
        }
        return Ok(());
    }
    s.byte(code);
    put_properties(s, &a.properties, ctx)
}

fn put_subscribe<S: Sink>(s: &mut S, p: &Subscribe, v5: bool) -> Result<(), EncodeError> {
    s.u16(nonzero(p.packet_id)?);
    if p.filters.is_empty() {
        return Err(EncodeError::EmptyPayload {
            packet: "subscribe",
        });
    }
    if v5 {
        put_properties(s, &p.properties, Ctx::Subscribe)?;
    }
    for (filter, o) in &p.filters {
        let shared = put_filter(s, filter, v5)?;
        let mut b = o.qos as u8;
        if v5 {
            if shared && o.no_local {
                return Err(EncodeError::NoLocalOnSharedSubscription);
            }
            b |= u8::from(o.no_local) << 2;
            b |= u8::from(o.retain_as_published) << 3;
            b |= (o.retain_handling as u8) << 4;
        }
        s.byte(b);
    }
    Ok(())
}

fn put_suback<S: Sink>(s: &mut S, p: &SubAck, v5: bool) -> Result<(), EncodeError> {
    s.u16(nonzero(p.packet_id)?);
    if p.reasons.is_empty() {
        return Err(EncodeError::EmptyPayload { packet: "suback" });
    }
    if v5 {
        put_properties(s, &p.properties, Ctx::SubAck)?;
    }
    for &r in &p.reasons {
        let code = check_reason("suback", r)?;
        if v5 {
            s.byte(code);
        } else {
            let c = v3_suback_code(r).ok_or(EncodeError::InvalidReasonCode {
                packet: "suback",
                code: r,
            })?;
            s.byte(c);
        }
    }
    Ok(())
}

fn put_unsubscribe<S: Sink>(s: &mut S, p: &Unsubscribe, v5: bool) -> Result<(), EncodeError> {
    s.u16(nonzero(p.packet_id)?);
    if p.filters.is_empty() {
        return Err(EncodeError::EmptyPayload {
            packet: "unsubscribe",
        });
    }
    if v5 {
        put_properties(s, &p.properties, Ctx::Unsubscribe)?;
    }
    for f in &p.filters {
        put_filter(s, f, v5)?;
    }
    Ok(())
}

fn put_unsuback<S: Sink>(s: &mut S, p: &UnsubAck, v5: bool) -> Result<(), EncodeError> {
    s.u16(nonzero(p.packet_id)?);
    if !v5 {
        return Ok(());
    }
    if p.reasons.is_empty() {
        return Err(EncodeError::EmptyPayload { packet: "unsuback" });
    }
    put_properties(s, &p.properties, Ctx::UnsubAck)?;
    for &r in &p.reasons {
        s.byte(check_reason("unsuback", r)?);
    }
    Ok(())
}

fn put_disconnect<S: Sink>(s: &mut S, d: &Disconnect, v5: bool) -> Result<(), EncodeError> {
    if !v5 {
        return Ok(());
    }
    let code = check_reason("disconnect", d.reason)?;
    if d.properties.is_empty() {
        if d.reason != ReasonCode::Success {
            s.byte(code);
        }
        return Ok(());
    }
    s.byte(code);
    put_properties(s, &d.properties, Ctx::Disconnect)
}

fn put_auth<S: Sink>(s: &mut S, a: &Auth) -> Result<(), EncodeError> {
    let code = check_reason("auth", a.reason)?;
    if a.reason == ReasonCode::Success && a.properties.is_empty() {
        return Ok(());
    }
    s.byte(code);
    put_properties(s, &a.properties, Ctx::Auth)
}

fn put_body<S: Sink>(
    s: &mut S,
    packet: &Packet,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => put_connect(s, c),
        Packet::ConnAck(c) => put_connack(s, c, v5),
        Packet::Publish(p) => put_publish(s, &p.borrowed(), v5),
        Packet::PubAck(a) => put_ack(s, a, v5, Ctx::PubAck),
        Packet::PubRec(a) => put_ack(s, a, v5, Ctx::PubRec),
        Packet::PubRel(a) => put_ack(s, a, v5, Ctx::PubRel),
        Packet::PubComp(a) => put_ack(s, a, v5, Ctx::PubComp),
        Packet::Subscribe(p) => put_subscribe(s, p, v5),
        Packet::SubAck(p) => put_suback(s, p, v5),
        Packet::Unsubscribe(p) => put_unsubscribe(s, p, v5),
        Packet::UnsubAck(p) => put_unsuback(s, p, v5),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => put_disconnect(s, d, v5),
        Packet::Auth(a) if v5 => put_auth(s, a),
        Packet::Auth(_) => Err(EncodeError::NotSupportedInVersion {
            packet: "auth",
            version,
        }),
    }
}

/// Remaining length of the packet, validated.
fn body_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    counted(|c| put_body(c, packet, version))
}

/// The body length `put` writes, within the remaining-length limit.
fn counted(
    put: impl FnOnce(&mut Counter) -> Result<(), EncodeError>,
) -> Result<usize, EncodeError> {
    let mut c = Counter(0);
    put(&mut c)?;
    if c.0 > MAX_VARIABLE_BYTE_INTEGER as usize {
        return Err(EncodeError::PacketTooLarge {
            remaining_length: c.0,
        });
    }
    Ok(c.0)
}

/// Encode for the given version (v3 encoding drops properties and maps
/// reason codes to 3.1.1 return codes). A CONNECT is always encoded in its
/// own `protocol` version, whatever `version` says.
///
/// On error nothing is appended to `out`.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let remaining = body_len(packet, version)?;
    put_framed(out, first_byte(packet), remaining, |out| {
        put_body(out, packet, version)
    })
}

/// `encode` of a borrowed PUBLISH.
pub fn encode_publish(
    p: &PublishRef<'_>,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    let remaining = counted(|c| put_publish(c, p, v5))?;
    put_framed(out, publish_first_byte(p), remaining, |out| {
        put_publish(out, p, v5)
    })
}

/// `encode_publish`, unless the packet would be longer than `max_len`
/// bytes: then nothing is appended and the answer is `Ok(None)`; else the
/// packet's length. A broker must never send a client more than its
/// Maximum Packet Size [MQTT-3.1.2-25]; asking `publish_encoded_len` first
/// and then encoding counted the packet twice.
pub fn encode_publish_within(
    p: &PublishRef<'_>,
    version: ProtocolVersion,
    max_len: usize,
    out: &mut BytesMut,
) -> Result<Option<usize>, EncodeError> {
    let v5 = version.is_v5();
    let remaining = counted(|c| put_publish(c, p, v5))?;
    let len = 1 + varint_len(remaining) + remaining;
    if len > max_len {
        return Ok(None);
    }
    put_framed(out, publish_first_byte(p), remaining, |out| {
        put_publish(out, p, v5)
    })?;
    Ok(Some(len))
}

/// Appends the fixed header and the body `put` writes (`remaining` bytes
/// long); on error nothing is appended.
fn put_framed(
    out: &mut BytesMut,
    first: u8,
    remaining: usize,
    put: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.reserve(1 + varint_len(remaining) + remaining);
    out.emit(&[first]);
    let written = put_varint(out, remaining as u32, "remaining length").and_then(|()| put(out));
    if written.is_err() {
        out.truncate(start);
    }
    written
}

/// Size in bytes the packet would have on the wire for `version`.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let remaining = body_len(packet, version)?;
    Ok(1 + varint_len(remaining) + remaining)
}

/// `encoded_len` of a PUBLISH not (yet) wrapped in a `Packet`: a broker
/// checks a delivery's size against the client's maximum before it decides
/// whether to keep a copy, so it need not clone the PUBLISH to ask.
pub fn publish_encoded_len(
    p: &PublishRef<'_>,
    version: ProtocolVersion,
) -> Result<usize, EncodeError> {
    let remaining = counted(|c| put_publish(c, p, version.is_v5()))?;
    Ok(1 + varint_len(remaining) + remaining)
}
