//! The console's overview: the numbers `/metrics` exports, read back from the same encoded
//! text (so the page and a Prometheus scrape can never disagree about what a number means) and
//! grouped by stream, partition, sink and inference model.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One series of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Series name (`primespark_source_records_total`).
    pub name: String,
    /// Label pairs, in the text's order.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the text exposition format (`name{k="v",...} value`); comments, and lines that do not
/// parse, are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches(',');
            if let Some(after) = body.strip_prefix('}') {
                break after;
            }
            let (key, after) = body.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.push((key.trim().to_owned(), value));
            body = &after[end + 1..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A stream the console lists: its dataflow name and topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// Dataflow (`telemetry`, `inference`, `analytics`).
    pub name: String,
    /// Kafka topic.
    pub topic: String,
}

fn sum_where(samples: &[Sample], name: &str, key: &str, value: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.label(key) == Some(value))
        .map(|s| s.value)
        .fold(0.0, |a, b| a + b)
}

fn finite(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// The `q` quantile of a cumulative histogram's buckets (`(le, count)`, sorted), linear inside
/// a bucket as PromQL's `histogram_quantile`; `None` without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Above the highest finite bound: that bound is the best we know.
                return Some(lower.0);
            }
            let inside = count - lower.1;
            let share = if inside > 0.0 {
                (rank - lower.1) / inside
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

fn buckets_of(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.name == name && filter.iter().all(|(k, v)| s.label(k) == Some(*v)))
    {
        let Some(le) = s.label("le").and_then(|l| match l {
            "+Inf" => Some(f64::INFINITY),
            l => l.parse::<f64>().ok(),
        }) else {
            continue;
        };
        let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
        e.1 += s.value;
    }
    let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The overview document the console polls, from an encoded `/metrics` page and the
/// readiness report.
pub fn build(
    text: &str,
    streams: &[StreamInfo],
    readiness: (bool, Value),
    sink_errors: &[(String, String, String, i64)],
    now_us: i64,
) -> Value {
    let samples = parse(text);
    let one = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    };
    let streams: Vec<Value> = streams.iter().map(|st| stream(&samples, st)).collect();
    let mut sinks: BTreeMap<(String, String), Value> = BTreeMap::new();
    for s in &samples {
        let (Some(sink), Some(table)) = (s.label("sink"), s.label("table")) else {
            continue;
        };
        if !s.name.starts_with("primespark_sink_") {
            continue;
        }
        let entry = sinks
            .entry((sink.to_owned(), table.to_owned()))
            .or_insert_with(|| {
                json!({"sink": sink, "table": table, "rows_total": 0.0, "errors_total": 0.0,
                       "flushes_total": 0.0, "flush_seconds_sum": 0.0, "degraded": false,
                       "last_error": null, "last_error_at_us": null, "flush_p99_seconds": null})
            });
        let field = match s.name.as_str() {
            "primespark_sink_rows_written_total" => "rows_total",
            "primespark_sink_errors_total" => "errors_total",
            "primespark_sink_flush_duration_seconds_count" => "flushes_total",
            "primespark_sink_flush_duration_seconds_sum" => "flush_seconds_sum",
            "primespark_sink_degraded" => {
                entry["degraded"] = Value::Bool(s.value > 0.0);
                continue;
            }
            _ => continue,
        };
        entry[field] = finite(s.value);
    }
    for ((sink, table), entry) in sinks.iter_mut() {
        let b = buckets_of(
            &samples,
            "primespark_sink_flush_duration_seconds_bucket",
            &[("sink", sink), ("table", table)],
        );
        if let Some(p) = quantile(&b, 0.99) {
            entry["flush_p99_seconds"] = finite(p);
        }
        if let Some((_, _, err, at)) = sink_errors
            .iter()
            .find(|(s, t, _, _)| s == sink && t == table)
        {
            entry["last_error"] = Value::from(err.as_str());
            entry["last_error_at_us"] = Value::from(*at);
        }
    }
    let sources_degraded: Vec<Value> = samples
        .iter()
        .filter(|s| s.name == "primespark_source_degraded" && s.value > 0.0)
        .map(|s| json!({"topic": s.label("table")}))
        .collect();
    json!({
        "now_us": now_us,
        "uptime_seconds": one("primespark_uptime_seconds").map_or(Value::Null, finite),
        "ready": readiness.0,
        "readiness": readiness.1,
        "streams": streams,
        "sinks": sinks.into_values().collect::<Vec<_>>(),
        "sources_degraded": sources_degraded,
        "inference": inference(&samples),
    })
}

fn stream(samples: &[Sample], st: &StreamInfo) -> Value {
    let topic = st.topic.as_str();
    let mut partitions: BTreeMap<i64, Value> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.label("topic") == Some(topic)) {
        let Some(p) = s.label("partition").and_then(|p| p.parse::<i64>().ok()) else {
            continue;
        };
        let field = match s.name.as_str() {
            "primespark_source_records_total" => "records_total",
            "primespark_consumer_lag_records" => "consumer_lag_records",
            "primespark_partition_watermark_lag_seconds" => "watermark_lag_seconds",
            "primespark_dead_letters_total" => "dead_letters_total",
            "primespark_kafka_group_committed_offset" => "committed_offset",
            _ => continue,
        };
        let entry = partitions.entry(p).or_insert_with(|| {
            json!({"partition": p, "records_total": 0.0, "consumer_lag_records": null,
                   "watermark_lag_seconds": null, "dead_letters_total": 0.0, "committed_offset": null})
        });
        entry[field] = finite(s.value);
    }
    let of_dataflow = |name: &str| sum_where(samples, name, "dataflow", &st.name);
    let worker_values = |name: &str| {
        samples
            .iter()
            .filter(|s| s.name == name && s.label("dataflow") == Some(st.name.as_str()))
            .map(|s| s.value)
            .collect::<Vec<f64>>()
    };
    // A source's watermark is its slowest worker's; so is its lag.
    let watermark = worker_values("primespark_watermark_seconds")
        .into_iter()
        .reduce(f64::min);
    let lag = worker_values("primespark_watermark_lag_seconds")
        .into_iter()
        .reduce(f64::max);
    json!({
        "name": st.name,
        "topic": topic,
        "records_total": sum_where(samples, "primespark_source_records_total", "topic", topic),
        "bytes_total": sum_where(samples, "primespark_source_bytes_total", "topic", topic),
        "dead_letters_total": sum_where(samples, "primespark_dead_letters_total", "topic", topic),
        "decode_errors_total": sum_where(samples, "primespark_decode_errors_total", "topic", topic),
        "windows_closed_total": of_dataflow("primespark_windows_closed_total"),
        "late_events_total": of_dataflow("primespark_late_events_total"),
        "watermark_seconds": watermark.map_or(Value::Null, finite),
        "watermark_lag_seconds": lag.map_or(Value::Null, finite),
        "partitions": partitions.into_values().collect::<Vec<_>>(),
    })
}

fn inference(samples: &[Sample]) -> Value {
    let mut in_use: Vec<&str> = samples
        .iter()
        .filter(|s| s.name == "primespark_inference_backend" && s.value > 0.0)
        .filter_map(|s| s.label("backend"))
        .collect();
    in_use.sort_unstable();
    in_use.dedup();
    let mut models: BTreeMap<(String, String), Value> = BTreeMap::new();
    for s in samples {
        let field = match s.name.as_str() {
            "primespark_inference_samples_total" => "samples_total",
            "primespark_inference_seconds_count" => "batches_total",
            "primespark_inference_seconds_sum" => "seconds_sum",
            "primespark_anomalies_total" => "anomalies_total",
            "primespark_inference_errors_total" => "errors_total",
            _ => continue,
        };
        let (Some(backend), Some(model)) = (s.label("backend"), s.label("model")) else {
            continue;
        };
        let entry = models
            .entry((backend.to_owned(), model.to_owned()))
            .or_insert_with(|| {
                json!({"backend": backend, "model": model, "samples_total": 0.0, "batches_total": 0.0,
                       "seconds_sum": 0.0, "anomalies_total": 0.0, "errors_total": 0.0, "p99_seconds": null})
            });
        entry[field] = finite(s.value);
    }
    for ((backend, model), entry) in models.iter_mut() {
        let b = buckets_of(
            samples,
            "primespark_inference_seconds_bucket",
            &[("backend", backend), ("model", model)],
        );
        if let Some(p) = quantile(&b, 0.99) {
            entry["p99_seconds"] = finite(p);
        }
    }
    // Folded from +0.0: an empty f64 sum is -0.0.
    let fallbacks = samples
        .iter()
        .filter(|s| s.name == "primespark_inference_fallbacks_total")
        .fold(0.0, |a, s| a + s.value);
    let queue = samples
        .iter()
        .filter(|s| s.name == "primespark_inference_queue_depth")
        .fold(0.0, |a, s| a + s.value);
    json!({
        "backends_in_use": in_use,
        "models": models.into_values().collect::<Vec<_>>(),
        "fallbacks_total": finite(fallbacks),
        "queue_depth": finite(queue),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP primespark_source_records Kafka records consumed
# TYPE primespark_source_records counter
primespark_source_records_total{topic="edge.telemetry",partition="0"} 10
primespark_source_records_total{topic="edge.telemetry",partition="1"} 5
primespark_source_records_total{topic="other",partition="0"} 99
primespark_consumer_lag_records{topic="edge.telemetry",partition="1"} 3
primespark_partition_watermark_lag_seconds{topic="edge.telemetry",partition="0"} 2.5
primespark_watermark_lag_seconds{dataflow="telemetry",worker="0"} 1.5
primespark_watermark_lag_seconds{dataflow="telemetry",worker="1"} 4.5
primespark_windows_closed_total{dataflow="telemetry",operator="device_metrics_1m"} 7
primespark_windows_closed_total{dataflow="telemetry",operator="device_metrics_1h"} 1
primespark_sink_rows_written_total{sink="parquet",table="telemetry_raw"} 15
primespark_sink_degraded{sink="parquet",table="telemetry_raw"} 1
primespark_sink_flush_duration_seconds_bucket{sink="parquet",table="telemetry_raw",le="0.1"} 2
primespark_sink_flush_duration_seconds_bucket{sink="parquet",table="telemetry_raw",le="1.0"} 4
primespark_sink_flush_duration_seconds_bucket{sink="parquet",table="telemetry_raw",le="+Inf"} 4
primespark_inference_backend{worker="0",backend="cpu"} 1
primespark_inference_backend{worker="0",backend="hailo"} 0
primespark_anomalies_total{backend="cpu",model="m"} 2
primespark_weird{a="x\"y\\z\n",b=""} 1
primespark_uptime_seconds 12.5
# EOF
"#;

    #[test]
    fn parses_labels_with_escapes() {
        let s = parse(PAGE);
        let weird = s.iter().find(|s| s.name == "primespark_weird").unwrap();
        assert_eq!(weird.label("a"), Some("x\"y\\z\n"));
        assert_eq!(weird.label("b"), Some(""));
        assert_eq!(
            s.iter()
                .filter(|s| s.name == "primespark_source_records_total")
                .count(),
            3
        );
    }

    #[test]
    fn groups_by_stream_partition_sink_and_model() {
        let streams = [StreamInfo {
            name: "telemetry".into(),
            topic: "edge.telemetry".into(),
        }];
        let errors = [(
            "parquet".to_owned(),
            "telemetry_raw".to_owned(),
            "disk full".to_owned(),
            7,
        )];
        let o = build(PAGE, &streams, (false, json!({})), &errors, 1);
        let st = &o["streams"][0];
        assert_eq!(st["records_total"], json!(15.0));
        assert_eq!(st["windows_closed_total"], json!(8.0));
        assert_eq!(st["watermark_lag_seconds"], json!(4.5));
        assert_eq!(st["partitions"][1]["consumer_lag_records"], json!(3.0));
        assert_eq!(st["partitions"][0]["watermark_lag_seconds"], json!(2.5));
        assert_eq!(st["partitions"][0]["consumer_lag_records"], Value::Null);
        let sink = &o["sinks"][0];
        assert_eq!(sink["degraded"], json!(true));
        assert_eq!(sink["last_error"], json!("disk full"));
        assert_eq!(sink["rows_total"], json!(15.0));
        // 99% of 4 observations is rank 3.96, inside (0.1, 1.0] where ranks 2..4 lie.
        let p99 = sink["flush_p99_seconds"].as_f64().unwrap();
        assert!((p99 - (0.1 + 0.9 * 0.98)).abs() < 1e-9, "{p99}");
        assert_eq!(o["inference"]["backends_in_use"], json!(["cpu"]));
        assert_eq!(o["inference"]["models"][0]["anomalies_total"], json!(2.0));
        assert_eq!(o["uptime_seconds"], json!(12.5));
    }

    #[test]
    fn quantiles_of_empty_and_overflowing_histograms() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(
            quantile(&[(1.0, 0.0), (f64::INFINITY, 5.0)], 0.5),
            Some(1.0)
        );
    }
}
