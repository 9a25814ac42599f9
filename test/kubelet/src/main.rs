//! kv-test-kubelet: a kubelet for tests, without containers.
//!
//! It registers a Node and keeps its Lease fresh (`node`), provisions a
//! directory-backed PersistentVolume for each pending claim it serves
//! (`provisioner`), and runs every Pod bound to its Node as local processes
//! (`pods` watches and hands each pod to a `worker`). A worker owns one pod:
//! its loopback IP, its volume directories (`volumes`), its processes (with
//! mount paths and wildcard addresses rewritten, `paths`; env resolved,
//! `env`), its probes (`probe`) and its status. What it does not emulate is
//! listed in docs/kubernetes-tests.md.

mod dns;
mod env;
mod node;
mod paths;
mod pods;
mod probe;
mod provisioner;
mod volumes;
mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};

/// Runs the pods bound to one Node as local processes.
#[derive(Clone, Debug, Parser)]
#[command(name = "kv-test-kubelet", version, about)]
pub struct Args {
    /// Kubeconfig to reach the API server with.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Name of the Node to register and run pods for.
    #[arg(long, default_value = "kv-test-node")]
    pub node_name: String,
    /// Working directory: pod directories, logs and PersistentVolumes.
    #[arg(long, default_value = "/tmp/kv-test-kubelet")]
    pub root: PathBuf,
    /// IMAGE=BINARY: run BINARY for containers of IMAGE (repeatable). The binary
    /// stands for the image's entrypoint.
    #[arg(long = "image-map", value_parser = parse_image_map)]
    pub image_map: Vec<(String, PathBuf)>,
    /// First three octets of the pod IPs (127.0.1 gives 127.0.1.2 .. 127.0.1.254).
    /// The API server refuses loopback addresses in EndpointSlices, so a
    /// cluster whose Services must list pods needs a non-loopback /24 that is
    /// local (on `lo`): scripts/test-kubernetes.sh uses 198.18.0 in a network
    /// namespace of its own.
    #[arg(long, default_value = "127.0.1")]
    pub pod_ip_prefix: String,
    /// Seconds before a changed ConfigMap or Secret reaches a running pod's
    /// volume (the real kubelet: its sync period plus the cache TTL, ~60-90 s).
    #[arg(long, default_value_t = 60.0)]
    pub configmap_sync_delay: f64,
    /// The same for Secret volumes (default: --configmap-sync-delay). The
    /// end-to-end story keeps ConfigMaps slow (the operator must not wait on
    /// them) and Secrets quicker, so that a token rotation's three steps fit
    /// in its time.
    #[arg(long)]
    pub secret_sync_delay: Option<f64>,
    /// Storage classes whose claims this kubelet provisions, besides claims
    /// without a class (repeatable).
    #[arg(long = "storage-class")]
    pub storage_classes: Vec<String>,
    /// First restart back-off of an exited container, seconds (doubles up to
    /// --max-restart-backoff; the real kubelet: 10 and 300).
    #[arg(long, default_value_t = 10.0)]
    pub restart_backoff: f64,
    #[arg(long, default_value_t = 300.0)]
    pub max_restart_backoff: f64,
    /// CPU, memory and pod capacity the Node reports.
    #[arg(long, default_value = "4")]
    pub cpu: String,
    #[arg(long, default_value = "8Gi")]
    pub memory: String,
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Lease renewal period, seconds (the real kubelet: 10).
    #[arg(long, default_value_t = 10)]
    pub heartbeat_secs: u64,
    /// Delete the Node (and its Lease) when stopping.
    #[arg(long)]
    pub delete_node_on_exit: bool,
    /// Do not emulate cluster DNS. By default `<root>/hosts` lists every
    /// EndpointSlice's names (`<pod>.<svc>.<ns>.svc[.cluster.local]`,
    /// `<svc>.<ns>.svc[...]`) and each pod process sees it as `/etc/hosts`
    /// in its own mount namespace (needs root or CAP_SYS_ADMIN).
    #[arg(long)]
    pub no_cluster_dns: bool,
}

fn parse_image_map(s: &str) -> Result<(String, PathBuf), String> {
    let (image, bin) = s.split_once('=').ok_or("expected IMAGE=BINARY")?;
    if image.is_empty() || bin.is_empty() {
        return Err("expected IMAGE=BINARY".into());
    }
    Ok((image.to_string(), PathBuf::from(bin)))
}

/// Pod IPs in use: one per pod, by pod uid.
#[derive(Debug)]
pub struct IpPool {
    prefix: [u8; 3],
    used: BTreeMap<u8, String>,
}

impl IpPool {
    pub fn new(prefix: &str) -> Result<IpPool> {
        let octets: Vec<u8> = prefix
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("--pod-ip-prefix")?;
        let [a, b, c] = octets[..] else {
            bail!("--pod-ip-prefix needs three octets, got {prefix:?}")
        };
        // Loopback is local without setup, but the API server refuses it in
        // EndpointSlices; another prefix must be local too (an address of
        // that /24 on `lo`, e.g. in a network namespace of its own). A bind
        // is the check: best effort (some sandboxes, gVisor, let any
        // address be bound).
        if a != 127 {
            let probe = std::net::SocketAddr::from(([a, b, c, 2], 0));
            if std::net::TcpListener::bind(probe).is_err() {
                bail!(
                    "--pod-ip-prefix {prefix}: {a}.{b}.{c}.2 is not a local address; add the /24 to lo (ip addr add {a}.{b}.{c}.1/24 dev lo) or use 127.0.x"
                );
            }
        }
        Ok(IpPool {
            prefix: [a, b, c],
            used: BTreeMap::new(),
        })
    }

    /// The pod's address: `preferred` if it is free and ours, else the lowest free one.
    pub fn allocate(&mut self, uid: &str, preferred: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some((&n, _)) = self.used.iter().find(|(_, u)| *u == uid) {
            return Some(self.ip(n));
        }
        let [a, b, c] = self.prefix;
        let wanted = preferred
            .map(|ip| ip.octets())
            .filter(|o| {
                o[..3] == [a, b, c] && (2..=254).contains(&o[3]) && !self.used.contains_key(&o[3])
            })
            .map(|o| o[3]);
        let n = wanted.or_else(|| (2..=254u8).find(|n| !self.used.contains_key(n)))?;
        self.used.insert(n, uid.to_string());
        Some(self.ip(n))
    }

    pub fn release(&mut self, uid: &str) {
        self.used.retain(|_, u| u != uid);
    }

    fn ip(&self, n: u8) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, n)
    }
}

/// What every part of the kubelet shares.
pub struct Ctx {
    pub client: Client,
    pub args: Args,
    pub ips: Mutex<IpPool>,
    /// `KUBERNETES_SERVICE_HOST`/`_PORT` for pods: the API server from the kubeconfig.
    pub api_host_port: Option<(String, u16)>,
    /// The mount namespace with the cluster-DNS hosts file, unless disabled.
    pub dns: Option<Arc<dns::Namespace>>,
}

impl Ctx {
    pub fn served_class(&self, class: Option<&str>) -> bool {
        match class {
            None | Some("") => true,
            Some(c) => self.args.storage_classes.iter().any(|s| s == c),
        }
    }

    pub fn images(&self) -> BTreeSet<&str> {
        self.args
            .image_map
            .iter()
            .map(|(i, _)| i.as_str())
            .collect()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    for (image, bin) in &args.image_map {
        if !bin.is_file() {
            bail!("--image-map {image}={}: no such file", bin.display());
        }
    }
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", args.kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let api_host_port = config
        .cluster_url
        .host()
        .map(|h| (h.to_string(), config.cluster_url.port_u16().unwrap_or(443)));
    let client = Client::try_from(config)?;
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("creating {}", args.root.display()))?;
    let root = std::fs::canonicalize(&args.root)?;
    let hosts = dns::hosts_path(&root);
    let base_hosts = dns::base_hosts();
    let dns = if args.no_cluster_dns {
        None
    } else if !dns::namespaces_work() {
        tracing::warn!(
            "cannot make mount namespaces (not root, no CAP_SYS_ADMIN?): no cluster DNS for pods"
        );
        None
    } else {
        dns::write_in_place(&hosts, &base_hosts)?;
        tracing::info!(hosts = %hosts.display(), "cluster DNS: pods see this file as /etc/hosts");
        Some(Arc::new(dns::Namespace::new(&hosts)?))
    };
    let ctx = Arc::new(Ctx {
        client,
        ips: Mutex::new(IpPool::new(&args.pod_ip_prefix)?),
        args: Args { root, ..args },
        api_host_port,
        dns,
    });

    node::register(&ctx).await.context("registering the Node")?;
    tracing::info!(node = %ctx.args.node_name, root = %ctx.args.root.display(), "node registered");
    let heartbeat = tokio::spawn(node::heartbeat(ctx.clone()));
    let provisioner = tokio::spawn(provisioner::run(ctx.clone()));
    let cluster_dns = ctx
        .dns
        .is_some()
        .then(|| tokio::spawn(dns::run(ctx.clone(), base_hosts)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut pods = tokio::spawn(pods::run(ctx.clone(), stop_rx));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping every pod's processes"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping every pod's processes"),
        r = &mut pods => bail!("the pod watch ended: {r:?}"),
    }
    heartbeat.abort();
    provisioner.abort();
    if let Some(t) = cluster_dns {
        t.abort();
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(60), pods).await {
        Ok(_) => tracing::info!("every pod's processes stopped"),
        Err(_) => tracing::warn!(
            "pods still stopping after 60 s; exiting (kill_on_drop and PDEATHSIG end them)"
        ),
    }
    if ctx.args.delete_node_on_exit {
        node::delete(&ctx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ips_are_loopback_reused_and_sticky() {
        let mut pool = IpPool::new("127.0.1").unwrap();
        assert_eq!(pool.allocate("a", None), Some(Ipv4Addr::new(127, 0, 1, 2)));
        assert_eq!(
            pool.allocate("b", Some(Ipv4Addr::new(127, 0, 1, 9))),
            Some(Ipv4Addr::new(127, 0, 1, 9))
        );
        assert_eq!(
            pool.allocate("c", Some(Ipv4Addr::new(127, 0, 1, 9))),
            Some(Ipv4Addr::new(127, 0, 1, 3))
        );
        assert_eq!(
            pool.allocate("a", None),
            Some(Ipv4Addr::new(127, 0, 1, 2)),
            "same pod, same IP"
        );
        pool.release("a");
        assert_eq!(
            pool.allocate("d", Some(Ipv4Addr::new(10, 0, 0, 2))),
            Some(Ipv4Addr::new(127, 0, 1, 2))
        );
        assert!(IpPool::new("10.0").is_err());
        assert!(IpPool::new("127.0.x").is_err());
    }
}
