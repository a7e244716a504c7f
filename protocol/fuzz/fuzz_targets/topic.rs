//! Topic validation, matching, filter overlap and TopicTrie against
//! brute-force matching.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lodestream_mqtt_fuzz::check_topic(data);
});
