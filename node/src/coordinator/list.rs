//! Prefix listings, merged across every serving node so that each bucket is
//! covered by at least one of its owners.

use std::collections::{BTreeMap, BTreeSet};

use kv_core::Record;

use super::{CoordError, Coordinator, peer_address};

/// What a prefix listing returns.
#[derive(Debug, PartialEq)]
pub struct Listing {
    pub keys: Vec<Vec<u8>>,
    /// The key to pass as `after` for the next page, if there may be more.
    pub next: Option<Vec<u8>>,
}

impl Coordinator {
    /// A page of live keys under `prefix`, merged across every serving node so
    /// that each bucket is covered by at least one owner; the newest version
    /// of each key decides whether it is live.
    pub async fn list(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Listing, CoordError> {
        let view = self.require_serving()?;
        let me_catching_up = self.node.store.catching_up();
        let serving: Vec<u32> = view
            .topology
            .nodes
            .iter()
            .filter(|n| n.state.serves_client_reads())
            .filter(|n| !(n.ordinal == self.me() && me_catching_up))
            .map(|n| n.ordinal)
            .collect();
        let mut tasks = Vec::new();
        for o in serving {
            let (node, view) = (self.node.clone(), view.clone());
            let (prefix, after) = (prefix.to_vec(), after.map(<[u8]>::to_vec));
            tasks.push(tokio::spawn(async move {
                let r = if o == node.me() {
                    let store = node.store.clone();
                    tokio::task::spawn_blocking(move || {
                        store.scan(&prefix, after.as_deref(), limit)
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                } else {
                    match peer_address(&view, o) {
                        Ok(addr) => node
                            .peers
                            .scan(o, &addr, &prefix, after.as_deref(), limit)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                };
                (o, r)
            }));
        }
        let mut answered = BTreeSet::new();
        let mut merged: BTreeMap<Vec<u8>, Record> = BTreeMap::new();
        // Keys up to `bound` are complete: every node that answered a full page
        // may hold more keys after its last one.
        let mut bound: Option<Vec<u8>> = None;
        for t in tasks {
            let Ok((o, r)) = t.await else { continue };
            let Ok(records) = r else { continue };
            answered.insert(o);
            if records.len() >= limit
                && let Some(last) = records.last()
                && bound.as_ref().is_none_or(|b| last.key < *b)
            {
                bound = Some(last.key.clone());
            }
            for r in records {
                match merged.get(&r.key) {
                    Some(have) if have.version >= r.version => {}
                    _ => {
                        merged.insert(r.key.clone(), r);
                    }
                }
            }
        }
        let uncovered = (0..kv_core::BUCKETS)
            .filter(|b| {
                !view
                    .layout
                    .read_owners(*b)
                    .iter()
                    .any(|o| answered.contains(o))
            })
            .count();
        if uncovered > 0 {
            return Err(CoordError::Unavailable(format!(
                "cannot list: {uncovered} buckets have no reachable owner"
            )));
        }
        let mut keys = Vec::new();
        let mut next = None;
        for (k, r) in merged {
            if bound.as_ref().is_some_and(|b| k > *b) {
                break;
            }
            if r.value.is_none() {
                continue;
            }
            keys.push(k);
            if keys.len() == limit {
                break;
            }
        }
        if keys.len() == limit || bound.is_some() {
            next = keys.last().cloned().or(bound);
        }
        Ok(Listing { keys, next })
    }
}
