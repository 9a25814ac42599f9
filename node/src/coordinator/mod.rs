//! The coordinator: any node takes a client request and runs it on the key's
//! owners (docs/design.md, "Quorum rules").
//!
//! A write gets a new version from this node's clock and goes to every write
//! owner in parallel (the local store directly, peers through their batchers).
//! It is acknowledged once `W` owners of the committed placement that count in
//! quorum have it on stable storage — and, while a placement is pending, `W`
//! owners of the new one too. Owners that are Failed, or that do not answer,
//! get a durable hint on this node. When too few owners are live the write is
//! refused before anything is written.
//!
//! A read asks the owners that serve reads, waits for `R` answers, returns the
//! newest version and repairs stale owners in the background.
//!
//! One file per job: [`read`], [`write`], [`create`] (create-only writes on
//! the key's create leader), [`list`]; [`plan`] holds the write quorum rules
//! and [`quorum`] the one fan-out they all wait on. Failures are
//! [`CoordError`]s; the HTTP layer maps them to answers.

mod create;
mod error;
mod list;
mod plan;
mod quorum;
#[cfg(test)]
mod quorum_tests;
mod read;
mod write;

use std::sync::Arc;

use kv_core::Record;

use crate::cluster::View;
use crate::node::Node;
use crate::peer::PeerError;

pub use error::CoordError;
pub use list::Listing;

/// What a write does to its key.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteKind {
    /// Stores the value whatever the key holds.
    Put(Vec<u8>),
    /// Stores the value only if the key holds no live value
    /// (`If-None-Match: *`, classic `POST /write`); linearizable per key.
    Create(Vec<u8>),
    /// Deletes a key that holds a live value; [`CoordError::NotFound`] if
    /// it holds none.
    Delete,
}

/// The data path of one node: reads, writes, creates and listings run on
/// the keys' owners. A cheap handle (it clones the node's `Arc`), so every
/// call to an owner owns what it needs and can outlive the request.
#[derive(Clone)]
pub struct Coordinator {
    node: Arc<Node>,
}

impl Node {
    /// The data path through this node.
    pub fn coordinator(self: &Arc<Self>) -> Coordinator {
        Coordinator { node: self.clone() }
    }
}

impl Coordinator {
    fn me(&self) -> u32 {
        self.node.me()
    }

    /// The topology to run a request on, if this node may coordinate one.
    fn require_serving(&self) -> Result<Arc<View>, CoordError> {
        let view = self.node.cluster.view();
        if !self.node.cluster.confirmed() {
            return Err(CoordError::Unavailable(format!(
                "node {} has not confirmed its topology since it started; try another node",
                self.me()
            )));
        }
        match view.state_of(self.me()) {
            Some(s) if s.serves_client_reads() => Ok(view),
            Some(s) => Err(CoordError::Unavailable(format!(
                "node {} is {s} and serves no clients until it is Up; try another node",
                self.me()
            ))),
            None => Err(CoordError::Unavailable(format!(
                "node {} is not part of the cluster's topology",
                self.me()
            ))),
        }
    }
}

fn newest<'a>(answers: impl Iterator<Item = &'a Option<Record>>) -> Option<Record> {
    answers.flatten().max_by_key(|r| r.version).cloned()
}

pub(crate) fn peer_address(view: &View, ordinal: u32) -> Result<String, PeerError> {
    view.topology
        .node(ordinal)
        .map(|n| n.peer_address.clone())
        .ok_or(PeerError::Unknown(ordinal))
}
