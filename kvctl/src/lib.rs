//! kvctl: kvstore's command-line client.
//!
//! The binary (`src/main.rs`) parses [`cli::Cli`] and runs one command; the
//! pieces that can be tested on their own live here: key encoding and the HTTP
//! client ([`client`]), human and JSON rendering ([`output`]), `kvctl verify`'s
//! replica comparison ([`verify`]), `kvctl backup`/`restore` ([`backup`]),
//! the load generator ([`bench`]), and
//! `fail`/`recover`/`nodes --cluster NAME` through the KvCluster resource on
//! Kubernetes ([`k8s`]), and the same commands as the kubectl plugin
//! `kubectl kv` ([`plugin`]).

pub use kv_backup as backup;
pub mod bench;
pub mod cli;
pub mod client;
pub mod k8s;
pub mod output;
pub mod plugin;
/// Shared with kv-operator, which verifies a KvCluster on request.
pub use kv_core::verify;

pub use client::{Client, ClientError, encode_key};
