//! Every node's materialised view of the compacted sessions topic: the
//! latest record per client id, with epoch fencing, plus the rendezvous a
//! claiming node uses to receive the previous owner's hand-off.
//!
//! Memory bound: one entry per session that exists (online or within its
//! expiry). An entry keeps the record as Kafka holds it (encoded, ~600 bytes
//! for a fleet device's session: one subscription, three partitions'
//! offsets), decoded only when a client connects, plus a small summary that
//! sweeps read without decoding. More for a session holding QoS 1/2
//! messages in flight (their payloads). Measured with a million sessions in
//! docs/benchmarks.md (`scripts/bench-sessions`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{oneshot, Notify};

use crate::kafka::Record;
use crate::session::record::SessionRecord;

/// What applying a record means for this node.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Ignored,
    Stored,
    /// Another node claimed a client id: if it is connected here with an
    /// older epoch, that connection must go (session taken over).
    ForeignClaim {
        client_id: String,
        epoch: u64,
    },
}

/// What sweeps and fencing need of a record, without decoding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub epoch: u64,
    pub node: Arc<str>,
    pub online: bool,
    pub handoff: bool,
    /// Online: the client's will; offline: a delayed will still pending.
    pub has_will: bool,
    pub expiry_s: u32,
    pub disconnected_ms: Option<i64>,
}

impl Summary {
    /// True when an offline session has outlived its expiry at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        crate::session::record::expired(self.online, self.disconnected_ms, self.expiry_s, now_ms)
    }
}

struct Entry {
    summary: Summary,
    /// The record's JSON, as in the sessions topic.
    raw: Box<[u8]>,
}

#[derive(Default)]
pub struct SessionStore {
    node_id: String,
    records: RwLock<HashMap<Box<str>, Entry>>,
    /// Node ids are shared by many records: stored once.
    node_names: Mutex<HashSet<Arc<str>>>,
    waiters: Mutex<HashMap<(String, u64), oneshot::Sender<SessionRecord>>>,
    /// While a claim waits for its hand-off: the previous owner's newest
    /// record that reached this view only after the claim (so fencing
    /// ignores it). It precedes the claim in the sessions topic, so it is
    /// newer than what the claimer read before claiming: the state to
    /// resume from if no hand-off comes (the owner died).
    late: Mutex<HashMap<String, SessionRecord>>,
    /// Per partition of the sessions topic, the next offset this view has
    /// applied; `read_moved` wakes those waiting for it to reach a mark.
    read_to: Mutex<HashMap<i32, i64>>,
    read_moved: Notify,
}

impl SessionStore {
    pub fn new(node_id: &str) -> SessionStore {
        SessionStore {
            node_id: node_id.to_string(),
            ..SessionStore::default()
        }
    }

    pub fn get(&self, client_id: &str) -> Option<SessionRecord> {
        let map = self.records.read().unwrap_or_else(|e| e.into_inner());
        let e = map.get(client_id)?;
        // Only records that decoded when applied are stored.
        SessionRecord::decode(&e.raw).ok()
    }

    pub fn summary(&self, client_id: &str) -> Option<Summary> {
        let map = self.records.read().unwrap_or_else(|e| e.into_inner());
        map.get(client_id).map(|e| e.summary.clone())
    }

    /// The latest record is the offline one written under `epoch`: nobody
    /// has resumed or claimed the session since (timers act only then).
    pub fn is_parked(&self, client_id: &str, epoch: u64) -> bool {
        self.summary(client_id)
            .is_some_and(|s| s.epoch == epoch && !s.online)
    }

    pub fn len(&self) -> usize {
        self.records.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records whose summary satisfies `pred` (sweeps: only the
    /// matches are decoded, so a sweep over a million idle sessions costs a
    /// pass over their summaries).
    pub fn select(&self, pred: impl Fn(&str, &Summary) -> bool) -> Vec<SessionRecord> {
        let map = self.records.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|(id, e)| pred(id, &e.summary))
            .filter_map(|(_, e)| SessionRecord::decode(&e.raw).ok())
            .collect()
    }

    fn intern(&self, node: &str) -> Arc<str> {
        let mut names = self.node_names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = names.get(node) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(node);
        names.insert(n.clone());
        n
    }

    /// The reader of the sessions topic applied everything of `partition`
    /// before offset `next`.
    pub fn read_up_to(&self, partition: i32, next: i64) {
        let mut read = self.read_to.lock().unwrap_or_else(|e| e.into_inner());
        let at = read.entry(partition).or_insert(next);
        *at = (*at).max(next);
        drop(read);
        self.read_moved.notify_waiters();
    }

    fn has_read(&self, marks: &HashMap<i32, i64>) -> bool {
        let read = self.read_to.lock().unwrap_or_else(|e| e.into_inner());
        marks
            .iter()
            .all(|(p, mark)| read.get(p).is_some_and(|at| at >= mark))
    }

    /// Waits until this view has applied every partition up to `marks`
    /// (partition -> offset, e.g. the high watermarks).
    pub async fn wait_read(&self, marks: &HashMap<i32, i64>) {
        loop {
            // Registered before the check, so a move in between is not missed.
            let moved = self.read_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.has_read(marks) {
                return;
            }
            moved.await;
        }
    }

    /// Registers interest in the hand-off record for the claim `epoch`.
    pub fn wait_handoff(&self, client_id: &str, epoch: u64) -> oneshot::Receiver<SessionRecord> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((client_id.to_string(), epoch), tx);
        rx
    }

    pub fn cancel_handoff(&self, client_id: &str, epoch: u64) {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(client_id.to_string(), epoch));
    }

    /// After a hand-off wait timed out: the previous owner's newest record
    /// that arrived after the claim (see `late`), if any.
    pub fn take_late(&self, client_id: &str) -> Option<SessionRecord> {
        self.late
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client_id)
    }

    /// Applies one record of the sessions topic (also used for our own
    /// writes once Kafka acknowledged them).
    pub fn apply(&self, client_id: &str, rec: Option<SessionRecord>) -> Applied {
        let raw = rec.as_ref().map(|r| r.encode().into_boxed_slice());
        self.apply_encoded(client_id, rec.zip(raw))
    }

    fn apply_encoded(&self, client_id: &str, rec: Option<(SessionRecord, Box<[u8]>)>) -> Applied {
        let Some((rec, raw)) = rec else {
            self.records
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(client_id);
            return Applied::Stored;
        };
        if rec.handoff {
            if let Some(tx) = self
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(client_id.to_string(), rec.epoch))
            {
                let _ = tx.send(rec.clone());
            }
        }
        let node = self.intern(&rec.node);
        let mut map = self.records.write().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = map.get(client_id).map(|e| &e.summary) {
            // Fencing: a record from an older epoch is stale. The hand-off of
            // the current epoch is kept only if the claimer wrote nothing newer.
            if rec.epoch < cur.epoch
                || (rec.handoff && rec.epoch == cur.epoch && *cur.node != *rec.node)
            {
                let claim = (client_id.to_string(), cur.epoch);
                let waiting = self
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&claim);
                if waiting && rec.epoch + 1 == cur.epoch {
                    self.late
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(claim.0, rec);
                }
                return Applied::Ignored;
            }
        }
        let foreign = rec.online && !rec.handoff && rec.node != self.node_id;
        let epoch = rec.epoch;
        let summary = Summary {
            epoch,
            node,
            online: rec.online,
            handoff: rec.handoff,
            has_will: rec.will.is_some(),
            expiry_s: rec.expiry_s,
            disconnected_ms: rec.disconnected_ms,
        };
        map.insert(Box::from(client_id), Entry { summary, raw });
        if foreign {
            Applied::ForeignClaim {
                client_id: client_id.to_string(),
                epoch,
            }
        } else {
            Applied::Stored
        }
    }

    /// Applies a raw record from the sessions topic; undecodable values are
    /// logged and skipped (a newer incompatible schema would show up here).
    pub fn apply_record(&self, rec: &Record) -> Applied {
        let Some(key) = rec.key.as_ref().and_then(|k| std::str::from_utf8(k).ok()) else {
            return Applied::Ignored;
        };
        match &rec.value {
            None => self.apply(key, None),
            Some(v) => match SessionRecord::decode(v) {
                Ok(r) if r.v <= crate::session::record::SCHEMA_VERSION => {
                    self.apply_encoded(key, Some((r, v.to_vec().into_boxed_slice())))
                }
                Ok(r) => {
                    tracing::warn!(
                        client_id = key,
                        version = r.v,
                        "session record from a newer schema; skipped"
                    );
                    Applied::Ignored
                }
                Err(e) => {
                    tracing::warn!(client_id = key, error = %e, "undecodable session record; skipped");
                    Applied::Ignored
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: u64, node: &str, online: bool, handoff: bool) -> SessionRecord {
        SessionRecord {
            v: 1,
            client_id: "c".into(),
            epoch,
            node: node.into(),
            online,
            handoff,
            expiry_s: 60,
            disconnected_ms: None,
            subscriptions: vec![],
            will: None,
            inbound_qos2: vec![],
            qos2: None,
            outbound: vec![],
            offsets: vec![],
        }
    }

    /// Read-your-writes across a node death: the dead owner's last record
    /// that this view read only after our claim is kept for the claimer
    /// (it is newer than what the claimer read before), yet fenced.
    #[test]
    fn owner_record_arriving_after_the_claim_is_kept_for_the_claimer() {
        let s = SessionStore::new("me");
        s.apply("c", Some(rec(1, "dead", true, false)));
        let _handoff = s.wait_handoff("c", 2);
        s.apply("c", Some(rec(2, "me", true, false)));
        let mut last = rec(1, "dead", true, false);
        last.offsets = vec![crate::session::record::OffsetRecord {
            topic: "t".into(),
            partition: 0,
            offset: 42,
        }];
        assert_eq!(s.apply("c", Some(last.clone())), Applied::Ignored);
        assert_eq!(s.get("c").map(|r| r.epoch), Some(2), "still fenced");
        s.cancel_handoff("c", 2);
        assert_eq!(s.take_late("c"), Some(last));
        assert_eq!(s.take_late("c"), None);
    }

    /// Two nodes never both own a session: an older epoch cannot overwrite.
    #[test]
    fn older_epoch_is_fenced() {
        let s = SessionStore::new("a");
        assert_eq!(
            s.apply("c", Some(rec(2, "b", true, false))),
            Applied::ForeignClaim {
                client_id: "c".into(),
                epoch: 2
            }
        );
        assert_eq!(
            s.apply("c", Some(rec(1, "a", false, false))),
            Applied::Ignored
        );
        assert_eq!(s.get("c").unwrap().node, "b");
        assert_eq!(
            s.apply("c", Some(rec(3, "a", true, false))),
            Applied::Stored
        );
        s.apply("c", None);
        assert!(s.get("c").is_none());
    }

    #[tokio::test]
    async fn handoff_reaches_the_claimer() {
        let s = SessionStore::new("b");
        s.apply("c", Some(rec(5, "b", true, false)));
        let rx = s.wait_handoff("c", 5);
        assert_eq!(
            s.apply("c", Some(rec(5, "a", false, true))),
            Applied::Ignored,
            "claim stays current"
        );
        let h = rx.await.unwrap();
        assert!(h.handoff);
        assert_eq!(s.get("c").unwrap().node, "b");
    }

    /// A CONNECT waits for the view to reach the high watermarks it was
    /// given, and no longer (issue #13: read-your-writes across nodes).
    #[tokio::test]
    async fn wait_read_returns_once_every_partition_reached_its_mark() {
        let s = std::sync::Arc::new(SessionStore::new("a"));
        s.read_up_to(0, 5);
        s.read_up_to(1, 2);
        let marks = HashMap::from([(0, 5), (1, 4)]);
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.wait_read(&marks).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "partition 1 is still behind");
        s.read_up_to(1, 3);
        s.read_up_to(0, 1); // an older position never moves a mark back
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        s.read_up_to(1, 4);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken when the last partition reached its mark")
            .unwrap();
    }
}
