//! SQLite's own page cache, wrapped to skip a truncation that finds nothing.
//!
//! At the end of every transaction SQLite asks its page cache to drop the
//! pages past the end of the database. The default cache keeps only an upper
//! bound of the page numbers it holds, and when a B-tree rebalance swaps two
//! pages it moves one through a temporary number just past 1 GiB (the "pending
//! byte" page, 524 289 with 2 KiB pages). The bound stays there, so the next
//! commit scans the whole cache (every hash slot and every page) to drop
//! nothing: 4–5 % of a node's CPU under random writes, a seventh of the
//! storage writer's (bench/profile.md, eighth step).
//!
//! The wrapper keeps a tighter bound per cache that ignores that transient
//! page, and passes a truncation on only when a page may sit at or past the
//! limit. Every other call goes straight to SQLite's cache.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// SQLite's default cache methods, which the wrapper calls.
static INNER: OnceLock<Methods> = OnceLock::new();

struct Methods(ffi::sqlite3_pcache_methods2);
// SAFETY: function pointers and SQLite's own `pArg`, which SQLite hands to
// its methods from any thread.
unsafe impl Send for Methods {}
unsafe impl Sync for Methods {}

/// SQLite's lock byte (`PENDING_BYTE`): the page holding it is never used,
/// and a rebalance borrows its number while it swaps two pages.
const PENDING_BYTE: u64 = 0x4000_0000;

/// One cache: SQLite's, and what the wrapper knows of its page numbers. A
/// cache is only used by its own connection, under that connection's mutex.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// No page numbered above this is in the cache, but for one parked at
    /// `pending_key`.
    max_key: c_uint,
    /// The pending-byte page number for this cache's page size.
    pending_key: c_uint,
    /// Whether a page sits at the pending-byte number (inside a rebalance).
    pending_held: bool,
    /// This cache's truncations passed on and skipped.
    passed: u64,
    skipped: u64,
}

/// Installs the wrapper. It must run before SQLite is initialised (before the
/// first connection opens; every connection of the store opens through
/// `open_conn`, which calls this first, and nothing else in the process uses
/// SQLite). If SQLite already was initialised, it refuses and its cache stays
/// as it is (correct, only slower). Returns whether the wrapper is in.
pub(crate) fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let mut default = std::mem::MaybeUninit::<ffi::sqlite3_pcache_methods2>::zeroed();
        // SAFETY: GETPCACHE2 writes the current methods into the struct.
        let rc =
            unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, default.as_mut_ptr()) };
        if rc != ffi::SQLITE_OK {
            return false;
        }
        // SAFETY: SQLite filled it in (zeroed before, so no uninit read either way).
        let default = unsafe { default.assume_init() };
        if default.xCreate.is_none() || INNER.set(Methods(default)).is_err() {
            return false;
        }
        let ours = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: std::ptr::null_mut(),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            xCreate: Some(x_create),
            xCachesize: Some(x_cachesize),
            xPagecount: Some(x_pagecount),
            xFetch: Some(x_fetch),
            xUnpin: Some(x_unpin),
            xRekey: Some(x_rekey),
            xTruncate: Some(x_truncate),
            xDestroy: Some(x_destroy),
            xShrink: Some(x_shrink),
        };
        // SAFETY: PCACHE2 copies the struct; it only fails (SQLITE_MISUSE)
        // once SQLite is initialised, and then changes nothing.
        unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &ours) == ffi::SQLITE_OK }
    })
}

/// SQLite's methods. `INNER` is set before the wrapper is installed, so
/// before any of the functions below can run.
fn inner() -> Option<&'static ffi::sqlite3_pcache_methods2> {
    INNER.get().map(|m| &m.0)
}

/// # Safety
/// `p` is a pointer `x_create` returned and `x_destroy` has not freed.
unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    // SAFETY: by the caller's contract, and SQLite calls one cache's methods
    // from one connection at a time.
    unsafe { &mut *(p as *mut Cache) }
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    match inner() {
        // SAFETY: SQLite's own method with its own argument.
        Some(ffi::sqlite3_pcache_methods2 {
            xInit: Some(f),
            pArg,
            ..
        }) => unsafe { f(*pArg) },
        _ => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {
    if let Some(ffi::sqlite3_pcache_methods2 {
        xShutdown: Some(f),
        pArg,
        ..
    }) = inner()
    {
        // SAFETY: as above.
        unsafe { f(*pArg) }
    }
}

unsafe extern "C" fn x_create(
    sz_page: c_int,
    sz_extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(create) = inner().and_then(|m| m.xCreate) else {
        return std::ptr::null_mut();
    };
    // SAFETY: SQLite's own method, with SQLite's arguments.
    let p = unsafe { create(sz_page, sz_extra, purgeable) };
    if p.is_null() {
        return p;
    }
    let pending_key = u64::try_from(sz_page)
        .ok()
        .filter(|&s| s > 0)
        .and_then(|s| c_uint::try_from(PENDING_BYTE / s + 1).ok())
        .unwrap_or(c_uint::MAX);
    Box::into_raw(Box::new(Cache {
        inner: p,
        max_key: 0,
        pending_key,
        pending_held: false,
        passed: 0,
        skipped: 0,
    })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn x_cachesize(p: *mut ffi::sqlite3_pcache, n: c_int) {
    // SAFETY: `p` came from x_create (SQLite's contract).
    let c = unsafe { cache(p) };
    if let Some(f) = inner().and_then(|m| m.xCachesize) {
        // SAFETY: SQLite's method on SQLite's cache.
        unsafe { f(c.inner, n) }
    }
}

unsafe extern "C" fn x_pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    match inner().and_then(|m| m.xPagecount) {
        // SAFETY: as above.
        Some(f) => unsafe { f(c.inner) },
        None => 0,
    }
}

unsafe extern "C" fn x_fetch(
    p: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    let Some(f) = inner().and_then(|m| m.xFetch) else {
        return std::ptr::null_mut();
    };
    // SAFETY: as above.
    let page = unsafe { f(c.inner, key, create) };
    if !page.is_null() {
        if key == c.pending_key {
            c.pending_held = true;
        } else {
            c.max_key = c.max_key.max(key);
        }
    }
    page
}

unsafe extern "C" fn x_unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    if let Some(f) = inner().and_then(|m| m.xUnpin) {
        // SAFETY: as above.
        unsafe { f(c.inner, page, discard) }
    }
}

unsafe extern "C" fn x_rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    if let Some(f) = inner().and_then(|m| m.xRekey) {
        // SAFETY: as above.
        unsafe { f(c.inner, page, old, new) }
    }
    if old == c.pending_key {
        c.pending_held = false;
    }
    if new == c.pending_key {
        c.pending_held = true;
    } else {
        c.max_key = c.max_key.max(new);
    }
}

unsafe extern "C" fn x_truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    // Pages numbered `limit` and up are to go: if none can be here, SQLite's
    // cache would scan to find nothing.
    if limit > c.max_key && !c.pending_held {
        c.skipped += 1;
        return;
    }
    c.passed += 1;
    if let Some(f) = inner().and_then(|m| m.xTruncate) {
        // SAFETY: as above.
        unsafe { f(c.inner, limit) }
    }
    c.max_key = c.max_key.min(limit.saturating_sub(1));
    if limit <= c.pending_key {
        c.pending_held = false;
    }
}

unsafe extern "C" fn x_destroy(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: `p` came from x_create and SQLite destroys a cache once; the
    // box is freed here and never used again.
    let c = unsafe { Box::from_raw(p as *mut Cache) };
    if let Some(f) = inner().and_then(|m| m.xDestroy) {
        // SAFETY: SQLite's method on SQLite's cache.
        unsafe { f(c.inner) }
    }
}

unsafe extern "C" fn x_shrink(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    if let Some(f) = inner().and_then(|m| m.xShrink) {
        // SAFETY: as above.
        unsafe { f(c.inner) }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The bound itself, on SQLite's cache through the wrapper: real
    /// truncations go through and drop pages; one past every page is skipped;
    /// a page parked at the pending-byte number is not overlooked.
    #[test]
    fn truncations_that_could_drop_a_page_reach_sqlite() {
        assert!(install(), "installed before SQLite initialises");
        // SAFETY: initialising SQLite has no precondition.
        assert_eq!(unsafe { ffi::sqlite3_initialize() }, ffi::SQLITE_OK);
        // SAFETY: the calls follow SQLite's page cache contract: pages are
        // fetched, unpinned before a truncation and the cache destroyed once.
        unsafe {
            let c = x_create(2048, 64, 1);
            assert!(!c.is_null());
            x_cachesize(c, 100);
            let counts = || {
                let w = &*(c as *mut Cache);
                (w.passed, w.skipped)
            };
            let fetch = |key: c_uint| {
                let page = x_fetch(c, key, 2);
                assert!(!page.is_null(), "page {key} created");
                x_unpin(c, page, 0);
                page
            };
            for key in 1..=10 {
                fetch(key);
            }
            assert_eq!(x_pagecount(c), 10);
            x_truncate(c, 11);
            assert_eq!(counts(), (0, 1), "nothing at 11 or above");
            x_truncate(c, 6);
            assert_eq!(counts(), (1, 1));
            assert_eq!(x_pagecount(c), 5, "pages 6 to 10 dropped");
            // a rebalance moves page 4 through the pending-byte number
            let pending = c_uint::try_from(PENDING_BYTE / 2048 + 1).expect("fits");
            let page = x_fetch(c, 4, 0);
            assert!(!page.is_null());
            x_rekey(c, page, 4, pending);
            x_unpin(c, page, 0);
            x_truncate(c, 6);
            assert_eq!(counts(), (2, 1), "the parked page counts");
            assert_eq!(x_pagecount(c), 4, "the parked page dropped");
            x_truncate(c, 6);
            assert_eq!(counts(), (2, 2));
            x_destroy(c);
        }
    }

    use rusqlite::{OpenFlags, params};

    /// Random inserts, resizes, deletes and rolled-back transactions through
    /// the wrapped cache (rebalances, with their pages parked at the
    /// pending-byte number, happen all along): SQLite must still hold exactly
    /// what was committed.
    #[test]
    fn the_wrapped_cache_keeps_every_committed_row() {
        assert!(super::install(), "installed before SQLite initialises");
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("t.sqlite3");
        let mut conn = crate::storage::open::open_conn(&path, OpenFlags::default()).expect("open");
        conn.execute_batch(
            "PRAGMA page_size = 2048; PRAGMA journal_mode = WAL; PRAGMA cache_size = -2048;
             CREATE TABLE t (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
        )
        .expect("schema");
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..400 {
            let tx = conn.transaction().expect("begin");
            let mut staged = model.clone();
            for _ in 0..50 {
                let key = format!("key-{:06}", next() % 5_000).into_bytes();
                if next() % 8 == 0 {
                    tx.execute("DELETE FROM t WHERE k = ?1", [&key])
                        .expect("delete");
                    staged.remove(&key);
                } else {
                    let value = vec![(next() % 251) as u8; (next() % 300) as usize + 1];
                    tx.execute(
                        "INSERT INTO t (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                        params![key, value],
                    )
                    .expect("upsert");
                    staged.insert(key, value);
                }
            }
            if round % 7 == 3 {
                tx.rollback().expect("rollback");
            } else {
                tx.commit().expect("commit");
                model = staged;
            }
        }
        let verdict: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity check");
        assert_eq!(verdict, "ok");
        let mut stmt = conn
            .prepare("SELECT k, v FROM t ORDER BY k")
            .expect("select");
        let stored: BTreeMap<Vec<u8>, Vec<u8>> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("row");
        assert_eq!(stored.len(), model.len());
        assert!(stored == model, "the table differs from what was committed");
    }
}
