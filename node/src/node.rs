//! One running node: its store, clock, topology, peers and metrics, and the
//! servers and background tasks around them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{Hlc, Topology};
use tokio::sync::{mpsc, watch};

use crate::clock::SkewTracker;
use crate::cluster::{ClusterState, Source};
use crate::config::Config;
use crate::coordinator::CoordError;
use crate::metrics::Metrics;
use crate::peer::{EpochSeen, Peers};
use crate::storage::{CommitObserver, StorageError, Store, StoreOptions};

/// An error answered to a client: status, code and a sentence.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: String) -> ApiError {
        ApiError {
            status,
            code,
            message,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", message.into())
    }

    pub fn storage(e: StorageError) -> ApiError {
        match e {
            StorageError::DiskFull(m) => ApiError::new(
                507,
                "insufficient_storage",
                format!("the node's disk is full: {m}"),
            ),
            other => ApiError::new(500, "internal", other.to_string()),
        }
    }
}

impl From<kv_net::http::BodyError> for ApiError {
    fn from(e: kv_net::http::BodyError) -> ApiError {
        ApiError::new(e.status, e.code, e.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("topology file {path}: {message}")]
    Topology { path: String, message: String },
}

/// One node: the store, the clock that versions its writes, what it believes
/// about the cluster, its client for peers, and its metrics. Every request
/// handler and background task holds an `Arc<Node>`.
pub struct Node {
    pub config: Config,
    pub store: Store,
    pub hlc: Arc<Hlc>,
    pub cluster: ClusterState,
    pub peers: Peers,
    pub metrics: Metrics,
    pub started: Instant,
    /// Offsets of the peers' clocks from ours.
    pub skew: Arc<SkewTracker>,
    /// Create-only writes of a key are serialised on its create leader
    /// through one of these (striped by key hash).
    pub(crate) create_locks: Vec<tokio::sync::Mutex<()>>,
    /// Whether it listens on `kvctl up`'s gateway port ([`crate::gateway_port`]).
    pub gateway_port: crate::gateway_port::PortState,
    /// Notified when the node should stop as if told to by a signal: it
    /// passed on the control call that failed it ([`crate::gateway_port`]).
    pub(crate) exit: tokio::sync::Notify,
}

/// Stripes of [`Node::create_locks`].
const CREATE_LOCK_STRIPES: usize = 1024;

impl Node {
    pub fn me(&self) -> u32 {
        self.cluster.me()
    }

    /// Opens the store and builds the node; `seen` receives higher epochs
    /// that peers report.
    pub fn open(
        config: Config,
    ) -> Result<(Arc<Node>, mpsc::UnboundedReceiver<EpochSeen>), NodeError> {
        let metrics = Metrics::new();
        let (batch, fsync) = (metrics.commit_batch.clone(), metrics.fsync_duration.clone());
        let store = Store::open(
            &config.data_dir,
            StoreOptions {
                observer: Some(CommitObserver(Arc::new(move |n, took| {
                    batch.observe(n as f64);
                    fsync.observe(took.as_secs_f64());
                }))),
                cache_bytes: config.read_cache_bytes,
                checkpoint_frames: config.checkpoint_pages,
                ..StoreOptions::default()
            },
        )?;
        let initial = Topology::single(
            "local",
            config.node_id,
            &config.advertise,
            &config.peer_advertise,
        );
        let cluster = ClusterState::new(config.node_id, initial, &config.data_dir);
        let view = cluster.view();
        if view.topology.epoch > 0 {
            store.claim_identity(&view.topology.cluster_id, config.node_id)?;
        }
        let (seen_tx, seen_rx) = mpsc::unbounded_channel();
        // The clock starts above every version on disk: a write after a
        // restart must beat the writes before it, whatever the wall clock says.
        let hlc = Arc::new(Hlc::with_offset(config.node_id, config.clock_offset_ms));
        hlc.observe(store.max_version_at_open());
        let skew = Arc::new(SkewTracker::new());
        let wall = hlc.clone();
        let peers = Peers::new(
            config.node_id,
            config.cluster_token.clone(),
            config.peer_timeout,
            config.tls.as_ref().map(|t| t.peer_client.clone()),
            seen_tx,
            skew.clone(),
            Arc::new(move || wall.wall_ms()),
        )
        .with_batch_sizes(metrics.peer_batch.clone());
        peers.set_epoch(view.topology.epoch);
        metrics.topology_epoch.set(view.topology.epoch as i64);
        metrics.set_state(view.state_of(config.node_id));
        metrics
            .store_catching_up
            .set(i64::from(store.catching_up()));
        let node = Arc::new(Node {
            hlc,
            config,
            store,
            cluster,
            peers,
            metrics,
            started: Instant::now(),
            skew,
            create_locks: (0..CREATE_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            gateway_port: Default::default(),
            exit: tokio::sync::Notify::new(),
        });
        Ok((node, seen_rx))
    }

    /// Installs a topology from any source, after checking that it belongs
    /// to the cluster this data directory belongs to.
    pub fn install_topology(&self, t: Topology, source: Source) -> Result<bool, String> {
        if t.epoch > 0 {
            self.store
                .claim_identity(&t.cluster_id, self.me())
                .map_err(|e| e.to_string())?;
        }
        let changed = self.cluster.install(t, source).map_err(|e| e.to_string())?;
        if changed {
            let view = self.cluster.view();
            self.peers.set_epoch(view.topology.epoch);
            self.metrics.topology_epoch.set(view.topology.epoch as i64);
            self.metrics.set_state(view.state_of(self.me()));
        }
        Ok(changed)
    }

    /// Reads the topology file once; `Ok(None)` when it does not exist.
    pub fn read_topology_file(&self) -> Result<Option<Topology>, NodeError> {
        let Some(path) = &self.config.topology_file else {
            return Ok(None);
        };
        match std::fs::read(path) {
            Ok(bytes) => Topology::from_json(&bytes)
                .map(Some)
                .map_err(|e| NodeError::Topology {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NodeError::Topology {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Installs the topology file's content if it is valid and newer; a bad
    /// file is logged and the last good topology kept.
    pub fn load_topology_file(&self) {
        match self.read_topology_file() {
            Ok(Some(t)) => {
                let epoch = t.epoch;
                if let Err(e) = self.install_topology(t, Source::File)
                    && epoch > self.cluster.epoch()
                {
                    tracing::error!(error = %e, "topology file rejected; keeping the last good topology");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "topology file rejected; keeping the last good topology")
            }
        }
    }

    /// Watches the topology file (polling: ConfigMap volumes swap symlinks,
    /// which inotify reports unreliably).
    pub async fn watch_topology_file(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.config.topology_file.is_none() {
            return;
        }
        let mut last: Option<Vec<u8>> = None;
        loop {
            let content = self
                .config
                .topology_file
                .as_ref()
                .and_then(|p| std::fs::read(p).ok());
            if content != last {
                self.load_topology_file();
                last = content;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Fetches the topology from peers that report a higher epoch (and, at
    /// start, from every known peer to confirm a saved topology).
    pub async fn follow_epochs(self: Arc<Self>, mut seen: mpsc::UnboundedReceiver<EpochSeen>) {
        while let Some(s) = seen.recv().await {
            let mine = self.cluster.epoch();
            if s.epoch < mine {
                continue;
            }
            if s.epoch == mine {
                self.cluster.confirm();
                continue;
            }
            self.fetch_topology_from(s.ordinal).await;
        }
    }

    pub async fn fetch_topology_from(&self, ordinal: u32) {
        let view = self.cluster.view();
        let Some(peer) = view.topology.node(ordinal) else {
            return;
        };
        match self.peers.topology(ordinal, &peer.peer_address).await {
            Ok(t) if t.epoch > view.topology.epoch => {
                if let Err(e) = self.install_topology(t, Source::Peer) {
                    tracing::warn!(from = ordinal, error = %e, "topology from peer rejected");
                }
            }
            Ok(t) if t.epoch == view.topology.epoch => self.cluster.confirm(),
            Ok(_) => {}
            Err(e) => tracing::debug!(from = ordinal, error = %e, "cannot fetch topology"),
        }
    }

    /// Asks every known peer for its topology: how a restarted node learns
    /// whether what it saved is still current.
    pub async fn confirm_with_peers(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        while !self.cluster.confirmed() {
            let view = self.cluster.view();
            for n in &view.topology.nodes {
                if n.ordinal != self.me() {
                    self.fetch_topology_from(n.ordinal).await;
                }
            }
            if view.topology.nodes.len() == 1 && view.topology.node(self.me()).is_some() {
                // A one-node cluster has nobody to ask.
                self.cluster.confirm();
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Refuses to coordinate a write while this node's clock is further from
    /// the cluster's than `max_clock_skew`: its versions would be off by that
    /// much, and a version too far ahead outranks writes acknowledged later.
    pub fn check_clock(&self) -> Result<(), CoordError> {
        let skew = self.skew.skew_ms();
        if skew.unsigned_abs() > self.config.max_clock_skew.as_millis() as u64 {
            return Err(CoordError::ClockSkew(format!(
                "node {}'s clock is {skew} ms off the cluster's (limit {} ms); it coordinates no writes until the clock is fixed; try another node",
                self.me(),
                self.config.max_clock_skew.as_millis()
            )));
        }
        Ok(())
    }

    /// Measures the clock offset to every peer, updates the skew gauge and
    /// logs when the skew crosses half the limit (and when it comes back).
    pub async fn probe_clocks(&self, warned: &mut bool) {
        let view = self.cluster.view();
        let peers: Vec<(u32, String)> = view
            .topology
            .nodes
            .iter()
            .filter(|n| n.ordinal != self.me())
            .map(|n| (n.ordinal, n.peer_address.clone()))
            .collect();
        self.skew
            .retain(|o| view.topology.node(o).is_some() && o != self.me());
        let pings = peers.iter().map(|(o, a)| self.peers.ping(*o, a));
        futures::future::join_all(pings).await;
        let skew = self.skew.skew_ms();
        self.metrics.clock_skew.set(skew as f64 / 1000.0);
        let warn_at = self.config.max_clock_skew.as_millis() as u64 / 2;
        if skew.unsigned_abs() > warn_at && !*warned {
            *warned = true;
            tracing::warn!(
                skew_ms = skew,
                limit_ms = self.config.max_clock_skew.as_millis() as u64,
                "this node's clock is off the median of the cluster's clocks; past the limit it refuses to coordinate writes"
            );
        } else if skew.unsigned_abs() <= warn_at && *warned {
            *warned = false;
            tracing::info!(skew_ms = skew, "clock skew back within bounds");
        }
    }

    /// A store that was out of touch with its cluster for longer than the
    /// tombstone grace period may hold keys deleted since (their tombstones
    /// purged): it is emptied and rebuilt from its co-owners (SPEC §3).
    pub async fn check_store_age(&self) -> Result<(), StorageError> {
        if self.store.catching_up() || self.cluster.epoch() == 0 {
            return Ok(());
        }
        let Some(alive_at) = self.store.alive_at()? else {
            return Ok(());
        };
        let now = self.hlc.wall_ms();
        let grace = self.config.tombstone_grace.as_millis() as u64;
        if now.saturating_sub(alive_at) > grace {
            tracing::warn!(
                out_of_touch_s = now.saturating_sub(alive_at) / 1000,
                grace_s = grace / 1000,
                "the store was out of touch with its cluster for longer than the tombstone grace period; rebuilding it from its co-owners"
            );
            let n = self.store.rebuild().await?;
            self.metrics.store_catching_up.set(1);
            tracing::info!(records = n, "store emptied; catching up");
        }
        Ok(())
    }

    /// Refreshes the storage gauges: pending hints every 2 s, the key and
    /// tombstone counts (a scan of the records) every 15 s; measures clock
    /// skew every 10 s and records that the store is in touch with its
    /// cluster every minute.
    pub async fn refresh_gauges(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut round = 0u64;
        let mut warned = false;
        loop {
            if round.is_multiple_of(5) {
                self.probe_clocks(&mut warned).await;
            }
            if round.is_multiple_of(30) && self.cluster.serving() && !self.store.catching_up() {
                let store = self.store.clone();
                let now = self.hlc.wall_ms();
                let _ = tokio::task::spawn_blocking(move || store.touch_alive(now)).await;
            }
            if round.is_multiple_of(8) {
                let store = self.store.clone();
                if let Ok(Ok(s)) = tokio::task::spawn_blocking(move || store.stats()).await {
                    self.metrics.set_store_stats(&s);
                }
                // For the volume-usage alert: what the filesystem has left
                // for an unprivileged writer (f_bavail), as `df` shows it.
                if let Ok(v) = rustix::fs::statvfs(&self.config.data_dir) {
                    let bytes = |blocks: u64| {
                        i64::try_from(blocks.saturating_mul(v.f_frsize)).unwrap_or(i64::MAX)
                    };
                    self.metrics.volume_size_bytes.set(bytes(v.f_blocks));
                    self.metrics.volume_free_bytes.set(bytes(v.f_bavail));
                }
            }
            round += 1;
            let store = self.store.clone();
            if let Ok(Ok(h)) = tokio::task::spawn_blocking(move || store.pending_hints()).await {
                self.metrics
                    .hints_pending
                    .set(h.values().sum::<u64>() as i64);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
