//! What a node says about itself: the body of its `GET /v1/cluster`.
//!
//! The node writes a [`NodeReport`]; the Kubernetes controller, the local
//! platform and `kvctl nodes` read the same type, so a field means one thing
//! everywhere. Every field a reader may find absent (an older node, a
//! hand-written body in a test) has one documented default, given by serde
//! and nowhere else.

use serde::{Deserialize, Serialize};

use crate::topology::{NodeState, Topology};

/// Progress of a node's current catch-up or rebalance pull.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Resync {
    /// The topology epoch the pull is for (0: none has started).
    pub epoch: u64,
    pub buckets_total: u64,
    pub buckets_done: u64,
    pub keys_moved: u64,
}

impl Resync {
    /// Done buckets over total; 1 when there is nothing to pull.
    pub fn progress(&self) -> f64 {
        if self.buckets_total == 0 {
            1.0
        } else {
            self.buckets_done as f64 / self.buckets_total as f64
        }
    }
}

/// `GET /v1/cluster` of a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The node's ordinal.
    pub node_id: u32,
    /// Its state in the topology it holds; absent: it is not in that topology.
    #[serde(default)]
    pub state: Option<NodeState>,
    /// A peer or the control plane agreed on its epoch; absent: not confirmed.
    #[serde(default)]
    pub confirmed: bool,
    /// The topology the node holds (`topology.epoch` is its epoch).
    pub topology: Topology,
    /// The highest epoch for which it pulled every bucket it must hold;
    /// absent: 0, it has not shown that it caught up.
    #[serde(default)]
    pub synced_epoch: u64,
    /// 0..1 of the catch-up for its current epoch (1 once synced at it);
    /// absent: 0, no progress shown.
    #[serde(default)]
    pub resync_progress: f64,
    /// Its store is new or rebuilt and still catching up: it serves no reads
    /// and its acknowledgements do not count; absent: false.
    #[serde(default)]
    pub store_catching_up: bool,
    /// Its clock's offset from its peers' median, in ms; absent: 0.
    #[serde(default)]
    pub clock_skew_ms: i64,
    /// The counters of its current pull; absent: none started.
    #[serde(default)]
    pub resync: Resync,
    /// Hints it holds for other nodes; absent: 0.
    #[serde(default)]
    pub hints_pending: u64,
    /// Seconds since its process started; absent: 0.
    #[serde(default)]
    pub uptime_seconds: u64,
    /// Which tokens it holds, as fingerprints (never the tokens); absent:
    /// none shown.
    #[serde(default)]
    pub tokens: TokenFingerprints,
    /// It listens on `kvctl up`'s gateway port (it serves clients there);
    /// absent: false, as on Kubernetes, where a Service spreads clients.
    #[serde(default)]
    pub on_gateway_port: bool,
}

/// The fingerprints (first 8 hex digits of SHA-256) of the tokens a node
/// accepts, each list in its token file's order: the first is the token it
/// sends. A token rotation waits until every node shows the file it wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TokenFingerprints {
    /// The client port's tokens.
    pub client: Vec<String>,
    /// The peer port's tokens.
    pub cluster: Vec<String>,
}

impl NodeReport {
    /// The epoch of the topology the node holds.
    pub fn epoch(&self) -> u64 {
        self.topology.epoch
    }

    /// Reads a report from a JSON body; `None` when it is not one (no
    /// `nodeId` or no `topology`, or a field of the wrong type).
    pub fn from_json(body: &serde_json::Value) -> Option<NodeReport> {
        serde_json::from_value(body.clone()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Consistency, NodeInfo, PlacementSpec, Strategy};
    use serde_json::json;

    fn topology() -> Topology {
        Topology {
            cluster_id: "c".into(),
            epoch: 7,
            read_consistency: Consistency::Quorum,
            write_consistency: Consistency::Quorum,
            placement: PlacementSpec {
                strategy: Strategy::Full,
                factor: 1,
                members: vec![0],
            },
            pending: None,
            nodes: vec![NodeInfo {
                ordinal: 0,
                address: "127.0.0.1:1".into(),
                peer_address: "127.0.0.1:2".into(),
                state: NodeState::Up,
            }],
        }
    }

    fn full() -> NodeReport {
        NodeReport {
            node_id: 0,
            state: Some(NodeState::Up),
            confirmed: true,
            topology: topology(),
            synced_epoch: 6,
            resync_progress: 0.5,
            store_catching_up: true,
            clock_skew_ms: -3,
            resync: Resync {
                epoch: 7,
                buckets_total: 4,
                buckets_done: 2,
                keys_moved: 9,
            },
            hints_pending: 11,
            uptime_seconds: 5,
            tokens: TokenFingerprints {
                client: vec!["0badcafe".into()],
                cluster: vec!["12345678".into(), "9abcdef0".into()],
            },
            on_gateway_port: true,
        }
    }

    #[test]
    fn the_wire_names_are_the_documented_ones() {
        let v = serde_json::to_value(full()).expect("serialise");
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "clockSkewMs",
                "confirmed",
                "hintsPending",
                "nodeId",
                "onGatewayPort",
                "resync",
                "resyncProgress",
                "state",
                "storeCatchingUp",
                "syncedEpoch",
                "tokens",
                "topology",
                "uptimeSeconds"
            ]
        );
        assert_eq!(
            v["resync"],
            json!({"epoch": 7, "bucketsTotal": 4, "bucketsDone": 2, "keysMoved": 9})
        );
    }

    #[test]
    fn a_report_reads_back_as_written() {
        let r = full();
        let v = serde_json::to_value(&r).expect("serialise");
        assert_eq!(NodeReport::from_json(&v), Some(r));
    }

    #[test]
    fn absent_fields_mean_not_caught_up_and_no_progress() {
        let v = json!({"nodeId": 2, "topology": topology()});
        let r = NodeReport::from_json(&v).expect("a report");
        assert_eq!(r.epoch(), 7);
        assert_eq!(r.state, None);
        assert!(!r.confirmed);
        assert_eq!(r.synced_epoch, 0);
        assert_eq!(r.resync_progress, 0.0);
        assert!(!r.store_catching_up);
        assert_eq!(r.resync, Resync::default());
        assert_eq!(r.hints_pending, 0);
        assert_eq!(r.tokens, TokenFingerprints::default());
    }

    #[test]
    fn a_body_without_a_topology_or_node_id_is_no_report() {
        assert_eq!(NodeReport::from_json(&json!({"nodes": []})), None);
        assert_eq!(NodeReport::from_json(&json!({"nodeId": 1})), None);
        assert_eq!(
            NodeReport::from_json(&json!({"topology": topology()})),
            None
        );
        assert_eq!(
            NodeReport::from_json(
                &json!({"nodeId": 1, "topology": topology(), "syncedEpoch": "x"})
            ),
            None
        );
    }
}
