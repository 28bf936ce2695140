//! The wire endpoint's logins, done like PostgreSQL's, checked with PostgreSQL's own parts:
//! - a verifier from `primespark hash-secret --password` is one PostgreSQL itself accepts as a
//!   role's stored password (and PostgreSQL's own verifiers verify here);
//! - on a running pipeline with `require_tls`, psql with `sslmode=disable` is refused before
//!   any password is asked, psql over TLS logs in with SCRAM-SHA-256, an unknown user fails
//!   like a wrong password, and every refusal is counted on `/metrics`.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Result};
use primespark_connectors::query::pgwire::ScramVerifier;
use primespark_connectors::query::{hash_password, sha256_hex};
use primespark_tests::{
    connect, free_port, pipeline_command, self_signed_cert, stack, unique, wait_until, Sections,
    TelemetryRun,
};

const PASSWORD: &str = "wire-auth-e2e-pass-4c1d";
const TOKEN: &str = "wire-auth-e2e-token-0b9e7a51c3d2f4e6";

fn psql() -> String {
    std::env::var("PRIMESPARK_STACK_PSQL")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/psql".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_verifiers_are_postgresqls_own() -> Result<()> {
    let stack = stack();
    let admin = connect(&stack.postgres_url).await?;
    let role = unique("scram");
    // The CLI's verifier, stored as a role's password: PostgreSQL takes a SCRAM verifier as
    // is, and its scram-sha-256 host authentication then checks our StoredKey and ServerKey.
    let mut hashed = pipeline_command()?
        .arg("hash-secret")
        .arg("--password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    if let Some(stdin) = hashed.stdin.as_mut() {
        use std::io::Write;
        writeln!(stdin, "{PASSWORD}")?;
    }
    let out = hashed.wait_with_output()?;
    assert!(out.status.success());
    let verifier = String::from_utf8(out.stdout)?.trim().to_owned();
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{verifier}'"))
        .await?;
    let stored: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await?
        .get(0);
    assert_eq!(stored, verifier, "PostgreSQL stored it unchanged");
    let (host_port, db) = stack
        .postgres_url
        .rsplit_once('@')
        .map(|(_, rest)| rest.split_once('/').unwrap_or((rest, "postgres")))
        .unwrap_or(("127.0.0.1:5432", "postgres"));
    let url = format!("postgres://{role}:{PASSWORD}@{host_port}/{db}");
    let as_role = connect(&url).await;
    let wrong = connect(&format!("postgres://{role}:nope@{host_port}/{db}")).await;
    // PostgreSQL's own verifier of another password verifies here.
    admin
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD 'pg-made-9f1e'"
        ))
        .await?;
    let theirs: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await?
        .get(0);
    admin.batch_execute(&format!("DROP ROLE {role}")).await?;
    let as_role = as_role?;
    as_role.simple_query("SELECT 1").await?;
    assert!(
        wrong.is_err(),
        "a wrong password logged in: is host auth scram?"
    );
    let parsed = ScramVerifier::parse(&theirs)?;
    assert!(parsed.verifies("pg-made-9f1e"));
    assert!(!parsed.verifies(PASSWORD));
    Ok(())
}

async fn run_psql(port: u16, user: &str, sslmode: &str, root: Option<&Path>) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(psql());
    cmd.env_clear()
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLMODE", sslmode)
        .env("PGCONNECT_TIMEOUT", "10");
    if let Some(root) = root {
        cmd.env("PGSSLROOTCERT", root);
    }
    let out = cmd
        .args([
            "-X",
            "-w",
            "-A",
            "-t",
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
        ])
        .args(["-U", user, "-d", "primespark", "-c", "SELECT 41 + 1"])
        .output();
    Ok(tokio::time::timeout(Duration::from_secs(30), out).await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_with_scram_over_tls_and_plain_text_is_refused() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let (cert, key) = self_signed_cert(certs.path())?;
    let port = free_port();
    let hash = hash_password(PASSWORD)?;
    let run = TelemetryRun::new(
        "wauth",
        1,
        Sections {
            query: &format!(
                "pg_addr = \"127.0.0.1:{port}\"\nrequire_tls = true\n\
                 tls_cert = \"{}\"\ntls_key = \"{}\"\nlogin_failures_per_minute = 100\n\
                 [[query.api_keys]]\nname = \"ops\"\nrole = \"reader\"\nsha256 = \"{}\"\n\
                 [[query.users]]\nname = \"grafana\"\nrole = \"reader\"\npassword_hash = \"{hash}\"",
                cert.display(),
                key.display(),
                sha256_hex(TOKEN),
            ),
            extra: "[inference]\nenabled = false",
            ..Sections::default()
        },
    )
    .await?;
    let pipeline = run.start(&[])?;
    let up = wait_until(Duration::from_secs(90), "the wire endpoint", || async {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    })
    .await;
    if up.is_err() {
        let _ = pipeline.kill();
        bail!("no wire endpoint:\n{}", run.log_text());
    }

    // verify-full: TLS with the certificate checked against the test CA (the self-signed cert).
    let ok = run_psql(port, "grafana", "verify-full", Some(&cert)).await?;
    assert!(
        ok.status.success(),
        "psql over TLS failed: {}\n{}",
        String::from_utf8_lossy(&ok.stderr),
        run.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "42");

    let plain = run_psql(port, "grafana", "disable", None).await?;
    let said = String::from_utf8_lossy(&plain.stderr).to_string();
    assert!(!plain.status.success(), "plain text was let in");
    assert!(said.contains("TLS connections only"), "psql said: {said}");

    let unknown = run_psql(port, "mallory", "require", None).await?;
    let said = String::from_utf8_lossy(&unknown.stderr).to_string();
    assert!(!unknown.status.success());
    assert!(
        said.contains("password authentication failed for user \"mallory\""),
        "psql said: {said}"
    );

    // The server logged the SCRAM login; /metrics counted both refusals.
    let log = run.log_text();
    assert!(
        log.lines().any(|l| l.contains("wire client authenticated")
            && l.contains("scram-sha-256")
            && l.contains("tls=true")),
        "no SCRAM login in the log:\n{log}"
    );
    // The HTTP door speaks TLS too (one certificate for both).
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&cert)
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!(
            "https://localhost:{}/metrics",
            run.http.rsplit(':').next().unwrap_or_default()
        ))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = out.stdout;
    let metrics = String::from_utf8_lossy(&body).to_string();
    for reason in ["tls_required", "bad_password"] {
        assert!(
            metrics.lines().any(|l| l.starts_with(&format!(
                "primespark_wire_logins_refused_total{{reason=\"{reason}\"}}"
            )) && !l.ends_with(" 0")),
            "{reason} not counted:\n{metrics}"
        );
    }
    pipeline.terminate(Duration::from_secs(60))?;
    Ok(())
}
