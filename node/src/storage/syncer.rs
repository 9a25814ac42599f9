//! The syncer thread: fsyncs the write-ahead log after the writer commits and
//! only then answers the callers, so the writer builds the next transaction
//! while the fsync is in flight.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::writer::WriteDone;
use super::{CommitObserver, Shared, StorageError};

/// A committed transaction's callers, waiting for the log sync.
pub(super) struct Committed {
    pub(super) requests: Vec<(oneshot::Sender<Result<WriteDone, StorageError>>, WriteDone)>,
    /// Whether the transaction changed any row (appended anything to the log).
    pub(super) wrote: bool,
}

pub(super) fn poisoned_error() -> StorageError {
    StorageError::Sqlite(
        "an fsync of the write-ahead log failed earlier, so no write can be made durable; restart the node"
            .into(),
    )
}

/// Makes committed transactions durable, in commit order, and only then
/// answers their callers: each fsync covers every transaction the writer
/// committed before it began.
pub(super) fn syncer_loop(
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
pub(super) struct WalFile {
    path: PathBuf,
    file: std::fs::File,
    ino: u64,
}

impl WalFile {
    pub(super) fn open(db: &Path) -> Result<WalFile, StorageError> {
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
        // Only the inode number is asked for. Reading the change time (a
        // plain `stat`) makes a kernel with multigrain timestamps (6.13 and
        // later) stamp the next write with a fine-grained time; here that
        // made 82 % of the `fdatasync`s write the inode too, one more I/O
        // to wait for (bench/profile.md, tenth step).
        use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
        use rustix::io::Errno;
        use std::os::unix::fs::MetadataExt;
        let ino = match statx(CWD, &self.path, AtFlags::empty(), StatxFlags::INO) {
            Ok(m) if StatxFlags::from_bits_retain(m.stx_mask).contains(StatxFlags::INO) => {
                Ok(m.stx_ino)
            }
            // a kernel or seccomp profile without statx, or a filesystem
            // that did not say which inode
            Ok(_) | Err(Errno::NOSYS | Errno::PERM) => {
                std::fs::metadata(&self.path).map(|m| m.ino())
            }
            Err(e) => Err(e.into()),
        };
        let found = match ino {
            Ok(ino) if ino == self.ino => None,
            Ok(ino) => Some(format!("the name now has inode {ino}")),
            Err(e) => Some(e.to_string()),
        };
        if let Some(found) = found {
            return Err(StorageError::Sqlite(format!(
                "{} was removed or replaced while the node had it open ({found}; ours is inode {})",
                self.path.display(),
                self.ino
            )));
        }
        self.file
            .sync_data()
            .map_err(|e| StorageError::Sqlite(format!("fsync {}: {e}", self.path.display())))
    }
}
