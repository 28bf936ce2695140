//! The query service behind both endpoints (HTTP and the PostgreSQL wire protocol): who may
//! ask (API keys, wire users, roles), what they may run (read-only SQL over the registered
//! tables), and within which limits (rate, timeout, memory, rows). Every query leaves one audit
//! line (target `primespark::audit`) and moves the query metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::ScalarValue;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{ObjectType, Statement};
use sha2::{Digest, Sha256};

use super::config::{QueryConfig, Role};
use super::pgwire::ScramVerifier;
use super::QueryError;
use crate::metrics::{QueryExecuted, QueryRetried};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Key or user name (audit log, rate limit).
    pub name: String,
    /// What it may run.
    pub role: Role,
}

/// A finished query.
#[derive(Debug, Clone)]
pub struct QueryOutput {
    /// Result schema.
    pub schema: SchemaRef,
    /// At most `max_rows` rows, and `max_result_bytes` of Arrow data.
    pub batches: Vec<RecordBatch>,
    /// Rows in `batches`.
    pub rows: usize,
    /// The result had more than `max_rows` rows or `max_result_bytes` bytes and was cut.
    pub truncated: bool,
}

/// Functions that would read files or URLs. None is registered today; naming them here keeps
/// a future registration (or a DataFusion default) from opening that door silently.
const FILE_FUNCTIONS: &[&str] = &[
    "read_csv",
    "read_parquet",
    "read_json",
    "read_ndjson",
    "read_avro",
    "read_arrow",
    "parquet_metadata",
    "parquet_scan",
    "csv_scan",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "lo_import",
];

/// The caller of an endpoint without API keys.
const ANONYMOUS: &str = "anonymous";

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The query service.
pub struct QueryService {
    ctx: SessionContext,
    max_rows: usize,
    max_result_bytes: usize,
    timeout: Duration,
    /// Hex SHA-256 of a token -> its holder.
    keys: HashMap<String, Principal>,
    /// Wrong API keys per client address.
    auth_failures: super::limiter::LoginLimiter,
    /// Wire users -> (principal, SCRAM verifier).
    users: HashMap<String, (Principal, ScramVerifier)>,
    /// No keys configured (loopback only, checked by the config): callers are anonymous readers.
    open: bool,
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
    executor: Executor,
}

/// Queries run on their own runtime: a CPU-heavy query cannot starve the pipeline's I/O tasks
/// or the timer that cancels it, and is aborted there at its next yield.
struct Executor {
    handle: tokio::runtime::Handle,
    /// Dropping it ends the runtime's thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Executor {
    fn start(threads: usize) -> Result<Self, QueryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("primespark-query")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()
            .map_err(|e| QueryError::Encode(format!("starting the query runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Not `primespark-query`: that name is the (niced) threads that run queries.
        std::thread::Builder::new()
            .name("query-runtime".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Running queries are dropped with the runtime, off any async context.
                runtime.shutdown_background();
            })
            .map_err(|e| QueryError::Encode(format!("starting the query runtime: {e}")))?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

/// The niceness of the query threads: when queries and ingestion want the same cores, the
/// kernel gives the pipeline's workers about ten times the queries' share.
pub const QUERY_NICENESS: i32 = 10;

/// Lowers the calling thread's scheduling priority to [`QUERY_NICENESS`] (Linux sets it per
/// thread; elsewhere nothing happens).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // No pid: the calling thread (Linux keeps a niceness per thread).
        if let Err(e) = rustix::process::setpriority_process(None, QUERY_NICENESS) {
            tracing::warn!(error = %e, "cannot lower the query threads' priority: queries compete with ingestion as equals");
        }
    }
}

/// Threads of the query runtime: `query.threads`, or half the cores (at least one), so that a
/// query's parallel plan can never take every core from ingestion.
pub fn query_threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    (cores / 2).max(1)
}

/// The bytes of Arrow data `batch` holds (its slice of shared buffers, not their whole).
fn batch_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// Aborts the query's task when dropped: after its timeout, or with the caller's future.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `plan` with every operator's output made cooperative (DataFusion's `CooperativeExec`): each
/// batch spends tokio's task budget, so the query's task yields every few batches wherever
/// the batches come from. An aborted task stops at its next yield; DataFusion alone makes only
/// the scans cooperative, and an operator that makes many batches of few inputs (a cross join)
/// never yielded, so a cancelled query kept its core busy until it finished.
fn yielding_everywhere(
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>, QueryError> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::physical_plan::coop::CooperativeExec;
    Ok(plan
        .transform_up(|node| {
            if node.name() == "CooperativeExec" {
                return Ok(Transformed::no(node));
            }
            let wrapped: Arc<dyn datafusion::physical_plan::ExecutionPlan> =
                Arc::new(CooperativeExec::new(node));
            Ok(Transformed::yes(wrapped))
        })?
        .data)
}

impl std::fmt::Debug for QueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the hashes.
        f.debug_struct("QueryService")
            .field("keys", &self.keys.len())
            .field("users", &self.users.len())
            .field("open", &self.open)
            .finish()
    }
}

/// The hex SHA-256 of a secret (what `[[query.api_keys]]` stores).
pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SCRAM-SHA-256 verifier of a password in PostgreSQL's stored form (what
/// `[[query.users]]` stores).
pub fn hash_password(password: &str) -> Result<String, QueryError> {
    if password.is_empty() {
        return Err(QueryError::Encode("an empty password".into()));
    }
    Ok(ScramVerifier::from_password(password, super::pgwire::DEFAULT_ITERATIONS).to_string())
}

/// Settings a wire session may change for itself with `SET`: how plans are made and shown.
/// Everything else (`datafusion.runtime.*`: spill directory, memory, file-listing and metadata
/// caches; `datafusion.execution.*` partitions and batch sizes; catalog and object-store
/// options) is shared by every user or touches the file system, and is refused.
const SESSION_SETTINGS: &[&str] = &[
    "datafusion.explain.",
    "datafusion.format.",
    "datafusion.optimizer.",
    "datafusion.sql_parser.",
    "datafusion.execution.time_zone",
];

/// `key` as DataFusion names it, if a session may set it (see [`SESSION_SETTINGS`]).
fn session_setting(key: &str) -> Result<String, QueryError> {
    let key = key.trim().to_ascii_lowercase();
    let allowed = SESSION_SETTINGS.iter().any(|p| {
        if p.ends_with('.') {
            key.starts_with(p)
        } else {
            key == *p
        }
    });
    if !allowed {
        return Err(QueryError::Forbidden(format!(
            "setting {key} cannot be changed by a session: it is shared by every user or \
             touches the file system (a session may set {})",
            SESSION_SETTINGS
                .iter()
                .map(|p| if p.ends_with('.') {
                    format!("{p}*")
                } else {
                    (*p).to_owned()
                })
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(key)
}

/// Constant-time comparison of two equal-length strings.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl QueryService {
    /// The service over `ctx` with the keys, users and limits of `cfg` (validated before),
    /// its queries on a runtime of their own.
    pub fn new(ctx: SessionContext, cfg: &QueryConfig) -> Result<Self, QueryError> {
        let keys = cfg
            .api_keys
            .iter()
            .map(|k| {
                (
                    k.sha256.to_ascii_lowercase(),
                    Principal {
                        name: k.name.clone(),
                        role: k.role,
                    },
                )
            })
            .collect();
        let users = cfg
            .users
            .iter()
            .map(|u| {
                let verifier = ScramVerifier::parse(&u.password_hash)
                    .map_err(|e| QueryError::Encode(format!("query.users {}: {e}", u.name)))?;
                Ok((
                    u.name.clone(),
                    (
                        Principal {
                            name: u.name.clone(),
                            role: u.role,
                        },
                        verifier,
                    ),
                ))
            })
            .collect::<Result<_, QueryError>>()?;
        let threads = query_threads(cfg.threads);
        // As many partitions as threads: more would only queue on them and hold more memory.
        ctx.state_ref()
            .write()
            .config_mut()
            .options_mut()
            .execution
            .target_partitions = threads;
        Ok(Self {
            executor: Executor::start(threads)?,
            ctx,
            max_rows: cfg.max_rows,
            max_result_bytes: cfg.max_result_bytes,
            timeout: cfg.timeout,
            keys,
            users,
            open: cfg.api_keys.is_empty(),
            auth_failures: super::limiter::LoginLimiter::new(cfg.login_failures_per_minute),
            rate: f64::from(cfg.rate_limit_per_second),
            burst: f64::from(cfg.rate_limit_burst),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// The DataFusion session (catalog listing).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The caller of an HTTP request from its `Authorization: Bearer` (or `X-API-Key`) value.
    pub fn authenticate_token(&self, token: Option<&str>) -> Result<Principal, QueryError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            if self.open {
                return Ok(Principal {
                    name: ANONYMOUS.into(),
                    role: Role::Reader,
                });
            }
            return Err(QueryError::Unauthenticated(
                "an API key is required: send Authorization: Bearer <token>".into(),
            ));
        };
        let digest = sha256_hex(token);
        // Compare against every key in constant time: no timing hint about near misses.
        let mut found = None;
        for (hash, who) in &self.keys {
            if same(hash, &digest) {
                found = Some(who.clone());
            }
        }
        found.ok_or_else(|| {
            tracing::warn!(target: "primespark::audit", outcome = "unauthenticated", "unknown api key");
            QueryError::Unauthenticated("unknown API key".into())
        })
    }

    /// [`Self::authenticate_token`] for a client at `peer`: an address that sent too many
    /// wrong keys lately is refused (429) before its key is looked at, and a wrong key counts
    /// against its address. A missing key is not a guess and does not count.
    pub fn authenticate_token_from(
        &self,
        peer: Option<std::net::IpAddr>,
        token: Option<&str>,
    ) -> Result<Principal, QueryError> {
        if let Some(ip) = peer {
            if let Err(wait) = self.auth_failures.check(ip) {
                crate::metrics::HttpConnectionRefused {
                    peer: ip,
                    reason: "too_many_failures",
                }
                .emit();
                return Err(QueryError::RateLimited {
                    retry_after_secs: wait,
                });
            }
        }
        let result = self.authenticate_token(token);
        if let (Err(QueryError::Unauthenticated(_)), Some(ip), Some(_)) =
            (&result, peer, token.filter(|t| !t.is_empty()))
        {
            self.auth_failures.failed(ip);
        }
        result
    }

    /// Checks that a session may set `key` to `value` (the allow-list `SESSION_SETTINGS`), and that
    /// DataFusion takes the value; the key as DataFusion names it.
    pub fn check_setting(&self, key: &str, value: &str) -> Result<String, QueryError> {
        let key = session_setting(key)?;
        let mut options = self.ctx.state().config().options().as_ref().clone();
        options.set(&key, value)?;
        Ok(key)
    }

    /// Whether the HTTP endpoint has no keys (open to its loopback callers).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// A wire-protocol user's SCRAM verifier, if there is such a user.
    pub fn credential(&self, user: &str) -> Option<ScramVerifier> {
        self.users.get(user).map(|(_, v)| v.clone())
    }

    /// Takes one token of `who`'s bucket, or says when to retry. The limit is per key: the
    /// anonymous local caller of an open (loopback, keyless) endpoint has none.
    pub fn check_rate(&self, who: &Principal) -> Result<(), QueryError> {
        if self.open && who.name == ANONYMOUS {
            return Ok(());
        }
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        let b = buckets.entry(who.name.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - b.tokens) / self.rate).ceil().max(1.0);
            Err(QueryError::RateLimited {
                retry_after_secs: wait as u64,
            })
        }
    }

    /// Runs one statement for `who` under every check and limit, and audits it.
    pub async fn execute(
        self: &Arc<Self>,
        who: &Principal,
        endpoint: &'static str,
        sql: &str,
    ) -> Result<QueryOutput, QueryError> {
        self.execute_with_params(who, endpoint, sql, Vec::new())
            .await
    }

    /// [`Self::execute`] with `params` as the values of the statement's `$1..$n`: the
    /// statement is checked and planned as written, placeholders and all, and the values are
    /// bound into the plan that passed (`LogicalPlan::with_param_values`), never into its text.
    pub async fn execute_with_params(
        self: &Arc<Self>,
        who: &Principal,
        endpoint: &'static str,
        sql: &str,
        params: Vec<ScalarValue>,
    ) -> Result<QueryOutput, QueryError> {
        self.execute_in_session(who, endpoint, sql, params, Vec::new())
            .await
    }

    /// [`Self::execute_with_params`] under a session's `settings` (checked with
    /// [`Self::check_setting`]): they apply to this statement's planning and execution only,
    /// never to the shared context.
    pub async fn execute_in_session(
        self: &Arc<Self>,
        who: &Principal,
        endpoint: &'static str,
        sql: &str,
        params: Vec<ScalarValue>,
        settings: Vec<(String, String)>,
    ) -> Result<QueryOutput, QueryError> {
        let started = Instant::now();
        let param_count = params.len();
        let result = match self.check_rate(who) {
            Ok(()) => {
                // Its own task: the timer fires on another worker even while the query keeps
                // one busy, and aborting the task drops (cancels) the plan's streams.
                let (service, caller, text) = (self.clone(), who.clone(), sql.to_owned());
                let task = self.executor.handle.spawn(async move {
                    match service.run(&caller, &text, params.clone(), &settings).await {
                        // Planned again, the query lists the archive as it is now: a file
                        // compacted, tiered or rewritten since the first listing is no
                        // longer named. Within the same timeout.
                        Err(e) if e.is_storage() => {
                            QueryRetried { error: &e }.emit();
                            service.run(&caller, &text, params, &settings).await
                        }
                        done => done,
                    }
                });
                // A caller that goes away (a client disconnect drops this future) cancels
                // the query too.
                let abort = AbortOnDrop(task.abort_handle());
                let outcome = match tokio::time::timeout(self.timeout, task).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(QueryError::Encode(format!("query task failed: {e}"))),
                    Err(_) => Err(QueryError::Timeout(self.timeout)),
                };
                drop(abort);
                outcome
            }
            Err(e) => Err(e),
        };
        let duration = started.elapsed();
        let rows = result.as_ref().map_or(0, |o| o.rows);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        // The statement is the caller's text (with its `$n`; values are not logged), cut so one
        // huge query cannot flood the log.
        let statement: String = sql.chars().take(4096).collect();
        match &result {
            Ok(_) => {
                tracing::info!(target: "primespark::audit", user = %who.name, role = who.role.as_str(), endpoint, statement = %statement, params = param_count, rows, duration_ms = duration.as_millis() as u64, outcome, "query")
            }
            Err(e) => {
                tracing::info!(target: "primespark::audit", user = %who.name, role = who.role.as_str(), endpoint, statement = %statement, params = param_count, rows, duration_ms = duration.as_millis() as u64, outcome, error = %e, "query")
            }
        }
        QueryExecuted {
            endpoint,
            ok: result.is_ok(),
            rows: rows as u64,
            duration,
        }
        .emit();
        result
    }

    /// Parses, authorizes and plans one statement for `who`.
    async fn plan(&self, who: &Principal, sql: &str) -> Result<LogicalPlan, QueryError> {
        self.plan_in(&self.ctx.state(), who, sql).await
    }

    /// [`Self::plan`] in `state` (the shared one with a session's settings applied).
    async fn plan_in(
        &self,
        state: &datafusion::execution::SessionState,
        who: &Principal,
        sql: &str,
    ) -> Result<LogicalPlan, QueryError> {
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(sql, &dialect)?;
        authorize(who.role, &statement)?;
        let plan = state.statement_to_plan(statement).await?;
        let options = SQLOptions::new()
            .with_allow_dml(false)
            .with_allow_ddl(who.role == Role::Admin)
            .with_allow_statements(who.role == Role::Admin);
        options.verify_plan(&plan).map_err(|e| {
            QueryError::Forbidden(format!("{} may not run this: {e}", who.role.as_str()))
        })?;
        self.check_scans(&plan)?;
        Ok(plan)
    }

    async fn run(
        &self,
        who: &Principal,
        sql: &str,
        params: Vec<ScalarValue>,
        settings: &[(String, String)],
    ) -> Result<QueryOutput, QueryError> {
        // A copy of the shared state: a session's settings change it, never the original.
        let mut state = self.ctx.state();
        for (key, value) in settings {
            // The allow-list again (a caller may not have checked); setting the value parses it.
            let key = session_setting(key)?;
            state.config_mut().options_mut().set(&key, value)?;
        }
        let plan = self.plan_in(&state, who, sql).await?;
        // The checks passed on the statement with its placeholders; binding replaces each by
        // its value and changes nothing else.
        let plan = if params.is_empty() {
            plan
        } else {
            plan.with_param_values(params)?
        };
        // EXPLAIN must stay the plan's root, and DDL has no rows: only queries get the limit.
        let query = !matches!(
            plan,
            LogicalPlan::Explain(_)
                | LogicalPlan::Analyze(_)
                | LogicalPlan::Ddl(_)
                | LogicalPlan::Statement(_)
                | LogicalPlan::DescribeTable(_)
        );
        // Queries run in the session's state; DDL (views) goes through the context, whose
        // catalog it changes.
        let df = if query {
            datafusion::dataframe::DataFrame::new(state, plan)
        } else {
            self.ctx.execute_logical_plan(plan).await?
        };
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let df = if query {
            df.limit(0, Some(self.max_rows + 1))?
        } else {
            df
        };
        let task_ctx = Arc::new(df.task_ctx());
        let plan = yielding_everywhere(df.create_physical_plan().await?)?;
        // Streamed, so a result is cut at its row or byte budget while it is made, not after
        // all of it was held.
        let mut stream = datafusion::physical_plan::execute_stream(plan, task_ctx)?;
        let (mut rows, mut bytes) = (0usize, 0usize);
        let mut truncated = false;
        let mut kept = Vec::new();
        while let Some(b) = futures::StreamExt::next(&mut stream).await {
            let b = b?;
            let size = batch_bytes(&b);
            // Rows that fit both budgets (bytes pro rata within the batch).
            let room_rows = self.max_rows - rows;
            let room_bytes = self.max_result_bytes.saturating_sub(bytes);
            let fit_bytes = if size <= room_bytes {
                b.num_rows()
            } else {
                (room_bytes as u128 * b.num_rows() as u128 / size.max(1) as u128) as usize
            };
            let fit = room_rows.min(fit_bytes);
            if fit < b.num_rows() {
                truncated = true;
                if fit > 0 {
                    kept.push(b.slice(0, fit));
                    rows += fit;
                }
                break;
            }
            rows += b.num_rows();
            bytes += size;
            kept.push(b);
        }
        Ok(QueryOutput {
            schema,
            batches: kept,
            rows,
            truncated,
        })
    }

    /// Every scan must read a table of the catalog: no URL tables, no table functions that
    /// reach outside it.
    fn check_scans(&self, plan: &LogicalPlan) -> Result<(), QueryError> {
        let mut bad: Option<String> = None;
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let name = scan.table_name.table();
                // Generators read nothing outside the process.
                let generator = name.starts_with("generate_series(") || name.starts_with("range(");
                let known = generator
                    || self
                        .ctx
                        .table_exist(scan.table_name.clone())
                        .unwrap_or(false);
                if !known {
                    bad = Some(scan.table_name.to_string());
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        match bad {
            Some(t) => Err(QueryError::Forbidden(format!(
                "{t} is not a table of the catalog; only registered tables can be read"
            ))),
            None => Ok(()),
        }
    }
}

/// The query service as the PostgreSQL wire endpoint's backend: users and roles from
/// `[[query.users]]`, the same checks, limits and audit as HTTP.
pub struct WireBackend(pub Arc<QueryService>);

impl WireBackend {
    fn principal(&self, user: &str) -> Result<Principal, super::pgwire::BackendError> {
        self.0
            .users
            .get(user)
            .map(|(p, _)| p.clone())
            .ok_or_else(|| {
                super::pgwire::BackendError::new("28000", format!("unknown user \"{user}\""))
            })
    }
}

fn wire_error(e: QueryError) -> super::pgwire::BackendError {
    super::pgwire::BackendError::new(e.sqlstate(), e.to_string())
}

#[async_trait::async_trait]
impl super::pgwire::SqlBackend for WireBackend {
    fn credential(&self, user: &str) -> Option<ScramVerifier> {
        self.0.credential(user)
    }

    async fn execute(
        &self,
        user: &str,
        sql: &str,
        params: Vec<ScalarValue>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), super::pgwire::BackendError> {
        self.execute_in(user, sql, params, &[]).await
    }

    async fn execute_in(
        &self,
        user: &str,
        sql: &str,
        params: Vec<ScalarValue>,
        settings: &[(String, String)],
    ) -> Result<(SchemaRef, Vec<RecordBatch>), super::pgwire::BackendError> {
        let who = self.principal(user)?;
        let out = self
            .0
            .execute_in_session(&who, "pgwire", sql, params, settings.to_vec())
            .await
            .map_err(wire_error)?;
        Ok((out.schema, out.batches))
    }

    fn check_setting(&self, key: &str, value: &str) -> Result<String, super::pgwire::BackendError> {
        self.0.check_setting(key, value).map_err(wire_error)
    }

    async fn describe(
        &self,
        user: &str,
        sql: &str,
    ) -> Result<super::pgwire::Description, super::pgwire::BackendError> {
        let who = self.principal(user)?;
        let plan = self.0.plan(&who, sql).await.map_err(wire_error)?;
        super::pgwire::Description::from_plan(&plan)
    }
}

/// What a statement needs, before planning: some are never allowed, some need `admin`.
fn authorize(role: Role, statement: &DFStatement) -> Result<(), QueryError> {
    let never = |what: &str| {
        Err(QueryError::Forbidden(format!(
            "{what} is not allowed: the SQL endpoints are read-only"
        )))
    };
    let admin = |what: &str| {
        if role == Role::Admin {
            Ok(())
        } else {
            Err(QueryError::Forbidden(format!(
                "{what} needs the admin role; {} may only query",
                role.as_str()
            )))
        }
    };
    let text = statement.to_string().to_ascii_lowercase();
    if let Some(f) = FILE_FUNCTIONS.iter().find(|f| {
        text.match_indices(*f).any(|(i, _)| {
            // A call, not a column that happens to contain the name.
            text[i + f.len()..].trim_start().starts_with('(')
        })
    }) {
        return Err(QueryError::Forbidden(format!(
            "function {f} reads files or URLs and is not allowed"
        )));
    }
    match statement {
        DFStatement::CreateExternalTable(_) => {
            never("CREATE EXTERNAL TABLE (it reads arbitrary files)")
        }
        DFStatement::CopyTo(_) => never("COPY (it writes files)"),
        DFStatement::Explain(e) => authorize(role, &e.statement),
        DFStatement::Reset(_) => never("RESET over HTTP (it has no session)"),
        DFStatement::Statement(s) => match s.as_ref() {
            Statement::Query(_) => Ok(()),
            Statement::Explain { statement, .. } => {
                authorize(role, &DFStatement::Statement(statement.clone()))
            }
            Statement::ExplainTable { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowFunctions { .. }
            | Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. } => Ok(()),
            Statement::CreateView(_) => admin("CREATE VIEW"),
            Statement::Drop {
                object_type: ObjectType::View,
                ..
            } => admin("DROP VIEW"),
            // The service has no sessions (an HTTP request is its own): a SET here would change
            // the context every user shares. The wire endpoint answers SET per connection.
            Statement::Set(_) => never(
                "SET over HTTP (each request is its own session; on the PostgreSQL wire \
                 endpoint SET applies to its connection)",
            ),
            Statement::Insert(_) | Statement::Update { .. } | Statement::Delete(_) => {
                never("changing data (INSERT, UPDATE, DELETE)")
            }
            Statement::Copy { .. } => never("COPY"),
            other => {
                let first = other.to_string();
                let verb = first
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                never(&verb.to_uppercase())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::config::{ApiKey, WireUser};

    fn service(cfg: &QueryConfig) -> Arc<QueryService> {
        use datafusion::arrow::array::Int64Array;
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let ctx = SessionContext::new();
        // 10k rows: a triple cross join of it never finishes in a test's lifetime.
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..10_000))],
        )
        .unwrap();
        let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("numbers", Arc::new(table)).unwrap();
        Arc::new(QueryService::new(ctx, cfg).unwrap())
    }

    fn cfg() -> QueryConfig {
        QueryConfig {
            api_keys: vec![
                ApiKey {
                    name: "grafana".into(),
                    role: Role::Reader,
                    sha256: sha256_hex("reader-token"),
                    sha256_file: None,
                    sha256_env: None,
                },
                ApiKey {
                    name: "ops".into(),
                    role: Role::Admin,
                    sha256: sha256_hex("admin-token"),
                    sha256_file: None,
                    sha256_env: None,
                },
            ],
            users: vec![WireUser {
                name: "analyst".into(),
                role: Role::Reader,
                password_hash: hash_password("s3cret").unwrap(),
                password_hash_file: None,
                password_hash_env: None,
            }],
            rate_limit_per_second: 1,
            rate_limit_burst: 2,
            max_rows: 3,
            ..QueryConfig::default()
        }
    }

    #[tokio::test]
    async fn keys_roles_and_read_only_sql() {
        let mut c = cfg();
        c.rate_limit_burst = 100;
        let s = service(&c);
        assert!(matches!(
            s.authenticate_token(None),
            Err(QueryError::Unauthenticated(_))
        ));
        assert!(matches!(
            s.authenticate_token(Some("nope")),
            Err(QueryError::Unauthenticated(_))
        ));
        let reader = s.authenticate_token(Some("reader-token")).unwrap();
        assert_eq!(reader.role, Role::Reader);
        let admin = s.authenticate_token(Some("admin-token")).unwrap();

        let out = s
            .execute(
                &reader,
                "test",
                "SELECT * FROM (VALUES (1), (2), (3), (4), (5)) t(x)",
            )
            .await
            .unwrap();
        assert_eq!((out.rows, out.truncated), (3, true));

        for (sql, who) in [
            ("CREATE VIEW v AS SELECT 1", &reader),
            (
                "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
                &admin,
            ),
            ("COPY (SELECT 1) TO '/tmp/primespark-copy.csv'", &admin),
            ("SELECT * FROM read_csv('/etc/passwd')", &admin),
            ("SELECT * FROM '/etc/passwd'", &admin),
            ("INSERT INTO t VALUES (1)", &admin),
        ] {
            let e = s.execute(who, "test", sql).await.unwrap_err();
            assert!(
                matches!(e, QueryError::Forbidden(_) | QueryError::DataFusion(_)),
                "{sql}: {e}"
            );
            assert_ne!(e.outcome(), "ok");
        }
        // The reader's DDL is a clear 403-class error naming the role.
        let e = s
            .execute(&reader, "test", "CREATE VIEW v AS SELECT 1")
            .await
            .unwrap_err();
        assert!(
            matches!(e, QueryError::Forbidden(ref m) if m.contains("admin")),
            "{e}"
        );
        // File readers are refused by name.
        let e = s
            .execute(&admin, "test", "SELECT * FROM read_parquet ('x.parquet')")
            .await
            .unwrap_err();
        assert!(
            matches!(e, QueryError::Forbidden(ref m) if m.contains("read_parquet")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn admin_may_create_views() {
        let mut c = cfg();
        c.rate_limit_burst = 10;
        let s = service(&c);
        let admin = s.authenticate_token(Some("admin-token")).unwrap();
        s.execute(&admin, "test", "CREATE VIEW one AS SELECT 1 AS x")
            .await
            .unwrap();
        let out = s
            .execute(&admin, "test", "SELECT x FROM one")
            .await
            .unwrap();
        assert_eq!(out.rows, 1);
    }

    #[tokio::test]
    async fn rate_limit_per_key() {
        let s = service(&cfg());
        let reader = s.authenticate_token(Some("reader-token")).unwrap();
        let admin = s.authenticate_token(Some("admin-token")).unwrap();
        s.execute(&reader, "test", "SELECT 1").await.unwrap();
        s.execute(&reader, "test", "SELECT 1").await.unwrap();
        let e = s.execute(&reader, "test", "SELECT 1").await.unwrap_err();
        assert!(
            matches!(
                e,
                QueryError::RateLimited {
                    retry_after_secs: 1
                }
            ),
            "{e}"
        );
        // Another key has its own bucket.
        s.execute(&admin, "test", "SELECT 1").await.unwrap();
    }

    #[tokio::test]
    async fn a_result_is_cut_at_its_byte_budget() {
        let mut c = cfg();
        c.rate_limit_burst = 10;
        c.max_rows = 1_000_000;
        // 10k int64 values are 80 KB of Arrow data: 20 KB holds about a quarter.
        c.max_result_bytes = 20_000;
        let s = service(&c);
        let reader = s.authenticate_token(Some("reader-token")).unwrap();
        let out = s
            .execute(&reader, "test", "SELECT n FROM numbers")
            .await
            .unwrap();
        assert!(out.truncated, "not cut");
        assert!((2_000..=2_500).contains(&out.rows), "{} rows", out.rows);
        assert!(out.batches.iter().map(batch_bytes).sum::<usize>() <= 20_000);
        let out = s
            .execute(&reader, "test", "SELECT n FROM numbers WHERE n < 100")
            .await
            .unwrap();
        assert_eq!((out.rows, out.truncated), (100, false));
    }

    /// A table whose first `fails` scans fail as a file gone from the store does.
    #[derive(Debug)]
    struct Vanishing {
        inner: Arc<dyn datafusion::datasource::TableProvider>,
        scans: std::sync::atomic::AtomicU32,
        fails: u32,
    }

    #[async_trait::async_trait]
    impl datafusion::datasource::TableProvider for Vanishing {
        fn schema(&self) -> SchemaRef {
            self.inner.schema()
        }
        fn table_type(&self) -> datafusion::datasource::TableType {
            datafusion::datasource::TableType::Base
        }
        async fn scan(
            &self,
            state: &dyn datafusion::catalog::Session,
            projection: Option<&Vec<usize>>,
            filters: &[datafusion::prelude::Expr],
            limit: Option<usize>,
        ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
            let n = self.scans.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < self.fails {
                return Err(datafusion::error::DataFusionError::ObjectStore(Box::new(
                    object_store::Error::NotFound {
                        path: "table=x/part-b1.parquet".into(),
                        source: "in no tier of the archive".into(),
                    },
                )));
            }
            self.inner.scan(state, projection, filters, limit).await
        }
    }

    #[tokio::test]
    async fn a_query_whose_file_went_away_runs_again_and_a_second_failure_is_the_servers() {
        let mut c = cfg();
        c.rate_limit_burst = 10;
        let s = service(&c);
        let numbers = s.context().table_provider("numbers").await.unwrap();
        let mut tables = Vec::new();
        for (name, fails) in [("once", 1), ("always", u32::MAX)] {
            let table = Arc::new(Vanishing {
                inner: numbers.clone(),
                scans: Default::default(),
                fails,
            });
            s.context().register_table(name, table.clone()).unwrap();
            tables.push(table);
        }
        let reader = s.authenticate_token(Some("reader-token")).unwrap();
        let out = s
            .execute(&reader, "test", "SELECT n FROM once WHERE n < 2")
            .await
            .unwrap();
        assert_eq!(out.rows, 2);
        let e = s
            .execute(&reader, "test", "SELECT n FROM always")
            .await
            .unwrap_err();
        assert!(e.is_storage(), "{e}");
        assert_eq!((e.outcome(), e.sqlstate()), ("storage", "58030"));
        let status = axum::response::IntoResponse::into_response(e).status();
        assert_eq!(status, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        // The caller's mistakes stay the caller's, and are not run twice.
        let e = s
            .execute(&reader, "test", "SELECT nope FROM numbers")
            .await
            .unwrap_err();
        assert!(!e.is_storage(), "{e}");
        assert_eq!(
            axum::response::IntoResponse::into_response(e).status(),
            axum::http::StatusCode::BAD_REQUEST
        );
        // One scan failed and one answered; two failed, then the error.
        for table in tables {
            assert_eq!(table.scans.load(std::sync::atomic::Ordering::SeqCst), 2);
        }
    }

    #[tokio::test]
    async fn runaway_query_is_cancelled_at_the_timeout() {
        let mut c = cfg();
        c.timeout = Duration::from_millis(300);
        c.rate_limit_burst = 10;
        let s = service(&c);
        let reader = s.authenticate_token(Some("reader-token")).unwrap();
        let started = Instant::now();
        let e = s
            .execute(
                &reader,
                "test",
                "SELECT count(*) FROM numbers a, numbers b, numbers c WHERE a.n + b.n + c.n >= 0",
            )
            .await
            .unwrap_err();
        assert!(matches!(e, QueryError::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn users_have_scram_verifiers_of_their_passwords() {
        let s = service(&cfg());
        let v = s.credential("analyst").unwrap();
        assert!(v.verifies("s3cret"));
        assert!(!v.verifies("wrong"));
        assert!(s.credential("nobody").is_none());
    }
}
