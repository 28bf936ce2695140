//! The HTTP door: `POST /v1/sql` and `GET /v1/tables`, results as JSON, CSV or Arrow IPC.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type, UInt64Type};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::Deserialize;
use serde_json::{json, Value};

use super::service::{Principal, QueryOutput, QueryService};
use super::QueryError;

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

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let status = match &self {
            QueryError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            QueryError::Forbidden(_) => StatusCode::FORBIDDEN,
            QueryError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            QueryError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            e @ QueryError::DataFusion(_) if e.is_storage() => StatusCode::INTERNAL_SERVER_ERROR,
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

/// The key a request carries: `Authorization: Bearer <token>`, `X-API-Key: <token>`, or
/// `Authorization: Basic` with the key as the password (what a browser sends after its login
/// prompt; the user name is not looked at). `Some(true)` in the second place: it came as Basic.
fn presented_key(headers: &HeaderMap) -> (Option<String>, bool) {
    use base64::Engine as _;
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if let Some(v) = auth {
        if let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return (Some(t.trim().to_owned()), false);
        }
        if let Some(b) = v
            .strip_prefix("Basic ")
            .or_else(|| v.strip_prefix("basic "))
        {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok());
            // A malformed header is a wrong key (counted as a failure), not a missing one.
            let key = decoded
                .and_then(|d| d.split_once(':').map(|(_, p)| p.to_owned()))
                .unwrap_or_default();
            return (Some(key), true);
        }
    }
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned());
    (key, false)
}

/// Whether a browser says the request comes from another site: `Sec-Fetch-Site: cross-site`,
/// or an `Origin` whose authority is not the request's `Host`.
fn cross_site(headers: &HeaderMap) -> bool {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("cross-site"))
    {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let authority = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    !authority.eq_ignore_ascii_case(host)
}

/// The caller, from `Authorization: Bearer <token>`, `X-API-Key: <token>`, or Basic with the
/// key as password. Browsers send Basic credentials on their own, also on requests another
/// site starts: with Basic, a cross-site request is refused (the console's pages and calls are
/// same-origin).
fn caller(
    service: &QueryService,
    headers: &HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Result<Principal, QueryError> {
    let (key, basic) = presented_key(headers);
    if basic && !service.is_open() && cross_site(headers) {
        return Err(QueryError::Forbidden(
            "a cross-site request with browser credentials".into(),
        ));
    }
    service.authenticate_token_from(peer.map(|Extension(ConnectInfo(p))| p.ip()), key.as_deref())
}

/// Whether `host` (a `Host` header: name or address, with or without a port) names this
/// machine's loopback.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
    };
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An endpoint without keys (loopback only) answers only requests addressed to a loopback
/// name: a web page elsewhere that rebinds its own host name to 127.0.0.1 (DNS rebinding) gets
/// 403, not the console or the SQL door. Endpoints with keys are not affected.
pub fn guard_host(router: Router, service: Arc<QueryService>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(service, host_guard))
}

async fn host_guard(
    State(service): State<Arc<QueryService>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if service.is_open() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
        if let Some(host) = host {
            if !loopback_host(&host) {
                tracing::warn!(host = %host, "request to an open endpoint under a foreign host name refused");
                return (
                    StatusCode::FORBIDDEN,
                    Json(json!({"error": "this endpoint has no API keys and answers only to localhost or a loopback address"})),
                )
                    .into_response();
            }
        }
    }
    next.run(request).await
}

/// Wraps the console's routes in the endpoint's keys: any role may look. A caller without a
/// key gets 401 with a Basic challenge (a browser then asks for the key, as the password),
/// and nothing of the pipeline. Without keys (a loopback-only endpoint) the console is open.
pub fn guard_console(console: Router, service: Arc<QueryService>) -> Router {
    console.layer(axum::middleware::from_fn_with_state(service, console_guard))
}

async fn console_guard(
    State(service): State<Arc<QueryService>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if service.is_open() {
        return next.run(request).await;
    }
    match caller(&service, request.headers(), peer) {
        Ok(_) => next.run(request).await,
        Err(e @ QueryError::Unauthenticated(_)) => {
            let mut response = (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{e}\nThe console takes an API key of this endpoint as the password (any user name).\n"),
            )
                .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"primespark\", charset=\"UTF-8\""),
            );
            response
        }
        Err(e) => e.into_response(),
    }
}

/// Wraps the operational routes (`/metrics`, `/readyz`, `/healthz`) in the endpoint's keys:
/// with keys configured, `/metrics` needs one (any role; Prometheus sends it as a bearer
/// token), and `/readyz` and `/healthz` answer a caller without one with their status code
/// only (probes need no secret, and learn no topic, partition, lag or sink error). Without
/// keys the endpoint is loopback-only (validated) and these stay open.
pub fn guard_ops(ops: Router, service: Arc<QueryService>) -> Router {
    ops.layer(axum::middleware::from_fn_with_state(service, ops_guard))
}

async fn ops_guard(
    State(service): State<Arc<QueryService>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if service.is_open() {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    match caller(&service, request.headers(), peer) {
        Ok(_) => next.run(request).await,
        Err(e) if path == "/readyz" || path == "/healthz" => {
            if matches!(e, QueryError::RateLimited { .. }) {
                return e.into_response();
            }
            let status = next.run(request).await.status();
            let word = if status.is_success() {
                "ok\n"
            } else {
                "not ready\n"
            };
            (status, word).into_response()
        }
        Err(e) => e.into_response(),
    }
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
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Json<SqlRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    // Authentication comes before the body is looked at: an anonymous caller learns nothing.
    let who = match caller(&service, &headers, peer) {
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
async fn tables(
    State(service): State<Arc<QueryService>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = caller(&service, &headers, peer) {
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
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn keys_come_as_bearer_api_key_or_basic_password() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer abc ")])),
            (Some("abc".into()), false)
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "k1")])),
            (Some("k1".into()), false)
        );
        // "ops:s3cr:et" -> the password is everything after the first colon.
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic b3BzOnMzY3I6ZXQ=")])),
            (Some("s3cr:et".into()), true)
        );
        // Garbage Basic is a wrong (empty) key, so it is counted, not treated as absent.
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic !!!")])),
            (Some(String::new()), true)
        );
        assert_eq!(presented_key(&HeaderMap::new()), (None, false));
    }

    #[test]
    fn cross_site_by_fetch_metadata_or_origin() {
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!cross_site(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(cross_site(&headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!cross_site(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(cross_site(&headers(&[("origin", "null"), ("host", "a")])));
        assert!(!cross_site(&headers(&[("host", "a")])));
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:8080",
            "localhost.",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.nip.io",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "",
        ] {
            assert!(!loopback_host(h), "{h}");
        }
    }
}
