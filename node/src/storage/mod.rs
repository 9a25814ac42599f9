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
//! Every connection uses SQLite's `unix-excl` VFS: the process holds the
//! database exclusively and keeps the WAL index in its own memory, so no
//! other process can open the database while the node runs and no
//! transaction takes a file lock of its own.
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

mod cache;
mod checkpoint;
mod meta;
mod open;
mod pcache;
mod read;
mod syncer;
mod transaction;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use kv_core::{Digest, Version};
use rusqlite::Connection;
use tokio::sync::mpsc;

use writer::WriteRequest;

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
    /// Bytes of records read lately kept in memory for point reads.
    pub cache_bytes: usize,
    /// Size of the write-ahead log, in pages, at which the checkpointer
    /// thread copies it back into the database and has it start over.
    pub checkpoint_frames: u32,
    /// Whether a thread of its own checkpoints the log. Without it the
    /// writer does, when the log reaches four times `checkpoint_frames`
    /// (the back-pressure that bounds the log if that thread falls behind).
    pub background_checkpoints: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_batch: 512,
            readers: 4,
            observer: None,
            cache_bytes: 32 << 20,
            // 64 MiB of 2 KiB pages (bench/profile.md, seventh step)
            checkpoint_frames: 32_000,
            background_checkpoints: true,
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
    /// Point reads answered from the record cache since open.
    pub cache_hits: u64,
    /// fsyncs of the write-ahead log since open (each one acknowledges every
    /// transaction committed before it began).
    pub syncs: u64,
}

/// What the store's handles share: the reader pool, the write lock and the
/// state every writer and reader consults (one `Arc` per open store).
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
    /// Records read lately; the writer drops what it writes.
    cache: cache::RecordCache,
}

/// A handle on one node's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: mpsc::UnboundedSender<WriteRequest>,
    shared: Arc<Shared>,
}
