//! Bound parameters are values: whatever a parameter holds, the SQL the backend plans is the
//! client's text with `$n` in it, and the value only ever compares, casts or comes back.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use datafusion::common::ScalarValue;
use tokio_postgres::types::{to_sql_checked, Format as WireFormat, IsNull, ToSql};

use super::*;
use crate::query::config::{QueryConfig, Role, WireUser};
use crate::query::service::{hash_password, QueryService, WireBackend};

/// Attempts at escaping a string parameter.
const ATTACKS: &[&str] = &[
    "x' OR '1'='1",
    "'; DROP TABLE t; --",
    "\\'; DROP TABLE t; --",
    "it's $1 and $2",
    "$2",
    "\"t\"",
];

/// A parameter sent in the text format, whatever its type (tokio-postgres sends binary).
#[derive(Debug)]
struct Text(&'static str);

impl ToSql for Text {
    fn to_sql(
        &self,
        _ty: &PgType,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_ty: &PgType) -> bool {
        true
    }

    fn encode_format(&self, _ty: &PgType) -> WireFormat {
        WireFormat::Text
    }

    to_sql_checked!();
}

/// A numeric parameter in the binary format.
#[derive(Debug)]
struct BinaryNumeric(&'static str);

impl ToSql for BinaryNumeric {
    fn to_sql(
        &self,
        _ty: &PgType,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        super::super::numeric::numeric_to_binary(self.0, out)?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &PgType) -> bool {
        *ty == PgType::NUMERIC
    }

    to_sql_checked!();
}

fn ids(rows: &[tokio_postgres::Row]) -> Vec<i64> {
    rows.iter().map(|r| r.get::<_, i64>(0)).collect()
}

/// The ids `sql` selects with one parameter.
async fn ids_with(client: &Client, sql: &str, param: &(dyn ToSql + Sync)) -> Vec<i64> {
    ids(&client.query(sql, &[param]).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_parameters_are_values_not_sql() {
    let backend = Arc::new(fake(true));
    let (port, _stop) = start_backend(backend.clone()).await;
    let client = connect(port, PASSWORD).await.unwrap();
    for attack in ATTACKS {
        let rows = client
            .query("SELECT id FROM t WHERE name = $1", &[attack])
            .await
            .unwrap();
        assert!(rows.is_empty(), "{attack} matched {:?}", ids(&rows));
        // It comes back exactly as sent, `$n` and quotes included.
        let row = client
            .query_one("SELECT $1::text AS v, $2::text AS w", &[attack, &"'$1'"])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>("v"), *attack);
        assert_eq!(row.get::<_, String>("w"), "'$1'");
    }
    // The real names still match, quotes and backslashes included.
    for (name, id) in [("it's", 2), ("back\\slash", 3)] {
        let rows = client
            .query("SELECT id FROM t WHERE name = $1", &[&name])
            .await
            .unwrap();
        assert_eq!(ids(&rows), [id], "{name}");
    }
    // Nothing was dropped, and the backend only ever saw the client's text with `$n`.
    let row = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
    let executed = backend.executed.lock().unwrap().clone();
    assert!(!executed.is_empty());
    for (sql, values) in &executed {
        assert!(!sql.contains("DROP") && !sql.contains("OR '1'"), "{sql}");
        for v in values {
            assert!(
                matches!(v, ScalarValue::Utf8(_) | ScalarValue::Int64(_)),
                "{sql}: {v:?}"
            );
        }
    }
    assert!(executed
        .iter()
        .any(|(_, values)| values
            .contains(&ScalarValue::Utf8(Some("'; DROP TABLE t; --".to_owned())))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_parameters_bind_in_text_and_binary() {
    let (port, _stop) = start(true).await;
    let client = connect(port, PASSWORD).await.unwrap();
    // numeric: the amount column is Decimal128(10, 2).
    let by_amount = "SELECT id FROM t WHERE amount = $1 ORDER BY id";
    assert_eq!(ids_with(&client, by_amount, &Text("123.45")).await, [1]);
    assert_eq!(ids_with(&client, by_amount, &Text("-0.5")).await, [2]);
    assert_eq!(ids_with(&client, by_amount, &Text("12345e-2")).await, [1]);
    assert_eq!(
        ids_with(&client, by_amount, &BinaryNumeric("123.45")).await,
        [1]
    );
    assert_eq!(
        ids_with(&client, by_amount, &BinaryNumeric("-0.50")).await,
        [2]
    );
    // timestamp and timestamptz.
    let by_ts = "SELECT id FROM t WHERE ts = $1";
    assert_eq!(
        ids_with(&client, by_ts, &Text("2024-06-01 12:30:00.5")).await,
        [2]
    );
    assert_eq!(
        ids_with(&client, by_ts, &Text("2024-06-01T12:30:00.500")).await,
        [2]
    );
    let by_tstz = "SELECT id FROM t WHERE tstz = $1";
    assert_eq!(
        ids_with(&client, by_tstz, &Text("2024-06-01 13:30:00.5+01:00")).await,
        [2]
    );
    assert_eq!(
        ids_with(&client, by_tstz, &Text("2024-06-01T12:30:00.5Z")).await,
        [2]
    );
    let instant = naive("2024-06-01 12:30:00.5").and_utc();
    assert_eq!(ids_with(&client, by_tstz, &instant).await, [2]);
    // bool and date.
    let by_ok = "SELECT id FROM t WHERE ok = $1";
    assert_eq!(ids_with(&client, by_ok, &Text("yes")).await, [1]);
    assert_eq!(ids_with(&client, by_ok, &Text("f")).await, [2]);
    assert_eq!(ids_with(&client, by_ok, &false).await, [2]);
    assert_eq!(
        ids_with(
            &client,
            "SELECT id FROM t WHERE d = $1",
            &Text("2024-12-31")
        )
        .await,
        [3]
    );
    // bytea, as sent.
    for param in [
        &Text("\\x00ff27") as &(dyn ToSql + Sync),
        &[0u8, 255, 39].as_slice(),
    ] {
        let row = client
            .query_one("SELECT $1::bytea AS b", &[param])
            .await
            .unwrap();
        assert_eq!(row.get::<_, Vec<u8>>("b"), [0, 255, 39]);
    }
    // Malformed values fail at Bind, with PostgreSQL's codes.
    for (sql, param, code) in [
        (
            "SELECT $1::int2 AS n",
            &Text("70000") as &(dyn ToSql + Sync),
            SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        ),
        (
            "SELECT $1::int8 AS n",
            &Text("1; DROP TABLE t"),
            SqlState::INVALID_TEXT_REPRESENTATION,
        ),
        (
            by_amount,
            &Text("1 OR 1=1"),
            SqlState::INVALID_TEXT_REPRESENTATION,
        ),
        (
            by_ts,
            &Text("2024-01-01') OR ('1'='1"),
            SqlState::INVALID_DATETIME_FORMAT,
        ),
        (
            "SELECT $1::bytea AS b",
            &Text("deadbeef"),
            SqlState::INVALID_TEXT_REPRESENTATION,
        ),
    ] {
        let e = client.query(sql, &[param]).await.unwrap_err();
        assert_eq!(e.code(), Some(&code), "{sql} {param:?}: {e}");
    }
    let row = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_settings_are_bound_like_parameters() {
    let (port, _stop) = start(true).await;
    let expected = "x'); DROP TABLE t; --";
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(USER)
        .password(PASSWORD)
        .dbname("primespark")
        .application_name(expected)
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT upper(current_setting('application_name')) AS a, $1::text AS b",
            &[&"$2"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>("a"), expected.to_uppercase());
    assert_eq!(row.get::<_, String>("b"), "$2");
    let rows = client
        .simple_query("SELECT current_setting('application_name') || '!' AS a")
        .await
        .unwrap();
    assert_eq!(simple_rows(&rows), [[Some(format!("{expected}!"))]]);
    let row = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
}

/// The query service itself as the backend: its checks run on the statement with `$n`, and the
/// values are bound into the plan they approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_service_binds_wire_parameters_as_values() {
    let ctx = fake(true).ctx;
    let users = [("reader", Role::Reader), ("admin", Role::Admin)]
        .into_iter()
        .map(|(name, role)| WireUser {
            name: name.into(),
            role,
            password_hash: hash_password(PASSWORD).unwrap(),
            password_hash_file: None,
            password_hash_env: None,
        })
        .collect();
    let cfg = QueryConfig {
        users,
        rate_limit_per_second: 1000,
        rate_limit_burst: 1000,
        ..QueryConfig::default()
    };
    let service = Arc::new(QueryService::new(ctx, &cfg).unwrap());
    let (port, _stop) = start_backend(Arc::new(WireBackend(service))).await;
    let login = |user: &'static str| async move {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={port} user={user} password={PASSWORD} dbname=primespark"
            ),
            NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        client
    };
    let admin = login("admin").await;
    admin
        .simple_query("CREATE VIEW v AS SELECT id, name, amount, ts FROM t")
        .await
        .unwrap();
    let reader = login("reader").await;
    for attack in ATTACKS.iter().chain(&["'; DROP VIEW v; --"]) {
        let rows = reader
            .query("SELECT id FROM v WHERE name = $1", &[attack])
            .await
            .unwrap();
        assert!(rows.is_empty(), "{attack}");
    }
    // The reader may not drop the view, with or without parameters; it is still there.
    let e = reader.simple_query("DROP VIEW v").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    let rows = reader
        .query(
            "SELECT id FROM v WHERE name <> $1 AND amount > $2 AND ts < $3 ORDER BY id",
            &[&"plain", &Text("-1"), &naive("2025-01-01 00:00:00")],
        )
        .await
        .unwrap();
    assert_eq!(ids(&rows), [2]);
    let row = reader
        .query_one(
            "SELECT $1::text AS v, $2::numeric AS n",
            &[&"it's $2", &Text("1.50")],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>("v"), "it's $2");
    // DataFusion's `numeric` is Decimal128(38, 10).
    assert_eq!(row.get::<_, Num>("n"), Num("1.5000000000".to_owned()));
    let row = reader
        .query_one("SELECT count(*) FROM v", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
}

/// A connection's `SET` of a backend setting applies to that connection only, and settings
/// that touch the file system, shared caches or the query pool are refused for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_applies_to_its_connection_only() {
    let ctx = fake(true).ctx;
    let cfg = QueryConfig {
        users: vec![WireUser {
            name: "admin".into(),
            role: Role::Admin,
            password_hash: hash_password(PASSWORD).unwrap(),
            password_hash_file: None,
            password_hash_env: None,
        }],
        rate_limit_per_second: 1000,
        rate_limit_burst: 1000,
        ..QueryConfig::default()
    };
    let service = Arc::new(QueryService::new(ctx, &cfg).unwrap());
    let (port, _stop) = start_backend(Arc::new(WireBackend(service.clone()))).await;
    let a = connect_as(port, "admin", PASSWORD).await.unwrap();
    let b = connect_as(port, "admin", PASSWORD).await.unwrap();
    // Identifier normalization off: `Name` stops meaning the column `name`.
    let upper = "SELECT Name FROM t ORDER BY id LIMIT 1";
    a.simple_query(upper).await.unwrap();
    a.simple_query("SET datafusion.sql_parser.enable_ident_normalization = false")
        .await
        .unwrap();
    assert!(
        a.simple_query(upper).await.is_err(),
        "the SET did not apply"
    );
    b.simple_query(upper)
        .await
        .expect("another connection saw the SET");
    // Extended-protocol statements run under it too.
    assert!(a.query(upper, &[]).await.is_err());
    a.simple_query("RESET datafusion.sql_parser.enable_ident_normalization")
        .await
        .unwrap();
    a.simple_query(upper).await.unwrap();

    for refused in [
        "SET datafusion.runtime.temp_directory = '/tmp/elsewhere'",
        "SET datafusion.runtime.list_files_cache_limit = '0'",
        "SET datafusion.execution.target_partitions = 64",
        "SET datafusion.catalog.information_schema = false",
    ] {
        let e = a.simple_query(refused).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{refused}: {e:?}"
        );
    }
    // A bad value of an allowed setting is DataFusion's error, and changes nothing.
    assert!(a
        .simple_query("SET datafusion.optimizer.max_passes = 'many'")
        .await
        .is_err());
    a.simple_query(upper).await.unwrap();
    // The shared context never changed.
    let options = service.context().state().config().options().clone();
    assert!(options.sql_parser.enable_ident_normalization);
    assert_eq!(options.optimizer.max_passes, 3);
}
