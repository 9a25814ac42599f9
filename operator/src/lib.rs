//! kv-operator: kvstore's control plane.
//!
//! - [`planner`] decides: a pure function from the desired cluster and what was
//!   observed to the next topology and the actions to take. No Kubernetes types.
//! - [`k8s`] carries those decisions out on Kubernetes: the `KvCluster` CRD and
//!   its controller.
//!
//! The local platform behind `kvctl up` drives the same planner with processes
//! on one machine.

pub mod k8s;
pub mod planner;
