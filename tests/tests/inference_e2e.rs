//! `edge.ai.inference` end to end against the stack: requests with known values (some out of
//! order within the bound, some malformed) through the real broker into a pipeline that is
//! killed and restarted mid-stream; `ai_inference_results`, `inference_stats_1m`,
//! `routing_stats_1m`, `dead_letters` and the Parquet archive are compared with what this test
//! computes itself.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use primespark_tests::{
    connect, create_topic, free_port, fresh_database, produce, stack, unique, wait_until, Pipeline,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const PARTITIONS: i32 = 2;
const PER_PARTITION: i64 = 1200;
const MODELS: [&str; 2] = ["llama3.2:latest", "whisper-small"];
const STRATEGIES: [Option<&str>; 4] = [
    None,
    Some("edge_first"),
    Some("cloud_first"),
    Some("balanced"),
];

/// (time ms, model, input, output, source, status, strategy, fallback) of one raw row.
type RawResult = (i64, String, i64, i64, String, String, Option<String>, bool);
/// Records to produce, the valid requests among them, and the malformed ones' reasons.
type Events = (
    Vec<(i32, Vec<u8>)>,
    Vec<Request>,
    BTreeMap<(i32, i64), &'static str>,
);

#[derive(Clone)]
struct Request {
    time_ms: i64,
    model: &'static str,
    edge: bool,
    ok: bool,
    strategy: Option<&'static str>,
    fallback: bool,
    latency: f64,
    prompt: i64,
    response: i64,
}

/// Per partition: requests 150 ms apart (about 3 minutes of event time) with neighbours swapped,
/// ~2% malformed, and a sentinel an hour ahead that closes every real window.
fn events() -> Events {
    let mut rng = SmallRng::seed_from_u64(23);
    let mut records = Vec::new();
    let mut valid = Vec::new();
    let mut dead = BTreeMap::new();
    for p in 0..PARTITIONS {
        let mut times: Vec<i64> = (0..PER_PARTITION)
            .map(|i| T0_MS + i * 150 + i64::from(p))
            .collect();
        for i in (0..times.len() - 1).step_by(3) {
            times.swap(i, i + 1);
        }
        for (offset, t) in times.into_iter().enumerate() {
            if rng.random_bool(0.02) {
                let (payload, reason) = if rng.random_bool(0.5) {
                    (b"{\"model\": ".to_vec(), "malformed_json")
                } else {
                    (
                        json!({"model": "m", "prompt_length": 1, "response_length": 1, "latency_ms": -5.0,
                               "source": "edge", "timestamp": t})
                        .to_string()
                        .into_bytes(),
                        "out_of_range",
                    )
                };
                dead.insert((p, offset as i64), reason);
                records.push((p, payload));
                continue;
            }
            let strategy = STRATEGIES[rng.random_range(0..4)];
            let edge = rng.random_bool(0.6);
            let r = Request {
                time_ms: t,
                model: MODELS[rng.random_range(0..2)],
                edge,
                ok: rng.random_bool(0.9),
                strategy,
                fallback: !edge && strategy == Some("edge_first") && rng.random_bool(0.5),
                latency: f64::from(rng.random_range(1..200_000)) / 100.0,
                prompt: rng.random_range(0..500),
                response: rng.random_range(0..2000),
            };
            records.push((p, payload(&r)));
            valid.push(r);
        }
        let sentinel = Request {
            // Two hours ahead: the first hour's 1-hour windows close too.
            time_ms: T0_MS + 7_200_000,
            model: "sentinel",
            edge: true,
            ok: true,
            strategy: None,
            fallback: false,
            latency: 1.0,
            prompt: 1,
            response: 1,
        };
        records.push((p, payload(&sentinel)));
    }
    (records, valid, dead)
}

fn payload(r: &Request) -> Vec<u8> {
    json!({
        "model": r.model, "prompt_length": r.prompt, "response_length": r.response,
        "latency_ms": r.latency, "source": if r.edge { "edge" } else { "cloud" },
        "status": if r.ok { "ok" } else { "error" }, "routing_strategy": r.strategy,
        "fallback": r.fallback, "timestamp": r.time_ms,
    })
    .to_string()
    .into_bytes()
}

fn bucket(t_ms: i64) -> i64 {
    t_ms.div_euclid(60_000) * 60_000
}

fn lower_quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
}

fn near(got: f64, exact: f64) -> bool {
    (got - exact).abs() <= 0.005 * exact.abs() + 1e-9
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-9 * want.abs().max(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_end_to_end_with_restart() -> Result<()> {
    let stack = stack();
    let db = unique("inference");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.ai.inference.{db}");
    create_topic(stack, &topic, PARTITIONS).await?;
    let work = tempfile::tempdir()?;
    let http = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ninference = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 300\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"{http}\"\n\
             [windows]\nmax_out_of_orderness = \"5s\"\nidle_timeout = \"10m\"\n\
             [dataflows]\ntelemetry = false\ninference = true\nanalytics = false\n",
            stack.brokers,
            work.path().join("nas").display()
        ),
    )?;
    let log = work.path().join("pipeline.log");
    let (records, valid, dead) = events();
    let raw_rows = valid.len() as i64 + i64::from(PARTITIONS);

    // Half, a pipeline killed mid-stream, the rest, a restarted pipeline.
    let (first, rest) = records.split_at(records.len() / 2);
    produce(stack, &topic, first)?;
    let pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    wait_until(Duration::from_secs(120), "some inference rows", || async {
        Ok(client
            .query_one("SELECT count(*) FROM ai_inference_results", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
            > 300)
    })
    .await?;
    pipeline.kill()?;
    produce(stack, &topic, rest)?;
    let mut pipeline = Pipeline::start(&config, &[], &log)?;

    // Expected windows (the sentinels' hour stays open).
    let mut by_model: BTreeMap<(i64, String, &str), Vec<&Request>> = BTreeMap::new();
    let mut by_slice: BTreeMap<(i64, &str), Vec<&Request>> = BTreeMap::new();
    for r in &valid {
        let b = bucket(r.time_ms);
        by_model
            .entry((b, r.model.to_owned(), if r.edge { "edge" } else { "cloud" }))
            .or_default()
            .push(r);
        by_slice.entry((b, "all")).or_default().push(r);
        if let Some(s) = r.strategy {
            by_slice.entry((b, s)).or_default().push(r);
        }
    }
    let (want_stats, want_routing) = (by_model.len() as i64, by_slice.len() as i64);
    // Every request lies in the first hour: one 1-hour row per (model, source) and per slice.
    let mut hourly_models: BTreeMap<(String, &str), Vec<&Request>> = BTreeMap::new();
    for ((_, model, source), group) in &by_model {
        hourly_models
            .entry((model.clone(), source))
            .or_default()
            .extend(group.iter().copied());
    }
    let want_hourly_slices = by_slice
        .keys()
        .map(|(_, s)| *s)
        .collect::<std::collections::BTreeSet<_>>()
        .len() as i64;
    let waited = wait_until(Duration::from_secs(180), "every row and window", || async {
        let n = |sql: &'static str| {
            let client = &client;
            async move { Ok::<i64, anyhow::Error>(client.query_one(sql, &[]).await?.get(0)) }
        };
        Ok(
            n("SELECT count(*) FROM ai_inference_results").await? >= raw_rows
                && n("SELECT count(*) FROM inference_stats_1m").await? >= want_stats
                && n("SELECT count(*) FROM routing_stats_1m").await? >= want_routing
                && n("SELECT count(*) FROM routing_stats_1h").await? >= want_hourly_slices
                && n("SELECT count(*) FROM dead_letters").await? >= dead.len() as i64,
        )
    })
    .await;
    if let Err(e) = waited {
        anyhow::bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(
        pipeline.is_running(),
        "pipeline keeps running with malformed input"
    );

    // Raw rows: exactly once each, with every column.
    let rows = client
        .query(
            "SELECT (extract(epoch FROM time) * 1000)::int8, model_name, input_tokens, output_tokens, latency_ms,
                    source, status, routing_strategy, fallback
             FROM ai_inference_results WHERE model_name <> 'sentinel'",
            &[],
        )
        .await?;
    let mut got: Vec<RawResult> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
            )
        })
        .collect();
    let mut want: Vec<RawResult> = valid
        .iter()
        .map(|r| {
            (
                r.time_ms,
                r.model.to_owned(),
                r.prompt,
                r.response,
                (if r.edge { "edge" } else { "cloud" }).to_owned(),
                (if r.ok { "ok" } else { "error" }).to_owned(),
                r.strategy.map(str::to_owned),
                r.fallback,
            )
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "ai_inference_results");

    // inference_stats_1m.
    let stats = client
        .query(
            "SELECT (extract(epoch FROM bucket) * 1000)::int8, model_name, source, count, errors, latency_p50_ms,
                    latency_p95_ms, latency_p99_ms, avg_input_tokens, avg_output_tokens, output_tokens_per_s
             FROM inference_stats_1m",
            &[],
        )
        .await?;
    assert_eq!(stats.len(), by_model.len(), "inference_stats_1m rows");
    for row in &stats {
        let source: String = row.get(2);
        let key = (
            row.get::<_, i64>(0),
            row.get::<_, String>(1),
            source.as_str(),
        );
        let group = by_model
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected {key:?}"));
        let n = group.len() as f64;
        assert_eq!(row.get::<_, i64>(3), group.len() as i64, "count {key:?}");
        assert_eq!(
            row.get::<_, i64>(4),
            group.iter().filter(|r| !r.ok).count() as i64,
            "errors {key:?}"
        );
        let latencies: Vec<f64> = group.iter().map(|r| r.latency).collect();
        for (i, q) in [(5, 0.5), (6, 0.95), (7, 0.99)] {
            let (got, exact) = (row.get::<_, f64>(i), lower_quantile(&latencies, q));
            assert!(near(got, exact), "p{} {key:?}: {got} vs {exact}", q * 100.0);
        }
        let input: f64 = group.iter().map(|r| r.prompt as f64).sum();
        let output: f64 = group.iter().map(|r| r.response as f64).sum();
        let seconds: f64 = latencies.iter().sum::<f64>() / 1000.0;
        assert!(close(row.get(8), input / n), "avg input {key:?}");
        assert!(close(row.get(9), output / n), "avg output {key:?}");
        let tps: Option<f64> = row.get(10);
        assert!(
            close(tps.unwrap_or(f64::NAN), output / seconds),
            "tokens/s {key:?}"
        );
    }

    // routing_stats_1m.
    let routing = client
        .query(
            "SELECT (extract(epoch FROM bucket) * 1000)::int8, routing_strategy, edge_requests, cloud_requests,
                    edge_share, cloud_fallback_rate, edge_success_rate, cloud_success_rate, edge_p95_ms, cloud_p95_ms
             FROM routing_stats_1m",
            &[],
        )
        .await?;
    assert_eq!(routing.len(), by_slice.len(), "routing_stats_1m rows");
    for row in &routing {
        let slice: String = row.get(1);
        let key = (row.get::<_, i64>(0), slice.as_str());
        let group = by_slice
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected {key:?}"));
        let side = |edge: bool| group.iter().filter(move |r| r.edge == edge);
        let (edge, cloud) = (side(true).count(), side(false).count());
        assert_eq!(
            (row.get::<_, i64>(2), row.get::<_, i64>(3)),
            (edge as i64, cloud as i64),
            "{key:?}"
        );
        assert!(
            close(row.get(4), edge as f64 / group.len() as f64),
            "edge share {key:?}"
        );
        let rate = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
        let tried = group
            .iter()
            .filter(|r| r.fallback || (r.edge && r.strategy != Some("cloud_first")))
            .count();
        let fallbacks = group.iter().filter(|r| r.fallback).count();
        assert_eq!(
            row.get::<_, Option<f64>>(5),
            rate(fallbacks, tried),
            "fallback rate {key:?}"
        );
        assert_eq!(
            row.get::<_, Option<f64>>(6),
            rate(side(true).filter(|r| r.ok).count(), edge),
            "{key:?}"
        );
        assert_eq!(
            row.get::<_, Option<f64>>(7),
            rate(side(false).filter(|r| r.ok).count(), cloud),
            "{key:?}"
        );
        for (i, is_edge) in [(8, true), (9, false)] {
            let latencies: Vec<f64> = side(is_edge).map(|r| r.latency).collect();
            match row.get::<_, Option<f64>>(i) {
                Some(got) => assert!(near(got, lower_quantile(&latencies, 0.95)), "p95 {key:?}"),
                None => assert!(latencies.is_empty(), "p95 missing {key:?}"),
            }
        }
    }

    // 1-hour rollups: computed from the events (not from the 1-minute rows), so the
    // percentiles are as exact as the 1-minute ones.
    let hourly = client
        .query(
            "SELECT (extract(epoch FROM bucket) * 1000)::int8, model_name, source, count, errors, latency_p95_ms
             FROM inference_stats_1h",
            &[],
        )
        .await?;
    assert_eq!(hourly.len(), hourly_models.len(), "inference_stats_1h rows");
    for row in &hourly {
        let source: String = row.get(2);
        let key = (row.get::<_, String>(1), source.as_str());
        assert_eq!(row.get::<_, i64>(0), T0_MS, "hour of {key:?}");
        let group = hourly_models
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected {key:?}"));
        assert_eq!(
            row.get::<_, i64>(3),
            group.len() as i64,
            "hourly count {key:?}"
        );
        assert_eq!(
            row.get::<_, i64>(4),
            group.iter().filter(|r| !r.ok).count() as i64
        );
        let latencies: Vec<f64> = group.iter().map(|r| r.latency).collect();
        assert!(
            near(row.get(5), lower_quantile(&latencies, 0.95)),
            "hourly p95 {key:?}"
        );
    }
    let all: i64 = client
        .query_one(
            "SELECT edge_requests + cloud_requests FROM routing_stats_1h WHERE routing_strategy = 'all'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(all, valid.len() as i64, "routing_stats_1h all");

    // Dead letters with reason and offset.
    let dl = client
        .query(
            "SELECT partition, \"offset\", reason FROM dead_letters",
            &[],
        )
        .await?;
    let got: BTreeMap<(i32, i64), String> = dl
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let want: BTreeMap<(i32, i64), String> =
        dead.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    assert_eq!(got, want, "dead letters");

    // Parquet: every raw row once, readable through the SQL endpoint; the windows too.
    let parquet_committed = || async {
        let n: i64 = client
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets WHERE sink = 'parquet_raw'",
                &[],
            )
            .await?
            .get(0);
        Ok::<bool, anyhow::Error>(n >= records.len() as i64)
    };
    wait_until(Duration::from_secs(60), "parquet rolls", parquet_committed).await?;
    let sql = |q: &str| {
        let body = json!({ "sql": q }).to_string();
        let out = std::process::Command::new("curl")
            .args(["-s", "-H", "content-type: application/json", "-d", &body])
            .arg(format!("http://{http}/v1/sql"))
            .output()
            .expect("curl runs");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let v = sql("SELECT count(*) AS n FROM inference_raw");
    assert_eq!(v["rows"][0][0], json!(raw_rows), "{v}");
    let v = sql("SELECT count(*) AS n FROM routing_stats_1m WHERE routing_strategy = 'all'");
    assert_eq!(
        v["rows"][0][0],
        json!(by_slice.keys().filter(|(_, s)| *s == "all").count()),
        "{v}"
    );
    Ok(())
}
