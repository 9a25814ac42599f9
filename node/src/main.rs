//! The `kv-node` binary: flags and environment → [`kv_node::process::run_process`]
//! (`kvctl node` runs the same entry point).

use clap::Parser;
use kv_node::config::Args;

fn main() -> anyhow::Result<()> {
    kv_node::process::run_process(Args::parse())?;
    Ok(())
}
