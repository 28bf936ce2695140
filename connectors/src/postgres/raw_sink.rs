//! Raw rows and dead letters in PostgreSQL: each batch's rows (binary COPY), its dead letters,
//! its late events and the partitions' next offsets (`source_offsets`, sink `postgres_raw`) in
//! one transaction. Records PostgreSQL refuses (SQLSTATE class 22 or 23) are found by bisection
//! in savepoints ([`rejected_records`]) and quarantined.

use std::collections::HashMap;

use async_trait::async_trait;
use futures::FutureExt;
use primespark_schemas::flow::{RawBatch, RawItem, SinkId};
use primespark_schemas::rows::{LateEventRow, PartitionOffset, RawRow};

use super::connection::{ping, Connection};
use super::{has_direct_compress_copy, rejected_records, write_raw, PostgresError};
use crate::sink::fence::Fence;
use crate::sink::registry::{Built, RawSinkKind, SinkContext, SinkSettings};
use crate::sink::{BoxRawSink, Classify, Flush, Refused, Sink, SinkError, Target};

/// Its name in `source_offsets`.
pub const NAME: &str = "postgres_raw";

/// The registry entry: wanted whenever PostgreSQL is enabled. A stream whose route keeps its
/// raw rows out of PostgreSQL still gets it, for its positions, dead letters, late events and
/// anomalies.
pub const RAW_ROWS: RawSinkKind = RawSinkKind {
    name: NAME,
    wanted: |settings, _| settings.postgres.is_some(),
    build: |settings, ctx, id| async move { build(settings, ctx, id) }.boxed(),
};

fn build(
    settings: &SinkSettings,
    ctx: &SinkContext,
    id: SinkId,
) -> Result<Built<BoxRawSink>, SinkError> {
    let Some(pg) = &settings.postgres else {
        return Err(SinkError::fatal(
            crate::sink::Domain::Internal,
            "postgres raw sink without [postgres]",
        ));
    };
    let sink = RawRowsSink {
        id,
        conn: Connection::new(pg.url.clone()),
        dataflow: ctx.stream.name,
        topic: ctx.topic.clone(),
        resume: ctx
            .stored
            .offsets_of(NAME)
            .map(|o| (o.partition, o))
            .collect(),
        backfill: ctx.backfill.is_some(),
        rows: settings.route(ctx.stream.kind).raw_postgres,
        fence: ctx.fence.clone(),
        committed: ctx
            .stored
            .offsets_of(NAME)
            .map(|o| (o.partition, o.next_offset))
            .collect(),
        // Off by configuration: never asked. On: asked at the first write.
        direct_compress: (!pg.direct_compress_copy).then_some(false),
    };
    Ok((Box::new(sink), Box::pin(ping(pg.url.clone()))))
}

/// The PostgreSQL raw sink of one worker.
pub struct RawRowsSink {
    id: SinkId,
    conn: Connection,
    dataflow: &'static str,
    topic: String,
    resume: HashMap<i32, PartitionOffset>,
    /// A backfill stores no positions: they belong to the streaming run.
    backfill: bool,
    /// Whether the stream's raw rows go to PostgreSQL (its route); without them only the
    /// anomalies among its scores do.
    rows: bool,
    /// The writer lease every transaction checks.
    fence: Fence,
    /// Per partition, the first offset not yet committed (stored, then each write's).
    committed: HashMap<i32, i64>,
    /// Whether raw COPYs go straight into the columnstore: `postgres.direct_compress_copy` and
    /// the database having it, which is asked at the first write (`None` until then).
    direct_compress: Option<bool>,
}

/// One transaction's worth of a batch; the rows are the batch's own, borrowed.
struct Share<'a> {
    rows: Vec<&'a RawRow>,
    letters: Vec<primespark_schemas::rows::DeadLetterRow>,
    late: Vec<LateEventRow>,
    offsets: Vec<PartitionOffset>,
}

impl RawRowsSink {
    /// The rows, letters, late events and offsets of `batch` this sink stores.
    fn share<'a>(&self, batch: &'a RawBatch) -> Share<'a> {
        let rows = batch
            .rows_for(self.id)
            .filter(|p| self.rows || matches!(&p.row, RawRow::Score(s) if s.is_anomaly()))
            .map(|p| &p.row)
            .collect();
        let letters = batch.letters_for(self.id).cloned().collect();
        // One late_events row per late record (a telemetry record is several points).
        let mut late: Vec<LateEventRow> = Vec::new();
        for item in &batch.items {
            let RawItem::Point(p) = item else { continue };
            let (partition, offset) = p.row.position();
            if p.late
                && p.delivery.contains(self.id)
                && !matches!(p.row, RawRow::Score(_))
                && late
                    .last()
                    .is_none_or(|l| (l.partition, l.offset) != (partition, offset))
            {
                late.push(LateEventRow {
                    partition,
                    offset,
                    event_time_us: p.row.time_us(),
                    late_by_us: p.late_by_us,
                });
            }
        }
        let offsets = if self.backfill {
            Vec::new()
        } else {
            batch
                .next_offsets
                .iter()
                .map(|(p, n)| PartitionOffset {
                    partition: *p,
                    next_offset: *n,
                    max_event_us: 0,
                })
                .collect()
        };
        Share {
            rows,
            letters,
            late,
            offsets,
        }
    }

    /// Writes the share; when PostgreSQL refuses its data, finds the refused records.
    async fn try_write(&mut self, share: &Share<'_>) -> Result<(), SinkError> {
        let client = self
            .conn
            .client()
            .await
            .map_err(Classify::into_sink_error)?;
        let direct = match self.direct_compress {
            Some(known) => known,
            None => {
                let has = has_direct_compress_copy(client)
                    .await
                    .map_err(Classify::into_sink_error)?;
                tracing::info!(
                    dataflow = self.dataflow,
                    direct_compress_copy = has,
                    "raw rows COPY {} the columnstore",
                    if has {
                        "straight into"
                    } else {
                        "into the row store, not"
                    }
                );
                self.direct_compress = Some(has);
                has
            }
        };
        let written = write_raw(
            client,
            self.dataflow,
            NAME,
            &self.topic,
            &share.rows,
            &share.letters,
            &share.late,
            &share.offsets,
            &self.fence,
            direct,
        )
        .await;
        let Err(e) = written else { return Ok(()) };
        if !e.is_rejected_data() {
            return Err(e.into_sink_error());
        }
        let refused = rejected_records(client, &share.rows)
            .await
            .map_err(Classify::into_sink_error)?;
        if refused.is_empty() {
            // A refusal the rows alone do not reproduce (it would lie in the letters or
            // offsets, whose text is made storable): retried like an outage.
            return Err(SinkError::retry(e));
        }
        let refused = refused
            .into_iter()
            .map(|r| Refused {
                partition: r.partition,
                offset: r.offset,
                reason: r.reason,
            })
            .collect();
        Err(SinkError::quarantine(refused, e))
    }
}

#[async_trait]
impl Sink for RawRowsSink {
    type Input = RawBatch;

    fn id(&self) -> SinkId {
        self.id
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn target(&self) -> Target<'static> {
        Target {
            sink: "postgres",
            table: "raw",
        }
    }

    fn resume(&self, partition: i32) -> Option<PartitionOffset> {
        self.resume.get(&partition).copied()
    }

    fn committed(&self, partition: i32) -> crate::sink::Committed {
        if self.backfill {
            return crate::sink::Committed::NotTracked;
        }
        match self.committed.get(&partition) {
            Some(next) => crate::sink::Committed::Below(*next),
            None => crate::sink::Committed::Nothing,
        }
    }

    async fn recover(&mut self) -> Result<usize, SinkError> {
        // Rows and offsets commit in one transaction: nothing is ever half written.
        Ok(0)
    }

    async fn write(&mut self, batch: &RawBatch) -> Result<(), SinkError> {
        let share = self.share(batch);
        let result = self.try_write(&share).await;
        if result.is_ok() {
            // Rows and offsets went in one transaction: these are committed now.
            for o in &share.offsets {
                let next = self.committed.entry(o.partition).or_insert(o.next_offset);
                *next = (*next).max(o.next_offset);
            }
        }
        if result
            .as_ref()
            .is_err_and(|e| matches!(e.class(), crate::sink::ErrorClass::Retry))
        {
            // The session may be in any state after an unknown failure.
            self.conn.reset();
        }
        result
    }

    async fn commit(&mut self, _flush: Flush) -> Result<(), SinkError> {
        Ok(())
    }
}

impl From<PostgresError> for SinkError {
    fn from(e: PostgresError) -> Self {
        e.into_sink_error()
    }
}
