//! The statements the wire layer answers itself, so a session setup can never be refused:
//! `SET`, `SHOW` of a connection setting, `BEGIN`/`COMMIT`, `SELECT version()`, ...

use std::sync::Arc;

use ::pgwire::api::portal::Format;
use ::pgwire::api::results::{DataRowEncoder, QueryResponse, Response, Tag};
use ::pgwire::api::{ClientInfo, Type, METADATA_APPLICATION_NAME, METADATA_USER};
use datafusion::common::ScalarValue;
use datafusion::sql::sqlparser::tokenizer::Token;

use super::encode::fields;
use super::lexer::{lex, unquote, Lexeme};
use super::{BackendError, DATE_STYLE, MAX_PARAMS, SERVER_VERSION, SERVER_VERSION_NUM, TIME_ZONE};

/// Who is connected, from the startup message.
pub(super) struct Session {
    pub(super) user: String,
    pub(super) application_name: String,
    /// The backend's settings this connection `SET` (`datafusion.*`), in name order.
    pub(super) settings: Vec<(String, String)>,
}

/// Settings of the backend's own, which a connection's `SET` keeps for the connection (kept in
/// the connection's metadata under their names); any other `SET` is accepted and ignored.
pub(super) const BACKEND_SETTINGS: &str = "datafusion.";

impl Session {
    pub(super) fn of<C: ClientInfo + ?Sized>(client: &C) -> Self {
        let get = |key: &str| client.metadata().get(key).cloned().unwrap_or_default();
        let mut settings: Vec<(String, String)> = client
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with(BACKEND_SETTINGS))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        settings.sort();
        Self {
            user: get(METADATA_USER),
            application_name: get(METADATA_APPLICATION_NAME),
            settings,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statements answered by the wire layer

/// A statement the wire layer answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Local {
    /// Accepted and ignored; answers this command tag.
    Command(String),
    /// Opens a transaction block (bookkeeping only).
    Begin(String),
    /// Closes a transaction block.
    End(String),
    /// One row with one text column.
    Value { column: String, value: String },
    /// `SET datafusion.x = v`: kept for this connection once the backend allows it.
    Set { name: String, value: String },
    /// `RESET datafusion.x` (`None`: `RESET ALL`).
    Reset { name: Option<String> },
}

impl Local {
    pub(super) fn columns(&self) -> Vec<(String, Type)> {
        match self {
            Local::Value { column, .. } => vec![(column.clone(), Type::TEXT)],
            _ => Vec::new(),
        }
    }

    pub(super) fn respond(&self, format: Option<&Format>) -> Result<Response, BackendError> {
        Ok(match self {
            Local::Command(tag) => Response::Execution(Tag::new(tag)),
            Local::Set { .. } => Response::Execution(Tag::new("SET")),
            Local::Reset { .. } => Response::Execution(Tag::new("RESET")),
            Local::Begin(tag) => Response::TransactionStart(Tag::new(tag)),
            Local::End(tag) => Response::TransactionEnd(Tag::new(tag)),
            Local::Value { column, value } => {
                let schema = Arc::new(fields(&[(column.clone(), Type::TEXT)], format));
                let mut encoder = DataRowEncoder::new(schema.clone());
                encoder
                    .encode_field(&value.as_str())
                    .map_err(|e| BackendError::new("XX000", e.to_string()))?;
                let row = encoder.take_row();
                Response::Query(QueryResponse::new(schema, futures::stream::iter([Ok(row)])))
            }
        })
    }
}

/// What to do with one statement.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Classified {
    /// Only comments and white space.
    Empty,
    Local(Local),
    /// For the backend: SQL with settings resolved, its command tag, and for each `$n` up to
    /// the highest the type an explicit cast gives it.
    Backend {
        sql: String,
        tag: String,
        params: Vec<Option<Type>>,
    },
}

/// Sorts one statement (no `;` separators) into local or backend.
pub(super) fn classify(sql: &str, session: &Session) -> Result<Classified, BackendError> {
    let tokens = lex(sql);
    let sig: Vec<&Lexeme> = tokens.iter().filter(|t| t.is_significant()).collect();
    let Some(first) = sig.first() else {
        return Ok(Classified::Empty);
    };
    let first_word = first.word().unwrap_or_default();
    if let Some(local) = local_statement(&first_word, &sig, session)? {
        return Ok(Classified::Local(local));
    }
    let tag = match first_word.as_str() {
        "" | "with" | "values" | "table" => "SELECT".to_owned(),
        w => w.to_ascii_uppercase(),
    };
    Ok(Classified::Backend {
        params: cast_types(&sig),
        sql: resolve_settings(sql, &sig, session)?,
        tag,
    })
}

/// The statement as one answered here, if it is one (`sig`: its significant tokens).
fn local_statement(
    first: &str,
    sig: &[&Lexeme],
    session: &Session,
) -> Result<Option<Local>, BackendError> {
    let word = |i: usize| sig.get(i).and_then(|t| t.word());
    Ok(Some(match first {
        "set" => match backend_setting(&sig[1..]) {
            Some((name, Some(value))) => Local::Set { name, value },
            _ => Local::Command("SET".to_owned()),
        },
        "reset" => match (word(1).as_deref(), backend_setting(&sig[1..])) {
            (Some("all"), _) => Local::Reset { name: None },
            (_, Some((name, None))) => Local::Reset { name: Some(name) },
            _ => Local::Command("RESET".to_owned()),
        },
        "deallocate" | "savepoint" | "release" => Local::Command(first.to_ascii_uppercase()),
        "discard" => {
            let what = word(1).unwrap_or_default().to_ascii_uppercase();
            Local::Command(format!("DISCARD {what}").trim().to_owned())
        }
        "begin" => Local::Begin("BEGIN".to_owned()),
        "start" if word(1).as_deref() == Some("transaction") => {
            Local::Begin("START TRANSACTION".to_owned())
        }
        "commit" | "end" => Local::End("COMMIT".to_owned()),
        // ROLLBACK TO SAVEPOINT stays inside the transaction block.
        "rollback" | "abort" if word(1).as_deref() == Some("to") => {
            Local::Command("ROLLBACK".to_owned())
        }
        "rollback" | "abort" => Local::End("ROLLBACK".to_owned()),
        "show" if sig.len() > 1 && sig[1..].iter().all(|t| t.word().is_some()) => {
            let name = sig[1..]
                .iter()
                .filter_map(|t| t.word())
                .collect::<Vec<_>>()
                .join("_");
            match setting(&name, session) {
                Some((column, value)) => Local::Value {
                    column: column.to_owned(),
                    value,
                },
                None => return Ok(None),
            }
        }
        "select" => return select_answered_here(sig, session),
        _ => return Ok(None),
    }))
}

/// The backend setting a `SET`'s or `RESET`'s tokens (after the verb) name, and the value a
/// `SET` gives it: `[SESSION] datafusion.a.b {= | TO} value`. `None` for any other setting.
fn backend_setting(rest: &[&Lexeme]) -> Option<(String, Option<String>)> {
    let mut rest = rest;
    if rest.first().and_then(|t| t.word()).as_deref() == Some("session") {
        rest = &rest[1..];
    }
    let mut name = String::new();
    let mut i = 0;
    while let Some(t) = rest.get(i) {
        if t.is(&Token::Eq) || t.word().as_deref() == Some("to") {
            break;
        }
        match (t.word(), t.is(&Token::Period)) {
            (Some(w), _) => name.push_str(&w),
            (None, true) => name.push('.'),
            _ => return None,
        }
        i += 1;
    }
    if !name.starts_with(BACKEND_SETTINGS) {
        return None;
    }
    let value = rest.get(i + 1..).filter(|v| !v.is_empty()).map(|v| {
        if v.len() == 1 && v[0].is_string() {
            unquote(v[0].text)
        } else {
            v.iter().map(|t| t.text).collect::<Vec<_>>().join("")
        }
    });
    Some((name, value))
}

/// `SELECT version()` and `SELECT current_setting('name') [[AS] alias]`.
fn select_answered_here(sig: &[&Lexeme], session: &Session) -> Result<Option<Local>, BackendError> {
    let word = |i: usize| sig.get(i).and_then(|t| t.word());
    let is = |i: usize, token: Token| sig.get(i).is_some_and(|t| t.is(&token));
    if sig.len() == 4
        && word(1).as_deref() == Some("version")
        && is(2, Token::LParen)
        && is(3, Token::RParen)
    {
        return Ok(Some(Local::Value {
            column: "version".to_owned(),
            value: version_string(),
        }));
    }
    if word(1).as_deref() == Some("current_setting")
        && is(2, Token::LParen)
        && sig.get(3).is_some_and(|t| t.is_string())
        && is(4, Token::RParen)
    {
        let alias = match sig.len() {
            5 => Some("current_setting".to_owned()),
            6 => alias_name(sig[5]),
            7 if word(5).as_deref() == Some("as") => alias_name(sig[6]),
            _ => None,
        };
        if let Some(column) = alias {
            let name = unquote(sig[3].text);
            let (_, value) = setting(&name.to_ascii_lowercase(), session)
                .ok_or_else(|| unknown_setting(&name))?;
            return Ok(Some(Local::Value { column, value }));
        }
    }
    Ok(None)
}

/// For each parameter `$1..$n`, the type of an explicit `$n::type` or `CAST($n AS type)`.
fn cast_types(sig: &[&Lexeme]) -> Vec<Option<Type>> {
    let word = |i: usize| sig.get(i).and_then(|t| t.word());
    let is = |i: usize, token: Token| sig.get(i).is_some_and(|t| t.is(&token));
    let mut types: Vec<Option<Type>> = Vec::new();
    for (k, t) in sig.iter().enumerate() {
        let Some(n) = t.param() else { continue };
        if n == 0 || n > MAX_PARAMS {
            continue;
        }
        if types.len() < n {
            types.resize(n, None);
        }
        let type_at = if is(k + 1, Token::DoubleColon) {
            Some(k + 2)
        } else if k >= 2 && is(k - 1, Token::LParen) && word(k - 2).as_deref() == Some("cast") {
            (word(k + 1).as_deref() == Some("as")).then_some(k + 2)
        } else {
            None
        };
        let Some(at) = type_at else { continue };
        let with_zone = word(at + 1).as_deref() == Some("with")
            && word(at + 2).as_deref() == Some("time")
            && word(at + 3).as_deref() == Some("zone");
        let ty = match word(at).as_deref() {
            Some("int2" | "smallint") => Type::INT2,
            Some("int4" | "int" | "integer") => Type::INT4,
            Some("int8" | "bigint") => Type::INT8,
            Some("float4" | "real") => Type::FLOAT4,
            Some("float8" | "float" | "double") => Type::FLOAT8,
            Some("numeric" | "decimal") => Type::NUMERIC,
            Some("text" | "varchar" | "string" | "char" | "character") => Type::TEXT,
            Some("bool" | "boolean") => Type::BOOL,
            Some("date") => Type::DATE,
            Some("time") => Type::TIME,
            Some("timestamp") if with_zone => Type::TIMESTAMPTZ,
            Some("timestamp") => Type::TIMESTAMP,
            Some("timestamptz") => Type::TIMESTAMPTZ,
            Some("bytea") => Type::BYTEA,
            _ => continue,
        };
        types[n - 1] = Some(ty);
    }
    types
}

fn alias_name(token: &Lexeme) -> Option<String> {
    match &token.token {
        Some(Token::Word(w)) if w.quote_style.is_none() => token.word(),
        Some(Token::Word(w)) if w.quote_style == Some('"') => Some(unquote(token.text)),
        _ => None,
    }
}

fn unknown_setting(name: &str) -> BackendError {
    BackendError::new(
        "42704",
        format!("unrecognized configuration parameter \"{name}\""),
    )
}

fn version_string() -> String {
    format!(
        "PostgreSQL {SERVER_VERSION} (primespark, Apache DataFusion {})",
        datafusion::DATAFUSION_VERSION
    )
}

/// A setting by lower-case name (words joined by `_`): its display name and value.
fn setting(name: &str, session: &Session) -> Option<(&'static str, String)> {
    match connection_setting(name, session) {
        Some((column, value)) => Some((column, value.to_owned())),
        None => server_setting(name).map(|(column, value)| (column, value.to_owned())),
    }
}

/// A setting of the connection, which the client chose at startup.
fn connection_setting<'a>(name: &str, session: &'a Session) -> Option<(&'static str, &'a str)> {
    match name {
        "application_name" => Some(("application_name", &session.application_name)),
        "session_authorization" => Some(("session_authorization", &session.user)),
        _ => None,
    }
}

/// A setting of this server: a constant, the same for every connection.
fn server_setting(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "server_version" => ("server_version", SERVER_VERSION),
        "server_version_num" => ("server_version_num", SERVER_VERSION_NUM),
        "timezone" | "time_zone" => ("TimeZone", TIME_ZONE),
        "datestyle" => ("DateStyle", DATE_STYLE),
        "intervalstyle" => ("IntervalStyle", "postgres"),
        "client_encoding" => ("client_encoding", "UTF8"),
        "server_encoding" => ("server_encoding", "UTF8"),
        "standard_conforming_strings" => ("standard_conforming_strings", "on"),
        "integer_datetimes" => ("integer_datetimes", "on"),
        "search_path" => ("search_path", "public"),
        "transaction_isolation" | "transaction_isolation_level" => {
            ("transaction_isolation", "read committed")
        }
        "default_transaction_read_only" => ("default_transaction_read_only", "on"),
        "transaction_read_only" => ("transaction_read_only", "on"),
        "is_superuser" => ("is_superuser", "off"),
        "max_identifier_length" => ("max_identifier_length", "63"),
        "extra_float_digits" => ("extra_float_digits", "1"),
        "bytea_output" => ("bytea_output", "hex"),
        "lc_messages" => ("lc_messages", "C"),
        "lc_collate" => ("lc_collate", "C"),
        "lc_ctype" => ("lc_ctype", "C"),
        _ => return None,
    })
}

/// A `[pg_catalog.]current_setting('name')` call: where it is and the setting's name.
struct SettingCall {
    start: usize,
    end: usize,
    name: String,
}

/// The `current_setting('...')` calls among `sig`, in order.
fn setting_calls(sig: &[&Lexeme]) -> Vec<SettingCall> {
    let mut calls = Vec::new();
    for (k, t) in sig.iter().enumerate() {
        let is_call = t.word().as_deref() == Some("current_setting")
            && sig.get(k + 1).is_some_and(|t| t.is(&Token::LParen))
            && sig.get(k + 2).is_some_and(|t| t.is_string())
            && sig.get(k + 3).is_some_and(|t| t.is(&Token::RParen));
        if !is_call {
            continue;
        }
        let mut start = t.start;
        // pg_catalog.current_setting(...): the qualifier goes too; any other is not ours.
        if k >= 2
            && sig[k - 1].is(&Token::Period)
            && sig[k - 2].word().as_deref() == Some("pg_catalog")
        {
            start = sig[k - 2].start;
        } else if k >= 1 && sig[k - 1].is(&Token::Period) {
            continue;
        }
        calls.push(SettingCall {
            start,
            end: sig[k + 3].end,
            name: unquote(sig[k + 2].text),
        });
    }
    calls
}

/// Replaces `[pg_catalog.]current_setting('name')` of a server setting by its value as a
/// string literal, and refuses unknown names.
///
/// Textual on purpose, and safe: the value spliced is one of this server's constants
/// (`server_version`, `TimeZone`, ...; see [`server_setting`]), never client data. The
/// connection's own settings, which the client chose, stay for [`bind_connection_settings`].
fn resolve_settings(sql: &str, sig: &[&Lexeme], session: &Session) -> Result<String, BackendError> {
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for call in setting_calls(sig) {
        let name = call.name.to_ascii_lowercase();
        if connection_setting(&name, session).is_some() {
            continue;
        }
        let (_, value) = server_setting(&name).ok_or_else(|| unknown_setting(&call.name))?;
        out.push_str(&sql[copied..call.start]);
        // The constants hold no quote or backslash; doubling quotes keeps that true anyway.
        out.push_str(&format!("'{}'", value.replace('\'', "''")));
        copied = call.end;
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

/// The connection's own settings inside a statement for the backend, as parameters: each
/// `current_setting('application_name')` (or `'session_authorization'`) becomes a placeholder
/// numbered after `after` and after every `$n` of the statement, and its value is returned to be
/// bound after the client's. The client chose these values at startup, so they are bound as
/// values like the client's parameters, never written into the SQL.
pub(super) fn bind_connection_settings(
    sql: &str,
    session: &Session,
    after: usize,
) -> Result<(String, Vec<ScalarValue>), BackendError> {
    let tokens = lex(sql);
    let sig: Vec<&Lexeme> = tokens.iter().filter(|t| t.is_significant()).collect();
    let calls: Vec<(SettingCall, &str)> = setting_calls(&sig)
        .into_iter()
        .filter_map(|call| {
            let (_, value) = connection_setting(&call.name.to_ascii_lowercase(), session)?;
            Some((call, value))
        })
        .collect();
    if calls.is_empty() {
        return Ok((sql.to_owned(), Vec::new()));
    }
    let mut next = sig.iter().filter_map(|t| t.param()).fold(after, usize::max);
    let mut out = String::with_capacity(sql.len());
    let mut values = Vec::with_capacity(calls.len());
    let mut copied = 0;
    for (call, value) in calls {
        next = next
            .checked_add(1)
            .filter(|n| *n <= MAX_PARAMS)
            .ok_or_else(|| BackendError::new("54023", "too many parameters"))?;
        out.push_str(&sql[copied..call.start]);
        out.push_str(&format!("${next}"));
        values.push(ScalarValue::Utf8(Some(value.to_owned())));
        copied = call.end;
    }
    out.push_str(&sql[copied..]);
    Ok((out, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "alice";

    fn session() -> Session {
        Session {
            user: USER.to_owned(),
            application_name: "psql".to_owned(),
            settings: Vec::new(),
        }
    }

    #[test]
    fn session_statements_are_answered_locally() {
        let s = session();
        let local = |sql: &str| match classify(sql, &s).unwrap() {
            Classified::Local(l) => l,
            other => panic!("{sql}: {other:?}"),
        };
        assert_eq!(local("SET x TO 1"), Local::Command("SET".to_owned()));
        assert_eq!(
            local("SET datafusion.execution.time_zone = '+05:00'"),
            Local::Set {
                name: "datafusion.execution.time_zone".to_owned(),
                value: "+05:00".to_owned()
            }
        );
        assert_eq!(
            local("set session datafusion.explain.format to tree"),
            Local::Set {
                name: "datafusion.explain.format".to_owned(),
                value: "tree".to_owned()
            }
        );
        assert_eq!(
            local("RESET datafusion.explain.format"),
            Local::Reset {
                name: Some("datafusion.explain.format".to_owned())
            }
        );
        assert_eq!(local("RESET ALL"), Local::Reset { name: None });
        assert_eq!(
            local("RESET search_path"),
            Local::Command("RESET".to_owned())
        );
        assert_eq!(
            local("begin isolation level serializable"),
            Local::Begin("BEGIN".to_owned())
        );
        assert_eq!(
            local("ROLLBACK TO SAVEPOINT a"),
            Local::Command("ROLLBACK".to_owned())
        );
        assert_eq!(
            local("SHOW application_name"),
            Local::Value {
                column: "application_name".to_owned(),
                value: "psql".to_owned()
            }
        );
        assert_eq!(
            local("SELECT current_setting('TimeZone') tz"),
            Local::Value {
                column: "tz".to_owned(),
                value: TIME_ZONE.to_owned()
            }
        );
        assert_eq!(classify("-- ping", &s).unwrap(), Classified::Empty);
        let Classified::Backend { params, .. } = classify(
            "SELECT $1::BIGINT, CAST($3 AS timestamp with time zone), $2, $4::Text",
            &s,
        )
        .unwrap() else {
            panic!("not for the backend")
        };
        assert_eq!(
            params,
            [
                Some(Type::INT8),
                None,
                Some(Type::TIMESTAMPTZ),
                Some(Type::TEXT)
            ]
        );
        assert_eq!(
            classify("SHOW datafusion.execution.batch_size", &s).unwrap(),
            Classified::Backend {
                sql: "SHOW datafusion.execution.batch_size".to_owned(),
                tag: "SHOW".to_owned(),
                params: vec![]
            }
        );
        assert_eq!(
            classify(
                "WITH x AS (SELECT pg_catalog.current_setting('server_version')) SELECT $2, '$9'",
                &s
            )
            .unwrap(),
            Classified::Backend {
                sql: "WITH x AS (SELECT '16.6') SELECT $2, '$9'".to_owned(),
                tag: "SELECT".to_owned(),
                params: vec![None, None]
            }
        );
    }

    #[test]
    fn connection_settings_become_parameters_and_server_settings_literals() {
        let s = Session {
            user: "bob".to_owned(),
            application_name: "x'); DROP VIEW v; --".to_owned(),
            settings: Vec::new(),
        };
        let Classified::Backend { sql, .. } = classify(
            "SELECT current_setting('server_version'), upper(current_setting('application_name')), \
             pg_catalog.current_setting('session_authorization'), $2",
            &s,
        )
        .unwrap() else {
            panic!("not for the backend")
        };
        // The server's constant is written in; the client's values are left for binding.
        assert_eq!(
            sql,
            "SELECT '16.6', upper(current_setting('application_name')), \
             pg_catalog.current_setting('session_authorization'), $2"
        );
        let (bound, values) = bind_connection_settings(&sql, &s, 1).unwrap();
        assert_eq!(bound, "SELECT '16.6', upper($3), $4, $2");
        assert_eq!(
            values,
            [
                ScalarValue::Utf8(Some("x'); DROP VIEW v; --".to_owned())),
                ScalarValue::Utf8(Some("bob".to_owned())),
            ]
        );
        // Numbered after what the client declared, too; nothing to bind leaves the SQL as is.
        let (bound, _) =
            bind_connection_settings("SELECT current_setting('application_name')", &s, 5).unwrap();
        assert_eq!(bound, "SELECT $6");
        let sql = "SELECT '$1', current_setting('timezone') -- current_setting('application_name')";
        assert_eq!(
            bind_connection_settings(sql, &s, 0).unwrap(),
            (sql.to_owned(), Vec::new())
        );
    }
}
