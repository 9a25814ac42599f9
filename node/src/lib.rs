//! kv-node: one kvstore node.
//!
//! - [`storage`]: SQLite in WAL mode behind one group-committing writer, with
//!   durable hints kept in the same transactions as the records and per-bucket
//!   digests kept in memory (rebuilt from the records on opening);
//!   last-writer-wins apply-if-newer is the one write primitive.
//! - [`api`] (client port) and [`peer_api`] (node-to-node port): the HTTP API
//!   of docs/design.md, served by warp.
//! - [`coordinator`]: quorum reads and writes over the key's owners, hints
//!   for owners that are down, read repair.
//! - [`peer`]: the batching node-to-node client.
//! - [`sync`]: hinted handoff, catch-up and rebalance streaming,
//!   anti-entropy, tombstone GC.
//! - [`cluster`]: the topology this node holds and its catch-up progress.
//! - [`held`]: waiting, fenced, while the control plane holds the node down.
//! - [`process`]: the node as a whole process (logging, runtime, signals),
//!   shared by the `kv-node` binary and `kvctl node`.

pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod coordinator;
pub mod gateway_port;
pub mod held;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod peer_api;
pub mod process;
pub mod restore;
pub mod storage;
pub mod sync;

pub use node::{ApiError, Node, NodeError};
pub use storage::{CommitObserver, StorageError, Store, StoreOptions, StoreStats};

/// Runs a node until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish and closes the database.
pub async fn run(
    config: config::Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let mut shutdown = Box::pin(shutdown);
    if !held::wait_while_held(&config, &mut shutdown).await? {
        return Ok(());
    }
    let (node, seen) = Node::open(config)?;
    node.load_topology_file();
    node.check_store_age().await?;
    let client = tokio::net::TcpListener::bind(node.config.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: node.config.listen,
            source,
        })?;
    let peer = tokio::net::TcpListener::bind(node.config.peer_listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: node.config.peer_listen,
            source,
        })?;
    tracing::info!(
        node = node.me(),
        listen = %node.config.listen,
        peer_listen = %node.config.peer_listen,
        epoch = node.cluster.epoch(),
        state = ?node.cluster.my_state(),
        tls = node.config.tls.is_some(),
        "kv-node serving"
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let tls = node.config.tls.clone();
    servers.spawn(kv_net::serve_tls(
        "client",
        api::routes(node.clone()),
        client,
        tls.as_ref().map(|t| t.client.clone()),
        stop.clone(),
    ));
    servers.spawn(kv_net::serve_tls(
        "peer",
        peer_api::routes(node.clone()),
        peer,
        tls.map(|t| t.peer),
        stop.clone(),
    ));
    if let Some(port) = node.config.gateway.clone() {
        servers.spawn(gateway_port::share(node.clone(), port, stop.clone()));
    }
    // Background work is stopped, not waited for, at shutdown: every store
    // write it makes is its own transaction, done or not done.
    let background = [
        tokio::spawn(node.clone().watch_topology_file(stop.clone())),
        tokio::spawn(node.clone().confirm_with_peers(stop.clone())),
        tokio::spawn(node.clone().deliver_hints(stop.clone())),
        tokio::spawn(node.clone().sync_loop(stop.clone())),
        tokio::spawn(node.clone().refresh_gauges(stop.clone())),
        tokio::spawn(node.clone().follow_epochs(seen)),
    ];
    tokio::select! {
        _ = &mut shutdown => {}
        _ = node.exit.notified() => {
            tracing::info!("failed by a control call this node passed on: stopping once it has answered");
        }
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = stop_tx.send(true);
    for task in &background {
        task.abort();
    }
    let drain = async { while servers.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(20), drain)
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish in 20 s; stopping anyway");
    }
    // Up to --checkpoint-pages of log would otherwise be read again at the
    // next start (the process exits before SQLite's last close would do it).
    let store = node.store.clone();
    match tokio::task::spawn_blocking(move || store.empty_log()).await {
        Ok(Ok(())) => tracing::info!("database closed, its log copied back; bye"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the log was not copied back at shutdown; the next start reads it")
        }
        Err(e) => {
            tracing::warn!(error = %e, "the log was not copied back at shutdown; the next start reads it")
        }
    }
    Ok(())
}
