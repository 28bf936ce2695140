//! The seeds' aggregate names answer the seeds' queries, on PostgreSQL and through the SQL
//! endpoint's PostgreSQL wire protocol, with what this test computes from the events it sent.
//!
//! Telemetry and inference events span the most recent UTC midnight at least two hours ago
//! (`M`): ninety minutes before it, thirty after. A sentinel an hour after `M` closes the two
//! hours before `M` and the day that ends at `M`, not the day that starts there. Checked:
//! - `hourly_metrics` with the seed's own query (seed 000, bottleneck #5: `device_id = .. AND
//!   hour > NOW() - INTERVAL ..`), and `hourly_device_metrics`, against per-hour statistics of
//!   the samples;
//! - `daily_inference_stats` (seed 000, section 3.4): count, errors and the exact mean latency
//!   per (model, source) of the closed day, no row of the open one;
//! - `inference_stats_1h.avg_latency_ms`, and the routing counts `tried_edge_first` and
//!   `fallbacks` that make the dashboards' fallback rate a weighted one: `sum(fallbacks) /
//!   sum(tried_edge_first)` over the 1-minute windows equals the day's rate over raw events,
//!   which an average of per-minute rates does not;
//! - the same view queries through the wire endpoint return the same rows.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use chrono::Utc;
use primespark_tests::{
    connect, count, create_topic, free_port, fresh_database, produce, stack, unique, wait_until,
    Pipeline,
};
use serde_json::json;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
const DEVICES: usize = 3;
const MODELS: [&str; 2] = ["llama3.2:latest", "whisper-small"];
const STRATEGIES: [Option<&str>; 4] = [
    Some("edge_first"),
    Some("edge_first"),
    Some("cloud_first"),
    None,
];
const WIRE_PASSWORD: &str = "seed-views-test-password";

struct Sample {
    device: String,
    time_ms: i64,
    cpu: f64,
    temperature: f64,
}

struct Inference {
    model: &'static str,
    edge: bool,
    error: bool,
    latency_ms: f64,
    strategy: Option<&'static str>,
    fallback: bool,
    time_ms: i64,
}

/// Telemetry every 30 s per device and inference every 15 s, from `m - 90 min` to `m + 30 min`.
fn workload(m: i64) -> (Vec<Sample>, Vec<Inference>) {
    let (from, to) = (m - 90 * MINUTE, m + 30 * MINUTE);
    let mut samples = Vec::new();
    for (i, t) in (from..to).step_by(30_000).enumerate() {
        for d in 0..DEVICES {
            let k = i * DEVICES + d;
            samples.push(Sample {
                device: format!("pi-{d}"),
                time_ms: t + d as i64 * 1000,
                cpu: ((k * 37) % 100) as f64 + 0.5,
                temperature: 40.0 + (k % 13) as f64,
            });
        }
    }
    let inference = (from..to)
        .step_by(15_000)
        .enumerate()
        .map(|(i, t)| {
            let strategy = STRATEGIES[i % STRATEGIES.len()];
            let edge = i % 3 != 0;
            Inference {
                model: MODELS[i % 2],
                edge,
                error: i % 11 == 0,
                latency_ms: 50.0 + ((i * 37) % 400) as f64 + 0.25,
                strategy,
                // A fallback is served in the cloud after the edge was tried first.
                fallback: !edge && strategy == Some("edge_first") && i % 2 == 0,
                time_ms: t,
            }
        })
        .collect();
    (samples, inference)
}

fn telemetry_json(s: &Sample) -> Vec<u8> {
    json!({"device_id": s.device, "timestamp": s.time_ms,
           "metrics": {"cpu_percent": s.cpu, "temperature": s.temperature}})
    .to_string()
    .into_bytes()
}

fn inference_json(e: &Inference) -> Vec<u8> {
    json!({"model": e.model, "prompt_length": 100, "response_length": 200,
           "latency_ms": e.latency_ms, "source": if e.edge { "edge" } else { "cloud" },
           "status": if e.error { "error" } else { "ok" }, "routing_strategy": e.strategy,
           "fallback": e.fallback, "timestamp": e.time_ms})
    .to_string()
    .into_bytes()
}

/// (count, sum, min, max) of values.
#[derive(Debug, Clone, Copy)]
struct Stats(i64, f64, f64, f64);

impl Stats {
    fn add(&mut self, v: f64) {
        *self = Stats(self.0 + 1, self.1 + v, self.2.min(v), self.3.max(v));
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats(0, 0.0, f64::INFINITY, f64::NEG_INFINITY)
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// One view row as compared between PostgreSQL and the wire endpoint: key columns as text,
/// then numbers.
type Row = (Vec<String>, Vec<f64>);

/// Rows of `sql`, whose first `keys` columns are text and the rest numeric (integers are
/// read as such, then widened).
async fn rows(client: &tokio_postgres::Client, sql: &str, keys: usize) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for r in client.query(sql, &[]).await? {
        let k = (0..keys).map(|i| r.get::<_, String>(i)).collect();
        let mut v = Vec::new();
        for i in keys..r.len() {
            let n = match *r.columns()[i].type_() {
                tokio_postgres::types::Type::INT8 => r.get::<_, i64>(i) as f64,
                tokio_postgres::types::Type::INT4 => f64::from(r.get::<_, i32>(i)),
                _ => r.get::<_, f64>(i),
            };
            v.push(n);
        }
        out.push((k, v));
    }
    Ok(out)
}

fn same_rows(a: &[Row], b: &[Row]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.0 == y.0 && x.1.len() == y.1.len() && x.1.iter().zip(&y.1).all(|(p, q)| close(*p, *q))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_aggregate_names_answer_their_queries() -> Result<()> {
    let stack = stack();
    let db = unique("seedviews");
    let url = fresh_database(stack, &db).await?;
    let topics = [
        format!("edge.telemetry.{db}"),
        format!("edge.ai.inference.{db}"),
        format!("analytics.events.{db}"),
    ];
    for t in &topics {
        create_topic(stack, t, 1).await?;
    }
    let now = Utc::now().timestamp_millis();
    let m = (now - 2 * HOUR).div_euclid(DAY) * DAY;
    let (samples, inference) = workload(m);
    let sentinel = m + HOUR;
    let mut telemetry: Vec<(i32, Vec<u8>)> =
        samples.iter().map(|s| (0, telemetry_json(s))).collect();
    telemetry.push((
        0,
        json!({"device_id": "sentinel", "timestamp": sentinel, "metrics": {"up": 1.0}})
            .to_string()
            .into_bytes(),
    ));
    let mut inferences: Vec<(i32, Vec<u8>)> =
        inference.iter().map(|e| (0, inference_json(e))).collect();
    inferences.push((
        0,
        json!({"model": "sentinel", "prompt_length": 1, "response_length": 1, "latency_ms": 1.0,
               "source": "edge", "status": "ok", "timestamp": sentinel})
        .to_string()
        .into_bytes(),
    ));
    produce(stack, &topics[0], &telemetry)?;
    produce(stack, &topics[1], &inferences)?;

    let work = tempfile::tempdir()?;
    let config = work.path().join("pipeline.toml");
    let wire_port = free_port();
    let password_hash = primespark_connectors::query::hash_password(WIRE_PASSWORD)?;
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{}\"\ninference = \"{}\"\nevents = \"{}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_interval = \"200ms\"\n[nas]\npath = \"{}\"\n\
             roll_interval = \"1s\"\n[query]\nhttp_addr = \"127.0.0.1:{}\"\n\
             pg_addr = \"127.0.0.1:{wire_port}\"\n\
             [[query.users]]\nname = \"analyst\"\nrole = \"reader\"\npassword_hash = \"{password_hash}\"\n\
             [inference]\nenabled = false\n",
            stack.brokers,
            topics[0],
            topics[1],
            topics[2],
            work.path().join("nas").display(),
            free_port(),
        ),
    )?;
    let log = work.path().join("pipeline.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;

    // What the closed windows must hold.
    let (hour_lo, hour_hi) = (m - 2 * HOUR, m);
    let mut hourly: BTreeMap<(String, String, i64), Stats> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.time_ms < hour_hi) {
        let hour = s.time_ms.div_euclid(HOUR) * HOUR;
        for (metric, v) in [("cpu_percent", s.cpu), ("temperature", s.temperature)] {
            hourly
                .entry((s.device.clone(), metric.to_owned(), hour))
                .or_default()
                .add(v);
        }
    }
    let source = |e: &Inference| if e.edge { "edge" } else { "cloud" };
    let day_events: Vec<&Inference> = inference.iter().filter(|e| e.time_ms < m).collect();
    let mut daily: BTreeMap<(String, String), (i64, i64, f64)> = BTreeMap::new();
    for e in &day_events {
        let w = daily
            .entry((e.model.to_owned(), source(e).to_owned()))
            .or_default();
        *w = (w.0 + 1, w.1 + i64::from(e.error), w.2 + e.latency_ms);
    }

    let hourly_rows = hourly.len() as i64;
    let daily_rows = daily.len() as i64;
    let done = wait_until(
        Duration::from_secs(180),
        "the closed hours and day",
        || async {
            Ok(count(
                &client,
                "SELECT count(*) FROM hourly_device_metrics WHERE device_id LIKE 'pi-%'",
            )
            .await
                == hourly_rows
                && count(
                    &client,
                    "SELECT count(*) FROM daily_inference_stats WHERE model_name <> 'sentinel'",
                )
                .await
                    == daily_rows
                && count(&client, "SELECT count(*) FROM routing_stats_1m").await > 0)
        },
    )
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", log_text());
    }
    // Closed only: no hour at or after M in the views, no day starting at M.
    ensure!(
        count(
            &client,
            &format!(
                "SELECT count(*) FROM hourly_metrics WHERE hour >= to_timestamp({})",
                hour_hi / 1000
            )
        )
        .await
            == 0
    );

    // hourly_metrics by the seed's query (the interval reaching back to the first hour).
    let back_h = (now - hour_lo) / HOUR + 1;
    let seed_query = format!(
        "SELECT * FROM hourly_metrics WHERE device_id = 'pi-0' AND hour > NOW() - INTERVAL '{back_h} hours'"
    );
    let got = client.query(&seed_query, &[]).await?;
    let want: Vec<_> = hourly.iter().filter(|((d, _, _), _)| d == "pi-0").collect();
    ensure!(
        got.len() == want.len(),
        "{} rows, want {}",
        got.len(),
        want.len()
    );
    for r in &got {
        let hour_ms: i64 = (r.get::<_, chrono::DateTime<Utc>>("hour")).timestamp_millis();
        let metric: String = r.get("metric_name");
        let Some(s) = hourly.get(&("pi-0".to_owned(), metric.clone(), hour_ms)) else {
            bail!("unexpected hourly_metrics row {metric} {hour_ms}");
        };
        let (avg, min, max, n): (f64, f64, f64, i64) = (
            r.get("avg_value"),
            r.get("min_value"),
            r.get("max_value"),
            r.get("sample_count"),
        );
        ensure!(
            n == s.0 && close(avg, s.1 / s.0 as f64) && min == s.2 && max == s.3,
            "hourly_metrics {metric} {hour_ms}: ({n}, {avg}, {min}, {max}) vs {s:?}"
        );
    }

    // hourly_device_metrics: every device's hours.
    for r in client
        .query(
            "SELECT device_id, metric_name, (extract(epoch FROM hour) * 1000)::int8, count, sum, min, max, avg \
             FROM hourly_device_metrics WHERE device_id LIKE 'pi-%'",
            &[],
        )
        .await?
    {
        let key: (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        let Some(s) = hourly.get(&key) else {
            bail!("unexpected hourly_device_metrics row {key:?}");
        };
        let got: (i64, f64, f64, f64, f64) = (r.get(3), r.get(4), r.get(5), r.get(6), r.get(7));
        ensure!(
            got.0 == s.0
                && close(got.1, s.1)
                && got.2 == s.2
                && got.3 == s.3
                && close(got.4, s.1 / s.0 as f64),
            "hourly_device_metrics {key:?}: {got:?} vs {s:?}"
        );
    }

    // daily_inference_stats: the closed day, the exact mean latency.
    for r in client
        .query(
            "SELECT model_name, source, (extract(epoch FROM day) * 1000)::int8, count, errors, avg_latency_ms \
             FROM daily_inference_stats WHERE model_name <> 'sentinel'",
            &[],
        )
        .await?
    {
        let key: (String, String) = (r.get(0), r.get(1));
        let day: i64 = r.get(2);
        ensure!(day == m - DAY, "{key:?}: day {day}, want {}", m - DAY);
        let Some(&(n, errors, sum)) = daily.get(&key) else {
            bail!("unexpected daily_inference_stats row {key:?}");
        };
        let got: (i64, i64, f64) = (r.get(3), r.get(4), r.get(5));
        ensure!(
            got.0 == n && got.1 == errors && close(got.2, sum / n as f64),
            "daily_inference_stats {key:?}: {got:?} vs ({n}, {errors}, {})",
            sum / n as f64
        );
    }

    // inference_stats_1h: the mean per closed hour.
    let mut hour_latency: BTreeMap<(String, String, i64), (i64, f64)> = BTreeMap::new();
    for e in inference.iter().filter(|e| e.time_ms < hour_hi) {
        let w = hour_latency
            .entry((
                e.model.to_owned(),
                source(e).to_owned(),
                e.time_ms.div_euclid(HOUR) * HOUR,
            ))
            .or_default();
        *w = (w.0 + 1, w.1 + e.latency_ms);
    }
    let got = client
        .query(
            "SELECT model_name, source, (extract(epoch FROM bucket) * 1000)::int8, count, avg_latency_ms \
             FROM inference_stats_1h WHERE model_name <> 'sentinel'",
            &[],
        )
        .await?;
    ensure!(
        got.len() == hour_latency.len(),
        "{} inference hours, want {}",
        got.len(),
        hour_latency.len()
    );
    for r in &got {
        let key: (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        let Some(&(n, sum)) = hour_latency.get(&key) else {
            bail!("unexpected inference_stats_1h row {key:?}");
        };
        let (c, avg): (i64, f64) = (r.get(3), r.get(4));
        ensure!(
            c == n && close(avg, sum / n as f64),
            "{key:?}: ({c}, {avg}) vs ({n}, {sum})"
        );
    }

    // Routing: counts per closed hour and slice; the weighted rate over the day's minutes.
    let tried = |e: &Inference| e.fallback || (e.edge && e.strategy != Some("cloud_first"));
    for r in client
        .query(
            "SELECT routing_strategy, (extract(epoch FROM bucket) * 1000)::int8, tried_edge_first, fallbacks, cloud_fallback_rate \
             FROM routing_stats_1h WHERE bucket < to_timestamp($1::float8)",
            &[&((hour_hi / 1000) as f64)],
        )
        .await?
    {
        let (slice, hour): (String, i64) = (r.get(0), r.get(1));
        let of: Vec<&Inference> = inference
            .iter()
            .filter(|e| e.time_ms.div_euclid(HOUR) * HOUR == hour)
            .filter(|e| slice == "all" || e.strategy == Some(slice.as_str()))
            .collect();
        let (t, f) = (of.iter().filter(|e| tried(e)).count() as i64, of.iter().filter(|e| e.fallback).count() as i64);
        let got: (i64, i64, Option<f64>) = (r.get(2), r.get(3), r.get(4));
        ensure!(
            got.0 == t && got.1 == f && got.2 == (t > 0).then(|| f as f64 / t as f64),
            "routing_stats_1h {slice} {hour}: {got:?} vs ({t}, {f})"
        );
    }
    let (t, f) = (
        day_events.iter().filter(|e| tried(e)).count() as f64,
        day_events.iter().filter(|e| e.fallback).count() as f64,
    );
    ensure!(t > 0.0 && f > 0.0, "the workload has fallbacks");
    let weighted: f64 = client
        .query_one(
            "SELECT (1.0 * sum(fallbacks) / nullif(sum(tried_edge_first), 0))::float8 FROM routing_stats_1m \
             WHERE routing_strategy = 'all' AND bucket >= to_timestamp($1::float8) AND bucket < to_timestamp($2::float8)",
            &[&(((m - DAY) / 1000) as f64), &((m / 1000) as f64)],
        )
        .await?
        .get(0);
    ensure!(
        close(weighted, f / t),
        "weighted fallback rate {weighted} vs {}",
        f / t
    );

    // The same views through the wire endpoint (DataFusion over PostgreSQL and the archive).
    let (wire, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={wire_port} user=analyst password={WIRE_PASSWORD} dbname=primespark"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    let views = [
        (
            "SELECT device_id, metric_name, date_part('epoch', hour), sample_count, avg_value, min_value, max_value \
             FROM hourly_metrics WHERE device_id LIKE 'pi-%' ORDER BY device_id, metric_name, hour",
            2,
        ),
        (
            "SELECT device_id, metric_name, date_part('epoch', hour), count, sum, min, max, avg \
             FROM hourly_device_metrics WHERE device_id LIKE 'pi-%' ORDER BY device_id, metric_name, hour",
            2,
        ),
        (
            "SELECT model_name, source, date_part('epoch', day), count, errors, avg_latency_ms, latency_p95_ms \
             FROM daily_inference_stats WHERE model_name <> 'sentinel' ORDER BY model_name, source, day",
            2,
        ),
    ];
    for (sql, keys) in views {
        let on_pg = rows(&client, sql, keys).await?;
        let on_wire = rows(&wire, sql, keys).await?;
        ensure!(!on_pg.is_empty(), "{sql}: no rows");
        ensure!(
            same_rows(&on_pg, &on_wire),
            "{sql}:\npostgres {on_pg:?}\nwire {on_wire:?}"
        );
    }
    // The seed's query verbatim in shape, through the wire too.
    let on_wire = wire.query(&seed_query, &[]).await?;
    ensure!(
        on_wire.len() == want.len(),
        "wire: {} rows of {seed_query}",
        on_wire.len()
    );

    pipeline.terminate(Duration::from_secs(60))?;
    Ok(())
}
