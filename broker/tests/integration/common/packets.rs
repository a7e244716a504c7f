//! Packet builders shared by the tests: the common case of CONNECT,
//! SUBSCRIBE and PUBLISH, which a test adjusts with struct update syntax
//! (`Connect { clean_start: false, ..connect(V5, "id") }`), then wraps with
//! `.packet()`. Not `Default` impls in protocol/: an empty topic or packet
//! id 0 is not a valid packet, so there is no sound default.

use bytes::Bytes;
use lodestream_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe, SubscriptionOptions,
};

/// CONNECT with a clean start, keep-alive 30 s, no will, no credentials.
pub fn connect(protocol: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 30,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// SUBSCRIBE to one filter at `qos`, default options otherwise.
pub fn subscribe(packet_id: u16, filter: &str, qos: QoS) -> Subscribe {
    Subscribe {
        packet_id,
        filters: vec![(filter.into(), SubscriptionOptions::qos(qos))],
        properties: Properties::default(),
    }
}

/// PUBLISH, not DUP, not retained; `packet_id` is required for QoS 1/2.
pub fn publish(
    topic: &str,
    qos: QoS,
    packet_id: Option<u16>,
    payload: impl Into<Bytes>,
) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        payload: payload.into(),
        properties: Properties::default(),
    }
}

/// Wraps a packet body into a `Packet`.
pub trait IntoPacket {
    fn packet(self) -> Packet;
}

impl IntoPacket for Connect {
    fn packet(self) -> Packet {
        Packet::Connect(Box::new(self))
    }
}

impl IntoPacket for Subscribe {
    fn packet(self) -> Packet {
        Packet::Subscribe(self)
    }
}

impl IntoPacket for Publish {
    fn packet(self) -> Packet {
        Packet::Publish(self)
    }
}
