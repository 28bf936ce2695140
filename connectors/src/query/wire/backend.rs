//! What the wire endpoint needs from the query service: [`SqlBackend`], its errors and the
//! description of a planned statement.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::tokenizer::Token;

use super::credential::ScramVerifier;
use super::lexer::{highest_param, lex};
use super::MAX_PARAMS;

/// What the wire endpoint needs from the query service.
#[async_trait]
pub trait SqlBackend: Send + Sync + 'static {
    /// The SCRAM-SHA-256 verifier of `user`, or `None` when there is no such user (the
    /// endpoint then runs the exchange against a decoy, so the answer is the same as for a
    /// wrong password). Called once per login on the connection's task: it must not block.
    fn credential(&self, user: &str) -> Option<ScramVerifier>;

    /// Runs one SQL statement for `user` with `params` as the values of its `$1..$n`; the
    /// result schema and batches, or an error with a SQLSTATE (e.g. "42501"
    /// insufficient_privilege, "57014" query_canceled, "42601"/"42P01"/"XX000").
    ///
    /// Plan `sql` as it is, placeholders and all, and bind `params` into the plan
    /// (`LogicalPlan::with_param_values`): never write them into the SQL. `params` is empty when
    /// the statement has no placeholders.
    async fn execute(
        &self,
        user: &str,
        sql: &str,
        params: Vec<ScalarValue>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), BackendError>;

    /// [`execute`](Self::execute) under the connection's `SET` settings (`name`, `value`, as
    /// [`check_setting`](Self::check_setting) returned them). The default has no sessions and
    /// refuses any.
    async fn execute_in(
        &self,
        user: &str,
        sql: &str,
        params: Vec<ScalarValue>,
        settings: &[(String, String)],
    ) -> Result<(SchemaRef, Vec<RecordBatch>), BackendError> {
        if settings.is_empty() {
            self.execute(user, sql, params).await
        } else {
            Err(BackendError::new(
                "0A000",
                "session settings are not supported",
            ))
        }
    }

    /// Whether a connection may `SET` `name` to `value`; the name to store. The default
    /// refuses every setting of the backend's own (`datafusion.*`).
    fn check_setting(&self, name: &str, _value: &str) -> Result<String, BackendError> {
        Err(BackendError::new(
            "55P02",
            format!("parameter \"{name}\" cannot be changed"),
        ))
    }

    /// Plans one statement without running it: its result columns and the types of its `$n`
    /// parameters, for the extended protocol's Describe.
    ///
    /// The default probes with [`execute`](Self::execute): every parameter bound to `NULL`, a
    /// query wrapped in `SELECT * FROM (...) LIMIT 0` (when DataFusion refuses the wrapping, as
    /// for a join with two columns of one name, the query runs once in full), and every
    /// parameter reported as text. So each prepared statement costs a second, audited
    /// execution, and clients must send parameters as text or declare their types. A backend
    /// holding a `SessionContext` should instead plan the statement under its own checks and
    /// return [`Description::from_plan`]: that infers parameter types from the columns they
    /// meet, as PostgreSQL does.
    async fn describe(&self, user: &str, sql: &str) -> Result<Description, BackendError> {
        describe_by_probe(self, user, sql).await
    }
}

/// An error from [`SqlBackend`], sent to the client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// The five-character SQLSTATE, e.g. "42501".
    pub sqlstate: String,
    /// The message for the client.
    pub message: String,
}

impl BackendError {
    /// An error with this SQLSTATE and message.
    pub fn new(sqlstate: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            sqlstate: sqlstate.into(),
            message: message.into(),
        }
    }
}

/// The shape of a planned statement, from [`SqlBackend::describe`].
#[derive(Debug, Clone)]
pub struct Description {
    /// The result columns; no fields for a statement that returns no rows.
    pub schema: SchemaRef,
    /// The type of each parameter `$1..$n` by position; `None` where the plan leaves it open
    /// (the client then sends it as text).
    pub parameters: Vec<Option<DataType>>,
}

impl Description {
    /// The description of a DataFusion logical plan, placeholders and all.
    ///
    /// Plan the statement with `SessionState::create_logical_plan` (or `statement_to_plan`)
    /// before binding parameters: DataFusion infers a placeholder's type from the column it is
    /// compared with, and leaves it open elsewhere (`SELECT $1`).
    pub fn from_plan(plan: &LogicalPlan) -> Result<Self, BackendError> {
        let types = plan.get_parameter_types().map_err(|e| {
            // The only failure is one placeholder used with two types.
            BackendError::new("42P08", e.to_string())
        })?;
        let mut parameters = Vec::new();
        for (id, data_type) in types {
            // DataFusion also names placeholders `$name`; PostgreSQL clients only send `$n`.
            let Some(n) = id.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) else {
                return Err(BackendError::new(
                    "42P02",
                    format!("parameter {id} is not numbered like $1"),
                ));
            };
            if n == 0 || n > MAX_PARAMS {
                return Err(BackendError::new(
                    "42P02",
                    format!("there is no parameter {id}"),
                ));
            }
            if parameters.len() < n {
                parameters.resize(n, None);
            }
            parameters[n - 1] = data_type;
        }
        Ok(Self {
            schema: Arc::new(plan.schema().as_arrow().clone()),
            parameters,
        })
    }
}

/// [`SqlBackend::describe`]'s default: run the statement with every parameter bound to NULL,
/// limited to no rows where it is a query.
pub(super) async fn describe_by_probe<B: SqlBackend + ?Sized>(
    backend: &B,
    user: &str,
    sql: &str,
) -> Result<Description, BackendError> {
    let params = highest_param(sql);
    if params > MAX_PARAMS {
        return Err(BackendError::new(
            "42P02",
            format!("there is no parameter ${params}"),
        ));
    }
    let tokens = lex(sql);
    let first = tokens.iter().find(|t| t.is_significant());
    let is_query = first.is_some_and(|t| {
        t.is(&Token::LParen)
            || t.word()
                .is_some_and(|w| ["select", "with", "values", "table"].contains(&w.as_str()))
    });
    let nulls = vec![ScalarValue::Null; params];
    let schema = if is_query {
        let limited = format!("SELECT * FROM ({sql}\n) AS primespark_describe LIMIT 0");
        match backend.execute(user, &limited, nulls.clone()).await {
            Ok((schema, _)) => schema,
            Err(_) => backend.execute(user, sql, nulls).await?.0,
        }
    } else {
        backend.execute(user, sql, nulls).await?.0
    };
    Ok(Description {
        schema,
        parameters: vec![None; params],
    })
}
