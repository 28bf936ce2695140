//! Writing and recovering the Parquet archive.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray,
};
use chrono::{DateTime, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use primespark_schemas::analytics::{AnalyticsEvent, ApiEvent, TaskEvent};
use primespark_schemas::columnar;
use primespark_schemas::rows::{
    AgentLoadRow, Agg, AggRow, AnalyticsRow, ApiEventsRow, InferenceRow, InferenceStatsRow,
    MetricAggRow, RawRow, RoutingStatsRow, ScoreRow, TaskStateChange, TaskStatsRow, TelemetryRow,
};

use crate::sink::fence::Fence;

/// Archive failures.
#[derive(Debug, thiserror::Error)]
pub enum NasError {
    /// File system error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Arrow or Parquet encoding failed.
    #[error("encoding parquet: {0}")]
    Encode(String),
    /// The writer fence (or a test's failpoint) refused the write; classified as it says.
    #[error(transparent)]
    Refused(crate::sink::SinkError),
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NasError + '_ {
    move |source| NasError::Io {
        path: path.to_owned(),
        source,
    }
}

fn encode(e: impl std::fmt::Display) -> NasError {
    NasError::Encode(e.to_string())
}

fn times(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(values).with_timezone("UTC"))
}

/// Builds the Arrow batch of raw rows of one stream (all rows of one kind, as a topic's rolls
/// are).
pub fn raw_batch(rows: &[RawRow]) -> Result<RecordBatch, NasError> {
    raw_batch_of(rows)
}

/// [`raw_batch`] over borrowed rows (a roll's rows grouped by hour without copying them).
fn raw_batch_of<'r>(rows: impl IntoIterator<Item = &'r RawRow>) -> Result<RecordBatch, NasError> {
    let mut telemetry = Vec::new();
    let mut inference = Vec::new();
    let mut analytics = Vec::new();
    let mut scores = Vec::new();
    for r in rows {
        match r {
            RawRow::Telemetry(t) => telemetry.push(t),
            RawRow::Inference(i) => inference.push(&**i),
            RawRow::Analytics(a) => analytics.push(&**a),
            RawRow::Score(s) => scores.push(&**s),
        }
    }
    if !scores.is_empty() {
        return if telemetry.is_empty() && inference.is_empty() && analytics.is_empty() {
            score_batch(&scores)
        } else {
            Err(NasError::Encode(
                "a file mixes anomaly scores with raw rows".into(),
            ))
        };
    }
    match (
        telemetry.is_empty(),
        inference.is_empty(),
        analytics.is_empty(),
    ) {
        (_, true, true) => telemetry_batch(&telemetry),
        (true, false, true) => inference_batch(&inference),
        (true, true, false) => analytics_batch(&analytics),
        _ => Err(NasError::Encode(
            "a roll mixes rows of different streams (telemetry, inference, analytics)".into(),
        )),
    }
}

/// Builds the Arrow batch of raw `analytics.events` rows: task events fill the task columns,
/// API events `endpoint`, `user_id` and `data`; the other columns are null.
pub fn analytics_batch(rows: &[&AnalyticsRow]) -> Result<RecordBatch, NasError> {
    let task = |f: fn(&TaskEvent) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter()
                .map(|r| match &r.event {
                    AnalyticsEvent::Task(t) => f(t),
                    AnalyticsEvent::Api(_) => None,
                })
                .collect::<Vec<_>>(),
        ))
    };
    let api = |f: fn(&ApiEvent) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter()
                .map(|r| match &r.event {
                    AnalyticsEvent::Api(a) => f(a),
                    AnalyticsEvent::Task(_) => None,
                })
                .collect::<Vec<_>>(),
        ))
    };
    RecordBatch::try_new(
        columnar::analytics_raw(),
        vec![
            times(rows.iter().map(|r| r.event.time_us())),
            Arc::new(StringArray::from_iter_values(rows.iter().map(
                |r| match &r.event {
                    AnalyticsEvent::Task(t) => t.kind.as_str(),
                    AnalyticsEvent::Api(a) => a.event_type.as_str(),
                },
            ))),
            task(|t| Some(t.task_id.as_str())),
            task(|t| t.task_type.as_deref()),
            task(|t| t.priority.as_deref()),
            task(|t| t.agent_id.as_deref()),
            api(|a| Some(a.endpoint.as_str())),
            api(|a| a.user_id.as_deref()),
            api(|a| a.data.as_deref()),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.partition),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of raw inference rows.
pub fn inference_batch(rows: &[&InferenceRow]) -> Result<RecordBatch, NasError> {
    let e = |f: fn(&InferenceRow) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter().map(|r| f(r)).collect::<Vec<_>>(),
        ))
    };
    RecordBatch::try_new(
        columnar::inference_raw(),
        vec![
            times(rows.iter().map(|r| r.event.time_us)),
            e(|r| Some(r.event.model.as_str())),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| i64::from(r.event.prompt_length)),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| i64::from(r.event.response_length)),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.event.latency_ms),
            )),
            e(|r| Some(r.event.source.as_str())),
            e(|r| Some(r.event.status.as_str())),
            e(|r| r.event.device_id.as_deref()),
            e(|r| r.event.request_id.as_deref()),
            e(|r| r.event.routing_strategy.map(|s| s.as_str())),
            Arc::new(BooleanArray::from(
                rows.iter().map(|r| r.event.fallback).collect::<Vec<_>>(),
            )),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.partition),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of `inference_stats_1m` rows.
pub fn inference_stats_batch(rows: &[&InferenceStatsRow]) -> Result<RecordBatch, NasError> {
    let f = |g: fn(&InferenceStatsRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| g(r))))
    };
    RecordBatch::try_new(
        columnar::inference_stats_1m(),
        vec![
            times(rows.iter().map(|r| r.bucket_us)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.model.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.source.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.count))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.errors))),
            f(|r| r.latency_p50_ms),
            f(|r| r.latency_p95_ms),
            f(|r| r.latency_p99_ms),
            f(|r| r.avg_input_tokens),
            f(|r| r.avg_output_tokens),
            Arc::new(Float64Array::from(
                rows.iter()
                    .map(|r| r.output_tokens_per_s)
                    .collect::<Vec<_>>(),
            )),
            f(|r| r.avg_latency_ms),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of `routing_stats_1m` rows.
pub fn routing_stats_batch(rows: &[&RoutingStatsRow]) -> Result<RecordBatch, NasError> {
    let opt = |g: fn(&RoutingStatsRow) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(
            rows.iter().map(|r| g(r)).collect::<Vec<_>>(),
        ))
    };
    RecordBatch::try_new(
        columnar::routing_stats_1m(),
        vec![
            times(rows.iter().map(|r| r.bucket_us)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.routing_strategy.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.edge_requests),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.cloud_requests),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.edge_share),
            )),
            opt(|r| r.cloud_fallback_rate),
            opt(|r| r.edge_success_rate),
            opt(|r| r.cloud_success_rate),
            opt(|r| r.edge_p95_ms),
            opt(|r| r.cloud_p95_ms),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.tried_edge_first),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.fallbacks),
            )),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of `task_stats_1m` rows (and `task_stats_1h`).
pub fn task_stats_batch(rows: &[&TaskStatsRow]) -> Result<RecordBatch, NasError> {
    let int = |g: fn(&TaskStatsRow) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| g(r))))
    };
    let opt = |g: fn(&TaskStatsRow) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(
            rows.iter().map(|r| g(r)).collect::<Vec<_>>(),
        ))
    };
    RecordBatch::try_new(
        columnar::task_stats_1m(),
        vec![
            times(rows.iter().map(|r| r.bucket_us)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.task_type.as_str()),
            )),
            int(|r| r.created),
            int(|r| r.assigned),
            int(|r| r.started),
            int(|r| r.completed),
            int(|r| r.failed),
            opt(|r| r.wait_p50_ms),
            opt(|r| r.wait_p95_ms),
            opt(|r| r.run_p50_ms),
            opt(|r| r.run_p95_ms),
            int(|r| r.backlog),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of `agent_load_1m` rows (and `agent_load_1h`).
pub fn agent_load_batch(rows: &[&AgentLoadRow]) -> Result<RecordBatch, NasError> {
    let int = |g: fn(&AgentLoadRow) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| g(r))))
    };
    RecordBatch::try_new(
        columnar::agent_load_1m(),
        vec![
            times(rows.iter().map(|r| r.bucket_us)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.agent_id.as_str()),
            )),
            int(|r| r.assigned),
            int(|r| r.completed),
            int(|r| r.failed),
            int(|r| r.active),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of `api_events_1m` rows (and `api_events_1h`).
pub fn api_events_batch(rows: &[&ApiEventsRow]) -> Result<RecordBatch, NasError> {
    let int = |g: fn(&ApiEventsRow) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| g(r))))
    };
    RecordBatch::try_new(
        columnar::api_events_1m(),
        vec![
            times(rows.iter().map(|r| r.bucket_us)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.event_type.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.endpoint.as_str()),
            )),
            int(|r| r.count),
            int(|r| r.distinct_users),
            int(|r| r.anonymous),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of aggregate rows of one table. `task_state` changes are not windows
/// and are skipped.
pub fn agg_batch(rows: &[AggRow]) -> Result<RecordBatch, NasError> {
    let mut metrics = Vec::new();
    let mut inference = Vec::new();
    let mut routing = Vec::new();
    let mut tasks = Vec::new();
    let mut agents = Vec::new();
    let mut api = Vec::new();
    for r in rows {
        match &r.row {
            Agg::Metrics(m) => metrics.push(m),
            Agg::Inference(i) => inference.push(i),
            Agg::Routing(x) => routing.push(x),
            Agg::Task(t) => tasks.push(t),
            Agg::Agent(a) => agents.push(a),
            Agg::Api(a) => api.push(a),
            Agg::TaskState(_) => {}
        }
    }
    let families = [
        metrics.is_empty(),
        inference.is_empty(),
        routing.is_empty(),
        tasks.is_empty(),
        agents.is_empty(),
        api.is_empty(),
    ]
    .iter()
    .filter(|empty| !**empty)
    .count();
    if families > 1 {
        return Err(NasError::Encode("an aggregate file mixes tables".into()));
    }
    if !inference.is_empty() {
        inference_stats_batch(&inference)
    } else if !routing.is_empty() {
        routing_stats_batch(&routing)
    } else if !tasks.is_empty() {
        task_stats_batch(&tasks)
    } else if !agents.is_empty() {
        agent_load_batch(&agents)
    } else if !api.is_empty() {
        api_events_batch(&api)
    } else {
        aggregate_batch(&metrics)
    }
}

/// Builds the Arrow batch of anomaly scores.
pub fn score_batch(rows: &[&ScoreRow]) -> Result<RecordBatch, NasError> {
    RecordBatch::try_new(
        columnar::anomaly_scores(),
        vec![
            times(rows.iter().map(|r| r.time_us)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &*r.device_id),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &*r.model),
            )),
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.score))),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.is_anomaly())),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &*r.backend),
            )),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.partition),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        ],
    )
    .map_err(|e| NasError::Encode(e.to_string()))
}

/// Builds the Arrow batch of raw telemetry rows.
pub fn telemetry_batch(rows: &[&TelemetryRow]) -> Result<RecordBatch, NasError> {
    let mut columns = TelemetryColumns::default();
    for r in rows {
        columns.push(r);
    }
    columns.finish()
}

/// A telemetry roll's columns for one hour of event time, appended from each batch as it
/// arrives: the roll keeps no row (no clone, no shared-name reference count per row), and cutting
/// it moves the buffers into an Arrow batch without copying them.
#[derive(Debug, Default)]
pub struct TelemetryColumns {
    time: Vec<i64>,
    device: StringBuilder,
    metric: StringBuilder,
    value: Vec<f64>,
    partition: Vec<i32>,
    offset: Vec<i64>,
}

impl TelemetryColumns {
    /// Appends one row.
    pub fn push(&mut self, r: &TelemetryRow) {
        self.time.push(r.time_us);
        self.device.append_value(&*r.device_id);
        self.metric.append_value(&*r.metric_name);
        self.value.push(r.value);
        self.partition.push(r.partition);
        self.offset.push(r.offset);
    }

    /// The rows as one batch of [`columnar::telemetry_raw`].
    pub fn finish(mut self) -> Result<RecordBatch, NasError> {
        RecordBatch::try_new(
            columnar::telemetry_raw(),
            vec![
                Arc::new(TimestampMicrosecondArray::from(self.time).with_timezone("UTC")),
                Arc::new(self.device.finish()),
                Arc::new(self.metric.finish()),
                Arc::new(Float64Array::from(self.value)),
                Arc::new(Int32Array::from(self.partition)),
                Arc::new(Int64Array::from(self.offset)),
            ],
        )
        .map_err(encode)
    }
}

/// The rows of one cut roll: telemetry as Arrow batches by hour ([`TelemetryColumns`]), the
/// other streams' rows (and scores) as they came.
#[derive(Debug, Default, Clone)]
pub struct RollRows {
    /// Rows not kept as columns.
    pub rows: Vec<RawRow>,
    /// Telemetry batches by hour of event time (hours since the epoch).
    pub telemetry: Vec<(i64, RecordBatch)>,
}

impl RollRows {
    /// Rows in the roll.
    pub fn len(&self) -> usize {
        self.rows.len()
            + self
                .telemetry
                .iter()
                .map(|(_, b)| b.num_rows())
                .sum::<usize>()
    }

    /// Whether the roll holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The hour of event time (hours since the epoch) a row's file is under.
pub fn hour_of(time_us: i64) -> i64 {
    time_us.div_euclid(3_600_000_000)
}

/// Builds the Arrow batch of 1-minute aggregate rows.
pub fn aggregate_batch(rows: &[&MetricAggRow]) -> Result<RecordBatch, NasError> {
    let bucket = TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.bucket_us))
        .with_timezone("UTC");
    let device = StringArray::from_iter_values(rows.iter().map(|r| r.device_id.as_str()));
    let metric = StringArray::from_iter_values(rows.iter().map(|r| r.metric_name.as_str()));
    let count = Int64Array::from_iter_values(rows.iter().map(|r| r.count));
    let sum = Float64Array::from_iter_values(rows.iter().map(|r| r.sum));
    let min = Float64Array::from_iter_values(rows.iter().map(|r| r.min));
    let max = Float64Array::from_iter_values(rows.iter().map(|r| r.max));
    let avg = Float64Array::from_iter_values(rows.iter().map(|r| r.sum / r.count as f64));
    RecordBatch::try_new(
        columnar::device_metrics_1m(),
        vec![
            Arc::new(bucket),
            Arc::new(device),
            Arc::new(metric),
            Arc::new(count),
            Arc::new(sum),
            Arc::new(min),
            Arc::new(max),
            Arc::new(avg),
        ],
    )
    .map_err(|e| NasError::Encode(e.to_string()))
}

/// Writes closed windows under `<root>/table=<table>/date=YYYY-MM-DD/`, one file per table and
/// bucket named by the bucket start: a replayed window rewrites the same file with the same rows.
/// Once final, the 1-minute files of an hour are merged into one by [`super::compact`].
/// `task_state` changes are not windows and are not archived.
pub fn write_aggregate_files(
    root: &Path,
    rows: &[AggRow],
    row_group_rows: usize,
) -> Result<Vec<PathBuf>, NasError> {
    let mut by_bucket: BTreeMap<(&'static str, i64), Vec<AggRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| !matches!(r.row, Agg::TaskState(_))) {
        by_bucket
            .entry((r.table(), r.bucket_us()))
            .or_default()
            .push(r.clone());
    }
    let mut written = Vec::new();
    for ((table, bucket), mut rows) in by_bucket {
        // Same rows, same bytes: sort by the table's key.
        rows.sort_by(|a, b| agg_key(a).cmp(&agg_key(b)));
        let start =
            DateTime::<Utc>::from_timestamp_micros(bucket).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let dir = root
            .join(format!("table={table}"))
            .join(format!("date={}", start.format("%Y-%m-%d")));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let name = super::compact::minute_file_name(bucket);
        written.push(publish_batch(
            &dir,
            &name,
            &agg_batch(&rows)?,
            row_group_rows,
        )?);
    }
    Ok(written)
}

fn agg_key(r: &AggRow) -> (&str, &str) {
    match &r.row {
        Agg::Metrics(m) => (m.device_id.as_str(), m.metric_name.as_str()),
        Agg::Inference(i) => (i.model.as_str(), i.source.as_str()),
        Agg::Routing(x) => (x.routing_strategy.as_str(), ""),
        Agg::Task(t) => (t.task_type.as_str(), ""),
        Agg::Agent(a) => (a.agent_id.as_str(), ""),
        Agg::Api(a) => (a.event_type.as_str(), a.endpoint.as_str()),
        Agg::TaskState(TaskStateChange::Keep(e)) => (e.task_id.as_str(), e.kind.as_str()),
        Agg::TaskState(TaskStateChange::Retire(id)) => (id.as_str(), "retire"),
    }
}

/// Writes `batch` as `dir/name` so that readers never see it partial: under a hidden
/// temporary name (`.name.inprogress`, which no `*.parquet` listing or glob picks up), renamed
/// when complete, the rename made durable by a directory fsync. Returns the final path.
pub(super) fn publish_batch(
    dir: &Path,
    name: &str,
    batch: &RecordBatch,
    row_group_rows: usize,
) -> Result<PathBuf, NasError> {
    let final_path = dir.join(name);
    let tmp_path = dir.join(format!(".{name}.inprogress"));
    write_batch_file(&tmp_path, batch, row_group_rows)?;
    fs::rename(&tmp_path, &final_path).map_err(io(&final_path))?;
    sync_dir(dir)?;
    Ok(final_path)
}

/// Makes renames and removals in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), NasError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn write_batch_file(
    path: &Path,
    batch: &RecordBatch,
    row_group_rows: usize,
) -> Result<(), NasError> {
    write_batches_file(path, std::slice::from_ref(batch), row_group_rows)
}

/// Writes `batches` (one schema) into one Parquet file at `path`, synced.
fn write_batches_file(
    path: &Path,
    batches: &[RecordBatch],
    row_group_rows: usize,
) -> Result<(), NasError> {
    let Some(batch) = batches.first() else {
        return Err(NasError::Encode("a file of no batch".into()));
    };
    if batches.iter().any(|b| b.schema() != batch.schema()) {
        return Err(NasError::Encode(
            "a roll mixes rows of different streams (telemetry, inference, analytics)".into(),
        ));
    }
    let file = fs::File::create(path).map_err(io(path))?;
    let mut props = WriterProperties::builder()
        // zstd level 1: most of level 3's size at a fraction of its time, on a Pi too.
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).map_err(|e| NasError::Encode(e.to_string()))?,
        ))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)));
    for field in batch.schema().fields() {
        let column = parquet::schema::types::ColumnPath::from(field.name().as_str());
        props = match (field.name().as_str(), field.data_type()) {
            // Offsets are unique and rising: a dictionary is built only to be dropped, and
            // deltas of one pack into a few bits.
            ("kafka_offset", _) => props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_encoding(column, parquet::basic::Encoding::DELTA_BINARY_PACKED),
            // Measurements rarely repeat: no dictionary (built, then dropped at its size
            // limit); byte stream split puts like bytes together, which zstd packs better.
            (_, arrow::datatypes::DataType::Float64 | arrow::datatypes::DataType::Float32) => props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_encoding(column, parquet::basic::Encoding::BYTE_STREAM_SPLIT),
            _ => props,
        };
    }
    let props = props.build();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))
        .map_err(|e| NasError::Encode(e.to_string()))?;
    for batch in batches {
        writer
            .write(batch)
            .map_err(|e| NasError::Encode(e.to_string()))?;
    }
    let file = writer
        .into_inner()
        .map_err(|e| NasError::Encode(e.to_string()))?;
    file.sync_all().map_err(io(path))?;
    Ok(())
}

/// The Parquet archive of one topic.
#[derive(Debug, Clone)]
pub struct ParquetArchive {
    topic_dir: PathBuf,
    /// `<root>/table=anomaly_scores`: the scores of the topic's samples, in files named like
    /// the raw rolls they were computed from.
    scores_dir: PathBuf,
    /// Whether this topic's rolls write the score files (the telemetry topic only). Recovery
    /// of any other topic must leave them alone: their names carry the telemetry topic's
    /// offsets, not this topic's.
    writes_scores: bool,
    row_group_rows: usize,
    /// Tags this writer's temporary names ([`instance_tag`]).
    instance: String,
    /// Checked between a roll's last temporary file and its first rename: refuses when this
    /// process no longer holds (or has not lately renewed) the writer lease.
    fence: Fence,
}

/// Folder of the anomaly score files under the NAS root.
pub const SCORES_TABLE_DIR: &str = "table=anomaly_scores";

/// Parses a roll's file name, `part-pPPP-oFIRST-LAST.parquet`, into (partition, first offset,
/// last offset).
pub fn parse_roll_range(name: &str) -> Option<(i32, i64, i64)> {
    let rest = name.strip_prefix("part-p")?.strip_suffix(".parquet")?;
    let (p, rest) = rest.split_once("-o")?;
    let (first, last) = rest.split_once('-')?;
    Some((p.parse().ok()?, first.parse().ok()?, last.parse().ok()?))
}

/// Notes a roll of `partition` ending at offset `last` in `ends` (per partition, the offset
/// after the last roll seen).
pub fn extend_end(ends: &mut HashMap<i32, i64>, partition: i32, last: i64) {
    let end = ends.entry(partition).or_insert(i64::MIN);
    *end = (*end).max(last.saturating_add(1));
}

/// Groups rows by (scores or not, hour) into one batch per group, appended to `grouped`.
/// Scores go to their own table, in files named after the same roll: both are renamed into
/// place before the roll's offsets are committed. Rows are grouped by reference: copying them
/// (two strings each) cost more than the Parquet encoding.
fn group_rows(
    grouped: &mut BTreeMap<(bool, i64), Vec<RecordBatch>>,
    rows: &[RawRow],
) -> Result<(), NasError> {
    let mut by_hour: BTreeMap<(bool, i64), Vec<&RawRow>> = BTreeMap::new();
    for r in rows {
        by_hour
            .entry((matches!(r, RawRow::Score(_)), hour_of(r.time_us())))
            .or_default()
            .push(r);
    }
    for (key, rows) in by_hour {
        grouped
            .entry(key)
            .or_default()
            .push(raw_batch_of(rows.iter().copied())?);
    }
    Ok(())
}

/// The file name of a roll.
fn roll_name(partition: i32, first: i64, last: i64) -> String {
    format!("part-p{partition:03}-o{first:020}-{last:020}.parquet")
}

/// The temporary name a roll file is written under by the instance `instance`:
/// `.NAME.INSTANCE.inprogress` (hidden from every `*.parquet` listing). Instance-unique, so two
/// processes writing the same roll never write into one file.
fn temp_name(name: &str, instance: &str) -> String {
    format!(".{name}.{instance}.inprogress")
}

/// The final name a temporary file is for (`None`: not a temporary file). Also takes the
/// instance-less `.NAME.inprogress` of earlier versions.
pub fn temp_target(name: &str) -> Option<&str> {
    let inner = name.strip_prefix('.')?.strip_suffix(".inprogress")?;
    Some(match inner.find(".parquet.") {
        Some(i) => &inner[..i + ".parquet".len()],
        None => inner,
    })
}

/// This process's instance tag: pid and start time, unique among the processes that write one
/// archive.
pub fn instance_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}-{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
    })
}

/// What [`ParquetArchive::recover`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Temporary files removed: rolls that never reached their first rename (their records
    /// are read again and rewritten).
    pub removed: usize,
    /// Temporary files renamed into place: rolls a crash left half-renamed, completed.
    pub completed: usize,
    /// Per partition, the offset after the archive's last complete roll: the archive's own
    /// record of how far it holds the partition.
    pub ends: HashMap<i32, i64>,
    /// The files of whole rolls found in place (a direct-mode sink uploads them).
    pub in_place: Vec<PathBuf>,
}

/// The files of one roll that recovery found.
#[derive(Debug, Default)]
struct FoundRoll {
    in_place: Vec<PathBuf>,
    /// (temporary file, its final path).
    temps: Vec<(PathBuf, PathBuf)>,
}

impl ParquetArchive {
    /// The archive of `topic` under `root`.
    pub fn new(root: &Path, topic: &str, row_group_rows: usize) -> Self {
        Self {
            topic_dir: root.join(format!("topic={topic}")),
            scores_dir: root.join(SCORES_TABLE_DIR),
            writes_scores: false,
            row_group_rows,
            instance: instance_tag().to_owned(),
            fence: Fence::unfenced(),
        }
    }

    /// Renames of this archive's rolls first pass `fence`.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// This topic's rolls also write the anomaly score files, so its recovery covers them.
    pub fn with_scores(mut self) -> Self {
        self.writes_scores = true;
        self
    }

    /// The folders this topic's rolls write to: the topic's, and the scores' when it writes
    /// scores.
    pub fn dirs(&self) -> Vec<&Path> {
        let mut dirs = vec![self.topic_dir.as_path()];
        if self.writes_scores {
            dirs.push(&self.scores_dir);
        }
        dirs
    }

    /// `<root>/topic=<topic>`, the table path for SQL.
    pub fn topic_dir(&self) -> &Path {
        &self.topic_dir
    }

    /// Finishes what a crash left of the rolls of the partitions `owned` picks, and reports how
    /// far the archive holds each of them.
    ///
    /// A roll's files are all written under temporary names before the first is renamed
    /// ([`ParquetArchive::write_roll`]), so a roll with any file in place is whole: its remaining
    /// temporary files are renamed too. A roll with none in place never became visible: its
    /// temporary files are removed and the replay writes it again. No file in place is ever
    /// removed: a roll without a stored offset (a new database, a lost `source_offsets` row) is
    /// the archive's proof that it holds those records, and [`Recovered::ends`] says so.
    ///
    /// Only partitions for which `owned` is true are touched: in a cluster each process
    /// recovers the partitions its workers read, never files another process is writing.
    pub fn recover(&self, owned: &dyn Fn(i32) -> bool) -> Result<Recovered, NasError> {
        fs::create_dir_all(&self.topic_dir).map_err(io(&self.topic_dir))?;
        let mut found: BTreeMap<String, FoundRoll> = BTreeMap::new();
        let mut report = Recovered::default();
        let mut stack: Vec<PathBuf> = self
            .dirs()
            .into_iter()
            .filter(|d| d.is_dir())
            .map(Path::to_path_buf)
            .collect();
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).map_err(io(&dir))? {
                let entry = entry.map_err(io(&dir))?;
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(target) = temp_target(&name) {
                    match parse_roll_range(target) {
                        Some((p, _, _)) if owned(p) => {
                            let final_path = dir.join(target);
                            found
                                .entry(target.to_owned())
                                .or_default()
                                .temps
                                .push((path, final_path));
                        }
                        Some(_) => {}
                        None => {
                            // Unparsable temporary names are ours too (nobody else writes
                            // `.inprogress`), and nothing can complete them.
                            fs::remove_file(&path).map_err(io(&path))?;
                            report.removed += 1;
                        }
                    }
                } else if parse_roll_range(&name).is_some_and(|(p, _, _)| owned(p)) {
                    found.entry(name).or_default().in_place.push(path);
                }
            }
        }
        let mut synced: Vec<PathBuf> = Vec::new();
        for (name, roll) in found {
            let Some((partition, _, last)) = parse_roll_range(&name) else {
                continue;
            };
            let whole = !roll.in_place.is_empty();
            report.in_place.extend(roll.in_place);
            for (temp, final_path) in roll.temps {
                if whole && !final_path.exists() {
                    fs::rename(&temp, &final_path).map_err(io(&final_path))?;
                    tracing::info!(path = %final_path.display(), "completed a half-renamed roll");
                    report.completed += 1;
                    report.in_place.push(final_path);
                } else {
                    fs::remove_file(&temp).map_err(io(&temp))?;
                    // Per file; the caller logs how many at info.
                    tracing::debug!(path = %temp.display(), "removed an unpublished roll file");
                    report.removed += 1;
                }
                if let Some(dir) = temp.parent().filter(|d| !synced.iter().any(|s| s == d)) {
                    synced.push(dir.to_path_buf());
                }
            }
            if whole {
                extend_end(&mut report.ends, partition, last);
            }
        }
        for dir in &synced {
            sync_dir(dir)?;
        }
        Ok(report)
    }

    /// Writes one roll of `partition` covering offsets `first..=last`, one file per hour of
    /// event time, each atomically visible. Returns the files written.
    pub fn write_roll(
        &self,
        partition: i32,
        first: i64,
        last: i64,
        rows: &[RawRow],
    ) -> Result<Vec<PathBuf>, NasError> {
        let mut grouped = BTreeMap::new();
        group_rows(&mut grouped, rows)?;
        self.write_grouped(partition, first, last, grouped)
    }

    /// [`ParquetArchive::write_roll`] of a roll kept partly as columns.
    pub fn write_roll_rows(
        &self,
        partition: i32,
        first: i64,
        last: i64,
        roll: &RollRows,
    ) -> Result<Vec<PathBuf>, NasError> {
        let mut grouped = BTreeMap::new();
        group_rows(&mut grouped, &roll.rows)?;
        for (hour, batch) in &roll.telemetry {
            grouped
                .entry((false, *hour))
                .or_default()
                .push(batch.clone());
        }
        self.write_grouped(partition, first, last, grouped)
    }

    /// Writes a roll's batches, one file per (scores or not, hour).
    fn write_grouped(
        &self,
        partition: i32,
        first: i64,
        last: i64,
        by_hour: BTreeMap<(bool, i64), Vec<RecordBatch>>,
    ) -> Result<Vec<PathBuf>, NasError> {
        let name = roll_name(partition, first, last);
        let temp = temp_name(&name, &self.instance);
        // Every file of the roll is complete and durable under its temporary name before the
        // first rename: a roll with any file in place is whole, and recovery completes it
        // instead of guessing.
        let mut staged: Vec<(PathBuf, PathBuf, PathBuf)> = Vec::with_capacity(by_hour.len());
        for ((score, hour), rows) in by_hour {
            let start =
                DateTime::<Utc>::from_timestamp(hour * 3600, 0).unwrap_or(DateTime::<Utc>::MIN_UTC);
            let table = if score {
                &self.scores_dir
            } else {
                &self.topic_dir
            };
            let dir = table
                .join(format!("date={}", start.format("%Y-%m-%d")))
                .join(format!("hour={}", start.format("%H")));
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            let temp_path = dir.join(&temp);
            write_batches_file(&temp_path, &rows, self.row_group_rows)?;
            staged.push((temp_path, dir.join(&name), dir));
        }
        // A writer whose lease was taken over must not make anything visible.
        self.fence.check().map_err(NasError::Refused)?;
        let mut written = Vec::with_capacity(staged.len());
        for (i, (temp_path, final_path, _)) in staged.iter().enumerate() {
            fs::rename(temp_path, final_path).map_err(io(final_path))?;
            if i == 0 && staged.len() > 1 {
                crate::failpoint::hit("archive.roll_half_renamed").map_err(NasError::Refused)?;
            }
            written.push(final_path.clone());
        }
        let mut synced: Vec<&Path> = Vec::new();
        for (_, _, dir) in &staged {
            if !synced.contains(&dir.as_path()) {
                sync_dir(dir)?;
                synced.push(dir);
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(time_us: i64, offset: i64) -> RawRow {
        RawRow::Telemetry(TelemetryRow {
            time_us,
            device_id: "d".into(),
            metric_name: "m".into(),
            value: offset as f64,
            partition: 1,
            offset,
        })
    }

    #[test]
    fn rolls_split_by_hour_and_recover_removes_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let archive = ParquetArchive::new(dir.path(), "edge.telemetry", 1024);
        let t0 = 1_762_351_387_000_000; // 2025-11-05T14:03:07Z
        let files = archive
            .write_roll(
                1,
                10,
                12,
                &[row(t0, 10), row(t0 + 3_600_000_000, 11), row(t0, 12)],
            )
            .unwrap();
        assert_eq!(files.len(), 2);
        assert!(files[0]
            .to_string_lossy()
            .contains("topic=edge.telemetry/date=2025-11-05/hour=14/part-p001-o"));
        let later = archive.write_roll(1, 13, 13, &[row(t0, 13)]).unwrap();
        // Whatever offsets were stored (none, here), whole rolls stay and say how far the
        // archive holds the partition.
        let report = archive.recover(&|_| true).unwrap();
        assert_eq!((report.removed, report.completed), (0, 0));
        assert_eq!(report.ends, HashMap::from([(1, 14)]));
        assert!(files.iter().chain(&later).all(|f| f.exists()));
        // A crash between the renames of one roll: the rest of it is renamed into place.
        let name = files[1].file_name().unwrap().to_string_lossy().into_owned();
        let temp = files[1].with_file_name(format!(".{name}.4242-dead.inprogress"));
        fs::rename(&files[1], &temp).unwrap();
        // A crash before the first rename of the next roll: its temporary files go.
        let unpublished = files[0].with_file_name(format!(
            ".part-p001-o{:020}-{:020}.parquet.4242-dead.inprogress",
            14, 20
        ));
        fs::write(&unpublished, b"partial").unwrap();
        // Another process's partition is not touched.
        let foreign = files[0].with_file_name(format!(
            ".part-p002-o{:020}-{:020}.parquet.4242-dead.inprogress",
            0, 5
        ));
        fs::write(&foreign, b"theirs").unwrap();
        let report = archive.recover(&|p| p == 1).unwrap();
        assert_eq!((report.removed, report.completed), (1, 1));
        assert_eq!(report.ends, HashMap::from([(1, 14)]));
        assert!(files[1].exists() && !temp.exists() && !unpublished.exists() && foreign.exists());
    }

    #[test]
    fn temporary_names_are_per_instance() {
        assert_eq!(
            temp_target(".part-p001-o1-2.parquet.77-abc.inprogress"),
            Some("part-p001-o1-2.parquet")
        );
        // Earlier versions' names.
        assert_eq!(
            temp_target(".part-p001-o1-2.parquet.inprogress"),
            Some("part-p001-o1-2.parquet")
        );
        assert_eq!(temp_target("part-p001-o1-2.parquet"), None);
        assert_ne!(temp_name("x.parquet", "1-a"), temp_name("x.parquet", "2-b"));
    }

    #[test]
    fn offsets_are_delta_encoded_and_floats_byte_stream_split() {
        use parquet::basic::Encoding;
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let dir = tempfile::tempdir().unwrap();
        let archive = ParquetArchive::new(dir.path(), "edge.telemetry", 1024);
        let t0 = 1_762_351_387_000_000;
        let rows: Vec<RawRow> = (0..100).map(|i| row(t0, i)).collect();
        let files = archive.write_roll(0, 0, 99, &rows).unwrap();
        let reader = SerializedFileReader::new(fs::File::open(&files[0]).unwrap()).unwrap();
        let group = reader.metadata().row_group(0);
        let encodings = |name: &str| {
            let column = group
                .columns()
                .iter()
                .find(|c| c.column_path().string() == name)
                .unwrap();
            column.encodings().collect::<Vec<_>>()
        };
        for (column, wanted) in [
            ("kafka_offset", Encoding::DELTA_BINARY_PACKED),
            ("value", Encoding::BYTE_STREAM_SPLIT),
        ] {
            let used = encodings(column);
            assert!(used.contains(&wanted), "{column}: {used:?}");
            assert!(
                !used.contains(&Encoding::RLE_DICTIONARY),
                "{column} has a dictionary: {used:?}"
            );
        }
        // Everything else keeps the default dictionaries.
        assert!(encodings("device_id").contains(&Encoding::RLE_DICTIONARY));
    }

    #[test]
    fn only_the_topic_that_writes_scores_recovers_them() {
        let dir = tempfile::tempdir().unwrap();
        let telemetry = ParquetArchive::new(dir.path(), "edge.telemetry", 1024).with_scores();
        let t0 = 1_762_351_387_000_000;
        let score = RawRow::Score(Box::new(ScoreRow {
            time_us: t0,
            device_id: "pi-1".into(),
            model: "m".into(),
            score: 0.5,
            threshold: 0.9,
            backend: "cpu".into(),
            features: Vec::new(),
            partition: 1,
            offset: 500,
        }));
        let files = telemetry.write_roll(1, 500, 500, &[score]).unwrap();
        assert!(files[0].to_string_lossy().contains(SCORES_TABLE_DIR));
        // The inference topic has committed far less on partition 1; the telemetry topic's
        // committed score file must survive its recovery.
        let inference = ParquetArchive::new(dir.path(), "edge.ai.inference", 1024);
        let report = inference.recover(&|_| true).unwrap();
        assert_eq!(report, Recovered::default());
        assert!(files[0].exists());
        // The telemetry topic's own recovery counts it as the partition's archived end.
        let report = telemetry.recover(&|_| true).unwrap();
        assert_eq!(report.ends, HashMap::from([(1, 501)]));
        assert!(files[0].exists());
    }

    fn analytics_rows(t0: i64) -> Vec<RawRow> {
        use primespark_schemas::analytics::TaskEventKind;
        vec![
            RawRow::Analytics(Box::new(AnalyticsRow {
                event: AnalyticsEvent::Task(TaskEvent {
                    kind: TaskEventKind::Created,
                    task_id: "t-1".into(),
                    task_type: Some("voice_recognition".into()),
                    priority: Some("HIGH".into()),
                    agent_id: None,
                    time_us: t0,
                }),
                partition: 0,
                offset: 7,
            })),
            RawRow::Analytics(Box::new(AnalyticsRow {
                event: AnalyticsEvent::Api(ApiEvent {
                    event_type: "llm_generate".into(),
                    endpoint: "/api/llm/generate".into(),
                    user_id: None,
                    data: Some(r#"{"model":"m"}"#.into()),
                    time_us: t0 + 1,
                }),
                partition: 0,
                offset: 8,
            })),
        ]
    }

    fn analytics_windows(bucket_us: i64) -> Vec<AggRow> {
        use primespark_schemas::analytics::TaskEventKind;
        use primespark_schemas::rows::Rollup;
        let task = TaskStatsRow {
            bucket_us,
            task_type: "voice_recognition".into(),
            created: 2,
            assigned: 1,
            started: 1,
            completed: 1,
            failed: 0,
            wait_p50_ms: Some(12.5),
            wait_p95_ms: Some(20.0),
            run_p50_ms: None,
            run_p95_ms: None,
            backlog: 1,
        };
        let agent = AgentLoadRow {
            bucket_us,
            agent_id: "spark-agent-1".into(),
            assigned: 1,
            completed: 1,
            failed: 0,
            active: 0,
        };
        let api = ApiEventsRow {
            bucket_us,
            event_type: "llm_generate".into(),
            endpoint: "/api/llm/generate".into(),
            count: 3,
            distinct_users: 1,
            anonymous: 2,
        };
        let mut rows = Vec::new();
        for rollup in Rollup::ALL {
            rows.push(AggRow {
                rollup,
                row: Agg::Task(task.clone()),
            });
            rows.push(AggRow {
                rollup,
                row: Agg::Agent(agent.clone()),
            });
            rows.push(AggRow {
                rollup,
                row: Agg::Api(api.clone()),
            });
        }
        rows.push(AggRow {
            rollup: Rollup::Minute,
            row: Agg::TaskState(TaskStateChange::Keep(TaskEvent {
                kind: TaskEventKind::Created,
                task_id: "t-1".into(),
                task_type: Some("voice_recognition".into()),
                priority: None,
                agent_id: None,
                time_us: bucket_us,
            })),
        });
        rows.push(AggRow {
            rollup: Rollup::Minute,
            row: Agg::TaskState(TaskStateChange::Retire("t-0".into())),
        });
        rows
    }

    #[test]
    fn analytics_batch_nulls_the_other_kinds_columns() {
        use arrow::array::Array;
        let rows = analytics_rows(1_762_351_387_000_000);
        let batch = raw_batch(&rows).unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema(), columnar::analytics_raw());
        let nulls = |name: &str| batch.column_by_name(name).unwrap().null_count();
        // One task event (no agent yet) and one anonymous API event.
        for (column, want) in [
            ("event_type", 0),
            ("task_id", 1),
            ("task_type", 1),
            ("priority", 1),
            ("agent_id", 2),
            ("endpoint", 1),
            ("user_id", 2),
            ("data", 1),
        ] {
            assert_eq!(nulls(column), want, "{column}");
        }
        let event_type = batch.column_by_name("event_type").unwrap();
        let event_type = event_type.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(event_type.value(0), "task_created");
        assert_eq!(event_type.value(1), "llm_generate");
        let data = batch.column_by_name("data").unwrap();
        let data = data.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(data.value(1), r#"{"model":"m"}"#);

        let mut mixed = rows;
        mixed.push(row(1_762_351_387_000_000, 1));
        assert!(raw_batch(&mixed).is_err());
    }

    #[test]
    fn analytics_window_batches_and_files_skip_task_state() {
        use arrow::array::Array;
        let bucket = 1_762_351_380_000_000; // 2025-11-05T14:03:00Z
        let rows = analytics_windows(bucket);
        for (table, columns, nulls) in [
            ("task_stats_1m", 12, 2),
            ("agent_load_1m", 6, 0),
            ("api_events_1m", 6, 0),
        ] {
            let one: Vec<AggRow> = rows
                .iter()
                .filter(|r| r.table() == table)
                .cloned()
                .collect();
            let batch = agg_batch(&one).unwrap();
            assert_eq!(
                (batch.num_rows(), batch.num_columns()),
                (1, columns),
                "{table}"
            );
            let null_count: usize = batch.columns().iter().map(|c| c.null_count()).sum();
            assert_eq!(null_count, nulls, "{table}");
        }
        // Windows of two families in one file are an error; task_state changes are ignored.
        assert!(agg_batch(&rows[..2]).is_err());
        let task_only: Vec<AggRow> = rows
            .iter()
            .filter(|r| r.table() == "task_stats_1m" || r.table() == "task_state")
            .cloned()
            .collect();
        assert_eq!(agg_batch(&task_only).unwrap().num_rows(), 1);

        let dir = tempfile::tempdir().unwrap();
        let files = write_aggregate_files(dir.path(), &rows, 1024).unwrap();
        assert_eq!(files.len(), 9);
        assert!(!dir.path().join("table=task_state").exists());
        for table in [
            "task_stats_1m",
            "task_stats_1h",
            "task_stats_1d",
            "agent_load_1m",
            "agent_load_1h",
            "agent_load_1d",
            "api_events_1m",
            "api_events_1h",
            "api_events_1d",
        ] {
            assert!(
                files
                    .iter()
                    .any(|f| f.to_string_lossy().contains(&format!("table={table}/"))),
                "{table}"
            );
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            parse_roll_range("part-p003-o00000000000000000042-00000000000000000997.parquet"),
            Some((3, 42, 997))
        );
        assert_eq!(parse_roll_range("other.parquet"), None);
    }
}
