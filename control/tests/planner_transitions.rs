//! The planner's rules, one scenario each: create, hold down, release and
//! recover, failure detection, scale up and down, factor and strategy
//! changes, replaced and cancelled rebalances, and every refusal.

mod planner_support;

use kv_control::planner::{Action, Desired, Phase, Rebalance};
use kv_core::{Consistency, NodeState, Strategy};
use planner_support::*;

use NodeState::{Failed, Joining, Leaving, Recovering, Up};

fn held(replicas: u32, ordinals: &[u32]) -> Desired {
    Desired {
        replicas,
        failed_nodes: ordinals.iter().copied().collect(),
        ..Desired::default()
    }
}

#[test]
fn a_new_cluster_starts_every_node_up_above_the_epoch_floor() {
    let mut o = observed(None, vec![]);
    o.epoch_floor = 41;
    let p = step(&desired(3), &o);
    let t = p.topology.clone().expect("a first topology");
    assert_eq!(t.epoch, 42);
    assert_eq!(t.cluster_id, "ns/demo");
    assert_eq!(t.placement.members, [0, 1, 2]);
    assert_eq!(t.placement.strategy, Strategy::ConsistentHashing);
    assert_eq!(t.placement.factor, 3);
    assert_eq!(t.pending, None);
    assert_eq!(states(&t), [(0, Up), (1, Up), (2, Up)]);
    assert_eq!(t.nodes[2].address, "n2:7400");
    assert_eq!(t.nodes[2].peer_address, "n2:7401");
    assert_eq!(p.phase, Phase::Creating);
    assert_eq!(p.node_count, 3);
    assert_eq!(
        p.actions,
        [
            Action::PushTopology,
            Action::Start(0),
            Action::Start(1),
            Action::Start(2)
        ]
    );
    assert!(
        p.transitions
            .iter()
            .all(|tr| tr.from.is_none() && tr.to == Up)
    );

    // Planning again on the result changes nothing.
    let again = step(&desired(3), &observed(Some(t.clone()), all_synced(3, 42)));
    assert_eq!(again.topology, None);
    assert_eq!(again.phase, Phase::Running);
    assert!(again.actions.is_empty(), "{:?}", again.actions);
}

#[test]
fn a_new_cluster_starts_above_every_epoch_a_node_still_holds() {
    let o = observed(None, vec![(0, reporting(40, 40)), (1, reporting(57, 57))]);
    assert_eq!(step(&desired(3), &o).topology.map(|t| t.epoch), Some(58));
}

#[test]
fn full_replication_records_every_member_as_an_owner() {
    let d = Desired {
        strategy: Strategy::Full,
        factor: 1,
        ..desired(4)
    };
    let t = step(&d, &observed(None, vec![]))
        .topology
        .expect("topology");
    assert_eq!(t.placement.factor, 4);
    assert_eq!(t.placement.effective_factor(), 4);
}

#[test]
fn a_held_down_node_is_killed_once_and_stays_failed_while_it_runs_again() {
    let (t, _) = settle(&desired(3), None, 3);
    let d = held(3, &[1]);
    let p = step(&d, &observed(Some(t.clone()), all_synced(3, t.epoch)));
    let t1 = p.topology.clone().expect("node 1 is fenced");
    assert_eq!(t1.epoch, t.epoch + 1);
    assert_eq!(states(&t1), [(0, Up), (1, Failed), (2, Up)]);
    assert_eq!(p.actions, [Action::Kill(1), Action::PushTopology]);
    assert_eq!(p.phase, Phase::Degraded);
    assert_eq!(p.transitions.len(), 1);
    assert_eq!(
        (p.transitions[0].from, p.transitions[0].to),
        (Some(Up), Failed)
    );

    // Killed: not restarted while held down.
    let gone = step(
        &d,
        &observed(
            Some(t1.clone()),
            vec![
                (0, reporting(t1.epoch, t1.epoch)),
                (1, down(NOW - 60_000)),
                (2, reporting(t1.epoch, t1.epoch)),
            ],
        ),
    );
    assert_eq!(gone.topology, None);
    assert!(gone.actions.is_empty(), "{:?}", gone.actions);

    // Running again (Kubernetes restarts the pod), even caught up: still fenced, not killed again.
    let back = step(&d, &observed(Some(t1.clone()), all_synced(3, t1.epoch)));
    assert_eq!(back.topology, None);
    assert!(back.actions.is_empty(), "{:?}", back.actions);
    assert_eq!(back.nodes[1].state, Failed);
}

#[test]
fn a_released_node_recovers_and_is_up_only_once_synced_at_its_recovering_epoch() {
    let (t, _) = settle(&held(3, &[1]), None, 3);
    assert_eq!(t.state_of(1), Some(Failed));
    let d = desired(3);

    // Released but not running yet: started, still Failed.
    let p = step(
        &d,
        &observed(
            Some(t.clone()),
            vec![
                (0, reporting(t.epoch, t.epoch)),
                (1, down(NOW - 60_000)),
                (2, reporting(t.epoch, t.epoch)),
            ],
        ),
    );
    assert_eq!(p.topology, None);
    assert_eq!(p.actions, [Action::Start(1)]);

    // Running with a report: Recovering, even if it claims to be synced at the old epoch.
    let p = step(&d, &observed(Some(t.clone()), all_synced(3, t.epoch)));
    let t1 = p.topology.clone().expect("node 1 recovers");
    assert_eq!(t1.state_of(1), Some(Recovering));
    assert_eq!(p.transitions[0].from, Some(Failed));
    assert_eq!(p.phase, Phase::Degraded);

    // Not Up while its synced epoch is below the epoch that made it Recovering.
    let mut nodes = all_synced(3, t1.epoch);
    nodes[1].1 = reporting(t1.epoch, t1.epoch - 1);
    if let Some(r) = nodes[1].1.report.as_mut() {
        r.resync_progress = 0.42;
    }
    let p = step(&d, &observed(Some(t1.clone()), nodes));
    assert_eq!(p.topology, None);
    assert_eq!(p.nodes[1].state, Recovering);
    assert_eq!(p.nodes[1].resync_progress, Some(0.42));

    // Synced at that epoch: Up.
    let p = step(&d, &observed(Some(t1.clone()), all_synced(3, t1.epoch)));
    let t2 = p.topology.clone().expect("node 1 is Up");
    assert_eq!(t2.state_of(1), Some(Up));
    assert_eq!(p.phase, Phase::Running);
    assert_eq!(
        (p.transitions[0].from, p.transitions[0].to),
        (Some(Recovering), Up)
    );
}

#[test]
fn a_node_is_failed_after_the_failure_detection_time_and_not_before() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut nodes = all_synced(3, t.epoch);
    nodes[2].1 = down(NOW - 9_999);
    let p = step(&desired(3), &observed(Some(t.clone()), nodes.clone()));
    assert_eq!(p.topology, None, "9.999 s is within the detection time");
    assert_eq!(p.actions, [Action::Start(2)], "a dead process is restarted");

    nodes[2].1 = down(NOW - 10_000);
    let p = step(&desired(3), &observed(Some(t.clone()), nodes.clone()));
    let t1 = p.topology.clone().expect("node 2 failed");
    assert_eq!(t1.state_of(2), Some(Failed));
    assert!(
        p.kills().next().is_none(),
        "a node that failed on its own is not killed"
    );
    assert!(p.transitions[0].reason.contains("10000 ms"));

    // Running but not answering for long (down_since set by the caller): Failed too, and stays so.
    nodes[2].1 = running();
    nodes[2].1.down_since_ms = Some(NOW - 20_000);
    let p = step(&desired(3), &observed(Some(t.clone()), nodes.clone()));
    assert_eq!(p.topology.map(|t| t.state_of(2)), Some(Some(Failed)));
    let p = step(&desired(3), &observed(Some(t1.clone()), nodes.clone()));
    assert_eq!(p.topology, None, "a hung node does not flap to Recovering");

    // No observation and no known down time: not Failed yet, but started.
    let p = step(
        &desired(3),
        &observed(Some(t.clone()), all_synced(2, t.epoch)),
    );
    assert_eq!(p.topology, None);
    assert_eq!(p.actions, [Action::Start(2)]);
}

#[test]
fn scaling_3_to_5_to_3_commits_only_after_reports_and_stops_leavers_last() {
    let (t3, _) = settle(&desired(3), None, 3);
    let d5 = desired(5);

    // The new nodes are started first; they become owners once they answer.
    let p = step(&d5, &observed(Some(t3.clone()), all_synced(3, t3.epoch)));
    assert_eq!(p.topology, None, "nodes 3 and 4 do not run yet");
    assert_eq!(p.actions, [Action::Start(3), Action::Start(4)]);
    assert_eq!(p.node_count, 5);
    assert_eq!(p.phase, Phase::Rebalancing);
    let mut nodes = all_synced(3, t3.epoch);
    nodes.push((3, reporting(t3.epoch, 0)));
    nodes.push((4, running()));
    let p = step(&d5, &observed(Some(t3.clone()), nodes));
    assert_eq!(p.topology, None, "node 4 runs but does not answer yet");
    assert_eq!(
        p.actions,
        [],
        "nothing to start, and 3 and 4 are not stopped"
    );
    assert_eq!(p.node_count, 5);

    let p = step(&d5, &observed(Some(t3.clone()), all_synced(5, t3.epoch)));
    let t = p.topology.clone().expect("a rebalance starts");
    assert_eq!(p.rebalance, Some(Rebalance::Started));
    assert_eq!(p.phase, Phase::Rebalancing);
    assert_eq!(
        t.placement.members,
        [0, 1, 2],
        "reads stay on the old owners"
    );
    assert_eq!(
        t.pending.as_ref().map(|p| p.members.clone()),
        Some(vec![0, 1, 2, 3, 4])
    );
    assert_eq!(
        states(&t),
        [(0, Up), (1, Up), (2, Up), (3, Joining), (4, Joining)]
    );
    assert_eq!(p.node_count, 5);
    assert_eq!(p.actions, [Action::PushTopology]);

    // Joiners reporting an older synced epoch: not committed.
    let mut nodes = all_synced(5, t.epoch);
    nodes[4].1 = reporting(t.epoch, t.epoch - 1);
    assert_eq!(step(&d5, &observed(Some(t.clone()), nodes)).topology, None);
    // An old owner behind blocks the commit too.
    let mut nodes = all_synced(5, t.epoch);
    nodes[0].1 = reporting(t.epoch, t.epoch - 1);
    assert_eq!(step(&d5, &observed(Some(t.clone()), nodes)).topology, None);

    let p = step(&d5, &observed(Some(t.clone()), all_synced(5, t.epoch)));
    let t5 = p.topology.clone().expect("committed");
    assert_eq!(p.rebalance, Some(Rebalance::Committed));
    assert_eq!(t5.pending, None);
    assert_eq!(t5.placement.members, [0, 1, 2, 3, 4]);
    assert!(t5.nodes.iter().all(|n| n.state == Up));
    assert_eq!(p.transitions.len(), 2);
    assert!(
        p.transitions
            .iter()
            .all(|tr| tr.from == Some(Joining) && tr.to == Up)
    );

    // Back to 3: 3 and 4 leave, keep serving, keep their processes.
    let d3 = desired(3);
    let p = step(&d3, &observed(Some(t5.clone()), all_synced(5, t5.epoch)));
    let t = p.topology.clone().expect("a rebalance starts");
    assert_eq!(
        states(&t),
        [(0, Up), (1, Up), (2, Up), (3, Leaving), (4, Leaving)]
    );
    assert_eq!(p.node_count, 5);
    assert!(!p.actions.iter().any(|a| matches!(a, Action::Stop(_))));
    let mut nodes = all_synced(5, t.epoch);
    nodes[1].1 = reporting(t.epoch, t.epoch - 1);
    let wait = step(&d3, &observed(Some(t.clone()), nodes));
    assert_eq!(wait.topology, None);
    assert!(!wait.actions.iter().any(|a| matches!(a, Action::Stop(_))));
    // A leaving node that has not got the pending placement yet still
    // coordinates writes to the old owners only: no commit, and it is
    // pushed to again.
    let mut nodes = all_synced(5, t.epoch);
    nodes[4].1 = reporting(t.epoch - 1, t.epoch - 1);
    let wait = step(&d3, &observed(Some(t.clone()), nodes));
    assert_eq!(wait.topology, None);
    assert_eq!(wait.actions, [Action::PushTopology]);

    let p = step(&d3, &observed(Some(t.clone()), all_synced(5, t.epoch)));
    let t3b = p.topology.clone().expect("committed");
    assert_eq!(t3b.placement.members, [0, 1, 2]);
    assert_eq!(states(&t3b), [(0, Up), (1, Up), (2, Up)]);
    assert_eq!(p.removed, [3, 4]);
    assert_eq!(
        p.actions,
        [Action::PushTopology],
        "the topology without them goes out; they run until every node has it"
    );
    assert_eq!(p.node_count, 5);
    assert_eq!(p.phase, Phase::Running);

    // Node 2 still answers with the pending topology: it may route to 3 or 4.
    let mut nodes = all_synced(5, t.epoch);
    for n in nodes.iter_mut().take(2) {
        n.1 = reporting(t3b.epoch, t3b.epoch);
    }
    let wait = step(&d3, &observed(Some(t3b.clone()), nodes));
    assert_eq!(wait.topology, None);
    assert_eq!(
        wait.actions,
        [Action::PushTopology],
        "pushed again to node 2"
    );
    assert_eq!(wait.node_count, 5);
    // A retiring node behind does not matter: it is not routed to by anyone.
    let mut nodes = all_synced(5, t.epoch);
    for n in nodes.iter_mut().take(3) {
        n.1 = reporting(t3b.epoch, t3b.epoch);
    }
    let p = step(&d3, &observed(Some(t3b.clone()), nodes));
    assert_eq!(p.topology, None);
    assert_eq!(p.actions, [Action::Stop(3), Action::Stop(4)]);
    assert_eq!(p.node_count, 3);
}

#[test]
fn a_pending_placement_is_not_committed_while_some_bucket_has_no_live_owner() {
    let d = Desired {
        replicas: 2,
        factor: 1,
        ..Desired::default()
    };
    let (t2, _) = settle(&d, None, 2);
    let d3 = Desired { replicas: 3, ..d };
    let p = step(&d3, &observed(Some(t2.clone()), all_synced(3, t2.epoch)));
    let t = p.topology.expect("pending");
    // The joiner dies before streaming in: Failed. The others are synced,
    // but the buckets only node 2 would own have no live owner.
    let mut nodes = all_synced(2, t.epoch);
    nodes.push((2, down(0)));
    let p = step(&d3, &observed(Some(t.clone()), nodes.clone()));
    let t = p.topology.expect("node 2 failed");
    assert_eq!(t.state_of(2), Some(Failed));
    assert!(t.pending.is_some());
    let mut nodes = all_synced(2, t.epoch);
    nodes.push((2, down(0)));
    let p = step(&d3, &observed(Some(t.clone()), nodes));
    assert_eq!(p.topology, None, "committing would lose those buckets");
}

#[test]
fn a_failed_owner_does_not_block_the_commit_when_every_bucket_keeps_a_live_one() {
    let (t3, _) = settle(&desired(3), None, 3);
    let p = step(
        &desired(4),
        &observed(Some(t3.clone()), all_synced(4, t3.epoch)),
    );
    let t = p.topology.expect("pending");
    let mut nodes = all_synced(4, t.epoch);
    nodes[0].1 = down(0);
    nodes[3].1 = reporting(t.epoch, t.epoch - 1);
    let t = step(&desired(4), &observed(Some(t.clone()), nodes))
        .topology
        .expect("node 0 failed");
    let mut nodes = all_synced(4, t.epoch);
    nodes[0].1 = down(0);
    let p = step(&desired(4), &observed(Some(t.clone()), nodes.clone()));
    let t4 = p.topology.expect("committed without node 0");
    assert_eq!(t4.placement.members, [0, 1, 2, 3]);
    assert_eq!(states(&t4), [(0, Failed), (1, Up), (2, Up), (3, Up)]);
}

#[test]
fn a_node_back_from_failed_does_not_count_as_synced_for_the_commit_in_the_same_plan() {
    let (t3, _) = settle(&desired(3), None, 3);
    let t = step(
        &desired(4),
        &observed(Some(t3.clone()), all_synced(4, t3.epoch)),
    )
    .topology
    .expect("pending");
    let mut nodes = all_synced(4, t.epoch);
    nodes[3].1 = down(0);
    nodes[0].1 = reporting(t.epoch, t.epoch - 1);
    let t = step(&desired(4), &observed(Some(t.clone()), nodes))
        .topology
        .expect("joiner 3 failed");
    assert!(t.pending.is_some(), "node 0 is not synced yet");
    // It comes back claiming to be synced at this epoch (it pulled while fenced).
    let p = step(
        &desired(4),
        &observed(Some(t.clone()), all_synced(4, t.epoch)),
    );
    let t = p.topology.expect("joiner 3 is back");
    assert_eq!(t.state_of(3), Some(Joining));
    assert!(
        t.pending.is_some(),
        "not committed in the plan it came back in"
    );
    let (t, _) = settle(&desired(4), Some(t), 4);
    assert_eq!(t.placement.members, [0, 1, 2, 3]);
    assert_eq!(t.state_of(3), Some(Up));
}

#[test]
fn a_leaving_node_that_dies_is_failed_and_dropped_at_the_commit() {
    let (t5, _) = settle(&desired(5), None, 5);
    let t = step(
        &desired(3),
        &observed(Some(t5.clone()), all_synced(5, t5.epoch)),
    )
    .topology
    .expect("pending");
    let mut nodes = all_synced(5, t.epoch);
    nodes[4].1 = down(0);
    nodes[0].1 = reporting(t.epoch, t.epoch - 1);
    let t = step(&desired(3), &observed(Some(t.clone()), nodes))
        .topology
        .expect("failed");
    assert_eq!(t.state_of(4), Some(Failed), "a dead node serves nothing");
    let mut nodes = all_synced(5, t.epoch);
    nodes[4].1 = down(0);
    let p = step(&desired(3), &observed(Some(t), nodes));
    let t = p.topology.expect("committed");
    assert_eq!(t.placement.members, [0, 1, 2]);
    assert_eq!(t.state_of(4), None);
    assert_eq!(p.actions, [Action::PushTopology]);
    let mut nodes = all_synced(4, t.epoch);
    nodes[3].1 = reporting(t.epoch - 1, t.epoch - 1);
    nodes.push((4, down(0)));
    let p = step(&desired(3), &observed(Some(t), nodes));
    assert_eq!(p.actions, [Action::Stop(3)], "the dead one needs no stop");
    assert_eq!(p.node_count, 3);
}

#[test]
fn a_factor_change_rebalances_over_the_same_members() {
    let (t, _) = settle(&desired(3), None, 3);
    let d = Desired {
        factor: 2,
        ..desired(3)
    };
    let p = step(&d, &observed(Some(t.clone()), all_synced(3, t.epoch)));
    let t1 = p.topology.expect("pending");
    assert_eq!(p.rebalance, Some(Rebalance::Started));
    assert_eq!(t1.placement.factor, 3);
    assert_eq!(t1.pending.as_ref().map(|p| p.factor), Some(2));
    assert!(
        t1.nodes.iter().all(|n| n.state == Up),
        "nobody joins or leaves"
    );
    let (t2, plans) = settle(&d, Some(t1), 3);
    assert_eq!(plans[0].rebalance, Some(Rebalance::Committed));
    assert_eq!(t2.placement.factor, 2);
    assert_eq!(t2.pending, None);
}

#[test]
fn the_strategy_changes_full_to_consistent_hashing_and_back() {
    let full = Desired {
        strategy: Strategy::Full,
        ..desired(3)
    };
    let ch = Desired {
        factor: 2,
        ..desired(3)
    };
    let (t, _) = settle(&full, None, 3);
    assert_eq!(t.placement.strategy, Strategy::Full);
    let p = step(&ch, &observed(Some(t.clone()), all_synced(3, t.epoch)));
    let t1 = p.topology.expect("pending");
    assert_eq!(t1.placement.strategy, Strategy::Full);
    assert_eq!(
        t1.pending.as_ref().map(|p| (p.strategy, p.factor)),
        Some((Strategy::ConsistentHashing, 2))
    );
    let (t2, _) = settle(&ch, Some(t1), 3);
    assert_eq!(t2.placement.strategy, Strategy::ConsistentHashing);
    assert_eq!(t2.pending, None);

    // Back to Full: the nodes gain buckets, so the commit waits for them.
    let p = step(&full, &observed(Some(t2.clone()), all_synced(3, t2.epoch)));
    let t3 = p.topology.expect("pending");
    let mut nodes = all_synced(3, t3.epoch);
    nodes[2].1 = reporting(t3.epoch, t2.epoch);
    assert_eq!(
        step(&full, &observed(Some(t3.clone()), nodes)).topology,
        None
    );
    let (t4, _) = settle(&full, Some(t3), 3);
    assert_eq!(t4.placement.strategy, Strategy::Full);
    assert_eq!(t4.placement.factor, 3);
}

#[test]
fn a_new_request_replaces_a_pending_placement_and_restarts_streaming() {
    let (t3, _) = settle(&desired(3), None, 3);
    let t = step(
        &desired(5),
        &observed(Some(t3.clone()), all_synced(5, t3.epoch)),
    )
    .topology
    .expect("pending 5");
    // Now 4: node 4's join is cancelled; 3 keeps joining at a new epoch.
    let p = step(
        &desired(4),
        &observed(Some(t.clone()), all_synced(5, t.epoch)),
    );
    let t4 = p.topology.clone().expect("pending 4");
    assert_eq!(p.rebalance, Some(Rebalance::Replaced));
    assert!(t4.epoch > t.epoch);
    assert_eq!(
        t4.pending.as_ref().map(|p| p.members.clone()),
        Some(vec![0, 1, 2, 3])
    );
    assert_eq!(t4.placement.members, [0, 1, 2]);
    assert_eq!(states(&t4), [(0, Up), (1, Up), (2, Up), (3, Joining)]);
    assert_eq!(p.removed, [4]);
    assert!(
        !p.actions.contains(&Action::Stop(4)),
        "nodes still write to the cancelled joiner until they have this topology"
    );
    assert_eq!(p.node_count, 5);
    let mut nodes = all_synced(5, t.epoch);
    for n in nodes.iter_mut().take(4) {
        n.1 = reporting(t4.epoch, t.epoch);
    }
    let stop = step(&desired(4), &observed(Some(t4.clone()), nodes));
    assert!(stop.actions.contains(&Action::Stop(4)));
    assert_eq!(stop.node_count, 4);
    // Synced at the old epoch is not enough any more.
    let p = step(
        &desired(4),
        &observed(Some(t4.clone()), all_synced(4, t.epoch)),
    );
    assert_eq!(p.topology, None);
    let (t, _) = settle(&desired(4), Some(t4), 4);
    assert_eq!(t.placement.members, [0, 1, 2, 3]);
}

#[test]
fn asking_for_the_committed_placement_again_cancels_the_rebalance() {
    let (t3, _) = settle(&desired(3), None, 3);
    let t = step(
        &desired(5),
        &observed(Some(t3.clone()), all_synced(5, t3.epoch)),
    )
    .topology
    .expect("pending 5");
    let p = step(
        &desired(3),
        &observed(Some(t.clone()), all_synced(5, t.epoch)),
    );
    let t1 = p.topology.clone().expect("cancelled");
    assert_eq!(p.rebalance, Some(Rebalance::Cancelled));
    assert_eq!(t1.pending, None);
    assert_eq!(states(&t1), [(0, Up), (1, Up), (2, Up)]);
    assert_eq!(p.node_count, 5);
    assert_eq!(p.actions, [Action::PushTopology]);
    let mut nodes = all_synced(5, t.epoch);
    for n in nodes.iter_mut().take(3) {
        n.1 = reporting(t1.epoch, t1.epoch);
    }
    let p = step(&desired(3), &observed(Some(t1.clone()), nodes));
    assert_eq!(p.node_count, 3);
    assert_eq!(p.actions, [Action::Stop(3), Action::Stop(4)]);
}

#[test]
fn a_leaving_node_kept_by_a_replacing_placement_is_up_again() {
    let (t5, _) = settle(&desired(5), None, 5);
    let t = step(
        &desired(3),
        &observed(Some(t5.clone()), all_synced(5, t5.epoch)),
    )
    .topology
    .expect("pending 3");
    let p = step(
        &desired(4),
        &observed(Some(t.clone()), all_synced(5, t.epoch)),
    );
    let t = p.topology.expect("pending 4");
    assert_eq!(
        states(&t),
        [(0, Up), (1, Up), (2, Up), (3, Up), (4, Leaving)]
    );
}

#[test]
fn consistency_changes_raise_the_epoch_without_a_rebalance() {
    let (t, _) = settle(&desired(3), None, 3);
    let d = Desired {
        read_consistency: Consistency::One,
        ..desired(3)
    };
    let p = step(&d, &observed(Some(t.clone()), all_synced(3, t.epoch)));
    let t1 = p.topology.expect("changed");
    assert_eq!(t1.epoch, t.epoch + 1);
    assert_eq!(t1.read_consistency, Consistency::One);
    assert_eq!(p.rebalance, None);
}

#[test]
fn a_stored_topology_below_the_floor_is_issued_again_above_it() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut o = observed(Some(t.clone()), all_synced(3, t.epoch));
    o.epoch_floor = t.epoch + 10;
    let p = step(&desired(3), &o);
    let t1 = p.topology.expect("reissued");
    assert_eq!(t1.epoch, t.epoch + 11);
    assert_eq!(t1.nodes, t.nodes);
    // A node holding a newer epoch than the stored topology, too.
    let mut nodes = all_synced(3, t.epoch);
    nodes[1].1 = reporting(t.epoch + 3, t.epoch);
    let p = step(&desired(3), &observed(Some(t.clone()), nodes));
    assert_eq!(p.topology.map(|t| t.epoch), Some(t.epoch + 4));
}

#[test]
fn nodes_behind_the_current_epoch_get_the_topology_pushed() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut nodes = all_synced(3, t.epoch);
    nodes[1].1 = reporting(t.epoch - 1, t.epoch - 1);
    let p = step(&desired(3), &observed(Some(t), nodes));
    assert_eq!(p.topology, None);
    assert_eq!(p.actions, [Action::PushTopology]);
}

#[test]
fn every_unsafe_or_impossible_request_is_refused_and_changes_nothing() {
    let (t, _) = settle(&desired(3), None, 3);
    let refuse = |d: &Desired, needle: &str| {
        let p = step(d, &observed(Some(t.clone()), all_synced(3, t.epoch)));
        let r = p.refusal.clone().unwrap_or_else(|| panic!("{d:?} refused"));
        assert!(r.reason.contains(needle), "{:?} lacks {needle:?}", r.reason);
        assert_eq!(p.topology, None);
        assert!(p.actions.is_empty() && p.transitions.is_empty());
        assert_eq!(p.phase, Phase::Failed);
        assert_eq!(p.node_count, 3, "what runs keeps running");
    };
    refuse(&desired(0), "replicas must be at least 1");
    refuse(
        &Desired {
            factor: 0,
            ..desired(3)
        },
        "factor must be at least 1",
    );
    refuse(
        &Desired {
            factor: 0,
            strategy: Strategy::Full,
            ..desired(3)
        },
        "factor must be at least 1",
    );
    refuse(
        &Desired {
            factor: 4,
            ..desired(3)
        },
        "factor 4 exceeds replicas 3",
    );
    refuse(&held(3, &[3]), "failed node 3 is not a node");
    refuse(&desired(5000), "at most");
    // Quorum of 3 needs 2 live owners: holding down 2 makes writes impossible.
    refuse(&held(3, &[0, 2]), "need 2");
    // All needs every owner.
    refuse(
        &Desired {
            write_consistency: Consistency::All,
            ..held(3, &[1])
        },
        "writes at All need 3",
    );
    // Factor 3 > replicas is fine with Full.
    let full = Desired {
        strategy: Strategy::Full,
        factor: 5,
        ..desired(3)
    };
    assert_eq!(
        step(&full, &observed(Some(t.clone()), all_synced(3, t.epoch))).refusal,
        None
    );
}

#[test]
fn holding_down_a_node_next_to_one_already_failed_is_refused_unless_forced() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut nodes = all_synced(3, t.epoch);
    nodes[0].1 = down(0);
    let t1 = step(&desired(3), &observed(Some(t.clone()), nodes.clone()))
        .topology
        .expect("node 0 failed");
    let o = observed(Some(t1.clone()), nodes);
    let p = step(&held(3, &[1]), &o);
    assert!(p.refusal.is_some(), "node 0 is down, node 1 would be too");
    let forced = Desired {
        force: true,
        ..held(3, &[1])
    };
    let p = step(&forced, &o);
    assert_eq!(p.refusal, None);
    assert_eq!(p.topology.map(|t| t.state_of(1)), Some(Some(Failed)));
    assert_eq!(p.actions.first(), Some(&Action::Kill(1)));
    // Holding down the node that is already Failed is fine: it changes nothing for writes.
    assert_eq!(step(&held(3, &[0]), &o).refusal, None);
}

#[test]
fn an_accepted_hold_of_a_node_still_to_come_is_not_refused_when_another_node_crashes() {
    // Growing 1 -> 4 with node 1 held down: node 1 stays out of the topology
    // while nodes 2 and 3 start. A crash of node 0 meanwhile must not turn
    // the spec the planner accepted into a refused one: a refused plan has no
    // actions, so the cluster would no longer be operated at all.
    let one = Desired {
        factor: 1,
        ..desired(1)
    };
    let (t, _) = settle(&one, None, 1);
    let grown = Desired {
        strategy: Strategy::Full,
        ..held(4, &[1])
    };
    let nodes = vec![(0, down(0)), (2, running()), (3, running())];
    let o = observed(Some(t.clone()), nodes.clone());
    let p = step(&grown, &o);
    assert_eq!(p.refusal, None);
    let t1 = after(&p, &o);
    assert_eq!(t1.state_of(0), Some(Failed), "node 0 crashed long ago");
    assert_eq!(t1.state_of(1), None, "node 1 joins with the new placement");
    let again = step(&grown, &observed(Some(t1), nodes));
    assert_eq!(again.refusal, None, "refused on its own output");
    // A hold that would leave the target placement short is still refused.
    let too_many = Desired {
        strategy: Strategy::Full,
        ..held(4, &[1, 2])
    };
    let p = step(&too_many, &observed(Some(t), vec![(0, reporting(1, 1))]));
    assert!(p.refusal.is_some(), "2 of 4 live, quorum needs 3");
}

#[test]
fn a_first_plan_holding_down_too_many_nodes_is_refused() {
    let p = step(&held(2, &[0]), &observed(None, vec![]));
    assert!(p.refusal.is_some());
    assert_eq!(p.node_count, 0);
    let p = step(&held(3, &[0]), &observed(None, vec![]));
    let t = p.topology.expect("created");
    assert_eq!(states(&t), [(0, Failed), (1, Up), (2, Up)]);
    assert_eq!(
        p.actions,
        [
            Action::Kill(0),
            Action::PushTopology,
            Action::Start(1),
            Action::Start(2)
        ]
    );
}

#[test]
fn a_changed_node_address_is_a_new_topology() {
    let (t, _) = settle(&desired(3), None, 3);
    let o = observed(Some(t.clone()), all_synced(3, t.epoch));
    let moved = kv_control::planner::PlannerConfig::new(|o| {
        (
            format!("127.0.0.1:{}", 7000 + o),
            format!("127.0.0.1:{}", 8000 + o),
        )
    });
    let p = kv_control::planner::plan(&desired(3), &o, &moved);
    let t1 = p.topology.expect("moved");
    assert_eq!(t1.nodes[1].address, "127.0.0.1:7001");
    assert_eq!(t1.epoch, t.epoch + 1);
}

#[test]
fn a_bad_address_is_refused_rather_than_written() {
    let bad = kv_control::planner::PlannerConfig::new(|_| ("nohost".into(), "x".into()));
    let p = kv_control::planner::plan(&desired(3), &observed(None, vec![]), &bad);
    assert!(
        p.refusal
            .as_ref()
            .is_some_and(|r| r.reason.contains("address"))
    );
    assert_eq!(p.topology, None);
}

fn hibernating(replicas: u32) -> Desired {
    Desired {
        hibernate: true,
        ..desired(replicas)
    }
}

#[test]
fn hibernation_stops_every_node_and_keeps_the_topology_with_no_node_failed() {
    let (t, _) = settle(&desired(3), None, 3);
    // Pods already gone for far longer than failure detection: stopped on
    // request, not failed.
    let o = observed(
        Some(t.clone()),
        vec![(0, reporting(t.epoch, t.epoch)), (1, down(0)), (2, down(0))],
    );
    let p = step(&hibernating(3), &o);
    assert_eq!(p.topology, None, "the topology is kept as it is");
    assert_eq!(p.phase, Phase::Hibernated);
    assert_eq!(p.node_count, 0);
    assert_eq!(p.actions, [Action::Stop(0)]);
    assert!(p.transitions.is_empty());
    assert!(p.nodes.iter().all(|n| n.state == Up));
    assert_eq!(p.hibernation_deferred, None);

    // Waking up: the nodes come back with the same topology and are Up at
    // once; nothing to catch up, no new epoch.
    let back = step(
        &desired(3),
        &observed(Some(t.clone()), all_synced(3, t.epoch)),
    );
    assert_eq!(back.topology, None);
    assert_eq!(back.phase, Phase::Running);
    assert_eq!(back.node_count, 3);
}

#[test]
fn a_spec_change_made_while_hibernated_waits_for_the_wake_up() {
    let (t, _) = settle(&desired(3), None, 3);
    let p = step(&hibernating(5), &observed(Some(t.clone()), vec![]));
    assert_eq!(
        (p.topology, p.phase, p.rebalance),
        (None, Phase::Hibernated, None)
    );
    let woken = step(
        &desired(5),
        &observed(Some(t.clone()), all_synced(3, t.epoch)),
    );
    assert_eq!(woken.phase, Phase::Rebalancing, "carried out once awake");
}

#[test]
fn hibernation_waits_while_a_placement_change_is_pending() {
    let (t3, _) = settle(&desired(3), None, 3);
    let o = observed(Some(t3.clone()), all_synced(5, t3.epoch));
    let started = after(&step(&desired(5), &o), &o);
    assert!(started.pending.is_some());
    // Nothing has streamed yet at the pending epoch.
    let o = observed(Some(started.clone()), all_synced(5, t3.epoch));
    let p = step(&hibernating(5), &o);
    assert_eq!(p.phase, Phase::Rebalancing);
    assert_eq!(p.node_count, 5, "every node keeps running");
    let why = p.hibernation_deferred.expect("deferred");
    assert!(why.contains("pending placement change"), "{why}");

    // Once committed, it hibernates.
    let (done, _) = settle(&desired(5), Some(started), 5);
    assert_eq!(done.pending, None);
    let p = step(&hibernating(5), &observed(Some(done), all_synced(5, 0)));
    assert_eq!(p.phase, Phase::Hibernated);
}

#[test]
fn a_cluster_created_hibernated_gets_its_first_topology_and_no_pods() {
    let p = step(&hibernating(3), &observed(None, vec![]));
    let t = p.topology.expect("a first topology");
    assert_eq!(states(&t), [(0, Up), (1, Up), (2, Up)]);
    assert_eq!((p.phase, p.node_count), (Phase::Hibernated, 0));
    assert!(p.actions.is_empty());
}
