//! Per-partition event-time watermarks of a source.
//!
//! Each Kafka partition's watermark is its highest event time minus the out-of-orderness bound;
//! an event below its partition's watermark is late. The source's watermark (the capability it
//! holds) is the minimum over its partitions, except partitions that have been silent for the
//! idle timeout, which stop holding it back. Because lateness is decided per partition, the same
//! partition contents mark the same events late however partitions are spread over workers.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::record::{window_start, SourceMark};

#[derive(Debug)]
struct PartitionClock {
    max_event_us: i64,
    last_seen: Instant,
    /// Window starts with an on-time record in this partition, not yet below the watermark.
    open_windows: BTreeSet<i64>,
}

/// What [`Watermarks::observe`] learned about one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The partition's watermark before the event.
    pub watermark_us: i64,
    /// The event is below it.
    pub late: bool,
    /// The event is the first on-time one of its window in this partition.
    pub opened: Option<SourceMark>,
}

/// Watermarks of the partitions one source reads.
#[derive(Debug)]
pub struct Watermarks {
    out_of_orderness_us: i64,
    allowed_lateness_us: i64,
    width_us: i64,
    idle_timeout: Duration,
    partitions: HashMap<i32, PartitionClock>,
}

impl Watermarks {
    /// Watermarks with the given bound, window width and idle timeout.
    pub fn new(out_of_orderness_us: i64, width_us: i64, idle_timeout: Duration) -> Self {
        Self {
            out_of_orderness_us,
            allowed_lateness_us: 0,
            width_us,
            idle_timeout,
            partitions: HashMap::new(),
        }
    }

    /// Events up to `allowed_lateness_us` behind the watermark still update their windows:
    /// they are not late for the windows, and windows stay open for them that much longer.
    pub fn with_allowed_lateness(mut self, allowed_lateness_us: i64) -> Self {
        self.allowed_lateness_us = allowed_lateness_us.max(0);
        self
    }

    /// Starts tracking `partition` with its highest event time so far (`i64::MIN` for none).
    pub fn add_partition(&mut self, partition: i32, max_event_us: i64, now: Instant) {
        self.partitions.insert(
            partition,
            PartitionClock {
                max_event_us,
                last_seen: now,
                open_windows: BTreeSet::new(),
            },
        );
    }

    fn watermark_of(&self, clock: &PartitionClock) -> i64 {
        clock.max_event_us.saturating_sub(self.out_of_orderness_us)
    }

    /// The partition's watermark (`None`: not tracked, or no event yet).
    pub fn partition_watermark_us(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .filter(|c| c.max_event_us != i64::MIN)
            .map(|c| self.watermark_of(c))
    }

    /// The partition's highest event time so far.
    pub fn max_event_us(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|c| c.max_event_us)
    }

    /// Accounts one event at `offset`. `windowed` says whether the windows still need this
    /// record (replays of committed windows do not open windows).
    pub fn observe(
        &mut self,
        partition: i32,
        offset: i64,
        event_us: i64,
        windowed: bool,
        now: Instant,
    ) -> Observation {
        let out_of_orderness = self.out_of_orderness_us;
        let lateness = self.allowed_lateness_us;
        let width = self.width_us;
        // A window can still receive records until the watermark passes its end plus the
        // allowed lateness.
        let extent = width.saturating_add(lateness);
        let clock = self
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionClock {
                max_event_us: i64::MIN,
                last_seen: now,
                open_windows: BTreeSet::new(),
            });
        clock.last_seen = now;
        let before = clock.max_event_us;
        let watermark_us = before.saturating_sub(out_of_orderness);
        let late = event_us < watermark_us.saturating_sub(lateness);
        let mut opened = None;
        if windowed && !late {
            let start = window_start(event_us, width);
            if clock.open_windows.insert(start) {
                opened = Some(SourceMark::WindowOpened {
                    partition,
                    window_start_us: start,
                    offset,
                    max_event_us: before,
                });
            }
        }
        if event_us > clock.max_event_us {
            clock.max_event_us = event_us;
            let wm = event_us.saturating_sub(out_of_orderness);
            // No on-time record can still arrive for windows that end at or below the watermark.
            while let Some(&first) = clock.open_windows.first() {
                if first.saturating_add(extent) <= wm {
                    clock.open_windows.pop_first();
                } else {
                    break;
                }
            }
        }
        Observation {
            watermark_us,
            late,
            opened,
        }
    }

    /// Stops tracking `partition` (it has no more records): it no longer holds the watermark.
    pub fn remove_partition(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Notes that `partition` is alive (caught up but not silent) without an event.
    pub fn touch(&mut self, partition: i32, now: Instant) {
        if let Some(c) = self.partitions.get_mut(&partition) {
            c.last_seen = now;
        }
    }

    /// The source's watermark: the minimum over partitions that are not idle; `None` when every
    /// partition is idle (the caller then holds its watermark where it is).
    pub fn combined(&self, now: Instant) -> Option<i64> {
        self.partitions
            .values()
            .filter(|c| now.saturating_duration_since(c.last_seen) < self.idle_timeout)
            .map(|c| self.watermark_of(c))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_is_per_partition() {
        let now = Instant::now();
        let mut w = Watermarks::new(5, 100, Duration::from_secs(60));
        w.add_partition(0, i64::MIN, now);
        w.add_partition(1, i64::MIN, now);
        assert!(!w.observe(0, 0, 50, true, now).late);
        assert!(!w.observe(0, 1, 46, true, now).late, "within the bound");
        assert!(w.observe(0, 2, 44, true, now).late, "below 50 - 5");
        // Partition 1 has its own watermark.
        assert!(!w.observe(1, 0, 10, true, now).late);
        assert_eq!(w.combined(now), Some(5));
    }

    #[test]
    fn windows_open_once_and_close_with_the_watermark() {
        let now = Instant::now();
        let mut w = Watermarks::new(0, 100, Duration::from_secs(60));
        let o = w.observe(3, 10, 120, true, now);
        assert_eq!(
            o.opened,
            Some(SourceMark::WindowOpened {
                partition: 3,
                window_start_us: 100,
                offset: 10,
                max_event_us: i64::MIN
            })
        );
        assert_eq!(w.observe(3, 11, 150, true, now).opened, None);
        assert!(w.observe(3, 12, 90, true, now).late);
        // Not windowed: replays of committed windows open nothing.
        assert_eq!(w.observe(3, 13, 250, false, now).opened, None);
        // Window [100, 200) closed when the watermark reached 250; a new [200,300) record opens one.
        assert!(w.observe(3, 14, 260, true, now).opened.is_some());
    }

    #[test]
    fn idle_partitions_stop_holding_back() {
        let start = Instant::now();
        let mut w = Watermarks::new(0, 100, Duration::from_millis(10));
        w.add_partition(0, i64::MIN, start);
        w.add_partition(1, i64::MIN, start);
        w.observe(0, 0, 500, true, start);
        assert_eq!(w.combined(start), Some(i64::MIN));
        let later = start + Duration::from_millis(20);
        w.touch(0, later);
        assert_eq!(w.combined(later), Some(500));
        let much_later = later + Duration::from_millis(20);
        assert_eq!(w.combined(much_later), None);
    }
}
