//! rdkafka clients.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::config::{KafkaConfig, StartFrom};

/// Kafka failures, with the topic they concern.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// Client creation or a request failed.
    #[error("kafka {what}: {source}")]
    Client {
        /// What we were doing.
        what: String,
        /// The client error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The topic does not exist (or has no partitions).
    #[error("topic {0} not found on the broker")]
    UnknownTopic(String),
    /// A helper thread could not start.
    #[error("starting a Kafka helper thread: {0}")]
    Thread(String),
    /// Topic creation failed.
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        /// Topic.
        topic: String,
        /// Broker's answer.
        code: RDKafkaErrorCode,
    },
}

pub(super) fn client_error(
    what: impl Into<String>,
) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError {
    let what = what.into();
    move |source| KafkaError::Client { what, source }
}

pub(super) fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Turns the client's periodic statistics into the consumer-lag gauge (served on `poll`), and
/// its connection errors into the source's degraded flag.
pub struct LagContext {
    topic: String,
    /// Set on a transport error; cleared when a broker is up again or a record arrives.
    disconnected: std::sync::atomic::AtomicBool,
}

impl LagContext {
    fn reconnected(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        // Load first: this runs for every record, and a swap would write each time.
        if self.disconnected.load(Relaxed) && self.disconnected.swap(false, Relaxed) {
            crate::metrics::SourceReconnected { topic: &self.topic }.emit();
        }
    }
}

impl rdkafka::ClientContext for LagContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        // Only "all brokers down" degrades the source: a single connection closing (an idle
        // timeout, one broker of several restarting) is routine and reconnects by itself.
        let code = error.rdkafka_error_code();
        if code == Some(Code::BrokerTransportFailure) {
            tracing::debug!(topic = %self.topic, reason, "kafka connection closed; reconnecting");
        } else if code == Some(Code::AllBrokersDown) {
            if !self
                .disconnected
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                crate::metrics::SourceDisconnected {
                    topic: &self.topic,
                    error: &reason,
                }
                .emit();
            }
        } else {
            tracing::warn!(topic = %self.topic, error = %error, reason, "kafka client error");
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        // Bootstrap entries have node id -1; a real broker in state UP means we are back.
        if statistics
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP")
        {
            self.reconnected();
        }
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // librdkafka's own `consumer_lag` is measured from committed offsets, which we
                // never commit to the broker (offsets live with the sink data): use the
                // application's position instead. -1: the internal unassigned partition;
                // negative offsets: not known yet.
                if *partition >= 0 && p.hi_offset >= 0 && p.app_offset >= 0 {
                    crate::metrics::ConsumerLag {
                        topic,
                        partition: *partition,
                        lag: (p.hi_offset - p.app_offset).max(0),
                    }
                    .emit();
                }
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

/// A consumer for explicitly assigned partitions of one topic; never joins a group.
pub struct PartitionReader {
    consumer: BaseConsumer<LagContext>,
    topic: String,
}

/// Creates an unassigned reader for `topic`.
pub fn reader(
    cfg: &KafkaConfig,
    topic: &str,
    client_id: &str,
) -> Result<PartitionReader, KafkaError> {
    let consumer: BaseConsumer<LagContext> = reader_config(cfg, client_id)
        .create_with_context(LagContext {
            topic: topic.to_owned(),
            disconnected: false.into(),
        })
        .map_err(client_error(format!("creating consumer for {topic}")))?;
    Ok(PartitionReader {
        consumer,
        topic: topic.to_owned(),
    })
}

/// The librdkafka properties that tune a reader's fetching; `[kafka.properties]` may set each.
const READER_TUNING: [&str; 6] = [
    "queued.max.messages.kbytes",
    "fetch.max.bytes",
    "message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.queue.backoff.ms",
    "fetch.wait.max.ms",
];

fn reader_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = base_config(cfg);
    // Never joined nor committed by this client: see `group` for the group's positions.
    c.set("group.id", &cfg.consumer_group)
        .set("client.id", client_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Partitions without a stored position are assigned at the logical beginning or end;
        // a stored position the broker does not have (a recreated topic, a truncation) is an
        // error to report, never a silent jump.
        .set("auto.offset.reset", "error")
        // Keep the local prefetch queue and each fetch modest: backpressure stops polling, and
        // unbounded prefetch would turn that into memory growth while catching up.
        .set(
            "queued.max.messages.kbytes",
            cfg.queue_max_kbytes.to_string(),
        )
        .set("fetch.max.bytes", cfg.fetch_max_bytes.to_string())
        // librdkafka refuses a `fetch.max.bytes` below `message.max.bytes` (default 1,000,000).
        .set(
            "message.max.bytes",
            cfg.fetch_max_bytes.min(1_000_000).to_string(),
        )
        .set(
            "max.partition.fetch.bytes",
            cfg.fetch_max_bytes.min(1 << 20).to_string(),
        )
        // When a fetch response overfills the local queue (brokers may answer with more than
        // a partition's limit: Tansu sends about `fetch.max.bytes` per partition), librdkafka
        // waits this long before fetching that partition again; its default of one second
        // left the reader idle most of the time while catching up a backlog.
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.wait.max.ms", "50")
        .set("statistics.interval.ms", "5000");
    // A tuning property set by hand under `[kafka.properties]` still wins.
    for key in READER_TUNING {
        if let Some(v) = cfg.properties.get(key) {
            c.set(key, v);
        }
    }
    c
}

/// High watermarks of a watcher's partitions, from its client's statistics.
#[derive(Default)]
struct HighWatermarks(std::sync::Mutex<std::collections::HashMap<i32, i64>>);

impl rdkafka::ClientContext for HighWatermarks {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Ok(mut known) = self.0.lock() {
            for t in statistics.topics.values() {
                for (partition, p) in &t.partitions {
                    if *partition >= 0 && p.hi_offset >= 0 {
                        known.insert(*partition, p.hi_offset);
                    }
                }
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for HighWatermarks {}

/// Reports consumer lag of partitions that are assigned but not read (a paused start): while
/// `while_set` is set, every `interval`, the broker's high watermark of each partition minus
/// its position (the stored resume offset, or the low watermark for partitions that start
/// from the earliest record). A paused source does not poll its consumer, so its statistics
/// say nothing. The watcher is a second client that fetches from the end of each partition
/// (discarding what it gets) and takes the high watermark from the fetch responses: brokers
/// answer fetches with it, and some (Tansu 0.6) answer `ListOffsets(latest)` with the last
/// batch's base offset + 1 instead. It runs on its own thread: its calls block.
pub fn watch_paused_lag(
    cfg: &KafkaConfig,
    topic: &str,
    positions: Vec<(i32, Option<i64>)>,
    interval: Duration,
    while_set: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, KafkaError> {
    let mut c = base_config(cfg);
    c.set("group.id", "primespark-lag")
        .set("client.id", "primespark-lag")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("queued.max.messages.kbytes", "1024")
        .set("fetch.wait.max.ms", "100")
        .set("statistics.interval.ms", "1000");
    let consumer: BaseConsumer<HighWatermarks> =
        c.create_with_context(HighWatermarks::default())
            .map_err(client_error(format!("creating lag watcher for {topic}")))?;
    let mut tpl = TopicPartitionList::new();
    for (p, _) in &positions {
        tpl.add_partition_offset(topic, *p, Offset::End)
            .map_err(client_error(format!(
                "assigning {topic}/{p} to the lag watcher"
            )))?;
    }
    consumer.assign(&tpl).map_err(client_error(format!(
        "assigning {topic} to the lag watcher"
    )))?;
    let start = cfg.start;
    let topic = topic.to_owned();
    std::thread::Builder::new()
        .name("primespark-lag".into())
        .spawn(move || {
            use std::sync::atomic::Ordering;
            let mut next_report = std::time::Instant::now();
            while while_set.load(Ordering::Relaxed) {
                // Serves the statistics callback; fetched records are not ours to read.
                let _ = consumer.poll(Duration::from_millis(100));
                if std::time::Instant::now() < next_report {
                    continue;
                }
                next_report = std::time::Instant::now() + interval;
                let known = consumer
                    .context()
                    .0
                    .lock()
                    .map(|k| k.clone())
                    .unwrap_or_default();
                for (partition, position) in &positions {
                    let Some(&high) = known.get(partition) else {
                        continue;
                    };
                    let position = match (position, start) {
                        (Some(p), _) => *p,
                        (None, StartFrom::Latest) => high,
                        (None, StartFrom::Earliest) => match consumer.fetch_watermarks(
                            &topic,
                            *partition,
                            Duration::from_secs(5),
                        ) {
                            Ok((low, _)) => low,
                            Err(e) => {
                                tracing::warn!(topic = %topic, partition, error = %e, "reading the low watermark failed");
                                continue;
                            }
                        },
                    };
                    crate::metrics::ConsumerLag {
                        topic: &topic,
                        partition: *partition,
                        lag: (high - position).max(0),
                    }
                    .emit();
                }
            }
        })
        .map_err(|e| KafkaError::Thread(e.to_string()))
}

impl PartitionReader {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition ids of the topic (blocking metadata request: not for a worker thread).
    pub fn partitions(&self, timeout: Duration) -> Result<Vec<i32>, KafkaError> {
        partition_ids(&self.consumer, &self.topic, timeout)
    }

    /// Partition ids of the topic from the cluster's whole topic list (`None`: the topic is
    /// not there). Blocking. Asking for every topic rather than this one is deliberate: for a
    /// topic just deleted, some brokers (Tansu 0.6) answer a by-name request with an entry
    /// librdkafka 2.12 crashes on.
    pub fn listed_partitions(&self, timeout: Duration) -> Result<Option<Vec<i32>>, KafkaError> {
        let md = self
            .consumer
            .fetch_metadata(None, timeout)
            .map_err(client_error(format!("metadata of {}", self.topic)))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map(|t| {
                let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                ids.sort_unstable();
                ids
            }))
    }

    /// Assigns `partitions`, each with the offset to start from (`None`: the configured start).
    pub fn assign(&self, partitions: &[(i32, Option<i64>, StartFrom)]) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (p, offset, start) in partitions {
            let offset = match (offset, start) {
                (Some(o), _) => Offset::Offset(*o),
                (None, StartFrom::Earliest) => Offset::Beginning,
                (None, StartFrom::Latest) => Offset::End,
            };
            tpl.add_partition_offset(&self.topic, *p, offset)
                .map_err(client_error(format!("assigning {}:{p}", self.topic)))?;
        }
        self.consumer.assign(&tpl).map_err(client_error(format!(
            "assigning partitions of {}",
            self.topic
        )))
    }

    /// Polls without blocking.
    pub fn poll(
        &self,
    ) -> Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>> {
        let polled = self.consumer.poll(Duration::ZERO);
        if matches!(polled, Some(Ok(_))) {
            self.consumer.context().reconnected();
        }
        polled
    }

    /// Whether the broker serves the record at `offset` of `partition` within `timeout`
    /// (blocking; assigns this reader to that partition alone).
    pub fn holds(
        &self,
        partition: i32,
        offset: i64,
        timeout: Duration,
    ) -> Result<bool, KafkaError> {
        use rdkafka::Message;
        self.assign(&[(partition, Some(offset), StartFrom::Earliest)])?;
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) if m.partition() == partition => return Ok(m.offset() == offset),
                Some(Err(rdkafka::error::KafkaError::MessageConsumption(
                    RDKafkaErrorCode::AutoOffsetReset,
                ))) => return Ok(false),
                _ => {}
            }
        }
        Ok(false)
    }

    /// Low and high watermarks of a partition (blocking; not for worker threads' hot path).
    pub fn watermarks(&self, partition: i32, timeout: Duration) -> Result<(i64, i64), KafkaError> {
        self.consumer
            .fetch_watermarks(&self.topic, partition, timeout)
            .map_err(client_error(format!(
                "watermarks of {}:{partition}",
                self.topic
            )))
    }
}

impl primespark_schemas::flow::Feed for PartitionReader {
    fn poll(&mut self) -> primespark_schemas::flow::Polled {
        use primespark_schemas::flow::Polled;
        use rdkafka::Message;
        match PartitionReader::poll(self) {
            None => Polled::Empty,
            Some(Ok(msg)) => Polled::Payload {
                partition: msg.partition(),
                offset: msg.offset(),
                payload: msg.payload().unwrap_or_default().to_vec(),
            },
            Some(Err(rdkafka::error::KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset,
            ))) => {
                crate::metrics::SourcePositionLost {
                    topic: self.topic(),
                    error: &"the stored position is outside the partition's offsets",
                }
                .emit();
                Polled::Empty
            }
            Some(Err(e)) => {
                tracing::warn!(topic = self.topic(), error = %e, "kafka poll error");
                Polled::Empty
            }
        }
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }
}

/// Partition ids of `topic`.
pub fn partition_ids<X: rdkafka::consumer::ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, KafkaError> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(client_error(format!("metadata of {topic}")))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| KafkaError::UnknownTopic(topic.to_owned()))?;
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(KafkaError::UnknownTopic(topic.to_owned()));
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// A producer (for the synthetic fleet, tests and dead-letter topics).
pub fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    let mut c = base_config(cfg);
    c.set("linger.ms", "5").set("message.timeout.ms", "30000");
    c.create().map_err(client_error("creating producer"))
}

/// The dead-letter topic of `topic`.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// One dead letter for `<topic>.dlq`.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterMessage<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition (also the DLQ partition, so a partition's letters stay in order).
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Stable reason code.
    pub reason: &'a str,
    /// The error, naming the field.
    pub error: &'a str,
    /// The original bytes.
    pub payload: &'a [u8],
}

/// Publishes dead letters to `<topic>.dlq` and waits for the broker to acknowledge each. The
/// key is `<partition>:<offset>` of the source record: after a crash a letter may be published
/// again (its offset was not committed yet), with the same key and headers, so consumers can
/// drop the repeat.
pub async fn publish_dead_letters(
    producer: &FutureProducer,
    letters: &[DeadLetterMessage<'_>],
    dlq_partitions: i32,
) -> Result<(), KafkaError> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let now = chrono::Utc::now().to_rfc3339();
    let sends = letters.iter().map(|l| {
        let dlq = dlq_topic(l.topic);
        let key = format!("{}:{}", l.partition, l.offset);
        let (partition, offset) = (l.partition.to_string(), l.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "primespark.reason",
                value: Some(l.reason),
            })
            .insert(Header {
                key: "primespark.error",
                value: Some(l.error),
            })
            .insert(Header {
                key: "primespark.topic",
                value: Some(l.topic),
            })
            .insert(Header {
                key: "primespark.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "primespark.offset",
                value: Some(&offset),
            })
            .insert(Header {
                key: "primespark.received_at",
                value: Some(&now),
            });
        // Same partition as the record while the topic has it; a partition added to the source
        // after the dead-letter topic could not grow goes to one that exists (its headers and
        // key still name the record), never to one the broker refuses forever.
        let to = if l.partition < dlq_partitions {
            l.partition
        } else {
            l.partition.rem_euclid(dlq_partitions.max(1))
        };
        let record = FutureRecord::to(&dlq)
            .partition(to)
            .key(&key)
            .payload(l.payload)
            .headers(headers);
        let sent = producer
            .send_result(record)
            .map_err(|(e, _)| KafkaError::Client {
                what: format!("queueing dead letter {key} for {dlq}"),
                source: e,
            });
        async move {
            sent?
                .await
                .map_err(|_| KafkaError::Client {
                    what: format!("dead letter {key} for {dlq}"),
                    source: rdkafka::error::KafkaError::Canceled,
                })?
                .map_err(|(e, _)| KafkaError::Client {
                    what: format!("publishing dead letter {key} to {dlq}"),
                    source: e,
                })
                .map(|_| ())
        }
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }
    Ok(())
}

/// Creates topics that do not exist yet, and grows existing ones that have fewer partitions
/// than asked (a dead-letter topic whose source gained partitions). Returns each topic's
/// partition count afterwards.
///
/// Topics that exist with enough partitions are not asked for at all, so brokers without the
/// admin API (rdkafka's mock cluster, under `primespark demo`) work when the topics were made
/// beforehand. A broker that refuses to grow a topic leaves it as it is, with a warning.
pub async fn create_topics(
    cfg: &KafkaConfig,
    topics: &[(&str, i32)],
) -> Result<Vec<i32>, KafkaError> {
    let probe: BaseConsumer = base_config(cfg)
        .create()
        .map_err(client_error("creating metadata client"))?;
    let existing: Vec<Option<i32>> = topics
        .iter()
        .map(|(name, _)| {
            partition_ids(&probe, name, Duration::from_secs(5))
                .ok()
                .map(|ids| i32::try_from(ids.len()).unwrap_or(i32::MAX))
        })
        .collect();
    // (index, name, partitions now, partitions wanted) of topics to grow.
    let short: Vec<(usize, &str, i32, i32)> = topics
        .iter()
        .zip(&existing)
        .enumerate()
        .filter_map(|(i, ((name, want), have))| {
            have.filter(|h| h < want).map(|h| (i, *name, h, *want))
        })
        .collect();
    let missing: Vec<&(&str, i32)> = topics
        .iter()
        .zip(&existing)
        .filter(|(_, have)| have.is_none())
        .map(|(t, _)| t)
        .collect();
    let mut counts: Vec<i32> = topics
        .iter()
        .zip(&existing)
        .map(|((_, want), have)| have.unwrap_or(*want))
        .collect();
    if missing.is_empty() && short.is_empty() {
        return Ok(counts);
    }
    let admin: AdminClient<DefaultClientContext> = base_config(cfg)
        .create()
        .map_err(client_error("creating admin client"))?;
    for &(i, name, have, want) in &short {
        let grown = admin
            .create_partitions(
                &[rdkafka::admin::NewPartitions::new(
                    name,
                    usize::try_from(want).unwrap_or(1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await;
        match grown.as_deref() {
            Ok([Ok(_)]) => {
                tracing::info!(
                    topic = name,
                    from = have,
                    to = want,
                    "topic grown to its source's partitions"
                );
                counts[i] = want;
            }
            // `counts` keeps what the topic has.
            other => {
                tracing::warn!(topic = name, have, want, result = ?other.map(|r| r.len()), "could not grow the topic: records of the newer partitions go to existing ones");
            }
        }
    }
    if missing.is_empty() {
        return Ok(counts);
    }
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(client_error("creating topics"))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaError::CreateTopic { topic, code }),
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_refetches_soon_after_a_full_queue_unless_told_otherwise() {
        let cfg = KafkaConfig::default();
        let c = reader_config(&cfg, "test");
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(c.get("fetch.wait.max.ms"), Some("50"));
        assert_eq!(c.get("auto.offset.reset"), Some("error"));

        let mut cfg = KafkaConfig::default();
        for (k, v) in [
            ("fetch.queue.backoff.ms", "250"),
            ("fetch.wait.max.ms", "5"),
            ("queued.max.messages.kbytes", "4096"),
        ] {
            cfg.properties.insert(k.into(), v.into());
        }
        cfg.validate().unwrap();
        let c = reader_config(&cfg, "test");
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("250"));
        assert_eq!(c.get("fetch.wait.max.ms"), Some("5"));
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("4096"));
        // librdkafka accepts the combination.
        assert!(reader(&cfg, "t", "test").is_ok());
    }

    #[test]
    fn positions_are_never_reset_or_stored_by_hand() {
        for key in ["auto.offset.reset", "enable.auto.offset.store"] {
            let mut cfg = KafkaConfig::default();
            cfg.properties.insert(key.into(), "earliest".into());
            let err = cfg.validate().unwrap_err();
            assert_eq!(err.key, format!("kafka.properties.{key}"));
        }
    }
}
