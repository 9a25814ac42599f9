use super::*;
use kv_core::NodeState;
use kv_crd::kvcluster::{Condition, KvClusterStatus, NodeStatus, Phase};
use kv_crd::kvcluster::{FORCE_FAULT_INJECTION, KvCluster};
use serde_json::json;

fn cluster(spec_yaml: &str, states: &[NodeState]) -> KvCluster {
    let mut kvc = KvCluster::new("demo", serde_yaml::from_str(spec_yaml).expect("spec"));
    kvc.metadata.namespace = Some("ns".into());
    kvc.metadata.generation = Some(3);
    kvc.status = Some(KvClusterStatus {
        phase: Some(Phase::Running),
        observed_generation: Some(3),
        ready_replicas: states.iter().filter(|s| **s == NodeState::Up).count() as u32,
        topology_epoch: 7,
        nodes: states
            .iter()
            .enumerate()
            .map(|(i, s)| NodeStatus {
                ordinal: i as u32,
                pod: format!("demo-{i}"),
                state: *s,
                resync_progress: None,
                unreachable_since: None,
                tokens: None,
            })
            .collect(),
        conditions: vec![],
        accepted_spec: None,
        last_restart: None,
        bootstrap: None,
        last_verify: None,
    });
    kvc
}

const UP3: [NodeState; 3] = [NodeState::Up, NodeState::Up, NodeState::Up];

#[test]
fn hold_down_appends_once_and_release_removes_every_copy() {
    assert_eq!(hold_down(&[], 1), vec![1]);
    assert_eq!(hold_down(&[2], 0), vec![2, 0]);
    assert_eq!(hold_down(&[2, 0], 0), vec![2, 0]);
    assert_eq!(release(&[2, 0], 2), vec![0]);
    assert_eq!(release(&[0], 2), vec![0]);
    assert_eq!(release(&[1, 1], 1), Vec::<u32>::new());
}

fn change(failed_nodes: &[u32], force: ForceEdit) -> Change {
    Change {
        failed_nodes: failed_nodes.to_vec(),
        force,
    }
}

fn annotate(kvc: &mut KvCluster, value: &str) {
    kvc.metadata.annotations =
        Some([(FORCE_FAULT_INJECTION.to_string(), value.to_string())].into());
}

#[test]
fn the_patch_carries_the_resource_version_it_was_computed_from() {
    assert_eq!(
        fault_injection_patch("41", &change(&[1, 2], ForceEdit::Keep)),
        json!({"metadata": {"resourceVersion": "41"},
               "spec": {"faultInjection": {"failedNodes": [1, 2]}}})
    );
    assert_eq!(
        fault_injection_patch("9", &change(&[], ForceEdit::Keep))["spec"]["faultInjection"]["failedNodes"],
        json!([])
    );
}

#[test]
fn the_patch_sets_or_removes_the_force_annotation_next_to_the_list() {
    assert_eq!(
        fault_injection_patch("41", &change(&[1, 2], ForceEdit::Set)),
        json!({"metadata": {"resourceVersion": "41",
                            "annotations": {"kvstore.dev/force-fault-injection": "true"}},
               "spec": {"faultInjection": {"failedNodes": [1, 2]}}})
    );
    assert_eq!(
        fault_injection_patch("42", &change(&[], ForceEdit::Remove)),
        json!({"metadata": {"resourceVersion": "42",
                            "annotations": {"kvstore.dev/force-fault-injection": null}},
               "spec": {"faultInjection": {"failedNodes": []}}})
    );
}

#[test]
fn fail_with_force_sets_the_annotation_once_and_without_force_leaves_it() {
    let mut kvc = cluster(
        "{replicas: 3, faultInjection: {failedNodes: [1]}}",
        &[NodeState::Up, NodeState::Failed, NodeState::Up],
    );
    assert_eq!(
        fail_change(&kvc, 2, true).expect("forced"),
        change(&[1, 2], ForceEdit::Set)
    );
    // A node already held down (perhaps refused by the operator) gets the
    // annotation with the same list.
    assert_eq!(
        fail_change(&kvc, 1, true).expect("forced"),
        change(&[1], ForceEdit::Set)
    );
    assert_eq!(
        fail_change(&kvc, 1, false).expect("already held down"),
        change(&[1], ForceEdit::Keep)
    );
    annotate(&mut kvc, "true");
    assert_eq!(
        fail_change(&kvc, 2, true).expect("forced"),
        change(&[1, 2], ForceEdit::Keep)
    );
    annotate(&mut kvc, "yes");
    assert_eq!(
        fail_change(&kvc, 2, true).expect("forced"),
        change(&[1, 2], ForceEdit::Set),
        "an invalid value is replaced by \"true\""
    );
}

#[test]
fn recover_removes_the_annotation_only_with_the_last_held_down_node() {
    let mut kvc = cluster(
        "{replicas: 3, faultInjection: {failedNodes: [0, 2]}}",
        &[NodeState::Failed, NodeState::Up, NodeState::Failed],
    );
    assert_eq!(
        recover_change(&kvc, 0).expect("recover"),
        change(&[2], ForceEdit::Keep)
    );
    assert_eq!(
        recover_change(&kvc, 2).expect("recover"),
        change(&[0], ForceEdit::Keep)
    );
    annotate(&mut kvc, "true");
    assert_eq!(
        recover_change(&kvc, 0).expect("recover"),
        change(&[2], ForceEdit::Keep),
        "node 2 may still need the force"
    );
    kvc.spec.fault_injection.failed_nodes = vec![2];
    assert_eq!(
        recover_change(&kvc, 2).expect("recover"),
        change(&[], ForceEdit::Remove)
    );
    kvc.spec.fault_injection.failed_nodes = vec![];
    annotate(&mut kvc, "false");
    assert_eq!(
        recover_change(&kvc, 1).expect("recover"),
        change(&[], ForceEdit::Remove),
        "no node held down: the annotation has nothing left to say"
    );
}

#[test]
fn an_ordinal_outside_the_cluster_is_refused_with_the_replica_count() {
    let kvc = cluster("{replicas: 3}", &UP3);
    let e = check_fail(&kvc, 3, true).unwrap_err();
    assert!(
        matches!(
            e,
            KubeError::NoSuchNode {
                node: 3,
                replicas: 3,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "node 3 is not a node of KvCluster demo (spec.replicas is 3: ordinals 0..3)"
    );
}

#[test]
fn one_node_of_three_at_quorum_may_be_held_down() {
    let kvc = cluster("{replicas: 3}", &UP3);
    assert!(check_fail(&kvc, 1, false).is_ok());
}

#[test]
fn a_second_node_of_three_at_quorum_is_refused_like_the_local_gateway_refuses_it() {
    let mut kvc = cluster(
        "{replicas: 3, faultInjection: {failedNodes: [1]}}",
        &[NodeState::Up, NodeState::Failed, NodeState::Up],
    );
    let e = check_fail(&kvc, 2, false).unwrap_err();
    let KubeError::Refused(reason) = &e else {
        panic!("expected the planner's refusal, got {e:?}");
    };
    assert!(
        reason.starts_with("holding down node(s) [2] would leave some keys with 1 of 3 owners live, but writes at Quorum need 2"),
        "{reason}"
    );
    // With --force the planner accepts it (and kv-operator will, once
    // the annotation is set).
    assert!(check_fail(&kvc, 2, true).is_ok());
    // Writes at One keep going with one live owner: accepted.
    kvc.spec.replication.write_consistency = kv_core::Consistency::One;
    assert!(check_fail(&kvc, 2, false).is_ok());
}

#[test]
fn a_node_already_failed_in_the_status_counts_as_down() {
    // Node 0 crashed (Failed in the status, not held down): holding down
    // a second node of three leaves some keys one live owner.
    let kvc = cluster(
        "{replicas: 3}",
        &[NodeState::Failed, NodeState::Up, NodeState::Up],
    );
    assert!(matches!(
        check_fail(&kvc, 1, false),
        Err(KubeError::Refused(_))
    ));
}

#[test]
fn a_node_already_held_down_is_not_checked_again() {
    let kvc = cluster(
        "{replicas: 3, faultInjection: {failedNodes: [0, 1]}}",
        &[NodeState::Failed, NodeState::Failed, NodeState::Up],
    );
    assert!(check_fail(&kvc, 1, false).is_ok());
}

#[test]
fn a_cluster_without_status_is_checked_against_the_spec_alone() {
    let mut kvc = cluster("{replicas: 3, faultInjection: {failedNodes: [0]}}", &[]);
    kvc.status = None;
    assert!(matches!(
        check_fail(&kvc, 1, false),
        Err(KubeError::Refused(_))
    ));
    assert!(check_fail(&kvc, 0, false).is_ok());
}

#[test]
fn consistent_hashing_factor_two_at_one_tolerates_a_node_per_replica_set() {
    let kvc = cluster(
        "{replicas: 5, replication: {factor: 2, writeConsistency: One}}",
        &[NodeState::Up; 5],
    );
    assert!(check_fail(&kvc, 4, false).is_ok());
    let kvc = cluster(
        "{replicas: 5, replication: {factor: 2, writeConsistency: Quorum}}",
        &[NodeState::Up; 5],
    );
    assert!(matches!(
        check_fail(&kvc, 4, false),
        Err(KubeError::Refused(_))
    ));
}

#[test]
fn nodes_render_the_local_table_with_phase_and_conditions() {
    let mut kvc = cluster(
        "{replicas: 3, replication: {strategy: Full}, faultInjection: {failedNodes: [1]}}",
        &[NodeState::Up, NodeState::Failed, NodeState::Recovering],
    );
    let status = kvc.status.as_mut().expect("status");
    status.phase = Some(Phase::Degraded);
    status.nodes[2].resync_progress = Some(0.425);
    status.conditions = vec![Condition {
        type_: "Available".into(),
        status: "True".into(),
        observed_generation: Some(3),
        last_transition_time: None,
        reason: "QuorumAvailable".into(),
        message: "1 of 3 nodes Ready".into(),
    }];
    let text = render_nodes(&kvc);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..2],
        [
            "KvCluster ns/demo  phase Degraded  ready 1/3  failedNodes [1]",
            "cluster ns/demo  epoch 7  placement Full over nodes 0,1,2  read Quorum  write Quorum",
        ],
        "{text}"
    );
    assert!(lines[2].starts_with("ORDINAL  ADDRESS"), "{text}");
    assert!(
        lines[3].starts_with("0")
            && lines[3].contains("demo-0.demo-peers.ns.svc:7400")
            && lines[3].contains("Up"),
        "{text}"
    );
    assert!(
        lines[4].contains("Failed") && lines[4].contains("unreachable"),
        "{text}"
    );
    assert!(
        lines[5].contains("Recovering") && lines[5].contains("42%"),
        "{text}"
    );
    assert_eq!(lines[6], "conditions:");
    assert_eq!(
        lines[7],
        "  Available=True  QuorumAvailable  1 of 3 nodes Ready"
    );
}

#[test]
fn nodes_say_when_the_status_is_behind_the_spec() {
    let mut kvc = cluster("{replicas: 3}", &UP3);
    kvc.metadata.generation = Some(4);
    assert!(
        render_nodes(&kvc).contains("the status is from generation 3, the spec is at generation 4")
    );
    kvc.status = None;
    let text = render_nodes(&kvc);
    assert!(text.contains("phase (none yet)"), "{text}");
    assert!(text.contains("the status lists no nodes yet"), "{text}");
}

#[test]
fn nodes_json_has_the_local_keys_and_the_kvcluster_summary() {
    let kvc = cluster("{replicas: 3, faultInjection: {failedNodes: [2]}}", &UP3);
    let v = nodes_json(&kvc);
    for key in [
        "clusterId",
        "epoch",
        "placement",
        "pending",
        "readConsistency",
        "writeConsistency",
        "nodes",
    ] {
        assert!(v.get(key).is_some(), "no {key} in {v}");
    }
    assert_eq!(v["epoch"], 7);
    assert_eq!(v["phase"], "Running");
    assert_eq!(v["failedNodes"], json!([2]));
    assert_eq!(v["nodes"][1]["state"], "Up");
    assert_eq!(v["nodes"][1]["address"], "demo-1.demo-peers.ns.svc:7400");
    assert_eq!(v["placement"]["strategy"], "ConsistentHashing");
}

#[test]
fn outcomes_say_what_changed_and_the_resulting_list() {
    let mut o = Outcome {
        cluster: "demo".into(),
        namespace: "ns".into(),
        action: "fail",
        node: 1,
        changed: true,
        failed_nodes_before: vec![],
        failed_nodes: vec![1],
        force_annotation_before: None,
        force_annotation: None,
        attempts: 1,
    };
    assert_eq!(
        render_outcome(&o),
        "KvCluster ns/demo: node 1 added to spec.faultInjection.failedNodes: kv-operator deletes its pod and holds it Failed until recovered\nfailedNodes: [1]\n"
    );
    o.changed = false;
    assert!(render_outcome(&o).contains("node 1 is already held down"));
    o.action = "recover";
    o.failed_nodes = vec![];
    assert!(render_outcome(&o).contains("node 1 is not held down"));
    assert!(render_outcome(&o).ends_with("failedNodes: []\n"));
    o.changed = true;
    o.attempts = 3;
    let text = render_outcome(&o);
    assert!(
        text.contains("node 1 removed from spec.faultInjection.failedNodes"),
        "{text}"
    );
    assert!(text.contains("retried 2 time(s)"), "{text}");
}

#[test]
fn outcomes_say_what_became_of_the_force_annotation_and_how_to_remove_it() {
    let mut o = Outcome {
        cluster: "demo".into(),
        namespace: "ns".into(),
        action: "fail",
        node: 2,
        changed: true,
        failed_nodes_before: vec![1],
        failed_nodes: vec![1, 2],
        force_annotation_before: None,
        force_annotation: Some("true".into()),
        attempts: 1,
    };
    let lines = |o: &Outcome| {
        render_outcome(o)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        lines(&o)[2],
        "annotation kvstore.dev/force-fault-injection=\"true\" set: kv-operator plans this KvCluster with force and holds nodes down even when some keys are left with fewer live owners than writes need; recovering the last held-down node removes it (or: kubectl annotate kvc demo -n ns kvstore.dev/force-fault-injection-)"
    );
    o.action = "recover";
    o.failed_nodes_before = vec![1, 2];
    o.failed_nodes = vec![1];
    o.force_annotation_before = Some("true".into());
    assert_eq!(
        lines(&o)[2],
        "annotation kvstore.dev/force-fault-injection=\"true\" remains until the last held-down node is recovered; remove it now with: kubectl annotate kvc demo -n ns kvstore.dev/force-fault-injection-"
    );
    o.failed_nodes_before = vec![1];
    o.failed_nodes = vec![];
    o.force_annotation = None;
    assert_eq!(
        lines(&o)[2],
        "annotation kvstore.dev/force-fault-injection removed: no node is held down, kv-operator plans without force again"
    );
    o.force_annotation_before = None;
    assert_eq!(lines(&o).len(), 2, "no annotation, no line");
}

#[test]
fn nodes_show_the_last_restart_in_progress_and_finished() {
    let mut kvc = cluster("{replicas: 3}", &UP3);
    let status = kvc.status.as_mut().expect("status");
    status.last_restart = Some(kv_crd::kvcluster::RestartStatus {
        requested_at: "r1".into(),
        restarted: vec![0],
        restarting: Some(kv_crd::kvcluster::RestartingNode {
            ordinal: 1,
            pod_uid: "u".into(),
        }),
        waiting_for: None,
        finished_at: None,
    });
    let text = render_nodes(&kvc);
    assert!(
        text.contains("restart r1: nodes [0] restarted; restarting node 1\n"),
        "{text}"
    );
    assert_eq!(nodes_json(&kvc)["lastRestart"]["restarting"]["ordinal"], 1);
    if let Some(r) = kvc.status.as_mut().and_then(|s| s.last_restart.as_mut()) {
        r.restarted = vec![0, 1, 2];
        r.restarting = None;
        r.finished_at = Some("2026-12-03T10:03:00Z".into());
    }
    assert!(
        render_nodes(&kvc)
            .contains("restart r1: finished at 2026-12-03T10:03:00Z, nodes [0, 1, 2] restarted"),
        "{}",
        render_nodes(&kvc)
    );
}

#[test]
fn nodes_show_a_start_from_a_backup() {
    let mut kvc = cluster("{replicas: 3}", &UP3);
    let status = kvc.status.as_mut().expect("status");
    status.bootstrap = Some(kv_crd::bootstrap::BootstrapStatus {
        phase: kv_crd::bootstrap::BootstrapPhase::Restored,
        source: "s3://b/p".into(),
        message: None,
        finished_at: Some("2026-12-04T10:00:00Z".into()),
    });
    let text = render_nodes(&kvc);
    assert!(
        text.contains("bootstrap from s3://b/p: Restored at 2026-12-04T10:00:00Z\n"),
        "{text}"
    );
    assert_eq!(nodes_json(&kvc)["bootstrap"]["phase"], "Restored");
}
