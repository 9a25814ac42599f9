//! The `kv-node` binary: flags and environment → [`kv_node::process::run_process`]
//! (`kvctl node` runs the same entry point).

use clap::Parser;
use kv_node::config::Args;

/// mimalloc rather than glibc's malloc: a request allocates and frees many
/// small buffers across worker threads, where glibc's allocator was a
/// large share of a node's CPU (bench/profile.md, fifth step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kv_node::process::run_process(Args::parse())?;
    Ok(())
}
