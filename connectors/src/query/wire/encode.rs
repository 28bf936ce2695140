//! Arrow columns as PostgreSQL values, in the text or binary format each client asks for.

use std::sync::Arc;

use ::pgwire::api::portal::Format;
use ::pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response};
use ::pgwire::api::Type;
use ::pgwire::error::PgWireResult;
use ::pgwire::messages::data::DataRow;
use ::pgwire::types::format::FormatOptions as PgFormatOptions;
use ::pgwire::types::ToSqlText;
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    Time64MicrosecondType, TimeUnit, TimestampMicrosecondType,
};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions as ArrowFormatOptions};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql};

use super::handler::user_error;
use super::numeric::numeric_to_binary;
use super::BackendError;

// ---------------------------------------------------------------------------------------------
// Results

/// The PostgreSQL type an Arrow column is sent as.
///
/// | Arrow | PostgreSQL |
/// | --- | --- |
/// | Boolean | bool |
/// | Int8, Int16, UInt8 | int2 |
/// | Int32, UInt16 | int4 |
/// | Int64, UInt32 | int8 |
/// | UInt64, Decimal32/64/128/256 | numeric |
/// | Float16, Float32 | float4 |
/// | Float64 | float8 |
/// | Utf8, LargeUtf8, Utf8View | text |
/// | Binary, LargeBinary, BinaryView, FixedSizeBinary | bytea |
/// | Date32, Date64 | date |
/// | Time32, Time64 | time |
/// | Timestamp without time zone (any unit) | timestamp |
/// | Timestamp with a time zone (any unit) | timestamptz |
/// | Dictionary | the type of its values |
/// | Null and everything else (intervals, lists, structs, ...) | text, as Arrow displays it |
///
/// Times and timestamps are sent with microsecond precision, as PostgreSQL keeps them.
pub fn pg_type_of(data_type: &DataType) -> Type {
    match data_type {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 => Type::INT8,
        DataType::UInt64
        | DataType::Decimal32(_, _)
        | DataType::Decimal64(_, _)
        | DataType::Decimal128(_, _)
        | DataType::Decimal256(_, _) => Type::NUMERIC,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Type::TEXT,
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => Type::BYTEA,
        DataType::Date32 | DataType::Date64 => Type::DATE,
        DataType::Time32(_) | DataType::Time64(_) => Type::TIME,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        DataType::Dictionary(_, values) => pg_type_of(values),
        _ => Type::TEXT,
    }
}

/// Field descriptions for `columns`, each in the format the client asked for (text when it
/// did not say, as for Describe of a statement).
pub(super) fn fields(columns: &[(String, Type)], format: Option<&Format>) -> Vec<FieldInfo> {
    columns
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| {
            let format = match format {
                None => FieldFormat::Text,
                // A short format list would make pgwire index out of bounds.
                Some(Format::Individual(codes)) => codes
                    .get(i)
                    .map_or(FieldFormat::Text, |c| FieldFormat::from(*c)),
                Some(f) => f.format_for(i),
            };
            FieldInfo::new(name.clone(), None, None, ty.clone(), format)
        })
        .collect()
}

/// Encodes `batches` as rows of `columns` (the described types win over the batches' own,
/// so that rows always match the RowDescription the client holds).
pub(super) fn rows_response(
    columns: &[(String, Type)],
    format: Option<&Format>,
    tag: &str,
    batches: &[RecordBatch],
) -> Result<Response, BackendError> {
    let schema = Arc::new(fields(columns, format));
    let mut encoder = DataRowEncoder::new(schema.clone());
    let mut rows: Vec<PgWireResult<DataRow>> = Vec::new();
    for batch in batches {
        if batch.num_columns() != columns.len() {
            return Err(BackendError::new(
                "XX000",
                format!(
                    "the statement returned {} columns but was described with {}",
                    batch.num_columns(),
                    columns.len()
                ),
            ));
        }
        let encoders = columns
            .iter()
            .zip(batch.columns())
            .map(|((name, ty), array)| {
                Column::new(ty, array).map_err(|e| {
                    BackendError::new(
                        "XX000",
                        format!("column \"{name}\" cannot be sent as {}: {e}", ty.name()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            for column in &encoders {
                column
                    .encode(&mut encoder, row)
                    .map_err(|e| BackendError::new("XX000", e.to_string()))?;
            }
            rows.push(Ok(encoder.take_row()));
        }
    }
    let mut response = QueryResponse::new(schema, futures::stream::iter(rows));
    response.set_command_tag(tag);
    Ok(Response::Query(response))
}

/// One Arrow column, converted to the Arrow type that maps one-to-one onto its PostgreSQL type.
enum Column {
    Bool(datafusion::arrow::array::BooleanArray),
    I16(datafusion::arrow::array::Int16Array),
    I32(datafusion::arrow::array::Int32Array),
    I64(datafusion::arrow::array::Int64Array),
    F32(datafusion::arrow::array::Float32Array),
    F64(datafusion::arrow::array::Float64Array),
    Text(StringArray),
    Bytes(datafusion::arrow::array::BinaryArray),
    Date(datafusion::arrow::array::Date32Array),
    Time(datafusion::arrow::array::Time64MicrosecondArray),
    Timestamp(datafusion::arrow::array::TimestampMicrosecondArray),
    TimestampTz(datafusion::arrow::array::TimestampMicrosecondArray),
    /// Decimal text, encoded as numeric.
    Numeric(StringArray),
}

impl Column {
    fn new(ty: &Type, array: &ArrayRef) -> Result<Self, ArrowError> {
        let to = |t: DataType| cast(array, &t);
        Ok(match *ty {
            Type::BOOL => Column::Bool(to(DataType::Boolean)?.as_boolean().clone()),
            Type::INT2 => Column::I16(to(DataType::Int16)?.as_primitive::<Int16Type>().clone()),
            Type::INT4 => Column::I32(to(DataType::Int32)?.as_primitive::<Int32Type>().clone()),
            Type::INT8 => Column::I64(to(DataType::Int64)?.as_primitive::<Int64Type>().clone()),
            Type::FLOAT4 => {
                Column::F32(to(DataType::Float32)?.as_primitive::<Float32Type>().clone())
            }
            Type::FLOAT8 => {
                Column::F64(to(DataType::Float64)?.as_primitive::<Float64Type>().clone())
            }
            Type::BYTEA => Column::Bytes(to(DataType::Binary)?.as_binary::<i32>().clone()),
            Type::DATE => Column::Date(to(DataType::Date32)?.as_primitive::<Date32Type>().clone()),
            Type::TIME => Column::Time(
                to(DataType::Time64(TimeUnit::Microsecond))?
                    .as_primitive::<Time64MicrosecondType>()
                    .clone(),
            ),
            Type::TIMESTAMP => Column::Timestamp(
                to(DataType::Timestamp(TimeUnit::Microsecond, None))?
                    .as_primitive::<TimestampMicrosecondType>()
                    .clone(),
            ),
            Type::TIMESTAMPTZ => {
                // Arrow keeps UTC instants whatever the zone; only the unit changes.
                let zone = match array.data_type() {
                    DataType::Timestamp(_, Some(tz)) => Some(tz.clone()),
                    _ => Some("+00:00".into()),
                };
                Column::TimestampTz(
                    to(DataType::Timestamp(TimeUnit::Microsecond, zone))?
                        .as_primitive::<TimestampMicrosecondType>()
                        .clone(),
                )
            }
            Type::NUMERIC => Column::Numeric(display_strings(array)?),
            _ => Column::Text(match array.data_type() {
                DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Dictionary(_, _)
                | DataType::Null => to(DataType::Utf8)?.as_string::<i32>().clone(),
                _ => display_strings(array)?,
            }),
        })
    }

    fn encode(&self, encoder: &mut DataRowEncoder, i: usize) -> PgWireResult<()> {
        fn get<'a, A: Array, T>(a: &'a A, i: usize, f: impl FnOnce(&'a A) -> T) -> Option<T> {
            a.is_valid(i).then(|| f(a))
        }
        let out_of_range = |what: &str| {
            user_error(
                "22008",
                format!("{what} out of the range PostgreSQL can represent"),
            )
        };
        match self {
            Column::Bool(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::I16(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::I32(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::I64(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::F32(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::F64(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::Text(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::Bytes(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::Numeric(a) => encoder.encode_field(&get(a, i, |a| Numeric(a.value(i)))),
            Column::Date(a) => {
                let v = match get(a, i, |a| a.value(i)) {
                    // Arrow counts days from 1970-01-01, chrono from 0001-01-01.
                    Some(days) => Some(
                        days.checked_add(719_163)
                            .and_then(NaiveDate::from_num_days_from_ce_opt)
                            .ok_or_else(|| out_of_range("date"))?,
                    ),
                    None => None,
                };
                encoder.encode_field(&v)
            }
            Column::Time(a) => {
                let v = match get(a, i, |a| a.value(i)) {
                    Some(us) => Some(
                        u32::try_from(us.div_euclid(1_000_000))
                            .ok()
                            .and_then(|s| {
                                let nanos = (us.rem_euclid(1_000_000) * 1_000) as u32;
                                NaiveTime::from_num_seconds_from_midnight_opt(s, nanos)
                            })
                            .map(Moment::Time)
                            .ok_or_else(|| out_of_range("time"))?,
                    ),
                    None => None,
                };
                encoder.encode_field(&v)
            }
            Column::Timestamp(a) => {
                let v = match get(a, i, |a| a.value(i)) {
                    Some(us) => Some(
                        DateTime::<Utc>::from_timestamp_micros(us)
                            .map(|t| Moment::Timestamp(t.naive_utc()))
                            .ok_or_else(|| out_of_range("timestamp"))?,
                    ),
                    None => None,
                };
                encoder.encode_field(&v)
            }
            Column::TimestampTz(a) => {
                let v = match get(a, i, |a| a.value(i)) {
                    Some(us) => Some(
                        DateTime::<Utc>::from_timestamp_micros(us)
                            .map(Moment::TimestampTz)
                            .ok_or_else(|| out_of_range("timestamp"))?,
                    ),
                    None => None,
                };
                encoder.encode_field(&v)
            }
        }
    }
}

/// Every value of `array` as Arrow displays it; nulls stay null.
fn display_strings(array: &ArrayRef) -> Result<StringArray, ArrowError> {
    let options = ArrowFormatOptions::default();
    let formatter = ArrayFormatter::try_new(array.as_ref(), &options)?;
    Ok((0..array.len())
        .map(|i| array.is_valid(i).then(|| formatter.value(i).to_string()))
        .collect())
}

/// A time or timestamp, in binary as postgres-types sends it and in text as PostgreSQL prints
/// it (`2024-06-01 12:30:00.5+00`: fractional seconds only when there are any, the zone as
/// an hour offset), which psql users and text-format drivers expect.
#[derive(Debug)]
enum Moment {
    Time(NaiveTime),
    Timestamp(NaiveDateTime),
    TimestampTz(DateTime<Utc>),
}

impl ToSql for Moment {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Moment::Time(v) => v.to_sql(ty, out),
            Moment::Timestamp(v) => v.to_sql(ty, out),
            Moment::TimestampTz(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIME | Type::TIMESTAMP | Type::TIMESTAMPTZ)
    }

    to_sql_checked!();
}

impl ToSqlText for Moment {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _format_options: &PgFormatOptions,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use chrono::Timelike;
        let fraction = |nanos: u32| {
            let micros = format!(".{:06}", nanos / 1_000);
            micros.trim_end_matches(['0', '.']).to_owned()
        };
        let text = match self {
            Moment::Time(v) => format!("{}{}", v.format("%H:%M:%S"), fraction(v.nanosecond())),
            Moment::Timestamp(v) => {
                format!(
                    "{}{}",
                    v.format("%Y-%m-%d %H:%M:%S"),
                    fraction(v.nanosecond())
                )
            }
            Moment::TimestampTz(v) => format!(
                "{}{}+00",
                v.format("%Y-%m-%d %H:%M:%S"),
                fraction(v.nanosecond())
            ),
        };
        out.put_slice(text.as_bytes());
        Ok(IsNull::No)
    }
}

/// A decimal number in text (`-123.45`), sent as PostgreSQL numeric.
#[derive(Debug)]
struct Numeric<'a>(&'a str);

impl ToSql for Numeric<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        numeric_to_binary(self.0, out)?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

impl ToSqlText for Numeric<'_> {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _format_options: &PgFormatOptions,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrow_types_map_to_postgres_types() {
        assert_eq!(pg_type_of(&DataType::UInt8), Type::INT2);
        assert_eq!(pg_type_of(&DataType::UInt32), Type::INT8);
        assert_eq!(pg_type_of(&DataType::Utf8View), Type::TEXT);
        assert_eq!(
            pg_type_of(&DataType::Timestamp(
                TimeUnit::Second,
                Some("Europe/Berlin".into())
            )),
            Type::TIMESTAMPTZ
        );
        assert_eq!(
            pg_type_of(&DataType::Timestamp(TimeUnit::Nanosecond, None)),
            Type::TIMESTAMP
        );
        assert_eq!(pg_type_of(&DataType::Decimal128(38, 10)), Type::NUMERIC);
        assert_eq!(pg_type_of(&DataType::Null), Type::TEXT);
        assert_eq!(
            pg_type_of(&DataType::Dictionary(
                Box::new(DataType::Int32),
                Box::new(DataType::Utf8)
            )),
            Type::TEXT
        );
        assert_eq!(
            pg_type_of(&DataType::Interval(
                datafusion::arrow::datatypes::IntervalUnit::MonthDayNano
            )),
            Type::TEXT
        );
    }
}
