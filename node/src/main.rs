//! The `kv-node` binary: flags and environment → [`kv_node::process::run_process`]
//! (`kvctl node` runs the same entry point).

use clap::Parser;
use kv_node::config::Args;

/// mimalloc rather than glibc's malloc: a request allocates and frees many
/// small buffers across worker threads, and glibc's allocator was ~11 % of a
/// node's CPU under quorum reads (bench/profile.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kv_node::process::run_process(Args::parse())?;
    Ok(())
}
