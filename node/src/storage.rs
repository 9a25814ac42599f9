//! The node's storage engine: SQLite in WAL mode with one group-committing
//! writer and a pipelined log sync.
//!
//! Every write goes through one writer thread. It takes the first waiting
//! request, drains whatever else is queued behind it (up to a batch limit),
//! applies all of it in one transaction and commits once. The commit appends
//! the transaction's pages to the write-ahead log (`synchronous=NORMAL`: no
//! fsync inside the commit); a second thread, the syncer, then fsyncs the log
//! and only after that answers every request of every transaction committed
//! before the fsync began. So no caller hears "done" before its write is on
//! stable storage, and the writer builds and commits the next transaction
//! while the previous one's fsync is in flight: the disk's fsync latency is
//! shared by everything that arrived meanwhile instead of being paid in turn.
//! (A committed but not yet synced transaction is visible to readers; it was
//! not acknowledged, and a power loss may undo it, like any write that failed
//! on its way.) If an fsync fails, nothing after it can be promised durable:
//! the store refuses every later write until the node is restarted.
//!
//! Readers use their own connections and, under WAL, never wait for the writer.
//!
//! Each bucket's digest (the sum of its entries' (key, version) digests) is
//! kept in memory: the writer, the only thread that changes records, updates
//! it (subtract the old entry, add the new one) once the transaction that
//! changed the bucket has committed, so replicas compare buckets without
//! scanning. It is not stored: opening the store recomputes it from the
//! records (a scan of keys and versions, about a second per million keys),
//! which makes it exact after any crash and keeps four statements and a page
//! write per record out of every transaction. Hints (writes waiting for another
//! node) live in their own table and are as durable as records.
//! [`Store::apply`] is last-writer-wins apply-if-newer: the primitive that the
//! coordinator, hinted handoff, read repair and anti-entropy all call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kv_core::{Applied, BUCKETS, CreateVote, Digest, Record, Version, bucket_of};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "kv.sqlite3";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("the disk is full: {0}")]
    DiskFull(String),
    #[error("storage error: {0}")]
    Sqlite(String),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the storage writer has stopped")]
    Closed,
    #[error("data directory belongs to node {stored}, not node {requested}")]
    WrongIdentity { stored: String, requested: String },
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StorageError::DiskFull(e.to_string()),
            _ => StorageError::Sqlite(e.to_string()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most write requests one transaction takes.
    pub max_batch: usize,
    /// Read connections kept open.
    pub readers: usize,
    /// Told about every committed transaction (for metrics).
    pub observer: Option<CommitObserver>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_batch: 512,
            readers: 4,
            observer: None,
        }
    }
}

/// A callback run after each log sync with the number of write requests it
/// made durable (those of every transaction committed since the previous
/// sync) and how long the fsync took.
#[derive(Clone)]
pub struct CommitObserver(pub Arc<dyn Fn(usize, std::time::Duration) + Send + Sync>);

impl std::fmt::Debug for CommitObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitObserver")
    }
}

/// Counts of what the store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub keys: u64,
    pub tombstones: u64,
    pub db_bytes: u64,
    /// Transactions committed by the writer since open.
    pub commits: u64,
    /// Write requests those transactions carried.
    pub write_requests: u64,
    /// fsyncs of the write-ahead log since open (each one acknowledges every
    /// transaction committed before it began).
    pub syncs: u64,
}

enum WriteOp {
    Apply(Vec<Record>),
    AddHints(Vec<(u32, Record)>),
    DeleteHints(Vec<i64>),
    DropBuckets(Vec<u32>),
    PurgeTombstones { bucket: u32, older_than: Version },
    Promise { key: Vec<u8>, ballot: Version },
    Accept(Record),
}

enum WriteDone {
    Applied(Vec<Applied>),
    Count(u64),
    Vote(CreateVote),
}

struct WriteRequest {
    op: WriteOp,
    done: oneshot::Sender<Result<WriteDone, StorageError>>,
}

struct Shared {
    readers: Mutex<Vec<Connection>>,
    /// Held by every write transaction of this process: the writer's and the
    /// metadata writes on their own connections. SQLite's busy handler polls
    /// with sleeps of up to 100 ms, so a writer waiting on it can miss every
    /// window a busy neighbour leaves and fail "database is locked" after
    /// its timeout (seen in CI); queueing on a mutex hands the lock over.
    write_lock: Mutex<()>,
    /// Every bucket's digest as of the last committed transaction.
    digests: Mutex<Vec<Digest>>,
    path: PathBuf,
    commits: AtomicU64,
    write_requests: AtomicU64,
    syncs: AtomicU64,
    /// Set when an fsync of the log failed: the kernel may have dropped the
    /// unsynced pages, so no later write can be promised durable.
    poisoned: AtomicBool,
    /// The store may lack records its owner should hold (it is new, or was
    /// rebuilt): it serves no reads until a full catch-up clears this
    /// (SPEC §3, store identity). Persisted as the meta row `catching_up`.
    catching_up: AtomicBool,
    /// The highest record or hint version on disk when the store opened: the
    /// clock starts above it.
    max_version: Version,
}

/// A handle on one node's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: mpsc::UnboundedSender<WriteRequest>,
    shared: Arc<Shared>,
}

impl Store {
    /// Opens (creating if needed) the database in `dir` and starts the writer.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let writer_conn = Connection::open(&path)?;
        writer_conn.busy_timeout(std::time::Duration::from_secs(5))?;
        writer_conn.execute_batch(SCHEMA)?;
        let (digests, max_version) = digests_from_records(&writer_conn)?;
        let max_hint: Option<(i64, u32)> = writer_conn
            .query_row(
                "SELECT ts, node FROM hints ORDER BY ts DESC, node DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let max_version = max_hint
            .map(|(ts, node)| Version::new(ts as u64, node))
            .map_or(max_version, |h| h.max(max_version));
        let meta = |name: &str| -> Result<Option<String>, StorageError> {
            Ok(writer_conn
                .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?)
        };
        // Set when the store claimed its identity (it was new) or was rebuilt,
        // cleared by a full catch-up; a store that has never joined a cluster
        // is the only copy of its data and has nothing to catch up with.
        let catching_up = meta("catching_up")?.is_some();
        let mut readers = Vec::with_capacity(opts.readers.max(1));
        for _ in 0..opts.readers.max(1) {
            readers.push(open_reader(&path)?);
        }
        let shared = Arc::new(Shared {
            readers: Mutex::new(readers),
            write_lock: Mutex::new(()),
            digests: Mutex::new(digests),
            path,
            commits: AtomicU64::new(0),
            write_requests: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            catching_up: AtomicBool::new(catching_up),
            max_version,
        });
        let wal = WalFile::open(&shared.path)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (sync_tx, sync_rx) = std::sync::mpsc::channel();
        let writer_shared = shared.clone();
        let syncer_shared = shared.clone();
        let max_batch = opts.max_batch.max(1);
        let observer = opts.observer.clone();
        std::thread::Builder::new()
            .name("kv-storage-sync".into())
            .spawn(move || syncer_loop(wal, sync_rx, &syncer_shared, observer))
            .map_err(|e| StorageError::Sqlite(format!("cannot start the sync thread: {e}")))?;
        std::thread::Builder::new()
            .name("kv-storage-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, sync_tx, max_batch, &writer_shared))
            .map_err(|e| StorageError::Sqlite(format!("cannot start the writer thread: {e}")))?;
        Ok(Store { writer: tx, shared })
    }

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

    fn read<T>(
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
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT key, value, ts, node FROM records WHERE key = ?1")?
                    .query_row([key], row_to_record)
                    .optional()?,
            )
        })
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

    /// The highest version on disk when the store opened.
    pub fn max_version_at_open(&self) -> Version {
        self.shared.max_version
    }

    /// Whether the store may lack records it should hold (new, or rebuilt)
    /// and must not serve reads until a full catch-up.
    pub fn catching_up(&self) -> bool {
        self.shared.catching_up.load(Ordering::Acquire)
    }

    /// Records that a full catch-up completed: the store holds its data.
    pub fn mark_caught_up(&self) -> Result<(), StorageError> {
        if !self.catching_up() {
            return Ok(());
        }
        self.meta_write(|conn| {
            conn.execute("DELETE FROM meta WHERE name = 'catching_up'", [])?;
            Ok(())
        })?;
        self.shared.catching_up.store(false, Ordering::Release);
        Ok(())
    }

    /// When the store was last known to be in contact with its cluster (ms
    /// since the Unix epoch), if ever recorded.
    pub fn alive_at(&self) -> Result<Option<u64>, StorageError> {
        let conn = self.meta_conn()?;
        let v: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE name = 'alive_at'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(v.and_then(|v| v.parse().ok()))
    }

    /// Records that the store is in contact with its cluster now.
    pub fn touch_alive(&self, now_ms: u64) -> Result<(), StorageError> {
        self.meta_write(|conn| {
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('alive_at', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                [now_ms.to_string()],
            )?;
            Ok(())
        })
    }

    /// Empties a store that may hold data its cluster has since deleted for
    /// good (older than the tombstone grace period): it is rebuilt from its
    /// co-owners like a new one, so nothing deleted comes back.
    pub async fn rebuild(&self) -> Result<u64, StorageError> {
        self.meta_write(|conn| {
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('catching_up', 'rebuild')
                 ON CONFLICT (name) DO NOTHING",
                [],
            )?;
            Ok(())
        })?;
        self.shared.catching_up.store(true, Ordering::Release);
        let n = self.drop_buckets((0..BUCKETS).collect()).await?;
        let ids: Vec<i64> = self.read(|c| {
            let mut stmt = c.prepare("SELECT id FROM hints")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.map(|r| r.map_err(StorageError::from)).collect()
        })?;
        self.delete_hints(ids).await?;
        Ok(n)
    }

    fn meta_conn(&self) -> Result<Connection, StorageError> {
        let conn = Connection::open(&self.shared.path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }

    /// Runs a metadata write on a connection of its own, under the write
    /// lock the writer thread takes for each of its transactions.
    fn meta_write<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let mut conn = self.meta_conn()?;
        let _write = self
            .shared
            .write_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
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

    /// Records which cluster and ordinal this data directory belongs to, or
    /// refuses when it already belongs to another ordinal: a node keeps its
    /// identity on its volume and never takes over another node's data.
    pub fn claim_identity(&self, cluster_id: &str, ordinal: u32) -> Result<(), StorageError> {
        self.meta_write(|conn| self.claim_identity_on(conn, cluster_id, ordinal))
    }

    fn claim_identity_on(
        &self,
        conn: &mut Connection,
        cluster_id: &str,
        ordinal: u32,
    ) -> Result<(), StorageError> {
        let requested = format!("{cluster_id}/{ordinal}");
        let stored: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE name = 'identity'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match stored {
            Some(s) if s == requested => Ok(()),
            Some(stored) => Err(StorageError::WrongIdentity { stored, requested }),
            None => {
                // A new store joins catching up, and stays so across restarts
                // until a full catch-up clears it.
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                tx.execute(
                    "INSERT INTO meta (name, value) VALUES ('identity', ?1)",
                    [&requested],
                )?;
                tx.execute(
                    "INSERT INTO meta (name, value) VALUES ('catching_up', 'new')
                     ON CONFLICT (name) DO NOTHING",
                    [],
                )?;
                tx.commit()?;
                self.shared.catching_up.store(true, Ordering::Release);
                Ok(())
            }
        }
    }
}

/// Page size 2 KiB (set when a database is created; an existing one keeps
/// its own): a 100-byte record dirties one page in each of two B-trees per
/// write, and the log holds whole pages, so smaller pages halve the bytes
/// logged per record. The log is checkpointed every 8 000 pages (16 MiB)
/// rather than SQLite's 1 000: a page written many times between checkpoints
/// is copied back once. Measured in bench/profile.md: 2 KiB + 8 000 wrote
/// 35 % fewer bytes and took ~20 % more writes/s than 4 KiB + 1 000 on the
/// 3-node write benchmark.
const SCHEMA: &str = "
PRAGMA page_size = 2048;
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA wal_autocheckpoint = 8000;
PRAGMA cache_size = -32768;
CREATE TABLE IF NOT EXISTS records (
    key    BLOB PRIMARY KEY,
    value  BLOB,
    ts     INTEGER NOT NULL,
    node   INTEGER NOT NULL,
    bucket INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_bucket ON records (bucket, key);
-- digests were stored here before they were kept in memory
DROP TABLE IF EXISTS buckets;
CREATE TABLE IF NOT EXISTS hints (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    target INTEGER NOT NULL,
    key    BLOB NOT NULL,
    value  BLOB,
    ts     INTEGER NOT NULL,
    node   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS hints_by_target ON hints (target, id);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
-- the highest ballot each key's create-only writes were promised (phase one);
-- a row goes when its create is stored here, or with the bucket's tombstones
CREATE TABLE IF NOT EXISTS promises (
    key    BLOB PRIMARY KEY,
    ts     INTEGER NOT NULL,
    node   INTEGER NOT NULL,
    bucket INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS promises_by_bucket ON promises (bucket);
";

/// Every bucket's digest, from a scan of the records' keys and versions.
/// Also returns the highest version among them.
fn digests_from_records(conn: &Connection) -> Result<(Vec<Digest>, Version), StorageError> {
    let mut out = vec![Digest::EMPTY; BUCKETS as usize];
    let mut max = Version::ZERO;
    let mut stmt = conn.prepare("SELECT key, ts, node FROM records")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let key = row
            .get_ref(0)?
            .as_blob()
            .map_err(|e| StorageError::Sqlite(format!("a record's key is not a blob: {e}")))?;
        let version = Version::new(row.get::<_, i64>(1)? as u64, row.get(2)?);
        if let Some(slot) = out.get_mut(bucket_of(key) as usize) {
            slot.add(kv_core::record::entry_digest(key, version));
        }
        max = max.max(version);
    }
    Ok((out, max))
}

fn open_reader(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch("PRAGMA cache_size = -8192;")?;
    Ok(conn)
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        key: r.get(0)?,
        value: r.get(1)?,
        version: Version::new(r.get::<_, i64>(2)? as u64, r.get(3)?),
    })
}

/// A committed transaction's callers, waiting for the log sync.
struct Committed {
    requests: Vec<(oneshot::Sender<Result<WriteDone, StorageError>>, WriteDone)>,
    /// Whether the transaction changed any row (appended anything to the log).
    wrote: bool,
}

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<WriteRequest>,
    syncer: std::sync::mpsc::Sender<Committed>,
    max_batch: usize,
    shared: &Shared,
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
        let ops: Vec<&WriteOp> = batch.iter().map(|r| &r.op).collect();
        let changes_before = conn.total_changes();
        let committed = {
            let _write = shared.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            commit_batch(&mut conn, &shared.digests, &ops)
        };
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

fn poisoned_error() -> StorageError {
    StorageError::Sqlite(
        "an fsync of the write-ahead log failed earlier, so no write can be made durable; restart the node"
            .into(),
    )
}

/// Makes committed transactions durable, in commit order, and only then
/// answers their callers: each fsync covers every transaction the writer
/// committed before it began.
fn syncer_loop(
    mut wal: WalFile,
    rx: std::sync::mpsc::Receiver<Committed>,
    shared: &Shared,
    observer: Option<CommitObserver>,
) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let requests: usize = group.iter().map(|c| c.requests.len()).sum();
        // A group of transactions that changed nothing needs no fsync: every
        // earlier transaction was in an earlier group, synced before this
        // one's callers are answered (an "already have it" answer must not
        // overtake the sync of the write it refers to, and does not).
        let wrote = group.iter().any(|c| c.wrote);
        let started = std::time::Instant::now();
        let synced = if shared.poisoned.load(Ordering::Acquire) {
            Err(poisoned_error())
        } else if wrote {
            wal.sync()
        } else {
            Ok(())
        };
        match synced {
            Ok(()) => {
                if wrote {
                    shared.syncs.fetch_add(1, Ordering::Relaxed);
                    if let Some(o) = &observer {
                        (o.0)(requests, started.elapsed());
                    }
                }
                for c in group {
                    for (done, result) in c.requests {
                        let _ = done.send(Ok(result));
                    }
                }
            }
            Err(e) => {
                if !shared.poisoned.swap(true, Ordering::AcqRel) {
                    tracing::error!(error = %e, requests, "fsync of the write-ahead log failed; refusing every write from now on (restart the node)");
                }
                for c in group {
                    for (done, _) in c.requests {
                        let _ = done.send(Err(poisoned_error()));
                    }
                }
            }
        }
    }
}

/// The database's write-ahead log, opened by the syncer to fsync it. SQLite
/// keeps the file (and its inode) while any of its connections is open, and
/// the writer's always is; if the file were ever replaced all the same, the
/// syncer could not vouch for what it held and fails the sync.
struct WalFile {
    path: PathBuf,
    file: std::fs::File,
    ino: u64,
}

impl WalFile {
    fn open(db: &Path) -> Result<WalFile, StorageError> {
        use std::os::unix::fs::MetadataExt;
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        let path = PathBuf::from(path);
        let file = std::fs::File::open(&path)
            .map_err(|e| StorageError::Sqlite(format!("cannot open {}: {e}", path.display())))?;
        let ino = file
            .metadata()
            .map_err(|e| StorageError::Sqlite(format!("cannot stat {}: {e}", path.display())))?
            .ino();
        // the log's directory entry must survive a power loss too
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StorageError::Sqlite(format!("cannot sync {}: {e}", dir.display())))?;
        }
        Ok(WalFile { path, file, ino })
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(m) if m.ino() == self.ino => {}
            other => {
                return Err(StorageError::Sqlite(format!(
                    "{} was removed or replaced while the node had it open ({:?}, inode was {})",
                    self.path.display(),
                    other.map(|m| m.ino()),
                    self.ino
                )));
            }
        }
        self.file
            .sync_data()
            .map_err(|e| StorageError::Sqlite(format!("fsync {}: {e}", self.path.display())))
    }
}

/// The digests a transaction changed: (bucket, digest after it).
type DigestChanges = Vec<(u32, Digest)>;

/// Applies every request of a batch in one transaction; all or nothing.
/// Returns the answers and the bucket digests the transaction changed (read
/// from `current`, the digests as of the previous transaction, which only
/// this writer changes).
fn commit_batch(
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
