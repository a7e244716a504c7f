//! Looks in Kafka for the first transmission of a QoS 2 PUBLISH that a
//! client retransmits after its session moved to this node, when the
//! session state the node restored may predate that write (see
//! `inbound_qos2.rs` for why and for the bounds).
//!
//! Reads every partition of the message's Kafka topic from the first record
//! produced at or after the bound's time (minus a margin for clock steps),
//! up to the high watermark seen at the start, and reports the sequence
//! number of a record this client wrote with this packet id that `accept`
//! takes as the unfinished write. Only retransmissions of ids the state
//! does not know trigger it, so it runs rarely and reads a few seconds of
//! one topic.
//!
//! On a replicated Kafka a write the previous owner sent just before it died
//! may sit on the partition leader beyond the high watermark (not yet in
//! sync replicas) and become visible later, or arrive late from a stalled
//! connection. A scan up to the high watermark taken too early would miss it
//! and the retransmission would be written a second time. So a scan of a
//! state restored without the owner's hand-off does not decide before
//! [`settled_at_ms`]: until then the owner's last writes may still land.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::message::Qos2Flow;
use crate::metrics::Metrics;
use crate::retry::Retry;

/// Records may carry a timestamp a little before the bound if the clock
/// stepped back between the write and the bound being taken.
const CLOCK_MARGIN_MS: i64 = 5_000;
const TIMEOUT: Duration = Duration::from_secs(15);

/// What a restored session record says about its previous owner.
#[derive(Debug, Clone, Copy)]
pub struct RestoredFrom {
    pub handoff: bool,
    pub online: bool,
    pub disconnected_ms: Option<i64>,
    /// Written offline by this very run of the claiming node: its writes
    /// went through this node's own producer and were settled (acknowledged,
    /// or failed and fenced by the idempotent producer) before that.
    pub own_run: bool,
}

/// When every write the previous owner of a restored session may have sent
/// has landed in Kafka or failed for good (ms since the epoch), or `None`
/// when the state is the owner's hand-off (it settled its writes first) or
/// this run's own offline record (its connection settled them before).
///
/// A write is sent before the owner loses the session and lands or fails
/// within `delivery_timeout_ms` of being sent (Kafka's
/// `replica.lag.time.max.ms` must not exceed it, see docs/operations.md):
/// - an online record without hand-off (owner dead or unreachable): the
///   owner's writes were sent before `now_ms`, when this node claimed it;
/// - an offline record (a clean disconnect, or adopted after the owner's
///   death, `disconnected_ms` then being the owner's last heartbeat): sent
///   before `disconnected_ms + node_timeout_ms`.
pub fn settled_at_ms(
    record: RestoredFrom,
    now_ms: i64,
    delivery_timeout_ms: u32,
    node_timeout_ms: u64,
) -> Option<i64> {
    if record.handoff || record.own_run {
        return None;
    }
    let last_send = match record.disconnected_ms {
        Some(at) if !record.online => {
            at.saturating_add(i64::try_from(node_timeout_ms).unwrap_or(i64::MAX))
        }
        _ => now_ms,
    };
    Some(last_send.saturating_add(i64::from(delivery_timeout_ms)))
}

pub struct ScanRequest<'a> {
    pub topic: &'a str,
    pub client_id: &'a str,
    pub packet_id: u16,
    pub since_ms: i64,
}

/// Returns the sequence numbers of the matching records (this client, this
/// packet id), oldest first; the caller decides which one counts.
pub async fn find_writes(
    cfg: &KafkaConfig,
    node_id: &str,
    metrics: &Metrics,
    req: ScanRequest<'_>,
) -> anyhow::Result<Vec<u64>> {
    let started = Instant::now();
    // Metadata, timestamps and watermarks can fail transiently (a leader
    // moving, a cluster still starting): retry the scan until the deadline.
    Retry::fixed(
        "qos2_scan",
        u32::MAX,
        Duration::from_millis(250),
        &metrics.retry_give_ups,
    )
    .within(TIMEOUT)
    .run(req.topic, || scan(cfg, node_id, &req, started))
    .await
}

async fn scan(
    cfg: &KafkaConfig,
    node_id: &str,
    req: &ScanRequest<'_>,
    started: Instant,
) -> anyhow::Result<Vec<u64>> {
    let consumer = super::consumer::assigned(cfg, "qos2-scan", node_id, 50)?;
    let meta = consumer.fetch_metadata(Some(req.topic), TIMEOUT)?;
    let partitions: Vec<i32> = meta
        .topics()
        .iter()
        .filter(|t| t.name() == req.topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut by_time = TopicPartitionList::new();
    for p in &partitions {
        by_time.add_partition_offset(
            req.topic,
            *p,
            Offset::Offset(req.since_ms - CLOCK_MARGIN_MS),
        )?;
    }
    let starts = consumer.offsets_for_times(by_time, TIMEOUT)?;
    // Per partition: read [start, end) where end is the high watermark now.
    let mut todo: HashMap<i32, i64> = HashMap::new();
    let mut assign = TopicPartitionList::new();
    for e in starts.elements() {
        let Offset::Offset(start) = e.offset() else {
            continue; // no record at or after the time: nothing to read
        };
        let (_, high) = consumer.fetch_watermarks(req.topic, e.partition(), TIMEOUT)?;
        if start < high {
            todo.insert(e.partition(), high);
            assign.add_partition_offset(req.topic, e.partition(), Offset::Offset(start))?;
        }
    }
    let mut found = Vec::new();
    if todo.is_empty() {
        return Ok(found);
    }
    consumer.assign(&assign)?;
    let mut stream = consumer.stream();
    while !todo.is_empty() {
        let left = TIMEOUT.saturating_sub(started.elapsed());
        let m = match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(m))) => m,
            // Transient consumer errors (e.g. no group coordinator yet on a
            // fresh cluster) are retried until the deadline, as catch-up does.
            Ok(Some(Err(e))) => {
                tracing::debug!(topic = req.topic, error = %e, "QoS 2 scan read error; retrying");
                continue;
            }
            Ok(None) => anyhow::bail!("QoS 2 scan consumer closed"),
            Err(_) => anyhow::bail!("QoS 2 scan of {} timed out", req.topic),
        };
        if let Some(hs) = m.headers() {
            if let Some((client, flow)) =
                Qos2Flow::from_headers(hs.iter().map(|h| (h.key, h.value)))
            {
                if client == req.client_id && flow.packet_id == req.packet_id {
                    found.push(flow.seq);
                }
            }
        }
        if todo
            .get(&m.partition())
            .is_some_and(|end| m.offset() + 1 >= *end)
        {
            todo.remove(&m.partition());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::{settled_at_ms, RestoredFrom};

    const T: u32 = 30_000;
    const NODE_TIMEOUT: u64 = 10_000;

    #[test]
    fn a_hand_off_needs_no_wait() {
        let r = RestoredFrom {
            handoff: true,
            online: false,
            disconnected_ms: Some(5),
            own_run: false,
        };
        assert_eq!(settled_at_ms(r, 1_000, T, NODE_TIMEOUT), None);
    }

    #[test]
    fn a_claimed_online_session_waits_the_delivery_timeout_from_the_claim() {
        let r = RestoredFrom {
            handoff: false,
            online: true,
            disconnected_ms: None,
            own_run: false,
        };
        assert_eq!(settled_at_ms(r, 1_000, T, NODE_TIMEOUT), Some(31_000));
    }

    #[test]
    fn an_offline_or_adopted_session_counts_from_its_owner_last_sign_of_life() {
        let r = RestoredFrom {
            handoff: false,
            online: false,
            disconnected_ms: Some(1_000),
            own_run: false,
        };
        // Owner declared dead node_timeout after its last heartbeat.
        assert_eq!(settled_at_ms(r, 500_000, T, NODE_TIMEOUT), Some(41_000));
    }

    #[test]
    fn this_runs_own_offline_session_needs_no_wait() {
        let r = RestoredFrom {
            handoff: false,
            online: false,
            disconnected_ms: Some(1_000),
            own_run: true,
        };
        assert_eq!(settled_at_ms(r, 500_000, T, NODE_TIMEOUT), None);
    }
}
