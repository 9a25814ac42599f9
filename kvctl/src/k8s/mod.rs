//! kvctl on Kubernetes: `fail`, `recover`, `restart` and `nodes` with
//! `--cluster NAME` read or change the `KvCluster` resource instead of
//! talking to a gateway.
//!
//! On Kubernetes the control plane is kv-operator, and what a user asks of it
//! is the KvCluster's spec: holding a node down is an entry in
//! `spec.faultInjection.failedNodes`. So `kvctl fail N --cluster NAME` is a
//! read-modify-write of that list, and `kvctl nodes --cluster NAME` prints
//! the status the operator wrote.
//!
//! `--force` asks kv-operator to carry out a hold-down its planner would
//! refuse (some key left with fewer live owners than W needs). The operator
//! plans a KvCluster with force while its annotation
//! `kvstore.dev/force-fault-injection` is `"true"`, so `fail --force` sets
//! that annotation in the same write that adds the ordinal, and `recover`
//! removes it in the write that leaves no node held down (until then the
//! forced hold-downs may still depend on it).
//!
//! The decisions are pure functions of the resource, tested on their own:
//! the new list and annotation ([`hold_down`], [`release`], [`Change`]),
//! whether a hold-down is refused
//! ([`check_fail`], the planner's own check, exactly as the operator and the
//! local gateway run it), and the renderings. The API calls go through a
//! [`Target`] built on any [`kube::Client`], so tests can hand it a mocked one.
//!
//! A write never loses a concurrent change: the merge patch carries the
//! `metadata.resourceVersion` it was computed from, which the API server
//! takes as a precondition (409 Conflict when the object changed since); on a
//! conflict the resource is read again, the decision made again on what is
//! there now, and the write retried, at most [`MAX_ATTEMPTS`] times.
//!
//! One module per job: [`target`] (the API calls, with their timeout and
//! conflict retry), [`change`] (the pure decisions and the planner check),
//! [`render`] (what `nodes`, `fail` and `recover` print), [`restart`]
//! (`restart --cluster`: the annotation kv-operator restarts the nodes on,
//! and what its status shows of that restart), [`tokens`] (`rotate-token
//! --cluster`: the token Secret written in three steps, each awaited in the
//! status), [`backup`] (`backup --cluster`: a KvBackup, and the wait for
//! its outcome).

mod backup;
mod change;
mod render;
mod restart;
mod target;
mod tokens;

pub use backup::*;
pub use change::*;
pub use render::*;
pub use restart::*;
pub use target::*;
pub use tokens::*;

/// Reads and writes of one `fail` or `recover`, when every write meets a
/// concurrent change (409 Conflict).
pub const MAX_ATTEMPTS: usize = 5;

/// The field manager kvctl's writes are recorded under (`managedFields`).
pub const FIELD_MANAGER: &str = "kvctl";

/// The container of a node's pod (kv-operator's StatefulSet).
pub(crate) const NODE_CONTAINER: &str = "kv-node";

/// The resource, as RBAC rules name it.
pub(crate) const RESOURCE: &str = "kvclusters.kvstore.dev";

/// Why a `--cluster` command did nothing.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot find a Kubernetes configuration (looked for KUBECONFIG, ~/.kube/config and an in-cluster service account): {0}"
    )]
    NoConfig(String),
    #[error("cannot use the kubeconfig context {context:?}: {detail}")]
    Context { context: String, detail: String },
    #[error("cannot set up a Kubernetes client: {0}")]
    Client(String),
    #[error("KvCluster {name} not found in namespace {namespace}")]
    NotFound { name: String, namespace: String },
    #[error(
        "forbidden: kvctl needs the RBAC verb \"{verb}\" on {resource} in namespace {namespace} (the API server said: {message})"
    )]
    Forbidden {
        verb: &'static str,
        resource: &'static str,
        namespace: String,
        message: String,
    },
    #[error(
        "the Kubernetes API server did not accept kvctl's credentials (401 Unauthorized): check the user of the kubeconfig context, or log in again ({message})"
    )]
    Unauthorized { message: String },
    #[error(
        "node {node} is not a node of KvCluster {name} (spec.replicas is {replicas}: ordinals 0..{replicas})"
    )]
    NoSuchNode {
        node: u32,
        name: String,
        replicas: u32,
    },
    /// The planner's refusal, in its own words (the local gateway's too).
    #[error("{0}")]
    Refused(String),
    #[error(
        "KvCluster {name} in namespace {namespace} changed under each of {attempts} attempts to write it (409 Conflict); nothing was changed, try again"
    )]
    Conflict {
        name: String,
        namespace: String,
        attempts: usize,
    },
    #[error(
        "the Kubernetes API server refused to {verb} KvCluster {name}: {message} ({code} {reason})"
    )]
    Api {
        verb: &'static str,
        name: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("cannot {verb} KvCluster {name} through the Kubernetes API{at}: {detail}")]
    Transport {
        verb: &'static str,
        name: String,
        /// " at <url>" when the URL is known.
        at: String,
        detail: String,
    },
    #[error(
        "node {node} of KvCluster {name} has no pod {pod} to read a log from (held down, hibernated, or not scheduled yet?): {message}"
    )]
    NoPod {
        pod: String,
        node: u32,
        name: String,
        message: String,
    },
    #[error(
        "KvCluster {name} already exists in namespace {namespace}: a restore through the Kubernetes API starts a new KvCluster (spec.bootstrap.fromBackup); choose another name, or restore into the running cluster with kvctl restore --endpoint <its Service> --cluster-token ..."
    )]
    Exists { name: String, namespace: String },
    #[error("cannot {verb} KvBackup {name}: {message}")]
    Backup {
        verb: &'static str,
        name: String,
        message: String,
    },
    #[error("no answer from the Kubernetes API server at {url} within {secs}s")]
    Timeout { url: String, secs: f64 },
    #[error("KvCluster {0} has no metadata.resourceVersion; cannot write it safely")]
    NoResourceVersion(String),
    #[error("no token to rotate in Secret {namespace}/{secret} key {key:?}: {problem}")]
    NoToken {
        secret: String,
        namespace: String,
        key: &'static str,
        problem: String,
    },
    /// A rotation step that not every node took up in time.
    #[error("{0}")]
    RotationStalled(String),
}

#[cfg(test)]
mod tests;
