//! Where a backup lives: `file:///dir` or `s3://bucket/prefix`, both through
//! `object_store`.
//!
//! S3 settings come from the usual AWS environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for an
//! S3-compatible server, ...); path-style requests, so a server on a bare
//! `host:port` works; an `http://` endpoint is allowed as given.

use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Why a target cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0:?} is not a backup location (expected file:///absolute/dir or s3://bucket/prefix)")]
    BadUrl(String),
    #[error("cannot create the directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    // object_store's messages already carry their causes: kept as text so
    // that an error chain does not print each of them again.
    #[error("{url}: {message}")]
    Store { url: String, message: String },
}

/// An opened backup location: a store and the prefix inside it.
pub struct Target {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

/// The parts of a location URL.
#[derive(Debug, PartialEq, Eq)]
pub enum Location {
    /// An absolute directory.
    Dir(String),
    /// A bucket and a prefix inside it (no leading or trailing `/`).
    S3 { bucket: String, prefix: String },
}

/// Parses `file:///dir` or `s3://bucket[/prefix]`.
pub fn parse(url: &str) -> Result<Location, TargetError> {
    let bad = || TargetError::BadUrl(url.chars().take(200).collect());
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') || path.contains("/../") || path.ends_with("/..") {
            return Err(bad());
        }
        return Ok(Location::Dir(path.trim_end_matches('/').to_string()));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok_bucket = !bucket.is_empty()
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
        if !ok_bucket || prefix.split('/').any(|p| p == "..") {
            return Err(bad());
        }
        return Ok(Location::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        });
    }
    Err(bad())
}

/// S3 settings given outright (the operator's, from a `KvBackup` and its
/// Secret) rather than read from the process environment.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    /// `http(s)://host:port` of an S3-compatible server; AWS when `None`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl Target {
    /// Opens a location; a directory is created when missing. S3 settings
    /// come from the AWS environment variables.
    pub fn open(url: &str) -> Result<Target, TargetError> {
        Self::open_in(url, None)
    }

    /// Opens a location with S3 settings given outright; the process
    /// environment is not read.
    pub fn open_with(url: &str, s3: &S3Options) -> Result<Target, TargetError> {
        Self::open_in(url, Some(s3))
    }

    fn open_in(url: &str, s3: Option<&S3Options>) -> Result<Target, TargetError> {
        let store_err = |e: object_store::Error| TargetError::Store {
            url: url.to_string(),
            message: e.to_string(),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match parse(url)? {
            Location::Dir(dir) => {
                let dir = if dir.is_empty() { "/".to_string() } else { dir };
                std::fs::create_dir_all(&dir).map_err(|source| TargetError::Dir {
                    path: dir.clone(),
                    source,
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(store_err)?;
                (Arc::new(fs), String::new())
            }
            Location::S3 { bucket, prefix } => {
                use object_store::aws::AmazonS3Builder;
                let (mut b, endpoint) = match s3 {
                    None => (
                        AmazonS3Builder::from_env(),
                        std::env::var("AWS_ENDPOINT_URL")
                            .or_else(|_| std::env::var("AWS_ENDPOINT"))
                            .unwrap_or_default(),
                    ),
                    Some(o) => {
                        let mut b = AmazonS3Builder::new();
                        if let Some(e) = &o.endpoint {
                            b = b.with_endpoint(e);
                        }
                        if let Some(r) = &o.region {
                            b = b.with_region(r);
                        }
                        if let Some(k) = &o.access_key_id {
                            b = b.with_access_key_id(k);
                        }
                        if let Some(k) = &o.secret_access_key {
                            b = b.with_secret_access_key(k);
                        }
                        (b, o.endpoint.clone().unwrap_or_default())
                    }
                };
                b = b
                    .with_http_connector(crate::http::ReqwestTransport::new(
                        std::time::Duration::from_secs(60),
                    ))
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(false);
                if endpoint.starts_with("http://") {
                    b = b.with_allow_http(true);
                }
                (Arc::new(b.build().map_err(store_err)?), prefix)
            }
        };
        Ok(Target {
            url: url.to_string(),
            store,
            prefix,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(name)
        } else {
            Path::from(format!("{}/{name}", self.prefix))
        }
    }

    fn err(&self, e: object_store::Error) -> TargetError {
        TargetError::Store {
            url: self.url.clone(),
            message: e.to_string(),
        }
    }

    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), TargetError> {
        self.store
            .put(&self.path(name), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Deletes every object under this location (a backup's data objects
    /// and manifest); returns how many were deleted.
    pub async fn delete_all(&self) -> Result<u64, TargetError> {
        use futures::TryStreamExt;
        let prefix = (!self.prefix.is_empty()).then(|| Path::from(self.prefix.as_str()));
        let objects: Vec<_> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        let mut n = 0;
        for o in objects {
            match self.store.delete(&o.location).await {
                Ok(()) => n += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(n)
    }

    /// The object's bytes, or `None` when it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, TargetError> {
        match self.store.get(&self.path(name)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.err(e))?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_nonsense_is_refused() {
        assert_eq!(
            parse("file:///var/backups/kv/").unwrap(),
            Location::Dir("/var/backups/kv".into())
        );
        assert_eq!(
            parse("s3://my-bucket/daily/2026-12-03").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "daily/2026-12-03".into()
            }
        );
        assert_eq!(
            parse("s3://b").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: String::new()
            }
        );
        for bad in [
            "/plain/path",
            "file://relative",
            "file:///a/../b",
            "s3://",
            "s3://Upper/x",
            "s3://b/../x",
            "gs://b/x",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[tokio::test]
    async fn a_directory_target_stores_and_reads_back_and_misses_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/nested/backup", dir.path().display());
        let t = Target::open(&url).unwrap();
        assert_eq!(t.get("manifest.json").await.unwrap(), None);
        t.put("data/segment-00.kvb", b"abc".to_vec()).await.unwrap();
        assert_eq!(
            t.get("data/segment-00.kvb").await.unwrap(),
            Some(b"abc".to_vec())
        );
        assert!(
            dir.path()
                .join("nested/backup/data/segment-00.kvb")
                .is_file()
        );
        // a neighbour outside the location is not touched by delete_all
        let other = Target::open(&format!("file://{}/nested/other", dir.path().display())).unwrap();
        other.put("manifest.json", b"{}".to_vec()).await.unwrap();
        t.put("manifest.json", b"{}".to_vec()).await.unwrap();
        assert_eq!(t.delete_all().await.unwrap(), 2);
        assert_eq!(t.get("manifest.json").await.unwrap(), None);
        assert_eq!(t.get("data/segment-00.kvb").await.unwrap(), None);
        assert_eq!(
            other.get("manifest.json").await.unwrap(),
            Some(b"{}".to_vec())
        );
        assert_eq!(t.delete_all().await.unwrap(), 0);
    }
}
