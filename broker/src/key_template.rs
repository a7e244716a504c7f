//! Key templates of mapping rules: which Kafka record key a PUBLISH gets,
//! and which MQTT topic a keyed record from another producer stands for.
//! Pure logic, no I/O.
//!
//! A rule's MQTT pattern may name single levels, `trucks/{plate}`; a named
//! level matches like `+`. The rule's key template builds the record key
//! from the named levels, `{plate}` or `{fleet}-{plate}`. Written this way,
//! every record of one truck has the same key, so Kafka keeps them on one
//! partition in order, and Kafka consumers key by entity as they expect.
//!
//! The inverse is what makes a record from any producer reach MQTT: a key
//! `AB123CD` on a `trucks/{plate}` rule is the topic `trucks/AB123CD`. So a
//! template must be invertible, which is checked when the rule is parsed:
//! it uses every named level exactly once, two placeholders are separated
//! by a literal, and the pattern has no anonymous wildcard (`+`, `#`) that
//! the key could not give back.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// Index of the named level in the pattern.
    Level(usize),
}

/// A rule's MQTT pattern with its named levels, and its key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    /// The pattern's levels; `None` where the level is named.
    levels: Vec<Option<String>>,
    parts: Vec<Part>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("level {0:?} mixes a {{name}} placeholder with other text")]
    LevelNotWhole(String),
    #[error("placeholder {{{0}}} is used twice in the pattern")]
    NameTwice(String),
    #[error("the key template names {{{0}}}, which is not a level of the pattern")]
    UnknownName(String),
    #[error("the key template does not use {{{0}}}, so a key cannot give the topic back")]
    UnusedName(String),
    #[error("the key template uses {{{0}}} twice")]
    UsedTwice(String),
    #[error("two placeholders of the key template must be separated by text")]
    Adjacent,
    #[error("a key template needs a pattern without + and # (a key cannot give them back)")]
    Wildcard,
    #[error("unbalanced {{ or }} in {0:?}")]
    Braces(String),
    #[error("the key template has no placeholder")]
    NoPlaceholder,
}

/// The name of a `{name}` level, if the level is one.
pub fn level_name(level: &str) -> Result<Option<&str>, TemplateError> {
    let named = level.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
    match named {
        Some(n) if valid_name(n) => Ok(Some(n)),
        _ if level.contains(['{', '}']) => Err(TemplateError::LevelNotWhole(level.to_string())),
        _ => Ok(None),
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The pattern as an MQTT filter: every named level becomes `+`.
pub fn as_filter(pattern: &str) -> Result<String, TemplateError> {
    let mut out = Vec::new();
    for level in pattern.split('/') {
        out.push(if level_name(level)?.is_some() {
            "+"
        } else {
            level
        });
    }
    Ok(out.join("/"))
}

impl KeyTemplate {
    /// Checks `template` against the named levels of `pattern`.
    pub fn parse(pattern: &str, template: &str) -> Result<KeyTemplate, TemplateError> {
        let mut levels = Vec::new();
        let mut names: Vec<(String, usize)> = Vec::new();
        for (i, level) in pattern.split('/').enumerate() {
            match level_name(level)? {
                Some(n) if names.iter().any(|(m, _)| m == n) => {
                    return Err(TemplateError::NameTwice(n.to_string()))
                }
                Some(n) => {
                    names.push((n.to_string(), i));
                    levels.push(None);
                }
                None if level == "+" || level == "#" => return Err(TemplateError::Wildcard),
                None => levels.push(Some(level.to_string())),
            }
        }
        let parts = parse_parts(template, &names)?;
        let used = |i: usize| parts.iter().filter(|p| **p == Part::Level(i)).count();
        for (n, i) in &names {
            match used(*i) {
                0 => return Err(TemplateError::UnusedName(n.clone())),
                1 => {}
                _ => return Err(TemplateError::UsedTwice(n.clone())),
            }
        }
        if names.is_empty() {
            return Err(TemplateError::NoPlaceholder);
        }
        Ok(KeyTemplate { levels, parts })
    }

    /// The record key of a PUBLISH to `topic` (which matches the pattern).
    pub fn key_for(&self, topic: &str) -> Option<String> {
        let values: Vec<&str> = topic.split('/').collect();
        if values.len() != self.levels.len() {
            return None;
        }
        let mut key = String::with_capacity(topic.len());
        for part in &self.parts {
            match part {
                Part::Literal(l) => key.push_str(l),
                Part::Level(i) => key.push_str(values.get(*i)?),
            }
        }
        Some(key)
    }

    /// The MQTT topic a record key stands for, when the key has the
    /// template's shape and every value is a valid topic level (no `/`,
    /// `+`, `#`, not empty). A value runs to the first occurrence of the
    /// literal that follows it.
    pub fn topic_for(&self, key: &str) -> Option<String> {
        let mut values: Vec<Option<&str>> = vec![None; self.levels.len()];
        let mut rest = key;
        for (k, part) in self.parts.iter().enumerate() {
            match part {
                Part::Literal(l) => rest = rest.strip_prefix(l.as_str())?,
                Part::Level(i) => {
                    let end = match self.parts.get(k + 1) {
                        Some(Part::Literal(next)) => rest.find(next.as_str())?,
                        _ => rest.len(),
                    };
                    let v = &rest[..end];
                    if v.is_empty() || v.contains(['/', '+', '#', '\0']) {
                        return None;
                    }
                    values[*i] = Some(v);
                    rest = &rest[end..];
                }
            }
        }
        if !rest.is_empty() {
            return None;
        }
        let levels = self
            .levels
            .iter()
            .zip(values)
            .map(|(l, v)| l.as_deref().or(v));
        levels.collect::<Option<Vec<&str>>>().map(|l| l.join("/"))
    }
}

fn parse_parts(template: &str, names: &[(String, usize)]) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        let open = rest.find('{').unwrap_or(rest.len());
        if rest[..open].contains('}') {
            return Err(TemplateError::Braces(template.to_string()));
        }
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_string()));
        }
        rest = &rest[open..];
        if rest.is_empty() {
            break;
        }
        let close = rest
            .find('}')
            .ok_or_else(|| TemplateError::Braces(template.to_string()))?;
        let name = &rest[1..close];
        let level = names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, i)| *i)
            .ok_or_else(|| TemplateError::UnknownName(name.to_string()))?;
        if matches!(parts.last(), Some(Part::Level(_))) {
            return Err(TemplateError::Adjacent);
        }
        parts.push(Part::Level(level));
        rest = &rest[close + 1..];
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plate_key_both_ways() {
        let t = KeyTemplate::parse("trucks/{plate}", "{plate}").unwrap();
        assert_eq!(t.key_for("trucks/AB123CD").as_deref(), Some("AB123CD"));
        assert_eq!(t.topic_for("AB123CD").as_deref(), Some("trucks/AB123CD"));
        assert_eq!(t.topic_for("a/b"), None, "a key with / is no single level");
        assert_eq!(t.topic_for(""), None);
        assert_eq!(t.topic_for("cars/+"), None);
    }

    #[test]
    fn several_levels_with_literals() {
        let t = KeyTemplate::parse("fleet/{fleet}/truck/{plate}/pos", "{fleet}:{plate}").unwrap();
        assert_eq!(
            t.key_for("fleet/north/truck/X1/pos").as_deref(),
            Some("north:X1")
        );
        assert_eq!(
            t.topic_for("north:X1").as_deref(),
            Some("fleet/north/truck/X1/pos")
        );
        assert_eq!(t.topic_for("north-X1"), None, "literal missing");
        // The second value may hold the separator; the first runs to its first occurrence.
        assert_eq!(
            t.topic_for("a:b:c").as_deref(),
            Some("fleet/a/truck/b:c/pos")
        );
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        use TemplateError::*;
        let e = |p: &str, t: &str| KeyTemplate::parse(p, t).unwrap_err();
        assert_eq!(e("t/{a}", "{b}"), UnknownName("b".into()));
        assert_eq!(e("t/{a}/{b}", "{a}"), UnusedName("b".into()));
        assert_eq!(e("t/{a}/{b}", "{a}{b}"), Adjacent);
        assert_eq!(e("t/{a}", "{a}-{a}"), UsedTwice("a".into()));
        assert_eq!(e("t/{a}/{a}", "{a}"), NameTwice("a".into()));
        assert_eq!(e("t/{a}/#", "{a}"), Wildcard);
        assert_eq!(e("t/+/{a}", "{a}"), Wildcard);
        assert_eq!(e("t/x{a}", "{a}"), LevelNotWhole("x{a}".into()));
        assert_eq!(e("t/{a}", "{a"), Braces("{a".into()));
        assert_eq!(e("t/{a}", "a}"), Braces("a}".into()));
        assert_eq!(e("t/x", "k"), NoPlaceholder);
    }

    #[test]
    fn named_levels_read_as_single_level_wildcards() {
        assert_eq!(as_filter("trucks/{plate}/x").unwrap(), "trucks/+/x");
        assert_eq!(as_filter("a/#").unwrap(), "a/#");
        assert!(as_filter("a/{b").is_err());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = String> {
            "[A-Za-z0-9_.]{1,8}"
        }

        proptest! {
            /// Any topic a templated rule matches round-trips through its key,
            /// whatever the values hold but the separators.
            #[test]
            fn topic_key_topic_round_trips(a in value(), b in value(), sep in "[-:=@]{1,2}") {
                let t = KeyTemplate::parse("f/{a}/x/{b}", &format!("k{sep}{{a}}{sep}{{b}}")).unwrap();
                let topic = format!("f/{a}/x/{b}");
                let key = t.key_for(&topic).unwrap();
                prop_assert_eq!(t.topic_for(&key), Some(topic));
            }

            /// Whatever key comes from outside, the topic it gives (if any)
            /// is a topic name the pattern matches, and gives the key back.
            #[test]
            fn any_key_gives_a_matching_topic_or_none(key in "[A-Za-z0-9/+#:-]{0,12}") {
                let t = KeyTemplate::parse("f/{a}/{b}", "{a}:{b}").unwrap();
                if let Some(topic) = t.topic_for(&key) {
                    prop_assert!(lodestream_mqtt::topic::validate_topic_name(&topic).is_ok());
                    prop_assert!(lodestream_mqtt::topic::matches("f/+/+", &topic));
                    prop_assert_eq!(t.key_for(&topic), Some(key));
                }
            }
        }
    }
}
