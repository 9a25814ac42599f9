//! kvctl: the kvstore command-line client.

mod cmd;
mod cmd_bench;
mod cmd_up;

use std::process::ExitCode;

use clap::Parser;
use kvctl::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cmd::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // Bad input caught before sending (a key too long, an https
            // endpoint) is a usage error, like clap's: exit status 2.
            let usage = matches!(
                e.downcast_ref::<kvctl::ClientError>(),
                Some(kvctl::ClientError::Invalid(_))
            );
            let msg = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("kvctl: {msg}");
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
