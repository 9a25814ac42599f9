//! kvstore on Kubernetes: the `KvCluster` custom resource and its controller.
//!
//! [`crd`] defines the resource (the CRD is generated from it). The controller
//! is split the way it thinks: [`objects`] computes every owned object from the
//! spec as pure functions, [`controller`] observes the cluster, asks the
//! planner what to do and applies the result with server-side apply.

pub mod crd;
pub mod decide;
pub mod objects;

pub use crd::{KvCluster, KvClusterSpec, KvClusterStatus};
