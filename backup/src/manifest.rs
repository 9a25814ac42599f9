//! What a backup is made of, and the pure decisions about it: merging what
//! owners hold, the per-bucket digests, the manifest, and whether a restored
//! cluster matches it.
//!
//! A backup is a set of objects under one prefix: `data/segment-NN.kvb`
//! (every record of 64 consecutive buckets, in the node-to-node batch
//! encoding of `kv_core::wire`, tombstones and versions included) and
//! `manifest.json`, written last, so a prefix without a manifest holds no
//! usable backup.

use std::collections::{BTreeMap, HashMap};

use kv_core::{BUCKETS, Digest, Layout, Record, Topology, Version};
use serde::{Deserialize, Serialize};

/// `format` of every manifest.
pub const FORMAT: &str = "kvstore-backup";
/// The layout this code writes and reads; a manifest of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
/// Buckets per data object.
pub const SEGMENT_BUCKETS: u32 = 64;
/// Data objects per backup (`BUCKETS / SEGMENT_BUCKETS`).
pub const SEGMENTS: u32 = BUCKETS / SEGMENT_BUCKETS;
/// Name of the manifest under the prefix.
pub const MANIFEST: &str = "manifest.json";

/// The buckets of segment `s`.
pub fn segment_buckets(s: u32) -> std::ops::Range<u32> {
    s * SEGMENT_BUCKETS..(s + 1) * SEGMENT_BUCKETS
}

/// The object name of segment `s` under the prefix.
pub fn segment_object(s: u32) -> String {
    format!("data/segment-{s:02}.kvb")
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// The cluster backed up.
    pub cluster_id: String,
    /// Its topology epoch when the backup began.
    pub epoch: u64,
    /// The newest record version in the backup (`<ts>.<node>`): a restored
    /// cluster's clocks move past it as the records are applied.
    pub hlc_high_water: String,
    /// Unix milliseconds when the backup began and ended. Every write
    /// acknowledged before `startedMs` is in the backup.
    pub started_ms: u64,
    pub finished_ms: u64,
    /// Records (values and tombstones) in the backup.
    pub records: u64,
    pub tombstones: u64,
    /// Bytes of all data objects.
    pub bytes: u64,
    pub segments: Vec<SegmentEntry>,
    /// Every non-empty bucket: the digest of its records and their count
    /// (the same digest a node keeps per bucket; absent = empty).
    pub buckets: BTreeMap<u32, BucketEntry>,
}

/// One data object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentEntry {
    pub segment: u32,
    pub object: String,
    pub records: u64,
    pub bytes: u64,
    /// xxh3-128 of the object's bytes, 32 hex digits: a damaged or
    /// truncated object is refused before anything is applied from it.
    pub checksum: String,
}

/// One bucket's digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketEntry {
    #[serde(with = "hex_u128")]
    pub digest: u128,
    pub count: u64,
}

impl BucketEntry {
    pub fn of(d: Digest) -> BucketEntry {
        BucketEntry {
            digest: d.sum,
            count: d.count,
        }
    }

    pub fn as_digest(self) -> Digest {
        Digest {
            sum: self.digest,
            count: self.count,
        }
    }
}

mod hex_u128 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:032x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() || s.len() > 32 {
            return Err(serde::de::Error::custom("a digest is 1..=32 hex digits"));
        }
        u128::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

/// Why a manifest or data object cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("the manifest is not JSON of a kvstore backup: {0}")]
    Malformed(String),
    #[error(
        "the manifest is of format {format:?} version {version}; this kvctl reads {FORMAT:?} version {FORMAT_VERSION}"
    )]
    Version { format: String, version: u32 },
    #[error("{object}: {detail}")]
    Segment { object: String, detail: String },
}

impl Manifest {
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, FormatError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| FormatError::Malformed(e.to_string()))?;
        if m.format != FORMAT || m.format_version != FORMAT_VERSION {
            return Err(FormatError::Version {
                format: m.format.chars().take(64).collect(),
                version: m.format_version,
            });
        }
        if let Some(b) = m.buckets.keys().find(|b| **b >= BUCKETS) {
            return Err(FormatError::Malformed(format!("bucket {b} out of range")));
        }
        Ok(m)
    }

    /// The digest the manifest gives `bucket` (empty when it does not list it).
    pub fn digest(&self, bucket: u32) -> Digest {
        self.buckets
            .get(&bucket)
            .map(|e| e.as_digest())
            .unwrap_or(Digest::EMPTY)
    }
}

/// xxh3-128 of `bytes` as 32 hex digits.
pub fn checksum(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// Checks a data object against its manifest entry and decodes it; every
/// record must belong to one of the segment's buckets.
pub fn decode_segment(entry: &SegmentEntry, bytes: &[u8]) -> Result<Vec<Record>, FormatError> {
    let fail = |detail: String| FormatError::Segment {
        object: entry.object.clone(),
        detail,
    };
    if bytes.len() as u64 != entry.bytes || checksum(bytes) != entry.checksum {
        return Err(fail(format!(
            "{} bytes with checksum {}; the manifest says {} bytes with checksum {}",
            bytes.len(),
            checksum(bytes),
            entry.bytes,
            entry.checksum
        )));
    }
    let records = kv_core::wire::decode_records(bytes).map_err(|e| fail(e.to_string()))?;
    if records.len() as u64 != entry.records {
        return Err(fail(format!(
            "{} records; the manifest says {}",
            records.len(),
            entry.records
        )));
    }
    let range = segment_buckets(entry.segment);
    if let Some(r) = records.iter().find(|r| !range.contains(&r.bucket())) {
        return Err(fail(format!(
            "a record of bucket {} is outside the segment's buckets {range:?}",
            r.bucket()
        )));
    }
    Ok(records)
}

/// Last-writer-wins over what several owners returned: for every key, the
/// record with the highest version (a tombstone included). Sorted by key.
pub fn merge(answers: impl IntoIterator<Item = Vec<Record>>) -> Vec<Record> {
    let mut newest: HashMap<Vec<u8>, Record> = HashMap::new();
    for r in answers.into_iter().flatten() {
        match newest.get(&r.key) {
            Some(have) if have.version >= r.version => {}
            _ => {
                newest.insert(r.key.clone(), r);
            }
        }
    }
    let mut out: Vec<Record> = newest.into_values().collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The per-bucket digests of `records`, as a node computes them.
pub fn digests(records: &[Record]) -> BTreeMap<u32, Digest> {
    let mut out: BTreeMap<u32, Digest> = BTreeMap::new();
    for r in records {
        out.entry(r.bucket()).or_default().add(r.digest());
    }
    out
}

/// The highest version among `records`.
pub fn high_water(records: &[Record]) -> Option<Version> {
    records.iter().map(|r| r.version).max()
}

/// A bucket where an owner of the restored cluster holds something other
/// than the manifest says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub bucket: u32,
    pub node: u32,
    pub expected: String,
    pub found: String,
}

/// Compares, for every bucket, what each owner (`owners_of`) holds with the
/// manifest. `held` is each node's full digest table (`BUCKETS` long).
pub fn mismatches(
    manifest: &Manifest,
    owners_of: impl Fn(u32) -> Vec<u32>,
    held: &BTreeMap<u32, Vec<Digest>>,
) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for bucket in 0..BUCKETS {
        let want = manifest.digest(bucket);
        for node in owners_of(bucket) {
            let have = held
                .get(&node)
                .and_then(|d| d.get(bucket as usize).copied())
                .unwrap_or(Digest::EMPTY);
            if have != want {
                out.push(Mismatch {
                    bucket,
                    node,
                    expected: want.to_hex(),
                    found: have.to_hex(),
                });
            }
        }
    }
    out
}

/// Buckets of a restore target whose owners hold something that is neither
/// empty nor exactly the backup's bucket: a restore there would mix data.
/// (Buckets equal to the manifest's are what an earlier run of the same
/// restore left: running it again is a no-op.)
pub fn foreign_buckets(
    manifest: &Manifest,
    owners_of: impl Fn(u32) -> Vec<u32>,
    held: &BTreeMap<u32, Vec<Digest>>,
) -> Vec<Mismatch> {
    mismatches(manifest, owners_of, held)
        .into_iter()
        .filter(|m| m.found != Digest::EMPTY.to_hex())
        .collect()
}

/// The owners a restore writes a bucket to: every write owner of the
/// target topology (committed and pending placement).
pub fn restore_owners(topology: &Topology) -> impl Fn(u32) -> Vec<u32> {
    let layout = Layout::of(topology);
    move |b| layout.write_owners(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, value: Option<&str>, ts: u64, node: u32) -> Record {
        Record {
            key: key.as_bytes().to_vec(),
            value: value.map(|v| v.as_bytes().to_vec()),
            version: Version::new(ts, node),
        }
    }

    fn manifest_of(records: &[Record]) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            cluster_id: "c".into(),
            epoch: 3,
            hlc_high_water: high_water(records).unwrap_or_default().to_string(),
            started_ms: 1,
            finished_ms: 2,
            records: records.len() as u64,
            tombstones: records.iter().filter(|r| r.is_tombstone()).count() as u64,
            bytes: 0,
            segments: vec![],
            buckets: digests(records)
                .into_iter()
                .map(|(b, d)| (b, BucketEntry::of(d)))
                .collect(),
        }
    }

    #[test]
    fn merge_keeps_the_newest_version_of_each_key_tombstones_included() {
        let a = vec![rec("k1", Some("old"), 5, 0), rec("k2", Some("x"), 9, 1)];
        let b = vec![rec("k1", Some("new"), 7, 2), rec("k2", None, 10, 0)];
        let c = vec![rec("k3", Some("only here"), 1, 1)];
        let merged = merge([a, b, c]);
        assert_eq!(
            merged,
            vec![
                rec("k1", Some("new"), 7, 2),
                rec("k2", None, 10, 0),
                rec("k3", Some("only here"), 1, 1)
            ]
        );
        // the same answers in another order merge the same
        let again = merge([
            vec![rec("k3", Some("only here"), 1, 1)],
            vec![rec("k1", Some("new"), 7, 2), rec("k2", None, 10, 0)],
            vec![rec("k1", Some("old"), 5, 0), rec("k2", Some("x"), 9, 1)],
        ]);
        assert_eq!(merged, again);
    }

    #[test]
    fn manifest_round_trips_and_another_format_version_is_refused() {
        let m = manifest_of(&[rec("a", Some("1"), 3, 0), rec("b", None, 4, 1)]);
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(Manifest::from_json(&json).unwrap(), m);
        assert_eq!(m.hlc_high_water, "4.1");
        let mut v2 = m.clone();
        v2.format_version = 2;
        assert!(matches!(
            Manifest::from_json(&serde_json::to_vec(&v2).unwrap()),
            Err(FormatError::Version { version: 2, .. })
        ));
        assert!(matches!(
            Manifest::from_json(b"{\"format\": 1}"),
            Err(FormatError::Malformed(_))
        ));
    }

    #[test]
    fn a_segment_is_refused_when_damaged_or_holding_a_foreign_bucket() {
        let records = vec![rec("a", Some("1"), 3, 0)];
        let seg = records[0].bucket() / SEGMENT_BUCKETS;
        let bytes = kv_core::wire::encode_records(&records);
        let entry = SegmentEntry {
            segment: seg,
            object: segment_object(seg),
            records: 1,
            bytes: bytes.len() as u64,
            checksum: checksum(&bytes),
        };
        assert_eq!(decode_segment(&entry, &bytes).unwrap(), records);
        let mut damaged = bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(decode_segment(&entry, &damaged).is_err());
        assert!(decode_segment(&entry, &bytes[..bytes.len() - 1]).is_err());
        let elsewhere = SegmentEntry {
            segment: (seg + 1) % SEGMENTS,
            ..entry
        };
        let err = decode_segment(&elsewhere, &bytes).unwrap_err().to_string();
        assert!(err.contains("outside the segment"), "{err}");
    }

    #[test]
    fn mismatches_name_each_owner_whose_bucket_differs_from_the_manifest() {
        let records = vec![rec("a", Some("1"), 3, 0), rec("b", Some("2"), 4, 0)];
        let m = manifest_of(&records);
        let ba = records[0].bucket();
        let mut full = vec![Digest::EMPTY; BUCKETS as usize];
        for (b, d) in digests(&records) {
            full[b as usize] = d;
        }
        let owners = |_b: u32| vec![0, 1];
        let mut held = BTreeMap::from([(0, full.clone()), (1, full.clone())]);
        assert!(mismatches(&m, owners, &held).is_empty());
        // node 1 lacks record "a": exactly its bucket of "a" differs
        let mut partial = full.clone();
        partial[ba as usize].remove(records[0].digest());
        held.insert(1, partial);
        let found = mismatches(&m, owners, &held);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].bucket, found[0].node), (ba, 1));
        // a node that answered nothing holds nothing
        held.remove(&1);
        assert_eq!(mismatches(&m, owners, &held).len(), m.buckets.len());
    }

    #[test]
    fn foreign_buckets_are_non_empty_ones_other_than_the_backups() {
        let records = vec![rec("a", Some("1"), 3, 0)];
        let m = manifest_of(&records);
        let owners = |_b: u32| vec![0];
        let empty = BTreeMap::from([(0, vec![Digest::EMPTY; BUCKETS as usize])]);
        assert!(foreign_buckets(&m, owners, &empty).is_empty());
        let mut same = vec![Digest::EMPTY; BUCKETS as usize];
        same[records[0].bucket() as usize] = records[0].digest();
        assert!(foreign_buckets(&m, owners, &BTreeMap::from([(0, same)])).is_empty());
        let mut other = vec![Digest::EMPTY; BUCKETS as usize];
        let stranger = rec("zzz", Some("9"), 1, 1);
        other[stranger.bucket() as usize].add(stranger.digest());
        assert_eq!(
            foreign_buckets(&m, owners, &BTreeMap::from([(0, other)])).len(),
            1
        );
    }
}
