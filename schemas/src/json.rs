//! Typed accessors over a parsed JSON object that turn every mismatch into a [`DecodeError`]
//! naming the field.

use serde_json::{Map, Value};

use crate::error::{DecodeError, ErrorKind};
use crate::DecodeLimits;

/// Longest identifier (device id, model, task id, ...) we accept, in bytes.
pub(crate) const MAX_IDENT_LEN: usize = 256;

pub(crate) fn parse_object(
    payload: &[u8],
    limits: &DecodeLimits,
) -> Result<Map<String, Value>, DecodeError> {
    limits.check(payload)?;
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(DecodeError::new(
            ErrorKind::MalformedJson,
            None,
            format!("expected a JSON object, got {}", type_name(&other)),
        )),
        Err(e) => Err(DecodeError::new(
            ErrorKind::MalformedJson,
            None,
            format!("not valid JSON: {e}"),
        )),
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> DecodeError {
    DecodeError::field(
        ErrorKind::WrongType,
        field,
        format!("expected {expected}, got {}", type_name(got)),
    )
}

/// A present, non-null value or a `MissingField` error.
pub(crate) fn required<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a Value, DecodeError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(DecodeError::field(
            ErrorKind::MissingField,
            field,
            "required field is missing",
        )),
        Some(v) => Ok(v),
    }
}

/// An identifier: a non-empty string of at most [`MAX_IDENT_LEN`] bytes.
pub(crate) fn ident(v: &Value, field: &str) -> Result<String, DecodeError> {
    let s = v.as_str().ok_or_else(|| wrong_type(field, "a string", v))?;
    ident_str(s, field)
}

/// [`ident`] of a string already known to be one.
pub(crate) fn ident_str(s: &str, field: &str) -> Result<String, DecodeError> {
    check_ident(s, field)?;
    Ok(s.to_owned())
}

/// The checks of [`ident_str`], without taking a copy.
pub(crate) fn check_ident(s: &str, field: &str) -> Result<(), DecodeError> {
    if s.trim().is_empty() {
        return Err(DecodeError::field(
            ErrorKind::InvalidValue,
            field,
            "must not be empty",
        ));
    }
    if s.contains('\0') {
        // PostgreSQL's text cannot hold it: the row would fail its sink, not just look odd.
        return Err(DecodeError::field(
            ErrorKind::InvalidValue,
            field,
            "contains a NUL character (\\u0000)",
        ));
    }
    if s.len() > MAX_IDENT_LEN {
        return Err(DecodeError::field(
            ErrorKind::InvalidValue,
            field,
            format!("is {} bytes, longer than {MAX_IDENT_LEN}", s.len()),
        ));
    }
    Ok(())
}

pub(crate) fn required_ident(obj: &Map<String, Value>, field: &str) -> Result<String, DecodeError> {
    ident(required(obj, field)?, field)
}

pub(crate) fn optional_ident(
    obj: &Map<String, Value>,
    field: &str,
) -> Result<Option<String>, DecodeError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => ident(v, field).map(Some),
    }
}

/// A finite number.
pub(crate) fn number(v: &Value, field: &str) -> Result<f64, DecodeError> {
    let n = v.as_f64().ok_or_else(|| wrong_type(field, "a number", v))?;
    if !n.is_finite() {
        return Err(DecodeError::field(
            ErrorKind::NonFinite,
            field,
            "must be a finite number",
        ));
    }
    Ok(n)
}

/// A non-negative integer that fits `u32` (lengths and token counts).
pub(crate) fn count(obj: &Map<String, Value>, field: &str) -> Result<u32, DecodeError> {
    let v = required(obj, field)?;
    let n = match v {
        Value::Number(n) => n,
        other => return Err(wrong_type(field, "a non-negative integer", other)),
    };
    if let Some(u) = n.as_u64() {
        return u32::try_from(u).map_err(|_| {
            DecodeError::field(
                ErrorKind::OutOfRange,
                field,
                format!("{u} is larger than {}", u32::MAX),
            )
        });
    }
    if n.as_i64().is_some() {
        return Err(DecodeError::field(
            ErrorKind::OutOfRange,
            field,
            format!("{n} is negative"),
        ));
    }
    Err(wrong_type(field, "a non-negative integer", v))
}

pub(crate) fn optional_bool(
    obj: &Map<String, Value>,
    field: &str,
) -> Result<Option<bool>, DecodeError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(field, "a boolean", other)),
    }
}

/// One of `allowed` (case-insensitive), returned lower-cased.
pub(crate) fn one_of<'a>(
    v: &Value,
    field: &str,
    allowed: &[&'a str],
) -> Result<&'a str, DecodeError> {
    let s = v.as_str().ok_or_else(|| wrong_type(field, "a string", v))?;
    allowed
        .iter()
        .find(|a| a.eq_ignore_ascii_case(s))
        .copied()
        .ok_or_else(|| {
            DecodeError::field(
                ErrorKind::InvalidValue,
                field,
                format!(
                    "\"{}\" is not one of {}",
                    truncate(s, 64),
                    allowed.join(", ")
                ),
            )
        })
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether any string or key in `v` holds a NUL character (PostgreSQL's `jsonb` refuses
/// `\u0000`).
pub(crate) fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}
