//! Arbitrary bytes into a fresh Decoder (no version): the first-packet path
//! a broker runs on every new connection, then whatever follows the CONNECT.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lodestream_mqtt_fuzz::check_decode(None, data);
});
