//! `kv-operator`: the kvstore control plane on Kubernetes.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// Print the KvCluster CRD as YAML (checked in as deploy/crd.yaml).
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            let yaml = kv_operator::k8s::crd::crd_yaml().context("serializing the CRD")?;
            print!("{yaml}");
        }
    }
    Ok(())
}
