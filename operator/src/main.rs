//! `kv-operator`: the kvstore control plane on Kubernetes.
//!
//! `run` reconciles KvClusters (behind leader election), `crd` prints the CRD
//! that is checked in as `deploy/crd.yaml`, `render` prints the objects a
//! KvCluster would own.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use kv_operator::k8s::{KvCluster, crd, render, run};

#[derive(Parser)]
#[command(
    name = "kv-operator",
    version,
    about = "kvstore operator for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile KvClusters until SIGTERM.
    Run {
        /// Address of /metrics, /healthz and /readyz.
        #[arg(
            long,
            env = "KV_OPERATOR_METRICS_LISTEN",
            default_value = "0.0.0.0:8080"
        )]
        metrics_listen: SocketAddr,
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "KV_OPERATOR_WATCH_NAMESPACE")]
        watch_namespace: Option<String>,
        /// Name of the coordination Lease used for leader election.
        #[arg(long, env = "KV_OPERATOR_LEASE_NAME", default_value = "kv-operator")]
        lease_name: String,
        /// Namespace of the Lease: the operator's own namespace.
        #[arg(long, env = "POD_NAMESPACE", default_value = "kvstore-system")]
        lease_namespace: String,
        /// This replica's identity in the Lease.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Run without leader election (a single replica, e.g. outside the cluster).
        #[arg(long, env = "KV_OPERATOR_NO_LEADER_ELECTION")]
        no_leader_election: bool,
        /// Do not poll the nodes' /v1/cluster (node reports); Recovering and
        /// Joining nodes then stay there until reports are available.
        #[arg(long, env = "KV_OPERATOR_NO_NODE_REPORTS")]
        no_node_reports: bool,
        /// Log format.
        #[arg(
            long,
            env = "KV_OPERATOR_LOG_FORMAT",
            value_enum,
            default_value = "json"
        )]
        log_format: LogFormat,
    },
    /// Print a CRD as YAML: KvCluster (checked in as deploy/crd.yaml) or
    /// KvBackup (deploy/crd-kvbackup.yaml).
    Crd {
        #[arg(value_enum, default_value = "kvcluster")]
        kind: CrdKind,
    },
    /// Print the objects a KvCluster would own, as YAML documents.
    Render {
        /// A KvCluster manifest.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CrdKind {
    Kvcluster,
    Kvbackup,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { kind } => {
            let yaml = match kind {
                CrdKind::Kvcluster => crd::crd_yaml(),
                CrdKind::Kvbackup => kv_operator::k8s::backup::crd_yaml(),
            }
            .context("serializing the CRD")?;
            print!("{yaml}");
        }
        Command::Render { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let kvc: KvCluster = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not a KvCluster", file.display()))?;
            print!("{}", render::render(&kvc)?);
        }
        Command::Run {
            metrics_listen,
            watch_namespace,
            lease_name,
            lease_namespace,
            identity,
            no_leader_election,
            no_node_reports,
            log_format,
        } => {
            init_logs(log_format);
            let identity = identity.unwrap_or_else(|| {
                format!(
                    "kv-operator-{}",
                    &kv_operator::k8s::objects::random_token()[..12]
                )
            });
            run::run(run::RunConfig {
                metrics_listen,
                watch_namespace,
                lease: (!no_leader_election).then_some((lease_name, lease_namespace)),
                identity,
                node_reports: !no_node_reports,
                // Not the Lease's namespace, which defaults when unset: an
                // unknown namespace lets operator pods of any namespace in.
                operator_namespace: std::env::var("POD_NAMESPACE").ok(),
            })
            .await?;
        }
    }
    Ok(())
}
