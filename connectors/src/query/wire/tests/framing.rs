//! Malformed frontend messages, written raw to the socket: each gets PostgreSQL's
//! `FATAL 08P01` and a closed connection (before the frame check, pgwire's decoder panicked the
//! connection's task on these), the violation is counted, and other clients are served on.

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// One backend message: type byte and body.
async fn read_message(socket: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    socket.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    socket.read_exact(&mut body).await.ok()?;
    Some((head[0], body))
}

/// A typed frontend message.
fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

async fn send_startup(socket: &mut TcpStream) {
    socket
        .write_all(&super::startup_message(USER))
        .await
        .unwrap();
}

/// Reads up to an authentication request of `code` and returns its data.
async fn expect_auth(socket: &mut TcpStream, code: u32) -> Vec<u8> {
    loop {
        let (tag, body) = read_message(socket).await.expect("a message");
        assert_ne!(tag, b'E', "refused: {}", String::from_utf8_lossy(&body));
        if tag == b'R' && body[..4] == code.to_be_bytes() {
            return body[4..].to_vec();
        }
    }
}

/// A raw connection past SCRAM, at ReadyForQuery.
async fn authenticated(port: u16) -> TcpStream {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    send_startup(&mut socket).await;
    expect_auth(&mut socket, 10).await;
    let mut scram = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
    let mut first = b"SCRAM-SHA-256\0".to_vec();
    first.extend_from_slice(&(scram.message().len() as i32).to_be_bytes());
    first.extend_from_slice(scram.message());
    socket.write_all(&typed(b'p', &first)).await.unwrap();
    let server_first = expect_auth(&mut socket, 11).await;
    scram.update(&server_first).unwrap();
    socket
        .write_all(&typed(b'p', scram.message()))
        .await
        .unwrap();
    let server_final = expect_auth(&mut socket, 12).await;
    scram.finish(&server_final).unwrap();
    loop {
        let (tag, body) = read_message(&mut socket).await.expect("a message");
        assert_ne!(tag, b'E', "refused: {}", String::from_utf8_lossy(&body));
        if tag == b'Z' {
            return socket;
        }
    }
}

/// The SQLSTATE, severity and message of an ErrorResponse body.
fn error_fields(body: &[u8]) -> (String, String, String) {
    let (mut code, mut severity, mut message) = Default::default();
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = value,
            b'S' => severity = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, severity, message)
}

/// After `bytes`, the server answers `FATAL 08P01` naming `words`, then closes.
async fn refused_with(mut socket: TcpStream, bytes: &[u8], words: &str) {
    socket.write_all(bytes).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match read_message(&mut socket).await {
                Some((b'E', body)) => return Some(error_fields(&body)),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .expect("an answer within 10 s");
    let (code, severity, message) =
        answer.expect("an ErrorResponse before the connection closed, not a dropped connection");
    assert_eq!(
        (code.as_str(), severity.as_str()),
        ("08P01", "FATAL"),
        "{message}"
    );
    assert!(message.contains(words), "{message:?} should name {words:?}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut rest))
        .await
        .expect("closed within 10 s");
    assert!(
        closed.is_ok() && rest.is_empty(),
        "{closed:?}, {} bytes after",
        rest.len()
    );
}

fn violations(reason: &str) -> u64 {
    let mut registry = Registry::default();
    crate::metrics::register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let key = format!("primespark_wire_protocol_violations_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Unauthenticated: a SASLInitialResponse naming the mechanism and then stopping (pgwire read
/// its length field past the message and panicked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_sasl_response_is_refused_before_authentication() {
    let (port, _stop) = start(true).await;
    let before = violations("truncated");
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    send_startup(&mut socket).await;
    expect_auth(&mut socket, 10).await;
    refused_with(
        socket,
        &typed(b'p', b"SCRAM-SHA-256\0"),
        "insufficient data left in SASLInitialResponse message",
    )
    .await;
    assert!(violations("truncated") > before);
    // The endpoint serves on.
    let client = connect(port, PASSWORD).await.expect("a new client logs in");
    client.simple_query("SELECT 1").await.expect("and queries");
}

/// Authenticated: the fuzzer's Parse, claiming a parameter type it does not carry, followed by
/// a Sync whose bytes pgwire used to read as that type; and a Bind whose parameter length runs
/// past the message. An open session on another connection keeps answering throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_extended_query_messages_end_only_their_connection() {
    let (port, _stop) = start(true).await;
    let bystander = connect(port, PASSWORD).await.expect("login");
    let before = violations("truncated");

    let mut parse = b"\0SELECT $1\0".to_vec();
    parse.extend_from_slice(&1u16.to_be_bytes());
    let mut stream = typed(b'P', &parse);
    stream.extend_from_slice(&typed(b'S', b""));
    refused_with(
        authenticated(port).await,
        &stream,
        "insufficient data left in Parse message",
    )
    .await;

    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&0u16.to_be_bytes());
    bind.extend_from_slice(&1u16.to_be_bytes());
    bind.extend_from_slice(&1000i32.to_be_bytes());
    bind.extend_from_slice(b"42");
    refused_with(
        authenticated(port).await,
        &typed(b'B', &bind),
        "Bind message",
    )
    .await;

    // A Query with bytes after its terminator: pgwire would read them as the next message.
    refused_with(
        authenticated(port).await,
        &typed(b'Q', b"SELECT 1\0Q\0\0\0\x0dSELECT 2\0"),
        "bytes after the last field",
    )
    .await;

    assert!(violations("truncated") >= before + 2);
    assert!(violations("trailing") >= 1);
    let rows = bystander
        .simple_query("SELECT 1 AS one")
        .await
        .expect("served on");
    assert_eq!(simple_rows(&rows), vec![vec![Some("1".to_owned())]]);
    // And a well-formed raw session is not refused: the check passes what clients send.
    let mut ok = authenticated(port).await;
    ok.write_all(&typed(b'Q', b"SELECT 1 AS one\0"))
        .await
        .unwrap();
    loop {
        let (tag, body) = read_message(&mut ok).await.expect("an answer");
        assert_ne!(tag, b'E', "{:?}", error_fields(&body));
        if tag == b'Z' {
            break;
        }
    }
}

/// A declared length beyond the limit is refused from the header alone, before the server
/// buffers the body: an unauthenticated client cannot make it hold 1 GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_length_is_refused_from_the_header() {
    let (port, _stop) = start(true).await;
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    send_startup(&mut socket).await;
    expect_auth(&mut socket, 10).await;
    refused_with(
        socket,
        b"p\x40\x00\x00\x00",
        "invalid password message length",
    )
    .await;
}
