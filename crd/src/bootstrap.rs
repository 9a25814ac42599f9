//! `spec.bootstrap`: a new cluster started from a backup, and its status.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kvbackup::S3Settings;

/// How a new cluster starts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bootstrap {
    /// Start from a backup (a `KvBackup`'s or `kvctl backup`'s destination):
    /// each node loads the buckets it keeps before it serves.
    pub from_backup: FromBackup,
}

/// A backup to start from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FromBackup {
    /// `s3://bucket/prefix`, or `file:///dir` (a directory every node's pod
    /// can read).
    #[schemars(length(min = 8, max = 1024))]
    pub destination: String,
    /// How to reach an `s3://` destination; when absent, the nodes' own
    /// AWS_* environment says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Settings>,
}

/// Where the start from a backup is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BootstrapPhase {
    /// The nodes are loading the backup (or waiting to be able to).
    Restoring,
    /// Every node loaded its buckets and was Up; the source is no longer
    /// handed to the nodes.
    Restored,
}

/// `status.bootstrap`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapStatus {
    pub phase: BootstrapPhase,
    /// The backup started from.
    pub source: String,
    /// What holds the restore up, when something does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When every node had loaded its buckets and was Up (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}
