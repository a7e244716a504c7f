//! The own producer's Kafka calls (docs/own-producer.md): a producer id
//! from InitProducerId, and Produce requests, one at a time per broker.
//! `Links` is the producer's: every broker it writes to. `IdempotentConn`
//! is one connection, for tests of what Kafka does with sequences.

use rustc_hash::FxHashMap as HashMap;
use std::time::Duration;

use kafka_protocol::messages::InitProducerIdRequest;
use kafka_protocol::messages::ProducerId;

use kafka_protocol::protocol::StrBytes;

use super::request::{
    produce_request, EncodeError, Encoded, PartitionBatch, ProducerIdentity,
    INIT_PRODUCER_ID_VERSION, PRODUCE_VERSION,
};
use super::route::Routes;
use crate::kafka::fetch::wire::{KafkaConn, WireError};
use crate::kafka::fetch::{bootstrap_addrs, metadata_of};

#[derive(Debug, thiserror::Error)]
pub enum ProduceCallError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("InitProducerId refused: error code {0}")]
    InitProducerId(i16),
    #[error("no bootstrap server configured")]
    NoBootstrap,
    #[error("Kafka did not answer within {0:?}")]
    Unanswered(Duration),
    #[error("Kafka broker {0} is not in the last Metadata answer")]
    NoBroker(i32),
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
        let who = init_producer_id(&mut conn, timeout).await?;
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

    /// Bumps the epoch here (`ProducerIdentity::bump_epoch`).
    pub fn bump_epoch(&mut self) -> bool {
        self.who.bump_epoch()
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
        produce_on(&mut self.conn, batches, self.timeout).await
    }
}

/// Asks Kafka for a producer id (no transactional id: idempotence only).
async fn init_producer_id(
    conn: &mut KafkaConn,
    timeout: Duration,
) -> Result<ProducerIdentity, ProduceCallError> {
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
    Ok(ProducerIdentity {
        id: resp.producer_id.0,
        epoch: resp.producer_epoch,
    })
}

/// Sends one request holding every batch on `conn` and waits for its
/// answers, at most `wait`; Kafka waits up to it for the in-sync replicas.
async fn produce_on(
    conn: &mut KafkaConn,
    batches: &[Encoded],
    wait: Duration,
) -> Result<Vec<Answer>, ProduceCallError> {
    let timeout_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    let req = produce_request(batches, timeout_ms);
    let resp = conn.request(&req, PRODUCE_VERSION, wait).await?;
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

/// One producer's links to a Kafka cluster: its id and epoch, a connection
/// to each broker that leads a partition written to (opened when first
/// needed), and where each partition's leader is.
pub struct Links {
    who: ProducerIdentity,
    bootstrap: Vec<String>,
    client_id: String,
    timeout: Duration,
    conns: HashMap<i32, KafkaConn>,
    pub routes: Routes,
}

impl Links {
    /// Asks the first bootstrap server that answers for a producer id.
    pub async fn connect(
        bootstrap: &str,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Links, ProduceCallError> {
        let bootstrap = bootstrap_addrs(bootstrap);
        let mut last = None;
        for addr in &bootstrap {
            let who = async {
                let mut conn = KafkaConn::connect(addr, client_id).await?;
                init_producer_id(&mut conn, timeout).await
            };
            match who.await {
                Ok(who) => {
                    return Ok(Links {
                        who,
                        bootstrap,
                        client_id: client_id.to_string(),
                        timeout,
                        conns: HashMap::default(),
                        routes: Routes::default(),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ProduceCallError::NoBootstrap))
    }

    pub fn identity(&self) -> ProducerIdentity {
        self.who
    }

    /// Bumps the epoch of every connection (`ProducerIdentity::bump_epoch`).
    pub fn bump_epoch(&mut self) -> bool {
        self.who.bump_epoch()
    }

    /// Looks up the partitions and leaders of `topics` again.
    pub async fn refresh(&mut self, topics: &[String]) -> anyhow::Result<()> {
        let md = metadata_of(&self.bootstrap, &self.client_id, topics, true).await?;
        self.routes.update(&md);
        Ok(())
    }

    /// Sends each broker its batches, all requests at once, one per
    /// broker, each answer awaited at most the request timeout or its
    /// `wait`, whichever is shorter. A broker whose request failed loses
    /// its connection: a late answer on it must not be read as the next
    /// request's.
    pub async fn produce_all(
        &mut self,
        requests: Vec<(i32, Vec<Encoded>, Duration)>,
    ) -> Vec<(i32, Result<Vec<Answer>, ProduceCallError>)> {
        let mut calls = Vec::with_capacity(requests.len());
        for (broker, batches, wait) in requests {
            let conn = self.conns.remove(&broker);
            let addr = self.routes.address(broker).map(str::to_string);
            let (client_id, timeout) = (self.client_id.clone(), self.timeout.min(wait));
            calls.push(async move {
                let mut conn = match (conn, addr) {
                    (Some(c), _) => c,
                    (None, Some(addr)) => match KafkaConn::connect(&addr, &client_id).await {
                        Ok(c) => c,
                        Err(e) => return (broker, None, Err(e.into())),
                    },
                    (None, None) => return (broker, None, Err(ProduceCallError::NoBroker(broker))),
                };
                let answer = produce_on(&mut conn, &batches, timeout).await;
                (broker, Some(conn), answer)
            });
        }
        let mut out = Vec::new();
        for (broker, conn, answer) in futures::future::join_all(calls).await {
            if let (Some(conn), Ok(_)) = (conn, &answer) {
                self.conns.insert(broker, conn);
            }
            out.push((broker, answer));
        }
        out
    }
}
