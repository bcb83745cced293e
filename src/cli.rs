//! The command line: clap definitions of `converge`'s subcommands and their help text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueHint};

use crate::config::{DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN};

/// The whole command line.
#[derive(Debug, Parser)]
#[command(
    name = "converge",
    version,
    about = "Keep a folder in sync between replicas, through an event log on each",
    long_about = "converge keeps a folder in sync between several replicas (devices). Each \
                  replica records every change as an event in its own append-only log; \
                  replicas exchange the events the others lack and converge to the same \
                  folder, whatever order the events arrive in.",
    after_help = "Set RUST_LOG to change what is logged (default: info), e.g. \
                  RUST_LOG=converge=debug,info.\n\n\
                  Getting started:\n  \
                  converge demo                                      two replicas on this machine\n  \
                  converge init --data-dir ~/.converge --folder ~/Sync\n  \
                  converge run --config ~/.converge/converge.toml"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a replica: its data dir, identity, admin token and config file.
    ///
    /// Writes DATA_DIR/converge.toml (commented; edit it to add peers) and
    /// DATA_DIR/admin.token, creates the event log with a new replica identity under
    /// DATA_DIR/db, and prints the replica ID on standard output. The folder is created
    /// if it does not exist. An existing converge.toml is never overwritten.
    Init(InitArgs),
    /// Print this replica's ID and nothing else (for scripts and for peers' configs).
    Id(ConfigArgs),
    /// Run the sync daemon until SIGINT or SIGTERM, then shut down cleanly.
    Run(ConfigArgs),
    /// Start two replicas on loopback syncing two folders, and keep them running.
    ///
    /// Prints both folder paths and admin URLs; change a file in one folder and watch it
    /// appear in the other. Stop with Ctrl-C.
    Demo(DemoArgs),
    /// Show a running replica's status (through its admin API).
    Status(ClientArgs),
    /// List a running replica's peers: connected, events behind, bytes, failed sessions.
    Peers(ClientArgs),
    /// Print a page of a running replica's event log.
    Log(LogArgs),
    /// Re-apply the log to a store subscriber (e.g. `folder` or `mirror-backup`).
    Replay(ReplayArgs),
    /// List keys with concurrent versions and what the conflict policy shows for each.
    Conflicts(ClientArgs),
}

impl Command {
    /// Whether this is a thin client of the admin API (`status`, `peers`, `log`, …).
    pub fn is_client(&self) -> bool {
        matches!(
            self,
            Command::Status(_)
                | Command::Peers(_)
                | Command::Log(_)
                | Command::Replay(_)
                | Command::Conflicts(_)
        )
    }
}

/// How to reach a running replica's admin API.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The admin API's base URL.
    #[arg(long, value_name = "URL", default_value = concat!("http://", "127.0.0.1:7480"))]
    pub admin: String,
    /// The file holding the bearer token (DATA_DIR/admin.token); needed for replay, and
    /// for reads when the daemon has `auth = "all"`.
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `converge log`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// The admin API.
    #[command(flatten)]
    pub client: ClientArgs,
    /// First log offset to print.
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Most events to print (the API caps it at 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

/// Arguments of `converge replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The admin API.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The subscriber: `folder`, or `mirror-NAME` for a `[[mirrors]]` entry.
    #[arg(value_name = "SUBSCRIBER")]
    pub subscriber: String,
    /// The log offset to re-apply from.
    #[arg(long, default_value_t = 0)]
    pub from: u64,
}

/// Arguments of `converge init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory for the replica's state (event log, identity, admin token, config);
    /// created if missing.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub data_dir: PathBuf,
    /// The folder to keep in sync; created if missing.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub folder: PathBuf,
    /// Address to accept peers on (use 0.0.0.0:PORT to accept from other machines).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Address of the admin HTTP API (status, metrics, replay).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin: SocketAddr,
}

/// Arguments of commands that read a config file.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The config file written by `converge init` (DATA_DIR/converge.toml).
    #[arg(long, short, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub config: PathBuf,
}

/// Arguments of `converge demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to put the two replicas' folders and data dirs (default: a temporary
    /// directory, removed at exit).
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn init_has_defaults() {
        let cli =
            Cli::try_parse_from(["converge", "init", "--data-dir", "d", "--folder", "f"]).unwrap();
        let Command::Init(args) = cli.command else {
            panic!("not init: {cli:?}");
        };
        assert_eq!(args.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(args.admin.to_string(), DEFAULT_ADMIN_LISTEN);
    }

    #[test]
    fn bad_listen_is_rejected() {
        let err = Cli::try_parse_from([
            "converge",
            "init",
            "--data-dir",
            "d",
            "--folder",
            "f",
            "--listen",
            "nope",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
    }

    #[test]
    fn client_commands_default_to_the_local_admin_api() {
        let cli = Cli::try_parse_from(["converge", "status"]).unwrap();
        let Command::Status(args) = cli.command else {
            panic!("not status: {cli:?}");
        };
        assert_eq!(args.admin, format!("http://{DEFAULT_ADMIN_LISTEN}"));
        assert!(Cli::try_parse_from(["converge", "replay"]).is_err());
    }
}
