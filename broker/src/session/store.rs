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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{oneshot, Notify};

use crate::kafka::Record;
use crate::session::ended::EndedEpochs;
use crate::session::record::SessionRecord;

/// The header a tombstone of the sessions topic carries: the epoch of the
/// session it ends (decimal), so the end is fenced like any other record.
pub const EPOCH_HEADER: &str = "lodestream.epoch";

/// How many ended sessions' epochs are remembered, and for how long (see
/// `session::ended`): ten times the default producer delivery timeout.
const ENDED_CAP: usize = 100_000;
const ENDED_TTL: std::time::Duration = std::time::Duration::from_secs(300);

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

pub struct SessionStore {
    node_id: String,
    records: RwLock<HashMap<Box<str>, Entry>>,
    /// Node ids are shared by many records: stored once, each with how
    /// many records it owns (kept with `records`, under its write lock), so
    /// sweeps skip the pass over every session while each owner is live.
    node_names: Mutex<HashMap<Arc<str>, usize>>,
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
    /// Epochs of sessions whose record a tombstone deleted.
    ended: Mutex<EndedEpochs>,
}

impl SessionStore {
    pub fn new(node_id: &str) -> SessionStore {
        SessionStore {
            node_id: node_id.to_string(),
            records: RwLock::default(),
            node_names: Mutex::default(),
            waiters: Mutex::default(),
            late: Mutex::default(),
            read_to: Mutex::default(),
            read_moved: Notify::new(),
            ended: Mutex::new(EndedEpochs::new(ENDED_CAP, ENDED_TTL)),
        }
    }

    /// The newest epoch this view knows for `client_id`: its record's, or
    /// the one its last session ended at. A claim continues above it, so a
    /// record of an ended session still in flight stays fenced.
    pub fn last_epoch(&self, client_id: &str) -> u64 {
        let current = self.summary(client_id).map_or(0, |s| s.epoch);
        current.max(self.ended_epoch(client_id).unwrap_or(0))
    }

    /// True when state written under `epoch` must no longer be written: a
    /// newer claim exists, or the session ended at that epoch or later.
    pub fn superseded(&self, client_id: &str, epoch: u64) -> bool {
        self.summary(client_id).is_some_and(|s| s.epoch > epoch)
            || self.ended_epoch(client_id).is_some_and(|e| e >= epoch)
    }

    fn ended_epoch(&self, client_id: &str) -> Option<u64> {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        ended.get(client_id, std::time::Instant::now())
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

    /// The nodes that own at least one record (a sweep for the sessions
    /// of nodes that are gone needs a pass only when one of these is).
    pub fn owners(&self) -> Vec<Arc<str>> {
        let names = self.node_names.lock().unwrap_or_else(|e| e.into_inner());
        names
            .iter()
            .filter(|(_, owned)| **owned > 0)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Counts a record of `node` (interned) in (`true`) or out; the caller
    /// holds the records' write lock.
    fn owned(&self, node: &Arc<str>, added: bool) {
        let mut names = self.node_names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = names.get_mut(node) {
            *n = if added { *n + 1 } else { n.saturating_sub(1) };
        }
    }

    fn intern(&self, node: &str) -> Arc<str> {
        let mut names = self.node_names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, _)) = names.get_key_value(node) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(node);
        names.insert(n.clone(), 0);
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
    pub fn apply(&self, client_id: &str, rec: SessionRecord) -> Applied {
        let raw = rec.encode().into_boxed_slice();
        self.apply_encoded(client_id, rec, raw)
    }

    /// Applies a tombstone: the session ended at `epoch` (None: a tombstone
    /// written before tombstones carried their epoch, which ends whatever
    /// is current). A tombstone of an older epoch than the current record
    /// is fenced like any other stale record.
    pub fn apply_end(&self, client_id: &str, epoch: Option<u64>) -> Applied {
        let mut map = self.records.write().unwrap_or_else(|e| e.into_inner());
        let current = map.get(client_id).map(|e| e.summary.epoch);
        let ended = match (epoch, current) {
            (Some(e), Some(c)) if e < c => return Applied::Ignored,
            (e, c) => e.max(c),
        };
        if let Some(gone) = map.remove(client_id) {
            self.owned(&gone.summary.node, false);
        }
        drop(map);
        if let Some(ended) = ended {
            let mut memory = self.ended.lock().unwrap_or_else(|e| e.into_inner());
            memory.record(client_id, ended, std::time::Instant::now());
        }
        Applied::Stored
    }

    fn apply_encoded(&self, client_id: &str, rec: SessionRecord, raw: Box<[u8]>) -> Applied {
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
        if self.ended_epoch(client_id).is_some_and(|e| rec.epoch <= e) {
            // In flight when the session ended: the end fences it.
            return Applied::Ignored;
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
        self.owned(&summary.node, true);
        if let Some(replaced) = map.insert(Box::from(client_id), Entry { summary, raw }) {
            self.owned(&replaced.summary.node, false);
        }
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
            None => self.apply_end(key, tombstone_epoch(rec)),
            Some(v) => match SessionRecord::decode(v) {
                Ok(r) if r.v <= crate::session::record::SCHEMA_VERSION => {
                    self.apply_encoded(key, r, v.to_vec().into_boxed_slice())
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

/// The epoch a tombstone of the sessions topic ends (its `EPOCH_HEADER`).
fn tombstone_epoch(rec: &Record) -> Option<u64> {
    let (_, v) = rec.headers.iter().find(|(k, _)| k == EPOCH_HEADER)?;
    std::str::from_utf8(v.as_deref()?).ok()?.parse().ok()
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

    /// Sweeps rely on `owners` to skip their pass: it names exactly the
    /// nodes whose records are stored, through claims and ends.
    #[test]
    fn owners_follow_every_stored_record() {
        let s = SessionStore::new("me");
        let names = |s: &SessionStore| {
            let mut o: Vec<String> = s.owners().iter().map(|n| n.to_string()).collect();
            o.sort();
            o
        };
        s.apply("c", rec(1, "a", true, false));
        let mut d = rec(1, "a", false, false);
        d.client_id = "d".into();
        s.apply("d", d);
        assert_eq!(names(&s), ["a"]);
        s.apply("c", rec(2, "b", true, false));
        assert_eq!(names(&s), ["a", "b"], "c moved to b, d stays on a");
        s.apply_end("d", Some(1));
        assert_eq!(names(&s), ["b"], "a owns nothing once d ended");
        s.apply("c", rec(1, "a", true, false));
        assert_eq!(names(&s), ["b"], "a stale record changes nothing");
        s.apply_end("c", Some(2));
        assert!(s.owners().is_empty());
    }

    /// Read-your-writes across a node death: the dead owner's last record
    /// that this view read only after our claim is kept for the claimer
    /// (it is newer than what the claimer read before), yet fenced.
    #[test]
    fn owner_record_arriving_after_the_claim_is_kept_for_the_claimer() {
        let s = SessionStore::new("me");
        s.apply("c", rec(1, "dead", true, false));
        let _handoff = s.wait_handoff("c", 2);
        s.apply("c", rec(2, "me", true, false));
        let mut last = rec(1, "dead", true, false);
        last.offsets = vec![crate::session::record::OffsetRecord {
            topic: "t".into(),
            partition: 0,
            offset: 42,
        }];
        assert_eq!(s.apply("c", last.clone()), Applied::Ignored);
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
            s.apply("c", rec(2, "b", true, false)),
            Applied::ForeignClaim {
                client_id: "c".into(),
                epoch: 2
            }
        );
        assert_eq!(s.apply("c", rec(1, "a", false, false)), Applied::Ignored);
        assert_eq!(s.get("c").unwrap().node, "b");
        assert_eq!(s.apply("c", rec(3, "a", true, false)), Applied::Stored);
        s.apply_end("c", Some(3));
        assert!(s.get("c").is_none());
    }

    /// [MQTT-3.1.2-6] A record of a session written before its end but read
    /// after the tombstone does not bring the session back, and the next
    /// claim continues above the ended epoch (it used to restart at 1).
    #[test]
    fn late_record_of_an_ended_session_is_fenced() {
        let s = SessionStore::new("me");
        s.apply("c", rec(4, "other", true, false));
        assert_eq!(s.apply_end("c", Some(4)), Applied::Stored);
        assert!(s.get("c").is_none());
        assert_eq!(
            s.apply("c", rec(4, "other", false, false)),
            Applied::Ignored
        );
        assert_eq!(s.apply("c", rec(3, "other", true, false)), Applied::Ignored);
        assert!(s.get("c").is_none(), "the ended session stays ended");
        assert_eq!(s.last_epoch("c"), 4, "a claim continues at 5");
        assert!(s.superseded("c", 4), "no late write for the ended epoch");
        assert_eq!(s.apply("c", rec(5, "me", true, false)), Applied::Stored);
        assert!(!s.superseded("c", 5));
    }

    /// A tombstone is fenced by its epoch: one written for an older session
    /// does not delete a newer claim's record. One without the epoch header
    /// (written by an older broker) ends whatever is current.
    #[test]
    fn tombstone_of_an_older_epoch_is_fenced() {
        let s = SessionStore::new("me");
        s.apply("c", rec(7, "b", true, false));
        assert_eq!(s.apply_end("c", Some(6)), Applied::Ignored);
        assert_eq!(s.get("c").map(|r| r.epoch), Some(7));
        assert_eq!(s.apply_end("c", None), Applied::Stored);
        assert!(s.get("c").is_none());
        assert_eq!(s.last_epoch("c"), 7);
    }

    #[test]
    fn tombstone_epoch_is_read_from_its_header() {
        let mut r = Record {
            topic: "s".into(),
            partition: 0,
            offset: 0,
            key: Some(bytes::Bytes::from_static(b"c")),
            value: None,
            timestamp_ms: 0,
            headers: vec![(EPOCH_HEADER.into(), Some(b"12".to_vec()))],
        };
        assert_eq!(tombstone_epoch(&r), Some(12));
        r.headers = vec![(EPOCH_HEADER.into(), Some(b"x".to_vec()))];
        assert_eq!(tombstone_epoch(&r), None);
        r.headers.clear();
        assert_eq!(tombstone_epoch(&r), None);
    }

    #[tokio::test]
    async fn handoff_reaches_the_claimer() {
        let s = SessionStore::new("b");
        s.apply("c", rec(5, "b", true, false));
        let rx = s.wait_handoff("c", 5);
        assert_eq!(
            s.apply("c", rec(5, "a", false, true)),
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
