//! MQTT topic <-> Kafka topic mapping rules. Pure logic, no I/O.
//!
//! Rules are ordered `kafkaTopic:mqttPattern` pairs. Writing: the first rule
//! whose pattern matches the MQTT topic names the Kafka topic; no match means
//! the default topic. Reading: a subscription filter needs every Kafka topic
//! that can hold a matching MQTT topic, which `kafka_topics_for_filter`
//! computes conservatively (it may name a topic that turns out to hold no
//! match, it never leaves one out).
//!
//! A rule may also give the record key: `trucks:trucks/{plate}:{plate}`
//! keys a PUBLISH to `trucks/AB123CD` by `AB123CD` (see `key_template`).
//! Without a template the key is the MQTT topic.

use std::fmt;

use lodestream_mqtt::topic::filters_may_overlap;
use thiserror::Error;

use crate::key_template::{self, KeyTemplate, TemplateError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub kafka_topic: String,
    /// The MQTT pattern as a filter (named levels read as `+`).
    pub pattern: String,
    /// As written, with its `{name}` levels.
    named_pattern: String,
    pub key: Option<KeyTemplate>,
    key_source: Option<String>,
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
    #[error("mapping rule {rule:?}: invalid key template: {reason}")]
    Key { rule: String, reason: TemplateError },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kafka_topic, self.named_pattern)?;
        match &self.key_source {
            Some(k) => write!(f, ":{k}"),
            None => Ok(()),
        }
    }
}

impl Rule {
    /// Parses `kafkaTopic:mqttPattern[:keyTemplate]`. The topic ends at the
    /// first `:` because Kafka topic names cannot contain one while MQTT
    /// patterns can. A key template is only looked for after a pattern with
    /// `{name}` levels, at a later `:` whose right side has a placeholder.
    pub fn parse(s: &str) -> Result<Rule, MappingError> {
        let s = s.trim();
        let (topic, rest) = s
            .split_once(':')
            .ok_or_else(|| MappingError::Syntax(s.to_string()))?;
        let (topic, rest) = (topic.trim(), rest.trim());
        if !valid_kafka_topic(topic) {
            return Err(MappingError::KafkaTopic {
                rule: s.to_string(),
                topic: topic.to_string(),
            });
        }
        let (pattern, template) = split_template(rest);
        let filter = key_template::as_filter(pattern).map_err(|e| MappingError::Pattern {
            rule: s.to_string(),
            reason: e.to_string(),
        })?;
        lodestream_mqtt::topic::validate_topic_filter(&filter).map_err(|e| {
            MappingError::Pattern {
                rule: s.to_string(),
                reason: e.to_string(),
            }
        })?;
        let key = template
            .map(|t| KeyTemplate::parse(pattern, t))
            .transpose()
            .map_err(|reason| MappingError::Key {
                rule: s.to_string(),
                reason,
            })?;
        Ok(Rule {
            kafka_topic: topic.to_string(),
            pattern: filter,
            named_pattern: pattern.to_string(),
            key,
            key_source: template.map(str::to_string),
        })
    }

    /// The record key of a PUBLISH to `topic` under this rule.
    pub fn key_for<'a>(&self, topic: &'a str) -> std::borrow::Cow<'a, str> {
        match self.key.as_ref().and_then(|k| k.key_for(topic)) {
            Some(k) => std::borrow::Cow::Owned(k),
            None => std::borrow::Cow::Borrowed(topic),
        }
    }
}

/// What opens a key template's placeholder and a pattern's `{name}` level.
/// Named, not written inline: brace-counting tools (function length
/// checks) miscount an unbalanced brace in a char literal.
const PLACEHOLDER_OPEN: char = '{';

/// `pattern[:template]`: the template is the part after the last `:` when
/// it holds a `{` and the pattern before it has a `{name}` level.
fn split_template(rest: &str) -> (&str, Option<&str>) {
    match rest.rsplit_once(':') {
        Some((p, t)) if t.contains(PLACEHOLDER_OPEN) && p.contains(PLACEHOLDER_OPEN) => {
            (p.trim(), Some(t.trim()))
        }
        _ => (rest, None),
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
        for t in self.destination_topics() {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// The Kafka topic a PUBLISH to `mqtt_topic` is written to: first matching rule wins.
    pub fn kafka_topic_for(&self, mqtt_topic: &str) -> &str {
        self.destination(mqtt_topic).0
    }

    /// The Kafka topic and record key of a PUBLISH to `mqtt_topic`.
    pub fn destination<'a>(&self, mqtt_topic: &'a str) -> (&str, std::borrow::Cow<'a, str>) {
        let (i, key) = self.destination_index(mqtt_topic);
        let topic = self
            .rules
            .get(i)
            .map_or(&self.default_topic, |r| &r.kafka_topic);
        (topic, key)
    }

    /// `destination` as a position in `destination_topics` (for what a
    /// node keeps per destination), and the record key.
    pub fn destination_index<'a>(&self, mqtt_topic: &'a str) -> (usize, std::borrow::Cow<'a, str>) {
        match self
            .rules
            .iter()
            .position(|r| lodestream_mqtt::topic::matches(&r.pattern, mqtt_topic))
        {
            Some(i) => (i, self.rules[i].key_for(mqtt_topic)),
            None => (self.rules.len(), std::borrow::Cow::Borrowed(mqtt_topic)),
        }
    }

    /// The Kafka topic of each rule, then the default topic (repeats kept:
    /// `destination_index` points into this sequence).
    pub fn destination_topics(&self) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .map(|r| r.kafka_topic.as_str())
            .chain(std::iter::once(self.default_topic.as_str()))
    }

    /// The MQTT topic a record key of `kafka_topic` stands for, when the
    /// record carries no `mqtt.topic` header (another producer wrote it):
    /// the first templated rule of that topic whose template the key fits
    /// and that would write the topic back there; else the key itself.
    pub fn topic_for_key<'a>(&self, kafka_topic: &str, key: &'a str) -> std::borrow::Cow<'a, str> {
        let found = self
            .rules
            .iter()
            .filter(|r| r.kafka_topic == kafka_topic)
            .filter_map(|r| r.key.as_ref()?.topic_for(key))
            .find(|t| self.kafka_topic_for(t) == kafka_topic);
        match found {
            Some(t) => std::borrow::Cow::Owned(t),
            None => std::borrow::Cow::Borrowed(key),
        }
    }

    /// True when some rule keys records by a template (records then carry
    /// their MQTT topic in a header).
    pub fn has_key_templates(&self) -> bool {
        self.rules.iter().any(|r| r.key.is_some())
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
        let r = Rule::parse(" t : a/+ ").unwrap();
        assert_eq!((r.kafka_topic.as_str(), r.pattern.as_str()), ("t", "a/+"));
        assert!(r.key.is_none());
    }

    /// Issue #15: `kafkaTopic:pattern:keyTemplate` keys records by entity,
    /// and a bare key on that Kafka topic reads back as its MQTT topic.
    #[test]
    fn key_template_rules_write_and_read_by_key() {
        let m = Mapping::new(
            vec![
                Rule::parse("trucks:trucks/{plate}:{plate}").unwrap(),
                Rule::parse("trucks:trucks/#").unwrap(),
            ],
            "default",
        );
        let (topic, key) = m.destination("trucks/AB123CD");
        assert_eq!((topic, key.as_ref()), ("trucks", "AB123CD"));
        let (topic, key) = m.destination("trucks/AB123CD/route");
        assert_eq!((topic, key.as_ref()), ("trucks", "trucks/AB123CD/route"));
        assert_eq!(m.topic_for_key("trucks", "AB123CD"), "trucks/AB123CD");
        assert_eq!(
            m.topic_for_key("trucks", "trucks/X/route"),
            "trucks/X/route"
        );
        assert_eq!(m.topic_for_key("default", "AB123CD"), "AB123CD");
        assert_eq!(m.kafka_topics_for_filter("trucks/+"), vec!["trucks"]);
        assert_eq!(m.rules()[0].to_string(), "trucks:trucks/{plate}:{plate}");
    }

    /// A bad template stops the broker at start with the rule named; a
    /// pattern with named levels and no template keeps key = topic.
    #[test]
    fn bad_key_templates_name_the_rule() {
        let e = Rule::parse("trucks:trucks/{plate}:{plat}").unwrap_err();
        assert!(
            e.to_string().contains("trucks:trucks/{plate}:{plat}"),
            "{e}"
        );
        assert!(e.to_string().contains("{plat}"), "{e}");
        assert!(Rule::parse("trucks:trucks/{plate}/#:{plate}").is_err());
        let r = Rule::parse("t:a:b/{x}").unwrap();
        assert_eq!((r.pattern.as_str(), r.key.is_none()), ("a:b/+", true));
        assert!(Rule::parse("t:a/x{y}").is_err());
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
                    .map(|(i, p)| Rule::parse(&format!("k{i}:{p}")).unwrap())
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
