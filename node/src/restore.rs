//! Starting a cluster from a backup (`--restore-from`): a new store loads
//! the records of every bucket it keeps from the backup before it catches
//! up with its peers and serves.
//!
//! Each node loads only its own buckets, straight from the backup, so a
//! cluster of any size and placement restores in parallel, and no node is
//! asked to serve while it is empty. A data object is checked against the
//! manifest (checksum, bucket digests) before anything of it is applied.
//! Afterwards each bucket this node keeps must hold the backup: its digest
//! equals the manifest's, or, where a write reached it meanwhile (another
//! node may already serve), every record of the backup is held here at its
//! version or newer. Until then the store stays catching up (Recovering,
//! serving nothing), and a failed load is tried again.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use kv_backup::manifest::{Manifest, SegmentEntry, segment_buckets};
use kv_backup::target::Target;
use kv_core::{Record, Version};

use crate::cluster::View;
use crate::config::RestoreFrom;
use crate::node::Node;

/// Data objects fetched and applied at once.
const PARALLEL: usize = 2;
/// Most records in one apply.
const APPLY_CHUNK: usize = 4096;

/// What a load did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Buckets this node keeps.
    pub buckets: u64,
    /// Records of those buckets in the backup.
    pub records: u64,
    /// Of those, stored here now (the rest were held already, or newer).
    pub stored: u64,
    /// Buckets whose digest differs from the manifest's because newer
    /// writes reached them; each was checked record by record.
    pub written_since: u64,
}

impl Node {
    /// Loads the buckets this node keeps in `view` from the backup. `Ok(None)`
    /// when the topology changed meanwhile (the buckets kept may differ).
    pub(crate) async fn load_backup(
        &self,
        from: &RestoreFrom,
        view: &View,
    ) -> Result<Option<Loaded>, String> {
        let me = self.me();
        let keep: BTreeSet<u32> = (0..kv_core::BUCKETS)
            .filter(|b| view.layout.keeps(me, *b))
            .collect();
        let target = match &from.s3 {
            Some(s3) => Target::open_with(&from.url, s3),
            None => Target::open(&from.url),
        }
        .map_err(|e| e.to_string())?;
        let m = kv_backup::read_manifest(&target)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            from = %from.url,
            backup_cluster = %m.cluster_id,
            backup_epoch = m.epoch,
            records = m.records,
            buckets = keep.len(),
            "loading this node's buckets from the backup before catching up"
        );
        let wanted: Vec<SegmentEntry> = m
            .segments
            .iter()
            .filter(|e| segment_buckets(e.segment).any(|b| keep.contains(&b)))
            .cloned()
            .collect();
        let epoch = view.topology.epoch;
        let (target, m, keep) = (&target, &m, &keep);
        let mut parts = futures::stream::iter(wanted)
            .map(|entry| async move { self.load_segment(target, m, keep, &entry).await })
            .buffer_unordered(PARALLEL);
        let mut total = Loaded {
            buckets: keep.len() as u64,
            ..Loaded::default()
        };
        while let Some(part) = parts.next().await {
            let part = part?;
            total.records += part.records;
            total.stored += part.stored;
            total.written_since += part.written_since;
            if self.cluster.epoch() != epoch {
                return Ok(None);
            }
        }
        Ok(Some(total))
    }

    /// Applies the records of one data object that belong to `keep`, then
    /// checks those buckets hold the backup.
    async fn load_segment(
        &self,
        target: &Target,
        m: &Manifest,
        keep: &BTreeSet<u32>,
        entry: &SegmentEntry,
    ) -> Result<Loaded, String> {
        let records: Vec<Record> = kv_backup::read_segment(target, m, entry)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| keep.contains(&r.bucket()))
            .collect();
        let mut out = Loaded {
            records: records.len() as u64,
            ..Loaded::default()
        };
        for part in records.chunks(APPLY_CHUNK) {
            // Writes this node coordinates later must be stamped above
            // every version it holds.
            if let Some(max) = part.iter().map(|r| r.version).max() {
                self.hlc.observe(max);
            }
            let applied = self
                .store
                .apply(part.to_vec())
                .await
                .map_err(|e| e.to_string())?;
            out.stored += applied.iter().filter(|a| a.stored()).count() as u64;
        }
        let mine = self.store.bucket_digests().map_err(|e| e.to_string())?;
        let mut by_bucket: BTreeMap<u32, Vec<&Record>> = BTreeMap::new();
        for r in &records {
            by_bucket.entry(r.bucket()).or_default().push(r);
        }
        for b in segment_buckets(entry.segment).filter(|b| keep.contains(b)) {
            if mine.get(b as usize) == Some(&m.digest(b)) {
                continue;
            }
            let held: BTreeMap<Vec<u8>, Version> = self
                .store
                .bucket_records(b)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|r| (r.key, r.version))
                .collect();
            let wanted = by_bucket.get(&b).map_or(&[][..], Vec::as_slice);
            if let Some(missing) = wanted
                .iter()
                .find(|r| held.get(&r.key).is_none_or(|v| *v < r.version))
            {
                return Err(format!(
                    "bucket {b} does not hold the backup after loading it: key {:?} at {} is {}",
                    String::from_utf8_lossy(&missing.key),
                    missing.version,
                    held.get(&missing.key)
                        .map_or_else(|| "absent".to_string(), |v| format!("at {v}"))
                ));
            }
            out.written_since += 1;
        }
        Ok(out)
    }
}
