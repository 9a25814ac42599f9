//! Records, key validation, buckets and the order-independent bucket digest.
//!
//! The keyspace is cut into [`BUCKETS`] buckets by a hash of the key. A bucket
//! is the unit of everything replication does: placement assigns owners per
//! bucket (so every key of a bucket has the same owners), anti-entropy compares
//! per-bucket digests between co-owners and exchanges only buckets that differ,
//! and rebalancing streams whole buckets.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::version::Version;

/// Number of buckets the keyspace is hashed into. Fixed for the life of a
/// cluster: it is part of the on-disk format.
pub const BUCKETS: u32 = 4096;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Default limit on a value's size, in bytes (configurable per node).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;

/// One version of one key: a value, or a tombstone when `value` is `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub version: Version,
}

impl Record {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    pub fn bucket(&self) -> u32 {
        bucket_of(&self.key)
    }

    /// This record's contribution to its bucket's digest.
    pub fn digest(&self) -> Digest {
        entry_digest(&self.key, self.version)
    }
}

/// Why a key or value is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidInput {
    #[error("key is empty")]
    EmptyKey,
    #[error("key is {0} bytes; the limit is {MAX_KEY_BYTES}")]
    KeyTooLong(usize),
    #[error("value is {size} bytes; the limit is {limit}")]
    ValueTooLarge { size: usize, limit: usize },
}

pub fn validate_key(key: &[u8]) -> Result<(), InvalidInput> {
    match key.len() {
        0 => Err(InvalidInput::EmptyKey),
        n if n > MAX_KEY_BYTES => Err(InvalidInput::KeyTooLong(n)),
        _ => Ok(()),
    }
}

pub fn validate_value(value: &[u8], limit: usize) -> Result<(), InvalidInput> {
    if value.len() > limit {
        return Err(InvalidInput::ValueTooLarge {
            size: value.len(),
            limit,
        });
    }
    Ok(())
}

/// The bucket a key belongs to. Stable across versions and platforms.
pub fn bucket_of(key: &[u8]) -> u32 {
    // Multiply-shift maps the 64-bit hash onto 0..BUCKETS without modulo bias.
    ((u128::from(xxh3_64(key)) * u128::from(BUCKETS)) >> 64) as u32
}

/// An order-independent digest of a set of (key, version) pairs: the wrapping
/// sum of each pair's 128-bit hash, with the number of pairs. Adding and
/// removing a pair are O(1), so storage keeps each bucket's digest current as
/// each write commits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest {
    pub sum: u128,
    pub count: u64,
}

impl Digest {
    pub const EMPTY: Digest = Digest { sum: 0, count: 0 };

    pub fn add(&mut self, other: Digest) {
        self.sum = self.sum.wrapping_add(other.sum);
        self.count = self.count.wrapping_add(other.count);
    }

    pub fn remove(&mut self, other: Digest) {
        self.sum = self.sum.wrapping_sub(other.sum);
        self.count = self.count.wrapping_sub(other.count);
    }

    /// Stable text form (`<32 hex digits>/<count>`) for APIs and logs.
    pub fn to_hex(&self) -> String {
        format!("{:032x}/{}", self.sum, self.count)
    }
}

/// The digest of one (key, version) pair.
pub fn entry_digest(key: &[u8], version: Version) -> Digest {
    let mut buf = Vec::with_capacity(key.len() + 12 + 4);
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(&version.ts.to_le_bytes());
    buf.extend_from_slice(&version.node.to_le_bytes());
    Digest {
        sum: xxh3_128(&buf),
        count: 1,
    }
}

/// Last-writer-wins: does `incoming` replace what is stored (if anything)?
pub fn supersedes(incoming: Version, stored: Option<Version>) -> bool {
    stored.is_none_or(|s| incoming > s)
}

/// What an owner did with one record it was asked to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The record replaced what was stored (or nothing was).
    Stored,
    /// The owner already held this very version.
    Had,
    /// The owner holds a newer version (given) and kept it: a coordinator
    /// that meant its write to win re-issues it above this version.
    Newer(Version),
}

impl Applied {
    /// The owner now holds this record (stored now, or already).
    pub fn holds(self) -> bool {
        matches!(self, Applied::Stored | Applied::Had)
    }

    /// The record changed what the owner stored.
    pub fn stored(self) -> bool {
        self == Applied::Stored
    }

    /// The outcome of applying `incoming` over `stored`, by last-writer-wins.
    pub fn of(incoming: Version, stored: Option<Version>) -> Applied {
        match stored {
            Some(s) if s == incoming => Applied::Had,
            Some(s) if s > incoming => Applied::Newer(s),
            _ => Applied::Stored,
        }
    }
}

/// What an owner answers a step of a create-only write: the promise (phase
/// one: "accept no create of this key below this ballot") or the accept
/// (phase two: store the create's record, whose version is the ballot).
///
/// An owner grants a promise only for a ballot above every one it promised
/// before and only while the key holds no live value; it accepts a record
/// only under the promise of that very ballot and only while the key still
/// holds no live value. Promises are durable. So of two creates of one key
/// at most one reaches a quorum, and a loser writes nothing unless its
/// ballot (hence its version) is below the winner's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateVote {
    /// Promised (phase one) or stored (phase two).
    Granted,
    /// Phase two only: the owner already holds this very record.
    Had,
    /// The key holds a live value at this version: not a create.
    Live(Version),
    /// A ballot at least this high was promised: another create of the key
    /// is under way (or its leader gave up).
    Promised(Version),
    /// The key's tombstone is newer than the ballot.
    Newer(Version),
}

impl CreateVote {
    /// The owner went along: promised, stored, or already held the record.
    pub fn granted(self) -> bool {
        matches!(self, CreateVote::Granted | CreateVote::Had)
    }

    /// The version the refusal names, for the leader's clock.
    pub fn seen(self) -> Option<Version> {
        match self {
            CreateVote::Live(v) | CreateVote::Promised(v) | CreateVote::Newer(v) => Some(v),
            CreateVote::Granted | CreateVote::Had => None,
        }
    }
}

impl std::fmt::Display for CreateVote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreateVote::Granted => f.write_str("granted"),
            CreateVote::Had => f.write_str("already held it"),
            CreateVote::Live(v) => write!(f, "holds a live value (version {v})"),
            CreateVote::Promised(v) if *v == Version::ZERO => {
                f.write_str("holds no promise of this ballot")
            }
            CreateVote::Promised(v) => write!(f, "promised a create at ballot {v}"),
            CreateVote::Newer(v) => write!(f, "holds a newer tombstone (version {v})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_must_be_one_to_1024_bytes() {
        assert_eq!(validate_key(b""), Err(InvalidInput::EmptyKey));
        assert!(validate_key(b"a").is_ok());
        assert!(validate_key(&[0xff; 1024]).is_ok());
        assert_eq!(
            validate_key(&[b'a'; 1025]),
            Err(InvalidInput::KeyTooLong(1025))
        );
    }

    #[test]
    fn values_are_limited_but_may_be_empty() {
        assert!(validate_value(b"", 10).is_ok());
        assert!(validate_value(&[0; 10], 10).is_ok());
        assert_eq!(
            validate_value(&[0; 11], 10),
            Err(InvalidInput::ValueTooLarge {
                size: 11,
                limit: 10
            })
        );
    }

    #[test]
    fn newer_versions_supersede_and_equal_or_older_ones_do_not() {
        let v = Version::new(10, 1);
        assert!(supersedes(v, None));
        assert!(supersedes(v, Some(Version::new(9, 5))));
        assert!(supersedes(v, Some(Version::new(10, 0))));
        assert!(!supersedes(v, Some(v)));
        assert!(!supersedes(v, Some(Version::new(11, 0))));
    }

    #[test]
    fn buckets_cover_the_range_and_spread_keys_evenly() {
        let mut counts = vec![0u32; BUCKETS as usize];
        let n = 409_600;
        for i in 0..n {
            let b = bucket_of(format!("key-{i}").as_bytes());
            counts[b as usize] += 1;
        }
        // A uniform hash gives Poisson-like counts: spread ~ sqrt(mean).
        let mean = n as f64 / f64::from(BUCKETS);
        let var = counts
            .iter()
            .map(|c| (f64::from(*c) - mean).powi(2))
            .sum::<f64>()
            / f64::from(BUCKETS);
        let ratio = var.sqrt() / mean.sqrt();
        let max = f64::from(*counts.iter().max().unwrap_or(&0));
        let min = f64::from(*counts.iter().min().unwrap_or(&0));
        assert!(
            (0.85..1.15).contains(&ratio),
            "stddev/sqrt(mean) = {ratio:.3}"
        );
        assert!(
            max < mean * 1.6 && min > mean * 0.4,
            "min {min} max {max} mean {mean}"
        );
    }

    #[test]
    fn digest_changes_when_a_version_changes() {
        let a = entry_digest(b"k", Version::new(1, 1));
        let b = entry_digest(b"k", Version::new(2, 1));
        assert_ne!(a, b);
        // Length prefix: ("ab", v) and ("a", v') never collide by concatenation.
        assert_ne!(
            entry_digest(b"ab", Version::new(1, 1)),
            entry_digest(b"a", Version::new(1, 1))
        );
    }

    proptest! {
        #[test]
        fn digest_is_independent_of_order_and_removal_undoes_addition(
            entries in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 1..8), any::<u64>(), any::<u32>()), 0..40),
            seed in any::<u64>(),
        ) {
            let digests: Vec<Digest> = entries.iter().map(|(k, ts, n)| entry_digest(k, Version::new(*ts, *n))).collect();
            let mut forward = Digest::EMPTY;
            for d in &digests { forward.add(*d); }
            let mut shuffled = digests.clone();
            // Deterministic shuffle from the seed.
            let len = shuffled.len();
            for i in (1..len).rev() {
                let j = (seed.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            let mut backward = Digest::EMPTY;
            for d in &shuffled { backward.add(*d); }
            prop_assert_eq!(forward, backward);
            for d in &digests { backward.remove(*d); }
            prop_assert_eq!(backward, Digest::EMPTY);
        }
    }
}
