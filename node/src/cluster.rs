//! What this node believes about the cluster: the topology it holds, where it
//! came from, and how far its catch-up has got.
//!
//! The control plane is the only writer of the topology (SPEC §3). A node
//! takes one from the watched file, from a push on the peer port, or from a
//! peer that carries a higher epoch, and only when it is valid and newer than
//! what it holds (a node that has been told nothing accepts any valid
//! topology of the cluster its data directory belongs to). The last good
//! topology is saved in the data directory, so a restarted node knows its
//! cluster before anyone tells it again; until it has heard the topology from
//! the control plane or a peer since it started it is *unconfirmed* and serves
//! no clients: a node that was held down while it was away must not act on
//! the stale belief that it is Up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kv_core::{Layout, NodeState, Topology, TopologyError};
use tokio::sync::watch;

/// File in the data directory holding the last accepted topology.
pub const SAVED_TOPOLOGY: &str = "topology.json";

/// A topology and the placement computed from it.
pub struct View {
    pub topology: Topology,
    pub layout: Layout,
}

impl View {
    pub fn new(topology: Topology) -> View {
        let layout = Layout::of(&topology);
        View { topology, layout }
    }

    pub fn state_of(&self, ordinal: u32) -> Option<NodeState> {
        self.topology.state_of(ordinal)
    }
}

/// Where an accepted topology came from (for logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    File,
    Push,
    Peer,
    Saved,
}

pub use kv_core::report::Resync;

pub struct ClusterState {
    me: u32,
    view: RwLock<Arc<View>>,
    confirmed: AtomicBool,
    synced_epoch: AtomicU64,
    resync: Mutex<Resync>,
    changed: watch::Sender<u64>,
    save_dir: PathBuf,
}

impl ClusterState {
    /// Starts from the saved topology if there is one (unconfirmed until a
    /// peer or the control plane agrees), else from `initial`, a one-node
    /// topology at epoch 0 that needs no confirmation.
    pub fn new(me: u32, initial: Topology, save_dir: &Path) -> ClusterState {
        let saved = std::fs::read(save_dir.join(SAVED_TOPOLOGY))
            .ok()
            .and_then(|b| match Topology::from_json(&b) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "saved topology is invalid; ignoring it");
                    None
                }
            });
        let confirmed = saved.is_none();
        let start = saved.unwrap_or(initial);
        let (changed, _) = watch::channel(start.epoch);
        ClusterState {
            me,
            view: RwLock::new(Arc::new(View::new(start))),
            confirmed: AtomicBool::new(confirmed),
            synced_epoch: AtomicU64::new(0),
            resync: Mutex::new(Resync::default()),
            changed,
            save_dir: save_dir.to_path_buf(),
        }
    }

    pub fn me(&self) -> u32 {
        self.me
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn epoch(&self) -> u64 {
        self.view().topology.epoch
    }

    pub fn my_state(&self) -> Option<NodeState> {
        self.view().state_of(self.me)
    }

    pub fn confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Acquire)
    }

    /// A peer or the control plane agrees on (or is behind) our epoch.
    pub fn confirm(&self) {
        if !self.confirmed.swap(true, Ordering::AcqRel) {
            tracing::info!(epoch = self.epoch(), "topology confirmed");
        }
    }

    /// Serves client requests: holds a confirmed topology in which it is Up or Leaving.
    pub fn serving(&self) -> bool {
        self.confirmed() && self.my_state().is_some_and(NodeState::serves_client_reads)
    }

    /// Notified with the epoch whenever a new topology is installed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Installs `next` if it is a valid successor of what we hold.
    /// Returns `Ok(false)` when it is the very topology we hold (same epoch,
    /// same content), which confirms it without changing anything.
    pub fn install(&self, next: Topology, source: Source) -> Result<bool, TopologyError> {
        let mut guard = self.view.write().unwrap_or_else(|p| p.into_inner());
        let current = &guard.topology;
        if next.epoch == current.epoch && next == *current {
            drop(guard);
            if source != Source::Saved {
                self.confirm();
            }
            return Ok(false);
        }
        if current.epoch == 0 {
            // Told nothing yet: any valid topology will do.
            next.validate()?;
            if next.epoch == 0 {
                return Err(TopologyError::StaleEpoch {
                    current: 0,
                    incoming: 0,
                });
            }
        } else {
            current.check_successor(&next)?;
        }
        if let Err(e) = self.save(&next) {
            tracing::error!(error = %e, "cannot save the topology in the data directory");
        }
        let epoch = next.epoch;
        let my_state = next.state_of(self.me);
        *guard = Arc::new(View::new(next));
        drop(guard);
        self.confirmed.store(true, Ordering::Release);
        tracing::info!(epoch, ?source, state = ?my_state, "installed topology");
        self.changed.send_replace(epoch);
        Ok(true)
    }

    fn save(&self, t: &Topology) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(t).map_err(std::io::Error::other)?;
        let tmp = self.save_dir.join(format!("{SAVED_TOPOLOGY}.tmp"));
        std::fs::write(&tmp, json)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.save_dir.join(SAVED_TOPOLOGY))
    }

    pub fn synced_epoch(&self) -> u64 {
        self.synced_epoch.load(Ordering::Acquire)
    }

    pub fn set_synced(&self, epoch: u64) {
        self.synced_epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    pub fn resync(&self) -> Resync {
        *self.resync.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn update_resync(&self, f: impl FnOnce(&mut Resync)) {
        f(&mut self.resync.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::{Consistency, NodeInfo, PlacementSpec, Strategy};

    fn topo(epoch: u64, cluster: &str) -> Topology {
        Topology {
            cluster_id: cluster.into(),
            epoch,
            read_consistency: Consistency::Quorum,
            write_consistency: Consistency::Quorum,
            placement: PlacementSpec {
                strategy: Strategy::Full,
                factor: 2,
                members: vec![0, 1],
            },
            pending: None,
            nodes: (0..2)
                .map(|i| NodeInfo {
                    ordinal: i,
                    address: format!("127.0.0.1:{}", 7000 + i),
                    peer_address: format!("127.0.0.1:{}", 7100 + i),
                    state: NodeState::Up,
                })
                .collect(),
        }
    }

    #[test]
    fn only_newer_valid_topologies_of_the_same_cluster_are_installed_and_saved() {
        let dir = tempfile::tempdir().unwrap();
        let single = Topology::single("local", 0, "127.0.0.1:1", "127.0.0.1:2");
        let c = ClusterState::new(0, single, dir.path());
        assert!(
            c.confirmed(),
            "nothing saved: the one-node default is confirmed"
        );
        assert!(c.install(topo(3, "demo"), Source::Push).unwrap());
        assert_eq!(c.epoch(), 3);
        assert!(c.install(topo(2, "demo"), Source::Push).is_err());
        assert!(c.install(topo(4, "other"), Source::Push).is_err());
        let mut bad = topo(5, "demo");
        bad.placement.members = vec![0, 9];
        assert!(c.install(bad, Source::Push).is_err());
        assert_eq!(c.epoch(), 3);
        assert!(!c.install(topo(3, "demo"), Source::File).unwrap());

        // A restart starts from the saved topology, unconfirmed.
        let again = ClusterState::new(
            0,
            Topology::single("local", 0, "127.0.0.1:1", "127.0.0.1:2"),
            dir.path(),
        );
        assert_eq!(again.epoch(), 3);
        assert!(!again.confirmed() && !again.serving());
        again.confirm();
        assert!(again.serving());
    }
}
