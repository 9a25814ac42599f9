//! kv-crd: kvstore's Kubernetes resources as Rust types.
//!
//! [`kvcluster`] is the `KvCluster` custom resource (spec, status, the
//! accepted spec and what it asks of the planner), [`kvbackup`] the
//! `KvBackup` resource and backup schedules, [`bootstrap`] and [`verify`]
//! the parts of a KvCluster's spec and status for starting from a backup
//! and verifying replicas, and [`names`] the names, ports and keys of what
//! a KvCluster owns. kv-operator's controllers act on them; kvctl reads and
//! writes them through the API server without linking the controllers.

pub mod bootstrap;
pub mod kvbackup;
pub mod kvcluster;
pub mod names;
pub mod verify;

pub use kvcluster::{KvCluster, KvClusterSpec, KvClusterStatus};
