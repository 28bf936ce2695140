//! The HTTP query door, locked: a pipeline with a reader and an admin API key (stored as
//! SHA-256 in its config), a 2 s query timeout, a 4 KiB body limit and a small rate limit.
//! No token -> 401; a reader's DDL -> 403; external tables, COPY and file-reading functions ->
//! 403 for everyone; an oversize body -> 413; a runaway query -> cancelled (408) while the
//! pipeline keeps serving; over the rate -> 429 with Retry-After; results as JSON, CSV and an
//! Arrow IPC stream; `GET /v1/tables` lists the catalog; one audit line per query. On the
//! PostgreSQL wire door, bound parameters are values: injection attempts match nothing and drop
//! nothing, whichever tier (PostgreSQL push-down, the Parquet archive) the query reads.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use primespark_connectors::query::hash_password;
use primespark_connectors::query::sha256_hex;
use primespark_tests::{
    connect, free_port, http_request, produce, stack, wait_until, HttpResponse, Sections,
    TelemetryRun,
};
use serde_json::{json, Value};

const T0_MS: i64 = 1_762_351_200_000;
const EVENTS: i64 = 3000;
const READER: &str = "reader-token-8c1f0e0b5a7d4e2f9b3c6a1d";
const ADMIN: &str = "admin-token-3f9a2b7c1e5d4086a2c4e6f8";

fn post(addr: &str, token: Option<&str>, accept: &str, sql: &str) -> Result<HttpResponse> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json"), ("Accept", accept)];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    http_request(
        addr,
        "POST",
        "/v1/sql",
        &headers,
        json!({"sql": sql}).to_string().as_bytes(),
    )
}

fn post_json(addr: &str, token: Option<&str>, sql: &str) -> Result<(u16, Value)> {
    let (status, _, body) = post(addr, token, "application/json", sql)?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_door_is_locked() -> Result<()> {
    let stack = stack();
    let run = TelemetryRun::new(
        "qsec",
        1,
        Sections {
            query: &format!(
                "timeout = \"2s\"\nmax_body_bytes = 4096\n\
             rate_limit_per_second = 2\nrate_limit_burst = 40\n\
             [[query.api_keys]]\nname = \"grafana\"\nrole = \"reader\"\nsha256 = \"{}\"\n\
             [[query.api_keys]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"",
                sha256_hex(READER),
                sha256_hex(ADMIN),
            ),
            extra: "[inference]\nenabled = false",
            ..Sections::default()
        },
    )
    .await?;
    let records: Vec<(i32, Vec<u8>)> = (0..EVENTS)
        .map(|i| {
            let e = json!({"device_id": format!("pi-{}", i % 10), "timestamp": T0_MS + i * 100,
                           "metrics": {"cpu_percent": (i % 100) as f64}});
            (0, e.to_string().into_bytes())
        })
        .collect();
    produce(stack, &run.topic, &records)?;
    let (http, log) = (run.http.clone(), run.log.clone());
    let mut pipeline = run.start(&[])?;

    // Every raw row archived (polled with the admin key; the reader's bucket is tested below).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n = post_json(&http, Some(ADMIN), "SELECT count(*) FROM telemetry_raw")
            .ok()
            .and_then(|(s, v)| (s == 200).then(|| v["rows"][0][0].as_i64()).flatten())
            .unwrap_or(0);
        if n == EVENTS {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {n} of {EVENTS} rows archived\n{}",
                std::fs::read_to_string(&log)?
            );
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
    }

    // 401: no token, an unknown one; the body says what to send.
    let (status, headers, body) = post(&http, None, "application/json", "SELECT 1")?;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "www-authenticate"), Some("Bearer"));
    assert!(String::from_utf8_lossy(&body).contains("Authorization: Bearer"));
    assert_eq!(post_json(&http, Some("not-a-key"), "SELECT 1")?.0, 401);
    let (status, _, _) = http_request(&http, "GET", "/v1/tables", &[], b"")?;
    assert_eq!(status, 401);

    // 403: a reader's DDL names the role; some statements nobody may run.
    let (status, body) = post_json(
        &http,
        Some(READER),
        "CREATE VIEW busy AS SELECT * FROM telemetry_raw",
    )?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("admin"),
        "{body}"
    );
    let (status, body) = post_json(
        &http,
        Some(ADMIN),
        "CREATE VIEW busy AS SELECT device_id FROM telemetry_raw WHERE value > 50",
    )?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_json(
        &http,
        Some(READER),
        "SELECT count(DISTINCT device_id) FROM busy",
    )?;
    assert_eq!(
        (status, body["rows"][0][0].as_i64()),
        (200, Some(10)),
        "{body}"
    );
    for sql in [
        "CREATE EXTERNAL TABLE leak STORED AS CSV LOCATION '/etc/passwd'",
        "COPY (SELECT * FROM telemetry_raw) TO '/tmp/primespark-leak.csv'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "INSERT INTO busy VALUES ('x')",
    ] {
        let (status, body) = post_json(&http, Some(ADMIN), sql)?;
        assert!(status == 403 || status == 400, "{sql}: {status} {body}");
        assert!(body["error"].is_string(), "{sql}: {body}");
    }
    let (status, body) = post_json(&http, Some(ADMIN), "SELECT * FROM read_csv('/etc/passwd')")?;
    assert_eq!(status, 403, "{body}");
    assert!(!std::path::Path::new("/tmp/primespark-leak.csv").exists());

    // 413: the body limit holds before any SQL is parsed.
    let big = format!("SELECT '{}'", "x".repeat(5000));
    let (status, _, body) = post(&http, Some(READER), "application/json", &big)?;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));

    // A runaway query is cancelled at the timeout, and the endpoint keeps answering.
    let started = Instant::now();
    let (status, body) = post_json(
        &http,
        Some(READER),
        "SELECT count(*) FROM telemetry_raw a, telemetry_raw b, telemetry_raw c WHERE a.value + b.value + c.value >= 0",
    )?;
    assert_eq!(status, 408, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("query.timeout"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(pipeline.is_running());
    let (status, body) = post_json(&http, Some(READER), "SELECT count(*) FROM telemetry_raw")?;
    assert_eq!((status, body["rows"][0][0].as_i64()), (200, Some(EVENTS)));

    // Formats: CSV with a header, and an Arrow IPC stream with the same rows.
    let sql =
        "SELECT device_id, count(*) AS n FROM telemetry_raw GROUP BY device_id ORDER BY device_id";
    let (status, headers, csv) = post(&http, Some(READER), "text/csv", sql)?;
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type")
        .unwrap_or("")
        .starts_with("text/csv"));
    let csv = String::from_utf8(csv)?;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.first(), Some(&"device_id,n"), "{csv}");
    assert_eq!(lines.len(), 11, "{csv}");
    assert_eq!(lines[1], "pi-0,300");
    let (status, headers, ipc) = post(
        &http,
        Some(READER),
        "application/vnd.apache.arrow.stream",
        sql,
    )?;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/vnd.apache.arrow.stream")
    );
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)?;
    let mut rows = 0;
    for batch in reader {
        rows += batch?.num_rows();
    }
    assert_eq!(rows, 10);

    // The catalog, with columns.
    let (status, _, body) = http_request(
        &http,
        "GET",
        "/v1/tables",
        &[("Authorization", &format!("Bearer {READER}"))],
        b"",
    )?;
    assert_eq!(status, 200);
    let tables: Value = serde_json::from_slice(&body)?;
    let raw = tables["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "telemetry_raw"))
        .cloned()
        .unwrap_or(Value::Null);
    let columns: Vec<&str> = raw["columns"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        columns.contains(&"device_id") && columns.contains(&"value"),
        "{raw}"
    );

    // 429 once the reader's burst is spent, with Retry-After; the admin key is unaffected.
    let mut limited = None;
    for _ in 0..60 {
        let (status, headers, _) = post(&http, Some(READER), "application/json", "SELECT 1")?;
        if status == 429 {
            limited = header(&headers, "retry-after").map(str::to_owned);
            break;
        }
        assert_eq!(status, 200);
    }
    assert!(limited.is_some(), "never rate limited");
    assert_eq!(post_json(&http, Some(ADMIN), "SELECT 1")?.0, 200);

    // One audit line per query, with who, outcome and rows.
    let text = std::fs::read_to_string(&log)?;
    let audit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("primespark::audit"))
        .collect();
    assert!(
        audit
            .iter()
            .any(|l| l.contains("user=grafana") && l.contains("forbidden")),
        "{audit:#?}"
    );
    assert!(audit
        .iter()
        .any(|l| l.contains("user=grafana") && l.contains("timeout")));
    assert!(audit
        .iter()
        .any(|l| l.contains("user=ops") && l.contains("outcome=\"ok\"") && l.contains("rows=1")));
    assert!(
        !text.contains(READER) && !text.contains(ADMIN),
        "a token reached the log"
    );
    pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}

/// With `query.tls_cert`/`tls_key` the HTTP door is HTTPS only: curl, trusting the certificate,
/// gets answers (SQL and `/metrics`); a plain-HTTP request gets no answer and is counted as a
/// failed handshake; a client that connects and says nothing holds up nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_door_speaks_tls_when_configured() -> Result<()> {
    let stack = stack();
    let certs = tempfile::tempdir()?;
    let (cert, key) = primespark_tests::self_signed_cert(certs.path())?;
    let run = TelemetryRun::new(
        "qtls",
        1,
        Sections {
            query: &format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n\
             [[query.api_keys]]\nname = \"grafana\"\nrole = \"reader\"\nsha256 = \"{}\"",
                cert.display(),
                key.display(),
                sha256_hex(READER),
            ),
            extra: "[inference]\nenabled = false",
            ..Sections::default()
        },
    )
    .await?;
    let records: Vec<(i32, Vec<u8>)> = (0..100i64)
        .map(|i| {
            let e = json!({"device_id": "pi-1", "timestamp": T0_MS + i * 100,
                           "metrics": {"cpu_percent": 1.0}});
            (0, e.to_string().into_bytes())
        })
        .collect();
    produce(stack, &run.topic, &records)?;
    let http = run.http.clone();
    let port = http.rsplit(':').next().unwrap_or_default().to_owned();
    let mut pipeline = run.start(&[])?;
    let https = |path: &str, body: Option<&str>| -> Result<(bool, String)> {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&cert)
            .args(["-H", &format!("Authorization: Bearer {READER}")]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data", b]);
        }
        let out = cmd
            .arg(format!("https://localhost:{port}{path}"))
            .output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let sql = json!({"sql": "SELECT count(*) FROM device_metrics"}).to_string();
    loop {
        let (ok, out) = https("/v1/sql", Some(&sql))?;
        if ok && out.contains("[[100]]") {
            break;
        }
        if Instant::now() > deadline {
            bail!("{out}\n{}", run.log_text());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A client that connects and never starts its handshake holds up nobody: with it
    // connected, another client's request is answered (curl gives up after 5 s, half the
    // server's handshake deadline, so waiting behind the silent one would fail).
    let _silent = std::net::TcpStream::connect(&http)?;
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(&cert)
        .arg(format!("https://localhost:{port}/healthz"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain HTTP on the TLS port: no HTTP answer at all (and a failed handshake, counted below).
    let plain = http_request(&http, "GET", "/healthz", &[], b"");
    assert!(
        !matches!(plain, Ok((200, _, _))),
        "plain HTTP was answered: {plain:?}"
    );
    let (ok, metrics) = https("/metrics", None)?;
    assert!(ok, "{metrics}");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("primespark_tls_handshake_failures_total{endpoint=\"http\"}")
            && !l.ends_with(" 0")),
        "the failed handshake was not counted"
    );
    assert!(pipeline.is_running());
    pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}

/// A wire user's password in [`wire_parameters_are_values_not_sql`].
const WIRE_PASSWORD: &str = "wire-test-password-5d1c";

/// Strings that would change the statement if they were spliced into its text.
const INJECTIONS: &[&str] = &[
    "x' OR '1'='1",
    "pi-1' OR device_id <> '",
    "'; DROP TABLE device_metrics; --",
    "'; DROP VIEW busy; --",
    "pi-1'; --",
    "\\'; DROP TABLE device_metrics; --",
    "$2",
];

async fn wire_client(port: u16, user: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user={user} password={WIRE_PASSWORD} dbname=primespark"
        ),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn wire_count(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<i64> {
    Ok(client.query_one(sql, params).await?.get(0))
}

/// The pipeline's wire endpoint with a reader and an admin: parameters compared with columns of
/// the hot table (pushed down into PostgreSQL), the archive and a view match only themselves,
/// come back unchanged, bind typed (timestamptz, float8, bool, bytea in binary), and no
/// injection attempt drops anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_parameters_are_values_not_sql() -> Result<()> {
    let stack = stack();
    let port = free_port();
    let hash = hash_password(WIRE_PASSWORD)?;
    let run = TelemetryRun::new(
        "qwire",
        1,
        Sections {
            query: &format!(
                "pg_addr = \"127.0.0.1:{port}\"\nrate_limit_per_second = 1000\n\
                 rate_limit_burst = 1000\n\
                 [[query.users]]\nname = \"grafana\"\nrole = \"reader\"\npassword_hash = \"{hash}\"\n\
                 [[query.users]]\nname = \"ops\"\nrole = \"admin\"\npassword_hash = \"{hash}\""
            ),
            extra: "[inference]\nenabled = false",
            ..Sections::default()
        },
    )
    .await?;
    let events = 400i64;
    let records: Vec<(i32, Vec<u8>)> = (0..events)
        .map(|i| {
            let e = json!({"device_id": format!("pi-{}", i % 4), "timestamp": T0_MS + i * 100,
                           "metrics": {"cpu_percent": (i % 100) as f64}});
            (0, e.to_string().into_bytes())
        })
        .collect();
    produce(stack, &run.topic, &records)?;
    let mut pipeline = run.start(&[])?;
    let sql_of = |table: &str| format!("SELECT count(*) FROM {table} WHERE device_id = $1");
    let ready = wait_until(Duration::from_secs(120), "rows in both tiers", || async {
        let Ok(reader) = wire_client(port, "grafana").await else {
            return Ok(false);
        };
        let hot = wire_count(&reader, "SELECT count(*) FROM pg.device_metrics", &[]).await;
        let cold = wire_count(&reader, "SELECT count(*) FROM archive.telemetry_raw", &[]).await;
        Ok(matches!((hot, cold), (Ok(h), Ok(c)) if h == events && c == events))
    })
    .await;
    if let Err(e) = ready {
        bail!("{e}\n{}", run.log_text());
    }
    let reader = wire_client(port, "grafana").await?;
    let admin = wire_client(port, "ops").await?;
    admin
        .simple_query("CREATE VIEW busy AS SELECT device_id, value FROM device_metrics")
        .await?;
    let tables = [
        "device_metrics",
        "pg.device_metrics",
        "archive.telemetry_raw",
        "busy",
    ];
    for table in tables {
        let sql = sql_of(table);
        assert_eq!(wire_count(&reader, &sql, &[&"pi-1"]).await?, 100, "{table}");
        for attack in INJECTIONS {
            assert_eq!(
                wire_count(&reader, &sql, &[attack]).await?,
                0,
                "{table}: {attack}"
            );
        }
    }
    // Each comes back as sent.
    for attack in INJECTIONS {
        let row = reader
            .query_one("SELECT $1::text AS a, $2::text AS b", &[attack, &"it's $1"])
            .await?;
        assert_eq!(
            (row.get::<_, String>("a"), row.get::<_, String>("b")),
            (attack.to_string(), "it's $1".to_owned())
        );
    }
    // Typed parameters in the binary format.
    let from = chrono::DateTime::from_timestamp_millis(T0_MS + 200 * 100).unwrap_or_default();
    let sql = "SELECT count(*) FROM device_metrics WHERE time >= $1 AND value >= $2";
    assert_eq!(wire_count(&reader, sql, &[&from, &50.0f64]).await?, 100);
    let sql = "SELECT count(*) FROM device_metrics WHERE $1::bool";
    assert_eq!(wire_count(&reader, sql, &[&true]).await?, events);
    assert_eq!(wire_count(&reader, sql, &[&false]).await?, 0);
    let row = reader
        .query_one("SELECT $1::bytea AS b", &[&b"\x00'\\;".as_slice()])
        .await?;
    assert_eq!(row.get::<_, Vec<u8>>("b"), b"\x00'\\;");
    // Nothing was dropped: the view, the hot table and the archive are whole.
    assert_eq!(wire_count(&reader, &sql_of("busy"), &[&"pi-2"]).await?, 100);
    let direct = connect(&run.url).await?;
    assert_eq!(
        wire_count(&direct, "SELECT count(*) FROM device_metrics", &[]).await?,
        events
    );
    assert_eq!(
        wire_count(&reader, "SELECT count(*) FROM archive.telemetry_raw", &[]).await?,
        events
    );
    // The audit line has the statement with its `$n`, never the values.
    let log = run.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("primespark::audit") && l.contains("params=1")),
        "no audited parameters"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("primespark::audit") && l.contains("DROP TABLE")),
        "a parameter value reached the audit log"
    );
    assert!(pipeline.is_running());
    pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}
