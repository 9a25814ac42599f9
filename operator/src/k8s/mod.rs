//! kvstore on Kubernetes: the `KvCluster` custom resource and its controller.
//!
//! [`crd`] defines the resource (the CRD is generated from it). The controller
//! is split the way it thinks: [`objects`] computes every owned object from the
//! spec as pure functions, the [planner](crate::planner) turns observations
//! into the next topology and node states, [`controller`] observes the
//! cluster and applies the result
//! with server-side apply, [`hibernation`] and [`restart`] keep the state of
//! those two requests across reconciles, [`metrics`] counts what it did, and [`run`] wires it
//! to the API server behind leader election. [`render`] prints the owned
//! objects offline for review and schema validation.

pub mod controller;
pub mod crd;
pub mod hibernation;
pub mod metrics;
pub mod objects;
pub mod render;
pub mod restart;
pub mod run;
pub mod tls;

pub use controller::{Context, Error, error_policy, reconcile};
pub use crd::{KvCluster, KvClusterSpec, KvClusterStatus};
