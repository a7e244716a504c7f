//! Creates the broker's Kafka topics when missing and checks that existing
//! ones fit (a retained-message topic that is not compacted would lose
//! retained messages to retention, so that is an error, not a warning).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::types::RDKafkaErrorCode as Code;

use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::retry::Retry;

/// Replication of the topics the broker creates: `(replication factor,
/// min.insync.replicas)`. `configured` 0 means decide from the cluster: 3
/// replicas with 2 in sync when Kafka has 3 or more brokers (one may die
/// without losing an acknowledged write or refusing writes), else as many
/// replicas as brokers. An explicit factor gets a majority in sync.
pub fn replication_for(configured: i32, brokers: usize) -> (i32, i32) {
    let rf = if configured > 0 {
        configured
    } else {
        i32::try_from(brokers.clamp(1, 3)).unwrap_or(1)
    };
    let min_isr = if rf >= 3 { rf / 2 + 1 } else { 1 };
    (rf, min_isr)
}

/// A topic the broker needs, and whether it must be compacted.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub compacted: bool,
}

pub async fn ensure_topics(
    cfg: &KafkaConfig,
    node_id: &str,
    topics: &[TopicSpec],
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        super::client_config(cfg, &format!("lodestream-admin-{node_id}")).create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    if cfg.create_topics {
        let partitions = cfg.topic_partitions;
        let brokers = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(30))?
            .brokers()
            .len();
        let (rf, min_isr) = replication_for(cfg.replication_factor, brokers);
        let min_isr = min_isr.to_string();
        tracing::info!(brokers, replication_factor = rf, min_insync_replicas = %min_isr, "Kafka topic replication");
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| {
                let nt = NewTopic::new(&t.name, partitions, TopicReplication::Fixed(rf))
                    .set("min.insync.replicas", &min_isr);
                if t.compacted {
                    // Compaction only cleans closed segments: roll them hourly
                    // so superseded session records and tombstones go away
                    // (the 1 GB default segment would keep everything).
                    nt.set("cleanup.policy", "compact")
                        .set("segment.ms", "3600000")
                        .set("min.cleanable.dirty.ratio", "0.1")
                } else {
                    nt
                }
            })
            .collect();
        for r in admin.create_topics(new.iter(), &opts).await? {
            match r {
                Ok(name) => tracing::info!(topic = %name, "created Kafka topic"),
                Err((_, Code::TopicAlreadyExists)) => {}
                Err((name, e)) => anyhow::bail!("cannot create Kafka topic {name}: {e}"),
            }
        }
    }
    let compacted: Vec<&TopicSpec> = topics.iter().filter(|t| t.compacted).collect();
    if compacted.is_empty() {
        return Ok(());
    }
    for spec in compacted {
        // A just-created topic's configuration can take a moment to become
        // visible: up to 15 s (a loaded single-node Kafka can take that long).
        let policy = Retry::fixed(
            "topic_config",
            60,
            Duration::from_millis(250),
            &metrics.retry_give_ups,
        )
        .run(&spec.name, || cleanup_policy(&admin, &opts, &spec.name))
        .await?;
        if !policy.split(',').any(|p| p.trim() == "compact") {
            anyhow::bail!(
                "Kafka topic {} must have cleanup.policy=compact (it has {policy:?}); fix it with \
                 kafka-configs --alter --entity-type topics --entity-name {} --add-config cleanup.policy=compact",
                spec.name,
                spec.name
            );
        }
    }
    Ok(())
}

/// The topic's `cleanup.policy`; an error while it is missing or unset.
async fn cleanup_policy(
    admin: &AdminClient<DefaultClientContext>,
    opts: &AdminOptions,
    topic: &str,
) -> anyhow::Result<String> {
    let spec = ResourceSpecifier::Topic(topic);
    let res = admin.describe_configs([&spec], opts).await?;
    match res.into_iter().next() {
        Some(Ok(r)) => r
            .get("cleanup.policy")
            .and_then(|e| e.value.clone())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| anyhow::anyhow!("Kafka topic {topic}: cleanup.policy not visible yet")),
        Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) | None => anyhow::bail!(
            "Kafka topic {topic} is missing or its configuration cannot be read (kafka.create_topics = false?)"
        ),
        Some(Err(e)) => anyhow::bail!("cannot describe Kafka topic {topic}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::replication_for;

    #[test]
    fn auto_replication_is_three_with_two_in_sync_on_a_cluster_of_three_or_more() {
        assert_eq!(replication_for(0, 1), (1, 1));
        assert_eq!(replication_for(0, 2), (2, 1));
        assert_eq!(replication_for(0, 3), (3, 2));
        assert_eq!(replication_for(0, 7), (3, 2));
        assert_eq!(replication_for(0, 0), (1, 1));
    }

    #[test]
    fn explicit_replication_is_kept_with_a_majority_in_sync() {
        assert_eq!(replication_for(1, 3), (1, 1));
        assert_eq!(replication_for(3, 3), (3, 2));
        assert_eq!(replication_for(5, 5), (5, 3));
    }
}
