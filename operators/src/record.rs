//! Records that flow between primespark's operators. All are serde so that timely can exchange
//! them between processes of a cluster. What flows on to the sinks (points, dead letters, their
//! [`SinkSet`]s, batches) is defined in `primespark_schemas::flow` and re-exported here.

pub use primespark_schemas::flow::{DeadLetter, Point, RawBatch, RawItem, SinkId, SinkSet};
use serde::{Deserialize, Serialize};

/// One Kafka message as read by a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Kafka partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// The message value, as published.
    pub payload: Vec<u8>,
    /// Which consumers need it.
    pub delivery: SinkSet,
    /// The partition's watermark just before this record: an event earlier than this is late.
    pub watermark_us: i64,
    /// How far behind the watermark an event may be and still update its window
    /// (`windows.allowed_lateness`); later than that it is only stored raw and in `late_events`.
    pub allowed_lateness_us: i64,
}

/// Progress a source reports so that the checkpoint knows where a partition must resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceMark {
    /// Everything below `next_offset` has been read; `max_event_us` is the partition's highest
    /// event time so far (its watermark is that minus the out-of-orderness bound).
    Progress {
        /// Kafka partition.
        partition: i32,
        /// Next offset to read.
        next_offset: i64,
        /// Highest event time seen, or `i64::MIN` if none.
        max_event_us: i64,
    },
    /// The first on-time record of window `window_start_us` in this partition is at `offset`;
    /// `max_event_us` is the partition's highest event time just before it.
    WindowOpened {
        /// Kafka partition.
        partition: i32,
        /// Window start, microseconds since the epoch.
        window_start_us: i64,
        /// Offset of the window's first record in this partition.
        offset: i64,
        /// Highest event time seen before that record, or `i64::MIN`.
        max_event_us: i64,
    },
}

/// Start of the tumbling window of width `width_us` that contains `time_us`.
pub fn window_start(time_us: i64, width_us: i64) -> i64 {
    time_us.div_euclid(width_us) * width_us
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_start_floors() {
        assert_eq!(window_start(125, 60), 120);
        assert_eq!(window_start(120, 60), 120);
        assert_eq!(window_start(-1, 60), -60);
    }
}
