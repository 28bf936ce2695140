//! Typed telemetry events of the operators (Vector's `internal_events` style): each event's
//! `emit()` logs at trace/debug level and bumps its Prometheus series, so logs and metrics never
//! drift apart. [`register`] adds the series to the process registry.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of per-topic, per-reason series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Kafka topic.
    pub topic: String,
    /// Stable reason code.
    pub reason: String,
}

/// Labels of per-operator series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperatorLabels {
    /// Dataflow name (`telemetry`, ...).
    pub dataflow: String,
    /// Operator name.
    pub operator: String,
}

/// Labels of per-worker dataflow series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// Dataflow name.
    pub dataflow: String,
    /// Global timely worker index.
    pub worker: String,
}

/// Labels of per-partition source series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

struct Metrics {
    records: Family<PartitionLabels, Counter>,
    bytes: Family<PartitionLabels, Counter>,
    watermark: Family<WorkerLabels, FloatGauge>,
    watermark_lag: Family<WorkerLabels, FloatGauge>,
    partition_watermark: Family<PartitionLabels, FloatGauge>,
    partition_watermark_lag: Family<PartitionLabels, FloatGauge>,
    decode_errors: Family<ReasonLabels, Counter>,
    late_events: Family<OperatorLabels, Counter>,
    windows_closed: Family<OperatorLabels, Counter>,
    task_events_ignored: Family<OperatorLabels, Counter>,
    tasks_retired: Family<OperatorLabels, Counter>,
    inference_seconds: Family<InferenceLabels, Histogram>,
    inference_batch_size: Family<InferenceLabels, Histogram>,
    inference_samples: Family<InferenceLabels, Counter>,
    inference_fallbacks: Family<FallbackLabels, Counter>,
    inference_errors: Family<InferenceLabels, Counter>,
    inference_queue_depth: Family<WorkerOnlyLabels, Gauge>,
    inference_backend: Family<BackendLabels, Gauge>,
    anomalies: Family<InferenceLabels, Counter>,
}

/// Labels of per-model inference series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InferenceLabels {
    /// Backend that ran the batch (`cpu`, `hailo`).
    pub backend: String,
    /// Model name.
    pub model: String,
}

/// Labels of backend fallbacks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// The backend that failed.
    pub from: String,
    /// The backend that ran the batch instead.
    pub to: String,
    /// Model name.
    pub model: String,
}

/// Labels of per-worker series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerOnlyLabels {
    /// Global timely worker index.
    pub worker: String,
}

/// Labels of the backend-in-use series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Global timely worker index.
    pub worker: String,
    /// Backend name.
    pub backend: String,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        records: Family::default(),
        bytes: Family::default(),
        watermark: Family::default(),
        watermark_lag: Family::default(),
        partition_watermark: Family::default(),
        partition_watermark_lag: Family::default(),
        decode_errors: Family::default(),
        late_events: Family::default(),
        windows_closed: Family::default(),
        task_events_ignored: Family::default(),
        tasks_retired: Family::default(),
        inference_seconds: Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_01, 2.0, 18))
        }),
        inference_batch_size: Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 12))
        }),
        inference_samples: Family::default(),
        inference_fallbacks: Family::default(),
        inference_errors: Family::default(),
        inference_queue_depth: Family::default(),
        inference_backend: Family::default(),
        anomalies: Family::default(),
    })
}

/// Registers the operators' series.
pub fn register(registry: &mut Registry) {
    let m = metrics();
    registry.register(
        "primespark_source_records",
        "Kafka records consumed",
        m.records.clone(),
    );
    registry.register(
        "primespark_source_bytes",
        "Kafka payload bytes consumed",
        m.bytes.clone(),
    );
    registry.register(
        "primespark_watermark_seconds",
        "Event-time watermark of a source, seconds since the epoch",
        m.watermark.clone(),
    );
    registry.register(
        "primespark_watermark_lag_seconds",
        "Wall clock minus the event-time watermark (how far behind real time the windows are)",
        m.watermark_lag.clone(),
    );
    registry.register(
        "primespark_partition_watermark_seconds",
        "Event-time watermark of one Kafka partition (its highest event time minus the out-of-orderness bound), seconds since the epoch",
        m.partition_watermark.clone(),
    );
    registry.register(
        "primespark_partition_watermark_lag_seconds",
        "Wall clock minus a partition's watermark (which partition holds the source's watermark back)",
        m.partition_watermark_lag.clone(),
    );
    registry.register(
        "primespark_decode_errors",
        "Records that failed decoding or validation, by topic and reason",
        m.decode_errors.clone(),
    );
    registry.register(
        "primespark_late_events",
        "Events behind the watermark, not counted in any window",
        m.late_events.clone(),
    );
    registry.register(
        "primespark_windows_closed",
        "Event-time windows emitted because the watermark passed their end",
        m.windows_closed.clone(),
    );
    registry.register(
        "primespark_task_events_ignored",
        "Task lifecycle events left out of the join, by reason (operator label): duplicate = a second event of the same kind for a task",
        m.task_events_ignored.clone(),
    );
    registry.register(
        "primespark_tasks_retired",
        "Finished tasks dropped from the lifecycle join's state after the retention",
        m.tasks_retired.clone(),
    );
    registry.register(
        "primespark_inference_seconds",
        "Time to run one inference batch on its backend",
        m.inference_seconds.clone(),
    );
    registry.register(
        "primespark_inference_batch_size",
        "Samples per inference batch",
        m.inference_batch_size.clone(),
    );
    registry.register(
        "primespark_inference_samples",
        "Samples scored, by backend and model",
        m.inference_samples.clone(),
    );
    registry.register(
        "primespark_inference_fallbacks",
        "Batches re-run on another backend after the first one failed",
        m.inference_fallbacks.clone(),
    );
    registry.register(
        "primespark_inference_errors",
        "Batches no backend could score (their samples pass on unscored)",
        m.inference_errors.clone(),
    );
    registry.register(
        "primespark_inference_queue_depth",
        "Inference batches queued or running, per worker",
        m.inference_queue_depth.clone(),
    );
    registry.register(
        "primespark_inference_backend",
        "1 for the backend a worker's scorer currently runs batches on",
        m.inference_backend.clone(),
    );
    registry.register(
        "primespark_anomalies",
        "Samples scored at or over their model's threshold",
        m.anomalies.clone(),
    );
}

/// One inference batch ran.
pub struct InferenceBatchRan<'a> {
    /// Backend.
    pub backend: &'static str,
    /// Model.
    pub model: &'a str,
    /// Samples in the batch.
    pub rows: usize,
    /// Time on the backend.
    pub duration: std::time::Duration,
}

impl InferenceBatchRan<'_> {
    /// Logs and records.
    pub fn emit(&self) {
        tracing::trace!(
            backend = self.backend,
            model = self.model,
            rows = self.rows,
            duration_us = self.duration.as_micros() as u64,
            "inference batch"
        );
        let labels = InferenceLabels {
            backend: self.backend.to_owned(),
            model: self.model.to_owned(),
        };
        let m = metrics();
        m.inference_seconds
            .get_or_create(&labels)
            .observe(self.duration.as_secs_f64());
        m.inference_batch_size
            .get_or_create(&labels)
            .observe(self.rows as f64);
        m.inference_samples
            .get_or_create(&labels)
            .inc_by(self.rows as u64);
    }
}

/// A backend failed a batch and another ran it.
pub struct InferenceFellBack<'a> {
    /// The backend that failed.
    pub from: &'static str,
    /// The backend that ran the batch instead.
    pub to: &'static str,
    /// Model.
    pub model: &'a str,
    /// The failure.
    pub error: &'a str,
    /// When the failed backend is tried again.
    pub retry_after: std::time::Duration,
}

impl InferenceFellBack<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::warn!(
            from = self.from,
            to = self.to,
            model = self.model,
            error = self.error,
            retry_after_s = self.retry_after.as_secs_f64(),
            "inference backend failed; batch re-run on the fallback"
        );
        metrics()
            .inference_fallbacks
            .get_or_create(&FallbackLabels {
                from: self.from.to_owned(),
                to: self.to.to_owned(),
                model: self.model.to_owned(),
            })
            .inc();
    }
}

/// No backend could score a batch.
pub struct InferenceFailed<'a> {
    /// Last backend tried.
    pub backend: &'static str,
    /// Model.
    pub model: &'a str,
    /// Samples left unscored.
    pub rows: usize,
    /// The failure.
    pub error: &'a str,
}

impl InferenceFailed<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::error!(
            backend = self.backend,
            model = self.model,
            rows = self.rows,
            error = self.error,
            "inference batch failed on every backend; samples pass on unscored"
        );
        metrics()
            .inference_errors
            .get_or_create(&InferenceLabels {
                backend: self.backend.to_owned(),
                model: self.model.to_owned(),
            })
            .inc();
    }
}

/// A worker's scorer switched backend (or started on one).
pub struct InferenceBackendInUse {
    /// Global worker index.
    pub worker: usize,
    /// The backend now in use.
    pub backend: &'static str,
    /// The backend no longer in use, if any.
    pub previous: Option<&'static str>,
}

impl InferenceBackendInUse {
    /// Logs and sets the gauge.
    pub fn emit(&self) {
        tracing::info!(
            worker = self.worker,
            backend = self.backend,
            previous = self.previous,
            "inference backend in use"
        );
        let m = metrics();
        if let Some(p) = self.previous {
            m.inference_backend
                .get_or_create(&BackendLabels {
                    worker: self.worker.to_string(),
                    backend: p.to_owned(),
                })
                .set(0);
        }
        m.inference_backend
            .get_or_create(&BackendLabels {
                worker: self.worker.to_string(),
                backend: self.backend.to_owned(),
            })
            .set(1);
    }
}

/// Batches queued or running on a worker's scorer.
pub struct InferenceQueueDepth {
    /// Global worker index.
    pub worker: usize,
    /// Batches in flight.
    pub depth: usize,
}

impl InferenceQueueDepth {
    /// Sets the gauge.
    pub fn emit(&self) {
        metrics()
            .inference_queue_depth
            .get_or_create(&WorkerOnlyLabels {
                worker: self.worker.to_string(),
            })
            .set(i64::try_from(self.depth).unwrap_or(i64::MAX));
    }
}

/// Samples scored at or over the threshold.
pub struct AnomaliesDetected<'a> {
    /// Backend that scored them.
    pub backend: &'static str,
    /// Model.
    pub model: &'a str,
    /// How many.
    pub count: u64,
}

impl AnomaliesDetected<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::debug!(
            backend = self.backend,
            model = self.model,
            count = self.count,
            "anomalies detected"
        );
        metrics()
            .anomalies
            .get_or_create(&InferenceLabels {
                backend: self.backend.to_owned(),
                model: self.model.to_owned(),
            })
            .inc_by(self.count);
        ANOMALIES_TOTAL.fetch_add(self.count, std::sync::atomic::Ordering::Relaxed);
    }
}

static ANOMALIES_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Anomalies the scoring operators of this process flagged so far (for status lines).
pub fn anomalies_total() -> u64 {
    ANOMALIES_TOTAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// Task lifecycle events the join left out.
pub struct TaskEventsIgnored<'a> {
    /// Dataflow.
    pub dataflow: &'a str,
    /// Why (`duplicate`).
    pub reason: &'static str,
    /// How many.
    pub count: u64,
}

impl TaskEventsIgnored<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::debug!(
            dataflow = self.dataflow,
            reason = self.reason,
            count = self.count,
            "task events ignored"
        );
        metrics()
            .task_events_ignored
            .get_or_create(&OperatorLabels {
                dataflow: self.dataflow.to_owned(),
                operator: self.reason.to_owned(),
            })
            .inc_by(self.count);
    }
}

/// Finished tasks left the lifecycle join's state.
pub struct TasksRetired<'a> {
    /// Dataflow.
    pub dataflow: &'a str,
    /// How many.
    pub count: u64,
}

impl TasksRetired<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::debug!(
            dataflow = self.dataflow,
            count = self.count,
            "tasks retired"
        );
        metrics()
            .tasks_retired
            .get_or_create(&OperatorLabels {
                dataflow: self.dataflow.to_owned(),
                operator: "TaskIndex".to_owned(),
            })
            .inc_by(self.count);
    }
}

/// A source's event-time watermark moved (or was re-read at a scrape).
pub struct WatermarkAdvanced<'a> {
    /// Dataflow.
    pub dataflow: &'a str,
    /// Global worker index.
    pub worker: usize,
    /// The watermark, microseconds since the epoch.
    pub watermark_us: i64,
}

impl WatermarkAdvanced<'_> {
    /// Logs and sets the gauge.
    pub fn emit(&self) {
        tracing::trace!(
            dataflow = self.dataflow,
            worker = self.worker,
            watermark_us = self.watermark_us,
            "watermark advanced"
        );
        let labels = WorkerLabels {
            dataflow: self.dataflow.to_owned(),
            worker: self.worker.to_string(),
        };
        remember(known_workers(), &labels);
        metrics()
            .watermark
            .get_or_create(&labels)
            .set(self.watermark_us as f64 / 1e6);
    }
}

/// Recomputes `primespark_watermark_lag_seconds` and `primespark_partition_watermark_lag_seconds`
/// from the watermarks and the wall clock: call right before encoding, so a stalled watermark
/// shows a growing lag.
pub fn refresh_watermark_lag(now_us: i64) {
    let m = metrics();
    let now = now_us as f64 / 1e6;
    // The families have no iterator: the watermark gauges are re-read through a scrape-time
    // snapshot of the labels we have set.
    for labels in known_workers()
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default()
    {
        let wm = m.watermark.get_or_create(&labels).get();
        m.watermark_lag
            .get_or_create(&labels)
            .set((now - wm).max(0.0));
    }
    for labels in known_partitions()
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default()
    {
        let wm = m.partition_watermark.get_or_create(&labels).get();
        m.partition_watermark_lag
            .get_or_create(&labels)
            .set((now - wm).max(0.0));
    }
}

/// Notes `labels` in `known` (the label sets a scrape-time refresh re-reads).
fn remember<L: PartialEq + Clone>(known: &std::sync::Mutex<Vec<L>>, labels: &L) {
    if let Ok(mut known) = known.lock() {
        if !known.contains(labels) {
            known.push(labels.clone());
        }
    }
}

fn known_partitions() -> &'static std::sync::Mutex<Vec<PartitionLabels>> {
    static P: OnceLock<std::sync::Mutex<Vec<PartitionLabels>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// One partition's watermark, after a poll that read it.
pub struct PartitionWatermark<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// The partition's watermark, microseconds since the epoch.
    pub watermark_us: i64,
}

impl PartitionWatermark<'_> {
    /// Sets the gauge (no log line: this runs once per partition and poll).
    pub fn emit(&self) {
        let labels = PartitionLabels {
            topic: self.topic.to_owned(),
            partition: self.partition.to_string(),
        };
        remember(known_partitions(), &labels);
        metrics()
            .partition_watermark
            .get_or_create(&labels)
            .set(self.watermark_us as f64 / 1e6);
    }
}

fn known_workers() -> &'static std::sync::Mutex<Vec<WorkerLabels>> {
    static W: OnceLock<std::sync::Mutex<Vec<WorkerLabels>>> = OnceLock::new();
    W.get_or_init(Default::default)
}

/// A record failed decoding or validation.
pub struct DecodeFailed<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Reason code.
    pub reason: &'static str,
    /// Error message.
    pub error: &'a dyn std::fmt::Display,
}

impl DecodeFailed<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::debug!(
            topic = self.topic,
            partition = self.partition,
            offset = self.offset,
            reason = self.reason,
            error = %self.error,
            "record rejected"
        );
        metrics()
            .decode_errors
            .get_or_create(&ReasonLabels {
                topic: self.topic.to_owned(),
                reason: self.reason.to_owned(),
            })
            .inc();
    }
}

/// Events arrived behind the watermark and were left out of their windows.
pub struct LateEvents<'a> {
    /// Dataflow.
    pub dataflow: &'a str,
    /// Operator.
    pub operator: &'a str,
    /// How many.
    pub count: u64,
}

impl LateEvents<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::debug!(
            dataflow = self.dataflow,
            operator = self.operator,
            count = self.count,
            "late events"
        );
        metrics()
            .late_events
            .get_or_create(&OperatorLabels {
                dataflow: self.dataflow.to_owned(),
                operator: self.operator.to_owned(),
            })
            .inc_by(self.count);
    }
}

/// Windows were closed and emitted.
pub struct WindowsClosed<'a> {
    /// Dataflow.
    pub dataflow: &'a str,
    /// Operator.
    pub operator: &'a str,
    /// How many (window, key) aggregates.
    pub count: u64,
    /// End of the latest closed window, microseconds.
    pub window_end_us: u64,
}

impl WindowsClosed<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        WINDOWS_CLOSED_TOTAL.fetch_add(self.count, std::sync::atomic::Ordering::Relaxed);
        tracing::trace!(
            dataflow = self.dataflow,
            operator = self.operator,
            count = self.count,
            window_end_us = self.window_end_us,
            "windows closed"
        );
        metrics()
            .windows_closed
            .get_or_create(&OperatorLabels {
                dataflow: self.dataflow.to_owned(),
                operator: self.operator.to_owned(),
            })
            .inc_by(self.count);
    }
}

/// Windows closed so far by every window operator of this process (for status lines).
pub fn windows_closed_total() -> u64 {
    WINDOWS_CLOSED_TOTAL.load(std::sync::atomic::Ordering::Relaxed)
}

static WINDOWS_CLOSED_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A source read records of a Kafka partition.
pub struct RecordsRead<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Records.
    pub count: u64,
    /// Payload bytes.
    pub bytes: u64,
}

impl RecordsRead<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::trace!(
            topic = self.topic,
            partition = self.partition,
            count = self.count,
            bytes = self.bytes,
            "records received"
        );
        let labels = PartitionLabels {
            topic: self.topic.to_owned(),
            partition: self.partition.to_string(),
        };
        metrics().records.get_or_create(&labels).inc_by(self.count);
        metrics().bytes.get_or_create(&labels).inc_by(self.bytes);
        RECORDS_TOTAL.fetch_add(self.count, std::sync::atomic::Ordering::Relaxed);
    }
}

static RECORDS_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records consumed by this process so far, all topics (for status lines).
pub fn records_total() -> u64 {
    RECORDS_TOTAL.load(std::sync::atomic::Ordering::Relaxed)
}
