//! A local cluster run by the operator's local platform (the supervisor and
//! gateway of `kvctl up`), with a fault-injection [`Proxy`] on every node's
//! peer link, in a temporary data directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use kv_core::{Consistency, NodeState, Strategy, Topology};
use kv_local::{Platform, UpOptions, gateway};
use kvctl::verify::{self, DigestsResponse, NodeDigests, VerifyReport};

use crate::client::Targets;
use crate::proxy::{Net, Proxy, ProxyError};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("temporary directory: {0}")]
    TempDir(std::io::Error),
    #[error(transparent)]
    Platform(#[from] kv_local::LocalError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("gateway: {0}")]
    Gateway(std::io::Error),
    #[error("node {0} has no ports")]
    NoPorts(u32),
    #[error("{0}")]
    NodeBinary(String),
    #[error("the cluster was not ready within {0:?}: {1}")]
    NotReady(Duration, String),
}

/// The cluster's shape.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: u32,
    pub factor: u32,
    pub node_binary: PathBuf,
    /// Background anti-entropy period of every node.
    pub anti_entropy_secs: u64,
    pub failure_detection_ms: u64,
    /// Keep the data directory (and node logs) instead of deleting it.
    pub keep_data: bool,
}

/// A running cluster; stopped (every node SIGTERM'd) by [`Cluster::stop`].
pub struct Cluster {
    pub platform: Arc<Platform>,
    pub net: Arc<Net>,
    pub gateway: SocketAddr,
    pub token: String,
    pub nodes: u32,
    /// The factor the cluster started with (heals go back to it).
    pub factor: u32,
    pub data_dir: PathBuf,
    /// Clock offsets (ms) nodes start with ([`Cluster::set_clock_offset`]).
    clock_offsets: Mutex<BTreeMap<u32, i64>>,
    _proxies: Vec<Proxy>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    pub async fn start(opts: &ClusterOptions) -> Result<Cluster, ClusterError> {
        let dir = tempfile::Builder::new()
            .prefix("kv-chaos-")
            .tempdir()
            .map_err(ClusterError::TempDir)?;
        let data_dir = dir.path().to_path_buf();
        let platform = Platform::open(UpOptions {
            replicas: Some(opts.nodes),
            strategy: Some(Strategy::ConsistentHashing),
            factor: Some(opts.factor),
            read_consistency: Some(Consistency::Quorum),
            write_consistency: Some(Consistency::Quorum),
            failed_nodes: None,
            data_dir: data_dir.clone(),
            listen: "127.0.0.1:0"
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            token: Some(kv_local::random_token()),
            node_binary: opts.node_binary.clone(),
            failure_detection_ms: opts.failure_detection_ms,
            anti_entropy_secs: opts.anti_entropy_secs,
            tls: false,
            verbose: false,
            // the harness drives nodes directly, never through a gateway
            gateway: kv_local::GatewayMode::Proxy,
        })?;
        let net = Net::new();
        let mut proxies = Vec::new();
        let ports = platform.lock().saved.ports.clone();
        for o in 0..opts.nodes {
            let (_, peer) = ports.get(&o).copied().ok_or(ClusterError::NoPorts(o))?;
            let upstream = SocketAddr::from(([127, 0, 0, 1], peer));
            let proxy = Proxy::start(o, upstream, net.clone()).await?;
            platform.route_peer_traffic(o, proxy.addr.to_string());
            proxies.push(proxy);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(ClusterError::Gateway)?;
        let gateway_addr = listener.local_addr().map_err(ClusterError::Gateway)?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let supervisor = tokio::spawn(platform.clone().supervise(stop_rx.clone()));
        let gw = tokio::spawn(gateway::serve(
            gateway::Gateway::new(platform.clone()),
            listener,
            stop_rx,
        ));
        let token = platform.tokens.client.current();
        let cluster = Cluster {
            platform,
            net,
            gateway: gateway_addr,
            token,
            nodes: opts.nodes,
            factor: opts.factor,
            data_dir,
            clock_offsets: Mutex::default(),
            _proxies: proxies,
            stop,
            tasks: vec![supervisor, gw],
            dir: if opts.keep_data {
                let _ = dir.keep();
                None
            } else {
                Some(dir)
            },
        };
        let limit = Duration::from_secs(60);
        if !cluster.wait_all_up(limit).await {
            let mut why = cluster.describe();
            if opts.keep_data {
                why.push_str(&format!("; node logs in {}", cluster.data_dir.display()));
            }
            for o in cluster.nodes_not_up() {
                let log = cluster.data_dir.join(format!("node-{o}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                // a backtrace can fill the tail: the error and panic lines
                // themselves say why, so they are shown first
                let lines: Vec<&str> = text.lines().collect();
                let said: Vec<&&str> = lines
                    .iter()
                    .filter(|l| {
                        l.starts_with("Error:")
                            || l.contains("panicked at")
                            || l.trim_start().starts_with(|c: char| c.is_ascii_digit())
                                && l.contains(": ")
                                && !l.contains(" at ")
                                && !l.contains("::")
                            || l.contains(" ERROR ")
                    })
                    .collect();
                why.push_str(&format!("\nnode {o}'s log, errors:"));
                for l in &said[said.len().saturating_sub(12)..] {
                    why.push_str(&format!("\n  {l}"));
                }
                why.push_str(&format!("\nnode {o}'s log ends:"));
                for l in &lines[lines.len().saturating_sub(5)..] {
                    why.push_str(&format!("\n  {l}"));
                }
            }
            cluster.stop().await;
            return Err(ClusterError::NotReady(limit, why));
        }
        Ok(cluster)
    }

    pub fn targets(&self) -> Targets {
        Targets {
            gateway: self.gateway.to_string(),
            nodes: (0..self.nodes)
                .filter_map(|o| self.platform.client_address(o).map(|a| (o, a)))
                .collect(),
            token: self.token.clone(),
        }
    }

    pub fn initial_factor(&self) -> u32 {
        self.factor
    }

    pub fn topology(&self) -> Option<Topology> {
        self.platform.lock().topology.clone()
    }

    /// Every node Up in a committed topology, running and answering.
    pub fn all_up(&self) -> bool {
        let Some(t) = self.topology() else {
            return false;
        };
        t.pending.is_none()
            && t.nodes.len() == self.nodes as usize
            && t.nodes.iter().all(|n| n.state == NodeState::Up)
            && self.platform.serving_nodes().len() == self.nodes as usize
    }

    /// Nodes not Up in the topology or not serving.
    fn nodes_not_up(&self) -> Vec<u32> {
        let serving: Vec<u32> = self
            .platform
            .serving_nodes()
            .iter()
            .map(|(o, _)| *o)
            .collect();
        let up: Vec<u32> = self
            .topology()
            .map(|t| {
                t.nodes
                    .iter()
                    .filter(|n| n.state == NodeState::Up)
                    .map(|n| n.ordinal)
                    .collect()
            })
            .unwrap_or_default();
        (0..self.nodes)
            .filter(|o| !serving.contains(o) || !up.contains(o))
            .collect()
    }

    /// Waits (bounded) until [`Cluster::all_up`].
    pub async fn wait_all_up(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.all_up() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.all_up()
    }

    /// One line on every node's state, for error messages.
    pub fn describe(&self) -> String {
        match self.topology() {
            Some(t) => {
                let states: Vec<String> = t
                    .nodes
                    .iter()
                    .map(|n| format!("{}={}", n.ordinal, n.state))
                    .collect();
                format!(
                    "epoch {}, {} factor {}{}, nodes {}, serving {:?}",
                    t.epoch,
                    t.placement.strategy,
                    t.placement.factor,
                    if t.pending.is_some() {
                        " (rebalancing)"
                    } else {
                        ""
                    },
                    states.join(" "),
                    self.platform
                        .serving_nodes()
                        .iter()
                        .map(|(o, _)| *o)
                        .collect::<Vec<_>>()
                )
            }
            None => "no topology yet".to_string(),
        }
    }

    /// Sets (`Some`) or clears node `o`'s clock offset, from its next start
    /// on: the node adds `KV_CLOCK_OFFSET_MS` to the wall clock its hybrid
    /// logical clock reads.
    pub fn set_clock_offset(&self, o: u32, offset_ms: Option<i64>) {
        let mut offsets = self.clock_offsets.lock().unwrap_or_else(|p| p.into_inner());
        match offset_ms {
            Some(ms) => offsets.insert(o, ms),
            None => offsets.remove(&o),
        };
        self.platform
            .set_node_env(o, "KV_CLOCK_OFFSET_MS", offset_ms.map(|ms| ms.to_string()));
    }

    /// Nodes started (or to be started) with a clock offset.
    pub fn skewed_nodes(&self) -> Vec<u32> {
        let offsets = self.clock_offsets.lock().unwrap_or_else(|p| p.into_inner());
        offsets.keys().copied().collect()
    }

    fn signal(&self, o: u32, signal: Signal) -> Result<u32, String> {
        let pid = self
            .platform
            .node_pid(o)
            .ok_or_else(|| format!("node {o} is not running"))?;
        let raw = i32::try_from(pid).map_err(|e| e.to_string())?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal)
            .map_err(|e| format!("{signal} to node {o} (pid {pid}): {e}"))?;
        Ok(pid)
    }

    /// Kills node `o` with SIGKILL; the platform restarts it.
    pub fn kill_node(&self, o: u32) -> Result<(), String> {
        self.signal(o, Signal::SIGKILL).map(|_| ())
    }

    /// Stops node `o` with SIGTERM and waits (bounded) until the platform
    /// has started it again, as after a crash (Failed, then Recovering until
    /// caught up). The new process reads its environment afresh.
    pub async fn restart_node(&self, o: u32, limit: Duration) -> Result<(), String> {
        let old = self.signal(o, Signal::SIGTERM)?;
        let deadline = Instant::now() + limit;
        loop {
            match self.platform.node_pid(o) {
                Some(pid) if pid != old => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "node {o} was not started again within {}s",
                        limit.as_secs()
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Loses node `o`'s volume: freezes its process (SIGSTOP) so that it
    /// writes nothing more, removes everything in its data directory, then
    /// kills it (SIGKILL). The platform restarts it on an empty store.
    pub fn wipe_node(&self, o: u32) -> Result<(), String> {
        self.signal(o, Signal::SIGSTOP)?;
        let dir = self.platform.node_data_dir(o);
        let removed = remove_contents(&dir).map_err(|e| format!("wiping {}: {e}", dir.display()));
        self.signal(o, Signal::SIGKILL)?;
        removed
    }

    /// `GET path` on the node at `addr` with the client token, as JSON;
    /// `None` when it does not answer or the body does not parse.
    async fn get_json(
        &self,
        http: &reqwest::Client,
        addr: &str,
        path: &str,
    ) -> Option<serde_json::Value> {
        http.get(format!("http://{addr}{path}"))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// Every node's digests (`GET /v1/digests`) compared bucket by bucket
    /// among co-owners, as `kvctl verify` does, plus the hints still
    /// pending across the cluster. `None` when a node did not answer.
    pub async fn verify(&self, http: &reqwest::Client) -> Option<(VerifyReport, u64)> {
        let topology = self.topology()?;
        let mut digests: BTreeMap<u32, NodeDigests> = BTreeMap::new();
        let mut hints = 0u64;
        for (o, addr) in self.targets().nodes {
            let d = self.get_json(http, &addr, "/v1/digests").await?;
            let d: DigestsResponse = serde_json::from_value(d).ok()?;
            digests.insert(o, d.parse().ok()?);
            let c = self.get_json(http, &addr, "/v1/cluster").await?;
            hints += kv_core::NodeReport::from_json(&c).map_or(0, |r| r.hints_pending);
        }
        Some((verify::compare(&topology, &digests), hints))
    }

    /// Stops the supervisor (which SIGTERMs every node) and the gateway.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        drop(self.dir.take());
    }
}

/// Removes everything in `dir`, keeping `dir` (an empty volume).
fn remove_contents(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The kv-node binary: `KV_NODE_BIN` when set, else built by cargo into the
/// target directory this program runs from (a no-op when it is up to date),
/// the way kvctl's tests find it.
pub fn kv_node_bin() -> Result<PathBuf, ClusterError> {
    if let Some(p) = std::env::var_os("KV_NODE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| ClusterError::NodeBinary(e.to_string()))?;
    // target/<profile>/kv-chaos or target/<profile>/deps/<test>-<hash>
    let mut profile_dir = exe
        .parent()
        .ok_or_else(|| ClusterError::NodeBinary("no parent of the executable".into()))?
        .to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let profile = profile_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| ClusterError::NodeBinary("no target directory".into()))?
        .to_path_buf();
    let bin = profile_dir.join(format!("kv-node{}", std::env::consts::EXE_SUFFIX));
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "-p",
        "kv-node",
        "--bin",
        "kv-node",
        "--manifest-path",
    ])
    .arg(&manifest)
    .env("CARGO_TARGET_DIR", &target_dir);
    if profile == "release" {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|e| ClusterError::NodeBinary(format!("cannot run cargo: {e}")))?;
    if !bin.exists() {
        return Err(ClusterError::NodeBinary(format!(
            "kv-node is not at {} and `cargo build -p kv-node` did not make it:\n{}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(bin)
}
