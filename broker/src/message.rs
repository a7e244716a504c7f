//! An application message as the broker moves it between MQTT and Kafka, and
//! its Kafka record form (key = MQTT topic, value = payload, metadata in
//! headers). Pure logic: the Kafka client code lives in `kafka/`.
//!
//! Header schema (version 1), all values UTF-8 unless noted:
//! - `mqtt.qos`: "0" | "1" | "2" (QoS the publisher used)
//! - `mqtt.retain`: "1" when the publisher set RETAIN (absent otherwise)
//! - `mqtt.client_id`: publishing client id (absent for records from other producers)
//! - `mqtt.content_type`, `mqtt.response_topic`: MQTT 5 properties
//! - `mqtt.payload_format`: "0" | "1"
//! - `mqtt.correlation_data`: raw bytes
//! - `mqtt.message_expiry`: seconds, counted from the record timestamp
//! - `mqtt.packet_id`, `mqtt.qos2_seq`: on QoS 2 records only, the
//!   publisher's packet id and the session's QoS 2 sequence number (decimal),
//!   which let a node recognise a retransmission after a crash
//!   (`inbound_qos2.rs`)
//! - `mqtt.topic`: the MQTT topic, on records whose key a mapping rule's
//!   key template made (the key is then not the topic)
//! - any header whose name does not start with `mqtt.` is an MQTT 5 user
//!   property (so plain Kafka producers can set user properties); a user
//!   property whose name starts with `mqtt.` is escaped as `mqtt.user.<name>`.

use bytes::Bytes;
use lodestream_mqtt::{Properties, QoS, TopicError};

use crate::kafka::produce::request::Header;

pub const H_QOS: &str = "mqtt.qos";
pub const H_RETAIN: &str = "mqtt.retain";
pub const H_CLIENT_ID: &str = "mqtt.client_id";
pub const H_CONTENT_TYPE: &str = "mqtt.content_type";
pub const H_RESPONSE_TOPIC: &str = "mqtt.response_topic";
pub const H_PAYLOAD_FORMAT: &str = "mqtt.payload_format";
pub const H_CORRELATION: &str = "mqtt.correlation_data";
pub const H_EXPIRY: &str = "mqtt.message_expiry";
pub const H_PACKET_ID: &str = "mqtt.packet_id";
pub const H_QOS2_SEQ: &str = "mqtt.qos2_seq";
pub const H_TOPIC: &str = "mqtt.topic";
const USER_ESCAPE: &str = "mqtt.user.";

/// Identifies the write of one inbound QoS 2 flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos2Flow {
    pub packet_id: u16,
    pub seq: u64,
}

impl Qos2Flow {
    pub fn push_headers(&self, h: &mut Vec<Header>) {
        h.push((H_PACKET_ID.into(), Bytes::from(self.packet_id.to_string())));
        h.push((H_QOS2_SEQ.into(), Bytes::from(self.seq.to_string())));
    }

    /// The publishing client id and flow of a record, if it has both.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Option<(&'a str, Qos2Flow)> {
        let (mut client, mut id, mut seq) = (None, None, None);
        for (name, value) in headers {
            let text = value.and_then(|v| std::str::from_utf8(v).ok());
            match name {
                H_CLIENT_ID => client = text,
                H_PACKET_ID => id = text.and_then(|t| t.parse::<u16>().ok()),
                H_QOS2_SEQ => seq = text.and_then(|t| t.parse::<u64>().ok()),
                _ => {}
            }
        }
        Some((
            client?,
            Qos2Flow {
                packet_id: id?,
                seq: seq?,
            },
        ))
    }
}

/// Why a Kafka record cannot become an MQTT message. Such records are
/// skipped by every reader (fan-out, retained, catch-up) alike.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAMessage {
    #[error("record has no key (the key is the MQTT topic)")]
    NoKey,
    #[error("record key is not UTF-8")]
    KeyNotUtf8,
    #[error("record key {key:?} is not a valid MQTT topic name: {reason}")]
    KeyNotTopicName { key: String, reason: TopicError },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Only the properties that travel with a message: payload format,
    /// expiry, content type, response topic, correlation data, user properties.
    pub properties: MessageProperties,
    /// The publishing client's id (UTF-8), as the client-id header carries
    /// it: a connection makes it once and shares it with each of its
    /// messages' records (was copied into every record's header).
    pub publisher: Option<Bytes>,
    /// Milliseconds since the epoch when the broker (or a Kafka producer)
    /// wrote the message; expiry counts from here.
    pub timestamp_ms: i64,
}

/// A message's MQTT 5 properties, boxed and only when it has some.
///
/// Why not `Properties` inline: it is about 330 bytes, most messages (every
/// 3.1.1 one, most records from other producers) carry none, and a
/// `Message` is moved several times between a fetched record and its `Arc`:
/// five `memcpy`s of the whole struct were 8 % of the read path's
/// instructions. Reads deref to the set (`Properties::EMPTY` when absent);
/// a write through `DerefMut` allocates it.
#[derive(Debug, Clone, Default)]
pub struct MessageProperties(Option<Box<Properties>>);

/// Equal when the sets are: a box emptied by writes equals none.
impl PartialEq for MessageProperties {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for MessageProperties {}

/// `Properties::EMPTY` at a fixed address (a `const` of a type with drop
/// glue is not promoted to a `'static` reference).
static NO_PROPERTIES: Properties = Properties::EMPTY;

impl From<Properties> for MessageProperties {
    fn from(p: Properties) -> Self {
        MessageProperties((!p.is_empty()).then(|| Box::new(p)))
    }
}

impl std::ops::Deref for MessageProperties {
    type Target = Properties;

    fn deref(&self) -> &Properties {
        self.0.as_deref().unwrap_or(&NO_PROPERTIES)
    }
}

impl std::ops::DerefMut for MessageProperties {
    fn deref_mut(&mut self) -> &mut Properties {
        self.0.get_or_insert_with(Box::default)
    }
}

impl Message {
    /// Properties a PUBLISH carries on to subscribers [MQTT-3.3.2-*]: topic
    /// alias and subscription identifiers are per-connection and dropped.
    pub fn forwardable_properties(p: &Properties) -> MessageProperties {
        Properties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            ..Properties::default()
        }
        .into()
    }

    /// Seconds of lifetime left at `now_ms`: `None` = never expires,
    /// `Some(0)` = expired [MQTT-3.3.2-5].
    pub fn remaining_expiry(&self, now_ms: i64) -> Option<u32> {
        let interval = self.properties.message_expiry_interval?;
        let elapsed_s = ((now_ms - self.timestamp_ms).max(0) / 1000) as u64;
        Some((interval as u64).saturating_sub(elapsed_s) as u32)
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.properties.message_expiry_interval.is_some()
            && self.remaining_expiry(now_ms) == Some(0)
    }

    /// Kafka record headers for this message, in a stable order.
    pub fn to_headers(&self) -> Vec<Header> {
        // One byte strings for the digits: no allocation for QoS, RETAIN
        // and the payload format, which every record carries.
        let digit = |d: u8| Bytes::from_static(&b"0123456789"[d as usize..=d as usize]);
        let mut h: Vec<Header> = Vec::with_capacity(4);
        h.push((H_QOS.into(), digit(self.qos as u8)));
        if self.retain {
            h.push((H_RETAIN.into(), digit(1)));
        }
        if let Some(c) = &self.publisher {
            h.push((H_CLIENT_ID.into(), c.clone()));
        }
        let p = &self.properties;
        if let Some(v) = p.payload_format_indicator {
            h.push((H_PAYLOAD_FORMAT.into(), digit(v.min(9))));
        }
        if let Some(v) = p.message_expiry_interval {
            h.push((H_EXPIRY.into(), Bytes::from(v.to_string())));
        }
        if let Some(v) = &p.content_type {
            h.push((H_CONTENT_TYPE.into(), Bytes::copy_from_slice(v.as_bytes())));
        }
        if let Some(v) = &p.response_topic {
            h.push((
                H_RESPONSE_TOPIC.into(),
                Bytes::copy_from_slice(v.as_bytes()),
            ));
        }
        if let Some(v) = &p.correlation_data {
            h.push((H_CORRELATION.into(), v.clone()));
        }
        for (k, v) in &p.user_properties {
            let name = if k.starts_with("mqtt.") {
                format!("{USER_ESCAPE}{k}")
            } else {
                k.clone()
            };
            h.push((name.into(), Bytes::copy_from_slice(v.as_bytes())));
        }
        h
    }

    /// Rebuilds a message from a Kafka record, the one conversion every
    /// reader uses. The key must be a valid MQTT topic name (UTF-8, no
    /// wildcards [MQTT-3.3.2-2], ...): a record from another producer keyed
    /// `cars/+` could not be sent in a PUBLISH. Records from producers other
    /// than the broker may lack every header: they become QoS 0 (unless
    /// `mqtt.qos` says otherwise), non-retained messages. Headers that are not
    /// valid UTF-8 where UTF-8 is required are skipped rather than
    /// forwarded, because MQTT forbids invalid UTF-8 strings [MQTT-1.5.4-1].
    pub fn try_from_record<'a>(
        key: Option<&[u8]>,
        payload: Bytes,
        timestamp_ms: i64,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)> + Clone,
        topic_of_key: impl FnOnce(&str) -> std::borrow::Cow<'_, str>,
    ) -> Result<Message, NotAMessage> {
        let named = headers
            .clone()
            .into_iter()
            .find(|(n, _)| *n == H_TOPIC)
            .and_then(|(_, v)| v);
        let topic = match named {
            // Written through a key template: the header holds the topic.
            Some(t) => std::str::from_utf8(t)
                .map_err(|_| NotAMessage::KeyNotUtf8)?
                .to_string(),
            None => {
                let key = key.ok_or(NotAMessage::NoKey)?;
                let key = std::str::from_utf8(key).map_err(|_| NotAMessage::KeyNotUtf8)?;
                topic_of_key(key).into_owned()
            }
        };
        if let Err(reason) = lodestream_mqtt::topic::validate_topic_name(&topic) {
            return Err(NotAMessage::KeyNotTopicName { key: topic, reason });
        }
        Ok(Message::with_headers(topic, payload, timestamp_ms, headers))
    }

    fn with_headers<'a>(
        topic: String,
        payload: Bytes,
        timestamp_ms: i64,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Message {
        let mut m = Message {
            topic,
            payload,
            qos: QoS::AtMostOnce,
            retain: false,
            properties: MessageProperties::default(),
            publisher: None,
            timestamp_ms,
        };
        for (name, value) in headers {
            let raw = value.unwrap_or(&[]);
            let text = std::str::from_utf8(raw).ok();
            match name {
                H_QOS => {
                    if let Some(q) = text
                        .and_then(|t| t.parse::<u8>().ok())
                        .and_then(QoS::from_u8)
                    {
                        m.qos = q;
                    }
                }
                H_RETAIN => m.retain = raw == b"1",
                H_CLIENT_ID => m.publisher = text.map(|t| Bytes::copy_from_slice(t.as_bytes())),
                H_PAYLOAD_FORMAT => {
                    m.properties.payload_format_indicator =
                        text.and_then(|t| t.parse::<u8>().ok()).filter(|v| *v <= 1)
                }
                H_EXPIRY => {
                    m.properties.message_expiry_interval = text.and_then(|t| t.parse().ok())
                }
                H_CONTENT_TYPE => m.properties.content_type = text.map(str::to_string),
                H_RESPONSE_TOPIC => {
                    m.properties.response_topic = text
                        .filter(|t| lodestream_mqtt::topic::validate_topic_name(t).is_ok())
                        .map(str::to_string)
                }
                H_CORRELATION => m.properties.correlation_data = Some(Bytes::copy_from_slice(raw)),
                _ => {
                    let key = match name.strip_prefix(USER_ESCAPE) {
                        Some(k) => k,
                        None if name.starts_with("mqtt.") => continue,
                        None => name,
                    };
                    if let Some(v) = text {
                        if !key.contains('\0') && !v.contains('\0') {
                            m.properties
                                .user_properties
                                .push((key.to_string(), v.to_string()));
                        }
                    }
                }
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// A message without properties holds no box; one written through
    /// `DerefMut` does; equality is by the sets, boxed or not.
    #[test]
    fn message_properties_box_only_a_set_with_something_in_it() {
        let none = MessageProperties::from(Properties::default());
        assert!(none.0.is_none());
        assert_eq!(none.message_expiry_interval, None);
        let mut some = none.clone();
        some.content_type = Some("text/plain".into());
        assert!(some.0.is_some());
        assert_ne!(some, none);
        some.content_type = None;
        assert_eq!(some, none);
        assert!(std::mem::size_of::<Message>() <= 128);
    }

    fn sample() -> Message {
        Message {
            topic: "cars/speed/1".into(),
            payload: Bytes::from_static(b"42"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Properties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: Some("reply/1".into()),
                correlation_data: Some(Bytes::from_static(&[0, 1, 255])),
                user_properties: vec![
                    ("a".into(), "1".into()),
                    ("mqtt.qos".into(), "spoof".into()),
                    ("a".into(), "2".into()),
                ],
                ..Properties::default()
            }
            .into(),
            publisher: Some(Bytes::from_static(b"pub-1")),
            timestamp_ms: 1_000,
        }
    }

    #[test]
    fn headers_round_trip_all_metadata() {
        let m = sample();
        let h = m.to_headers();
        let back = Message::try_from_record(
            Some(m.topic.as_bytes()),
            m.payload.clone(),
            m.timestamp_ms,
            h.iter().map(|(k, v)| (&**k, Some(&v[..]))),
            |k| Cow::Borrowed(k),
        )
        .unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn foreign_record_defaults_to_qos0_and_headers_become_user_properties() {
        let m = Message::try_from_record(
            Some(b"t"),
            Bytes::new(),
            0,
            [
                ("trace", Some(&b"x"[..])),
                ("bin", Some(&[0xff][..])),
                ("mqtt.unknown", Some(&b"1"[..])),
            ],
            |k| Cow::Borrowed(k),
        )
        .unwrap();
        assert_eq!(m.qos, QoS::AtMostOnce);
        assert!(!m.retain);
        assert_eq!(
            m.properties.user_properties,
            vec![("trace".into(), "x".into())]
        );
    }

    #[test]
    fn expiry_counts_from_timestamp() {
        let m = sample();
        assert_eq!(m.remaining_expiry(1_000), Some(60));
        assert_eq!(m.remaining_expiry(31_500), Some(30));
        assert!(!m.is_expired(60_999));
        assert!(m.is_expired(61_000));
    }

    /// A QoS 2 record carries what identifies its flow; other headers do
    /// not turn into user properties on the way back.
    #[test]
    fn qos2_flow_headers_round_trip_and_stay_internal() {
        let mut h = sample().to_headers();
        Qos2Flow {
            packet_id: 42,
            seq: 7,
        }
        .push_headers(&mut h);
        let view = || h.iter().map(|(k, v)| (&**k, Some(&v[..])));
        let (client, flow) = Qos2Flow::from_headers(view()).unwrap();
        assert_eq!((client, flow.packet_id, flow.seq), ("pub-1", 42, 7));
        let back =
            Message::try_from_record(Some(b"t"), Bytes::new(), 0, view(), |k| Cow::Borrowed(k))
                .unwrap();
        assert_eq!(
            back.properties.user_properties,
            sample().properties.user_properties
        );
        assert!(Qos2Flow::from_headers(
            sample()
                .to_headers()
                .iter()
                .map(|(k, v)| (&**k, Some(&v[..])))
        )
        .is_none());
    }

    /// A record keyed with a wildcard, a non-UTF-8 or no key is not a
    /// message: it could not be sent as a PUBLISH topic [MQTT-3.3.2-2].
    #[test]
    fn record_key_must_be_a_valid_topic_name() {
        let conv = |key: Option<&[u8]>| {
            Message::try_from_record(key, Bytes::new(), 0, std::iter::empty(), |k| {
                Cow::Borrowed(k)
            })
        };
        assert!(conv(Some(b"cars/1")).is_ok());
        for bad in [&b"cars/+"[..], b"cars/#", b"", b"a\0b"] {
            assert!(
                matches!(conv(Some(bad)), Err(NotAMessage::KeyNotTopicName { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(conv(Some(&[0xff, 0xfe])), Err(NotAMessage::KeyNotUtf8));
        assert_eq!(conv(None), Err(NotAMessage::NoKey));
    }

    /// Issue #15: a record written through a key template carries its topic
    /// in `mqtt.topic`, which wins over the key; one from another producer
    /// (no header) gets its topic from the rule's template.
    #[test]
    fn topic_header_wins_over_the_key_and_a_bare_key_goes_through_the_template() {
        fn plate(k: &str) -> Cow<'_, str> {
            Cow::Owned(format!("trucks/{k}"))
        }
        let h = [(H_TOPIC, Some(&b"trucks/AB123CD"[..]))];
        let m = Message::try_from_record(Some(b"AB123CD"), Bytes::new(), 0, h, plate).unwrap();
        assert_eq!(m.topic, "trucks/AB123CD");
        assert!(
            m.properties.user_properties.is_empty(),
            "mqtt.topic stays internal"
        );
        let m = Message::try_from_record(Some(b"XY"), Bytes::new(), 0, [], plate).unwrap();
        assert_eq!(m.topic, "trucks/XY");
        let bad = [(H_TOPIC, Some(&b"a/+"[..]))];
        assert!(Message::try_from_record(Some(b"k"), Bytes::new(), 0, bad, plate).is_err());
    }
}
