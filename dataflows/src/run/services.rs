//! The services a streaming run starts beside its dataflows: the SQL endpoints (HTTP with
//! `/metrics` and `/readyz`, and the PostgreSQL wire protocol), tiering of the NAS to the
//! bucket, and retention on plain PostgreSQL. Each stops when the shutdown flag is raised.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use primespark_connectors::postgres::{self, Backend};
use primespark_connectors::query;
use primespark_connectors::InvalidConfig;
use primespark_schemas::streams::StreamKind;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use super::RunError;
use crate::config::Config;

/// The tasks of the running services.
#[derive(Default)]
pub struct Services {
    http: Option<JoinHandle<Result<(), query::QueryError>>>,
    tiering: Option<JoinHandle<()>>,
    retention: Option<JoinHandle<()>>,
}

impl Services {
    /// Starts the SQL endpoints (a standby serves them too, and says on `/readyz` why it is
    /// not ready).
    pub fn start_query(
        rt: &Runtime,
        config: &Config,
        qc: &query::QueryConfig,
        shutdown: &Arc<AtomicBool>,
    ) -> Result<Self, RunError> {
        Ok(Self {
            http: Some(start_query(rt, config, qc, shutdown)?),
            ..Self::default()
        })
    }

    /// Starts tiering and retention: only in the process that holds the writer lease, so one
    /// elected process runs them.
    pub fn start_writers(
        &mut self,
        rt: &Runtime,
        config: &Config,
        backend: Option<Backend>,
        shutdown: &Arc<AtomicBool>,
    ) -> Result<(), RunError> {
        self.tiering = start_tiering(rt, config, shutdown)?;
        self.retention = start_retention(rt, config, backend, shutdown);
        Ok(())
    }

    /// Waits for the services to stop (the shutdown flag is raised by now).
    pub fn stop(self, rt: &Runtime) {
        if let Some(server) = self.http {
            let _ = rt.block_on(server);
        }
        if let Some(task) = self.tiering {
            // A pass in flight finishes its current file at most; files move whole or not.
            let _ =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await });
        }
        if let Some(task) = self.retention {
            // Deletes are batched and idempotent: a pass cut short continues next run.
            task.abort();
            let _ = rt.block_on(task);
        }
    }
}

/// Resolves once `flag` is raised.
async fn raised(flag: Arc<AtomicBool>) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sleeps `interval` or until `stop`, whichever comes first.
async fn pause(interval: Duration, stop: &AtomicBool) {
    let until = Instant::now() + interval;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The SQL session, the wire endpoint (when `query.pg_addr` is set) and the HTTP endpoint.
/// `qc` is `config.query` with its secrets resolved.
fn start_query(
    rt: &Runtime,
    config: &Config,
    qc: &query::QueryConfig,
    shutdown: &Arc<AtomicBool>,
) -> Result<JoinHandle<Result<(), query::QueryError>>, RunError> {
    let addr = qc.validate()?;
    // The bucket's tier of the archive too, when there is one: files tiering moved (or direct
    // mode wrote) stay in SQL.
    let bucket = config
        .s3
        .enabled
        .then(|| primespark_connectors::s3::archive_bucket(&config.s3))
        .transpose()?;
    let ctx = query::session(
        &config.nas.path,
        bucket,
        &config.kafka.topics.telemetry,
        &config.kafka.topics.inference,
        &config.kafka.topics.events,
        qc.memory_limit_mb.saturating_mul(1 << 20),
    )?;
    query::cap_functions(&ctx, qc.max_value_bytes);
    if config.postgres.enabled {
        // Hot rows from PostgreSQL, older ones from the archive, under the same names.
        let routes = config.routes.resolved(true, config.nas.enabled);
        let archive_only: Vec<&str> = routes
            .iter()
            .flat_map(|(kind, route)| route.archive_only_tables(kind.def()))
            .collect();
        rt.block_on(query::catalog::attach_postgres(
            &ctx,
            &config.postgres.config.url,
            Some(&config.postgres.config.retention),
            &archive_only,
        ))?;
    }
    rt.block_on(query::catalog::register_seed_views(&ctx))?;
    if qc.api_keys.is_empty() {
        tracing::warn!(%addr, "no [[query.api_keys]]: the SQL endpoint is open to local callers as reader");
    }
    let service = Arc::new(query::QueryService::new(ctx, qc)?);
    // Both doors serve the same certificate (validated: both paths or neither).
    let tls_files = qc.tls_cert.as_deref().zip(qc.tls_key.as_deref());
    if let Some(pg_addr) = &qc.pg_addr {
        let pg_addr: SocketAddr = pg_addr
            .parse()
            .map_err(|e| InvalidConfig::new("query.pg_addr", format!("{e}")))?;
        let tls = tls_files
            .map(|(cert, key)| {
                query::pgwire::tls_acceptor(cert, key)
                    .map_err(|e| InvalidConfig::new("query.tls_cert", tls_reason(&e)))
            })
            .transpose()?;
        let backend: Arc<dyn query::pgwire::SqlBackend> =
            Arc::new(query::service::WireBackend(service.clone()));
        let stop = shutdown.clone();
        let options = query::pgwire::WireOptions {
            require_tls: qc.require_tls(addr),
            max_connections: qc.max_connections,
            login_failures_per_minute: qc.login_failures_per_minute,
            max_message_bytes: qc.max_body_bytes,
        };
        rt.spawn(async move {
            let served = query::pgwire::serve(pg_addr, backend, tls, options, raised(stop)).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "postgres wire endpoint failed");
            }
        });
    }
    let streams = StreamKind::ALL
        .into_iter()
        .map(|kind| crate::console::StreamInfo {
            name: kind.name().to_owned(),
            topic: config.kafka.topics.of(kind).to_owned(),
        })
        .collect();
    let router = query::router(service.clone(), qc.max_body_bytes)
        .merge(query::guard_ops(crate::ops::routes(), service.clone()))
        .merge(query::guard_console(
            crate::console::routes(streams),
            service.clone(),
        ));
    let router = query::guard_host(router, service);
    let scheme = if tls_files.is_some() { "https" } else { "http" };
    tracing::info!(console = %format!("{scheme}://{addr}/"), "web console and SQL endpoint");
    let http_tls = tls_files
        .map(|(cert, key)| {
            query::tls::http_acceptor(cert, key)
                .map_err(|e| InvalidConfig::new("query.tls_cert", tls_reason(&e)))
        })
        .transpose()?;
    let options = query::HttpOptions {
        header_timeout: qc.http_header_timeout,
        max_connections: qc.http_max_connections,
        max_connections_per_address: qc.http_max_connections_per_address,
        request_timeout: qc.timeout + qc.http_header_timeout,
    };
    Ok(rt.spawn(query::serve(
        addr,
        router,
        http_tls,
        options,
        raised(shutdown.clone()),
    )))
}

/// Cold tier: NAS files older than `tier.after` move to the bucket.
fn start_tiering(
    rt: &Runtime,
    config: &Config,
    shutdown: &Arc<AtomicBool>,
) -> Result<Option<JoinHandle<()>>, RunError> {
    if !config.s3.enabled {
        return Ok(None);
    }
    let tierer =
        primespark_connectors::s3::Tierer::new(&config.s3, &config.nas.path, config.tier.after)?;
    let (interval, stop) = (config.tier.interval, shutdown.clone());
    tracing::info!(bucket = %config.s3.bucket, prefix = %config.s3.prefix, after = ?config.tier.after, "tiering the NAS to object storage");
    Ok(Some(rt.spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let report = tierer.tier_once(std::time::SystemTime::now()).await;
            if report.moved + report.failed > 0 {
                tracing::info!(
                    moved = report.moved,
                    bytes = report.bytes,
                    failed = report.failed,
                    "tiering pass"
                );
            }
            pause(interval, &stop).await;
        }
    })))
}

/// Retention on plain PostgreSQL: the pipeline deletes expired rows itself (process 0 only;
/// on TimescaleDB the policies installed at start-up do it, and only the plain tables, dead
/// letters and late events, are left to it).
fn start_retention(
    rt: &Runtime,
    config: &Config,
    backend: Option<Backend>,
    shutdown: &Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    let retention = config.postgres.config.retention.clone();
    if backend.is_none() || !retention.enabled || config.runtime.process_id != 0 {
        return None;
    }
    let (url, stop) = (config.postgres.config.url.clone(), shutdown.clone());
    let plain = backend == Some(Backend::Plain);
    Some(rt.spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let pass = async {
                let client = postgres::connect(&url).await?;
                postgres::retention::delete_expired(&client, &retention, !plain).await
            };
            if let Err(e) = pass.await {
                tracing::warn!(error = %e, "retention pass failed; retried at the next interval");
            }
            pause(retention.interval, &stop).await;
        }
    }))
}

/// A TLS error for a config message: what is unusable and why (the source is the reason the
/// operator needs; `Display` alone names only the files).
fn tls_reason(e: &dyn std::error::Error) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}
