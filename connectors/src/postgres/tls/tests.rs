//! The connector against a local TLS server that answers PostgreSQL's SSLRequest: each mode
//! accepts exactly the certificates it should.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// `ca.pem` and a server certificate it signed, for DNS name `localhost` only (so
/// `127.0.0.1` does not match it).
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca = dir.join(format!("{name}-ca.pem"));
    let ca_key = dir.join(format!("{name}-ca.key"));
    let cert = dir.join(format!("{name}-server.pem"));
    let key = dir.join(format!("{name}-server.key"));
    let csr = dir.join(format!("{name}-server.csr"));
    let ext = dir.join(format!("{name}-ext.cnf"));
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &PathBuf| p.to_str().unwrap().to_owned();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&ca),
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    (ca, cert, key)
}

/// A server that answers one SSLRequest with `S` and does a TLS handshake with `cert`; it
/// reports whether the handshake completed. With `cert` None it answers `N` (no TLS) and
/// reports whether a plain startup message followed.
async fn one_server(cert: Option<(PathBuf, PathBuf)>) -> (u16, tokio::task::JoinHandle<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 8];
        socket.read_exact(&mut request).await.unwrap();
        assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47], "an SSLRequest");
        match cert {
            Some((cert, key)) => {
                socket.write_all(b"S").await.unwrap();
                let acceptor = crate::query::tls::acceptor(&cert, &key, &[]).unwrap();
                acceptor.accept(socket).await.is_ok()
            }
            None => {
                socket.write_all(b"N").await.unwrap();
                let mut len = [0u8; 4];
                socket.read_exact(&mut len).await.is_ok()
            }
        }
    });
    (port, task)
}

/// Connects with `params` added to a URL for `host`; the error text, if the connection
/// failed before the server's (absent) startup answer.
async fn attempt(host: &str, port: u16, params: &str) -> String {
    let url = format!("postgres://u:p@{host}:{port}/db?connect_timeout=5&{params}");
    let target = PgTarget::parse(&url).unwrap();
    match target.connect().await {
        Ok(_) => "connected".into(),
        Err(e) => error_chain(&e),
    }
}

#[tokio::test]
async fn each_sslmode_checks_what_libpq_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_ca(dir.path(), "good");
    let (other_ca, _, _) = make_ca(dir.path(), "other");
    let ca = ca.to_str().unwrap();
    let other_ca = other_ca.to_str().unwrap();
    let cases = [
        // (host, params, handshake should complete)
        (
            "localhost",
            format!("sslmode=verify-full&sslrootcert={ca}"),
            true,
        ),
        (
            "127.0.0.1",
            format!("sslmode=verify-full&sslrootcert={ca}"),
            false,
        ),
        (
            "127.0.0.1",
            format!("sslmode=verify-ca&sslrootcert={ca}"),
            true,
        ),
        (
            "localhost",
            format!("sslmode=verify-full&sslrootcert={other_ca}"),
            false,
        ),
        (
            "localhost",
            format!("sslmode=verify-ca&sslrootcert={other_ca}"),
            false,
        ),
        ("localhost", "sslmode=require".to_owned(), true),
        (
            "localhost",
            format!("sslmode=require&sslrootcert={other_ca}"),
            false,
        ),
        ("localhost", "sslmode=prefer".to_owned(), true),
    ];
    for (host, params, ok) in cases {
        let (port, server) = one_server(Some((cert.clone(), key.clone()))).await;
        let error = attempt(host, port, &params).await;
        let handshake = server.await.unwrap();
        assert_eq!(
            handshake, ok,
            "{host} {params}: handshake; client said {error}"
        );
        if !ok {
            assert!(
                error.contains("invalid peer certificate"),
                "{host} {params}: {error}"
            );
        }
    }
}

#[tokio::test]
async fn prefer_falls_back_to_plain_text_and_require_does_not() {
    let (port, server) = one_server(None).await;
    attempt("localhost", port, "sslmode=prefer").await;
    assert!(
        server.await.unwrap(),
        "prefer sent a startup message in plain text"
    );
    let (port, server) = one_server(None).await;
    let error = attempt("localhost", port, "sslmode=require").await;
    assert!(
        !server.await.unwrap(),
        "require sent nothing after the refusal"
    );
    assert!(error.contains("TLS") || error.contains("tls"), "{error}");
}

#[test]
fn tls_keys_come_off_both_forms_and_the_rest_is_kept_as_written() {
    let (rest, keys) = split_tls_keys(
        "postgres://u:p%40ss@h:5432/db?application_name=a%20b&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem",
    );
    assert_eq!(rest, "postgres://u:p%40ss@h:5432/db?application_name=a%20b");
    assert_eq!(
        keys,
        vec![
            ("sslmode".to_owned(), "verify-full".to_owned()),
            ("sslrootcert".to_owned(), "/tmp/ca.pem".to_owned())
        ]
    );
    let (rest, keys) = split_tls_keys(
        "host=h password='a \\' b' sslmode = require sslrootcert='/a b/ca.pem' dbname=d",
    );
    assert_eq!(rest, "host=h password='a \\' b' dbname=d");
    assert_eq!(
        keys,
        vec![
            ("sslmode".to_owned(), "require".to_owned()),
            ("sslrootcert".to_owned(), "/a b/ca.pem".to_owned())
        ]
    );
    let (rest, keys) = split_tls_keys("postgres://u@h/db");
    assert_eq!((rest.as_str(), keys.len()), ("postgres://u@h/db", 0));
}

#[test]
fn settings_that_cannot_work_are_refused_with_the_key() {
    let err = |url: &str| PgTarget::parse(url).unwrap_err().to_string();
    assert!(err("postgres://u@h/d?sslmode=verify-full").contains("needs sslrootcert"));
    assert!(err("postgres://u@h/d?sslmode=verify-ca").contains("needs sslrootcert"));
    assert!(err("postgres://u@h/d?sslmode=allow-ish").contains("not one of"));
    assert!(err("postgres://u@h/d?sslmode=disable&sslrootcert=/x").contains("sslmode=disable"));
    assert!(err("postgres://u@h/d?sslcert=/x").contains("sslkey go together"));
    let missing = err("postgres://u@h/d?sslmode=verify-full&sslrootcert=/no/such/ca.pem");
    assert!(
        missing.starts_with("sslrootcert /no/such/ca.pem"),
        "{missing}"
    );
    // check-config reads no file: the same string passes `check`, the other errors do not.
    assert!(
        PgTarget::check("postgres://u@h/d?sslmode=verify-full&sslrootcert=/no/such/ca.pem").is_ok()
    );
    assert!(PgTarget::check("postgres://u@h/d?sslmode=verify-full").is_err());
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = err(&format!(
        "postgres://u@h/d?sslmode=verify-full&sslrootcert={}",
        empty.display()
    ));
    assert!(e.contains("no PEM certificate"), "{e}");
    assert!(err("postgres://u@h:notaport/d").contains("not a PostgreSQL connection string"));
    // A good string parses, and tokio-postgres gets a mode it knows.
    let t = PgTarget::parse("postgres://u@h/d?sslmode=disable").unwrap();
    assert_eq!(t.tls.mode(), SslMode::Disable);
    assert_eq!(t.config.get_ssl_mode(), PgSslMode::Disable);
    let t = PgTarget::parse("postgres://u@h/d").unwrap();
    assert_eq!(t.tls.mode(), SslMode::Prefer);
}
