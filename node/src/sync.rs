//! Background replication: hinted handoff, catch-up and rebalance streaming,
//! anti-entropy, dropping buckets after a rebalance, tombstone GC.
//!
//! Catch-up and streaming are one routine: for each bucket this node must
//! hold, compare its digest with every co-owner's and, where they differ,
//! pull the co-owner's records (apply-if-newer) and push ours back. A
//! Recovering or Joining node pulls every bucket it keeps; a node that a
//! pending placement makes a new owner pulls its incoming buckets. When a
//! pass over them succeeds against every co-owner that counts in quorum, the
//! node reports `syncedEpoch` = the epoch of the topology it synced for, and
//! the planner takes it from there (Up, or commit).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kv_core::{BUCKETS, Digest, NodeState, Version};
use tokio::sync::watch;

use crate::cluster::View;
use crate::coordinator::peer_address;
use crate::node::Node;

/// Most hints sent in one request.
const HINT_BATCH: usize = 512;
/// Buckets compared and pulled per request during catch-up.
const SYNC_CHUNK: usize = 64;
/// Catch-up chunks in flight at once.
const SYNC_PARALLEL: usize = 4;

impl Node {
    /// Delivers stored hints to owners that take writes again.
    pub async fn deliver_hints(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.deliver_hints_once().await {
                tracing::debug!(error = %e, "hint delivery paused");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One pass of hint delivery; returns how many hints were delivered.
    pub async fn deliver_hints_once(&self) -> Result<u64, String> {
        let store = self.store.clone();
        let pending = tokio::task::spawn_blocking(move || store.pending_hints())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut delivered = 0;
        for target in pending.keys().copied() {
            let view = self.cluster.view();
            let Some(state) = view.state_of(target) else {
                continue;
            };
            if !state.takes_replica_writes() || target == self.me() {
                continue;
            }
            let addr = peer_address(&view, target).map_err(|e| e.to_string())?;
            loop {
                let store = self.store.clone();
                let batch =
                    tokio::task::spawn_blocking(move || store.hints_for(target, HINT_BATCH))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                if batch.is_empty() {
                    break;
                }
                let (ids, records): (Vec<i64>, Vec<_>) = batch.into_iter().unzip();
                match self.peers.apply(target, &addr, &records).await {
                    Ok(_) => {
                        let n = ids.len() as u64;
                        self.store
                            .delete_hints(ids)
                            .await
                            .map_err(|e| e.to_string())?;
                        self.metrics.hints_delivered.inc_by(n);
                        delivered += n;
                    }
                    Err(e) => {
                        tracing::debug!(node = target, error = %e, "hint delivery failed; will retry");
                        break;
                    }
                }
            }
        }
        Ok(delivered)
    }

    /// Runs catch-up/streaming whenever the topology changes, and
    /// anti-entropy on a timer.
    pub async fn sync_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut changed = self.cluster.subscribe();
        let every = self.config.anti_entropy_every;
        let mut last_ae = tokio::time::Instant::now();
        // Whether this process loaded its buckets from --restore-from, and
        // when it may try again after a failed load.
        let mut restored = false;
        let mut restore_retry = tokio::time::Instant::now();
        loop {
            let view = self.cluster.view();
            let epoch = view.topology.epoch;
            if self.cluster.synced_epoch() < epoch && self.cluster.confirmed() {
                // a store that is new or rebuilt pulls every bucket it keeps
                let full = self.store.catching_up();
                // ... and in a cluster started from a backup, loads them
                // from it first (a store that caught up once never does)
                let loaded = match &self.config.restore {
                    Some(from) if full && !restored => {
                        if tokio::time::Instant::now() < restore_retry {
                            false
                        } else {
                            match self.load_backup(from, &view).await {
                                Ok(Some(l)) => {
                                    restored = true;
                                    self.metrics.restore_records.inc_by(l.stored);
                                    tracing::info!(
                                        buckets = l.buckets,
                                        records = l.records,
                                        stored = l.stored,
                                        written_since = l.written_since,
                                        "loaded this node's buckets from the backup; catching up with the peers"
                                    );
                                    true
                                }
                                Ok(None) => false,
                                Err(e) => {
                                    self.metrics.restore_failures.inc();
                                    tracing::warn!(from = %from.url, error = %e, "cannot load the backup; the store stays catching up and tries again in 5 s");
                                    restore_retry =
                                        tokio::time::Instant::now() + Duration::from_secs(5);
                                    false
                                }
                            }
                        }
                    }
                    _ => true,
                };
                match if loaded {
                    self.catch_up(&view).await
                } else {
                    Ok(false)
                } {
                    Ok(true) => {
                        let mark = full && self.cluster.epoch() == epoch;
                        let recorded = if mark {
                            self.store.mark_caught_up()
                        } else {
                            Ok(())
                        };
                        match recorded {
                            Ok(()) => {
                                if mark {
                                    self.metrics.store_catching_up.set(0);
                                    tracing::info!(
                                        epoch,
                                        "the store has caught up: it serves reads from now on"
                                    );
                                }
                                self.cluster.set_synced(epoch);
                                tracing::info!(epoch, "sync complete for this epoch");
                                self.drop_unowned(&view).await;
                            }
                            // not synced: the next round (after the wait below) tries again
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot record that the store caught up; retrying")
                            }
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::info!(error = %e, "catch-up incomplete; retrying"),
                }
            } else if every.is_some_and(|d| last_ae.elapsed() >= d) {
                last_ae = tokio::time::Instant::now();
                self.anti_entropy_round(&view).await;
                self.drop_unowned(&view).await;
            }
            let wait = if self.cluster.synced_epoch() < epoch {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed.changed() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Buckets this node must pull for the topology in `view`.
    fn buckets_to_pull(&self, view: &View) -> Vec<u32> {
        let me = self.me();
        match view.state_of(me) {
            Some(NodeState::Recovering | NodeState::Joining) => {
                (0..BUCKETS).filter(|b| view.layout.keeps(me, *b)).collect()
            }
            Some(_) if self.store.catching_up() => {
                (0..BUCKETS).filter(|b| view.layout.keeps(me, *b)).collect()
            }
            Some(_) if view.layout.pending.is_some() => view.layout.incoming_buckets(me),
            _ => Vec::new(),
        }
    }

    /// Pulls every bucket this node must hold at this epoch from its
    /// co-owners. `Ok(true)` when complete against every co-owner that
    /// counts; `Ok(false)` if the topology changed meanwhile.
    async fn catch_up(&self, view: &View) -> Result<bool, String> {
        let buckets = self.buckets_to_pull(view);
        let epoch = view.topology.epoch;
        self.cluster.update_resync(|r| {
            r.epoch = epoch;
            r.buckets_total = buckets.len() as u64;
            r.buckets_done = 0;
        });
        self.metrics.resync_buckets_total.set(buckets.len() as i64);
        self.metrics.resync_buckets_done.set(0);
        self.metrics
            .resync_progress
            .set(if buckets.is_empty() { 1.0 } else { 0.0 });
        if buckets.is_empty() {
            return Ok(true);
        }
        tracing::info!(epoch, buckets = buckets.len(), "catching up");
        let sources = self.sources(view, &buckets);
        let mut peer_digests = std::collections::BTreeMap::new();
        let mut unreachable = Vec::new();
        let mut all_new = true;
        for o in sources.iter().copied() {
            let addr = peer_address(view, o).map_err(|e| e.to_string())?;
            match self.peers.store_digests(o, &addr).await {
                Ok((new, d)) => {
                    all_new &= new || d.iter().all(|b| b.count == 0);
                    peer_digests.insert(o, (addr, d));
                }
                Err(e) => unreachable.push(format!("digests of node {o}: {e}")),
            }
        }
        // Every co-owner must have been compared, so that nothing acknowledged
        // is missed — except in a new cluster: when this store is new and every
        // co-owner that answers is new or empty too, no acknowledged write can
        // exist that only the silent ones hold (unless more volumes than a
        // write quorum were lost at once), and waiting for them would leave a
        // new cluster with one node down unable to serve.
        let new_cluster = self.store.catching_up() && all_new && !peer_digests.is_empty();
        if !unreachable.is_empty() && !new_cluster {
            return Err(unreachable.join("; "));
        }
        // Chunks are compared and pulled a few at a time: while one chunk's
        // records are applied (the writer is busy), the next ones are on the
        // wire, and concurrent applies share the writer's transactions.
        let total = buckets.len() as u64;
        let done = std::sync::atomic::AtomicU64::new(0);
        let chunks: Vec<Vec<u32>> = buckets.chunks(SYNC_CHUNK).map(<[u32]>::to_vec).collect();
        let (peer_digests, done) = (&peer_digests, &done);
        let mut chunks = futures::stream::iter(chunks)
            .map(|chunk| async move {
                self.catch_up_chunk(view, epoch, peer_digests, &chunk, done, total)
                    .await
            })
            .buffer_unordered(SYNC_PARALLEL);
        while let Some(r) = chunks.next().await {
            if !r? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Compares one chunk of buckets with every source and pulls those that
    /// differ. `Ok(false)` if the topology changed.
    async fn catch_up_chunk(
        &self,
        view: &View,
        epoch: u64,
        peer_digests: &std::collections::BTreeMap<u32, (String, Vec<Digest>)>,
        chunk: &[u32],
        done: &std::sync::atomic::AtomicU64,
        total: u64,
    ) -> Result<bool, String> {
        if self.cluster.epoch() != epoch {
            return Ok(false);
        }
        // Our digests change only when a pull applies something.
        let mut mine = self.local_digests()?;
        for (o, (addr, theirs)) in peer_digests {
            let differing: Vec<u32> = chunk
                .iter()
                .copied()
                .filter(|b| {
                    let owns = view.layout.current.owns(*o, *b)
                        || view.layout.pending.as_ref().is_some_and(|p| p.owns(*o, *b));
                    owns && theirs[*b as usize] != mine[*b as usize]
                })
                .collect();
            if !differing.is_empty() && self.pull_buckets(*o, addr, &differing).await? > 0 {
                mine = self.local_digests()?;
            }
        }
        let done = done.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed)
            + chunk.len() as u64;
        self.cluster.update_resync(|r| r.buckets_done = done);
        self.metrics.resync_buckets_done.set(done as i64);
        self.metrics.resync_progress.set(done as f64 / total as f64);
        Ok(true)
    }

    /// Pulls a co-owner's records of `buckets` (apply-if-newer).
    async fn pull_buckets(&self, o: u32, addr: &str, buckets: &[u32]) -> Result<u64, String> {
        let theirs = self
            .peers
            .buckets(o, addr, buckets)
            .await
            .map_err(|e| e.to_string())?;
        let mut moved = 0;
        for part in theirs.chunks(4096) {
            let applied = self
                .store
                .apply(part.to_vec())
                .await
                .map_err(|e| e.to_string())?;
            moved += applied.iter().filter(|a| a.stored()).count() as u64;
        }
        self.metrics.resync_keys_moved.inc_by(moved);
        self.cluster.update_resync(|r| r.keys_moved += moved);
        Ok(moved)
    }

    /// Co-owners to pull from: every node other than this one that owns one
    /// of `buckets` (current or pending placement) and counts in quorum, or
    /// takes writes while a placement is pending.
    fn sources(&self, view: &View, buckets: &[u32]) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for b in buckets {
            let owners = view
                .layout
                .current
                .owners(*b)
                .iter()
                .chain(view.layout.pending.iter().flat_map(|p| p.owners(*b).iter()));
            for o in owners {
                if *o != self.me() && view.state_of(*o).is_some_and(|s| s.counts_in_quorum()) {
                    out.insert(*o);
                }
            }
        }
        out
    }

    fn local_digests(&self) -> Result<Vec<Digest>, String> {
        self.store.bucket_digests().map_err(|e| e.to_string())
    }

    /// Pulls a co-owner's records of `bucket` (apply-if-newer) and, with
    /// `push`, sends ours back so both sides converge.
    async fn exchange_bucket(
        &self,
        o: u32,
        addr: &str,
        bucket: u32,
        push: bool,
    ) -> Result<u64, String> {
        let theirs = self
            .peers
            .bucket(o, addr, bucket)
            .await
            .map_err(|e| e.to_string())?;
        let mut moved = 0;
        if !theirs.is_empty() {
            let applied = self.store.apply(theirs).await.map_err(|e| e.to_string())?;
            moved = applied.iter().filter(|a| a.stored()).count() as u64;
        }
        if push {
            let store = self.store.clone();
            let ours = tokio::task::spawn_blocking(move || store.bucket_records(bucket))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            for chunk in ours.chunks(HINT_BATCH) {
                self.peers
                    .apply(o, addr, chunk)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        self.metrics.resync_keys_moved.inc_by(moved);
        self.cluster.update_resync(|r| r.keys_moved += moved);
        Ok(moved)
    }

    /// One background anti-entropy round over every bucket this node owns:
    /// compare with each reachable co-owner, exchange differing buckets both
    /// ways, and purge old tombstones where every owner agrees.
    pub async fn anti_entropy_round(&self, view: &View) -> u64 {
        let me = self.me();
        if !view.state_of(me).is_some_and(|s| s.counts_in_quorum()) {
            return 0;
        }
        let owned: Vec<u32> = (0..BUCKETS).filter(|b| view.layout.keeps(me, *b)).collect();
        let peers: BTreeSet<u32> = self.sources(view, &owned);
        let mut agree = vec![true; BUCKETS as usize];
        let mut divergent = 0u64;
        for o in peers.iter().copied() {
            let Ok(addr) = peer_address(view, o) else {
                continue;
            };
            let theirs = match self.peers.digests(o, &addr).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(node = o, error = %e, "anti-entropy: co-owner unreachable");
                    agree.iter_mut().for_each(|a| *a = false);
                    continue;
                }
            };
            let Ok(mine) = self.local_digests() else {
                return divergent;
            };
            for b in &owned {
                let co_owned = view.layout.current.owns(o, *b);
                if co_owned && theirs[*b as usize] != mine[*b as usize] {
                    divergent += 1;
                    agree[*b as usize] = false;
                    if let Err(e) = self.exchange_bucket(o, &addr, *b, true).await {
                        tracing::debug!(node = o, bucket = b, error = %e, "anti-entropy exchange failed");
                    }
                }
            }
        }
        self.metrics.divergent_buckets.set(divergent as i64);
        // Every owner reachable and in agreement: tombstones past the grace
        // period are on every owner and can go.
        let all_owners_up = |b: u32| {
            view.layout
                .current
                .owners(b)
                .iter()
                .all(|o| view.state_of(*o) == Some(NodeState::Up))
        };
        if view.layout.pending.is_none() {
            let grace_ms = self.config.tombstone_grace.as_millis() as u64;
            let cutoff = Version::new(
                self.hlc.now().physical_ms().saturating_sub(grace_ms) << 16,
                0,
            );
            for b in owned {
                if agree[b as usize]
                    && all_owners_up(b)
                    && let Ok(n) = self.store.purge_tombstones(b, cutoff).await
                {
                    self.metrics.tombstones_purged.inc_by(n);
                }
            }
        }
        divergent
    }

    /// After a committed rebalance, forget the buckets this node no longer owns.
    async fn drop_unowned(&self, view: &View) {
        let me = self.me();
        if view.layout.pending.is_some() || view.state_of(me) != Some(NodeState::Up) {
            return;
        }
        let Ok(digests) = self.local_digests() else {
            return;
        };
        let doomed: Vec<u32> = (0..BUCKETS)
            .filter(|b| digests[*b as usize].count > 0 && !view.layout.keeps(me, *b))
            .collect();
        if doomed.is_empty() {
            return;
        }
        match self.store.drop_buckets(doomed.clone()).await {
            Ok(n) => tracing::info!(
                buckets = doomed.len(),
                records = n,
                "dropped buckets this node no longer owns"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot drop unowned buckets"),
        }
    }
}
