//! kv-operator: kvstore's control plane.
//!
//! [`planner`] decides, as a pure function free of Kubernetes types, the
//! topology, node states, rebalancing and process actions from what the user
//! asked for and what was observed. [`k8s`] holds the `KvCluster` custom
//! resource and its controller: it observes the cluster's objects and the
//! nodes' reports, asks the planner, and applies the result with server-side
//! apply. [`local`] is the platform behind `kvctl up`: kv-node processes on
//! loopback and a gateway, driven by the same planner. [`token`] makes the
//! API tokens of both platforms.

pub mod k8s;
pub mod local;
pub mod planner;
pub mod token;
