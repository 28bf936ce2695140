//! The positions the sinks committed, also committed to a Kafka consumer group, so that the
//! broker's own tooling (`kafka-consumer-groups --describe`, kafka-exporter's
//! `kafka_consumergroup_lag`, Burrow, Kafka UIs) sees the pipeline and its lag per partition.
//!
//! For monitoring only: primespark resumes from the positions its sinks store with the data
//! (`source_offsets`, the archive's roll names), never from the group, so a group commit that
//! fails or lags loses nothing. The group is never joined (Tansu's join is slow and the
//! partitions are assigned explicitly): commits go out as a simple consumer's (generation -1),
//! which Kafka and Tansu accept for a group with no members.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::client::{base_config, client_error, KafkaError};
use super::config::KafkaConfig;

/// How often reported positions are committed.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Reported positions waiting for the committer thread, by (topic, partition).
type Pending = BTreeMap<(String, i32), i64>;

/// Where sink runtimes report committed positions; a thread of its own commits them to the
/// group every [`COMMIT_INTERVAL`] (a blocking request, kept off the sinks' runtime). The
/// thread makes a last commit and ends when every handle is dropped.
#[derive(Clone)]
pub struct GroupOffsets {
    shared: Arc<Shared>,
}

struct Shared {
    group: String,
    pending: Mutex<Pending>,
}

impl std::fmt::Debug for GroupOffsets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupOffsets")
            .field("group", &self.shared.group)
            .finish_non_exhaustive()
    }
}

impl GroupOffsets {
    /// Starts the committer for `cfg.consumer_group`.
    pub fn start(cfg: &KafkaConfig) -> Result<Self, KafkaError> {
        let mut c = base_config(cfg);
        c.set("group.id", &cfg.consumer_group)
            .set("client.id", "primespark-group-offsets")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let consumer: BaseConsumer = c.create().map_err(client_error(format!(
            "creating the committer of consumer group {}",
            cfg.consumer_group
        )))?;
        let shared = Arc::new(Shared {
            group: cfg.consumer_group.clone(),
            pending: Mutex::new(BTreeMap::new()),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("primespark-group".into())
            .spawn(move || commit_loop(&consumer, &thread_shared))
            .map_err(|e| KafkaError::Thread(e.to_string()))?;
        tracing::info!(group = %cfg.consumer_group, "committing sink positions to the consumer group (monitoring only)");
        Ok(Self { shared })
    }

    /// The sinks have committed `topic`/`partition` up to `next_offset` (the first offset not
    /// yet durable everywhere): Kafka's meaning of a committed offset.
    pub fn report(&self, topic: &str, partition: i32, next_offset: i64) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            let slot = pending
                .entry((topic.to_owned(), partition))
                .or_insert(next_offset);
            *slot = (*slot).max(next_offset);
        }
    }
}

fn commit_loop(consumer: &BaseConsumer, shared: &Arc<Shared>) {
    // The positions last committed, so an unchanged partition is not committed again.
    let mut committed: Pending = BTreeMap::new();
    let mut last_warning: Option<Instant> = None;
    loop {
        // Alone: every handle is gone; commit what is left, then stop.
        let last = Arc::strong_count(shared) == 1;
        if !last {
            std::thread::sleep(COMMIT_INTERVAL);
        }
        // Serves the client's events (errors, throttling); it is assigned nothing.
        let _ = consumer.poll(Duration::ZERO);
        let due: Pending = match shared.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        let due: Pending = due
            .into_iter()
            .filter(|(k, v)| committed.get(k).is_none_or(|c| c != v))
            .collect();
        if !due.is_empty() {
            commit(consumer, shared, &due, &mut committed, &mut last_warning);
        }
        if last {
            return;
        }
    }
}

fn commit(
    consumer: &BaseConsumer,
    shared: &Shared,
    due: &Pending,
    committed: &mut Pending,
    last_warning: &mut Option<Instant>,
) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in due {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::warn!(topic = %topic, partition, error = %e, "a position cannot be committed to the group");
        }
    }
    let started = Instant::now();
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            for ((topic, partition), next) in due {
                committed.insert((topic.clone(), *partition), *next);
                crate::metrics::GroupOffsetCommitted {
                    group: &shared.group,
                    topic,
                    partition: *partition,
                    next_offset: *next,
                }
                .emit();
            }
            tracing::debug!(group = %shared.group, partitions = due.len(), elapsed_ms = started.elapsed().as_millis() as u64, "committed positions to the consumer group");
        }
        Err(e) => {
            crate::metrics::GroupCommitFailed.emit();
            // The data is safe (positions live with it): one warning a minute is enough.
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!(group = %shared.group, error = %e, "committing positions to the consumer group failed; Kafka's lag tooling shows old positions until it works again");
                *last_warning = Some(Instant::now());
            }
            // Retried with whatever is newer next time.
            if let Ok(mut pending) = shared.pending.lock() {
                for (k, v) in due {
                    let slot = pending.entry(k.clone()).or_insert(*v);
                    *slot = (*slot).max(*v);
                }
            }
        }
    }
}
