//! Decode and validate Kafka records into typed points; bad records become [`DeadLetter`]s with
//! their reason and source offset instead of failing anything.

use primespark_schemas::rows::{DeadLetterRow, TelemetryRow};
use primespark_schemas::telemetry::TelemetryEvent;
use primespark_schemas::DecodeLimits;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;

use crate::metrics::DecodeFailed;
use crate::record::{DeadLetter, MetricPoint, SourceRecord};
use crate::EventTime;

/// Decodes one telemetry record into one point per metric, or a dead letter.
///
/// A point is `late` when its event time is below the partition's watermark at read time.
pub fn decode_telemetry_record(
    topic: &str,
    limits: &DecodeLimits,
    record: SourceRecord,
) -> Result<Vec<MetricPoint>, DeadLetter> {
    match TelemetryEvent::decode(&record.payload, limits) {
        Ok(event) => {
            let late = event.time_us < record.watermark_us;
            let device_id = event.device_id;
            Ok(event
                .metrics
                .into_iter()
                .map(|m| MetricPoint {
                    row: TelemetryRow {
                        time_us: event.time_us,
                        device_id: device_id.clone(),
                        metric_name: m.name,
                        value: m.value,
                        partition: record.partition,
                        offset: record.offset,
                    },
                    delivery: record.delivery,
                    late,
                })
                .collect())
        }
        Err(e) => {
            DecodeFailed {
                topic,
                partition: record.partition,
                offset: record.offset,
                reason: e.kind.as_str(),
                error: &e,
            }
            .emit();
            Err(DeadLetter {
                row: DeadLetterRow {
                    partition: record.partition,
                    offset: record.offset,
                    reason: e.kind.as_str().to_owned(),
                    error: format!(
                        "topic {topic} partition {} offset {}: {e}",
                        record.partition, record.offset
                    ),
                    payload: record.payload,
                },
                delivery: record.delivery,
            })
        }
    }
}

/// Decodes Kafka records of `edge.telemetry`.
pub trait DecodeTelemetry<'scope> {
    /// Splits records into telemetry points and dead letters, on the worker that read them.
    ///
    /// ```
    /// use timely::dataflow::operators::{ToStream, Capture, capture::Event};
    /// use primespark_operators::decode::DecodeTelemetry;
    /// use primespark_operators::record::{Delivery, SourceRecord};
    ///
    /// let (points, dead) = timely::example(|scope| {
    ///     let records = vec![
    ///         SourceRecord { partition: 0, offset: 7, delivery: Delivery::ALL, watermark_us: 0,
    ///             payload: br#"{"device_id":"pi","metrics":{"cpu_percent":5},"timestamp":1762351387123}"#.to_vec() },
    ///         SourceRecord { partition: 0, offset: 8, delivery: Delivery::ALL, watermark_us: 0,
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
    /// assert_eq!(messages(points)[0].row.value, 5.0);
    /// assert_eq!(messages(dead)[0].row.offset, 8);
    /// ```
    fn decode_telemetry(
        self,
        topic: &str,
        limits: DecodeLimits,
    ) -> (
        StreamVec<'scope, EventTime, MetricPoint>,
        StreamVec<'scope, EventTime, DeadLetter>,
    );
}

impl<'scope> DecodeTelemetry<'scope> for StreamVec<'scope, EventTime, SourceRecord> {
    fn decode_telemetry(
        self,
        topic: &str,
        limits: DecodeLimits,
    ) -> (
        StreamVec<'scope, EventTime, MetricPoint>,
        StreamVec<'scope, EventTime, DeadLetter>,
    ) {
        let topic = topic.to_owned();
        let decoded: StreamVec<'scope, EventTime, Result<MetricPoint, DeadLetter>> =
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
