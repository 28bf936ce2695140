//! Records a sink refused become dead letters: their rows leave that sink's share of the batch,
//! and a `sink_rejected` letter takes their place for the refusing sink and the dead-letter
//! topic. Other sinks keep the records (the archive and the windows still have them).

use std::collections::BTreeMap;

use primespark_schemas::flow::{DeadLetter, RawBatch, RawItem, SinkId, SinkSet};
use primespark_schemas::rows::{DeadLetterRow, RawRow};

use super::Refused;

/// Reason code of a dead letter a sink refused after decoding and validation passed.
pub const SINK_REJECTED: &str = "sink_rejected";

/// Takes the rows of `refused` records out of `sink`'s share of `batch` and returns a dead
/// letter for each, delivered to `sink` (named `service` in the letter) and to `also` (the
/// dead-letter topic). The original
/// bytes are gone by now (decoding keeps only the fields), so a letter's payload is the
/// record's rows as JSON, and its error says so.
pub fn quarantine(
    topic: &str,
    batch: &mut RawBatch,
    sink: SinkId,
    service: &str,
    refused: &[Refused],
    also: SinkSet,
) -> Vec<RawItem> {
    let mut rows: BTreeMap<(i32, i64), Vec<RawRow>> = refused
        .iter()
        .map(|r| ((r.partition, r.offset), Vec::new()))
        .collect();
    for item in &mut batch.items {
        let RawItem::Point(p) = item else { continue };
        if !p.delivery.contains(sink) {
            continue;
        }
        if let Some(mine) = rows.get_mut(&p.row.position()) {
            mine.push(p.row.clone());
            p.delivery = p.delivery.without(sink);
        }
    }
    refused
        .iter()
        .map(|r| {
            tracing::warn!(
                topic,
                partition = r.partition,
                offset = r.offset,
                reason = %r.reason,
                "a sink refused a record; it goes to the dead letters"
            );
            let mine = rows.remove(&(r.partition, r.offset)).unwrap_or_default();
            RawItem::Dead(DeadLetter {
                row: DeadLetterRow {
                    partition: r.partition,
                    offset: r.offset,
                    reason: SINK_REJECTED.to_owned(),
                    error: format!(
                        "topic {topic} partition {} offset {}: the {service} sink refused the record \
                         ({}); payload: its decoded rows as JSON",
                        r.partition, r.offset, r.reason
                    ),
                    payload: serde_json::to_vec(&mine).unwrap_or_default(),
                },
                delivery: also.with(sink),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use primespark_schemas::flow::Point;
    use primespark_schemas::rows::TelemetryRow;

    #[test]
    fn a_refused_record_leaves_only_the_refusing_sink() {
        let (pg, parquet, dlq) = (
            SinkId::raw(0).unwrap(),
            SinkId::raw(1).unwrap(),
            SinkId::raw(2).unwrap(),
        );
        let all = SinkSet::of([pg, parquet, dlq, SinkId::WINDOWS]);
        let mut batch = RawBatch::default();
        for (offset, metric) in [(1, "a"), (1, "b"), (2, "a")] {
            batch.push(RawItem::Point(Point {
                row: RawRow::Telemetry(TelemetryRow {
                    time_us: 0,
                    device_id: "pi".into(),
                    metric_name: metric.into(),
                    value: 1.0,
                    partition: 0,
                    offset,
                }),
                delivery: all,
                late: false,
                late_by_us: 0,
            }));
        }
        let refused = [Refused {
            partition: 0,
            offset: 1,
            reason: "check constraint (SQLSTATE 23514)".into(),
        }];
        let letters = quarantine(
            "t",
            &mut batch,
            pg,
            "postgres",
            &refused,
            SinkSet::of([dlq]),
        );
        assert_eq!(letters.len(), 1);
        let RawItem::Dead(letter) = &letters[0] else {
            panic!("a letter")
        };
        assert_eq!(letter.delivery, SinkSet::of([pg, dlq]));
        assert_eq!(letter.row.reason, SINK_REJECTED);
        let rows: Vec<RawRow> = serde_json::from_slice(&letter.row.payload).unwrap();
        assert_eq!(rows.len(), 2, "both rows of the record");
        assert_eq!(batch.rows_for(pg).count(), 1, "offset 2 stays");
        assert_eq!(batch.rows_for(parquet).count(), 3, "the archive keeps all");
    }
}
