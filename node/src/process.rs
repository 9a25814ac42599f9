//! A node as a whole process: logging, the async runtime sized by
//! `--worker-threads`, and SIGTERM / Ctrl-C as the shutdown. The `kv-node`
//! binary and `kvctl node` (which `kvctl up` runs for each node) both start
//! a node through [`run_process`], so the two take the same flags and
//! environment and behave the same.

use crate::config::{Args, ConfigError};
use crate::node::NodeError;

/// Why a node process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("kv-node failed: {0}")]
    Node(#[from] NodeError),
}

/// Runs one node with `args` until SIGTERM or Ctrl-C, on a runtime of its
/// own; logs go to stderr (`--log-format text|json`, `RUST_LOG`, default
/// `info`). Call it from a thread that is not inside an async runtime.
pub fn run_process(args: Args) -> Result<(), ProcessError> {
    init_logging(&args.log_format);
    let config = args.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .map_err(ProcessError::Runtime)?;
    runtime.block_on(crate::run(config, shutdown_signal()))?;
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A subscriber already installed (a test harness) is kept.
    let _ = if format == "json" {
        fmt.json().try_init()
    } else {
        fmt.try_init()
    };
}

/// SIGTERM (Kubernetes, the local platform) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
