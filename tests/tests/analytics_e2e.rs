//! `analytics.events` end to end against the stack: task lifecycles whose events are spread
//! over both partitions (so the join meets them in any order), API events, and malformed
//! records, through the real broker into a pipeline that is killed (SIGKILL) and restarted
//! mid-stream. `analytics_events`, `task_stats_1m`, `agent_load_1m`, `api_events_1m`, their
//! 1-hour rollups, `task_state` and `dead_letters` are compared with what this test computes
//! itself, and the Parquet archive is read through the SQL endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use primespark_tests::{
    connect, create_topic, free_port, fresh_database, produce, stack, unique, wait_until, Pipeline,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// 2025-11-05T14:56:00Z: tasks straddle the 15:00 hour boundary, where the kill happens.
const T0_MS: i64 = 1_762_351_200_000 + 56 * MINUTE;
/// The first run reads until a little past this (the 14:00 hour closes and is committed).
const HOUR_MS: i64 = 1_762_351_200_000 + 60 * MINUTE;
const MINUTE: i64 = 60_000;
const PARTITIONS: i32 = 2;
const TASKS: usize = 300;
const TYPES: [&str; 3] = ["voice_recognition", "voice_synthesis", "llm"];
/// The sentinels' time: their watermark (less the 5 s bound) closes every window before it,
/// the 2025-11-05 day window too, and is more than a day (the widest window, which bounds how
/// long the join keeps a finished task) past every finish, so finished tasks have retired.
const SENTINEL_MS: i64 = T0_MS + 26 * 3_600_000;

#[derive(Clone, Debug)]
struct Task {
    id: String,
    task_type: &'static str,
    agent: String,
    created: i64,
    assigned: Option<i64>,
    started: Option<i64>,
    /// (time, failed)
    finished: Option<(i64, bool)>,
}

struct Api {
    time_ms: i64,
    event_type: &'static str,
    endpoint: &'static str,
    user: Option<String>,
}

/// Records per partition in time order (neighbours swapped: disorder within the bound), where
/// the first run stops reading, the tasks and API events among them, the malformed ones by
/// position.
type Events = (
    Vec<(i32, Vec<u8>)>,
    usize,
    Vec<Task>,
    Vec<Api>,
    BTreeMap<(i32, i64), &'static str>,
);

fn events() -> Events {
    let mut rng = SmallRng::seed_from_u64(41);
    let mut tasks = Vec::new();
    // (partition, time, payload)
    let mut timed: Vec<(i32, i64, Vec<u8>)> = Vec::new();
    for i in 0..TASKS {
        let created = T0_MS + (i as i64) * 1_200 + rng.random_range(0..500);
        let assigned = rng
            .random_bool(0.95)
            .then(|| created + rng.random_range(200..3_000));
        let started = assigned
            .filter(|_| rng.random_bool(0.9))
            .map(|a| a + rng.random_range(500..40_000));
        let finished = started
            .filter(|_| rng.random_bool(0.85))
            .map(|s| (s + rng.random_range(1_000..150_000), rng.random_bool(0.1)));
        let task = Task {
            id: format!("task-{i}"),
            task_type: TYPES[rng.random_range(0..TYPES.len())],
            agent: format!("spark-agent-{}", rng.random_range(1..5)),
            created,
            assigned,
            started,
            finished,
        };
        // Each event on a random partition: a task's events meet in the join from both.
        let mut part = || rng.random_range(0..PARTITIONS);
        timed.push((
            part(),
            created,
            json!({"event_type": "task_created", "task_id": task.id,
            "task_type": task.task_type, "priority": "HIGH", "timestamp": created})
            .to_string()
            .into_bytes(),
        ));
        if let Some(t) = task.assigned {
            timed.push((
                part(),
                t,
                json!({"event_type": "task_assigned", "task_id": task.id,
                "agent_id": task.agent, "timestamp": t})
                .to_string()
                .into_bytes(),
            ));
        }
        if let Some(t) = task.started {
            timed.push((
                part(),
                t,
                json!({"event_type": "task_started", "task_id": task.id,
                "agent_id": task.agent, "timestamp": t})
                .to_string()
                .into_bytes(),
            ));
        }
        if let Some((t, failed)) = task.finished {
            let kind = if failed {
                "task_failed"
            } else {
                "task_completed"
            };
            timed.push((
                part(),
                t,
                json!({"event_type": kind, "task_id": task.id,
                "agent_id": task.agent, "timestamp": t})
                .to_string()
                .into_bytes(),
            ));
        }
        tasks.push(task);
    }
    let mut api = Vec::new();
    for i in 0..500 {
        let (event_type, endpoint) = [
            ("llm_generate", "/api/llm/generate"),
            ("memory_search", "/api/memory/search"),
        ][rng.random_range(0..2)];
        let user = rng.random_range(0..8);
        let a = Api {
            time_ms: T0_MS + i * 750 + rng.random_range(0..300),
            event_type,
            endpoint,
            user: (user > 0).then(|| format!("user-{user}")),
        };
        timed.push((
            rng.random_range(0..PARTITIONS),
            a.time_ms,
            json!({"event_type": a.event_type, "endpoint": a.endpoint, "user_id": a.user,
                   "data": {"n": i}, "timestamp": a.time_ms})
            .to_string()
            .into_bytes(),
        ));
        api.push(a);
    }
    timed.sort_by_key(|(p, t, _)| (*p, *t));
    // (running max time of its partition, partition, sequence, payload): merged across
    // partitions in time order so that any prefix holds both partitions' first minutes, while
    // each partition keeps its own order.
    let mut merged: Vec<(i64, i32, usize, Vec<u8>)> = Vec::new();
    let mut dead = BTreeMap::new();
    for p in 0..PARTITIONS {
        let mut mine: Vec<(i64, Vec<u8>)> = timed
            .iter()
            .filter(|(q, _, _)| *q == p)
            .map(|(_, t, b)| (*t, b.clone()))
            .collect();
        for i in (0..mine.len().saturating_sub(1)).step_by(4) {
            // Out of order, but within the 5 s bound: never late.
            if mine[i + 1].0 - mine[i].0 < 4_000 {
                mine.swap(i, i + 1);
            }
        }
        let mut offset = 0usize;
        let mut high = i64::MIN;
        for (i, (t, payload)) in mine.into_iter().enumerate() {
            high = high.max(t);
            if i % 97 == 50 {
                let (bad, reason) = if i % 2 == 0 {
                    (b"{\"event_type\": ".to_vec(), "malformed_json")
                } else {
                    (
                        json!({"event_type": "task_created", "task_id": "x", "timestamp": T0_MS})
                            .to_string()
                            .into_bytes(),
                        "missing_field",
                    )
                };
                dead.insert((p, offset as i64), reason);
                merged.push((high, p, offset, bad));
                offset += 1;
            }
            merged.push((high, p, offset, payload));
            offset += 1;
        }
        merged.push((
            SENTINEL_MS,
            p,
            offset,
            json!({"event_type": "sentinel", "endpoint": "/sentinel", "timestamp": SENTINEL_MS})
                .to_string()
                .into_bytes(),
        ));
    }
    merged.sort_by_key(|(high, p, seq, _)| (*high, *p, *seq));
    let split = merged
        .iter()
        .position(|(high, _, _, _)| *high >= HOUR_MS + 30_000)
        .unwrap_or(merged.len() / 2);
    let records = merged.into_iter().map(|(_, p, _, b)| (p, b)).collect();
    (records, split, tasks, api, dead)
}

fn minute(t: i64) -> i64 {
    t.div_euclid(MINUTE) * MINUTE
}

fn lower_quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (!sorted.is_empty()).then(|| sorted[(q * (sorted.len() - 1) as f64).floor() as usize])
}

fn near(got: Option<f64>, exact: Option<f64>) -> bool {
    match (got, exact) {
        (Some(g), Some(e)) => (g - e).abs() <= 0.005 * e.abs() + 1e-9,
        (None, None) => true,
        _ => false,
    }
}

/// Samples of a count per key at every minute's end (`(key, in, out)` intervals): rows where
/// the count or the previous minute's is not zero, up to the last minute the watermark closed.
fn samples(items: &[(String, i64, Option<i64>)]) -> BTreeMap<(String, i64), i64> {
    let last = minute(SENTINEL_MS - 5_000) - MINUTE;
    let mut out = BTreeMap::new();
    let keys: BTreeSet<&String> = items.iter().map(|i| &i.0).collect();
    for k in keys {
        let value = |m: i64| {
            items
                .iter()
                .filter(|(key, a, b)| key == k && *a <= m && b.is_none_or(|b| b > m))
                .count() as i64
        };
        let mut m = minute(T0_MS);
        while m <= last {
            let (v, prev) = (value(m), value(m - MINUTE));
            if v != 0 || prev != 0 {
                out.insert((k.clone(), m), v);
            }
            m += MINUTE;
        }
    }
    out
}

/// (event type, endpoint, minute) -> (count, users, anonymous).
type ApiWant = BTreeMap<(String, String, i64), (i64, BTreeSet<String>, i64)>;

#[derive(Default, Debug)]
struct TaskWant {
    n: [i64; 5],
    wait: Vec<f64>,
    run: Vec<f64>,
    backlog: i64,
}

fn want_task_stats(tasks: &[Task]) -> BTreeMap<(String, i64), TaskWant> {
    let mut want: BTreeMap<(String, i64), TaskWant> = BTreeMap::new();
    let mut items = Vec::new();
    for t in tasks {
        let ty = t.task_type.to_owned();
        items.push((
            ty.clone(),
            minute(t.created),
            t.finished.map(|f| minute(f.0)),
        ));
        want.entry((ty.clone(), minute(t.created))).or_default().n[0] += 1;
        if let Some(a) = t.assigned {
            want.entry((ty.clone(), minute(a))).or_default().n[1] += 1;
        }
        if let Some(s) = t.started {
            let w = want.entry((ty.clone(), minute(s))).or_default();
            w.n[2] += 1;
            w.wait.push((s - t.created) as f64);
        }
        if let Some((f, failed)) = t.finished {
            let w = want.entry((ty.clone(), minute(f))).or_default();
            w.n[if failed { 4 } else { 3 }] += 1;
            if let Some(s) = t.started {
                w.run.push((f - s) as f64);
            }
        }
    }
    for (k, v) in samples(&items) {
        want.entry(k).or_default().backlog = v;
    }
    want
}

fn want_agent_load(tasks: &[Task]) -> BTreeMap<(String, i64), [i64; 4]> {
    let mut want: BTreeMap<(String, i64), [i64; 4]> = BTreeMap::new();
    let mut items = Vec::new();
    for t in tasks {
        let Some(a) = t.assigned else { continue };
        items.push((t.agent.clone(), minute(a), t.finished.map(|f| minute(f.0))));
        want.entry((t.agent.clone(), minute(a))).or_default()[0] += 1;
        if let Some((f, failed)) = t.finished {
            want.entry((t.agent.clone(), minute(f))).or_default()[if failed { 2 } else { 1 }] += 1;
        }
    }
    for (k, v) in samples(&items) {
        want.entry(k).or_default()[3] = v;
    }
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_end_to_end_with_restart() -> Result<()> {
    let stack = stack();
    let db = unique("analytics");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("analytics.events.{db}");
    create_topic(stack, &topic, PARTITIONS).await?;
    let work = tempfile::tempdir()?;
    let http = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\nevents = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 300\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"{http}\"\n\
             [windows]\nmax_out_of_orderness = \"5s\"\nidle_timeout = \"10m\"\n\
             [runtime]\nworkers = 2\n\
             [dataflows]\ntelemetry = false\ninference = false\nanalytics = true\n",
            stack.brokers,
            work.path().join("nas").display()
        ),
    )?;
    let log = work.path().join("pipeline.log");
    let (records, split, tasks, api, dead) = events();
    let task_events: i64 = tasks
        .iter()
        .map(|t| {
            1 + i64::from(t.assigned.is_some())
                + i64::from(t.started.is_some())
                + i64::from(t.finished.is_some())
        })
        .sum();
    let raw_rows = task_events + api.len() as i64 + i64::from(PARTITIONS);

    // Up to just past 15:00, a pipeline killed once the 14:00 hour is committed (its records
    // are not replayed: tasks created before 15:00 and finished after live only in
    // task_state), the rest, a restarted pipeline that must rebuild the join from it.
    let (first, rest) = records.split_at(split);
    produce(stack, &topic, first)?;
    let pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    wait_until(
        Duration::from_secs(120),
        "the 14:00 hour committed",
        || async {
            let n = |sql: &'static str| {
                let client = &client;
                async move { Ok::<i64, anyhow::Error>(client.query_one(sql, &[]).await?.get(0)) }
            };
            Ok(
                n("SELECT count(*) FROM task_stats_1h").await.unwrap_or(0) > 0
                    && n("SELECT count(*) FROM task_state").await.unwrap_or(0) > 30,
            )
        },
    )
    .await?;
    pipeline.kill()?;
    produce(stack, &topic, rest)?;
    let mut pipeline = Pipeline::start(&config, &[], &log)?;

    let want_stats = want_task_stats(&tasks);
    let want_agents = want_agent_load(&tasks);
    let mut want_api: ApiWant = BTreeMap::new();
    for a in &api {
        let w = want_api
            .entry((a.event_type.into(), a.endpoint.into(), minute(a.time_ms)))
            .or_default();
        w.0 += 1;
        match &a.user {
            Some(u) => {
                w.1.insert(u.clone());
            }
            None => w.2 += 1,
        }
    }
    let waited = wait_until(Duration::from_secs(240), "every row and window", || async {
        let n = |sql: &'static str| {
            let client = &client;
            async move { Ok::<i64, anyhow::Error>(client.query_one(sql, &[]).await?.get(0)) }
        };
        Ok(
            n("SELECT count(*) FROM analytics_events").await? >= raw_rows
                && n("SELECT count(*) FROM task_stats_1m").await? >= want_stats.len() as i64
                && n("SELECT count(*) FROM agent_load_1m").await? >= want_agents.len() as i64
                && n("SELECT count(*) FROM api_events_1m WHERE endpoint <> '/sentinel'").await?
                    >= want_api.len() as i64
                && n("SELECT count(*) FROM task_stats_1h").await? >= TYPES.len() as i64
                && n("SELECT count(*) FROM task_stats_1d").await? >= TYPES.len() as i64
                && n("SELECT count(*) FROM dead_letters").await? >= dead.len() as i64,
        )
    })
    .await;
    if let Err(e) = waited {
        anyhow::bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(pipeline.is_running(), "pipeline keeps running");
    // A commit may land a moment after the counts: let the last one settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Raw rows exactly once.
    let n: i64 = client
        .query_one("SELECT count(*) FROM analytics_events", &[])
        .await?
        .get(0);
    assert_eq!(n, raw_rows, "analytics_events");
    let n: i64 = client
        .query_one(
            "SELECT count(DISTINCT (task_id, event_type)) FROM analytics_events WHERE task_id IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(n, task_events, "task events, each once");

    // task_stats_1m: counts, percentiles and backlog per (type, minute).
    let rows = client
        .query(
            "SELECT task_type, (extract(epoch FROM bucket) * 1000)::int8, created, assigned, started, completed,
                    failed, wait_p50_ms, wait_p95_ms, run_p50_ms, run_p95_ms, backlog
             FROM task_stats_1m",
            &[],
        )
        .await?;
    let got_keys: BTreeSet<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want_keys: BTreeSet<(String, i64)> = want_stats.keys().cloned().collect();
    assert_eq!(
        got_keys.difference(&want_keys).collect::<Vec<_>>(),
        Vec::<&(String, i64)>::new(),
        "unexpected task_stats_1m rows"
    );
    assert_eq!(
        want_keys.difference(&got_keys).collect::<Vec<_>>(),
        Vec::<&(String, i64)>::new(),
        "missing task_stats_1m rows"
    );
    for r in &rows {
        let key: (String, i64) = (r.get(0), r.get(1));
        let w = &want_stats[&key];
        let got: [i64; 5] = [r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)];
        assert_eq!(got, w.n, "counts {key:?}");
        assert_eq!(r.get::<_, i64>(11), w.backlog, "backlog {key:?}");
        for (i, values, q) in [
            (7, &w.wait, 0.5),
            (8, &w.wait, 0.95),
            (9, &w.run, 0.5),
            (10, &w.run, 0.95),
        ] {
            let got: Option<f64> = r.get(i);
            assert!(
                near(got, lower_quantile(values, q)),
                "column {i} of {key:?}: {got:?} vs {:?}",
                lower_quantile(values, q)
            );
        }
    }

    // agent_load_1m.
    let rows = client
        .query(
            "SELECT agent_id, (extract(epoch FROM bucket) * 1000)::int8, assigned, completed, failed, active
             FROM agent_load_1m",
            &[],
        )
        .await?;
    let got: BTreeMap<(String, i64), [i64; 4]> = rows
        .iter()
        .map(|r| {
            (
                (r.get(0), r.get(1)),
                [r.get(2), r.get(3), r.get(4), r.get(5)],
            )
        })
        .collect();
    assert_eq!(got, want_agents, "agent_load_1m");

    // api_events_1m.
    let rows = client
        .query(
            "SELECT event_type, endpoint, (extract(epoch FROM bucket) * 1000)::int8, count, distinct_users, anonymous
             FROM api_events_1m WHERE endpoint <> '/sentinel'",
            &[],
        )
        .await?;
    let got: BTreeMap<(String, String, i64), (i64, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                (r.get(0), r.get(1), r.get(2)),
                (r.get(3), r.get(4), r.get(5)),
            )
        })
        .collect();
    let want: BTreeMap<(String, String, i64), (i64, i64, i64)> = want_api
        .iter()
        .map(|(k, (n, users, anon))| (k.clone(), (*n, users.len() as i64, *anon)))
        .collect();
    assert_eq!(got, want, "api_events_1m");

    // 1-hour and 1-day rollups: counts add up, backlog is the value at the window's end.
    for (table, width) in [("task_stats_1h", 3_600_000), ("task_stats_1d", 86_400_000)] {
        let rows = client
        .query(
            &format!("SELECT task_type, (extract(epoch FROM bucket) * 1000)::int8, created, completed + failed, backlog
             FROM {table}"),
            &[],
        )
        .await?;
        let types: BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(types.len(), TYPES.len(), "{table}: {types:?}");
        for r in &rows {
            let (ty, hour): (String, i64) = (r.get(0), r.get(1));
            let in_hour = |t: i64| t >= hour && t < hour + width;
            let of_type = tasks.iter().filter(|t| t.task_type == ty);
            let created = of_type.clone().filter(|t| in_hour(t.created)).count() as i64;
            let finished = of_type
                .clone()
                .filter(|t| t.finished.is_some_and(|f| in_hour(f.0)))
                .count() as i64;
            assert_eq!(
                (r.get::<_, i64>(2), r.get::<_, i64>(3)),
                (created, finished),
                "{table} {ty} {hour}"
            );
            let end = minute(hour + width - 1);
            let open = of_type
                .filter(|t| {
                    minute(t.created) <= end && t.finished.is_none_or(|f| minute(f.0) > end)
                })
                .count() as i64;
            assert_eq!(
                r.get::<_, i64>(4),
                open,
                "backlog at the end of {table} {ty} {hour}"
            );
        }
    }

    // The join's state: every finished task retired (its finish is long before the
    // watermark), every open task kept with each of its events.
    let rows = client
        .query("SELECT task_id, kind FROM task_state", &[])
        .await?;
    let got: BTreeSet<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut want = BTreeSet::new();
    for t in tasks.iter().filter(|t| t.finished.is_none()) {
        want.insert((t.id.clone(), "task_created".to_owned()));
        if t.assigned.is_some() {
            want.insert((t.id.clone(), "task_assigned".to_owned()));
        }
        if t.started.is_some() {
            want.insert((t.id.clone(), "task_started".to_owned()));
        }
    }
    assert_eq!(got, want, "task_state");

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

    // Parquet through the SQL endpoint.
    wait_until(Duration::from_secs(60), "parquet rolls", || async {
        let n: i64 = client
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets WHERE sink = 'parquet_raw'",
                &[],
            )
            .await?
            .get(0);
        Ok(n >= records.len() as i64)
    })
    .await?;
    let sql = |q: &str| {
        let body = json!({ "sql": q }).to_string();
        let out = std::process::Command::new("curl")
            .args(["-s", "-H", "content-type: application/json", "-d", &body])
            .arg(format!("http://{http}/v1/sql"))
            .output()
            .expect("curl runs");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let v = sql("SELECT count(*) AS n FROM analytics_raw");
    assert_eq!(v["rows"][0][0], json!(raw_rows), "{v}");
    let v = sql("SELECT sum(created) AS n FROM task_stats_1m");
    assert_eq!(v["rows"][0][0], json!(TASKS), "{v}");
    Ok(())
}
