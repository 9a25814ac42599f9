//! kv-chaos: kvstore's fault harness, in the manner of Jepsen.
//!
//! A run starts a local cluster ([`cluster`]) through the operator's local
//! platform — the same planner and supervisor as `kvctl up` — with a
//! fault-injection [`proxy`] in front of every node's peer port, so that the
//! peer address published in the topology is the proxy's. Concurrent
//! [`client`]s write, create (create-only), read and delete a small key
//! space through the gateway and directly through random nodes, and create
//! races send several creates of one key at the same moment, recording
//! every operation in a [`history`]. Meanwhile the [`nemesis`] follows a
//! schedule drawn from a seed: kill -9 a node, hold one Failed and recover
//! it, partition one node from the others, slow one peer, change the
//! replication factor or the strategy, restart a node with its clock off by
//! up to an hour, or wipe a node's volume. At the end everything is healed,
//! the cluster is left to converge (bounded), every key is read at `All`,
//! co-owner digests are compared, and the [`checker`] — a pure function over
//! the history — decides whether the store kept its promise (SPEC §2).
//! [`run`] ties it together.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod proxy;
pub mod run;
