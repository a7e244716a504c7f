//! Which nodes are alive, from the heartbeats every node writes to the
//! compacted nodes topic (`cluster.rs` writes them and acts on deaths).
//! Kept apart from `cluster.rs` so `Node` holds it without depending on
//! the code that depends on `Node`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::kafka::Record;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    pub v: u32,
    pub node: String,
    pub ts_ms: i64,
    /// False when the node shut down gracefully.
    pub alive: bool,
}

/// What this node knows of the others, by local arrival time (immune to
/// clock skew between machines).
#[derive(Default)]
pub struct Liveness {
    seen: Mutex<HashMap<String, (Instant, bool)>>,
}

impl Liveness {
    pub fn apply_record(&self, rec: &Record) {
        let Some(v) = &rec.value else { return };
        if let Ok(hb) = serde_json::from_slice::<Heartbeat>(v) {
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(hb.node, (Instant::now(), hb.alive));
        }
    }

    /// Nodes heard from within `timeout` and not shut down.
    pub fn live(&self, timeout: Duration) -> Vec<String> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .filter(|(_, (at, alive))| *alive && at.elapsed() < timeout)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_times_out_and_honours_shutdown() {
        let l = Liveness::default();
        let rec = |node: &str, alive: bool| Record {
            topic: "n".into(),
            partition: 0,
            offset: 0,
            key: Some(bytes::Bytes::copy_from_slice(node.as_bytes())),
            value: Some(bytes::Bytes::from(
                serde_json::to_vec(&Heartbeat {
                    v: 1,
                    node: node.into(),
                    ts_ms: 0,
                    alive,
                })
                .unwrap(),
            )),
            timestamp_ms: 0,
            headers: vec![],
        };
        l.apply_record(&rec("a", true));
        l.apply_record(&rec("b", false));
        assert_eq!(l.live(Duration::from_secs(5)), vec!["a".to_string()]);
        assert!(l.live(Duration::from_nanos(1)).is_empty());
    }
}
