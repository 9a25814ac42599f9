//! Records read lately, kept in memory: a point read of a key found here
//! skips SQLite (its B-tree descent and page cache were a sixth of a
//! single node's CPU per read).
//!
//! What the cache holds is what SQLite holds. A counter, odd while the
//! writer thread has a transaction under way, orders the two. When a
//! transaction begins, the writer makes the counter odd and only then drops
//! the keys the transaction will write (every key, for a transaction that
//! drops buckets or purges tombstones), so they are gone before its commit
//! can show a newer record to any reader. A reader notes the counter before
//! it reads SQLite and keeps what it read only if, under the key's shard
//! lock, the counter is still that same even value: nothing read while a
//! transaction was under way is kept, and a record kept just before one began
//! is dropped by it. So no reader that saw a write's record from SQLite can
//! then see the record before it from the cache.

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

    /// Before a transaction that will write `keys` begins: from here on no
    /// reader keeps what it reads, and what the cache held of those keys
    /// (including a record a reader kept just before) is dropped.
    pub(super) fn begin<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        self.writes.fetch_add(1, Ordering::SeqCst);
        for key in keys {
            let mut shard = self.shard(key);
            if let Some((old, _)) = shard.records.remove(key) {
                shard.bytes -= cost(key, &old);
            }
        }
    }

    /// Before a transaction that may remove any record begins.
    pub(super) fn begin_clearing(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.records.clear();
            shard.bytes = 0;
        }
    }

    /// After that transaction (committed or not), before any of its callers
    /// hears back: readers may keep what they read again.
    pub(super) fn end(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts: u64) -> Record {
        Record {
            key: b"k".to_vec(),
            value: Some(format!("v{ts}").into_bytes()),
            version: Version::new(ts, 1),
        }
    }

    /// A record kept just before a transaction that writes its key began is
    /// gone as soon as the transaction begins: its commit may show the newer
    /// record to a reader before the writer is done, and that reader must not
    /// then find the older one here.
    #[test]
    fn a_transaction_drops_its_keys_before_it_can_commit() {
        let cache = RecordCache::new(1 << 20);
        let ticket = cache.ticket();
        cache.offer(ticket, &rec(1));
        assert_eq!(cache.get(b"k").map(|r| r.version.ts), Some(1));

        cache.begin([b"k".as_slice()].into_iter());
        assert!(
            cache.get(b"k").is_none(),
            "served the old record mid-transaction"
        );
        // nothing read while the transaction is under way is kept
        let during = cache.ticket();
        cache.offer(during, &rec(2));
        assert!(cache.get(b"k").is_none());
        cache.end();
        cache.offer(during, &rec(2));
        assert!(cache.get(b"k").is_none(), "a ticket from mid-transaction");

        let after = cache.ticket();
        cache.offer(after, &rec(2));
        assert_eq!(cache.get(b"k").map(|r| r.version.ts), Some(2));
        cache.begin_clearing();
        assert!(cache.get(b"k").is_none());
        cache.end();
    }
}
