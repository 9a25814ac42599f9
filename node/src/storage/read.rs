//! Reads: point reads, scans, digests, hints and counts, each on a read-only
//! connection from the pool, so under WAL no read waits for the writer.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use kv_core::{Digest, Record, Version};
use rusqlite::{Connection, OptionalExtension, params};

use super::open::{digests_from_records, open_reader};
use super::{StorageError, Store, StoreStats};

impl Store {
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let conn = {
            let mut pool = self
                .shared
                .readers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            pool.pop()
        };
        let conn = match conn {
            Some(c) => c,
            None => open_reader(&self.shared.path)?,
        };
        let out = f(&conn);
        self.shared
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        out
    }

    /// The stored record of `key`, tombstones included.
    pub fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        let cache = &self.shared.cache;
        if let Some(r) = cache.get(key) {
            return Ok(Some(r));
        }
        let ticket = cache.ticket();
        let found = self.read(|c| {
            Ok(
                c.prepare_cached("SELECT key, value, ts, node FROM records WHERE key = ?1")?
                    .query_row([key], row_to_record)
                    .optional()?,
            )
        })?;
        if let Some(r) = &found {
            cache.offer(ticket, r);
        }
        Ok(found)
    }

    /// Live keys (no tombstones) starting with `prefix`, after `after`, ascending, at most `limit`.
    pub fn list(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        self.range(prefix, after, limit, true)
    }

    /// Records (tombstones included) whose key starts with `prefix`, after
    /// `after`, ascending, at most `limit`: what a coordinator merges across
    /// replicas for a listing, so a newer tombstone hides a stale value.
    pub fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        self.range(prefix, after, limit, false)
    }

    fn range(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        live_only: bool,
    ) -> Result<Vec<Record>, StorageError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(if live_only {
                "SELECT key, value, ts, node FROM records
                 WHERE value IS NOT NULL AND key >= ?1 AND key > ?2 ORDER BY key LIMIT ?3"
            } else {
                "SELECT key, value, ts, node FROM records
                 WHERE key >= ?1 AND key > ?2 ORDER BY key LIMIT ?3"
            })?;
            let after = after.unwrap_or(&[]);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(params![prefix, after, limit], row_to_record)?;
            let mut out = Vec::new();
            for r in rows {
                let r = r?;
                if !r.key.starts_with(prefix) {
                    break;
                }
                out.push(r);
            }
            Ok(out)
        })
    }

    /// Every bucket's digest as of the last committed write (no scan).
    pub fn bucket_digests(&self) -> Result<Vec<Digest>, StorageError> {
        Ok(self
            .shared
            .digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }

    /// Every bucket's digest recomputed from the records themselves: what
    /// [`Store::bucket_digests`] must always equal.
    pub fn recompute_digests(&self) -> Result<Vec<Digest>, StorageError> {
        self.read(|c| digests_from_records(c).map(|(d, _)| d))
    }

    /// Every record of `bucket`, tombstones included, ascending by key.
    pub fn bucket_records(&self, bucket: u32) -> Result<Vec<Record>, StorageError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT key, value, ts, node FROM records WHERE bucket = ?1 ORDER BY key",
            )?;
            let rows = stmt.query_map([bucket], row_to_record)?;
            rows.map(|r| r.map_err(StorageError::from)).collect()
        })
    }

    /// Up to `limit` hints for `target`, oldest first, with their ids.
    pub fn hints_for(&self, target: u32, limit: usize) -> Result<Vec<(i64, Record)>, StorageError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, key, value, ts, node FROM hints WHERE target = ?1 ORDER BY id LIMIT ?2",
            )?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(params![target, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    Record {
                        key: r.get(1)?,
                        value: r.get(2)?,
                        version: Version::new(r.get::<_, i64>(3)? as u64, r.get(4)?),
                    },
                ))
            })?;
            rows.map(|r| r.map_err(StorageError::from)).collect()
        })
    }

    /// Number of hints waiting, per target node.
    pub fn pending_hints(&self) -> Result<BTreeMap<u32, u64>, StorageError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT target, COUNT(*) FROM hints GROUP BY target")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            rows.map(|r| r.map_err(StorageError::from)).collect()
        })
    }

    pub fn stats(&self) -> Result<StoreStats, StorageError> {
        let (keys, tombstones, db_bytes) = self.read(|c| {
            let (keys, tombstones): (i64, i64) = c.query_row(
                "SELECT COUNT(*) - COUNT(value), COUNT(value) FROM records",
                [],
                |r| Ok((r.get(1)?, r.get(0)?)),
            )?;
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let page_size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok((keys as u64, tombstones as u64, (pages * page_size) as u64))
        })?;
        Ok(StoreStats {
            keys,
            tombstones,
            db_bytes,
            commits: self.shared.commits.load(Ordering::Relaxed),
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            write_requests: self.shared.write_requests.load(Ordering::Relaxed),
            cache_hits: self.shared.cache.hits.load(Ordering::Relaxed),
        })
    }

    /// `PRAGMA integrity_check`: `Ok(())` when SQLite finds nothing wrong.
    pub fn integrity_check(&self) -> Result<(), StorageError> {
        self.read(|c| {
            let verdict: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
            if verdict == "ok" {
                Ok(())
            } else {
                Err(StorageError::Sqlite(format!("integrity check: {verdict}")))
            }
        })
    }
}

pub(super) fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        key: r.get(0)?,
        value: r.get(1)?,
        version: Version::new(r.get::<_, i64>(2)? as u64, r.get(3)?),
    })
}
