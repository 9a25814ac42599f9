//! The writer thread: the one thread that writes records and hints. It takes
//! queued requests in batches, commits each batch as one transaction under
//! the write lock, and hands the callers to the syncer.

use std::sync::atomic::Ordering;

use kv_core::{Applied, CreateVote, Record, Version};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::syncer::{Committed, poisoned_error};
use super::transaction::commit_batch;
use super::{Shared, StorageError, Store};

pub(super) enum WriteOp {
    Apply(Vec<Record>),
    AddHints(Vec<(u32, Record)>),
    DeleteHints(Vec<i64>),
    DropBuckets(Vec<u32>),
    PurgeTombstones { bucket: u32, older_than: Version },
    Promise { key: Vec<u8>, ballot: Version },
    Accept(Record),
}

pub(super) enum WriteDone {
    Applied(Vec<Applied>),
    Count(u64),
    Vote(CreateVote),
}

pub(super) struct WriteRequest {
    op: WriteOp,
    done: oneshot::Sender<Result<WriteDone, StorageError>>,
}

impl Store {
    async fn write(&self, op: WriteOp) -> Result<WriteDone, StorageError> {
        let (done, rx) = oneshot::channel();
        self.writer
            .send(WriteRequest { op, done })
            .map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Last-writer-wins apply-if-newer. Returns, per record, what it did
    /// (stored it, had it, or holds a newer version). Durable (fsync'd) when
    /// it returns.
    pub async fn apply(&self, records: Vec<Record>) -> Result<Vec<Applied>, StorageError> {
        match self.write(WriteOp::Apply(records)).await? {
            WriteDone::Applied(v) => Ok(v),
            _ => Err(StorageError::Sqlite(
                "writer answered the wrong request".into(),
            )),
        }
    }

    /// Stores hints: writes that node `target` has still to receive.
    pub async fn add_hints(&self, hints: Vec<(u32, Record)>) -> Result<(), StorageError> {
        self.write(WriteOp::AddHints(hints)).await.map(|_| ())
    }

    /// Forgets delivered hints.
    pub async fn delete_hints(&self, ids: Vec<i64>) -> Result<(), StorageError> {
        self.write(WriteOp::DeleteHints(ids)).await.map(|_| ())
    }

    /// Removes every record of `buckets` (after this node stopped owning them).
    pub async fn drop_buckets(&self, buckets: Vec<u32>) -> Result<u64, StorageError> {
        self.count_op(WriteOp::DropBuckets(buckets)).await
    }

    /// Removes tombstones of `bucket` older than `older_than`. The caller makes
    /// sure every owner holds them first (SPEC §2).
    pub async fn purge_tombstones(
        &self,
        bucket: u32,
        older_than: Version,
    ) -> Result<u64, StorageError> {
        self.count_op(WriteOp::PurgeTombstones { bucket, older_than })
            .await
    }

    async fn count_op(&self, op: WriteOp) -> Result<u64, StorageError> {
        match self.write(op).await? {
            WriteDone::Count(n) => Ok(n),
            _ => Err(StorageError::Sqlite(
                "writer answered the wrong request".into(),
            )),
        }
    }

    /// Phase one of a create-only write of `key` (see [`CreateVote`]):
    /// promises to accept no create of the key below `ballot`, unless the
    /// key holds a live value or a higher promise. Durable when it returns.
    pub async fn promise(&self, key: Vec<u8>, ballot: Version) -> Result<CreateVote, StorageError> {
        self.vote_op(WriteOp::Promise { key, ballot }).await
    }

    /// Phase two of a create-only write: stores `record` (its version is the
    /// ballot) only under the promise of that ballot and while the key holds
    /// no live value; the promise is then spent. Durable when it returns.
    pub async fn accept(&self, record: Record) -> Result<CreateVote, StorageError> {
        self.vote_op(WriteOp::Accept(record)).await
    }

    async fn vote_op(&self, op: WriteOp) -> Result<CreateVote, StorageError> {
        match self.write(op).await? {
            WriteDone::Vote(v) => Ok(v),
            _ => Err(StorageError::Sqlite(
                "writer answered the wrong request".into(),
            )),
        }
    }
}

pub(super) fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<WriteRequest>,
    syncer: std::sync::mpsc::Sender<Committed>,
    max_batch: usize,
    shared: &Shared,
    backlog: &super::checkpoint::Backlog,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        if shared.poisoned.load(Ordering::Acquire) {
            for req in batch {
                let _ = req.done.send(Err(poisoned_error()));
            }
            continue;
        }
        backlog.relieve(&conn, shared);
        let ops: Vec<&WriteOp> = batch.iter().map(|r| &r.op).collect();
        let changes_before = conn.total_changes();
        begin_in_cache(&shared.cache, &ops);
        let committed = {
            let _write = shared.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            commit_batch(&mut conn, &shared.digests, &ops)
        };
        // Before any caller hears back, committed or not.
        shared.cache.end();
        match committed {
            Ok((results, changed)) => {
                if !changed.is_empty() {
                    let mut digests = shared.digests.lock().unwrap_or_else(|p| p.into_inner());
                    for (bucket, d) in changed {
                        if let Some(slot) = digests.get_mut(bucket as usize) {
                            *slot = d;
                        }
                    }
                }
                shared.commits.fetch_add(1, Ordering::Relaxed);
                shared
                    .write_requests
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                let requests = batch.into_iter().map(|r| r.done).zip(results).collect();
                let wrote = conn.total_changes() != changes_before;
                if let Err(std::sync::mpsc::SendError(c)) =
                    syncer.send(Committed { requests, wrote })
                {
                    // the syncer is gone: nothing can be made durable
                    for (done, _) in c.requests {
                        let _ = done.send(Err(StorageError::Closed));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = batch.len(), "write transaction failed; nothing in it was stored");
                for req in batch {
                    let err = match &e {
                        StorageError::DiskFull(m) => StorageError::DiskFull(m.clone()),
                        StorageError::Sqlite(m) => StorageError::Sqlite(m.clone()),
                        other => StorageError::Sqlite(other.to_string()),
                    };
                    let _ = req.done.send(Err(err));
                }
            }
        }
    }
}

/// Starts a transaction of `ops` in the record cache: drops what they may
/// change, before the transaction can commit.
fn begin_in_cache(cache: &super::cache::RecordCache, ops: &[&WriteOp]) {
    let any = ops.iter().any(|op| {
        matches!(
            op,
            WriteOp::DropBuckets(_) | WriteOp::PurgeTombstones { .. }
        )
    });
    if any {
        return cache.begin_clearing();
    }
    let keys = ops.iter().flat_map(|op| {
        let (many, one): (&[Record], Option<&Record>) = match op {
            WriteOp::Apply(records) => (records, None),
            WriteOp::Accept(record) => (&[], Some(record)),
            _ => (&[], None),
        };
        many.iter().chain(one).map(|r| r.key.as_slice())
    });
    cache.begin(keys);
}
