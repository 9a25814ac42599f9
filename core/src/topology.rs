//! The topology: the control plane's description of the cluster, and the only
//! thing nodes need to agree on to route a request.
//!
//! The control plane (the planner, run by the operator or by `kvctl up`) is the
//! only writer. Every change raises the epoch; a node accepts a topology only
//! when its epoch is higher than the one it has (see [`Topology::check_successor`]).
//! Serialized as camelCase JSON: the file in the topology ConfigMap, the body of
//! a topology push, and the `topology` of `GET /v1/cluster`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How keys are spread over nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Strategy {
    /// Every member holds every key.
    Full,
    /// A ring with virtual nodes; each bucket on `factor` distinct members.
    ConsistentHashing,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Full => "Full",
            Strategy::ConsistentHashing => "ConsistentHashing",
        })
    }
}

impl FromStr for Strategy {
    type Err = TopologyError;

    /// Accepts the CRD names and the CLI/classic-API spellings
    /// (`full`, `consistent`, `consistent-hashing`, `consistent_hashing`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "full" => Ok(Strategy::Full),
            "consistent" | "consistenthashing" => Ok(Strategy::ConsistentHashing),
            _ => Err(TopologyError::UnknownStrategy(s.chars().take(64).collect())),
        }
    }
}

/// How many owners must answer a read or acknowledge a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Consistency {
    One,
    Quorum,
    All,
}

impl Consistency {
    /// Answers needed out of `owners` replicas (0 owners need 0 answers).
    pub fn required(self, owners: usize) -> usize {
        match self {
            Consistency::One => owners.min(1),
            Consistency::Quorum => owners / 2 + usize::from(owners > 0),
            Consistency::All => owners,
        }
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Consistency::One => "One",
            Consistency::Quorum => "Quorum",
            Consistency::All => "All",
        })
    }
}

impl FromStr for Consistency {
    type Err = TopologyError;

    /// Case-insensitive `one`, `quorum`, `all` (the `X-Consistency` header).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "one" => Ok(Consistency::One),
            "quorum" => Ok(Consistency::Quorum),
            "all" => Ok(Consistency::All),
            _ => Err(TopologyError::UnknownConsistency(
                s.chars().take(64).collect(),
            )),
        }
    }
}

/// A node's state (SPEC §3). Only the control plane changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeState {
    /// New owner streaming data in.
    Joining,
    Up,
    /// Down, or held down on purpose.
    Failed,
    /// Back, catching up (hints + anti-entropy) before it serves.
    Recovering,
    /// Being removed: streaming data out, still serving.
    Leaving,
}

impl NodeState {
    pub const ALL: [NodeState; 5] = [
        NodeState::Joining,
        NodeState::Up,
        NodeState::Failed,
        NodeState::Recovering,
        NodeState::Leaving,
    ];

    pub fn serves_client_reads(self) -> bool {
        matches!(self, NodeState::Up | NodeState::Leaving)
    }

    pub fn takes_replica_writes(self) -> bool {
        !matches!(self, NodeState::Failed)
    }

    pub fn counts_in_quorum(self) -> bool {
        matches!(self, NodeState::Up | NodeState::Leaving)
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Which members own which buckets: the input of [`crate::placement::Placement`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    pub strategy: Strategy,
    /// Owners per bucket for `ConsistentHashing`; ignored by `Full` (every member owns every bucket).
    pub factor: u32,
    /// Ordinals of the nodes that own data, sorted, no duplicates.
    pub members: Vec<u32>,
}

impl PlacementSpec {
    /// Owners per bucket that this spec gives.
    pub fn effective_factor(&self) -> usize {
        match self.strategy {
            Strategy::Full => self.members.len(),
            Strategy::ConsistentHashing => (self.factor as usize).min(self.members.len()),
        }
    }

    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.members.is_empty() {
            return Err(TopologyError::NoMembers);
        }
        if self.members.windows(2).any(|w| w[0] >= w[1]) {
            return Err(TopologyError::MembersNotSorted);
        }
        if self.strategy == Strategy::ConsistentHashing
            && (self.factor == 0 || self.factor as usize > self.members.len())
        {
            return Err(TopologyError::BadFactor {
                factor: self.factor,
                members: self.members.len(),
            });
        }
        Ok(())
    }
}

/// One node as the topology knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub ordinal: u32,
    /// `host:port` of the client API (clients, gateway, probes).
    pub address: String,
    /// `host:port` of the node-to-node API (cluster token, epoch on every request).
    pub peer_address: String,
    pub state: NodeState,
}

/// The whole cluster as the control plane last decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    pub cluster_id: String,
    /// Strictly increasing; every change by the control plane raises it.
    pub epoch: u64,
    pub read_consistency: Consistency,
    pub write_consistency: Consistency,
    /// The committed placement: reads go to its owners.
    pub placement: PlacementSpec,
    /// A placement being moved to (rebalancing): writes go to the owners of
    /// both, new owners stream their buckets in, and the control plane makes it
    /// `placement` once every new owner reports done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PlacementSpec>,
    /// Every node the cluster has, sorted by ordinal.
    pub nodes: Vec<NodeInfo>,
}

/// The control plane's list of held-down ordinals (the operator's ConfigMap
/// key `held-down`, a node's `--held-file`): ordinals separated by
/// whitespace or commas. Returns the ordinals and the entries that are not
/// ordinals (which therefore name no node).
pub fn parse_held(text: &str) -> (BTreeSet<u32>, Vec<&str>) {
    let mut held = BTreeSet::new();
    let mut bad = Vec::new();
    for entry in text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
    {
        match entry.parse::<u32>() {
            Ok(o) => {
                held.insert(o);
            }
            Err(_) => bad.push(entry),
        }
    }
    (held, bad)
}

/// The held-down list as [`parse_held`] reads it: one ordinal a line.
pub fn format_held<'a>(held: impl IntoIterator<Item = &'a u32>) -> String {
    held.into_iter().map(|o| format!("{o}\n")).collect()
}

/// Most nodes a cluster may have: a topology's limit, the planner's and the
/// KvCluster CRD's `replicas` maximum.
pub const MAX_NODES: usize = 128;

/// Why a topology (or a change to it) is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("cluster id is empty")]
    EmptyClusterId,
    #[error("topology has no nodes")]
    NoNodes,
    #[error("topology has {0} nodes; at most {MAX_NODES} are supported")]
    TooManyNodes(usize),
    #[error("nodes are not sorted by ordinal or an ordinal repeats (at ordinal {0})")]
    NodesNotSorted(u32),
    #[error("node {0} has an empty or malformed address {1:?} (expected host:port)")]
    BadAddress(u32, String),
    #[error("placement has no members")]
    NoMembers,
    #[error("placement members are not sorted or repeat")]
    MembersNotSorted,
    #[error("placement names node {0}, which the topology does not have")]
    UnknownMember(u32),
    #[error(
        "replication factor {factor} is impossible with {members} member(s): it must be 1..={members}"
    )]
    BadFactor { factor: u32, members: usize },
    #[error("epoch {incoming} is not newer than the current epoch {current}")]
    StaleEpoch { current: u64, incoming: u64 },
    #[error("topology belongs to cluster {incoming:?}, this node to {current:?}")]
    WrongCluster { current: String, incoming: String },
    #[error("unknown strategy {0:?} (expected full or consistent-hashing)")]
    UnknownStrategy(String),
    #[error("unknown consistency level {0:?} (expected one, quorum or all)")]
    UnknownConsistency(String),
    #[error("malformed topology: {0}")]
    Malformed(String),
}

impl Topology {
    /// The topology of a node that has been told nothing: a cluster of itself,
    /// at epoch 0 so that any real topology replaces it.
    pub fn single(cluster_id: &str, ordinal: u32, address: &str, peer_address: &str) -> Topology {
        Topology {
            cluster_id: cluster_id.to_string(),
            epoch: 0,
            read_consistency: Consistency::Quorum,
            write_consistency: Consistency::Quorum,
            placement: PlacementSpec {
                strategy: Strategy::Full,
                factor: 1,
                members: vec![ordinal],
            },
            pending: None,
            nodes: vec![NodeInfo {
                ordinal,
                address: address.to_string(),
                peer_address: peer_address.to_string(),
                state: NodeState::Up,
            }],
        }
    }

    /// Parse and validate a topology from JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Topology, TopologyError> {
        let t: Topology =
            serde_json::from_slice(bytes).map_err(|e| TopologyError::Malformed(e.to_string()))?;
        t.validate()?;
        Ok(t)
    }

    pub fn node(&self, ordinal: u32) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.ordinal == ordinal)
    }

    pub fn state_of(&self, ordinal: u32) -> Option<NodeState> {
        self.node(ordinal).map(|n| n.state)
    }

    /// Every rule a topology must satisfy on its own.
    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.cluster_id.trim().is_empty() {
            return Err(TopologyError::EmptyClusterId);
        }
        if self.nodes.is_empty() {
            return Err(TopologyError::NoNodes);
        }
        // Bounds what a push can make a node allocate (placement tables are
        // members x buckets); the KvCluster CRD allows the same at most.
        if self.nodes.len() > MAX_NODES {
            return Err(TopologyError::TooManyNodes(self.nodes.len()));
        }
        if let Some(w) = self.nodes.windows(2).find(|w| w[0].ordinal >= w[1].ordinal) {
            return Err(TopologyError::NodesNotSorted(w[1].ordinal));
        }
        for n in &self.nodes {
            for addr in [&n.address, &n.peer_address] {
                if !is_host_port(addr) {
                    return Err(TopologyError::BadAddress(
                        n.ordinal,
                        addr.chars().take(128).collect(),
                    ));
                }
            }
        }
        let known: BTreeSet<u32> = self.nodes.iter().map(|n| n.ordinal).collect();
        for spec in std::iter::once(&self.placement).chain(self.pending.as_ref()) {
            spec.validate()?;
            if let Some(m) = spec.members.iter().find(|m| !known.contains(m)) {
                return Err(TopologyError::UnknownMember(*m));
            }
        }
        Ok(())
    }

    /// May a node holding `self` replace it with `next`? Valid, same cluster, higher epoch.
    pub fn check_successor(&self, next: &Topology) -> Result<(), TopologyError> {
        next.validate()?;
        if next.cluster_id != self.cluster_id {
            return Err(TopologyError::WrongCluster {
                current: self.cluster_id.clone(),
                incoming: next.cluster_id.clone(),
            });
        }
        if next.epoch <= self.epoch {
            return Err(TopologyError::StaleEpoch {
                current: self.epoch,
                incoming: next.epoch,
            });
        }
        Ok(())
    }
}

fn is_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_list_reads_back_what_is_written_and_names_bad_entries() {
        let held = BTreeSet::from([0, 3, 7]);
        assert_eq!(parse_held(&format_held(&held)), (held, vec![]));
        let (ordinals, bad) = parse_held("1\n3, 7\tx -2\n");
        assert_eq!(ordinals, BTreeSet::from([1, 3, 7]));
        assert_eq!(bad, ["x", "-2"]);
    }

    fn three() -> Topology {
        Topology {
            cluster_id: "demo".into(),
            epoch: 3,
            read_consistency: Consistency::Quorum,
            write_consistency: Consistency::Quorum,
            placement: PlacementSpec {
                strategy: Strategy::ConsistentHashing,
                factor: 2,
                members: vec![0, 1, 2],
            },
            pending: None,
            nodes: (0..3)
                .map(|i| NodeInfo {
                    ordinal: i,
                    address: format!("127.0.0.1:{}", 7000 + i),
                    peer_address: format!("127.0.0.1:{}", 7100 + i),
                    state: NodeState::Up,
                })
                .collect(),
        }
    }

    #[test]
    fn quorum_is_a_majority_of_owners() {
        let q: Vec<usize> = (0..6).map(|n| Consistency::Quorum.required(n)).collect();
        assert_eq!(q, [0, 1, 2, 2, 3, 3]);
        assert_eq!(Consistency::One.required(3), 1);
        assert_eq!(Consistency::All.required(3), 3);
    }

    #[test]
    fn read_and_write_quorums_overlap_for_every_replica_count() {
        for n in 1..10 {
            let r = Consistency::Quorum.required(n);
            let w = Consistency::Quorum.required(n);
            assert!(r + w > n, "n={n}");
        }
    }

    #[test]
    fn node_states_follow_the_spec_table() {
        use NodeState::*;
        let row = |s: NodeState| {
            (
                s.serves_client_reads(),
                s.takes_replica_writes(),
                s.counts_in_quorum(),
            )
        };
        assert_eq!(row(Joining), (false, true, false));
        assert_eq!(row(Up), (true, true, true));
        assert_eq!(row(Failed), (false, false, false));
        assert_eq!(row(Recovering), (false, true, false));
        assert_eq!(row(Leaving), (true, true, true));
    }

    #[test]
    fn a_topology_with_more_nodes_than_supported_is_refused() {
        let with = |n: u32| {
            let mut t = three();
            t.placement = PlacementSpec {
                strategy: Strategy::Full,
                factor: 1,
                members: (0..n).collect(),
            };
            t.nodes = (0..n)
                .map(|i| NodeInfo {
                    ordinal: i,
                    address: format!("10.0.0.1:{}", 1000 + i),
                    peer_address: format!("10.0.0.1:{}", 2000 + i),
                    state: NodeState::Up,
                })
                .collect();
            t
        };
        assert_eq!(with(MAX_NODES as u32).validate(), Ok(()));
        assert_eq!(
            with(MAX_NODES as u32 + 1).validate(),
            Err(TopologyError::TooManyNodes(MAX_NODES + 1))
        );
    }

    #[test]
    fn topology_round_trips_through_camel_case_json() {
        let t = three();
        let json = serde_json::to_string(&t).unwrap();
        assert!(
            json.contains("\"clusterId\":\"demo\"") && json.contains("\"peerAddress\""),
            "{json}"
        );
        assert_eq!(Topology::from_json(json.as_bytes()), Ok(t));
    }

    #[test]
    fn bad_topologies_are_refused_with_a_reason() {
        let mut t = three();
        t.placement.factor = 4;
        assert_eq!(
            t.validate(),
            Err(TopologyError::BadFactor {
                factor: 4,
                members: 3
            })
        );

        let mut t = three();
        t.placement.members = vec![0, 1, 7];
        assert_eq!(t.validate(), Err(TopologyError::UnknownMember(7)));

        let mut t = three();
        t.nodes.swap(0, 1);
        assert!(matches!(
            t.validate(),
            Err(TopologyError::NodesNotSorted(_))
        ));

        let mut t = three();
        t.nodes[1].address = "nohost".into();
        assert!(matches!(t.validate(), Err(TopologyError::BadAddress(1, _))));

        let mut t = three();
        t.pending = Some(PlacementSpec {
            strategy: Strategy::Full,
            factor: 0,
            members: vec![],
        });
        assert_eq!(t.validate(), Err(TopologyError::NoMembers));

        assert!(matches!(
            Topology::from_json(b"{not json"),
            Err(TopologyError::Malformed(_))
        ));
        assert!(matches!(
            Topology::from_json(b"{}"),
            Err(TopologyError::Malformed(_))
        ));
    }

    #[test]
    fn only_a_newer_epoch_of_the_same_cluster_replaces_a_topology() {
        let cur = three();
        let mut next = three();
        assert_eq!(
            cur.check_successor(&next),
            Err(TopologyError::StaleEpoch {
                current: 3,
                incoming: 3
            })
        );
        next.epoch = 4;
        assert_eq!(cur.check_successor(&next), Ok(()));
        next.cluster_id = "other".into();
        assert!(matches!(
            cur.check_successor(&next),
            Err(TopologyError::WrongCluster { .. })
        ));
    }

    #[test]
    fn strategy_and_consistency_parse_every_spelling_users_type() {
        for s in ["full", "Full", "FULL"] {
            assert_eq!(s.parse::<Strategy>(), Ok(Strategy::Full));
        }
        for s in [
            "consistent",
            "ConsistentHashing",
            "consistent-hashing",
            "consistent_hashing",
        ] {
            assert_eq!(s.parse::<Strategy>(), Ok(Strategy::ConsistentHashing));
        }
        assert!("ring".parse::<Strategy>().is_err());
        assert_eq!("QUORUM".parse::<Consistency>(), Ok(Consistency::Quorum));
        assert!("most".parse::<Consistency>().is_err());
    }
}
