//! Reads at level `R`: exactly `R` owners asked (this node first when it
//! owns the key), the newest version wins, stale owners are repaired in the
//! background.

use std::collections::BTreeMap;
use std::sync::Arc;

use kv_core::{Consistency, NodeState, Record, bucket_of};
use tokio::sync::mpsc;

use super::quorum::{Calls, Count, Fanout, Replies};
use super::{CoordError, Coordinator, newest, peer_address};
use crate::cluster::View;

impl Coordinator {
    /// Reads `key` at `level` (cluster default when `None`). Tombstones come
    /// back as records with no value.
    pub async fn read(
        &self,
        key: &[u8],
        level: Option<Consistency>,
    ) -> Result<Option<Record>, CoordError> {
        let view = self.require_serving()?;
        let level = level.unwrap_or(view.topology.read_consistency);
        let owners = view.layout.read_owners(bucket_of(key)).to_vec();
        let need = level.required(owners.len()).max(1);
        // A store that is new or rebuilt answers no reads until caught up:
        // its "absent" would be a lie (SPEC §3).
        let me_catching_up = self.node.store.catching_up();
        let candidates: Vec<u32> = owners
            .iter()
            .copied()
            .filter(|o| {
                view.state_of(*o)
                    .is_some_and(NodeState::serves_client_reads)
                    && !(*o == self.me() && me_catching_up)
            })
            .collect();
        if candidates.len() < need {
            return Err(CoordError::Unavailable(format!(
                "read at {level} needs {need} of the key's {} owners and only {} are serving",
                owners.len(),
                candidates.len()
            )));
        }
        if need == 1 && candidates.contains(&self.me()) {
            return Ok(self.node.store.get(key)?);
        }
        let order = read_order(&candidates, self.me(), bucket_of(key));
        let mut count = Count::new(need);
        let replies = Calls::start(order, Fanout::read(need), |o| {
            let (c, view, key) = (self.clone(), view.clone(), key.to_vec());
            async move { c.read_replica(&view, o, key).await }
        })
        .until(&mut count)
        .await;
        self.node
            .metrics
            .speculative_reads
            .inc_by(replies.speculated);
        if !replies.met {
            return Err(read_shortfall(level, need, &replies));
        }
        let answers: BTreeMap<u32, Option<Record>> = replies.ok.into_iter().collect();
        let newest = newest(answers.values());
        if let Some(newest) = newest.clone() {
            // Every owner asked has answered with the newest version (the
            // common case): nothing to repair, and no task to spawn per read.
            let all_in = replies.late.is_closed() && replies.late.is_empty();
            if !all_in || !stale_owners(&newest, &answers).is_empty() {
                let c = self.clone();
                tokio::spawn(async move { c.repair(view, newest, answers, replies.late).await });
            }
        }
        Ok(newest)
    }

    async fn read_replica(
        &self,
        view: &View,
        ordinal: u32,
        key: Vec<u8>,
    ) -> Result<Option<Record>, String> {
        if ordinal == self.me() {
            return self.node.store.get(&key).map_err(|e| e.to_string());
        }
        let addr = peer_address(view, ordinal).map_err(|e| e.to_string())?;
        self.node
            .peers
            .read_one(ordinal, &addr, key)
            .await
            .map_err(|e| e.to_string())
    }

    /// Read repair: every owner that answered with something older than
    /// `newest` (now or later) gets it.
    async fn repair(
        self,
        view: Arc<View>,
        newest: Record,
        mut answers: BTreeMap<u32, Option<Record>>,
        mut rest: mpsc::UnboundedReceiver<(u32, Result<Option<Record>, String>)>,
    ) {
        let deadline = tokio::time::sleep(self.node.peers.timeout());
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = rest.recv() => match next {
                    Some((o, Ok(r))) => { answers.insert(o, r); }
                    Some((_, Err(_))) => {}
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        for o in stale_owners(&newest, &answers) {
            let ok = if o == self.me() {
                self.node.store.apply(vec![newest.clone()]).await.is_ok()
            } else {
                match peer_address(&view, o) {
                    Ok(addr) => self
                        .node
                        .peers
                        .apply_one(o, &addr, newest.clone())
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            };
            if ok {
                self.node.metrics.read_repairs.inc();
            }
        }
    }
}

/// Whom a read asks, in turn: this node first when it may answer, the
/// others rotated by bucket to spread the load.
pub(super) fn read_order(candidates: &[u32], me: u32, bucket: u32) -> Vec<u32> {
    let mut order: Vec<u32> = candidates.iter().copied().filter(|o| *o != me).collect();
    if !order.is_empty() {
        let shift = bucket as usize % order.len();
        order.rotate_left(shift);
    }
    if candidates.contains(&me) {
        order.insert(0, me);
    }
    order
}

/// The owners whose answer is older than `newest` (or who have nothing).
pub(super) fn stale_owners(newest: &Record, answers: &BTreeMap<u32, Option<Record>>) -> Vec<u32> {
    answers
        .iter()
        .filter(|(_, have)| have.as_ref().is_none_or(|h| h.version < newest.version))
        .map(|(o, _)| *o)
        .collect()
}

/// A read that got too few answers, with every owner's failure.
pub(super) fn read_shortfall<T>(
    level: Consistency,
    need: usize,
    replies: &Replies<T, String>,
) -> CoordError {
    let errors: Vec<String> = replies
        .failed
        .iter()
        .map(|(o, e)| format!("node {o}: {e}"))
        .collect();
    CoordError::Unavailable(format!(
        "read at {level} needed {need} answers and got {} ({})",
        replies.ok.len(),
        errors.join("; ")
    ))
}
