//! The one table of streams: for each stream its dataflow name, default topic, message key,
//! how its records decode into raw rows, its raw tables (PostgreSQL and archive) and its
//! aggregate tables per rollup.
//!
//! The DDL's hypertables, retention, the SQL catalog, the archive's recovery and backfill, and
//! the dashboards' tests read their table names from here instead of writing lists of their own;
//! a new stream is one more entry in [`STREAMS`] (plus its decoder and windows).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::analytics::AnalyticsEvent;
use crate::inference::InferenceEvent;
use crate::rows::{AnalyticsRow, InferenceRow, RawRow, Rollup, TelemetryRow};
use crate::telemetry::TelemetryEvent;
use crate::{DecodeError, DecodeLimits};

/// Which event shape a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StreamKind {
    /// `edge.telemetry`: one row per metric.
    Telemetry,
    /// `edge.ai.inference`: one row per request.
    Inference,
    /// `analytics.events`: one row per task lifecycle or API event.
    Analytics,
}

/// A table of raw rows (one row per event, or per metric of an event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawTable {
    /// PostgreSQL table (and the unified SQL table's name).
    pub name: &'static str,
    /// Its event-time column.
    pub time_column: &'static str,
    /// TimescaleDB compression `segmentby` column, the column dashboards filter by.
    pub segment_by: &'static str,
    /// The archive's listing table of the same rows, if the archive has them.
    pub archive: Option<ArchiveTable>,
}

/// Where the Parquet archive keeps a table, and its name in SQL (`archive.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveTable {
    /// SQL name (`telemetry_raw`, `anomaly_scores`, ...).
    pub name: &'static str,
    /// The folder under the NAS root: `topic=<topic>` for a stream's rolls (the topic comes from
    /// configuration, see [`ArchiveDir`]), `table=<name>` for the others.
    pub dir: ArchiveDir,
}

/// A folder of the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveDir {
    /// `topic=<the stream's topic>`, partitioned by `date` and `hour`.
    Topic,
    /// `table=<name>`, partitioned by `date` and `hour`.
    Table(&'static str),
}

/// One aggregate family: the same windows at every [`Rollup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateFamily {
    /// Family name, e.g. `device_metrics`; the tables are `<name>_1m`, `<name>_1h` and
    /// `<name>_1d`.
    pub name: &'static str,
    /// The 1-minute table.
    pub minute: &'static str,
    /// The 1-hour table.
    pub hour: &'static str,
    /// The 1-day table.
    pub day: &'static str,
    /// Its windows need every event since the stream's beginning (the task lifecycle join):
    /// a backfill of a time range cannot rebuild them.
    pub whole_history: bool,
}

impl AggregateFamily {
    /// The family's table at `rollup`.
    pub fn table(&self, rollup: Rollup) -> &'static str {
        match rollup {
            Rollup::Minute => self.minute,
            Rollup::Hour => self.hour,
            Rollup::Day => self.day,
        }
    }

    /// Every table of the family, narrowest first, with its rollup.
    pub fn tables(&self) -> impl Iterator<Item = (Rollup, &'static str)> + '_ {
        Rollup::ALL.into_iter().map(|r| (r, self.table(r)))
    }
}

/// How a stream's records become raw rows: the rows of one record at `partition`/`offset`
/// appended to the caller's buffer (reused from record to record) and the event time, or why
/// the record is invalid (nothing appended then).
pub type Decoder = fn(&[u8], &DecodeLimits, i32, i64, &mut Vec<RawRow>) -> Result<i64, DecodeError>;

/// Everything that is fixed about a stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamDef {
    /// Which stream.
    pub kind: StreamKind,
    /// Its dataflow's name: in `source_offsets`, `dataflow_state`, metrics and logs.
    pub name: &'static str,
    /// The `[kafka.topics]` key naming its topic.
    pub topic_key: &'static str,
    /// The topic when the configuration names none.
    pub default_topic: &'static str,
    /// What producers key its messages by.
    pub key: &'static str,
    /// Bytes -> rows.
    pub decode: Decoder,
    /// Its raw tables in PostgreSQL; the first holds the events themselves, the others rows
    /// derived from them (anomaly scores).
    pub raw_tables: &'static [RawTable],
    /// Its aggregate families.
    pub aggregates: &'static [AggregateFamily],
}

impl StreamDef {
    /// The archive table of the stream's own raw rolls (`telemetry_raw`, ...).
    pub fn archive_table(&self) -> &'static str {
        self.raw_tables
            .iter()
            .find_map(|t| match t.archive {
                Some(ArchiveTable {
                    name,
                    dir: ArchiveDir::Topic,
                }) => Some(name),
                _ => None,
            })
            .unwrap_or(self.name)
    }

    /// Every aggregate table of the stream, with its rollup.
    pub fn aggregate_tables(&self) -> impl Iterator<Item = (Rollup, &'static str)> + '_ {
        self.aggregates.iter().flat_map(AggregateFamily::tables)
    }

    /// Whether the stream's rolls also write `table=anomaly_scores` (named after its offsets).
    pub fn writes_scores(&self) -> bool {
        self.raw_tables
            .iter()
            .any(|t| matches!(t.archive, Some(a) if a.dir == ArchiveDir::Table(SCORES_ARCHIVE)))
    }
}

/// The archive table (and folder `table=anomaly_scores`) of the anomaly scores.
pub const SCORES_ARCHIVE: &str = "anomaly_scores";

const fn family(name: &'static str, [minute, hour, day]: [&'static str; 3]) -> AggregateFamily {
    AggregateFamily {
        name,
        minute,
        hour,
        day,
        whole_history: false,
    }
}

/// A family fed by the task lifecycle join.
const fn joined(name: &'static str, tables: [&'static str; 3]) -> AggregateFamily {
    AggregateFamily {
        whole_history: true,
        ..family(name, tables)
    }
}

/// Every stream, in a fixed order (the order dataflows are built and listed in).
pub const STREAMS: [StreamDef; 3] = [
    StreamDef {
        kind: StreamKind::Telemetry,
        name: "telemetry",
        topic_key: "telemetry",
        default_topic: "edge.telemetry",
        key: "device_id",
        decode: decode_telemetry,
        raw_tables: &[
            RawTable {
                name: "device_metrics",
                time_column: "time",
                segment_by: "device_id",
                archive: Some(ArchiveTable {
                    name: "telemetry_raw",
                    dir: ArchiveDir::Topic,
                }),
            },
            RawTable {
                name: "anomaly_scores",
                time_column: "time",
                segment_by: "device_id",
                archive: Some(ArchiveTable {
                    name: SCORES_ARCHIVE,
                    dir: ArchiveDir::Table(SCORES_ARCHIVE),
                }),
            },
            RawTable {
                name: "anomalies",
                time_column: "time",
                segment_by: "device_id",
                archive: None,
            },
        ],
        aggregates: &[family(
            "device_metrics",
            [
                "device_metrics_1m",
                "device_metrics_1h",
                "device_metrics_1d",
            ],
        )],
    },
    StreamDef {
        kind: StreamKind::Inference,
        name: "inference",
        topic_key: "inference",
        default_topic: "edge.ai.inference",
        key: "request_id",
        decode: decode_inference,
        raw_tables: &[RawTable {
            name: "ai_inference_results",
            time_column: "time",
            segment_by: "model_name",
            archive: Some(ArchiveTable {
                name: "inference_raw",
                dir: ArchiveDir::Topic,
            }),
        }],
        aggregates: &[
            family(
                "inference_stats",
                [
                    "inference_stats_1m",
                    "inference_stats_1h",
                    "inference_stats_1d",
                ],
            ),
            family(
                "routing_stats",
                ["routing_stats_1m", "routing_stats_1h", "routing_stats_1d"],
            ),
        ],
    },
    StreamDef {
        kind: StreamKind::Analytics,
        name: "analytics",
        topic_key: "events",
        default_topic: "analytics.events",
        key: "task_id",
        decode: decode_analytics,
        raw_tables: &[RawTable {
            name: "analytics_events",
            time_column: "time",
            segment_by: "event_type",
            archive: Some(ArchiveTable {
                name: "analytics_raw",
                dir: ArchiveDir::Topic,
            }),
        }],
        aggregates: &[
            joined(
                "task_stats",
                ["task_stats_1m", "task_stats_1h", "task_stats_1d"],
            ),
            joined(
                "agent_load",
                ["agent_load_1m", "agent_load_1h", "agent_load_1d"],
            ),
            family(
                "api_events",
                ["api_events_1m", "api_events_1h", "api_events_1d"],
            ),
        ],
    },
];

/// PostgreSQL tables no stream owns: written beside every stream's rows.
pub const SHARED_TABLES: &[&str] = &[
    "dead_letters",
    "late_events",
    "source_offsets",
    "dataflow_state",
];

impl StreamKind {
    /// Every stream, in [`STREAMS`] order.
    pub const ALL: [StreamKind; 3] = [
        StreamKind::Telemetry,
        StreamKind::Inference,
        StreamKind::Analytics,
    ];

    /// The stream's entry in [`STREAMS`].
    pub fn def(self) -> &'static StreamDef {
        match self {
            StreamKind::Telemetry => &STREAMS[0],
            StreamKind::Inference => &STREAMS[1],
            StreamKind::Analytics => &STREAMS[2],
        }
    }

    /// Its dataflow's name.
    pub fn name(self) -> &'static str {
        self.def().name
    }
}

/// Every raw table of every stream.
pub fn raw_tables() -> impl Iterator<Item = &'static RawTable> {
    STREAMS.iter().flat_map(|s| s.raw_tables.iter())
}

/// Every aggregate family of every stream.
pub fn aggregate_families() -> impl Iterator<Item = &'static AggregateFamily> {
    STREAMS.iter().flat_map(|s| s.aggregates.iter())
}

fn decode_telemetry(
    payload: &[u8],
    limits: &DecodeLimits,
    partition: i32,
    offset: i64,
    rows: &mut Vec<RawRow>,
) -> Result<i64, DecodeError> {
    limits.check(payload)?;
    let row = |device_id: &Arc<str>, time_us, name: &str, value| {
        RawRow::Telemetry(TelemetryRow {
            time_us,
            device_id: device_id.clone(),
            metric_name: crate::intern::name(name),
            value,
            partition,
            offset,
        })
    };
    // Well-formed events go from the payload's borrowed strings to the shared names, owning
    // nothing in between; the rest take the checked path, which names every error.
    if let Some(event) = TelemetryEvent::decode_borrowed(payload, limits) {
        let device_id = crate::intern::name(&event.device_id);
        rows.extend(
            event
                .metrics
                .iter()
                .map(|(name, value)| row(&device_id, event.time_us, name, *value)),
        );
        return Ok(event.time_us);
    }
    let event = TelemetryEvent::decode_checked(payload, limits)?;
    let device_id = crate::intern::name(&event.device_id);
    rows.extend(
        event
            .metrics
            .iter()
            .map(|m| row(&device_id, event.time_us, &m.name, m.value)),
    );
    Ok(event.time_us)
}

fn decode_inference(
    payload: &[u8],
    limits: &DecodeLimits,
    partition: i32,
    offset: i64,
    rows: &mut Vec<RawRow>,
) -> Result<i64, DecodeError> {
    let event = InferenceEvent::decode(payload, limits)?;
    let time_us = event.time_us;
    rows.push(RawRow::Inference(Box::new(InferenceRow {
        event,
        partition,
        offset,
    })));
    Ok(time_us)
}

fn decode_analytics(
    payload: &[u8],
    limits: &DecodeLimits,
    partition: i32,
    offset: i64,
    rows: &mut Vec<RawRow>,
) -> Result<i64, DecodeError> {
    let event = AnalyticsEvent::decode(payload, limits)?;
    let time_us = event.time_us();
    rows.push(RawRow::Analytics(Box::new(AnalyticsRow {
        event,
        partition,
        offset,
    })));
    Ok(time_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_finds_its_own_entry() {
        for kind in StreamKind::ALL {
            assert_eq!(kind.def().kind, kind);
        }
        assert_eq!(StreamKind::Telemetry.def().archive_table(), "telemetry_raw");
        assert!(StreamKind::Telemetry.def().writes_scores());
        assert!(!StreamKind::Inference.def().writes_scores());
    }

    #[test]
    fn decoders_append_to_the_buffer_and_leave_it_alone_on_a_bad_record() {
        let limits = DecodeLimits::default();
        let decode = StreamKind::Telemetry.def().decode;
        let mut rows = Vec::new();
        let good = br#"{"device_id":"pi-1","metrics":{"load_avg":2,"cpu_percent":1.5},"timestamp":1762351387123}"#;
        let time_us = decode(good, &limits, 2, 7, &mut rows).unwrap();
        assert_eq!(time_us, 1_762_351_387_123_000);
        assert!(decode(b"{oops", &limits, 2, 8, &mut rows).is_err());
        assert!(decode(
            br#"{"device_id":"pi-1","metrics":{"cpu_percent":101},"timestamp":1}"#,
            &limits,
            2,
            9,
            &mut rows
        )
        .is_err());
        decode(good, &limits, 2, 10, &mut rows).unwrap();
        let seen: Vec<(i64, &str)> = rows
            .iter()
            .map(|r| match r {
                RawRow::Telemetry(t) => (t.offset, &*t.metric_name),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            seen,
            [
                (7, "cpu_percent"),
                (7, "load_avg"),
                (10, "cpu_percent"),
                (10, "load_avg")
            ]
        );
        // Rows of one event share their device's name.
        match (&rows[0], &rows[1]) {
            (RawRow::Telemetry(a), RawRow::Telemetry(b)) => {
                assert!(Arc::ptr_eq(&a.device_id, &b.device_id));
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn table_names_are_unique() {
        let mut names: Vec<&str> = raw_tables().map(|t| t.name).collect();
        names.extend(aggregate_families().flat_map(|f| [f.minute, f.hour]));
        names.extend(SHARED_TABLES);
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "{names:?}");
        for f in aggregate_families() {
            assert_eq!(f.minute, format!("{}_1m", f.name));
            assert_eq!(f.hour, format!("{}_1h", f.name));
        }
    }
}
