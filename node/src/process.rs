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
    let runtime = build_runtime(config.worker_threads).map_err(ProcessError::Runtime)?;
    runtime.block_on(crate::run(config, shutdown_signal()))?;
    Ok(())
}

/// With one worker, a current-thread runtime: the multi-thread scheduler
/// would add a thread beside the one that waits in `block_on` and hand every
/// wake-up across them. Three co-located nodes with one worker each wrote
/// 2–3 % more this way (bench/profile.md, thirteenth step).
fn build_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build()
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

#[cfg(test)]
mod tests {
    use super::build_runtime;
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_worker_runs_on_the_current_thread_more_on_a_pool() {
        let one = build_runtime(1).unwrap();
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        // what a node needs from it: timers, sockets and blocking work
        let ok = one.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let spawned = tokio::spawn(async move { l.local_addr().unwrap().port() });
            let port = spawned.await.unwrap();
            tokio::task::spawn_blocking(move || port > 0).await.unwrap()
        });
        assert!(ok);
        let two = build_runtime(2).unwrap();
        assert_eq!(two.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
    }
}
