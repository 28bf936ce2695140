//! The dataflow of one topic; the same shape for every stream, with the windows its kind needs:
//!
//! ```text
//! KafkaSource ─┬─ raw items ─> RawSink ─> raw writer (PostgreSQL COPY + Parquet rolls)
//!   (telemetry: ─> Score ─> ... every sample's anomaly score joins the raw items)
//!              │                  └─ points ─> exchange by key ─> windows ───┐
//!              └─ marks ─────────────────────────────────────────────────────┴─> CommitAggregates (worker 0)
//! ```
//!
//! RawSink is the raw stream's only consumer: it takes the windows' points from each item by
//! reference before the item moves into its batch, where a second consumer would have timely
//! clone every batch of raw items.
//!
//! - `edge.telemetry`: windows per (device, metric) -> `device_metrics_1m`; samples scored by
//!   the anomaly model (`crate::scoring`) add the metrics `anomaly_score` and `anomalies`.
//! - `edge.ai.inference`: windows per (model, source) -> `inference_stats_1m`, and per routing
//!   slice -> `routing_stats_1m` (`primespark_operators::routing`).
//! - `analytics.events`: the task lifecycle join -> `task_stats_1m`, `agent_load_1m`, and API
//!   windows -> `api_events_1m` (`primespark_operators::tasks`); the join's state goes to
//!   `task_state` with the windows it feeds.

use std::cell::Cell;
use std::rc::Rc;

use primespark_operators::checkpoint::CheckpointTracker;
use primespark_operators::control::{Control, Drained};
use primespark_operators::decode::StreamKind;
use primespark_operators::record::{RawItem, SinkId};
use primespark_operators::routing::{InferenceWindowSpec, InferenceWindows};
use primespark_operators::scoring::{ScoreTelemetry, ScoringSpec, ANOMALY_METRIC, SCORE_METRIC};
use primespark_operators::sink::{CommitAggregates, FlushPolicy, RawSink};
use primespark_operators::source::{FeedSource, SourceSpec};
use primespark_operators::tasks::{task_windows, TaskInput, TaskWindowSpec};
use primespark_operators::window::metric_windows;
use primespark_operators::EventTime;
use primespark_schemas::analytics::{AnalyticsEvent, TaskEvent};
use primespark_schemas::flow::{AggCommit, Feed, RawBatch};
use primespark_schemas::inference::InferenceEvent;
use primespark_schemas::intern;
use primespark_schemas::rows::{Agg, AggRow, MetricAggRow, RawRow, Rollup};
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concat, ToStream};
use timely::dataflow::{Scope, StreamVec};
use tokio::sync::mpsc::Sender;

/// The widest window: the checkpoint keeps every partition's records from the first record of
/// its oldest open window of this width, so a restart can rebuild every open window.
pub const WINDOW_US: i64 = Rollup::WIDEST.width_us();

/// Where the raw items go: this worker's raw sinks.
struct RawHandoff {
    tx: Sender<RawBatch>,
    flush: FlushPolicy,
    control: Control,
    drained: Rc<Cell<bool>>,
}

impl RawHandoff {
    /// Hands `raw` to the raw sinks and returns what `split` takes from its items for the
    /// windows: the raw stream has this one consumer, so its batches are never cloned.
    fn split<'s, W: Clone + 'static>(
        self,
        raw: StreamVec<'s, EventTime, RawItem>,
        split: impl FnMut(&RawItem, &mut Vec<W>) + 'static,
    ) -> StreamVec<'s, EventTime, W> {
        raw.raw_sink_split(self.tx, self.flush, &self.control, self.drained, split)
    }
}

/// The on-time point of `item` if the windows need it.
fn windowed(item: &RawItem) -> Option<&RawRow> {
    match item {
        RawItem::Point(p) if p.delivery.contains(SinkId::WINDOWS) && !p.late => Some(&p.row),
        _ => None,
    }
}

/// Hands `raw` to the raw sinks and returns the windows of `kind` over the on-time points that
/// still need windowing, for every rollup (1 minute and 1 hour, each computed from the events,
/// so percentiles stay exact to the sketch). `restored_tasks`: this worker's share of
/// `task_state` (analytics only).
fn sink_and_window<'s>(
    kind: StreamKind,
    raw: StreamVec<'s, EventTime, RawItem>,
    handoff: RawHandoff,
    committed: EventTime,
    lateness: u64,
    out_of_orderness_us: u64,
    restored_tasks: Vec<TaskEvent>,
) -> StreamVec<'s, EventTime, AggRow> {
    let dataflow = kind.name().to_owned();
    let mut outputs = Vec::new();
    match kind {
        StreamKind::Telemetry => {
            // Looked up once: the closure runs for every raw item.
            let (score_metric, anomaly_metric) =
                (intern::name(SCORE_METRIC), intern::name(ANOMALY_METRIC));
            let points = handoff.split(raw, move |item, out| match windowed(item) {
                Some(RawRow::Telemetry(r)) => out.push((
                    (r.device_id.clone(), r.metric_name.clone()),
                    r.time_us,
                    r.value,
                )),
                // Scores join the device's metrics: `anomalies` sums to the count.
                Some(RawRow::Score(s)) => {
                    let anomaly = f64::from(u8::from(s.is_anomaly()));
                    let device = s.device_id.clone();
                    out.push((
                        (device.clone(), score_metric.clone()),
                        s.time_us,
                        f64::from(s.score),
                    ));
                    out.push(((device, anomaly_metric.clone()), s.time_us, anomaly));
                }
                Some(RawRow::Inference(_) | RawRow::Analytics(_)) | None => {}
            });
            outputs.push(metric_windows(points, &dataflow, committed, lateness).map(
                |(rollup, w)| AggRow {
                    rollup,
                    row: Agg::Metrics(MetricAggRow {
                        bucket_us: w.window_start_us,
                        device_id: w.key.0.to_string(),
                        metric_name: w.key.1.to_string(),
                        count: w.agg.count as i64,
                        sum: w.agg.sum,
                        min: w.agg.min,
                        max: w.agg.max,
                    }),
                },
            ));
        }
        StreamKind::Inference => {
            let events: StreamVec<'s, EventTime, InferenceEvent> =
                handoff.split(raw, |item, out| {
                    if let Some(RawRow::Inference(r)) = windowed(item) {
                        out.push(r.event.clone());
                    }
                });
            for rollup in Rollup::ALL {
                let (stats, routing) = events.clone().inference_windows(InferenceWindowSpec {
                    dataflow: dataflow.clone(),
                    width_us: rollup.width_us(),
                    suffix: rollup.suffix().into(),
                    committed_watermark_us: committed,
                    allowed_lateness_us: lateness,
                });
                outputs.push(stats.map(move |r| AggRow {
                    rollup,
                    row: Agg::Inference(r),
                }));
                outputs.push(routing.map(move |r| AggRow {
                    rollup,
                    row: Agg::Routing(r),
                }));
            }
        }
        StreamKind::Analytics => {
            let scope = raw.scope();
            let events = handoff.split(raw, |item, out| {
                if let Some(RawRow::Analytics(r)) = windowed(item) {
                    out.push(r.event.clone());
                }
            });
            // The join's state from the last commit goes in first (at the dataflow's first
            // time), then the replay: events already kept are recognised and skipped.
            let restored = restored_tasks
                .into_iter()
                .map(|event| TaskInput {
                    event,
                    restored: true,
                })
                .to_stream(scope)
                .container::<Vec<_>>();
            let tasks = events
                .clone()
                .flat_map(|e| match e {
                    AnalyticsEvent::Task(t) => Some(TaskInput {
                        event: t,
                        restored: false,
                    }),
                    AnalyticsEvent::Api(_) => None,
                })
                .concat(restored);
            let api = events.flat_map(|e| match e {
                AnalyticsEvent::Api(a) => Some(a),
                AnalyticsEvent::Task(_) => None,
            });
            let out = task_windows(
                tasks,
                api,
                TaskWindowSpec {
                    dataflow: dataflow.clone(),
                    committed_watermark_us: committed,
                    allowed_lateness_us: lateness,
                    out_of_orderness_us,
                },
            );
            outputs.push(out.task_stats.map(|(rollup, r)| AggRow {
                rollup,
                row: Agg::Task(r),
            }));
            outputs.push(out.agent_load.map(|(rollup, r)| AggRow {
                rollup,
                row: Agg::Agent(r),
            }));
            outputs.push(out.api_events.map(|(rollup, r)| AggRow {
                rollup,
                row: Agg::Api(r),
            }));
            outputs.push(out.state.map(|s| AggRow {
                rollup: Rollup::Minute,
                row: Agg::TaskState(s),
            }));
        }
    }
    let mut outputs = outputs.into_iter();
    let first = outputs.next().expect("every stream has windows");
    outputs.fold(first, |all, next| all.concat(next))
}

/// Everything one worker's dataflow of one stream is built from.
pub struct DataflowSpec {
    /// The source's partitions, resume points, event time and flags.
    pub source: SourceSpec,
    /// Where it reads (`None` on a worker with no partitions).
    pub feed: Option<Box<dyn Feed>>,
    /// The aggregate checkpoint, restored from the last commit.
    pub tracker: CheckpointTracker,
    /// This worker's raw sinks.
    pub raw_tx: Sender<RawBatch>,
    /// The aggregate sinks (worker 0's operator commits).
    pub agg_tx: Sender<AggCommit>,
    /// When the raw sink operator hands a batch off.
    pub raw_flush: FlushPolicy,
    /// When the commit operator commits.
    pub commit: FlushPolicy,
    /// This worker's share of `task_state` (analytics only).
    pub restored_tasks: Vec<TaskEvent>,
    /// Anomaly scoring (telemetry only).
    pub scoring: Option<ScoringSpec>,
}

/// Builds the dataflow of `spec` in `scope`; `drained` tells when it has handed off everything.
pub fn build(scope: Scope<'_, EventTime>, spec: DataflowSpec, drained: &Drained) {
    let DataflowSpec {
        source,
        feed,
        tracker,
        raw_tx,
        agg_tx,
        raw_flush,
        commit,
        restored_tasks,
        scoring,
    } = spec;
    let control = source.control.clone();
    let kind = source.kind;
    let committed = source.time.committed_watermark_us;
    let lateness = u64::try_from(source.time.allowed_lateness_us).unwrap_or(0);
    let out_of_orderness = u64::try_from(source.time.out_of_orderness_us).unwrap_or(0);
    let (raw, marks) = scope.feed_source(source, feed).ok_err(|item| item);
    let raw = match scoring {
        Some(scoring) if kind == StreamKind::Telemetry => {
            raw.score_telemetry(scoring, drained.scoring.clone())
        }
        _ => raw,
    };
    let handoff = RawHandoff {
        tx: raw_tx,
        flush: raw_flush,
        control: control.clone(),
        drained: drained.raw.clone(),
    };
    let aggregates = sink_and_window(
        kind,
        raw,
        handoff,
        committed,
        lateness,
        out_of_orderness,
        restored_tasks,
    );
    aggregates.commit_aggregates(
        marks,
        tracker,
        agg_tx,
        commit,
        &control,
        drained.aggregates.clone(),
    );
}
