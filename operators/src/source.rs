//! The source operator of every dataflow: Kafka records, or (for `primespark backfill`) the
//! records of the Parquet archive, through one [`Feed`].
//!
//! The operator never blocks its worker: it polls with a zero timeout, handles at most
//! [`MAX_RECORDS_PER_ACTIVATION`] records, and reschedules itself with an activator. It decodes
//! in place (event time is needed for the watermark), holds its capability at its watermark,
//! tags each record with the consumers that still need it ([`PartitionResume::delivery`]), and
//! reports [`SourceMark`]s for the aggregate checkpoint.
//!
//! Read back from the archive ([`Polled::Rows`]), records arrive already decoded, in offset
//! order per partition, and go through the same watermarks: lateness is decided exactly as
//! when they were first read. Only records inside the backfill's time range are delivered;
//! the others only move their partition's watermark. When every partition is exhausted the
//! source drops its capability, so every window closes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use primespark_schemas::flow::{Feed, Polled, RawItem, SinkId, SinkSet};
use primespark_schemas::time::ClockBound;
use primespark_schemas::DecodeLimits;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::{Scope, StreamVec};

use crate::control::Control;
use crate::decode::{DecodeRecord, StreamKind};
use crate::metrics::{LateEvents, PartitionWatermark, RecordsRead, WatermarkAdvanced};
use crate::record::{Point, SourceMark, SourceRecord};
use crate::watermark::Watermarks;
use crate::EventTime;

/// Most records one activation handles before yielding the worker.
pub const MAX_RECORDS_PER_ACTIVATION: usize = 4096;

/// Output of the source: raw items, or marks for the checkpoint.
pub type SourceItem = Result<RawItem, SourceMark>;

/// Where each consumer of a partition resumes (from the sinks' stored positions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionResume {
    /// Each raw sink's next offset (`None`: it has stored nothing for the partition).
    pub raw: Vec<(SinkId, Option<i64>)>,
    /// The windows: next offset and the partition's highest event time before it.
    pub window: Option<(i64, i64)>,
}

impl PartitionResume {
    /// The consumers that still need the record at `offset`.
    pub fn delivery(&self, offset: i64) -> SinkSet {
        let raw = self
            .raw
            .iter()
            .filter(|(_, next)| next.is_none_or(|n| offset >= n))
            .map(|(id, _)| *id);
        let set = SinkSet::of(raw);
        if self.window.is_none_or(|(n, _)| offset >= n) {
            set.with(SinkId::WINDOWS)
        } else {
            set
        }
    }

    /// Where the partition's reading starts: the lowest offset any consumer needs, or `None`
    /// (the configured start) when some consumer has stored nothing.
    pub fn start(&self) -> Option<i64> {
        least(
            self.raw
                .iter()
                .map(|(_, n)| *n)
                .chain([self.window.map(|w| w.0)]),
        )
    }

    /// Moves every stored position below `first` up to it: records below it are gone from the
    /// broker.
    pub fn clamp_to(&mut self, first: i64) {
        for (_, next) in &mut self.raw {
            if let Some(n) = next {
                *n = (*n).max(first);
            }
        }
        if let Some((n, _)) = &mut self.window {
            *n = (*n).max(first);
        }
    }

    /// Whether any consumer has stored a position for the partition.
    pub fn has_stored(&self) -> bool {
        self.window.is_some() || self.raw.iter().any(|(_, n)| n.is_some())
    }

    /// The first offset some raw sink has not stored (`None`: a raw sink has stored nothing, or
    /// there is none): where the consumer lag of records not yet stored counts from.
    pub fn stored(&self) -> Option<i64> {
        if self.raw.is_empty() {
            return None;
        }
        least(self.raw.iter().map(|(_, n)| *n))
    }
}

/// The least of `needed`, or `None` when any is `None`.
fn least(needed: impl IntoIterator<Item = Option<i64>>) -> Option<i64> {
    needed
        .into_iter()
        .try_fold(i64::MAX, |acc, o| o.map(|o| acc.min(o)))
}

/// Event-time settings of a source.
#[derive(Debug, Clone, Copy)]
pub struct EventTimeSpec {
    /// Watermark bound, microseconds.
    pub out_of_orderness_us: i64,
    /// How far behind the watermark an event may be and still update its window, microseconds.
    pub allowed_lateness_us: i64,
    /// The widest window, microseconds (the checkpoint's marks are per window of this width).
    pub width_us: i64,
    /// Partitions silent this long stop holding the watermark back.
    pub idle_timeout: Duration,
    /// Windows ending at or before this are committed: the watermark never goes below it.
    pub committed_watermark_us: EventTime,
    /// How far an event time may run ahead of the wall clock (`windows.max_future`); further
    /// is a dead letter that moves no watermark. `None`: no bound (archive reads, tools).
    pub max_future_us: Option<i64>,
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

/// Everything a worker's source needs besides its feed.
pub struct SourceSpec {
    /// Topic.
    pub topic: String,
    /// The event shape it carries.
    pub kind: StreamKind,
    /// Partitions this worker reads, with their consumers' resume points.
    pub partitions: BTreeMap<i32, PartitionResume>,
    /// Watermarks and windows.
    pub time: EventTimeSpec,
    /// Decode limits.
    pub limits: DecodeLimits,
    /// The worker's shutdown, pause and pressure flags.
    pub control: Control,
    /// Set for a backfill: only records in its range are delivered.
    pub backfill: Option<Backfill>,
}

/// The source operator, on a scope.
pub trait FeedSource<'s> {
    /// Reads `feed` (`None` on a worker with no partitions: its source releases its capability
    /// at once so it never holds the watermark back) into raw items and checkpoint marks.
    ///
    /// ```
    /// use primespark_operators::control::Control;
    /// use primespark_operators::decode::StreamKind;
    /// use primespark_operators::source::{EventTimeSpec, FeedSource, PartitionResume, SourceSpec};
    /// use primespark_schemas::flow::{Feed, Polled};
    /// use timely::dataflow::operators::capture::{Capture, Event};
    ///
    /// /// Two records of partition 0, then the end of the partition.
    /// struct Records(Vec<Polled>);
    /// impl Feed for Records {
    ///     fn poll(&mut self) -> Polled { self.0.pop().unwrap_or(Polled::Done(0)) }
    ///     fn kind(&self) -> &'static str { "archive" }
    /// }
    /// let json = |o: i64| Polled::Payload { partition: 0, offset: o, payload: format!(
    ///     r#"{{"device_id":"pi","metrics":{{"cpu_percent":{o}}},"timestamp":1762351387123}}"#).into_bytes() };
    /// let items = timely::example(move |scope| {
    ///     let spec = SourceSpec {
    ///         topic: "edge.telemetry".into(),
    ///         kind: StreamKind::Telemetry,
    ///         partitions: [(0, PartitionResume::default())].into(),
    ///         time: EventTimeSpec { out_of_orderness_us: 0, allowed_lateness_us: 0,
    ///             width_us: 60_000_000, idle_timeout: std::time::Duration::from_secs(30),
    ///             committed_watermark_us: 0, max_future_us: Some(300_000_000) },
    ///         limits: Default::default(),
    ///         control: Control::default(),
    ///         backfill: None,
    ///     };
    ///     let feed: Box<dyn Feed> = Box::new(Records(vec![json(8), json(7)]));
    ///     scope.feed_source(spec, Some(feed)).capture()
    /// });
    /// let rows: Vec<_> = items.try_iter()
    ///     .flat_map(|e| match e { Event::Messages(_, v) => v, _ => Vec::new() })
    ///     .filter_map(Result::ok).collect();
    /// assert_eq!(rows.len(), 2);
    /// assert_eq!(rows[1].position(), (0, 8));
    /// ```
    fn feed_source(
        self,
        spec: SourceSpec,
        feed: Option<Box<dyn Feed>>,
    ) -> StreamVec<'s, EventTime, SourceItem>;
}

impl<'s> FeedSource<'s> for Scope<'s, EventTime> {
    fn feed_source(
        self,
        spec: SourceSpec,
        feed: Option<Box<dyn Feed>>,
    ) -> StreamVec<'s, EventTime, SourceItem> {
        let name = match &feed {
            Some(f) if f.kind() == "archive" => format!("ArchiveSource({})", spec.topic),
            _ => format!("KafkaSource({})", spec.topic),
        };
        let scope = self;
        let mut feed = feed;
        source(scope, &name, move |capability, info| {
            let activator = scope.activator_for(info.address);
            let mut state = SourceState::new(spec, scope.index());
            let mut cap = feed.as_ref().map(|_| capability);
            move |output| {
                let control = &state.spec.control;
                let (Some(cap_ref), Some(feed)) = (cap.as_mut(), feed.as_mut()) else {
                    // Nothing to read (no partitions, or the archive is read).
                    control.caught_up.set(true);
                    return;
                };
                if control.is_shutting_down() {
                    // Holding the capability keeps open windows open: they are recomputed by
                    // the next run from the committed resume offsets instead of being emitted
                    // partial.
                    return;
                }
                if control.under_pressure() {
                    activator.activate_after(Duration::from_millis(10));
                    return;
                }
                if control.is_paused() {
                    activator.activate_after(Duration::from_millis(100));
                    return;
                }
                let read = {
                    let mut session = output.session(&*cap_ref);
                    state.read(feed.as_mut(), |item| session.give(item))
                };
                state.advance(cap_ref);
                // A read that stopped short of the cap found the feed empty.
                state
                    .spec
                    .control
                    .caught_up
                    .set(read < MAX_RECORDS_PER_ACTIVATION);
                if state.finished() {
                    // The archive is read (or unreadable): every window may close now.
                    tracing::info!(topic = %state.spec.topic, worker = state.worker, failed = state.failed, "archive source finished");
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
}

/// The wall clock, microseconds since the epoch.
fn wall_clock_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A source's state between activations.
struct SourceState {
    spec: SourceSpec,
    worker: usize,
    watermarks: Watermarks,
    exhausted: BTreeSet<i32>,
    failed: bool,
    /// Every raw sink of the dataflow (what an archived record inside the range goes to).
    raw_sinks: SinkSet,
    /// The rows of the record being decoded (kept between records for its capacity).
    rows: Vec<primespark_schemas::rows::RawRow>,
}

/// What one activation read of a partition: records, bytes, next offset.
#[derive(Default)]
struct ReadStats {
    records: u64,
    bytes: u64,
    next: i64,
}

impl SourceState {
    fn new(spec: SourceSpec, worker: usize) -> Self {
        let start = Instant::now();
        let t = spec.time;
        let mut watermarks = Watermarks::new(t.out_of_orderness_us, t.width_us, t.idle_timeout)
            .with_allowed_lateness(t.allowed_lateness_us);
        for (p, resume) in &spec.partitions {
            watermarks.add_partition(*p, resume.window.map_or(i64::MIN, |w| w.1), start);
        }
        let raw_sinks = SinkSet::of(
            spec.partitions
                .values()
                .flat_map(|r| r.raw.iter().map(|(id, _)| *id)),
        );
        Self {
            spec,
            worker,
            watermarks,
            exhausted: BTreeSet::new(),
            failed: false,
            raw_sinks,
            rows: Vec::new(),
        }
    }

    fn finished(&self) -> bool {
        self.failed
            || (!self.spec.partitions.is_empty()
                && self.exhausted.len() >= self.spec.partitions.len())
    }

    /// Reads up to [`MAX_RECORDS_PER_ACTIVATION`] records, giving items and marks to `give`.
    fn read(&mut self, feed: &mut dyn Feed, mut give: impl FnMut(SourceItem)) -> usize {
        let now = Instant::now();
        if let Some(max_future_us) = self.spec.time.max_future_us {
            // Once per activation: the bound moves with the clock, not per record.
            self.spec.limits.clock = Some(ClockBound {
                now_us: wall_clock_us(),
                max_future_us,
            });
        }
        let mut read = 0usize;
        let mut too_late = 0u64;
        let mut per_partition: HashMap<i32, ReadStats> = HashMap::new();
        while read < MAX_RECORDS_PER_ACTIVATION {
            let (partition, offset, input) = match feed.poll() {
                Polled::Empty => break,
                Polled::Payload {
                    partition,
                    offset,
                    payload,
                } => (partition, offset, Ok(payload)),
                Polled::Rows(r) => (r.partition, r.offset, Err((r.time_us, r.rows))),
                Polled::Done(p) => {
                    if !self.exhausted.insert(p) {
                        // Said before: nothing new will come of polling again now.
                        break;
                    }
                    // No record of it can follow: it must not hold the others back.
                    self.watermarks.remove_partition(p);
                    continue;
                }
                Polled::Failed(e) => {
                    self.fail(e);
                    break;
                }
            };
            read += 1;
            let stats = per_partition.entry(partition).or_default();
            stats.records += 1;
            stats.bytes += input.as_ref().map_or(0, |p| p.len() as u64);
            stats.next = stats.next.max(offset + 1);
            too_late += self.record(partition, offset, input, now, &mut give);
        }
        if too_late > 0 {
            // Beyond the allowed lateness: raw tables and `late_events` only.
            LateEvents {
                dataflow: self.spec.kind.name(),
                operator: "source",
                count: too_late,
            }
            .emit();
        }
        for (partition, stats) in per_partition {
            self.progress(partition, &stats, &mut give);
        }
        read
    }

    /// Decodes one record and gives its items; returns 1 if it was too late for its windows.
    fn record(
        &mut self,
        partition: i32,
        offset: i64,
        input: Result<Vec<u8>, (i64, Vec<primespark_schemas::rows::RawRow>)>,
        now: Instant,
        give: &mut impl FnMut(SourceItem),
    ) -> u64 {
        let spec = &self.spec;
        let watermark_us = self
            .watermarks
            .max_event_us(partition)
            .unwrap_or(i64::MIN)
            .saturating_sub(spec.time.out_of_orderness_us);
        let resume = spec.partitions.get(&partition);
        let archived = input.is_err();
        let (time_us, delivery) = match input {
            Ok(payload) => {
                let delivery = resume.map_or(SinkSet::EMPTY, |r| r.delivery(offset));
                let record = SourceRecord {
                    partition,
                    offset,
                    payload,
                    delivery,
                    watermark_us,
                    allowed_lateness_us: spec.time.allowed_lateness_us,
                };
                match spec
                    .kind
                    .decode_rows(&spec.topic, &spec.limits, record, &mut self.rows)
                {
                    Ok(time_us) => (time_us, delivery),
                    Err(dead) => {
                        give(Ok(RawItem::Dead(dead)));
                        return 0;
                    }
                }
            }
            Err((time_us, rows)) => {
                let inside = spec.backfill.as_ref().is_none_or(|b| b.contains(time_us));
                let delivery = if inside {
                    self.raw_sinks.with(SinkId::WINDOWS)
                } else {
                    SinkSet::EMPTY
                };
                self.rows.extend(rows);
                (time_us, delivery)
            }
        };
        if self.rows.is_empty() {
            return 0;
        }
        let late_by_us = watermark_us.saturating_sub(time_us).max(0);
        let late = late_by_us > spec.time.allowed_lateness_us;
        // Archived records outside the backfill's range only move the watermark.
        let delivered = !archived || !delivery.is_empty();
        let obs = self.watermarks.observe(
            partition,
            offset,
            time_us,
            delivery.contains(SinkId::WINDOWS),
            now,
        );
        if let Some(mark) = obs.opened {
            give(Err(mark));
        }
        if delivered {
            // Rows go out one by one into the output's buffers; the decode buffer keeps its
            // capacity for the next record.
            for row in self.rows.drain(..) {
                give(Ok(RawItem::Point(Point {
                    row,
                    delivery,
                    late,
                    late_by_us,
                })));
            }
        } else {
            self.rows.clear();
        }
        u64::from(delivered && late)
    }

    /// Reports how far a partition was read, for the checkpoint and the metrics.
    fn progress(&self, partition: i32, stats: &ReadStats, give: &mut impl FnMut(SourceItem)) {
        let window_next = self
            .spec
            .partitions
            .get(&partition)
            .and_then(|r| r.window)
            .map_or(i64::MIN, |w| w.0);
        give(Err(SourceMark::Progress {
            partition,
            next_offset: stats.next.max(window_next),
            max_event_us: self.watermarks.max_event_us(partition).unwrap_or(i64::MIN),
        }));
        if self.spec.backfill.is_none() {
            RecordsRead {
                topic: &self.spec.topic,
                partition,
                count: stats.records,
                bytes: stats.bytes,
            }
            .emit();
            if let Some(watermark_us) = self.watermarks.partition_watermark_us(partition) {
                PartitionWatermark {
                    topic: &self.spec.topic,
                    partition,
                    watermark_us,
                }
                .emit();
            }
        }
    }

    fn fail(&mut self, error: String) {
        tracing::error!(topic = %self.spec.topic, error = %error, "reading the feed failed; the source stops");
        if let Some(b) = &self.spec.backfill {
            if let Ok(mut slot) = b.failure.lock() {
                slot.get_or_insert(error);
            }
        }
        self.failed = true;
    }

    /// Moves the capability to the watermark (never below the committed one).
    fn advance(&mut self, cap: &mut timely::dataflow::operators::Capability<EventTime>) {
        let Some(wm) = self.watermarks.combined(Instant::now()) else {
            return;
        };
        let t = u64::try_from(wm)
            .unwrap_or(0)
            .max(self.spec.time.committed_watermark_us);
        if t > *cap.time() {
            cap.downgrade(&t);
            WatermarkAdvanced {
                dataflow: self.spec.kind.name(),
                worker: self.worker,
                watermark_us: i64::try_from(t).unwrap_or(i64::MAX),
            }
            .emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: usize) -> SinkId {
        SinkId::raw(i).unwrap()
    }

    #[test]
    fn a_record_goes_to_the_consumers_that_have_not_stored_it() {
        let resume = PartitionResume {
            raw: vec![(id(0), Some(10)), (id(1), None)],
            window: Some((5, 0)),
        };
        assert_eq!(resume.delivery(4), SinkSet::of([id(1)]));
        assert_eq!(resume.delivery(7), SinkSet::of([id(1), SinkId::WINDOWS]));
        assert_eq!(
            resume.delivery(10),
            SinkSet::of([id(0), id(1), SinkId::WINDOWS])
        );
        // One sink with nothing stored: from the configured start.
        assert_eq!(resume.start(), None);
        let stored = PartitionResume {
            raw: vec![(id(0), Some(10)), (id(1), Some(12))],
            window: Some((5, 0)),
        };
        assert_eq!(stored.start(), Some(5));
        assert_eq!(stored.stored(), Some(10));
        assert_eq!(PartitionResume::default().stored(), None);
    }
}
