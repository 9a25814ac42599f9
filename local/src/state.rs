//! The platform's state files: `cluster.json` (the desired cluster, ports,
//! epoch floor; the tokens are in their own files, [`crate::tokens`]),
//! written atomically, and changes to the desired
//! cluster, accepted only when the planner would carry them out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use kv_core::{Consistency, Strategy, Topology};
use serde::{Deserialize, Serialize};

use crate::process::new_ports;
use crate::{Inner, LocalError, Platform, UpOptions};
use kv_control::planner::Desired;

/// `cluster.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    pub cluster_id: String,
    /// The tokens of a `cluster.json` written before they had files of
    /// their own: read once to write those files, never written again.
    #[serde(rename = "token", default, skip_serializing)]
    pub legacy_token: Option<String>,
    #[serde(rename = "clusterToken", default, skip_serializing)]
    pub legacy_cluster_token: Option<String>,
    pub replicas: u32,
    pub strategy: Strategy,
    pub factor: u32,
    pub read_consistency: Consistency,
    pub write_consistency: Consistency,
    pub failed_nodes: BTreeSet<u32>,
    /// The last change was forced (a hold-down that leaves keys short of
    /// write owners); kept until the next change so the planner carries it out.
    #[serde(default)]
    pub force: bool,
    pub epoch_floor: u64,
    /// Client and peer port of each ordinal, fixed at its first start.
    pub ports: BTreeMap<u32, (u16, u16)>,
}

impl SavedState {
    pub fn desired(&self) -> Desired {
        Desired {
            replicas: self.replicas,
            strategy: self.strategy,
            factor: self.factor,
            read_consistency: self.read_consistency,
            write_consistency: self.write_consistency,
            failed_nodes: self.failed_nodes.clone(),
            force: self.force,
            hibernate: false,
        }
    }

    pub(super) fn set_desired(&mut self, d: &Desired) {
        self.replicas = d.replicas;
        self.strategy = d.strategy;
        self.factor = d.factor;
        self.read_consistency = d.read_consistency;
        self.write_consistency = d.write_consistency;
        self.failed_nodes = d.failed_nodes.clone();
        self.force = d.force;
    }

    /// Reads `cluster.json` from the data directory (or starts a new
    /// cluster), applies what `kvctl up` was asked for, gives every ordinal
    /// its ports and raises the epoch floor to the topology file's epoch.
    pub(super) fn load(opts: &UpOptions) -> Result<(SavedState, Option<Topology>), LocalError> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|source| LocalError::DataDir {
            path: opts.data_dir.clone(),
            source,
        })?;
        let state_path = opts.data_dir.join("cluster.json");
        let mut saved = match std::fs::read(&state_path) {
            Ok(bytes) => {
                serde_json::from_slice::<SavedState>(&bytes).map_err(|e| LocalError::BadState {
                    path: state_path.clone(),
                    message: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SavedState {
                cluster_id: format!("local-{}", &random_token()[..12]),
                legacy_token: None,
                legacy_cluster_token: None,
                replicas: 3,
                strategy: Strategy::Full,
                factor: 3,
                read_consistency: Consistency::Quorum,
                write_consistency: Consistency::Quorum,
                failed_nodes: BTreeSet::new(),
                force: false,
                epoch_floor: 0,
                ports: BTreeMap::new(),
            },
            Err(source) => {
                return Err(LocalError::DataDir {
                    path: state_path,
                    source,
                });
            }
        };
        let mut d = saved.desired();
        if let Some(r) = opts.replicas {
            d.replicas = r;
        }
        if let Some(s) = opts.strategy {
            d.strategy = s;
        }
        match (opts.factor, opts.strategy) {
            (Some(f), _) => d.factor = f,
            // Full's factor is its member count.
            (None, Some(Strategy::Full)) => d.factor = d.replicas,
            _ => {}
        }
        if let Some(c) = opts.read_consistency {
            d.read_consistency = c;
        }
        if let Some(c) = opts.write_consistency {
            d.write_consistency = c;
        }
        if let Some(f) = &opts.failed_nodes {
            d.failed_nodes = f.clone();
        }
        saved.set_desired(&d);
        // Ports saved by an earlier run: their blocks held again, so that no
        // other process started meanwhile hands them out (see free_port).
        for (o, (client, peer)) in &saved.ports {
            for port in [client, peer] {
                if !kv_net::port::hold_block_of(*port) {
                    tracing::warn!(
                        node = o,
                        port,
                        "another process holds this port's block: it may take the port"
                    );
                }
            }
        }
        for o in 0..saved.replicas {
            if let std::collections::btree_map::Entry::Vacant(e) = saved.ports.entry(o) {
                e.insert(new_ports()?);
            }
        }
        let topology = std::fs::read(opts.data_dir.join("topology.json"))
            .ok()
            .and_then(|b| Topology::from_json(&b).ok());
        if let Some(t) = &topology {
            saved.epoch_floor = saved.epoch_floor.max(t.epoch);
        }
        Ok((saved, topology))
    }
}

pub fn random_token() -> String {
    kv_control::token::random_token()
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `path` whole or not at all (a temporary file renamed over it),
/// readable by its owner only.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    let io = |source| LocalError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    // Owner-only: the token files. The mode is set on the file
    // itself too, as a leftover .tmp from an older kvctl keeps its own mode.
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Platform {
    pub(super) fn save(&self, inner: &Inner) -> Result<(), LocalError> {
        let json = serde_json::to_vec_pretty(&inner.saved).unwrap_or_default();
        write_atomic(&self.opts.data_dir.join("cluster.json"), &json)
    }

    /// Changes the desired cluster if the planner accepts it; saved at once.
    pub fn change(&self, f: impl FnOnce(&mut Desired)) -> Result<Desired, String> {
        let mut inner = self.lock();
        let mut d = inner.saved.desired();
        d.force = false;
        f(&mut d);
        for o in 0..d.replicas {
            if let std::collections::btree_map::Entry::Vacant(e) = inner.saved.ports.entry(o) {
                e.insert(new_ports().map_err(|e| e.to_string())?);
            }
        }
        *self.ports.lock().unwrap_or_else(|p| p.into_inner()) = inner.saved.ports.clone();
        self.check_desired(&inner, &d)?;
        inner.saved.set_desired(&d);
        *self.ports.lock().unwrap_or_else(|p| p.into_inner()) = inner.saved.ports.clone();
        self.save(&inner).map_err(|e| e.to_string())?;
        Ok(d)
    }
}
