//! Verification: co-owners of every bucket must hold equal digests
//! (`kvctl verify`, and kv-operator's on request, `kvstore.dev/verifyRequestedAt`).
//!
//! [`compare`] is a pure function over the topology and the digests each node
//! reported (`GET /v1/digests`); the callers only fetch and print.

use std::collections::{BTreeMap, BTreeSet};

use crate::{BUCKETS, Layout, Topology};
use serde::{Deserialize, Serialize};

/// One bucket's entry in `GET /v1/digests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDigest {
    pub digest: String,
    pub count: u64,
}

/// `GET /v1/digests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DigestsResponse {
    pub node_id: u32,
    pub epoch: u64,
    pub buckets: BTreeMap<String, WireDigest>,
}

/// A bucket digest: wrapping sum of entry digests and the record count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct BucketDigest {
    pub sum: u128,
    pub count: u64,
}

impl BucketDigest {
    /// The digest of an empty bucket (what a node that does not list it holds).
    pub const EMPTY: BucketDigest = BucketDigest { sum: 0, count: 0 };
}

/// A node's digests by bucket.
pub type NodeDigests = BTreeMap<u32, BucketDigest>;

/// A malformed `/v1/digests` answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("bucket {0:?} is not a bucket number below {BUCKETS}")]
    BadBucket(String),
    #[error("bucket {bucket}: digest {digest:?} is not hexadecimal (at most 32 digits)")]
    BadDigest { bucket: u32, digest: String },
}

impl DigestsResponse {
    /// Parses bucket numbers and hex digests.
    pub fn parse(&self) -> Result<NodeDigests, DigestError> {
        let mut out = NodeDigests::new();
        for (b, d) in &self.buckets {
            let bucket = b
                .parse::<u32>()
                .ok()
                .filter(|x| *x < BUCKETS)
                .ok_or_else(|| DigestError::BadBucket(b.chars().take(32).collect()))?;
            let hex = d.digest.trim().trim_start_matches("0x");
            let sum = if hex.is_empty() || hex.len() > 32 {
                None
            } else {
                u128::from_str_radix(hex, 16).ok()
            }
            .ok_or_else(|| DigestError::BadDigest {
                bucket,
                digest: d.digest.chars().take(40).collect(),
            })?;
            out.insert(
                bucket,
                BucketDigest {
                    sum,
                    count: d.count,
                },
            );
        }
        Ok(out)
    }
}

/// A bucket whose co-owners disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Divergence {
    pub bucket: u32,
    /// Every checked owner with what it holds (sorted by ordinal).
    pub owners: Vec<(u32, BucketDigest)>,
}

/// What [`compare`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// Buckets with at least two checked owners, compared.
    pub buckets_compared: u32,
    /// Buckets with fewer than two checked owners (nothing to compare).
    pub buckets_single: u32,
    /// Owners of some bucket whose digests were not given (unreachable or skipped).
    pub unchecked_owners: BTreeSet<u32>,
    pub divergent: Vec<Divergence>,
}

impl VerifyReport {
    pub fn consistent(&self) -> bool {
        self.divergent.is_empty()
    }
}

/// Compares, for every bucket, the digests of its read owners (the committed
/// placement of `topology`) among the nodes present in `digests`. A bucket
/// absent from a node's digests is empty there.
pub fn compare(topology: &Topology, digests: &BTreeMap<u32, NodeDigests>) -> VerifyReport {
    let layout = Layout::of(topology);
    let mut report = VerifyReport::default();
    for bucket in 0..BUCKETS {
        let mut held = Vec::new();
        for &owner in layout.read_owners(bucket) {
            match digests.get(&owner) {
                Some(d) => held.push((
                    owner,
                    d.get(&bucket).copied().unwrap_or(BucketDigest::EMPTY),
                )),
                None => {
                    report.unchecked_owners.insert(owner);
                }
            }
        }
        if held.len() < 2 {
            report.buckets_single += 1;
            continue;
        }
        report.buckets_compared += 1;
        held.sort_by_key(|(o, _)| *o);
        if held.windows(2).any(|w| w[0].1 != w[1].1) {
            report.divergent.push(Divergence {
                bucket,
                owners: held,
            });
        }
    }
    report
}
