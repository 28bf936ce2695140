//! The `edge.telemetry` dataflow:
//!
//! ```text
//! KafkaSource ─┬─ raw items ─> RawSink ─> raw writer (PostgreSQL COPY + Parquet rolls)
//!              ├─ points ─> exchange by (device, metric) ─> 1-minute windows ─┐
//!              └─ marks ──────────────────────────────────────────────────────┴─> CommitAggregates (worker 0)
//! ```

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use primespark_connectors::kafka::PartitionReader;
use primespark_operators::checkpoint::CheckpointTracker;
use primespark_operators::window::{Stats, TumblingWindow, WindowSpec};
use primespark_operators::EventTime;
use primespark_schemas::rows::MetricAggRow;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::Scope;
use tokio::sync::mpsc::Sender;

use crate::sinks::{commit_aggregates, raw_sink, AggCommit, FlushPolicy, RawBatch};
use crate::source::{kafka_telemetry_source, RawItem, SourceSpec};

/// Name of the dataflow in `source_offsets`, `dataflow_state` and metrics.
pub const DATAFLOW: &str = "telemetry";
/// Window width: 1 minute.
pub const WINDOW_US: i64 = 60_000_000;

/// Flags the worker loop watches to know when a shutdown has flushed everything.
#[derive(Clone, Default)]
pub struct Drained {
    /// The raw sink handed off its buffer.
    pub raw: Rc<Cell<bool>>,
    /// The commit operator handed off its last checkpoint.
    pub aggregates: Rc<Cell<bool>>,
}

impl Drained {
    /// Both done.
    pub fn all(&self) -> bool {
        self.raw.get() && self.aggregates.get()
    }
}

/// Builds the dataflow in `scope`.
#[allow(clippy::too_many_arguments)]
pub fn build<'s>(
    scope: Scope<'s, EventTime>,
    spec: SourceSpec,
    reader: Option<PartitionReader>,
    tracker: CheckpointTracker,
    raw_tx: Sender<RawBatch>,
    agg_tx: Sender<AggCommit>,
    flush: FlushPolicy,
    commit_interval: Duration,
    drained: &Drained,
) {
    let pressure = spec.pressure.clone();
    let shutdown = spec.shutdown.clone();
    let committed = spec.committed_watermark_us;
    let (raw, marks) = kafka_telemetry_source(scope, spec, reader).ok_err(|item| item);
    let windowed = raw.clone().flat_map(|item: RawItem| match item {
        RawItem::Point(p) if p.delivery.window && !p.late => Some((
            (p.row.device_id, p.row.metric_name),
            p.row.time_us,
            p.row.value,
        )),
        _ => None,
    });
    raw_sink(
        raw,
        raw_tx,
        flush,
        pressure,
        shutdown.clone(),
        drained.raw.clone(),
    );
    let aggregates = windowed
        .tumbling_window(
            WindowSpec {
                name: "device_metrics_1m".into(),
                dataflow: DATAFLOW.into(),
                width_us: WINDOW_US,
                committed_watermark_us: committed,
            },
            |stats: &mut Stats, value: f64| stats.add(value),
        )
        .map(|w| MetricAggRow {
            bucket_us: w.window_start_us,
            device_id: w.key.0,
            metric_name: w.key.1,
            count: w.agg.count as i64,
            sum: w.agg.sum,
            min: w.agg.min,
            max: w.agg.max,
        });
    commit_aggregates(
        aggregates,
        marks,
        tracker,
        agg_tx,
        commit_interval,
        shutdown,
        drained.aggregates.clone(),
    );
}
