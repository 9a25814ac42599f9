//! `kvctl bench`.

use std::process::ExitCode;

use anyhow::{Result, bail};
use kvctl::bench::{self, BenchArgs, BenchConfig};
use kvctl::cli::Level;

pub async fn run(
    endpoint: &str,
    token: Option<String>,
    consistency: Option<Level>,
    args: BenchArgs,
    tls: kvctl::client::TlsOptions,
    json_out: bool,
) -> Result<ExitCode> {
    let cfg = BenchConfig::from_args(&args, endpoint, token, consistency.map(Into::into), tls)?;
    let report = bench::run(cfg).await?;
    if json_out {
        crate::cmd::print_json(&report)?;
    } else {
        print!("{}", report.render());
    }
    if report.ops == 0 && report.errors > 0 {
        let kinds: Vec<String> = report
            .errors_by_kind
            .iter()
            .map(|(k, v)| match report.error_examples.get(k) {
                Some(first) => format!("{k} {v}, the first: {first}"),
                None => format!("{k} {v}"),
            })
            .collect();
        bail!("every operation failed ({})", kinds.join("; "));
    }
    Ok(ExitCode::SUCCESS)
}
