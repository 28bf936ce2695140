//! Decode and validate Kafka records into typed points; bad records become [`DeadLetter`]s with
//! their reason and source offset instead of failing anything.

use primespark_schemas::rows::{DeadLetterRow, RawRow};
use primespark_schemas::{DecodeError, DecodeLimits};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;

use crate::metrics::DecodeFailed;
use crate::record::{DeadLetter, Point, SinkSet, SourceRecord};
use crate::EventTime;

pub use primespark_schemas::streams::StreamKind;

/// Decoding of a stream's records, by its kind: the decoder of its [`primespark_schemas::streams::STREAMS`] entry.
pub trait DecodeRecord {
    /// Decodes and validates one record into its points, or a dead letter with the reason and
    /// source offset (and a counted, logged decode error).
    fn decode(
        self,
        topic: &str,
        limits: &DecodeLimits,
        record: SourceRecord,
    ) -> Result<Vec<Point>, DeadLetter>;

    /// [`DecodeRecord::decode`] without the points: the record's rows are appended to `rows`
    /// (a buffer the caller reuses) and its event time returned.
    fn decode_rows(
        self,
        topic: &str,
        limits: &DecodeLimits,
        record: SourceRecord,
        rows: &mut Vec<RawRow>,
    ) -> Result<i64, DeadLetter>;
}

impl DecodeRecord for StreamKind {
    fn decode(
        self,
        topic: &str,
        limits: &DecodeLimits,
        record: SourceRecord,
    ) -> Result<Vec<Point>, DeadLetter> {
        let (delivery, watermark_us, lateness_us) = (
            record.delivery,
            record.watermark_us,
            record.allowed_lateness_us,
        );
        let mut rows = Vec::new();
        let time_us = self.decode_rows(topic, limits, record, &mut rows)?;
        Ok(points_of(
            rows,
            time_us,
            delivery,
            watermark_us,
            lateness_us,
        ))
    }

    fn decode_rows(
        self,
        topic: &str,
        limits: &DecodeLimits,
        record: SourceRecord,
        rows: &mut Vec<RawRow>,
    ) -> Result<i64, DeadLetter> {
        (self.def().decode)(
            &record.payload,
            limits,
            record.partition,
            record.offset,
            rows,
        )
        .map_err(|e| dead_letter(topic, record, &e))
    }
}

/// The points of one record's rows (decoded from Kafka, or read back from the archive): late
/// when the event is more than `allowed_lateness_us` behind its partition's watermark.
pub fn points_of(
    rows: Vec<RawRow>,
    time_us: i64,
    delivery: SinkSet,
    watermark_us: i64,
    allowed_lateness_us: i64,
) -> Vec<Point> {
    let late_by_us = watermark_us.saturating_sub(time_us).max(0);
    let late = late_by_us > allowed_lateness_us;
    rows.into_iter()
        .map(|row| Point {
            row,
            delivery,
            late,
            late_by_us,
        })
        .collect()
}

fn dead_letter(topic: &str, record: SourceRecord, e: &DecodeError) -> DeadLetter {
    DecodeFailed {
        topic,
        partition: record.partition,
        offset: record.offset,
        reason: e.kind.as_str(),
        error: e,
    }
    .emit();
    // Messages quote the offending value, which may hold a NUL: PostgreSQL's text cannot
    // store one, and the letter must not fail its own sink.
    let error = format!(
        "topic {topic} partition {} offset {}: {e}",
        record.partition, record.offset
    )
    .replace('\0', "\\u0000");
    crate::recent::record_dead_letter(
        topic,
        record.partition,
        record.offset,
        e.kind.as_str(),
        &error,
        &record.payload,
    );
    DeadLetter {
        row: DeadLetterRow {
            partition: record.partition,
            offset: record.offset,
            reason: e.kind.as_str().to_owned(),
            error,
            payload: record.payload,
        },
        delivery: record.delivery,
    }
}

/// Decodes one telemetry record: one point per numeric metric, or a dead letter.
pub fn decode_telemetry_record(
    topic: &str,
    limits: &DecodeLimits,
    record: SourceRecord,
) -> Result<Vec<Point>, DeadLetter> {
    StreamKind::Telemetry.decode(topic, limits, record)
}

/// Decodes Kafka records of `edge.telemetry`.
pub trait DecodeTelemetry<'scope> {
    /// Splits records into telemetry points and dead letters, on the worker that read them.
    ///
    /// ```
    /// use timely::dataflow::operators::{ToStream, Capture, capture::Event};
    /// use primespark_operators::decode::DecodeTelemetry;
    /// use primespark_operators::record::{SinkSet, SourceRecord};
    ///
    /// let (points, dead) = timely::example(|scope| {
    ///     let records = vec![
    ///         SourceRecord { partition: 0, offset: 7, delivery: SinkSet::EMPTY, watermark_us: 0, allowed_lateness_us: 0,
    ///             payload: br#"{"device_id":"pi","metrics":{"cpu_percent":5},"timestamp":1762351387123}"#.to_vec() },
    ///         SourceRecord { partition: 0, offset: 8, delivery: SinkSet::EMPTY, watermark_us: 0, allowed_lateness_us: 0,
    ///             payload: b"oops".to_vec() },
    ///     ];
    ///     let (ok, err) = records.to_stream(scope).container::<Vec<_>>()
    ///         .decode_telemetry("edge.telemetry", Default::default());
    ///     (ok.capture(), err.capture())
    /// });
    /// fn messages<D>(rx: std::sync::mpsc::Receiver<Event<u64, Vec<D>>>) -> Vec<D> {
    ///     rx.try_iter()
    ///         .flat_map(|e| match e { Event::Messages(_, rows) => rows, _ => Vec::new() })
    ///         .collect()
    /// }
    /// assert!(matches!(&messages(points)[0].row, primespark_schemas::rows::RawRow::Telemetry(r) if r.value == 5.0));
    /// assert_eq!(messages(dead)[0].row.offset, 8);
    /// ```
    fn decode_telemetry(
        self,
        topic: &str,
        limits: DecodeLimits,
    ) -> (
        StreamVec<'scope, EventTime, Point>,
        StreamVec<'scope, EventTime, DeadLetter>,
    );
}

impl<'scope> DecodeTelemetry<'scope> for StreamVec<'scope, EventTime, SourceRecord> {
    fn decode_telemetry(
        self,
        topic: &str,
        limits: DecodeLimits,
    ) -> (
        StreamVec<'scope, EventTime, Point>,
        StreamVec<'scope, EventTime, DeadLetter>,
    ) {
        let topic = topic.to_owned();
        let decoded: StreamVec<'scope, EventTime, Result<Point, DeadLetter>> =
            self.unary(Pipeline, "DecodeTelemetry", move |_cap, _info| {
                move |input, output| {
                    input.for_each(|cap, data| {
                        let mut session = output.session(&cap);
                        for record in data.drain(..) {
                            match decode_telemetry_record(&topic, &limits, record) {
                                Ok(points) => session.give_iterator(points.into_iter().map(Ok)),
                                Err(dead) => session.give(Err(dead)),
                            }
                        }
                    });
                }
            });
        decoded.ok_err(|r| r)
    }
}
