//! The three node-to-node routes a backup and a restore need, called with
//! the cluster token: `GET /internal/v1/digests` (a node's per-bucket
//! digests), `POST /internal/v1/buckets` (every record of some buckets,
//! tombstones and versions included) and `POST /internal/v1/apply` (store
//! records with their own versions, last-writer-wins; idempotent).
//!
//! kvctl sends no `X-Kv-Node` header: it is not a node, so a node never
//! mistakes it for a peer with a topology to fetch. Every answer carries the
//! node's topology epoch, which the backup checks against the one it planned
//! with.

use std::time::Duration;

use kv_core::wire::{self, ApplyAnswer};
use kv_core::{Digest, Record};

/// The epoch header of every peer answer.
const EPOCH_HEADER: &str = "x-kv-epoch";

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {node} ({address}) is unreachable: {detail}")]
    Unreachable {
        node: u32,
        address: String,
        detail: String,
    },
    #[error("node {node} answered HTTP {status} to {route}: {body}")]
    Status {
        node: u32,
        route: &'static str,
        status: u16,
        body: String,
    },
    #[error("node {node} sent a bad answer to {route}: {detail}")]
    Decode {
        node: u32,
        route: &'static str,
        detail: String,
    },
}

/// A node's peer port.
#[derive(Clone, Debug)]
pub struct PeerNode {
    pub ordinal: u32,
    pub address: String,
}

/// An answer and the epoch the node answered with (0 when it gave none).
pub struct Answer<T> {
    pub value: T,
    pub epoch: u64,
}

fn setup(detail: String) -> PeerError {
    PeerError::Unreachable {
        node: u32::MAX,
        address: String::new(),
        detail,
    }
}

/// Calls the peer routes with the cluster token.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    token: String,
    scheme: &'static str,
}

/// How to reach peer ports that serve mutual TLS: the cluster CA and a
/// certificate it issued (`kvctl up --tls` keeps both in `<data-dir>/tls/`).
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl PeerTls {
    /// The files of a `kvctl up --tls` data directory, when it has them.
    pub fn of_data_dir(dir: &std::path::Path) -> Option<PeerTls> {
        let tls = dir.join("tls");
        let t = PeerTls {
            ca: tls.join("ca.crt"),
            cert: tls.join("platform.crt"),
            key: tls.join("platform.key"),
        };
        [&t.ca, &t.cert, &t.key]
            .iter()
            .all(|p| p.is_file())
            .then_some(t)
    }
}

impl PeerClient {
    pub fn new(
        token: String,
        timeout: Duration,
        tls: Option<&PeerTls>,
    ) -> Result<PeerClient, PeerError> {
        let config = match tls {
            None => None,
            Some(t) => {
                let id = kv_net::tls::Identity::load(&t.cert, &t.key)
                    .map_err(|e| setup(format!("cannot load {}: {e}", t.cert.display())))?;
                let config = kv_net::tls::client_config(&t.ca, Some(id))
                    .map_err(|e| setup(format!("cannot use {}: {e}", t.ca.display())))?;
                Some(config)
            }
        };
        Self::with_config(token, timeout, config)
    }

    /// A client with its TLS setup made elsewhere (the operator builds one
    /// from a cluster's Secrets); `None` for plaintext peer ports.
    pub fn with_config(
        token: String,
        timeout: Duration,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<PeerClient, PeerError> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut builder = reqwest::Client::builder();
        if let Some(config) = tls {
            builder = builder.tls_backend_preconfigured(config);
        }
        let http = builder
            .timeout(timeout)
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| setup(format!("cannot build an HTTP client: {e}")))?;
        Ok(PeerClient {
            http,
            token,
            scheme,
        })
    }

    async fn call(
        &self,
        node: &PeerNode,
        route: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer<bytes::Bytes>, PeerError> {
        let url = format!("{}://{}/internal/v1/{route}", self.scheme, node.address);
        let req = match body {
            Some(b) => self.http.post(&url).body(b),
            None => self.http.get(&url),
        };
        let resp =
            req.bearer_auth(&self.token)
                .send()
                .await
                .map_err(|e| PeerError::Unreachable {
                    node: node.ordinal,
                    address: node.address.clone(),
                    detail: kv_net::error_chain(&e),
                })?;
        let status = resp.status();
        let epoch = resp
            .headers()
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bytes = resp.bytes().await.map_err(|e| PeerError::Unreachable {
            node: node.ordinal,
            address: node.address.clone(),
            detail: kv_net::error_chain(&e),
        })?;
        if !status.is_success() {
            return Err(PeerError::Status {
                node: node.ordinal,
                route,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
            });
        }
        Ok(Answer {
            value: bytes,
            epoch,
        })
    }

    /// A node's digest table (`BUCKETS` long; absent buckets empty).
    pub async fn digests(&self, node: &PeerNode) -> Result<Answer<Vec<Digest>>, PeerError> {
        let a = self.call(node, "digests", None).await?;
        let value = wire::decode_digests(&a.value).map_err(|e| PeerError::Decode {
            node: node.ordinal,
            route: "digests",
            detail: e.to_string(),
        })?;
        Ok(Answer {
            value,
            epoch: a.epoch,
        })
    }

    /// Every record a node holds in `buckets` (at most 256 per call).
    pub async fn buckets(
        &self,
        node: &PeerNode,
        buckets: &[u32],
    ) -> Result<Answer<Vec<Record>>, PeerError> {
        let a = self
            .call(node, "buckets", Some(wire::encode_buckets(buckets)))
            .await?;
        let value = wire::decode_records(&a.value).map_err(|e| PeerError::Decode {
            node: node.ordinal,
            route: "buckets",
            detail: e.to_string(),
        })?;
        Ok(Answer {
            value,
            epoch: a.epoch,
        })
    }

    /// Stores `records` on a node with their versions.
    pub async fn apply(
        &self,
        node: &PeerNode,
        records: &[Record],
    ) -> Result<ApplyAnswer, PeerError> {
        let a = self
            .call(node, "apply", Some(wire::encode_records(records)))
            .await?;
        let answer = wire::decode_apply_answer(&a.value).map_err(|e| PeerError::Decode {
            node: node.ordinal,
            route: "apply",
            detail: e.to_string(),
        })?;
        if answer.outcomes.len() != records.len() {
            return Err(PeerError::Decode {
                node: node.ordinal,
                route: "apply",
                detail: format!(
                    "{} outcomes for {} records",
                    answer.outcomes.len(),
                    records.len()
                ),
            });
        }
        Ok(answer)
    }
}
