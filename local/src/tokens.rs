//! The local cluster's tokens: `<data-dir>/token` (clients) and
//! `<data-dir>/cluster-token` (node to node), owner-only files in
//! [`kv_net::token`]'s format that every node, the gateway and the
//! supervisor read again every second, and their rotation
//! ([`Platform::rotate_token`]): three writes of the file, each awaited
//! until every running node reports it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kv_net::token::{Tokens, fingerprint, fingerprints, format};

use crate::state::write_atomic;
use crate::{LocalError, Platform};

/// The client token file in a data directory.
pub fn client_file(data_dir: &Path) -> PathBuf {
    data_dir.join("token")
}

/// The cluster token file in a data directory.
pub fn cluster_file(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster-token")
}

/// Which of the two tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Client,
    Cluster,
}

impl TokenKind {
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Client => "client token",
            TokenKind::Cluster => "cluster token",
        }
    }

    pub fn file(self, data_dir: &Path) -> PathBuf {
        match self {
            TokenKind::Client => client_file(data_dir),
            TokenKind::Cluster => cluster_file(data_dir),
        }
    }
}

/// Both token sets, each watching its file.
#[derive(Clone, Debug)]
pub struct LocalTokens {
    pub client: Tokens,
    pub cluster: Tokens,
}

impl LocalTokens {
    pub fn of(&self, kind: TokenKind) -> &Tokens {
        match kind {
            TokenKind::Client => &self.client,
            TokenKind::Cluster => &self.cluster,
        }
    }

    /// Opens the token files of `data_dir`, writing those that are missing:
    /// the client token from `client` (`kvctl up --token`), else from an
    /// older `cluster.json` (`legacy`), else a random one. `client` given
    /// and different from the file's token replaces the file.
    pub(super) fn prepare(
        data_dir: &Path,
        client: Option<&str>,
        legacy: (Option<String>, Option<String>),
    ) -> Result<LocalTokens, LocalError> {
        let open = |kind: TokenKind, wanted: Option<&str>, legacy: Option<String>| {
            let path = kind.file(data_dir);
            let on_disk = kv_net::token::read_file(kind.name(), &path).ok();
            let write = match (&on_disk, wanted) {
                (Some(t), Some(w)) if t.len() == 1 && t[0] == w => None,
                (_, Some(w)) => Some(w.to_string()),
                (Some(_), None) => None,
                (None, None) => Some(legacy.unwrap_or_else(crate::random_token)),
            };
            if let Some(t) = write {
                write_atomic(&path, format(&[&t]).as_bytes())?;
            }
            Tokens::watch(kind.name(), &path).map_err(|e| LocalError::Token(e.to_string()))
        };
        Ok(LocalTokens {
            client: open(TokenKind::Client, client, legacy.0)?,
            cluster: open(TokenKind::Cluster, None, legacy.1)?,
        })
    }
}

/// A finished rotation.
#[derive(Debug)]
pub struct Rotated {
    pub kind: TokenKind,
    /// The new token (the caller holds the client token already; the
    /// gateway never answers the cluster token).
    pub token: String,
    /// The nodes that reported each step.
    pub nodes: Vec<u32>,
}

/// Why a rotation stopped; the file keeps the step it reached, whose tokens
/// are all accepted, so nothing is locked out.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("a rotation of the {0} is already running")]
    Busy(&'static str),
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error(
        "{kind}: after {secs} s node(s) {nodes:?} did not report step {step} of 3 (tokens {expected:?}); the file keeps that step, both tokens are accepted, run the rotation again once the nodes answer"
    )]
    Timeout {
        kind: &'static str,
        step: usize,
        secs: u64,
        nodes: Vec<u32>,
        expected: Vec<String>,
    },
}

impl Platform {
    /// Rotates a token: writes `old\nnew` (every node accepts the new one,
    /// still sends the old), then `new\nold` (every node sends the new one),
    /// then `new` (the old one is refused), waiting after each write until
    /// every running node reports that file's fingerprints, at most
    /// `step_limit` per step. Nodes that are not running read the file when
    /// they start.
    pub async fn rotate_token(
        &self,
        kind: TokenKind,
        step_limit: Duration,
    ) -> Result<Rotated, RotateError> {
        let _one = self
            .rotating
            .try_lock()
            .map_err(|_| RotateError::Busy(kind.name()))?;
        let tokens = self.tokens.of(kind).clone();
        let path = kind.file(&self.opts.data_dir);
        let old = tokens.current();
        let new = crate::random_token();
        let mut nodes = Vec::new();
        for (i, step) in [[&old, &new].as_slice(), &[&new, &old], &[&new]]
            .into_iter()
            .enumerate()
        {
            let step: Vec<&str> = step.iter().map(|s| s.as_str()).collect();
            write_atomic(&path, format(&step).as_bytes()).map_err(|e| RotateError::Write {
                path: path.clone(),
                message: e.to_string(),
            })?;
            // Our own copy at once: the supervisor and the gateway call the
            // nodes with it, and every node accepts it at this step.
            tokens.reload();
            self.say(format!("{}: step {} of 3 written", kind.name(), i + 1));
            let expected = fingerprints(&step);
            nodes = self
                .await_tokens(kind, &expected, step_limit, i + 1)
                .await?;
        }
        self.say(format!(
            "{} rotated (fingerprint {}); the old one is refused",
            kind.name(),
            fingerprint(&new)
        ));
        Ok(Rotated {
            kind,
            token: new,
            nodes,
        })
    }

    /// Waits until every running node reports `expected` for `kind`.
    async fn await_tokens(
        &self,
        kind: TokenKind,
        expected: &[String],
        limit: Duration,
        step: usize,
    ) -> Result<Vec<u32>, RotateError> {
        let started = Instant::now();
        loop {
            let targets = self.running_ports();
            let token = self.tokens.client.current();
            let mut behind = Vec::new();
            for (o, c, _) in &targets {
                let url = format!("{}://127.0.0.1:{c}/v1/cluster", self.scheme());
                let report = match self.http.get(url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => r.json::<kv_core::NodeReport>().await.ok(),
                    _ => None,
                };
                let shown = report.map(|r| match kind {
                    TokenKind::Client => r.tokens.client,
                    TokenKind::Cluster => r.tokens.cluster,
                });
                if shown.as_deref() != Some(expected) {
                    behind.push(*o);
                }
            }
            if behind.is_empty() {
                return Ok(targets.iter().map(|(o, _, _)| *o).collect());
            }
            if started.elapsed() >= limit {
                return Err(RotateError::Timeout {
                    kind: kind.name(),
                    step,
                    secs: limit.as_secs(),
                    nodes: behind,
                    expected: expected.to_vec(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
