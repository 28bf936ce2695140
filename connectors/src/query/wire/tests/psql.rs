//! psql itself against the endpoint, in plain text and over TLS (skipped where psql or openssl
//! is not installed).

use std::path::Path;

use super::*;

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// psql against the endpoint on `port` as [`USER`] with `password` and `sslmode` (`None`:
/// psql's default), running `sql`; its output.
async fn psql(port: u16, password: &str, sslmode: Option<&str>, sql: &str) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(PSQL);
    cmd.env_clear()
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
    if let Some(mode) = sslmode {
        cmd.env("PGSSLMODE", mode);
    }
    let output = cmd
        .args([
            "-X",
            "-w",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(["-U", USER, "-d", "primespark", "-c", sql])
        .output();
    tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("psql finished")
        .expect("psql ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_over_tls() {
    let psql_path = Path::new(PSQL);
    if !psql_path.exists() || !Path::new("/usr/bin/openssl").exists() {
        eprintln!("skipping: psql or openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = tokio::process::Command::new("/usr/bin/openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .await
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let tls = tls_acceptor(&cert, &key).unwrap();
    assert!(matches!(tls_acceptor(&key, &key), Err(PgWireError::Tls(_))));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_listener(
        listener,
        Arc::new(fake(true)),
        Some(tls),
        WireOptions {
            require_tls: true,
            ..WireOptions::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    // sslmode=require fails unless the server speaks TLS.
    let output = psql(port, PASSWORD, Some("require"), "SELECT count(*) FROM t").await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "3");

    // The endpoint requires TLS: sslmode=disable is refused before any password is asked.
    let output = psql(port, PASSWORD, Some("disable"), "SELECT 1").await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "plain text was let in");
    assert!(
        stderr.contains("TLS connections only"),
        "psql said: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_and_a_wrong_password_fails() {
    let psql_path = Path::new(PSQL);
    if !psql_path.exists() {
        eprintln!("skipping: {} is not installed", psql_path.display());
        return;
    }
    let (port, _stop) = start(true).await;
    let run = |password: &'static str, sql: &'static str| psql(port, password, None, sql);
    let ok = run(PASSWORD, "SELECT 1").await;
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "psql failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "1");

    let ok = run(
        PASSWORD,
        "SET x = 1; SELECT name, amount FROM t ORDER BY id",
    )
    .await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "SET\nplain|123.45\nit's|-0.50\nback\\slash|"
    );

    let refused = run("wrong", "SELECT 1").await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("password authentication failed"),
        "psql said: {stderr}"
    );
}
