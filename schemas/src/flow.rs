//! What flows from a dataflow's operators to its sinks, and from a feed into its source.
//!
//! - [`SinkSet`]: which consumers of a record (the windows and each raw sink) still need it.
//!   On restart a partition is re-read from the lowest position any of them needs, and each
//!   record goes only to the consumers that have not stored it yet. Ids are given out by the
//!   plan of a run ([`SinkId`]); nothing here names a connector.
//! - [`RawItem`] / [`RawBatch`]: decoded rows and dead letters on their way to the raw sinks.
//! - [`AggCommit`]: closed windows with the [`Checkpoint`] that makes them final.
//! - [`Feed`]: where a source reads records from (Kafka, or the Parquet archive).
//!
//! All of it is serde so that timely can exchange it between the processes of a cluster.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rows::{AggRow, DeadLetterRow, PartitionOffset, RawRow};

/// A consumer of a dataflow's records: its bit in a [`SinkSet`]. [`SinkId::WINDOWS`] is the
/// event-time windows (whose position the aggregate sink stores); the raw sinks of a run get
/// the ids after it, in the order the sink registry builds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SinkId(u8);

impl SinkId {
    /// The windows (aggregates).
    pub const WINDOWS: SinkId = SinkId(0);
    /// How many ids a [`SinkSet`] holds.
    pub const CAPACITY: usize = 32;

    /// The `index`-th raw sink of a run (`None` past [`SinkId::CAPACITY`]).
    pub fn raw(index: usize) -> Option<SinkId> {
        u8::try_from(index + 1)
            .ok()
            .filter(|i| usize::from(*i) < Self::CAPACITY)
            .map(SinkId)
    }

    /// Position in a [`SinkSet`].
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A set of [`SinkId`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct SinkSet(u32);

impl SinkSet {
    /// No consumer.
    pub const EMPTY: SinkSet = SinkSet(0);

    /// The set of `ids`.
    pub fn of(ids: impl IntoIterator<Item = SinkId>) -> Self {
        ids.into_iter().fold(Self::EMPTY, |s, id| s.with(id))
    }

    /// Whether `id` is in the set.
    pub fn contains(self, id: SinkId) -> bool {
        self.0 & (1 << id.0) != 0
    }

    /// The set with `id` added.
    #[must_use]
    pub fn with(self, id: SinkId) -> Self {
        SinkSet(self.0 | (1 << id.0))
    }

    /// The set without `id`.
    #[must_use]
    pub fn without(self, id: SinkId) -> Self {
        SinkSet(self.0 & !(1 << id.0))
    }

    /// Whether some consumer other than the windows is in the set.
    pub fn any_raw(self) -> bool {
        self.without(SinkId::WINDOWS).0 != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// A raw row of any stream on its way to the sinks and windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The row.
    pub row: RawRow,
    /// Which consumers need it.
    pub delivery: SinkSet,
    /// Too late for the windows: earlier than its partition's watermark minus the allowed
    /// lateness when read. Stored raw and in `late_events`, never aggregated.
    pub late: bool,
    /// How far behind its partition's watermark the event was, microseconds (0 when on time).
    pub late_by_us: i64,
}

/// A dead letter on its way to the sinks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The row.
    pub row: DeadLetterRow,
    /// Which consumers need it.
    pub delivery: SinkSet,
}

/// A decoded record's row, or a record that failed decoding, on its way to the raw sinks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RawItem {
    /// One row (a metric sample, an inference request, an analytics event, a score).
    Point(Point),
    /// A record that failed decoding or validation, or that a sink refused.
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

    /// Which consumers need it.
    pub fn delivery(&self) -> SinkSet {
        match self {
            RawItem::Point(p) => p.delivery,
            RawItem::Dead(d) => d.delivery,
        }
    }
}

/// A batch of raw items for one worker's raw sinks.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawBatch {
    /// Points and dead letters, in read order per partition.
    pub items: Vec<RawItem>,
    /// Per partition: one past the highest offset in `items`.
    pub next_offsets: BTreeMap<i32, i64>,
}

impl RawBatch {
    /// Adds an item, advancing its partition's next offset.
    pub fn push(&mut self, item: RawItem) {
        let (partition, offset) = item.position();
        let next = self.next_offsets.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
        self.items.push(item);
    }

    /// The rows `sink` needs.
    pub fn rows_for(&self, sink: SinkId) -> impl Iterator<Item = &Point> + '_ {
        self.items.iter().filter_map(move |i| match i {
            RawItem::Point(p) if p.delivery.contains(sink) => Some(p),
            _ => None,
        })
    }

    /// The dead letters `sink` needs.
    pub fn letters_for(&self, sink: SinkId) -> impl Iterator<Item = &DeadLetterRow> + '_ {
        self.items.iter().filter_map(move |i| match i {
            RawItem::Dead(d) if d.delivery.contains(sink) => Some(&d.row),
            _ => None,
        })
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.next_offsets.is_empty()
    }
}

/// What to commit with the aggregates of windows ending before a frontier.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Windows ending at or before this are final (the frontier minus 1).
    pub committed_watermark_us: u64,
    /// Resume point of every partition seen so far.
    pub partitions: Vec<PartitionOffset>,
}

/// Closed windows and the checkpoint that makes them final.
#[derive(Debug, Clone, Default)]
pub struct AggCommit {
    /// Aggregates of windows ending before the checkpoint's frontier.
    pub rows: Vec<AggRow>,
    /// Resume offsets and committed watermark.
    pub checkpoint: Checkpoint,
}

/// One record of the Parquet archive: the rows a Kafka record became.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Event time.
    pub time_us: i64,
    /// Its rows (one per metric for telemetry).
    pub rows: Vec<RawRow>,
}

/// What one poll of a [`Feed`] gave.
#[derive(Debug)]
pub enum Polled {
    /// A Kafka record's payload.
    Payload {
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// The message value (empty for a tombstone).
        payload: Vec<u8>,
    },
    /// An archived record's rows (already decoded).
    Rows(ArchivedRecord),
    /// Nothing now.
    Empty,
    /// A partition has no more records (the archive's end; Kafka never ends).
    Done(i32),
    /// The feed cannot go on: the source stops.
    Failed(String),
}

/// Where a source reads records: polled without blocking, from the worker thread.
pub trait Feed {
    /// The next record, or what stands instead of one.
    fn poll(&mut self) -> Polled;
    /// `kafka` or `archive`, for names and logs.
    fn kind(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_hold_their_ids() {
        let a = SinkId::raw(0).unwrap();
        let b = SinkId::raw(1).unwrap();
        let s = SinkSet::of([SinkId::WINDOWS, a]);
        assert!(s.contains(a) && s.contains(SinkId::WINDOWS) && !s.contains(b));
        assert!(s.any_raw());
        assert!(!SinkSet::of([SinkId::WINDOWS]).any_raw());
        assert!(s.without(a).without(SinkId::WINDOWS).is_empty());
        assert!(SinkId::raw(SinkId::CAPACITY - 1).is_none());
        assert!(SinkId::raw(SinkId::CAPACITY - 2).is_some());
    }

    #[test]
    fn a_batch_tracks_the_next_offset_of_each_partition() {
        let mut batch = RawBatch::default();
        for (p, o) in [(0, 5), (0, 3), (1, 9)] {
            batch.push(RawItem::Dead(DeadLetter {
                row: DeadLetterRow {
                    partition: p,
                    offset: o,
                    reason: "r".into(),
                    error: "e".into(),
                    payload: Vec::new(),
                },
                delivery: SinkSet::EMPTY,
            }));
        }
        assert_eq!(batch.next_offsets, BTreeMap::from([(0, 6), (1, 10)]));
    }
}
