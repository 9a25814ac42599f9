//! Metadata writes (identity, catching_up, alive_at) and the rebuild. They
//! are rare, so each opens a connection of its own and queues on the writer's
//! write lock rather than on SQLite's busy handler.

use std::sync::atomic::Ordering;

use kv_core::BUCKETS;
use rusqlite::{Connection, OptionalExtension};

use super::{StorageError, Store};

impl Store {
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
        let conn = super::open::open_conn(&self.shared.path, rusqlite::OpenFlags::default())?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // the checkpointer thread copies the log back, not a metadata write
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")?;
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

    /// Copies the whole write-ahead log back into the database and empties
    /// the log file, so that the next start has no log to read (called at a
    /// clean shutdown; waits about 5 s at most for readers to finish).
    /// Writes after it start a new log; nothing is lost either way.
    pub fn empty_log(&self) -> Result<(), StorageError> {
        self.meta_write(|conn| {
            super::open::open_log(conn)?;
            // the checkpointer thread may be in a pass: SQLite then answers
            // "busy" at once, without waiting; a reader is waited for by the
            // busy handler. Either way, not for more than 5 s in all.
            conn.busy_timeout(std::time::Duration::from_secs(1))?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let (log, copied) = loop {
                match conn.wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::TRUNCATE)
                {
                    Err(e)
                        if std::time::Instant::now() < deadline
                            && e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    other => break other?,
                }
            };
            if log < 0 || log != copied {
                return Err(StorageError::Sqlite(format!(
                    "the log was not emptied: {copied} of {log} pages copied back"
                )));
            }
            Ok(())
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
