//! Where each Kafka partition must resume so that aggregates survive a restart exactly once.
//!
//! Aggregates are committed, together with this bookkeeping, whenever the watermark `F` (the
//! commit operator's frontier) advances: every window ending before `F` is final and written.
//! A window ending at or after `F` is still open and its records must be read again after a
//! restart. Sources report, per partition, the offset of the first on-time record of every
//! window they see ([`SourceMark::WindowOpened`]) and how far they have read
//! ([`SourceMark::Progress`]), both at the timely time they were read. At frontier `F` the
//! resume offset of a partition is the least of
//! - the first offsets of its windows that end at or after `F`, and
//! - its read position as of the last mark before `F` (records read later carry higher offsets).
//!
//! Along with it we keep the partition's highest event time just before that offset, so the
//! replay sees the same watermarks and marks the same records late as the first run.

use std::collections::{BTreeMap, HashMap};

use crate::record::SourceMark;
use crate::EventTime;

/// Where one partition resumes.
pub use primespark_schemas::rows::PartitionOffset as PartitionResume;

/// What to commit with the aggregates of windows ending before a frontier.
pub use primespark_schemas::flow::Checkpoint;

/// Bookkeeping of [`SourceMark`]s for one dataflow (lives on the committing worker).
#[derive(Debug)]
pub struct CheckpointTracker {
    width_us: i64,
    allowed_lateness_us: i64,
    /// Marks not yet below the frontier, by time.
    pending: BTreeMap<EventTime, Vec<SourceMark>>,
    /// Read position per partition: (next offset, max event time).
    progress: HashMap<i32, (i64, i64)>,
    /// Open windows per (partition, window start): (first offset, max event time before it).
    open: BTreeMap<(i32, i64), (i64, i64)>,
}

impl CheckpointTracker {
    /// A tracker for windows of `width_us`, starting from the resume points of the last commit.
    pub fn new(width_us: i64, restored: impl IntoIterator<Item = PartitionResume>) -> Self {
        Self {
            width_us,
            allowed_lateness_us: 0,
            pending: BTreeMap::new(),
            progress: restored
                .into_iter()
                .map(|p| (p.partition, (p.next_offset, p.max_event_us)))
                .collect(),
            open: BTreeMap::new(),
        }
    }

    /// Windows stay updatable `allowed_lateness_us` past their end: their records are kept
    /// for a restart that long too.
    pub fn with_allowed_lateness(mut self, allowed_lateness_us: i64) -> Self {
        self.allowed_lateness_us = allowed_lateness_us.max(0);
        self
    }

    /// Records marks a source sent at timely time `time`.
    pub fn add_marks(&mut self, time: EventTime, marks: impl IntoIterator<Item = SourceMark>) {
        self.pending.entry(time).or_default().extend(marks);
    }

    /// The checkpoint at frontier `frontier` (every mark and aggregate before it has arrived).
    pub fn checkpoint(&mut self, frontier: EventTime) -> Checkpoint {
        let later = self.pending.split_off(&frontier);
        for mark in std::mem::replace(&mut self.pending, later)
            .into_values()
            .flatten()
        {
            match mark {
                SourceMark::Progress {
                    partition,
                    next_offset,
                    max_event_us,
                } => {
                    let entry = self
                        .progress
                        .entry(partition)
                        .or_insert((next_offset, max_event_us));
                    if next_offset >= entry.0 {
                        *entry = (next_offset, max_event_us);
                    }
                }
                SourceMark::WindowOpened {
                    partition,
                    window_start_us,
                    offset,
                    max_event_us,
                } => {
                    let entry = self
                        .open
                        .entry((partition, window_start_us))
                        .or_insert((offset, max_event_us));
                    if offset < entry.0 {
                        *entry = (offset, max_event_us);
                    }
                }
            }
        }
        // Windows ending (plus the allowed lateness) before the frontier are final with this
        // checkpoint; the others may still change and must be rebuilt after a restart.
        let width = self.width_us.saturating_add(self.allowed_lateness_us);
        self.open.retain(|(_, start), _| {
            u64::try_from(start.saturating_add(width)).is_ok_and(|end| end >= frontier)
        });
        let mut resume: BTreeMap<i32, (i64, i64)> =
            self.progress.iter().map(|(p, v)| (*p, *v)).collect();
        for ((partition, _), (offset, max_event)) in &self.open {
            let entry = resume.entry(*partition).or_insert((*offset, *max_event));
            if *offset < entry.0 {
                *entry = (*offset, *max_event);
            }
        }
        Checkpoint {
            committed_watermark_us: frontier.saturating_sub(1),
            partitions: resume
                .into_iter()
                .map(|(partition, (next_offset, max_event_us))| PartitionResume {
                    partition,
                    next_offset,
                    max_event_us,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(partition: i32, next_offset: i64, max_event_us: i64) -> SourceMark {
        SourceMark::Progress {
            partition,
            next_offset,
            max_event_us,
        }
    }

    fn opened(partition: i32, window_start_us: i64, offset: i64, max_event_us: i64) -> SourceMark {
        SourceMark::WindowOpened {
            partition,
            window_start_us,
            offset,
            max_event_us,
        }
    }

    #[test]
    fn resumes_at_first_record_of_open_window() {
        let mut t = CheckpointTracker::new(100, []);
        // Partition 0 read offsets 0..10 at time 0; window [0,100) opened at offset 0,
        // window [100,200) at offset 6.
        t.add_marks(
            0,
            [
                opened(0, 0, 0, i64::MIN),
                opened(0, 100, 6, 95),
                progress(0, 10, 150),
            ],
        );
        // Nothing final yet: resume from the start.
        let c = t.checkpoint(50);
        assert_eq!(c.committed_watermark_us, 49);
        assert_eq!(
            c.partitions,
            vec![PartitionResume {
                partition: 0,
                next_offset: 0,
                max_event_us: i64::MIN
            }]
        );
        // Watermark 120: window [0,100) is final, [100,200) is not.
        let c = t.checkpoint(120);
        assert_eq!(
            c.partitions,
            vec![PartitionResume {
                partition: 0,
                next_offset: 6,
                max_event_us: 95
            }]
        );
        // A window ending at the frontier is not final yet: its aggregate is emitted at time 200.
        assert_eq!(t.checkpoint(200).partitions[0].next_offset, 6);
        // Everything final: resume after the last read record.
        let c = t.checkpoint(201);
        assert_eq!(
            c.partitions,
            vec![PartitionResume {
                partition: 0,
                next_offset: 10,
                max_event_us: 150
            }]
        );
    }

    #[test]
    fn marks_at_or_after_frontier_wait() {
        let mut t = CheckpointTracker::new(
            100,
            [PartitionResume {
                partition: 1,
                next_offset: 40,
                max_event_us: 7,
            }],
        );
        t.add_marks(300, [progress(1, 50, 310)]);
        let c = t.checkpoint(300);
        assert_eq!(
            c.partitions[0].next_offset, 40,
            "a mark at the frontier is not yet complete"
        );
        let c = t.checkpoint(301);
        assert_eq!(c.partitions[0].next_offset, 50);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = CheckpointTracker::new(100, []);
        t.add_marks(
            10,
            [opened(0, 0, 3, 1), progress(0, 5, 20), progress(1, 9, 20)],
        );
        let c = t.checkpoint(50);
        assert_eq!(
            c.partitions,
            vec![
                PartitionResume {
                    partition: 0,
                    next_offset: 3,
                    max_event_us: 1
                },
                PartitionResume {
                    partition: 1,
                    next_offset: 9,
                    max_event_us: 20
                },
            ]
        );
    }
}
