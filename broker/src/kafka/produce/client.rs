//! One connection to a Kafka broker that writes idempotently: its producer
//! id, and Produce requests sent one at a time (docs/own-producer.md).

use std::time::Duration;

use kafka_protocol::messages::InitProducerIdRequest;
use kafka_protocol::messages::ProducerId;

use kafka_protocol::protocol::StrBytes;

use super::request::{
    produce_request, EncodeError, Encoded, PartitionBatch, ProducerIdentity,
    INIT_PRODUCER_ID_VERSION, PRODUCE_VERSION,
};
use crate::kafka::fetch::wire::{KafkaConn, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ProduceCallError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("InitProducerId refused: error code {0}")]
    InitProducerId(i16),
}

/// One partition's answer in a Produce response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub topic: StrBytes,
    pub partition: i32,
    pub error_code: i16,
    pub base_offset: i64,
}

pub struct IdempotentConn {
    conn: KafkaConn,
    who: ProducerIdentity,
    timeout: Duration,
    addr: String,
    client_id: String,
}

impl IdempotentConn {
    /// Connects and asks Kafka for a producer id (no transactional id:
    /// idempotence only).
    pub async fn connect(
        addr: &str,
        client_id: &str,
        timeout: Duration,
    ) -> Result<IdempotentConn, ProduceCallError> {
        let mut conn = KafkaConn::connect(addr, client_id).await?;
        let req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let resp = conn
            .request(&req, INIT_PRODUCER_ID_VERSION, timeout)
            .await?;
        if resp.error_code != 0 {
            return Err(ProduceCallError::InitProducerId(resp.error_code));
        }
        let who = ProducerIdentity {
            id: resp.producer_id.0,
            epoch: resp.producer_epoch,
        };
        Ok(IdempotentConn {
            conn,
            who,
            timeout,
            addr: addr.to_string(),
            client_id: client_id.to_string(),
        })
    }

    /// A new connection for the same producer id and epoch (after a request
    /// went unanswered: its answer must not be read as the next one's).
    pub async fn reconnect(&mut self) -> Result<(), ProduceCallError> {
        self.conn = KafkaConn::connect(&self.addr, &self.client_id).await?;
        Ok(())
    }

    pub fn identity(&self) -> ProducerIdentity {
        self.who
    }

    /// Bumps the epoch here, as Kafka's Java client does for a producer
    /// without a transactional id: Kafka takes a higher epoch of a known
    /// producer id when each partition's sequences start again at 0.
    /// `false` at the last epoch: a new producer id is needed instead.
    pub fn bump_epoch(&mut self) -> bool {
        match self.who.epoch.checked_add(1) {
            Some(e) => {
                self.who.epoch = e;
                true
            }
            None => false,
        }
    }

    /// Encodes every batch and sends them in one request (see `produce_encoded`).
    pub async fn produce(
        &mut self,
        batches: &[PartitionBatch],
    ) -> Result<Vec<Answer>, ProduceCallError> {
        let encoded = batches
            .iter()
            .map(|b| Encoded::new(self.who, b))
            .collect::<Result<Vec<_>, _>>()?;
        self.produce_encoded(&encoded).await
    }

    /// Sends one request holding every batch and waits for its answers.
    pub async fn produce_encoded(
        &mut self,
        batches: &[Encoded],
    ) -> Result<Vec<Answer>, ProduceCallError> {
        let timeout_ms = i32::try_from(self.timeout.as_millis()).unwrap_or(i32::MAX);
        let req = produce_request(batches, timeout_ms);
        // Kafka waits up to `timeout_ms` for the replicas; the answer may
        // take that long plus the round trip.
        let wait = self.timeout + Duration::from_secs(5);
        let resp = self.conn.request(&req, PRODUCE_VERSION, wait).await?;
        let mut answers = Vec::new();
        for t in resp.responses {
            for p in t.partition_responses {
                answers.push(Answer {
                    topic: t.name.0.clone(),
                    partition: p.index,
                    error_code: p.error_code,
                    base_offset: p.base_offset,
                });
            }
        }
        Ok(answers)
    }
}
