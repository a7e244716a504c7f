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
    #[error("mapping rule {rule:?}: invalid Kafka topic name {topic:?} (1-249 chars of [a-zA-Z0-9._-])")]
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
        && t
            .bytes()
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
    /// rule already captures every topic of the filter; the default topic is
    /// needed unless some rule captures the whole filter.
    pub fn kafka_topics_for_filter(&self, filter: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let mut captured = false;
        for rule in &self.rules {
            if filters_may_overlap(&rule.pattern, filter) {
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
        assert_eq!(m.kafka_topics_for_filter("cars/speed/+"), vec!["kafkaTopic1"]);
        assert_eq!(
            m.kafka_topics_for_filter("cars/#"),
            vec!["kafkaTopic1", "kafkaTopic2"]
        );
        assert_eq!(m.kafka_topics_for_filter("trains/#"), vec!["default"]);
        assert_eq!(
            m.kafka_topics_for_filter("#"),
            vec!["kafkaTopic1", "kafkaTopic2", "default"]
        );
        assert_eq!(m.kafka_topics_for_filter("cars/speed/7"), vec!["kafkaTopic1"]);
        assert_eq!(
            m.kafka_topics_for_filter("+/speed/1"),
            vec!["kafkaTopic1", "default"]
        );
    }

    #[test]
    fn parse_rejects_bad_rules() {
        assert!(matches!(Rule::parse("nocolon"), Err(MappingError::Syntax(_))));
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
            vec![
                Rule::parse("a:x/#").unwrap(),
                Rule::parse("a:y/#").unwrap(),
            ],
            "a",
        );
        assert_eq!(m.all_kafka_topics(), vec!["a"]);
    }
}
