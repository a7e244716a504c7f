//! Authorization: which identity may publish to or subscribe to which topics.
//!
//! Rules file (TOML), an ordered list of `[[rule]]` tables:
//!
//! ```toml
//! [[rule]]
//! who = "user:trucksim"        # user:NAME | cert:ID | anonymous | authenticated | *
//! action = "publish"           # publish | subscribe | replay | all
//! topics = ["trucks/#"]        # MQTT filters; %u = username, %c = client id,
//!                              # %{claim:NAME} = claim NAME of the login JWT
//! allow = true                 # required: true allows, false denies
//! match = "pattern"            # optional: pattern (default) | literal
//! overlap = "refuse"           # optional, deny rules for subscribe: refuse (default) | filter
//! ```
//!
//! Evaluation: the first rule whose `who` and `action` apply and one of whose
//! topics matches decides. When a rules file is loaded and no rule matches,
//! the request is denied; without a rules file ([`Acl::allow_all`]) everything
//! is allowed.
//!
//! Topic matching:
//! - publish: the rule's filter must match the topic name;
//! - subscribe, allow rule: the rule's filter must *cover* the requested
//!   filter (every topic it can match): rule `trucks/#` allows `trucks/+`,
//!   rule `trucks/+` does not allow `trucks/#`;
//! - subscribe, deny rule with `overlap = "refuse"` (the default): applies
//!   as soon as its filter *overlaps* the requested one, so a deny on
//!   `trucks/secret/#` also refuses `trucks/#` (which would otherwise deliver
//!   the secret topics);
//! - subscribe, deny rule with `overlap = "filter"`: refuses only a filter it
//!   covers entirely (`trucks/secret/#`, `trucks/secret/x`); an overlapping
//!   filter such as `trucks/#` or `#` goes on to the next rules and, when
//!   granted, never delivers a topic the rule denies: live messages, what a
//!   resumed session catches up on from Kafka and retained messages are all
//!   checked at delivery (`Acl::may_deliver`), like Mosquitto's `acl_file`;
//! - shared subscriptions `$share/group/filter` are checked on `filter`;
//! - replay (history from Kafka on SUBSCRIBE, `replay.rs`): a replaying
//!   SUBSCRIBE needs `subscribe` on its filter *and* `replay` on it, each
//!   decided by its own first matching rule (`all` rules apply to both);
//!   `replay` rules match filters as subscribe rules do (an allow must
//!   cover the filter, a deny refuses every overlapping one), so a deny
//!   refuses history (SUBACK 0x87) while the live subscription stays
//!   allowed. With a rules file and no rule for `replay`, replay is denied.
//!
//! `match = "literal"` compares the rule's topics as plain strings, without
//! wildcards (EMQX's `{eq, ...}`, Mosquitto's `subscribeLiteral`): a literal
//! `trucks/#` allows or refuses exactly the filter `trucks/#`, not
//! `trucks/1`; a literal with `overlap = "filter"` withholds deliveries of
//! exactly that topic name.
//!
//! Why `refuse` stays the default: existing rule files keep their meaning,
//! and a client learns at SUBACK (0x87, 3.1.1: 0x80) that its filter reaches
//! topics it may not read, instead of silently receiving fewer messages. Use
//! `filter` where tools subscribe to `#` (MQTT Explorer, `mosquitto_sub -t
//! '#'`). With `filter`, a shared subscription's message denied to the
//! member it was given to is dropped, not offered to another member.
//!
//! Substitutions: `%u` is the verified username, `%c` the client id. A rule
//! using `%u` never matches an identity without a username; a value
//! containing `/`, `+`, `#` or NUL (or an empty one) makes the rule not match,
//! so a client cannot widen a rule through its own name or client id.
//! `%{claim:NAME}` is the string (or number) claim NAME of the JWT the client
//! logged in with (see `auth::jwt`), under the same safety rule; a rule using
//! it never matches a client without a token or without that claim.

use std::path::Path;

use lodestream_mqtt::topic::{
    filters_may_overlap, is_shared, matches, validate_topic_filter, SharedFilter,
};
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::auth::Identity;
use crate::mapping::covers;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
    /// A SUBSCRIBE asking for history from Kafka (checked on the filter).
    Replay,
}

#[derive(Debug, Error)]
pub enum AclError {
    #[error("ACL file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ACL{}: {message}", in_file(.path))]
    Syntax {
        path: Option<String>,
        message: String,
    },
    #[error("ACL{}, line {line}, rule {rule}: {message}", in_file(.path))]
    Rule {
        path: Option<String>,
        line: usize,
        rule: usize,
        message: String,
    },
}

fn in_file(path: &Option<String>) -> String {
    path.as_ref()
        .map(|p| format!(" file {p}"))
        .unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    User(String),
    Cert(String),
    Anonymous,
    Authenticated,
    Anyone,
}

impl Who {
    fn applies(&self, id: &Identity) -> bool {
        match self {
            Who::User(u) => !id.anonymous && id.username.as_deref() == Some(u),
            Who::Cert(c) => !id.anonymous && id.cert_identity.as_deref() == Some(c),
            Who::Anonymous => id.anonymous,
            Who::Authenticated => !id.anonymous,
            Who::Anyone => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleAction {
    Publish,
    Subscribe,
    Replay,
    All,
}

/// How a rule's topics are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    /// MQTT filter semantics (wildcards).
    Pattern,
    /// Plain string equality.
    Literal,
}

/// What a subscribe deny rule does with a filter that only overlaps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overlap {
    Refuse,
    Filter,
}

#[derive(Debug, Clone)]
struct Rule {
    who: Who,
    action: RuleAction,
    topics: Vec<String>,
    allow: bool,
    matching: Match,
    overlap: Overlap,
}

impl Rule {
    fn applies(&self, who: &Identity, action: Action) -> bool {
        let action_applies = matches!(
            (self.action, action),
            (RuleAction::All, _)
                | (RuleAction::Publish, Action::Publish)
                | (RuleAction::Subscribe, Action::Subscribe)
                | (RuleAction::Replay, Action::Replay)
        );
        action_applies && self.who.applies(who)
    }

    /// Whether one of the rule's topics decides `action` on `target` (a
    /// topic name for publish, a filter for subscribe).
    fn hits(&self, who: &Identity, action: Action, target: &str) -> bool {
        self.topics.iter().any(|pattern| {
            let Some(pattern) = substitute(pattern, who) else {
                return false;
            };
            // A replay is matched as the subscription it asks history for.
            let filter_action = matches!(action, Action::Subscribe | Action::Replay);
            match (self.matching, filter_action, self.allow, self.overlap) {
                (Match::Literal, _, _, _) => pattern == target,
                (Match::Pattern, false, _, _) => matches(&pattern, target),
                (Match::Pattern, true, true, _) => covers(&pattern, target),
                (Match::Pattern, true, false, Overlap::Refuse) => {
                    filters_may_overlap(&pattern, target)
                }
                (Match::Pattern, true, false, Overlap::Filter) => covers(&pattern, target),
            }
        })
    }

    /// Whether one of the rule's topics matches the topic name `topic`.
    fn hits_topic(&self, who: &Identity, topic: &str) -> bool {
        self.topics.iter().any(|pattern| {
            substitute(pattern, who).is_some_and(|p| match self.matching {
                Match::Literal => p == topic,
                Match::Pattern => matches(&p, topic),
            })
        })
    }
}

/// Authorization rules; cheap to check, immutable once built (reload by
/// building a new one and swapping it).
#[derive(Debug, Clone)]
pub struct Acl {
    /// `None`: no rules file, everything allowed.
    rules: Option<Vec<Rule>>,
    /// Some rule has `overlap = "filter"`: deliveries must be checked.
    filters_deliveries: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    who: Spanned<String>,
    action: Spanned<String>,
    topics: Spanned<Vec<String>>,
    allow: bool,
    #[serde(rename = "match")]
    matching: Option<Spanned<String>>,
    overlap: Option<Spanned<String>>,
}

impl Acl {
    pub fn allow_all() -> Acl {
        Acl {
            rules: None,
            filters_deliveries: false,
        }
    }

    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Io {
            path: path.display().to_string(),
            source,
        })?;
        parse_with(&text, Some(path.display().to_string()))
    }

    pub fn parse(toml: &str) -> Result<Acl, AclError> {
        parse_with(toml, None)
    }

    /// For publish `topic_or_filter` is a topic name; for subscribe it is a
    /// filter (see the module documentation for how rules apply to filters).
    pub fn check(&self, who: &Identity, action: Action, topic_or_filter: &str) -> bool {
        // `$SYS` is the broker's own (crate::sys): a client's figures there
        // would be taken for a node's and enter the cluster totals.
        if action == Action::Publish && topic_or_filter.starts_with("$SYS/") {
            return false;
        }
        let Some(rules) = &self.rules else {
            return true;
        };
        let shared;
        let target = match action {
            Action::Publish => topic_or_filter,
            Action::Subscribe | Action::Replay if is_shared(topic_or_filter) => {
                match SharedFilter::parse(topic_or_filter) {
                    Some(s) => {
                        shared = s;
                        shared.filter.as_str()
                    }
                    None => return false,
                }
            }
            Action::Subscribe | Action::Replay => topic_or_filter,
        };
        for rule in rules {
            if rule.applies(who, action) && rule.hits(who, action, target) {
                return rule.allow;
            }
        }
        false
    }

    /// Whether a message on `topic` may be delivered to `who` through a
    /// subscription it was granted: `false` only when a deny rule with
    /// `overlap = "filter"` matches the topic before any allow rule does.
    /// Deny rules with `overlap = "refuse"` already refused every filter that
    /// could deliver their topics, so they are not looked at again.
    pub fn may_deliver(&self, who: &Identity, topic: &str) -> bool {
        let Some(rules) = self.rules.as_ref().filter(|_| self.filters_deliveries) else {
            return true;
        };
        for rule in rules {
            let decides = rule.allow || rule.overlap == Overlap::Filter;
            if decides && rule.applies(who, Action::Subscribe) && rule.hits_topic(who, topic) {
                return rule.allow;
            }
        }
        true
    }
}

/// Replaces `%u` and `%c`; `None` when a needed value is missing or could
/// change the filter's structure.
fn substitute(pattern: &str, who: &Identity) -> Option<String> {
    if !pattern.contains('%') {
        return Some(pattern.to_string());
    }
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#', '\0']);
    let mut out = replace_claims(pattern, |name| {
        claim_value(who.claims.as_deref(), name).filter(|v| safe(v))
    })?;
    if out.contains("%u") {
        let user = who.username.as_deref().filter(|u| safe(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if !safe(&who.client_id) {
            return None;
        }
        out = out.replace("%c", &who.client_id);
    }
    Some(out)
}

const CLAIM_OPEN: &str = "%{claim:";

/// Replaces every `%{claim:NAME}` with `value(NAME)`; `None` when a
/// placeholder is unterminated or `value` gives nothing.
fn replace_claims(pattern: &str, value: impl Fn(&str) -> Option<String>) -> Option<String> {
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(at) = rest.find(CLAIM_OPEN) {
        out.push_str(&rest[..at]);
        let after = &rest[at + CLAIM_OPEN.len()..];
        let end = after.find('}')?;
        out.push_str(&value(&after[..end])?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// A claim's value for a rule: strings and numbers only.
fn claim_value(
    claims: Option<&serde_json::Map<String, serde_json::Value>>,
    name: &str,
) -> Option<String> {
    match claims?.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The `match` and `overlap` settings of a rule; an error names the span of
/// the offending value.
fn rule_options(
    r: &RawRule,
    action: RuleAction,
) -> Result<(Match, Overlap), (std::ops::Range<usize>, String)> {
    let matching = match r.matching.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("pattern") => Match::Pattern,
        Some("literal") => Match::Literal,
        Some(s) => {
            return Err((
                r.matching.as_ref().map(|m| m.span()).unwrap_or_default(),
                format!("match = {s:?}: expected \"pattern\" or \"literal\""),
            ))
        }
    };
    let overlap = match r.overlap.as_ref().map(|o| o.get_ref().as_str()) {
        None | Some("refuse") => Overlap::Refuse,
        // Withholding at delivery is a subscription's business; a replay
        // deny refuses (its history would pass the same delivery check).
        Some("filter") if !r.allow && matches!(action, RuleAction::Subscribe | RuleAction::All) => {
            Overlap::Filter
        }
        Some(s) => {
            return Err((
                r.overlap.as_ref().map(|o| o.span()).unwrap_or_default(),
                format!(
                    "overlap = {s:?}: expected \"refuse\" or \"filter\", and \"filter\" \
                     only on a deny rule (allow = false) for subscribe or all"
                ),
            ))
        }
    };
    Ok((matching, overlap))
}

fn parse_with(text: &str, path: Option<String>) -> Result<Acl, AclError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| AclError::Syntax {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if raw.rule.is_empty() {
        return Err(AclError::Syntax {
            path,
            message: "no [[rule]] entries; to allow everything configure no ACL file, to deny \
                      everything add a rule with allow = false"
                .into(),
        });
    }
    let mut rules = Vec::with_capacity(raw.rule.len());
    for (i, spanned) in raw.rule.into_iter().enumerate() {
        let rule_line = line_of(text, spanned.span().start);
        let r = spanned.into_inner();
        let err = |at: std::ops::Range<usize>, message: String| AclError::Rule {
            path: path.clone(),
            line: if at.is_empty() {
                rule_line
            } else {
                line_of(text, at.start)
            },
            rule: i + 1,
            message,
        };
        let who = match r.who.get_ref().as_str() {
            "*" => Who::Anyone,
            "anonymous" => Who::Anonymous,
            "authenticated" => Who::Authenticated,
            s => match s.split_once(':') {
                Some(("user", name)) if !name.is_empty() => Who::User(name.to_string()),
                Some(("cert", id)) if !id.is_empty() => Who::Cert(id.to_string()),
                _ => {
                    return Err(err(
                        r.who.span(),
                        format!(
                            "who = {s:?}: expected \"user:NAME\", \"cert:ID\", \"anonymous\", \
                             \"authenticated\" or \"*\""
                        ),
                    ))
                }
            },
        };
        let action = match r.action.get_ref().as_str() {
            "publish" => RuleAction::Publish,
            "subscribe" => RuleAction::Subscribe,
            "replay" => RuleAction::Replay,
            "all" => RuleAction::All,
            s => {
                return Err(err(
                    r.action.span(),
                    format!(
                        "action = {s:?}: expected \"publish\", \"subscribe\", \"replay\" or \"all\""
                    ),
                ))
            }
        };
        let (matching, overlap) =
            rule_options(&r, action).map_err(|(at, message)| err(at, message))?;
        let topics_span = r.topics.span();
        let topics = r.topics.into_inner();
        if topics.is_empty() {
            return Err(err(topics_span, "topics is empty".into()));
        }
        for t in &topics {
            // Check the syntax with placeholders standing for one level part.
            let probe = replace_claims(t, |name| (!name.is_empty()).then(|| "x".into()))
                .map(|p| p.replace("%u", "u").replace("%c", "c"));
            let Some(probe) = probe else {
                return Err(err(
                    topics_span.clone(),
                    format!("topic filter {t:?}: %{{claim:NAME}} needs a name and a closing brace"),
                ));
            };
            if let Err(e) = validate_topic_filter(&probe) {
                return Err(err(topics_span.clone(), format!("topic filter {t:?}: {e}")));
            }
            if is_shared(t) {
                return Err(err(
                    topics_span.clone(),
                    format!("topic filter {t:?}: write the inner filter, shared subscriptions are checked on it"),
                ));
            }
        }
        rules.push(Rule {
            who,
            action,
            topics,
            allow: r.allow,
            matching,
            overlap,
        });
    }
    let filters_deliveries = rules.iter().any(|r| r.overlap == Overlap::Filter);
    Ok(Acl {
        rules: Some(rules),
        filters_deliveries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Identity {
        Identity {
            username: Some(name.into()),
            cert_identity: None,
            client_id: format!("{name}-client"),
            anonymous: false,
            claims: None,
        }
    }

    fn cert(id: &str) -> Identity {
        Identity {
            username: None,
            cert_identity: Some(id.into()),
            client_id: format!("{id}-client"),
            anonymous: false,
            claims: None,
        }
    }

    fn anon() -> Identity {
        Identity {
            username: None,
            cert_identity: None,
            client_id: "anon-client".into(),
            anonymous: true,
            claims: None,
        }
    }

    const RULES: &str = r##"
        [[rule]]
        who = "user:alice"
        action = "publish"
        topics = ["sensors/alice/#"]
        allow = true

        [[rule]]
        who = "cert:truck-1"
        action = "all"
        topics = ["trucks/1/#"]
        allow = true

        [[rule]]
        who = "anonymous"
        action = "subscribe"
        topics = ["public/#"]
        allow = true

        [[rule]]
        who = "authenticated"
        action = "subscribe"
        topics = ["sensors/#"]
        allow = true
    "##;

    #[test]
    fn rule_matrix() {
        use Action::*;
        let acl = Acl::parse(RULES).unwrap();
        let cases: &[(Identity, Action, &str, bool)] = &[
            (user("alice"), Publish, "sensors/alice/t", true),
            (user("alice"), Publish, "sensors/bob/t", false),
            (user("alice"), Subscribe, "sensors/+/t", true),
            (user("alice"), Subscribe, "public/#", false),
            (user("bob"), Publish, "sensors/alice/t", false),
            (cert("truck-1"), Publish, "trucks/1/gps", true),
            (cert("truck-1"), Subscribe, "trucks/1/cmd", true),
            (cert("truck-1"), Publish, "trucks/2/gps", false),
            (cert("truck-2"), Publish, "trucks/1/gps", false),
            (cert("truck-2"), Subscribe, "sensors/#", true),
            (anon(), Subscribe, "public/news", true),
            (anon(), Publish, "public/news", false),
            (anon(), Subscribe, "sensors/#", false),
        ];
        for (who, action, topic, expected) in cases {
            assert_eq!(
                acl.check(who, *action, topic),
                *expected,
                "{who:?} {action:?} {topic}"
            );
        }
    }

    #[test]
    fn subscribe_needs_a_covering_allow_rule() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "*"
            action = "subscribe"
            topics = ["trucks/#", "cars/+"]
            allow = true
            "##,
        )
        .unwrap();
        let a = anon();
        assert!(acl.check(&a, Action::Subscribe, "trucks/+"));
        assert!(acl.check(&a, Action::Subscribe, "trucks"));
        assert!(acl.check(&a, Action::Subscribe, "cars/+"));
        assert!(acl.check(&a, Action::Subscribe, "cars/x"));
        assert!(!acl.check(&a, Action::Subscribe, "cars/#"));
        assert!(!acl.check(&a, Action::Subscribe, "#"));
        assert!(!acl.check(&a, Action::Subscribe, "+/x"));
    }

    #[test]
    fn deny_rule_refuses_overlapping_subscriptions() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "*"
            action = "all"
            topics = ["trucks/secret/#"]
            allow = false
            [[rule]]
            who = "*"
            action = "all"
            topics = ["trucks/#"]
            allow = true
            "##,
        )
        .unwrap();
        let a = user("x");
        assert!(!acl.check(&a, Action::Subscribe, "trucks/#"));
        assert!(!acl.check(&a, Action::Subscribe, "trucks/+/key"));
        assert!(acl.check(&a, Action::Subscribe, "trucks/public/#"));
        assert!(!acl.check(&a, Action::Publish, "trucks/secret/key"));
        assert!(acl.check(&a, Action::Publish, "trucks/public/key"));
    }

    const HIDE_ONE_TOPIC: &str = r##"
        [[rule]]
        who = "user:admin"
        action = "subscribe"
        topics = ["#"]
        allow = true
        [[rule]]
        who = "*"
        action = "subscribe"
        topics = ["test/nosubscribe", "hidden/#"]
        allow = false
        overlap = "filter"
        [[rule]]
        who = "*"
        action = "all"
        topics = ["#"]
        allow = true
    "##;

    #[test]
    fn filter_deny_grants_overlapping_filters_and_withholds_the_denied_topics() {
        let acl = Acl::parse(HIDE_ONE_TOPIC).unwrap();
        let a = user("x");
        use Action::Subscribe;
        // Covered entirely by the deny: refused.
        for f in [
            "test/nosubscribe",
            "hidden/#",
            "hidden/a/+",
            "$share/g/hidden/x",
        ] {
            assert!(!acl.check(&a, Subscribe, f), "{f}");
        }
        // Only overlapping: granted, the denied topics filtered at delivery.
        for f in ["#", "+/+", "test/#", "test/+", "+/nosubscribe", "+/a"] {
            assert!(acl.check(&a, Subscribe, f), "{f}");
        }
        assert!(!acl.may_deliver(&a, "test/nosubscribe"));
        assert!(!acl.may_deliver(&a, "hidden/a/b"));
        assert!(acl.may_deliver(&a, "test/other"));
        assert!(acl.may_deliver(&a, "test/nosubscribe/deeper"));
        // First match wins at delivery too: admin's earlier allow.
        let admin = user("admin");
        assert!(acl.check(&admin, Subscribe, "test/nosubscribe"));
        assert!(acl.may_deliver(&admin, "test/nosubscribe"));
        // Publishing is not what the rule is about.
        assert!(acl.check(&a, Action::Publish, "test/nosubscribe"));
    }

    #[test]
    fn refuse_is_the_default_and_needs_no_delivery_check() {
        let acl = Acl::parse(&HIDE_ONE_TOPIC.replace("overlap = \"filter\"", "")).unwrap();
        let a = user("x");
        assert!(!acl.check(&a, Action::Subscribe, "#"));
        assert!(!acl.check(&a, Action::Subscribe, "test/+"));
        assert!(acl.check(&a, Action::Subscribe, "test/other"));
        assert!(!acl.filters_deliveries);
        assert!(acl.may_deliver(&a, "test/nosubscribe"));
    }

    #[test]
    fn literal_rules_compare_the_string_without_wildcards() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "*"
            action = "subscribe"
            topics = ["trucks/#"]
            allow = false
            match = "literal"
            [[rule]]
            who = "*"
            action = "publish"
            topics = ["cmd/+"]
            allow = true
            match = "literal"
            [[rule]]
            who = "*"
            action = "subscribe"
            topics = ["secret"]
            allow = false
            match = "literal"
            overlap = "filter"
            [[rule]]
            who = "*"
            action = "subscribe"
            topics = ["#"]
            allow = true
            "##,
        )
        .unwrap();
        let a = user("x");
        assert!(!acl.check(&a, Action::Subscribe, "trucks/#"));
        assert!(acl.check(&a, Action::Subscribe, "trucks/+"));
        assert!(acl.check(&a, Action::Subscribe, "trucks/1"));
        // A literal "cmd/+" is no topic name a client can publish to.
        assert!(!acl.check(&a, Action::Publish, "cmd/1"));
        assert!(!acl.check(&a, Action::Subscribe, "secret"));
        assert!(acl.check(&a, Action::Subscribe, "+"));
        assert!(!acl.may_deliver(&a, "secret"));
        assert!(acl.may_deliver(&a, "secrets"));
    }

    #[test]
    fn overlap_and_match_values_are_checked() {
        let rule = |extra: &str, allow: bool, action: &str| {
            Acl::parse(&format!(
                "[[rule]]\nwho = \"*\"\naction = \"{action}\"\ntopics = [\"a\"]\nallow = {allow}\n{extra}\n"
            ))
        };
        assert!(rule("overlap = \"filter\"", false, "all").is_ok());
        for (extra, allow, action) in [
            ("overlap = \"filter\"", true, "subscribe"),
            ("overlap = \"filter\"", false, "publish"),
            ("overlap = \"hide\"", false, "subscribe"),
            ("match = \"regex\"", false, "subscribe"),
        ] {
            let e = rule(extra, allow, action).unwrap_err().to_string();
            assert!(e.contains("rule 1") && e.contains("line 6"), "{extra}: {e}");
        }
    }

    #[test]
    fn first_match_wins() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "user:eve"
            action = "publish"
            topics = ["a/#"]
            allow = false
            [[rule]]
            who = "*"
            action = "publish"
            topics = ["a/#"]
            allow = true
            "##,
        )
        .unwrap();
        assert!(!acl.check(&user("eve"), Action::Publish, "a/b"));
        assert!(acl.check(&user("bob"), Action::Publish, "a/b"));
    }

    #[test]
    fn no_matching_rule_denies_and_no_file_allows() {
        let acl = Acl::parse(RULES).unwrap();
        assert!(!acl.check(&user("alice"), Action::Publish, "elsewhere"));
        assert!(!acl.check(&user("alice"), Action::Subscribe, "$SYS/#"));
        let all = Acl::allow_all();
        assert!(all.check(&anon(), Action::Publish, "anything"));
        assert!(all.check(&anon(), Action::Subscribe, "#"));
    }

    #[test]
    fn username_and_client_id_substitution() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "*"
            action = "all"
            topics = ["users/%u/#", "clients/%c/#"]
            allow = true
            "##,
        )
        .unwrap();
        let alice = user("alice");
        assert!(acl.check(&alice, Action::Publish, "users/alice/x"));
        assert!(!acl.check(&alice, Action::Publish, "users/bob/x"));
        assert!(acl.check(&alice, Action::Subscribe, "clients/alice-client/#"));
        assert!(!acl.check(&alice, Action::Subscribe, "clients/other/#"));
        // No username: the %u topic never matches, %c still does.
        let c = cert("dev");
        assert!(!acl.check(&c, Action::Publish, "users/%u/x"));
        assert!(!acl.check(&c, Action::Publish, "users//x"));
        assert!(acl.check(&c, Action::Publish, "clients/dev-client/x"));
    }

    #[test]
    fn wildcards_in_names_cannot_widen_a_rule() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "*"
            action = "subscribe"
            topics = ["users/%u/#", "clients/%c/#"]
            allow = true
            "##,
        )
        .unwrap();
        let mut sneaky = user("+");
        sneaky.client_id = "#".into();
        assert!(!acl.check(&sneaky, Action::Subscribe, "users/+/#"));
        assert!(!acl.check(&sneaky, Action::Subscribe, "clients/#"));
        let mut slash = user("a/b");
        slash.client_id = "x/y".into();
        assert!(!acl.check(&slash, Action::Subscribe, "users/a/b/#"));
        assert!(!acl.check(&slash, Action::Subscribe, "clients/x/y/#"));
    }

    #[test]
    fn shared_subscriptions_are_checked_on_the_inner_filter() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "*"
            action = "subscribe"
            topics = ["trucks/#"]
            allow = true
            "##,
        )
        .unwrap();
        let a = anon();
        assert!(acl.check(&a, Action::Subscribe, "$share/g/trucks/+/gps"));
        assert!(!acl.check(&a, Action::Subscribe, "$share/g/cars/#"));
        assert!(!acl.check(&a, Action::Subscribe, "$share/g"));
    }

    #[test]
    fn replay_needs_its_own_rule_and_a_deny_refuses_history_only() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "*"
            action = "replay"
            topics = ["trucks/secret/#"]
            allow = false

            [[rule]]
            who = "*"
            action = "replay"
            topics = ["trucks/#"]
            allow = true

            [[rule]]
            who = "*"
            action = "subscribe"
            topics = ["trucks/#", "cars/#"]
            allow = true

            [[rule]]
            who = "user:ops"
            action = "all"
            topics = ["ops/#"]
            allow = true
            "##,
        )
        .unwrap();
        let a = anon();
        assert!(acl.check(&a, Action::Replay, "trucks/1/+"));
        // A deny overlapping the filter refuses the replay, not the subscription.
        assert!(!acl.check(&a, Action::Replay, "trucks/#"));
        assert!(acl.check(&a, Action::Subscribe, "trucks/#"));
        // Subscribe allowed, no replay rule: no history.
        assert!(acl.check(&a, Action::Subscribe, "cars/#"));
        assert!(!acl.check(&a, Action::Replay, "cars/#"));
        // `all` grants replay too; shared filters are checked on the inner one.
        assert!(acl.check(&user("ops"), Action::Replay, "ops/x"));
        assert!(acl.check(&a, Action::Replay, "$share/g/trucks/1"));
        // Without a rules file, replay is allowed like everything else.
        assert!(Acl::allow_all().check(&a, Action::Replay, "#"));
        let filter_on_replay = Acl::parse(
            r#"
            [[rule]]
            who = "*"
            action = "replay"
            topics = ["a/#"]
            allow = false
            overlap = "filter"
            "#,
        );
        assert!(
            filter_on_replay.is_err(),
            "overlap = filter is for subscriptions"
        );
    }

    #[test]
    fn anonymous_never_matches_user_or_cert_rules() {
        let acl = Acl::parse(
            r##"
            [[rule]]
            who = "authenticated"
            action = "all"
            topics = ["#"]
            allow = true
            "##,
        )
        .unwrap();
        assert!(!acl.check(&anon(), Action::Publish, "x"));
        assert!(acl.check(&cert("c"), Action::Publish, "x"));
    }

    #[test]
    fn errors_name_the_rule_and_line() {
        let e = Acl::parse(
            "[[rule]]\nwho = \"*\"\naction = \"all\"\ntopics = [\"a\"]\nallow = true\n\n[[rule]]\nwho = \"*\"\naction = \"pub\"\ntopics = [\"a\"]\nallow = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rule 2") && e.contains("line 9") && e.contains("\"pub\""),
            "{e}"
        );
        let e = Acl::parse(
            "[[rule]]\nwho = \"*\"\naction = \"all\"\ntopics = [\"a/#/b\"]\nallow = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rule 1") && e.contains("line 4") && e.contains("a/#/b"),
            "{e}"
        );
        let e = Acl::parse(
            "[[rule]]\nwho = \"root\"\naction = \"all\"\ntopics = [\"a\"]\nallow = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"root\""), "{e}");
        let e = Acl::parse("[[rule]]\nwho = \"*\"\naction = \"all\"\ntopics = [\"a\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow"), "{e}");
        let e =
            Acl::parse("[[rule]]\nwho = \"*\"\naction = \"all\"\ntopic = [\"a\"]\nallow = true\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("topic"), "{e}");
        assert!(Acl::parse("")
            .unwrap_err()
            .to_string()
            .contains("no [[rule]]"));
        let e = Acl::load(Path::new("/nonexistent/acl.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/acl.toml"), "{e}");
    }

    #[test]
    fn no_client_publishes_to_sys_whatever_the_rules() {
        let everything = Acl::parse(
            "[[rule]]\nwho = \"*\"\naction = \"all\"\ntopics = [\"#\", \"$SYS/#\"]\nallow = true\n",
        )
        .unwrap();
        for acl in [Acl::allow_all(), everything] {
            assert!(!acl.check(
                &user("admin"),
                Action::Publish,
                "$SYS/broker/nodes/x/clients/connected"
            ));
            assert!(acl.check(&user("admin"), Action::Subscribe, "$SYS/#"));
            assert!(acl.check(&user("admin"), Action::Publish, "trucks/1"));
        }
    }

    #[test]
    fn claim_substitution_from_the_login_token() {
        let acl = Acl::parse(
            r#"
            [[rule]]
            who = "authenticated"
            action = "all"
            topics = ["fleets/%{claim:fleet}/%u/#", "regions/%{claim:region}/+"]
            allow = true
            "#,
        )
        .unwrap();
        let with = |claims: serde_json::Value| Identity {
            claims: claims.as_object().cloned().map(std::sync::Arc::new),
            ..user("truck-7")
        };
        let north = with(serde_json::json!({"fleet": "north", "region": 44}));
        assert!(acl.check(&north, Action::Publish, "fleets/north/truck-7/gps"));
        assert!(acl.check(&north, Action::Subscribe, "regions/44/+"));
        assert!(!acl.check(&north, Action::Publish, "fleets/south/truck-7/gps"));
        // No token, a missing claim, a non-scalar claim or a wildcard in the
        // claim: the placeholder rule does not match.
        for who in [
            user("truck-7"),
            with(serde_json::json!({"region": 1})),
            with(serde_json::json!({"fleet": ["north"]})),
            with(serde_json::json!({"fleet": "+"})),
            with(serde_json::json!({"fleet": "a/b"})),
        ] {
            assert!(!acl.check(&who, Action::Publish, "fleets/north/truck-7/gps"));
            assert!(!acl.check(&who, Action::Publish, "fleets/+/truck-7/gps"));
        }
        for bad in ["a/%{claim:fleet", "a/%{claim:}/b"] {
            let text = format!(
                "[[rule]]\nwho = \"*\"\naction = \"all\"\ntopics = [\"{bad}\"]\nallow = true\n"
            );
            let e = Acl::parse(&text).unwrap_err().to_string();
            assert!(e.contains("claim"), "{bad}: {e}");
        }
    }

    #[test]
    fn fleet_example_file_is_valid_and_does_what_it_says() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/acl.toml");
        let acl = Acl::load(&path).unwrap();
        use Action::*;
        let sim = user("trucksim");
        assert!(acl.check(&sim, Publish, "trucks/42/gps"));
        assert!(!acl.check(&sim, Publish, "fleet/summary"));
        assert!(!acl.check(&sim, Subscribe, "trucks/#"));
        for viewer in [user("viewer"), anon()] {
            assert!(acl.check(&viewer, Subscribe, "trucks/#"));
            assert!(acl.check(&viewer, Subscribe, "fleet/+/status"));
            assert!(acl.check(&viewer, Subscribe, "$share/ui/trucks/+/gps"));
            assert!(!acl.check(&viewer, Subscribe, "#"));
            assert!(!acl.check(&viewer, Publish, "trucks/1/gps"));
        }
        let admin = user("admin");
        assert!(acl.check(&admin, Publish, "anything/at/all"));
        assert!(acl.check(&admin, Subscribe, "#"));
        assert!(acl.check(&admin, Subscribe, "$SYS/#"));
        assert!(!acl.check(&user("someone"), Publish, "trucks/1/gps"));
    }
}
