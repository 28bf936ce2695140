//! [`PostgresTable`] against the dev stack's PostgreSQL (skipped when it is not exported):
//! push-down, values, time zones, discovery, aggregates and streaming.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array, Int16Array,
    Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::catalog::TableProvider;
use datafusion::prelude::SessionContext;
use tokio_postgres::{Client, NoTls};

use super::*;

/// The dev stack's URL, or `None` (with the reason on stderr) when it is not exported.
fn stack_url() -> Option<String> {
    match std::env::var("PRIMESPARK_POSTGRES__URL") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!(
                "skipping: PRIMESPARK_POSTGRES__URL not set \
                 (run `eval \"$(deploy/dev/stack.sh env)\"`)"
            );
            None
        }
    }
}

/// A uniquely named table with one column of each supported type and five rows.
struct Fixture {
    url: String,
    client: Client,
    table: String,
    dropped: bool,
}

impl Fixture {
    async fn new() -> Option<Self> {
        let url = stack_url()?;
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let table = format!("pgtab_{}_{nanos}", std::process::id());
        client
            .batch_execute(&format!(
                r#"
                CREATE TABLE {table} (
                    id       int8 PRIMARY KEY,
                    small    int2,
                    medium   int4,
                    name     text,
                    label    varchar(20),
                    score    float8,
                    ratio    float4,
                    amount   numeric(10, 2),
                    flag     bool,
                    created  timestamptz,
                    local_ts timestamp,
                    day      date,
                    doc      jsonb,
                    payload  bytea
                );
                INSERT INTO {table} VALUES
                  (1, 10, 100, 'alice',   'a', 1.5,  0.25, 10.50, true,
                   '2024-03-01 12:34:56.789012+00', '2024-03-01 12:34:56.789012',
                   '2024-03-01', '{{"k": 1}}', '\x0001ff'),
                  (2, 20, 200, 'bob',     'b', 2.5,  0.5,  20.25, false,
                   '2024-03-02 00:00:00+02', '2024-03-02 00:00:00',
                   '2024-03-02', '{{"k": 2}}', '\x02'),
                  (3, 30, 300, 'O''Brien', 'c', -3.5, 0.75, 30.00, true,
                   '2024-03-03 23:59:59.999999+00', '2024-03-03 23:59:59.999999',
                   '2024-03-03', '[]', '\x'),
                  (4, NULL, NULL, 'dan',  NULL, NULL, NULL, NULL, NULL,
                   NULL, NULL, NULL, NULL, NULL),
                  (5, 50, 500, 'evelyn',  'e', 5.5,  1.0,  50.75, true,
                   '1999-12-31 23:00:00-01', '1969-07-20 20:17:40',
                   '1969-07-20', '"s"', 'hello'::bytea);
                "#
            ))
            .await
            .unwrap();
        Some(Self {
            url,
            client,
            table,
            dropped: false,
        })
    }

    async fn context(&self) -> SessionContext {
        let provider = PostgresTable::discover(&self.url, &self.table)
            .await
            .unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(provider)).unwrap();
        ctx
    }

    async fn drop_table(mut self) {
        self.client
            .batch_execute(&format!("DROP TABLE {}", self.table))
            .await
            .unwrap();
        self.dropped = true;
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // A test failed before dropping its table: clean up on a thread with a runtime of
        // its own (we may be inside the test's runtime, which cannot block on itself).
        let (url, table) = (self.url.clone(), self.table.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await {
                    tokio::spawn(connection);
                    let sql = format!("DROP TABLE IF EXISTS {table}");
                    let _ = client.batch_execute(&sql).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

async fn query(ctx: &SessionContext, sql: &str) -> RecordBatch {
    let df = ctx.sql(sql).await.unwrap();
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.unwrap();
    concat_batches(&schema, &batches).unwrap()
}

/// The physical plan's text (`EXPLAIN`).
async fn explain(ctx: &SessionContext, sql: &str) -> String {
    let batch = query(ctx, &format!("EXPLAIN {sql}")).await;
    pretty_format_batches(&[batch]).unwrap().to_string()
}

/// The SQL the scan sends, taken from `EXPLAIN`.
async fn pushed_sql(ctx: &SessionContext, sql: &str) -> String {
    let plan = explain(ctx, sql).await;
    let start = plan
        .find("sql=")
        .unwrap_or_else(|| panic!("no PostgresScanExec in plan:\n{plan}"));
    plan[start + 4..]
        .lines()
        .next()
        .unwrap()
        .trim_end_matches([' ', '|'])
        .to_owned()
}

fn ids(batch: &RecordBatch) -> Vec<i64> {
    let a = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    a.iter().map(|v| v.unwrap()).collect()
}

#[tokio::test]
async fn postgres_table_pushes_filters_and_projection() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let ctx = fx.context().await;
    let sql = "SELECT id, name FROM t \
               WHERE score > 1.2 AND flag = true AND name IN ('alice', 'evelyn', 'zed') \
               ORDER BY id";
    let batch = query(&ctx, sql).await;
    assert_eq!(ids(&batch), vec![1, 5]);
    let pushed = pushed_sql(&ctx, sql).await;
    let (select, rest) = pushed.split_once(" FROM ").unwrap();
    assert_eq!(select, "SELECT \"id\"::int8, \"name\"::text");
    assert!(rest.contains(" WHERE "), "{pushed}");
    assert!(
        rest.contains("\"score\"::float8) > '1.2'::float8"),
        "{pushed}"
    );
    // DataFusion simplifies `flag = true` to `flag`, small IN lists to ORs.
    assert!(rest.contains("(\"flag\"::bool)"), "{pushed}");
    assert!(rest.contains("(\"name\"::text) = E'evelyn'"), "{pushed}");
    assert!(!explain(&ctx, sql).await.contains("FilterExec"));

    // The other translated forms, each checked against the expected rows.
    let cases: &[(&str, &[i64])] = &[
        ("small BETWEEN 15 AND 30", &[2, 3]),
        ("small NOT BETWEEN 15 AND 30", &[1, 5]),
        ("medium <> 200", &[1, 3, 5]),
        ("NOT (medium >= 300)", &[1, 2]),
        ("label IS NULL", &[4]),
        ("label IS NOT NULL AND (id = 1 OR id = 3)", &[1, 3]),
        ("name LIKE '%e%'", &[1, 3, 5]),
        ("name NOT LIKE 'b%'", &[1, 3, 4, 5]),
        ("name < 'c'", &[1, 2, 3]),
        ("ratio <= 0.5", &[1, 2]),
        ("amount > 20.3", &[3, 5]),
        ("flag", &[1, 3, 5]),
        ("NOT flag", &[2]),
        ("id NOT IN (1, 2)", &[3, 4, 5]),
        ("day = DATE '2024-03-02'", &[2]),
        ("day < DATE '2000-01-01'", &[5]),
        ("payload = X'02'", &[2]),
        ("doc = '[]'", &[3]),
        ("local_ts >= TIMESTAMP '2024-03-03 23:59:59.999999'", &[3]),
    ];
    for (filter, expected) in cases {
        let sql = format!("SELECT id FROM t WHERE {filter} ORDER BY id");
        let batch = query(&ctx, &sql).await;
        assert_eq!(&ids(&batch), expected, "{filter}");
        let plan = explain(&ctx, &sql).await;
        assert!(
            !plan.contains("FilterExec"),
            "{filter} was not pushed down:\n{plan}"
        );
    }
    fx.drop_table().await;
}

#[tokio::test]
async fn postgres_table_pushes_limit_only_when_exact() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let ctx = fx.context().await;
    let sql = "SELECT id FROM t WHERE id > 1 LIMIT 2";
    assert_eq!(query(&ctx, sql).await.num_rows(), 2);
    let pushed = pushed_sql(&ctx, sql).await;
    assert!(pushed.ends_with(" LIMIT 2"), "{pushed}");

    // `length` stays in DataFusion, so the LIMIT must too.
    let sql = "SELECT id FROM t WHERE length(name) > 3 AND id > 1 LIMIT 1";
    let pushed = pushed_sql(&ctx, sql).await;
    assert!(!pushed.contains("LIMIT"), "{pushed}");
    assert!(!pushed.contains("length"), "{pushed}");
    let batch = query(&ctx, sql).await;
    assert_eq!(batch.num_rows(), 1);
    assert!([3, 5].contains(&ids(&batch)[0]));
    fx.drop_table().await;
}

#[tokio::test]
async fn postgres_table_leaves_untranslatable_filters_to_datafusion() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let ctx = fx.context().await;
    let sql = "SELECT id FROM t WHERE length(name) > 3 AND id > 1 ORDER BY id";
    assert_eq!(ids(&query(&ctx, sql).await), vec![3, 5]);
    let plan = explain(&ctx, sql).await;
    assert!(plan.contains("FilterExec"), "{plan}");
    let pushed = pushed_sql(&ctx, sql).await;
    assert!(pushed.contains("\"id\"::int8) > '1'::int8"), "{pushed}");
    // The projection includes `name`, needed by the filter above the scan.
    assert!(
        pushed.starts_with("SELECT \"id\"::int8, \"name\"::text FROM"),
        "{pushed}"
    );

    // Float zero stays in DataFusion (signed zeros); the answer is still right.
    let sql = "SELECT id FROM t WHERE score >= 0.0 ORDER BY id";
    assert_eq!(ids(&query(&ctx, sql).await), vec![1, 2, 5]);
    assert!(explain(&ctx, sql).await.contains("FilterExec"));

    // ILIKE too.
    let sql = "SELECT id FROM t WHERE name ILIKE 'o''b%' ORDER BY id";
    assert_eq!(ids(&query(&ctx, sql).await), vec![3]);
    fx.drop_table().await;
}

#[tokio::test]
async fn postgres_table_escapes_string_literals() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let ctx = fx.context().await;
    let batch = query(&ctx, "SELECT id, name FROM t WHERE name = 'O''Brien'").await;
    assert_eq!(ids(&batch), vec![3]);
    let names = batch
        .column(1)
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    assert_eq!(names.value(0), "O'Brien");
    for attempt in [
        "x' OR '1'='1",
        "x\\' OR 1=1 --",
        "'; DROP TABLE t; --",
        "\\",
    ] {
        let literal = attempt.replace('\'', "''");
        let sql = format!("SELECT id FROM t WHERE name = '{literal}'");
        assert_eq!(query(&ctx, &sql).await.num_rows(), 0, "{attempt}");
        assert!(!explain(&ctx, &sql).await.contains("FilterExec"));
    }
    // The table survived.
    assert_eq!(query(&ctx, "SELECT id FROM t").await.num_rows(), 5);
    fx.drop_table().await;
}

#[tokio::test]
async fn postgres_table_round_trips_values_and_time_zones() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let ctx = fx.context().await;
    let batch = query(
        &ctx,
        "SELECT id, small, medium, name, label, score, ratio, amount, flag, created, \
         local_ts, day, doc, payload FROM t ORDER BY id",
    )
    .await;
    assert_eq!(batch.num_rows(), 5);
    let c = |i: usize| batch.column(i).as_any();
    let small = c(1).downcast_ref::<Int16Array>().unwrap();
    assert_eq!((small.value(0), small.is_null(3)), (10, true));
    let medium = c(2).downcast_ref::<Int32Array>().unwrap();
    assert_eq!(medium.value(4), 500);
    let label = c(4).downcast_ref::<StringArray>().unwrap();
    assert_eq!(label.value(0), "a");
    let score = c(5).downcast_ref::<Float64Array>().unwrap();
    assert_eq!(score.value(2), -3.5);
    let ratio = c(6).downcast_ref::<Float32Array>().unwrap();
    assert_eq!(ratio.value(0), 0.25);
    let amount = c(7).downcast_ref::<Float64Array>().unwrap();
    assert_eq!(amount.value(1), 20.25);
    let flag = c(8).downcast_ref::<BooleanArray>().unwrap();
    assert!(flag.value(0) && !flag.value(1) && flag.is_null(3));

    assert_eq!(
        batch.schema().field(9).data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    let created = c(9).downcast_ref::<TimestampMicrosecondArray>().unwrap();
    assert_eq!(created.value(0), 1_709_296_496_789_012); // 2024-03-01T12:34:56.789012Z
    assert_eq!(created.value(1), 1_709_330_400_000_000); // 2024-03-01T22:00:00Z
    assert_eq!(created.value(4), 946_684_800_000_000); // 2000-01-01T00:00:00Z
    assert_eq!(
        batch.schema().field(10).data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, None)
    );
    let local = c(10).downcast_ref::<TimestampMicrosecondArray>().unwrap();
    assert_eq!(local.value(0), 1_709_296_496_789_012);
    assert_eq!(local.value(4), -14_182_940_000_000); // before 1970
    let day = c(11).downcast_ref::<Date32Array>().unwrap();
    assert_eq!((day.value(0), day.value(4)), (19_783, -165));
    let doc = c(12).downcast_ref::<StringArray>().unwrap();
    assert_eq!((doc.value(0), doc.value(4)), ("{\"k\": 1}", "\"s\""));
    let payload = c(13).downcast_ref::<BinaryArray>().unwrap();
    assert_eq!(payload.value(0), &[0x00, 0x01, 0xff]);
    assert_eq!(payload.value(2), b"");
    assert!(payload.is_null(3));

    // Time-zone-aware filters: the same instants written in other zones reach PostgreSQL
    // in UTC.
    for (filter, literal) in [
        (
            "created = TIMESTAMPTZ '2024-03-02T00:00:00+02:00'",
            "= '2024-03-01 22:00:00.000000+00'::timestamptz",
        ),
        (
            "created = '2024-03-01T22:00:00Z'",
            "= '2024-03-01 22:00:00.000000+00'::timestamptz",
        ),
        (
            "created > '2024-03-01T14:00:00+01:00' AND created < '2024-03-02T00:00:00Z'",
            "> '2024-03-01 13:00:00.000000+00'::timestamptz",
        ),
    ] {
        let sql = format!("SELECT id FROM t WHERE {filter}");
        assert_eq!(ids(&query(&ctx, &sql).await), vec![2], "{filter}");
        let pushed = pushed_sql(&ctx, &sql).await;
        assert!(pushed.contains(literal), "{pushed}");
        assert!(
            !explain(&ctx, &sql).await.contains("FilterExec"),
            "{filter}"
        );
    }

    // A table built from a given schema, with other string and time encodings.
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8View, true),
        Field::new(
            "created",
            DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
            true,
        ),
        Field::new("payload", DataType::LargeBinary, true),
    ]));
    let pool = PgPool::new(&fx.url, 2).unwrap();
    let provider = PostgresTable::new(pool, &fx.table, schema).unwrap();
    let ctx = SessionContext::new();
    ctx.register_table("t2", Arc::new(provider)).unwrap();
    let batch = query(
        &ctx,
        "SELECT id, name, created FROM t2 WHERE name = 'bob' OR created IS NULL ORDER BY id",
    )
    .await;
    assert_eq!(ids(&batch), vec![2, 4]);
    let created = batch
        .column(2)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>()
        .unwrap();
    assert_eq!(created.value(0), 1_709_330_400_000);
    fx.drop_table().await;
}

#[tokio::test]
async fn postgres_table_discovers_the_schema() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let provider = PostgresTable::discover(&fx.url, &fx.table).await.unwrap();
    let utc = Some("UTC".into());
    let expected = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("small", DataType::Int16, true),
        Field::new("medium", DataType::Int32, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("label", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
        Field::new("ratio", DataType::Float32, true),
        Field::new("amount", DataType::Float64, true),
        Field::new("flag", DataType::Boolean, true),
        Field::new(
            "created",
            DataType::Timestamp(TimeUnit::Microsecond, utc),
            true,
        ),
        Field::new(
            "local_ts",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            true,
        ),
        Field::new("day", DataType::Date32, true),
        Field::new("doc", DataType::Utf8, true),
        Field::new("payload", DataType::Binary, true),
    ]);
    assert_eq!(provider.schema().as_ref(), &expected);

    // Schema-qualified, and missing.
    let qualified = PostgresTable::discover(&fx.url, &format!("public.{}", fx.table))
        .await
        .unwrap();
    assert_eq!(qualified.schema().as_ref(), &expected);
    let missing = PostgresTable::discover(&fx.url, "pgtab_does_not_exist").await;
    assert!(matches!(missing, Err(PgTableError::TableNotFound { .. })));
    fx.drop_table().await;
}

#[tokio::test]
async fn postgres_table_answers_aggregates() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    let ctx = fx.context().await;
    let batch = query(
        &ctx,
        "SELECT count(*) AS n, count(score) AS scored, avg(score) AS mean, sum(medium) AS s \
         FROM t",
    )
    .await;
    let n = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    let scored = batch
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    let mean = batch
        .column(2)
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    let sum = batch
        .column(3)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!((n.value(0), scored.value(0)), (5, 4));
    assert!((mean.value(0) - 1.5).abs() < 1e-12);
    assert_eq!(sum.value(0), 1100);

    let sql = "SELECT count(*) FROM t WHERE flag";
    let batch = query(&ctx, sql).await;
    let n = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(n.value(0), 3);
    let pushed = pushed_sql(&ctx, sql).await;
    assert!(pushed.starts_with("SELECT count(*) FROM"), "{pushed}");

    let sql = "SELECT flag, count(*) AS n FROM t GROUP BY flag ORDER BY flag NULLS LAST";
    let batch = query(&ctx, sql).await;
    let n = batch
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(
        n.iter().map(|v| v.unwrap()).collect::<Vec<_>>(),
        vec![1, 3, 1]
    );
    fx.drop_table().await;
}

#[tokio::test]
async fn postgres_table_streams_many_rows_in_batches() {
    let Some(fx) = Fixture::new().await else {
        return;
    };
    fx.client
        .batch_execute(&format!(
            "INSERT INTO {} (id, name) SELECT g, 'n' || g FROM generate_series(100, 20099) g",
            fx.table
        ))
        .await
        .unwrap();
    let ctx = fx.context().await;
    let df = ctx
        .sql("SELECT id, name FROM t WHERE id >= 100")
        .await
        .unwrap();
    let batches = df.collect().await.unwrap();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 20_000);
    assert!(batches.iter().all(|b| b.num_rows() <= BATCH_ROWS));
    let batch = query(&ctx, "SELECT count(*) FROM t").await;
    let n = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(n.value(0), 20_005);
    // A LIMIT above an unpushed filter abandons the scan early; the pool must recover.
    let batch = query(&ctx, "SELECT id FROM t WHERE length(name) > 2 LIMIT 3").await;
    assert_eq!(batch.num_rows(), 3);
    assert_eq!(
        query(&ctx, "SELECT id FROM t WHERE id < 3")
            .await
            .num_rows(),
        2
    );
    fx.drop_table().await;
}

#[tokio::test]
async fn postgres_table_abandoned_scan_gives_its_pool_slot_back() {
    use futures::StreamExt;
    let Some(fx) = Fixture::new().await else {
        return;
    };
    fx.client
        .batch_execute(&format!(
            "INSERT INTO {} (id, name) SELECT g, 'n' || g FROM generate_series(100, 50099) g",
            fx.table
        ))
        .await
        .unwrap();
    // One connection: every query below needs the one before to have given it back.
    let pool = PgPool::new(&fx.url, 1).unwrap();
    let provider = PostgresTable::discover_with_pool(pool.clone(), &fx.table)
        .await
        .unwrap();
    let ctx = SessionContext::new();
    ctx.register_table("t", Arc::new(provider)).unwrap();
    for _ in 0..3 {
        // A long scan, dropped after its first batch: cancelled, and its connection closed.
        let mut stream = ctx
            .sql("SELECT id, name FROM t")
            .await
            .unwrap()
            .execute_stream()
            .await
            .unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.num_rows(), BATCH_ROWS);
        drop(stream);
        let batch = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            query(&ctx, "SELECT count(*) FROM t"),
        )
        .await
        .expect("the abandoned scan's slot came back");
        let n = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(n.value(0), 50_005);
    }
    // A finished query's connection is reused.
    assert!(pool
        .min_time_us(&fx.table, "created")
        .await
        .unwrap()
        .is_some());
    assert!(pool
        .min_time_us(&fx.table, "created")
        .await
        .unwrap()
        .is_some());
    fx.drop_table().await;
}
