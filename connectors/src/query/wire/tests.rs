//! The endpoint end to end: tokio-postgres against a fake backend (psql in `tests/psql.rs`,
//! parameter binding in `tests/binding.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, Int64Array,
    StringArray, TimestampMicrosecondArray, TimestampNanosecondArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, Type as PgType};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::backend::describe_by_probe;
use super::numeric::numeric_from_binary;
use super::*;

mod binding;
mod framing;

/// A protocol 3.0 StartupMessage for `user` on database `primespark`.
fn startup_message(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", "primespark")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    message
}
mod psql;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret";

/// The query service in miniature: one table, DataFusion's own planner, and two ways to fail.
struct Fake {
    ctx: SessionContext,
    /// Plan Describe with DataFusion (as the real service should) or use the default probe.
    plan_describe: bool,
    /// Every statement run, with its parameters.
    executed: Mutex<Vec<(String, Vec<ScalarValue>)>>,
}

fn df_error(e: DataFusionError) -> BackendError {
    let sqlstate = match e.find_root() {
        DataFusionError::SQL(..) => "42601",
        DataFusionError::Plan(_) | DataFusionError::SchemaError(..) => "42P01",
        _ => "XX000",
    };
    BackendError::new(sqlstate, e.to_string())
}

fn forbidden(sql: &str) -> Result<(), BackendError> {
    if sql.contains("secret_table") {
        return Err(BackendError::new(
            "42501",
            "permission denied for table secret_table",
        ));
    }
    Ok(())
}

#[async_trait]
impl SqlBackend for Fake {
    fn credential(&self, user: &str) -> Option<ScramVerifier> {
        static VERIFIER: std::sync::OnceLock<ScramVerifier> = std::sync::OnceLock::new();
        (user == USER).then(|| {
            VERIFIER
                .get_or_init(|| ScramVerifier::from_password(PASSWORD, DEFAULT_ITERATIONS))
                .clone()
        })
    }

    async fn execute(
        &self,
        _user: &str,
        sql: &str,
        params: Vec<ScalarValue>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), BackendError> {
        self.executed
            .lock()
            .unwrap()
            .push((sql.to_owned(), params.clone()));
        forbidden(sql)?;
        if sql.contains("pg_sleep") {
            let _running = sql.contains("hangup").then(Sleeping::enter);
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        // Planned with its placeholders, the values bound into the plan.
        let plan = self
            .ctx
            .state()
            .create_logical_plan(sql)
            .await
            .map_err(df_error)?;
        let plan = if params.is_empty() {
            plan
        } else {
            plan.with_param_values(params).map_err(df_error)?
        };
        let df = self
            .ctx
            .execute_logical_plan(plan)
            .await
            .map_err(df_error)?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await.map_err(df_error)?;
        Ok((schema, batches))
    }

    async fn describe(&self, user: &str, sql: &str) -> Result<Description, BackendError> {
        if !self.plan_describe {
            return describe_by_probe(self, user, sql).await;
        }
        forbidden(sql)?;
        if sql.contains("pg_sleep") {
            return describe_by_probe(self, user, "SELECT 1 AS slept").await;
        }
        let plan = self
            .ctx
            .state()
            .create_logical_plan(sql)
            .await
            .map_err(df_error)?;
        Description::from_plan(&plan)
    }
}

fn micros(s: &str) -> i64 {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .unwrap()
        .and_utc()
        .timestamp_micros()
}

fn fake(plan_describe: bool) -> Fake {
    let ts = [
        "2024-01-01 00:00:00",
        "2024-06-01 12:30:00.5",
        "2024-12-31 23:59:59.999999",
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("score", DataType::Float64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("ok", DataType::Boolean, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
        Field::new(
            "tstz",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            true,
        ),
        Field::new("small", DataType::Int32, true),
        Field::new("d", DataType::Date32, true),
        Field::new("amount", DataType::Decimal128(10, 2), true),
        Field::new("big", DataType::UInt64, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1, 2, 3])),
        Arc::new(Float64Array::from(vec![Some(1.5), Some(-2.25), None])),
        Arc::new(StringArray::from(vec![
            Some("plain"),
            Some("it's"),
            Some("back\\slash"),
        ])),
        Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
        Arc::new(TimestampMicrosecondArray::from(
            ts.iter().map(|t| micros(t)).collect::<Vec<_>>(),
        )),
        Arc::new(
            TimestampNanosecondArray::from(ts.iter().map(|t| micros(t) * 1000).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(Int32Array::from(vec![10, 20, 30])),
        Arc::new(Date32Array::from(vec![19_723, 19_875, 20_088])),
        Arc::new(
            Decimal128Array::from(vec![Some(12_345), Some(-50), None])
                .with_precision_and_scale(10, 2)
                .unwrap(),
        ),
        Arc::new(UInt64Array::from(vec![u64::MAX, 0, 1])),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let ctx = SessionContext::new();
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    ctx.register_table("t", Arc::new(table)).unwrap();
    Fake {
        ctx,
        plan_describe,
        executed: Mutex::new(Vec::new()),
    }
}

/// Serves a fake backend on a free loopback port; dropping the sender stops it.
async fn start(plan_describe: bool) -> (u16, oneshot::Sender<()>) {
    start_backend(Arc::new(fake(plan_describe))).await
}

/// Serves `backend` on a free loopback port; dropping the sender stops it.
async fn start_backend(backend: Arc<dyn SqlBackend>) -> (u16, oneshot::Sender<()>) {
    start_backend_with(backend, WireOptions::default()).await
}

/// [`start_backend`] with `options`.
async fn start_backend_with(
    backend: Arc<dyn SqlBackend>,
    options: WireOptions,
) -> (u16, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_listener(
        listener,
        backend,
        None,
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    (port, stop)
}

async fn connect(port: u16, password: &str) -> Result<Client, tokio_postgres::Error> {
    connect_as(port, USER, password).await
}

fn simple_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn date(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

fn naive(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap()
}

/// numeric in binary, read through the module's own decoder.
#[derive(Debug, PartialEq)]
struct Num(String);

impl<'a> FromSql<'a> for Num {
    fn from_sql(
        _ty: &PgType,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        numeric_from_binary(raw).map(Num)
    }

    fn accepts(ty: &PgType) -> bool {
        *ty == PgType::NUMERIC
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_query_returns_typed_values_with_bind_parameters() {
    let (port, _stop) = start(true).await;
    let client = connect(port, PASSWORD).await.unwrap();

    let rows = client
        .query(
            "SELECT id, score, name, ok, ts, tstz, small, d, amount, big FROM t \
             WHERE id >= $1 ORDER BY id",
            &[&2i64],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let r = &rows[0];
    assert_eq!(r.get::<_, i64>("id"), 2);
    assert_eq!(r.get::<_, Option<f64>>("score"), Some(-2.25));
    assert_eq!(r.get::<_, String>("name"), "it's");
    assert_eq!(r.get::<_, Option<bool>>("ok"), Some(false));
    assert_eq!(
        r.get::<_, NaiveDateTime>("ts"),
        naive("2024-06-01 12:30:00.5")
    );
    assert_eq!(
        r.get::<_, DateTime<Utc>>("tstz"),
        naive("2024-06-01 12:30:00.5").and_utc()
    );
    assert_eq!(r.get::<_, i32>("small"), 20);
    assert_eq!(r.get::<_, NaiveDate>("d"), date("2024-06-01"));
    assert_eq!(r.get::<_, Num>("amount"), Num("-0.50".to_owned()));
    assert_eq!(r.get::<_, Num>("big"), Num("0".to_owned()));
    let r = &rows[1];
    assert_eq!(r.get::<_, Option<f64>>("score"), None);
    assert_eq!(r.get::<_, Option<bool>>("ok"), None);
    assert_eq!(r.get::<_, Option<Num>>("amount"), None);
    assert_eq!(
        r.get::<_, NaiveDateTime>("ts"),
        naive("2024-12-31 23:59:59.999999")
    );

    // Parameters of every common type, compared with the columns they meet.
    let ids = |rows: Vec<tokio_postgres::Row>| -> Vec<i64> {
        rows.iter().map(|r| r.get::<_, i64>(0)).collect()
    };
    let q = |sql: &'static str| sql;
    for (sql, expected) in [
        (q("SELECT id FROM t WHERE name = $1 ORDER BY id"), vec![2]),
        (
            q("SELECT id FROM t WHERE name <> $1 ORDER BY id"),
            vec![1, 3],
        ),
    ] {
        assert_eq!(ids(client.query(sql, &[&"it's"]).await.unwrap()), expected);
    }
    let by_name = "SELECT id FROM t WHERE name = $1";
    assert_eq!(
        ids(client.query(by_name, &[&"back\\slash"]).await.unwrap()),
        [3]
    );
    let injection = "x' OR '1'='1";
    assert!(client
        .query(by_name, &[&injection])
        .await
        .unwrap()
        .is_empty());
    let injection = "\\' OR 1=1 --";
    assert!(client
        .query(by_name, &[&injection])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        ids(client
            .query("SELECT id FROM t WHERE ok = $1", &[&true])
            .await
            .unwrap()),
        [1]
    );
    assert_eq!(
        ids(client
            .query("SELECT id FROM t WHERE score > $1 ORDER BY id", &[&0.0f64])
            .await
            .unwrap()),
        [1]
    );
    assert_eq!(
        ids(client
            .query("SELECT id FROM t WHERE small = $1", &[&30i32])
            .await
            .unwrap()),
        [3]
    );
    assert_eq!(
        ids(client
            .query(
                "SELECT id FROM t WHERE ts >= $1 ORDER BY id",
                &[&naive("2024-06-01 12:30:00.5")]
            )
            .await
            .unwrap()),
        [2, 3]
    );
    assert_eq!(
        ids(client
            .query(
                "SELECT id FROM t WHERE tstz > $1 ORDER BY id",
                &[&naive("2024-06-01 12:30:00.5").and_utc()]
            )
            .await
            .unwrap()),
        [3]
    );
    assert_eq!(
        ids(client
            .query("SELECT id FROM t WHERE d = $1", &[&date("2024-12-31")])
            .await
            .unwrap()),
        [3]
    );
    // A NULL parameter matches nothing, like SQL's NULL.
    assert!(client
        .query(by_name, &[&None::<&str>])
        .await
        .unwrap()
        .is_empty());

    // Prepared once, run twice; `$n` in a string or comment is not a parameter.
    let stmt = client
        .prepare("SELECT '$1' AS lit, id /* $2 */ FROM t WHERE id = $1")
        .await
        .unwrap();
    assert_eq!(stmt.params(), &[PgType::INT8]);
    assert_eq!(stmt.columns()[0].type_(), &PgType::TEXT);
    for id in [1i64, 3] {
        let row = client.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, String>("lit"), "$1");
        assert_eq!(row.get::<_, i64>("id"), id);
    }
    // Types the client declares are kept.
    let rows = client
        .query_typed(
            "SELECT id FROM t WHERE id < $1 ORDER BY id",
            &[(&"3", PgType::TEXT)],
        )
        .await;
    // DataFusion compares an int column with a string literal by casting it.
    assert_eq!(ids(rows.unwrap()), [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_and_session_statements() {
    let (port, _stop) = start(true).await;
    let client = connect(port, PASSWORD).await.unwrap();

    let rows = simple_rows(
        &client
            .simple_query("SELECT id, score, name, ok, ts, tstz, d, amount, big FROM t ORDER BY id")
            .await
            .unwrap(),
    );
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        rows[0],
        vec![
            some("1"),
            some("1.5"),
            some("plain"),
            some("t"),
            some("2024-01-01 00:00:00"),
            some("2024-01-01 00:00:00+00"),
            some("2024-01-01"),
            some("123.45"),
            some("18446744073709551615"),
        ]
    );
    assert_eq!(rows[1][4], some("2024-06-01 12:30:00.5"));
    assert_eq!(rows[2][1], None);
    assert_eq!(rows[2][2], some("back\\slash"));

    // What drivers and dashboards send around their queries.
    for setup in [
        "SET application_name = 'grafana'",
        "SET TIME ZONE 'UTC'",
        "set extra_float_digits = 3",
        ";",
        "-- ping",
        "/* nothing */ ;;",
        "BEGIN",
        "COMMIT",
        "DISCARD ALL",
        "RESET ALL",
    ] {
        client
            .simple_query(setup)
            .await
            .unwrap_or_else(|e| panic!("{setup}: {e}"));
    }
    client.batch_execute("SET a = 1; SET b = 2").await.unwrap();

    let one = |messages: Vec<SimpleQueryMessage>| simple_rows(&messages)[0][0].clone();
    assert_eq!(
        one(client.simple_query("SHOW server_version").await.unwrap()),
        some(SERVER_VERSION)
    );
    assert_eq!(
        one(client.simple_query("show TimeZone").await.unwrap()),
        some(TIME_ZONE)
    );
    assert_eq!(
        one(client
            .simple_query("SHOW transaction isolation level")
            .await
            .unwrap()),
        some("read committed")
    );
    assert!(one(client.simple_query("SELECT version()").await.unwrap())
        .unwrap()
        .starts_with("PostgreSQL 16.6"));
    assert_eq!(
        one(client
            .simple_query("select current_setting('server_version_num') as v")
            .await
            .unwrap()),
        some(SERVER_VERSION_NUM)
    );
    // Grafana's version probe: current_setting is resolved, the rest runs in DataFusion.
    assert_eq!(
        one(client
            .simple_query("SELECT current_setting('server_version_num')::int/100 as version")
            .await
            .unwrap()),
        some("1600")
    );
    // Several statements in one string run in order.
    let messages = client
        .simple_query("SET x = 1; SELECT 1 AS a; SELECT 'two' AS b")
        .await
        .unwrap();
    assert_eq!(
        simple_rows(&messages),
        vec![vec![some("1")], vec![some("two")]]
    );

    // The same statements through the extended protocol.
    for setup in ["SET search_path = public", "BEGIN", "ROLLBACK"] {
        client
            .execute(setup, &[])
            .await
            .unwrap_or_else(|e| panic!("{setup}: {e}"));
    }
    let row = client.query_one("SHOW server_version", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), SERVER_VERSION);
    let row = client.query_one("SELECT version()", &[]).await.unwrap();
    assert!(row.get::<_, String>("version").starts_with("PostgreSQL"));
    assert!(client.query(";", &[]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_with_28p01() {
    let (port, _stop) = start(true).await;
    let e = connect(port, "wrong").await.expect_err("refused");
    assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
    // The endpoint stays up for the next client.
    let client = connect(port, PASSWORD).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
}

/// Serves the fake backend with `options`.
async fn start_with(options: WireOptions) -> (u16, oneshot::Sender<()>) {
    start_backend_with(Arc::new(fake(true)), options).await
}

async fn connect_as(
    port: u16,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={user} password={password} dbname=primespark"),
        NoTls,
    )
    .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The startup answer, read off the socket: the server asks for SASL with SCRAM-SHA-256 and
/// never for a cleartext (3) or MD5 (5) password, for a known and an unknown user alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_asks_for_scram_sha_256_for_every_user() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (port, _stop) = start(true).await;
    for user in [USER, "nobody-here"] {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        socket.write_all(&startup_message(user)).await.unwrap();
        let mut head = [0u8; 5];
        socket.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], b'R', "an authentication request");
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut rest = vec![0u8; len - 4];
        socket.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest[..4],
            &10u32.to_be_bytes(),
            "AuthenticationSASL for {user}"
        );
        let mechanisms = String::from_utf8_lossy(&rest[4..]).to_string();
        assert!(mechanisms.contains("SCRAM-SHA-256"), "{mechanisms:?}");
    }
}

/// An unknown user fails exactly as a wrong password does: same SQLSTATE, same words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_fails_like_a_wrong_password() {
    let (port, _stop) = start(true).await;
    let wrong = connect_as(port, USER, "wrong").await.expect_err("refused");
    let unknown = connect_as(port, "mallory", "wrong")
        .await
        .expect_err("refused");
    let (wrong, unknown) = (wrong.as_db_error().unwrap(), unknown.as_db_error().unwrap());
    assert_eq!(wrong.code(), &SqlState::INVALID_PASSWORD);
    assert_eq!(unknown.code(), &SqlState::INVALID_PASSWORD);
    assert_eq!(
        wrong.message().replace(USER, "X"),
        unknown.message().replace("mallory", "X")
    );
}

/// Past its budget of failed logins an address is refused before authentication, even with
/// the right password, until the budget refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited_per_address() {
    let (port, _stop) = start_with(WireOptions {
        login_failures_per_minute: 3,
        ..WireOptions::default()
    })
    .await;
    for _ in 0..3 {
        let e = connect(port, "wrong").await.expect_err("refused");
        assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
    }
    let e = connect(port, PASSWORD).await.expect_err("limited");
    assert_eq!(
        e.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{e}"
    );
    let message = e.as_db_error().map(|d| d.message().to_owned());
    assert!(
        message
            .unwrap_or_default()
            .contains("too many failed logins"),
        "{e:?}"
    );
}

/// Connections beyond the cap get PostgreSQL's "too many clients"; one that closes frees its
/// place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused() {
    let (port, _stop) = start_with(WireOptions {
        max_connections: 2,
        ..WireOptions::default()
    })
    .await;
    let a = connect(port, PASSWORD).await.unwrap();
    let b = connect(port, PASSWORD).await.unwrap();
    let e = connect(port, PASSWORD).await.expect_err("over the cap");
    assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
    a.simple_query("SELECT 1").await.unwrap();
    drop(a);
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = connect(port, PASSWORD).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    again
        .expect("a place freed")
        .simple_query("SELECT 1")
        .await
        .unwrap();
    b.simple_query("SELECT 1").await.unwrap();
}

/// TLS required: a client without it is refused before authentication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_is_refused_where_tls_is_required() {
    let (port, _stop) = start_with(WireOptions {
        require_tls: true,
        ..WireOptions::default()
    })
    .await;
    let e = connect(port, PASSWORD).await.expect_err("refused");
    assert_eq!(
        e.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{e}"
    );
    let message = e.as_db_error().map(|d| d.message().to_owned());
    assert!(
        message.unwrap_or_default().contains("TLS connections only"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_keep_their_sqlstate() {
    let (port, _stop) = start(true).await;
    let client = connect(port, PASSWORD).await.unwrap();

    let e = client
        .simple_query("SELECT * FROM secret_table")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    let e = client
        .query("SELECT * FROM secret_table WHERE a = $1", &[&1i64])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    let e = client.query("SELEC 1", &[]).await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR), "{e}");
    let e = client
        .simple_query("SELECT * FROM missing")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_TABLE), "{e}");
    let e = client.query("SELECT 1; SELECT 2", &[]).await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR), "{e}");
    let e = client
        .simple_query("SELECT current_setting('no_such_setting')")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_OBJECT), "{e}");

    let e = client
        .query("SELECT $99999999999999999999", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_PARAMETER), "{e}");

    // An error stops the rest of a simple query string.
    let e = client
        .simple_query("SELECT * FROM secret_table; SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");

    // The connection is still good.
    let row = client
        .query_one("SELECT $1::BIGINT + 1 AS n", &[&41i64])
        .await;
    assert_eq!(row.unwrap().get::<_, i64>("n"), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_describe_probes_the_backend() {
    let (port, _stop) = start(false).await;
    let client = connect(port, PASSWORD).await.unwrap();

    // Parameters are text unless the client says otherwise.
    let rows = client
        .query("SELECT id, name FROM t WHERE name = $1", &[&"plain"])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>("id"), 1);
    let stmt = client
        .prepare_typed(
            "SELECT id, ts FROM t WHERE id >= $1 ORDER BY id",
            &[PgType::INT8],
        )
        .await
        .unwrap();
    let rows = client.query(&stmt, &[&2i64]).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0].get::<_, NaiveDateTime>("ts"),
        naive("2024-06-01 12:30:00.5")
    );
    let e = client
        .query("SELECT $99999999999999999999", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_PARAMETER), "{e}");
    // Two columns of one name cannot be wrapped in a subquery: the probe runs in full.
    let rows = client
        .query("SELECT a.id, b.id FROM t a JOIN t b ON a.id = b.id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_client_does_not_disturb_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (port, _stop) = start(true).await;
    let good = connect(port, PASSWORD).await.unwrap();

    // One client sends garbage, another connects and says nothing.
    let mut garbage = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    garbage
        .write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
        .await
        .unwrap();
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read(&mut buf)).await;

    let row = good
        .query_one("SELECT count(*) AS n FROM t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>("n"), 3);
    let other = connect(port, PASSWORD).await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_the_statement() {
    let (port, _stop) = start(true).await;
    let client = connect(port, PASSWORD).await.unwrap();
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        client.simple_query("SELECT 1 AS pg_sleep"),
    )
    .await
    .expect("cancelled before the timeout")
    .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
    canceller.await.unwrap().unwrap();
    client.simple_query("SELECT 1").await.unwrap();
}

/// How many `pg_sleep ... hangup` statements are executing now.
static SLEEPING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct Sleeping;

impl Sleeping {
    fn enter() -> Self {
        SLEEPING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self
    }
}

impl Drop for Sleeping {
    fn drop(&mut self) {
        SLEEPING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A client that hangs up while its statement runs: the statement is dropped (cancelled)
/// within moments, not left to run to its end; the endpoint serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_is_cancelled_when_its_client_hangs_up() {
    use std::sync::atomic::Ordering;
    let (port, _stop) = start(true).await;
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname=primespark"),
        NoTls,
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let statement = tokio::spawn(async move {
        client
            .simple_query("SELECT 1 AS pg_sleep_hangup")
            .await
            .map(drop)
    });
    let started = tokio::time::timeout(Duration::from_secs(10), async {
        while SLEEPING.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(started.is_ok(), "the statement never started");
    connection.abort();
    statement.abort();
    let stopped = tokio::time::timeout(Duration::from_secs(5), async {
        while SLEEPING.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        stopped.is_ok(),
        "the statement of a client that hung up is still running"
    );
    let other = connect(port, PASSWORD).await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_endpoint() {
    let (port, stop) = start(true).await;
    let client = connect(port, PASSWORD).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !client.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("open connections are closed on shutdown");
    assert!(connect(port, PASSWORD).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_an_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let e = serve(
        addr,
        Arc::new(fake(true)),
        None,
        WireOptions::default(),
        async {},
    )
    .await
    .unwrap_err();
    assert!(matches!(e, PgWireError::Bind { addr: a, .. } if a == addr));
}
