//! A cluster's phase as users see it: `status.phase` of a KvCluster, the
//! `phase` label of the control-plane metrics on both platforms. The
//! planner's phases and `WakingUp`, which only a platform can tell (pods
//! stopped on request and not back yet).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The cluster as a whole, in one word.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Objects exist but no topology has every node Up yet.
    Creating,
    /// Every node Up.
    Running,
    /// At least one node not Up (Failed, Recovering, Joining).
    Degraded,
    /// A placement change is pending (scale, factor or strategy change).
    Rebalancing,
    /// The spec cannot be carried out (see the conditions).
    Failed,
    /// Every pod stopped on request (`spec.hibernation`), volumes kept.
    Hibernated,
    /// Hibernation turned off, and some node is not back yet: its pod not
    /// Ready, or the node not reporting (condition `Hibernated`, reason
    /// `WakingUp`, names them).
    WakingUp,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Creating,
        Phase::Running,
        Phase::Degraded,
        Phase::Rebalancing,
        Phase::Failed,
        Phase::Hibernated,
        Phase::WakingUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "Creating",
            Phase::Running => "Running",
            Phase::Degraded => "Degraded",
            Phase::Rebalancing => "Rebalancing",
            Phase::Failed => "Failed",
            Phase::Hibernated => "Hibernated",
            Phase::WakingUp => "WakingUp",
        }
    }
}
