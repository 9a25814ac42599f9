//! One write transaction: a whole batch applied all or nothing, and the
//! bucket digests it changes (the writer publishes them once it commits).

use std::collections::BTreeMap;
use std::sync::Mutex;

use kv_core::{Applied, CreateVote, Digest, Record, Version, bucket_of};
use rusqlite::{Connection, OptionalExtension, params};

use super::StorageError;
use super::read::row_to_record;
use super::writer::{WriteDone, WriteOp};

/// The digests a transaction changed: (bucket, digest after it).
type DigestChanges = Vec<(u32, Digest)>;

/// Applies every request of a batch in one transaction; all or nothing.
/// Returns the answers and the bucket digests the transaction changed (read
/// from `current`, the digests as of the previous transaction, which only
/// this writer changes).
pub(super) fn commit_batch(
    conn: &mut Connection,
    current: &Mutex<Vec<Digest>>,
    ops: &[&WriteOp],
) -> Result<(Vec<WriteDone>, DigestChanges), StorageError> {
    // IMMEDIATE: the transaction reads each key's version before it writes,
    // and a deferred one that read before another connection (the meta
    // writes: identity, alive_at) committed cannot upgrade to a writer; SQLite
    // then answers SQLITE_BUSY at once, without the busy timeout, and every
    // request of the batch failed with "database is locked". Taking the write
    // lock first waits (busy timeout) instead.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // bucket digests touched by this transaction: as it found them, and as it leaves them
    let mut digests = Touched {
        current,
        touched: BTreeMap::new(),
    };
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        results.push(match op {
            WriteOp::Apply(records) => {
                WriteDone::Applied(records.iter().map(|r| apply_one(&tx, &mut digests, r)).collect::<Result<_, _>>()?)
            }
            WriteOp::AddHints(hints) => {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO hints (target, key, value, ts, node) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (target, r) in hints {
                    stmt.execute(params![target, r.key, r.value, r.version.ts as i64, r.version.node])?;
                }
                WriteDone::Count(hints.len() as u64)
            }
            WriteOp::DeleteHints(ids) => {
                let mut stmt = tx.prepare_cached("DELETE FROM hints WHERE id = ?1")?;
                let mut n = 0;
                for id in ids {
                    n += stmt.execute([id])? as u64;
                }
                WriteDone::Count(n)
            }
            WriteOp::DropBuckets(buckets) => {
                let mut n = 0;
                for b in buckets {
                    tx.execute("DELETE FROM promises WHERE bucket = ?1", [b])?;
                    n += tx.execute("DELETE FROM records WHERE bucket = ?1", [b])? as u64;
                    *digests.of(*b) = Digest::EMPTY;
                }
                WriteDone::Count(n)
            }
            WriteOp::PurgeTombstones { bucket, older_than } => {
                let mut doomed = Vec::new();
                {
                    let mut stmt = tx.prepare_cached(
                        "SELECT key, value, ts, node FROM records WHERE bucket = ?1 AND value IS NULL",
                    )?;
                    for r in stmt.query_map([bucket], row_to_record)? {
                        let r = r?;
                        if r.version < *older_than {
                            doomed.push(r);
                        }
                    }
                }
                // A promise this old belongs to a create whose leader gave up
                // long ago (a create's steps time out in seconds).
                tx.execute(
                    "DELETE FROM promises WHERE bucket = ?1 AND (ts < ?2 OR (ts = ?2 AND node < ?3))",
                    params![bucket, older_than.ts as i64, older_than.node],
                )?;
                let digest = digests.of(*bucket);
                for r in &doomed {
                    tx.execute("DELETE FROM records WHERE key = ?1", [&r.key])?;
                    digest.remove(r.digest());
                }
                WriteDone::Count(doomed.len() as u64)
            }
            WriteOp::Promise { key, ballot } => WriteDone::Vote(promise_one(&tx, key, *ballot)?),
            WriteOp::Accept(record) => WriteDone::Vote(accept_one(&tx, &mut digests, record)?),
        });
    }
    tx.commit()?;
    let changed = digests
        .touched
        .into_iter()
        .filter(|(_, (was, now))| was != now)
        .map(|(b, (_, now))| (b, now))
        .collect();
    Ok((results, changed))
}

fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    digests: &mut Touched<'_>,
    r: &Record,
) -> Result<Applied, StorageError> {
    let stored: Option<Version> = tx
        .prepare_cached("SELECT ts, node FROM records WHERE key = ?1")?
        .query_row([&r.key], |row| {
            Ok(Version::new(row.get::<_, i64>(0)? as u64, row.get(1)?))
        })
        .optional()?;
    let outcome = Applied::of(r.version, stored);
    if outcome != Applied::Stored {
        return Ok(outcome);
    }
    let bucket = bucket_of(&r.key);
    tx.prepare_cached(
        "INSERT INTO records (key, value, ts, node, bucket) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, ts = excluded.ts, node = excluded.node",
    )?
    .execute(params![r.key, r.value, r.version.ts as i64, r.version.node, bucket])?;
    let digest = digests.of(bucket);
    if let Some(old) = stored {
        digest.remove(kv_core::record::entry_digest(&r.key, old));
    }
    digest.add(r.digest());
    Ok(Applied::Stored)
}

/// The stored version of `key` and whether it is live (not a tombstone).
fn stored_state(
    tx: &rusqlite::Transaction<'_>,
    key: &[u8],
) -> Result<Option<(Version, bool)>, StorageError> {
    Ok(tx
        .prepare_cached("SELECT ts, node, value IS NOT NULL FROM records WHERE key = ?1")?
        .query_row([key], |row| {
            Ok((
                Version::new(row.get::<_, i64>(0)? as u64, row.get(1)?),
                row.get::<_, bool>(2)?,
            ))
        })
        .optional()?)
}

fn promised(tx: &rusqlite::Transaction<'_>, key: &[u8]) -> Result<Option<Version>, StorageError> {
    Ok(tx
        .prepare_cached("SELECT ts, node FROM promises WHERE key = ?1")?
        .query_row([key], |row| {
            Ok(Version::new(row.get::<_, i64>(0)? as u64, row.get(1)?))
        })
        .optional()?)
}

/// Phase one of a create (see [`CreateVote`]).
fn promise_one(
    tx: &rusqlite::Transaction<'_>,
    key: &[u8],
    ballot: Version,
) -> Result<CreateVote, StorageError> {
    match stored_state(tx, key)? {
        Some((v, true)) => return Ok(CreateVote::Live(v)),
        Some((v, false)) if v >= ballot => return Ok(CreateVote::Newer(v)),
        _ => {}
    }
    match promised(tx, key)? {
        Some(p) if p > ballot => return Ok(CreateVote::Promised(p)),
        Some(p) if p == ballot => return Ok(CreateVote::Granted),
        _ => {}
    }
    tx.prepare_cached(
        "INSERT INTO promises (key, ts, node, bucket) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (key) DO UPDATE SET ts = excluded.ts, node = excluded.node",
    )?
    .execute(params![key, ballot.ts as i64, ballot.node, bucket_of(key)])?;
    Ok(CreateVote::Granted)
}

/// Phase two of a create (see [`CreateVote`]).
fn accept_one(
    tx: &rusqlite::Transaction<'_>,
    digests: &mut Touched<'_>,
    record: &Record,
) -> Result<CreateVote, StorageError> {
    let ballot = record.version;
    match stored_state(tx, &record.key)? {
        Some((v, _)) if v == ballot => return Ok(CreateVote::Had),
        Some((v, true)) => return Ok(CreateVote::Live(v)),
        Some((v, false)) if v > ballot => return Ok(CreateVote::Newer(v)),
        _ => {}
    }
    let promise = promised(tx, &record.key)?;
    if promise != Some(ballot) {
        return Ok(CreateVote::Promised(promise.unwrap_or(Version::ZERO)));
    }
    apply_one(tx, digests, record)?;
    tx.prepare_cached("DELETE FROM promises WHERE key = ?1")?
        .execute([&record.key])?;
    Ok(CreateVote::Granted)
}

/// The bucket digests one transaction has touched.
struct Touched<'a> {
    /// Every bucket's digest before the transaction.
    current: &'a Mutex<Vec<Digest>>,
    /// Touched buckets: (digest before, digest so far).
    touched: BTreeMap<u32, (Digest, Digest)>,
}

impl Touched<'_> {
    /// `bucket`'s digest as the transaction has left it so far.
    fn of(&mut self, bucket: u32) -> &mut Digest {
        let current = self.current;
        let entry = self.touched.entry(bucket).or_insert_with(|| {
            let d = current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(bucket as usize)
                .copied()
                .unwrap_or(Digest::EMPTY);
            (d, d)
        });
        &mut entry.1
    }
}
