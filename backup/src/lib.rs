//! Backups: a running cluster's records to a directory or S3-compatible
//! storage and back, exactly (versions and tombstones kept), without
//! stopping writes. `kvctl backup|restore` and the operator's `KvBackup`
//! both run this.
//!
//! Both go through the node-to-node API with the cluster token (see
//! [`peer`]); the topology comes from a [`TopologySource`] (kvctl: the
//! client API at `--endpoint`; the operator: a node's report). No node needs
//! anything new for them.
//!
//! Backup, for each segment of 64 buckets: ask every owner of each bucket
//! that counts in quorum for the bucket's records, require answers from a
//! quorum of its owners, and keep the newest version of each key. As with a
//! quorum read, every write acknowledged at quorum before the backup began
//! is on at least one answering owner, so it is in the backup; writes made
//! during the backup may or may not be. An owner answering with another
//! topology epoch than the one planned with (a placement changed meanwhile)
//! makes that segment start over with the new topology. The manifest is
//! written last.
//!
//! Restore: the target cluster's nodes must all be Up, and each bucket's
//! owners must hold nothing or exactly the backup's bucket (what an earlier
//! run of the same restore left), unless forced. Every record is applied
//! with its own version on every owner of its bucket (last-writer-wins, so a
//! second run changes nothing). Then every owner's digest of every bucket
//! must equal the manifest's; a difference is an error.

pub mod http;
pub mod manifest;
pub mod peer;
pub mod target;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kv_core::{BUCKETS, Consistency, Digest, Layout, NodeState, Record, Topology};
use serde::Serialize;

use manifest::{
    BucketEntry, FORMAT, FORMAT_VERSION, FormatError, MANIFEST, Manifest, Mismatch, SEGMENTS,
    SegmentEntry,
};
use peer::{PeerClient, PeerError, PeerNode};
use target::{Target, TargetError};

/// Segments fetched or applied at once.
const PARALLEL: usize = 4;
/// Times a segment starts over because the topology changed under it.
const EPOCH_RETRIES: usize = 5;
/// Most records in one apply request.
const APPLY_RECORDS: usize = 2000;
/// Most bytes of keys and values in one apply request (the peer route
/// takes 16 MiB at least).
const APPLY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot read the topology: {0}")]
    Topology(String),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{0} already holds a backup (manifest.json); choose another location")]
    Exists(String),
    #[error("{0} holds no backup (no manifest.json)")]
    NoManifest(String),
    #[error(
        "bucket {bucket}: only {answered} of its {owners} owners answered, fewer than a quorum ({why})"
    )]
    Quorum {
        bucket: u32,
        answered: usize,
        owners: usize,
        why: String,
    },
    #[error(
        "the topology kept changing during the backup (planned with epoch {planned}, a node answered with {seen}); run it again"
    )]
    EpochMoved { planned: u64, seen: u64 },
    #[error("every node of the target cluster must be Up for a restore: {0}")]
    NotUp(String),
    #[error(
        "the target cluster already holds other data in {count} bucket(s) (e.g. bucket {} on node {}: {} where the backup has {}); restore into a new, empty cluster, or pass --force to apply anyway",
        .example.bucket, .example.node, .example.found, .example.expected
    )]
    NotEmpty { count: usize, example: Mismatch },
    #[error(
        "after the restore {count} bucket replica(s) differ from the manifest (e.g. bucket {} on node {}: {} where the backup has {})",
        .example.bucket, .example.node, .example.found, .example.expected
    )]
    Mismatch { count: usize, example: Mismatch },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn peer_node(t: &Topology, ordinal: u32) -> PeerNode {
    PeerNode {
        ordinal,
        address: t
            .node(ordinal)
            .map(|n| n.peer_address.clone())
            .unwrap_or_default(),
    }
}

/// Where a backup or a restore reads the cluster's current topology (node
/// addresses and states, the epoch every answer is checked against).
pub trait TopologySource: Sync {
    /// The topology now; the error says why it cannot be had.
    fn topology(&self) -> impl Future<Output = Result<Topology, String>> + Send;
}

async fn topology(source: &impl TopologySource) -> Result<Topology, BackupError> {
    source.topology().await.map_err(BackupError::Topology)
}

/// How far a running backup is, for whoever shows it (`KvBackup` status).
#[derive(Debug, Default)]
pub struct Progress {
    segments_done: AtomicU32,
    records: AtomicU64,
    bytes: AtomicU64,
}

/// A snapshot of [`Progress`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgressNow {
    pub segments_done: u32,
    pub segments: u32,
    pub records: u64,
    pub bytes: u64,
}

impl Progress {
    pub fn now(&self) -> ProgressNow {
        ProgressNow {
            segments_done: self.segments_done.load(Ordering::Relaxed),
            segments: SEGMENTS,
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    fn add(&self, entry: &SegmentEntry) {
        self.records.fetch_add(entry.records, Ordering::Relaxed);
        self.bytes.fetch_add(entry.bytes, Ordering::Relaxed);
        self.segments_done.fetch_add(1, Ordering::Relaxed);
    }
}

/// What one segment of a backup holds.
struct SegmentDone {
    entry: SegmentEntry,
    digests: BTreeMap<u32, Digest>,
    tombstones: u64,
    high_water: Option<kv_core::Version>,
}

/// Backs the cluster `client` reads the topology of up to `target`,
/// counting segments written in `progress`.
pub async fn backup(
    client: &impl TopologySource,
    peers: &PeerClient,
    target: &Target,
    progress: &Progress,
) -> Result<Manifest, BackupError> {
    if target.get(MANIFEST).await?.is_some() {
        return Err(BackupError::Exists(target.url().to_string()));
    }
    let started_ms = now_ms();
    let first = topology(client).await?;
    let done: Vec<Result<SegmentDone, BackupError>> = futures::stream::iter(0..SEGMENTS)
        .map(|s| {
            let first = first.clone();
            async move {
                let records = fetch_segment(client, peers, first, s).await?;
                let done = store_segment(target, s, records).await?;
                progress.add(&done.entry);
                Ok(done)
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut m = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        cluster_id: first.cluster_id.clone(),
        epoch: first.epoch,
        hlc_high_water: String::new(),
        started_ms,
        finished_ms: 0,
        records: 0,
        tombstones: 0,
        bytes: 0,
        segments: Vec::new(),
        buckets: BTreeMap::new(),
    };
    let mut high = kv_core::Version::ZERO;
    for d in done {
        let d = d?;
        m.records += d.entry.records;
        m.bytes += d.entry.bytes;
        m.tombstones += d.tombstones;
        high = high.max(d.high_water.unwrap_or_default());
        m.buckets
            .extend(d.digests.into_iter().map(|(b, g)| (b, BucketEntry::of(g))));
        m.segments.push(d.entry);
    }
    m.segments.sort_by_key(|e| e.segment);
    m.hlc_high_water = high.to_string();
    m.finished_ms = now_ms();
    let json = serde_json::to_vec_pretty(&m).map_err(|e| FormatError::Malformed(e.to_string()))?;
    target.put(MANIFEST, json).await?;
    Ok(m)
}

/// The newest version of every record of segment `s`, from a quorum of each
/// bucket's owners.
async fn fetch_segment(
    client: &impl TopologySource,
    peers: &PeerClient,
    mut topo: Topology,
    s: u32,
) -> Result<Vec<Record>, BackupError> {
    let mut tries = 0;
    loop {
        match fetch_segment_once(peers, &topo, s).await {
            Err(BackupError::EpochMoved { planned, seen }) => {
                tries += 1;
                if tries >= EPOCH_RETRIES {
                    return Err(BackupError::EpochMoved { planned, seen });
                }
                tokio::time::sleep(Duration::from_millis(200 * tries as u64)).await;
                topo = topology(client).await?;
            }
            other => return other,
        }
    }
}

async fn fetch_segment_once(
    peers: &PeerClient,
    topo: &Topology,
    s: u32,
) -> Result<Vec<Record>, BackupError> {
    let layout = Layout::of(topo);
    let mut ask: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for b in manifest::segment_buckets(s) {
        for &o in layout.read_owners(b) {
            if topo.state_of(o).is_some_and(NodeState::counts_in_quorum) {
                ask.entry(o).or_default().push(b);
            }
        }
    }
    let answers = futures::future::join_all(ask.iter().map(|(o, buckets)| {
        let node = peer_node(topo, *o);
        async move { (node.ordinal, peers.buckets(&node, buckets).await) }
    }))
    .await;
    let mut records = Vec::new();
    let mut answered: BTreeMap<u32, bool> = BTreeMap::new();
    let mut why = Vec::new();
    for (o, a) in answers {
        match a {
            Ok(a) if a.epoch != topo.epoch => {
                return Err(BackupError::EpochMoved {
                    planned: topo.epoch,
                    seen: a.epoch,
                });
            }
            Ok(a) => {
                answered.insert(o, true);
                records.push(a.value);
            }
            Err(e) => why.push(e.to_string()),
        }
    }
    for b in manifest::segment_buckets(s) {
        let owners = layout.read_owners(b);
        let n = owners.iter().filter(|o| answered.contains_key(o)).count();
        if n < Consistency::Quorum.required(owners.len()) {
            return Err(BackupError::Quorum {
                bucket: b,
                answered: n,
                owners: owners.len(),
                why: if why.is_empty() {
                    "the others are not Up".into()
                } else {
                    why.join("; ")
                },
            });
        }
    }
    Ok(manifest::merge(records))
}

async fn store_segment(
    target: &Target,
    s: u32,
    records: Vec<Record>,
) -> Result<SegmentDone, BackupError> {
    let bytes = kv_core::wire::encode_records(&records);
    let entry = SegmentEntry {
        segment: s,
        object: manifest::segment_object(s),
        records: records.len() as u64,
        bytes: bytes.len() as u64,
        checksum: manifest::checksum(&bytes),
    };
    target.put(&entry.object, bytes).await?;
    Ok(SegmentDone {
        entry,
        digests: manifest::digests(&records),
        tombstones: records.iter().filter(|r| r.is_tombstone()).count() as u64,
        high_water: manifest::high_water(&records),
    })
}

/// What a restore did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub cluster_id: String,
    pub epoch: u64,
    pub backup_cluster_id: String,
    pub records: u64,
    /// Record copies applied (a record goes to every owner of its bucket).
    pub applied: u64,
    /// Of those: stored now, already held, or held newer by the target.
    pub stored: u64,
    pub already_held: u64,
    pub held_newer: u64,
    /// Bucket replicas found equal to the manifest afterwards.
    pub replicas_checked: u64,
}

/// Restores the backup at `target` into the cluster `client` reads the
/// topology of.
pub async fn restore(
    client: &impl TopologySource,
    peers: &PeerClient,
    target: &Target,
    force: bool,
) -> Result<RestoreReport, BackupError> {
    let m = read_manifest(target).await?;
    let topo = topology(client).await?;
    let not_up: Vec<String> = topo
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Up)
        .map(|n| format!("node {} is {}", n.ordinal, n.state))
        .collect();
    if !not_up.is_empty() {
        return Err(BackupError::NotUp(not_up.join(", ")));
    }
    let owners_of = manifest::restore_owners(&topo);
    let held = all_digests(peers, &topo).await?;
    let foreign = manifest::foreign_buckets(&m, &owners_of, &held);
    if let Some(example) = foreign.first().cloned()
        && !force
    {
        return Err(BackupError::NotEmpty {
            count: foreign.len(),
            example,
        });
    }
    let mut report = RestoreReport {
        cluster_id: topo.cluster_id.clone(),
        epoch: topo.epoch,
        backup_cluster_id: m.cluster_id.clone(),
        records: m.records,
        ..RestoreReport::default()
    };
    let done: Vec<Result<[u64; 3], BackupError>> = futures::stream::iter(m.segments.iter())
        .map(|entry| restore_segment(peers, target, &m, &topo, &owners_of, entry))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    for d in done {
        let [stored, had, newer] = d?;
        report.stored += stored;
        report.already_held += had;
        report.held_newer += newer;
    }
    report.applied = report.stored + report.already_held + report.held_newer;
    let held = all_digests(peers, &topo).await?;
    let bad = manifest::mismatches(&m, &owners_of, &held);
    if let Some(example) = bad.first().cloned() {
        return Err(BackupError::Mismatch {
            count: bad.len(),
            example,
        });
    }
    report.replicas_checked = (0..BUCKETS).map(|b| owners_of(b).len() as u64).sum();
    Ok(report)
}

/// The manifest of the backup at `target`.
pub async fn read_manifest(target: &Target) -> Result<Manifest, BackupError> {
    let bytes = target
        .get(MANIFEST)
        .await?
        .ok_or_else(|| BackupError::NoManifest(target.url().to_string()))?;
    Ok(Manifest::from_json(&bytes)?)
}

/// The records of one data object of the backup `m` describes, checked
/// against the manifest (checksum, then every bucket's digest) before any
/// of them is handed out.
pub async fn read_segment(
    target: &Target,
    m: &Manifest,
    entry: &SegmentEntry,
) -> Result<Vec<Record>, BackupError> {
    let bytes = target
        .get(&entry.object)
        .await?
        .ok_or_else(|| FormatError::Segment {
            object: entry.object.clone(),
            detail: "missing".into(),
        })?;
    let records = manifest::decode_segment(entry, &bytes)?;
    let got = manifest::digests(&records);
    for b in manifest::segment_buckets(entry.segment) {
        let have = got.get(&b).copied().unwrap_or(Digest::EMPTY);
        if have != m.digest(b) {
            return Err(FormatError::Segment {
                object: entry.object.clone(),
                detail: format!(
                    "bucket {b} has digest {} here and {} in the manifest",
                    have.to_hex(),
                    m.digest(b).to_hex()
                ),
            }
            .into());
        }
    }
    Ok(records)
}

/// Every node's digest table; every node must answer.
async fn all_digests(
    peers: &PeerClient,
    topo: &Topology,
) -> Result<BTreeMap<u32, Vec<Digest>>, BackupError> {
    let answers = futures::future::join_all(topo.nodes.iter().map(|n| {
        let node = peer_node(topo, n.ordinal);
        async move { (node.ordinal, peers.digests(&node).await) }
    }))
    .await;
    let mut out = BTreeMap::new();
    for (o, a) in answers {
        out.insert(o, a?.value);
    }
    Ok(out)
}

/// Applies one data object on the owners of its buckets; returns how many
/// record copies were stored, already held, or held newer.
async fn restore_segment(
    peers: &PeerClient,
    target: &Target,
    m: &Manifest,
    topo: &Topology,
    owners_of: &impl Fn(u32) -> Vec<u32>,
    entry: &SegmentEntry,
) -> Result<[u64; 3], BackupError> {
    let records = read_segment(target, m, entry).await?;
    let mut per_node: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
    for r in records {
        for o in owners_of(r.bucket()) {
            per_node.entry(o).or_default().push(r.clone());
        }
    }
    let mut counts = [0u64; 3];
    for (o, records) in per_node {
        let node = peer_node(topo, o);
        for batch in batches(&records) {
            let answer = peers.apply(&node, batch).await?;
            for outcome in answer.outcomes {
                match outcome {
                    kv_core::Applied::Stored => counts[0] += 1,
                    kv_core::Applied::Had => counts[1] += 1,
                    kv_core::Applied::Newer(_) => counts[2] += 1,
                }
            }
        }
    }
    Ok(counts)
}

/// Cuts records into apply requests of at most [`APPLY_RECORDS`] records
/// and about [`APPLY_BYTES`] bytes (a single larger record goes alone).
fn batches(records: &[Record]) -> Vec<&[Record]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, r) in records.iter().enumerate() {
        let len = r.key.len() + r.value.as_ref().map_or(0, Vec::len) + 32;
        if i > start && (i - start >= APPLY_RECORDS || size + len > APPLY_BYTES) {
            out.push(&records[start..i]);
            start = i;
            size = 0;
        }
        size += len;
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize, value_len: usize) -> Record {
        Record {
            key: format!("k{i}").into_bytes(),
            value: Some(vec![b'v'; value_len]),
            version: kv_core::Version::new(i as u64, 0),
        }
    }

    #[test]
    fn batches_cover_every_record_once_within_the_limits() {
        let small: Vec<Record> = (0..4500).map(|i| rec(i, 10)).collect();
        let b = batches(&small);
        assert_eq!(
            b.iter().map(|x| x.len()).collect::<Vec<_>>(),
            [2000, 2000, 500]
        );
        let big: Vec<Record> = (0..5).map(|i| rec(i, 3 * 1024 * 1024)).collect();
        let b = batches(&big);
        assert_eq!(b.len(), 5, "two 3 MiB values exceed one request's 4 MiB");
        assert!(batches(&[]).is_empty());
        let total: usize = batches(&small).iter().map(|x| x.len()).sum();
        assert_eq!(total, small.len());
    }
}
