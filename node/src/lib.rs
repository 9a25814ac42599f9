//! kv-node: one kvstore node.
//!
//! So far this crate holds the node's storage engine ([`storage`]): SQLite in
//! WAL mode behind one group-committing writer, with per-bucket digests and
//! durable hints kept in the same transactions as the records, and
//! last-writer-wins apply-if-newer as the one write primitive. The HTTP API,
//! the quorum coordinator and replication are built on it next
//! (docs/design.md).

pub mod storage;

pub use storage::{StorageError, Store, StoreOptions, StoreStats};
