//! Arbitrary bytes into a Decoder preset to MQTT 3.1.1 (an established
//! connection): every decoded packet must round-trip through the encoder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lodestream_mqtt::ProtocolVersion;

fuzz_target!(|data: &[u8]| {
    lodestream_mqtt_fuzz::check_decode(Some(ProtocolVersion::V311), data);
});
