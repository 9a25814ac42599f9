//! Command-line arguments (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kv_core::Consistency;

use crate::bench::BenchArgs;

/// kvctl — the kvstore command-line client.
#[derive(Debug, Parser)]
#[command(name = "kvctl", version, about, propagate_version = true)]
pub struct Cli {
    /// Node or gateway to talk to.
    #[arg(
        long,
        env = "KV_ENDPOINT",
        default_value = "http://127.0.0.1:5000",
        global = true
    )]
    pub endpoint: String,

    /// Client bearer token.
    #[arg(long, env = "KV_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,

    /// Consistency level of reads and writes (sent as X-Consistency).
    #[arg(long, value_enum, global = true)]
    pub consistency: Option<Level>,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,

    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 10.0, global = true, value_parser = parse_timeout)]
    pub timeout: f64,

    /// CA certificate(s) (PEM) to trust for an https endpoint, instead of
    /// the system's (`kvctl up --tls` prints its own: <data-dir>/tls/ca.crt).
    #[arg(long, env = "KV_CACERT", global = true)]
    pub cacert: Option<PathBuf>,

    /// Accept any certificate from an https endpoint (no verification:
    /// anyone on the path can read and change the traffic). Only when asked.
    #[arg(long, global = true)]
    pub insecure: bool,

    #[command(subcommand)]
    pub command: Command,
}

pub(crate) fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 86400]")),
    }
}

/// `-o human|json|yaml`: text for people, or one document (the same
/// fields in JSON or YAML) for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
    Yaml,
}

/// `--consistency one|quorum|all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Level {
    One,
    Quorum,
    All,
}

impl From<Level> for Consistency {
    fn from(l: Level) -> Consistency {
        match l {
            Level::One => Consistency::One,
            Level::Quorum => Consistency::Quorum,
            Level::All => Consistency::All,
        }
    }
}

/// `kvctl strategy full|consistent-hashing`.
/// Default seconds `rotate-token` waits per step against `kvctl up`, and
/// on Kubernetes (the kubelet copies a changed Secret into the pods within
/// a minute or two).
pub const ROTATE_WAIT_LOCAL: f64 = 30.0;
pub const ROTATE_WAIT_KUBERNETES: f64 = 300.0;

/// Which token `kvctl rotate-token` rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenArg {
    /// The client port's token (the one `--token` gives).
    Client,
    /// The node-to-node token of the peer ports.
    Cluster,
}

impl TokenArg {
    pub fn name(self) -> &'static str {
        match self {
            TokenArg::Client => "client",
            TokenArg::Cluster => "cluster",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    Full,
    #[value(alias = "consistent")]
    ConsistentHashing,
}

impl StrategyArg {
    /// The classic API's spelling (`full` | `consistent`).
    pub fn classic_name(self) -> &'static str {
        match self {
            StrategyArg::Full => "full",
            StrategyArg::ConsistentHashing => "consistent",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a value: `put KEY VALUE`, `put KEY -` (stdin) or `put KEY --file F`.
    Put(PutArgs),
    /// Print a key's value.
    Get {
        /// The key.
        key: String,
    },
    /// Delete a key.
    Delete {
        /// The key.
        key: String,
    },
    /// List keys in order (follows pagination).
    List {
        /// Only keys that start with this.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many keys.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Nodes of the cluster: ordinal, address, state, resync progress.
    ///
    /// With `--cluster NAME`: the KvCluster's status as kv-operator wrote it
    /// (node states, catch-up progress, topology epoch, phase, conditions).
    Nodes {
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Which nodes own a key.
    Where {
        /// The key.
        key: String,
    },
    /// Fail node N (hold it down) through the control plane.
    ///
    /// With `--cluster NAME`: adds N to the KvCluster's
    /// spec.faultInjection.failedNodes (kv-operator deletes the pod and holds
    /// the node Failed until it is recovered).
    Fail {
        /// Node ordinal.
        node: u32,
        /// Hold it down even if some keys are then left with fewer live
        /// owners than writes need (their writes fail until it recovers).
        /// With --cluster: also sets the KvCluster annotation
        /// kvstore.dev/force-fault-injection="true" (kv-operator plans with
        /// force while it is set); `recover` of the last held-down node
        /// removes it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Recover node N through the control plane.
    ///
    /// With `--cluster NAME`: removes N from the KvCluster's
    /// spec.faultInjection.failedNodes (the node restarts, catches up as
    /// Recovering, then is Up).
    Recover {
        /// Node ordinal.
        node: u32,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Restart every node of a KvCluster, one at a time (needs --cluster).
    ///
    /// Sets the KvCluster annotation kvstore.dev/restartedAt to now:
    /// kv-operator deletes one pod at a time and deletes the next only once
    /// that node is back Up and caught up; status.lastRestart shows the
    /// progress. Waits until the restart has finished, like fail/recover.
    Restart {
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Print a node's log: the kv-node container of its pod, through the
    /// Kubernetes API (needs --cluster; `get` on pods/log).
    Logs {
        /// Node ordinal.
        node: u32,
        #[command(flatten)]
        logs: LogArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Install kvctl as the kubectl plugin `kubectl kv`: a symlink named
    /// kubectl-kv to this executable, in --dir (default: the directory this
    /// executable is in, which is on PATH when kvctl was found there).
    InstallPlugin {
        /// Directory to put the kubectl-kv link in (it must be on PATH for
        /// kubectl to find the plugin).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Replace a kubectl-kv that is there already.
        #[arg(long)]
        force: bool,
    },
    /// Change the replication strategy through the control plane.
    Strategy {
        #[arg(value_enum)]
        strategy: StrategyArg,
        /// Replicas of each key (consistent-hashing).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        replication_factor: Option<u32>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Compare replica digests cluster-wide; exit 1 when co-owners differ.
    ///
    /// With --cluster NAME: kv-operator compares them (the annotation
    /// kvstore.dev/verifyRequestedAt), and kvctl prints its status.lastVerify.
    Verify {
        #[command(flatten)]
        kube: KubeArgs,
        /// Seconds to wait for kv-operator's answer (with --cluster).
        #[arg(long, default_value_t = 60.0, value_parser = parse_wait, requires = "cluster")]
        verify_timeout: f64,
    },
    /// Rotate the client token (default) or the cluster token of a `kvctl
    /// up` cluster with no failed request: its token file is written three
    /// times (old+new accepted, then new sent, then old refused), each step
    /// awaited until every running node reports it. Prints the new client
    /// token; the cluster token stays in `<data-dir>/cluster-token`.
    ///
    /// With `--cluster NAME`: the same three steps written to the
    /// KvCluster's token Secret, each awaited until every node that is not
    /// Failed shows it in status.nodes[].tokens (the kubelet copies a
    /// changed Secret into the pods within a minute or two). Needs `get`
    /// and `patch` on that Secret; the new token stays in the Secret.
    RotateToken {
        #[arg(value_enum, default_value_t = TokenArg::Client)]
        which: TokenArg,
        /// Seconds to wait for every node at each of the three steps
        /// (default 30; 300 with --cluster).
        #[arg(long, value_parser = parse_wait)]
        wait_timeout: Option<f64>,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Back the cluster up (every record with its version, tombstones
    /// included, and a manifest) to `file:///dir` or `s3://bucket/prefix`,
    /// without stopping writes.
    ///
    /// With --cluster NAME: a KvBackup resource that kv-operator takes (to a
    /// destination the operator reaches; file:// is the operator's own
    /// filesystem), and the wait until it completed or failed.
    Backup {
        /// Where to write it: file:///absolute/dir or s3://bucket/prefix
        /// (S3 settings from the AWS_* environment; AWS_ENDPOINT_URL for an
        /// S3-compatible server; with --cluster, the --s3-* flags).
        #[arg(long, value_name = "URL")]
        to: String,
        #[command(flatten)]
        access: ClusterAccess,
        #[command(flatten)]
        on_cluster: BackupOnCluster,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Restore a backup into a new, empty cluster with the records' original
    /// versions, then check every bucket's digest against the manifest.
    ///
    /// With --cluster NAME: a new KvCluster NAME started from the backup
    /// (spec.bootstrap.fromBackup: each node loads its buckets before it
    /// serves), and the wait until its status says Restored.
    Restore {
        /// Where the backup is: file:///absolute/dir or s3://bucket/prefix.
        #[arg(long, value_name = "URL")]
        from: String,
        /// Apply even where the cluster already holds other data (the
        /// newest version of each key wins; the digest check then fails).
        #[arg(long, conflicts_with = "cluster")]
        force: bool,
        #[command(flatten)]
        access: ClusterAccess,
        #[command(flatten)]
        on_cluster: RestoreOnCluster,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Load generator against kvstore, etcd or Redis.
    Bench(BenchArgs),
    /// Run a whole cluster on this machine: node processes, the planner, and a gateway.
    Up(UpArgs),
    /// Run one kvstore node in this process: the same flags and environment
    /// as the kv-node binary (`kvctl node --help`); `kvctl up` runs each
    /// node so. Give `node` as the first argument.
    #[command(disable_help_flag = true)]
    Node {
        /// The node's flags (see `kvctl node --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// `--no-wait` / `--wait-timeout SECS` of `fail`, `recover` and `strategy`
/// against a gateway: by default the command returns once the change is
/// visible (the node listed Failed, or Up and caught up; the new placement
/// committed), or says it is still in progress after the bound.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Return as soon as the control plane has accepted the change, without
    /// waiting for it to take effect.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for the change to take effect; past them the answer
    /// says it is still in progress (HTTP 202, with its progress).
    #[arg(long, default_value_t = 30.0, value_parser = parse_wait, conflicts_with = "no_wait")]
    pub wait_timeout: f64,
}

pub(crate) fn parse_wait(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

impl WaitArgs {
    /// The control route's query: `wait=false` or `timeout=SECS`.
    pub fn query(&self) -> String {
        if self.no_wait {
            "wait=false".into()
        } else {
            format!("timeout={}", self.wait_timeout)
        }
    }

    /// How long the HTTP request may take: the wait plus `answer` (the
    /// `--timeout` for an answer).
    pub fn request_timeout(&self, answer: std::time::Duration) -> std::time::Duration {
        if self.no_wait {
            answer
        } else {
            answer + std::time::Duration::from_secs_f64(self.wait_timeout)
        }
    }
}

/// `--cluster NAME [-n NAMESPACE] [--context CONTEXT]`: act on a KvCluster
/// through the Kubernetes API instead of a node or gateway.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Kubernetes")]
pub struct KubeArgs {
    /// Act on this KvCluster through the Kubernetes API (kubeconfig found as
    /// kubectl finds it: KUBECONFIG, ~/.kube/config, or the in-cluster
    /// service account) instead of the node or gateway at --endpoint.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Namespace of the KvCluster (default: the kubeconfig context's
    /// namespace, else "default").
    #[arg(short = 'n', long, value_name = "NAMESPACE", requires = "cluster")]
    pub namespace: Option<String>,
    /// Kubeconfig context to use (default: the current context).
    #[arg(long, value_name = "CONTEXT", requires = "cluster")]
    pub context: Option<String>,
}

/// `backup --cluster`: the KvBackup's name, its S3 settings and the wait.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Kubernetes (backup --cluster)")]
pub struct BackupOnCluster {
    /// The KvBackup's name (default: the cluster's name and the UTC time).
    #[arg(long, value_name = "NAME", requires = "cluster")]
    pub backup_name: Option<String>,
    #[command(flatten)]
    pub s3: S3OnCluster,
    /// Return once the KvBackup is created.
    #[arg(long, requires = "cluster")]
    pub no_wait: bool,
    /// Seconds to wait for the backup to complete or fail.
    #[arg(long, default_value_t = 600.0, value_parser = parse_wait, conflicts_with = "no_wait")]
    pub backup_timeout: f64,
}

/// How kv-operator (a KvBackup) or the nodes (a restore) reach an s3://
/// location on Kubernetes.
#[derive(Debug, Clone, Default, Args)]
pub struct S3OnCluster {
    /// The S3-compatible server (default: AWS).
    #[arg(long, value_name = "URL", requires = "cluster")]
    pub s3_endpoint: Option<String>,
    /// The S3 region.
    #[arg(long, value_name = "REGION", requires = "cluster")]
    pub s3_region: Option<String>,
    /// A Secret in the cluster's namespace with the keys accessKeyId and
    /// secretAccessKey.
    #[arg(long, value_name = "SECRET", requires = "cluster")]
    pub s3_credentials_secret: Option<String>,
}

/// `restore --cluster`: the new KvCluster's spec, S3 settings and the wait.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Kubernetes (restore --cluster)")]
pub struct RestoreOnCluster {
    /// Take the new KvCluster's spec (image, storage, resources,
    /// replication, TLS mode...) from this one in the same namespace; not
    /// its schedule of backups, held-down nodes, hibernation or Secrets.
    #[arg(long, value_name = "KVCLUSTER", requires = "cluster")]
    pub like: Option<String>,
    /// Number of nodes (default 3, or --like's).
    #[arg(long, requires = "cluster", value_parser = clap::value_parser!(u32).range(1..=128))]
    pub nodes: Option<u32>,
    /// Placement strategy (default full, or --like's).
    #[arg(long, value_enum, requires = "cluster")]
    pub strategy: Option<StrategyArg>,
    /// Owners of each key with consistent-hashing.
    #[arg(long, requires = "cluster", value_parser = clap::value_parser!(u32).range(1..))]
    pub replication_factor: Option<u32>,
    #[command(flatten)]
    pub s3: S3OnCluster,
    /// Return once the KvCluster is created.
    #[arg(long, requires = "cluster")]
    pub no_wait: bool,
    /// Seconds to wait for every node to have loaded the backup.
    #[arg(long, default_value_t = 600.0, value_parser = parse_wait, conflicts_with = "no_wait")]
    pub restore_timeout: f64,
}

/// `--follow` / `--tail N` of `logs`.
#[derive(Debug, Clone, Default, Args)]
pub struct LogArgs {
    /// Keep printing the log as the node writes it, until interrupted.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print only the last N lines (then follow, with --follow).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(0..))]
    pub tail: Option<i64>,
    /// The log of the node's previous container (before its last restart).
    #[arg(long)]
    pub previous: bool,
}

/// The node-to-node token `backup` and `restore` need: given, or read with
/// the client token from a `kvctl up` data directory's token files.
#[derive(Debug, Clone, Default, Args)]
pub struct ClusterAccess {
    /// Node-to-node (cluster) token.
    #[arg(long, env = "KV_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// A `kvctl up` data directory to read the tokens from when they are
    /// not given.
    #[arg(long, env = "KV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `kvctl up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// A KvCluster YAML to take replicas, replication and held-down nodes from.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Number of nodes (default 3, or what the data directory holds).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub nodes: Option<u32>,
    /// Placement strategy (default full).
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyArg>,
    /// Owners of each key with consistent-hashing.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub replication_factor: Option<u32>,
    /// Default read consistency.
    #[arg(long, value_enum)]
    pub read_consistency: Option<Level>,
    /// Default write consistency.
    #[arg(long, value_enum)]
    pub write_consistency: Option<Level>,
    /// Where nodes keep their data (survives restarts of `kvctl up`).
    #[arg(long, env = "KV_DATA_DIR", default_value = "./kvdata")]
    pub data_dir: PathBuf,
    /// Gateway address.
    #[arg(long, env = "KV_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: std::net::SocketAddr,
    /// Run each node with this kv-node binary instead of as `kvctl node`
    /// (a subprocess of this executable, the default).
    #[arg(long, env = "KV_NODE_BIN")]
    pub node_binary: Option<PathBuf>,
    /// Milliseconds a node may be unreachable before it is Failed.
    #[arg(long, default_value_t = 5000)]
    pub failure_detection_ms: u64,
    /// Seconds between background anti-entropy rounds on each node (0 = off).
    #[arg(long, default_value_t = 30)]
    pub anti_entropy_secs: u64,
    /// TLS everywhere: a local CA and certificates in <data-dir>/tls/ (kept
    /// across restarts), the nodes' ports (mutual TLS between nodes) and the
    /// gateway over TLS. Clients then use https and --cacert <data-dir>/tls/ca.crt.
    #[arg(long)]
    pub tls: bool,
    /// How clients of the gateway's address reach a node: `shared`, the Up
    /// nodes listen on that port themselves (SO_REUSEPORT, Linux; no hop),
    /// or `proxy`, the gateway forwards every request (a second HTTP hop).
    #[arg(long, value_enum, default_value = "shared")]
    pub gateway: GatewayArg,
    /// Start a new cluster from a backup (`file:///dir` or
    /// `s3://bucket/prefix`, S3 settings from the AWS_* environment): each
    /// node loads the buckets it keeps from it before it serves. Refused
    /// when the data directory already holds a cluster.
    #[arg(long, value_name = "URL")]
    pub restore_from: Option<String>,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// The key.
    pub key: String,
    /// The value; `-` reads it from stdin.
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub value: Option<String>,
    /// Read the value from a file (`-` for stdin).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Only create: fail if the key already holds a value (If-None-Match: *).
    #[arg(long)]
    pub create: bool,
}

/// Where `put` takes its value from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    Literal(Vec<u8>),
    Stdin,
    File(PathBuf),
}

impl PutArgs {
    pub fn source(&self) -> ValueSource {
        match (&self.value, &self.file) {
            (_, Some(f)) if f.as_os_str() == "-" => ValueSource::Stdin,
            (_, Some(f)) => ValueSource::File(f.clone()),
            (Some(v), None) if v == "-" => ValueSource::Stdin,
            (Some(v), None) => ValueSource::Literal(v.as_bytes().to_vec()),
            (None, None) => ValueSource::Literal(Vec::new()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GatewayArg {
    Shared,
    Proxy,
}
