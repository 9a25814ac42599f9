//! Records read lately, kept in memory: a point read of a key found here
//! skips SQLite (its B-tree descent and page cache were a sixth of a
//! single node's CPU per read).
//!
//! What the cache holds is what SQLite holds, except while the writer
//! thread is between the start of a transaction and the moment, before any
//! of its callers hears back, when it has dropped the keys it wrote (every
//! key, after a transaction that dropped buckets or purged tombstones). A
//! counter, odd during that span, orders the two: a reader notes it before
//! it reads SQLite and keeps what it read only if, under the key's shard
//! lock, the counter is still that same even value. A record read while a
//! transaction was under way is never kept, so no reader that saw a write's
//! record from SQLite can see the record before it from the cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use kv_core::{Record, Version, bucket_of};

const SHARDS: usize = 16;
/// Bytes a cached record costs beyond its key and value (the map's slot, the
/// allocations' headers and rounding).
const OVERHEAD: usize = 96;

pub(super) struct RecordCache {
    shards: Vec<Mutex<Shard>>,
    /// Twice the transactions since open, plus one while one is under way.
    writes: AtomicU64,
    /// Each shard's share of the byte budget; a shard that would pass it is
    /// emptied first (cheaper than tracking recency on every hit).
    shard_budget: usize,
    pub(super) hits: AtomicU64,
}

#[derive(Default)]
struct Shard {
    /// Key to value (`None`: a tombstone) and version.
    records: HashMap<Vec<u8>, (Option<Vec<u8>>, Version)>,
    bytes: usize,
}

fn cost(key: &[u8], value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len) + OVERHEAD
}

impl RecordCache {
    /// A cache of at most about `budget` bytes of records (0: caches nothing).
    pub(super) fn new(budget: usize) -> RecordCache {
        RecordCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            writes: AtomicU64::new(0),
            shard_budget: budget / SHARDS,
            hits: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[bucket_of(key) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(&self, key: &[u8]) -> Option<Record> {
        let (value, version) = self.shard(key).records.get(key).cloned()?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(Record {
            key: key.to_vec(),
            value,
            version,
        })
    }

    /// Taken before reading SQLite; handed to [`RecordCache::offer`].
    pub(super) fn ticket(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Keeps `record`, read from SQLite after `ticket` was taken, if no
    /// transaction was under way or began since.
    pub(super) fn offer(&self, ticket: u64, record: &Record) {
        let c = cost(&record.key, &record.value);
        if ticket % 2 == 1 || c > self.shard_budget {
            return;
        }
        let mut shard = self.shard(&record.key);
        if self.writes.load(Ordering::SeqCst) != ticket {
            return;
        }
        if shard.bytes + c > self.shard_budget {
            shard.records.clear();
            shard.bytes = 0;
        }
        let entry = (record.value.clone(), record.version);
        if let Some((old, _)) = shard.records.insert(record.key.clone(), entry) {
            shard.bytes -= cost(&record.key, &old);
        }
        shard.bytes += c;
    }

    /// Before a transaction that may write records begins.
    pub(super) fn begin(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }

    /// After that transaction, which wrote `keys` (committed or not).
    pub(super) fn written<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        for key in keys {
            let mut shard = self.shard(key);
            if let Some((old, _)) = shard.records.remove(key) {
                shard.bytes -= cost(key, &old);
            }
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
    }

    /// After that transaction, which may have removed any record.
    pub(super) fn clear(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.records.clear();
            shard.bytes = 0;
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
}
