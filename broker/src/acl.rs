//! Authorization: which identity may publish to or subscribe to which topics.
//!
//! Rules file (TOML), an ordered list of `[[rule]]` tables:
//!
//! ```toml
//! [[rule]]
//! who = "user:trucksim"        # user:NAME | cert:ID | anonymous | authenticated | *
//! action = "publish"           # publish | subscribe | all
//! topics = ["trucks/#"]        # MQTT filters; %u = username, %c = client id,
//!                              # %{claim:NAME} = claim NAME of the login JWT
//! allow = true                 # required: true allows, false denies
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
//! - subscribe, deny rule: applies as soon as its filter *overlaps* the
//!   requested one, so a deny on `trucks/secret/#` also refuses `trucks/#`
//!   (which would otherwise deliver the secret topics);
//! - shared subscriptions `$share/group/filter` are checked on `filter`.
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
    All,
}

#[derive(Debug, Clone)]
struct Rule {
    who: Who,
    action: RuleAction,
    topics: Vec<String>,
    allow: bool,
}

/// Authorization rules; cheap to check, immutable once built (reload by
/// building a new one and swapping it).
#[derive(Debug, Clone)]
pub struct Acl {
    /// `None`: no rules file, everything allowed.
    rules: Option<Vec<Rule>>,
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
}

impl Acl {
    pub fn allow_all() -> Acl {
        Acl { rules: None }
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
            Action::Subscribe if is_shared(topic_or_filter) => {
                match SharedFilter::parse(topic_or_filter) {
                    Some(s) => {
                        shared = s;
                        shared.filter.as_str()
                    }
                    None => return false,
                }
            }
            Action::Subscribe => topic_or_filter,
        };
        for rule in rules {
            let action_applies = matches!(
                (rule.action, action),
                (RuleAction::All, _)
                    | (RuleAction::Publish, Action::Publish)
                    | (RuleAction::Subscribe, Action::Subscribe)
            );
            if !action_applies || !rule.who.applies(who) {
                continue;
            }
            let hit = rule.topics.iter().any(|pattern| {
                let Some(pattern) = substitute(pattern, who) else {
                    return false;
                };
                match (action, rule.allow) {
                    (Action::Publish, _) => matches(&pattern, target),
                    (Action::Subscribe, true) => covers(&pattern, target),
                    (Action::Subscribe, false) => filters_may_overlap(&pattern, target),
                }
            });
            if hit {
                return rule.allow;
            }
        }
        false
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
            "all" => RuleAction::All,
            s => {
                return Err(err(
                    r.action.span(),
                    format!("action = {s:?}: expected \"publish\", \"subscribe\" or \"all\""),
                ))
            }
        };
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
        });
    }
    Ok(Acl { rules: Some(rules) })
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
