//! Watching the topics of a running pipeline for a new layout.
//!
//! Partitions are assigned to workers when the dataflows are built, so a topic that grows, or
//! one deleted and recreated under a running pipeline, needs the dataflows rebuilt. The watcher
//! asks the broker every `kafka.partition_discovery_interval` for each topic's partitions and
//! their ends; on a partition the run does not read yet, or an end lower than one seen before
//! (ends only grow: a lower one is a new topic of the same name), it raises the epoch's stop
//! flag. The run then drains and commits like a clean stop and starts the dataflows again on
//! the new layout in the same process: the writer lease, the SQL service and the tiering stay.
//! The start-up rules apply to what it finds (ARCHITECTURE.md, "Partitions and offsets").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use primespark_connectors::kafka::{self, KafkaConfig};
use primespark_connectors::metrics::SourceRelayout;

/// A topic as the running dataflows read it.
pub struct Watched {
    /// The topic.
    pub topic: String,
    /// Every partition it had when the dataflows were built.
    pub partitions: BTreeSet<i32>,
}

/// How long one metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Watches `topics` until `stop` is raised (`None`), or until one changed layout: then it
/// raises `stop` itself and returns what changed. `None` at once when discovery is off.
pub fn watch(
    kafka_config: &KafkaConfig,
    topics: Vec<Watched>,
    stop: Arc<AtomicBool>,
) -> Option<JoinHandle<Option<String>>> {
    let interval = kafka_config.partition_discovery_interval;
    if interval.is_zero() || topics.is_empty() {
        return None;
    }
    let config = kafka_config.clone();
    let spawned = std::thread::Builder::new()
        .name("primespark-layout".into())
        .spawn(move || {
            let mut watchers: Vec<TopicWatch> = topics
                .into_iter()
                .filter_map(|w| TopicWatch::new(&config, w))
                .collect();
            loop {
                if !sleep_unless(&stop, interval) {
                    return None;
                }
                for w in &mut watchers {
                    if let Some(change) = w.check() {
                        stop.store(true, Ordering::SeqCst);
                        return Some(change);
                    }
                }
            }
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the partition watcher: added partitions are read after a restart only");
            None
        }
    }
}

/// Sleeps `total` in short steps; false as soon as `stop` is raised.
fn sleep_unless(stop: &AtomicBool, total: Duration) -> bool {
    let until = Instant::now() + total;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    !stop.load(Ordering::SeqCst)
}

/// One topic's reader and the ends seen so far.
struct TopicWatch {
    watched: Watched,
    reader: kafka::PartitionReader,
    ends: BTreeMap<i32, i64>,
}

impl TopicWatch {
    fn new(config: &KafkaConfig, watched: Watched) -> Option<Self> {
        match kafka::reader(config, &watched.topic, "primespark-layout") {
            Ok(reader) => Some(Self {
                watched,
                reader,
                ends: BTreeMap::new(),
            }),
            Err(e) => {
                tracing::error!(topic = %watched.topic, error = %e, "cannot watch the topic's partitions: added partitions are read after a restart only");
                None
            }
        }
    }

    /// What changed since the last check (a broker that does not answer changes nothing).
    fn check(&mut self) -> Option<String> {
        let topic = self.watched.topic.clone();
        let partitions = match self.reader.listed_partitions(REQUEST_TIMEOUT) {
            Ok(Some(p)) => p,
            // Deleted: what comes back under its name is judged when it does.
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(topic, error = %e, "partition check: no metadata");
                return None;
            }
        };
        let ends: Vec<(i32, i64)> = partitions
            .iter()
            .filter_map(|p| {
                self.reader
                    .watermarks(*p, REQUEST_TIMEOUT)
                    .ok()
                    .map(|(_, high)| (*p, high))
            })
            .collect();
        let (reason, detail) = judge(&self.watched.partitions, &mut self.ends, &partitions, &ends)?;
        Some(relayout(&topic, reason, detail))
    }
}

/// Whether a topic listed with `partitions` and `ends` (per partition, its high watermark)
/// has a new layout for dataflows built on `known`; `seen` keeps the ends of earlier checks.
fn judge(
    known: &BTreeSet<i32>,
    seen: &mut BTreeMap<i32, i64>,
    partitions: &[i32],
    ends: &[(i32, i64)],
) -> Option<(&'static str, String)> {
    let added: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|p| !known.contains(p))
        .collect();
    if !added.is_empty() {
        return Some((
            "partitions_added",
            format!(
                "partitions {added:?} added (the run reads {} of them)",
                known.len()
            ),
        ));
    }
    for (p, high) in ends {
        if let Some(before) = seen.insert(*p, *high) {
            if *high < before {
                return Some((
                    "end_went_back",
                    format!("partition {p}'s end went from {before} to {high}"),
                ));
            }
        }
    }
    None
}

fn relayout(topic: &str, reason: &'static str, detail: String) -> String {
    SourceRelayout {
        topic,
        reason,
        detail: &detail,
    }
    .emit();
    format!("{topic}: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_added_partition_or_an_end_going_back_is_a_new_layout() {
        let known: BTreeSet<i32> = [0, 1].into();
        let mut seen = BTreeMap::new();
        // Ends that grow, and a partition missing from one answer, change nothing.
        assert_eq!(judge(&known, &mut seen, &[0, 1], &[(0, 10), (1, 5)]), None);
        assert_eq!(judge(&known, &mut seen, &[0, 1], &[(0, 12)]), None);
        assert_eq!(judge(&known, &mut seen, &[0, 1], &[(0, 12), (1, 5)]), None);
        let (reason, detail) = judge(&known, &mut seen, &[0, 1, 2], &[]).unwrap_or_default();
        assert_eq!(reason, "partitions_added");
        assert!(detail.contains("[2]"), "{detail}");
        let (reason, detail) =
            judge(&known, &mut seen, &[0, 1], &[(0, 3), (1, 5)]).unwrap_or_default();
        assert_eq!(reason, "end_went_back");
        assert!(detail.contains("from 12 to 3"), "{detail}");
        // A partition of the run that the topic lost is not an added one.
        assert_eq!(judge(&known, &mut seen, &[0], &[(0, 4)]), None);
    }
}
