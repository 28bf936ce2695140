//! Direct mode (`s3.direct = true`): the raw archive's rolls go to the bucket. A roll is
//! written to the staging folder (`nas.path`) like the NAS archive's, then each of its files is
//! uploaded, read back and compared (size, SHA-256) and removed locally ([`Tierer::upload`])
//! before the roll's offsets are stored. Recovery uploads the whole rolls a crash left in the
//! staging folder and reads how far the bucket holds each partition from its roll names, so a
//! lost stored offset neither deletes nor doubles an uploaded roll.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;

use super::{S3Error, Tierer};
use crate::nas::{build_rolls, extend_end, parse_roll_range, ParquetArchive, Publish, Recovered};
use crate::sink::registry::RawSinkKind;
use crate::sink::{Classify, Domain, ErrorClass, Healthcheck, SinkError};

/// The registry entry: the raw archive, when `s3.direct` sends it to the bucket (and the
/// stream's route sends raw rows to the archive).
pub const DIRECT_ROLLS: RawSinkKind = RawSinkKind {
    name: crate::nas::RAW_ROLLS.name,
    wanted: |settings, scope| {
        settings.direct() && !scope.backfill && settings.route(scope.stream.kind).raw_archive
    },
    build: |settings, ctx, id| {
        async move {
            let (Some(s3), Some(nas)) = (&settings.s3, &settings.nas) else {
                return Err(SinkError::fatal(
                    Domain::Internal,
                    "direct mode without [s3] and [nas]",
                ));
            };
            let tierer = Tierer::new(s3, &nas.path, settings.tier_after)
                .map_err(Classify::into_sink_error)?;
            build_rolls(settings, ctx, id, ToTheBucket(Arc::new(tierer)))
        }
        .boxed()
    },
};

/// Rolls go to the bucket before their offsets are stored.
pub struct ToTheBucket(pub Arc<Tierer>);

#[async_trait]
impl Publish for ToTheBucket {
    fn label(&self) -> &'static str {
        "s3"
    }

    async fn publish(&self, files: &[PathBuf]) -> Result<(), SinkError> {
        for file in files {
            self.0
                .upload(file)
                .await
                .map_err(Classify::into_sink_error)?;
            crate::failpoint::hit("s3.uploaded")?;
        }
        Ok(())
    }

    async fn recover(
        &self,
        archive: &ParquetArchive,
        partitions: &[i32],
        local: &Recovered,
    ) -> Result<HashMap<i32, i64>, SinkError> {
        // Whole rolls still in staging (uploads a crash cut short, or never started): the
        // upload is idempotent, so finishing them is safe.
        for file in &local.in_place {
            self.0
                .upload(file)
                .await
                .map_err(Classify::into_sink_error)?;
        }
        let names = self
            .0
            .list_names(&archive.dirs())
            .await
            .map_err(Classify::into_sink_error)?;
        let mut ends = local.ends.clone();
        for (p, _, last) in names.iter().filter_map(|n| parse_roll_range(n)) {
            if partitions.contains(&p) {
                extend_end(&mut ends, p, last);
            }
        }
        Ok(ends)
    }

    fn healthcheck(&self) -> Healthcheck {
        let tierer = self.0.clone();
        Box::pin(async move { tierer.check().await.map_err(Classify::into_sink_error) })
    }
}

impl Classify for S3Error {
    fn class(&self) -> ErrorClass {
        use object_store::Error as E;
        match self {
            S3Error::Build { .. } | S3Error::Credentials { .. } => ErrorClass::Fatal(Domain::User),
            S3Error::Request { source, .. } => match source {
                // Wrong keys or a policy that refuses us: a setting.
                E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
                    ErrorClass::Fatal(Domain::User)
                }
                _ => ErrorClass::Retry,
            },
            // A copy that reads back different is retried (the upload is idempotent).
            S3Error::Mismatch { .. } => ErrorClass::Retry,
            S3Error::Io { source, .. } => crate::sink::io_class(source),
        }
    }
}
