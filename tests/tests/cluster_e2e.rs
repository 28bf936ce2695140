//! Scale-out against the stack: the same telemetry through 1 process x 1 worker, 1 process x 4
//! workers, a cluster of 2 OS processes x 2 workers (timely over loopback TCP), and that cluster
//! with one process SIGKILLed mid-run and the cluster restarted, gives the same
//! raw rows and the same `device_metrics_1m`, equal to what this test computes itself; the same
//! task and API events give identical `task_stats_1m`, `agent_load_1m` and `api_events_1m` in
//! every layout (the lifecycle join's exchange by task id, and the backlog sampled per key, do
//! not depend on how many workers there are).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use primespark_tests::{
    connect, create_topic, free_port, fresh_database, produce, stack, unique, wait_until, Pipeline,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const PARTITIONS: i32 = 4;
const PER_PARTITION: i64 = 900;

/// (bucket_ms, device, metric) -> (count, sum, min, max).
type Aggregates = BTreeMap<(i64, String, String), (i64, f64, f64, f64)>;

/// Per partition: samples 200 ms apart with neighbours swapped (disorder within the bound),
/// then a sentinel an hour ahead that closes every real window. Returns the records, the
/// number of raw rows, and the aggregates every layout must produce.
fn events() -> (Vec<(i32, Vec<u8>)>, i64, Aggregates) {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut records = Vec::new();
    let mut aggs = Aggregates::new();
    let mut raw = 0;
    for p in 0..PARTITIONS {
        let mut times: Vec<i64> = (0..PER_PARTITION)
            .map(|i| T0_MS + i * 200 + i64::from(p))
            .collect();
        for i in (0..times.len() - 1).step_by(4) {
            times.swap(i, i + 1);
        }
        for t in times {
            // Devices span partitions, so windows of one key are fed by several workers.
            let device = format!("dev-{}", rng.random_range(0..6));
            let cpu = f64::from(rng.random_range(0..10_000)) / 100.0;
            let mem = f64::from(rng.random_range(0..10_000)) / 100.0;
            records.push((
                p,
                json!({"device_id": device, "metrics": {"cpu_percent": cpu, "memory_percent": mem}, "timestamp": t})
                    .to_string()
                    .into_bytes(),
            ));
            for (metric, v) in [("cpu_percent", cpu), ("memory_percent", mem)] {
                raw += 1;
                let e = aggs
                    .entry((
                        t.div_euclid(60_000) * 60_000,
                        device.clone(),
                        metric.to_owned(),
                    ))
                    .or_insert((0, 0.0, f64::INFINITY, f64::NEG_INFINITY));
                e.0 += 1;
                e.1 += v;
                e.2 = e.2.min(v);
                e.3 = e.3.max(v);
            }
        }
        records.push((
            p,
            json!({"device_id": "sentinel", "metrics": {"up": 1.0}, "timestamp": T0_MS + 7_200_000})
                .to_string()
                .into_bytes(),
        ));
        raw += 1;
    }
    (records, raw, aggs)
}

/// Task lifecycles whose events land on random partitions, API events, and a sentinel per
/// partition two hours ahead. Returns the records and their count.
fn analytics_events() -> (Vec<(i32, Vec<u8>)>, i64) {
    let mut rng = SmallRng::seed_from_u64(11);
    let mut timed: Vec<(i32, i64, Vec<u8>)> = Vec::new();
    for i in 0..200i64 {
        let created = T0_MS + i * 900;
        let id = format!("task-{i}");
        let agent = format!("agent-{}", rng.random_range(0..3));
        let task_type = ["llm", "voice"][rng.random_range(0..2)];
        let mut steps = vec![(
            created,
            json!({"event_type": "task_created", "task_id": id,
                   "task_type": task_type, "timestamp": created}),
        )];
        let mut t = created;
        for kind in ["task_assigned", "task_started", "task_completed"] {
            if rng.random_bool(0.1) {
                break;
            }
            t += rng.random_range(500..90_000);
            steps.push((
                t,
                json!({"event_type": kind, "task_id": id, "agent_id": agent, "timestamp": t}),
            ));
        }
        for (t, v) in steps {
            timed.push((
                rng.random_range(0..PARTITIONS),
                t,
                v.to_string().into_bytes(),
            ));
        }
    }
    for i in 0..300i64 {
        let t = T0_MS + i * 600;
        let user = rng.random_range(0..5);
        timed.push((
            rng.random_range(0..PARTITIONS),
            t,
            json!({"event_type": "llm_generate", "endpoint": "/api/llm/generate",
                   "user_id": (user > 0).then(|| format!("u{user}")), "timestamp": t})
            .to_string()
            .into_bytes(),
        ));
    }
    for p in 0..PARTITIONS {
        timed.push((
            p,
            T0_MS + 7_200_000,
            json!({"event_type": "sentinel", "endpoint": "/sentinel", "timestamp": T0_MS + 7_200_000})
                .to_string()
                .into_bytes(),
        ));
    }
    timed.sort_by_key(|(p, t, _)| (*p, *t));
    let n = timed.len() as i64;
    (timed.into_iter().map(|(p, _, b)| (p, b)).collect(), n)
}

/// The analytics tables of one run, as comparable text rows.
type AnalyticsTables = Vec<String>;

struct Layout {
    name: &'static str,
    processes: usize,
    workers: usize,
    /// SIGKILL the last process once rows arrive; the cluster is then restarted (a timely
    /// cluster cannot take a process back while it runs).
    kill_one: bool,
}

/// Runs one layout to completion and returns its `device_metrics_1m`, rounded for comparison.
async fn run_layout(
    layout: &Layout,
    topics: (&str, &str),
    raw_rows: (i64, i64),
    agg_rows: usize,
    dir: &Path,
) -> Result<(Aggregates, AnalyticsTables)> {
    let (topic, events_topic) = topics;
    let stack = stack();
    let db = unique(&format!("cluster_{}", layout.name));
    let url = fresh_database(stack, &db).await?;
    let addresses: Vec<String> = (0..layout.processes)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let hostfile = dir.join(format!("{}-hosts", layout.name));
    std::fs::write(&hostfile, addresses.join("\n"))?;
    let mut pipelines = Vec::new();
    let mut configs = Vec::new();
    for process in 0..layout.processes {
        let config = dir.join(format!("{}-{process}.toml", layout.name));
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\nevents = \"{events_topic}\"\n\
                 [postgres]\nurl = \"{url}\"\nflush_rows = 500\nflush_interval = \"200ms\"\n\
                 [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n\
                 [query]\nhttp_addr = \"127.0.0.1:{}\"\n\
                 [windows]\nmax_out_of_orderness = \"5s\"\nidle_timeout = \"10m\"\n\
                 [runtime]\nworkers = {}\nprocesses = {}\nprocess_id = {process}\nhostfile = \"{}\"\n\
                 [dataflows]\ninference = false\nanalytics = true\n[inference]\nenabled = false\n",
                stack.brokers,
                dir.join(format!("{}-nas", layout.name)).display(),
                free_port(),
                layout.workers,
                layout.processes,
                hostfile.display(),
            ),
        )?;
        let log = dir.join(format!("{}-{process}.log", layout.name));
        pipelines.push((Pipeline::start(&config, &[], &log)?, log));
        configs.push(config);
    }
    let client = connect(&url).await?;
    if layout.kill_one {
        wait_until(Duration::from_secs(120), "the first raw rows", || async {
            Ok(client
                .query_one("SELECT count(*) FROM device_metrics", &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0)
                > 0)
        })
        .await?;
        if let Some((victim, _)) = pipelines.pop() {
            victim.kill()?;
        }
        // The others lose their peer; whatever still runs is stopped too, then all restart.
        for (pipeline, _) in std::mem::take(&mut pipelines) {
            let _ = pipeline.terminate(Duration::from_secs(30));
        }
        for (process, config) in configs.iter().enumerate() {
            let log = dir.join(format!("{}-{process}.log", layout.name));
            pipelines.push((Pipeline::start(config, &[], &log)?, log));
        }
    }
    let what = format!("{}: every raw row and aggregate", layout.name);
    let waited = wait_until(Duration::from_secs(180), &what, || async {
        let count = |sql: &'static str| {
            let client = &client;
            async move {
                Ok::<i64, anyhow::Error>(match client.query_one(sql, &[]).await {
                    Ok(row) => row.get(0),
                    // Tables appear once the first process has migrated.
                    Err(_) => 0,
                })
            }
        };
        // The analytics windows are complete once the committed watermark reaches the
        // sentinels' (less the 5 s bound).
        Ok(
            count("SELECT count(*) FROM device_metrics").await? >= raw_rows.0
                && count("SELECT count(*) FROM device_metrics_1m").await? >= agg_rows as i64
                && count("SELECT count(*) FROM analytics_events").await? >= raw_rows.1
                && count(
                    "SELECT coalesce(max(committed_watermark_us), 0) FROM dataflow_state WHERE dataflow = 'analytics'",
                )
                .await?
                    >= (T0_MS + 7_200_000 - 5_000) * 1000 - 1,
        )
    })
    .await;
    for (pipeline, log) in &mut pipelines {
        assert!(
            pipeline.is_running(),
            "{} exited early: {}",
            layout.name,
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    if let Err(e) = waited {
        let logs: Vec<String> = pipelines
            .iter()
            .map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default())
            .collect();
        anyhow::bail!("{e}\n{}", logs.join("\n---\n"));
    }
    // Every process of the cluster reads its share of the partitions.
    for (process, (_, log)) in pipelines.iter().enumerate() {
        let text = std::fs::read_to_string(log)?;
        assert!(
            text.contains("assigned partition"),
            "{}: process {process} read no partition:\n{text}",
            layout.name
        );
    }
    let raw: i64 = client
        .query_one("SELECT count(*) FROM device_metrics", &[])
        .await?
        .get(0);
    assert_eq!(raw, raw_rows.0, "{}: raw rows", layout.name);
    let mut analytics = Vec::new();
    for sql in [
        "SELECT concat_ws(',', task_type, bucket, created, assigned, started, completed, failed,
                round(wait_p50_ms::numeric, 3), round(wait_p95_ms::numeric, 3),
                round(run_p50_ms::numeric, 3), round(run_p95_ms::numeric, 3), backlog) FROM task_stats_1m",
        "SELECT concat_ws(',', agent_id, bucket, assigned, completed, failed, active) FROM agent_load_1m",
        "SELECT concat_ws(',', event_type, endpoint, bucket, count, distinct_users, anonymous)
         FROM api_events_1m WHERE endpoint <> '/sentinel'",
    ] {
        for r in client.query(sql, &[]).await? {
            analytics.push(r.get::<_, String>(0));
        }
    }
    analytics.sort();
    let rows = client
        .query(
            "SELECT (extract(epoch FROM bucket) * 1000)::int8, device_id, metric_name, count, sum, min, max
             FROM device_metrics_1m",
            &[],
        )
        .await?;
    for (pipeline, _) in pipelines {
        pipeline.kill()?;
    }
    let metrics = rows
        .iter()
        .map(|r| {
            // Sums may differ in the last bits with the order of addition across workers.
            let sum: f64 = r.get(4);
            (
                (r.get(0), r.get(1), r.get(2)),
                (r.get(3), (sum * 1e6).round() / 1e6, r.get(5), r.get(6)),
            )
        })
        .collect();
    Ok((metrics, analytics))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_four_workers_and_a_two_process_cluster_agree() -> Result<()> {
    let stack = stack();
    let topic = format!("edge.telemetry.{}", unique("cluster"));
    let events_topic = format!("analytics.events.{}", unique("cluster"));
    create_topic(stack, &topic, PARTITIONS).await?;
    create_topic(stack, &events_topic, PARTITIONS).await?;
    let (records, raw_rows, expected) = events();
    produce(stack, &topic, &records)?;
    let (analytics_records, analytics_rows) = analytics_events();
    produce(stack, &events_topic, &analytics_records)?;
    let expected: Aggregates = expected
        .into_iter()
        .map(|(k, (c, s, mn, mx))| (k, (c, (s * 1e6).round() / 1e6, mn, mx)))
        .collect();
    let dir = tempfile::tempdir()?;
    let layouts = [
        Layout {
            name: "1x1",
            processes: 1,
            workers: 1,
            kill_one: false,
        },
        Layout {
            name: "1x4",
            processes: 1,
            workers: 4,
            kill_one: false,
        },
        Layout {
            name: "2x2",
            processes: 2,
            workers: 2,
            kill_one: false,
        },
        Layout {
            name: "2x2_killed",
            processes: 2,
            workers: 2,
            kill_one: true,
        },
    ];
    let mut first_analytics: Option<AnalyticsTables> = None;
    for layout in &layouts {
        let (got, analytics) = run_layout(
            layout,
            (&topic, &events_topic),
            (raw_rows, analytics_rows),
            expected.len(),
            dir.path(),
        )
        .await?;
        assert_eq!(got.len(), expected.len(), "{}: aggregate rows", layout.name);
        for (key, want) in &expected {
            assert_eq!(got.get(key), Some(want), "{}: {key:?}", layout.name);
        }
        match &first_analytics {
            None => {
                assert!(analytics.len() > 50, "1x1: analytics rows {analytics:?}");
                first_analytics = Some(analytics);
            }
            Some(first) => {
                let only_first: Vec<_> = first.iter().filter(|r| !analytics.contains(r)).collect();
                let only_here: Vec<_> = analytics.iter().filter(|r| !first.contains(r)).collect();
                assert!(
                    only_first.is_empty() && only_here.is_empty(),
                    "{}: analytics tables differ from 1x1: only in 1x1 {only_first:?}, only here {only_here:?}",
                    layout.name
                );
            }
        }
    }
    Ok(())
}
