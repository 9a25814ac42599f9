//! `kvctl up`: a whole cluster on this machine (see `kv_local`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use kv_core::Strategy;
use kv_crd::kvcluster::KvCluster;
use kv_local::{GatewayMode, UpOptions, up};
use kvctl::cli::{GatewayArg, StrategyArg, UpArgs};

pub async fn run(args: UpArgs, token: Option<String>) -> Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let (node_binary, mut node_args) = node_program(args.node_binary.as_deref())?;
    if let Some(url) = &args.restore_from {
        // Only a store that is new loads the backup, so on a cluster that
        // exists the flag would do nothing: say so instead.
        let state = args.data_dir.join("cluster.json");
        if state.exists() {
            anyhow::bail!(
                "{} already holds a cluster ({}); --restore-from starts a new one: choose an empty --data-dir, or use `kvctl restore --from {url}` against this cluster",
                args.data_dir.display(),
                state.display()
            );
        }
        kv_backup::target::parse(url).with_context(|| format!("--restore-from {url}"))?;
        node_args.push(OsString::from("--restore-from"));
        node_args.push(OsString::from(url));
    }
    let mut opts = UpOptions {
        replicas: args.nodes,
        strategy: args.strategy.map(|s| match s {
            StrategyArg::Full => Strategy::Full,
            StrategyArg::ConsistentHashing => Strategy::ConsistentHashing,
        }),
        factor: args.replication_factor,
        read_consistency: args.read_consistency.map(Into::into),
        write_consistency: args.write_consistency.map(Into::into),
        failed_nodes: None,
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        token,
        node_binary,
        failure_detection_ms: args.failure_detection_ms,
        anti_entropy_secs: args.anti_entropy_secs,
        verbose: true,
        tls: args.tls,
        gateway: match args.gateway {
            GatewayArg::Shared => GatewayMode::Shared,
            GatewayArg::Proxy => GatewayMode::Proxy,
        },
    };
    if let Some(file) = &args.file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let kvc: KvCluster = serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not a KvCluster", file.display()))?;
        let d = kvc.spec.desired();
        opts.replicas = opts.replicas.or(Some(d.replicas));
        opts.strategy = opts.strategy.or(Some(d.strategy));
        opts.factor = opts.factor.or(Some(d.factor));
        opts.read_consistency = opts.read_consistency.or(Some(d.read_consistency));
        opts.write_consistency = opts.write_consistency.or(Some(d.write_consistency));
        opts.failed_nodes = Some(d.failed_nodes);
    }
    up(opts, node_args, kv_node::process::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// The program each node runs as, and the arguments before its flags:
/// `--node-binary` (a kv-node binary) when given, else this executable as
/// `kvctl node`, so `cargo run -p kvctl -- up` needs no second binary.
fn node_program(given: Option<&Path>) -> Result<(PathBuf, Vec<OsString>)> {
    if let Some(p) = given {
        return Ok((p.to_path_buf(), Vec::new()));
    }
    let me = std::env::current_exe().context(
        "cannot find this executable to run the nodes as `kvctl node`; pass --node-binary",
    )?;
    Ok((me, vec![OsString::from("node")]))
}
