//! Closed windows in PostgreSQL: every aggregate table's rows (batched upserts), the task
//! lifecycle join's state, the dataflow's committed watermark and the windows' resume offsets
//! (`source_offsets`, sink `aggregates`), in one transaction.

use std::collections::HashMap;

use async_trait::async_trait;
use futures::FutureExt;
use primespark_schemas::flow::{AggCommit, SinkId};
use primespark_schemas::rows::{Agg, AggRow, PartitionOffset};

use super::connection::{ping, Connection};
use super::write_aggregates;
use crate::sink::fence::Fence;
use crate::sink::registry::{AggSinkKind, Built, SinkContext, SinkSettings};
use crate::sink::{BoxAggSink, Classify, Domain, ErrorClass, Flush, Sink, SinkError, Target};

/// Its name in `source_offsets`.
pub const NAME: &str = "aggregates";

/// The registry entry: wanted whenever PostgreSQL is enabled, unless the stream's route keeps
/// its aggregates out of it.
pub const AGGREGATE_ROWS: AggSinkKind = AggSinkKind {
    name: NAME,
    wanted: |settings, scope| {
        settings.postgres.is_some() && settings.route(scope.stream.kind).aggregates_postgres
    },
    build: |settings, ctx| async move { build(settings, ctx) }.boxed(),
};

fn build(settings: &SinkSettings, ctx: &SinkContext) -> Result<Built<BoxAggSink>, SinkError> {
    let Some(pg) = &settings.postgres else {
        return Err(SinkError::fatal(
            Domain::Internal,
            "postgres aggregate sink without [postgres]",
        ));
    };
    let sink = AggregateRowsSink {
        conn: Connection::new(pg.url.clone()),
        dataflow: ctx.stream.name,
        topic: ctx.topic.clone(),
        resume: ctx
            .stored
            .offsets_of(NAME)
            .map(|o| (o.partition, o))
            .collect(),
        backfill: ctx.backfill,
        fence: ctx.fence.clone(),
    };
    Ok((Box::new(sink), Box::pin(ping(pg.url.clone()))))
}

/// The PostgreSQL aggregate sink of one dataflow.
pub struct AggregateRowsSink {
    conn: Connection,
    dataflow: &'static str,
    topic: String,
    resume: HashMap<i32, PartitionOffset>,
    /// A backfill of `[since, until)`: only windows inside it, and no resume state.
    backfill: Option<(i64, i64)>,
    /// The writer lease every transaction checks.
    fence: Fence,
}

/// The windows of a backfill's commit that lie wholly inside its range: windows cut by the
/// range's edges are partial, and the task join (which needs each task's whole life) only
/// counts from the archive's beginning.
fn inside_range(rows: &[AggRow], since: i64, until: i64) -> Vec<AggRow> {
    rows.iter()
        .filter(|r| {
            let (_, bucket, _, _) = r.identity();
            let join_complete =
                since == i64::MIN || !r.row.family().is_some_and(|f| f.whole_history);
            !matches!(r.row, Agg::TaskState(_))
                && join_complete
                && bucket >= since
                && bucket.saturating_add(r.rollup.width_us()) <= until
        })
        .cloned()
        .collect()
}

#[async_trait]
impl Sink for AggregateRowsSink {
    type Input = AggCommit;

    fn id(&self) -> SinkId {
        SinkId::WINDOWS
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn target(&self) -> Target<'static> {
        Target {
            sink: "postgres",
            table: "aggregates",
        }
    }

    fn resume(&self, partition: i32) -> Option<PartitionOffset> {
        self.resume.get(&partition).copied()
    }

    async fn recover(&mut self) -> Result<usize, SinkError> {
        Ok(0)
    }

    async fn write(&mut self, commit: &AggCommit) -> Result<(), SinkError> {
        let committed = i64::try_from(commit.checkpoint.committed_watermark_us).unwrap_or(i64::MAX);
        let filtered;
        let (rows, committed, positions) = match self.backfill {
            Some((since, until)) => {
                filtered = inside_range(&commit.rows, since, until);
                (filtered.as_slice(), None, &[][..])
            }
            None => (
                commit.rows.as_slice(),
                Some(committed),
                commit.checkpoint.partitions.as_slice(),
            ),
        };
        let result = match self.conn.client().await {
            Ok(client) => {
                write_aggregates(
                    client,
                    self.dataflow,
                    NAME,
                    &self.topic,
                    rows,
                    committed,
                    positions,
                    &self.fence,
                )
                .await
            }
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            self.conn.reset();
            match e.class() {
                // A window is no record: nothing to dead-letter, someone must look.
                ErrorClass::Quarantine(_) => {
                    SinkError::fatal(Domain::User, e).context("PostgreSQL refused an aggregate row")
                }
                _ => e.into_sink_error(),
            }
        })
    }

    async fn commit(&mut self, _flush: Flush) -> Result<(), SinkError> {
        Ok(())
    }
}
