//! kv-core: the vocabulary every kvstore component shares.
//!
//! A node, the control plane and the CLI must agree on a handful of things
//! without talking to each other: how a write is versioned ([`version`]), what a
//! record is and how a set of records is summarised for comparison
//! ([`record`]), what the cluster looks like ([`topology`]), and which nodes own
//! which key ([`placement`]), and what a node reports about itself ([`report`]). All of it is pure data and pure functions, so it
//! is tested exhaustively here and never drifts between components.

pub mod placement;
pub mod record;
pub mod report;
pub mod topology;
pub mod verify;
pub mod version;
pub mod wire;

pub use placement::{Layout, Placement};
pub use record::{Applied, BUCKETS, CreateVote, Digest, Record, bucket_of};
pub use report::NodeReport;
pub use topology::{
    Consistency, MAX_NODES, NodeInfo, NodeState, PlacementSpec, Strategy, Topology, TopologyError,
};
pub use version::{Hlc, Version};
