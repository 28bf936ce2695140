//! Typed telemetry events of the connectors: each `emit()` logs and bumps its series.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of per-partition source series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: String,
}

/// Labels of per-sink series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// Sink (`postgres`, `parquet`).
    pub sink: String,
    /// Table or dataset.
    pub table: String,
}

/// Labels of query series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// Endpoint (`http`).
    pub endpoint: String,
    /// `ok` or `error`.
    pub outcome: String,
}

struct Metrics {
    rows_written: Family<SinkLabels, Counter>,
    flush_seconds: Family<SinkLabels, Histogram>,
    sink_errors: Family<SinkLabels, Counter>,
    dead_letters: Family<PartitionLabels, Counter>,
    queries: Family<QueryLabels, Counter>,
    query_retries: Counter,
    query_seconds: Family<QueryLabels, Histogram>,
    sink_degraded: Family<SinkLabels, Gauge>,
    source_degraded: Family<TableLabels, Gauge>,
    consumer_lag: Family<PartitionLabels, Gauge>,
    group_committed: Family<PartitionLabels, Gauge>,
    group_commit_failures: Counter,
    tier_files: Family<OutcomeLabels, Counter>,
    tier_bytes: Counter,
    retention_deleted: Family<TableLabels, Counter>,
    archive_files: Counter,
    archive_rows: Counter,
    archive_bytes: Counter,
    tls_failures: Family<EndpointLabels, Counter>,
    wire_refused: Family<ReasonLabels, Counter>,
    wire_violations: Family<ReasonLabels, Counter>,
    wire_client_gone: Counter,
    http_refused: Family<ReasonLabels, Counter>,
    compacted_files: Family<TableLabels, Counter>,
    compacted_waiting: Gauge,
    archive_tier_reads: Family<TierLabels, Counter>,
    writer_lease: Family<LeaseLabels, Gauge>,
    writer_lease_epoch: Gauge,
    position_lost: Family<TableLabels, Counter>,
    relayouts: Family<RelayoutLabels, Counter>,
}

/// Labels of the source re-layout series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayoutLabels {
    /// Topic of the source.
    pub topic: String,
    /// `partitions_added` or `end_went_back`.
    pub reason: String,
}

/// Labels of the writer lease series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// `held`, `standby` or `lost`.
    pub state: String,
}

/// Labels of per-endpoint series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The endpoint (`http`).
    pub endpoint: String,
}

/// Labels of series counted by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: String,
}

/// Labels of series counted by archive tier.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// `nas` or `bucket`.
    pub tier: String,
}

/// Labels of per-table series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// Table name.
    pub table: String,
}

/// Labels of series counted by outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `moved` or `failed`.
    pub outcome: String,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        rows_written: Family::default(),
        flush_seconds: Family::new_with_constructor(seconds_histogram),
        sink_errors: Family::default(),
        dead_letters: Family::default(),
        queries: Family::default(),
        query_retries: Counter::default(),
        query_seconds: Family::new_with_constructor(seconds_histogram),
        sink_degraded: Family::default(),
        source_degraded: Family::default(),
        consumer_lag: Family::default(),
        group_committed: Family::default(),
        group_commit_failures: Counter::default(),
        tier_files: Family::default(),
        tier_bytes: Counter::default(),
        retention_deleted: Family::default(),
        archive_files: Counter::default(),
        archive_rows: Counter::default(),
        archive_bytes: Counter::default(),
        tls_failures: Family::default(),
        wire_refused: Family::default(),
        wire_violations: Family::default(),
        wire_client_gone: Counter::default(),
        http_refused: Family::default(),
        compacted_files: Family::default(),
        compacted_waiting: Gauge::default(),
        archive_tier_reads: Family::default(),
        writer_lease: Family::default(),
        writer_lease_epoch: Gauge::default(),
        position_lost: Family::default(),
        relayouts: Family::default(),
    })
}

/// Registers the connectors' series.
pub fn register(registry: &mut Registry) {
    let m = metrics();
    registry.register(
        "primespark_writer_lease",
        "1 for the writer lease state this process is in (held, standby, lost)",
        m.writer_lease.clone(),
    );
    registry.register(
        "primespark_source_position_lost",
        "Partitions whose stored position the broker no longer has (topic recreated or truncated), by topic",
        m.position_lost.clone(),
    );
    registry.register(
        "primespark_source_relayouts",
        "Times the dataflows drained and restarted in-process on a topic's new layout, by topic and reason (partitions_added, end_went_back)",
        m.relayouts.clone(),
    );
    registry.register(
        "primespark_writer_lease_epoch",
        "Epoch of the writer lease this process holds (0: none)",
        m.writer_lease_epoch.clone(),
    );
    registry.register(
        "primespark_consumer_lag_records",
        "Records between a partition's consumer position and its high watermark, from the client's statistics",
        m.consumer_lag.clone(),
    );
    registry.register(
        "primespark_sink_rows_written",
        "Rows made durable by a sink",
        m.rows_written.clone(),
    );
    registry.register(
        "primespark_sink_flush_duration_seconds",
        "Duration of one sink flush (one transaction or one file roll)",
        m.flush_seconds.clone(),
    );
    registry.register(
        "primespark_sink_errors",
        "Failed sink flushes (retried)",
        m.sink_errors.clone(),
    );
    registry.register(
        "primespark_dead_letters",
        "Records stored in dead_letters",
        m.dead_letters.clone(),
    );
    registry.register(
        "primespark_queries",
        "SQL queries answered",
        m.queries.clone(),
    );
    registry.register(
        "primespark_query_retries",
        "SQL queries run a second time because reading the stored files failed the first (a file listed by the plan changed or went away before it was read)",
        m.query_retries.clone(),
    );
    registry.register(
        "primespark_query_duration_seconds",
        "SQL query duration",
        m.query_seconds.clone(),
    );
    registry.register(
        "primespark_kafka_group_committed_offset",
        "Position last committed to the Kafka consumer group (monitoring only), per partition",
        m.group_committed.clone(),
    );
    registry.register(
        "primespark_kafka_group_commit_failures",
        "Commits of sink positions to the Kafka consumer group that failed",
        m.group_commit_failures.clone(),
    );
    registry.register(
        "primespark_tier_files",
        "NAS files moved to object storage (copied, verified, removed) or left after a failure",
        m.tier_files.clone(),
    );
    registry.register(
        "primespark_retention_deleted_rows",
        "Rows deleted by the pipeline's own retention (plain PostgreSQL), per table",
        m.retention_deleted.clone(),
    );
    registry.register(
        "primespark_tier_bytes",
        "Bytes moved from the NAS to object storage",
        m.tier_bytes.clone(),
    );
    registry.register(
        "primespark_archive_files_read",
        "Parquet files read back from the archive (backfill)",
        m.archive_files.clone(),
    );
    registry.register(
        "primespark_archive_rows_read",
        "Raw rows read back from the archive (backfill)",
        m.archive_rows.clone(),
    );
    registry.register(
        "primespark_archive_bytes_read",
        "Bytes of Parquet read back from the archive (backfill)",
        m.archive_bytes.clone(),
    );
    registry.register(
        "primespark_aggregate_files_compacted",
        "1-minute aggregate files merged into their hour's file (NAS), per table",
        m.compacted_files.clone(),
    );
    registry.register(
        "primespark_aggregate_files_awaiting_removal",
        "Merged 1-minute aggregate files still on the NAS, hidden by their hour file, until nas.compaction_grace has passed",
        m.compacted_waiting.clone(),
    );
    registry.register(
        "primespark_wire_logins_refused",
        "Wire-protocol connections refused before or during authentication, by reason (bad_password, tls_required, too_many_failures, too_many_connections)",
        m.wire_refused.clone(),
    );
    registry.register(
        "primespark_wire_protocol_violations",
        "Wire-protocol connections closed for a malformed or unexpected frontend message, by reason (length, truncated, trailing, value, unexpected_type)",
        m.wire_violations.clone(),
    );
    registry.register(
        "primespark_wire_statements_abandoned",
        "Wire-protocol statements cancelled because their client hung up while they ran",
        m.wire_client_gone.clone(),
    );
    registry.register(
        "primespark_http_refused",
        "HTTP connections and requests refused before authentication, by reason (too_many_connections, too_many_from_address, too_many_failures)",
        m.http_refused.clone(),
    );
    registry.register(
        "primespark_tls_handshake_failures",
        "TLS handshakes of the HTTP SQL endpoint that failed or timed out",
        m.tls_failures.clone(),
    );
    registry.register(
        "primespark_archive_tier_reads",
        "Read requests (byte ranges, heads) on archive files by SQL queries and backfills, by the tier that served them (nas, bucket)",
        m.archive_tier_reads.clone(),
    );
    registry.register(
        "primespark_sink_degraded",
        "1 while a sink is failing and retrying",
        m.sink_degraded.clone(),
    );
    registry.register(
        "primespark_source_degraded",
        "1 while a source's client cannot reach the broker (label `table` is the topic)",
        m.source_degraded.clone(),
    );
}

static DEAD_LETTERS_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Dead letters stored by this process so far (for status lines).
pub fn dead_letters_total() -> u64 {
    DEAD_LETTERS_TOTAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// A sink made rows durable.
pub struct SinkRowsWritten<'a> {
    /// Sink.
    pub sink: &'a str,
    /// Table.
    pub table: &'a str,
    /// Rows.
    pub rows: u64,
    /// How long the flush took.
    pub duration: Duration,
}

impl SinkRowsWritten<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::debug!(
            sink = self.sink,
            table = self.table,
            rows = self.rows,
            duration_ms = self.duration.as_millis() as u64,
            "rows written"
        );
        let labels = SinkLabels {
            sink: self.sink.to_owned(),
            table: self.table.to_owned(),
        };
        metrics()
            .rows_written
            .get_or_create(&labels)
            .inc_by(self.rows);
        metrics()
            .flush_seconds
            .get_or_create(&labels)
            .observe(self.duration.as_secs_f64());
    }
}

/// A sink flush failed; it will be retried.
pub struct SinkFailed<'a> {
    /// Sink.
    pub sink: &'a str,
    /// Table.
    pub table: &'a str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
    /// Attempt number, from 1.
    pub attempt: u32,
}

impl SinkFailed<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::warn!(sink = self.sink, table = self.table, attempt = self.attempt, error = %self.error, "sink flush failed, retrying");
        let labels = SinkLabels {
            sink: self.sink.to_owned(),
            table: self.table.to_owned(),
        };
        metrics().sink_errors.get_or_create(&labels).inc();
        metrics().sink_degraded.get_or_create(&labels).set(1);
        remember_error(self.sink, self.table, self.error);
        if let Ok(mut d) = degraded().lock() {
            d.insert(
                (self.sink.to_owned(), self.table.to_owned()),
                self.error.to_string(),
            );
        }
    }
}

fn degraded() -> &'static std::sync::Mutex<std::collections::BTreeMap<(String, String), String>> {
    static D: OnceLock<std::sync::Mutex<std::collections::BTreeMap<(String, String), String>>> =
        OnceLock::new();
    D.get_or_init(Default::default)
}

/// (sink, table) -> (last error, when, microseconds since the epoch); kept after recovery.
type LastErrors = std::collections::BTreeMap<(String, String), (String, i64)>;

fn last_errors() -> &'static std::sync::Mutex<LastErrors> {
    static E: OnceLock<std::sync::Mutex<LastErrors>> = OnceLock::new();
    E.get_or_init(Default::default)
}

fn remember_error(sink: &str, table: &str, error: &dyn std::fmt::Display) {
    if let Ok(mut e) = last_errors().lock() {
        e.insert(
            (sink.to_owned(), table.to_owned()),
            (error.to_string(), chrono::Utc::now().timestamp_micros()),
        );
    }
}

/// The last error of every sink that ever failed in this process, recovered or not:
/// (sink, table, error, when in microseconds since the epoch). For the console.
pub fn sink_last_errors() -> Vec<(String, String, String, i64)> {
    last_errors()
        .lock()
        .map(|e| {
            e.iter()
                .map(|((s, t), (err, at))| (s.clone(), t.clone(), err.clone(), *at))
                .collect()
        })
        .unwrap_or_default()
}

/// The component name under which degraded sources are listed by [`degraded_sinks`].
pub const SOURCE: &str = "kafka-source";

/// Sinks whose last flush failed and are retrying, and sources that lost the broker (listed as
/// [`SOURCE`] with the topic as table): (component, table) -> last error. Feeds `/readyz`.
pub fn degraded_sinks() -> Vec<(String, String, String)> {
    degraded()
        .lock()
        .map(|d| {
            d.iter()
                .map(|((s, t), e)| (s.clone(), t.clone(), e.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// A sink failed in a way retrying cannot fix: the pipeline stops.
pub struct SinkStopped<'a> {
    /// Sink.
    pub sink: &'a str,
    /// Table.
    pub table: &'a str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl SinkStopped<'_> {
    /// Logs, counts the error and marks the sink degraded with it (for `/readyz`).
    pub fn emit(&self) {
        tracing::error!(sink = self.sink, table = self.table, error = %self.error, "sink failed for good; the pipeline stops");
        let labels = SinkLabels {
            sink: self.sink.to_owned(),
            table: self.table.to_owned(),
        };
        metrics().sink_errors.get_or_create(&labels).inc();
        metrics().sink_degraded.get_or_create(&labels).set(1);
        remember_error(self.sink, self.table, self.error);
        if let Ok(mut d) = degraded().lock() {
            d.insert(
                (self.sink.to_owned(), self.table.to_owned()),
                self.error.to_string(),
            );
        }
    }
}

/// A sink recovered after failures.
pub struct SinkRecovered<'a> {
    /// Sink.
    pub sink: &'a str,
    /// Table.
    pub table: &'a str,
}

impl SinkRecovered<'_> {
    /// Logs and clears the degraded flag.
    pub fn emit(&self) {
        tracing::info!(sink = self.sink, table = self.table, "sink recovered");
        if let Ok(mut d) = degraded().lock() {
            d.remove(&(self.sink.to_owned(), self.table.to_owned()));
        }
        metrics()
            .sink_degraded
            .get_or_create(&SinkLabels {
                sink: self.sink.to_owned(),
                table: self.table.to_owned(),
            })
            .set(0);
    }
}

/// Dead letters were stored.
pub struct DeadLettersWritten<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// How many.
    pub count: u64,
}

impl DeadLettersWritten<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        // Per batch: the counter and the status line carry the numbers at the default level.
        tracing::debug!(
            topic = self.topic,
            partition = self.partition,
            count = self.count,
            "dead letters stored"
        );
        metrics()
            .dead_letters
            .get_or_create(&PartitionLabels {
                topic: self.topic.to_owned(),
                partition: self.partition.to_string(),
            })
            .inc_by(self.count);
        DEAD_LETTERS_TOTAL.fetch_add(self.count, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A SQL query finished.
pub struct QueryExecuted<'a> {
    /// Endpoint.
    pub endpoint: &'a str,
    /// Whether it succeeded.
    pub ok: bool,
    /// Rows returned.
    pub rows: u64,
    /// Duration.
    pub duration: Duration,
}

impl QueryExecuted<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        let outcome = if self.ok { "ok" } else { "error" };
        tracing::info!(
            endpoint = self.endpoint,
            outcome,
            rows = self.rows,
            duration_ms = self.duration.as_millis() as u64,
            "query"
        );
        let labels = QueryLabels {
            endpoint: self.endpoint.to_owned(),
            outcome: outcome.to_owned(),
        };
        metrics().queries.get_or_create(&labels).inc();
        metrics()
            .query_seconds
            .get_or_create(&labels)
            .observe(self.duration.as_secs_f64());
    }
}

/// A query is run once more after reading the stored files failed.
pub struct QueryRetried<'a> {
    /// The first run's failure.
    pub error: &'a dyn std::fmt::Display,
}

impl QueryRetried<'_> {
    /// Logs at warn level and counts.
    pub fn emit(&self) {
        tracing::warn!(error = %self.error, "reading the stored files failed; the query runs again");
        metrics().query_retries.inc();
    }
}

/// Positions were committed to the consumer group.
pub struct GroupOffsetCommitted<'a> {
    /// Consumer group.
    pub group: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// The committed position: the first offset not yet durable in every sink.
    pub next_offset: i64,
}

impl GroupOffsetCommitted<'_> {
    /// Logs and sets the gauge.
    pub fn emit(&self) {
        tracing::trace!(
            group = self.group,
            topic = self.topic,
            partition = self.partition,
            next_offset = self.next_offset,
            "group offset committed"
        );
        metrics()
            .group_committed
            .get_or_create(&PartitionLabels {
                topic: self.topic.to_owned(),
                partition: self.partition.to_string(),
            })
            .set(self.next_offset);
    }
}

/// A commit to the consumer group failed (the caller logs it, rate-limited).
pub struct GroupCommitFailed;

impl GroupCommitFailed {
    /// Counts.
    pub fn emit(&self) {
        metrics().group_commit_failures.inc();
    }
}

/// The Kafka client's statistics reported a partition's consumer lag.
pub struct ConsumerLag<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// High watermark minus position, records.
    pub lag: i64,
}

impl ConsumerLag<'_> {
    /// Logs and sets the gauge.
    pub fn emit(&self) {
        tracing::trace!(
            topic = self.topic,
            partition = self.partition,
            lag = self.lag,
            "consumer lag"
        );
        metrics()
            .consumer_lag
            .get_or_create(&PartitionLabels {
                topic: self.topic.to_owned(),
                partition: self.partition.to_string(),
            })
            .set(self.lag);
    }
}

/// A NAS file was moved to object storage and verified.
pub struct TierMoved<'a> {
    /// The NAS file (now removed).
    pub file: &'a std::path::Path,
    /// Object key.
    pub key: &'a str,
    /// Bytes.
    pub bytes: u64,
    /// Copy, verification and removal.
    pub duration: Duration,
}

impl TierMoved<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::info!(
            file = %self.file.display(),
            key = self.key,
            bytes = self.bytes,
            duration_ms = self.duration.as_millis() as u64,
            "moved to object storage"
        );
        let m = metrics();
        m.tier_files
            .get_or_create(&OutcomeLabels {
                outcome: "moved".into(),
            })
            .inc();
        m.tier_bytes.inc_by(self.bytes);
    }
}

/// A NAS file could not be moved (it stays; the next pass retries).
pub struct TierFailed<'a> {
    /// The NAS file.
    pub file: &'a std::path::Path,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
}

impl TierFailed<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::warn!(file = %self.file.display(), error = %self.error, "moving to object storage failed; kept on the NAS");
        metrics()
            .tier_files
            .get_or_create(&OutcomeLabels {
                outcome: "failed".into(),
            })
            .inc();
    }
}

/// Expired rows were deleted from a table (plain PostgreSQL retention).
pub struct RetentionDeleted<'a> {
    /// Table.
    pub table: &'a str,
    /// Rows deleted.
    pub rows: u64,
    /// Time taken.
    pub duration: Duration,
}

impl RetentionDeleted<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::info!(
            table = self.table,
            rows = self.rows,
            duration_ms = self.duration.as_millis() as u64,
            "expired rows deleted"
        );
        metrics()
            .retention_deleted
            .get_or_create(&TableLabels {
                table: self.table.to_owned(),
            })
            .inc_by(self.rows);
    }
}

/// One archive file was read back (backfill).
pub struct ArchiveFileRead<'a> {
    /// Path under the archive root.
    pub file: &'a str,
    /// Rows in it.
    pub rows: u64,
    /// Its size.
    pub bytes: u64,
    /// Fetch and decode.
    pub duration: Duration,
}

impl ArchiveFileRead<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::debug!(
            file = self.file,
            rows = self.rows,
            bytes = self.bytes,
            duration_ms = self.duration.as_millis() as u64,
            "archive file read"
        );
        let m = metrics();
        m.archive_files.inc();
        m.archive_rows.inc_by(self.rows);
        m.archive_bytes.inc_by(self.bytes);
    }
}

/// A source's Kafka client lost the broker (transport failure, all brokers down). librdkafka
/// reconnects by itself; until it does, the source is reported degraded.
pub struct SourceDisconnected<'a> {
    /// Topic of the source.
    pub topic: &'a str,
    /// The client's error.
    pub error: &'a dyn std::fmt::Display,
}

impl SourceDisconnected<'_> {
    /// Logs and sets the degraded flag.
    pub fn emit(&self) {
        tracing::warn!(topic = self.topic, error = %self.error, "source lost the broker; the client keeps reconnecting");
        metrics()
            .source_degraded
            .get_or_create(&TableLabels {
                table: self.topic.to_owned(),
            })
            .set(1);
        if let Ok(mut d) = degraded().lock() {
            d.insert(
                (SOURCE.to_owned(), self.topic.to_owned()),
                self.error.to_string(),
            );
        }
    }
}

/// A partition's position is outside what the broker holds: the topic was deleted and
/// recreated (its offsets went backwards) or truncated below it. The partition is not read
/// until an operator acts; it is never silently reset.
pub struct SourcePositionLost<'a> {
    /// Topic of the source.
    pub topic: &'a str,
    /// The client's error (it names the partition and offset).
    pub error: &'a dyn std::fmt::Display,
}

impl SourcePositionLost<'_> {
    /// Logs, counts and sets the degraded flag (`/readyz`), which only a restart clears.
    pub fn emit(&self) {
        tracing::error!(topic = self.topic, error = %self.error, "a partition's stored position is outside the topic (deleted and recreated, or truncated): it is not read; see ARCHITECTURE.md, \"Partitions and offsets\"");
        metrics()
            .position_lost
            .get_or_create(&TableLabels {
                table: self.topic.to_owned(),
            })
            .inc();
        if let Ok(mut d) = degraded().lock() {
            d.insert(
                (
                    SOURCE.to_owned(),
                    format!("{} (position out of range)", self.topic),
                ),
                self.error.to_string(),
            );
        }
    }
}

/// A running source's topic changed layout: the dataflows drain and start again on it.
pub struct SourceRelayout<'a> {
    /// Topic of the source.
    pub topic: &'a str,
    /// `partitions_added` or `end_went_back`.
    pub reason: &'static str,
    /// What changed (partitions, ends).
    pub detail: &'a str,
}

impl SourceRelayout<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        tracing::warn!(
            topic = self.topic,
            reason = self.reason,
            detail = self.detail,
            "topic layout changed: the dataflows drain, commit and start again on it"
        );
        metrics()
            .relayouts
            .get_or_create(&RelayoutLabels {
                topic: self.topic.to_owned(),
                reason: self.reason.to_owned(),
            })
            .inc();
    }
}

/// A source's client reached the broker again.
pub struct SourceReconnected<'a> {
    /// Topic of the source.
    pub topic: &'a str,
}

impl SourceReconnected<'_> {
    /// Logs and clears the degraded flag.
    pub fn emit(&self) {
        tracing::info!(topic = self.topic, "source reconnected to the broker");
        if let Ok(mut d) = degraded().lock() {
            d.remove(&(SOURCE.to_owned(), self.topic.to_owned()));
        }
        metrics()
            .source_degraded
            .get_or_create(&TableLabels {
                table: self.topic.to_owned(),
            })
            .set(0);
    }
}

/// A client's TLS handshake with a SQL endpoint failed.
pub struct TlsHandshakeFailed<'a> {
    /// The endpoint (`http`).
    pub endpoint: &'a str,
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// Why (rustls' message, or a timeout).
    pub error: &'a dyn std::fmt::Display,
}

impl TlsHandshakeFailed<'_> {
    /// Logs at debug level (clients cause it, not us) and counts.
    pub fn emit(&self) {
        tracing::debug!(endpoint = self.endpoint, peer = %self.peer, error = %self.error, "tls handshake failed");
        metrics()
            .tls_failures
            .get_or_create(&EndpointLabels {
                endpoint: self.endpoint.to_owned(),
            })
            .inc();
    }
}

/// The wire endpoint refused a connection.
pub struct WireLoginRefused<'a> {
    /// The user it named (empty before the startup message).
    pub user: &'a str,
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// `bad_password`, `tls_required`, `too_many_failures` or `too_many_connections`.
    pub reason: &'static str,
}

impl WireLoginRefused<'_> {
    /// An audit line and a count.
    pub fn emit(&self) {
        tracing::warn!(target: "primespark::audit", endpoint = "pg", user = self.user, peer = %self.peer, reason = self.reason, outcome = "unauthenticated", "wire login refused");
        metrics()
            .wire_refused
            .get_or_create(&ReasonLabels {
                reason: self.reason.to_owned(),
            })
            .inc();
    }
}

/// A wire client sent a message no well-behaved client sends; its connection was closed.
pub struct WireProtocolViolation<'a> {
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// `length`, `truncated`, `trailing`, `value` or `unexpected_type`.
    pub reason: &'static str,
    /// What was wrong, in words.
    pub detail: &'a str,
}

impl WireProtocolViolation<'_> {
    /// A warning (at most one per connection: the connection ends) and a count.
    pub fn emit(&self) {
        tracing::warn!(endpoint = "pg", peer = %self.peer, reason = self.reason, detail = self.detail, "wire protocol violation: connection closed");
        metrics()
            .wire_violations
            .get_or_create(&ReasonLabels {
                reason: self.reason.to_owned(),
            })
            .inc();
    }
}

/// A wire client hung up while its statement ran; the statement was cancelled.
pub struct WireClientGone {
    /// The client's address.
    pub peer: std::net::SocketAddr,
}

impl WireClientGone {
    /// A debug line (clients that give up are routine) and a count.
    pub fn emit(&self) {
        tracing::debug!(endpoint = "pg", peer = %self.peer, "wire client hung up during a statement: cancelled");
        metrics().wire_client_gone.inc();
    }
}

/// The HTTP endpoint refused a connection or a request before authentication.
pub struct HttpConnectionRefused {
    /// The client's address.
    pub peer: std::net::IpAddr,
    /// `too_many_connections`, `too_many_from_address` or `too_many_failures`.
    pub reason: &'static str,
}

impl HttpConnectionRefused {
    /// Logs at debug level (a flood would flood the log) and counts.
    pub fn emit(&self) {
        tracing::debug!(peer = %self.peer, reason = self.reason, "http connection refused");
        metrics()
            .http_refused
            .get_or_create(&ReasonLabels {
                reason: self.reason.to_owned(),
            })
            .inc();
    }
}

/// A reader of the archive (a SQL query, a backfill) read a file from one tier.
pub struct ArchiveTierRead<'a> {
    /// `nas` or `bucket`.
    pub tier: &'a str,
    /// The file, relative to the archive root.
    pub path: &'a str,
}

impl ArchiveTierRead<'_> {
    /// Logs at trace level and counts.
    pub fn emit(&self) {
        tracing::trace!(tier = self.tier, path = self.path, "archive file read");
        metrics()
            .archive_tier_reads
            .get_or_create(&TierLabels {
                tier: self.tier.to_owned(),
            })
            .inc();
    }
}

/// The final hour of a 1-minute table was compacted into one file.
pub struct AggregatesCompacted<'a> {
    /// Table.
    pub table: &'a str,
    /// Hour start, microseconds since the epoch.
    pub hour_us: i64,
    /// Minute files merged (removed after `nas.compaction_grace`).
    pub minute_files: u64,
    /// Rows in the hour file.
    pub rows: u64,
    /// How long it took.
    pub duration: Duration,
}

impl AggregatesCompacted<'_> {
    /// Logs at debug level and counts.
    pub fn emit(&self) {
        tracing::debug!(
            table = self.table,
            hour_us = self.hour_us,
            minute_files = self.minute_files,
            rows = self.rows,
            duration_ms = self.duration.as_millis() as u64,
            "aggregate hour compacted"
        );
        metrics()
            .compacted_files
            .get_or_create(&TableLabels {
                table: self.table.to_owned(),
            })
            .inc_by(self.minute_files);
    }
}

/// Merged minute files queued to wait out `nas.compaction_grace`, or released from the wait
/// (removed, or found gone) once it had passed.
pub struct MergedFilesWaiting {
    /// Files that started waiting.
    pub queued: u64,
    /// Files that stopped waiting.
    pub released: u64,
    /// Of those, files this call removed.
    pub removed: u64,
}

impl MergedFilesWaiting {
    /// Logs at debug level and moves the waiting gauge (shared by every stream's sink).
    pub fn emit(&self) {
        tracing::debug!(
            queued = self.queued,
            released = self.released,
            removed = self.removed,
            "merged minute files"
        );
        let gauge = &metrics().compacted_waiting;
        gauge.inc_by(i64::try_from(self.queued).unwrap_or(i64::MAX));
        gauge.dec_by(i64::try_from(self.released).unwrap_or(i64::MAX));
    }
}

/// Where this process stands with the writer lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterLeaseState {
    /// It writes.
    Held,
    /// Another live instance writes; this one waits.
    Standby,
    /// It held the lease and another instance took it over: it stops.
    Lost,
}

impl WriterLeaseState {
    fn as_str(self) -> &'static str {
        match self {
            WriterLeaseState::Held => "held",
            WriterLeaseState::Standby => "standby",
            WriterLeaseState::Lost => "lost",
        }
    }
}

fn lease_status() -> &'static std::sync::Mutex<Option<(WriterLeaseState, String)>> {
    static S: OnceLock<std::sync::Mutex<Option<(WriterLeaseState, String)>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// The writer lease state and its detail, for `/readyz` (`None`: no lease is used).
pub fn writer_lease() -> Option<(WriterLeaseState, String)> {
    lease_status().lock().ok().and_then(|s| s.clone())
}

/// The writer lease changed state (or a standby learned who holds it).
pub struct WriterLeaseStatus {
    /// The state.
    pub state: WriterLeaseState,
    /// The epoch held (0: none).
    pub epoch: i64,
    /// What `/readyz` shows.
    pub detail: String,
}

impl WriterLeaseStatus {
    /// Sets the gauges and the readiness detail.
    pub fn emit(self) {
        let m = metrics();
        for state in [
            WriterLeaseState::Held,
            WriterLeaseState::Standby,
            WriterLeaseState::Lost,
        ] {
            m.writer_lease
                .get_or_create(&LeaseLabels {
                    state: state.as_str().to_owned(),
                })
                .set(i64::from(state == self.state));
        }
        m.writer_lease_epoch.set(self.epoch);
        if let Ok(mut s) = lease_status().lock() {
            *s = Some((self.state, self.detail));
        }
    }
}
