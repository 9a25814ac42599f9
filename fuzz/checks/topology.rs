//! Fuzz check for the topology parser and the node's install path: the bytes
//! are a topology file or the body of `PUT /internal/v1/topology` (both go
//! through `Topology::from_json`), then `ClusterState::install` as the node
//! runs it. Shared by the cargo-fuzz target `topology` and the stable replay
//! in node/tests/fuzz_corpus.rs.
//!
//! Invariants: nothing panics; an accepted topology is valid, survives a JSON
//! round trip, places every bucket on distinct members of its placement; the
//! node installs it exactly when its epoch is above 0 (a node told nothing
//! takes any valid topology), saves it so that a restart reads back the same
//! topology (unconfirmed), and then refuses a replay of an older epoch.

use std::path::PathBuf;

use kv_core::{BUCKETS, Layout, Placement, PlacementSpec, Strategy, Topology, TopologyError};
use kv_node::cluster::{ClusterState, Source};

/// A scratch directory in memory when the machine has one (installs fsync).
fn scratch() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("kv-fuzz-topology")
        .tempdir_in(base)
        .expect("a scratch directory for the node's saved topology")
}

fn check_placement(p: &Placement, spec: &PlacementSpec) {
    let want = spec.effective_factor();
    for b in 0..BUCKETS {
        let owners = p.owners(b);
        assert_eq!(
            owners.len(),
            want,
            "bucket {b}: {} owners, the spec gives {want}",
            owners.len()
        );
        for (i, o) in owners.iter().enumerate() {
            assert!(
                spec.members.contains(o),
                "bucket {b}: owner {o} is not a member"
            );
            assert!(
                !owners[..i].contains(o),
                "bucket {b}: owner {o} listed twice"
            );
        }
        if spec.strategy == Strategy::Full {
            assert_eq!(
                owners,
                spec.members.as_slice(),
                "Full: every member owns bucket {b}"
            );
        }
    }
}

pub fn check(data: &[u8]) {
    let Ok(t) = Topology::from_json(data) else {
        return;
    };
    assert_eq!(
        t.validate(),
        Ok(()),
        "from_json accepted an invalid topology"
    );
    for json in [
        serde_json::to_vec(&t).expect("a topology serializes"),
        serde_json::to_vec_pretty(&t).expect("a topology serializes"),
    ] {
        assert_eq!(
            Topology::from_json(&json).as_ref(),
            Ok(&t),
            "accepted topology does not survive a JSON round trip: {}",
            String::from_utf8_lossy(&json)
        );
    }
    let layout = Layout::of(&t);
    check_placement(&layout.current, &t.placement);
    if let (Some(p), Some(spec)) = (&layout.pending, &t.pending) {
        check_placement(p, spec);
    }

    // The node's install path, from a node that has been told nothing.
    let me = t.nodes[0].ordinal;
    let initial = Topology::single("local", me, "127.0.0.1:7400", "127.0.0.1:7401");
    let dir = scratch();
    let state = ClusterState::new(me, initial.clone(), dir.path());
    let verdict = state.install(t.clone(), Source::Push);
    if t.epoch == 0 {
        if t == initial {
            assert_eq!(
                verdict,
                Ok(false),
                "the topology the node holds is not a change"
            );
        } else {
            assert_eq!(
                verdict,
                Err(TopologyError::StaleEpoch {
                    current: 0,
                    incoming: 0
                }),
                "a topology at epoch 0 must not replace the node's own"
            );
        }
        return;
    }
    assert_eq!(
        verdict,
        Ok(true),
        "a valid topology above epoch 0 is installed"
    );
    assert_eq!(
        state.view().topology,
        t,
        "installed topology differs from the pushed one"
    );
    assert!(state.confirmed(), "an installed topology is confirmed");

    let restarted = ClusterState::new(me, initial, dir.path());
    assert_eq!(
        restarted.view().topology,
        t,
        "the saved topology does not read back after a restart"
    );
    assert!(
        !restarted.confirmed(),
        "a saved topology starts unconfirmed"
    );
    assert_eq!(
        restarted.install(t.clone(), Source::Push),
        Ok(false),
        "the same topology again is not a change"
    );
    assert!(
        restarted.confirmed(),
        "hearing the same topology confirms it"
    );
    if t.epoch > 1 {
        let mut older = t.clone();
        older.epoch -= 1;
        assert_eq!(
            restarted.install(older, Source::Push),
            Err(TopologyError::StaleEpoch {
                current: t.epoch,
                incoming: t.epoch - 1
            }),
            "an older epoch must be refused"
        );
    }
    if let Some(next_epoch) = t.epoch.checked_add(1) {
        let mut next = t.clone();
        next.epoch = next_epoch;
        assert_eq!(
            restarted.install(next, Source::Peer),
            Ok(true),
            "a newer epoch is taken"
        );
    }
    assert_eq!(restarted.view().topology.cluster_id, t.cluster_id);
}
