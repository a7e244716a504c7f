//! The session record: what a node writes to the compacted sessions topic
//! (key = client id) so that any node can resume the session. Pure data and
//! conversions, no I/O.
//!
//! Schema evolution: `v` is bumped only for incompatible changes; new fields
//! are added with `#[serde(default)]` so a newer broker reads older records,
//! and unknown fields are ignored so an older broker reads newer ones.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use lodestream_mqtt::{LastWill, Properties, Publish, QoS, RetainHandling, SubscriptionOptions};
use serde::{Deserialize, Serialize};

use crate::session::inbound_qos2::{InboundQos2, Qos2Parts, ScanBound};
use crate::session::{Offsets, OutFlow, Session, Subscription};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub v: u32,
    pub client_id: String,
    /// Incremented by every claim; a record with a lower epoch than the one
    /// already seen is stale and ignored (fencing).
    pub epoch: u64,
    /// Node that owns (or last owned) the session.
    pub node: String,
    pub online: bool,
    /// The previous owner's final state, written after it was taken over by
    /// the claim with this same epoch.
    #[serde(default, skip_serializing_if = "is_false")]
    pub handoff: bool,
    pub expiry_s: u32,
    /// When offline: since when (ms). An offline record that still has a
    /// `will` has a delayed will pending, due at `disconnected_ms` + the
    /// will delay (or at expiry if sooner); whoever owns the session
    /// publishes it then, and a survivor does if the owner dies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnected_ms: Option<i64>,
    #[serde(default)]
    pub subscriptions: Vec<SubRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub will: Option<WillRecord>,
    /// Ids of QoS 2 flows awaiting PUBREL (also inside `qos2`; kept for
    /// brokers that predate `qos2`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_qos2: Vec<u16>,
    /// Inbound QoS 2 exactly-once state (see `inbound_qos2.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos2: Option<Qos2Record>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<OutRecord>,
    /// Next Kafka offset to read, per message-topic partition.
    #[serde(default)]
    pub offsets: Vec<OffsetRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubRecord {
    pub filter: String,
    pub qos: u8,
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_local: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub retain_as_published: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retain_handling: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PropsRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub will_delay: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WillRecord {
    pub topic: String,
    pub payload_b64: String,
    pub qos: u8,
    pub retain: bool,
    #[serde(default)]
    pub props: PropsRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutRecord {
    pub packet_id: u16,
    /// PUBREL sent, waiting for PUBCOMP.
    pub released: bool,
    #[serde(default)]
    pub publish: Option<MsgRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgRecord {
    pub topic: String,
    pub payload_b64: String,
    pub qos: u8,
    pub retain: bool,
    #[serde(default)]
    pub props: PropsRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qos2Record {
    /// [packet id, qos2_seq or null]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub received: Vec<(u16, Option<u64>)>,
    /// [packet id, qos2_seq, produced ms]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<(u16, u64, i64)>,
    /// [packet id, qos2_seq of its last completed flow]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<(u16, u64)>,
    pub next_seq: u64,
    /// Writes this state may not know of have qos2_seq >= floor and were
    /// produced at or after since_ms.
    pub floor: u64,
    pub since_ms: i64,
}

impl Qos2Record {
    fn from_parts(p: Qos2Parts) -> Qos2Record {
        Qos2Record {
            received: p.received,
            unconfirmed: p.unconfirmed,
            done: p.done,
            next_seq: p.next_seq,
            floor: p.bound.floor,
            since_ms: p.bound.since_ms,
        }
    }

    fn to_parts(&self) -> Qos2Parts {
        Qos2Parts {
            received: self.received.clone(),
            unconfirmed: self.unconfirmed.clone(),
            done: self.done.clone(),
            next_seq: self.next_seq,
            bound: ScanBound {
                floor: self.floor,
                since_ms: self.since_ms,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

fn props_to_record(p: &Properties) -> PropsRecord {
    PropsRecord {
        payload_format: p.payload_format_indicator,
        expiry: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_b64: p.correlation_data.as_ref().map(|c| B64.encode(c)),
        user: p.user_properties.clone(),
        will_delay: p.will_delay_interval,
    }
}

fn props_from_record(r: &PropsRecord) -> Properties {
    Properties {
        payload_format_indicator: r.payload_format,
        message_expiry_interval: r.expiry,
        content_type: r.content_type.clone(),
        response_topic: r.response_topic.clone(),
        correlation_data: r
            .correlation_b64
            .as_ref()
            .and_then(|c| B64.decode(c).ok())
            .map(Bytes::from),
        user_properties: r.user.clone(),
        will_delay_interval: r.will_delay,
        ..Properties::default()
    }
}

fn qos(v: u8) -> QoS {
    QoS::from_u8(v).unwrap_or(QoS::AtMostOnce)
}

fn payload(b64: &str) -> Bytes {
    B64.decode(b64).map(Bytes::from).unwrap_or_default()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// An offline session outlives its expiry counted from its disconnect.
pub fn expired(online: bool, disconnected_ms: Option<i64>, expiry_s: u32, now_ms: i64) -> bool {
    match (online, disconnected_ms) {
        (false, Some(at)) => now_ms >= at + expiry_s as i64 * 1000,
        _ => false,
    }
}

pub fn will_to_record(w: &LastWill) -> WillRecord {
    WillRecord {
        topic: w.topic.clone(),
        payload_b64: B64.encode(&w.payload),
        qos: w.qos as u8,
        retain: w.retain,
        props: props_to_record(&w.properties),
    }
}

pub fn will_from_record(w: &WillRecord) -> LastWill {
    LastWill {
        topic: w.topic.clone(),
        payload: payload(&w.payload_b64),
        qos: qos(w.qos),
        retain: w.retain,
        properties: props_from_record(&w.props),
    }
}

impl SessionRecord {
    /// Snapshot of a session for the sessions topic.
    pub fn from_session(
        s: &Session,
        node: &str,
        epoch: u64,
        online: bool,
        now_ms: i64,
    ) -> SessionRecord {
        let mut subscriptions: Vec<SubRecord> = s
            .subscriptions
            .iter()
            .map(|(f, sub)| SubRecord {
                filter: f.clone(),
                qos: sub.options.qos as u8,
                no_local: sub.options.no_local,
                retain_as_published: sub.options.retain_as_published,
                retain_handling: sub.options.retain_handling as u8,
                id: sub.identifier,
            })
            .collect();
        subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
        let qos2 = s.inbound_qos2.to_parts(now_ms);
        let inbound_qos2: Vec<u16> = qos2.received.iter().map(|(id, _)| *id).collect();
        let mut offsets: Vec<OffsetRecord> = s
            .offsets
            .iter()
            .map(|((t, p), o)| OffsetRecord {
                topic: t.to_string(),
                partition: *p,
                offset: *o,
            })
            .collect();
        offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        SessionRecord {
            v: SCHEMA_VERSION,
            client_id: s.client_id.to_string(),
            epoch,
            node: node.to_string(),
            online,
            handoff: false,
            expiry_s: s.expiry_s,
            disconnected_ms: (!online).then_some(now_ms),
            subscriptions,
            will: s.will.as_deref().map(will_to_record),
            inbound_qos2,
            // Omitted for sessions that never sent QoS 2 (most of a fleet):
            // restoring nothing is then the same state.
            qos2: (qos2.next_seq > 0 || !qos2.received.is_empty())
                .then(|| Qos2Record::from_parts(qos2)),
            outbound: s
                .outbound
                .resend()
                .into_iter()
                .map(|(id, f)| match f {
                    OutFlow::Released => OutRecord {
                        packet_id: id,
                        released: true,
                        publish: None,
                    },
                    OutFlow::Published(p) => OutRecord {
                        packet_id: id,
                        released: false,
                        publish: Some(MsgRecord {
                            topic: p.topic.clone(),
                            payload_b64: B64.encode(&p.payload),
                            qos: p.qos as u8,
                            retain: p.retain,
                            props: props_to_record(&p.properties),
                        }),
                    },
                })
                .collect(),
            offsets,
        }
    }

    /// Rebuilds the session state this record describes into `s` (a fresh
    /// session with its own mailbox).
    pub fn restore_into(&self, s: &mut Session) {
        s.expiry_s = self.expiry_s;
        for r in &self.subscriptions {
            s.subscriptions.insert(
                r.filter.clone(),
                Subscription {
                    options: SubscriptionOptions {
                        qos: qos(r.qos),
                        no_local: r.no_local,
                        retain_as_published: r.retain_as_published,
                        retain_handling: match r.retain_handling {
                            1 => RetainHandling::SendIfNew,
                            2 => RetainHandling::DoNotSend,
                            _ => RetainHandling::SendAtSubscribe,
                        },
                    },
                    identifier: r.id,
                },
            );
        }
        s.will = self.will.as_ref().map(|w| Box::new(will_from_record(w)));
        s.inbound_qos2 = match &self.qos2 {
            Some(q) => InboundQos2::from_parts(&q.to_parts()),
            None => {
                let mut q = InboundQos2::default();
                for id in &self.inbound_qos2 {
                    q.received_unwritten(*id);
                }
                q
            }
        };
        for o in &self.outbound {
            match &o.publish {
                Some(m) if !o.released => s.outbound.start(
                    o.packet_id,
                    Publish {
                        dup: false,
                        qos: qos(m.qos),
                        retain: m.retain,
                        topic: m.topic.clone(),
                        packet_id: Some(o.packet_id),
                        payload: payload(&m.payload_b64),
                        properties: props_from_record(&m.props),
                    },
                ),
                _ => s.outbound.start_released(o.packet_id),
            }
        }
        s.offsets = self.offsets_map();
    }

    pub fn offsets_map(&self) -> Offsets {
        let mut m = Offsets::default();
        for o in &self.offsets {
            m.insert((Arc::from(o.topic.as_str()), o.partition), o.offset);
        }
        m
    }

    /// True when an offline session has outlived its expiry at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        expired(self.online, self.disconnected_ms, self.expiry_s, now_ms)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<SessionRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        let mut s = Session::new(Arc::from("c1"), 4);
        s.expiry_s = 300;
        s.subscriptions.insert(
            "a/#".into(),
            Subscription {
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
                identifier: Some(7),
            },
        );
        s.will = Some(Box::new(LastWill {
            topic: "w".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                will_delay_interval: Some(5),
                content_type: Some("t".into()),
                ..Properties::default()
            },
        }));
        s.inbound_qos2.begin(9, false, 500);
        s.inbound_qos2.written(9);
        s.outbound.start(
            3,
            Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "a/b".into(),
                packet_id: Some(3),
                payload: Bytes::from_static(&[0, 1, 2]),
                properties: Properties {
                    correlation_data: Some(Bytes::from_static(b"x")),
                    user_properties: vec![("k".into(), "v".into())],
                    ..Properties::default()
                },
            },
        );
        s.outbound.start_released(4);
        s.offsets.insert((Arc::from("t"), 1), 42);
        s
    }

    #[test]
    fn record_round_trips_session_state() {
        let s = session();
        let r = SessionRecord::from_session(&s, "n1", 3, false, 1000);
        let back = SessionRecord::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        let mut s2 = Session::new(Arc::from("c1"), 4);
        back.restore_into(&mut s2);
        assert_eq!(s2.subscriptions, s.subscriptions);
        assert_eq!(s2.will, s.will);
        assert!(s2.inbound_qos2.is_received(9));
        assert_eq!(
            s2.inbound_qos2.to_parts(1000),
            s.inbound_qos2.to_parts(1000)
        );
        assert_eq!(s2.outbound.resend(), s.outbound.resend());
        assert_eq!(s2.offsets, s.offsets);
        assert_eq!(s2.expiry_s, 300);
    }

    /// A newer broker reads an older record (missing fields default) and an
    /// older broker ignores fields it does not know.
    #[test]
    fn schema_tolerates_missing_and_unknown_fields() {
        let old = br#"{"v":1,"client_id":"c","epoch":1,"node":"n","online":false,"expiry_s":10}"#;
        let r = SessionRecord::decode(old).unwrap();
        assert!(r.subscriptions.is_empty() && r.disconnected_ms.is_none());
        let newer = br#"{"v":1,"client_id":"c","epoch":1,"node":"n","online":true,"expiry_s":10,"future":[1,2]}"#;
        assert!(SessionRecord::decode(newer).is_ok());
    }

    #[test]
    fn expiry_counts_from_disconnect() {
        let mut r = SessionRecord::from_session(&session(), "n", 1, false, 1_000);
        assert!(!r.expired(300_999));
        assert!(r.expired(301_000));
        r.online = true;
        assert!(!r.expired(i64::MAX));
    }
}
