//! Subscription index: topic filters -> (key, value) entries, queried with a
//! topic name to find every matching entry.
//!
//! A level-by-level tree: each node has literal children, one `+` child and
//! two entry maps, one for filters ending at the node and one for filters
//! ending in `#` right below it. Matching walks only the branches a topic can
//! take, so the cost depends on the topic depth and the number of matches,
//! not on the number of filters.
//!
//! Nodes live in an arena (`Vec`) and the walk uses an explicit stack, so
//! neither matching nor dropping recurses: a client subscribing to a filter
//! with 30,000 levels cannot overflow a thread stack.

use crate::topic::{self, TopicError};
use smallvec::SmallVec;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// A node's literal children by level. Levels come from clients' topics,
/// so the hash is seeded per process (foldhash's `RandomState`), but not
/// SipHash: that was most of a match's cost (docs/benchmarks.md).
type Children = HashMap<Box<str>, usize, foldhash::fast::RandomState>;

const ROOT: usize = 0;

#[derive(Debug, Clone)]
struct Node<K, V> {
    parent: usize,
    /// This node's level in its parent (`+` for the parent's `plus` child),
    /// so pruning removes it from the parent without a scan.
    level: Box<str>,
    children: Children,
    plus: Option<usize>,
    /// Filters ending exactly at this node.
    exact: HashMap<K, V>,
    /// Filters ending with `#` directly below this node (`a/#` is stored at
    /// the `a` node, `#` at the root).
    multi: HashMap<K, V>,
}

impl<K, V> Node<K, V> {
    fn new(parent: usize, level: &str) -> Self {
        Node {
            parent,
            level: level.into(),
            children: Children::default(),
            plus: None,
            exact: HashMap::new(),
            multi: HashMap::new(),
        }
    }

    fn is_unused(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.multi.is_empty()
    }
}

/// Topic filter index. `K` identifies a subscriber (e.g. a session id), `V`
/// is per-subscription data (e.g. subscription options). One key has at most
/// one value per filter; the same key may be stored under many filters.
#[derive(Debug, Clone)]
pub struct TopicTrie<K, V> {
    nodes: Vec<Node<K, V>>,
    free: Vec<usize>,
    by_key: HashMap<K, HashSet<Box<str>>>,
    len: usize,
}

impl<K: Eq + Hash + Clone, V> Default for TopicTrie<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, V> TopicTrie<K, V> {
    pub fn new() -> Self {
        TopicTrie {
            nodes: vec![Node::new(ROOT, "")],
            free: Vec::new(),
            by_key: HashMap::new(),
            len: 0,
        }
    }

    /// Number of (filter, key) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Inserts or replaces the value of `key` under `filter` and returns the
    /// previous value. The filter is validated ([`topic::validate_topic_filter`]);
    /// shared filters must be inserted without their `$share/{group}/` prefix.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Result<Option<V>, TopicError> {
        topic::validate_topic_filter(filter)?;
        let (node, multi) = self.node_for_insert(filter);
        let Some(n) = self.nodes.get_mut(node) else {
            return Ok(None);
        };
        let map = if multi { &mut n.multi } else { &mut n.exact };
        let old = map.insert(key.clone(), value);
        if old.is_none() {
            self.len += 1;
            self.by_key.entry(key).or_default().insert(filter.into());
        }
        Ok(old)
    }

    /// Removes `key` from `filter`; returns its value if it was present.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let (node, multi) = self.find_node(filter)?;
        let n = self.nodes.get_mut(node)?;
        let old = if multi {
            n.multi.remove(key)
        } else {
            n.exact.remove(key)
        }?;
        self.len -= 1;
        if let Some(filters) = self.by_key.get_mut(key) {
            filters.remove(filter);
            if filters.is_empty() {
                self.by_key.remove(key);
            }
        }
        self.prune(node);
        Some(old)
    }

    /// Removes every entry of `key` (e.g. when a session ends) and returns
    /// them as (filter, value). Cost is proportional to the key's filters.
    pub fn remove_key(&mut self, key: &K) -> Vec<(String, V)> {
        let Some(filters) = self.by_key.remove(key) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(filters.len());
        for filter in filters {
            // `by_key` is already gone, so `remove` only touches the tree.
            if let Some(v) = self.remove(&filter, key) {
                out.push((filter.into_string(), v));
            }
        }
        out
    }

    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        let (node, multi) = self.find_node(filter)?;
        let n = self.nodes.get(node)?;
        if multi {
            n.multi.get(key)
        } else {
            n.exact.get(key)
        }
    }

    pub fn get_mut(&mut self, filter: &str, key: &K) -> Option<&mut V> {
        let (node, multi) = self.find_node(filter)?;
        let n = self.nodes.get_mut(node)?;
        if multi {
            n.multi.get_mut(key)
        } else {
            n.exact.get_mut(key)
        }
    }

    /// The filters `key` is stored under, in no particular order.
    pub fn filters_of<'a>(&'a self, key: &K) -> impl Iterator<Item = &'a str> + 'a {
        self.by_key
            .get(key)
            .into_iter()
            .flat_map(|set| set.iter().map(|f| &**f))
    }

    /// Number of distinct keys.
    pub fn key_count(&self) -> usize {
        self.by_key.len()
    }

    /// Calls `f(key, value)` for every entry whose filter matches `topic`
    /// (same semantics as [`topic::matches`], including the `$` rule
    /// [MQTT-4.7.2-1]). A key stored under several matching filters is
    /// reported once per filter (overlapping subscriptions); the order is
    /// unspecified.
    pub fn for_each_match<'a, F>(&'a self, topic: &str, mut f: F)
    where
        F: FnMut(&'a K, &'a V),
    {
        let dollar = topic.starts_with('$');
        // (node, where the topic's next level starts; `None` past the last
        // level). Inline: a match allocates nothing for up to 8 branches.
        let mut stack: SmallVec<[(usize, Option<usize>); 8]> = SmallVec::new();
        stack.push((ROOT, Some(0)));
        while let Some((idx, at)) = stack.pop() {
            let Some(node) = self.nodes.get(idx) else {
                continue;
            };
            // Wildcards at the first level never match `$` topics.
            let wild_ok = !(idx == ROOT && dollar);
            if wild_ok {
                for (k, v) in &node.multi {
                    f(k, v);
                }
            }
            let Some(start) = at else {
                for (k, v) in &node.exact {
                    f(k, v);
                }
                continue;
            };
            let rest = topic.get(start..).unwrap_or_default();
            // A byte search: `/` is ASCII, so never inside a multi-byte
            // character, and `str::find(char)` cost more than the rest of
            // the walk for topics of a few short levels.
            let (level, next) = match rest.bytes().position(|b| b == b'/') {
                Some(i) => (&rest[..i], Some(start + i + 1)),
                None => (rest, None),
            };
            if let Some(&child) = node.children.get(level) {
                stack.push((child, next));
            }
            if wild_ok {
                if let Some(plus) = node.plus {
                    stack.push((plus, next));
                }
            }
        }
    }

    /// All entries whose filter matches `topic` (see [`Self::for_each_match`]).
    pub fn matches(&self, topic: &str) -> Vec<(&K, &V)> {
        let mut out = Vec::new();
        self.for_each_match(topic, |k, v| out.push((k, v)));
        out
    }

    /// True if any entry matches `topic`.
    pub fn has_match(&self, topic: &str) -> bool {
        let mut any = false;
        self.for_each_match(topic, |_, _| any = true);
        any
    }

    /// Walks (creating as needed) to the node that stores `filter`; the bool
    /// says whether the filter ends in `#`.
    fn node_for_insert(&mut self, filter: &str) -> (usize, bool) {
        let mut node = ROOT;
        for level in filter.split('/') {
            if level == "#" {
                return (node, true);
            }
            node = self.child_or_insert(node, level);
        }
        (node, false)
    }

    fn child_or_insert(&mut self, node: usize, level: &str) -> usize {
        let existing = self.nodes.get(node).and_then(|n| {
            if level == "+" {
                n.plus
            } else {
                n.children.get(level).copied()
            }
        });
        if let Some(c) = existing {
            return c;
        }
        let child = self.alloc(node, level);
        if let Some(n) = self.nodes.get_mut(node) {
            if level == "+" {
                n.plus = Some(child);
            } else {
                n.children.insert(level.into(), child);
            }
        }
        child
    }

    fn find_node(&self, filter: &str) -> Option<(usize, bool)> {
        let mut node = ROOT;
        for level in filter.split('/') {
            if level == "#" {
                return Some((node, true));
            }
            let n = self.nodes.get(node)?;
            node = if level == "+" {
                n.plus?
            } else {
                *n.children.get(level)?
            };
        }
        Some((node, false))
    }

    fn alloc(&mut self, parent: usize, level: &str) -> usize {
        match self.free.pop() {
            Some(idx) => {
                if let Some(slot) = self.nodes.get_mut(idx) {
                    *slot = Node::new(parent, level);
                }
                idx
            }
            None => {
                self.nodes.push(Node::new(parent, level));
                self.nodes.len() - 1
            }
        }
    }

    /// Frees `node` and its ancestors while they hold nothing.
    fn prune(&mut self, mut node: usize) {
        while node != ROOT {
            let Some(n) = self.nodes.get_mut(node) else {
                return;
            };
            if !n.is_unused() {
                return;
            }
            let parent = n.parent;
            let level = std::mem::take(&mut n.level);
            if let Some(p) = self.nodes.get_mut(parent) {
                if p.plus == Some(node) {
                    p.plus = None;
                } else {
                    p.children.remove(&level);
                }
            }
            self.free.push(node);
            node = parent;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use proptest::prelude::*;

    fn sorted(mut v: Vec<(u32, String)>) -> Vec<(u32, String)> {
        v.sort();
        v
    }

    fn trie_matches(t: &TopicTrie<u32, String>, topic: &str) -> Vec<(u32, String)> {
        sorted(
            t.matches(topic)
                .into_iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
        )
    }

    #[test]
    fn basic_insert_match_remove() {
        let mut t = TopicTrie::new();
        assert_eq!(t.insert("sport/#", 1, "a".to_string()), Ok(None));
        assert_eq!(t.insert("sport/+/player1", 2, "b".to_string()), Ok(None));
        assert_eq!(t.insert("#", 3, "c".to_string()), Ok(None));
        assert_eq!(
            t.insert("sport/#", 1, "a2".to_string()),
            Ok(Some("a".to_string()))
        );
        assert_eq!(t.len(), 3);
        assert_eq!(
            trie_matches(&t, "sport/tennis/player1"),
            vec![(1, "a2".into()), (2, "b".into()), (3, "c".into())]
        );
        assert_eq!(
            trie_matches(&t, "sport"),
            vec![(1, "a2".into()), (3, "c".into())]
        );
        assert_eq!(trie_matches(&t, "$SYS/x"), vec![]);
        assert_eq!(t.remove("sport/#", &1), Some("a2".to_string()));
        assert_eq!(t.remove("sport/#", &1), None);
        assert_eq!(t.len(), 2);
        assert_eq!(trie_matches(&t, "sport"), vec![(3, "c".into())]);
    }

    #[test]
    fn invalid_filter_rejected() {
        let mut t: TopicTrie<u32, ()> = TopicTrie::new();
        assert_eq!(
            t.insert("a/#/b", 1, ()),
            Err(TopicError::InvalidMultiLevelWildcard)
        );
        assert_eq!(t.insert("", 1, ()), Err(TopicError::Empty));
        assert!(t.is_empty());
    }

    /// [MQTT-4.7.2-1]
    #[test]
    fn mqtt_4_7_2_1_dollar_topics_not_matched_by_leading_wildcards() {
        let mut t = TopicTrie::new();
        t.insert("#", 1, ()).unwrap();
        t.insert("+/x", 2, ()).unwrap();
        t.insert("$SYS/#", 3, ()).unwrap();
        t.insert("$SYS/+", 4, ()).unwrap();
        let mut got: Vec<u32> = t.matches("$SYS/x").into_iter().map(|(k, _)| *k).collect();
        got.sort();
        assert_eq!(got, vec![3, 4]);
        let mut got: Vec<u32> = t.matches("a/x").into_iter().map(|(k, _)| *k).collect();
        got.sort();
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn remove_key_and_pruning() {
        let mut t = TopicTrie::new();
        t.insert("a/b/c", 1, ()).unwrap();
        t.insert("a/+/c", 1, ()).unwrap();
        t.insert("a/#", 1, ()).unwrap();
        t.insert("a/b/c", 2, ()).unwrap();
        assert_eq!(t.key_count(), 2);
        let mut f: Vec<&str> = t.filters_of(&1).collect();
        f.sort();
        assert_eq!(f, vec!["a/#", "a/+/c", "a/b/c"]);
        let mut removed: Vec<String> = t.remove_key(&1).into_iter().map(|(f, _)| f).collect();
        removed.sort();
        assert_eq!(removed, vec!["a/#", "a/+/c", "a/b/c"]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.filters_of(&1).count(), 0);
        assert_eq!(t.remove_key(&1), vec![]);
        t.remove("a/b/c", &2);
        assert!(t.is_empty());
        // Everything but the root was freed.
        assert_eq!(t.nodes.len() - t.free.len(), 1);
        assert!(t.nodes.first().is_some_and(|n| n.is_unused()));
        // Freed slots are reused.
        let slots = t.nodes.len();
        t.insert("x/y", 3, ()).unwrap();
        assert_eq!(t.nodes.len(), slots);
        assert!(t.has_match("x/y"));
        assert_eq!(t.get("x/y", &3), Some(&()));
    }

    #[test]
    fn deep_filters_do_not_overflow_the_stack() {
        let filter = vec!["a"; 30_000].join("/");
        let mut t = TopicTrie::new();
        t.insert(&filter, 1u8, ()).unwrap();
        assert!(t.has_match(&filter));
        assert_eq!(t.remove(&filter, &1), Some(()));
        t.insert(&filter, 1u8, ()).unwrap();
        drop(t);
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
            .prop_filter("valid", |f| topic::validate_topic_filter(f).is_ok())
    }

    fn arb_topic() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![Just("a"), Just("b"), Just("$s"), Just("")],
            1..5,
        )
        .prop_map(|l| l.join("/"))
        .prop_filter("valid", |t| topic::validate_topic_name(t).is_ok())
    }

    proptest! {
        /// The trie returns exactly the (key, filter) pairs `topic::matches`
        /// accepts, also after removing a subset of them.
        #[test]
        fn trie_agrees_with_matches(
            subs in prop::collection::vec((arb_filter(), 0u32..4), 0..24),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            topics in prop::collection::vec(arb_topic(), 1..8),
        ) {
            let mut t = TopicTrie::new();
            let mut model: Vec<(u32, String)> = Vec::new();
            for (f, k) in &subs {
                t.insert(f, *k, f.clone()).unwrap();
                if !model.contains(&(*k, f.clone())) {
                    model.push((*k, f.clone()));
                }
            }
            for ix in &removals {
                if model.is_empty() { break; }
                let (k, f) = model.remove(ix.index(model.len()));
                prop_assert_eq!(t.remove(&f, &k), Some(f.clone()));
            }
            prop_assert_eq!(t.len(), model.len());
            for topic in &topics {
                let want = sorted(
                    model.iter().filter(|(_, f)| matches(f, topic)).cloned().collect(),
                );
                prop_assert_eq!(trie_matches(&t, topic), want, "topic {}", topic);
            }
            // Removing every key leaves an empty, fully pruned trie.
            for k in 0..4 {
                t.remove_key(&k);
            }
            prop_assert!(t.is_empty());
            prop_assert_eq!(t.nodes.len() - t.free.len(), 1);
        }
    }
}
