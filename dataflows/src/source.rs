//! The source operator of every dataflow: Kafka records, or (for `primespark backfill`) the
//! records of the Parquet archive.
//!
//! Partition `p` is read by global worker `p mod peers`, assigned explicitly (no group join).
//! The operator never blocks its worker: it polls with a zero timeout, handles at most
//! [`MAX_RECORDS_PER_ACTIVATION`] records, and reschedules itself with an activator. It decodes
//! in place (event time is needed for the watermark), holds its capability at its watermark,
//! tags each record with the sinks that still need it, and reports [`SourceMark`]s for the
//! aggregate checkpoint.
//!
//! Read back from the archive ([`Feed::Archive`]), records arrive already decoded, in offset
//! order per partition, and go through the same watermarks: lateness is decided exactly as
//! when they were first read. Only records inside the backfill's time range are delivered;
//! the others only move their partition's watermark. When every partition is exhausted the
//! source drops its capability, so every window closes.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use primespark_connectors::archive::{ArchiveItem, ArchiveReader};
use primespark_connectors::kafka::PartitionReader;
use primespark_connectors::metrics::KafkaRecordsReceived;
use primespark_operators::decode::{points_of, StreamKind};
use primespark_operators::metrics::{LateEvents, WatermarkAdvanced};

use crate::dataflow::dataflow_name;
use primespark_operators::record::{DeadLetter, Delivery, Point, SourceMark, SourceRecord};
use primespark_operators::watermark::Watermarks;
use primespark_operators::EventTime;
use primespark_schemas::DecodeLimits;
use rdkafka::Message;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::{Scope, StreamVec};

/// Most records one activation handles before yielding the worker.
pub const MAX_RECORDS_PER_ACTIVATION: usize = 4096;

/// A decoded record on its way to the raw sinks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RawItem {
    /// One metric sample.
    Point(Point),
    /// A record that failed decoding or validation.
    Dead(DeadLetter),
}

impl RawItem {
    /// Kafka partition and offset.
    pub fn position(&self) -> (i32, i64) {
        match self {
            RawItem::Point(p) => p.row.position(),
            RawItem::Dead(d) => (d.row.partition, d.row.offset),
        }
    }
}

/// Where a source reads from.
pub enum Feed {
    /// Kafka partitions, assigned explicitly.
    Kafka(PartitionReader),
    /// The Parquet archive's records of some partitions (backfill).
    Archive(ArchiveReader),
}

/// A backfill's time range and where its sources report a failed read.
#[derive(Debug, Clone, Default)]
pub struct Backfill {
    /// First event time delivered, microseconds.
    pub since_us: i64,
    /// Event times from here on are not delivered, microseconds.
    pub until_us: i64,
    /// The first read error of any source (the backfill then fails).
    pub failure: Arc<Mutex<Option<String>>>,
}

impl Backfill {
    /// Whether an event at `time_us` is rebuilt.
    pub fn contains(&self, time_us: i64) -> bool {
        self.since_us <= time_us && time_us < self.until_us
    }
}

/// Where each sink resumes one partition (from `source_offsets`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    /// Raw rows in PostgreSQL: next offset (None: nothing stored, or sink disabled).
    pub postgres: Option<i64>,
    /// Raw Parquet: next offset.
    pub parquet: Option<i64>,
    /// Windows: next offset and the partition's highest event time before it.
    pub window: Option<(i64, i64)>,
}

/// Everything a worker's source needs.
pub struct SourceSpec {
    /// Topic.
    pub topic: String,
    /// The event shape it carries.
    pub kind: StreamKind,
    /// Partitions this worker reads, with their resume points.
    pub partitions: BTreeMap<i32, Resume>,
    /// Which raw sinks are enabled.
    pub postgres_enabled: bool,
    /// Whether Parquet is enabled.
    pub parquet_enabled: bool,
    /// Watermark bound, microseconds.
    pub out_of_orderness_us: i64,
    /// How far behind the watermark an event may be and still update its window, microseconds.
    pub allowed_lateness_us: i64,
    /// Window width, microseconds.
    pub width_us: i64,
    /// Idle timeout of partitions.
    pub idle_timeout: Duration,
    /// Windows ending at or before this are committed.
    pub committed_watermark_us: EventTime,
    /// Decode limits.
    pub limits: DecodeLimits,
    /// Set when the process is shutting down: stop reading, keep the capability.
    pub shutdown: Arc<AtomicBool>,
    /// Set by this worker's raw sink when it cannot hand off batches: stop reading.
    pub pressure: Rc<Cell<bool>>,
    /// Set while the sources are paused (`run --paused`, until SIGUSR1): read nothing.
    pub paused: Arc<AtomicBool>,
    /// Set for a backfill: only records in its range are delivered (to PostgreSQL and the
    /// windows, never to Parquet).
    pub backfill: Option<Backfill>,
}

/// Output of the source: raw items, or marks for the checkpoint.
pub type SourceItem = Result<RawItem, SourceMark>;

/// What one poll of a feed gave.
enum Polled {
    /// A Kafka record's payload.
    Payload(i32, i64, Vec<u8>),
    /// An archived record's rows.
    Rows(primespark_connectors::archive::ArchivedRecord),
    /// Nothing now.
    Empty,
    /// A partition of the archive is exhausted.
    Done(i32),
    /// The archive could not be read.
    Failed(String),
}

impl Feed {
    fn poll(&mut self) -> Polled {
        match self {
            Feed::Kafka(reader) => match reader.poll() {
                None => Polled::Empty,
                Some(Ok(msg)) => Polled::Payload(
                    msg.partition(),
                    msg.offset(),
                    msg.payload().unwrap_or_default().to_vec(),
                ),
                Some(Err(e)) => {
                    tracing::warn!(topic = reader.topic(), error = %e, "kafka poll error");
                    Polled::Empty
                }
            },
            Feed::Archive(reader) => match reader.poll() {
                None => Polled::Empty,
                Some(ArchiveItem::Record(r)) => Polled::Rows(r),
                Some(ArchiveItem::Done(p)) => Polled::Done(p),
                Some(ArchiveItem::Failed(e)) => Polled::Failed(e.to_string()),
            },
        }
    }
}

/// Builds the source operator. `feed` is `None` on workers with no partitions: their source
/// releases its capability at once so it never holds the watermark back.
pub fn kafka_source<'s>(
    scope: Scope<'s, EventTime>,
    spec: SourceSpec,
    feed: Option<Feed>,
) -> StreamVec<'s, EventTime, SourceItem> {
    let name = match &feed {
        Some(Feed::Archive(_)) => format!("ArchiveSource({})", spec.topic),
        _ => format!("KafkaSource({})", spec.topic),
    };
    let mut reader = feed;
    source(scope, &name, move |capability, info| {
        let activator = scope.activator_for(info.address);
        let worker_index = scope.index();
        let mut cap = reader.as_ref().map(|_| capability);
        let mut exhausted: std::collections::BTreeSet<i32> = std::collections::BTreeSet::new();
        let start = Instant::now();
        let mut watermarks =
            Watermarks::new(spec.out_of_orderness_us, spec.width_us, spec.idle_timeout)
                .with_allowed_lateness(spec.allowed_lateness_us);
        for (p, resume) in &spec.partitions {
            watermarks.add_partition(*p, resume.window.map_or(i64::MIN, |w| w.1), start);
        }
        move |output| {
            let (Some(cap_ref), Some(reader)) = (cap.as_mut(), reader.as_mut()) else {
                return;
            };
            if spec.shutdown.load(Ordering::Relaxed) {
                // Holding the capability keeps open windows open: they are recomputed by the
                // next run from the committed resume offsets instead of being emitted partial.
                return;
            }
            if spec.pressure.get() {
                activator.activate_after(Duration::from_millis(10));
                return;
            }
            if spec.paused.load(Ordering::Relaxed) {
                activator.activate_after(Duration::from_millis(100));
                return;
            }
            let now = Instant::now();
            let mut read = 0usize;
            let mut failed = false;
            let mut too_late = 0u64;
            let mut per_partition: HashMap<i32, (u64, u64, i64)> = HashMap::new();
            {
                let mut session = output.session(&*cap_ref);
                while read < MAX_RECORDS_PER_ACTIVATION {
                    let (partition, offset, input) = match reader.poll() {
                        Polled::Empty => break,
                        Polled::Payload(p, o, payload) => (p, o, Ok(payload)),
                        Polled::Rows(r) => (r.partition, r.offset, Err((r.time_us, r.rows))),
                        Polled::Done(p) => {
                            exhausted.insert(p);
                            // No record of it can follow: it must not hold the others back.
                            watermarks.remove_partition(p);
                            continue;
                        }
                        Polled::Failed(e) => {
                            tracing::error!(topic = %spec.topic, error = %e, "reading the archive failed; the backfill stops");
                            if let Some(b) = &spec.backfill {
                                if let Ok(mut slot) = b.failure.lock() {
                                    slot.get_or_insert(e);
                                }
                            }
                            failed = true;
                            break;
                        }
                    };
                    read += 1;
                    let stats = per_partition.entry(partition).or_insert((0, 0, offset));
                    stats.0 += 1;
                    stats.1 += input.as_ref().map_or(0, |p| p.len() as u64);
                    stats.2 = stats.2.max(offset + 1);
                    let resume = spec.partitions.get(&partition).copied().unwrap_or_default();
                    let watermark_us = watermarks
                        .max_event_us(partition)
                        .unwrap_or(i64::MIN)
                        .saturating_sub(spec.out_of_orderness_us);
                    let archived = input.is_err();
                    let decoded = match input {
                        Ok(payload) => {
                            let delivery = Delivery {
                                postgres: spec.postgres_enabled
                                    && resume.postgres.is_none_or(|n| offset >= n),
                                parquet: spec.parquet_enabled
                                    && resume.parquet.is_none_or(|n| offset >= n),
                                window: resume.window.is_none_or(|(n, _)| offset >= n),
                            };
                            let record = SourceRecord {
                                partition,
                                offset,
                                payload,
                                delivery,
                                watermark_us,
                                allowed_lateness_us: spec.allowed_lateness_us,
                            };
                            spec.kind.decode(&spec.topic, &spec.limits, record)
                        }
                        Err((time_us, rows)) => {
                            let inside = spec.backfill.as_ref().is_none_or(|b| b.contains(time_us));
                            let delivery = Delivery {
                                postgres: spec.postgres_enabled && inside,
                                parquet: false,
                                window: inside,
                            };
                            Ok(points_of(
                                rows,
                                time_us,
                                delivery,
                                watermark_us,
                                spec.allowed_lateness_us,
                            ))
                        }
                    };
                    match decoded {
                        Ok(points) => {
                            let Some(first) = points.first() else {
                                continue;
                            };
                            let time_us = first.row.time_us();
                            // Archived records outside the backfill's range only move the
                            // watermark.
                            let delivered =
                                !archived || first.delivery.postgres || first.delivery.window;
                            too_late += u64::from(delivered && first.late);
                            let obs = watermarks.observe(
                                partition,
                                offset,
                                time_us,
                                first.delivery.window,
                                now,
                            );
                            if let Some(mark) = obs.opened {
                                session.give(Err(mark));
                            }
                            if delivered {
                                session.give_iterator(
                                    points.into_iter().map(|p| Ok(RawItem::Point(p))),
                                );
                            }
                        }
                        Err(dead) => session.give(Ok(RawItem::Dead(dead))),
                    }
                }
                if too_late > 0 {
                    // Beyond the allowed lateness: raw tables and `late_events` only.
                    LateEvents {
                        dataflow: dataflow_name(spec.kind),
                        operator: "source",
                        count: too_late,
                    }
                    .emit();
                }
                for (partition, (count, bytes, next)) in &per_partition {
                    let agg_next = spec
                        .partitions
                        .get(partition)
                        .and_then(|r| r.window)
                        .map_or(i64::MIN, |w| w.0);
                    session.give(Err(SourceMark::Progress {
                        partition: *partition,
                        next_offset: (*next).max(agg_next),
                        max_event_us: watermarks.max_event_us(*partition).unwrap_or(i64::MIN),
                    }));
                    if spec.backfill.is_none() {
                        KafkaRecordsReceived {
                            topic: &spec.topic,
                            partition: *partition,
                            count: *count,
                            bytes: *bytes,
                        }
                        .emit();
                    }
                }
            }
            if let Some(wm) = watermarks.combined(now) {
                let t = u64::try_from(wm)
                    .unwrap_or(0)
                    .max(spec.committed_watermark_us);
                if t > *cap_ref.time() {
                    cap_ref.downgrade(&t);
                    WatermarkAdvanced {
                        dataflow: dataflow_name(spec.kind),
                        worker: worker_index,
                        watermark_us: i64::try_from(t).unwrap_or(i64::MAX),
                    }
                    .emit();
                }
            }
            if failed || (!spec.partitions.is_empty() && exhausted.len() >= spec.partitions.len()) {
                // The archive is read (or unreadable): every window may close now.
                tracing::info!(topic = %spec.topic, worker = worker_index, failed, "archive source finished");
                cap = None;
                return;
            }
            if read == MAX_RECORDS_PER_ACTIVATION {
                activator.activate();
            } else {
                activator.activate_after(Duration::from_millis(5));
            }
        }
    })
}
