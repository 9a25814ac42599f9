//! kvstore on Kubernetes: the controllers of the `KvCluster` and `KvBackup`
//! resources (their types are kv-crd's, re-exported here as [`crd`] and
//! [`backup`]).
//!
//! A reconcile of a KvCluster is one round of kv-control's loop with the
//! cluster as the platform ([`round`]): [`observe`] reads the cluster's
//! objects and the nodes' reports, the planner decides, [`apply`] writes the
//! objects ([`objects`] computes each one from the spec as a pure function)
//! and [`record`] the status ([`status`], [`events`]). [`controller`] holds
//! what every reconcile shares and the retry policy; [`nodes`] the calls to
//! the nodes; [`hibernation`] and [`restart`] keep the state of those two
//! requests across reconciles; [`volumes`] grows the nodes' claims when
//! `spec.storage.size` grows; [`tls`] the certificates; [`run`] wires it to
//! the API server behind leader election. [`render`] prints the owned
//! objects offline. [`backup`] is the `KvBackup` controller and the backup
//! schedules; [`bootstrap`] starts a new cluster from a backup; [`verify`]
//! compares the replicas on request.

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
mod record;
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
