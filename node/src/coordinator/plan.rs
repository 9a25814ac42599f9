//! The write quorum rules: whom a write of one key goes to, which
//! acknowledgements count, and when it is refused before anything is
//! written. Create steps follow the same rules.

use std::collections::BTreeSet;

use kv_core::{Consistency, NodeState, bucket_of};

use super::CoordError;
use super::quorum::Tally;
use crate::cluster::View;

/// Whom a write of one key goes to and which acknowledgements it needs: `W`
/// of the committed placement's owners that count in quorum and, while a
/// placement is pending, `W` of the new owners as well.
pub(crate) struct WritePlan {
    current: Vec<u32>,
    pending: Option<Vec<u32>>,
    need_cur: usize,
    need_pend: Option<usize>,
    pub targets: BTreeSet<u32>,
}

impl WritePlan {
    /// Refuses a write that cannot reach its quorums with the owners that
    /// are live, before anything is written.
    pub fn new(view: &View, key: &[u8], level: Consistency) -> Result<WritePlan, CoordError> {
        let bucket = bucket_of(key);
        let current: Vec<u32> = view.layout.current.owners(bucket).to_vec();
        let pending: Option<Vec<u32>> = view
            .layout
            .pending
            .as_ref()
            .map(|p| p.owners(bucket).to_vec());
        let state = |o: &u32| view.state_of(*o);
        let need_cur = level.required(current.len()).max(1);
        let live_cur = current
            .iter()
            .filter(|o| state(o).is_some_and(NodeState::counts_in_quorum))
            .count();
        if live_cur < need_cur {
            return Err(CoordError::Unavailable(format!(
                "write at {level} needs {need_cur} of the key's {} owners and only {live_cur} are Up",
                current.len()
            )));
        }
        let need_pend = pending.as_ref().map(|p| level.required(p.len()).max(1));
        if let (Some(p), Some(need)) = (&pending, need_pend) {
            let live = p
                .iter()
                .filter(|o| state(o).is_some_and(NodeState::takes_replica_writes))
                .count();
            if live < need {
                return Err(CoordError::Unavailable(format!(
                    "write at {level} needs {need} of the key's {} new owners (rebalancing) and only {live} take writes",
                    p.len()
                )));
            }
        }
        let targets = view.layout.write_owners(bucket).into_iter().collect();
        Ok(WritePlan {
            current,
            pending,
            need_cur,
            need_pend,
            targets,
        })
    }

    /// The targets that take replica writes now, and those that get a hint
    /// instead (Failed, or not in the topology's states).
    pub fn live_and_down(&self, view: &View) -> (Vec<u32>, Vec<u32>) {
        self.targets.iter().partition(|o| {
            view.state_of(**o)
                .is_some_and(NodeState::takes_replica_writes)
        })
    }

    /// Which quorums an acknowledgement from `o` counts towards. An owner
    /// whose store is still catching up takes the write but does not count
    /// towards the committed placement's quorum (like a Recovering node): it
    /// may lack the newer version that would have made it refuse.
    pub fn counts(&self, view: &View, o: u32, catching_up: bool) -> (bool, bool) {
        let cur = self.current.contains(&o)
            && !catching_up
            && view.state_of(o).is_some_and(NodeState::counts_in_quorum);
        let pend = self.pending.as_ref().is_some_and(|p| p.contains(&o));
        (cur, pend)
    }

    pub fn done(&self, cur: usize, pend: usize) -> bool {
        cur >= self.need_cur && self.need_pend.is_none_or(|n| pend >= n)
    }

    /// Which quorum fell short: while a placement is pending both are needed.
    pub fn shortfall(&self, cur: usize, pend: usize) -> String {
        let need_cur = self.need_cur;
        match self.need_pend {
            Some(n) if pend < n => format!(
                "{pend} of the {n} owners the pending placement (a rebalance) needs, and {cur} of the {need_cur} the committed placement needs"
            ),
            _ => format!("{cur} of the {need_cur} owners it needs"),
        }
    }
}

/// An owner took the write (or granted the create step).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ack {
    /// Its store is catching up (see [`WritePlan::counts`]).
    pub catching_up: bool,
}

/// Acknowledgements counted towards a [`WritePlan`]'s quorums.
pub(crate) struct WriteTally<'a> {
    plan: &'a WritePlan,
    view: &'a View,
    cur: usize,
    pend: usize,
}

impl<'a> WriteTally<'a> {
    pub fn new(plan: &'a WritePlan, view: &'a View) -> WriteTally<'a> {
        WriteTally {
            plan,
            view,
            cur: 0,
            pend: 0,
        }
    }

    /// Which quorum fell short, and by how much.
    pub fn shortfall(&self) -> String {
        self.plan.shortfall(self.cur, self.pend)
    }
}

impl Tally<Ack> for WriteTally<'_> {
    fn add(&mut self, owner: u32, ack: &Ack) {
        let (c, p) = self.plan.counts(self.view, owner, ack.catching_up);
        self.cur += usize::from(c);
        self.pend += usize::from(p);
    }

    fn met(&self) -> bool {
        self.plan.done(self.cur, self.pend)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The write quorum rules on in-memory topologies: who a write goes to,
    //! which acknowledgements count, and when it is refused before anything
    //! is written.
    use super::*;
    use crate::node::ApiError;
    use kv_core::{NodeInfo, PlacementSpec, Strategy, Topology};

    pub(crate) fn view(states: &[NodeState], members: &[u32], pending: Option<&[u32]>) -> View {
        let spec = |m: &[u32]| PlacementSpec {
            strategy: Strategy::Full,
            factor: m.len() as u32,
            members: m.to_vec(),
        };
        View::new(Topology {
            cluster_id: "t".into(),
            epoch: 3,
            read_consistency: Consistency::Quorum,
            write_consistency: Consistency::Quorum,
            placement: spec(members),
            pending: pending.map(spec),
            nodes: states
                .iter()
                .enumerate()
                .map(|(i, s)| NodeInfo {
                    ordinal: i as u32,
                    address: format!("127.0.0.1:{}", 1000 + i),
                    peer_address: format!("127.0.0.1:{}", 2000 + i),
                    state: *s,
                })
                .collect(),
        })
    }

    use NodeState::{Failed, Joining, Up};

    #[test]
    fn a_quorum_write_needs_two_of_three_up_owners_and_is_refused_before_writing_without_them() {
        let v = view(&[Up, Up, Failed], &[0, 1, 2], None);
        let plan = WritePlan::new(&v, b"k", Consistency::Quorum).expect("two of three are Up");
        assert_eq!(plan.targets.iter().copied().collect::<Vec<_>>(), [0, 1, 2]);
        assert!(!plan.done(1, 0));
        assert!(plan.done(2, 0));
        // a Failed owner's acknowledgement never counts (its copy is a hint's)
        assert_eq!(plan.counts(&v, 2, false), (false, false));
        let all = WritePlan::new(&v, b"k", Consistency::All).map_err(ApiError::from);
        assert_eq!(all.err().map(|e| e.status), Some(503));
        let down = view(&[Up, Failed, Failed], &[0, 1, 2], None);
        let refused = WritePlan::new(&down, b"k", Consistency::Quorum)
            .map_err(ApiError::from)
            .err();
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| e.status == 503 && e.message.contains("only 1 are Up")),
            "{refused:?}"
        );
        // One needs one owner, whatever the others do
        assert!(WritePlan::new(&down, b"k", Consistency::One).is_ok());
    }

    #[test]
    fn a_catching_up_owner_takes_the_write_but_does_not_count_towards_the_committed_quorum() {
        let v = view(&[Up, Up, Up], &[0, 1, 2], None);
        let plan = WritePlan::new(&v, b"k", Consistency::Quorum).expect("plan");
        assert_eq!(plan.counts(&v, 1, true), (false, false));
        assert_eq!(plan.counts(&v, 1, false), (true, false));
    }

    #[test]
    fn while_a_placement_is_pending_both_quorums_are_needed() {
        // 0,1,2 own the key now; 1,2,3 will (3 is Joining: it takes writes)
        let v = view(&[Up, Up, Up, Joining], &[0, 1, 2], Some(&[1, 2, 3]));
        let plan = WritePlan::new(&v, b"k", Consistency::Quorum).expect("plan");
        assert_eq!(
            plan.targets.iter().copied().collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // 0 and 3 answered: a quorum of neither placement on its own
        let (mut cur, mut pend) = (0, 0);
        for o in [0, 3] {
            let (c, p) = plan.counts(&v, o, false);
            cur += usize::from(c);
            pend += usize::from(p);
        }
        assert_eq!((cur, pend), (1, 1));
        assert!(!plan.done(cur, pend));
        assert!(plan.shortfall(cur, pend).contains("pending placement"));
        // 1 answers too: two of the old owners and two of the new
        let (c, p) = plan.counts(&v, 1, false);
        assert!(plan.done(cur + usize::from(c), pend + usize::from(p)));
        // a Joining owner counts for the new placement even while catching up
        assert_eq!(plan.counts(&v, 3, true), (false, true));
        // too few new owners take writes: refused before writing
        let v = view(&[Up, Up, Up, Failed, Failed], &[0, 1, 2], Some(&[2, 3, 4]));
        let refused = WritePlan::new(&v, b"k", Consistency::Quorum)
            .map_err(ApiError::from)
            .err();
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| e.status == 503 && e.message.contains("new owners")),
            "{refused:?}"
        );
    }
}
