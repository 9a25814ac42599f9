//! Test harness: the workspace's test kit ([`kv_testkit`]: real `kv-node`
//! processes, a blocking client, topology files, a fault proxy), with this
//! crate's own kv-node binary.
#![allow(dead_code, unused_imports)]

pub use kv_testkit::*;

/// The kv-node binary cargo built for these tests.
pub const KV_NODE: &str = env!("CARGO_BIN_EXE_kv-node");
