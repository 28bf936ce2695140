//! The statements the wire layer answers itself, so a session setup can never be refused:
//! `SET`, `SHOW` of a connection setting, `BEGIN`/`COMMIT`, `SELECT version()`, ...

use std::sync::Arc;

use ::pgwire::api::portal::Format;
use ::pgwire::api::results::{DataRowEncoder, QueryResponse, Response, Tag};
use ::pgwire::api::{ClientInfo, Type, METADATA_APPLICATION_NAME, METADATA_USER};

use super::encode::fields;
use super::lexer::{lex, unquote, Tk, Token};
use super::params::sql_string;
use super::{BackendError, DATE_STYLE, MAX_PARAMS, SERVER_VERSION, SERVER_VERSION_NUM, TIME_ZONE};

/// Who is connected, from the startup message.
pub(super) struct Session {
    pub(super) user: String,
    pub(super) application_name: String,
}

impl Session {
    pub(super) fn of<C: ClientInfo + ?Sized>(client: &C) -> Self {
        let get = |key: &str| client.metadata().get(key).cloned().unwrap_or_default();
        Self {
            user: get(METADATA_USER),
            application_name: get(METADATA_APPLICATION_NAME),
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
    let sig: Vec<&Token> = tokens.iter().filter(|t| t.is_significant()).collect();
    if sig.is_empty() {
        return Ok(Classified::Empty);
    }
    let word = |i: usize| -> Option<String> {
        sig.get(i)
            .filter(|t| t.kind == Tk::Word)
            .map(|t| sql[t.start..t.end].to_ascii_lowercase())
    };
    let first_word = word(0).unwrap_or_default();
    let local = |l: Local| Ok(Classified::Local(l));
    match first_word.as_str() {
        "set" | "reset" | "deallocate" | "savepoint" | "release" => {
            return local(Local::Command(first_word.to_ascii_uppercase()))
        }
        "discard" => {
            let what = word(1).unwrap_or_default().to_ascii_uppercase();
            return local(Local::Command(format!("DISCARD {what}").trim().to_owned()));
        }
        "begin" => return local(Local::Begin("BEGIN".to_owned())),
        "start" if word(1).as_deref() == Some("transaction") => {
            return local(Local::Begin("START TRANSACTION".to_owned()))
        }
        "commit" | "end" => return local(Local::End("COMMIT".to_owned())),
        "rollback" | "abort" => {
            // ROLLBACK TO SAVEPOINT stays inside the transaction block.
            if word(1).as_deref() == Some("to") {
                return local(Local::Command("ROLLBACK".to_owned()));
            }
            return local(Local::End("ROLLBACK".to_owned()));
        }
        "show" if sig.len() > 1 && sig[1..].iter().all(|t| t.kind == Tk::Word) => {
            let name = sig[1..]
                .iter()
                .map(|t| sql[t.start..t.end].to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join("_");
            if let Some((column, value)) = setting(&name, session) {
                return local(Local::Value {
                    column: column.to_owned(),
                    value,
                });
            }
        }
        "select" => {
            let punct = |i: usize, c: char| sig.get(i).is_some_and(|t| t.kind == Tk::Punct(c));
            // SELECT version()
            if sig.len() == 4
                && word(1).as_deref() == Some("version")
                && punct(2, '(')
                && punct(3, ')')
            {
                return local(Local::Value {
                    column: "version".to_owned(),
                    value: version_string(),
                });
            }
            // SELECT current_setting('name') [[AS] alias]
            if word(1).as_deref() == Some("current_setting")
                && punct(2, '(')
                && sig.get(3).is_some_and(|t| t.kind == Tk::Str)
                && punct(4, ')')
            {
                let alias = match sig.len() {
                    5 => Some("current_setting".to_owned()),
                    6 => alias_name(sql, sig[5]),
                    7 if word(5).as_deref() == Some("as") => alias_name(sql, sig[6]),
                    _ => None,
                };
                if let Some(column) = alias {
                    let name = unquote(&sql[sig[3].start..sig[3].end]);
                    let (_, value) = setting(&name.to_ascii_lowercase(), session)
                        .ok_or_else(|| unknown_setting(&name))?;
                    return local(Local::Value { column, value });
                }
            }
        }
        _ => {}
    }
    let tag = match first_word.as_str() {
        "" | "with" | "values" | "table" => "SELECT".to_owned(),
        w => w.to_ascii_uppercase(),
    };
    Ok(Classified::Backend {
        params: cast_types(sql, &tokens),
        sql: resolve_settings(sql, &tokens, session)?,
        tag,
    })
}

/// For each parameter `$1..$n`, the type of an explicit `$n::type` or `CAST($n AS type)`.
fn cast_types(sql: &str, tokens: &[Token]) -> Vec<Option<Type>> {
    let sig: Vec<&Token> = tokens.iter().filter(|t| t.is_significant()).collect();
    let word = |i: usize| {
        sig.get(i)
            .filter(|t| t.kind == Tk::Word)
            .map(|t| sql[t.start..t.end].to_ascii_lowercase())
    };
    let punct = |i: usize, c: char| sig.get(i).is_some_and(|t| t.kind == Tk::Punct(c));
    let mut types: Vec<Option<Type>> = Vec::new();
    for (k, t) in sig.iter().enumerate() {
        let Tk::Param(n) = t.kind else { continue };
        if n == 0 || n > MAX_PARAMS {
            continue;
        }
        if types.len() < n {
            types.resize(n, None);
        }
        let type_at = if punct(k + 1, ':') && punct(k + 2, ':') {
            Some(k + 3)
        } else if k >= 2 && punct(k - 1, '(') && word(k - 2).as_deref() == Some("cast") {
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

fn alias_name(sql: &str, token: &Token) -> Option<String> {
    match token.kind {
        Tk::Word => Some(sql[token.start..token.end].to_ascii_lowercase()),
        Tk::QuotedIdent => Some(unquote(&sql[token.start..token.end])),
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

/// A connection setting by lower-case name (words joined by `_`): its display name and value.
fn setting(name: &str, session: &Session) -> Option<(&'static str, String)> {
    let fixed = |column: &'static str, value: &str| Some((column, value.to_owned()));
    match name {
        "server_version" => fixed("server_version", SERVER_VERSION),
        "server_version_num" => fixed("server_version_num", SERVER_VERSION_NUM),
        "timezone" | "time_zone" => fixed("TimeZone", TIME_ZONE),
        "datestyle" => fixed("DateStyle", DATE_STYLE),
        "intervalstyle" => fixed("IntervalStyle", "postgres"),
        "client_encoding" => fixed("client_encoding", "UTF8"),
        "server_encoding" => fixed("server_encoding", "UTF8"),
        "standard_conforming_strings" => fixed("standard_conforming_strings", "on"),
        "integer_datetimes" => fixed("integer_datetimes", "on"),
        "search_path" => fixed("search_path", "public"),
        "transaction_isolation" | "transaction_isolation_level" => {
            fixed("transaction_isolation", "read committed")
        }
        "default_transaction_read_only" => fixed("default_transaction_read_only", "on"),
        "transaction_read_only" => fixed("transaction_read_only", "on"),
        "is_superuser" => fixed("is_superuser", "off"),
        "max_identifier_length" => fixed("max_identifier_length", "63"),
        "extra_float_digits" => fixed("extra_float_digits", "1"),
        "bytea_output" => fixed("bytea_output", "hex"),
        "lc_messages" | "lc_collate" | "lc_ctype" => match name {
            "lc_messages" => fixed("lc_messages", "C"),
            "lc_collate" => fixed("lc_collate", "C"),
            _ => fixed("lc_ctype", "C"),
        },
        "application_name" => Some(("application_name", session.application_name.clone())),
        "session_authorization" => Some(("session_authorization", session.user.clone())),
        _ => None,
    }
}

/// Replaces `[pg_catalog.]current_setting('name')` by the setting's value as a string literal.
fn resolve_settings(
    sql: &str,
    tokens: &[Token],
    session: &Session,
) -> Result<String, BackendError> {
    let sig: Vec<(usize, &Token)> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| t.is_significant())
        .collect();
    let text = |t: &Token| &sql[t.start..t.end];
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for (k, (_, t)) in sig.iter().enumerate() {
        let is_call = t.kind == Tk::Word
            && text(t).eq_ignore_ascii_case("current_setting")
            && sig
                .get(k + 1)
                .is_some_and(|(_, t)| t.kind == Tk::Punct('('))
            && sig.get(k + 2).is_some_and(|(_, t)| t.kind == Tk::Str)
            && sig
                .get(k + 3)
                .is_some_and(|(_, t)| t.kind == Tk::Punct(')'));
        if !is_call {
            continue;
        }
        let mut start = t.start;
        // pg_catalog.current_setting(...): the qualifier goes too.
        if k >= 2
            && sig[k - 1].1.kind == Tk::Punct('.')
            && sig[k - 2].1.kind == Tk::Word
            && text(sig[k - 2].1).eq_ignore_ascii_case("pg_catalog")
        {
            start = sig[k - 2].1.start;
        } else if k >= 1 && sig[k - 1].1.kind == Tk::Punct('.') {
            continue;
        }
        if start < copied {
            continue;
        }
        let name = unquote(text(sig[k + 2].1));
        let (_, value) =
            setting(&name.to_ascii_lowercase(), session).ok_or_else(|| unknown_setting(&name))?;
        out.push_str(&sql[copied..start]);
        out.push_str(&sql_string(&value).map_err(|e| BackendError::new("22021", e))?);
        copied = sig[k + 3].1.end;
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "alice";

    fn session() -> Session {
        Session {
            user: USER.to_owned(),
            application_name: "psql".to_owned(),
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
}
