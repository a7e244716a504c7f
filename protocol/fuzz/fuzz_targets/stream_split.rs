//! Valid packets generated from the input, encoded back to back and fed to
//! one decoder split at arbitrary points: the same packets must come out.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lodestream_mqtt_fuzz::check_stream_split(data);
});
