//! [`PostgresTable`], the DataFusion table: its schema (given or discovered), what it can push
//! down, and the scan it plans.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::exec::{PostgresScanExec, ScanMode, ScanSpec};
use super::pool::PgPool;
use super::pushdown::Translator;
use super::types::{arrow_type_for, quote_ident, ColumnKind, TableName};
use super::{PgTableError, DEFAULT_POOL_SIZE};

/// A PostgreSQL table as a DataFusion table, pushing projections, filters and limits into the
/// SQL it sends (see the module docs).
#[derive(Debug, Clone)]
pub struct PostgresTable {
    pool: PgPool,
    table: TableName,
    schema: SchemaRef,
    kinds: Vec<ColumnKind>,
}

impl PostgresTable {
    /// A table read through `pool`, seen by DataFusion with `schema`. `table` may be
    /// schema-qualified (`schema.table`); the schema's field names are the column names. Fails
    /// if a field's type cannot be produced: booleans, `Int16/32/64`, `Float32/64`, strings,
    /// binaries, `Date32` and timestamps (any unit, with or without zone) can.
    pub fn new(pool: PgPool, table: &str, schema: SchemaRef) -> Result<Self, PgTableError> {
        let kinds = schema
            .fields()
            .iter()
            .map(|f| {
                ColumnKind::of(f.data_type()).ok_or_else(|| PgTableError::UnsupportedArrowType {
                    table: table.to_owned(),
                    column: f.name().clone(),
                    data_type: f.data_type().clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            pool,
            table: TableName::parse(table),
            schema,
            kinds,
        })
    }

    /// Connects to `url` and builds the schema from `information_schema.columns` (in column
    /// order; `numeric` as `Float64`, `json`/`jsonb` as `Utf8`, `timestamptz` as
    /// `Timestamp(µs, "UTC")`). Uses a pool of [`DEFAULT_POOL_SIZE`].
    pub async fn discover(url: &str, table: &str) -> Result<Self, PgTableError> {
        Self::discover_with_pool(PgPool::new(url, DEFAULT_POOL_SIZE)?, table).await
    }

    /// [`Self::discover`] through an existing pool.
    pub async fn discover_with_pool(pool: PgPool, table: &str) -> Result<Self, PgTableError> {
        let name = TableName::parse(table);
        let mut conn = pool.get().await?;
        let client = conn.client().ok_or(PgTableError::PoolClosed)?;
        let rows = client
            .query(
                "SELECT column_name::text, udt_name::text, is_nullable::text \
                 FROM information_schema.columns \
                 WHERE table_schema::text = COALESCE($1::text, current_schema()::text) \
                   AND table_name::text = $2::text \
                 ORDER BY ordinal_position",
                &[&name.schema, &name.name],
            )
            .await
            .map_err(|e| PgTableError::query(table, e))?;
        conn.reusable = true;
        drop(conn);
        if rows.is_empty() {
            return Err(PgTableError::TableNotFound {
                table: table.to_owned(),
            });
        }
        let mut fields = Vec::with_capacity(rows.len());
        for row in &rows {
            let column: String = row.try_get(0).map_err(|e| PgTableError::query(table, e))?;
            let udt: String = row.try_get(1).map_err(|e| PgTableError::query(table, e))?;
            let nullable: String = row.try_get(2).map_err(|e| PgTableError::query(table, e))?;
            let data_type =
                arrow_type_for(&udt).ok_or_else(|| PgTableError::UnsupportedPgType {
                    table: table.to_owned(),
                    column: column.clone(),
                    pg_type: udt.clone(),
                })?;
            fields.push(Field::new(column, data_type, nullable == "YES"));
        }
        tracing::debug!(table, columns = fields.len(), "discovered postgres table");
        Self::new(pool, table, Arc::new(Schema::new(fields)))
    }

    /// The table's name as given.
    pub fn table_name(&self) -> String {
        self.table.to_string()
    }

    /// The pool it reads through.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn translator(&self) -> Translator<'_> {
        Translator {
            schema: &self.schema,
            kinds: &self.kinds,
        }
    }

    /// The statement a scan sends.
    fn scan_sql(
        &self,
        projection: &[usize],
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<(String, ScanMode)> {
        let translator = self.translator();
        let mut conditions = Vec::with_capacity(filters.len());
        for f in filters {
            // DataFusion passes only filters we called Exact; dropping one would be wrong rows.
            let sql = translator.predicate(f).ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "filter {f} was not accepted for pushdown into {}",
                    self.table
                ))
            })?;
            conditions.push(sql);
        }
        let from = self.table.sql();
        let where_clause = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        let limit_clause = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
        if projection.is_empty() {
            // No columns wanted (`count(*)`): let the server count.
            let sql = if limit.is_some() {
                format!(
                    "SELECT count(*) FROM (SELECT FROM {from}{where_clause}{limit_clause}) AS s"
                )
            } else {
                format!("SELECT count(*) FROM {from}{where_clause}")
            };
            return Ok((sql, ScanMode::Count));
        }
        let columns = projection
            .iter()
            .map(|&i| {
                let field = self.schema.field(i);
                format!("{}::{}", quote_ident(field.name()), self.kinds[i].pg.name())
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok((
            format!("SELECT {columns} FROM {from}{where_clause}{limit_clause}"),
            ScanMode::Rows,
        ))
    }
}

#[async_trait]
impl TableProvider for PostgresTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        let translator = self.translator();
        Ok(filters
            .iter()
            .map(|f| match translator.predicate(f) {
                Some(_) => TableProviderFilterPushDown::Exact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let projection: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&projection)?);
        let (sql, mode) = self.scan_sql(&projection, filters, limit)?;
        let kinds = projection.iter().map(|&i| self.kinds[i].clone()).collect();
        Ok(Arc::new(PostgresScanExec::new(ScanSpec {
            pool: self.pool.clone(),
            table: self.table.to_string(),
            sql,
            mode,
            schema,
            kinds,
        })))
    }
}
