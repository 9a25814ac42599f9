//! kv-operator: kvstore's control plane on Kubernetes.
//!
//! [`k8s`] holds the `KvCluster` custom resource and its controller: it
//! observes the cluster's objects and the nodes' reports, decides node states,
//! topology and rebalancing as a pure function (`k8s::decide`), and applies the
//! result with server-side apply.
//!
//! The decision function is kept free of Kubernetes types so that it can become
//! the planner the local platform (`kvctl up`) shares with the operator.

pub mod k8s;
pub mod planner;
