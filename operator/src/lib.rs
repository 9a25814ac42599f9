//! kv-operator: kvstore's control plane on Kubernetes.
//!
//! [`k8s`] holds the `KvCluster` and `KvBackup` custom resources and their
//! controllers: the KvCluster controller is a [`kv_control::Platform`] — it
//! observes the cluster's objects and the nodes' reports, and the one loop
//! of kv-control plans and has it apply the result with server-side apply.

pub mod k8s;
