//! The KvCluster resource: re-exported from kv-crd, where kvctl reads it
//! without the controller.

pub use kv_crd::kvcluster::*;
