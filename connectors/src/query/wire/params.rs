//! Bound parameters as values: each one is decoded from its wire format (text or binary) into
//! the [`ScalarValue`] of its PostgreSQL type, and the backend binds the values into the planned
//! statement (`LogicalPlan::with_param_values`). The SQL text is never touched, so a parameter
//! `x' OR '1'='1` is a string to compare with, not SQL.
//!
//! | PostgreSQL | value |
//! | --- | --- |
//! | bool | Boolean |
//! | int2, int4, int8 (and oid) | Int16, Int32, Int64 (Int64) |
//! | float4, float8 | Float32, Float64 |
//! | numeric | Decimal128 with the digits given (Float64 past 38 digits, and for NaN, ±Infinity) |
//! | text, varchar, bpchar, name, unknown | Utf8 |
//! | bytea | Binary (text format: `\x` hex) |
//! | date, time | Date32, Time64(µs) |
//! | timestamp, timestamptz | Timestamp(µs), Timestamp(µs, "+00:00") |
//! | anything else, in text format | Utf8, for the planner to cast |
//!
//! Text is read as DataFusion's casts read it (dates and times by Arrow's parsers), so a value
//! means what the same literal in the SQL would.

use ::pgwire::api::portal::Format;
use ::pgwire::api::results::FieldFormat;
use ::pgwire::api::Type;
use bytes::Bytes;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use datafusion::arrow::datatypes::{DataType, Date32Type, TimeUnit};
use datafusion::common::ScalarValue;
use tokio_postgres::types::FromSql;

use super::numeric::numeric_from_binary;
use super::BackendError;

/// Arrow's largest decimal precision for 128-bit values.
const MAX_DECIMAL_DIGITS: usize = 38;
/// The zone of a `timestamptz` value: an instant, shown in UTC.
const UTC: &str = "+00:00";

/// The values of a Bind message's parameters, decoded by the prepared statement's `types`.
pub(super) fn bind(
    types: &[Type],
    format: &Format,
    values: &[Option<Bytes>],
) -> Result<Vec<ScalarValue>, BackendError> {
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
    types
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (ty, value))| {
            decode(ty, format.format_for(i), value.as_deref()).map_err(|e| {
                BackendError::new(e.sqlstate, format!("parameter ${}: {}", i + 1, e.message))
            })
        })
        .collect()
}

/// One parameter's value: `raw` (NULL when `None`) in `format`, as PostgreSQL type `ty`.
pub(super) fn decode(
    ty: &Type,
    format: FieldFormat,
    raw: Option<&[u8]>,
) -> Result<ScalarValue, BackendError> {
    let Some(raw) = raw else {
        return null_of(ty);
    };
    if format == FieldFormat::Binary {
        decode_binary(ty, raw)
    } else {
        decode_text(ty, raw)
    }
}

/// The typed NULL of `ty`.
fn null_of(ty: &Type) -> Result<ScalarValue, BackendError> {
    ScalarValue::try_from(&data_type_of(ty)).map_err(|e| BackendError::new("XX000", e.to_string()))
}

/// The Arrow type a parameter of `ty` is bound as.
fn data_type_of(ty: &Type) -> DataType {
    match *ty {
        Type::BOOL => DataType::Boolean,
        Type::INT2 => DataType::Int16,
        Type::INT4 => DataType::Int32,
        Type::INT8 | Type::OID => DataType::Int64,
        Type::FLOAT4 => DataType::Float32,
        Type::FLOAT8 => DataType::Float64,
        Type::NUMERIC => DataType::Decimal128(38, 10),
        Type::BYTEA => DataType::Binary,
        Type::DATE => DataType::Date32,
        Type::TIME => DataType::Time64(TimeUnit::Microsecond),
        Type::TIMESTAMP => DataType::Timestamp(TimeUnit::Microsecond, None),
        Type::TIMESTAMPTZ => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
        _ => DataType::Utf8,
    }
}

fn utf8(raw: &[u8]) -> Result<&str, BackendError> {
    std::str::from_utf8(raw).map_err(|_| BackendError::new("22021", "invalid UTF-8"))
}

/// A string value; PostgreSQL's text cannot hold NUL, so neither can a parameter.
fn string(raw: &[u8]) -> Result<ScalarValue, BackendError> {
    let s = utf8(raw)?;
    if s.contains('\0') {
        return Err(BackendError::new(
            "22021",
            "invalid byte sequence for encoding \"UTF8\": 0x00",
        ));
    }
    Ok(ScalarValue::Utf8(Some(s.to_owned())))
}

fn invalid(what: &str, v: &str) -> BackendError {
    BackendError::new(
        "22P02",
        format!("invalid input syntax for type {what}: \"{v}\""),
    )
}

/// A parameter in the text format.
fn decode_text(ty: &Type, raw: &[u8]) -> Result<ScalarValue, BackendError> {
    // Text types keep their spaces; numbers, dates and the like are read trimmed.
    let text = || utf8(raw).map(str::trim);
    Ok(match *ty {
        Type::BOOL => {
            let t = text()?;
            ScalarValue::Boolean(Some(match t.to_ascii_lowercase().as_str() {
                "t" | "true" | "y" | "yes" | "on" | "1" => true,
                "f" | "false" | "n" | "no" | "off" | "0" => false,
                _ => return Err(invalid("boolean", t)),
            }))
        }
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            let t = text()?;
            integer(ty, t.parse().map_err(|_| invalid(ty.name(), t))?)?
        }
        Type::FLOAT4 | Type::FLOAT8 => {
            let t = text()?;
            let v: f64 = t.parse().map_err(|_| invalid(ty.name(), t))?;
            float(ty, v)
        }
        Type::NUMERIC => numeric(text()?)?,
        Type::BYTEA => {
            let t = text()?;
            let hex = t
                .strip_prefix("\\x")
                .ok_or_else(|| invalid("bytea (only the hex format is accepted)", t))?;
            ScalarValue::Binary(Some(decode_hex(hex).ok_or_else(|| invalid("bytea", t))?))
        }
        Type::DATE | Type::TIME | Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let t = text()?;
            // Arrow's parser, as `CAST('...' AS DATE)` in the SQL would read it.
            ScalarValue::Utf8(Some(t.to_owned()))
                .cast_to(&data_type_of(ty))
                .map_err(|_| {
                    BackendError::new(
                        "22007",
                        format!("invalid input syntax for type {}: \"{t}\"", ty.name()),
                    )
                })?
        }
        // Text types, and the rest for the planner to cast from text.
        _ => string(raw)?,
    })
}

/// A parameter in the binary format.
fn decode_binary(ty: &Type, raw: &[u8]) -> Result<ScalarValue, BackendError> {
    let bad = |e: Box<dyn std::error::Error + Sync + Send>| {
        BackendError::new(
            "22P03",
            format!("invalid binary value for type {}: {e}", ty.name()),
        )
    };
    Ok(match *ty {
        Type::BOOL => ScalarValue::Boolean(Some(bool::from_sql(ty, raw).map_err(bad)?)),
        Type::INT2 => ScalarValue::Int16(Some(i16::from_sql(ty, raw).map_err(bad)?)),
        Type::INT4 => ScalarValue::Int32(Some(i32::from_sql(ty, raw).map_err(bad)?)),
        Type::INT8 => ScalarValue::Int64(Some(i64::from_sql(ty, raw).map_err(bad)?)),
        Type::OID => ScalarValue::Int64(Some(u32::from_sql(ty, raw).map_err(bad)?.into())),
        Type::FLOAT4 => ScalarValue::Float32(Some(f32::from_sql(ty, raw).map_err(bad)?)),
        Type::FLOAT8 => ScalarValue::Float64(Some(f64::from_sql(ty, raw).map_err(bad)?)),
        Type::NUMERIC => numeric(&numeric_from_binary(raw).map_err(bad)?)?,
        Type::BYTEA => ScalarValue::Binary(Some(raw.to_vec())),
        Type::DATE => {
            let d = NaiveDate::from_sql(ty, raw).map_err(bad)?;
            ScalarValue::Date32(Some(Date32Type::from_naive_date(d)))
        }
        Type::TIME => {
            let t = NaiveTime::from_sql(ty, raw).map_err(bad)?;
            let micros = i64::from(t.num_seconds_from_midnight()) * 1_000_000
                + i64::from(t.nanosecond() / 1_000);
            ScalarValue::Time64Microsecond(Some(micros))
        }
        Type::TIMESTAMP => {
            let t = NaiveDateTime::from_sql(ty, raw).map_err(bad)?;
            ScalarValue::TimestampMicrosecond(Some(t.and_utc().timestamp_micros()), None)
        }
        Type::TIMESTAMPTZ => {
            let t = DateTime::<Utc>::from_sql(ty, raw).map_err(bad)?;
            ScalarValue::TimestampMicrosecond(Some(t.timestamp_micros()), Some(UTC.into()))
        }
        // Text types look the same in both formats.
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => string(raw)?,
        _ => {
            return Err(BackendError::new(
                "0A000",
                format!(
                    "binary parameters of type {} are not supported; send text",
                    ty.name()
                ),
            ))
        }
    })
}

fn out_of_range(ty: &Type) -> BackendError {
    BackendError::new(
        "22003",
        format!("value out of range for type {}", ty.name()),
    )
}

/// An integer of `ty`'s width.
fn integer(ty: &Type, v: i64) -> Result<ScalarValue, BackendError> {
    let range = |_| out_of_range(ty);
    Ok(match *ty {
        Type::INT2 => ScalarValue::Int16(Some(i16::try_from(v).map_err(range)?)),
        Type::INT4 => ScalarValue::Int32(Some(i32::try_from(v).map_err(range)?)),
        Type::OID => ScalarValue::Int64(Some(u32::try_from(v).map_err(range)?.into())),
        _ => ScalarValue::Int64(Some(v)),
    })
}

fn float(ty: &Type, v: f64) -> ScalarValue {
    if *ty == Type::FLOAT4 {
        ScalarValue::Float32(Some(v as f32))
    } else {
        ScalarValue::Float64(Some(v))
    }
}

/// A numeric from its text (`-12.50`, `1e3`, `NaN`, `Infinity`): the exact decimal while it
/// has at most 38 digits, a float otherwise.
fn numeric(text: &str) -> Result<ScalarValue, BackendError> {
    match text.to_ascii_lowercase().as_str() {
        "nan" => return Ok(ScalarValue::Float64(Some(f64::NAN))),
        "infinity" | "+infinity" | "inf" | "+inf" => {
            return Ok(ScalarValue::Float64(Some(f64::INFINITY)))
        }
        "-infinity" | "-inf" => return Ok(ScalarValue::Float64(Some(f64::NEG_INFINITY))),
        _ => {}
    }
    let Some(d) = Decimal::parse(text) else {
        return Err(invalid("numeric", text));
    };
    Ok(d.to_scalar().unwrap_or_else(|| {
        // Valid, just too long for Decimal128: near enough as a float, as PostgreSQL's own
        // float8 cast of it would be.
        ScalarValue::Float64(text.parse().ok())
    }))
}

/// A plain decimal number: sign, digits, the scale they have after the exponent.
#[derive(Debug, PartialEq)]
struct Decimal {
    negative: bool,
    /// Digits without leading zeros (empty for zero).
    digits: String,
    /// Zeros after `digits` that a positive exponent adds (`1e3`: `1` and three).
    zeros: usize,
    scale: usize,
}

impl Decimal {
    /// Optional sign, digits with an optional fraction, optional exponent.
    fn parse(s: &str) -> Option<Self> {
        let (negative, s) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (mantissa, exponent) = match s.find(['e', 'E']) {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
            return None;
        }
        let exponent: i64 = match exponent {
            None => 0,
            Some(e) => {
                let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
                if unsigned.is_empty() || !digits(unsigned) || unsigned.len() > 6 {
                    return None;
                }
                e.parse().ok()?
            }
        };
        let scale = i64::try_from(frac.len()).ok()? - exponent;
        Some(Self {
            negative,
            digits: format!("{int}{frac}").trim_start_matches('0').to_owned(),
            zeros: usize::try_from(-scale.min(0)).ok()?,
            scale: usize::try_from(scale.max(0)).ok()?,
        })
    }

    /// As a Decimal128, if it fits in 38 digits.
    fn to_scalar(&self) -> Option<ScalarValue> {
        let zeros = if self.digits.is_empty() {
            0
        } else {
            self.zeros
        };
        let precision = (self.digits.len() + zeros).max(self.scale).max(1);
        if precision > MAX_DECIMAL_DIGITS {
            return None;
        }
        let mut magnitude: i128 = if self.digits.is_empty() {
            0
        } else {
            self.digits.parse().ok()?
        };
        for _ in 0..zeros {
            magnitude = magnitude.checked_mul(10)?;
        }
        let value = if self.negative { -magnitude } else { magnitude };
        Some(ScalarValue::Decimal128(
            Some(value),
            u8::try_from(precision).ok()?,
            i8::try_from(self.scale).ok()?,
        ))
    }
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
    use datafusion::arrow::datatypes::Date32Type;
    use tokio_postgres::types::ToSql;

    use super::*;
    use crate::query::wire::numeric::numeric_to_binary;

    fn text(v: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(v.as_bytes()))
    }

    fn from_text(ty: Type, v: &str) -> Result<ScalarValue, BackendError> {
        decode(&ty, FieldFormat::Text, Some(v.as_bytes()))
    }

    fn from_binary(ty: Type, value: &(dyn ToSql + Sync)) -> ScalarValue {
        let mut raw = BytesMut::new();
        value.to_sql_checked(&ty, &mut raw).unwrap();
        decode(&ty, FieldFormat::Binary, Some(&raw)).unwrap()
    }

    fn utf8(s: &str) -> ScalarValue {
        ScalarValue::Utf8(Some(s.to_owned()))
    }

    fn micros(s: &str) -> i64 {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
            .unwrap()
            .and_utc()
            .timestamp_micros()
    }

    /// The inputs that used to become SQL literals: each is now a value or the same refusal.
    #[test]
    fn parameters_are_values_that_cannot_escape() {
        for s in [
            "it's",
            "a\\'b",
            "x' OR '1'='1",
            "'; DROP VIEW v; --",
            "$2",
            " padded ",
        ] {
            assert_eq!(from_text(Type::TEXT, s).unwrap(), utf8(s), "{s}");
            assert_eq!(from_binary(Type::VARCHAR, &s), utf8(s), "{s}");
        }
        assert_eq!(
            from_text(Type::INT8, "-5").unwrap(),
            ScalarValue::Int64(Some(-5))
        );
        let refused = |ty: Type, v: &str| from_text(ty, v).unwrap_err().sqlstate;
        assert_eq!(refused(Type::INT8, "1; DROP TABLE t"), "22P02");
        assert_eq!(refused(Type::NUMERIC, "1e3 OR 1=1"), "22P02");
        assert_eq!(refused(Type::TIMESTAMP, "2024-01-01 00:00:00').x"), "22007");
        assert_eq!(refused(Type::TEXT, "a\0b"), "22021");
        assert!(matches!(
            from_text(Type::FLOAT8, "NaN").unwrap(),
            ScalarValue::Float64(Some(v)) if v.is_nan()
        ));
        assert_eq!(
            from_text(Type::BYTEA, "\\xdeadBEEF").unwrap(),
            ScalarValue::Binary(Some(vec![0xde, 0xad, 0xbe, 0xef]))
        );
        // Counts are the protocol's business.
        let e = bind(&[Type::TEXT], &Format::UnifiedText, &[]).unwrap_err();
        assert_eq!(e.sqlstate, "08P01");
        let e = bind(&[Type::TEXT], &Format::Individual(vec![0, 1]), &[text("a")]).unwrap_err();
        assert_eq!(e.sqlstate, "08P01");
        let e = bind(&[Type::INT4], &Format::UnifiedText, &[text("x")]).unwrap_err();
        assert!(e.message.starts_with("parameter $1: "), "{}", e.message);
        // NULL is the type's NULL.
        assert_eq!(
            bind(
                &[Type::INT4, Type::TEXT],
                &Format::UnifiedText,
                &[None, None]
            )
            .unwrap(),
            [ScalarValue::Int32(None), ScalarValue::Utf8(None)]
        );
    }

    #[test]
    fn typed_parameters_decode_from_text_and_binary() {
        let ts = "2024-02-29 01:02:03.25";
        let date = NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
        let naive = NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.f").unwrap();
        let utc = Some(UTC.into());
        let (bytes, instant, time) = ([0u8, 255, 39].as_slice(), naive.and_utc(), naive.time());
        let cases: Vec<(Type, &str, &(dyn ToSql + Sync), ScalarValue)> = vec![
            (Type::BOOL, "yes", &true, ScalarValue::Boolean(Some(true))),
            (
                Type::BOOL,
                " off ",
                &false,
                ScalarValue::Boolean(Some(false)),
            ),
            (Type::INT2, "-7", &-7i16, ScalarValue::Int16(Some(-7))),
            (
                Type::INT4,
                "70000",
                &70000i32,
                ScalarValue::Int32(Some(70000)),
            ),
            (
                Type::INT8,
                "9007199254740993",
                &9007199254740993i64,
                ScalarValue::Int64(Some(9007199254740993)),
            ),
            (
                Type::FLOAT4,
                "0.5",
                &0.5f32,
                ScalarValue::Float32(Some(0.5)),
            ),
            (
                Type::FLOAT8,
                "-2.25",
                &-2.25f64,
                ScalarValue::Float64(Some(-2.25)),
            ),
            (
                Type::BYTEA,
                "\\x00ff27",
                &bytes,
                ScalarValue::Binary(Some(vec![0, 255, 39])),
            ),
            (
                Type::DATE,
                "2024-02-29",
                &date,
                ScalarValue::Date32(Some(Date32Type::from_naive_date(date))),
            ),
            (
                Type::TIMESTAMP,
                ts,
                &naive,
                ScalarValue::TimestampMicrosecond(Some(micros(ts)), None),
            ),
            (
                Type::TIMESTAMPTZ,
                "2024-02-29 02:02:03.25+01:00",
                &instant,
                ScalarValue::TimestampMicrosecond(Some(micros(ts)), utc),
            ),
            (
                Type::TIME,
                "01:02:03.25",
                &time,
                ScalarValue::Time64Microsecond(Some(3_723_250_000)),
            ),
        ];
        for (ty, text, binary, expected) in cases {
            assert_eq!(
                from_text(ty.clone(), text).unwrap(),
                expected,
                "{ty} text {text}"
            );
            assert_eq!(from_binary(ty.clone(), binary), expected, "{ty} binary");
        }
        assert_eq!(
            from_text(Type::INT2, "70000").unwrap_err().sqlstate,
            "22003"
        );
        assert_eq!(
            from_text(Type::BOOL, "maybe").unwrap_err().sqlstate,
            "22P02"
        );
        assert_eq!(
            from_text(Type::BYTEA, "deadbeef").unwrap_err().sqlstate,
            "22P02"
        );
        // Other types go to the planner as text to cast; in binary they are refused.
        assert_eq!(
            from_text(Type::JSONB, "{\"a\": 1}").unwrap(),
            utf8("{\"a\": 1}")
        );
        let e = decode(&Type::JSONB, FieldFormat::Binary, Some(b"\x01{}")).unwrap_err();
        assert_eq!(e.sqlstate, "0A000");
        let e = decode(&Type::INT4, FieldFormat::Binary, Some(b"\x01")).unwrap_err();
        assert_eq!(e.sqlstate, "22P03");
    }

    #[test]
    fn numerics_keep_their_digits() {
        let dec = |v: i128, p: u8, s: i8| ScalarValue::Decimal128(Some(v), p, s);
        for (text, expected) in [
            ("123.45", dec(12345, 5, 2)),
            ("-0.50", dec(-50, 2, 2)),
            ("+7", dec(7, 1, 0)),
            ("0", dec(0, 1, 0)),
            ("1.5e3", dec(1500, 4, 0)),
            ("12345e-2", dec(12345, 5, 2)),
            (".5", dec(5, 1, 1)),
            ("18446744073709551615", dec(18446744073709551615, 20, 0)),
        ] {
            assert_eq!(from_text(Type::NUMERIC, text).unwrap(), expected, "{text}");
            let mut raw = BytesMut::new();
            if !text.contains(['e', '+']) && !text.starts_with('.') {
                numeric_to_binary(text, &mut raw).unwrap();
                let binary = decode(&Type::NUMERIC, FieldFormat::Binary, Some(&raw)).unwrap();
                assert_eq!(binary, expected, "{text} binary");
            }
        }
        // Past 38 digits a float; special values too.
        let long = "1".repeat(40);
        assert!(matches!(
            from_text(Type::NUMERIC, &long).unwrap(),
            ScalarValue::Float64(Some(v)) if (v - 1.111e39).abs() < 1e37
        ));
        assert_eq!(
            from_text(Type::NUMERIC, "-Infinity").unwrap(),
            ScalarValue::Float64(Some(f64::NEG_INFINITY))
        );
        for bad in ["", "1.2.3", "1e", "e5", "1e9999999", "0x10", "1 OR 1=1"] {
            assert_eq!(
                from_text(Type::NUMERIC, bad).unwrap_err().sqlstate,
                "22P02",
                "{bad}"
            );
        }
    }
}
