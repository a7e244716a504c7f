//! One broker node: the state every connection shares (Kafka producer,
//! per-Kafka-topic readers, subscription index, retained store, session
//! registry, metrics), private behind methods, and the operations that span
//! connections: the Kafka writes (messages, wills, session records and
//! tombstones), Kafka readers on demand, shutdown. The session lifecycle
//! that uses them is in `session::{lifecycle, release, cluster}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lodestream_mqtt::{LastWill, ReasonCode};
use tokio::sync::{watch, Mutex};

use crate::config::{Config, Validated};
use crate::kafka::{self, Producer, Record, TopicReader};
use crate::mapping::Mapping;
use crate::message::{Message, Qos2Flow};
use crate::metrics::Metrics;
use crate::retained::RetainedStore;
use crate::retry::Retry;
use crate::session::record::SessionRecord;
use crate::session::registry::{Control, Registry};
use crate::session::store::{Applied, SessionStore};
use crate::session::{Delivery, Session};
use crate::subscriptions::{SubKey, SubscriptionIndex};

pub struct Node {
    config: Config,
    /// When this run of the node started (ms): records it wrote itself
    /// since then came through its own producer.
    started_ms: i64,
    mapping: Mapping,
    /// Per `Mapping::destination_topics`, what every write to it shares.
    destinations: Vec<Destination>,
    /// Messages: the batch lane (`kafka.linger_ms`), and the fast lane
    /// (no linger) when `kafka.fast_lane_below` > 0; `lanes` picks.
    producer: Producer,
    fast_producer: Option<Producer>,
    lanes: kafka::LanePolicy,
    /// Messages written by the own producer instead (`kafka.own_producer`).
    own: Option<kafka::produce::own::OwnProducer>,
    /// Session records and heartbeats: a separate queue, so a flood of
    /// messages never delays a CONNECT's claim or a node's heartbeat.
    control_producer: Producer,
    subs: Arc<SubscriptionIndex>,
    retained: Arc<RetainedStore>,
    registry: Arc<Registry>,
    auth: crate::auth::Authenticator,
    /// Swapped whole on reload (SIGHUP).
    acl: std::sync::RwLock<Arc<crate::acl::Acl>>,
    /// Present when a TLS or WSS listener is configured.
    tls: Option<crate::transport::TlsAcceptor>,
    liveness: Arc<crate::session::liveness::Liveness>,
    _nodes_reader: TopicReader,
    /// Materialised sessions topic.
    store: Arc<SessionStore>,
    _sessions_reader: TopicReader,
    sessions_marks: crate::session::high_watermarks::HighWatermarks,
    metrics: Arc<Metrics>,
    readers: Mutex<HashMap<String, TopicReader>>,
    _retained_reader: TopicReader,
    conn_ids: AtomicU64,
    open_connections: AtomicUsize,
    /// Flips to true when the node shuts down.
    shutdown_tx: watch::Sender<bool>,
    /// Cluster-wide shared subscriptions with members here.
    shared: crate::shared_groups::SharedGroups,
    /// Sessions reading Kafka because fan-out outran them
    /// (`mqtt.max_lagging_sessions`).
    lagging: Arc<tokio::sync::Semaphore>,
}

/// One session reading Kafka itself (`connection/lagging.rs`); counted in
/// `lodestream_lagging_sessions` while held.
pub struct LaggingPermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Drop for LaggingPermit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Counts one open connection of a node for as long as it lives.
pub struct OpenConnection(Arc<Node>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.connections.dec();
    }
}

pub use crate::clock::now_ms;

/// A Kafka topic messages are mapped to: its name, shared by every write
/// to it, and its `published_to_kafka` counter, so a PUBLISH neither
/// allocates the one nor looks the other up by label.
struct Destination {
    topic: Arc<str>,
    published: prometheus::IntCounter,
}

fn destinations(mapping: &Mapping, metrics: &Metrics) -> Vec<Destination> {
    mapping
        .destination_topics()
        .map(|t| Destination {
            topic: Arc::from(t),
            published: metrics.published_to_kafka.with_label_values(&[t]),
        })
        .collect()
}

impl Node {
    /// Connects to Kafka, creates missing topics and loads the retained
    /// messages; fails with a clear message when Kafka is unusable.
    pub async fn start(valid: Validated) -> anyhow::Result<Arc<Node>> {
        let Validated {
            mut config,
            mapping,
        } = valid;
        // Security settings are checked before Kafka is touched: a typo in a
        // certificate path should not wait for a Kafka timeout.
        let auth = crate::auth::Authenticator::new(&config.auth).context("[auth]")?;
        let acl = match &config.acl.file {
            None => crate::acl::Acl::allow_all(),
            Some(file) => crate::acl::Acl::load(file).context("[acl] file")?,
        };
        let tls = if config.listeners.tls.is_none() && config.listeners.wss.is_none() {
            None
        } else {
            let t = crate::transport::TlsAcceptor::new(&config.tls).context("[tls]")?;
            t.spawn_reloader();
            Some(t)
        };
        if config.node_id.is_empty() {
            config.node_id = format!("node-{}", uuid::Uuid::new_v4().simple());
        }
        let kcfg = &config.kafka;
        let topics = topic_specs(&mapping, kcfg);
        let metrics = Arc::new(Metrics::new());
        tokio::time::timeout(
            Duration::from_secs(60),
            kafka::ensure_topics(kcfg, &config.node_id, &topics, &metrics),
        )
        .await
        .with_context(|| {
            format!(
                "Kafka at {} did not answer within 60 s",
                kcfg.bootstrap_servers
            )
        })??;
        let producer =
            Producer::new(kcfg, &config.node_id).context("creating the Kafka producer")?;
        let control_producer =
            lingerless_producer(kcfg, &config.node_id, "control", kcfg.max_in_flight)?;
        // The fast lane (`kafka/lanes.rs`): one request in flight, so a
        // lone record goes at once and records batch only while it is out.
        let own = own_producer(kcfg, &config.node_id);
        let fast_producer = (kcfg.fast_lane_below > 0 && own.is_none())
            .then(|| lingerless_producer(kcfg, &config.node_id, "fast", 1))
            .transpose()?;
        let lanes = kafka::LanePolicy::new(
            u64::from(kcfg.fast_lane_below),
            Duration::from_millis(u64::from(kcfg.linger_ms)),
            Duration::from_micros(u64::from(kcfg.wake_pause_us)),
            std::time::Instant::now(),
        );
        let retained = Arc::new(RetainedStore::new());
        let r2 = retained.clone();
        let (retained_reader, caught_up, _) = kafka::TopicReader::start(
            kcfg,
            &config.node_id,
            &kcfg.retained_topic,
            kafka::StartAt::Beginning,
            &metrics,
            move |m, _| r2.apply_record(Record::copy_of(m)),
        )
        .await
        .context("reading the retained-message topic")?;
        if tokio::time::timeout(Duration::from_secs(60), caught_up)
            .await
            .is_err()
        {
            tracing::warn!("retained messages not fully loaded after 60 s; serving what is loaded");
        }
        tracing::info!(retained = retained.len(), "retained messages loaded");
        let registry = Arc::new(Registry::new(config.mqtt.max_sessions));
        let (store, sessions_reader, sessions_marks) =
            load_sessions(kcfg, &config.node_id, registry.clone(), &metrics).await?;
        let liveness = Arc::new(crate::session::liveness::Liveness::default());
        let lv = liveness.clone();
        let (nodes_reader, _, _) = kafka::TopicReader::start(
            kcfg,
            &config.node_id,
            &kcfg.nodes_topic,
            kafka::StartAt::Beginning,
            &metrics,
            move |m, _| lv.apply_record(&Record::copy_of(m)),
        )
        .await
        .context("reading the nodes topic")?;
        let (shutdown, _) = watch::channel(false);
        Ok(Arc::new(Node {
            own,
            started_ms: now_ms(),
            subs: Arc::new(SubscriptionIndex::new(metrics.clone())),
            registry,
            store,
            auth,
            acl: std::sync::RwLock::new(Arc::new(acl)),
            tls,
            _sessions_reader: sessions_reader,
            sessions_marks,
            liveness,
            _nodes_reader: nodes_reader,
            readers: Mutex::new(HashMap::new()),
            _retained_reader: retained_reader,
            conn_ids: AtomicU64::new(1),
            open_connections: AtomicUsize::new(0),
            lagging: Arc::new(tokio::sync::Semaphore::new(
                config.mqtt.max_lagging_sessions,
            )),
            config,
            destinations: destinations(&mapping, &metrics),
            mapping,
            producer,
            fast_producer,
            lanes,
            control_producer,
            retained,
            metrics,
            shutdown_tx: shutdown,
            shared: Default::default(),
        }))
    }

    /// Adds a member to the shared subscription `key` on this node (see
    /// `shared_groups.rs`); returns once its Kafka group has a position.
    pub async fn join_shared(
        &self,
        key: crate::shared_groups::GroupKey,
        slot: crate::shared_groups::Slot,
    ) -> Result<(), crate::shared_groups::JoinError> {
        let max = self.config.mqtt.max_shared_members;
        let joined = self
            .shared
            .join(key.clone(), slot, max, |group| {
                let run = kafka::share_group::Run {
                    node_id: self.config.node_id.clone(),
                    topics: self
                        .mapping
                        .kafka_topics_for_filter(&key.1)
                        .into_iter()
                        .map(str::to_string)
                        .collect(),
                    mapping: self.mapping.clone(),
                    partitions: self.metrics.shared_partitions.clone(),
                    group,
                };
                tokio::spawn(kafka::share_group::run(self.config.kafka.clone(), run));
            })
            .await;
        if joined.is_ok() {
            self.metrics.shared_members.inc();
        }
        joined
    }

    /// Connection `conn_id` leaves the shared subscription `key`, handing
    /// back its unfinished deliveries of it.
    pub fn leave_shared(
        &self,
        key: &crate::shared_groups::GroupKey,
        conn_id: u64,
        returned: Vec<Delivery>,
    ) {
        self.metrics.shared_members.dec();
        self.shared.leave(key, conn_id, returned);
    }

    /// The validated configuration this node runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// This node's Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Called by a worker about to sleep: pauses first while the node
    /// coalesces wake-ups (`kafka/wake_pause.rs`).
    pub fn before_worker_sleeps(&self) {
        let pause = self.lanes.wake_pause(std::time::Instant::now());
        if !pause.is_zero() {
            self.metrics.wake_pauses.inc();
            std::thread::sleep(pause);
        }
    }

    /// Which producer a connection's next write takes (`kafka/lanes.rs`).
    pub fn lanes(&self) -> &kafka::LanePolicy {
        &self.lanes
    }

    /// The MQTT topic -> Kafka topic rules.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// This node's view of the retained messages.
    pub fn retained(&self) -> &RetainedStore {
        &self.retained
    }

    /// This node's view of the sessions topic (session lifecycle only).
    pub(crate) fn sessions(&self) -> &SessionStore {
        &self.store
    }

    /// How many sessions the sessions topic holds, as this node sees it.
    pub fn known_sessions(&self) -> usize {
        self.store.len()
    }

    /// The record of `client_id` in this node's view of the sessions topic.
    pub fn stored_session(&self, client_id: &str) -> Option<SessionRecord> {
        self.store.get(client_id)
    }

    /// Client id -> connection of this node (session lifecycle only).
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The TLS acceptor, when a TLS or WSS listener is configured.
    pub fn tls(&self) -> Option<crate::transport::TlsAcceptor> {
        self.tls.clone()
    }

    /// When this run of the node started (ms since the epoch): records it
    /// wrote itself since then came through its own producer.
    pub fn started_ms(&self) -> i64 {
        self.started_ms
    }

    /// Changes to true when the node shuts down.
    pub fn shutting_down(&self) -> watch::Receiver<bool> {
        shutdown_receiver(&self.shutdown_tx)
    }

    /// Checks a login (password, JWT or client certificate).
    pub async fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        cert_identity: Option<&str>,
        ip: std::net::IpAddr,
    ) -> Result<crate::auth::Identity, ReasonCode> {
        self.auth
            .authenticate(client_id, username, password, cert_identity, ip)
            .await
    }

    /// Counts a connection open until the returned guard drops.
    pub fn open_connection(self: &Arc<Self>) -> OpenConnection {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        self.metrics.connection_opened();
        self.metrics.connections_total.inc();
        OpenConnection(self.clone())
    }

    /// Kafka answers a metadata request (for `/ready`).
    pub async fn kafka_reachable(&self) -> bool {
        let producer = self.producer.clone();
        let topic = self.mapping.default_topic().to_string();
        tokio::task::spawn_blocking(move || producer.metadata_ok(&topic))
            .await
            .unwrap_or(false)
    }

    /// More connections are open than `mqtt.max_connections` allows.
    pub fn over_connection_limit(&self) -> bool {
        self.open_connections.load(Ordering::Relaxed) > self.config.mqtt.max_connections
    }

    /// Sets the sessions gauge to the number of sessions this node holds.
    pub fn count_sessions(&self) {
        self.metrics.sessions.set(self.registry.len() as i64);
    }

    /// Adds (or replaces) a subscription in the fan-out index; the caller
    /// counts it when new.
    pub fn index_subscription(
        &self,
        inner: &str,
        key: SubKey,
        entry: crate::subscriptions::SubEntry,
    ) -> Result<(), lodestream_mqtt::TopicError> {
        self.subs.insert(inner, key, entry)
    }

    /// Removes a subscription from the fan-out index; counted when it was there.
    pub fn unindex_subscription(&self, inner: &str, key: &SubKey) {
        if self.subs.remove(inner, key) {
            self.metrics.subscriptions.dec();
        }
    }

    /// A place for one more session reading Kafka itself, if one is free.
    pub fn lagging_permit(&self) -> Option<LaggingPermit> {
        let permit = self.lagging.clone().try_acquire_owned().ok()?;
        self.metrics.lagging_sessions.inc();
        Some(LaggingPermit {
            _permit: permit,
            gauge: self.metrics.lagging_sessions.clone(),
        })
    }

    /// Where fan-out stands in the partitions of `topics`.
    pub fn fan_out_positions(&self, topics: &[&str]) -> crate::session::Offsets {
        self.subs.positions_of(topics)
    }

    /// Reads what a resumed session missed from Kafka into `tx`, then
    /// registers its subscriptions with fan-out (`kafka/catchup.rs`).
    pub async fn catch_up(
        &self,
        job: crate::kafka::catchup::CatchUp,
        tx: tokio::sync::mpsc::Sender<crate::session::Delivery>,
    ) -> anyhow::Result<()> {
        crate::kafka::catchup::run(
            &self.config.kafka,
            &self.config.node_id,
            &self.mapping,
            &self.subs,
            job,
            tx,
        )
        .await
        .map(|_| ())
    }

    pub fn acl(&self) -> Arc<crate::acl::Acl> {
        self.acl.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the password file, the rules file and the TLS certificate
    /// (SIGHUP). Blocking: call from a blocking thread.
    pub fn reload_security(&self) -> anyhow::Result<()> {
        self.auth.reload().context("[auth] password file")?;
        if let Some(file) = &self.config.acl.file {
            let acl = crate::acl::Acl::load(file).context("[acl] file")?;
            *self.acl.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(acl);
        }
        if let Some(t) = &self.tls {
            t.reload().context("[tls]")?;
        }
        Ok(())
    }

    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes sure this node reads every Kafka topic that can hold messages
    /// for `filter` (one shared reader per Kafka topic). Returns once records
    /// written from now on will be seen.
    pub async fn ensure_readers(&self, filter: &str) -> anyhow::Result<()> {
        let needed: Vec<String> = self
            .mapping
            .kafka_topics_for_filter(filter)
            .into_iter()
            .map(str::to_string)
            .collect();
        let mut readers = self.readers.lock().await;
        for topic in needed {
            if readers.contains_key(&topic) {
                continue;
            }
            let subs = self.subs.clone();
            let counter = self.metrics.kafka_records_read.with_label_values(&[&topic]);
            let reader_topic = topic.clone();
            let source_topic: Arc<str> = Arc::from(topic.as_str());
            let mapping = self.mapping.clone();
            let (reader, starts) = TopicReader::start_fanout(
                &self.config.kafka,
                &self.config.node_id,
                &topic,
                &self.metrics,
                mapping,
                move |partition, records, wakes| {
                    let mut read = 0;
                    // The record key (or `mqtt.topic`) gives the MQTT topic;
                    // records without a valid one cannot be delivered.
                    let msgs = records.filter_map(|(offset, msg)| {
                        read += 1;
                        match msg {
                            Ok(m) => Some((offset, Arc::new(m))),
                            Err(e) => {
                                tracing::debug!(topic = %reader_topic, offset, error = %e, "record skipped");
                                None
                            }
                        }
                    });
                    subs.dispatch(&source_topic, partition, msgs, wakes);
                    counter.inc_by(read);
                },
            )
            .await
            .with_context(|| format!("starting the reader of Kafka topic {topic}"))?;
            let t: Arc<str> = Arc::from(topic.as_str());
            self.subs.init_positions(
                starts
                    .into_iter()
                    .map(|(p, o)| ((t.clone(), p), o))
                    .collect(),
            );
            tracing::info!(topic = %topic, "reading Kafka topic for local subscribers");
            readers.insert(topic, reader);
        }
        Ok(())
    }

    /// Writes a message to its mapped Kafka topic (and to the retained
    /// topic when RETAIN is set) and waits for Kafka's acknowledgement.
    pub async fn publish(&self, msg: Arc<Message>) -> Result<(), kafka::ProduceError> {
        let started = std::time::Instant::now();
        let sent = self.send(&msg, None, kafka::Lane::Batch).await?;
        sent.delivered()
            .await
            .inspect_err(|_| self.metrics.kafka_produce_errors.inc())?;
        self.metrics
            .publish_to_kafka_seconds
            .observe(started.elapsed().as_secs_f64());
        if msg.retain {
            self.retained.apply(msg);
        }
        Ok(())
    }

    /// Enqueues the Kafka writes of a message and returns their delivery reports.
    pub async fn send(
        &self,
        msg: &Message,
        flow: Option<Qos2Flow>,
        lane: kafka::Lane,
    ) -> Result<kafka::Sent, kafka::ProduceError> {
        self.lanes.count(std::time::Instant::now(), lane);
        let (to, record, retained) = self.records_of(msg, flow);
        let record = self.write(lane, &to.topic, record).await?;
        to.published.inc();
        let retained = match retained {
            Some(r) => {
                let retained_topic = self.config.kafka.retained_topic.as_str();
                Some(self.write(lane, &Arc::from(retained_topic), r).await?)
            }
            None => None,
        };
        Ok(kafka::Sent { record, retained })
    }

    /// `send` without waiting, for the node's own producer while it has
    /// room: `None` when the write must wait (or takes librdkafka's path,
    /// or has a retained record too), and `send` is then the way.
    pub fn try_send(
        &self,
        msg: &Message,
        flow: Option<Qos2Flow>,
        lane: kafka::Lane,
    ) -> Option<Result<kafka::Sent, kafka::ProduceError>> {
        let own = self.own.as_ref().filter(|_| !msg.retain)?;
        let (to, record, _) = self.records_of(msg, flow);
        let sent = own.try_send(to.topic.clone(), record, lane == kafka::Lane::Batch)?;
        self.lanes.count(std::time::Instant::now(), lane);
        if sent.is_ok() {
            to.published.inc();
        }
        Some(sent.map(|record| kafka::Sent {
            record,
            retained: None,
        }))
    }

    /// A message's Kafka records: its mapped topic and record, and the
    /// retained topic's record when RETAIN is set.
    fn records_of(
        &self,
        msg: &Message,
        flow: Option<Qos2Flow>,
    ) -> (
        &Destination,
        kafka::produce::request::OutRecord,
        Option<kafka::produce::request::OutRecord>,
    ) {
        use kafka::produce::request::OutRecord;
        let (at, key) = self.mapping.destination_index(&msg.topic);
        let mut headers = msg.to_headers();
        if let Some(f) = flow {
            f.push_headers(&mut headers);
        }
        // An empty retained payload is a tombstone: compaction deletes the
        // key. Its headers are the message's: a copy only then.
        let retained = msg.retain.then(|| OutRecord {
            key: Some(bytes::Bytes::copy_from_slice(msg.topic.as_bytes())),
            value: (!msg.payload.is_empty()).then(|| msg.payload.clone()),
            headers: headers.clone(),
            timestamp_ms: msg.timestamp_ms,
        });
        let mut record = OutRecord {
            key: Some(bytes::Bytes::copy_from_slice(key.as_bytes())),
            value: Some(msg.payload.clone()),
            headers,
            timestamp_ms: msg.timestamp_ms,
        };
        if *key != *msg.topic {
            // A key template made the key: the topic travels in a header.
            let topic_header = bytes::Bytes::copy_from_slice(msg.topic.as_bytes());
            record
                .headers
                .push((crate::message::H_TOPIC.into(), topic_header));
        }
        // One destination per rule and one for the default topic.
        (&self.destinations[at], record, retained)
    }

    /// Hands one record to the node's message producer: the own producer
    /// (a batch-lane record may wait up to the linger for company, a
    /// fast-lane one goes at once), or librdkafka's lane.
    async fn write(
        &self,
        lane: kafka::Lane,
        topic: &Arc<str>,
        record: kafka::produce::request::OutRecord,
    ) -> Result<kafka::DeliveryFuture, kafka::ProduceError> {
        if let Some(own) = &self.own {
            return own
                .send(topic.clone(), record, lane == kafka::Lane::Batch)
                .await;
        }
        let producer = match (lane, &self.fast_producer) {
            (kafka::Lane::Fast, Some(fast)) => fast,
            _ => &self.producer,
        };
        producer.send_record(topic, &record).await
    }

    /// Publishes a Last Will now, retrying while Kafka is unavailable: a will
    /// is a message the client was promised.
    pub async fn publish_will(&self, client_id: &str, will: LastWill) {
        let msg = Arc::new(Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: Message::forwardable_properties(&will.properties),
            publisher: Some(bytes::Bytes::copy_from_slice(client_id.as_bytes())),
            timestamp_ms: now_ms(),
        });
        // 10 tries over about a minute; a give-up is logged and counted.
        let retry = Retry::fixed("will", 10, Duration::ZERO, &self.metrics.retry_give_ups)
            .backoff(Duration::from_secs(1), Duration::from_secs(10));
        if retry
            .run(client_id, || self.publish(msg.clone()))
            .await
            .is_ok()
        {
            tracing::debug!(client_id, topic = %msg.topic, "will published");
        }
    }

    /// Removes every subscription of a session from the index.
    pub fn drop_subscriptions(&self, session: &Session) {
        for filter in session.subscriptions.keys() {
            let (key, inner) = sub_key(&session.client_id, filter);
            if self.subs.remove(inner, &key) {
                self.metrics.subscriptions.dec();
            }
        }
    }

    /// Ends a session for good.
    pub fn discard_session(&self, session: Box<Session>) {
        self.drop_subscriptions(&session);
    }

    /// Writes a session record and waits for Kafka; then this node's view
    /// has it too (read-your-writes).
    pub async fn persist(&self, rec: SessionRecord) -> Result<(), kafka::ProduceError> {
        let value = rec.encode();
        self.control_producer
            .send_and_wait(
                &self.config.kafka.sessions_topic,
                rec.client_id.as_bytes(),
                Some(&value),
                &[],
            )
            .await?;
        let id = rec.client_id.clone();
        self.store.apply(&id, rec);
        Ok(())
    }

    /// Waits until this node's view of the sessions topic holds every
    /// record Kafka acknowledged before the call, from any node
    /// (read-your-writes for the next CONNECT's claim).
    pub async fn sessions_current(&self) -> Result<(), crate::session::high_watermarks::ViewError> {
        const VIEW_WAIT: Duration = Duration::from_secs(10);
        let marks = self
            .sessions_marks
            .after(std::time::Instant::now(), &self.control_producer)
            .await?;
        tokio::time::timeout(VIEW_WAIT, self.store.wait_read(&marks))
            .await
            .map_err(|_| crate::session::high_watermarks::ViewError::Behind(VIEW_WAIT))
    }

    /// Persists in the background, retrying while Kafka is unavailable, as
    /// long as no newer claim exists (a late write would otherwise land
    /// after that claim, and compaction keeps the last write). A give-up is
    /// logged as an error and counted.
    pub fn persist_later(self: &Arc<Self>, rec: SessionRecord) {
        let node = self.clone();
        // 10 tries over about a minute; a give-up is logged and counted
        // (`retry_give_ups_total{what="session_write"}` and
        // `session_writes_abandoned_total`): the session then resumes from
        // its last persisted state.
        let retry = Retry::fixed(
            "session_write",
            10,
            Duration::ZERO,
            &self.metrics.retry_give_ups,
        )
        .backoff(Duration::from_secs(1), Duration::from_secs(10));
        tokio::spawn(async move {
            let written = retry
                .run(&rec.client_id, || async {
                    // A late retry must not land after a newer claim.
                    if node.store.superseded(&rec.client_id, rec.epoch) {
                        tracing::info!(client_id = %rec.client_id, epoch = rec.epoch, "session claimed again meanwhile; older state not written");
                        return Ok(());
                    }
                    node.persist(rec.clone()).await
                })
                .await;
            if written.is_err() {
                node.metrics.session_writes_abandoned.inc();
            }
        });
    }

    /// Deletes a session record, unless a newer claim exists. The tombstone
    /// carries the ended epoch, so records of the session still in flight
    /// stay fenced after it (`session::ended`).
    pub async fn tombstone(&self, client_id: &str, epoch: u64) {
        // A claim another node wrote before now must be seen by the check
        // below; when the view cannot be made current, the check runs on
        // what it has.
        if let Err(e) = self.sessions_current().await {
            tracing::debug!(client_id, error = %e, "sessions view not current before tombstone");
        }
        if self
            .store
            .summary(client_id)
            .is_some_and(|r| r.epoch > epoch)
        {
            return;
        }
        let header = (
            crate::session::store::EPOCH_HEADER.to_string(),
            epoch.to_string().into_bytes(),
        );
        match self
            .control_producer
            .send_and_wait(
                &self.config.kafka.sessions_topic,
                client_id.as_bytes(),
                None,
                &[header],
            )
            .await
        {
            Ok(_) => {
                self.store.apply_end(client_id, Some(epoch));
            }
            Err(e) => tracing::warn!(client_id, error = %e, "deleting session record failed"),
        }
    }

    /// Removes a published delayed will from the offline session's record
    /// (same epoch only), so nobody publishes it again.
    pub async fn will_published(&self, client_id: &str, epoch: u64) {
        let Some(mut r) = self.store.get(client_id) else {
            return;
        };
        if r.epoch != epoch || r.online || r.will.is_none() {
            return;
        }
        r.will = None;
        if let Err(e) = self.persist(r).await {
            // Worst case a survivor publishes the will a second time.
            tracing::warn!(client_id, error = %e, "could not clear a published will");
        }
    }

    /// Graceful shutdown: v5 clients get DISCONNECT 0x8B, then Kafka is flushed.
    pub async fn shutdown(&self, grace: Duration) {
        // Stored even with no receiver yet: one made later must see it.
        self.shutdown_tx.send_replace(true);
        for ctrl in self.registry.connected() {
            let _ = ctrl.try_send(Control::Close(ReasonCode::ServerShuttingDown));
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.open_connections.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let producers: Vec<Producer> = std::iter::once(self.producer.clone())
            .chain(self.fast_producer.clone())
            .collect();
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(1));
        if let Some(own) = &self.own {
            own.flush(left).await;
        }
        let control = self.control_producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for p in producers {
                let _ = p.flush(left);
            }
            control.flush(Duration::from_secs(1))
        })
        .await;
    }
}

impl crate::session::cluster::Member for Node {
    fn node_id(&self) -> &str {
        &self.config.node_id
    }

    fn kafka(&self) -> &crate::config::KafkaConfig {
        &self.config.kafka
    }

    fn shutting_down(&self) -> watch::Receiver<bool> {
        shutdown_receiver(&self.shutdown_tx)
    }

    fn live_nodes(&self, timeout: Duration) -> Vec<String> {
        self.liveness.live(timeout)
    }

    fn sessions(&self) -> &SessionStore {
        &self.store
    }

    fn holds(&self, client_id: &str) -> bool {
        self.registry.contains(client_id)
    }

    async fn write_heartbeat(&self, value: Vec<u8>) -> Result<(), kafka::ProduceError> {
        self.control_producer
            .send_and_wait(
                &self.config.kafka.nodes_topic,
                self.config.node_id.as_bytes(),
                Some(&value),
                &[],
            )
            .await
            .map(|_| ())
    }

    async fn persist(&self, rec: SessionRecord) -> Result<(), kafka::ProduceError> {
        Node::persist(self, rec).await
    }

    async fn tombstone(&self, client_id: &str, epoch: u64) {
        Node::tombstone(self, client_id, epoch).await
    }

    async fn publish_will(&self, client_id: &str, will: LastWill) {
        Node::publish_will(self, client_id, will).await
    }

    async fn will_published(&self, client_id: &str, epoch: u64) {
        Node::will_published(self, client_id, epoch).await
    }
}

/// Reads the sessions topic into a new view, up to the high watermarks
/// (at most 120 s), and keeps reading it; claims of other nodes kick this
/// node's connections that hold an older epoch.
async fn load_sessions(
    kcfg: &crate::config::KafkaConfig,
    node_id: &str,
    registry: Arc<Registry>,
    metrics: &Metrics,
) -> anyhow::Result<(
    Arc<SessionStore>,
    TopicReader,
    crate::session::high_watermarks::HighWatermarks,
)> {
    let store = Arc::new(SessionStore::new(node_id));
    let (st, reg) = (store.clone(), registry);
    let loaded_at = std::time::Instant::now();
    let (sessions_reader, caught_up, starts) = kafka::TopicReader::start(
        kcfg,
        node_id,
        &kcfg.sessions_topic,
        kafka::StartAt::Beginning,
        metrics,
        move |m, _| {
            let rec = Record::copy_of(m);
            if let Applied::ForeignClaim { client_id, epoch } = st.apply_record(&rec) {
                reg.kick_remote(&client_id, epoch);
            }
            st.read_up_to(rec.partition, rec.offset + 1);
        },
    )
    .await
    .context("reading the sessions topic")?;
    for (&partition, &start) in &starts {
        store.read_up_to(partition, start);
    }
    let sessions_marks = crate::session::high_watermarks::HighWatermarks::new(
        &kcfg.sessions_topic,
        starts.keys().copied().collect(),
    );
    if tokio::time::timeout(Duration::from_secs(120), caught_up)
        .await
        .is_err()
    {
        tracing::warn!("sessions not fully loaded after 120 s; serving what is loaded");
    }
    tracing::info!(sessions = store.len(), elapsed = ?loaded_at.elapsed(), "sessions loaded");
    Ok((store, sessions_reader, sessions_marks))
}

/// The Kafka topics a node writes: every mapped topic, and the compacted
/// retained, sessions and nodes topics.
fn topic_specs(
    mapping: &Mapping,
    kcfg: &crate::config::KafkaConfig,
) -> Vec<kafka::admin::TopicSpec> {
    let mut topics: Vec<kafka::admin::TopicSpec> = mapping
        .all_kafka_topics()
        .into_iter()
        .map(|t| kafka::admin::TopicSpec {
            name: t.to_string(),
            compacted: false,
        })
        .collect();
    for name in [
        &kcfg.retained_topic,
        &kcfg.sessions_topic,
        &kcfg.nodes_topic,
    ] {
        topics.push(kafka::admin::TopicSpec {
            name: name.clone(),
            compacted: true,
        });
    }
    topics
}

/// A receiver of the shutdown flag whose `changed()` resolves at once when
/// shutdown has already begun: a connection that registers after
/// `Node::shutdown` sent its Close requests would otherwise wait for a
/// change that never comes, and miss its DISCONNECT 0x8B.
fn shutdown_receiver(tx: &watch::Sender<bool>) -> watch::Receiver<bool> {
    let mut rx = tx.subscribe();
    if *rx.borrow() {
        rx.mark_changed();
    }
    rx
}

/// The own producer when `kafka.own_producer` asks for it and Kafka is
/// reached over plaintext (it speaks neither TLS nor SASL: librdkafka
/// writes then, as before).
fn own_producer(
    kcfg: &crate::config::KafkaConfig,
    node_id: &str,
) -> Option<kafka::produce::own::OwnProducer> {
    if !kcfg.own_producer {
        return None;
    }
    if !kafka::fetch::plaintext(kcfg) {
        tracing::warn!("kafka.own_producer needs plaintext Kafka; librdkafka writes instead");
        return None;
    }
    let ms = |v: u32| Duration::from_millis(u64::from(v));
    let cfg = kafka::produce::sender::SenderConfig {
        delivery_timeout: ms(kcfg.delivery_timeout_ms),
        max_batch_records: 10_000,
        retry_backoff: Duration::from_millis(100),
        linger: ms(kcfg.linger_ms),
        // As librdkafka's queue here (`queue.buffering.max.kbytes`).
        max_bytes: 128 << 20,
        request_timeout: Duration::from_secs(30),
    };
    let client_id = format!("lodestream-{node_id}");
    Some(kafka::produce::own::OwnProducer::spawn(
        &kcfg.bootstrap_servers,
        &client_id,
        cfg,
    ))
}

/// A producer of the node (`role`: its name) that sends each record at once.
///
/// The control producer of session records, claims and tombstones is one:
/// they are few and small, and their latency is the window a node's death
/// re-delivers (issue #18) and part of every CONNACK.
fn lingerless_producer(
    kcfg: &crate::config::KafkaConfig,
    node_id: &str,
    role: &str,
    max_in_flight: u32,
) -> anyhow::Result<Producer> {
    let cfg = crate::config::KafkaConfig {
        linger_ms: 0,
        max_in_flight,
        ..kcfg.clone()
    };
    Producer::new(&cfg, &format!("{node_id}-{role}"))
        .with_context(|| format!("creating the Kafka {role} producer"))
}

/// Every 10 s, sets `lodestream_kafka_consumer_lag{topic}`: how far this
/// node's fan-out readers are behind the end of each Kafka topic.
pub async fn report_consumer_lag(node: Arc<Node>) {
    let mut shutdown = node.shutting_down();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let topics: Vec<String> = node.readers.lock().await.keys().cloned().collect();
        let n = node.clone();
        let lags = tokio::task::spawn_blocking(move || {
            topics
                .iter()
                .map(|t| {
                    let lag: i64 = n
                        .subs
                        .positions_of(&[t.as_str()])
                        .iter()
                        .filter_map(|((_, p), pos)| {
                            n.producer
                                .watermarks(t, *p)
                                .map(|(_, high)| (high - pos).max(0))
                        })
                        .sum();
                    (t.clone(), lag)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (t, lag) in lags {
            node.metrics.consumer_lag.with_label_values(&[&t]).set(lag);
        }
    }
}

/// A session's subscriptions as index entries: (inner filter, key, entry).
pub fn index_entries(session: &Session) -> Vec<(String, SubKey, crate::subscriptions::SubEntry)> {
    session
        .subscriptions
        .iter()
        // Shared subscriptions are Kafka consumer-group members, not
        // fan-out entries (`kafka/share_group.rs`).
        .filter(|(filter, _)| !filter.starts_with(lodestream_mqtt::topic::SHARE_PREFIX))
        .map(|(filter, sub)| {
            let (key, inner) = sub_key(&session.client_id, filter);
            let entry = crate::subscriptions::SubEntry::new(
                sub.options.clone(),
                sub.identifier,
                session.mailbox.clone(),
            );
            (inner.to_string(), key, entry)
        })
        .collect()
}

/// Trie key and inner filter of a subscription as the client wrote it.
pub fn sub_key<'a>(client_id: &Arc<str>, filter: &'a str) -> (SubKey, &'a str) {
    match filter
        .strip_prefix(lodestream_mqtt::topic::SHARE_PREFIX)
        .and_then(|rest| rest.split_once('/'))
    {
        Some((group, inner)) => (
            SubKey {
                client_id: client_id.clone(),
                share_group: Some(Arc::from(group)),
            },
            inner,
        ),
        None => (
            SubKey {
                client_id: client_id.clone(),
                share_group: None,
            },
            filter,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_receiver_made_after_shutdown_began_sees_it_at_once() {
        let (tx, _) = watch::channel(false);
        let mut before = shutdown_receiver(&tx);
        tx.send_replace(true);
        let mut after = shutdown_receiver(&tx);
        let at_once = Duration::from_millis(100);
        for rx in [&mut before, &mut after] {
            let changed = tokio::time::timeout(at_once, rx.changed()).await;
            assert!(matches!(changed, Ok(Ok(()))), "changed() must resolve");
            assert!(*rx.borrow());
        }
    }

    #[tokio::test]
    async fn shutdown_with_no_receiver_yet_is_seen_by_the_next_one() {
        let (tx, rx) = watch::channel(false);
        drop(rx);
        tx.send_replace(true);
        let mut later = shutdown_receiver(&tx);
        let changed = tokio::time::timeout(Duration::from_millis(100), later.changed()).await;
        assert!(matches!(changed, Ok(Ok(()))), "changed() must resolve");
        assert!(*later.borrow());
    }

    #[tokio::test]
    async fn before_shutdown_a_receiver_waits() {
        let (tx, _) = watch::channel(false);
        let mut rx = shutdown_receiver(&tx);
        let waited = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
        assert!(waited.is_err(), "no shutdown, no change");
    }
}
