//! Row types the sinks write: what a decoded event becomes in PostgreSQL and Parquet.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::analytics::{AnalyticsEvent, TaskEvent};
use crate::inference::InferenceEvent;

/// One metric of one device at one time, with its Kafka provenance (`device_metrics`,
/// `telemetry_raw`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRow {
    /// Event time, microseconds since the epoch.
    pub time_us: i64,
    /// Reporting device (shared by the rows of its samples: [`crate::intern`]).
    #[serde(with = "crate::intern::serde_name")]
    pub device_id: Arc<str>,
    /// Metric name (shared likewise).
    #[serde(with = "crate::intern::serde_name")]
    pub metric_name: Arc<str>,
    /// Value, always finite.
    pub value: f64,
    /// Kafka partition it came from.
    pub partition: i32,
    /// Kafka offset it came from.
    pub offset: i64,
}

/// A telemetry sample's anomaly score (`anomaly_scores`; at or over the threshold also
/// `anomalies`), with the Kafka provenance of the sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    /// The sample's event time, microseconds since the epoch.
    pub time_us: i64,
    /// The sample's device (the sample's shared name: [`crate::intern`]).
    #[serde(with = "crate::intern::serde_name")]
    pub device_id: Arc<str>,
    /// The model that scored it (shared by the model's scores).
    #[serde(with = "crate::intern::serde_name")]
    pub model: Arc<str>,
    /// The score (the shipped model: `0..=1`, anomaly probability).
    pub score: f32,
    /// The model's threshold: the sample is an anomaly when `score >= threshold`.
    pub threshold: f32,
    /// The backend that ran the model (`cpu`, `hailo`; shared likewise).
    #[serde(with = "crate::intern::serde_name")]
    pub backend: Arc<str>,
    /// The model's input metrics as the sample carried them (missing ones absent); kept for
    /// anomalies only, for the `anomalies` table.
    pub features: Vec<crate::telemetry::Metric>,
    /// Kafka partition of the sample.
    pub partition: i32,
    /// Kafka offset of the sample.
    pub offset: i64,
}

impl ScoreRow {
    /// Whether the sample is an anomaly.
    pub fn is_anomaly(&self) -> bool {
        self.score >= self.threshold
    }
}

/// One inference request with its Kafka provenance (`ai_inference_results`,
/// `inference_raw`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceRow {
    /// The validated event.
    pub event: InferenceEvent,
    /// Kafka partition it came from.
    pub partition: i32,
    /// Kafka offset it came from.
    pub offset: i64,
}

/// One task or API event with its Kafka provenance (`analytics_events`, `analytics_raw`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalyticsRow {
    /// The validated event.
    pub event: AnalyticsEvent,
    /// Kafka partition it came from.
    pub partition: i32,
    /// Kafka offset it came from.
    pub offset: i64,
}

/// A raw row of any stream, on its way to the raw sinks.
///
/// Telemetry rows, five or so per event, are the many: they are kept inline, and the larger
/// rows are boxed so that every row (and every item holding one) moves as a telemetry row's
/// size through the dataflow's buffers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RawRow {
    /// `edge.telemetry` -> `device_metrics`.
    Telemetry(TelemetryRow),
    /// `edge.ai.inference` -> `ai_inference_results`.
    Inference(Box<InferenceRow>),
    /// `analytics.events` -> `analytics_events`.
    Analytics(Box<AnalyticsRow>),
    /// A telemetry sample's anomaly score -> `anomaly_scores` (and `anomalies`).
    Score(Box<ScoreRow>),
}

impl RawRow {
    /// Event time, microseconds since the epoch.
    pub fn time_us(&self) -> i64 {
        match self {
            RawRow::Telemetry(r) => r.time_us,
            RawRow::Inference(r) => r.event.time_us,
            RawRow::Analytics(r) => r.event.time_us(),
            RawRow::Score(r) => r.time_us,
        }
    }

    /// About the bytes the row takes in an uncompressed Arrow batch: its strings plus fixed-width
    /// columns (time, value, partition, offset). Rolls are cut by it (`nas.roll_bytes`).
    pub fn approx_bytes(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        const FIXED: usize = 8 + 8 + 4 + 8;
        FIXED
            + match self {
                RawRow::Telemetry(r) => r.device_id.len() + r.metric_name.len(),
                RawRow::Inference(r) => {
                    let e = &r.event;
                    e.model.len() + opt(&e.device_id) + opt(&e.request_id) + 24
                }
                RawRow::Analytics(r) => match &r.event {
                    crate::analytics::AnalyticsEvent::Task(t) => {
                        t.task_id.len() + opt(&t.task_type) + opt(&t.priority) + opt(&t.agent_id)
                    }
                    crate::analytics::AnalyticsEvent::Api(a) => {
                        a.event_type.len() + a.endpoint.len() + opt(&a.user_id) + opt(&a.data)
                    }
                },
                RawRow::Score(r) => r.device_id.len() + r.model.len() + r.backend.len() + 8,
            }
    }

    /// Kafka partition and offset.
    pub fn position(&self) -> (i32, i64) {
        match self {
            RawRow::Telemetry(r) => (r.partition, r.offset),
            RawRow::Inference(r) => (r.partition, r.offset),
            RawRow::Analytics(r) => (r.partition, r.offset),
            RawRow::Score(r) => (r.partition, r.offset),
        }
    }
}

/// The window width of an aggregate table: `*_1m`, `*_1h` or `*_1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Rollup {
    /// 1-minute windows (`*_1m`).
    Minute,
    /// 1-hour windows (`*_1h`), for long dashboard ranges.
    Hour,
    /// 1-day windows (UTC days, `*_1d`), kept longest: the seeds' `daily_inference_stats`.
    Day,
}

impl Rollup {
    /// Every rollup, narrowest first.
    pub const ALL: [Rollup; 3] = [Rollup::Minute, Rollup::Hour, Rollup::Day];

    /// The widest rollup: a restart replays the records of its open window.
    pub const WIDEST: Rollup = Rollup::Day;

    /// Window width, microseconds.
    pub const fn width_us(self) -> i64 {
        match self {
            Rollup::Minute => 60_000_000,
            Rollup::Hour => 3_600_000_000,
            Rollup::Day => 86_400_000_000,
        }
    }

    /// Table-name suffix: `1m`, `1h` or `1d`.
    pub fn suffix(self) -> &'static str {
        match self {
            Rollup::Minute => "1m",
            Rollup::Hour => "1h",
            Rollup::Day => "1d",
        }
    }
}

/// The row of one aggregate table family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Agg {
    /// `device_metrics_*`.
    Metrics(MetricAggRow),
    /// `inference_stats_*`.
    Inference(InferenceStatsRow),
    /// `routing_stats_*`.
    Routing(RoutingStatsRow),
    /// `task_stats_*`.
    Task(TaskStatsRow),
    /// `agent_load_*`.
    Agent(AgentLoadRow),
    /// `api_events_*`.
    Api(ApiEventsRow),
    /// `task_state`: the lifecycle join's state, committed with the windows it feeds so that a
    /// restart rebuilds the join exactly (not a window; `rollup` is ignored).
    TaskState(TaskStateChange),
}

/// A change to `task_state`, the task events the lifecycle join still needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskStateChange {
    /// Keep this event (first of its kind for its task).
    Keep(TaskEvent),
    /// The task finished long enough ago that no open window needs it: forget all its events.
    Retire(String),
}

/// A closed window's row of any aggregate table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggRow {
    /// Window width.
    pub rollup: Rollup,
    /// The row.
    pub row: Agg,
}

impl AggRow {
    /// Window start, microseconds since the epoch.
    pub fn bucket_us(&self) -> i64 {
        match &self.row {
            Agg::Metrics(r) => r.bucket_us,
            Agg::Inference(r) => r.bucket_us,
            Agg::Routing(r) => r.bucket_us,
            Agg::Task(r) => r.bucket_us,
            Agg::Agent(r) => r.bucket_us,
            Agg::Api(r) => r.bucket_us,
            Agg::TaskState(TaskStateChange::Keep(e)) => e.time_us,
            Agg::TaskState(TaskStateChange::Retire(_)) => 0,
        }
    }

    /// The table the row belongs to, e.g. `device_metrics_1m` (`task_state` for join state).
    pub fn table(&self) -> &'static str {
        self.row
            .family()
            .map_or("task_state", |f| f.table(self.rollup))
    }
}

impl Agg {
    /// The aggregate family of the row, from the table of streams (`None`: join state, not a
    /// window).
    pub fn family(&self) -> Option<&'static crate::streams::AggregateFamily> {
        use crate::streams::StreamKind;
        let (kind, index) = match self {
            Agg::Metrics(_) => (StreamKind::Telemetry, 0),
            Agg::Inference(_) => (StreamKind::Inference, 0),
            Agg::Routing(_) => (StreamKind::Inference, 1),
            Agg::Task(_) => (StreamKind::Analytics, 0),
            Agg::Agent(_) => (StreamKind::Analytics, 1),
            Agg::Api(_) => (StreamKind::Analytics, 2),
            Agg::TaskState(_) => return None,
        };
        kind.def().aggregates.get(index)
    }
}

impl AggRow {
    /// What a row is the value of: table, bucket and key. A later row with the same identity
    /// (a window updated by a late event) replaces an earlier one.
    pub fn identity(&self) -> (&'static str, i64, &str, &str) {
        let (a, b) = match &self.row {
            Agg::Metrics(m) => (m.device_id.as_str(), m.metric_name.as_str()),
            Agg::Inference(i) => (i.model.as_str(), i.source.as_str()),
            Agg::Routing(r) => (r.routing_strategy.as_str(), ""),
            Agg::Task(r) => (r.task_type.as_str(), ""),
            Agg::Agent(r) => (r.agent_id.as_str(), ""),
            Agg::Api(r) => (r.event_type.as_str(), r.endpoint.as_str()),
            Agg::TaskState(TaskStateChange::Keep(e)) => (e.task_id.as_str(), e.kind.as_str()),
            Agg::TaskState(TaskStateChange::Retire(id)) => (id.as_str(), "retire"),
        };
        (self.table(), self.bucket_us(), a, b)
    }
}

/// Keeps the last row of each identity, in first-seen order: rows of a commit may hold a window
/// and its later updates.
pub fn latest_rows(rows: &[AggRow]) -> Vec<AggRow> {
    let mut last: std::collections::HashMap<(&'static str, i64, &str, &str), usize> =
        std::collections::HashMap::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        last.insert(r.identity(), i);
    }
    rows.iter()
        .enumerate()
        .filter(|(i, r)| last.get(&r.identity()) == Some(i))
        .map(|(_, r)| r.clone())
        .collect()
}

/// An event too late for its windows (`late_events`): stored raw, never aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LateEventRow {
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// Event time, microseconds since the epoch.
    pub event_time_us: i64,
    /// How far behind its partition's watermark it arrived, microseconds.
    pub late_by_us: i64,
}

/// A record that could not become an event (`dead_letters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRow {
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// Stable reason code (`malformed_json`, `out_of_range`, ...).
    pub reason: String,
    /// One-line error naming the field.
    pub error: String,
    /// Original bytes.
    pub payload: Vec<u8>,
}

/// One closed 1-minute window of one (device, metric) (`device_metrics_1m`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricAggRow {
    /// Window start, microseconds since the epoch.
    pub bucket_us: i64,
    /// Device.
    pub device_id: String,
    /// Metric.
    pub metric_name: String,
    /// Number of samples.
    pub count: i64,
    /// Sum of values.
    pub sum: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

/// Where a sink resumes one Kafka partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    /// Kafka partition.
    pub partition: i32,
    /// First offset the sink still needs.
    pub next_offset: i64,
    /// Highest event time in the partition before `next_offset` (`i64::MIN` for none).
    pub max_event_us: i64,
}

/// One closed window of one (model, source) (`inference_stats_1m`, `_1h`, `_1d`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceStatsRow {
    /// Window start, microseconds since the epoch.
    pub bucket_us: i64,
    /// Model name.
    pub model: String,
    /// `edge` or `cloud`.
    pub source: String,
    /// Requests.
    pub count: i64,
    /// Requests with `status = error`.
    pub errors: i64,
    /// Latency percentiles, milliseconds (0.5% relative error).
    pub latency_p50_ms: f64,
    /// 95th percentile.
    pub latency_p95_ms: f64,
    /// 99th percentile.
    pub latency_p99_ms: f64,
    /// Mean `prompt_length`.
    pub avg_input_tokens: f64,
    /// Mean `response_length`.
    pub avg_output_tokens: f64,
    /// `sum(response_length) / sum(latency seconds)`; `None` when no time was spent.
    pub output_tokens_per_s: Option<f64>,
    /// Mean latency, milliseconds (the seeds' "Edge vs Cloud" panel charts it by source;
    /// weight it by `count` when averaging windows).
    pub avg_latency_ms: f64,
}

/// One closed window of one routing slice (`routing_stats_1m`, `routing_stats_1h`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingStatsRow {
    /// Window start, microseconds since the epoch.
    pub bucket_us: i64,
    /// `all`, or one strategy: `edge_first`, `cloud_first`, `balanced`.
    pub routing_strategy: String,
    /// Requests served at the edge.
    pub edge_requests: i64,
    /// Requests served in the cloud.
    pub cloud_requests: i64,
    /// Edge requests among all.
    pub edge_share: f64,
    /// Fallbacks among requests that tried the edge first; `None` when none did.
    pub cloud_fallback_rate: Option<f64>,
    /// `ok` among edge requests; `None` without edge requests.
    pub edge_success_rate: Option<f64>,
    /// `ok` among cloud requests; `None` without cloud requests.
    pub cloud_success_rate: Option<f64>,
    /// 95th percentile edge latency, milliseconds; `None` without edge requests.
    pub edge_p95_ms: Option<f64>,
    /// 95th percentile cloud latency, milliseconds; `None` without cloud requests.
    pub cloud_p95_ms: Option<f64>,
    /// Requests that tried the edge first: the denominator of `cloud_fallback_rate`, so that
    /// windows combine as `sum(fallbacks) / sum(tried_edge_first)`.
    pub tried_edge_first: i64,
    /// Requests that fell back from the edge to the cloud.
    pub fallbacks: i64,
}

/// One closed window of one task type (`task_stats_1m`, `task_stats_1h`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatsRow {
    /// Window start, microseconds since the epoch.
    pub bucket_us: i64,
    /// Task type, e.g. `voice_recognition`.
    pub task_type: String,
    /// `task_created` events in the window.
    pub created: i64,
    /// `task_assigned` events (of tasks whose creation was seen) in the window.
    pub assigned: i64,
    /// `task_started` events (of tasks whose creation was seen) in the window.
    pub started: i64,
    /// `task_completed` events (of tasks whose creation was seen) in the window.
    pub completed: i64,
    /// `task_failed` events (of tasks whose creation was seen) in the window.
    pub failed: i64,
    /// Wait time (created -> started) of tasks started in the window, median, milliseconds.
    pub wait_p50_ms: Option<f64>,
    /// Wait time, 95th percentile.
    pub wait_p95_ms: Option<f64>,
    /// Run time (started -> completed or failed) of tasks finished in the window, median, ms.
    pub run_p50_ms: Option<f64>,
    /// Run time, 95th percentile.
    pub run_p95_ms: Option<f64>,
    /// Tasks created before the window's end and not finished by then.
    pub backlog: i64,
}

/// One closed window of one agent (`agent_load_1m`, `agent_load_1h`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentLoadRow {
    /// Window start, microseconds since the epoch.
    pub bucket_us: i64,
    /// Agent, from `task_assigned`.
    pub agent_id: String,
    /// Tasks assigned to the agent in the window.
    pub assigned: i64,
    /// Its tasks that completed in the window.
    pub completed: i64,
    /// Its tasks that failed in the window.
    pub failed: i64,
    /// Tasks assigned to it and not finished at the window's end.
    pub active: i64,
}

/// One closed window of one (event type, endpoint) of API events (`api_events_1m`,
/// `api_events_1h`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiEventsRow {
    /// Window start, microseconds since the epoch.
    pub bucket_us: i64,
    /// `event_type`, e.g. `llm_generate`.
    pub event_type: String,
    /// Endpoint, e.g. `/api/llm/generate`.
    pub endpoint: String,
    /// Events.
    pub count: i64,
    /// Distinct non-null `user_id`s (exact).
    pub distinct_users: i64,
    /// Events without a `user_id`.
    pub anonymous: i64,
}
