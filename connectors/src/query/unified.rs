//! One table over hot and cold copies of the same rows: recent rows from PostgreSQL, older ones
//! from the Parquet archive, with no gap and no duplicate at the boundary.
//!
//! The boundary is read at every scan: the oldest time still in the hot table. Rows at or after
//! it come from the hot table, rows before it from the archive. That is exact as long as the
//! hot table only loses rows from its old end (retention deletes everything before a cutoff)
//! and every row it lost is in the archive (the archive is written before retention runs, by
//! days). Rows the archive has past the boundary are the hot table's too and are skipped; a
//! row moved out of PostgreSQL between two queries is counted once in each.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, Result, ScalarValue};
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{
    cast, col, lit, Expr, LogicalPlanBuilder, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_plan::ExecutionPlan;
use futures::future::BoxFuture;

/// The oldest time in the hot table, in microseconds since the epoch; `None` when it is empty.
pub type Boundary = Arc<dyn Fn() -> BoxFuture<'static, Result<Option<i64>>> + Send + Sync>;

/// Hot rows from one provider, older rows from another.
pub struct UnifiedTable {
    hot: Arc<dyn TableProvider>,
    cold: Arc<dyn TableProvider>,
    time_column: String,
    boundary: Boundary,
}

impl fmt::Debug for UnifiedTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnifiedTable")
            .field("time_column", &self.time_column)
            .finish()
    }
}

impl UnifiedTable {
    /// The table has `hot`'s columns; `cold` must have each of them by name (cast to `hot`'s
    /// types). `time_column` orders both sides.
    pub fn new(
        hot: Arc<dyn TableProvider>,
        cold: Arc<dyn TableProvider>,
        time_column: &str,
        boundary: Boundary,
    ) -> Self {
        Self {
            hot,
            cold,
            time_column: time_column.to_owned(),
            boundary,
        }
    }

    /// One side, its columns by name and type as the unified schema has them, restricted to
    /// its side of the boundary and to the query's filters.
    fn side(
        &self,
        name: &str,
        provider: &Arc<dyn TableProvider>,
        range: Option<Expr>,
        filters: &[Expr],
        projection: &[usize],
    ) -> Result<LogicalPlanBuilder> {
        let schema = self.schema();
        let source_schema = provider.schema();
        let mut builder =
            LogicalPlanBuilder::scan(name, provider_as_source(provider.clone()), None)?;
        let mut conditions: Vec<Expr> = filters
            .iter()
            .cloned()
            .map(unqualify)
            .collect::<Result<_>>()?;
        conditions.extend(range);
        if let Some(all) = conditions.into_iter().reduce(Expr::and) {
            builder = builder.filter(all)?;
        }
        let columns = projection
            .iter()
            .map(|i| {
                let field = schema.field(*i);
                let value = if source_schema.field_with_name(field.name()).is_ok() {
                    cast(
                        col(Column::from_name(field.name())),
                        field.data_type().clone(),
                    )
                } else {
                    cast(lit(ScalarValue::Null), field.data_type().clone())
                };
                value.alias(field.name())
            })
            .collect::<Vec<_>>();
        builder.project(columns)
    }
}

/// Filters arrive qualified with the unified table's name; each side has its own.
fn unqualify(e: Expr) -> Result<Expr> {
    e.transform(|e| match e {
        Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::from_name(c.name)))),
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

#[async_trait]
impl TableProvider for UnifiedTable {
    fn schema(&self) -> SchemaRef {
        self.hot.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Applied inside both sides (so PostgreSQL and the Parquet pruning see them), and again
        // above by DataFusion.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = self.schema();
        let all: Vec<usize> = (0..schema.fields().len()).collect();
        let projection = projection.unwrap_or(&all);
        let time_type = schema
            .field_with_name(&self.time_column)
            .map(|f| f.data_type().clone())?;
        let boundary = (self.boundary)().await?;
        let at = |us: i64| -> Expr {
            let tz = match &time_type {
                DataType::Timestamp(_, tz) => tz.clone(),
                _ => None,
            };
            lit(ScalarValue::TimestampMicrosecond(Some(us), tz))
        };
        let time = || col(Column::from_name(&self.time_column));
        let (hot_range, cold_range) = match boundary {
            Some(b) => (Some(time().gt_eq(at(b))), Some(time().lt(at(b)))),
            // Nothing hot: everything comes from the archive.
            None => (Some(lit(false)), None),
        };
        let hot = self.side("hot", &self.hot, hot_range, filters, projection)?;
        let cold = self.side("cold", &self.cold, cold_range, filters, projection)?;
        let mut plan = hot.union(cold.build()?)?;
        if let Some(n) = limit {
            plan = plan.limit(0, Some(n))?;
        }
        state.create_physical_plan(&plan.build()?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, RecordBatch, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    fn table(times: &[i64], tag: i64, with_tag: bool) -> Arc<dyn TableProvider> {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let mut fields = vec![
            Field::new("time", ts, false),
            Field::new("v", DataType::Int64, false),
        ];
        if with_tag {
            fields.push(Field::new("extra", DataType::Int64, false));
        }
        let schema = Arc::new(Schema::new(fields));
        let mut columns: Vec<Arc<dyn datafusion::arrow::array::Array>> = vec![
            Arc::new(TimestampMicrosecondArray::from(times.to_vec()).with_timezone("UTC")),
            Arc::new(Int64Array::from(vec![tag; times.len()])),
        ];
        if with_tag {
            columns.push(Arc::new(Int64Array::from(vec![0; times.len()])));
        }
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap())
    }

    async fn count(ctx: &SessionContext, sql: &str) -> Vec<(i64, i64)> {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut out = Vec::new();
        for b in batches {
            let a = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            let c = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                out.push((a.value(i), c.value(i)));
            }
        }
        out
    }

    #[tokio::test]
    async fn hot_from_the_boundary_cold_before_it() {
        // The archive holds times 1..=10 (tag 2); the hot table 6..=10 (tag 1) after retention
        // removed 1..=5. Each time must be counted once, the recent ones from the hot side.
        let cold = table(&(1..=10).collect::<Vec<_>>(), 2, true);
        let hot = table(&(6..=10).collect::<Vec<_>>(), 1, false);
        let boundary: Boundary = Arc::new(|| Box::pin(async { Ok(Some(6)) }));
        let ctx = SessionContext::new();
        ctx.register_table(
            "t",
            Arc::new(UnifiedTable::new(hot, cold.clone(), "time", boundary)),
        )
        .unwrap();
        assert_eq!(
            count(&ctx, "SELECT v, count(*) FROM t GROUP BY v ORDER BY v").await,
            vec![(1, 5), (2, 5)]
        );
        assert_eq!(
            count(&ctx, "SELECT v, count(*) FROM t WHERE time >= to_timestamp_micros(4) GROUP BY v ORDER BY v").await,
            vec![(1, 5), (2, 2)]
        );
        // Nothing hot: all from the archive.
        let empty = table(&[], 1, false);
        let none: Boundary = Arc::new(|| Box::pin(async { Ok(None) }));
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(UnifiedTable::new(empty, cold, "time", none)))
            .unwrap();
        assert_eq!(
            count(&ctx, "SELECT v, count(*) FROM t GROUP BY v").await,
            vec![(2, 10)]
        );
    }
}
