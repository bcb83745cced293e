//! The `Source` role: turns local changes into events.

use std::sync::Arc;

use async_trait::async_trait;
use converge_api::{Event, Head, Key};
use tokio::sync::watch;

use crate::content::ChunkStore;
use crate::engine::{AppendOrigin, EngineEvent, Observer};
use crate::error::{LogError, PluginError};
use crate::log::{EventLog, LocalChange};

/// Progress of a source's initial scan, shown to the user (files and bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanProgress {
    /// Entries looked at so far.
    pub files: u64,
    /// Bytes hashed so far.
    pub bytes: u64,
    /// Entries found in all (when known).
    pub total_files: Option<u64>,
    /// Whether the scan has finished.
    pub done: bool,
}

/// What a running source may use: the log (to read heads and append local changes), the
/// content store, a shutdown signal and a progress channel.
#[derive(Clone)]
pub struct SourceContext {
    log: EventLog,
    shutdown: watch::Receiver<bool>,
    progress: watch::Sender<ScanProgress>,
    observer: Option<Arc<dyn Observer>>,
    scan_gate: Option<Arc<watch::Sender<bool>>>,
    health: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl std::fmt::Debug for SourceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceContext")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl SourceContext {
    /// A context over `log`; the engine makes these, tests may too.
    pub fn new(
        log: EventLog,
        shutdown: watch::Receiver<bool>,
        progress: watch::Sender<ScanProgress>,
    ) -> Self {
        SourceContext {
            log,
            shutdown,
            progress,
            observer: None,
            scan_gate: None,
            health: None,
        }
    }

    /// Set when a start-up scan is done: the engine shows the source up again after a
    /// failure (the engine sets this up).
    pub fn with_health(mut self, up: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.health = Some(up);
        self
    }

    /// Holds the engine's network back until [`Self::initial_scan_done`] (for sources
    /// whose [`Source::scans_at_start`] is true; the engine sets this up).
    pub fn with_scan_gate(mut self, gate: Option<Arc<watch::Sender<bool>>>) -> Self {
        self.scan_gate = gate;
        self
    }

    /// Tells the engine the start-up scan is complete: peers may now connect and remote
    /// changes reach the stores. Idempotent.
    pub fn initial_scan_done(&self) {
        if let Some(gate) = &self.scan_gate {
            gate.send_replace(true);
        }
        if let Some(up) = &self.health {
            up.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reports every emitted batch to `observer` (metrics).
    pub fn with_observer(mut self, observer: Option<Arc<dyn Observer>>) -> Self {
        self.observer = observer;
        self
    }

    /// Appends local changes (put their content into [`Self::chunks`] first); returns the
    /// events once durable.
    pub async fn emit(&self, changes: Vec<LocalChange>) -> Result<Vec<Event>, LogError> {
        let started = std::time::Instant::now();
        let events = self.log.append_local(changes).await?;
        if let Some(o) = &self.observer {
            o.observe(&EngineEvent::Appended {
                origin: AppendOrigin::Local,
                events: events.len() as u64,
                duration: started.elapsed(),
            });
        }
        Ok(events)
    }

    /// The current heads of `key` (for echo suppression: a file whose content equals the
    /// head's is not a new change).
    pub fn heads(&self, key: &Key) -> Result<Vec<Head>, LogError> {
        self.log.heads(key)
    }

    /// The log itself, for sources that need more (e.g. every key at start-up).
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The content store.
    pub fn chunks(&self) -> &ChunkStore {
        self.log.chunks()
    }

    /// Reports scan progress to the engine (and the CLI's progress bar).
    pub fn report(&self, progress: ScanProgress) {
        self.progress.send_replace(progress);
    }

    /// Whether the engine is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when the engine shuts down.
    pub async fn shutdown(&mut self) {
        let _ = self.shutdown.wait_for(|stop| *stop).await;
    }

    /// Resolves when the engine shuts down, borrowing nothing: for a task of the source's
    /// own that tells its blocking work (a large file being read) to stop.
    pub fn on_shutdown(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut shutdown = self.shutdown.clone();
        async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        }
    }
}

/// Produces local events: scans what exists at start, then watches for changes.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// The source's name, for logs and status.
    fn name(&self) -> &str;

    /// Whether the source scans what exists when it starts. The engine then connects to
    /// peers only after it called [`SourceContext::initial_scan_done`] (or stopped), so
    /// no remote change is applied over a local one the scan has not recorded yet.
    fn scans_at_start(&self) -> bool {
        false
    }

    /// Runs until [`SourceContext::shutdown`] resolves. The engine starts sources only
    /// after every store has re-applied what it had not finished before a crash, so a
    /// half-written file is repaired, never mistaken for a local edit.
    async fn run(&self, ctx: SourceContext) -> Result<(), PluginError>;
}
