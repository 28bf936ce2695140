//! Moving cold Parquet files from the NAS to the bucket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};
use sha2::{Digest, Sha256};

use super::config::S3Config;
use crate::metrics::{TierFailed, TierMoved};

/// Files above this size go up as a multipart upload, in parts of this size.
const MULTIPART_BYTES: usize = 16 * 1024 * 1024;

/// Object storage failures.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The store could not be built from the configuration.
    #[error("s3 bucket {bucket}: {source}")]
    Build {
        /// Bucket.
        bucket: String,
        /// Why.
        #[source]
        source: object_store::Error,
    },
    /// `s3.credentials_file` could not be read or lacks a key.
    #[error("s3.credentials_file {path}: {reason}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why (never the secret itself).
        reason: String,
    },
    /// A request failed.
    #[error("s3 {what}: {source}")]
    Request {
        /// What we were doing, with the key.
        what: String,
        /// Why.
        #[source]
        source: object_store::Error,
    },
    /// The copy read back differs from the NAS file.
    #[error("s3 copy of {key} does not match the NAS file: {detail}")]
    Mismatch {
        /// Object key.
        key: String,
        /// Sizes or checksums.
        detail: String,
    },
    /// Local file system.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What one pass moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierReport {
    /// Files moved (copied, verified, removed from the NAS).
    pub moved: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files that stay on the NAS because a step failed (retried on the next pass).
    pub failed: u64,
}

/// Moves NAS files older than a given age to the bucket.
pub struct Tierer {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    root: PathBuf,
    after: Duration,
}

/// (access key id, secret) from an AWS shared-credentials style file.
fn read_credentials(path: &Path) -> Result<(String, String), S3Error> {
    let fail = |reason: &str| S3Error::Credentials {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(&e.to_string()))?;
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    };
    Ok((
        value("aws_access_key_id").ok_or_else(|| fail("no aws_access_key_id line"))?,
        value("aws_secret_access_key").ok_or_else(|| fail("no aws_secret_access_key line"))?,
    ))
}

/// Finished Parquet files under `root` older than `after` at `now` (in-progress files are
/// hidden, `.name.inprogress`, and never picked; nor are 1-minute aggregate files, which
/// [`crate::nas::compact`] merges into hour files first, nor an hour file whose merged minute
/// files are still beside it, waiting for their removal).
fn candidates(root: &Path, after: Duration, now: SystemTime) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let entries: Vec<_> = entries.flatten().collect();
        let names: Vec<String> = entries
            .iter()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let unsettled =
            crate::nas::compact::hour_files_with_minutes(names.iter().map(String::as_str));
        for ((entry, name), unsettled) in entries.into_iter().zip(&names).zip(unsettled) {
            if unsettled {
                continue;
            }
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file()
                && !name.starts_with('.')
                && name.ends_with(".parquet")
                // 1-minute aggregate files move once compacted into their hour's file.
                && !crate::nas::relative_path(root, &path)
                    .is_some_and(|rel| crate::nas::compact::is_minute_file(&rel))
            {
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age >= after);
                if old {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    out
}

/// The object key of `relative` (a path under the NAS root) under the bucket's `prefix`.
pub fn object_key(prefix: &str, relative: &str) -> String {
    if prefix.is_empty() {
        relative.to_owned()
    } else {
        format!("{prefix}/{relative}")
    }
}

/// The configured bucket as an object store.
pub fn bucket(cfg: &S3Config) -> Result<Arc<dyn ObjectStore>, S3Error> {
    // Credentials from the environment first (AWS_*), the file overrides.
    // A failing store must not hold a pass for minutes: the next pass retries anyway.
    let retry = RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
        ..RetryConfig::default()
    };
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&cfg.bucket)
        .with_region(&cfg.region)
        .with_allow_http(cfg.allow_http)
        .with_retry(retry);
    if let Some(endpoint) = &cfg.endpoint {
        // Path-style requests: MinIO and moto do not resolve bucket subdomains.
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
    }
    if let Some(file) = &cfg.credentials_file {
        let (id, secret) = read_credentials(file)?;
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
    }
    let store = builder.build().map_err(|source| S3Error::Build {
        bucket: cfg.bucket.clone(),
        source,
    })?;
    Ok(Arc::new(store))
}

/// The configured bucket rooted at `s3.prefix`: a path in it is a path under the NAS root
/// (what the archive readers' [`crate::archive::TieredStore`] needs).
pub fn archive_bucket(cfg: &S3Config) -> Result<Arc<dyn ObjectStore>, S3Error> {
    let store = bucket(cfg)?;
    let prefix = cfg.prefix.trim_matches('/');
    if prefix.is_empty() {
        return Ok(store);
    }
    Ok(Arc::new(object_store::prefix::PrefixStore::new(
        store,
        ObjectPath::from(prefix),
    )))
}

impl Tierer {
    /// A tierer for the NAS at `root`, moving files older than `after` to the configured bucket.
    pub fn new(cfg: &S3Config, root: &Path, after: Duration) -> Result<Self, S3Error> {
        Ok(Self::with_store(bucket(cfg)?, &cfg.prefix, root, after))
    }

    /// A tierer over any object store (tests use a local one).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        root: &Path,
        after: Duration,
    ) -> Self {
        Self {
            store,
            prefix: prefix.to_owned(),
            root: root.to_owned(),
            after,
        }
    }

    /// The object key of a NAS file: the prefix and its path under the root.
    fn key(&self, path: &Path) -> Option<ObjectPath> {
        let rel = crate::nas::relative_path(&self.root, path)?;
        ObjectPath::parse(object_key(&self.prefix, &rel)).ok()
    }

    /// Copies, verifies and removes one file.
    async fn move_one(&self, path: &Path, key: &ObjectPath) -> Result<u64, S3Error> {
        let io = |source| S3Error::Io {
            path: path.to_owned(),
            source,
        };
        let bytes = tokio::fs::read(path).await.map_err(io)?;
        let size = bytes.len() as u64;
        let local = Sha256::digest(&bytes);
        let request = |what: &str| {
            let what = format!("{what} {key}");
            move |source| S3Error::Request { what, source }
        };
        if bytes.len() > MULTIPART_BYTES {
            // Visible only once complete: S3 shows a multipart object after its completion.
            let upload = self
                .store
                .put_multipart(key)
                .await
                .map_err(request("starting upload of"))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_BYTES);
            writer.put(bytes::Bytes::from(bytes));
            writer
                .finish()
                .await
                .map_err(request("completing upload of"))?;
        } else {
            self.store
                .put(key, PutPayload::from(bytes))
                .await
                .map_err(request("uploading"))?;
        }
        // Verify what the store now serves, not what we sent.
        let meta = self
            .store
            .head(key)
            .await
            .map_err(request("reading size of"))?;
        if meta.size != size {
            return Err(S3Error::Mismatch {
                key: key.to_string(),
                detail: format!("{} bytes on the NAS, {} in the bucket", size, meta.size),
            });
        }
        let mut remote = Sha256::new();
        let mut stream = self
            .store
            .get(key)
            .await
            .map_err(request("reading back"))?
            .into_stream();
        while let Some(chunk) = stream.next().await {
            remote.update(chunk.map_err(request("reading back"))?);
        }
        if remote.finalize() != local {
            return Err(S3Error::Mismatch {
                key: key.to_string(),
                detail: "SHA-256 differs".into(),
            });
        }
        tokio::fs::remove_file(path).await.map_err(io)?;
        Ok(size)
    }

    /// Moves one finished file now (the sink's direct mode: a roll goes to the bucket before
    /// its offsets are committed): copied, verified, removed from the staging folder. A file
    /// already gone whose object is in the bucket counts as moved (a tiering pass took it).
    pub async fn upload(&self, path: &Path) -> Result<u64, S3Error> {
        let key = self.key(path).ok_or_else(|| S3Error::Io {
            path: path.to_owned(),
            source: std::io::Error::other("not under the staging root, or not a valid key"),
        })?;
        if !tokio::fs::try_exists(path).await.unwrap_or(true) {
            let head = self.store.head(&key).await;
            return head.map(|_| 0).map_err(|source| S3Error::Request {
                what: format!("finding {key}, gone from {}", path.display()),
                source,
            });
        }
        let started = Instant::now();
        let bytes = self.move_one(path, &key).await?;
        TierMoved {
            file: path,
            key: key.as_ref(),
            bytes,
            duration: started.elapsed(),
        }
        .emit();
        Ok(bytes)
    }

    /// Checks that the bucket answers a listing under the prefix (a health check).
    pub async fn check(&self) -> Result<(), S3Error> {
        let prefix = ObjectPath::parse(&self.prefix).ok();
        match self.store.list(prefix.as_ref()).next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(source)) => Err(S3Error::Request {
                what: format!("listing {}", self.prefix),
                source,
            }),
        }
    }

    /// The file names of the objects under `dirs` (folders under the root, as the archive
    /// writes them): what a direct-mode sink has uploaded.
    pub async fn list_names(&self, dirs: &[&Path]) -> Result<Vec<String>, S3Error> {
        let mut names = Vec::new();
        for dir in dirs {
            let Some(prefix) = self.key(dir) else {
                continue;
            };
            let listed: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&prefix))
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .map_err(|source| S3Error::Request {
                    what: format!("listing {prefix}"),
                    source,
                })?;
            names.extend(
                listed
                    .iter()
                    .filter_map(|m| m.location.filename().map(str::to_owned)),
            );
        }
        Ok(names)
    }

    /// One pass: every file older than `after` at `now` is copied, verified and removed from
    /// the NAS. A failure leaves that file on the NAS (the next pass retries it; the upload is
    /// idempotent, same key and bytes) and does not stop the others.
    pub async fn tier_once(&self, now: SystemTime) -> TierReport {
        let mut report = TierReport::default();
        let (root, after) = (self.root.clone(), self.after);
        let candidates = tokio::task::spawn_blocking(move || candidates(&root, after, now))
            .await
            .unwrap_or_default();
        for path in candidates {
            let Some(key) = self.key(&path) else {
                report.failed += 1;
                TierFailed {
                    file: &path,
                    error: &"not a valid object key",
                }
                .emit();
                continue;
            };
            let started = Instant::now();
            match self.move_one(&path, &key).await {
                Ok(bytes) => {
                    report.moved += 1;
                    report.bytes += bytes;
                    TierMoved {
                        file: &path,
                        key: key.as_ref(),
                        bytes,
                        duration: started.elapsed(),
                    }
                    .emit();
                }
                Err(e) => {
                    report.failed += 1;
                    TierFailed {
                        file: &path,
                        error: &e,
                    }
                    .emit();
                }
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn touch_old(path: &Path, age: Duration) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[tokio::test]
    async fn moves_old_finished_files_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let part = root.join("topic=edge.telemetry/date=2025-11-05/hour=14");
        std::fs::create_dir_all(&part).unwrap();
        let old = part.join("part-p0-o0-99.parquet");
        let big = part.join("part-p1-o0-99.parquet");
        let young = part.join("part-p0-o100-199.parquet");
        let hidden = part.join(".part-p0-o200-299.parquet.inprogress");
        std::fs::write(&old, b"old bytes").unwrap();
        let big_bytes: Vec<u8> = (0..MULTIPART_BYTES + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&big, &big_bytes).unwrap();
        std::fs::write(&young, b"young").unwrap();
        std::fs::write(&hidden, b"partial").unwrap();
        for f in [&old, &big, &hidden] {
            touch_old(f, Duration::from_secs(3600));
        }
        let store = Arc::new(InMemory::new());
        let tier = Tierer::with_store(store.clone(), "archive", root, Duration::from_secs(600));
        let report = tier.tier_once(SystemTime::now()).await;
        assert_eq!((report.moved, report.failed), (2, 0));
        assert_eq!(report.bytes, 9 + big_bytes.len() as u64);
        assert!(!old.exists() && !big.exists());
        assert!(young.exists() && hidden.exists());
        let key = ObjectPath::from(
            "archive/topic=edge.telemetry/date=2025-11-05/hour=14/part-p1-o0-99.parquet",
        );
        let got = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(got.as_ref(), big_bytes.as_slice());
        // Nothing left to move.
        assert_eq!(
            tier.tier_once(SystemTime::now()).await,
            TierReport::default()
        );
    }

    #[tokio::test]
    async fn an_hour_file_waits_on_the_nas_while_its_merged_minute_files_remain() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let day = root.join("table=device_metrics_1m/date=2025-11-05");
        std::fs::create_dir_all(&day).unwrap();
        let h14 = 1_762_351_200_000_000i64;
        let hour = day.join(crate::nas::compact::hour_file_name(h14));
        let minute = day.join(crate::nas::compact::minute_file_name(h14 + 60_000_000));
        // A minute file of the next hour does not hold hour 14 back.
        let next_hour = day.join(crate::nas::compact::hour_file_name(h14 + 3_600_000_000));
        let other = day.join(crate::nas::compact::minute_file_name(h14 + 7_260_000_000));
        for f in [&hour, &minute, &next_hour, &other] {
            std::fs::write(f, b"bytes").unwrap();
            touch_old(f, Duration::from_secs(3600));
        }
        let store = Arc::new(InMemory::new());
        let tier = Tierer::with_store(store.clone(), "archive", root, Duration::from_secs(600));
        let report = tier.tier_once(SystemTime::now()).await;
        assert_eq!((report.moved, report.failed), (1, 0));
        assert!(hour.exists() && minute.exists() && other.exists());
        assert!(!next_hour.exists());
        // Once the minute file is removed, the hour file moves.
        std::fs::remove_file(&minute).unwrap();
        let report = tier.tier_once(SystemTime::now()).await;
        assert_eq!((report.moved, report.failed), (1, 0));
        assert!(!hour.exists());
    }

    #[tokio::test]
    async fn direct_upload_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let topic = root.join("topic=t").join("date=2025-11-05").join("hour=14");
        std::fs::create_dir_all(&topic).unwrap();
        let committed = topic.join("part-p000-o00000000000000000000-00000000000000000009.parquet");
        let orphan = topic.join("part-p000-o00000000000000000010-00000000000000000019.parquet");
        std::fs::write(&committed, b"first roll").unwrap();
        std::fs::write(&orphan, b"second roll").unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let tier = Tierer::with_store(store.clone(), "archive", root, Duration::from_secs(3600));
        assert_eq!(tier.upload(&committed).await.unwrap(), 10);
        assert_eq!(tier.upload(&orphan).await.unwrap(), 11);
        assert!(!committed.exists() && !orphan.exists());
        // Gone locally but in the bucket: already moved, not an error.
        assert_eq!(tier.upload(&committed).await.unwrap(), 0);
        // Never written anywhere: an error, so the caller retries instead of committing.
        assert!(tier
            .upload(&topic.join("part-p000-o00000000000000000099-00000000000000000099.parquet"))
            .await
            .is_err());
        // Both uploaded rolls are listed: the bucket's own record of what it holds.
        let mut names = tier.list_names(&[&root.join("topic=t")]).await.unwrap();
        names.sort();
        assert_eq!(
            names,
            vec![
                "part-p000-o00000000000000000000-00000000000000000009.parquet",
                "part-p000-o00000000000000000010-00000000000000000019.parquet"
            ]
        );
    }

    #[tokio::test]
    async fn an_unreachable_store_leaves_every_file_on_the_nas() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("table=x/part-b0.parquet");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"bytes").unwrap();
        touch_old(&file, Duration::from_secs(3600));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Explicit credentials: without them the client would ask the cloud's instance
        // metadata service, off this machine.
        let creds = dir.path().join("creds");
        std::fs::write(&creds, "aws_access_key_id = a\naws_secret_access_key = b\n").unwrap();
        let cfg = S3Config {
            enabled: true,
            bucket: "b".into(),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            allow_http: true,
            credentials_file: Some(creds),
            ..S3Config::default()
        };
        let tier = Tierer::new(&cfg, dir.path(), Duration::from_secs(60)).unwrap();
        let report = tier.tier_once(SystemTime::now()).await;
        assert_eq!((report.moved, report.failed), (0, 1));
        assert!(file.exists());
    }

    #[test]
    fn credentials_file_needs_both_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        std::fs::write(
            &f,
            "[default]\naws_access_key_id = AK\naws_secret_access_key = SECRET\n",
        )
        .unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("AK".into(), "SECRET".into())
        );
        std::fs::write(&f, "aws_access_key_id = AK\n").unwrap();
        let e = read_credentials(&f).unwrap_err().to_string();
        assert!(
            e.contains("aws_secret_access_key") && !e.contains("AK"),
            "{e}"
        );
    }
}
