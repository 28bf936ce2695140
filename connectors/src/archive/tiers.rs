//! The Parquet archive as one read-only object store over its tiers: the NAS (warm) and the
//! bucket (cold), so a DataFusion listing table or a backfill sees every file wherever tiering
//! has put it.
//!
//! Tiering ([`crate::s3::Tierer`]) copies a NAS file to the bucket under the same relative path,
//! verifies the copy and only then removes the NAS file; direct mode (`s3.direct`) uploads raw
//! rolls the same way. So a file is on the NAS, in the bucket, or (between the verified upload
//! and the removal) in both with the same bytes. The merged listing names each path once, with
//! the entry of the first tier that has it (the NAS: an aggregate file rewritten by a late
//! event after a move is newer there), and a read that finds the file gone from a tier (moved
//! since the listing) reads the next tier's copy, which has the same bytes. A reader therefore
//! sees every archived row once, however tiering moves files under it.
//!
//! Writes are refused: readers never write the archive.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use crate::metrics::ArchiveTierRead;

/// Tiers of the archive as one store, the first preferred. Paths are relative to each tier's
/// root (the NAS root, the bucket's prefix): the same relative path names the same file.
#[derive(Debug)]
pub struct TieredStore {
    tiers: Vec<(&'static str, Arc<dyn ObjectStore>)>,
}

impl TieredStore {
    /// Tiers by name (for metrics: `nas`, `bucket`), in order of preference; [`super::tiers`]
    /// builds the archive's.
    pub fn from_tiers(tiers: Vec<(&'static str, Arc<dyn ObjectStore>)>) -> Self {
        Self { tiers }
    }

    /// The tiers' names, in order of preference.
    pub fn names(&self) -> Vec<&'static str> {
        self.tiers.iter().map(|(n, _)| *n).collect()
    }
}

impl fmt::Display for TieredStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TieredStore(")?;
        for (i, (name, store)) in self.tiers.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{name}: {store}")?;
        }
        write!(f, ")")
    }
}

fn read_only(operation: &str) -> object_store::Error {
    object_store::Error::NotSupported {
        source: format!("the archive's readers do not write it ({operation})").into(),
    }
}

/// Missing on one side is normal (the file is on the other); anything else is an error.
fn missing<T>(result: Result<T>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The tiers' listings, each path once, from the first tier that has it, without the minute
/// files an hour file beside them already holds (see [`crate::nas::compact`]).
fn merge(listings: Vec<Vec<ObjectMeta>>) -> Vec<ObjectMeta> {
    let mut by_path: BTreeMap<Path, ObjectMeta> = BTreeMap::new();
    for meta in listings.into_iter().flatten() {
        by_path.entry(meta.location.clone()).or_insert(meta);
    }
    let files: Vec<ObjectMeta> = by_path.into_values().collect();
    let hidden =
        crate::nas::compact::hidden_by_hour_files(files.iter().map(|m| m.location.as_ref()));
    files
        .into_iter()
        .zip(hidden)
        .filter_map(|(meta, hidden)| (!hidden).then_some(meta))
        .collect()
}

#[async_trait]
impl ObjectStore for TieredStore {
    async fn put_opts(&self, _: &Path, _: PutPayload, _: PutOptions) -> Result<PutResult> {
        Err(read_only("put"))
    }

    async fn put_multipart_opts(
        &self,
        _: &Path,
        _: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Err(read_only("multipart put"))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let mut last = None;
        for (name, store) in &self.tiers {
            match missing(store.get_opts(location, options.clone()).await)? {
                Some(found) => {
                    ArchiveTierRead {
                        tier: name,
                        path: location.as_ref(),
                    }
                    .emit();
                    return Ok(found);
                }
                // Moved to the next tier since it was listed (or only ever there).
                None => last = Some(*name),
            }
        }
        Err(object_store::Error::NotFound {
            path: location.to_string(),
            source: format!(
                "in no tier of the archive (last tried: {})",
                last.unwrap_or("none")
            )
            .into(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        locations.map(|_| Err(read_only("delete"))).boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let tiers = self.tiers.clone();
        let prefix = prefix.cloned();
        // One tier after another, in order: tiering copies a file before it removes the source,
        // so a file the first listing missed because it was just removed is already in the
        // next tier when that one is listed. Listed side by side, a file could slip past both.
        // Every listing is needed before the first path can be named once; a listing is one
        // table's files, so collecting them is small next to reading them.
        stream::once(async move {
            let mut listings = Vec::with_capacity(tiers.len());
            for (_, store) in &tiers {
                listings.push(store.list(prefix.as_ref()).try_collect::<Vec<_>>().await?);
            }
            Ok::<_, object_store::Error>(stream::iter(merge(listings).into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let mut prefixes = Vec::new();
        let mut objects = Vec::new();
        for (_, store) in &self.tiers {
            // A folder missing from one tier is normal (its files are all in another).
            if let Some(listed) = missing(store.list_with_delimiter(prefix).await)? {
                prefixes.extend(listed.common_prefixes);
                objects.push(listed.objects);
            }
        }
        prefixes.sort();
        prefixes.dedup();
        Ok(ListResult {
            common_prefixes: prefixes,
            objects: merge(objects),
        })
    }

    async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> Result<()> {
        Err(read_only("copy"))
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    use super::*;

    async fn put(store: &InMemory, path: &str, body: &'static [u8]) {
        store
            .put(&Path::from(path), PutPayload::from_static(body))
            .await
            .unwrap();
    }

    async fn listed(store: &TieredStore, prefix: &str) -> Vec<(String, u64)> {
        store
            .list(Some(&Path::from(prefix)))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn each_file_once_wherever_it_is_and_reads_fall_back_to_the_bucket() {
        let nas = Arc::new(InMemory::new());
        let bucket = Arc::new(InMemory::new());
        put(&nas, "topic=t/date=2025-11-05/hour=14/a.parquet", b"on nas").await;
        // Moved: in both during the move, the bucket only after it.
        put(&nas, "topic=t/date=2025-11-05/hour=13/b.parquet", b"both").await;
        put(
            &bucket,
            "topic=t/date=2025-11-05/hour=13/b.parquet",
            b"both",
        )
        .await;
        put(
            &bucket,
            "topic=t/date=2025-11-04/hour=23/c.parquet",
            b"cold",
        )
        .await;
        // An aggregate file rewritten on the NAS after its move: the NAS copy is newer.
        put(&nas, "table=x/date=2025-11-05/part-b1.parquet", b"newer").await;
        put(&bucket, "table=x/date=2025-11-05/part-b1.parquet", b"old").await;
        let store = TieredStore::from_tiers(vec![("nas", nas.clone()), ("bucket", bucket.clone())]);

        assert_eq!(
            listed(&store, "topic=t").await,
            [
                ("topic=t/date=2025-11-04/hour=23/c.parquet".to_owned(), 4),
                ("topic=t/date=2025-11-05/hour=13/b.parquet".to_owned(), 4),
                ("topic=t/date=2025-11-05/hour=14/a.parquet".to_owned(), 6),
            ]
        );
        assert_eq!(
            listed(&store, "table=x").await,
            [("table=x/date=2025-11-05/part-b1.parquet".to_owned(), 5)]
        );
        let dirs = store
            .list_with_delimiter(Some(&Path::from("topic=t")))
            .await
            .unwrap();
        assert_eq!(
            dirs.common_prefixes,
            [
                Path::from("topic=t/date=2025-11-04"),
                Path::from("topic=t/date=2025-11-05")
            ]
        );
        let hour13 = store
            .list_with_delimiter(Some(&Path::from("topic=t/date=2025-11-05/hour=13")))
            .await
            .unwrap();
        assert_eq!(hour13.objects.len(), 1);

        // Listed while on the NAS, removed from it before the read: the bucket's copy is read.
        let b = Path::from("topic=t/date=2025-11-05/hour=13/b.parquet");
        nas.delete(&b).await.unwrap();
        let bytes = store.get_range(&b, 0..4).await.unwrap();
        assert_eq!(&bytes[..], b"both");
        let newer = store
            .get(&Path::from("table=x/date=2025-11-05/part-b1.parquet"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&newer[..], b"newer");
        // In neither: NotFound, as from any store.
        assert!(matches!(
            store.head(&Path::from("nope.parquet")).await,
            Err(object_store::Error::NotFound { .. })
        ));
        assert!(store
            .put(&Path::from("x.parquet"), PutPayload::from_static(b"x"))
            .await
            .is_err());

        // Without a bucket it is the NAS alone.
        let alone = TieredStore::from_tiers(vec![("nas", nas)]);
        assert_eq!(listed(&alone, "topic=t").await.len(), 1);
    }
}
