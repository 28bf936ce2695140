//! The DataFusion session the query service runs in: the PostgreSQL dialect, the functions
//! of [`super::functions`], a memory pool shared by all queries, and the Parquet archive's
//! listing tables over both tiers.

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use object_store::ObjectStore;
use primespark_schemas::columnar;
use primespark_schemas::rows::Rollup;

use super::QueryError;

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
/// Every aggregate table also has its 1-hour and 1-day rollups (`*_1h`, `*_1d`) with the same
/// columns.
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
    // Every rollup of a family has the columns of its 1-minute table.
    let families: [(&str, SchemaFn); 6] = [
        ("device_metrics", columnar::device_metrics_1m),
        ("inference_stats", columnar::inference_stats_1m),
        ("routing_stats", columnar::routing_stats_1m),
        ("task_stats", columnar::task_stats_1m),
        ("agent_load", columnar::agent_load_1m),
        ("api_events", columnar::api_events_1m),
    ];
    for (family, schema) in families {
        for rollup in Rollup::ALL {
            let name = format!("{family}_{}", rollup.suffix());
            register_listing(
                &ctx,
                &name,
                nas_root,
                &format!("table={name}"),
                &["date"],
                schema(),
            )?;
        }
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
    Ok(ctx)
}

/// A schema of `primespark_schemas::columnar`.
type SchemaFn = fn() -> datafusion::arrow::datatypes::SchemaRef;

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

#[cfg(test)]
mod tests {
    use primespark_schemas::analytics::{AnalyticsEvent, ApiEvent, TaskEvent, TaskEventKind};
    use primespark_schemas::rows::{
        AgentLoadRow, Agg, AggRow, AnalyticsRow, RawRow, Rollup, TaskStateChange,
    };

    use serde_json::{json, Value};

    use super::*;
    use crate::nas::{write_aggregate_files, ParquetArchive};
    use crate::query::batches_to_json;

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
            RawRow::Analytics(Box::new(AnalyticsRow {
                event: AnalyticsEvent::Task(task.clone()),
                partition: 0,
                offset: 0,
            })),
            RawRow::Analytics(Box::new(AnalyticsRow {
                event: AnalyticsEvent::Api(ApiEvent {
                    event_type: "llm_generate".into(),
                    endpoint: "/api/llm/generate".into(),
                    user_id: Some("admin".into()),
                    data: Some(r#"{"model":"m"}"#.into()),
                    time_us: t0,
                }),
                partition: 0,
                offset: 1,
            })),
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
