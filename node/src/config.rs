//! The node's configuration: flags and environment (clap), tokens from files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
pub use kv_net::token::{TokenError, Tokens};

/// One kvstore node: SQLite storage, the HTTP API, and replication.
#[derive(Clone, Debug, Parser)]
#[command(name = "kv-node", version, about)]
pub struct Args {
    /// Client API address (also /healthz, /readyz, /metrics).
    #[arg(long, env = "KV_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// Node-to-node API address.
    #[arg(long, env = "KV_PEER_LISTEN", default_value = "0.0.0.0:7401")]
    pub peer_listen: SocketAddr,
    /// Client address other nodes and tools use to reach this node (host:port);
    /// defaults to the listen address.
    #[arg(long, env = "KV_ADVERTISE")]
    pub advertise: Option<String>,
    /// Peer address others use to reach this node (host:port); defaults to
    /// the peer listen address.
    #[arg(long, env = "KV_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Directory of the SQLite database and the node's saved topology.
    #[arg(long, env = "KV_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// This node's ordinal.
    #[arg(
        long,
        env = "KV_NODE_ID",
        required_unless_present = "node_id_from_hostname"
    )]
    pub node_id: Option<u32>,
    /// Take the ordinal from the host name's last `-N` (StatefulSet pods: `demo-2` is 2).
    #[arg(long, env = "KV_NODE_ID_FROM_HOSTNAME", conflicts_with = "node_id")]
    pub node_id_from_hostname: bool,
    /// Client bearer token.
    #[arg(long, env = "KV_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the client bearer token (a mounted Secret), read again
    /// every second; during a rotation it holds two lines, both accepted
    /// (format: kv_net::token).
    #[arg(long, env = "KV_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Node-to-node bearer token.
    #[arg(long, env = "KV_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// File holding the node-to-node token, read again every second; peers
    /// are sent its first line, every line is accepted (kv_net::token).
    #[arg(long, env = "KV_CLUSTER_TOKEN_FILE", conflicts_with = "cluster_token")]
    pub cluster_token_file: Option<PathBuf>,
    /// Topology JSON to watch (the mounted ConfigMap); missing = a one-node cluster.
    #[arg(long, env = "KV_TOPOLOGY_FILE")]
    pub topology_file: Option<PathBuf>,
    /// File listing the ordinals the control plane holds down (whitespace
    /// or comma separated; the operator's ConfigMap). A node listed there
    /// waits, fenced, until it is not.
    #[arg(long, env = "KV_HELD_FILE")]
    pub held_file: Option<PathBuf>,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "KV_MAX_VALUE_BYTES", default_value_t = kv_core::record::DEFAULT_MAX_VALUE_BYTES)]
    pub max_value_bytes: usize,
    /// Memory for records read lately, in MiB: a point read of one of them
    /// skips SQLite (0 = off).
    #[arg(long, env = "KV_READ_CACHE_MB", default_value_t = 32)]
    pub read_cache_mb: usize,
    /// Pages (2 KiB each) the write-ahead log holds before a background
    /// thread copies it back into the database; the log file grows to about
    /// this size. Fewer: a smaller log and more copying.
    #[arg(long, env = "KV_CHECKPOINT_PAGES", default_value_t = 32_000,
          value_parser = clap::value_parser!(u32).range(100..))]
    pub checkpoint_pages: u32,
    /// Timeout of one node-to-node request, in milliseconds.
    #[arg(long, env = "KV_PEER_TIMEOUT_MS", default_value_t = 2000)]
    pub peer_timeout_ms: u64,
    /// Seconds between background anti-entropy rounds (0 = off).
    #[arg(long, env = "KV_ANTI_ENTROPY_SECS", default_value_t = 60)]
    pub anti_entropy_secs: u64,
    /// Seconds a tombstone is kept before it may be purged (once every owner has it).
    #[arg(long, env = "KV_TOMBSTONE_GRACE_SECS", default_value_t = 86_400)]
    pub tombstone_grace_secs: u64,
    /// Async worker threads (HTTP, coordination, replication, reads).
    /// Default: the CPUs the process may use (its cgroup quota included), at
    /// least 1. Nodes that share a machine should share its CPUs (`kvctl up`
    /// gives each node its share). With 1, the node runs on a current-thread
    /// runtime.
    #[arg(long, env = "KV_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Largest difference, in ms, between this node's clock and the median
    /// of its peers' before it refuses to coordinate writes (versions it
    /// stamped would be wrong by that much); half of it is logged as a warning.
    #[arg(long, env = "KV_MAX_CLOCK_SKEW_MS", default_value_t = 5_000)]
    pub max_clock_skew_ms: u64,
    /// Fault testing only: shifts the wall clock this node's versions are
    /// stamped from by this many ms (negative: behind).
    #[arg(
        long,
        env = "KV_CLOCK_OFFSET_MS",
        default_value_t = 0,
        allow_negative_numbers = true,
        hide = true
    )]
    pub clock_offset_ms: i64,
    /// TLS certificate (PEM chain) served on both ports and presented to
    /// peers; read again when the file changes. Needs --tls-key and
    /// --tls-cluster-ca.
    #[arg(long, env = "KV_TLS_CERT", requires_all = ["tls_key", "tls_cluster_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert; read again when it changes.
    #[arg(long, env = "KV_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): the peer port serves only peers presenting a
    /// certificate it issued (mutual TLS, on top of the cluster token), and
    /// peers' certificates are checked against it.
    #[arg(long, env = "KV_TLS_CLUSTER_CA", requires = "tls_cert")]
    pub tls_cluster_ca: Option<PathBuf>,
    /// A backup (`s3://bucket/prefix` or `file:///dir`) a new store loads its
    /// buckets from before it catches up and serves: how a cluster starts
    /// from a backup (KvCluster `spec.bootstrap.fromBackup`). A store that
    /// has caught up once never reads it.
    #[arg(long, env = "KV_RESTORE_FROM")]
    pub restore_from: Option<String>,
    /// The S3-compatible server of --restore-from (`http(s)://host:port`).
    /// With none of the --restore-s3-* settings, the AWS_* environment is read.
    #[arg(long, env = "KV_RESTORE_S3_ENDPOINT", requires = "restore_from")]
    pub restore_s3_endpoint: Option<String>,
    /// The region of --restore-from's server.
    #[arg(long, env = "KV_RESTORE_S3_REGION", requires = "restore_from")]
    pub restore_s3_region: Option<String>,
    /// The access key id for --restore-from.
    #[arg(
        long,
        env = "KV_RESTORE_S3_ACCESS_KEY_ID",
        hide_env_values = true,
        requires = "restore_from"
    )]
    pub restore_s3_access_key_id: Option<String>,
    /// The secret access key for --restore-from.
    #[arg(
        long,
        env = "KV_RESTORE_S3_SECRET_ACCESS_KEY",
        hide_env_values = true,
        requires = "restore_from"
    )]
    pub restore_s3_secret_access_key: Option<String>,
    /// `kvctl up` only: the gateway's address. While this node is Up it
    /// listens there too (`SO_REUSEPORT`, Linux), so the gateway's clients
    /// reach a serving node with no hop in between; control routes that
    /// arrive there are passed to --gateway-control.
    #[arg(
        long,
        env = "KV_GATEWAY_LISTEN",
        requires = "gateway_control",
        hide = true
    )]
    pub gateway_listen: Option<SocketAddr>,
    /// `kvctl up` only: where the control plane answers its routes
    /// (`http(s)://host:port`; [`crate::gateway_port`]).
    #[arg(
        long,
        env = "KV_GATEWAY_CONTROL",
        requires = "gateway_listen",
        hide = true
    )]
    pub gateway_control: Option<String>,
    /// Log format.
    #[arg(long, env = "KV_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("no {0} given (flag, environment or file)")]
    MissingToken(&'static str),
    #[error("cannot take a node ordinal from host name {0:?} (expected a name ending in -N)")]
    Hostname(String),
    #[error("TLS: {0}")]
    Tls(#[from] kv_net::tls::TlsError),
}

/// TLS on both ports and towards peers, from one certificate and key and the
/// cluster CA (files read again when they change).
#[derive(Clone, Debug)]
pub struct Tls {
    /// The client port: the node's certificate.
    pub client: std::sync::Arc<kv_net::tls::ServerTls>,
    /// The peer port: the node's certificate; a peer must present one the
    /// cluster CA issued.
    pub peer: std::sync::Arc<kv_net::tls::ServerTls>,
    /// Calls to peers: trusting the cluster CA, presenting the node's
    /// certificate.
    pub peer_client: rustls::ClientConfig,
}

impl Tls {
    pub fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        cluster_ca: &std::path::Path,
    ) -> Result<Tls, kv_net::tls::TlsError> {
        use kv_net::tls::{Identity, ServerFiles, ServerTls, client_config};
        let files = ServerFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
        };
        Ok(Tls {
            client: ServerTls::load(&files)?,
            peer: ServerTls::load(&ServerFiles {
                client_ca: Some(cluster_ca.to_path_buf()),
                ..files
            })?,
            peer_client: client_config(cluster_ca, Some(Identity::load(cert, key)?))?,
        })
    }
}

/// The settings the node runs with, after files are read.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub peer_listen: SocketAddr,
    pub advertise: String,
    pub peer_advertise: String,
    pub data_dir: PathBuf,
    pub node_id: u32,
    /// The client tokens (the client port accepts each).
    pub token: Tokens,
    /// The cluster tokens (the peer port accepts each; peers send the first).
    pub cluster_token: Tokens,
    pub topology_file: Option<PathBuf>,
    /// The control plane's held-down list ([`crate::held`]).
    pub held_file: Option<PathBuf>,
    pub max_value_bytes: usize,
    /// Bytes of records read lately kept in memory.
    pub read_cache_bytes: usize,
    /// Log pages at which the log is copied back into the database.
    pub checkpoint_pages: u32,
    pub peer_timeout: Duration,
    pub anti_entropy_every: Option<Duration>,
    pub tombstone_grace: Duration,
    pub worker_threads: usize,
    /// Clock skew past which the node refuses to coordinate writes.
    pub max_clock_skew: Duration,
    /// Fault testing only: offset of the wall clock the HLC reads, in ms.
    pub clock_offset_ms: i64,
    /// TLS on both ports and to peers; `None`: plaintext.
    pub tls: Option<Tls>,
    /// The backup a new store loads before it catches up (`--restore-from`).
    pub restore: Option<RestoreFrom>,
    /// `kvctl up`'s shared gateway port ([`crate::gateway_port`]).
    pub gateway: Option<GatewayPort>,
}

/// The gateway's port, shared by the Up nodes of `kvctl up`, and where the
/// control routes that reach a node there go.
#[derive(Clone, Debug)]
pub struct GatewayPort {
    pub listen: SocketAddr,
    /// `http(s)://host:port` of the control plane.
    pub control: String,
}

/// A backup to load a new store from, and how to reach it.
#[derive(Clone)]
pub struct RestoreFrom {
    pub url: String,
    /// `None`: S3 settings from the AWS_* environment.
    pub s3: Option<kv_backup::target::S3Options>,
}

/// Without the credentials: a Config may be logged.
impl std::fmt::Debug for RestoreFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreFrom")
            .field("url", &self.url)
            .field(
                "s3_endpoint",
                &self.s3.as_ref().and_then(|s| s.endpoint.as_deref()),
            )
            .finish_non_exhaustive()
    }
}

/// Async worker threads for `cpus` available CPUs: one per CPU. Reads are
/// served on these threads, writes mostly on the storage writer and log
/// syncer; leaving a core to those two cost a single node on 2 CPUs a fifth
/// of its reads and gained its writes nothing (bench/profile.md, 2026-12-05).
pub fn default_worker_threads(cpus: usize) -> usize {
    cpus.max(1)
}

/// A token from its flag (one, fixed) or its file (read again every second:
/// rotation, see [`kv_net::token`]).
fn token(
    flag: &Option<String>,
    file: &Option<PathBuf>,
    what: &'static str,
) -> Result<Tokens, ConfigError> {
    match (flag, file) {
        (Some(t), _) => Ok(Tokens::fixed(what, t)?),
        (None, Some(path)) => Ok(Tokens::watch(what, path)?),
        (None, None) => Err(ConfigError::MissingToken(what)),
    }
}

/// `demo-2` → 2.
pub fn ordinal_from_hostname(host: &str) -> Result<u32, ConfigError> {
    let host = host.trim();
    let short = host.split('.').next().unwrap_or(host);
    short
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| ConfigError::Hostname(host.to_string()))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default()
}

impl Args {
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let node_id = match self.node_id {
            Some(n) => n,
            None => ordinal_from_hostname(&hostname())?,
        };
        Ok(Config {
            listen: self.listen,
            peer_listen: self.peer_listen,
            advertise: self
                .advertise
                .clone()
                .unwrap_or_else(|| self.listen.to_string()),
            peer_advertise: self
                .peer_advertise
                .clone()
                .unwrap_or_else(|| self.peer_listen.to_string()),
            data_dir: self.data_dir.clone(),
            node_id,
            token: token(&self.token, &self.token_file, "client token")?,
            cluster_token: token(
                &self.cluster_token,
                &self.cluster_token_file,
                "cluster token",
            )?,
            topology_file: self.topology_file.clone(),
            held_file: self.held_file.clone(),
            max_value_bytes: self.max_value_bytes,
            read_cache_bytes: self.read_cache_mb.saturating_mul(1 << 20),
            checkpoint_pages: self.checkpoint_pages,
            peer_timeout: Duration::from_millis(self.peer_timeout_ms.max(1)),
            anti_entropy_every: (self.anti_entropy_secs > 0)
                .then(|| Duration::from_secs(self.anti_entropy_secs)),
            tombstone_grace: Duration::from_secs(self.tombstone_grace_secs),
            max_clock_skew: Duration::from_millis(self.max_clock_skew_ms.max(1)),
            clock_offset_ms: self.clock_offset_ms,
            gateway: self.gateway_listen.zip(self.gateway_control.clone()).map(
                |(listen, control)| GatewayPort {
                    listen,
                    control: control.trim_end_matches('/').to_string(),
                },
            ),
            restore: self.restore_from.as_ref().map(|url| RestoreFrom {
                url: url.clone(),
                s3: (self.restore_s3_endpoint.is_some()
                    || self.restore_s3_region.is_some()
                    || self.restore_s3_access_key_id.is_some()
                    || self.restore_s3_secret_access_key.is_some())
                .then(|| kv_backup::target::S3Options {
                    endpoint: self.restore_s3_endpoint.clone(),
                    region: self.restore_s3_region.clone(),
                    access_key_id: self.restore_s3_access_key_id.clone(),
                    secret_access_key: self.restore_s3_secret_access_key.clone(),
                }),
            }),
            tls: match (&self.tls_cert, &self.tls_key, &self.tls_cluster_ca) {
                (Some(cert), Some(key), Some(ca)) => Some(Tls::load(cert, key, ca)?),
                _ => None,
            },
            worker_threads: match self.worker_threads {
                Some(n) => usize::from(n),
                None => default_worker_threads(
                    std::thread::available_parallelism().map_or(1, |n| n.get()),
                ),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_come_from_statefulset_host_names() {
        assert_eq!(ordinal_from_hostname("demo-2").unwrap(), 2);
        assert_eq!(
            ordinal_from_hostname("my-kv-10.demo-peers.ns.svc").unwrap(),
            10
        );
        assert!(ordinal_from_hostname("demo").is_err());
        assert!(ordinal_from_hostname("demo-x").is_err());
    }

    #[test]
    fn worker_threads_are_one_per_cpu_unless_set() {
        assert_eq!(default_worker_threads(0), 1);
        assert_eq!(default_worker_threads(1), 1);
        assert_eq!(default_worker_threads(2), 2);
        assert_eq!(default_worker_threads(8), 8);
        let base = [
            "kv-node",
            "--node-id",
            "1",
            "--token",
            "t",
            "--cluster-token",
            "c",
        ];
        let set = Args::parse_from(base.iter().chain(&["--worker-threads", "3"]));
        assert_eq!(set.resolve().unwrap().worker_threads, 3);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let unset = Args::parse_from(base);
        assert_eq!(
            unset.resolve().unwrap().worker_threads,
            default_worker_threads(cpus)
        );
        assert!(Args::try_parse_from(base.iter().chain(&["--worker-threads", "0"])).is_err());
    }

    #[test]
    fn tokens_come_from_flags_or_files_and_are_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        let args = Args::parse_from([
            "kv-node",
            "--node-id",
            "1",
            "--token-file",
            f.to_str().unwrap(),
            "--cluster-token",
            "c",
        ]);
        let c = args.resolve().unwrap();
        assert_eq!(
            (c.token.current(), c.cluster_token.current()),
            ("s3cret".to_string(), "c".to_string())
        );
        std::fs::write(&f, "  \n").unwrap();
        assert!(matches!(args.resolve(), Err(ConfigError::Token(_))));
        let none = Args::parse_from(["kv-node", "--node-id", "1", "--cluster-token", "c"]);
        assert!(matches!(none.resolve(), Err(ConfigError::MissingToken(_))));
    }
}
