//! Grafana dashboards as Grafana runs them: the SQL and PromQL targets of a dashboard's panels,
//! dashboard variables substituted as the frontend does, and the PostgreSQL data source's macros
//! expanded as its backend does (`pkg/tsdb/sqleng`'s `Interpolate`, then
//! `pkg/tsdb/grafana-postgresql-datasource/macros.go`), so a test can run every panel query on a
//! real database.
//!
//! ```
//! use chrono::{TimeZone, Utc};
//! use primespark_tests::grafana::expand_macros;
//!
//! let from = Utc.with_ymd_and_hms(2025, 11, 5, 14, 0, 0).unwrap();
//! let to = Utc.with_ymd_and_hms(2025, 11, 5, 20, 0, 0).unwrap();
//! let sql = expand_macros(
//!     "SELECT $__timeGroupAlias(bucket, $__interval), sum(count) FROM t WHERE $__timeFilter(bucket) GROUP BY 1",
//!     from,
//!     to,
//!     std::time::Duration::from_secs(60),
//! );
//! assert_eq!(
//!     sql,
//!     "SELECT floor(extract(epoch from bucket)/60)*60 AS \"time\", sum(count) FROM t \
//!      WHERE bucket BETWEEN '2025-11-05T14:00:00Z' AND '2025-11-05T20:00:00Z' GROUP BY 1"
//! );
//! ```

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Months, SecondsFormat, Utc};
use serde_json::Value;

/// The SQL targets of a dashboard: (panel title, `rawSql`, data source uid), in panel order,
/// rows' nested panels included. A target's own data source wins over its panel's; a legacy
/// data source given by name is returned as that name. Targets without `rawSql` (PromQL) are
/// left out: see [`panel_exprs`].
pub fn panel_queries(dashboard_json: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (panel, target) in targets(dashboard_json) {
        if let Some(sql) = target["rawSql"].as_str() {
            out.push((title(panel), sql.to_owned(), datasource_uid(panel, target)));
        }
    }
    out
}

/// The PromQL targets of a dashboard: (panel title, `expr`, data source uid).
pub fn panel_exprs(dashboard_json: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (panel, target) in targets(dashboard_json) {
        if let Some(expr) = target["expr"].as_str() {
            out.push((title(panel), expr.to_owned(), datasource_uid(panel, target)));
        }
    }
    out
}

/// Every panel of a dashboard, the panels inside rows after their row.
pub fn panels(dashboard_json: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard_json["panels"], &mut out);
    out
}

fn targets(dashboard_json: &Value) -> Vec<(&Value, &Value)> {
    panels(dashboard_json)
        .into_iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (p, t))
        })
        .collect()
}

fn title(panel: &Value) -> String {
    panel["title"].as_str().unwrap_or_default().to_owned()
}

fn datasource_uid(panel: &Value, target: &Value) -> String {
    let of = |ds: &Value| match ds {
        Value::String(name) => Some(name.clone()),
        Value::Object(o) => o.get("uid").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    of(&target["datasource"])
        .or_else(|| of(&panel["datasource"]))
        .unwrap_or_default()
}

/// Substitutes the dashboard's variables (`$name`, `${name}`, `[[name]]`) with their current
/// values, as the frontend does before a query leaves the browser; an SQL data source inserts a
/// single value as it is, unquoted. Unknown names stay, as in Grafana. Grafana's own `$__`
/// variables are left to [`expand_macros`].
pub fn substitute_variables(sql: &str, dashboard_json: &Value) -> String {
    let mut values: Vec<(String, String)> = Vec::new();
    for v in dashboard_json["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(name) = v["name"].as_str() else {
            continue;
        };
        let current = &v["current"]["value"];
        let value = match current {
            Value::String(s) => s.clone(),
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            _ => v["query"].as_str().unwrap_or_default().to_owned(),
        };
        values.push((name.to_owned(), value));
    }
    let lookup = |name: &str| values.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let bytes = sql.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while i < sql.len() {
        let rest = &sql[i..];
        // `${name}` (format options after ':' are not needed here), `[[name]]`, `$name`.
        let candidate = if let Some(inner) = rest.strip_prefix("${") {
            inner
                .find('}')
                .map(|end| (&inner[..end], end + 3))
                .filter(|(n, _)| n.bytes().all(word))
        } else if let Some(inner) = rest.strip_prefix("[[") {
            inner
                .find("]]")
                .map(|end| (&inner[..end], end + 4))
                .filter(|(n, _)| n.bytes().all(word))
        } else if bytes[i] == b'$' {
            let len = rest[1..].bytes().take_while(|b| word(*b)).count();
            (len > 0).then(|| (&rest[1..=len], len + 1))
        } else {
            None
        };
        match candidate.and_then(|(name, len)| lookup(name).map(|v| (v, len))) {
            Some((value, len)) => {
                out.push_str(value);
                i += len;
            }
            None => {
                let ch = rest.chars().next().unwrap_or_default();
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// A macro Grafana refuses: the message it shows on the panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacroError(pub String);

impl fmt::Display for MacroError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MacroError {}

/// What a query is expanded for: the dashboard's time range, the panel's interval, and the
/// data source's `timescaledb` switch (with it, `$__timeGroup` becomes `time_bucket(..)`).
#[derive(Debug, Clone, Copy)]
pub struct MacroContext {
    /// Start of the time range.
    pub from: DateTime<Utc>,
    /// End of the time range.
    pub to: DateTime<Utc>,
    /// `$__interval`: what Grafana computed for the panel (range / max data points, rounded,
    /// at least the panel's min interval).
    pub interval: Duration,
    /// The data source's `jsonData.timescaledb`.
    pub timescaledb: bool,
}

/// Expands `sql` as Grafana's PostgreSQL data source does for a data source without
/// `timescaledb`. A macro Grafana would refuse becomes `macro_error()` (Grafana's own
/// placeholder), so running the result fails; [`try_expand_macros`] returns the message instead.
pub fn expand_macros(
    sql: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    interval: Duration,
) -> String {
    let ctx = MacroContext {
        from,
        to,
        interval,
        timescaledb: false,
    };
    interpolate(&global_substitutions(sql, &ctx), &ctx).0
}

/// Expands `sql` as Grafana does, or returns the error Grafana would show.
pub fn try_expand_macros(sql: &str, ctx: &MacroContext) -> Result<String, MacroError> {
    match interpolate(&global_substitutions(sql, ctx), ctx) {
        (sql, None) => Ok(sql),
        (_, Some(e)) => Err(e),
    }
}

/// `sqleng.Interpolate`: plain replacements shared by every SQL data source, in this order.
fn global_substitutions(sql: &str, ctx: &MacroContext) -> String {
    let nanos = i64::try_from(ctx.interval.as_nanos()).unwrap_or(i64::MAX);
    sql.replace("$__interval_ms", &(nanos / 1_000_000).to_string())
        .replace("$__interval", &format_interval(nanos))
        .replace("$__unixEpochFrom()", &ctx.from.timestamp().to_string())
        .replace("$__unixEpochTo()", &ctx.to.timestamp().to_string())
}

/// The macro engine: every `$name(args)` (args up to the first `)`), replaced in one pass.
/// Returns the first error, as Grafana does, with `macro_error()` at the failing macros.
fn interpolate(sql: &str, ctx: &MacroContext) -> (String, Option<MacroError>) {
    let bytes = sql.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = String::with_capacity(sql.len());
    let mut error = None;
    let mut last = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let name_len = bytes[i + 1..].iter().take_while(|b| ident(**b)).count();
        let open = i + 1 + name_len;
        let close = (name_len > 0 && bytes.get(open) == Some(&b'('))
            .then(|| sql[open + 1..].find(')').map(|c| open + 1 + c))
            .flatten();
        let Some(close) = close else {
            i += 1;
            continue;
        };
        let whole = &sql[i..=close];
        let mut name = &sql[i + 1..open];
        // Before Grafana 5.3 `$__timeGroup` added the alias; a ',' right after the first
        // occurrence of the same call still selects that behaviour.
        if name == "__timeGroup" {
            if let Some(at) = sql.find(whole) {
                if bytes.get(at + whole.len()) == Some(&b',') {
                    name = "__timeGroupAlias";
                }
            }
        }
        let args: Vec<&str> = sql[open + 1..close]
            .split(',')
            .map(|a| a.trim_matches(' '))
            .collect();
        let replacement = match evaluate(name, &args, ctx) {
            Ok(r) => r,
            Err(e) => {
                error.get_or_insert(e);
                "macro_error()".to_owned()
            }
        };
        out.push_str(&sql[last..i]);
        out.push_str(&replacement);
        last = close + 1;
        i = close + 1;
    }
    out.push_str(&sql[last..]);
    (out, error)
}

fn evaluate(name: &str, args: &[&str], ctx: &MacroContext) -> Result<String, MacroError> {
    let missing = || MacroError(format!("missing time column argument for macro {name}"));
    let col = args.first().copied().ok_or_else(missing)?;
    let group_args = || {
        if args.len() < 2 {
            return Err(MacroError(format!(
                "macro {name} needs time column and interval and optional fill value"
            )));
        }
        let interval = parse_interval(args[1].trim_matches('\''))
            .map_err(|_| MacroError(format!("error parsing interval {}", args[1])))?;
        if let Some(fill) = args.get(2) {
            check_fill(fill)?;
        }
        Ok(interval)
    };
    Ok(match name {
        "__time" => format!("{col} AS \"time\""),
        "__timeEpoch" => format!("extract(epoch from {col}) as \"time\""),
        "__timeFilter" => format!(
            "{col} BETWEEN '{}' AND '{}'",
            rfc3339_nano(ctx.from),
            rfc3339_nano(ctx.to)
        ),
        "__timeFrom" => format!("'{}'", rfc3339_nano(ctx.from)),
        "__timeTo" => format!("'{}'", rfc3339_nano(ctx.to)),
        "__timeGroup" => {
            let secs = seconds(group_args()?);
            if ctx.timescaledb {
                format!("time_bucket('{secs:.3}s',{col})")
            } else {
                let s = go_float(secs);
                format!("floor(extract(epoch from {col})/{s})*{s}")
            }
        }
        "__timeGroupAlias" => format!("{} AS \"time\"", evaluate("__timeGroup", args, ctx)?),
        "__unixEpochFilter" => format!(
            "{col} >= {} AND {col} <= {}",
            ctx.from.timestamp(),
            ctx.to.timestamp()
        ),
        "__unixEpochNanoFilter" => format!(
            "{col} >= {} AND {col} <= {}",
            unix_nanos(ctx.from),
            unix_nanos(ctx.to)
        ),
        "__unixEpochNanoFrom" => unix_nanos(ctx.from).to_string(),
        "__unixEpochNanoTo" => unix_nanos(ctx.to).to_string(),
        "__unixEpochGroup" => {
            let s = go_float(seconds(group_args()?));
            format!("floor(({col})/{s})*{s}")
        }
        "__unixEpochGroupAlias" => {
            format!("{} AS \"time\"", evaluate("__unixEpochGroup", args, ctx)?)
        }
        _ => return Err(MacroError(format!("unknown macro \"{name}\""))),
    })
}

/// `sqleng.SetupFillmode`: `NULL`, `previous` or a number.
fn check_fill(fill: &str) -> Result<(), MacroError> {
    match fill {
        "NULL" | "previous" => Ok(()),
        _ => fill
            .parse::<f64>()
            .map(|_| ())
            .map_err(|_| MacroError(format!("error parsing fill value {fill}"))),
    }
}

/// Go's `time.Time.UTC().Format(time.RFC3339Nano)`: fractional seconds without trailing zeros,
/// none at all when zero.
fn rfc3339_nano(t: DateTime<Utc>) -> String {
    let base = t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let nanos = t.timestamp_subsec_nanos();
    if nanos == 0 {
        return base;
    }
    let frac = format!("{nanos:09}");
    let frac = frac.trim_end_matches('0');
    format!("{}.{frac}Z", base.trim_end_matches('Z'))
}

fn unix_nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Go's `Duration.Seconds()`.
fn seconds(nanos: i64) -> f64 {
    (nanos / 1_000_000_000) as f64 + (nanos % 1_000_000_000) as f64 / 1e9
}

/// Go's `%v` of a float64: the shortest representation, in exponent form (`1e+06`) when the
/// exponent is below -4 or at least 6.
fn go_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..6).contains(&exp) {
        format!("{f}")
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// `gtime.FormatInterval`: the largest whole unit (`1m`, `2h`, `30s`, `500ms`).
fn format_interval(nanos: i64) -> String {
    const MS: i64 = 1_000_000;
    const S: i64 = 1000 * MS;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;
    const D: i64 = 24 * H;
    const Y: i64 = 365 * D;
    for (unit, suffix) in [(Y, "y"), (D, "d"), (H, "h"), (M, "m"), (S, "s"), (MS, "ms")] {
        if nanos >= unit {
            return format!("{}{suffix}", nanos / unit);
        }
    }
    "1ms".into()
}

/// `gtime.ParseInterval`: `<n>d|w|M|y` relative to the current UTC time, otherwise Go's
/// `time.ParseDuration`. Nanoseconds.
fn parse_interval(s: &str) -> Result<i64, String> {
    let unit = s.chars().last().unwrap_or_default();
    let digits = &s[..s.len().saturating_sub(unit.len_utf8())];
    if matches!(unit, 'd' | 'w' | 'M' | 'y')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
    {
        let n: u32 = digits
            .parse()
            .map_err(|_| format!("invalid interval {s:?}"))?;
        let now = Utc::now();
        let later = match unit {
            'd' => now.checked_add_signed(chrono::Duration::days(i64::from(n))),
            'w' => now.checked_add_signed(chrono::Duration::days(7 * i64::from(n))),
            'M' => now.checked_add_months(Months::new(n)),
            _ => now.checked_add_months(Months::new(n.saturating_mul(12))),
        }
        .ok_or_else(|| format!("invalid interval {s:?}"))?;
        return (later - now)
            .num_nanoseconds()
            .ok_or_else(|| format!("invalid interval {s:?}"));
    }
    parse_go_duration(s)
}

/// Go's `time.ParseDuration`: `[-+]` then one or more `<decimal><unit>`, units `ns`, `us`,
/// `µs`, `ms`, `s`, `m`, `h`; `0` alone needs no unit.
fn parse_go_duration(s: &str) -> Result<i64, String> {
    let bad = || format!("time: invalid duration {s:?}");
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let int: i128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let mut value = int * scale;
        if !frac.is_empty() {
            let digits = frac.len().min(30) as u32;
            let f: i128 = frac[..digits as usize].parse().map_err(|_| bad())?;
            value += f * scale / 10i128.pow(digits);
        }
        total += value;
        if total > i128::from(i64::MAX) {
            return Err(bad());
        }
        rest = after;
    }
    let total = i64::try_from(total).map_err(|_| bad())?;
    Ok(if negative { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn range() -> (DateTime<Utc>, DateTime<Utc>) {
        // The examples of Grafana's macros_test.go: 2018-04-12T18:00:00Z + 5 min.
        let from = Utc.with_ymd_and_hms(2018, 4, 12, 18, 0, 0).single();
        let from = from.unwrap_or_default();
        (from, from + chrono::Duration::minutes(5))
    }

    fn expand(sql: &str) -> String {
        let (from, to) = range();
        expand_macros(sql, from, to, Duration::from_secs(60))
    }

    #[test]
    fn time_columns_and_filters() {
        assert_eq!(
            expand("select $__time(time_column)"),
            "select time_column AS \"time\""
        );
        assert_eq!(
            expand("select $__timeEpoch(time)"),
            "select extract(epoch from time) as \"time\""
        );
        assert_eq!(
            expand("WHERE $__timeFilter(time_column)"),
            "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"
        );
        assert_eq!(
            expand("select $__timeFrom(), $__timeTo()"),
            "select '2018-04-12T18:00:00Z', '2018-04-12T18:05:00Z'"
        );
        assert_eq!(
            expand("WHERE $__unixEpochFilter(time)"),
            "WHERE time >= 1523556000 AND time <= 1523556300"
        );
        assert_eq!(
            expand("select $__unixEpochFrom(), $__unixEpochTo()"),
            "select 1523556000, 1523556300"
        );
        assert_eq!(
            expand("WHERE $__unixEpochNanoFilter(t) -- $__unixEpochNanoFrom() $__unixEpochNanoTo()"),
            "WHERE t >= 1523556000000000000 AND t <= 1523556300000000000 -- 1523556000000000000 1523556300000000000"
        );
    }

    #[test]
    fn fractional_seconds_are_trimmed_like_go() {
        let (from, _) = range();
        let to = from + chrono::Duration::milliseconds(1500);
        let sql = expand_macros("$__timeTo()", from, to, Duration::from_secs(1));
        assert_eq!(sql, "'2018-04-12T18:00:01.5Z'");
        let to = from + chrono::Duration::nanoseconds(123_000);
        let sql = expand_macros("$__timeTo()", from, to, Duration::from_secs(1));
        assert_eq!(sql, "'2018-04-12T18:00:00.000123Z'");
    }

    #[test]
    fn time_groups() {
        assert_eq!(
            expand("GROUP BY $__timeGroup(time_column,'5m')"),
            "GROUP BY floor(extract(epoch from time_column)/300)*300"
        );
        assert_eq!(
            expand("GROUP BY $__timeGroup(time_column, '5m', NULL)"),
            "GROUP BY floor(extract(epoch from time_column)/300)*300"
        );
        assert_eq!(
            expand("select $__timeGroupAlias(time_column,'5m')"),
            "select floor(extract(epoch from time_column)/300)*300 AS \"time\""
        );
        // Before 5.3 a ',' after the call meant the alias.
        assert_eq!(
            expand("select $__timeGroup(time_column,'5m'), value"),
            "select floor(extract(epoch from time_column)/300)*300 AS \"time\", value"
        );
        assert_eq!(
            expand("$__timeGroupAlias(bucket, 1h) $__timeGroup(b, 1.5s) $__timeGroup(b, 100ms)"),
            "floor(extract(epoch from bucket)/3600)*3600 AS \"time\" \
             floor(extract(epoch from b)/1.5)*1.5 floor(extract(epoch from b)/0.1)*0.1"
        );
        assert_eq!(
            expand("$__timeGroup(b, 1d) $__timeGroup(b, 2w) $__timeGroup(b, 1m30s)"),
            "floor(extract(epoch from b)/86400)*86400 \
             floor(extract(epoch from b)/1.2096e+06)*1.2096e+06 \
             floor(extract(epoch from b)/90)*90"
        );
        assert_eq!(
            expand("$__unixEpochGroupAlias(t, '10m', previous)"),
            "floor((t)/600)*600 AS \"time\""
        );
        assert_eq!(expand("$__unixEpochGroup(t, 1h)"), "floor((t)/3600)*3600");
    }

    #[test]
    fn timescaledb_groups_use_time_bucket() -> Result<(), MacroError> {
        let (from, to) = range();
        let ctx = MacroContext {
            from,
            to,
            interval: Duration::from_secs(60),
            timescaledb: true,
        };
        assert_eq!(
            try_expand_macros("$__timeGroupAlias(bucket, $__interval)", &ctx)?,
            "time_bucket('60.000s',bucket) AS \"time\""
        );
        assert_eq!(
            try_expand_macros("$__timeGroup(t, 1.5s)", &ctx)?,
            "time_bucket('1.500s',t)"
        );
        Ok(())
    }

    #[test]
    fn intervals() {
        let (from, to) = range();
        let at = |secs: u64, ms: u32| {
            expand_macros(
                "$__interval $__interval_ms",
                from,
                to,
                Duration::new(secs, ms * 1_000_000),
            )
        };
        assert_eq!(at(60, 0), "1m 60000");
        assert_eq!(at(90, 0), "1m 90000");
        assert_eq!(at(30, 0), "30s 30000");
        assert_eq!(at(7200, 0), "2h 7200000");
        assert_eq!(at(86_400 * 2, 0), "2d 172800000");
        assert_eq!(at(0, 500), "500ms 500");
        assert_eq!(at(0, 0), "1ms 0");
        assert_eq!(at(300, 0), "5m 300000");
        // `$__interval` inside a macro is substituted first.
        assert_eq!(
            expand_macros(
                "$__timeGroupAlias(bucket, $__interval)",
                from,
                to,
                Duration::from_secs(300)
            ),
            "floor(extract(epoch from bucket)/300)*300 AS \"time\""
        );
    }

    #[test]
    fn refused_macros_are_errors() {
        let (from, to) = range();
        let ctx = MacroContext {
            from,
            to,
            interval: Duration::from_secs(60),
            timescaledb: false,
        };
        let err = |sql: &str| try_expand_macros(sql, &ctx).err().map(|e| e.0);
        assert_eq!(
            err("$__timeGroup(t)").as_deref(),
            Some("macro __timeGroup needs time column and interval and optional fill value")
        );
        assert_eq!(
            err("$__timeGroup(t, 'soon')").as_deref(),
            Some("error parsing interval 'soon'")
        );
        assert_eq!(
            err("$__timeGroup(t, '1m', lots)").as_deref(),
            Some("error parsing fill value lots")
        );
        assert_eq!(
            err("$__nope(t)").as_deref(),
            Some("unknown macro \"__nope\"")
        );
        // Any `$name(..)` is a macro call, as in Grafana.
        assert_eq!(err("select $1(x)").as_deref(), Some("unknown macro \"1\""));
        assert_eq!(
            expand_macros("a $__nope(t) b", from, to, Duration::from_secs(1)),
            "a macro_error() b"
        );
        // Not calls: left alone.
        assert_eq!(
            expand("select '$x', $ (1), $__x"),
            "select '$x', $ (1), $__x"
        );
    }

    #[test]
    fn go_float_formatting() {
        assert_eq!(go_float(60.0), "60");
        assert_eq!(go_float(0.1), "0.1");
        assert_eq!(go_float(604_800.0), "604800");
        assert_eq!(go_float(1_000_000.0), "1e+06");
        assert_eq!(go_float(2_592_000.0), "2.592e+06");
        assert_eq!(go_float(0.00001), "1e-05");
        assert_eq!(go_float(0.0001), "0.0001");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1m"), Ok(60_000_000_000));
        assert_eq!(parse_go_duration("1h30m"), Ok(5_400_000_000_000));
        assert_eq!(parse_go_duration("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_go_duration(".5s"), Ok(500_000_000));
        assert_eq!(parse_go_duration("-2ms"), Ok(-2_000_000));
        assert_eq!(parse_go_duration("10µs"), Ok(10_000));
        assert_eq!(parse_go_duration("0"), Ok(0));
        assert!(parse_go_duration("5").is_err());
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("1x").is_err());
        assert!(parse_go_duration("5 minutes").is_err());
        assert_eq!(parse_interval("1d"), Ok(86_400_000_000_000));
        assert_eq!(parse_interval("1w"), Ok(7 * 86_400_000_000_000));
    }

    #[test]
    fn variables_and_targets() {
        let dashboard = serde_json::json!({
            "templating": {"list": [
                {"name": "price", "type": "textbox", "query": "0.5",
                 "current": {"text": "0.5", "value": "0.25"}},
                {"name": "p", "type": "constant", "query": "7"}
            ]},
            "panels": [
                {"title": "a", "datasource": {"type": "prometheus", "uid": "prom"},
                 "targets": [{"refId": "A", "expr": "up"}]},
                {"title": "row", "type": "row", "panels": [
                    {"title": "b", "datasource": {"uid": "pg"},
                     "targets": [{"refId": "A", "rawSql": "SELECT 1"},
                                 {"refId": "B", "rawSql": "SELECT 2", "datasource": {"uid": "other"}}]}
                ]}
            ]
        });
        assert_eq!(
            substitute_variables(
                "x * $price + ${price} + [[p]] + $pr + $__interval + $p",
                &dashboard
            ),
            "x * 0.25 + 0.25 + 7 + $pr + $__interval + 7"
        );
        assert_eq!(
            panel_queries(&dashboard),
            vec![
                ("b".to_owned(), "SELECT 1".to_owned(), "pg".to_owned()),
                ("b".to_owned(), "SELECT 2".to_owned(), "other".to_owned()),
            ]
        );
        assert_eq!(
            panel_exprs(&dashboard),
            vec![("a".to_owned(), "up".to_owned(), "prom".to_owned())]
        );
    }
}
