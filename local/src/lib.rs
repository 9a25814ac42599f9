//! The local platform behind `kvctl up`: kv-node processes on loopback,
//! driven by the same [`planner`](kv_control::planner) as the Kubernetes
//! operator, and a gateway ([`gateway`]) that routes clients to Up nodes and
//! serves the control routes.
//!
//! Everything the platform knows lives in its data directory:
//! `cluster.json` (cluster id, the desired cluster with its held-down
//! set, each ordinal's ports, the epoch floor), `token` and `cluster-token`
//! (the tokens, owner-only, reloaded on change: [`tokens`]), `topology.json` (the
//! topology, also the file every node watches) and `node-N/` (each node's
//! database). Restarting `kvctl up` on the same directory brings back the
//! same cluster, data and held-down nodes.
//!
//! Once per tick the supervisor reaps processes, asks every running node for
//! its report (`GET /v1/cluster`), plans, and carries out the plan: kill a
//! node that was just held down, write and push the topology, stop nodes that
//! left, start nodes that should run. A process that exits on its own is a
//! definite failure: it is reported as down since long enough for the planner
//! to mark it Failed at once, and then restarted, so it catches up
//! (Recovering) before it serves again, as a restarted pod does.

//!
//! One module per job: [`state`] (the state files and the desired cluster),
//! [`supervisor`] (the observe → plan → act loop, and which nodes clients
//! may be routed to), [`process`] (starting, killing and stopping node
//! processes), [`gateway`] (the one address of clients) and [`metrics`].

pub mod gateway;
pub mod metrics;
mod process;
mod state;
mod supervisor;
mod tls;
pub mod tokens;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_core::{Consistency, Strategy, Topology};

use kv_control::planner::{NodeProgress, Plan, PlannerConfig};

pub use kv_net::free_port;
pub use state::{SavedState, random_token};

use process::Proc;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kvctl up state file: {message}")]
    BadState { path: PathBuf, message: String },
    #[error("cannot find a free port on loopback: {0}")]
    Port(std::io::Error),
    #[error(
        "the node binary {0} does not exist (leave out --node-binary to run nodes as `kvctl node`, or build kv-node with `cargo build --release -p kv-node`)"
    )]
    NoBinary(PathBuf),
    #[error("the cluster cannot be planned: {0}")]
    Refused(String),
    #[error("tokens: {0}")]
    Token(String),
    #[error("gateway: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What `kvctl up` was asked for.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// The cluster to run. `None` fields keep what the data directory holds
    /// (or the local defaults: 3 nodes, `Full`, `Quorum`/`Quorum`).
    pub replicas: Option<u32>,
    pub strategy: Option<Strategy>,
    pub factor: Option<u32>,
    pub read_consistency: Option<Consistency>,
    pub write_consistency: Option<Consistency>,
    /// Held-down ordinals from a KvCluster file (`faultInjection`).
    pub failed_nodes: Option<BTreeSet<u32>>,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub token: Option<String>,
    /// The program each node runs as: a kv-node binary, or kvctl's own
    /// executable with the leading arguments `node` ([`Platform::open_with`]).
    pub node_binary: PathBuf,
    pub failure_detection_ms: u64,
    /// Passed to every node (`--anti-entropy-secs`).
    pub anti_entropy_secs: u64,
    /// Print state changes and progress on stdout.
    pub verbose: bool,
    /// TLS everywhere (`kvctl up --tls`): a local CA and certificates in
    /// `<data-dir>/tls/`, nodes' ports and the gateway over TLS.
    pub tls: bool,
    /// How the gateway reaches the nodes.
    pub gateway: GatewayMode,
}

/// How clients of the gateway's address reach a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GatewayMode {
    /// The Up nodes listen on the gateway's port themselves
    /// (`SO_REUSEPORT`; kv-node's `gateway_port`): no hop. Linux only;
    /// elsewhere it is [`GatewayMode::Proxy`].
    #[default]
    Shared,
    /// The gateway forwards every request to an Up node (a second HTTP hop).
    Proxy,
}

/// What the supervisor and the gateway share.
pub struct Inner {
    pub saved: SavedState,
    pub topology: Option<Topology>,
    procs: BTreeMap<u32, Proc>,
    pub reports: BTreeMap<u32, NodeProgress>,
    down_since: BTreeMap<u32, u64>,
    last_start: BTreeMap<u32, Instant>,
    pub last_plan: Option<Plan>,
    printed_progress: BTreeMap<u32, u32>,
    /// Running nodes that have answered a report since their process
    /// started: only they get client traffic (a node just spawned is Up in
    /// a new cluster's topology before it listens).
    answered: BTreeSet<u32>,
    /// Nodes whose store is new or rebuilt and still catching up (their
    /// report's `storeCatchingUp`): shown as Recovering, given no clients.
    pub catching_up: BTreeSet<u32>,
}

/// The local cluster: its node processes, the state it keeps in its data
/// directory, and what the supervisor last saw. Shared (`Arc`) by the
/// supervisor, the gateway and the harnesses that drive it; each round of
/// kv-control's loop takes the lock only between calls to the nodes.
pub struct Platform {
    pub opts: UpOptions,
    /// The port map the planner's address function reads.
    ports: Arc<Mutex<BTreeMap<u32, (u16, u16)>>>,
    pub inner: Mutex<Inner>,
    pub http: reqwest::Client,
    pub config: PlannerConfig,
    /// Control-plane metrics, served on the gateway's `/metrics`.
    pub metrics: metrics::LocalMetrics,
    /// Peer addresses published in the topology in place of a node's own
    /// peer port; empty unless a fault harness puts a proxy on the peer
    /// links ([`Platform::route_peer_traffic`]).
    peer_routes: Arc<Mutex<BTreeMap<u32, String>>>,
    /// Extra environment of a node's process from its next start on; empty
    /// unless a fault harness sets some ([`Platform::set_node_env`]).
    node_env: Mutex<BTreeMap<u32, BTreeMap<String, String>>>,
    /// Arguments given to `node_binary` before the node's own flags
    /// (`node` when it is `kvctl` itself).
    node_args: Vec<std::ffi::OsString>,
    /// `kvctl up --tls`'s CA and certificates.
    pub tls: Option<tls::LocalTls>,
    /// The client and cluster tokens, from their files.
    pub tokens: tokens::LocalTokens,
    /// Held while a token rotation runs: one at a time.
    rotating: tokio::sync::Mutex<()>,
    /// The gateway's address and the control plane's, given to nodes that
    /// share the gateway's port (set once by [`up`]).
    gateway_port: std::sync::OnceLock<(SocketAddr, String)>,
    /// Nodes passing on a control call that fails them ([`Platform::relaying`]).
    relays: Mutex<BTreeSet<u32>>,
}

impl Platform {
    /// Loads or creates the state in the data directory; nodes run as
    /// `opts.node_binary` with the node's flags.
    pub fn open(opts: UpOptions) -> Result<Arc<Platform>, LocalError> {
        Platform::open_with(opts, Vec::new())
    }

    /// [`Platform::open`], with `node_args` given to `opts.node_binary`
    /// before the node's flags: `kvctl up` runs each node as `kvctl node
    /// ...`, a subprocess of its own executable.
    pub fn open_with(
        opts: UpOptions,
        node_args: Vec<std::ffi::OsString>,
    ) -> Result<Arc<Platform>, LocalError> {
        if !opts.node_binary.exists() {
            return Err(LocalError::NoBinary(opts.node_binary.clone()));
        }
        let (mut saved, topology) = SavedState::load(&opts)?;
        let legacy = (saved.legacy_token.take(), saved.legacy_cluster_token.take());
        let tokens = tokens::LocalTokens::prepare(&opts.data_dir, opts.token.as_deref(), legacy)?;
        let ports = Arc::new(Mutex::new(saved.ports.clone()));
        let addr_ports = ports.clone();
        let peer_routes: Arc<Mutex<BTreeMap<u32, String>>> = Arc::default();
        let addr_routes = peer_routes.clone();
        let config = PlannerConfig::new(move |o| {
            let p = addr_ports.lock().unwrap_or_else(|p| p.into_inner());
            let (c, q) = p.get(&o).copied().unwrap_or((0, 0));
            let routed = addr_routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&o)
                .cloned();
            (
                format!("127.0.0.1:{c}"),
                routed.unwrap_or_else(|| format!("127.0.0.1:{q}")),
            )
        })
        .with_failure_detection_ms(opts.failure_detection_ms);
        let tls = match opts.tls {
            true => Some(tls::LocalTls::prepare(&opts.data_dir)?),
            false => None,
        };
        let platform = Platform {
            http: tls::client_builder(tls.as_ref())
                .timeout(Duration::from_millis(800))
                .build()
                .unwrap_or_default(),
            tls,
            tokens,
            rotating: tokio::sync::Mutex::new(()),
            gateway_port: std::sync::OnceLock::new(),
            relays: Mutex::default(),
            inner: Mutex::new(Inner {
                saved,
                topology,
                procs: BTreeMap::new(),
                reports: BTreeMap::new(),
                down_since: BTreeMap::new(),
                last_start: BTreeMap::new(),
                last_plan: None,
                printed_progress: BTreeMap::new(),
                answered: BTreeSet::new(),
                catching_up: BTreeSet::new(),
            }),
            config,
            metrics: metrics::LocalMetrics::new(),
            ports: ports.clone(),
            peer_routes,
            node_env: Mutex::default(),
            node_args,
            opts,
        };
        // Ports are looked up by the planner's address function.
        let platform = Arc::new(platform);
        {
            let inner = platform.lock();
            let check = platform.check_desired(&inner, &inner.saved.desired());
            if let Err(reason) = check {
                return Err(LocalError::Refused(reason));
            }
            *ports.lock().unwrap_or_else(|p| p.into_inner()) = inner.saved.ports.clone();
            platform.save(&inner)?;
        }
        Ok(platform)
    }

    /// `https` with `--tls`, else `http`: how the platform calls its nodes.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn say(&self, line: String) {
        if self.opts.verbose {
            println!("{line}");
        }
        tracing::info!("{line}");
    }

    /// Publishes `address` as node `ordinal`'s peer address in the topology
    /// (what other nodes dial) instead of its own peer port: a fault harness
    /// puts a proxy there. Call it before the first [`Platform::tick`];
    /// the platform itself keeps pushing topologies to the real peer port.
    pub fn route_peer_traffic(&self, ordinal: u32, address: String) {
        self.peer_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ordinal, address);
    }

    /// Sets (`Some`) or removes (`None`) an environment variable of node
    /// `ordinal`'s process from its next start on; the running process keeps
    /// its own. For a fault harness only: it restarts a node with
    /// `KV_CLOCK_OFFSET_MS` to skew its clock.
    pub fn set_node_env(&self, ordinal: u32, name: &str, value: Option<String>) {
        let mut env = self.node_env.lock().unwrap_or_else(|p| p.into_inner());
        let vars = env.entry(ordinal).or_default();
        match value {
            Some(v) => vars.insert(name.to_string(), v),
            None => vars.remove(name),
        };
    }

    /// Node `ordinal`'s database directory (`node-N/`; its volume).
    pub fn node_data_dir(&self, ordinal: u32) -> PathBuf {
        self.opts.data_dir.join(format!("node-{ordinal}"))
    }

    pub(crate) fn ports(&self, o: u32) -> Option<(u16, u16)> {
        self.lock().saved.ports.get(&o).copied()
    }

    pub fn client_address(&self, o: u32) -> Option<String> {
        self.ports(o).map(|(c, _)| format!("127.0.0.1:{c}"))
    }
}

/// Runs the local cluster until `shutdown` resolves: the supervisor and the
/// gateway; then stops every node cleanly.
/// `node_args` come before each node's flags (see [`Platform::open_with`]).
pub async fn up(
    opts: UpOptions,
    node_args: Vec<std::ffi::OsString>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), LocalError> {
    let listen = opts.listen;
    let shared = opts.gateway == GatewayMode::Shared && cfg!(target_os = "linux");
    let platform = Platform::open_with(opts, node_args)?;
    let listen_error = |source| LocalError::Listen {
        addr: listen,
        source,
    };
    let listener = match shared {
        // A plain bind first: a port someone else holds, another `kvctl up`
        // included (its sockets would let ours join them), is refused. Not
        // listening: a client's connection queued on it would be reset.
        true => kv_net::port::probe(listen)
            .and_then(gateway::listen_shared)
            .map_err(listen_error)?,
        false => tokio::net::TcpListener::bind(listen)
            .await
            .map_err(listen_error)?,
    };
    let local = listener.local_addr().unwrap_or(listen);
    // Control calls that reach a node on the shared port come here.
    let control = match shared {
        true => {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            let control = tokio::net::TcpListener::bind(any)
                .await
                .map_err(|source| LocalError::Listen { addr: any, source })?;
            let addr = control.local_addr().unwrap_or(any);
            let url = format!("{}://{addr}", platform.scheme());
            let _ = platform.gateway_port.set((local, url));
            Some(control)
        }
        false => None,
    };
    {
        let inner = platform.lock();
        let s = &inner.saved;
        platform.say(format!(
            "kvctl up: {} nodes, {} (factor {}), reads {} / writes {}, data in {}",
            s.replicas,
            s.strategy,
            s.factor,
            s.read_consistency,
            s.write_consistency,
            platform.opts.data_dir.display()
        ));
        match &platform.tls {
            Some(tls) => {
                platform.say(format!("gateway: https://{local}"));
                platform.say(format!("CA:      {}", tls.ca_file().display()));
            }
            None => platform.say(format!("gateway: http://{local}")),
        }
        platform.say(format!("token:   {}", platform.tokens.client.current()));
        if !s.failed_nodes.is_empty() {
            platform.say(format!("held down: {:?}", s.failed_nodes));
        }
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(platform.clone().supervise(stop.clone()));
    let gateway = gateway::Gateway::new(platform.clone());
    let mut servers = tokio::task::JoinSet::new();
    if let Some(control) = control {
        servers.spawn(gateway::serve(gateway.clone(), control, stop.clone()));
    }
    servers.spawn(gateway::serve(gateway, listener, stop));
    shutdown.await;
    platform.say("stopping: nodes get SIGTERM and finish in-flight writes".into());
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    let _ = supervisor.await;
    platform.say("stopped".into());
    Ok(())
}
