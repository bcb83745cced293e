//! `converge run`: wires the event log, the engine and the plugins from a [`Config`], and
//! runs them until shutdown.

use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use converge_api::abi::PluginKind;
use converge_framework::plugin::dylib::PluginRegistry;
use converge_framework::plugin::Transport;
use converge_framework::{EngineConfig, PeerConfig, PluginInfo, SyncEngine};
use converge_plugin_fs::{FsConfig, FsStore};
use converge_transport_tcp::{TcpOptions, TcpTransport};

use crate::config::{AdminAuth, AdminConfig, Config};

/// Runs the daemon described by `config` (already validated) until `shutdown` resolves,
/// then stops accepting work, flushes, closes peers and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let addr = config.transport.listen_addr()?;
    let transport = TcpTransport::bind(addr, TcpOptions::default())
        .await
        .with_context(|| format!("binding transport.listen = {addr}"))?;
    let daemon = start(&config, transport).await?;
    shutdown.await;
    tracing::info!("shutting down: flushing and closing peers");
    daemon.shutdown().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// A started daemon: the engine and, when configured, the admin API serving it.
pub struct Daemon {
    /// The engine.
    pub engine: Arc<SyncEngine>,
    /// Where the admin API listens, when `[admin]` is configured.
    pub admin: Option<std::net::SocketAddr>,
    admin_server: Option<AdminServer>,
}

impl Daemon {
    /// Stops the admin API (letting calls in flight finish, for a bounded time), then the
    /// engine.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(server) = self.admin_server {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
        self.engine.shutdown().await.context("shutting down")
    }
}

/// The admin API's token and bound port, checked before anything else starts: a missing
/// token or a port in use then stops the daemon before its folder is touched.
struct AdminListener {
    listener: tokio::net::TcpListener,
    addr: std::net::SocketAddr,
    token: String,
    auth: converge_admin::AuthMode,
}

/// The admin API serving in a task of its own, until `stop` is sent.
struct AdminServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl AdminListener {
    /// Reads `admin.token_file` and binds `admin.listen`; each error names its key.
    async fn bind(admin: &AdminConfig) -> anyhow::Result<AdminListener> {
        let token = tokio::fs::read_to_string(&admin.token_file)
            .await
            .with_context(|| {
                format!(
                    "reading the admin token from admin.token_file = {}",
                    admin.token_file.display()
                )
            })?;
        anyhow::ensure!(
            !token.trim().is_empty(),
            "admin.token_file {} is empty",
            admin.token_file.display()
        );
        let auth = match admin.auth {
            AdminAuth::Mutating => converge_admin::AuthMode::Mutating,
            AdminAuth::All => converge_admin::AuthMode::All,
        };
        let addr = admin.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding admin.listen = {addr}"))?;
        let addr = listener
            .local_addr()
            .with_context(|| format!("reading the address bound for admin.listen = {addr}"))?;
        Ok(AdminListener {
            listener,
            addr,
            token,
            auth,
        })
    }

    /// Serves the admin API over `engine` until told to stop.
    fn serve(self, engine: Arc<SyncEngine>, metrics: Arc<converge_admin::Metrics>) -> AdminServer {
        let state = converge_admin::AdminState::new(engine, metrics, self.token, self.auth);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listener = self.listener;
        let task = tokio::spawn(async move {
            let served = converge_admin::serve(listener, state, async {
                let _ = stopped.await;
            })
            .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "admin API server failed");
            }
        });
        tracing::info!(bound = %self.addr, "admin API listening");
        AdminServer { stop, task }
    }
}

/// Opens the log and starts the engine with the folder's source and store, the mirrors
/// and the TCP transport (already bound, so callers can pick ephemeral ports), and the
/// admin API when `[admin]` is configured.
pub async fn start(config: &Config, transport: TcpTransport) -> anyhow::Result<Daemon> {
    let admin_listener = match &config.admin {
        Some(admin) => Some(AdminListener::bind(admin).await?),
        None => None,
    };
    let db = config.data_dir.join("db");
    let log = crate::init::open_log(&db).await?;
    let (data_dir, replica) = (config.data_dir.clone(), log.replica());
    tokio::task::spawn_blocking(move || crate::init::note_id(&data_dir, replica)).await??;
    // Libraries first: the folder's policy may be one of them.
    let registry = PluginRegistry::load_all(config.plugins.iter().map(|p| &p.path));
    for failure in registry.failures() {
        tracing::error!(path = %failure.path.display(), "plugin refused, continuing without it: {}", failure.error);
    }
    let policy_name = &config.folder.conflict_policy;
    let policy = match converge_policies::by_name(policy_name) {
        Some(policy) => policy,
        None => registry.require_policy(policy_name).with_context(|| {
            format!(
                "folder.conflict_policy = {policy_name:?} is neither a built-in policy ({}) nor a loaded plugin",
                converge_policies::BUILT_IN.join(", ")
            )
        })?,
    };
    let me = log.replica();
    let mut peers = Vec::new();
    for (i, peer) in config.peers.iter().enumerate() {
        let id = peer.replica(i)?;
        anyhow::ensure!(id != me, "peers[{i}].id is this replica's own ID ({me})");
        peers.push(PeerConfig {
            id,
            address: Some(peer.address.clone()),
        });
    }
    let listen = transport.local_address();
    // The store writes into the data dir and renames into the folder (when both are on
    // one file system), so the folder's watcher sees one event per file it writes.
    let temp_dir = config.data_dir.join("tmp");
    let fs = FsConfig::new(&config.folder.path)
        .exclude(&config.data_dir)
        .temp_dir(&temp_dir)
        .state_dir(&config.data_dir);
    let (source, store) = converge_plugin_fs::folder(fs);
    let source = source.with_policy(policy.clone());
    let metrics = Arc::new(converge_admin::Metrics::new()?);
    let mut builder = SyncEngine::builder(log, policy)
        .observer(metrics.clone())
        .config(EngineConfig {
            peers,
            ..EngineConfig::default()
        })
        .transport(Arc::new(transport))
        .store(Arc::new(store))
        .source(Arc::new(source));
    for plugin in registry.plugins() {
        let info = PluginInfo {
            name: plugin.name.clone(),
            role: plugin_role(plugin.kind()).to_owned(),
            library: Some(plugin.path.clone()),
            error: None,
        };
        let settings = config
            .plugins
            .iter()
            .find(|p| p.path == plugin.path)
            .map(|p| p.config.clone());
        if let Some(source) = plugin.source(settings.unwrap_or_default()) {
            tracing::info!(name = %plugin.name, path = %plugin.path.display(), "source plugin loaded");
            builder = builder.source(source);
        }
        builder = builder.describe_plugin(info);
    }
    for failure in registry.failures() {
        builder = builder.describe_plugin(PluginInfo {
            name: failure
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            role: "refused".to_owned(),
            library: Some(failure.path.clone()),
            error: Some(failure.error.to_string()),
        });
    }
    for mirror in &config.mirrors {
        std::fs::create_dir_all(&mirror.path).with_context(|| {
            format!(
                "creating mirror {:?} at {}",
                mirror.name,
                mirror.path.display()
            )
        })?;
        builder = builder.store(Arc::new(FsStore::mirror(
            &mirror.name,
            FsConfig::new(&mirror.path)
                .temp_dir(&temp_dir)
                .state_dir(&config.data_dir),
        )));
    }
    let engine = Arc::new(builder.start().await.context("starting the engine")?);
    let admin = admin_listener.as_ref().map(|l| l.addr);
    let admin_server = admin_listener.map(|l| l.serve(engine.clone(), metrics));
    tracing::info!(replica = %me, %listen, folder = %config.folder.path.display(), "converge is running");
    tokio::spawn(show_progress(
        engine.scan_progress(),
        config.folder.path.display().to_string(),
    ));
    Ok(Daemon {
        engine,
        admin,
        admin_server,
    })
}

/// Shows the initial scan: a progress bar on a terminal, log lines otherwise.
async fn show_progress(
    mut progress: tokio::sync::watch::Receiver<converge_framework::plugin::ScanProgress>,
    folder: String,
) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} scanning {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    });
    let mut last_log = std::time::Instant::now();
    while progress.changed().await.is_ok() {
        let p = *progress.borrow_and_update();
        let msg = format!("{folder}: {} files, {} MiB", p.files, p.bytes >> 20);
        match &bar {
            Some(bar) => {
                bar.set_message(msg.clone());
                bar.tick();
            }
            None if p.done || last_log.elapsed().as_secs() >= 2 => {
                tracing::info!("scan {msg}");
                last_log = std::time::Instant::now();
            }
            None => {}
        }
        if p.done {
            if let Some(bar) = &bar {
                bar.finish_with_message(format!("{msg} — done"));
            }
            tracing::info!("initial scan done: {msg}");
            return;
        }
    }
}

/// The status name of a library plugin's kind.
fn plugin_role(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Policy => "policy",
        PluginKind::Source => "source",
        PluginKind::Transport => "transport",
    }
}
