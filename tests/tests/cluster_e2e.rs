//! Scale-out against the stack: the same telemetry through 1 process x 1 worker, 1 process x 4
//! workers and a cluster of 2 OS processes x 2 workers (timely over loopback TCP) gives the same
//! raw rows and the same `device_metrics_1m`, equal to what this test computes itself.

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

struct Layout {
    name: &'static str,
    processes: usize,
    workers: usize,
}

/// Runs one layout to completion and returns its `device_metrics_1m`, rounded for comparison.
async fn run_layout(
    layout: &Layout,
    topic: &str,
    raw_rows: i64,
    agg_rows: usize,
    dir: &Path,
) -> Result<Aggregates> {
    let stack = stack();
    let db = unique(&format!("cluster_{}", layout.name));
    let url = fresh_database(stack, &db).await?;
    let addresses: Vec<String> = (0..layout.processes)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let hostfile = dir.join(format!("{}-hosts", layout.name));
    std::fs::write(&hostfile, addresses.join("\n"))?;
    let mut pipelines = Vec::new();
    for process in 0..layout.processes {
        let config = dir.join(format!("{}-{process}.toml", layout.name));
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
                 [postgres]\nurl = \"{url}\"\nflush_rows = 500\nflush_interval = \"200ms\"\n\
                 [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n\
                 [query]\nhttp_addr = \"127.0.0.1:{}\"\n\
                 [windows]\nmax_out_of_orderness = \"5s\"\nidle_timeout = \"10m\"\n\
                 [runtime]\nworkers = {}\nprocesses = {}\nprocess_id = {process}\nhostfile = \"{}\"\n\
                 [dataflows]\ninference = false\n",
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
    }
    let client = connect(&url).await?;
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
        Ok(
            count("SELECT count(*) FROM device_metrics").await? >= raw_rows
                && count("SELECT count(*) FROM device_metrics_1m").await? >= agg_rows as i64,
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
    assert_eq!(raw, raw_rows, "{}: raw rows", layout.name);
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
    Ok(rows
        .iter()
        .map(|r| {
            // Sums may differ in the last bits with the order of addition across workers.
            let sum: f64 = r.get(4);
            (
                (r.get(0), r.get(1), r.get(2)),
                (r.get(3), (sum * 1e6).round() / 1e6, r.get(5), r.get(6)),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_four_workers_and_a_two_process_cluster_agree() -> Result<()> {
    let stack = stack();
    let topic = format!("edge.telemetry.{}", unique("cluster"));
    create_topic(stack, &topic, PARTITIONS).await?;
    let (records, raw_rows, expected) = events();
    produce(stack, &topic, &records)?;
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
        },
        Layout {
            name: "1x4",
            processes: 1,
            workers: 4,
        },
        Layout {
            name: "2x2",
            processes: 2,
            workers: 2,
        },
    ];
    for layout in &layouts {
        let got = run_layout(layout, &topic, raw_rows, expected.len(), dir.path()).await?;
        assert_eq!(got.len(), expected.len(), "{}: aggregate rows", layout.name);
        for (key, want) in &expected {
            assert_eq!(got.get(key), Some(want), "{}: {key:?}", layout.name);
        }
    }
    Ok(())
}
