//! Where the Parquet files go: an `object_store` behind one of two kinds of
//! destination.
//!
//! - `s3://bucket/prefix`: Amazon S3 or any S3-compatible server, configured
//!   from the usual environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_REGION`, `AWS_ENDPOINT_URL` for another server, `AWS_ALLOW_HTTP=true`
//!   for a plain-HTTP one such as a local test server).
//! - anything else: a local directory (created if missing).

use std::sync::Arc;

use anyhow::Context;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

/// An object store and the prefix to write under.
#[derive(Debug, Clone)]
pub struct Destination {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix every key starts with (may be empty).
    pub prefix: Path,
    /// The destination as given, for messages.
    pub display: String,
}

impl Destination {
    /// Parses `s3://bucket/prefix` or a local directory path.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            anyhow::ensure!(!bucket.is_empty(), "{spec}: no bucket name after s3://");
            let store = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .with_context(|| format!("cannot configure S3 for {spec}"))?;
            return Ok(Destination {
                store: Arc::new(store),
                prefix: Path::from(prefix),
                display: spec.to_string(),
            });
        }
        std::fs::create_dir_all(spec).with_context(|| format!("cannot create directory {spec}"))?;
        let dir = std::fs::canonicalize(spec)?;
        let store = LocalFileSystem::new_with_prefix(&dir)
            .with_context(|| format!("cannot use {} as a store", dir.display()))?;
        Ok(Destination {
            store: Arc::new(store),
            prefix: Path::default(),
            display: dir.display().to_string(),
        })
    }

    /// The key of a file's Parquet output: `<prefix>/<stem>.parquet`.
    pub fn key(&self, file: &str) -> Path {
        let stem = file.strip_suffix(".csv").unwrap_or(file);
        self.prefix.clone().join(format!("{stem}.parquet"))
    }
}
