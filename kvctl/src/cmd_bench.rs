//! `kvctl bench`.

use std::process::ExitCode;

use anyhow::Result;
use kvctl::bench::BenchArgs;
use kvctl::cli::Level;

pub async fn run(
    _endpoint: &str,
    _token: Option<String>,
    _consistency: Option<Level>,
    _args: BenchArgs,
    _json_out: bool,
) -> Result<ExitCode> {
    anyhow::bail!("bench: not yet")
}
