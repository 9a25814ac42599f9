//! The local platform behind `kvctl up`: kv-node processes on loopback,
//! driven by the same [`planner`](crate::planner) as the Kubernetes
//! operator, and a gateway ([`gateway`]) that routes clients to Up nodes and
//! serves the control routes.
//!
//! Everything the platform knows lives in its data directory:
//! `cluster.json` (cluster id, tokens, the desired cluster with its held-down
//! set, each ordinal's ports, the epoch floor), `topology.json` (the
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

pub mod gateway;
pub mod metrics;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kv_core::{Consistency, NodeState, Strategy, Topology};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::planner::{
    self, Action, Desired, NodeObservation, NodeProgress, Observed, Plan, PlannerConfig,
};

/// How often the supervisor plans.
const TICK: Duration = Duration::from_millis(250);
/// Least time between two starts of the same node.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

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
}

/// `cluster.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    pub cluster_id: String,
    pub token: String,
    pub cluster_token: String,
    pub replicas: u32,
    pub strategy: Strategy,
    pub factor: u32,
    pub read_consistency: Consistency,
    pub write_consistency: Consistency,
    pub failed_nodes: BTreeSet<u32>,
    /// The last change was forced (a hold-down that leaves keys short of
    /// write owners); kept until the next change so the planner carries it out.
    #[serde(default)]
    pub force: bool,
    pub epoch_floor: u64,
    /// Client and peer port of each ordinal, fixed at its first start.
    pub ports: BTreeMap<u32, (u16, u16)>,
}

impl SavedState {
    pub fn desired(&self) -> Desired {
        Desired {
            replicas: self.replicas,
            strategy: self.strategy,
            factor: self.factor,
            read_consistency: self.read_consistency,
            write_consistency: self.write_consistency,
            failed_nodes: self.failed_nodes.clone(),
            force: self.force,
        }
    }

    fn set_desired(&mut self, d: &Desired) {
        self.replicas = d.replicas;
        self.strategy = d.strategy;
        self.factor = d.factor;
        self.read_consistency = d.read_consistency;
        self.write_consistency = d.write_consistency;
        self.failed_nodes = d.failed_nodes.clone();
        self.force = d.force;
    }
}

pub fn random_token() -> String {
    crate::token::random_token()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A loopback port that was free a moment ago, for a process started next to
/// listen on. Taken below Linux's default ephemeral range (32768 and up), from
/// which outgoing connections draw their source ports: a port handed out by
/// the kernel (`bind :0`) can be taken by a connection before the node binds it
/// (seen as "Address already in use" at start under test load).
pub fn free_port() -> Result<u16, LocalError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // a start that differs between processes picking at the same time
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + seed.wrapping_add(n.wrapping_mul(7_919)) % SPAN;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            drop(l);
            return Ok(port as u16);
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(LocalError::Port)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    let io = |source| LocalError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

struct Proc {
    child: Child,
    /// We killed it on purpose (held down or stopped): not a crash.
    expected_exit: bool,
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
        std::fs::create_dir_all(&opts.data_dir).map_err(|source| LocalError::DataDir {
            path: opts.data_dir.clone(),
            source,
        })?;
        let state_path = opts.data_dir.join("cluster.json");
        let mut saved = match std::fs::read(&state_path) {
            Ok(bytes) => {
                serde_json::from_slice::<SavedState>(&bytes).map_err(|e| LocalError::BadState {
                    path: state_path.clone(),
                    message: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SavedState {
                cluster_id: format!("local-{}", &random_token()[..12]),
                token: opts.token.clone().unwrap_or_else(random_token),
                cluster_token: random_token(),
                replicas: 3,
                strategy: Strategy::Full,
                factor: 3,
                read_consistency: Consistency::Quorum,
                write_consistency: Consistency::Quorum,
                failed_nodes: BTreeSet::new(),
                force: false,
                epoch_floor: 0,
                ports: BTreeMap::new(),
            },
            Err(source) => {
                return Err(LocalError::DataDir {
                    path: state_path,
                    source,
                });
            }
        };
        if let Some(t) = &opts.token {
            saved.token = t.clone();
        }
        let mut d = saved.desired();
        if let Some(r) = opts.replicas {
            d.replicas = r;
        }
        if let Some(s) = opts.strategy {
            d.strategy = s;
        }
        match (opts.factor, opts.strategy) {
            (Some(f), _) => d.factor = f,
            // Full's factor is its member count.
            (None, Some(Strategy::Full)) => d.factor = d.replicas,
            _ => {}
        }
        if let Some(c) = opts.read_consistency {
            d.read_consistency = c;
        }
        if let Some(c) = opts.write_consistency {
            d.write_consistency = c;
        }
        if let Some(f) = &opts.failed_nodes {
            d.failed_nodes = f.clone();
        }
        saved.set_desired(&d);
        for o in 0..saved.replicas {
            if let std::collections::btree_map::Entry::Vacant(e) = saved.ports.entry(o) {
                e.insert((free_port()?, free_port()?));
            }
        }
        let topology = std::fs::read(opts.data_dir.join("topology.json"))
            .ok()
            .and_then(|b| Topology::from_json(&b).ok());
        if let Some(t) = &topology {
            saved.epoch_floor = saved.epoch_floor.max(t.epoch);
        }
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
        let platform = Platform {
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(800))
                .build()
                .unwrap_or_default(),
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

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, inner: &Inner) -> Result<(), LocalError> {
        let json = serde_json::to_vec_pretty(&inner.saved).unwrap_or_default();
        write_atomic(&self.opts.data_dir.join("cluster.json"), &json)
    }

    fn say(&self, line: String) {
        if self.opts.verbose {
            println!("{line}");
        }
        tracing::info!("{line}");
    }

    fn observed(&self, inner: &Inner, now: u64) -> Observed {
        let mut nodes = BTreeMap::new();
        let ordinals: BTreeSet<u32> = inner
            .procs
            .keys()
            .chain(inner.down_since.keys())
            .chain(inner.reports.keys())
            .chain(
                inner
                    .topology
                    .iter()
                    .flat_map(|t| t.nodes.iter().map(|n| &n.ordinal)),
            )
            .copied()
            .collect();
        for o in ordinals {
            nodes.insert(
                o,
                NodeObservation {
                    running: inner.procs.contains_key(&o),
                    down_since_ms: inner.down_since.get(&o).copied(),
                    report: inner.reports.get(&o).cloned(),
                },
            );
        }
        Observed {
            cluster_id: inner.saved.cluster_id.clone(),
            topology: inner.topology.clone(),
            epoch_floor: inner.saved.epoch_floor,
            now_ms: now,
            nodes,
        }
    }

    /// Would the planner accept `desired` now? (A dry run for the control routes.)
    pub fn check_desired(&self, inner: &Inner, desired: &Desired) -> Result<(), String> {
        let plan = planner::plan(desired, &self.observed(inner, now_ms()), &self.config);
        match plan.refusal {
            Some(r) => Err(r.reason),
            None => Ok(()),
        }
    }

    /// Changes the desired cluster if the planner accepts it; saved at once.
    pub fn change(&self, f: impl FnOnce(&mut Desired)) -> Result<Desired, String> {
        let mut inner = self.lock();
        let mut d = inner.saved.desired();
        d.force = false;
        f(&mut d);
        for o in 0..d.replicas {
            if let std::collections::btree_map::Entry::Vacant(e) = inner.saved.ports.entry(o) {
                e.insert((
                    free_port().map_err(|e| e.to_string())?,
                    free_port().map_err(|e| e.to_string())?,
                ));
            }
        }
        *self.ports.lock().unwrap_or_else(|p| p.into_inner()) = inner.saved.ports.clone();
        self.check_desired(&inner, &d)?;
        inner.saved.set_desired(&d);
        *self.ports.lock().unwrap_or_else(|p| p.into_inner()) = inner.saved.ports.clone();
        self.save(&inner).map_err(|e| e.to_string())?;
        Ok(d)
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

    /// The process id of a running node (for a harness that kills it).
    pub fn node_pid(&self, o: u32) -> Option<u32> {
        self.lock().procs.get(&o).and_then(|p| p.child.id())
    }

    fn ports(&self, o: u32) -> Option<(u16, u16)> {
        self.lock().saved.ports.get(&o).copied()
    }

    pub fn client_address(&self, o: u32) -> Option<String> {
        self.ports(o).map(|(c, _)| format!("127.0.0.1:{c}"))
    }

    /// Runs the supervisor until `stop` flips; then stops every node.
    pub async fn supervise(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => break,
            }
        }
        self.shutdown().await;
    }

    /// One round: reap, observe, plan, act.
    pub async fn tick(&self) {
        let started = Instant::now();
        self.reap();
        self.poll_reports().await;
        let (plan, observed) = {
            let inner = self.lock();
            let observed = self.observed(&inner, now_ms());
            let desired = inner.saved.desired();
            (planner::plan(&desired, &observed, &self.config), observed)
        };
        let counted = plan.clone();
        self.apply(plan, observed).await;
        self.metrics.record_tick(started, &counted);
    }

    fn reap(&self) {
        let mut inner = self.lock();
        let now = now_ms();
        let mut exited = Vec::new();
        for (o, p) in inner.procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                exited.push((*o, status, p.expected_exit));
            }
        }
        for (o, status, expected) in exited {
            inner.procs.remove(&o);
            inner.reports.remove(&o);
            inner.answered.remove(&o);
            if expected {
                inner.down_since.entry(o).or_insert(now);
            } else {
                // A crash is a definite failure: Failed now, restarted next.
                let since = now.saturating_sub(self.opts.failure_detection_ms);
                inner.down_since.insert(o, since);
                self.say(format!("node {o}: process exited on its own ({status}); it will be restarted and catch up"));
            }
        }
    }

    /// Ordinal, client port and peer port of every running node.
    fn running_ports(&self) -> Vec<(u32, u16, u16)> {
        let inner = self.lock();
        inner
            .procs
            .keys()
            .filter_map(|o| inner.saved.ports.get(o).map(|(c, p)| (*o, *c, *p)))
            .collect()
    }

    async fn poll_reports(&self) {
        let targets: Vec<(u32, String)> = self
            .running_ports()
            .into_iter()
            .map(|(o, c, _)| (o, format!("http://127.0.0.1:{c}/v1/cluster")))
            .collect();
        let token = self.lock().saved.token.clone();
        let mut answers = Vec::new();
        let futs = targets.into_iter().map(|(o, url)| {
            let req = self.http.get(url).bearer_auth(&token);
            async move {
                let r = match req.send().await {
                    Ok(resp) if resp.status().is_success() => {
                        resp.json::<kv_core::NodeReport>().await.ok()
                    }
                    _ => None,
                };
                (o, r)
            }
        });
        for (o, v) in futures::future::join_all(futs).await {
            // a node whose store is new or rebuilt gets no client traffic
            // until it has caught up (its acknowledgements do not count yet)
            let catching_up = v.as_ref().is_some_and(|r| r.store_catching_up);
            answers.push((o, v.as_ref().map(NodeProgress::from), catching_up));
        }
        let mut inner = self.lock();
        let now = now_ms();
        for (o, report, catching_up) in answers {
            match report {
                Some(r) => {
                    inner.down_since.remove(&o);
                    // Unless it was killed or restarted while it was asked.
                    if inner.procs.contains_key(&o) && !catching_up {
                        inner.answered.insert(o);
                    } else if catching_up {
                        inner.answered.remove(&o);
                    }
                    if catching_up {
                        inner.catching_up.insert(o);
                    } else {
                        inner.catching_up.remove(&o);
                    }
                    inner.reports.insert(o, r);
                }
                None => {
                    inner.reports.remove(&o);
                    // A process just started gets a grace of one failure-detection period.
                    inner.down_since.entry(o).or_insert(now);
                }
            }
        }
    }

    async fn apply(&self, plan: Plan, observed: Observed) {
        for t in &plan.transitions {
            let from = t.from.map_or("new".to_string(), |s| s.to_string());
            self.say(format!(
                "node {}: {from} -> {} ({})",
                t.ordinal, t.to, t.reason
            ));
        }
        if let Some(rb) = plan.rebalance {
            self.say(format!("rebalance: {rb:?}"));
        }
        self.print_progress(&plan);
        let topology = plan.topology_after(&observed).cloned();
        if let Some(t) = &plan.topology {
            let mut inner = self.lock();
            inner.saved.epoch_floor = inner.saved.epoch_floor.max(t.epoch);
            inner.topology = Some(t.clone());
            if let Err(e) = self.save(&inner) {
                tracing::error!(error = %e, "cannot save the cluster state");
            }
            let json = serde_json::to_vec_pretty(t).unwrap_or_default();
            if let Err(e) = write_atomic(&self.opts.data_dir.join("topology.json"), &json) {
                tracing::error!(error = %e, "cannot write the topology file");
            }
        }
        for a in &plan.actions {
            match *a {
                Action::Kill(o) => self.kill(o).await,
                Action::PushTopology => {
                    if let Some(t) = &topology {
                        self.push(t).await;
                    }
                }
                Action::Stop(o) => self.stop(o).await,
                Action::Start(o) => self.start(o),
            }
        }
        self.lock().last_plan = Some(plan);
    }

    fn print_progress(&self, plan: &Plan) {
        let mut lines = Vec::new();
        {
            let mut inner = self.lock();
            for n in &plan.nodes {
                if let (Some(p), NodeState::Recovering | NodeState::Joining) =
                    (n.resync_progress, n.state)
                {
                    let pct = (p * 100.0).floor() as u32;
                    let last = inner.printed_progress.insert(n.ordinal, pct);
                    if last.is_none_or(|l| pct >= l + 10 || (pct == 100 && l != 100)) {
                        lines.push(format!(
                            "node {}: {} {pct}%",
                            n.ordinal,
                            if n.state == NodeState::Joining {
                                "streaming"
                            } else {
                                "catching up"
                            }
                        ));
                    }
                } else {
                    inner.printed_progress.remove(&n.ordinal);
                }
            }
        }
        for l in lines {
            self.say(l);
        }
    }

    async fn push(&self, t: &Topology) {
        let targets: Vec<String> = self
            .running_ports()
            .into_iter()
            .map(|(_, _, p)| format!("http://127.0.0.1:{p}/internal/v1/topology"))
            .collect();
        let token = self.lock().saved.cluster_token.clone();
        let body = serde_json::to_vec(t).unwrap_or_default();
        let futs = targets.into_iter().map(|url| {
            self.http
                .put(url)
                .bearer_auth(&token)
                .header("x-kv-epoch", t.epoch)
                .body(body.clone())
                .send()
        });
        // Nodes also read the file; a failed push is caught up from there.
        let _ = futures::future::join_all(futs).await;
    }

    fn start(&self, o: u32) {
        let mut inner = self.lock();
        if inner.procs.contains_key(&o) {
            return;
        }
        if inner
            .last_start
            .get(&o)
            .is_some_and(|t| t.elapsed() < RESTART_BACKOFF)
        {
            return;
        }
        let Some((port, peer)) = inner.saved.ports.get(&o).copied() else {
            tracing::error!(node = o, "no ports assigned");
            return;
        };
        let dir = self.node_data_dir(o);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.opts.data_dir.join(format!("node-{o}.log")));
        let mut cmd = Command::new(&self.opts.node_binary);
        cmd.args(&self.node_args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--peer-listen")
            .arg(format!("127.0.0.1:{peer}"))
            .arg("--data-dir")
            .arg(&dir)
            .arg("--node-id")
            .arg(o.to_string())
            .arg("--topology-file")
            .arg(self.opts.data_dir.join("topology.json"))
            .arg("--anti-entropy-secs")
            .arg(self.opts.anti_entropy_secs.to_string())
            .env("KV_TOKEN", &inner.saved.token)
            .env("KV_CLUSTER_TOKEN", &inner.saved.cluster_token)
            .envs(
                self.node_env
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&o)
                    .cloned()
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        match log {
            Ok(f) => {
                cmd.stderr(f);
            }
            Err(_) => {
                cmd.stderr(Stdio::null());
            }
        }
        inner.last_start.insert(o, Instant::now());
        inner.answered.remove(&o);
        match cmd.spawn() {
            Ok(child) => {
                inner.procs.insert(
                    o,
                    Proc {
                        child,
                        expected_exit: false,
                    },
                );
                drop(inner);
                self.say(format!(
                    "node {o}: started on 127.0.0.1:{port} (peer {peer})"
                ));
            }
            Err(e) => {
                drop(inner);
                self.say(format!(
                    "node {o}: cannot start {}: {e}",
                    self.opts.node_binary.display()
                ));
            }
        }
    }

    async fn kill(&self, o: u32) {
        let child = {
            let mut inner = self.lock();
            inner.reports.remove(&o);
            inner.answered.remove(&o);
            inner.down_since.insert(o, now_ms());
            inner.procs.remove(&o)
        };
        if let Some(mut p) = child {
            p.expected_exit = true;
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
            self.say(format!("node {o}: killed (SIGKILL), held down"));
        }
    }

    async fn stop(&self, o: u32) {
        let child = {
            let mut inner = self.lock();
            inner.reports.remove(&o);
            inner.answered.remove(&o);
            inner.down_since.remove(&o);
            inner.procs.remove(&o)
        };
        if let Some(p) = child {
            terminate(p.child).await;
            self.say(format!("node {o}: stopped (left the cluster)"));
        }
    }

    /// Stops every node with SIGTERM (bounded wait, then SIGKILL).
    pub async fn shutdown(&self) {
        let procs: Vec<(u32, Proc)> = {
            let mut inner = self.lock();
            std::mem::take(&mut inner.procs).into_iter().collect()
        };
        let waits = procs.into_iter().map(|(o, p)| async move {
            terminate(p.child).await;
            o
        });
        for o in futures::future::join_all(waits).await {
            self.say(format!("node {o}: stopped"));
        }
    }

    /// The nodes clients may be routed to: Up (or Leaving) in the topology,
    /// running, and answering since they were started.
    pub fn serving_nodes(&self) -> Vec<(u32, String)> {
        let inner = self.lock();
        let Some(t) = &inner.topology else {
            return Vec::new();
        };
        t.nodes
            .iter()
            .filter(|n| {
                n.state.serves_client_reads()
                    && inner.procs.contains_key(&n.ordinal)
                    && inner.answered.contains(&n.ordinal)
            })
            .map(|n| (n.ordinal, n.address.clone()))
            .collect()
    }
}

async fn terminate(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
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
    let platform = Platform::open_with(opts, node_args)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| LocalError::Listen {
            addr: listen,
            source,
        })?;
    let local = listener.local_addr().unwrap_or(listen);
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
        platform.say(format!("gateway: http://{local}"));
        platform.say(format!("token:   {}", s.token));
        if !s.failed_nodes.is_empty() {
            platform.say(format!("held down: {:?}", s.failed_nodes));
        }
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(platform.clone().supervise(stop.clone()));
    let gw = tokio::spawn(gateway::serve(
        gateway::Gateway::new(platform.clone()),
        listener,
        stop,
    ));
    shutdown.await;
    platform.say("stopping: nodes get SIGTERM and finish in-flight writes".into());
    let _ = stop_tx.send(true);
    let _ = gw.await;
    let _ = supervisor.await;
    platform.say("stopped".into());
    Ok(())
}
