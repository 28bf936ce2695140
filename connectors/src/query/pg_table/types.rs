//! How a column is read and compared (the PostgreSQL type matching its Arrow type), and
//! names as SQL.

use std::fmt;

use datafusion::arrow::datatypes::{DataType, TimeUnit};

/// The PostgreSQL type a column is read and compared as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Text,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
}

impl PgType {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Bool => "bool",
            Self::Int2 => "int2",
            Self::Int4 => "int4",
            Self::Int8 => "int8",
            Self::Float4 => "float4",
            Self::Float8 => "float8",
            Self::Text => "text",
            Self::Bytea => "bytea",
            Self::Date => "date",
            Self::Timestamp => "timestamp",
            Self::Timestamptz => "timestamptz",
        }
    }

    pub(super) fn is_float(self) -> bool {
        matches!(self, Self::Float4 | Self::Float8)
    }
}

/// How a column is read: the PostgreSQL type to cast to, and the Arrow array to build.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ColumnKind {
    pub(super) pg: PgType,
    pub(super) data_type: DataType,
}

impl ColumnKind {
    pub(super) fn of(data_type: &DataType) -> Option<Self> {
        let pg = match data_type {
            DataType::Boolean => PgType::Bool,
            DataType::Int16 => PgType::Int2,
            DataType::Int32 => PgType::Int4,
            DataType::Int64 => PgType::Int8,
            DataType::Float32 => PgType::Float4,
            DataType::Float64 => PgType::Float8,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => PgType::Text,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => PgType::Bytea,
            DataType::Date32 => PgType::Date,
            DataType::Timestamp(_, None) => PgType::Timestamp,
            DataType::Timestamp(_, Some(_)) => PgType::Timestamptz,
            _ => return None,
        };
        Some(Self {
            pg,
            data_type: data_type.clone(),
        })
    }

    /// Filters may compare it in PostgreSQL. Not timestamps coarser or finer than PostgreSQL's
    /// microseconds: the server would compare values DataFusion never sees.
    pub(super) fn filterable(&self) -> bool {
        !matches!(self.data_type, DataType::Timestamp(unit, _) if unit != TimeUnit::Microsecond)
    }
}

/// The Arrow type `discover` gives a PostgreSQL `udt_name`.
pub(super) fn arrow_type_for(udt_name: &str) -> Option<DataType> {
    Some(match udt_name {
        "bool" => DataType::Boolean,
        "int2" => DataType::Int16,
        "int4" => DataType::Int32,
        "int8" => DataType::Int64,
        "float4" => DataType::Float32,
        "float8" | "numeric" => DataType::Float64,
        "text" | "varchar" | "bpchar" | "name" | "json" | "jsonb" | "uuid" => DataType::Utf8,
        "bytea" => DataType::Binary,
        "date" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "timestamptz" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => return None,
    })
}

/// `"name"` with embedded quotes doubled.
pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table name, optionally schema-qualified (`schema.table`; the first dot splits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableName {
    pub(super) schema: Option<String>,
    pub(super) name: String,
}

impl TableName {
    pub(super) fn parse(s: &str) -> Self {
        match s.split_once('.') {
            Some((schema, name)) => Self {
                schema: Some(schema.to_owned()),
                name: name.to_owned(),
            },
            None => Self {
                schema: None,
                name: s.to_owned(),
            },
        }
    }

    pub(super) fn sql(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}
