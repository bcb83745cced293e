//! # converge-plugin-fs
//!
//! converge's folder plugin: a [`Source`](converge_framework::plugin::Source) that turns a
//! directory's changes into events and a [`Store`](converge_framework::plugin::Store) that
//! materializes the projection into a directory.
//!
//! - [`FsSource`] scans the folder at start (in parallel, on blocking threads, comparing
//!   each entry with the projection by size and mtime, then by content hash), then watches
//!   it (inotify on Linux, `notify` elsewhere), debounced by [`FsConfig::debounce`].
//! - [`FsStore`] writes each file to a temp file (in its temp dir, or beside the file)
//!   and renames it over the final path, or where nothing is there links a file with no
//!   name into place; it removes what lost, and makes each batch durable at once
//!   (`syncfs`) before its cursor moves.
//! - File content becomes the tree of DESIGN §2: FastCDC data chunks (4 / 16 / 64 KiB),
//!   BLAKE3 hashes, index nodes built by [`converge_api::content::TreeBuilder`]; see
//!   [`content`].
//!
//! A source and a store of the same folder made by [`folder`] share a record of what the
//! store last wrote, so the store's own writes never come back as events, even when the
//! log has moved on since the write (a stale echo).
//!
//! Ignore rules: `.convergeignore` at the folder root, in gitignore syntax, applies to the
//! scan, the watcher and the store. `.convergeignore` itself is *not* synced (each replica
//! keeps its own, like Syncthing's `.stignore`). Always ignored: the configured `exclude`
//! paths, the store's temp files (`.converge-tmp-*`) and conflict copies
//! (`*.sync-conflict-*`). Keys the store passed over while they were ignored are written
//! from the log once the rules (or the `exclude` paths) no longer exclude them, never taken
//! for removed: the source compares the rules with those the folder was last in sync with
//! (recorded in the state dir) at start and whenever it reads them again, and the store
//! shows what they let in. Symlinks are never followed and names that are not UTF-8 are
//! skipped; both are reported with a warning. The scan skips symlinks, the store writes
//! nothing at or below one, the watcher watches none and the source drops every path with
//! a symlinked directory between it and the root. A key at or below a symlink is then no
//! longer the folder's, as if ignored: not written, and not taken for removed (a link
//! here where a peer has a directory of files would otherwise delete them on the peer),
//! unless the watcher saw what was there go before the link was made in its place.
//!
//! ```no_run
//! use converge_framework::log::{EventLog, LogConfig};
//! use converge_framework::plugin::{Source, SourceContext, ScanProgress};
//! use converge_plugin_fs::{folder, FsConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let log = EventLog::open(LogConfig::new("/var/lib/converge/db"))?;
//! let (source, store) = folder(FsConfig::new("/home/me/Sync").exclude("/home/me/Sync/.data"));
//! let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
//! let (progress_tx, _progress_rx) = tokio::sync::watch::channel(ScanProgress::default());
//! // The engine re-applies the store from its cursor first, then runs the source.
//! let _ = store;
//! source.run(SourceContext::new(log, stop_rx, progress_tx)).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub mod content;
mod echo;
mod error;
mod marker;
mod rules;
mod scan;
mod store;
mod synced;
mod watch;
mod watcher;

pub use error::FsError;
pub use store::FsStore;
pub use watch::FsSource;

/// Debounce of the watcher when none is configured.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);

/// How often an unwatched folder is rescanned by default (see [`FsConfig::watch`]).
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(60);

/// Default of [`FsConfig::racy_margin`]: above the coarsest timestamp tick of Linux's
/// file systems (a jiffy, 10 ms at the lowest `HZ`), with room to spare.
pub const DEFAULT_RACY_MARGIN: Duration = Duration::from_millis(50);

/// The ignore file read at the folder root (gitignore syntax). It is not synced.
pub const IGNORE_FILE: &str = ".convergeignore";

/// The marker file at the folder root, written at the first start and never synced. While
/// it is missing from a folder this replica holds files in (its disk not mounted, an empty
/// directory in its place), nothing there is recorded as deleted and nothing is written.
pub const MARKER_FILE: &str = ".convergefolder";

/// Prefix of the store's temp files; such names are never keys.
pub const TEMP_PREFIX: &str = ".converge-tmp-";

/// Marker in the names of conflict copies (`name.sync-conflict-<date>-<origin>.ext`);
/// such names are never keys.
pub const CONFLICT_MARKER: &str = ".sync-conflict-";

/// Changes emitted per append by the scan and the watcher.
pub(crate) const EMIT_BATCH: usize = 512;

/// Configuration of one folder (the synced folder or a mirror).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The folder's root directory.
    pub root: PathBuf,
    /// Paths never read or written (e.g. the data dir when it lies inside the folder).
    /// Relative paths are relative to `root`.
    pub exclude: Vec<PathBuf>,
    /// How long the watcher collects events after the first one before acting.
    pub debounce: Duration,
    /// Where the store writes files before renaming them into place, when it lies on the
    /// folder's file system (the daemon uses `<data_dir>/tmp`). Outside the folder, the
    /// watcher sees one event per file the store writes (the rename into place) instead
    /// of six for a temp file beside it. Without it, or on another file system, temp
    /// files are written in the directory of their final path.
    pub temp_dir: Option<PathBuf>,
    /// Where the store keeps the keys it could not show (`<store name>.failed`), so that
    /// after a restart they are tried again and the source does not read what is at their
    /// paths as local changes (the daemon uses its data dir). Without it, that record
    /// lives in memory only.
    pub state_dir: Option<PathBuf>,
    /// Whether the source watches the folder (inotify on Linux). Without a watcher (or
    /// when watching fails: the kernel's limit of watches reached, say), it rescans the
    /// folder every [`rescan_interval`](FsConfig#structfield.rescan_interval) instead:
    /// for a file system a watcher cannot see changes on, such as a network mount.
    pub watch: bool,
    /// How often the folder is rescanned when it is not watched.
    pub rescan_interval: Duration,
    /// A file read when its last write (its mtime) was less than this long before the
    /// read began is *racy*: a write in the same tick of the file system's clock, during
    /// or after the read, leaves its size and timestamps as they were, so the next look
    /// reads it again instead of trusting them (git's rule for its index).
    pub racy_margin: Duration,
}

impl FsConfig {
    /// A folder at `root`, with nothing excluded and the default debounce (50 ms).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsConfig {
            root: root.into(),
            exclude: Vec::new(),
            debounce: DEFAULT_DEBOUNCE,
            temp_dir: None,
            state_dir: None,
            watch: true,
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
            racy_margin: DEFAULT_RACY_MARGIN,
        }
    }

    /// Rescans every `interval` instead of watching (see
    /// [`FsConfig::watch`](FsConfig#structfield.watch)).
    pub fn rescan_every(mut self, interval: Duration) -> Self {
        self.watch = false;
        self.rescan_interval = interval;
        self
    }

    /// Sets where the store keeps the keys it could not show (see
    /// [`FsConfig::state_dir`](FsConfig#structfield.state_dir)).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Sets where the store writes files before renaming them into place (see
    /// [`FsConfig::temp_dir`](FsConfig#structfield.temp_dir)).
    pub fn temp_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.temp_dir = Some(dir.into());
        self
    }

    /// Adds a path that is never read or written.
    pub fn exclude(mut self, path: impl Into<PathBuf>) -> Self {
        self.exclude.push(path.into());
        self
    }

    /// Sets the watcher's debounce.
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Sets how recent a file's last change may be when it is read for the read to count
    /// as racy (see [`FsConfig::racy_margin`](FsConfig#structfield.racy_margin)).
    pub fn racy_margin(mut self, margin: Duration) -> Self {
        self.racy_margin = margin;
        self
    }
}

/// The source and the store of one folder, sharing the record of the store's own writes
/// (echo suppression). The store is named `folder`.
pub fn folder(config: FsConfig) -> (FsSource, FsStore) {
    let echo = Arc::new(echo::Echo::default());
    (
        FsSource::with_echo(config.clone(), echo.clone()),
        FsStore::with_echo(config, echo).guarded(),
    )
}
