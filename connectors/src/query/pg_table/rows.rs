//! PostgreSQL rows into Arrow: one builder per projected column, values read in the binary
//! format (timestamps and dates by their raw microseconds and days).

use std::sync::Arc;

use datafusion::arrow::array::{
    make_array, ArrayRef, BinaryBuilder, BinaryViewBuilder, BooleanBuilder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, LargeBinaryBuilder,
    LargeStringBuilder, RecordBatch, StringBuilder, StringViewBuilder,
};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::arrow::error::ArrowError;
use tokio_postgres::types::{FromSql, Type};

use super::exec::ScanSpec;
use super::types::ColumnKind;
use super::{pg_message, PgTableError, BATCH_ROWS};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from the Unix epoch to PostgreSQL's.
const PG_EPOCH_DAYS: i32 = 10_957;

/// A `timestamp`/`timestamptz` in microseconds since the Unix epoch.
struct PgMicros(i64);

impl<'a> FromSql<'a> for PgMicros {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let raw = i64::from_be_bytes(raw.try_into()?);
        if raw == i64::MAX || raw == i64::MIN {
            return Err("infinite timestamp has no Arrow value".into());
        }
        raw.checked_add(PG_EPOCH_MICROS)
            .map(PgMicros)
            .ok_or_else(|| "timestamp out of range".into())
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMP | Type::TIMESTAMPTZ)
    }
}

/// A `date` in days since the Unix epoch.
struct PgDays(i32);

impl<'a> FromSql<'a> for PgDays {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let raw = i32::from_be_bytes(raw.try_into()?);
        if raw == i32::MAX || raw == i32::MIN {
            return Err("infinite date has no Arrow value".into());
        }
        raw.checked_add(PG_EPOCH_DAYS)
            .map(PgDays)
            .ok_or_else(|| "date out of range".into())
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::DATE
    }
}

/// One Arrow builder per projected column.
enum ColumnBuilder {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Utf8(StringBuilder),
    LargeUtf8(LargeStringBuilder),
    Utf8View(StringViewBuilder),
    Binary(BinaryBuilder),
    LargeBinary(LargeBinaryBuilder),
    BinaryView(BinaryViewBuilder),
    /// Days since the epoch, relabelled `Date32` when finished.
    Date(Int32Builder),
    /// Values in the field's unit, relabelled with the field's type when finished.
    Timestamp(TimeUnit, Int64Builder),
}

impl ColumnBuilder {
    fn new(data_type: &DataType) -> Self {
        let n = BATCH_ROWS;
        match data_type {
            DataType::Boolean => Self::Bool(BooleanBuilder::with_capacity(n)),
            DataType::Int16 => Self::I16(Int16Builder::with_capacity(n)),
            DataType::Int32 => Self::I32(Int32Builder::with_capacity(n)),
            DataType::Float32 => Self::F32(Float32Builder::with_capacity(n)),
            DataType::Float64 => Self::F64(Float64Builder::with_capacity(n)),
            DataType::Utf8 => Self::Utf8(StringBuilder::new()),
            DataType::LargeUtf8 => Self::LargeUtf8(LargeStringBuilder::new()),
            DataType::Utf8View => Self::Utf8View(StringViewBuilder::new()),
            DataType::Binary => Self::Binary(BinaryBuilder::new()),
            DataType::LargeBinary => Self::LargeBinary(LargeBinaryBuilder::new()),
            DataType::BinaryView => Self::BinaryView(BinaryViewBuilder::new()),
            DataType::Date32 => Self::Date(Int32Builder::with_capacity(n)),
            DataType::Timestamp(unit, _) => Self::Timestamp(*unit, Int64Builder::with_capacity(n)),
            // Int64, and (never reached) whatever `ColumnKind::of` did not admit.
            _ => Self::I64(Int64Builder::with_capacity(n)),
        }
    }

    /// Appends column `idx` of `row`; the error says what is wrong with the value.
    fn push(&mut self, row: &tokio_postgres::Row, idx: usize) -> Result<(), String> {
        match self {
            Self::Bool(b) => b.append_option(get::<bool>(row, idx)?),
            Self::I16(b) => b.append_option(get::<i16>(row, idx)?),
            Self::I32(b) => b.append_option(get::<i32>(row, idx)?),
            Self::I64(b) => b.append_option(get::<i64>(row, idx)?),
            Self::F32(b) => b.append_option(get::<f32>(row, idx)?),
            Self::F64(b) => b.append_option(get::<f64>(row, idx)?),
            Self::Utf8(b) => b.append_option(get::<&str>(row, idx)?),
            Self::LargeUtf8(b) => b.append_option(get::<&str>(row, idx)?),
            Self::Utf8View(b) => b.append_option(get::<&str>(row, idx)?),
            Self::Binary(b) => b.append_option(get::<&[u8]>(row, idx)?),
            Self::LargeBinary(b) => b.append_option(get::<&[u8]>(row, idx)?),
            Self::BinaryView(b) => b.append_option(get::<&[u8]>(row, idx)?),
            Self::Date(b) => b.append_option(get::<PgDays>(row, idx)?.map(|d| d.0)),
            Self::Timestamp(unit, b) => {
                let v = match get::<PgMicros>(row, idx)? {
                    None => None,
                    Some(PgMicros(m)) => Some(match unit {
                        TimeUnit::Second => m.div_euclid(1_000_000),
                        TimeUnit::Millisecond => m.div_euclid(1_000),
                        TimeUnit::Microsecond => m,
                        TimeUnit::Nanosecond => m.checked_mul(1_000).ok_or_else(|| {
                            "timestamp outside the nanosecond range (1677 to 2262)".to_owned()
                        })?,
                    }),
                };
                b.append_option(v);
            }
        }
        Ok(())
    }

    fn finish(&mut self, data_type: &DataType) -> Result<ArrayRef, ArrowError> {
        Ok(match self {
            Self::Bool(b) => Arc::new(b.finish()),
            Self::I16(b) => Arc::new(b.finish()),
            Self::I32(b) => Arc::new(b.finish()),
            Self::I64(b) => Arc::new(b.finish()),
            Self::F32(b) => Arc::new(b.finish()),
            Self::F64(b) => Arc::new(b.finish()),
            Self::Utf8(b) => Arc::new(b.finish()),
            Self::LargeUtf8(b) => Arc::new(b.finish()),
            Self::Utf8View(b) => Arc::new(b.finish()),
            Self::Binary(b) => Arc::new(b.finish()),
            Self::LargeBinary(b) => Arc::new(b.finish()),
            Self::BinaryView(b) => Arc::new(b.finish()),
            // Same layout as the target type: only the label changes.
            Self::Date(b) => relabel(b.finish().into(), data_type)?,
            Self::Timestamp(_, b) => relabel(b.finish().into(), data_type)?,
        })
    }
}

/// Column `idx` of `row`, NULL as `None`.
fn get<'a, T: FromSql<'a>>(row: &'a tokio_postgres::Row, idx: usize) -> Result<Option<T>, String> {
    row.try_get::<_, Option<T>>(idx).map_err(|e| pg_message(&e))
}

fn relabel(
    data: datafusion::arrow::array::ArrayData,
    data_type: &DataType,
) -> Result<ArrayRef, ArrowError> {
    Ok(make_array(
        data.into_builder().data_type(data_type.clone()).build()?,
    ))
}

/// The batch being filled from rows.
pub(super) struct BatchBuilder {
    columns: Vec<ColumnBuilder>,
    pub(super) len: usize,
}

impl BatchBuilder {
    pub(super) fn new(kinds: &[ColumnKind]) -> Self {
        Self {
            columns: kinds
                .iter()
                .map(|k| ColumnBuilder::new(&k.data_type))
                .collect(),
            len: 0,
        }
    }

    pub(super) fn push(
        &mut self,
        row: &tokio_postgres::Row,
        spec: &ScanSpec,
    ) -> Result<(), PgTableError> {
        for (idx, column) in self.columns.iter_mut().enumerate() {
            column
                .push(row, idx)
                .map_err(|message| PgTableError::Decode {
                    table: spec.table.clone(),
                    column: spec.schema.field(idx).name().clone(),
                    message,
                })?;
        }
        self.len += 1;
        Ok(())
    }

    pub(super) fn finish(&mut self, spec: &ScanSpec) -> Result<RecordBatch, PgTableError> {
        let arrow = |source| PgTableError::Arrow {
            table: spec.table.clone(),
            source,
        };
        let arrays = self
            .columns
            .iter_mut()
            .zip(spec.schema.fields())
            .map(|(c, f)| c.finish(f.data_type()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow)?;
        self.len = 0;
        RecordBatch::try_new(Arc::clone(&spec.schema), arrays).map_err(arrow)
    }
}
