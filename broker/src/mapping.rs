//! MQTT topic <-> Kafka topic mapping rules. Pure logic, no I/O.
//!
//! Rules are ordered `kafkaTopic:mqttPattern` pairs. Writing: the first rule
//! whose pattern matches the MQTT topic names the Kafka topic; no match means
//! the default topic. Reading: a subscription filter needs every Kafka topic
//! that can hold a matching MQTT topic, which `kafka_topics_for_filter`
//! computes conservatively (it may name a topic that turns out to hold no
//! match, it never leaves one out).

use std::fmt;

use lodestream_mqtt::topic::filters_may_overlap;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub kafka_topic: String,
    pub pattern: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("mapping rule {0:?} is not of the form kafkaTopic:mqttPattern")]
    Syntax(String),
    #[error(
        "mapping rule {rule:?}: invalid Kafka topic name {topic:?} (1-249 chars of [a-zA-Z0-9._-])"
    )]
    KafkaTopic { rule: String, topic: String },
    #[error("mapping rule {rule:?}: invalid MQTT pattern: {reason}")]
    Pattern { rule: String, reason: String },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kafka_topic, self.pattern)
    }
}

impl Rule {
    /// Parses `kafkaTopic:mqttPattern`. The split is at the first `:`
    /// because Kafka topic names cannot contain one while MQTT patterns can.
    pub fn parse(s: &str) -> Result<Rule, MappingError> {
        let s = s.trim();
        let (topic, pattern) = s
            .split_once(':')
            .ok_or_else(|| MappingError::Syntax(s.to_string()))?;
        let (topic, pattern) = (topic.trim(), pattern.trim());
        if !valid_kafka_topic(topic) {
            return Err(MappingError::KafkaTopic {
                rule: s.to_string(),
                topic: topic.to_string(),
            });
        }
        lodestream_mqtt::topic::validate_topic_filter(pattern).map_err(|e| {
            MappingError::Pattern {
                rule: s.to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(Rule {
            kafka_topic: topic.to_string(),
            pattern: pattern.to_string(),
        })
    }
}

/// Kafka's own rule for topic names.
pub fn valid_kafka_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    rules: Vec<Rule>,
    default_topic: String,
}

impl Mapping {
    pub fn new(rules: Vec<Rule>, default_topic: impl Into<String>) -> Mapping {
        Mapping {
            rules,
            default_topic: default_topic.into(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn default_topic(&self) -> &str {
        &self.default_topic
    }

    /// Every Kafka topic a message can be written to.
    pub fn all_kafka_topics(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for t in self
            .rules
            .iter()
            .map(|r| r.kafka_topic.as_str())
            .chain(std::iter::once(self.default_topic.as_str()))
        {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// The Kafka topic a PUBLISH to `mqtt_topic` is written to: first matching rule wins.
    pub fn kafka_topic_for(&self, mqtt_topic: &str) -> &str {
        self.rules
            .iter()
            .find(|r| lodestream_mqtt::topic::matches(&r.pattern, mqtt_topic))
            .map(|r| r.kafka_topic.as_str())
            .unwrap_or(&self.default_topic)
    }

    /// The Kafka topics a subscription to `filter` must read.
    ///
    /// Rule i is needed when its pattern overlaps the filter and no earlier
    /// rule captures the whole overlap (a record there would have been
    /// written to the earlier rule's topic); the default topic is needed
    /// unless some rule captures the whole filter. Conservative: an overlap
    /// captured only by several earlier rules together still counts.
    pub fn kafka_topics_for_filter(&self, filter: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let mut captured = false;
        for (i, rule) in self.rules.iter().enumerate() {
            let shadowed = intersection(&rule.pattern, filter)
                .is_some_and(|common| self.rules[..i].iter().any(|r| covers(&r.pattern, &common)));
            if filters_may_overlap(&rule.pattern, filter) && !shadowed {
                if !out.contains(&rule.kafka_topic.as_str()) {
                    out.push(&rule.kafka_topic);
                }
                if covers(&rule.pattern, filter) {
                    captured = true;
                    break;
                }
            }
        }
        if !captured && !out.contains(&self.default_topic.as_str()) {
            out.push(&self.default_topic);
        }
        out
    }
}

fn is_wild(level: &str) -> bool {
    level == "+" || level == "#"
}

/// The filter matching exactly the topics both filters match, when they
/// overlap at all.
pub fn intersection(a: &str, b: &str) -> Option<String> {
    if !filters_may_overlap(a, b) {
        return None;
    }
    let mut la = a.split('/');
    let mut lb = b.split('/');
    let mut out: Vec<&str> = Vec::new();
    loop {
        match (la.next(), lb.next()) {
            (None, None) => break,
            (Some("#"), None) | (None, Some("#")) => break,
            (None, Some(_)) | (Some(_), None) => return None,
            (Some("#"), Some(y)) => {
                out.push(y);
                out.extend(lb.by_ref());
                break;
            }
            (Some(x), Some("#")) => {
                out.push(x);
                out.extend(la.by_ref());
                break;
            }
            (Some("+"), Some(y)) => out.push(y),
            (Some(x), Some(_)) => out.push(x),
        }
    }
    Some(out.join("/"))
}

/// True when every topic name matching `inner` also matches `outer`.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut lo = outer.split('/');
    let mut li = inner.split('/');
    let mut first = true;
    loop {
        match (lo.next(), li.next()) {
            (None, None) => return true,
            (Some("#"), None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(o), Some(i)) => {
                if first && is_wild(o) && i.starts_with('$') {
                    return false;
                }
                first = false;
                match o {
                    "#" => return true,
                    "+" if i != "#" => {}
                    _ if o == i => {}
                    _ => return false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn article() -> Mapping {
        Mapping::new(
            vec![
                Rule::parse("kafkaTopic1:cars/speed/+").unwrap(),
                Rule::parse("kafkaTopic2:cars/#").unwrap(),
            ],
            "default",
        )
    }

    /// The source article's write-side example.
    #[test]
    fn article_example_publish_side() {
        let m = article();
        assert_eq!(m.kafka_topic_for("cars/speed/1"), "kafkaTopic1");
        assert_eq!(m.kafka_topic_for("cars/location/1"), "kafkaTopic2");
        assert_eq!(m.kafka_topic_for("cars/speed/1/2"), "kafkaTopic2");
        assert_eq!(m.kafka_topic_for("trains/speed/1"), "default");
    }

    /// The source article's read-side example: a node reads only the Kafka
    /// topics whose rules can match the subscription.
    #[test]
    fn article_example_subscribe_side() {
        let m = article();
        assert_eq!(
            m.kafka_topics_for_filter("cars/speed/+"),
            vec!["kafkaTopic1"]
        );
        assert_eq!(
            m.kafka_topics_for_filter("cars/#"),
            vec!["kafkaTopic1", "kafkaTopic2"]
        );
        assert_eq!(m.kafka_topics_for_filter("trains/#"), vec!["default"]);
        assert_eq!(
            m.kafka_topics_for_filter("#"),
            vec!["kafkaTopic1", "kafkaTopic2", "default"]
        );
        assert_eq!(
            m.kafka_topics_for_filter("cars/speed/7"),
            vec!["kafkaTopic1"]
        );
        assert_eq!(
            m.kafka_topics_for_filter("+/speed/1"),
            vec!["kafkaTopic1", "default"]
        );
    }

    #[test]
    fn parse_rejects_bad_rules() {
        assert!(matches!(
            Rule::parse("nocolon"),
            Err(MappingError::Syntax(_))
        ));
        assert!(matches!(
            Rule::parse("bad topic:a/b"),
            Err(MappingError::KafkaTopic { .. })
        ));
        assert!(matches!(
            Rule::parse("t:a/#/b"),
            Err(MappingError::Pattern { .. })
        ));
        assert_eq!(
            Rule::parse(" t : a/+ ").unwrap(),
            Rule {
                kafka_topic: "t".into(),
                pattern: "a/+".into()
            }
        );
    }

    #[test]
    fn cover_rules() {
        assert_eq!(
            intersection("+/speed/1", "cars/#").as_deref(),
            Some("cars/speed/1")
        );
        assert_eq!(intersection("a/#", "a").as_deref(), Some("a"));
        assert_eq!(intersection("a/+", "b/#"), None);
        assert!(covers("cars/#", "cars/speed/+"));
        assert!(covers("cars/#", "cars"));
        assert!(!covers("cars/speed/+", "cars/#"));
        assert!(!covers("+/x", "#"));
        assert!(!covers("#", "$SYS/#"));
        assert!(covers("#", "+/x"));
    }

    #[test]
    fn all_topics_deduplicated() {
        let m = Mapping::new(
            vec![Rule::parse("a:x/#").unwrap(), Rule::parse("a:y/#").unwrap()],
            "a",
        );
        assert_eq!(m.all_kafka_topics(), vec!["a"]);
    }

    mod generated {
        use super::*;
        use proptest::prelude::*;

        fn level() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("a".to_string()),
                Just("b".to_string()),
                Just("$s".to_string()),
                Just(String::new())
            ]
        }
        fn filter_level() -> impl Strategy<Value = String> {
            prop_oneof![level(), Just("+".to_string())]
        }
        // Whole topics and filters are never empty (that is invalid MQTT);
        // empty levels inside them are valid and kept.
        fn any_topic() -> impl Strategy<Value = String> {
            prop::collection::vec(level(), 1..4)
                .prop_map(|v| v.join("/"))
                .prop_filter("non-empty", |t| !t.is_empty())
        }
        fn any_filter() -> impl Strategy<Value = String> {
            (prop::collection::vec(filter_level(), 1..4), any::<bool>())
                .prop_map(|(mut v, hash)| {
                    if hash {
                        v.push("#".into());
                    }
                    v.join("/")
                })
                .prop_filter("non-empty", |f| !f.is_empty())
        }

        proptest! {
            /// Soundness of the read side: whatever Kafka topic a matching
            /// MQTT topic is written to, a subscription reads it.
            #[test]
            fn subscription_reads_every_topic_a_match_is_written_to(
                patterns in prop::collection::vec(any_filter(), 0..4),
                f in any_filter(),
                t in any_topic(),
            ) {
                let rules = patterns.iter().enumerate()
                    .map(|(i, p)| Rule { kafka_topic: format!("k{i}"), pattern: p.clone() })
                    .collect();
                let m = Mapping::new(rules, "default");
                if lodestream_mqtt::topic::matches(&f, &t) {
                    let written = m.kafka_topic_for(&t);
                    prop_assert!(m.kafka_topics_for_filter(&f).contains(&written),
                        "{t} -> {written} not read by {f}");
                }
            }

            #[test]
            fn covers_and_intersection_agree_with_matching(a in any_filter(), b in any_filter(), t in any_topic()) {
                use lodestream_mqtt::topic::matches;
                if covers(&a, &b) && matches(&b, &t) {
                    prop_assert!(matches(&a, &t));
                }
                let both = matches(&a, &t) && matches(&b, &t);
                match intersection(&a, &b) {
                    Some(i) => prop_assert_eq!(matches(&i, &t), both, "{} {} -> {}", a, b, i),
                    None => prop_assert!(!both),
                }
            }
        }
    }
}
