//! kv-control: kvstore's control plane as far as it does not depend on where
//! the nodes run.
//!
//! [`planner`] decides, as a pure function, the topology, node states,
//! rebalancing and process actions from what the user asked for and what
//! was observed. [`platform`] is the one observe → plan → act loop and the
//! [`Platform`] trait it drives: kv-operator implements it on Kubernetes,
//! kv-local for `kvctl up`. [`metrics`] are the control plane's metrics on
//! both, [`token`] makes API tokens for both.

pub mod metrics;
pub mod phase;
pub mod planner;
pub mod platform;
pub mod token;

pub use platform::{Observation, Platform, Step, step};
