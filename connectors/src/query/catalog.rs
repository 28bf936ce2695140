//! The SQL catalog over hot and cold data.
//!
//! - schema `archive`: the Parquet listing tables of [`super::session`] (`telemetry_raw`,
//!   `device_metrics_1m`, ...), partition-pruned by `date` and `hour`;
//! - schema `pg`: PostgreSQL's tables through [`super::postgres_table::PostgresTable`] (filters,
//!   projections and limits pushed down);
//! - the default schema: every stream under its PostgreSQL name (`device_metrics`,
//!   `ai_inference_results`, `device_metrics_1m`, ...) as a [`UnifiedTable`]: recent rows from
//!   PostgreSQL, older ones from the archive, so SQL written for TimescaleDB (the dashboards)
//!   runs unchanged over all of history. PostgreSQL-only tables (`dead_letters`,
//!   `late_events`, `anomalies`) are there too, and the archive's raw tables keep their names.

use std::sync::Arc;

use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, TableProvider};
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;

use primespark_schemas::streams::{aggregate_families, raw_tables, AggregateFamily, SHARED_TABLES};

use super::postgres_table::{PgPool, PostgresTable};
use super::unified::{Boundary, UnifiedTable};
use super::QueryError;

/// (PostgreSQL table and unified name, archive table, time column) for every table the archive
/// also holds, from the table of streams: raw tables with an archive table, and every
/// aggregate table (the archive's files carry the PostgreSQL name).
fn hot_cold() -> Vec<(&'static str, &'static str, &'static str)> {
    let raw = raw_tables().filter_map(|t| t.archive.map(|a| (t.name, a.name, t.time_column)));
    let aggregates = aggregate_families()
        .flat_map(AggregateFamily::tables)
        .map(|(_, table)| (table, table, "bucket"));
    raw.chain(aggregates).collect()
}

/// Now minus `keep`, microseconds since the epoch.
fn retention_horizon_us(keep: std::time::Duration) -> i64 {
    let keep_us = i64::try_from(keep.as_micros()).unwrap_or(i64::MAX);
    chrono::Utc::now()
        .timestamp_micros()
        .saturating_sub(keep_us)
}

/// Tables only PostgreSQL has: raw tables the archive does not keep, and the shared ones.
fn hot_only() -> Vec<&'static str> {
    raw_tables()
        .filter(|t| t.archive.is_none())
        .map(|t| t.name)
        .chain(SHARED_TABLES.iter().copied())
        .collect()
}

fn df(e: impl Into<DataFusionError>) -> QueryError {
    QueryError::DataFusion(e.into())
}

/// Adds the `archive` and `pg` schemas and the unified tables to `ctx` (built by
/// [`super::session`]). Tables PostgreSQL does not have yet (migrations not run) are left out
/// with a warning.
///
/// A unified table's boundary is the oldest time in its PostgreSQL table, but never before the
/// table's retention horizon when `retention` is on: rows older than that may be gone from
/// PostgreSQL (retention deleted them) and are read from the archive, so one late row dated
/// weeks back cannot pull the boundary below rows PostgreSQL no longer has.
///
/// The tables in `archive_only` are ones the pipeline's routes ([`crate::sink::registry::Route`])
/// no longer write to PostgreSQL: their unified table reads the archive alone, whatever rows
/// PostgreSQL kept from before (the archive has those too).
pub async fn attach_postgres(
    ctx: &SessionContext,
    url: &str,
    retention: Option<&crate::postgres::RetentionConfig>,
    archive_only: &[&str],
) -> Result<(), QueryError> {
    let horizons: std::collections::HashMap<&'static str, std::time::Duration> = retention
        .filter(|r| r.enabled)
        .map(|r| r.tables().into_iter().map(|t| (t.table, t.keep)).collect())
        .unwrap_or_default();
    let pool = PgPool::new(url, 8).map_err(df)?;
    let state = ctx.state();
    let catalog_name = state.config().options().catalog.default_catalog.clone();
    let catalog = ctx
        .catalog(&catalog_name)
        .ok_or_else(|| QueryError::Encode(format!("no catalog {catalog_name}")))?;
    let pg: Arc<dyn SchemaProvider> = Arc::new(MemorySchemaProvider::new());
    let archive: Arc<dyn SchemaProvider> = Arc::new(MemorySchemaProvider::new());
    catalog.register_schema("pg", pg.clone()).map_err(df)?;
    catalog
        .register_schema("archive", archive.clone())
        .map_err(df)?;

    let mut attached = 0;
    for (name, cold_name, time) in &hot_cold() {
        let cold = ctx.table_provider(*cold_name).await.ok();
        if let Some(cold) = &cold {
            archive
                .register_table((*cold_name).to_owned(), cold.clone())
                .map_err(df)?;
        }
        let hot = match PostgresTable::discover_with_pool(pool.clone(), name).await {
            Ok(t) => Arc::new(t) as Arc<dyn TableProvider>,
            Err(e) => {
                tracing::warn!(table = name, error = %e, "postgres table not attached to sql");
                continue;
            }
        };
        pg.register_table((*name).to_owned(), hot.clone())
            .map_err(df)?;
        let Some(cold) = cold else {
            ctx.register_table(*name, hot).map_err(df)?;
            continue;
        };
        let (boundary_pool, table, column) = (pool.clone(), (*name).to_owned(), (*time).to_owned());
        let keep = horizons.get(name).copied();
        let from_archive = archive_only.contains(name);
        let boundary: Boundary = Arc::new(move || {
            if from_archive {
                return Box::pin(async { Ok(None) });
            }
            let (pool, table, column) = (boundary_pool.clone(), table.clone(), column.clone());
            Box::pin(async move {
                let oldest = pool
                    .min_time_us(&table, &column)
                    .await
                    .map_err(DataFusionError::from)?;
                Ok(oldest.map(|t| match keep {
                    Some(keep) => t.max(retention_horizon_us(keep)),
                    None => t,
                }))
            })
        });
        // The archive's table of the same name gives way to the unified one (still in
        // `archive`).
        if cold_name == name {
            ctx.deregister_table(*name).map_err(df)?;
        }
        ctx.register_table(
            *name,
            Arc::new(UnifiedTable::new(hot, cold, time, boundary)),
        )
        .map_err(df)?;
        attached += 1;
    }
    for name in &hot_only() {
        match PostgresTable::discover_with_pool(pool.clone(), name).await {
            Ok(t) => {
                let t: Arc<dyn TableProvider> = Arc::new(t);
                pg.register_table((*name).to_owned(), t.clone())
                    .map_err(df)?;
                ctx.register_table(*name, t).map_err(df)?;
            }
            Err(e) => {
                tracing::warn!(table = name, error = %e, "postgres table not attached to sql")
            }
        }
    }
    tracing::info!(target_db = %pool.target(), unified = attached, "sql catalog spans postgres and the archive");
    Ok(())
}

/// Registers the seeds' aggregate names ([`primespark_schemas::ddl::SEED_VIEWS`]:
/// `hourly_metrics`, `hourly_device_metrics`, `daily_inference_stats`) as views over the tables
/// of the default schema, the same definitions PostgreSQL gets. Call it last: a view reads the
/// table registered under its base name when it is created (the unified one once
/// [`attach_postgres`] ran, the archive's otherwise).
pub async fn register_seed_views(ctx: &SessionContext) -> Result<(), QueryError> {
    for view in primespark_schemas::ddl::SEED_VIEWS {
        ctx.sql(&format!(
            "CREATE OR REPLACE VIEW {} AS {}",
            view.name, view.select
        ))
        .await
        .map_err(|e| QueryError::Encode(format!("creating view {}: {e}", view.name)))?;
    }
    tracing::debug!(
        views = primespark_schemas::ddl::SEED_VIEWS.len(),
        "seed views registered"
    );
    Ok(())
}
