//! The values of bound parameters.

use ::pgwire::api::portal::Format;
use ::pgwire::api::results::FieldFormat;
use ::pgwire::api::Type;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use tokio_postgres::types::FromSql;

use super::lexer::lex;
use super::numeric::numeric_from_binary;
use super::BackendError;

// ---------------------------------------------------------------------------------------------
// Parameters

/// Substitutes bound parameters into `sql` as SQL literals.
///
/// Each value is decoded by its type and format (text or binary) and written as a literal
/// DataFusion parses back to the same value: numbers validated and parenthesised, strings
/// quoted with `''` and with backslashes spelled `chr(92)` (so a dialect that reads `\'` as an
/// escape cannot end the string early), dates and times as `CAST('...' AS ...)`, bytea as
/// `X'..'`. `$n` inside strings, identifiers and comments is left alone.
pub(super) fn bind(
    sql: &str,
    types: &[Type],
    format: &Format,
    values: &[Option<bytes::Bytes>],
) -> Result<String, BackendError> {
    if values.len() != types.len() {
        return Err(BackendError::new(
            "08P01",
            format!(
                "bind message supplies {} parameters, but prepared statement requires {}",
                values.len(),
                types.len()
            ),
        ));
    }
    if let Format::Individual(codes) = format {
        if codes.len() != values.len() {
            return Err(BackendError::new(
                "08P01",
                format!(
                    "bind message has {} parameter formats but {} parameters",
                    codes.len(),
                    values.len()
                ),
            ));
        }
    }
    let mut literals = Vec::with_capacity(values.len());
    for (i, (ty, value)) in types.iter().zip(values).enumerate() {
        let literal = param_literal(ty, format.format_for(i), value.as_deref()).map_err(|e| {
            BackendError::new(e.sqlstate, format!("parameter ${}: {}", i + 1, e.message))
        })?;
        literals.push(literal);
    }
    let mut out = String::with_capacity(sql.len() + 16 * literals.len());
    let mut copied = 0;
    for t in lex(sql) {
        if let Some(n) = t.param() {
            let literal = n
                .checked_sub(1)
                .and_then(|i| literals.get(i))
                .ok_or_else(|| BackendError::new("42P02", format!("there is no parameter ${n}")))?;
            out.push_str(&sql[copied..t.start]);
            // Spaces keep the literal from fusing with a neighbouring word.
            out.push(' ');
            out.push_str(literal);
            out.push(' ');
            copied = t.end;
        }
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

/// One parameter as a SQL literal.
fn param_literal(
    ty: &Type,
    format: FieldFormat,
    raw: Option<&[u8]>,
) -> Result<String, BackendError> {
    let Some(raw) = raw else {
        return Ok("NULL".to_owned());
    };
    let binary = format == FieldFormat::Binary;
    let bad_binary =
        |e: Box<dyn std::error::Error + Sync + Send>| BackendError::new("22P03", e.to_string());
    let text = || {
        std::str::from_utf8(raw)
            .map(str::trim)
            .map_err(|_| BackendError::new("22021", "invalid UTF-8"))
    };
    let bad_text =
        |what: &str, v: &str| BackendError::new("22P02", format!("invalid {what}: \"{v}\""));
    let cast_string = |value: &str, sql_type: &str| -> Result<String, BackendError> {
        Ok(format!(
            "CAST({} AS {sql_type})",
            sql_string(value).map_err(|e| BackendError::new("22021", e))?
        ))
    };
    match *ty {
        Type::BOOL => {
            let v = if binary {
                bool::from_sql(ty, raw).map_err(bad_binary)?
            } else {
                match text()?.to_ascii_lowercase().as_str() {
                    "t" | "true" | "y" | "yes" | "on" | "1" => true,
                    "f" | "false" | "n" | "no" | "off" | "0" => false,
                    other => return Err(bad_text("boolean", other)),
                }
            };
            Ok(if v { "TRUE" } else { "FALSE" }.to_owned())
        }
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            let v: i64 = if binary {
                match *ty {
                    Type::INT2 => i16::from_sql(ty, raw).map_err(bad_binary)?.into(),
                    Type::INT4 => i32::from_sql(ty, raw).map_err(bad_binary)?.into(),
                    Type::OID => u32::from_sql(ty, raw).map_err(bad_binary)?.into(),
                    _ => i64::from_sql(ty, raw).map_err(bad_binary)?,
                }
            } else {
                let t = text()?;
                t.parse().map_err(|_| bad_text("integer", t))?
            };
            Ok(format!("({v})"))
        }
        Type::FLOAT4 | Type::FLOAT8 => {
            let v: f64 = if binary {
                if *ty == Type::FLOAT4 {
                    f32::from_sql(ty, raw).map_err(bad_binary)?.into()
                } else {
                    f64::from_sql(ty, raw).map_err(bad_binary)?
                }
            } else {
                let t = text()?;
                t.parse().map_err(|_| bad_text("number", t))?
            };
            let sql_type = if *ty == Type::FLOAT4 {
                "REAL"
            } else {
                "DOUBLE"
            };
            if v.is_finite() {
                Ok(format!("CAST(({v:?}) AS {sql_type})"))
            } else {
                let name = if v.is_nan() {
                    "NaN"
                } else if v > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                };
                Ok(format!("CAST('{name}' AS {sql_type})"))
            }
        }
        Type::NUMERIC => {
            let v = if binary {
                numeric_from_binary(raw).map_err(bad_binary)?
            } else {
                text()?.to_owned()
            };
            if is_decimal(&v) {
                Ok(format!("({v})"))
            } else {
                match v.to_ascii_lowercase().as_str() {
                    "nan" => Ok("CAST('NaN' AS DOUBLE)".to_owned()),
                    "infinity" | "+infinity" | "inf" => Ok("CAST('Infinity' AS DOUBLE)".to_owned()),
                    "-infinity" | "-inf" => Ok("CAST('-Infinity' AS DOUBLE)".to_owned()),
                    _ => Err(bad_text("numeric", &v)),
                }
            }
        }
        Type::DATE => {
            if binary {
                let d = NaiveDate::from_sql(ty, raw).map_err(bad_binary)?;
                cast_string(&d.format("%Y-%m-%d").to_string(), "DATE")
            } else {
                cast_string(text()?, "DATE")
            }
        }
        Type::TIME => {
            if binary {
                let t = NaiveTime::from_sql(ty, raw).map_err(bad_binary)?;
                cast_string(&t.format("%H:%M:%S%.f").to_string(), "TIME")
            } else {
                cast_string(text()?, "TIME")
            }
        }
        Type::TIMESTAMP => {
            if binary {
                let t = NaiveDateTime::from_sql(ty, raw).map_err(bad_binary)?;
                cast_string(&t.format("%Y-%m-%dT%H:%M:%S%.f").to_string(), "TIMESTAMP")
            } else {
                cast_string(text()?, "TIMESTAMP")
            }
        }
        Type::TIMESTAMPTZ => {
            let value = if binary {
                DateTime::<Utc>::from_sql(ty, raw)
                    .map_err(bad_binary)?
                    .format("%Y-%m-%dT%H:%M:%S%.fZ")
                    .to_string()
            } else {
                text()?.to_owned()
            };
            // DataFusion parses the offset and keeps the instant; the column type follows
            // the session's time zone setting.
            cast_string(&value, "TIMESTAMP WITH TIME ZONE")
        }
        Type::BYTEA => {
            let bytes: Vec<u8> = if binary {
                raw.to_vec()
            } else {
                let t = text()?;
                let hex = t
                    .strip_prefix("\\x")
                    .ok_or_else(|| bad_text("bytea (only hex format is accepted)", t))?;
                decode_hex(hex).ok_or_else(|| bad_text("bytea", t))?
            };
            let mut hex = String::with_capacity(bytes.len() * 2 + 3);
            hex.push_str("X'");
            for b in bytes {
                hex.push_str(&format!("{b:02x}"));
            }
            hex.push('\'');
            Ok(hex)
        }
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            // Text types look the same in both formats.
            let s = std::str::from_utf8(raw)
                .map_err(|_| BackendError::new("22021", "invalid UTF-8"))?;
            sql_string(s).map_err(|e| BackendError::new("22021", e))
        }
        _ if !binary => {
            let s = std::str::from_utf8(raw)
                .map_err(|_| BackendError::new("22021", "invalid UTF-8"))?;
            sql_string(s).map_err(|e| BackendError::new("22021", e))
        }
        _ => Err(BackendError::new(
            "0A000",
            format!(
                "binary parameters of type {} are not supported; send text",
                ty.name()
            ),
        )),
    }
}

/// `s` as a SQL string literal that means the same under every DataFusion dialect.
pub(super) fn sql_string(s: &str) -> Result<String, &'static str> {
    if s.contains('\0') {
        return Err("invalid byte sequence for encoding \"UTF8\": 0x00");
    }
    let parts: Vec<String> = s
        .split('\\')
        .map(|part| format!("'{}'", part.replace('\'', "''")))
        .collect();
    if parts.len() == 1 {
        Ok(parts.concat())
    } else {
        Ok(format!("({})", parts.join(" || chr(92) || ")))
    }
}

/// A plain decimal number: optional sign, digits, optional fraction and exponent.
fn is_decimal(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = (!int.is_empty() || !frac.is_empty()) && digits(int) && digits(frac);
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_postgres::types::ToSql;

    use super::*;

    fn naive(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    }

    #[test]
    fn parameters_become_literals_that_cannot_escape() {
        let text = |v: &str| Some(bytes::Bytes::copy_from_slice(v.as_bytes()));
        let bound =
            |sql: &str, ty: Type, v: &str| bind(sql, &[ty], &Format::UnifiedText, &[text(v)]);
        assert_eq!(
            bound("SELECT $1", Type::TEXT, "it's").unwrap(),
            "SELECT  'it''s' "
        );
        assert_eq!(
            bound("SELECT $1", Type::TEXT, "a\\'b").unwrap(),
            "SELECT  ('a' || chr(92) || '''b') "
        );
        assert_eq!(bound("x-$1", Type::INT8, "-5").unwrap(), "x- (-5) ");
        assert_eq!(
            bound("SELECT $1", Type::INT8, "1; DROP TABLE t")
                .unwrap_err()
                .sqlstate,
            "22P02"
        );
        assert_eq!(
            bound("SELECT $1", Type::FLOAT8, "NaN").unwrap(),
            "SELECT  CAST('NaN' AS DOUBLE) "
        );
        assert_eq!(
            bound("SELECT $1", Type::NUMERIC, "1e3 OR 1=1")
                .unwrap_err()
                .sqlstate,
            "22P02"
        );
        assert_eq!(
            bound("SELECT $1", Type::TIMESTAMP, "2024-01-01 00:00:00').x").unwrap(),
            "SELECT  CAST('2024-01-01 00:00:00'').x' AS TIMESTAMP) "
        );
        assert_eq!(
            bound("SELECT $1", Type::BYTEA, "\\xdeadBEEF").unwrap(),
            "SELECT  X'deadbeef' "
        );
        assert_eq!(
            bound("SELECT $1", Type::TEXT, "a\0b").unwrap_err().sqlstate,
            "22021"
        );
        assert_eq!(
            bind(
                "SELECT $2",
                &[Type::TEXT],
                &Format::UnifiedText,
                &[text("a")]
            )
            .unwrap_err()
            .sqlstate,
            "42P02"
        );
        assert_eq!(
            bind("SELECT $1", &[Type::TEXT], &Format::UnifiedText, &[])
                .unwrap_err()
                .sqlstate,
            "08P01"
        );
        // Binary parameters decode by type.
        let mut raw = BytesMut::new();
        naive("2024-02-29 01:02:03.25")
            .to_sql(&Type::TIMESTAMP, &mut raw)
            .unwrap();
        assert_eq!(
            bind(
                "SELECT $1",
                &[Type::TIMESTAMP],
                &Format::UnifiedBinary,
                &[Some(raw.freeze())]
            )
            .unwrap(),
            "SELECT  CAST('2024-02-29T01:02:03.250' AS TIMESTAMP) "
        );
    }
}
