//! DataFusion session and the HTTP routes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type, UInt64Type};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use object_store::ObjectStore;
use serde::Deserialize;
use serde_json::{json, Value};

use super::service::{Principal, QueryOutput, QueryService};

/// Query endpoint failures.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// DataFusion rejected or failed the query (the user's to fix).
    #[error("{0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// No or unknown credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but the statement is not allowed for the caller's role (or for anyone).
    #[error("{0}")]
    Forbidden(String),
    /// The caller's rate limit is used up.
    #[error("rate limit reached; retry in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until a query is allowed again.
        retry_after_secs: u64,
    },
    /// The query ran longer than `query.timeout` and was cancelled.
    #[error("query cancelled: it ran longer than {0:?} (query.timeout)")]
    Timeout(Duration),
    /// Encoding the result failed.
    #[error("encoding result: {0}")]
    Encode(String),
    /// Binding or serving failed.
    #[error("serving on {addr}: {source}")]
    Serve {
        /// Address.
        addr: SocketAddr,
        /// Error.
        #[source]
        source: std::io::Error,
    },
}

/// A session over the Parquet archive under `nas_root`: raw telemetry as `telemetry_raw`
/// (partition columns `date` and `hour` come from the folder names and prune scans) and the
/// 1-minute aggregates as `device_metrics_1m` (partition column `date`).
///
/// Raw inference requests are `inference_raw`; the inference aggregates `inference_stats_1m`
/// and `routing_stats_1m` (partition column `date`).
///
/// Raw task and API events of `events_topic` are `analytics_raw` (partition columns `date` and
/// `hour`); their windows `task_stats_1m`, `agent_load_1m` and `api_events_1m` (partition column
/// `date`).
///
/// Anomaly scores of telemetry samples are `anomaly_scores` (partition columns `date` and
/// `hour`).
///
/// Every aggregate table also has its 1-hour rollup (`*_1h`) with the same columns.
///
/// Every table lists the archive on both tiers ([`crate::archive::TieredStore`]): the NAS and,
/// when `bucket` is given (an object store rooted at the archive's prefix, as
/// [`crate::s3::archive_bucket`] builds it), the files tiering moved there, each file once.
///
/// All running queries share a memory pool of `memory_limit_bytes`; the PostgreSQL dialect and
/// the functions of [`super::functions`] (`time_bucket`) are set up.
pub fn session(
    nas_root: &Path,
    bucket: Option<Arc<dyn ObjectStore>>,
    telemetry_topic: &str,
    inference_topic: &str,
    events_topic: &str,
    memory_limit_bytes: usize,
) -> Result<SessionContext, QueryError> {
    let mut config = SessionConfig::new().with_information_schema(true);
    config.options_mut().sql_parser.dialect = datafusion::common::config::Dialect::PostgreSQL;
    // No list-files cache: DataFusion 55 keeps listings forever by default, and the archive
    // gains files every roll (a query would never see files written after its first listing).
    let caches = datafusion::execution::cache::cache_manager::CacheManagerConfig::default()
        .with_list_files_cache_limit(0);
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(memory_limit_bytes, 1.0)
        .with_cache_manager(caches)
        .build_arc()?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    super::functions::register(&ctx);
    // Created, so the NAS is a tier even before anything is archived.
    std::fs::create_dir_all(nas_root)
        .map_err(|e| QueryError::Encode(format!("creating {}: {e}", nas_root.display())))?;
    let tiers = crate::archive::tiers(Some(nas_root), bucket)
        .map_err(|e| QueryError::Encode(e.to_string()))?;
    let archive_url = url::Url::parse(ARCHIVE_URL)
        .map_err(|e| QueryError::Encode(format!("{ARCHIVE_URL}: {e}")))?;
    ctx.register_object_store(&archive_url, Arc::new(tiers));
    register_listing(
        &ctx,
        "inference_raw",
        nas_root,
        &format!("topic={inference_topic}"),
        &["date", "hour"],
        primespark_schemas::columnar::inference_raw(),
    )?;
    register_listing(
        &ctx,
        "analytics_raw",
        nas_root,
        &format!("topic={events_topic}"),
        &["date", "hour"],
        primespark_schemas::columnar::analytics_raw(),
    )?;
    // The 1-hour rollups have the columns of the 1-minute tables.
    for (name, schema) in [
        (
            "inference_stats_1m",
            primespark_schemas::columnar::inference_stats_1m(),
        ),
        (
            "routing_stats_1m",
            primespark_schemas::columnar::routing_stats_1m(),
        ),
        (
            "device_metrics_1h",
            primespark_schemas::columnar::device_metrics_1m(),
        ),
        (
            "inference_stats_1h",
            primespark_schemas::columnar::inference_stats_1m(),
        ),
        (
            "routing_stats_1h",
            primespark_schemas::columnar::routing_stats_1m(),
        ),
        (
            "task_stats_1m",
            primespark_schemas::columnar::task_stats_1m(),
        ),
        (
            "task_stats_1h",
            primespark_schemas::columnar::task_stats_1m(),
        ),
        (
            "agent_load_1m",
            primespark_schemas::columnar::agent_load_1m(),
        ),
        (
            "agent_load_1h",
            primespark_schemas::columnar::agent_load_1m(),
        ),
        (
            "api_events_1m",
            primespark_schemas::columnar::api_events_1m(),
        ),
        (
            "api_events_1h",
            primespark_schemas::columnar::api_events_1m(),
        ),
    ] {
        register_listing(
            &ctx,
            name,
            nas_root,
            &format!("table={name}"),
            &["date"],
            schema,
        )?;
    }
    register_listing(
        &ctx,
        "telemetry_raw",
        nas_root,
        &format!("topic={telemetry_topic}"),
        &["date", "hour"],
        primespark_schemas::columnar::telemetry_raw(),
    )?;
    register_listing(
        &ctx,
        "anomaly_scores",
        nas_root,
        crate::nas::SCORES_TABLE_DIR,
        &["date", "hour"],
        primespark_schemas::columnar::anomaly_scores(),
    )?;
    register_listing(
        &ctx,
        "device_metrics_1m",
        nas_root,
        "table=device_metrics_1m",
        &["date"],
        primespark_schemas::columnar::device_metrics_1m(),
    )?;
    Ok(ctx)
}

/// Where the session finds the archive's tiers: its [`crate::archive::TieredStore`].
const ARCHIVE_URL: &str = "archive://tiers";

/// A listing table over the archive folder `dir` (relative to the NAS root and the bucket's
/// prefix alike).
fn register_listing(
    ctx: &SessionContext,
    name: &str,
    nas_root: &Path,
    dir: &str,
    partition_cols: &[&str],
    schema: datafusion::arrow::datatypes::SchemaRef,
) -> Result<(), QueryError> {
    // The writers create it too; made here so a fresh NAS reads as empty tables.
    let local = nas_root.join(dir);
    std::fs::create_dir_all(&local)
        .map_err(|e| QueryError::Encode(format!("creating {}: {e}", local.display())))?;
    let table_url = ListingTableUrl::parse(format!("{ARCHIVE_URL}/{dir}/"))?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(
            partition_cols
                .iter()
                .map(|c| ((*c).to_owned(), DataType::Utf8))
                .collect(),
        );
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(options)
        .with_schema(schema);
    ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}

#[derive(Deserialize)]
struct SqlRequest {
    sql: String,
}

/// The routes: `POST /v1/sql` and `GET /v1/tables`, bodies up to `max_body_bytes`.
pub fn router(service: Arc<QueryService>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/sql", post(sql))
        .route("/v1/tables", get(tables))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(service)
}

/// Serves `router` on `addr` until `shutdown` resolves; over TLS with `tls` (see
/// [`super::tls::http_acceptor`]), plain HTTP otherwise.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    tls: Option<super::tls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), QueryError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| QueryError::Serve { addr, source })?;
    tracing::info!(%addr, tls = tls.is_some(), "sql endpoint listening");
    let served = match tls {
        Some(acceptor) => {
            let listener = super::tls::TlsListener::new(listener, acceptor)
                .map_err(|source| QueryError::Serve { addr, source })?;
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    served.map_err(|source| QueryError::Serve { addr, source })
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let status = match &self {
            QueryError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            QueryError::Forbidden(_) => StatusCode::FORBIDDEN,
            QueryError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            QueryError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            QueryError::DataFusion(_) => StatusCode::BAD_REQUEST,
            QueryError::Encode(_) | QueryError::Serve { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut response = (status, Json(json!({"error": self.to_string()}))).into_response();
        let headers = response.headers_mut();
        match &self {
            QueryError::Unauthenticated(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            QueryError::RateLimited { retry_after_secs } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                    headers.insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        response
    }
}

/// The caller, from `Authorization: Bearer <token>` or `X-API-Key: <token>`.
fn caller(service: &QueryService, headers: &HeaderMap) -> Result<Principal, QueryError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    service.authenticate_token(bearer.or(key))
}

/// Result encodings, by `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
    Arrow,
}

fn format(headers: &HeaderMap) -> Format {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("application/vnd.apache.arrow.stream") {
        Format::Arrow
    } else if accept.contains("text/csv") {
        Format::Csv
    } else {
        Format::Json
    }
}

fn encode(out: &QueryOutput, format: Format) -> Result<Response, QueryError> {
    let enc = |e: datafusion::arrow::error::ArrowError| QueryError::Encode(e.to_string());
    let truncated = if out.truncated { "true" } else { "false" };
    match format {
        Format::Json => {
            let columns: Vec<&String> = out.schema.fields().iter().map(|f| f.name()).collect();
            let rows = batches_to_json(&out.batches)?;
            Ok(
                Json(json!({"columns": columns, "rows": rows, "truncated": out.truncated}))
                    .into_response(),
            )
        }
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                if out.batches.is_empty() {
                    w.write(&RecordBatch::new_empty(out.schema.clone()))
                        .map_err(enc)?;
                }
                for b in &out.batches {
                    w.write(b).map_err(enc)?;
                }
            }
            Ok((
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                    (
                        header::HeaderName::from_static("x-primespark-truncated"),
                        truncated,
                    ),
                ],
                buf,
            )
                .into_response())
        }
        Format::Arrow => {
            let mut buf = Vec::new();
            {
                let mut w =
                    datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut buf, &out.schema)
                        .map_err(enc)?;
                for b in &out.batches {
                    w.write(b).map_err(enc)?;
                }
                w.finish().map_err(enc)?;
            }
            Ok((
                [
                    (header::CONTENT_TYPE, "application/vnd.apache.arrow.stream"),
                    (
                        header::HeaderName::from_static("x-primespark-truncated"),
                        truncated,
                    ),
                ],
                buf,
            )
                .into_response())
        }
    }
}

async fn sql(
    State(service): State<Arc<QueryService>>,
    headers: HeaderMap,
    body: Result<Json<SqlRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    // Authentication comes before the body is looked at: an anonymous caller learns nothing.
    let who = match caller(&service, &headers) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let Json(req) = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "request body too large (query.max_body_bytes)".to_owned()
            } else {
                format!(
                    "expected a JSON body {{\"sql\": \"...\"}}: {}",
                    rejection.body_text()
                )
            };
            return (status, Json(json!({"error": message}))).into_response();
        }
    };
    match service.execute(&who, "http", &req.sql).await {
        Ok(out) => encode(&out, format(&headers)).unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/tables`: every table and view with its columns.
async fn tables(State(service): State<Arc<QueryService>>, headers: HeaderMap) -> Response {
    if let Err(e) = caller(&service, &headers) {
        return e.into_response();
    }
    let ctx = service.context();
    let mut out = Vec::new();
    for catalog_name in ctx.catalog_names() {
        let Some(catalog) = ctx.catalog(&catalog_name) else {
            continue;
        };
        for schema_name in catalog.schema_names() {
            if schema_name == "information_schema" {
                continue;
            }
            let Some(schema) = catalog.schema(&schema_name) else {
                continue;
            };
            let mut names = schema.table_names();
            names.sort();
            for name in names {
                let Ok(Some(table)) = schema.table(&name).await else {
                    continue;
                };
                let columns: Vec<Value> = table
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()}))
                    .collect();
                out.push(json!({
                    "schema": schema_name,
                    "name": name,
                    "kind": format!("{:?}", table.table_type()).to_lowercase(),
                    "columns": columns,
                }));
            }
        }
    }
    Json(json!({"tables": out})).into_response()
}

fn column_values(array: &dyn Array) -> Result<Vec<Value>, QueryError> {
    let enc = |e: datafusion::arrow::error::ArrowError| QueryError::Encode(e.to_string());
    let n = array.len();
    let values = match array.data_type() {
        DataType::Null => vec![Value::Null; n],
        DataType::Boolean => {
            let a = array.as_boolean();
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Value::Null
                    } else {
                        Value::Bool(a.value(i))
                    }
                })
                .collect()
        }
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => {
            let c = cast(array, &DataType::Int64).map_err(enc)?;
            let a = c.as_primitive::<Int64Type>();
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Value::Null
                    } else {
                        json!(a.value(i))
                    }
                })
                .collect()
        }
        DataType::UInt64 => {
            let a = array.as_primitive::<UInt64Type>();
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Value::Null
                    } else {
                        json!(a.value(i))
                    }
                })
                .collect()
        }
        DataType::Float16
        | DataType::Float32
        | DataType::Float64
        | DataType::Decimal128(_, _)
        | DataType::Decimal256(_, _) => {
            let c = cast(array, &DataType::Float64).map_err(enc)?;
            let a = c.as_primitive::<Float64Type>();
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Value::Null
                    } else {
                        // JSON has no NaN or infinity; send those as strings.
                        serde_json::Number::from_f64(a.value(i))
                            .map(Value::Number)
                            .unwrap_or_else(|| Value::String(a.value(i).to_string()))
                    }
                })
                .collect()
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let c = cast(array, &DataType::Utf8).map_err(enc)?;
            let a = c.as_string::<i32>();
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Value::Null
                    } else {
                        Value::String(a.value(i).to_owned())
                    }
                })
                .collect()
        }
        _ => {
            let f = ArrayFormatter::try_new(array, &FormatOptions::default()).map_err(enc)?;
            (0..n)
                .map(|i| {
                    if array.is_null(i) {
                        Value::Null
                    } else {
                        Value::String(f.value(i).to_string())
                    }
                })
                .collect()
        }
    };
    Ok(values)
}

/// Rows of `batches` as JSON arrays, in column order.
pub fn batches_to_json(batches: &[RecordBatch]) -> Result<Vec<Value>, QueryError> {
    let mut rows = Vec::new();
    for batch in batches {
        let columns = batch
            .columns()
            .iter()
            .map(|c| column_values(c.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..batch.num_rows() {
            rows.push(Value::Array(columns.iter().map(|c| c[i].clone()).collect()));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use primespark_schemas::analytics::{AnalyticsEvent, ApiEvent, TaskEvent, TaskEventKind};
    use primespark_schemas::rows::{
        AgentLoadRow, Agg, AggRow, AnalyticsRow, RawRow, Rollup, TaskStateChange,
    };

    use super::*;
    use crate::nas::{write_aggregate_files, ParquetArchive};

    async fn query(ctx: &SessionContext, sql: &str) -> Vec<Value> {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        batches_to_json(&batches).unwrap()
    }

    #[tokio::test]
    async fn analytics_tables_read_what_the_writers_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_762_351_387_000_000; // 2025-11-05T14:03:07Z
        let task = TaskEvent {
            kind: TaskEventKind::Assigned,
            task_id: "t-1".into(),
            task_type: None,
            priority: None,
            agent_id: Some("spark-agent-1".into()),
            time_us: t0,
        };
        let rows = vec![
            RawRow::Analytics(AnalyticsRow {
                event: AnalyticsEvent::Task(task.clone()),
                partition: 0,
                offset: 0,
            }),
            RawRow::Analytics(AnalyticsRow {
                event: AnalyticsEvent::Api(ApiEvent {
                    event_type: "llm_generate".into(),
                    endpoint: "/api/llm/generate".into(),
                    user_id: Some("admin".into()),
                    data: Some(r#"{"model":"m"}"#.into()),
                    time_us: t0,
                }),
                partition: 0,
                offset: 1,
            }),
        ];
        ParquetArchive::new(dir.path(), "analytics.events", 1024)
            .write_roll(0, 0, 1, &rows)
            .unwrap();
        let load = AgentLoadRow {
            bucket_us: 1_762_351_200_000_000, // 14:00
            agent_id: "spark-agent-1".into(),
            assigned: 1,
            completed: 0,
            failed: 0,
            active: 1,
        };
        let windows = vec![
            AggRow {
                rollup: Rollup::Hour,
                row: Agg::Agent(load),
            },
            AggRow {
                rollup: Rollup::Minute,
                row: Agg::TaskState(TaskStateChange::Keep(task)),
            },
        ];
        write_aggregate_files(dir.path(), &windows, 1024).unwrap();

        let ctx = session(
            dir.path(),
            None,
            "edge.telemetry",
            "edge.ai.inference",
            "analytics.events",
            64 << 20,
        )
        .unwrap();
        assert_eq!(
            query(
                &ctx,
                "SELECT event_type, task_id, agent_id, endpoint, user_id, data, date, hour \
                 FROM analytics_raw ORDER BY kafka_offset"
            )
            .await,
            [
                json!([
                    "task_assigned",
                    "t-1",
                    "spark-agent-1",
                    null,
                    null,
                    null,
                    "2025-11-05",
                    "14"
                ]),
                json!([
                    "llm_generate",
                    null,
                    null,
                    "/api/llm/generate",
                    "admin",
                    "{\"model\":\"m\"}",
                    "2025-11-05",
                    "14"
                ]),
            ]
        );
        assert_eq!(
            query(&ctx, "SELECT agent_id, active FROM agent_load_1h").await,
            [json!(["spark-agent-1", 1])]
        );
        for table in [
            "task_stats_1m",
            "task_stats_1h",
            "agent_load_1m",
            "api_events_1m",
            "api_events_1h",
        ] {
            assert_eq!(
                query(&ctx, &format!("SELECT count(*) FROM {table}")).await,
                [json!([0])],
                "{table}"
            );
        }
    }
}
