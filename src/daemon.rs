//! `converge run`: wires the event log, the engine, the plugins and the admin API from a
//! [`Config`], and runs them until shutdown.

use std::future::Future;

use crate::config::Config;

/// Runs the daemon described by `config` (already validated) until `shutdown` resolves,
/// then stops accepting work, flushes, closes peers and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let _ = (config, shutdown);
    anyhow::bail!("not wired yet")
}
