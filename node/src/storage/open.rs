//! Opening the store: the schema and its pragmas, the reader pool, the writer
//! and syncer threads, and the bucket digests rebuilt from the records (so
//! they are exact after any crash).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use kv_core::{BUCKETS, Digest, Version, bucket_of};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::mpsc;

use super::syncer::{WalFile, syncer_loop};
use super::writer::writer_loop;
use super::{DB_FILE, Shared, StorageError, Store, StoreOptions};

impl Store {
    /// Opens (creating if needed) the database in `dir` and starts the writer.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let mut writer_conn = open_conn(&path, OpenFlags::default())?;
        writer_conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // the first statement takes the process's lock on the database
        writer_conn
            .execute_batch(SCHEMA)
            .map_err(|e| locked_by_another(e, &path))?;
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
            cache: super::cache::RecordCache::new(opts.cache_bytes),
        });
        let wal = WalFile::open(&shared.path)?;
        // Replaces SQLite's automatic checkpoint on the writer's connection:
        // the checkpointer thread copies the log back instead.
        let (log_size, backlog) = super::checkpoint::start(
            shared.path.clone(),
            shared.clone(),
            opts.checkpoint_frames,
            opts.background_checkpoints,
        )?;
        writer_conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: i32| {
            log_size.committed(u32::try_from(frames).unwrap_or(0));
            Ok(())
        }))?;
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
            .spawn(move || {
                writer_loop(
                    writer_conn,
                    rx,
                    sync_tx,
                    max_batch,
                    &writer_shared,
                    &backlog,
                )
            })
            .map_err(|e| StorageError::Sqlite(format!("cannot start the writer thread: {e}")))?;
        Ok(Store { writer: tx, shared })
    }

    /// The highest version on disk when the store opened.
    pub fn max_version_at_open(&self) -> Version {
        self.shared.max_version
    }
}

/// Page size 2 KiB (set when a database is created; an existing one keeps
/// its own): a 100-byte record dirties one page in each of two B-trees per
/// write, and the log holds whole pages, so smaller pages halve the bytes
/// logged per record. No connection checkpoints on its own: the
/// checkpointer thread copies the log back (checkpoint.rs).
const SCHEMA: &str = "
PRAGMA page_size = 2048;
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA wal_autocheckpoint = 0;
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
pub(super) fn digests_from_records(
    conn: &Connection,
) -> Result<(Vec<Digest>, Version), StorageError> {
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

/// SQLite's `unix-excl` VFS for every connection of the store, so they all
/// share one wal-index: the first connection takes an exclusive lock on the
/// database file for the whole process, no other process can open the
/// database while the node runs (a second node on the same volume is refused,
/// not let in to corrupt it), and the wal-index lives in the process's memory
/// instead of a `-shm` file. Its locks are then taken in memory: under the
/// default VFS every transaction, each point read included, took and dropped
/// them with `fcntl` calls (8.6 % of a node's CPU under reads,
/// bench/profile.md). The writer's connection is opened first and read-write,
/// so it holds the process lock the read-only ones rely on.
pub(super) fn open_conn(path: &Path, flags: OpenFlags) -> Result<Connection, rusqlite::Error> {
    // before SQLite initialises, which the first open does
    super::pcache::install();
    Connection::open_with_flags_and_vfs(path, flags, "unix-excl")
}

/// Has `conn` open the write-ahead log. A connection that has read nothing
/// has not opened it, and its checkpoints report -1 pages and do nothing,
/// without an error.
pub(super) fn open_log(conn: &Connection) -> Result<(), StorageError> {
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StorageError::Sqlite(format!(
            "the database is in journal mode {mode}, not wal"
        )));
    }
    Ok(())
}

/// The error opening the database gives when another process holds it.
fn locked_by_another(e: rusqlite::Error, path: &Path) -> StorageError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StorageError::Sqlite(format!(
                "{} is in use by another process (another node on the same data directory?): {e}",
                path.display()
            ))
        }
        _ => StorageError::from(e),
    }
}

pub(super) fn open_reader(path: &Path) -> Result<Connection, StorageError> {
    let conn = open_conn(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch("PRAGMA cache_size = -8192;")?;
    Ok(conn)
}
