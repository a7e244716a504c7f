//! The documented example configuration parses and validates.

#[test]
fn example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/broker.example.toml");
    let cfg =
        lodestream_broker::Config::load(Some(std::path::Path::new(path)), figment::Figment::new())
            .expect("example config loads");
    let mapping = cfg.validate().expect("example config validates").mapping;
    assert_eq!(mapping.kafka_topic_for("trucks/AB123CD"), "trucks");
    assert_eq!(
        mapping.kafka_topic_for("fleet/stats/directions"),
        "fleet-stats"
    );
}
