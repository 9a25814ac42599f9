//! kvctl: the kvstore command-line client.

mod cmd;
mod cmd_backup;
mod cmd_bench;
mod cmd_endpoint;
mod cmd_kube;
mod cmd_up;

use std::process::ExitCode;

use clap::Parser;
use kvctl::cli::Cli;

/// The node's allocator (kv-node's main.rs says why): `kvctl node` is a node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // `kvctl node ...` is a node process (what `kvctl up` starts for each
    // node): the kv-node binary's flags, runtime and logging, not kvctl's.
    let mut argv = std::env::args_os();
    let program = argv.next();
    let rest: Vec<std::ffi::OsString> = argv.collect();
    // `kubectl kv ...` runs this executable as `kubectl-kv`: the plugin's
    // commands, each the kvctl command with `--cluster`.
    let plugin = program
        .as_deref()
        .is_some_and(kvctl::plugin::invoked_as_plugin);
    if !plugin && rest.first().is_some_and(|a| a == "node") {
        return run_node(program, &rest[1..]);
    }
    let cli = if plugin {
        kvctl::plugin::PluginCli::parse().into_cli()
    } else {
        Cli::parse()
    };
    if let kvctl::cli::Command::Node { .. } = cli.command {
        eprintln!("kvctl: give `node` as the first argument (kvctl node --help)");
        return ExitCode::from(2);
    }
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

/// `kvctl node ARGS`: parses ARGS as the kv-node binary does and runs the
/// node until SIGTERM or Ctrl-C.
fn run_node(program: Option<std::ffi::OsString>, args: &[std::ffi::OsString]) -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let name = program
        .as_deref()
        .map(|p| std::path::Path::new(p).display().to_string())
        .unwrap_or_else(|| "kvctl".into());
    let command = kv_node::config::Args::command()
        .name("kvctl node")
        .bin_name(format!("{name} node"));
    let argv = std::iter::once(std::ffi::OsString::from("kvctl node")).chain(args.iter().cloned());
    let args = match command
        .try_get_matches_from(argv)
        .and_then(|m| kv_node::config::Args::from_arg_matches(&m))
    {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match kv_node::process::run_process(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // the same last line as the kv-node binary's
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
