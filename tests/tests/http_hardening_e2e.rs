//! The HTTP door under slow and hostile clients, on a running pipeline with an API key:
//! - a flood of clients that send half a request from one address holds at most its per-address
//!   share of connections (the rest are closed on arrival), a normal query from another address
//!   answers meanwhile, and the held ones are closed at the header deadline;
//! - a kept-alive connection with no new request is closed at the same deadline;
//! - `/metrics` needs the key, `/readyz` without it says only ready or not;
//! - wrong keys from one address are limited (429 before the key is looked at), another
//!   address is not.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use primespark_connectors::query::sha256_hex;
use primespark_tests::{wait_until, Sections, TelemetryRun};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const TOKEN: &str = "http-hardening-token-6a0f2c9e4b7d1a3c";

/// A connection to `addr` from `source` (any 127.0.0.0/8 address works on Linux loopback).
async fn connect_from(source: &str, addr: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse()?)?;
    Ok(socket.connect(addr).await?)
}

/// One request on a fresh connection from `source`; status and body.
async fn request(
    source: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String)> {
    let mut s = connect_from(source, addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Whether the server closed `s` within `within` (a read returns end of file or an error).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_hostile_http_clients_hold_nothing() -> Result<()> {
    let run = TelemetryRun::new(
        "hhard",
        1,
        Sections {
            query: &format!(
                "http_header_timeout = \"5s\"\ntimeout = \"3s\"\nhttp_max_connections_per_address = 8\n\
                 login_failures_per_minute = 5\nrate_limit_per_second = 1000\nrate_limit_burst = 1000\n\
                 [[query.api_keys]]\nname = \"ops\"\nrole = \"reader\"\nsha256 = \"{}\"",
                sha256_hex(TOKEN)
            ),
            extra: "[inference]\nenabled = false",
            ..Sections::default()
        },
    )
    .await?;
    let addr: SocketAddr = run.http.parse()?;
    let pipeline = run.start(&[])?;
    let sql = r#"{"sql": "SELECT 1 AS one"}"#;
    let up = wait_until(Duration::from_secs(90), "the SQL endpoint", || async {
        Ok(matches!(
            request("127.0.0.1", addr, "POST", "/v1/sql", Some(TOKEN), sql).await,
            Ok((200, _))
        ))
    })
    .await;
    if up.is_err() {
        let _ = pipeline.kill();
        bail!("no SQL endpoint:\n{}", run.log_text());
    }

    // A flood of half-requests from 127.0.0.2.
    let mut flood = Vec::new();
    for _ in 0..20 {
        let mut s = connect_from("127.0.0.2", addr).await?;
        s.write_all(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\n").await?;
        flood.push(s);
    }
    // Those over the address's share are closed on arrival; its share stays open (checked
    // all at once, well inside the 5 s header deadline).
    let checks = flood.into_iter().map(|mut s| async move {
        let closed = closed_within(&mut s, Duration::from_millis(500)).await;
        (s, closed)
    });
    let (closed, mut held): (Vec<_>, Vec<_>) = futures::future::join_all(checks)
        .await
        .into_iter()
        .partition(|(_, closed)| *closed);
    assert_eq!(held.len(), 8, "held {} of 20", held.len());
    assert_eq!(closed.len(), 12);
    // Meanwhile another address is served, and the flood's share is still held.
    let (status, body) = request("127.0.0.1", addr, "POST", "/v1/sql", Some(TOKEN), sql).await?;
    assert_eq!(status, 200, "{body}");
    assert!(!closed_within(&mut held[0].0, Duration::from_millis(10)).await);
    let mut held: Vec<TcpStream> = held.drain(..).map(|(s, _)| s).collect();
    // At the header deadline the server closes the half-requests.
    for s in &mut held {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "a half-request was held past the header deadline"
        );
    }
    // And the address may connect again.
    let (status, _) = request("127.0.0.2", addr, "POST", "/v1/sql", Some(TOKEN), sql).await?;
    assert_eq!(status, 200);

    // A body trickled in is cut off at the request deadline (timeout 3 s + header 5 s).
    let mut trickle = connect_from("127.0.0.1", addr).await?;
    trickle
        .write_all(
            format!(
                "POST /v1/sql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await?;
    let mut answer = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 512];
        loop {
            // One byte every second keeps it from ever being idle.
            let _ = trickle.write_all(b" ").await;
            match tokio::time::timeout(Duration::from_secs(1), trickle.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if answer.windows(3).any(|w| w == b"408") {
                return;
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "a trickled body was held for 30 s");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A kept-alive connection that sends nothing more is closed at the deadline too.
    let mut idle = connect_from("127.0.0.1", addr).await?;
    idle.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut first = [0u8; 256];
    let n = idle.read(&mut first).await?;
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(&mut idle, Duration::from_secs(10)).await,
        "an idle kept-alive connection stayed open"
    );

    // /metrics needs the key; /readyz without it tells only ready or not.
    let (status, _) = request("127.0.0.1", addr, "GET", "/metrics", None, "").await?;
    assert_eq!(status, 401);
    let (status, metrics) = request("127.0.0.1", addr, "GET", "/metrics", Some(TOKEN), "").await?;
    assert_eq!(status, 200);
    let (status, ready) = request("127.0.0.1", addr, "GET", "/readyz", None, "").await?;
    assert!(status == 200 || status == 503, "{status}");
    assert!(
        !ready.contains("sources"),
        "/readyz told a stranger: {ready}"
    );
    let (_, detailed) = request("127.0.0.1", addr, "GET", "/readyz", Some(TOKEN), "").await?;
    assert!(detailed.contains("\"sources\""), "{detailed}");

    // Wrong keys from 127.0.0.3: five refused as unknown, then the address is limited even
    // with the right key; 127.0.0.1 is not.
    for _ in 0..5 {
        let (status, _) = request("127.0.0.3", addr, "POST", "/v1/sql", Some("guess"), sql).await?;
        assert_eq!(status, 401);
    }
    let (status, _) = request("127.0.0.3", addr, "POST", "/v1/sql", Some(TOKEN), sql).await?;
    assert_eq!(status, 429, "the guessing address was not limited");
    let (status, _) = request("127.0.0.1", addr, "POST", "/v1/sql", Some(TOKEN), sql).await?;
    assert_eq!(status, 200);

    let (_, metrics_after) = request("127.0.0.1", addr, "GET", "/metrics", Some(TOKEN), "").await?;
    for reason in ["too_many_from_address", "too_many_failures"] {
        assert!(
            metrics_after.lines().any(|l| l.starts_with(&format!(
                "primespark_http_refused_total{{reason=\"{reason}\"}}"
            )) && !l.ends_with(" 0")),
            "{reason} not counted:\n{metrics}"
        );
    }
    pipeline.terminate(Duration::from_secs(60))?;
    Ok(())
}
