//! The web console in a real browser: headless Chromium (Debian's, driven by Playwright from
//! `tests/browser/console_check.py`) loads the console of a running pipeline, and this test
//! checks what it showed against `/metrics` and the same SQL over HTTP. Requests that leave the
//! console's origin are aborted (the page must work offline) and fail the test, as do console
//! errors, exceptions and dialogs. Screenshots of every page are kept as test artefacts under
//! `$CARGO_TARGET_DIR/test-artifacts/console-*`.
//!
//! - `demo_console_shows_the_fleet_moving`: `primespark demo` prints the console's address
//!   first; counters shown lie between a scrape before and one after the browser read them,
//!   and move; a producer's markup in a dead letter stays text; SQL results match HTTP, a time
//!   series gets a chart, a refused statement shows its error; an open (loopback) endpoint
//!   refuses a foreign `Host` (DNS rebinding).
//! - `keyed_console_needs_a_key`: with API keys nothing of the console answers without one
//!   (401 and a Basic challenge), a reader's key as the Basic password opens it, cross-site
//!   requests with browser credentials are refused; on a drained input the numbers shown equal
//!   `/metrics` exactly.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use primespark_connectors::query::sha256_hex;
use primespark_tests::{
    free_port, http_request, pipeline_command, produce, produce_to, repo_root, stack, wait_until,
    Sections, TelemetryRun,
};
use serde_json::{json, Value};

const TOKEN: &str = "console-reader-token-0b7e41d2c9a85f36";

/// Where screenshots go: kept after the run, one folder per test.
fn artefacts(test: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("test-artifacts").join(test)
}

/// Runs the browser script; its JSON report.
fn browse(spec: &Value) -> Result<Value> {
    let out = std::process::Command::new(&stack().python)
        .arg(repo_root().join("tests/browser/console_check.py"))
        .arg(spec.to_string())
        .output()
        .context("running tests/browser/console_check.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "browser script failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("browser report: {stdout}"))
}

/// One series of a /metrics page: name, labels, value.
type Series = (String, BTreeMap<String, String>, f64);

/// A small, independent reading of the text format (labels here hold no escapes).
fn scrape(http: &str, token: Option<&str>) -> Result<Vec<Series>> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let (status, _, body) = http_request(http, "GET", "/metrics", &headers, b"")?;
    if status != 200 {
        bail!("/metrics: {status}");
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (head, ""),
        };
        let labels = labels
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
            .collect();
        out.push((name.to_owned(), labels, value));
    }
    Ok(out)
}

fn total(m: &[Series], name: &str, want: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .sum::<f64>()
        + 0.0
}

/// What a console key (`stream.telemetry.records_total`, ...) means in /metrics; `None` for
/// keys that are rates, gauges or not counters.
fn counter_of(key: &str, m: &[Series], streams: &[(&str, &str)]) -> Option<f64> {
    let parts: Vec<&str> = key.split('.').collect();
    let field = *parts.last()?;
    match parts[0] {
        "stream" => {
            let name = parts[1];
            let topic = streams.iter().find(|(n, _)| *n == name)?.1;
            Some(match field {
                "records_total" => total(m, "primespark_source_records_total", &[("topic", topic)]),
                "dead_letters_total" => {
                    total(m, "primespark_dead_letters_total", &[("topic", topic)])
                }
                "windows_closed_total" => {
                    total(m, "primespark_windows_closed_total", &[("dataflow", name)])
                }
                "late_events_total" => {
                    total(m, "primespark_late_events_total", &[("dataflow", name)])
                }
                _ => return None,
            })
        }
        "partition" => {
            // partition.<topic with dots>.<n>.<field>
            let n = parts[parts.len() - 2];
            let topic = parts[1..parts.len() - 2].join(".");
            let want = [("topic", topic.as_str()), ("partition", n)];
            Some(match field {
                "records_total" => total(m, "primespark_source_records_total", &want),
                "dead_letters_total" => total(m, "primespark_dead_letters_total", &want),
                _ => return None,
            })
        }
        "sink" => {
            let (sink, table) = (parts[1], parts[2]);
            let want = [("sink", sink), ("table", table)];
            Some(match field {
                "rows_total" => total(m, "primespark_sink_rows_written_total", &want),
                _ => return None,
            })
        }
        "model" => {
            let (backend, model) = (parts[1], parts[2]);
            let want = [("backend", backend), ("model", model)];
            Some(match field {
                "samples_total" => total(m, "primespark_inference_samples_total", &want),
                "anomalies_total" => total(m, "primespark_anomalies_total", &want),
                "errors_total" => total(m, "primespark_inference_errors_total", &want),
                _ => return None,
            })
        }
        _ => None,
    }
}

fn shown(report: &Value, reading: &str, key: &str) -> Option<f64> {
    report[reading][key].as_str().and_then(|v| v.parse().ok())
}

/// Every counter the page showed lies in [before, after]; returns how many were checked.
fn check_counters(
    report: &Value,
    before: &[Series],
    after: &[Series],
    streams: &[(&str, &str)],
) -> Result<usize> {
    let keys = report["first"]
        .as_object()
        .context("no values read from the page")?;
    let mut checked = 0;
    for key in keys.keys() {
        let (Some(lo), Some(hi)) = (
            counter_of(key, before, streams),
            counter_of(key, after, streams),
        ) else {
            continue;
        };
        let v = shown(report, "first", key)
            .with_context(|| format!("{key}: no number shown ({})", report["first"][key]))?;
        if v < lo || v > hi {
            bail!("{key}: the page showed {v}, /metrics had {lo} before and {hi} after");
        }
        checked += 1;
    }
    Ok(checked)
}

fn check_clean(report: &Value) -> Result<()> {
    let errors = report["errors"].as_array().cloned().unwrap_or_default();
    if !errors.is_empty() {
        bail!("the page had errors: {errors:?}");
    }
    let blocked = report["blocked"].as_array().cloned().unwrap_or_default();
    if !blocked.is_empty() {
        bail!("the page tried to leave its origin: {blocked:?}");
    }
    for shot in report["screenshots"].as_array().into_iter().flatten() {
        let path = shot.as_str().unwrap_or("");
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size < 5_000 {
            bail!("screenshot {path} missing or empty ({size} bytes)");
        }
    }
    Ok(())
}

/// `POST /v1/sql` with an optional bearer key; the JSON rows.
fn sql_rows(http: &str, sql: &str, token: Option<&str>) -> Result<Vec<Vec<Value>>> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("Authorization", a));
    }
    let body = json!({ "sql": sql }).to_string();
    let (status, _, out) = http_request(http, "POST", "/v1/sql", &headers, body.as_bytes())?;
    if status != 200 {
        bail!("{sql}: {status} {}", String::from_utf8_lossy(&out));
    }
    let v: Value = serde_json::from_slice(&out)?;
    Ok(v["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.as_array().cloned().unwrap_or_default())
        .collect())
}

/// The cells of JSON rows as the console prints them.
fn as_text(rows: &[Vec<Value>]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| {
            r.iter()
                .map(|v| match v {
                    Value::Null => "NULL".to_owned(),
                    Value::String(s) => s.clone(),
                    // As JavaScript prints a number: 47.0 is "47".
                    Value::Number(n) => match n.as_f64() {
                        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
                        _ => n.to_string(),
                    },
                    other => other.to_string(),
                })
                .collect()
        })
        .collect()
}

fn page_rows(result: &Value) -> Vec<Vec<String>> {
    result["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            r.as_array()
                .into_iter()
                .flatten()
                .map(|c| c.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .collect()
}

/// A raw GET with a chosen `Host` and extra headers; the status.
fn get_with_host(addr: &str, path: &str, host: &str, extra: &[(&str, &str)]) -> Result<u16> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    Ok(resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

struct Demo {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    fn text(&self) -> String {
        self.lines.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const HOSTILE: &str = r#"{"device_id": "<img src=x onerror=\"window.__primespark_xss=1\">", "metrics": {"cpu_percent": "<script>window.__primespark_xss=2</script><b>bold</b>"}, "timestamp": 1}"#;

#[test]
fn demo_console_shows_the_fleet_moving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = pipeline_command()?
        .current_dir(dir.path())
        .args(["demo", "--rate", "300", "--bad-share", "0.002"])
        .args(["--duration-secs", "240", "--http-addr", &http])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stderr = child.stderr.take().context("demo stderr")?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut l) = sink.lock() {
                l.push(line);
            }
        }
    });
    let demo = Demo { child, lines };

    // The first line says where the console is.
    let deadline = Instant::now() + Duration::from_secs(60);
    let brokers = loop {
        let text = demo.text();
        if let Some(b) = text
            .lines()
            .find_map(|l| l.split("brokers=").nth(1))
            .and_then(|b| b.split_whitespace().next())
        {
            break b.to_owned();
        }
        if Instant::now() > deadline {
            bail!("the demo never said where its broker is:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let first = demo.text().lines().next().unwrap_or("").to_owned();
    assert!(
        first.starts_with(&format!("console: http://{http}/")),
        "the demo's first line is not the console's address: {first:?}"
    );

    // Raw rows reach the archive every 10 s; wait until every device reported every metric
    // (the answer stops changing), so the table query below is stable while the fleet moves.
    let stable = "SELECT metric_name, count(DISTINCT device_id) AS devices FROM telemetry_raw \
                  GROUP BY metric_name ORDER BY metric_name";
    let expected = std::cell::RefCell::new(Vec::new());
    let rt = tokio::runtime::Runtime::new()?;
    let ready = rt.block_on(wait_until(
        Duration::from_secs(150),
        "a stable device count in telemetry_raw",
        || async {
            let rows = sql_rows(&http, stable, None).unwrap_or_default();
            let full = rows.len() >= 3 && rows.iter().all(|r| r[1].as_i64() >= Some(10));
            let same = full && *expected.borrow() == rows;
            *expected.borrow_mut() = rows;
            if !same {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Ok(same)
        },
    ));
    if let Err(e) = ready {
        bail!("{e} (last {:?}):\n{}", expected.borrow(), demo.text());
    }
    // The time series needs three archive rolls.
    std::thread::sleep(Duration::from_secs(12));
    // A producer's markup, as a dead letter the console will show (the fleet's own bad
    // records are rare here, so it stays among the latest 50).
    produce_to(
        &brokers,
        "edge.telemetry",
        &[(0, HOSTILE.as_bytes().to_vec())],
        Duration::from_secs(10),
    )?;

    // An open endpoint answers loopback names only.
    assert_eq!(get_with_host(&http, "/", "evil.example", &[])?, 403);
    assert_eq!(
        get_with_host(&http, "/v1/tables", "rebound.example:80", &[])?,
        403
    );
    let port = http.rsplit(':').next().unwrap_or("");
    assert_eq!(
        get_with_host(&http, "/", &format!("localhost:{port}"), &[])?,
        200
    );

    let out = artefacts("console-demo");
    let spec = json!({
        "url": format!("http://{http}/"),
        "out": out,
        "credentials": null,
        "settle_seconds": 5,
        "queries": [
            {"name": "table", "sql": stable},
            {"name": "chart", "sql": "SELECT date_bin(INTERVAL '5 seconds', time) AS t, metric_name, avg(value) AS avg \
                FROM telemetry_raw WHERE metric_name IN ('cpu_percent', 'load_avg') GROUP BY 1, 2 ORDER BY 1"},
            {"name": "markup", "sql": "SELECT '<b>bold</b><img src=x onerror=\"window.__primespark_xss=3\">' AS html"},
            {"name": "refused", "sql": "DROP TABLE telemetry_raw", "refused": true},
        ],
    });
    let before = scrape(&http, None)?;
    let report = browse(&spec)?;
    let after = scrape(&http, None)?;
    assert_eq!(report["status"], json!(200), "{report}");
    check_clean(&report)?;

    // The numbers shown are /metrics' numbers, and they move.
    let streams = [
        ("telemetry", "edge.telemetry"),
        ("inference", "edge.ai.inference"),
        ("analytics", "analytics.events"),
    ];
    let checked = check_counters(&report, &before, &after, &streams)?;
    assert!(checked >= 20, "only {checked} counters were shown");
    let key = "stream.telemetry.records_total";
    let (a, b) = (shown(&report, "first", key), shown(&report, "second", key));
    assert!(
        matches!((a, b), (Some(a), Some(b)) if b > a),
        "the fleet did not move: {a:?} then {b:?}"
    );
    let rate = shown(&report, "second", "stream.telemetry.events_per_second").unwrap_or(0.0);
    assert!(rate > 50.0, "events/s shown: {rate}");
    assert_eq!(report["first"]["inference.backend"], json!("cpu"));
    assert_eq!(
        total(
            &after,
            "primespark_inference_backend",
            &[("backend", "cpu")]
        ),
        1.0
    );
    for s in ["edge.telemetry", "edge.ai.inference", "analytics.events"] {
        let partitions = after
            .iter()
            .filter(|(n, l, _)| {
                n == "primespark_consumer_lag_records"
                    && l.get("topic").map(String::as_str) == Some(s)
            })
            .count();
        for p in 0..partitions {
            let k = format!("partition.{s}.{p}.consumer_lag_records");
            let lag = shown(&report, "first", &k).with_context(|| format!("{k} not shown"))?;
            assert!(lag >= 0.0, "{k}: {lag}");
            let k = format!("partition.{s}.{p}.watermark_lag_seconds");
            let wl = shown(&report, "first", &k).with_context(|| format!("{k} not shown"))?;
            assert!((0.0..120.0).contains(&wl), "{k}: {wl}");
        }
        assert!(partitions >= 2, "{s}: {partitions} partitions in /metrics");
    }

    // Dead letters: the producer's markup is shown as text, and did nothing.
    let dead = report["dead_letters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let hostile = dead.iter().find(|row| {
        row.as_array()
            .and_then(|c| c.last())
            .and_then(Value::as_str)
            .is_some_and(|p| p.contains("<script>window.__primespark_xss=2</script>"))
    });
    let payloads: Vec<&Value> = dead
        .iter()
        .filter_map(|row| row.as_array().and_then(|c| c.last()))
        .collect();
    assert!(
        hostile.is_some(),
        "the markup dead letter is not shown as text: {payloads:?}"
    );
    assert_eq!(report["injected_elements"], json!(0));
    assert_eq!(report["xss"], Value::Null);
    assert!(
        !report["anomalies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .is_empty(),
        "no anomaly shown"
    );

    // SQL: the same answer as over HTTP; a chart for the time series; markup stays text; a
    // refused statement shows why.
    let sql = report["sql"].as_array().cloned().unwrap_or_default();
    let by_name = |n: &str| sql.iter().find(|q| q["name"] == json!(n)).cloned();
    let table = by_name("table").context("no table result")?;
    assert_eq!(table["state"], json!("done"), "{table}");
    assert_eq!(page_rows(&table), as_text(&expected.borrow()));
    assert_eq!(
        page_rows(&table),
        as_text(&sql_rows(&http, stable, None)?),
        "the console's result differs from the same query over HTTP"
    );
    let chart = by_name("chart").context("no chart result")?;
    assert_eq!(chart["state"], json!("done"), "{chart}");
    let series = chart["chart_series"].as_u64().unwrap_or(0);
    assert_eq!(series, 2, "chart series: {chart}");
    let markup = by_name("markup").context("no markup result")?;
    assert_eq!(
        page_rows(&markup),
        vec![vec![
            "<b>bold</b><img src=x onerror=\"window.__primespark_xss=3\">".to_owned()
        ]]
    );
    assert_eq!(
        report["expected_errors"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let refused = by_name("refused").context("no refused result")?;
    assert_eq!(refused["state"], json!("error"), "{refused}");
    assert!(
        refused["status"]
            .as_str()
            .is_some_and(|s| s.contains("403")),
        "{refused}"
    );
    drop(demo);
    Ok(())
}

fn telemetry(partition: i32, i: i64) -> (i32, Vec<u8>) {
    const T0_MS: i64 = 1_762_351_200_000;
    let body = json!({"device_id": format!("pi-{}", i % 7), "metrics": {"cpu_percent": (i % 100) as f64, "temperature_c": 40.0 + (i % 10) as f64},
                      "timestamp": T0_MS + i * 500});
    (partition, body.to_string().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_console_needs_a_key() -> Result<()> {
    let run = TelemetryRun::new(
        "console",
        2,
        Sections {
            query: &format!(
                "rate_limit_per_second = 1000\nrate_limit_burst = 1000\n\
                 [[query.api_keys]]\nname = \"ops\"\nrole = \"reader\"\nsha256 = \"{}\"",
                sha256_hex(TOKEN)
            ),
            ..Sections::default()
        },
    )
    .await?;
    let stack = stack();
    // 400 events per partition, then a sentinel far ahead so the windows close.
    let mut records: Vec<(i32, Vec<u8>)> = (0..800).map(|i| telemetry((i % 2) as i32, i)).collect();
    records.push(telemetry(0, 20_000));
    records.push(telemetry(1, 20_001));
    records.push((0, b"{not json <b>x</b>".to_vec()));
    produce(stack, &run.topic, &records)?;
    let pipeline = run.start(&[])?;
    let http = run.http.clone();
    let bearer = format!("Bearer {TOKEN}");
    let drained = wait_until(Duration::from_secs(120), "the input drained", || async {
        let m = scrape(&http, Some(TOKEN)).unwrap_or_default();
        let read = total(&m, "primespark_source_records_total", &[]);
        let lag = total(&m, "primespark_consumer_lag_records", &[]);
        let stored = total(
            &m,
            "primespark_sink_rows_written_total",
            &[("sink", "postgres"), ("table", "device_metrics")],
        );
        Ok(read >= 803.0 && lag == 0.0 && stored > 0.0)
    })
    .await;
    if let Err(e) = drained {
        let _ = pipeline.kill();
        bail!("{e}:\n{}", run.log_text());
    }
    // Give the last flushes (windows, the archive's roll) time to land, so numbers stay put.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Without a key: nothing but a challenge.
    for path in [
        "/",
        "/console/api/overview",
        "/console/api/recent",
        "/console/console.js",
    ] {
        let (status, headers, body) = http_request(&http, "GET", path, &[], b"")?;
        assert_eq!(status, 401, "{path}");
        let challenge = headers
            .iter()
            .find(|(k, _)| k == "www-authenticate")
            .map(|(_, v)| v.as_str());
        assert!(
            challenge.is_some_and(|c| c.starts_with("Basic ")),
            "{path}: {challenge:?}"
        );
        let body = String::from_utf8_lossy(&body);
        assert!(
            !body.contains("edge.telemetry") && !body.contains("<script"),
            "{path}: {body}"
        );
    }
    use base64::Engine as _;
    let basic = |user: &str, key: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{key}"))
        )
    };
    let wrong = basic("ops", "not-the-key");
    let (status, _, _) =
        http_request(&http, "GET", "/", &[("Authorization", wrong.as_str())], b"")?;
    assert_eq!(status, 401);
    let right = basic("anyone", TOKEN);
    for auth in [right.as_str(), bearer.as_str()] {
        let (status, headers, body) =
            http_request(&http, "GET", "/", &[("Authorization", auth)], b"")?;
        assert_eq!(status, 200, "{auth}");
        let csp = headers
            .iter()
            .find(|(k, _)| k == "content-security-policy")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert!(String::from_utf8_lossy(&body).contains("console.js"));
    }
    // Browser credentials on a request another site started: refused, for pages and SQL.
    let (status, _, _) = http_request(
        &http,
        "GET",
        "/console/api/overview",
        &[
            ("Authorization", right.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        b"",
    )?;
    assert_eq!(status, 403);
    let (status, _, _) = http_request(
        &http,
        "POST",
        "/v1/sql",
        &[
            ("Authorization", right.as_str()),
            ("Origin", "http://evil.example"),
            ("Content-Type", "application/json"),
        ],
        br#"{"sql": "SELECT 1"}"#,
    )?;
    assert_eq!(status, 403);
    // A keyed endpoint is not bound to loopback names.
    assert_eq!(
        get_with_host(
            &http,
            "/",
            "pipeline.example",
            &[("Authorization", &bearer)]
        )?,
        200
    );

    // In the browser with the key as the password: the numbers equal /metrics.
    let query =
        "SELECT device_id, count(*) AS samples, round(avg(value), 3) AS avg FROM device_metrics \
                 GROUP BY device_id ORDER BY device_id";
    let out = artefacts("console-keyed");
    let spec = json!({
        "url": format!("http://{http}/"),
        "out": out,
        "credentials": {"username": "ops", "password": TOKEN},
        "settle_seconds": 2,
        "queries": [{"name": "devices", "sql": query}],
    });
    let before = scrape(&http, Some(TOKEN))?;
    let report = browse(&spec)?;
    let after = scrape(&http, Some(TOKEN))?;
    assert_eq!(report["status"], json!(200), "{report}");
    check_clean(&report)?;
    let streams = [("telemetry", run.topic.as_str())];
    let checked = check_counters(&report, &before, &after, &streams)?;
    assert!(checked >= 8, "only {checked} counters were shown");
    // Nothing moves on a drained input: shown == /metrics.
    for key in [
        "stream.telemetry.records_total",
        "stream.telemetry.dead_letters_total",
        "stream.telemetry.windows_closed_total",
    ] {
        assert_eq!(
            shown(&report, "first", key),
            counter_of(key, &after, &streams),
            "{key}"
        );
    }
    assert_eq!(
        shown(&report, "first", "stream.telemetry.records_total"),
        Some(803.0)
    );
    assert_eq!(
        shown(&report, "first", "stream.telemetry.dead_letters_total").map(|v| v >= 1.0),
        Some(true)
    );
    let dead = report["dead_letters"].to_string();
    assert!(dead.contains("{not json <b>x</b>"), "{dead}");
    let devices = report["sql"][0].clone();
    assert_eq!(devices["state"], json!("done"), "{devices}");
    let over_http = sql_rows(&http, query, Some(TOKEN))?;
    assert_eq!(over_http.len(), 7, "{over_http:?}");
    assert_eq!(page_rows(&devices), as_text(&over_http));

    // Without credentials the browser gets the challenge, not the page.
    let anonymous = browse(&json!({
        "url": format!("http://{http}/"),
        "out": artefacts("console-keyed-anonymous"),
        "credentials": null,
        "queries": [],
    }))?;
    assert_eq!(anonymous["status"], json!(401), "{anonymous}");
    let body = anonymous["body"].as_str().unwrap_or("");
    assert!(!body.contains(&run.topic), "{body}");
    pipeline.kill()?;
    Ok(())
}
