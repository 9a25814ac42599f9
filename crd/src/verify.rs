//! Verification on request: the annotation and `status.lastVerify`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The annotation that asks for a verification.
pub const VERIFY_REQUESTED_AT: &str = "kvstore.dev/verifyRequestedAt";

/// `status.lastVerify`: the last verification asked for, and what it found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyStatus {
    /// The annotation value this answers.
    pub requested_at: String,
    /// When the digests were compared (RFC 3339).
    pub finished_at: String,
    /// The topology epoch compared against.
    pub epoch: u64,
    /// Buckets with at least two checked owners, compared.
    pub buckets_compared: u32,
    /// Buckets whose checked owners disagree.
    pub divergent_buckets: u32,
    /// The first of them, as `bucket B: node N holds C records (digest D), ...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub divergent: Vec<String>,
    /// Nodes not compared, with why (Failed, or no answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_checked: Vec<String>,
    /// Every bucket's owners agree and every node not Failed answered.
    pub consistent: bool,
}
