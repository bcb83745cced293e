//! `converge demo`: two replicas on loopback syncing two folders, for a first look.

use std::future::Future;
use std::path::{Path, PathBuf};

use anyhow::Context;
use converge_framework::plugin::Transport;
use converge_transport_tcp::{TcpOptions, TcpTransport};
use tempfile::TempDir;

use crate::config::{AdminAuth, AdminConfig, Config, FolderConfig, PeerConfig, TransportConfig};
use crate::daemon::Daemon;

/// Where the demo keeps its replicas: `dir`, or a new temporary directory, returned too
/// (it is removed when dropped).
pub fn base_dir(dir: Option<PathBuf>) -> anyhow::Result<(PathBuf, Option<TempDir>)> {
    match dir {
        Some(dir) => Ok((dir, None)),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("converge-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            Ok((temp.path().to_path_buf(), Some(temp)))
        }
    }
}

/// Starts two replicas over two folders under `base`, prints their folders, and runs
/// them until `shutdown` resolves.
pub async fn run(base: &Path, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let names = ["a", "b"];
    let mut transports = Vec::new();
    for _ in names {
        transports.push(
            TcpTransport::bind("127.0.0.1:0".parse()?, TcpOptions::default())
                .await
                .context("binding a loopback port")?,
        );
    }
    let addrs: Vec<String> = transports.iter().map(|t| t.local_address()).collect();
    // Each replica needs the other's identity before it starts: open both logs once.
    let mut ids = Vec::new();
    for name in names {
        for dir in ["folder", "data"] {
            let path = base.join(name).join(dir);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating the demo directory {}", path.display()))?;
        }
        ids.push(crate::init::replica_id(&base.join(name).join("data")).await?);
    }
    let mut daemons = Vec::new();
    for (i, (name, transport)) in names.iter().zip(transports).enumerate() {
        let other = 1 - i;
        let token_file = base.join(name).join("data").join("admin.token");
        if !token_file.exists() {
            crate::init::write_token(&token_file)?;
        }
        let config = Config {
            data_dir: base.join(name).join("data"),
            folder: FolderConfig {
                path: base.join(name).join("folder"),
                conflict_policy: "lww".into(),
            },
            transport: TransportConfig {
                kind: "tcp".into(),
                listen: addrs[i].clone(),
            },
            peers: vec![PeerConfig {
                id: ids[other].to_string(),
                address: addrs[other].clone(),
            }],
            admin: Some(AdminConfig {
                listen: "127.0.0.1:0".into(),
                token_file: token_file.clone(),
                auth: AdminAuth::Mutating,
            }),
            mirrors: Vec::new(),
            plugins: Vec::new(),
        };
        match crate::daemon::start(&config, transport).await {
            Ok(daemon) => daemons.push(daemon),
            Err(err) => {
                // The replicas already running are stopped (flushed) before the error.
                let _ = shut_down_all(&names, daemons).await;
                return Err(err.context(format!("starting demo replica {name}")));
            }
        }
    }
    println!("converge demo: two replicas syncing over 127.0.0.1");
    for (i, name) in names.iter().enumerate() {
        println!(
            "  replica {name}: {}  folder {}  listening on {}",
            ids[i],
            base.join(name).join("folder").display(),
            addrs[i]
        );
        if let Some(admin) = daemons[i].admin {
            println!(
                "    admin API http://{admin}  (token in {})  try: converge status --admin http://{admin}",
                base.join(name).join("data").join("admin.token").display()
            );
        }
    }
    println!("Create, edit or delete files in one folder and watch them appear in the other. Ctrl-C stops.");
    shutdown.await;
    shut_down_all(&names, daemons).await
}

/// Shuts down every one of `daemons` (named by `names`), also after one failed, so each
/// is flushed; every failure is logged and the first returned.
async fn shut_down_all(names: &[&str], daemons: Vec<Daemon>) -> anyhow::Result<()> {
    let mut first_failure = None;
    for (name, daemon) in names.iter().zip(daemons) {
        if let Err(err) = daemon.shutdown().await {
            tracing::error!("demo replica {name} did not shut down cleanly: {err:#}");
            first_failure.get_or_insert(err.context(format!("shutting down demo replica {name}")));
        }
    }
    first_failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_dir_that_is_a_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = run(&file, std::future::pending()).await.unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains(&*file.to_string_lossy()), "{message}");
    }

    /// Regression: replica a was left running (its log open, never flushed) when b failed.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_replica_that_fails_to_start_stops_the_one_started() {
        let root = tempfile::tempdir().unwrap();
        let b_data = root.path().join("b").join("data");
        std::fs::create_dir_all(&b_data).unwrap();
        std::fs::write(b_data.join("admin.token"), b"").unwrap();
        let err = run(root.path(), std::future::pending()).await.unwrap_err();
        assert!(format!("{err:#}").contains("replica b"), "{err:#}");
        // Replica a closed its event log: it opens again.
        crate::init::replica_id(&root.path().join("a").join("data"))
            .await
            .unwrap();
    }
}
