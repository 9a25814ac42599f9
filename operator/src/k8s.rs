//! The KvCluster custom resource and its controller (see docs/design.md).
