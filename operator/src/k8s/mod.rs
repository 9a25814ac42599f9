//! kvstore on Kubernetes: the `KvCluster` custom resource and its controller.
//!
//! [`crd`] defines the resource (the CRD is generated from it). The controller
//! is split the way it thinks: [`objects`] computes every owned object from the
//! spec as pure functions, the [planner](kv_control::planner) turns observations
//! into the next topology and node states, [`controller`] observes the
//! cluster and applies the result with server-side apply ([`status`],
//! [`events`] and [`nodes`] hold what it writes, publishes and asks of the
//! nodes), [`hibernation`] and [`restart`] keep the state of
//! those two requests across reconciles, [`volumes`] grows the nodes'
//! claims when `spec.storage.size` grows, [metrics](kv_control::metrics) count what it did, and [`run`] wires it
//! to the API server behind leader election. [`render`] prints the owned
//! objects offline for review and schema validation. [`backup`] is the
//! `KvBackup` resource and its own small controller; [`bootstrap`] starts a
//! new cluster from a backup; [`verify`] compares the replicas on request.

mod apply;
pub mod backup;
pub mod bootstrap;
pub mod controller;
pub mod crd;
pub mod events;
pub mod hibernation;
pub mod nodes;
pub mod objects;
mod observe;
pub mod render;
pub mod restart;
mod round;
pub mod run;
pub mod status;
pub mod tls;
pub mod verify;
pub mod volumes;

pub use controller::{Context, Error, error_policy, reconcile};
pub use crd::{KvCluster, KvClusterSpec, KvClusterStatus};
