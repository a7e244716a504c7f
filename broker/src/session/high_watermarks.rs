//! The sessions topic's high watermarks, for read-your-writes at CONNECT:
//! a node decides Session Present only after its view of the sessions topic
//! has read up to them. One fetch serves every caller that asked before it
//! started, so a burst of CONNECTs costs a few Kafka round trips, not one
//! each.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::kafka::Producer;

/// Why the view of the sessions topic could not be made current.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("Kafka did not give the high watermark of sessions partition {0}")]
    Watermark(i32),
    #[error("the high-watermark fetch was aborted")]
    Aborted,
    #[error("the sessions view did not reach the high watermarks within {0:?}")]
    Behind(Duration),
}

pub struct HighWatermarks {
    topic: String,
    partitions: Vec<i32>,
    /// The last fetch: when it started, and what it found.
    last: Mutex<Option<(Instant, HashMap<i32, i64>)>>,
}

impl HighWatermarks {
    pub fn new(topic: &str, partitions: Vec<i32>) -> HighWatermarks {
        HighWatermarks {
            topic: topic.to_string(),
            partitions,
            last: Mutex::new(None),
        }
    }

    /// High watermarks of every partition, fetched after `asked`: they
    /// cover every write Kafka acknowledged before `asked`.
    pub async fn after(
        &self,
        asked: Instant,
        producer: &Producer,
    ) -> Result<HashMap<i32, i64>, ViewError> {
        let mut last = self.last.lock().await;
        if let Some((at, marks)) = last.as_ref() {
            if *at >= asked {
                return Ok(marks.clone());
            }
        }
        let started = Instant::now();
        let (p, topic, parts) = (
            producer.clone(),
            self.topic.clone(),
            self.partitions.clone(),
        );
        // Watermark requests block: off the runtime threads.
        let marks = tokio::task::spawn_blocking(move || {
            parts
                .iter()
                .map(|&part| {
                    p.watermarks(&topic, part)
                        .map(|(_, high)| (part, high))
                        .ok_or(ViewError::Watermark(part))
                })
                .collect::<Result<HashMap<i32, i64>, ViewError>>()
        })
        .await
        .map_err(|_| ViewError::Aborted)??;
        *last = Some((started, marks.clone()));
        Ok(marks)
    }
}
