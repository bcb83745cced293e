//! The folder store: makes a directory show the key views it is given.
//!
//! Per batch, on a blocking thread: file deletes, then directory deletes (deepest first,
//! only when empty: a live file below keeps its directory), then directories, then files
//! and conflict copies. A file already holding the right content (size, then hash — the
//! crash-repair check) is left alone; one whose size, mtime and mode are those of another
//! known version is not read (its stat says it holds that version's content, as the
//! scan's rule has it; see [`Writer::put_file`]); otherwise it is written to a temp file
//! (in the configured temp dir when that is on the folder's file system, so the folder's
//! watcher sees only the rename; else in the same directory), given its mode and mtime,
//! and renamed over the final path. (Where nothing is at the final path, a file under
//! [`PIPELINE_BYTES`] is written with no name in the temp dir and linked into place once
//! whole; see [`Unnamed`].) One `syncfs`
//! makes the whole batch durable before `apply` returns; no file is fsynced on its own.
//! Batches given to [`Store::show`] are not synced until [`Store::sync`], whose one
//! `syncfs` covers them all.
//!
//! A large file received whole as one stream is not written at all: the store takes the
//! content store's stream pack as its temp file
//! ([`ChunkStore::lend`](converge_framework::content::ChunkStore::lend), a hard link), and
//! copies only when that fails (another file system) or the content lies elsewhere. A file
//! of [`PIPELINE_BYTES`] or more is written on one thread while a second reads its chunks;
//! a batch of [`PARALLEL_FILES`] files or more is written by several threads, each
//! creating its temp files in a directory of its own ([`Writer::fork`]). Temp files are
//! named relative to the open temp dir, paths in the folder whole ([`Writer::at`]).
//!
//! Two shortcuts spare the store a `stat` per file where the answer is known. A file in a
//! directory the batch made is written without looking first, and renamed into place only
//! if nothing is there (`RENAME_NOREPLACE`; anything found there after all goes the usual
//! way: [`Writer::write_new`]). A file whose event the folder's source has just recorded
//! from it is not looked at when the store has changed nothing at its path since the
//! source looked: the file shows that event, and a change since is the source's to
//! record. [`Echo::note_read`] says when such a note is spoilt or dropped, so that what the
//! source decides from the echo record is never undercut by a skip. Events of this
//! replica from other sources (a plugin) carry no such note and are written as any other.
//!
//! A file written by a batch whose `syncfs` failed, or that failed before its `syncfs`,
//! is written again when it comes again (the cursor did not move), even though it is
//! found already right: after a failed writeback Linux may mark the pages it could not
//! write clean, so they read right from the page cache while the disk lacks them, and a
//! second `syncfs` succeeds without writing them. So right before it writes a file the
//! store notes its key with the batch's number (an earlier batch's note stays until the
//! write is done: [`Writer::writing`]), and once a `syncfs` succeeds it drops the notes of
//! the batches it covered, with those of older batches' keys they settled ([`Unsynced`]).
//! After a failed batch the notes are saved in the state dir (`<store>.unsynced`), as a
//! restart does not empty the page cache. The folder's own store also saves them, with
//! the keys of the files a batch is to write, before the batch writes any: a power loss
//! before its sync can leave a file torn (its name and size on disk, not its data), in
//! no state the log knows, which the store would otherwise leave as a change made here
//! and the scan record on every replica. At the next start such a key's file, changed
//! last before the machine started, is written again ([`Writer::left_torn`]); one changed
//! since is the user's. Each batch with files costs that save (two `fsync`s, of the
//! small file and of the state dir). The directory `syncfs` is called on is opened
//! before the first write of the first batch it covers: the kernel reports through a new
//! descriptor only the errors no one has heard of yet, so one opened later could miss
//! those another sync heard of. (A descriptor of the root kept for the daemon's life
//! would hear of them all, but it would keep the folder's file system from being
//! unmounted.) For the same reason the folder's `syncfs` cannot hear of a failed writeback
//! of a stream pack the content store lends (started as the pack was written, on a
//! descriptor of its own): the content store asks the kernel about it on the pack's own
//! descriptor before it lends the pack, and waits for a sync under way, so that the two
//! cannot hear of one failure apart. `syncfs` reports writeback errors from Linux 5.8 on;
//! on older kernels the store does not hear of them at all.
//!
//! A file the store cannot write (no permission in its directory, a name too long, a
//! read-only mount below the folder, content damaged in a pack) fails its key alone
//! ([`FsError::fails_alone`]): the rest of the batch is applied and the cursor moves on,
//! while the key's view is kept (in `<store>.failed` in the state dir, before the cursor
//! moves) and tried again with every batch and, while no events come, after a growing
//! pause ([`Store::failed`], [`Store::retry`]). The source reads nothing at such a path as
//! a local change while it is in a state the log knows (neither the missing file as a
//! delete nor the old version as an edit), so a restart neither deletes nor reverts the
//! peers' versions. A full disk or an I/O error still holds the whole batch back.
//!
//! Live keys below a key need its path to be a directory, whatever the key's own heads
//! say: as a file written into a concurrently deleted directory keeps it alive (DESIGN
//! §2), a file written at that path concurrently is moved aside as a conflict copy
//! ([`Writer::make_way`]), so that every replica can write the keys below and shows the
//! same tree. If that file's write won the key, the store cannot write it while the
//! directory holds entries ([`FsError::NotEmpty`]) and tries it again with every batch;
//! while keys below are still shown ([`StoreContext::shown_below`] asks the log, with the
//! policy), that is the state the log asks for, and the key is not counted as failed. A
//! file in the way that the log does not know yet (edited here, not recorded) is not
//! moved: the key below fails alone ([`FsError::Unrecorded`]) and is written by a retry
//! once the source has recorded the edit, so it is never skipped for good. The other way
//! round, a file whose path still holds a directory with entries fails alone
//! ([`FsError::NotEmpty`]) and is retried, so it is written once the keys below are
//! deleted, in whatever batch their deletes come.
//!
//! Keys a change of the ignore rules let in after the store passed over their events
//! ([`Echo::admitted`], see [`crate::synced`]) are shown with every batch until a synced
//! batch has shown them, and by [`Store::retry`], which the engine calls as soon as some
//! come ([`Store::more_to_show`]); they count as keys to show ([`Store::to_show`]), not as
//! failed. Once none is left, the store records the rules in effect as those the folder is
//! in sync with.
//!
//! A conflict copy whose conflict a merge ended ([`KeyView::merged_copies`]: a copy
//! deleted by hand on some replica, see [`crate::scan`]) is removed here too, unless it
//! was changed since ([`Writer::remove_copy`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions, Permissions};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use converge_api::{ContentRef, EntryKind, EventId, Head, Key, Meta, Op};
use converge_framework::content::{Piece, PieceError, Writeback};
use converge_framework::log::EventLog;
use converge_framework::plugin::{KeyView, Store, StoreContext};
use converge_framework::{LogError, PluginError};
use filetime::FileTime;

use crate::content::{
    changed_at_ms, file_stat, hash_file, is_executable, mtime_ms, recorded_stat, PIPELINE_BYTES,
};
use crate::echo::{known, locked, Applied, Declined, Echo, Known};
use crate::error::FsError;
use crate::rules::Rules;
use crate::{FsConfig, CONFLICT_MARKER, TEMP_PREFIX};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The store of one folder (or of a mirror): applies key views atomically per file and
/// durably per batch, or per run of batches shown before one sync (see [`Store::show`]).
#[derive(Debug)]
pub struct FsStore {
    name: String,
    config: FsConfig,
    echo: Arc<Echo>,
    /// Whether this is the folder's own store, paired with its source: then it never
    /// overwrites or removes a file in a state the log does not know.
    guarded: bool,
    /// The keys that failed alone (a file in a directory this process may not write), by
    /// the view last asked for: tried again with every batch and by [`Store::retry`].
    failed: tokio::sync::Mutex<BTreeMap<Key, KeyView>>,
    /// How many keys `failed` holds (read without its lock).
    failed_count: AtomicUsize,
    /// Keys of `failed` that a batch shown since the last sync wrote: they leave `failed`
    /// (and its state file) only once that sync succeeds, as the cursor is past their
    /// events and nothing else would write them again.
    recovered: std::sync::Mutex<BTreeMap<Key, KeyView>>,
    /// Keys a change of the ignore rules let in ([`Echo::admitted`]) that a batch shown
    /// since the last sync showed: they are shown once that sync succeeds (see
    /// [`crate::synced`]), and are not shown again by the batches before it.
    admitted_shown: std::sync::Mutex<HashSet<Key>>,
    /// What makes batches durable, and what is known not to be yet.
    durability: Arc<Durability>,
}

/// The keys whose files a store wrote and no sync has made durable yet, with the batch
/// that wrote them: a later batch writes them again even when they look right (see the
/// module docs).
type Unsynced = Arc<std::sync::Mutex<HashMap<Key, u64>>>;

/// Numbers the batches of every store (see [`Unsynced`]); 0 stands for a batch of an
/// earlier run.
static BATCHES: AtomicU64 = AtomicU64::new(1);

/// What a store knows of its batches' durability.
#[derive(Debug, Default)]
struct Durability {
    /// See [`Unsynced`].
    unsynced: Unsynced,
    /// The batches shown and not yet synced (see [`Store::show`]).
    pending: std::sync::Mutex<Option<Pending>>,
    /// A batch failed since the last sync: the next one syncs whatever it finds to do
    /// (what the failed one changed before it stopped, a removal say, is not noted).
    failed_since_sync: AtomicBool,
    /// A batch of this process got as far as its writes (a new mirror's cursor is 0 until
    /// its first sync: see `apply_blocking`).
    shown: AtomicBool,
    /// `unsynced` was saved to the state dir and not removed since (see
    /// [`FsStore::unsynced_file`]).
    saved: AtomicBool,
    /// When the machine started, in ms since the epoch (see [`Writer::left_torn`]): read
    /// from the kernel when first asked, or set by [`FsStore::booted_at`]; `None` where it
    /// cannot be known.
    booted_ms: std::sync::OnceLock<Option<u64>>,
}

/// Batches a store showed ([`Store::show`]) and has not synced yet.
#[derive(Debug)]
struct Pending {
    /// The folder's root, and the same opened before the first write of the first of
    /// them (see the module docs).
    root: PathBuf,
    sync_dir: File,
    /// Whether they changed anything in the folder.
    dirty: bool,
    /// Their numbers (see [`BATCHES`]).
    batches: HashSet<u64>,
    /// The keys they settled: written, removed, or found to be the user's (not those that
    /// failed alone), and conflict copies they ended.
    settled: HashSet<Key>,
}

impl Durability {
    /// The batches shown and not yet synced, locked; an error naming `root` if a thread
    /// panicked holding them (nothing is synced from then on: see [`Durability::sync`]).
    fn lock_pending(
        &self,
        root: &Path,
    ) -> Result<std::sync::MutexGuard<'_, Option<Pending>>, FsError> {
        self.pending.lock().map_err(|_| FsError::Content {
            path: root.to_owned(),
            reason: "a thread panicked while it showed a batch; not synced".into(),
        })
    }

    /// Makes the batches shown since the last sync durable, then forgets their keys'
    /// notes in [`Unsynced`] (see the module docs); keeps those at `unsynced_file` if it
    /// fails. `root` is the folder's, for errors.
    fn sync(&self, root: &Path, unsynced_file: Option<&Path>) -> Result<(), FsError> {
        let Some(p) = self.lock_pending(root)?.take() else {
            return Ok(());
        };
        if p.dirty {
            if let Err(e) = sync_all(&p.root, &p.sync_dir) {
                tracing::error!("{e}; its files are written again when the batch comes again");
                self.failed_since_sync.store(true, Ordering::Release);
                self.keep(unsynced_file, true);
                return Err(e);
            }
        }
        // Durable now: what these batches wrote (a key that failed alone keeps an earlier
        // batch's note), and the keys they settled otherwise. A later batch's note stays.
        if let Ok(mut unsynced) = self.unsynced.lock() {
            unsynced.retain(|key, batch| !p.batches.contains(batch) && !p.settled.contains(key));
        }
        self.keep(unsynced_file, false);
        Ok(())
    }

    /// Drops the batches shown since the last sync, after one failed: they are shown
    /// again, and their notes make them write again what they wrote.
    fn forget_pending(&self) {
        if let Ok(mut pending) = self.pending.lock() {
            *pending = None;
        }
        self.failed_since_sync.store(true, Ordering::Release);
    }

    /// Saves at `path`, before a batch writes any file, the keys of the files it is to
    /// write with those written and not synced yet. A power loss before the batch's sync
    /// can leave such a file torn (its name and size on disk, its data not), and a torn
    /// file is in no state the log knows: without this the next start would take it for
    /// a change made here, leave it, and have the scan record it on every replica. With
    /// it, the next start writes it again (see [`Writer::left_torn`]). A failure to save
    /// is logged and the batch goes on: it loses only that protection.
    fn write_ahead<'a>(&self, path: Option<&Path>, keys: impl Iterator<Item = &'a Key>) {
        let Some(path) = path else { return };
        let all: Vec<Key> = match self.unsynced.lock() {
            Ok(unsynced) => {
                let mut all: Vec<Key> = unsynced.keys().cloned().collect();
                all.extend(keys.filter(|k| !unsynced.contains_key(*k)).cloned());
                all
            }
            Err(_) => return,
        };
        match save_state(path, "keys being written", &all) {
            Ok(()) => self.saved.store(true, Ordering::Release),
            Err(e) => tracing::error!(
                "{e}: after a power loss before this batch is synced, a file it leaves torn \
                 would be taken for a change made here"
            ),
        }
    }

    /// When the machine started (see [`Durability::booted_ms`]).
    fn booted_ms(&self) -> Option<u64> {
        *self.booted_ms.get_or_init(boot_time_ms)
    }

    /// Keeps the keys written and not synced at `path` across a restart once a batch
    /// failed (`failed`), and removes the file once there are none: the process may be
    /// restarted before the batch comes again, and the page cache is not.
    fn keep(&self, path: Option<&Path>, failed: bool) {
        let Some(path) = path else { return };
        let keys: Vec<Key> = match self.unsynced.lock() {
            Ok(unsynced) => unsynced.keys().cloned().collect(),
            Err(_) => return,
        };
        let saved = self.saved.load(Ordering::Acquire);
        if !(saved || failed && !keys.is_empty()) {
            return;
        }
        match save_state(path, "keys written and not synced", &keys) {
            Ok(()) => self.saved.store(!keys.is_empty(), Ordering::Release),
            Err(e) => tracing::error!(
                "{e}: {} file(s) written by a batch that failed may be missing from the disk \
                 while they read right; do not restart converge before the page cache is \
                 dropped (a reboot, or `echo 1 > /proc/sys/vm/drop_caches`), or a restart \
                 takes them for durable",
                keys.len()
            ),
        }
    }
}

impl FsStore {
    /// A store named `folder` writing into `config.root` (created if missing).
    pub fn new(config: FsConfig) -> Self {
        FsStore::with_echo(config, Arc::new(Echo::default()))
    }

    /// A read-only copy of the folder's state named `mirror-<name>` (nothing reads it back).
    pub fn mirror(name: &str, config: FsConfig) -> Self {
        FsStore::new(config).with_name(format!("mirror-{name}"))
    }

    pub(crate) fn with_echo(config: FsConfig, echo: Arc<Echo>) -> Self {
        FsStore {
            name: "folder".into(),
            config,
            echo,
            guarded: false,
            failed: tokio::sync::Mutex::new(BTreeMap::new()),
            failed_count: AtomicUsize::new(0),
            recovered: std::sync::Mutex::new(BTreeMap::new()),
            admitted_shown: std::sync::Mutex::new(HashSet::new()),
            durability: Arc::default(),
        }
    }

    /// The file that keeps the keys this store could not show, if it has a state dir.
    fn state_file(&self) -> Option<PathBuf> {
        let dir = self.config.state_dir.as_ref()?;
        Some(dir.join(format!("{}.failed", self.name)))
    }

    /// The file that keeps the heads the store declined and the source has not recorded
    /// a change over yet (see [`Echo::decline`]), if it has a state dir and is the
    /// folder's own store.
    fn declined_file(&self) -> Option<PathBuf> {
        let dir = self.config.state_dir.as_ref().filter(|_| self.guarded)?;
        Some(dir.join(format!("{}.declined", self.name)))
    }

    /// Saves what the store declined, if that changed (see [`Echo::decline`]): after a
    /// batch is durable, before its cursor moves past it, so that a restart after the
    /// cursor moved finds the declines of the batches behind it. A failure is logged and
    /// the store goes on: it loses only that protection, and tries again at the next sync.
    async fn save_declined(&self) {
        let Some(path) = self.declined_file() else {
            return;
        };
        let Some(declined) = self.echo.declined_to_save() else {
            return;
        };
        let saved =
            tokio::task::spawn_blocking(move || save_state(&path, "declined versions", &declined))
                .await
                .map_err(FsError::from)
                .and_then(|r| r);
        if let Err(e) = saved {
            self.echo.declined_unsaved();
            tracing::warn!(store = %self.name, "{e}; an edit it left in place may be recorded over the version it kept out, should the daemon stop before the edit is recorded");
        }
    }

    /// Takes up what the store declined before a restart and the source had not recorded
    /// a change over (see [`Declined::left_with`]). A file that cannot be read, or a log
    /// whose heads cannot be, is logged and the file replaced at the next sync: it only
    /// protects, and must not keep the store from starting.
    async fn load_declined(&self, log: &EventLog) {
        let Some(path) = self.declined_file() else {
            return;
        };
        let log = log.clone();
        let left = tokio::task::spawn_blocking(move || {
            let replica = log.replica();
            let mut left = Vec::new();
            for d in load_state::<Declined>(&path, "declined versions")? {
                let heads: Vec<EventId> = log.heads(&d.key)?.iter().map(|h| h.id).collect();
                left.extend(d.left_with(&heads, replica));
            }
            Ok::<_, FsError>(left)
        })
        .await
        .map_err(FsError::from)
        .and_then(|r| r);
        match left {
            Ok(left) if left.is_empty() => {}
            Ok(left) => {
                tracing::info!(store = %self.name, keys = left.len(), "edits left in place before the restart are recorded concurrent with the versions kept out");
                self.echo.restore_declined(left);
            }
            Err(e) => {
                tracing::warn!(store = %self.name, "{e}; edits left in place before the restart, if any, are recorded over the versions kept out");
                self.echo.declined_unsaved();
            }
        }
    }

    /// The items (`what`) saved at `path` by an earlier run (see [`save_state`]), read on
    /// a blocking thread.
    async fn load<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: PathBuf,
        what: &'static str,
    ) -> Result<Vec<T>, PluginError> {
        tokio::task::spawn_blocking(move || load_state(&path, what))
            .await
            .map_err(FsError::from)
            .and_then(|r| r)
            .map_err(|e| e.into_plugin(&self.name))
    }

    /// The file that keeps the keys written and not synced after a failed batch (see
    /// [`Unsynced`]), if the store has a state dir.
    fn unsynced_file(&self) -> Option<PathBuf> {
        unsynced_path(&self.config, &self.name)
    }

    /// Takes the machine as started at `at` rather than when the kernel says: for tests,
    /// which can neither stage a power loss nor set a file's change time back (see
    /// [`Writer::left_torn`]).
    #[doc(hidden)]
    pub fn booted_at(self, at: std::time::SystemTime) -> Self {
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok());
        let _ = self.durability.booted_ms.set(ms);
        self
    }

    /// Makes this the folder's own store, whose source records local changes: a file
    /// whose size, mtime and mode match neither what the store wrote nor any event of
    /// its key in the log (its heads and their ancestors) was changed here and not yet
    /// recorded. Such a file is left alone rather than overwritten or removed; the source
    /// records the change, and what wins is applied then. Without this, a file saved
    /// twice in quick succession could be put back to its first version.
    /// A mirror's store is not guarded: it overwrites what it finds.
    pub(crate) fn guarded(mut self) -> Self {
        self.guarded = true;
        self
    }

    /// Renames the store (its subscriber and cursor name).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The folder's configuration.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// Takes the keys of [`FsStore::recovered`].
    fn take_recovered(&self) -> BTreeMap<Key, KeyView> {
        self.recovered
            .lock()
            .map(|mut recovered| std::mem::take(&mut *recovered))
            .unwrap_or_default()
    }

    /// Puts `recovered` back into `failed` (the batches that wrote them were dropped), to
    /// be tried again and counted as failing until then.
    fn restore(&self, failed: &mut BTreeMap<Key, KeyView>, recovered: BTreeMap<Key, KeyView>) {
        if recovered.is_empty() {
            return;
        }
        let back = recovered.len();
        for (key, view) in recovered {
            failed.entry(key).or_insert(view);
        }
        self.failed_count.fetch_add(back, Ordering::Relaxed);
        self.echo.set_failed(failed.keys().cloned().collect());
    }

    /// After a sync: the admitted keys a batch it covered showed (`shown`) are shown. Once
    /// no admitted key is left, the rules in effect are those the folder is in sync with:
    /// recorded in the state dir, if there is one (see [`crate::synced`]).
    async fn settle_admitted(&self, shown: HashSet<Key>) {
        if !self.guarded {
            return;
        }
        let Some((Some(path), rules)) = self.echo.shown_admitted(&shown) else {
            return;
        };
        let saved = tokio::task::spawn_blocking(move || crate::synced::save(&path, &rules))
            .await
            .map_err(FsError::from)
            .and_then(|r| r);
        if let Err(e) = saved {
            // Harmless: the next start lets the same keys in again, and finds them shown.
            tracing::warn!(store = %self.name, "recording the ignore rules in sync: {e}");
        }
    }

    /// Saves the views of `failed` and `recovered` (see [`FsStore::recovered`]) in the
    /// state file, if the store has a state dir.
    async fn save_failed(
        &self,
        failed: &BTreeMap<Key, KeyView>,
        recovered: &BTreeMap<Key, KeyView>,
    ) -> Result<(), PluginError> {
        let Some(path) = self.state_file() else {
            return Ok(());
        };
        let views: Vec<KeyView> = failed.values().chain(recovered.values()).cloned().collect();
        tokio::task::spawn_blocking(move || save_state(&path, "failed keys", &views))
            .await
            .map_err(FsError::from)
            .and_then(|r| r)
            .map_err(|e| e.into_plugin(&self.name))
    }
}

#[async_trait]
impl Store for FsStore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, ctx: &StoreContext, views: Vec<KeyView>) -> Result<(), PluginError> {
        self.show(ctx, views).await?;
        self.sync(ctx).await
    }

    fn splits_sync(&self) -> bool {
        true
    }

    async fn sync(&self, _ctx: &StoreContext) -> Result<(), PluginError> {
        let (durability, unsynced_file) = (self.durability.clone(), self.unsynced_file());
        let root = self.config.root.clone();
        let synced =
            tokio::task::spawn_blocking(move || durability.sync(&root, unsynced_file.as_deref()))
                .await
                .map_err(FsError::from)
                .and_then(|r| r)
                .map_err(|e| e.into_plugin(&self.name));
        // Not durable: the admitted keys are shown again by the next batch.
        let admitted = std::mem::take(&mut *locked(&self.admitted_shown));
        if synced.is_ok() {
            self.settle_admitted(admitted).await;
            self.save_declined().await;
        }
        let recovered = self.take_recovered();
        if recovered.is_empty() {
            return synced;
        }
        let mut failed = self.failed.lock().await;
        if synced.is_err() {
            // Not durable: tried again with the next batch, as before they were shown.
            self.restore(&mut failed, recovered);
            return synced;
        }
        if let Err(e) = self.save_failed(&failed, &BTreeMap::new()).await {
            // Harmless: the keys it still names are tried again, and found right.
            tracing::warn!(store = %self.name, "{e}");
        }
        synced
    }

    async fn show(&self, ctx: &StoreContext, views: Vec<KeyView>) -> Result<(), PluginError> {
        // One batch at a time, with the keys that failed before (a later view of a key
        // replaces the one that failed).
        let mut failed = self.failed.lock().await;
        // And the keys the ignore rules let in lately, which no batch since the last sync
        // showed (one with an event in this batch comes with it, a failed one with those).
        let admitted: Vec<Key> = match self.guarded {
            true => self.echo.admitted(),
            false => Vec::new(),
        };
        let to_admit: Vec<Key> = if admitted.is_empty() {
            Vec::new()
        } else {
            let shown = locked(&self.admitted_shown);
            let in_batch: HashSet<&Key> = views.iter().map(|v| &v.key).collect();
            admitted
                .iter()
                .filter(|k| {
                    !shown.contains(*k) && !failed.contains_key(*k) && !in_batch.contains(k)
                })
                .cloned()
                .collect()
        };
        // (Named only when some key failed or recovered: it costs a copy of every key.)
        let recovering = !failed.is_empty() || self.recovered.lock().is_ok_and(|r| !r.is_empty());
        let fresh: HashSet<Key> = match recovering {
            true => views.iter().map(|v| v.key.clone()).collect(),
            false => HashSet::new(),
        };
        let mut batch: Vec<KeyView> = failed
            .values()
            .filter(|f| !fresh.contains(&f.key))
            .cloned()
            .collect();
        let retried = batch.len();
        batch.extend(views);

        let (config, echo, ctx) = (self.config.clone(), self.echo.clone(), ctx.clone());
        let (name, guarded) = (self.name.clone(), self.guarded);
        let (durability, unsynced_file) = (self.durability.clone(), self.unsynced_file());
        let (batch, failures) = tokio::task::spawn_blocking(move || {
            let mut batch = batch;
            let viewed: Result<Vec<KeyView>, LogError> =
                to_admit.iter().map(|key| ctx.view(key)).collect();
            let failures = match viewed {
                Ok(viewed) => {
                    batch.extend(viewed);
                    apply_blocking(&config, echo, ctx, guarded, &name, &durability, &batch)
                }
                Err(e) => Err(FsError::from(e)),
            };
            if failures.is_err() {
                // The engine shows these events again from the cursor: the next sync is
                // that of the batch showing them again, on a descriptor opened before it.
                durability.forget_pending();
                durability.keep(unsynced_file.as_deref(), true);
            }
            (batch, failures)
        })
        .await
        .map_err(|e| FsError::from(e).into_plugin(&self.name))?;
        let failures = match failures {
            Ok(failures) => failures,
            Err(e) => {
                // The batches shown since the last sync are dropped: what they recovered
                // is tried again, and what they showed of the admitted keys shown again.
                self.restore(&mut failed, self.take_recovered());
                std::mem::take(&mut *locked(&self.admitted_shown));
                return Err(e.into_plugin(&self.name));
            }
        };
        // Every admitted key went into this batch or an earlier one since the last sync
        // (a failed one is in `failed` from now on, and tried again from there).
        locked(&self.admitted_shown).extend(admitted);

        for (key, e) in &failures {
            if failed.contains_key(key) {
                tracing::debug!(store = %self.name, "{key}: still failing: {e}");
            } else if e.is_expected() {
                tracing::info!(store = %self.name, "{key}: {e}");
            } else {
                tracing::error!(store = %self.name, "{key}: {e}; tried again later, the rest goes on");
            }
        }
        let failed_keys: HashSet<&Key> = failures.iter().map(|(key, _)| key).collect();
        // Keys that only wait for what the log implies are retried, not counted.
        let failing: HashSet<&Key> = failures
            .iter()
            .filter(|(_, e)| !e.is_expected())
            .map(|(key, _)| key)
            .collect();
        let now_failed: BTreeMap<Key, KeyView> = batch
            .into_iter()
            .filter(|v| failed_keys.contains(&v.key))
            .map(|v| (v.key.clone(), v))
            .collect();
        if retried > 0 {
            for key in failed.keys().filter(|k| !now_failed.contains_key(*k)) {
                tracing::info!(store = %self.name, "{key}: shown now");
            }
        }
        // Keys of `failed` written now are recovered until their sync. A key with an event
        // in this batch needs no such care (dropped, the batch comes again from the
        // cursor, which is before that event), and a key recovered earlier fails again
        // only with an event of its own.
        let recovered = match self.recovered.lock() {
            Ok(mut recovered) if recovering => {
                recovered.retain(|key, _| !fresh.contains(key));
                recovered.extend(
                    failed
                        .iter()
                        .filter(|(key, _)| !now_failed.contains_key(*key) && !fresh.contains(*key))
                        .map(|(key, view)| (key.clone(), view.clone())),
                );
                recovered.clone()
            }
            _ => BTreeMap::new(),
        };
        if now_failed != *failed {
            // Durable before the cursor moves past these keys' events; those written
            // now stay in the file until their sync.
            self.save_failed(&now_failed, &recovered).await?;
            self.echo.set_failed(now_failed.keys().cloned().collect());
        }
        let counted = now_failed.keys().filter(|k| failing.contains(k)).count();
        self.failed_count.store(counted, Ordering::Relaxed);
        *failed = now_failed;
        Ok(())
    }

    fn failed(&self) -> usize {
        self.failed_count.load(Ordering::Relaxed)
    }

    fn to_show(&self) -> usize {
        match self.guarded {
            true => self.echo.admitted_count(),
            false => 0,
        }
    }

    async fn more_to_show(&self) {
        match self.guarded {
            true => self.echo.admitted_changed().await,
            false => std::future::pending().await,
        }
    }

    async fn retry(&self, ctx: &StoreContext) -> Result<(), PluginError> {
        self.apply(ctx, Vec::new()).await
    }

    async fn start(&self, ctx: &StoreContext) -> Result<(), PluginError> {
        if self.guarded {
            self.echo.set_store(&self.name);
            self.load_declined(ctx.log()).await;
        }
        if let Some(path) = self.unsynced_file() {
            let loaded: Vec<Key> = self.load(path, "keys written and not synced").await?;
            if !loaded.is_empty() {
                tracing::warn!(
                    store = %self.name,
                    "{} file(s) written before the restart may not be on disk; \
                     written again when they come again",
                    loaded.len()
                );
                if let Ok(mut unsynced) = self.durability.unsynced.lock() {
                    unsynced.extend(loaded.into_iter().map(|k| (k, 0)));
                }
                self.durability.saved.store(true, Ordering::Release);
            }
        }
        if let Some(path) = self.state_file() {
            let loaded: Vec<KeyView> = self.load(path, "failed keys").await?;
            if !loaded.is_empty() {
                tracing::warn!(store = %self.name, "{} key(s) could not be shown before the restart; trying them again", loaded.len());
                self.echo
                    .set_failed(loaded.iter().map(|v| v.key.clone()).collect());
                self.failed_count.store(loaded.len(), Ordering::Relaxed);
                *self.failed.lock().await =
                    loaded.into_iter().map(|v| (v.key.clone(), v)).collect();
            }
        }
        let (root, temp_dir) = (self.config.root.clone(), self.config.temp_dir.clone());
        let removed = tokio::task::spawn_blocking(move || {
            let in_temp_dir = match temp_dir {
                Some(dir) => sweep_temp_files(&dir, Below::TempDirs)?,
                None => 0,
            };
            Ok::<_, FsError>(in_temp_dir + sweep_temp_files(&root, Below::All)?)
        })
        .await
        .map_err(FsError::from)
        .and_then(|r| r)
        .map_err(|e| e.into_plugin(&self.name))?;
        if removed > 0 {
            tracing::info!(store = %self.name, removed, "removed temporary files left by an interrupted run");
        }
        Ok(())
    }
}

/// The file that keeps the keys written and not synced of the store `name` (see
/// [`FsStore::unsynced_file`]), if it has a state dir.
fn unsynced_path(config: &FsConfig, name: &str) -> Option<PathBuf> {
    let dir = config.state_dir.as_ref()?;
    Some(dir.join(format!("{name}.unsynced")))
}

/// When the machine started, in ms since the epoch (`btime` in `/proc/stat`, whole
/// seconds); `None` where that cannot be read (not Linux).
fn boot_time_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    secs.checked_mul(1000)
}

/// Writes `items` (the views that failed, the keys not synced, the ignore rules in sync:
/// `what`) to `path`, replacing it atomically, durably; removes it when there are none.
pub(crate) fn save_state<T: serde::Serialize>(
    path: &Path,
    what: &str,
    items: &[T],
) -> Result<(), FsError> {
    if items.is_empty() {
        return remove_file(path);
    }
    let bytes = converge_api::codec::encode(&items).map_err(|e| FsError::Content {
        path: path.to_owned(),
        reason: format!("encoding the {what}: {e}"),
    })?;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let mut file = File::create(&temp).map_err(FsError::io("creating", &temp))?;
    std::io::Write::write_all(&mut file, &bytes).map_err(FsError::io("writing", &temp))?;
    file.sync_all().map_err(FsError::io("syncing", &temp))?;
    std::fs::rename(&temp, path).map_err(FsError::io("renaming into", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(FsError::io("syncing", dir))?;
    }
    Ok(())
}

/// The items [`save_state`] wrote to `path`; none if there is no such file.
pub(crate) fn load_state<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> Result<Vec<T>, FsError> {
    match std::fs::read(path) {
        Ok(bytes) => converge_api::codec::decode(&bytes).map_err(|e| FsError::Content {
            path: path.to_owned(),
            reason: format!("reading the {what}: {e}"),
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(FsError::Io {
            op: "reading",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Which directories below its root [`sweep_temp_files`] goes into.
#[derive(Clone, Copy, PartialEq)]
enum Below {
    /// Every one (the folder: temp files written beside their final paths).
    All,
    /// Only the writer threads' own temp dirs (see [`Writer::fork`]).
    TempDirs,
}

/// Removes every temporary file in `root` and in the directories `below` it: only this
/// store writes them, and at start none is in use, so any left is from a run that was
/// killed mid-write. Symlinks are not followed.
fn sweep_temp_files(root: &Path, below: Below) -> Result<u64, FsError> {
    let mut removed = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(FsError::Io {
                    op: "listing",
                    path: dir,
                    source,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(|source| FsError::Io {
                op: "listing",
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(|source| FsError::Io {
                op: "inspecting",
                path: path.clone(),
                source,
            })?;
            let temp_name = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TEMP_PREFIX));
            if file_type.is_dir() {
                if below == Below::All || temp_name {
                    dirs.push(path);
                }
            } else if file_type.is_file() && temp_name {
                remove_file(&path)?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// What a file at a path was when the store judged it: enough to tell that it changed
/// since (its identity, size and times).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Seen {
    fn of(m: &std::fs::Metadata) -> Seen {
        Seen {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Whether what is at `path` is no longer what the store judged before it wrote the file
/// that is to replace it (`seen`; `None`: nothing was there). A large file takes a while
/// to write, and a user saving it meanwhile, or making a file where there was none, is
/// a change made here, which the rename would otherwise put out of sight: the watcher
/// takes a file that matches the store's record for the store's own, and sees nothing
/// of the inode the rename replaced. So the path is looked at again right before the
/// rename (what is left is the time between two system calls, as in Syncthing).
fn changed_since(path: &Path, seen: Option<Seen>) -> Result<bool, FsError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(seen != Some(Seen::of(&m))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(seen.is_some()),
        Err(e) => Err(FsError::Io {
            op: "reading",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// A key the store will not touch here, and why (warned, then skipped).
#[derive(Debug)]
struct Refused(String);

/// Applies `views` as the store `name` (the folder's own if `guarded`, see
/// [`FsStore::guarded`]); returns the keys that failed alone.
fn apply_blocking(
    config: &FsConfig,
    echo: Arc<Echo>,
    ctx: StoreContext,
    guarded: bool,
    name: &str,
    durability: &Durability,
    views: &[KeyView],
) -> Result<Vec<(Key, FsError)>, FsError> {
    // The folder's own store writes only into the folder its source marked; a mirror
    // marks its folder itself, and has written before once its cursor is past the start.
    if guarded {
        crate::marker::check(&config.root)?;
    } else {
        crate::marker::ensure(&config.root, || {
            Ok(durability.shown.load(Ordering::Acquire) || ctx.log().cursor(name)? > 0)
        })?;
    }
    let root = config
        .root
        .canonicalize()
        .map_err(FsError::io("opening", &config.root))?;
    // Opened before any write, so that its sync hears of every failure of the batch (see
    // the module docs); the first of the batches shown since the last sync opens it.
    {
        let mut pending = durability.lock_pending(&root)?;
        if pending.is_none() {
            *pending = Some(Pending {
                sync_dir: File::open(&root).map_err(FsError::io("opening", &root))?,
                root: root.clone(),
                dirty: durability.failed_since_sync.swap(false, Ordering::AcqRel),
                batches: HashSet::new(),
                settled: HashSet::new(),
            });
        }
    }
    durability.shown.store(true, Ordering::Release);
    echo.prune(ctx.log());
    let mut w = Writer {
        rules: Rules::load(&root, &config.exclude),
        echo,
        ctx,
        guarded,
        checked: HashSet::new(),
        made: HashSet::new(),
        rename_new: cfg!(target_os = "linux"),
        unnamed: Unnamed::default(),
        dirty: false,
        unsynced: durability.unsynced.clone(),
        booted_ms: durability.booted_ms(),
        batch: BATCHES.fetch_add(1, Ordering::Relaxed),
        temp_dir: temp_dir_for(&root, config.temp_dir.as_deref()),
        temp_fd: None,
        failed: Vec::new(),
    };
    w.temp_fd = w.temp_dir.as_deref().and_then(open_dir);

    let mut absent = Vec::new();
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut copies = Vec::new();
    let mut ended = Vec::new();
    // The folder's own store: this replica, whose events its source recorded from the
    // files themselves.
    let recorded_by = w.guard().map(EventLog::replica);
    for view in views {
        match view.winner.as_ref().map(|h| &h.op) {
            Some(Op::Put { meta, .. }) if meta.kind == EntryKind::Dir => {
                dirs.push(view.key.clone())
            }
            Some(Op::Put {
                meta,
                content: Some(content),
            }) => files.push(FileView {
                key: view.key.clone(),
                content: *content,
                meta: meta.clone(),
                recorded_here: view
                    .winner
                    .as_ref()
                    .is_some_and(|h| Some(h.id.origin) == recorded_by),
            }),
            Some(Op::Put { content: None, .. }) => {
                tracing::warn!("{}: a file without content; skipped", view.key);
            }
            Some(Op::Delete) | None => absent.push(view.key.clone()),
        }
        for (name, content, meta) in file_copies(&view.key, &view.copies) {
            copies.push((name, view.key.clone(), *content, meta.clone()));
        }
        for (name, content, _) in file_copies(&view.key, &view.merged_copies) {
            ended.push((name, view.key.clone(), *content));
        }
    }

    // Before the first write (see `Durability::write_ahead`): the folder's own store,
    // which alone takes a file in no known state for a change made here.
    // The files and copies of the batch, but those `skip` names.
    let save_being_written = |skip: &dyn Fn(&Key) -> bool| {
        durability.write_ahead(
            unsynced_path(config, name).as_deref(),
            files
                .iter()
                .map(|f| &f.key)
                .filter(|k| !skip(k))
                .chain(copies.iter().map(|c| &c.0)),
        )
    };
    if guarded && !(files.is_empty() && copies.is_empty()) {
        save_being_written(&|_| false);
    }

    // Deletes: files now, directories after, deepest first.
    let mut dir_deletes = Vec::new();
    for key in absent {
        let path = match w.resolve(&key, w.rules.path_of(&key).is_dir()) {
            Ok(Ok(p)) => p,
            Ok(Err(Refused(why))) => {
                tracing::warn!("{why}");
                continue;
            }
            // Below a file: nothing there to remove.
            Err(FsError::Unrecorded { .. }) => continue,
            Err(e) => return Err(e),
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => dir_deletes.push((key, path)),
            Ok(m) if m.file_type().is_symlink() => {
                tracing::warn!(
                    "not removing symlink {} (symlinks are not synced)",
                    path.display()
                );
            }
            // Judged by its hash, which takes a while for a large file: one saved
            // meanwhile is a change made here too (see `changed_since`; looked at again
            // only after a hash, not after a judgment by the stat).
            Ok(m)
                if match w.known(&key, &path, &m) {
                    Known::No => true,
                    Known::Content(_) => changed_since(&path, Some(Seen::of(&m)))?,
                    Known::Stat(_) | Known::Assumed => false,
                } =>
            {
                tracing::info!("{key}: changed here since it was last recorded; not removed (the change is recorded next)");
                w.decline(&key, |op| matches!(op, Op::Delete));
            }
            Ok(_) => {
                w.echo.record(&key, Applied::Absent);
                if w.fail_alone(&key, remove_file(&path))?.is_some() {
                    w.changed(&key);
                }
            }
            // Gone, or below what is now a file: nothing there to remove.
            Err(e)
                if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                w.echo.record_gone(&key)
            }
            Err(e) => {
                return Err(FsError::Io {
                    op: "reading",
                    path,
                    source: e,
                })
            }
        }
    }
    dir_deletes.sort_by_key(|(k, _)| std::cmp::Reverse(k.as_str().matches('/').count()));
    for (key, path) in dir_deletes {
        w.echo.record(&key, Applied::Absent);
        let Some(removed) = w.fail_alone(&key, remove_dir_if_empty(&path))? else {
            continue;
        };
        if removed {
            w.changed(&key);
        } else {
            // Something live (or local-only) remains below: the directory stays.
            tracing::debug!("keeping {}: not empty", path.display());
            w.echo.record(&key, Applied::Dir);
        }
    }

    dirs.sort();
    for key in dirs {
        let made = w.make_dir(&key);
        if let Some(Err(Refused(why))) = w.fail_alone(&key, made)? {
            tracing::warn!("{why}");
        }
    }
    // Threads may only split files that cannot get in each other's way: when one key is
    // below another (a file where another wants a directory), the batch stays in order.
    // The cores are asked for only then: the standard library reads the process's cgroup
    // files each time (about 20 system calls and 30 µs here), on the path of every small
    // change to the peer's folder.
    let split = files.len() >= PARALLEL_FILES && !any_nested(&files);
    let threads = match split {
        true => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        false => 1,
    };
    if threads < 2 {
        w.put_files(&files)?;
    } else {
        // Writing a file is mostly system calls (create, write, mode, mtime, rename), each
        // waiting on the file system: several threads keep more of them under way.
        let part = files.len().div_ceil(threads);
        type Forked = Result<(bool, Vec<(Key, FsError)>), FsError>;
        let results: Vec<std::thread::Result<Forked>> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .chunks(part)
                .enumerate()
                .map(|(n, files)| {
                    let mut fork = w.fork(n);
                    s.spawn(move || fork.put_files(files).map(|()| (fork.dirty, fork.failed)))
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        for result in results {
            let (dirty, failed) = result.map_err(|_| FsError::Content {
                path: root.clone(),
                reason: "a thread writing files panicked".into(),
            })??;
            w.dirty |= dirty;
            w.failed.extend(failed);
        }
    }
    // Files left as they are, changed here and not recorded yet, are no longer being
    // written: saved again without them, as after a power loss the next start would take
    // such a file, last changed before the boot, for one of this batch left torn, and
    // write over the user's change (see `Writer::left_torn`).
    if guarded && files.iter().any(|f| w.echo.is_declined(&f.key)) {
        save_being_written(&|k| w.echo.is_declined(k));
    }
    for (name, of, content, meta) in copies {
        let written = w.put_file(&name, Some(&of), None, &content, &meta, false);
        if let Some(Err(Refused(why))) = w.fail_alone(&of, written)? {
            tracing::warn!("{why}");
        }
    }
    // A stale copy left in place is harmless: its removal is not worth failing a key.
    // Its note goes with the batch's sync either way: nothing brings it back.
    let mut ended_copies = Vec::with_capacity(ended.len());
    for (name, of, content) in ended {
        if let Err(e) = w.remove_copy(&name, &of, &content) {
            tracing::warn!("{name}: not removed: {e}");
        }
        ended_copies.push(name);
    }

    // Left to the sync (see `Durability::sync`): what this batch wrote, and the keys it
    // settled otherwise (removed, or found to be the user's; conflict copies removed or
    // kept as the user's), but not those that failed alone.
    // Only keys with an older batch's note need naming: the notes of the batches shown
    // since the last sync go by their numbers.
    if let Some(p) = durability.lock_pending(&root)?.as_mut() {
        p.dirty |= w.dirty;
        p.batches.insert(w.batch);
        if let Ok(unsynced) = durability.unsynced.lock() {
            if !unsynced.is_empty() {
                let failed: HashSet<&Key> = w.failed.iter().map(|(k, _)| k).collect();
                let older = |k: &&Key| {
                    unsynced
                        .get(*k)
                        .is_some_and(|b| *b != w.batch && !p.batches.contains(b))
                };
                let settled: Vec<Key> = views
                    .iter()
                    .map(|v| &v.key)
                    .filter(|k| !failed.contains(k))
                    .chain(&ended_copies)
                    .filter(older)
                    .cloned()
                    .collect();
                p.settled.extend(settled);
            }
        }
    }
    Ok(w.failed)
}

/// The process's file mode creation mask, read once from `/proc/self/status` (reading it
/// with `umask(2)` would change it for a moment under other threads); `None` if unknown.
fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

/// A file a batch is to show.
struct FileView {
    key: Key,
    content: ContentRef,
    meta: Meta,
    /// Whether the event is the folder's own, recorded by its source from this very file
    /// (see [`FsStore::guarded`]).
    recorded_here: bool,
}

/// Whether some key of `files` lies below another one.
fn any_nested(files: &[FileView]) -> bool {
    let keys: HashSet<&str> = files.iter().map(|f| f.key.as_str()).collect();
    files.iter().any(|f| {
        let key = f.key.as_str();
        key.match_indices('/')
            .any(|(i, _)| keys.contains(&key[..i]))
    })
}

/// Batches with at least this many files are written by several threads.
const PARALLEL_FILES: usize = 64;

struct Writer {
    rules: Rules,
    echo: Arc<Echo>,
    /// What the engine gave the batch: the log, its content store, the conflict policy.
    ctx: StoreContext,
    /// The folder's own store: see [`FsStore::guarded`].
    guarded: bool,
    /// Directories already checked to be real directories (not symlinks) in this batch.
    checked: HashSet<PathBuf>,
    /// Directories this writer created in this batch: a file in one is written without
    /// looking first (see [`Writer::write_new`]).
    made: HashSet<PathBuf>,
    /// Whether to try that: [`rename_new`] works here, as far as this writer has seen.
    rename_new: bool,
    /// How a new file is written there: see [`Unnamed`].
    unnamed: Unnamed,
    dirty: bool,
    /// See [`Unsynced`].
    unsynced: Unsynced,
    /// When the machine started (see [`Writer::left_torn`]).
    booted_ms: Option<u64>,
    /// This batch's number there.
    batch: u64,
    /// Where temp files go when not beside their final path: see [`temp_dir_for`].
    temp_dir: Option<PathBuf>,
    /// `temp_dir`, open (see [`Writer::at`]).
    temp_fd: Option<Arc<OwnedFd>>,
    /// Keys that failed alone (see [`FsError::fails_alone`]), and why.
    failed: Vec<(Key, FsError)>,
}

/// How a [`Writer`] writes a file where nothing is (see [`Writer::write_new`]): with no
/// name (`O_TMPFILE`) in the temp dir, then linked into place once written whole. Against
/// a named temp file renamed into place, that spares a directory entry made and removed
/// for each file (a tenth of writing a small one), and a crash leaves nothing behind
/// (`ab.py --workload W1 --reps 5`: 1.32 → 1.24 s, B's CPU 1.08 → 1.03 s). Which way works
/// here is found out on the first files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Unnamed {
    /// Not tried yet: as `ByDescriptor`, then whichever works.
    #[default]
    Untried,
    /// Linked by its descriptor (`AT_EMPTY_PATH`: any process may since Linux 6.10).
    ByDescriptor,
    /// Linked by its name in `/proc/self/fd`.
    ByProcName,
    /// Not here (no temp dir, a file system without `O_TMPFILE` or links): a named temp
    /// file, renamed.
    No,
}

/// A new file with no name on the file system of the directory open as `dir`, open for
/// writing with `mode` (masked by the umask).
fn open_unnamed(dir: RawFd, mode: u32) -> std::io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        let flags = libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_LARGEFILE;
        open_at(dir, c".", flags, mode)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (dir, mode);
        Err(std::io::Error::from(ErrorKind::Unsupported))
    }
}

/// `openat(dir, name, flags, mode)`, tried again when a signal interrupts it.
fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int, mode: u32) -> std::io::Result<File> {
    loop {
        // SAFETY: `name` is NUL-terminated and `dir` open (or AT_FDCWD) through the call.
        let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) };
        if fd >= 0 {
            // SAFETY: `fd` is a descriptor just opened, owned by nothing else.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `e` says the kernel or the file system cannot do what was asked at all.
fn unsupported(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
        )
}

/// `dir` opened as a directory, or `None` (paths below it are then given whole).
fn open_dir(dir: &Path) -> Option<Arc<OwnedFd>> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .ok()
        .map(|f| Arc::new(OwnedFd::from(f)))
}

/// The configured temp dir, created if missing, if it is on the same file system as
/// `root` (a rename into the folder then works); `None` to write temp files beside their
/// final paths.
fn temp_dir_for(root: &Path, configured: Option<&Path>) -> Option<PathBuf> {
    let dir = configured?;
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::debug!(
            "temp dir {}: {e}; writing temp files in the folder",
            dir.display()
        );
        return None;
    }
    let device = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    (device(dir)? == device(root)?).then(|| dir.to_owned())
}

impl Writer {
    /// Notes that the store changed the folder at `key`'s path (call it once the change
    /// is made): the batch needs its sync, and the source's note of `key` taken before
    /// is spoilt (see [`Echo::note_read`]).
    fn changed(&mut self, key: &Key) {
        self.dirty = true;
        self.echo.wrote(key);
        // What the store declined there is what it has now shown, or superseded.
        self.echo.forget_declined(key);
    }

    /// Notes that the file of `key` is about to be written: if the batch fails from here
    /// on, a later batch writes it again (see [`Unsynced`]). An earlier batch's note
    /// stays until [`Writer::wrote`].
    fn writing(&self, key: &Key) {
        if let Ok(mut unsynced) = self.unsynced.lock() {
            unsynced.entry(key.clone()).or_insert(self.batch);
        }
    }

    /// Notes that the file of `key` was written (linked or renamed into place) by this
    /// batch: its note goes once the batch's sync succeeds.
    fn wrote(&self, key: &Key) {
        if let Ok(mut unsynced) = self.unsynced.lock() {
            unsynced.insert(key.clone(), self.batch);
        }
    }

    /// A writer for another thread of the same batch, the `n`th: its temp files go in a
    /// directory of its own, so that the threads do not wait on each other's creates in
    /// one directory (the kernel takes a lock on the directory for each).
    fn fork(&self, n: usize) -> Writer {
        let temp_dir = self.temp_dir.as_ref().map(|dir| {
            // A temp name: never a key, should the temp dir be in a folder.
            let own = dir.join(format!("{TEMP_PREFIX}w{n}"));
            match std::fs::create_dir(&own) {
                Ok(()) => own,
                Err(e)
                    if e.kind() == ErrorKind::AlreadyExists
                        && std::fs::symlink_metadata(&own).is_ok_and(|m| m.is_dir()) =>
                {
                    own
                }
                Err(_) => dir.clone(),
            }
        });
        Writer {
            rules: self.rules.clone(),
            echo: self.echo.clone(),
            ctx: self.ctx.clone(),
            guarded: self.guarded,
            checked: self.checked.clone(),
            made: self.made.clone(),
            rename_new: self.rename_new,
            unnamed: self.unnamed,
            dirty: false,
            unsynced: self.unsynced.clone(),
            booted_ms: self.booted_ms,
            batch: self.batch,
            temp_fd: temp_dir.as_deref().and_then(open_dir),
            temp_dir,
            failed: Vec::new(),
        }
    }

    /// `path` as a directory descriptor and a path relative to it, for the `*at` system
    /// calls: a temp file below the open temp dir by its name there, so that the kernel
    /// does not walk the temp dir's whole path for each create and rename (a seventh of a
    /// small file's create, write and rename); any other path whole. Paths in the folder
    /// stay whole on purpose: every check before a write looks them up by path, and a
    /// folder moved away or replaced during a batch must not have the checks made in
    /// one tree and the writes in another.
    fn at<'p>(&self, path: &'p Path) -> (RawFd, &'p Path) {
        if let (Some(dir), Some(fd)) = (self.temp_dir.as_deref(), self.temp_fd.as_deref()) {
            match path.strip_prefix(dir) {
                Ok(rel) if !rel.as_os_str().is_empty() => return (fd.as_raw_fd(), rel),
                _ => {}
            }
        }
        (libc::AT_FDCWD, path)
    }

    /// Creates the file `path`, which must not exist, open for writing with `mode`
    /// (masked by the umask).
    fn create_new(&self, path: &Path, mode: u32) -> std::io::Result<File> {
        let (dir, rel) = self.at(path);
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
        // Files over 2 GiB on 32-bit systems, as std's own open asks for.
        #[cfg(target_os = "linux")]
        let flags = flags | libc::O_LARGEFILE;
        open_at(dir, &c_path(rel)?, flags, mode)
    }

    /// Renames `from` to `to`, replacing what is there.
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let ((from_dir, from), (to_dir, to)) = (self.at(from), self.at(to));
        let (from, to) = (c_path(from)?, c_path(to)?);
        // SAFETY: both names are NUL-terminated and both directories open (or
        // AT_FDCWD) through the call.
        let rc = unsafe { libc::renameat(from_dir, from.as_ptr(), to_dir, to.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Keeps going past an error that concerns `key`'s path alone, noting the key.
    fn fail_alone<T>(
        &mut self,
        key: &Key,
        result: Result<T, FsError>,
    ) -> Result<Option<T>, FsError> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.fails_alone() => {
                self.failed.push((key.clone(), e));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes each file whose content differs from what is there.
    fn put_files(&mut self, files: &[FileView]) -> Result<(), FsError> {
        for f in files {
            let mut written = self.put_file(
                &f.key,
                None,
                Some(&f.key),
                &f.content,
                &f.meta,
                f.recorded_here,
            );
            if let Err(FsError::NotEmpty { kept_alive, .. }) = &mut written {
                *kept_alive = self.ctx.shown_below(&f.key)?;
            }
            if let Some(Err(Refused(why))) = self.fail_alone(&f.key, written)? {
                tracing::warn!("{why}");
            }
        }
        Ok(())
    }

    /// Whether the store may replace or remove the regular file `key` at `path`: always for
    /// an unguarded store; otherwise when it is in a state the log or the store knows
    /// ([`known_state`](crate::echo::known_state)).
    fn knows(&self, key: &Key, path: &Path, m: &std::fs::Metadata) -> bool {
        !matches!(self.known(key, path, m), Known::No)
    }

    /// How the file `key` at `path` is known (see [`known`]): as [`Known::Assumed`] by a
    /// store that guards no folder.
    fn known(&self, key: &Key, path: &Path, m: &std::fs::Metadata) -> Known {
        match self.guard() {
            None => Known::Assumed,
            Some(log) => match known(log, &self.echo, key, path, m) {
                Known::No if self.left_torn(key, m) => {
                    tracing::warn!(
                        "{key}: written before the machine went down and not synced, left \
                         in no state the log knows; written again"
                    );
                    Known::Assumed
                }
                known => known,
            },
        }
    }

    /// Whether the file of `key` (`m`) is one a batch of an earlier run was writing when
    /// the machine went down, left torn, rather than a change made here: the key was
    /// saved as being written and no sync covered it since ([`Durability::write_ahead`],
    /// loaded at start with batch 0), and the file last changed before the machine
    /// started. A change made here since the restart is newer than that; without a
    /// restart of the machine (the process killed, say) nothing is torn, as the page
    /// cache holds what was written, and every file is newer than the boot too.
    fn left_torn(&self, key: &Key, m: &std::fs::Metadata) -> bool {
        let (Some(booted), Some(changed)) = (self.booted_ms, changed_at_ms(m)) else {
            return false;
        };
        changed < booted && self.unsynced.lock().is_ok_and(|u| u.get(key) == Some(&0))
    }

    /// The log, for the folder's own store (see [`FsStore::guarded`]).
    fn guard(&self) -> Option<&EventLog> {
        self.guarded.then(|| self.ctx.log())
    }

    /// The path of `key`, if the store may write it: not ignored or excluded, and no
    /// ancestor is a symlink or a file it may not replace (see [`Self::make_way`]).
    /// A file changed here and not yet recorded in the way is [`FsError::Unrecorded`]: the
    /// key fails alone and is tried again once the source has recorded the change.
    fn resolve(&mut self, key: &Key, is_dir: bool) -> Result<Result<PathBuf, Refused>, FsError> {
        self.resolve_as(key, key, is_dir)
    }

    /// Like [`Self::resolve`], with the ignore rules of `rules_key` (a conflict copy is
    /// written where its key's rules allow, though its own name is always ignored).
    fn resolve_as(
        &mut self,
        key: &Key,
        rules_key: &Key,
        is_dir: bool,
    ) -> Result<Result<PathBuf, Refused>, FsError> {
        let path = self.rules.path_of(key);
        if self
            .rules
            .ignores(&self.rules.path_of(rules_key), is_dir, true)
        {
            return Ok(Err(Refused(format!(
                "not applying {key}: ignored or excluded here"
            ))));
        }
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == self.rules.root() || self.checked.contains(d) {
                break;
            }
            match std::fs::symlink_metadata(d) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Ok(Err(Refused(format!(
                        "not applying {key}: {} is a symlink",
                        d.display()
                    ))))
                }
                // A file where `key` needs a directory: replaced if in a state the log
                // knows (see `make_way`), else a local change the source records first
                // (unless it never will: an ignored file).
                Ok(m) if m.is_file() && !self.rules.ignores(d, false, true) => {
                    match self.rules.key_of(d) {
                        Ok(k) if self.knows(&k, d, &m) => {}
                        Ok(_) => return Err(FsError::Unrecorded { path: d.to_owned() }),
                        Err(why) => return Ok(Err(Refused(format!("not applying {key}: {why}")))),
                    }
                }
                Ok(m) if !m.is_dir() => {
                    return Ok(Err(Refused(format!(
                        "not applying {key}: {} is not a directory",
                        d.display()
                    ))))
                }
                Ok(_) => {
                    self.checked.insert(d.to_owned());
                }
                Err(_) => {}
            }
            dir = d.parent();
        }
        Ok(Ok(path))
    }

    /// Notes in the echo record that a change made here and not recorded yet kept the
    /// store from showing `key`'s heads whose operation `picked` picks (see
    /// [`Echo::decline`]); only the folder's own store, and only other replicas' heads:
    /// one of this replica's own was recorded from this folder, which showed it (the
    /// user saved again before the store came to it). None where the log cannot be
    /// read: the change in the way is then recorded over every head.
    fn decline(&self, key: &Key, picked: impl Fn(&Op) -> bool) {
        let Some(log) = self.guard() else {
            return;
        };
        let replica = log.replica();
        let since = log.version_vector().get(&replica);
        let heads: Vec<EventId> = log
            .heads(key)
            .map(|heads| {
                heads
                    .iter()
                    .filter(|h| h.id.origin != replica && picked(&h.op))
                    .map(|h| h.id)
                    .collect()
            })
            .unwrap_or_default();
        self.echo.decline(key, heads, since);
    }

    /// [`Writer::decline`] of the heads that put `content` at `key`.
    fn decline_version(&self, key: &Key, content: &ContentRef) {
        self.decline(
            key,
            |op| matches!(op, Op::Put { content: Some(c), .. } if c.root == content.root),
        );
    }

    /// Creates the missing ancestors of `key` (recorded as the store's own).
    fn make_parents(&mut self, key: &Key) -> Result<(), FsError> {
        let mut missing = Vec::new();
        let mut parent = key.parent();
        while let Some(p) = parent {
            let path = self.rules.path_of(&p);
            if self.checked.contains(&path) || path.is_dir() {
                break;
            }
            parent = p.parent();
            missing.push((p, path));
        }
        for (p, path) in missing.into_iter().rev() {
            self.echo.record(&p, Applied::Dir);
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
                self.make_way(&p, &path)?;
            }
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    self.changed(&p);
                    self.made.insert(path.clone());
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(FsError::Io {
                        op: "creating",
                        path,
                        source: e,
                    })
                }
            }
            self.checked.insert(path);
        }
        Ok(())
    }

    /// Moves the file at `key` out of the way of a directory: live keys below it need one
    /// (they win over the file at their parent's path, as a file written into a deleted
    /// directory wins over the delete, DESIGN §2; writing them anyway is what keeps the
    /// replicas the same). The caller checked that the store may replace the file. It is
    /// renamed beside as a conflict copy named after the key's latest file head, so its
    /// bytes stay on disk; without such a head (or the log, for a mirror) it is removed.
    fn make_way(&mut self, key: &Key, path: &Path) -> Result<(), FsError> {
        let head = self
            .guard()
            .and_then(|log| log.heads(key).ok())
            .and_then(|heads| {
                heads
                    .into_iter()
                    .filter(
                        |h| matches!(&h.op, Op::Put { meta, .. } if meta.kind == EntryKind::File),
                    )
                    .max_by_key(Head::lww_rank)
            });
        let aside = head
            .and_then(|h| conflict_name(key, &h))
            .map(|name| self.rules.path_of(&name));
        let moved = match &aside {
            Some(aside) => std::fs::rename(path, aside),
            None => std::fs::remove_file(path),
        };
        match moved {
            // Another thread of the batch made way already.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(FsError::Io {
                    op: "moving aside",
                    path: path.to_owned(),
                    source: e,
                })
            }
            Ok(()) => {}
        }
        match aside {
            Some(aside) => tracing::info!(
                "{key}: keys below it need a directory here; the file is now {}",
                aside.display()
            ),
            None => tracing::info!("{key}: keys below it need a directory here; file removed"),
        }
        self.changed(key);
        Ok(())
    }

    fn make_dir(&mut self, key: &Key) -> Result<Result<(), Refused>, FsError> {
        let path = match self.resolve(key, true)? {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        self.make_parents(key)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Ok(Err(Refused(format!(
                    "not applying {key}: {} is a symlink",
                    path.display()
                ))))
            }
            // A file became a directory: the file goes if it is in a state the log knows;
            // one changed here and not recorded yet is the user's, so the key waits (as
            // a key below such a file does, see `resolve`) until the source records it.
            Ok(m) if !self.knows(key, &path, &m) => {
                return Err(FsError::Unrecorded { path });
            }
            Ok(_) => {
                remove_file(&path)?;
                self.changed(key);
                self.create_dir(key, &path)?;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => self.create_dir(key, &path)?,
            Err(e) => {
                return Err(FsError::Io {
                    op: "reading",
                    path,
                    source: e,
                })
            }
        }
        self.echo.record(key, Applied::Dir);
        self.checked.insert(path);
        Ok(Ok(()))
    }

    fn create_dir(&mut self, key: &Key, path: &Path) -> Result<(), FsError> {
        self.echo.record(key, Applied::Dir);
        std::fs::create_dir(path).map_err(FsError::io("creating", path))?;
        self.changed(key);
        self.made.insert(path.to_owned());
        Ok(())
    }

    /// Removes the conflict copy `name` of `of` whose conflict was merged, if it still
    /// holds `content`: a copy changed since it was written is the user's, and stays.
    fn remove_copy(&mut self, name: &Key, of: &Key, content: &ContentRef) -> Result<(), FsError> {
        let Ok(path) = self.resolve_as(name, of, false)? else {
            return Ok(());
        };
        let unchanged = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {
                m.len() == content.size && hash_file(&path)?.root == content.root
            }
            Ok(_) => return Ok(()),
            Err(e)
                if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                return Ok(())
            }
            Err(e) => {
                return Err(FsError::Io {
                    op: "reading",
                    path,
                    source: e,
                })
            }
        };
        if unchanged {
            remove_file(&path)?;
            self.changed(name);
            tracing::info!(
                "{name}: removed; the conflict of {of} was merged keeping what it shows"
            );
        } else {
            tracing::info!(
                "{name}: kept, changed since it was written; the conflict of {of} was merged"
            );
        }
        Ok(())
    }

    /// Writes `content` at `target` unless the file there already holds it. A conflict
    /// copy names the key it is a copy `of`; `echo_key` is the key to record (copies are
    /// not keys).
    ///
    /// Whether the file holds the content already (a replay, or the repair after a crash)
    /// is told by its hash, unless its size, mtime and mode are those of another version
    /// the store wrote or the log holds, which by the scan's rule it then holds: it is
    /// written without being read ([`Known::Stat`]). A same-size edit of a large file had
    /// each receiver hash the whole old file first, 28% of B's CPU in W3 of
    /// `bench/daemon/run.py`: W3 0.55 and 0.59 s → 0.51 and 0.49 s (`run.py --only W2
    /// --reps 3`, the two builds alternated twice, 1cd40ad). The rule can only cost a
    /// write of what was there, never skip one: a stat never tells a file already right,
    /// as after a crash what has an event's stat may not hold its content.
    fn put_file(
        &mut self,
        target: &Key,
        of: Option<&Key>,
        echo_key: Option<&Key>,
        content: &ContentRef,
        meta: &Meta,
        recorded_here: bool,
    ) -> Result<Result<(), Refused>, FsError> {
        let record = Applied::file(content, meta);
        // The folder's source read this very content and stat from the file a moment ago
        // and recorded it: the file shows it (a change since is the source's to record).
        // Written by an earlier batch that no sync made durable: written again, however
        // it looks (see the module docs).
        let again = self
            .unsynced
            .lock()
            .map_or(true, |u| u.get(target).is_some_and(|b| *b != self.batch));
        if !again && echo_key.is_some_and(|k| recorded_here && self.echo.take_read(k, record)) {
            return Ok(Ok(()));
        }
        let path = match self.resolve_as(target, of.unwrap_or(target), false)? {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        self.make_parents(target)?;
        // In a directory made in this batch, the file is most likely new: written without
        // looking first, unless the rename finds something there after all.
        let in_made = self.rename_new && path.parent().is_some_and(|p| self.made.contains(p));
        if in_made {
            self.writing(target);
        }
        if in_made && self.write_new(&path, echo_key, record, content, meta)? {
            self.wrote(target);
            self.changed(target);
            return Ok(Ok(()));
        }
        let mut base_mode = 0o644;
        // What is at the path as it is judged here, looked at again right before the
        // rename: see `changed_since`.
        let mut seen = None;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {
                seen = Some(Seen::of(&m));
                let as_recorded = file_stat(&m) == recorded_stat(content, meta);
                let known = match echo_key {
                    Some(_) if !as_recorded => self.known(target, &path, &m),
                    _ => Known::Assumed,
                };
                if known == Known::No {
                    tracing::info!("{target}: changed here since it was last recorded; not overwritten (the change is recorded next)");
                    self.decline_version(target, content);
                    return Ok(Ok(()));
                }
                base_mode = m.permissions().mode() & 0o777;
                // The folder's source recorded this event from this file, and its size,
                // mtime and mode are still those: in place, as the scan would judge it,
                // without reading it again. Any other file is checked by its hash, unless
                // its stat is that of another content (then it is written without reading
                // it: the rule can only cost a write of what was there already, never skip
                // one). (After a failed sync what reads right may not be on disk: written
                // again. After a crash, what has this event's stat may not be this
                // content: so a stat never tells a file already right.)
                let holds = || -> Result<bool, FsError> {
                    Ok(match known {
                        Known::Stat(root) if root != content.root => false,
                        Known::Content(root) => root == content.root,
                        _ => m.len() == content.size && hash_file(&path)?.root == content.root,
                    })
                };
                let in_place = recorded_here && as_recorded && !self.echo.is_racy(target);
                if !again && (in_place || holds()?) {
                    // Already there (a replay, or the crash-repair check): fix the metadata,
                    // unless it was saved while its hash was taken: a mode or mtime set on
                    // it now could make the save look like the version recorded.
                    let fix = is_executable(&m) != meta.executable || mtime_ms(&m) != meta.mtime_ms;
                    if fix && changed_since(&path, seen)? {
                        tracing::info!("{target}: changed here while it was checked; left as it is (the change is recorded next)");
                        return Ok(Ok(()));
                    }
                    if fix {
                        if let Some(k) = echo_key {
                            self.echo.record(k, record);
                        }
                        let perms = Permissions::from_mode(mode_for(base_mode, meta.executable));
                        std::fs::set_permissions(&path, perms)
                            .map_err(FsError::io("setting the mode of", &path))?;
                        self.changed(target);
                        filetime::set_symlink_file_times(
                            &path,
                            FileTime::from_last_access_time(&m),
                            file_time(meta.mtime_ms),
                        )
                        .map_err(FsError::io("setting the mtime of", &path))?;
                        self.changed(target);
                    } else if let Some(k) = echo_key {
                        self.echo.record(k, record);
                    }
                    return Ok(Ok(()));
                }
                // A conflict copy that no longer holds its version was changed by the
                // user (the store writes a copy whole, under another name first): theirs
                // to merge by hand, as `remove_copy` keeps it too. Shown again (a replay,
                // another head, a retry of its key), it is not written over; one a batch
                // not synced wrote, left torn by a power loss, is (`again`: copies are in
                // the write-ahead note too). Not in a mirror, which overwrites.
                if self.guarded && of.is_some() && echo_key.is_none() && !again {
                    tracing::info!("{target}: kept, changed since it was written");
                    return Ok(Ok(()));
                }
            }
            // Live keys below keep the directory (see `make_way`); once they are gone,
            // a retry writes the file.
            Ok(m) if m.is_dir() => {
                if !remove_dir_if_empty(&path)? {
                    return Err(FsError::NotEmpty {
                        path,
                        kept_alive: false,
                    });
                }
                self.changed(target);
            }
            Ok(_) => {
                return Ok(Err(Refused(format!(
                    "not applying {target}: {} is a symlink or special file",
                    path.display()
                ))))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(FsError::Io {
                    op: "reading",
                    path,
                    source: e,
                })
            }
        }

        let mode = mode_for(base_mode, meta.executable);
        self.writing(target);
        loop {
            let temp = self.temp_path(&path);
            let written = self.write_temp(&temp, content, mode, meta.mtime_ms);
            if let Err(e) = written {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
            if self.guarded && changed_since(&path, seen)? {
                let _ = std::fs::remove_file(&temp);
                tracing::info!("{target}: changed here while it was being written; not overwritten (the change is recorded next)");
                if echo_key.is_some() {
                    self.decline_version(target, content);
                }
                return Ok(Ok(()));
            }
            if let Some(k) = echo_key {
                self.echo.record(k, record);
            }
            match self.rename(&temp, &path) {
                Ok(()) => {
                    self.wrote(target);
                    break;
                }
                // The same file system but another mount (a bind mount): write beside
                // the final path from now on.
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) && self.temp_dir.is_some() => {
                    let _ = std::fs::remove_file(&temp);
                    tracing::debug!("{}: {e}; writing temp files in the folder", temp.display());
                    self.temp_dir = None;
                    self.temp_fd = None;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&temp);
                    return Err(FsError::Io {
                        op: "renaming into",
                        path,
                        source: e,
                    });
                }
            }
        }
        self.changed(target);
        Ok(Ok(()))
    }

    /// Writes `content` at `path` if nothing is there (see [`rename_new`]; a file system
    /// that accepts the flag but replaces anyway, as a broken FUSE server might, would skip
    /// the check of what is there): whether it did. When something is there, nothing
    /// changed (the temp file is removed, the echo record put back) and the caller looks
    /// at what is there as it does for any file.
    fn write_new(
        &mut self,
        path: &Path,
        echo_key: Option<&Key>,
        record: Applied,
        content: &ContentRef,
        meta: &Meta,
    ) -> Result<bool, FsError> {
        let mode = mode_for(0o644, meta.executable);
        if content.size < PIPELINE_BYTES && self.unnamed != Unnamed::No {
            if let Some(done) = self.write_unnamed(path, echo_key, record, content, meta)? {
                return Ok(done);
            }
        }
        let temp = self.temp_path(path);
        if let Err(e) = self.write_temp(&temp, content, mode, meta.mtime_ms) {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        let before = echo_key.map(|k| (k, self.echo.replace(k, record)));
        let renamed = rename_new(self.at(&temp), self.at(path));
        if renamed.is_ok() {
            return Ok(true);
        }
        let _ = std::fs::remove_file(&temp);
        if let Some((k, before)) = before {
            let found = renamed
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::AlreadyExists);
            self.echo.put_back(k, before, found);
        }
        match renamed {
            // The temp dir is on another mount (a bind mount): temp files beside their
            // final paths from now on, as the usual way does.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) && self.temp_dir.is_some() => {
                tracing::debug!("{}: {e}; writing temp files in the folder", temp.display());
                self.temp_dir = None;
                self.temp_fd = None;
            }
            // The file system (or a sandbox) cannot rename without replacing: the usual
            // way for the rest of this writer's files (one wasted write per batch).
            Err(e) if unsupported(&e) => {
                tracing::debug!("{}: {e}; looking before writing", path.display());
                self.rename_new = false;
            }
            // Something is there, or an error the usual way meets and reports.
            _ => {}
        }
        Ok(false)
    }

    /// [`write_new`](Self::write_new) by a file with no name (see [`Unnamed`]): written
    /// in the temp dir and linked at `path` if nothing is there. `None` when that cannot
    /// work here (this writer then takes the temp name way from now on); otherwise whether
    /// it linked the file. A failure to link is left to that way to meet and report, as
    /// is something there.
    fn write_unnamed(
        &mut self,
        path: &Path,
        echo_key: Option<&Key>,
        record: Applied,
        content: &ContentRef,
        meta: &Meta,
    ) -> Result<Option<bool>, FsError> {
        // In the folder the file's mtime would be reported by its watcher under a name
        // that is no file (`#` and the inode number): only in a temp dir of its own.
        let Some(dir) = self.temp_fd.clone() else {
            self.unnamed = Unnamed::No;
            return Ok(None);
        };
        let mode = mode_for(0o644, meta.executable);
        let mut file = match open_unnamed(dir.as_raw_fd(), mode) {
            Ok(file) => file,
            Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EISDIR) => {
                tracing::debug!("{}: {e}; writing named temp files", path.display());
                self.unnamed = Unnamed::No;
                return Ok(None);
            }
            Err(e) => return Err(FsError::io("creating a file for", path)(e)),
        };
        self.fill(&mut file, path, content, mode, meta.mtime_ms)?;
        let before = echo_key.map(|k| (k, self.echo.replace(k, record)));
        let linked = self.link_unnamed(&file, path);
        let Err(e) = linked else {
            return Ok(Some(true));
        };
        if let Some((k, before)) = before {
            self.echo
                .put_back(k, before, e.kind() == ErrorKind::AlreadyExists);
        }
        // Anything but what the temp name way meets as well (something there, no room,
        // a failing disk, the directory gone) is taken as refused for every file alike:
        // links not allowed here (by the file system or a security module), the temp dir
        // on another mount of the file system (a bind mount), or, both ways of linking
        // failing with `ENOENT` while the directory is there, no /proc.
        let cannot = match e.raw_os_error() {
            Some(libc::ENOENT) => path.parent().is_some_and(Path::is_dir),
            Some(
                libc::EEXIST
                | libc::ENOSPC
                | libc::EDQUOT
                | libc::EIO
                | libc::EROFS
                | libc::ENOMEM
                | libc::ENAMETOOLONG
                | libc::EINTR,
            ) => false,
            _ => true,
        };
        if cannot {
            tracing::debug!("{}: {e}; writing named temp files", path.display());
            self.unnamed = Unnamed::No;
        }
        Ok(Some(false))
    }

    /// Gives `file`, open with no name, the name `path`, which must be free.
    #[cfg(target_os = "linux")]
    fn link_unnamed(&mut self, file: &File, path: &Path) -> std::io::Result<()> {
        let to = c_path(path)?;
        let fd = file.as_raw_fd();
        // Refused once, refused for good: not asked again by every batch's writers.
        static REFUSED: AtomicBool = AtomicBool::new(false);
        if self.unnamed != Unnamed::ByProcName && !REFUSED.load(Ordering::Relaxed) {
            // SAFETY: the names are NUL-terminated and `fd` is open through the call.
            let rc = unsafe {
                libc::linkat(
                    fd,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            };
            if rc == 0 {
                self.unnamed = Unnamed::ByDescriptor;
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            // Before Linux 6.10, only a process that may read any directory links a
            // descriptor (`ENOENT` for others); anyone may by its name in /proc.
            if e.kind() != ErrorKind::NotFound {
                return Err(e);
            }
            // The final path's directory may be what is missing: not refused until the
            // other way works.
        }
        let from = c_path(Path::new(&format!("/proc/self/fd/{fd}")))?;
        // SAFETY: as above.
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if rc == 0 {
            if self.unnamed != Unnamed::ByProcName {
                REFUSED.store(true, Ordering::Relaxed);
            }
            self.unnamed = Unnamed::ByProcName;
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Elsewhere no file is opened with no name (see [`open_unnamed`]).
    #[cfg(not(target_os = "linux"))]
    fn link_unnamed(&mut self, _file: &File, _path: &Path) -> std::io::Result<()> {
        Err(std::io::Error::from(ErrorKind::Unsupported))
    }

    /// A fresh temp file name for a file to be renamed to `path`.
    fn temp_path(&self, path: &Path) -> PathBuf {
        // The process ID, read once: each read is a system call.
        static PID: OnceLock<u32> = OnceLock::new();
        let name = format!(
            "{TEMP_PREFIX}{}-{}",
            PID.get_or_init(std::process::id),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        match &self.temp_dir {
            Some(dir) => dir.join(name),
            None => path.parent().unwrap_or(self.rules.root()).join(name),
        }
    }

    fn write_temp(
        &self,
        temp: &Path,
        content: &ContentRef,
        mode: u32,
        mtime: i64,
    ) -> Result<(), FsError> {
        // A large file received as one stream lies whole in a pack of its own: take that
        // (a hard link) instead of copying it.
        if content.size >= PIPELINE_BYTES && self.ctx.chunks().lend(content, temp)? {
            std::fs::set_permissions(temp, Permissions::from_mode(mode))
                .map_err(FsError::io("setting the mode of", temp))?;
            filetime::set_file_mtime(temp, file_time(mtime))
                .map_err(FsError::io("setting the mtime of", temp))?;
            return Ok(());
        }
        let mut file = self
            .create_new(temp, mode)
            .map_err(FsError::io("creating", temp))?;
        self.fill(&mut file, temp, content, mode, mtime)
    }

    /// Writes `content` into `file` (new and empty), with `mode` and `mtime`; `temp` names
    /// it in errors (its temp path, or the final path of a file with no name).
    fn fill(
        &self,
        file: &mut File,
        temp: &Path,
        content: &ContentRef,
        mode: u32,
        mtime: i64,
    ) -> Result<(), FsError> {
        let written = if content.size >= PIPELINE_BYTES {
            // Reading and checking chunks from an earlier run's packs takes about as long
            // as writing them: a second thread walks the content while this one writes.
            std::thread::scope(|scope| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(32);
                let chunks = self.ctx.chunks();
                let reader = scope.spawn(move || {
                    chunks.for_each_data_piece(content, &mut |piece| {
                        tx.send(piece).map_err(|_| LogError::Closed)
                    })
                });
                let written = write_pieces(file, temp, rx);
                // A write error drops `rx`, which stops the reader with `Closed`: the
                // write error is the one to report.
                let read = reader.join().map_err(|_| FsError::Content {
                    path: temp.to_owned(),
                    reason: "the thread reading its chunks panicked".into(),
                })?;
                let written = written?;
                read?;
                Ok::<_, FsError>(written)
            })?
        } else {
            // Under PIPELINE_BYTES: read every chunk, then write them.
            let mut pieces = Vec::new();
            self.ctx
                .chunks()
                .for_each_data_piece(content, &mut |piece| {
                    pieces.push(piece);
                    Ok(())
                })?;
            write_pieces(file, temp, pieces)?
        };
        if written != content.size {
            return Err(FsError::Content {
                path: temp.to_owned(),
                reason: format!("{written} bytes written, {} expected", content.size),
            });
        }
        // The mode given at creation is masked by the umask; set it exactly when the mask
        // took something away (one system call, and one watcher event, per file saved).
        if umask().is_none_or(|mask| mode & mask != 0) {
            file.set_permissions(Permissions::from_mode(mode))
                .map_err(FsError::io("setting the mode of", temp))?;
        }
        filetime::set_file_handle_times(file, None, Some(file_time(mtime)))
            .map_err(FsError::io("setting the mtime of", temp))?;
        Ok(())
    }
}

/// Writes `pieces` to `file` (the temp file `temp`), starting the kernel's writeback
/// every few MiB so the batch's `syncfs` finds little left to write. Returns the bytes
/// written.
fn write_pieces(
    file: &mut File,
    temp: &Path,
    pieces: impl IntoIterator<Item = Piece>,
) -> Result<u64, FsError> {
    let mut written = Writeback::default();
    for piece in pieces {
        piece.write_to(file, written.len()).map_err(|e| match e {
            PieceError::Read(e) => FsError::Log(e),
            PieceError::Write(e) => FsError::io("writing", temp)(e),
        })?;
        written.wrote(file, piece.len());
    }
    Ok(written.len())
}

/// `base` with the executable bits set (where readable) or cleared.
fn mode_for(base: u32, executable: bool) -> u32 {
    if executable {
        base | ((base & 0o444) >> 2) | 0o100
    } else {
        base & !0o111
    }
}

fn file_time(mtime_ms: i64) -> FileTime {
    let nanos = (mtime_ms.rem_euclid(1000) * 1_000_000) as u32;
    FileTime::from_unix_time(mtime_ms.div_euclid(1000), nanos)
}

fn remove_file(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::Io {
            op: "removing",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Removes the directory if it is empty (or holds only our own leftover temp files);
/// `false` if something else remains.
fn remove_dir_if_empty(path: &Path) -> Result<bool, FsError> {
    let entries = std::fs::read_dir(path).map_err(FsError::io("listing", path))?;
    for entry in entries {
        let entry = entry.map_err(FsError::io("listing", path))?;
        let name = entry.file_name();
        match name.to_str() {
            Some(n) if n.starts_with(TEMP_PREFIX) => remove_file(&entry.path())?,
            _ => return Ok(false),
        }
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => Ok(false),
        Err(e) => Err(FsError::Io {
            op: "removing",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// The conflict copies of `key` that `heads` make, those that put a file: each one's name
/// (see [`conflict_name`]), content and metadata.
pub(crate) fn file_copies<'h>(
    key: &'h Key,
    heads: impl IntoIterator<Item = &'h Head> + 'h,
) -> impl Iterator<Item = (Key, &'h ContentRef, &'h Meta)> + 'h {
    heads.into_iter().filter_map(move |head| match &head.op {
        Op::Put {
            content: Some(content),
            meta,
        } if meta.kind == EntryKind::File => Some((conflict_name(key, head)?, content, meta)),
        _ => None,
    })
}

/// The name of the conflict copy of `key` for the losing `head`:
/// `name.sync-conflict-<YYYYMMDD-HHMMSS>-<origin>.ext`, the same on every replica.
pub(crate) fn conflict_name(key: &Key, head: &Head) -> Option<Key> {
    let s = key.as_str();
    let (dir, name) = match s.rfind('/') {
        Some(i) => (&s[..=i], &s[i + 1..]),
        None => ("", s),
    };
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let stamp = utc_stamp(head.hlc.wall_ms);
    Key::new(format!(
        "{dir}{stem}{CONFLICT_MARKER}{stamp}-{}{ext}",
        head.id.origin.short()
    ))
    .ok()
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn utc_stamp(wall_ms: u64) -> String {
    let secs = wall_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `path` as the C string the `*at` system calls take (an `InvalidInput` error for a
/// path with a NUL byte).
fn c_path(path: &Path) -> std::io::Result<CString> {
    Ok(CString::new(path.as_os_str().as_bytes())?)
}

/// Renames `from` to `to` (each a directory descriptor and a path relative to it, as
/// [`Writer::at`] gives) unless something is at `to` (an `AlreadyExists` error then), in
/// one step: nothing written at `to` meanwhile is ever replaced.
fn rename_new(from: (RawFd, &Path), to: (RawFd, &Path)) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let ((from_dir, from), (to_dir, to)) = (from, to);
        let from = c_path(from)?;
        let to = c_path(to)?;
        // SAFETY: both are NUL-terminated strings that live through the call, and both
        // directories are open (or AT_FDCWD) through it.
        let rc = unsafe {
            libc::renameat2(
                from_dir,
                from.as_ptr(),
                to_dir,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (from, to);
        Err(std::io::Error::from(ErrorKind::Unsupported))
    }
}

/// Makes every write of the batch durable at once; `dir` is `root`, opened before the
/// batch's first write.
fn sync_all(root: &Path, dir: &File) -> Result<(), FsError> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `dir` is an open descriptor for the duration of the call.
        let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
        if rc != 0 {
            return Err(FsError::Io {
                op: "syncing the file system of",
                path: root.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        // No syncfs: flush the whole system's buffers, then the root directory.
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        dir.sync_all().map_err(FsError::io("syncing", root))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use converge_api::{EventId, Hash, Hlc, ReplicaId};

    /// A writer of the folder's own (guarded) store over `root`, writing temp files beside
    /// their final paths, and the content of `bytes` in its log's content store.
    fn writer(root: &Path, bytes: &[u8]) -> (Writer, ContentRef) {
        let log = EventLog::open(converge_framework::log::LogConfig::temporary()).unwrap();
        let source = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(source.path(), bytes).unwrap();
        let content = crate::content::store_file(source.path(), log.chunks()).unwrap();
        let w = Writer {
            rules: Rules::load(root, &[]),
            echo: Arc::new(Echo::default()),
            ctx: StoreContext::new(log),
            guarded: true,
            checked: HashSet::new(),
            made: HashSet::new(),
            rename_new: cfg!(target_os = "linux"),
            unnamed: Unnamed::default(),
            dirty: false,
            unsynced: Unsynced::default(),
            booted_ms: None,
            batch: 1,
            temp_dir: None,
            temp_fd: None,
            failed: Vec::new(),
        };
        (w, content)
    }

    /// The metadata of the files the tests write.
    fn file_meta() -> Meta {
        Meta {
            kind: EntryKind::File,
            mtime_ms: 1_000_000,
            executable: false,
        }
    }

    /// A guarded writer over a fresh folder, and an event of this replica putting
    /// `f.txt`, whose read the tests note (or not) for the store.
    struct Noted {
        _dir: tempfile::TempDir,
        root: PathBuf,
        w: Writer,
        content: ContentRef,
        key: Key,
        meta: Meta,
        read: Applied,
    }

    impl Noted {
        fn new(bytes: &[u8]) -> Noted {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().canonicalize().unwrap();
            let (w, content) = writer(&root, bytes);
            let meta = file_meta();
            let read = Applied::file(&content, &meta);
            Noted {
                _dir: dir,
                root,
                w,
                content,
                key: Key::new("f.txt").unwrap(),
                meta,
                read,
            }
        }

        /// Notes the source's read of `f.txt`, as of now.
        fn note(&self) {
            self.w
                .echo
                .note_read(&self.key, self.read, self.w.echo.writes());
        }

        /// The store applies the event (`recorded_here`: this replica's).
        fn put(&mut self, recorded_here: bool) -> Result<Result<(), Refused>, FsError> {
            let Noted {
                w,
                content,
                key,
                meta,
                ..
            } = self;
            w.put_file(key, None, Some(key), content, meta, recorded_here)
        }

        /// What `f.txt` holds, if it is there.
        fn shown(&self) -> Option<Vec<u8>> {
            std::fs::read(self.root.join("f.txt")).ok()
        }
    }

    /// After a failed sync a file can read right from the page cache and still be
    /// missing from the disk: a later batch writes it anew (a new inode, by rename),
    /// where otherwise a file already holding its content is left alone.
    #[test]
    fn after_a_failed_sync_files_already_right_are_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (mut w, content) = writer(&root, b"written by a batch not synced");
        let key = Key::new("f.txt").unwrap();
        let meta = file_meta();
        let inode = || std::fs::metadata(root.join("f.txt")).unwrap().ino();
        let put = |w: &mut Writer| {
            let put = w.put_file(&key, None, Some(&key), &content, &meta, false);
            assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        };
        put(&mut w);
        let first = inode();
        assert_eq!(w.unsynced.lock().unwrap().get(&key), Some(&w.batch));
        put(&mut w);
        assert_eq!(
            inode(),
            first,
            "already right, in the batch that wrote it: left alone"
        );

        // The next batch, the first one's sync having failed (or never run).
        w.batch += 1;
        put(&mut w);
        let second = inode();
        assert_ne!(second, first, "written again");
        assert_eq!(
            std::fs::read(root.join("f.txt")).unwrap(),
            b"written by a batch not synced"
        );
        // Its sync succeeds (as `apply_blocking` then does); the batch after that leaves
        // the file alone.
        let batch = w.batch;
        w.unsynced.lock().unwrap().retain(|_, b| *b != batch);
        w.batch += 1;
        put(&mut w);
        assert_eq!(inode(), second, "synced: left alone");
        assert!(w.unsynced.lock().unwrap().is_empty());

        // A write that fails (here: content missing from the store) leaves an earlier
        // batch's note, so that the batch's sync does not drop it.
        w.unsynced.lock().unwrap().insert(key.clone(), 0);
        w.batch += 1;
        let missing = ContentRef {
            root: Hash::of(b"not stored"),
            size: 10,
            depth: 0,
        };
        assert!(!matches!(
            w.put_file(&key, None, Some(&key), &missing, &meta, false),
            Ok(Ok(()))
        ));
        assert_eq!(w.unsynced.lock().unwrap().get(&key), Some(&0));
        assert_eq!(inode(), second);
    }

    /// A fresh folder and state dir, and the folder's config keeping its state there.
    fn with_state_dir() -> (tempfile::TempDir, tempfile::TempDir, FsConfig) {
        let folder = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let mut config = FsConfig::new(folder.path());
        config.state_dir = Some(state.path().to_owned());
        (folder, state, config)
    }

    /// The view of `key` in `log`: its one head, or nothing.
    fn view_of(log: &EventLog, key: &Key) -> KeyView {
        KeyView {
            key: key.clone(),
            winner: log.heads(key).unwrap().first().cloned(),
            copies: vec![],
            conflicted: false,
            merged_copies: vec![],
        }
    }

    /// Batches shown without a sync keep their keys' notes until the one sync that covers
    /// them all; that sync drops theirs and those of older batches' keys they settled,
    /// and nothing else.
    #[tokio::test]
    async fn batches_shown_keep_their_notes_until_their_sync() {
        use converge_framework::log::{LocalChange, LogConfig};
        let folder = tempfile::tempdir().unwrap();
        let source = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(source.path(), b"shown, then synced").unwrap();
        let log = EventLog::open(LogConfig::temporary()).unwrap();
        let content = crate::content::store_file(source.path(), log.chunks()).unwrap();
        let keys: Vec<Key> = ["a", "b", "gone"].map(|k| Key::new(k).unwrap()).to_vec();
        let changes = keys[..2]
            .iter()
            .map(|k| {
                let op = Op::Put {
                    content: Some(content),
                    meta: file_meta(),
                };
                LocalChange::new(k.clone(), op)
            })
            .collect();
        log.append_local(changes).await.unwrap();
        let view = |key: &Key| view_of(&log, key);
        let ctx = StoreContext::new(log.clone());
        let store = FsStore::new(FsConfig::new(folder.path()));
        let notes = || store.durability.unsynced.lock().unwrap().clone();
        // Notes of an earlier run: one for a key a batch settles ("gone", absent, and not
        // there), one for a key no batch names.
        let other = Key::new("other").unwrap();
        store
            .durability
            .unsynced
            .lock()
            .unwrap()
            .extend([(keys[2].clone(), 0), (other.clone(), 0)]);

        store.show(&ctx, vec![view(&keys[0])]).await.unwrap();
        store
            .show(&ctx, vec![view(&keys[1]), view(&keys[2])])
            .await
            .unwrap();
        let shown = notes();
        assert_eq!(shown.len(), 4, "{shown:?}");
        assert!(shown[&keys[0]] < shown[&keys[1]], "one note per batch");
        for key in &keys[..2] {
            assert_eq!(
                std::fs::read(folder.path().join(key.as_str())).unwrap(),
                b"shown, then synced"
            );
        }
        store.sync(&ctx).await.unwrap();
        assert_eq!(notes(), HashMap::from([(other.clone(), 0)]));
        assert!(store.durability.pending.lock().unwrap().is_none());
        // Nothing shown since: nothing to sync, nothing dropped.
        store.sync(&ctx).await.unwrap();
        assert_eq!(notes(), HashMap::from([(other, 0)]));
    }

    /// A key that failed alone and is written by a later batch leaves the failed keys
    /// (and their state file) only once that batch is synced: the cursor is past its
    /// event, so if the batches shown since the last sync are dropped, nothing else would
    /// write it again.
    #[tokio::test]
    async fn a_failed_key_written_again_stays_failed_until_its_sync() {
        use converge_framework::log::{LocalChange, LogConfig};
        let (folder, state, config) = with_state_dir();
        let saved = state.path().join("mirror-m.failed");
        let source = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(source.path(), b"late content").unwrap();
        // The content's chunks, not yet in the log's content store: the key fails alone.
        let scratch = EventLog::open(LogConfig::temporary()).unwrap();
        let content = crate::content::store_file(source.path(), scratch.chunks()).unwrap();
        let log = EventLog::open(LogConfig::temporary()).unwrap();
        let key = Key::new("late").unwrap();
        let op = Op::Put {
            content: Some(content),
            meta: file_meta(),
        };
        log.append_local(vec![LocalChange::new(key.clone(), op)])
            .await
            .unwrap();
        let view = view_of(&log, &key);
        let ctx = StoreContext::new(log.clone());
        let store = FsStore::mirror("m", config);
        store.show(&ctx, vec![view]).await.unwrap();
        store.sync(&ctx).await.unwrap();
        assert_eq!(store.failed.lock().await.len(), 1, "no content: failed");
        assert!(saved.exists());

        // The content arrives; the next batch (of nothing else) writes the key.
        crate::content::store_file(source.path(), log.chunks()).unwrap();
        store.show(&ctx, vec![]).await.unwrap();
        assert_eq!(
            std::fs::read(folder.path().join("late")).unwrap(),
            b"late content"
        );
        assert!(store.failed.lock().await.is_empty());
        assert!(saved.exists(), "kept in the state file until the sync");

        // The next show fails (the mirror's folder found empty and unmarked, its disk
        // gone, say): the batches since the last sync are dropped, and the key is failed
        // again, to be written again.
        std::fs::remove_file(folder.path().join(crate::MARKER_FILE)).unwrap();
        std::fs::remove_file(folder.path().join("late")).unwrap();
        assert!(store.show(&ctx, vec![]).await.is_err());
        assert_eq!(store.failed.lock().await.len(), 1);
        crate::marker::ensure(folder.path(), || Ok(false)).unwrap();
        store.show(&ctx, vec![]).await.unwrap();
        assert_eq!(
            std::fs::read(folder.path().join("late")).unwrap(),
            b"late content"
        );
        assert!(saved.exists());
        store.sync(&ctx).await.unwrap();
        assert!(store.failed.lock().await.is_empty());
        assert!(!saved.exists(), "synced: gone from the state file");
    }

    /// The keys written and not synced by a batch that failed are kept in the state dir
    /// until a batch settles them: a restart before the batch comes again must not take
    /// the files for right, since the page cache outlives the process.
    #[tokio::test]
    async fn keys_written_and_not_synced_outlive_a_restart() {
        let (_folder, state, config) = with_state_dir();
        let key = Key::new("f.txt").unwrap();
        let saved = state.path().join("folder.unsynced");

        let store = FsStore::new(config.clone());
        store
            .durability
            .unsynced
            .lock()
            .unwrap()
            .insert(key.clone(), 7);
        store
            .durability
            .keep(store.unsynced_file().as_deref(), false);
        assert!(!saved.exists(), "kept only once a batch failed");
        store
            .durability
            .keep(store.unsynced_file().as_deref(), true);
        assert!(saved.exists());

        let log = EventLog::open(converge_framework::log::LogConfig::temporary()).unwrap();
        let ctx = StoreContext::new(log);
        let restarted = FsStore::new(config);
        restarted.start(&ctx).await.unwrap();
        let unsynced = restarted.durability.unsynced.lock().unwrap().clone();
        assert_eq!(
            unsynced,
            HashMap::from([(key, 0)]),
            "an earlier run's batch"
        );

        // Settled: the file goes.
        restarted.durability.unsynced.lock().unwrap().clear();
        restarted
            .durability
            .keep(restarted.unsynced_file().as_deref(), false);
        assert!(!saved.exists());
    }

    /// A file found in a directory the batch made (created there meanwhile, unrecorded)
    /// goes the usual way: the folder's own store leaves it alone, and the echo record
    /// is what it was before, since the store wrote nothing. With nothing there, the
    /// file is written, mode and mtime included.
    #[test]
    fn a_file_found_in_a_directory_made_in_the_batch_is_not_replaced() {
        found_in_made_dir(false);
    }

    /// The same with a temp dir: files with no name there, linked into place (on Linux).
    #[test]
    fn a_file_with_no_name_is_linked_only_where_nothing_is() {
        found_in_made_dir(true);
    }

    fn found_in_made_dir(with_temp_dir: bool) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let temp = tempfile::tempdir_in(dir.path()).unwrap();
        let (mut w, content) = writer(&root, b"from a peer");
        if with_temp_dir {
            w.temp_dir = Some(temp.path().to_owned());
            w.temp_fd = open_dir(temp.path());
        }
        let key = Key::new("d/f.txt").unwrap();
        let meta = Meta {
            executable: true,
            ..file_meta()
        };
        w.make_parents(&key).unwrap();
        assert!(w.made.contains(&root.join("d")));
        w.echo.record(&key, Applied::Absent);
        std::fs::write(root.join("d/f.txt"), b"the user's").unwrap();

        let put = w.put_file(&key, None, Some(&key), &content, &meta, false);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert_eq!(std::fs::read(root.join("d/f.txt")).unwrap(), b"the user's");
        assert_eq!(w.echo.get(&key), Some(Applied::Absent));
        let names: Vec<_> = std::fs::read_dir(root.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.txt"], "no temp file left");

        // With nothing there, the same write goes through.
        std::fs::remove_file(root.join("d/f.txt")).unwrap();
        let put = w.put_file(&key, None, Some(&key), &content, &meta, false);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert_eq!(std::fs::read(root.join("d/f.txt")).unwrap(), b"from a peer");
        assert!(matches!(w.echo.get(&key), Some(Applied::File { .. })));
        let m = std::fs::metadata(root.join("d/f.txt")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o755);
        assert_eq!(mtime_ms(&m), meta.mtime_ms);
        let left: Vec<_> = std::fs::read_dir(temp.path()).unwrap().collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
        let linked = matches!(w.unnamed, Unnamed::ByDescriptor | Unnamed::ByProcName);
        // Where the test's file system has files with no name (not NFS, say).
        let unnamed = with_temp_dir
            && open_dir(temp.path())
                .is_some_and(|dir| open_unnamed(dir.as_raw_fd(), 0o600).is_ok());
        assert_eq!(linked, unnamed, "{:?}", w.unnamed);
    }

    /// An event the folder's source has just recorded from the file is not written back:
    /// the file showed it when read, and what happened to it since (here: removed) is the
    /// source's to record. An event of this replica without such a note (from another
    /// source of the replica, say) is written as any other.
    #[test]
    fn an_event_just_recorded_from_the_file_is_not_written_back() {
        let mut t = Noted::new(b"read by the source");
        t.note();

        let put = t.put(true);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert!(t.shown().is_none(), "written back");
        assert_eq!(t.w.echo.get(&t.key), Some(t.read));
        assert!(!t.w.echo.take_read(&t.key, t.read), "the note is used up");

        let put = t.put(true);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert_eq!(t.shown().unwrap(), b"read by the source");
    }

    /// A note taken before the store changed the folder is spoilt: the source read its
    /// file, then the store wrote another version over it (a remote event, an echo the
    /// source never records), then the source's event won. The store must write it.
    #[test]
    fn a_note_taken_before_a_store_write_does_not_skip_the_write() {
        let mut t = Noted::new(b"saved here");
        let theirs = {
            let peer = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(peer.path(), b"from a peer, written meanwhile").unwrap();
            crate::content::store_file(peer.path(), t.w.ctx.chunks()).unwrap()
        };
        t.note();

        let Noted { w, key, meta, .. } = &mut t;
        let put = w.put_file(key, None, Some(key), &theirs, meta, false);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        let put = t.put(true);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert_eq!(t.shown().unwrap(), b"saved here");
    }

    /// The store's changes at other paths leave a note alone: a store writing a peer's
    /// files while the source records local ones still skips the local ones.
    #[test]
    fn a_store_write_elsewhere_does_not_spoil_a_note() {
        let mut t = Noted::new(b"read by the source");
        let other = Key::new("g.txt").unwrap();
        t.note();

        let Noted {
            w, content, meta, ..
        } = &mut t;
        let put = w.put_file(&other, None, Some(&other), content, meta, false);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert!(t.root.join("g.txt").exists());
        let put = t.put(true);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert!(t.shown().is_none(), "looked at and written back");
    }

    /// A look of the source's at the key after its note drops the note: what it decided
    /// then (here, that a removal is the store's) may rest on the echo record, so the
    /// store must look for itself. (Here the file is gone, and is written back.)
    #[test]
    fn a_note_dropped_by_a_later_look_of_the_source_does_not_skip_the_write() {
        let mut t = Noted::new(b"read by the source");
        t.note();
        t.w.echo.look(&t.key, t.w.echo.writes());

        let put = t.put(true);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert_eq!(t.shown().unwrap(), b"read by the source");
    }

    /// A removal the source sees right after recording the file: one the store does not
    /// account for keeps the note (the source records the removal itself, and the store
    /// does not write the file back meanwhile); one it does account for (it removed the
    /// file after the source looked) drops the note, and the store looks for itself.
    #[test]
    fn a_removal_keeps_the_note_unless_the_store_accounts_for_it() {
        let mut t = Noted::new(b"read by the source");

        t.note();
        assert!(!t.w.echo.absence_accounted(&t.key));
        let put = t.put(true);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert!(t.shown().is_none(), "written back");
        assert!(
            !t.w.echo.absence_accounted(&t.key),
            "the source records the removal"
        );

        t.note();
        t.w.echo.record(&t.key, Applied::Absent);
        t.w.changed(&t.key);
        assert!(t.w.echo.absence_accounted(&t.key));
        let put = t.put(true);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert_eq!(t.shown().unwrap(), b"read by the source");
    }

    /// The store removed `f.txt` (a peer's delete), then the user made it again and the
    /// source recorded it, then the user removed it before the store came to that event:
    /// the store's record of its removal is stale, so the removal is the user's to record
    /// and the store does not write the file back.
    #[test]
    fn a_removal_after_a_recording_is_not_taken_for_an_older_removal_of_the_store() {
        let mut t = Noted::new(b"made again by the user");
        t.w.echo.record(&t.key, Applied::Absent);
        t.w.changed(&t.key);

        t.note();
        assert!(
            !t.w.echo.absence_accounted(&t.key),
            "taken for the store's removal"
        );
        let put = t.put(true);
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        assert!(t.shown().is_none(), "written back");
    }

    /// A look of the source's that came before the store's removal, noted while that
    /// removal is under way (recorded, not yet numbered), does not drop its record: the
    /// removal is the store's, and the source does not record it as the user's.
    #[test]
    fn a_note_taken_before_a_removal_under_way_keeps_its_record() {
        let t = Noted::new(b"read by the source");
        let seen = t.w.echo.writes();
        t.w.echo.record(&t.key, Applied::Absent);
        t.w.echo.note_read(&t.key, t.read, seen);
        t.w.echo.wrote(&t.key);
        assert!(
            t.w.echo.absence_accounted(&t.key),
            "the store's removal taken for the user's"
        );
    }

    /// A write that did not happen puts back the record before it, unless that is a
    /// removal the source has since seen the file back after.
    #[test]
    fn a_stale_removal_is_not_put_back() {
        let t = Noted::new(b"made again by the user");
        t.w.echo.record(&t.key, Applied::Absent);
        t.w.echo.wrote(&t.key);
        let before = t.w.echo.replace(&t.key, t.read);
        t.note();
        t.w.echo.put_back(&t.key, before, false);
        assert_eq!(t.w.echo.get(&t.key), None);

        let before = t.w.echo.replace(&t.key, t.read);
        t.w.echo.put_back(&t.key, before, false);
        assert_eq!(t.w.echo.get(&t.key), None, "nothing was recorded before");
        t.w.echo.record(&t.key, Applied::Absent);
        let before = t.w.echo.replace(&t.key, t.read);
        t.w.echo.put_back(&t.key, before, false);
        assert_eq!(
            t.w.echo.get(&t.key),
            Some(Applied::Absent),
            "a removal under way is put back"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_rename_to_a_new_name_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("temp"), dir.path().join("file"));
        std::fs::write(&from, b"new").unwrap();
        std::fs::write(&to, b"the user's").unwrap();
        let (at_from, at_to) = (
            (libc::AT_FDCWD, from.as_path()),
            (libc::AT_FDCWD, to.as_path()),
        );
        let refused = rename_new(at_from, at_to).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).unwrap(), b"the user's");
        std::fs::remove_file(&to).unwrap();
        rename_new(at_from, at_to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"new");
        assert!(!from.exists());
    }

    #[test]
    fn the_umask_is_read_as_the_kernel_has_it() {
        // SAFETY: umask only swaps the mask; it is put back at once.
        let mask = unsafe { libc::umask(0o022) };
        unsafe { libc::umask(mask) };
        assert_eq!(umask(), Some(mask));
    }

    #[test]
    fn nested_keys_keep_a_batch_in_order() {
        let files = |keys: &[&str]| -> Vec<FileView> {
            keys.iter()
                .map(|k| FileView {
                    key: Key::new(*k).unwrap(),
                    content: ContentRef {
                        root: Hash::of(b""),
                        size: 0,
                        depth: 0,
                    },
                    meta: Meta::file(0),
                    recorded_here: false,
                })
                .collect()
        };
        assert!(!any_nested(&files(&["a", "ab", "b/c", "b/d/e", "a b"])));
        assert!(any_nested(&files(&["b/d/e", "a", "b/d"])));
        assert!(any_nested(&files(&["x/y", "x"])));
    }

    #[test]
    fn conflict_names() {
        let head = Head {
            id: EventId {
                origin: ReplicaId([0; 16]),
                seq: 1,
            },
            hlc: Hlc {
                wall_ms: 1_700_000_000_123,
                logical: 0,
            },
            op: Op::Delete,
        };
        let name = |k: &str| {
            conflict_name(&Key::new(k).unwrap(), &head)
                .unwrap()
                .to_string()
        };
        assert_eq!(
            name("a/notes.txt"),
            "a/notes.sync-conflict-20231114-221320-aaaaaaa.txt"
        );
        assert_eq!(
            name("README"),
            "README.sync-conflict-20231114-221320-aaaaaaa"
        );
        assert_eq!(
            name(".bashrc"),
            ".bashrc.sync-conflict-20231114-221320-aaaaaaa"
        );
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400_000), "20000229-000000");
    }
}
