//! The `converge` binary: command line, config loading and daemon wiring.
//!
//! Errors are `anyhow` errors with context; `main` prints the whole chain and exits
//! with status 1 (a command line that does not parse exits with clap's status 2).

mod cli;
mod client;
mod config;
mod daemon;
mod demo;
mod init;

use std::future::Future;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};
use crate::config::Config;

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Tunes glibc's allocator before any thread starts (each limit set in the environment,
/// `MALLOC_ARENA_MAX`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_` or the same
/// `glibc.malloc.*` names in `GLIBC_TUNABLES`, wins over the one set here):
///
/// - Two heaps (arenas) instead of up to eight per core: the daemon's many threads spread
///   their allocations over up to sixteen arenas on two cores, and the room freed in each
///   stayed with the process. This alone took peak RSS in W2 of `bench/daemon/run.py` at
///   1.5 GiB from 142 / 97 MiB (sender / receiver) to 127 / 72 MiB, at the same speed
///   (`bench/daemon/NOTES.md`).
/// - Memory freed at the top of a heap is kept up to 128 MiB rather than 128 KiB, and
///   blocks up to 32 MiB come from the heaps rather than from a mapping of their own.
///   Frames of up to 4 MiB are encoded and received into buffers of their own, one after
///   another; by default each went back to the kernel when freed, and the next one's pages
///   were faulted in and zeroed again: most of both daemons' page faults in W2. On the
///   virtual machines here that is dearer still, as a page handed back may have gone to
///   the host (see `run.py` on free page reporting). `ab.py --workload W2 --reps 8`:
///   0.39 → 0.34 s, the two daemons' CPU 0.62 → 0.57 s.
///
/// Setting either threshold also ends glibc's own adjustment of both, which is why both
/// are set: the mapping threshold alone left the trim threshold fixed at 128 KiB, so the
/// heaps gave back every freed frame at once, and W2 took 0.50 s.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let unset = |var: &str, tunable: &str| {
            std::env::var_os(var).is_none() && !tunables.contains(tunable)
        };
        // SAFETY: `mallopt` only sets parameters of the allocator (under its own lock);
        // called first thing in `main`, before any thread could have taken an arena.
        unsafe {
            if unset("MALLOC_ARENA_MAX", "glibc.malloc.arena_max") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if unset("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold")
                && unset("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold")
            {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
        }
    }
}

/// Logs to standard error, filtered by `RUST_LOG` (default `info`), so standard output
/// carries only what a command prints for scripts. Colors only on a terminal (a log file
/// or the journal gets plain text) and never with `NO_COLOR` set.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(color)
        .init();
}

/// Runs one subcommand on a multi-threaded tokio runtime.
fn run(cli: Cli) -> anyhow::Result<()> {
    // The admin API clients are blocking HTTP calls: no runtime needed.
    if cli.command.is_client() {
        return client::run(&cli.command);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("converge")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Init(args) => {
                let done = init::init(&args).await?;
                eprintln!(
                    "initialized a replica in {}\n  config: {}\n  add peers there, then start it with: converge run --config {}",
                    args.data_dir.display(),
                    done.config_path.display(),
                    done.config_path.display()
                );
                println!("{}", done.replica);
                Ok(())
            }
            Command::Id(args) => {
                // Only data_dir matters here: the rest need not be valid yet (the peers'
                // IDs, typically, are what this command is run to fill in).
                let config = Config::parse_file(&args.config)?;
                println!("{}", init::existing_replica_id(&config.data_dir).await?);
                Ok(())
            }
            Command::Run(args) => {
                let config = Config::load(&args.config)?;
                daemon::run(config, shutdown_signal(|| {})?).await
            }
            Command::Demo(args) => {
                let (base, temp) = demo::base_dir(args.dir)?;
                let temp_path = temp.as_ref().map(|t| t.path().to_owned());
                let shutdown = shutdown_signal(move || {
                    if let Some(path) = temp_path {
                        let _ = std::fs::remove_dir_all(path);
                    }
                })?;
                let result = demo::run(&base, shutdown).await;
                drop(temp);
                result
            }
            other => client::run(&other),
        }
    })
}

/// A future that resolves on the first SIGINT (Ctrl-C) or SIGTERM. The handlers are
/// installed, and listened to, from now on, not from when the future is first polled: a
/// signal that arrives during start-up (opening the log, stores catching up with it) is
/// not lost, and is heard at once. A second SIGINT, during start-up or shutdown, runs
/// `on_force` (which no destructor would: the demo removes its temporary directory
/// there), then exits at once with status 130.
fn shutdown_signal(
    on_force: impl FnOnce() + Send + 'static,
) -> anyhow::Result<impl Future<Output = ()> + Send> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt =
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut terminate =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let (heard, mut told) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT: shutting down (again to force)"),
                _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            }
            heard.send_replace(true);
            if interrupt.recv().await.is_some() {
                tracing::warn!("second SIGINT: exiting without a clean shutdown");
                on_force();
                std::process::exit(130);
            }
        });
        Ok(async move {
            let _ = told.wait_for(|heard| *heard).await;
        })
    }
    #[cfg(not(unix))]
    {
        drop(on_force);
        Ok(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C: shutting down");
            }
        })
    }
}
