//! `kvctl bench`: a load generator for kvstore, etcd and Redis.

use clap::Args;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Keys in the key space.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
}
