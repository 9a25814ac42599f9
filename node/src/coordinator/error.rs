//! What a coordinated request can fail with, in the data path's own words;
//! the HTTP layer gives each a status and code (`api::error`).

use crate::storage::StorageError;

/// Why the coordinator could not carry out a read, write, create or listing.
/// Each variant holds the sentence the client is told.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CoordError {
    /// Too few owners (or not this node) can take part; a write that fails
    /// so is not reported as written.
    #[error("{0}")]
    Unavailable(String),
    /// This node's clock is too far from the cluster's to version writes.
    #[error("{0}")]
    ClockSkew(String),
    /// A delete of a key that holds no live value.
    #[error("no such key")]
    NotFound,
    /// A create-only write of a key that already holds a value.
    #[error("{0}")]
    Exists(String),
    /// A disk (this node's, or enough owners') is full.
    #[error("{0}")]
    DiskFull(String),
    /// The key's create leader refused a forwarded create with this status
    /// (a 4xx other than 412): passed on as the leader said it.
    #[error("{message}")]
    LeaderRefused { status: u16, message: String },
    /// This node's store failed.
    #[error("{0}")]
    Internal(String),
}

impl From<StorageError> for CoordError {
    fn from(e: StorageError) -> CoordError {
        match e {
            StorageError::DiskFull(m) => {
                CoordError::DiskFull(format!("the node's disk is full: {m}"))
            }
            other => CoordError::Internal(other.to_string()),
        }
    }
}
