//! [`PostgresScanExec`]: one partition that runs its SQL when executed and streams record
//! batches as rows arrive; abandoned mid-query, it cancels the query and closes the
//! connection.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::{Stream, StreamExt, TryStreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::RowStream;

use super::pool::{PgPool, PooledClient};
use super::rows::BatchBuilder;
use super::types::ColumnKind;
use super::{PgTableError, BATCH_ROWS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ScanMode {
    /// The statement returns the projected columns.
    Rows,
    /// The statement returns one `count(*)`; the scan yields that many column-less rows.
    Count,
}

#[derive(Debug)]
pub(super) struct ScanSpec {
    pub(super) pool: PgPool,
    pub(super) table: String,
    pub(super) sql: String,
    pub(super) mode: ScanMode,
    pub(super) schema: SchemaRef,
    pub(super) kinds: Vec<ColumnKind>,
}

/// The physical scan of a [`PostgresTable`](super::PostgresTable): one partition that runs its SQL when executed
/// and streams batches of [`BATCH_ROWS`] rows as rows arrive. `EXPLAIN` shows the SQL.
#[derive(Debug)]
pub struct PostgresScanExec {
    spec: Arc<ScanSpec>,
    properties: Arc<PlanProperties>,
}

impl PostgresScanExec {
    pub(super) fn new(spec: ScanSpec) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&spec.schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            spec: Arc::new(spec),
            properties: Arc::new(properties),
        }
    }

    /// The statement the scan sends.
    pub fn sql(&self) -> &str {
        &self.spec.sql
    }
}

impl DisplayAs for PostgresScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match t {
            DisplayFormatType::Default | DisplayFormatType::Verbose => write!(
                f,
                "PostgresScanExec: table={}, sql={}",
                self.spec.table, self.spec.sql
            ),
            DisplayFormatType::TreeRender => write!(f, "sql={}", self.spec.sql),
        }
    }
}

impl ExecutionPlan for PostgresScanExec {
    fn name(&self) -> &str {
        "PostgresScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "PostgresScanExec has no children".to_owned(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "PostgresScanExec has one partition, asked for {partition}"
            )));
        }
        let stream = scan_stream(Arc::clone(&self.spec)).map_err(DataFusionError::from);
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.spec.schema),
            stream,
        )))
    }
}

/// Where a scan's stream is.
enum ScanState {
    Start(Arc<ScanSpec>),
    Rows(Box<RowScan>),
    Count {
        spec: Arc<ScanSpec>,
        remaining: usize,
    },
    Done,
}

/// Runs the scan lazily on first poll; one batch per step.
fn scan_stream(spec: Arc<ScanSpec>) -> impl Stream<Item = Result<RecordBatch, PgTableError>> {
    futures::stream::try_unfold(ScanState::Start(spec), |state| async move {
        match state {
            ScanState::Start(spec) => start(spec).await,
            ScanState::Rows(scan) => scan.next_batch().await,
            ScanState::Count { spec, remaining } => Ok(count_batch(spec, remaining)?),
            ScanState::Done => Ok(None),
        }
    })
}

type Step = Option<(RecordBatch, ScanState)>;

async fn start(spec: Arc<ScanSpec>) -> Result<Step, PgTableError> {
    let started = Instant::now();
    let mut conn = spec.pool.get().await?;
    let client = conn.client().ok_or(PgTableError::PoolClosed)?;
    match spec.mode {
        ScanMode::Count => {
            let row = client
                .query_one(spec.sql.as_str(), &[])
                .await
                .map_err(|e| PgTableError::query(&spec.table, e))?;
            let count: i64 = row
                .try_get(0)
                .map_err(|e| PgTableError::query(&spec.table, e))?;
            conn.reusable = true;
            drop(conn);
            let rows = usize::try_from(count).unwrap_or(0);
            log_scan(&spec.table, rows, started);
            count_batch(spec, rows)
        }
        ScanMode::Rows => {
            let rows = client
                .query_raw(spec.sql.as_str(), std::iter::empty::<&(dyn ToSql + Sync)>())
                .await
                .map_err(|e| PgTableError::query(&spec.table, e))?;
            let builders = BatchBuilder::new(&spec.kinds);
            let scan = RowScan {
                spec,
                conn,
                rows: Box::pin(rows),
                builders,
                started,
                total: 0,
                finished: false,
            };
            Box::new(scan).next_batch().await
        }
    }
}

fn log_scan(table: &str, rows: usize, started: Instant) {
    let duration_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::debug!(table, rows, duration_ms, "postgres scan finished");
}

/// Up to [`BATCH_ROWS`] column-less rows of a counted scan.
fn count_batch(spec: Arc<ScanSpec>, remaining: usize) -> Result<Step, PgTableError> {
    if remaining == 0 {
        return Ok(None);
    }
    let n = remaining.min(BATCH_ROWS);
    let batch = RecordBatch::try_new_with_options(
        Arc::clone(&spec.schema),
        Vec::new(),
        &RecordBatchOptions::new().with_row_count(Some(n)),
    )
    .map_err(|source| PgTableError::Arrow {
        table: spec.table.clone(),
        source,
    })?;
    Ok(Some((
        batch,
        ScanState::Count {
            spec,
            remaining: remaining - n,
        },
    )))
}

/// A running row query and the batch being filled.
struct RowScan {
    spec: Arc<ScanSpec>,
    conn: PooledClient,
    rows: Pin<Box<RowStream>>,
    builders: BatchBuilder,
    started: Instant,
    total: usize,
    finished: bool,
}

impl RowScan {
    async fn next_batch(mut self: Box<Self>) -> Result<Step, PgTableError> {
        while let Some(row) = self.rows.next().await {
            let row = row.map_err(|e| PgTableError::query(&self.spec.table, e))?;
            self.builders.push(&row, &self.spec)?;
            self.total += 1;
            if self.builders.len == BATCH_ROWS {
                let batch = self.builders.finish(&self.spec)?;
                return Ok(Some((batch, ScanState::Rows(self))));
            }
        }
        self.finished = true;
        self.conn.reusable = true;
        log_scan(&self.spec.table, self.total, self.started);
        if self.builders.len == 0 {
            return Ok(None);
        }
        let batch = self.builders.finish(&self.spec)?;
        Ok(Some((batch, ScanState::Done)))
    }
}

impl Drop for RowScan {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Abandoned mid-query (LIMIT satisfied above us, query cancelled, error): stop the
        // server's work. The connection is closed, not pooled, so this cannot cancel anyone else.
        tracing::debug!(
            table = %self.spec.table,
            rows = self.total,
            "postgres scan abandoned; cancelling"
        );
        let (Some(client), Ok(runtime)) =
            (self.conn.client(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let token = client.cancel_token();
        let table = self.spec.table.clone();
        let tls = self.spec.pool.tls().clone();
        runtime.spawn(async move {
            if let Err(e) = token.cancel_query(tls).await {
                tracing::debug!(table, error = %e, "postgres cancel request failed");
            }
        });
    }
}
