//! What one member of a cluster-wide shared subscription may commit to its
//! Kafka consumer group: per assigned partition, the records handed to the
//! member and not yet finished (acknowledged by the client, or dropped by
//! policy), so the committed position never passes an unfinished record.
//! A member that dies leaves its unfinished records above the committed
//! position, where the group's next owner of the partition reads them
//! again (at least once). Pure bookkeeping: `kafka/share_group.rs` does the
//! Kafka side.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// A Kafka partition: (topic, partition).
pub type Partition = (Arc<str>, i32);

#[derive(Debug)]
struct Part {
    /// Which assignment of the partition this is: a finish from an earlier
    /// one (the partition was revoked and given back) is ignored.
    generation: u64,
    /// Handed out, not finished.
    open: BTreeSet<i64>,
    /// One past the highest offset handed out (None: nothing yet).
    next: Option<i64>,
    /// The last position returned for a commit.
    committed: Option<i64>,
}

impl Part {
    /// The position the group may commit: the first open record, else one
    /// past the last handed out.
    fn position(&self) -> Option<i64> {
        self.open.first().copied().or(self.next)
    }
}

/// Progress of one member over the partitions the group gave it.
#[derive(Debug, Default)]
pub struct SharedProgress {
    parts: HashMap<Partition, Part>,
    generations: u64,
}

/// A record handed to the member: what `finished` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub partition: Partition,
    pub offset: i64,
    generation: u64,
}

/// A delivery's way back to its member's progress: `finish` once the
/// client acknowledged it (or it was dropped by policy). Never called for
/// a delivery lost with its connection, which is the point.
#[derive(Debug, Clone)]
pub struct ShareAck {
    progress: Arc<Mutex<SharedProgress>>,
    ticket: Ticket,
    /// The shared subscription: (share name, inner filter).
    group: Arc<(String, String)>,
}

impl ShareAck {
    pub fn new(
        progress: Arc<Mutex<SharedProgress>>,
        ticket: Ticket,
        group: Arc<(String, String)>,
    ) -> ShareAck {
        ShareAck {
            progress,
            ticket,
            group,
        }
    }

    pub fn group(&self) -> &Arc<(String, String)> {
        &self.group
    }

    pub fn finish(&self) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished(&self.ticket);
    }
}

impl SharedProgress {
    /// The group assigned `p` to this member; `false` if it already had it.
    pub fn assigned(&mut self, p: Partition) -> bool {
        self.generations += 1;
        self.parts
            .insert(
                p,
                Part {
                    generation: self.generations,
                    open: BTreeSet::new(),
                    next: None,
                    committed: None,
                },
            )
            .is_none()
    }

    /// The group took `p` away: `None` if it was not assigned, else its
    /// position to commit now, if it moved.
    pub fn revoked(&mut self, p: &Partition) -> Option<Option<i64>> {
        let part = self.parts.remove(p)?;
        Some(part.position().filter(|&at| Some(at) != part.committed))
    }

    /// Forgets every partition (the member left); how many there were.
    pub fn forget_all(&mut self) -> usize {
        let n = self.parts.len();
        self.parts.clear();
        n
    }

    /// Partitions currently assigned.
    pub fn assigned_count(&self) -> usize {
        self.parts.len()
    }

    /// A record of `p` at `offset` goes to the member; `None` when `p` is
    /// not assigned (a record fetched before a revoke): do not deliver it,
    /// the partition's next owner will.
    pub fn handed_out(&mut self, p: &Partition, offset: i64) -> Option<Ticket> {
        let part = self.parts.get_mut(p)?;
        part.open.insert(offset);
        part.next = Some(part.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(Ticket {
            partition: p.clone(),
            offset,
            generation: part.generation,
        })
    }

    /// The record of `t` needs nothing more from this member.
    pub fn finished(&mut self, t: &Ticket) {
        if let Some(part) = self.parts.get_mut(&t.partition) {
            if part.generation == t.generation {
                part.open.remove(&t.offset);
            }
        }
    }

    /// Positions that moved since the last call, to commit.
    pub fn to_commit(&mut self) -> Vec<(Partition, i64)> {
        let mut out = Vec::new();
        for (p, part) in &mut self.parts {
            if let Some(at) = part.position() {
                if Some(at) != part.committed {
                    part.committed = Some(at);
                    out.push((p.clone(), at));
                }
            }
        }
        out
    }

    /// Every assigned partition's position (for the final commit).
    pub fn positions(&self) -> Vec<(Partition, i64)> {
        self.parts
            .iter()
            .filter_map(|(p, part)| part.position().map(|at| (p.clone(), at)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        (Arc::from("t"), n)
    }

    #[test]
    fn commit_stops_at_the_first_unfinished_record() {
        let mut s = SharedProgress::default();
        s.assigned(p(0));
        let t: Vec<Ticket> = (10..15).map(|o| s.handed_out(&p(0), o).unwrap()).collect();
        assert_eq!(s.to_commit(), vec![(p(0), 10)]);
        s.finished(&t[1]);
        s.finished(&t[2]);
        assert!(s.to_commit().is_empty(), "10 is still open");
        s.finished(&t[0]);
        assert_eq!(s.to_commit(), vec![(p(0), 13)]);
        s.finished(&t[3]);
        s.finished(&t[4]);
        assert_eq!(s.to_commit(), vec![(p(0), 15)]);
        assert!(s.to_commit().is_empty(), "nothing moved");
    }

    #[test]
    fn a_record_of_a_partition_not_assigned_is_not_handed_out() {
        let mut s = SharedProgress::default();
        assert_eq!(s.handed_out(&p(1), 5), None);
        s.assigned(p(1));
        s.revoked(&p(1));
        assert_eq!(s.handed_out(&p(1), 5), None);
    }

    #[test]
    fn revoke_commits_what_is_finished_and_forgets_the_rest() {
        let mut s = SharedProgress::default();
        s.assigned(p(0));
        let a = s.handed_out(&p(0), 0).unwrap();
        let _b = s.handed_out(&p(0), 1).unwrap();
        s.finished(&a);
        assert_eq!(
            s.revoked(&p(0)),
            Some(Some(1)),
            "record 1 goes to the next owner"
        );
        assert_eq!(s.assigned_count(), 0);
        assert_eq!(s.revoked(&p(0)), None, "revoked once");
    }

    #[test]
    fn a_finish_from_an_earlier_assignment_is_ignored() {
        let mut s = SharedProgress::default();
        s.assigned(p(0));
        let old = s.handed_out(&p(0), 7).unwrap();
        s.revoked(&p(0));
        s.assigned(p(0));
        let new = s.handed_out(&p(0), 7).unwrap();
        s.finished(&old);
        assert_eq!(
            s.positions(),
            vec![(p(0), 7)],
            "the new delivery is still open"
        );
        s.finished(&new);
        assert_eq!(s.positions(), vec![(p(0), 8)]);
    }

    #[test]
    fn nothing_handed_out_commits_nothing() {
        let mut s = SharedProgress::default();
        s.assigned(p(0));
        assert!(s.to_commit().is_empty());
        assert_eq!(s.revoked(&p(0)), Some(None));
    }

    #[test]
    fn assignments_are_counted_once() {
        let mut s = SharedProgress::default();
        assert!(s.assigned(p(0)));
        assert!(!s.assigned(p(0)), "assigned again");
        assert!(s.assigned(p(1)));
        assert_eq!(s.forget_all(), 2);
        assert_eq!(s.assigned_count(), 0);
    }
}
