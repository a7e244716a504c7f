//! Topic names, topic filters and MQTT subscription matching (spec 4.7, 4.8.2).
//!
//! All functions work on `&str`, so UTF-8 well-formedness is already given;
//! what is checked here is the MQTT-level syntax on top of it.

/// Longest topic name or filter, in bytes [MQTT-4.7.3-3].
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Prefix of a shared subscription filter (MQTT 5, spec 4.8.2).
pub const SHARE_PREFIX: &str = "$share/";

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicError {
    #[error("topic must be at least one character long [MQTT-4.7.3-1]")]
    Empty,
    #[error("topic is longer than 65535 bytes [MQTT-4.7.3-3]")]
    TooLong,
    #[error("topic contains U+0000 [MQTT-4.7.3-2]")]
    NullCharacter,
    #[error("topic name contains a wildcard character [MQTT-3.3.2-2]")]
    WildcardInTopicName,
    #[error("'#' must be the last level and alone on its level [MQTT-4.7.1-1]")]
    InvalidMultiLevelWildcard,
    #[error("'+' must occupy an entire level [MQTT-4.7.1-2]")]
    InvalidSingleLevelWildcard,
    #[error(
        "invalid shared subscription filter, expected $share/{{group}}/{{filter}} [MQTT-4.8.2-1/2]"
    )]
    InvalidSharedSubscription,
}

/// Non-empty and at most `MAX_TOPIC_LEN` bytes: names and filters alike.
fn check_len(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    Ok(())
}

fn check_common(s: &str) -> Result<(), TopicError> {
    check_len(s)?;
    if s.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// Validates a topic name as used in PUBLISH and Will Topic: non-empty, at
/// most 65535 bytes, no U+0000 and no wildcard characters.
///
/// The empty topic name allowed by MQTT 5 together with a Topic Alias is
/// handled by the codec, not here.
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    check_len(name)?;
    // One pass over the bytes: the three characters are ASCII, which never
    // occur inside a multi-byte UTF-8 sequence. Every delivery's encoding
    // runs this; three `contains` scans (one by `char`) were 7 % of the
    // read path's instructions. U+0000 wins over a wildcard, as before.
    let mut wildcard = false;
    for b in name.bytes() {
        match b {
            0 => return Err(TopicError::NullCharacter),
            b'+' | b'#' => wildcard = true,
            _ => {}
        }
    }
    if wildcard {
        return Err(TopicError::WildcardInTopicName);
    }
    Ok(())
}

/// Validates topic filter syntax: non-empty, at most 65535 bytes, no U+0000,
/// `#` only as the whole last level, `+` only as a whole level.
///
/// `$share/...` filters are plain filters for this function (they are
/// syntactically valid filters); use [`SharedFilter::parse`] to check the
/// shared subscription syntax on top.
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::InvalidMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::InvalidSingleLevelWildcard);
        }
    }
    Ok(())
}

/// True when the string contains `+` or `#`.
pub fn has_wildcards(s: &str) -> bool {
    s.contains(['+', '#'])
}

/// The levels of a topic name or filter (`"a//b"` has three levels, the
/// middle one empty).
pub fn levels(s: &str) -> std::str::Split<'_, char> {
    s.split('/')
}

fn is_wildcard_level(level: &str) -> bool {
    level == "+" || level == "#"
}

/// Does `filter` match `topic`?
///
/// Both arguments are expected to be valid (see [`validate_topic_filter`] and
/// [`validate_topic_name`]); for invalid input the result is unspecified but
/// the function never panics. Shared filters must be passed without their
/// `$share/{group}/` prefix.
///
/// * `sport/#` matches `sport` and `sport/tennis/player1`; `#` matches the
///   parent level too (spec 4.7.1.2).
/// * `+` matches exactly one level, which may be empty: `+/+` matches `/finance`.
/// * Filters starting with a wildcard do not match topics starting with `$`
///   [MQTT-4.7.2-1]: `#` does not match `$SYS/uptime`, `$SYS/#` does.
///
/// ```
/// use lodestream_mqtt::topic::matches;
/// assert!(matches("sport/tennis/#", "sport/tennis"));
/// assert!(matches("+/+", "/finance"));
/// assert!(!matches("#", "$SYS/uptime"));
/// ```
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            // '#' matches the remaining levels, including none at all.
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Can the two filters match at least one common (valid) topic name?
///
/// Used to decide which Kafka topics a subscription must read: `a` may be a
/// mapping rule's pattern and `b` a subscription filter (or any two filters;
/// the relation is symmetric). Shared filters must be passed without their
/// `$share/{group}/` prefix.
///
/// Rules, level by level: `#` on either side overlaps with everything that
/// remains (including nothing: `cars/#` overlaps `cars`), `+` overlaps any
/// single level, literals must be equal, and both filters must end together
/// otherwise. On top of that the `$` rule [MQTT-4.7.2-1] applies: a filter
/// whose first level is a wildcard never matches a topic whose first level
/// starts with `$`, so it cannot overlap a filter whose first level is a
/// literal starting with `$`.
///
/// | a | b | overlap |
/// |---|---|---|
/// | `cars/speed/+` | `cars/#` | true |
/// | `cars/speed/+` | `trains/#` | false |
/// | `#` | `cars/+/x` | true |
/// | `#` | `$SYS/x` | false (`#` never matches `$SYS/x`) |
/// | `+/x` | `$SYS/#` | false |
/// | `$SYS/+` | `$SYS/#` | true |
/// | `cars/+` | `cars` | false (`+` needs a level) |
/// | `cars/#` | `cars` | true (`#` includes the parent) |
/// | `/#` | `+` | false (the only shared topic would be the empty, invalid, name) |
///
/// ```
/// use lodestream_mqtt::topic::filters_may_overlap;
/// assert!(filters_may_overlap("cars/speed/+", "cars/#"));
/// assert!(!filters_may_overlap("cars/speed/+", "trains/#"));
/// assert!(filters_may_overlap("#", "trucks/1/gps"));
/// assert!(!filters_may_overlap("#", "$SYS/x"));
/// ```
pub fn filters_may_overlap(a: &str, b: &str) -> bool {
    let first_a = a.split('/').next().unwrap_or_default();
    let first_b = b.split('/').next().unwrap_or_default();
    if (is_wildcard_level(first_a) && first_b.starts_with('$'))
        || (is_wildcard_level(first_b) && first_a.starts_with('$'))
    {
        return false;
    }
    let mut la = a.split('/');
    let mut lb = b.split('/');
    let mut depth = 0usize;
    // Whether the common topic's first level has to be empty (a literal ""
    // on either side).
    let mut first_empty = false;
    loop {
        match (la.next(), lb.next()) {
            // One filter ends here and the other's `#` matches its parent
            // level: the common topic is the levels so far, which must not be
            // the empty string (`/#` vs `+` would only share the topic "").
            (Some("#"), None) | (None, Some("#")) | (None, None) => {
                return !(depth == 1 && first_empty)
            }
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {
                if depth == 0 {
                    first_empty = x.is_empty() || y.is_empty();
                }
            }
            _ => return false,
        }
        depth += 1;
    }
}

/// True when the filter starts with `$share/` (whether or not it is a valid
/// shared subscription).
pub fn is_shared(filter: &str) -> bool {
    filter.starts_with(SHARE_PREFIX)
}

/// A shared subscription `$share/{group}/{filter}` (MQTT 5, spec 4.8.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedFilter {
    /// The ShareName: non-empty, without `/`, `+` or `#`.
    pub group: String,
    /// The Topic Filter that follows, validated with [`validate_topic_filter`].
    pub filter: String,
}

impl SharedFilter {
    /// Parses `$share/{group}/{filter}`. Returns `None` if `s` is not a
    /// shared subscription or is an invalid one [MQTT-4.8.2-1] [MQTT-4.8.2-2]:
    /// empty group, group with `+`/`#`, missing `/` after the group, or an
    /// invalid (e.g. empty) filter.
    ///
    /// ```
    /// use lodestream_mqtt::topic::SharedFilter;
    /// let s = SharedFilter::parse("$share/fleet/trucks/+/gps").unwrap();
    /// assert_eq!((s.group.as_str(), s.filter.as_str()), ("fleet", "trucks/+/gps"));
    /// assert!(SharedFilter::parse("$share/fleet").is_none());
    /// ```
    pub fn parse(s: &str) -> Option<SharedFilter> {
        let rest = s.strip_prefix(SHARE_PREFIX)?;
        let (group, filter) = rest.split_once('/')?;
        if group.is_empty() || group.contains(['+', '#', '\0']) {
            return None;
        }
        validate_topic_filter(filter).ok()?;
        Some(SharedFilter {
            group: group.to_owned(),
            filter: filter.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// [MQTT-4.7.3-1]
    #[test]
    fn mqtt_4_7_3_1_topics_at_least_one_character() {
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_filter(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name("/"), Ok(()));
        assert_eq!(validate_topic_filter("/"), Ok(()));
    }

    /// [MQTT-4.7.3-2]
    #[test]
    fn mqtt_4_7_3_2_no_null_character() {
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::NullCharacter));
        assert_eq!(
            validate_topic_filter("a/\0"),
            Err(TopicError::NullCharacter)
        );
    }

    /// [MQTT-4.7.3-3]
    #[test]
    fn mqtt_4_7_3_3_at_most_65535_bytes() {
        let ok = "a".repeat(MAX_TOPIC_LEN);
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(validate_topic_name(&ok), Ok(()));
        assert_eq!(validate_topic_name(&long), Err(TopicError::TooLong));
        assert_eq!(validate_topic_filter(&long), Err(TopicError::TooLong));
    }

    /// [MQTT-3.3.2-2] [MQTT-4.7.0-1] (v5) / [MQTT-4.7.1-1] (3.1.1)
    #[test]
    fn mqtt_4_7_0_1_no_wildcards_in_topic_names() {
        for t in ["+", "#", "a/+", "a/#", "a/b+", "sport/tennis#"] {
            assert_eq!(
                validate_topic_name(t),
                Err(TopicError::WildcardInTopicName),
                "{t}"
            );
        }
    }

    /// [MQTT-4.7.1-1] (v5) / [MQTT-4.7.1-2] (3.1.1): '#' alone and last.
    #[test]
    fn mqtt_4_7_1_1_multi_level_wildcard_last_and_alone() {
        for f in ["#", "sport/#", "sport/tennis/#", "/#", "+/#"] {
            assert_eq!(validate_topic_filter(f), Ok(()), "{f}");
        }
        for f in ["sport/tennis#", "sport/tennis/#/ranking", "#/", "a#", "##"] {
            assert_eq!(
                validate_topic_filter(f),
                Err(TopicError::InvalidMultiLevelWildcard),
                "{f}"
            );
        }
    }

    /// [MQTT-4.7.1-2] (v5) / [MQTT-4.7.1-3] (3.1.1): '+' occupies a whole level.
    #[test]
    fn mqtt_4_7_1_2_single_level_wildcard_whole_level() {
        for f in ["+", "+/tennis/#", "sport/+/player1", "/+", "+/+", "a//+"] {
            assert_eq!(validate_topic_filter(f), Ok(()), "{f}");
        }
        for f in ["sport+", "sport/+a", "++", "a/b+/c"] {
            assert_eq!(
                validate_topic_filter(f),
                Err(TopicError::InvalidSingleLevelWildcard),
                "{f}"
            );
        }
    }

    /// Spec 4.7.1.2 / 4.7.1.3 examples.
    #[test]
    fn spec_4_7_1_matching_examples() {
        let table: &[(&str, &str, bool)] = &[
            // 4.7.1.2 multi-level wildcard
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("#", "sport/tennis", true),
            ("#", "/", true),
            // 4.7.1.3 single-level wildcard
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player2", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("+/tennis/#", "sport/tennis/x/y", true),
            ("sport/+/player1", "sport/tennis/player1", true),
            // literals
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
            ("sport/#", "sports", false),
            // case sensitive, no normalisation [MQTT-4.7.3-4]
            ("Sport", "sport", false),
        ];
        for (f, t, want) in table {
            assert_eq!(matches(f, t), *want, "{f} vs {t}");
        }
    }

    /// [MQTT-4.7.2-1]
    #[test]
    fn mqtt_4_7_2_1_wildcards_do_not_match_dollar_topics() {
        assert!(!matches("#", "$SYS/monitor/Clients"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!matches("+", "$SYS"));
        // Only the first character of the topic counts.
        assert!(matches("#", "a/$SYS"));
        assert!(matches("a/+", "a/$x"));
    }

    /// [MQTT-4.8.2-1] [MQTT-4.8.2-2]
    #[test]
    fn mqtt_4_8_2_1_shared_subscription_syntax() {
        let s = SharedFilter::parse("$share/g/a/+/#").unwrap();
        assert_eq!(s.group, "g");
        assert_eq!(s.filter, "a/+/#");
        assert_eq!(
            SharedFilter::parse("$share/g//").map(|s| s.filter),
            Some("/".to_owned())
        );
        for bad in [
            "$share/",
            "$share//a",
            "$share/g",
            "$share/g/",
            "$share/g+/a",
            "$share/#/a",
            "$share/g/a/#/b",
            "$shared/g/a",
            "a/b",
        ] {
            assert_eq!(SharedFilter::parse(bad), None, "{bad}");
        }
        assert!(is_shared("$share/g/a"));
        assert!(!is_shared("$sharex/g/a"));
    }

    #[test]
    fn has_wildcards_and_levels() {
        assert!(has_wildcards("a/+"));
        assert!(has_wildcards("#"));
        assert!(!has_wildcards("a/b"));
        assert_eq!(levels("a//b").collect::<Vec<_>>(), vec!["a", "", "b"]);
    }

    #[test]
    fn overlap_table() {
        let table: &[(&str, &str, bool)] = &[
            ("cars/speed/+", "cars/#", true),
            ("cars/speed/+", "trains/#", false),
            ("#", "cars/+/x", true),
            ("#", "#", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/#", false),
            ("+", "$SYS", false),
            ("$SYS/+", "$SYS/#", true),
            ("$SYS/#", "$SYS", true),
            ("cars/+", "cars", false),
            ("cars/#", "cars", true),
            ("cars/+/gps", "cars/1/+", true),
            ("cars/+/gps", "cars/1/speed", false),
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("+/+", "a", false),
            ("+/#", "a", true),
            ("a/$x", "+/+", true),
            ("/#", "+", false),
            ("/#", "+/#", true),
            ("/#", "/#", true),
            ("/", "+/#", true),
            ("#", "/", true),
        ];
        for (a, b, want) in table {
            assert_eq!(filters_may_overlap(a, b), *want, "{a} vs {b}");
            assert_eq!(filters_may_overlap(b, a), *want, "{b} vs {a} (symmetry)");
        }
    }

    fn arb_filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(
                prop_oneof![Just("a"), Just("b"), Just("$s"), Just(""), Just("+")],
                1..4,
            ),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                levels.join("/")
            })
            .prop_filter("valid", |f| validate_topic_filter(f).is_ok())
    }

    /// All topic names of 1..=4 levels over the alphabet the filters use.
    /// Filters have at most 4 levels, so if two of them share a matching
    /// topic they share one in this set (a `+` level can always be `a`).
    fn universe() -> Vec<String> {
        let alphabet = ["a", "b", "$s", ""];
        let mut out: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
        let mut last = out.clone();
        for _ in 1..4 {
            let mut next = Vec::new();
            for p in &last {
                for l in alphabet {
                    next.push(format!("{p}/{l}"));
                }
            }
            out.extend(next.iter().cloned());
            last = next;
        }
        out.retain(|t| validate_topic_name(t).is_ok());
        out
    }

    proptest! {
        /// `filters_may_overlap` is exactly "some topic matches both".
        #[test]
        fn overlap_agrees_with_brute_force(a in arb_filter(), b in arb_filter()) {
            let brute = universe().iter().any(|t| matches(&a, t) && matches(&b, t));
            prop_assert_eq!(filters_may_overlap(&a, &b), brute, "{} vs {}", a, b);
        }

        /// A topic name matches itself as a filter.
        #[test]
        fn topic_matches_itself(t in "[a-z$/]{1,12}") {
            prop_assume!(validate_topic_name(&t).is_ok());
            prop_assert!(matches(&t, &t));
        }

        /// The byte scan gives the verdict of the spec's rules read by
        /// character: U+0000 first [MQTT-4.7.3-2], then wildcards
        /// [MQTT-3.3.2-2], on any UTF-8 text (multi-byte characters too).
        #[test]
        fn topic_name_check_agrees_with_char_rules(s in "[a-z/+#\\x00é€😀]{0,12}") {
            let by_char = if s.is_empty() {
                Err(TopicError::Empty)
            } else if s.contains('\0') {
                Err(TopicError::NullCharacter)
            } else if s.contains(['+', '#']) {
                Err(TopicError::WildcardInTopicName)
            } else {
                Ok(())
            };
            prop_assert_eq!(validate_topic_name(&s), by_char);
        }

        #[test]
        fn validators_never_panic(s in "\\PC{0,16}") {
            let _ = validate_topic_name(&s);
            let _ = validate_topic_filter(&s);
            let _ = SharedFilter::parse(&s);
            let _ = matches(&s, &s);
            let _ = filters_may_overlap(&s, "a/#");
        }
    }
}
