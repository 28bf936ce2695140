//! S3-compatible object storage (AWS S3, MinIO, moto) through the `object_store` crate: the
//! cold tier of the Parquet archive. [`Tierer`] moves NAS files older than `tier.after` to the
//! bucket under the same relative path, verifies each copy (size and SHA-256 of the bytes read
//! back), and only then removes the NAS file. In direct mode ([`DIRECT_ROLLS`]) the raw archive's
//! rolls go to the bucket before their offsets are stored.

mod config;
mod direct_sink;
mod tier;

pub use config::{S3Config, TierConfig};
pub use direct_sink::{ToTheBucket, DIRECT_ROLLS};
pub use tier::{archive_bucket, bucket, object_key, S3Error, TierReport, Tierer};
