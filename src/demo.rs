//! `converge demo`: two replicas on loopback syncing two folders, for a first look.

use std::future::Future;
use std::path::PathBuf;

/// Starts two replicas over two folders under `dir` (a temporary directory when `None`),
/// prints their folders and admin URLs, and runs them until `shutdown` resolves.
pub async fn run(
    dir: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let _ = (dir, shutdown);
    anyhow::bail!("not wired yet")
}
