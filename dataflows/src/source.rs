//! The Kafka source operator of the telemetry dataflow.
//!
//! Partition `p` is read by global worker `p mod peers`, assigned explicitly (no group join).
//! The operator never blocks its worker: it polls with a zero timeout, handles at most
//! [`MAX_RECORDS_PER_ACTIVATION`] records, and reschedules itself with an activator. It decodes
//! in place (event time is needed for the watermark), holds its capability at its watermark,
//! tags each record with the sinks that still need it, and reports [`SourceMark`]s for the
//! aggregate checkpoint.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use primespark_connectors::kafka::PartitionReader;
use primespark_connectors::metrics::KafkaRecordsReceived;
use primespark_operators::decode::StreamKind;
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
}

/// Output of the source: raw items, or marks for the checkpoint.
pub type SourceItem = Result<RawItem, SourceMark>;

/// Builds the source operator. `reader` is `None` on workers with no partitions: their source
/// releases its capability at once so it never holds the watermark back.
pub fn kafka_source<'s>(
    scope: Scope<'s, EventTime>,
    spec: SourceSpec,
    reader: Option<PartitionReader>,
) -> StreamVec<'s, EventTime, SourceItem> {
    let name = format!("KafkaSource({})", spec.topic);
    source(scope, &name, move |capability, info| {
        let activator = scope.activator_for(info.address);
        let worker_index = scope.index();
        let mut cap = reader.as_ref().map(|_| capability);
        let start = Instant::now();
        let mut watermarks =
            Watermarks::new(spec.out_of_orderness_us, spec.width_us, spec.idle_timeout)
                .with_allowed_lateness(spec.allowed_lateness_us);
        for (p, resume) in &spec.partitions {
            watermarks.add_partition(*p, resume.window.map_or(i64::MIN, |w| w.1), start);
        }
        move |output| {
            let (Some(cap), Some(reader)) = (cap.as_mut(), reader.as_ref()) else {
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
            let mut too_late = 0u64;
            let mut per_partition: HashMap<i32, (u64, u64, i64)> = HashMap::new();
            {
                let mut session = output.session(&*cap);
                while read < MAX_RECORDS_PER_ACTIVATION {
                    let msg = match reader.poll() {
                        None => break,
                        Some(Ok(msg)) => msg,
                        Some(Err(e)) => {
                            tracing::warn!(topic = %spec.topic, error = %e, "kafka poll error");
                            break;
                        }
                    };
                    read += 1;
                    let partition = msg.partition();
                    let offset = msg.offset();
                    let payload = msg.payload().unwrap_or_default();
                    let stats = per_partition.entry(partition).or_insert((0, 0, offset));
                    stats.0 += 1;
                    stats.1 += payload.len() as u64;
                    stats.2 = stats.2.max(offset + 1);
                    let resume = spec.partitions.get(&partition).copied().unwrap_or_default();
                    let delivery = Delivery {
                        postgres: spec.postgres_enabled
                            && resume.postgres.is_none_or(|n| offset >= n),
                        parquet: spec.parquet_enabled && resume.parquet.is_none_or(|n| offset >= n),
                        window: resume.window.is_none_or(|(n, _)| offset >= n),
                    };
                    let watermark_us = watermarks
                        .max_event_us(partition)
                        .unwrap_or(i64::MIN)
                        .saturating_sub(spec.out_of_orderness_us);
                    let record = SourceRecord {
                        partition,
                        offset,
                        payload: payload.to_vec(),
                        delivery,
                        watermark_us,
                        allowed_lateness_us: spec.allowed_lateness_us,
                    };
                    match spec.kind.decode(&spec.topic, &spec.limits, record) {
                        Ok(points) => {
                            let time_us = points.first().map_or(i64::MIN, |p| p.row.time_us());
                            too_late += u64::from(points.first().is_some_and(|p| p.late));
                            let obs = watermarks.observe(
                                partition,
                                offset,
                                time_us,
                                delivery.window,
                                now,
                            );
                            if let Some(mark) = obs.opened {
                                session.give(Err(mark));
                            }
                            session
                                .give_iterator(points.into_iter().map(|p| Ok(RawItem::Point(p))));
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
                    KafkaRecordsReceived {
                        topic: &spec.topic,
                        partition: *partition,
                        count: *count,
                        bytes: *bytes,
                    }
                    .emit();
                }
            }
            if let Some(wm) = watermarks.combined(now) {
                let t = u64::try_from(wm)
                    .unwrap_or(0)
                    .max(spec.committed_watermark_us);
                if t > *cap.time() {
                    cap.downgrade(&t);
                    WatermarkAdvanced {
                        dataflow: dataflow_name(spec.kind),
                        worker: worker_index,
                        watermark_us: i64::try_from(t).unwrap_or(i64::MAX),
                    }
                    .emit();
                }
            }
            if read == MAX_RECORDS_PER_ACTIVATION {
                activator.activate();
            } else {
                activator.activate_after(Duration::from_millis(5));
            }
        }
    })
}
