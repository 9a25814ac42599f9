//! Node processes: started with the node's flags and the cluster's tokens,
//! killed (SIGKILL) when held down, stopped (SIGTERM, bounded) when they
//! leave or at shutdown.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::state::now_ms;
use crate::{LocalError, Platform};

/// How long a node that passes on the call failing it has to stop by itself
/// before it is killed.
const RELAY_EXIT_WITHIN: Duration = Duration::from_secs(2);

/// See [`Platform::relaying`].
pub(crate) struct RelayGuard<'a> {
    platform: &'a Platform,
    o: u32,
}

impl Drop for RelayGuard<'_> {
    fn drop(&mut self) {
        self.platform
            .relays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.o);
    }
}

/// Least time between two starts of the same node.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// Ports handed to ordinals whose node has not started since: held bound
/// (not listening) until [`Platform::start`] spawns it, so that another
/// process picking ports meanwhile (certificates are issued in between) does
/// not take one and leave the node unable to start.
static RESERVED: std::sync::Mutex<BTreeMap<u16, kv_net::port::Reservation>> =
    std::sync::Mutex::new(BTreeMap::new());

fn reserved() -> std::sync::MutexGuard<'static, BTreeMap<u16, kv_net::port::Reservation>> {
    RESERVED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Async worker threads for each of `nodes` node processes on `cpus` CPUs.
pub(super) fn worker_threads_per_node(cpus: usize, nodes: usize) -> usize {
    (cpus / nodes.max(1)).max(1)
}

/// A client and a peer port for a new ordinal, held until its node starts.
pub(super) fn new_ports() -> Result<(u16, u16), LocalError> {
    let port = || -> Result<u16, LocalError> {
        let r = kv_net::port::reserve().map_err(LocalError::Port)?;
        let p = r.port();
        reserved().insert(p, r);
        Ok(p)
    };
    Ok((port()?, port()?))
}

pub(super) struct Proc {
    pub(super) child: Child,
    /// We killed it on purpose (held down or stopped): not a crash.
    pub(super) expected_exit: bool,
}

impl Platform {
    /// The process id of a running node (for a harness that kills it).
    pub fn node_pid(&self, o: u32) -> Option<u32> {
        self.lock().procs.get(&o).and_then(|p| p.child.id())
    }

    pub(super) fn start(&self, o: u32) {
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
        let tls = match self
            .tls
            .as_ref()
            .map(|t| t.node_files(o).map(|f| (f, t.ca_file())))
        {
            Some(Err(e)) => {
                tracing::error!(node = o, error = %e, "cannot issue the node's certificate");
                return;
            }
            Some(Ok(files)) => Some(files),
            None => None,
        };
        let nodes = inner
            .topology
            .as_ref()
            .map_or(inner.saved.ports.len(), |t| t.nodes.len());
        let mut cmd = Command::new(&self.opts.node_binary);
        // The nodes share this machine's CPUs: each one's async runtime gets
        // its share, not all of them (a caller's KV_WORKER_THREADS wins).
        if std::env::var_os("KV_WORKER_THREADS").is_none() {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            cmd.env(
                "KV_WORKER_THREADS",
                worker_threads_per_node(cpus, nodes).to_string(),
            );
        }
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
            // The token files, read again when they change (rotation); a
            // KV_TOKEN of the caller's environment would conflict with them.
            .env_remove("KV_TOKEN")
            .env_remove("KV_CLUSTER_TOKEN")
            .env(
                "KV_TOKEN_FILE",
                crate::tokens::client_file(&self.opts.data_dir),
            )
            .env(
                "KV_CLUSTER_TOKEN_FILE",
                crate::tokens::cluster_file(&self.opts.data_dir),
            )
            .envs(tls.iter().flat_map(|((cert, key), ca)| {
                [
                    ("KV_TLS_CERT", cert.clone()),
                    ("KV_TLS_KEY", key.clone()),
                    ("KV_TLS_CLUSTER_CA", ca.clone()),
                ]
            }))
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
        // Environment, not flags: a --node-binary of an older kv-node
        // ignores it and just does not share the port.
        cmd.env_remove("KV_GATEWAY_LISTEN")
            .env_remove("KV_GATEWAY_CONTROL");
        if let Some((listen, control)) = self.gateway_port.get() {
            cmd.env("KV_GATEWAY_LISTEN", listen.to_string())
                .env("KV_GATEWAY_CONTROL", control);
        }
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
        {
            let mut held = reserved();
            held.remove(&port);
            held.remove(&peer);
        }
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

    pub(super) async fn kill(&self, o: u32) {
        let child = {
            let mut inner = self.lock();
            inner.reports.remove(&o);
            inner.answered.remove(&o);
            inner.down_since.insert(o, now_ms());
            inner.procs.remove(&o)
        };
        if let Some(mut p) = child {
            p.expected_exit = true;
            // A node passing on the call that fails it stops by itself once
            // it has written the answer, which waits for this round to end
            // (it is already listed as not running): killing it now would
            // cut the caller's connection.
            if self.is_relaying(o) {
                self.say(format!(
                    "node {o}: held down; it stops once it has passed on the answer (SIGKILL within {} s)",
                    RELAY_EXIT_WITHIN.as_secs()
                ));
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(RELAY_EXIT_WITHIN, p.child.wait()).await;
                    let _ = p.child.start_kill();
                    let _ = p.child.wait().await;
                });
                return;
            }
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
            self.say(format!("node {o}: killed (SIGKILL), held down"));
        }
    }

    /// Marks node `o` as passing on a call that fails it, until the guard
    /// is dropped (the answer is written).
    pub(crate) fn relaying(&self, o: u32) -> RelayGuard<'_> {
        self.relays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(o);
        RelayGuard { platform: self, o }
    }

    fn is_relaying(&self, o: u32) -> bool {
        self.relays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&o)
    }

    pub(super) async fn stop(&self, o: u32) {
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

#[cfg(test)]
mod tests {
    use super::worker_threads_per_node;

    #[test]
    fn nodes_share_the_cpus() {
        assert_eq!(worker_threads_per_node(2, 1), 2);
        assert_eq!(worker_threads_per_node(2, 3), 1);
        assert_eq!(worker_threads_per_node(8, 3), 2);
        assert_eq!(worker_threads_per_node(1, 0), 1);
    }
}
