//! The checkpointer thread: copies the write-ahead log back into the database
//! on a connection of its own, so the writer never runs a checkpoint inside a
//! commit that every waiting caller waits for.
//!
//! SQLite starts the log over from its beginning only when a transaction
//! begins after a checkpoint that copied every frame. A checkpoint that runs
//! beside the writer rarely ends in that state under steady writes, so once
//! the unlocked passes have copied most of the log, a last pass runs under
//! the store's write lock: no commit can slip in, the log is then fully
//! copied, and the writer's next transaction starts it over. That last pass
//! copies only what was committed during the pass before it.
//!
//! A checkpoint starts when the log holds `checkpoint_frames` pages (32 000,
//! 64 MiB, by default): a page written many times in between is copied back
//! once. If the log reaches four times that (the checkpointer fell behind or
//! is not running), the writer checkpoints it itself before its next
//! transaction, and the callers behind it wait: the log stays bounded.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use rusqlite::{Connection, OpenFlags, wal::CheckpointMode};

use super::{Shared, StorageError};

/// An unlocked pass is repeated while more than this many frames are left,
/// at most `UNLOCKED_PASSES` times, before the locked pass.
const TAIL_FRAMES: i32 = 1_000;
const UNLOCKED_PASSES: usize = 3;

/// Times `checkpoint_frames` the log may reach before the writer stops and
/// checkpoints it itself (the checkpointer fell behind, or is not running).
const BACKLOG_FACTOR: u32 = 4;

/// What the writer's connection shares with the checkpointer: the log's size
/// after the writer's last commit, and a wake-up.
pub(super) struct LogSize {
    frames: Arc<AtomicU32>,
    start_frames: u32,
    wake: Option<SyncSender<()>>,
}

impl LogSize {
    /// Called after each commit of the writer's connection with the log's size
    /// in frames.
    pub(super) fn committed(&self, frames: u32) {
        self.frames.store(frames, Ordering::Release);
        if frames >= self.start_frames
            && let Some(wake) = &self.wake
            // a wake-up already pending is enough
            && let Err(TrySendError::Disconnected(())) = wake.try_send(())
        {
            tracing::warn!(
                "the checkpointer thread is gone; the writer copies the log back itself"
            );
        }
    }
}

/// The writer's side of back-pressure: the log has grown past what the
/// checkpointer should have let it reach.
pub(super) struct Backlog {
    frames: Arc<AtomicU32>,
    limit: u32,
}

impl Backlog {
    /// Before a transaction: when the log is over its limit, checkpoints it
    /// on the writer's connection, under the write lock, so that nothing is
    /// committed meanwhile and the next transaction starts the log over. The
    /// callers queued behind the writer wait for it: the log stays bounded.
    pub(super) fn relieve(&self, conn: &Connection, shared: &Shared) {
        if self.frames.load(Ordering::Acquire) < self.limit {
            return;
        }
        let _write = shared.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
            Ok((log, copied)) if log == copied => self.frames.store(0, Ordering::Release),
            // a reader still uses the log, or the checkpointer holds the
            // checkpoint: the next transaction tries again
            Ok(_) | Err(_) => {}
        }
    }
}

/// Starts the checkpointer on its own connection (unless `background` is
/// false: then only the writer's back-pressure copies the log back). It ends
/// when the returned `LogSize` (held by the writer's connection) is dropped.
pub(super) fn start(
    path: PathBuf,
    shared: Arc<Shared>,
    start_frames: u32,
    background: bool,
) -> Result<(LogSize, Backlog), StorageError> {
    let start_frames = start_frames.max(1);
    let frames = Arc::new(AtomicU32::new(0));
    let backlog = Backlog {
        frames: frames.clone(),
        limit: start_frames.saturating_mul(BACKLOG_FACTOR),
    };
    if !background {
        let size = LogSize {
            frames,
            start_frames,
            wake: None,
        };
        return Ok((size, backlog));
    }
    let conn = super::open::open_conn(&path, OpenFlags::default())?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    super::open::open_log(&conn)?;
    let (wake, rx) = std::sync::mpsc::sync_channel(1);
    let seen = frames.clone();
    std::thread::Builder::new()
        .name("kv-storage-ckpt".into())
        .spawn(move || checkpointer_loop(conn, rx, &seen, start_frames, &shared))
        .map_err(|e| StorageError::Sqlite(format!("cannot start the checkpoint thread: {e}")))?;
    let size = LogSize {
        frames,
        start_frames,
        wake: Some(wake),
    };
    Ok((size, backlog))
}

fn checkpointer_loop(
    conn: Connection,
    wake: Receiver<()>,
    frames: &AtomicU32,
    start_frames: u32,
    shared: &Shared,
) {
    loop {
        if wake.recv().is_err() {
            // the writer's connection is closed
            return;
        }
        if frames.load(Ordering::Acquire) < start_frames {
            continue;
        }
        for _ in 0..UNLOCKED_PASSES {
            match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
                Ok((log, copied)) if log - copied > TAIL_FRAMES => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "checkpoint of the log failed; it is retried after a later commit");
                    break;
                }
            }
        }
        let _write = shared.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
            tracing::warn!(error = %e, "checkpoint of the log failed; it is retried after a later commit");
        }
        // The writer's next commit reports the log's real size; until then
        // there is nothing more to copy.
        frames.store(0, Ordering::Release);
    }
}
