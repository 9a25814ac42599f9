//! One largest cluster size: the topology's limit, the planner's and the
//! CRD schema's `replicas` maximum are the same number, so a request the
//! planner accepts never fails later as an invalid topology.

use kv_core::{Consistency, MAX_NODES, NodeInfo, NodeState, PlacementSpec, Strategy, Topology};

#[test]
fn the_planner_the_crd_and_the_topology_share_one_max_nodes() {
    assert_eq!(kv_control::planner::MAX_NODES as usize, MAX_NODES);
    assert_eq!(kv_operator::k8s::crd::MAX_REPLICAS as usize, MAX_NODES);
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(kv_operator::k8s::KvCluster::crd()).expect("crd");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["replicas"];
    assert_eq!(
        schema["maximum"].as_f64(),
        Some(MAX_NODES as f64),
        "{schema}"
    );
}

fn topology(n: u32) -> Topology {
    Topology {
        cluster_id: "c".into(),
        epoch: 1,
        read_consistency: Consistency::Quorum,
        write_consistency: Consistency::Quorum,
        placement: PlacementSpec {
            strategy: Strategy::Full,
            factor: 1,
            members: (0..n).collect(),
        },
        pending: None,
        nodes: (0..n)
            .map(|o| NodeInfo {
                ordinal: o,
                address: format!("10.0.0.1:{}", 1000 + o),
                peer_address: format!("10.0.0.1:{}", 5000 + o),
                state: NodeState::Up,
            })
            .collect(),
    }
}

#[test]
fn the_largest_cluster_the_planner_accepts_is_a_valid_topology() {
    let n = kv_control::planner::MAX_NODES;
    assert_eq!(topology(n).validate(), Ok(()));
    assert!(topology(n + 1).validate().is_err());
}
