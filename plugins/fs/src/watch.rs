//! The folder source: a start-up scan, then watching (see [`crate::watcher`]), debounced.
//!
//! The watcher starts before the scan, so that nothing changed during the scan is missed.
//! Events wait for the debounce ([`FsConfig::debounce`], 50 ms by default) before their
//! batch is planned, so that a file being written is looked at once it is done; unless
//! all the batch names so far was renamed into the folder and the batch before ended a
//! debounce ago or more: a tree or file moved in is whole on arrival
//! ([`Batch::complete`]). Either way it is only a matter of when: the plan looks at what
//! the paths hold, and a later change is a later event.
//!
//! A batch is planned from the paths its events name, and from where entries arrived
//! ([`plan`]): a directory renamed in, or made where one was removed or moved away in the
//! same batch (or while removals below it are held), is scanned whole even where the log
//! shows one, since its contents made no events of their own and the old one's keys are
//! gone (`mv d d2; mkdir d`), and even where the store made a directory lately. Removals,
//! the watcher's and those such a scan finds, are held until none has come for a second
//! (a minute at most) and checked again then, the folder marker included ([`REMOVALS_QUIET`]):
//! the directory may be the store's own, made for a peer's file while the user's `rm -rf`
//! of the whole folder is under way, and recording them at once would delete the
//! folder's contents on every replica. The same goes for the removals a rescan finds
//! (below): one asked for by the watcher's overflowed queue, during an `rm -rf` of the
//! whole folder, walks a half-deleted tree whose marker may not be removed yet. Only the
//! start-up scan records the removals it finds at once.
//!
//! The store's new files are taken for echoes on the watcher's own thread
//! ([`is_own_file`]), before they join a batch. The handler holds the source's state
//! weakly: the watcher's thread may outlive the source by a moment, and must not keep the
//! log's database locked meanwhile. The thread queues what it reads for the source in a
//! channel of at most [`EVENTS_QUEUED`] results ([`Queue`]); past that it drops what comes
//! without waiting (the source may be waiting for the thread to stop) and records it, and
//! the source rescans the folder at its next batch, as after the kernel's own queue
//! overflowed (a dropped error also makes it stop trusting the watcher).
//!
//! A folder that cannot be watched ([`FsConfig::rescan_every`], or the watcher failed or
//! reported an error: the kernel's limit of watches) is rescanned every interval instead;
//! the source keeps a sender of the event channel itself, so a watcher gone does not end
//! it. A rescan that finds the folder itself gone (removed, unmounted, moved away; the
//! watcher reports that as an error) fails the source instead: it is shown down with why,
//! and the engine starts it again, with a fresh watcher, once the folder is back.
//!
//! When `.convergeignore` changes (an event names it, or a rescan finds its bytes
//! changed, which covers an unwatched folder and lost events), the source stops the old
//! watcher, waits for its watches to go, and starts a fresh one with the new rules before
//! the rescan that follows, reading the rules again if the file changed meanwhile
//! ([`FsSource::rules_and_watcher`]): a directory no longer ignored is watched from then
//! on, and a watcher that failed at the limit gets its chance again. What the new rules
//! include and those the folder was last in sync with excluded is then admitted, for the
//! store to write, before the rescan could read its absence as removals (see
//! [`crate::synced`]; the same at start, before the first scan).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use converge_api::{ConflictPolicy, EntryKind, Key, Op};
use converge_framework::log::LocalChange;
use converge_framework::plugin::{Source, SourceContext};
use converge_framework::PluginError;
use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::EventKind;
use tokio::sync::mpsc;

use crate::content::changed_at_ms;
use crate::echo::{known_content, Applied, Echo};
use crate::error::FsError;
use crate::marker;
use crate::rules::{below_symlink, ignore_file_hash, Rules};
use crate::scan::{
    emit, examine_file, gone, is_echo, merge_for_deleted_copy, removed_at_ms, scan, Absence, Env,
    Looked, Projection, Resolver,
};
use crate::synced;
use crate::watcher::{self, FolderWatcher, Skip, WatchResult};
use crate::{FsConfig, CONFLICT_MARKER, EMIT_BATCH, IGNORE_FILE, TEMP_PREFIX};

/// Removals the watcher sees are recorded once none has come for this long (or
/// [`REMOVALS_HELD_AT_MOST`] after the first), each checked again then, with the folder
/// marker. A folder deleted whole (`rm -rf`) loses its marker while its removals are held,
/// and none of them is recorded: deleting the synced folder itself does not delete it on
/// every replica. (Creations and edits are recorded at once.)
const REMOVALS_QUIET: Duration = Duration::from_secs(1);
/// Longest a removal is held while others keep coming: an `rm -rf` of the whole folder
/// that takes longer, and reaches the marker after this, has what it removed before
/// recorded. A minute, as Syncthing holds removals its watcher sees; at ten seconds, an
/// `rm -rf` slower than that was recorded in part, and deleted in part on every replica
/// (`a_slow_rm_rf_of_the_watched_folder_records_no_removal` in `tests/watch.rs`).
const REMOVALS_HELD_AT_MOST: Duration = Duration::from_secs(60);

/// Events taken into one debounced batch at most.
const BATCH_EVENTS: usize = 100_000;

/// Events the watcher's thread may queue for the source at most (a few hundred bytes
/// each, with their paths). Past it, events are dropped and the source rescans the folder
/// at its next batch, as when the kernel's own queue overflows: a receiver that fell
/// behind held 29 MiB of them (a heap profile at 400,000 files), and a flood of changes
/// (a large checkout) would hold as many as it made.
const EVENTS_QUEUED: usize = 1 << 16;

/// The source of one folder: scans at start, then watches until shutdown.
#[derive(Debug)]
pub struct FsSource {
    config: FsConfig,
    echo: Arc<Echo>,
    resolver: Resolver,
    /// Set once the engine shuts down (see `Env::stopping`), by the one task that waits
    /// for it, started with the first `Env`.
    stopping: Arc<AtomicBool>,
    stop_watched: AtomicBool,
}

impl FsSource {
    /// A source on its own (no store shares its echo record; use [`crate::folder`] to run
    /// one beside a store of the same folder).
    pub fn new(config: FsConfig) -> Self {
        FsSource::with_echo(config, Arc::new(Echo::default()))
    }

    pub(crate) fn with_echo(config: FsConfig, echo: Arc<Echo>) -> Self {
        FsSource {
            config,
            echo,
            resolver: Resolver::default(),
            stopping: Arc::new(AtomicBool::new(false)),
            stop_watched: AtomicBool::new(false),
        }
    }

    /// Uses `policy` to tell which head a conflicted key shows (default: last-write-wins),
    /// so that a file equal to the winner is not read as a change.
    pub fn with_policy(mut self, policy: Arc<dyn ConflictPolicy>) -> Self {
        self.resolver = Resolver {
            policy: Some(policy),
        };
        self
    }

    /// The folder's configuration.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The folder's rules (read on a blocking thread) and what the source reads with them.
    async fn env(&self, ctx: &SourceContext, root: &Path) -> Result<Arc<Env>, FsError> {
        let (root, exclude) = (root.to_owned(), self.config.exclude.clone());
        let rules = tokio::task::spawn_blocking(move || Rules::load(&root, &exclude)).await?;
        let env = Arc::new(Env {
            rules,
            echo: self.echo.clone(),
            resolver: self.resolver.clone(),
            log: ctx.log().clone(),
            chunks: ctx.chunks().clone(),
            stopping: self.stopping.clone(),
            racy_margin: self.config.racy_margin,
        });
        // An `Env` is made again with each change of the ignore file and each start
        // after a failure: one task for them all.
        if !self.stop_watched.swap(true, Ordering::Relaxed) {
            let (stopped, stopping) = (ctx.on_shutdown(), self.stopping.clone());
            tokio::spawn(async move {
                stopped.await;
                stopping.store(true, Ordering::Relaxed);
            });
        }
        Ok(env)
    }

    /// Admits the keys the rules of `env` let in since the folder was last in sync with its
    /// rules (see [`crate::synced`]): called before a scan with them reads the folder.
    async fn admit(&self, env: &Arc<Env>) -> Result<(), FsError> {
        let (env, config) = (env.clone(), self.config.clone());
        tokio::task::spawn_blocking(move || synced::admit(&env, &config)).await?
    }

    /// Loads the ignore rules and starts watching with them (after stopping `old`), until
    /// the ignore file is the same after the watcher started as when the rules were read:
    /// a change in between would make no event (no watcher yet) and leave stale rules.
    /// Returns the rules (which know the ignore file they were read from) and the
    /// watcher.
    async fn rules_and_watcher(
        &self,
        ctx: &SourceContext,
        root: &Path,
        queue: &Queue,
        rx: &mut mpsc::Receiver<WatchResult>,
        mut old: Option<FolderWatcher>,
    ) -> Result<(Arc<Env>, Option<FolderWatcher>), FsError> {
        let mut tries = 0;
        loop {
            tries += 1;
            // The old watcher's watches are gone first: both together could meet the
            // kernel's limit. What it sent and is not taken yet (an error at the limit,
            // say, which would count against the new watcher) is dropped: the caller
            // rescans.
            if let Some(old) = old.take() {
                tokio::task::spawn_blocking(move || old.stop()).await?;
                while rx.try_recv().is_ok() {}
            }
            let env = self.env(ctx, root).await?;
            let watcher = self.start_watcher(root, &env, queue).await?;
            // A file rewritten without a pause for longer: the rules read last stand.
            if ignore_stamp(root).await == env.rules.read_from() || tries == RULES_TRIES {
                return Ok((env, watcher));
            }
            old = watcher;
        }
    }

    /// Starts watching `root`, leaving out the directories `env`'s ignore rules exclude,
    /// and queueing its events on `queue`. `None` when the folder is configured not to be
    /// watched or watching fails (said): the source then rescans every `rescan_interval`.
    async fn start_watcher(
        &self,
        root: &Path,
        env: &Arc<Env>,
        queue: &Queue,
    ) -> Result<Option<FolderWatcher>, FsError> {
        if !self.config.watch {
            return Ok(None);
        }
        let rescan_interval = self.config.rescan_interval;
        let (watched, rules, queue) = (root.to_owned(), env.rules.clone(), queue.clone());
        let skip: Skip = Box::new(move |dir| rules.ignores(dir, true, true));
        // Weak: the watcher's thread may outlive the source by a moment, and must not
        // keep the log (and its database's lock) open meanwhile.
        let env = Arc::downgrade(env);
        let started = tokio::task::spawn_blocking(move || {
            watcher::watch(&watched, skip, move |res| {
                let own = |event: &notify::Event| {
                    env.upgrade().is_some_and(|env| is_own_file(&env, event))
                };
                if !res.as_ref().is_ok_and(own) {
                    queue.offer(res);
                }
            })
        })
        .await?;
        match started {
            Ok(w) => Ok(Some(w)),
            Err(source) => {
                let e = FsError::Watch {
                    path: root.to_owned(),
                    source,
                };
                tracing::warn!(
                    "{e}; rescanning every {}s instead",
                    rescan_interval.as_secs_f64()
                );
                Ok(None)
            }
        }
    }

    async fn run_inner(&self, mut ctx: SourceContext) -> Result<(), FsError> {
        let configured = self.config.root.clone();
        let (log, resolver) = (ctx.log().clone(), self.resolver.clone());
        let (root, identity) = tokio::task::spawn_blocking(move || {
            let root = configured
                .canonicalize()
                .map_err(FsError::io("opening the folder", &configured))?;
            let meta =
                std::fs::metadata(&root).map_err(FsError::io("opening the folder", &root))?;
            if !meta.is_dir() {
                return Err(FsError::Io {
                    op: "opening the folder",
                    path: root,
                    source: std::io::Error::other("not a directory"),
                });
            }
            marker::ensure(&root, || marker::shows_something(&log, &resolver))?;
            Ok((root, (meta.dev(), meta.ino())))
        })
        .await??;
        // Watch before scanning, so nothing changed during the scan is missed. The queue
        // kept here keeps the channel open when there is no watcher (the rescans go on).
        let (tx, mut rx) = mpsc::channel(EVENTS_QUEUED);
        let queue = Queue::new(tx);
        let rescan_interval = self.config.rescan_interval;
        if !self.config.watch {
            tracing::info!(
                "{}: not watched; rescanning every {}s",
                root.display(),
                rescan_interval.as_secs_f64()
            );
        }
        let (mut env, mut watcher) = self
            .rules_and_watcher(&ctx, &root, &queue, &mut rx, None)
            .await?;
        // Rules changed while the daemon was stopped: what they let in is the store's to
        // write, not a removal for the scan to find.
        self.admit(&env).await?;

        scan(&ctx, &env, None, true, None).await?;
        tracing::debug!("initial scan of {} done", root.display());
        // Only now may remote changes be applied to the folder: before the scan had seen
        // it, a file edited while the daemon was stopped could be overwritten unrecorded.
        ctx.initial_scan_done();

        // Keys found removed, held (see `REMOVALS_QUIET`).
        let mut held = Held::default();
        // Whether the watcher still sees every change: not once it reported an error
        // (a directory it could not watch, the kernel's limit of watches).
        let mut watching = watcher.is_some();
        // When the next rescan is due, if not watching: a deadline kept across batches,
        // which the events a failed watcher still delivers do not put off.
        let mut next_rescan = tokio::time::Instant::now() + rescan_interval;
        // When the last batch was taken: see `Batch::complete`.
        let mut last_batch = tokio::time::Instant::now();
        loop {
            let mut batch = Batch::default();
            let release_at = held.release_at();
            let far = tokio::time::Instant::now() + rescan_interval;
            let release = tokio::select! {
                _ = ctx.shutdown() => return Ok(()),
                _ = tokio::time::sleep_until(next_rescan), if !watching => {
                    batch.rescan = true;
                    false
                }
                _ = tokio::time::sleep_until(release_at.unwrap_or(far)), if release_at.is_some() => true,
                // A file changed where the content store had recorded its chunks, with a
                // stat that hides it (see `ChunkStore::files_changed`): looked at again.
                _ = env.chunks.files_changed() => {
                    tracing::info!(
                        "{}: a file's content changed unseen; rescanning",
                        root.display()
                    );
                    batch.rescan = true;
                    false
                }
                first = rx.recv() => match first {
                    None => return Ok(()),
                    Some(event) => {
                        batch.collect(event);
                        false
                    }
                },
            };
            if release {
                let (env2, taken) = (env.clone(), held.take());
                let deletes =
                    tokio::task::spawn_blocking(move || removals(&env2, &taken)).await??;
                for chunk in deletes.chunks(EMIT_BATCH) {
                    emit(&ctx, &env.echo, chunk.to_vec()).await?;
                }
                continue;
            }
            // The rest of the batch is taken when the debounce ends, not as it comes: a
            // burst (thousands of files written) would otherwise wake this task for each
            // event. Unless the batch's first event brought in something whole, out of a
            // quiet folder (see `Batch::complete`): nothing to wait for then.
            if !(batch.complete() && last_batch.elapsed() >= self.config.debounce) {
                tokio::time::sleep(self.config.debounce).await;
            }
            // At most so many (a flood past it waits for the next batch).
            for _ in 0..BATCH_EVENTS {
                let Ok(event) = rx.try_recv() else {
                    break;
                };
                batch.collect(event);
            }
            // Taken after the events: one dropped since is told at the next batch, which
            // the full queue it was dropped from makes sure of.
            for said in queue.take_dropped() {
                batch.collect(said);
            }
            last_batch = tokio::time::Instant::now();
            if batch.failed && watching {
                watching = false;
                next_rescan = tokio::time::Instant::now() + rescan_interval;
                tracing::warn!(
                    "{}: the watcher misses changes from now on; rescanning every {}s",
                    root.display(),
                    rescan_interval.as_secs_f64()
                );
            }
            let Batch {
                paths,
                renamed_in,
                created,
                removed_dirs,
                dirs_moved,
                left,
                mut rescan,
                ..
            } = batch;
            if ctx.is_shutting_down() {
                return Ok(());
            }
            // A rescan looks at the ignore file itself: unwatched, or after events were
            // lost, no event may have named it. An event naming it (a touch, say) counts
            // only if it changed.
            let ignore_changed = (rescan || paths.contains(&root.join(IGNORE_FILE)))
                && ignore_stamp(&root).await != env.rules.read_from();
            if ignore_changed {
                tracing::info!(
                    "{} changed: reloading ignore rules and rescanning",
                    IGNORE_FILE
                );
                rescan = true;
                // Directories the rules no longer exclude are watched from now on: a
                // fresh watcher, started before the rescan so that nothing between the
                // two is missed. A watcher that failed (at the kernel's limit of
                // watches, say) gets its chance again with the new rules.
                (env, watcher) = self
                    .rules_and_watcher(&ctx, &root, &queue, &mut rx, watcher.take())
                    .await?;
                watching = watcher.is_some();
                self.admit(&env).await?;
            }
            if rescan {
                // The folder itself gone (removed, unmounted, moved away): nothing to scan
                // and nothing watched. The source fails, shown down with why, and is
                // started again (with a fresh watcher) once the folder is back.
                // Another directory at its path counts only where the folder was watched
                // (a local file system): a network file system may number its inodes
                // anew.
                match tokio::fs::metadata(&root).await {
                    Ok(m)
                        if m.is_dir() && (!self.config.watch || (m.dev(), m.ino()) == identity) => {
                    }
                    Ok(_) => {
                        return Err(FsError::Io {
                            op: "opening the folder",
                            path: root.clone(),
                            source: std::io::Error::other(
                                "the folder is gone (another entry is at its path now)",
                            ),
                        })
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(FsError::Io {
                            op: "opening the folder",
                            path: root.clone(),
                            source: std::io::Error::new(e.kind(), "the folder is gone"),
                        })
                    }
                    Err(e) => return Err(FsError::io("reading the folder", &root)(e)),
                }
                // Its removals are held as the watcher's are: a rescan may walk a folder
                // half way through an `rm -rf` of the whole of it, the marker not yet
                // removed (a watcher's overflowed queue asks for one then).
                let mut removed = Vec::new();
                scan(&ctx, &env, None, false, Some(&mut removed)).await?;
                held.hold(found(removed));
                next_rescan = tokio::time::Instant::now() + rescan_interval;
                continue;
            }
            let plan = {
                let env = env.clone();
                // A known directory made again counts as new when it was removed in this
                // batch or removals below it are held: it has contents of its own.
                let remade: HashSet<PathBuf> = created
                    .iter()
                    .filter(|path| {
                        removed_dirs.contains(*path)
                            || left.contains(*path)
                            || env.rules.key_of(path).is_ok_and(|key| {
                                held.keys
                                    .range(key.clone()..)
                                    .take_while(|(k, _)| k.as_str().starts_with(key.as_str()))
                                    .any(|(k, _)| k == &key || k.is_under(&key))
                            })
                    })
                    .cloned()
                    .collect();
                let arrived: HashSet<PathBuf> = renamed_in.into_iter().chain(remade).collect();
                let dirs_left: HashSet<PathBuf> =
                    removed_dirs.into_iter().chain(dirs_moved).collect();
                tokio::task::spawn_blocking(move || plan(&env, paths, &arrived, &dirs_left))
                    .await??
            };
            for chunk in plan.changes.chunks(EMIT_BATCH) {
                emit(&ctx, &env.echo, chunk.to_vec()).await?;
            }
            // The removals the watcher saw, and those a subtree's scan finds, are held: a
            // directory made where one was removed may be the store's own for a peer's
            // file while the user's `rm -rf` of the whole folder is under way.
            held.hold(plan.removed);
            let mut removed = Vec::new();
            for key in plan.subtrees {
                scan(&ctx, &env, Some(key), false, Some(&mut removed)).await?;
            }
            held.hold(found(removed));
        }
    }
}

/// Removals found and not recorded yet (see [`REMOVALS_QUIET`]): the watcher's, and those
/// a scan finds while the source runs (a subtree's, or a rescan's).
#[derive(Default)]
struct Held {
    keys: BTreeMap<Key, Removal>,
    /// When the first of them was found and when the last new one was (`None` while none
    /// is held).
    found: Option<(tokio::time::Instant, tokio::time::Instant)>,
}

impl Held {
    /// Holds `removed`. A key held already keeps its time (seen first is closest to when
    /// it happened). Only new keys put the release off: a directory the store makes again
    /// below a held one is scanned each time, and finds the same ones, and so does every
    /// rescan of an unwatched folder.
    fn hold(&mut self, removed: impl IntoIterator<Item = (Key, Removal)>) {
        let mut added = false;
        for (key, removal) in removed {
            match self.keys.entry(key) {
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(removal);
                    added = true;
                }
                std::collections::btree_map::Entry::Occupied(mut entry) => {
                    entry.get_mut().dir_left |= removal.dir_left;
                }
            }
        }
        if added {
            let now = tokio::time::Instant::now();
            let first = self.found.map_or(now, |(first, _)| first);
            self.found = Some((first, now));
        }
    }

    /// When the held removals are to be checked again and recorded: once none has come
    /// for [`REMOVALS_QUIET`], or [`REMOVALS_HELD_AT_MOST`] after the first; `None` while
    /// none is held.
    fn release_at(&self) -> Option<tokio::time::Instant> {
        self.found
            .map(|(first, last)| (last + REMOVALS_QUIET).min(first + REMOVALS_HELD_AT_MOST))
    }

    /// Takes every removal held, for [`removals`] to check and record.
    fn take(&mut self) -> BTreeMap<Key, Removal> {
        self.found = None;
        std::mem::take(&mut self.keys)
    }
}

/// One removal held: when it was made (see [`removed_at_ms`]), and whether a directory was
/// seen to leave the key's path (removed, or moved away).
#[derive(Clone, Copy, Debug)]
struct Removal {
    at: Option<u64>,
    dir_left: bool,
}

impl Removal {
    /// How the removal of its key, or of a key below it, is judged (see [`Absence`]): as
    /// seen to go where a directory was seen to leave the path, else as a scan judges. A
    /// directory that left took the keys below it along, even where a symlink made in its
    /// place shows their names again (`rm -rf d; ln -s elsewhere d`); a symlink replaced
    /// by another one, where the log shows a peer's directory the store never wrote below
    /// the link, takes nothing. Nor does a file key whose path is a symlink now: the
    /// watcher cannot tell a symlink's removal from a file's, and `notes.txt` a link here
    /// (a dotfile kept elsewhere) while a peer has a file there, refused by the store, was
    /// deleted on every replica by any change to the link. A file replaced by a symlink
    /// stays on the peers, as a symlink that was always there would leave it.
    fn absence(&self) -> Absence {
        match self.dir_left {
            true => Absence::Seen,
            false => Absence::Found,
        }
    }
}

/// The removals a scan found, to hold: no directory was seen to go.
fn found(removed: Vec<(Key, Option<u64>)>) -> impl Iterator<Item = (Key, Removal)> {
    removed.into_iter().map(|(key, at)| {
        let removal = Removal {
            at,
            dir_left: false,
        };
        (key, removal)
    })
}

/// The watcher's way to the source: a channel of at most [`EVENTS_QUEUED`] results, and
/// what was dropped for want of room since the source last asked.
#[derive(Clone)]
struct Queue {
    tx: mpsc::Sender<WatchResult>,
    /// An event was dropped.
    lost: Arc<AtomicBool>,
    /// An error was dropped: the watcher misses changes from now on.
    failed: Arc<AtomicBool>,
}

impl Queue {
    fn new(tx: mpsc::Sender<WatchResult>) -> Self {
        Queue {
            tx,
            lost: Arc::new(AtomicBool::new(false)),
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues `res` from the watcher's thread without waiting for room (the source may
    /// be waiting for that thread to stop): a result that finds the queue full is
    /// dropped, and recorded for [`Queue::take_dropped`].
    fn offer(&self, res: WatchResult) {
        use mpsc::error::TrySendError::Full;
        match self.tx.try_send(res) {
            Err(Full(Ok(_))) => self.lost.store(true, Ordering::Release),
            Err(Full(Err(e))) => {
                tracing::warn!("watcher: {e}");
                self.failed.store(true, Ordering::Release);
            }
            // Sent, or the source is gone.
            _ => {}
        }
    }

    /// What was dropped since the last call, as the results the watcher itself gives
    /// for the like: events lost to an overflow (a rescan), an error.
    fn take_dropped(&self) -> impl Iterator<Item = WatchResult> {
        let lost = self.lost.swap(false, Ordering::AcqRel).then(|| {
            Ok(notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan))
        });
        let failed = self.failed.swap(false, Ordering::AcqRel).then(|| {
            Err(notify::Error::generic(
                "an error of the watcher's was dropped from its full queue",
            ))
        });
        lost.into_iter().chain(failed)
    }
}

/// What the events of one debounced batch amount to.
#[derive(Default)]
struct Batch {
    /// Every path an event named (but the store's temp files).
    paths: BTreeSet<PathBuf>,
    /// Paths something was renamed to.
    renamed_in: HashSet<PathBuf>,
    /// Paths a directory was created at.
    created: HashSet<PathBuf>,
    /// Paths a directory was removed from.
    removed_dirs: HashSet<PathBuf>,
    /// Paths a directory moved away from (told on Linux only; see
    /// [`watcher::moved_dir_away`]).
    dirs_moved: HashSet<PathBuf>,
    /// Paths something moved away from.
    left: HashSet<PathBuf>,
    /// The watcher lost events (its queue overflowed, or it reported an error).
    rescan: bool,
    /// The watcher reported an error: it may miss changes from now on.
    failed: bool,
}

impl Batch {
    /// Whether everything the batch names so far was renamed into the folder: a file or a
    /// tree moved in (a tree copied elsewhere and moved in, a file the folder store or a
    /// tool wrote outside and renamed in) is whole when it arrives, so its batch need not
    /// wait for more writes. Waiting stays for the rest, and for a batch right after
    /// another (a burst of moves), so that bursts still come in few batches. It is only
    /// ever a matter of when: what the batch's paths hold is looked at when it is
    /// planned, and a later change is a later event. (W1 of `bench/daemon/run.py` is a
    /// tree moved in: the 50 ms of debounce were a twentieth of it.)
    fn complete(&self) -> bool {
        !self.rescan
            && !self.renamed_in.is_empty()
            && self.paths.iter().all(|p| self.renamed_in.contains(p))
    }

    /// Takes one event into the batch.
    fn collect(&mut self, event: WatchResult) {
        let event = match event {
            Err(e) => {
                tracing::warn!("watcher: {e}; rescanning");
                self.rescan = true;
                self.failed = true;
                return;
            }
            Ok(event) => event,
        };
        let dir_moved = watcher::moved_dir_away(&event);
        if event.need_rescan() {
            if !self.rescan {
                tracing::info!(
                    "watcher: events were lost (the kernel's queue or the source's overflowed); rescanning"
                );
            }
            self.rescan = true;
        }
        // The store's temp files come and go with every file it writes: never changes of
        // the folder, so not worth a stat.
        let paths = event.paths.into_iter().filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(TEMP_PREFIX))
        });
        let paths: Vec<PathBuf> = paths.collect();
        match event.kind {
            EventKind::Create(CreateKind::Folder) => self.created.extend(paths.iter().cloned()),
            EventKind::Remove(RemoveKind::Folder) => {
                self.removed_dirs.extend(paths.iter().cloned())
            }
            // Something moved away leaves its path as a removal does: a directory made
            // there in the same batch has contents of its own, and the old one's keys
            // are gone (`mv d d2; mkdir d`).
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                if dir_moved {
                    self.dirs_moved.extend(paths.iter().cloned());
                }
                self.left.extend(paths.iter().cloned())
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                self.renamed_in.extend(paths.iter().cloned())
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                self.renamed_in.extend(paths.last().cloned())
            }
            _ => {}
        }
        self.paths.extend(paths);
    }
}

/// Whether `event` is the folder store's own new file showing up: the creation of a
/// regular file whose size, mtime and mode are what the store recorded writing there
/// (see [`is_echo`]). Asked on the watcher's thread, so that the thousands of files a
/// receiving store writes do not each cost the source a place in a batch and a plan;
/// a W1 receiver spent about a tenth of its CPU there (`ab.py --workload W1 --reps 7`:
/// B's CPU 0.98 → 0.89 s). The decision is the plan's own for such a file (one that
/// matches the record is skipped), made sooner and in the same order: the key's note goes
/// first ([`Echo::look`]), as a review found: a file linked back by the user (a hard link
/// restored from a snapshot, say) may match the record while a note of a later read of
/// the user's waits for the store. A change made to the file since brings events of its
/// own (a write, a change of mode or mtime, a removal, something renamed over it), and
/// those are not dropped here.
fn is_own_file(env: &Env, event: &notify::Event) -> bool {
    if event.kind != EventKind::Create(CreateKind::File) || event.need_rescan() {
        return false;
    }
    let [path] = &event.paths[..] else {
        return false;
    };
    let Ok(key) = env.rules.key_of(path) else {
        return false;
    };
    // No stat for a file the store has no record of (a file of the user's).
    if !matches!(env.echo.get(&key), Some(Applied::File { .. })) {
        return false;
    }
    look_for_echo(env, Some(&key), path, env.echo.writes()).1
}

/// Looks `path` up for the source to judge the entry there (`writes` is
/// [`Echo::writes`] from before), and whether it is the store's own write (see
/// [`is_echo`]). What is decided about an entry that is there may rest on the echo
/// record, so `key`'s note goes first (see [`Echo::look`]; a removal keeps it, see
/// `Echo::absence_accounted`).
fn look_for_echo(
    env: &Env,
    key: Option<&Key>,
    path: &Path,
    writes: u64,
) -> (std::io::Result<std::fs::Metadata>, bool) {
    let meta = std::fs::symlink_metadata(path);
    let echo = match (&meta, key) {
        (Ok(m), Some(key)) if m.is_file() || m.is_dir() => {
            env.echo.look(key, writes);
            m.is_file() && is_echo(env, key, m)
        }
        _ => false,
    };
    (meta, echo)
}

/// What one debounced batch of paths amounts to.
struct Plan {
    changes: Vec<LocalChange>,
    /// New directories to scan whole (their contents produced no events of their own).
    subtrees: Vec<Key>,
    /// Keys found removed, not recorded yet: to hold.
    removed: Vec<(Key, Removal)>,
}

/// Classifies each changed path (blocking: stats, hashes, reads heads). Removals are not
/// recorded here: their keys are handed back, to be held (see [`REMOVALS_QUIET`]).
/// A directory that arrived (renamed in, or made again where one left or while removals
/// below it are held) is scanned whole even where the log shows one, and even where the
/// store made one lately: it brings contents of its own, which produced no events.
/// Whether the folder shows `key`'s heads ([`Projection::shows`]); what the store has not
/// applied is read into `projection` the first time a batch asks (it reads every event
/// past the store's cursor), and the heads after it, as `shows` asks.
fn shows_heads(env: &Env, projection: &mut Option<Projection>, key: &Key) -> Result<bool, FsError> {
    let projection = match projection {
        Some(p) => p,
        None => projection.insert(Projection::unshown(&env.log, &env.echo)?),
    };
    Ok(projection.shows(&env.log, &env.log.heads(key)?))
}

fn plan(
    env: &Env,
    paths: BTreeSet<PathBuf>,
    arrived: &HashSet<PathBuf>,
    dirs_left: &HashSet<PathBuf>,
) -> Result<Plan, FsError> {
    let mut puts = Vec::new();
    let mut subtrees = Vec::new();
    let mut removed = Vec::new();
    // Directories handled whole: paths below them need nothing more. The set is sorted,
    // so a directory comes before its contents.
    let mut handled: Vec<Key> = Vec::new();
    let mut real_dirs = HashSet::new();
    // What the folder's store has not applied yet, read once a batch needs it.
    let mut projection = None;
    for path in paths {
        if path == env.rules.root() || !path.starts_with(env.rules.root()) {
            continue;
        }
        if below_symlink(env.rules.root(), &path, &mut real_dirs) {
            tracing::debug!("ignoring {}: below a symlink", path.display());
            continue;
        }
        let key = env.rules.key_of(&path);
        let writes = env.echo.writes();
        let (meta, echo) = look_for_echo(env, key.as_ref().ok(), &path, writes);
        // The store's own writes come back here by the thousand: dropped first. The store
        // writes no ignored path, so the ignore rules need not be asked.
        if echo {
            continue;
        }
        let is_dir = meta.as_ref().is_ok_and(|m| m.is_dir());
        if env.rules.ignores(&path, is_dir, true) {
            if meta.is_err() {
                puts.extend(merge_for_path(env, &path)?);
            }
            continue;
        }
        let key = match key {
            Ok(k) => k,
            Err(why) => {
                tracing::warn!("{why}");
                continue;
            }
        };
        if handled.iter().any(|d| key.is_under(d)) {
            continue;
        }
        let heads = env.log.heads(&key)?;
        let shown = env.resolver.shown(&key, &heads);
        match meta {
            Ok(m) if m.is_dir() => {
                let known = shown.is_some_and(
                    |h| matches!(&h.op, Op::Put { meta, .. } if meta.kind == EntryKind::Dir),
                );
                // What the store made there is echo to the scan, or not settled yet; the
                // removals the scan finds are held (see `run_inner`).
                if arrived.contains(&path) || (!known && env.echo.get(&key) != Some(Applied::Dir)) {
                    subtrees.push(key.clone());
                    handled.push(key);
                }
            }
            Ok(m) if m.is_file() => {
                match examine_file(env, &key, &path, Looked::Path(&m), writes, &heads, None) {
                    // As a scan judges (see `scan::file_found`): a file in a state the log
                    // knows (an older version, touched or saved again unchanged) while
                    // the folder does not show the key's heads yet is what the store is to
                    // replace; recorded, it would undo those heads on every replica.
                    Ok((
                        Some(Op::Put {
                            content: Some(c),
                            meta,
                        }),
                        _,
                    )) if known_content(&env.log, &env.echo, &key, &c, meta.executable)
                        && !shows_heads(env, &mut projection, &key)? => {}
                    Ok((Some(op), _)) => {
                        puts.push(LocalChange::new(key, op).made_at(changed_at_ms(&m)));
                    }
                    Ok((None, _)) => {}
                    // Gone again before we read it: a later event says what happened.
                    Err(e) if e.is_not_found() => {}
                    Err(e @ FsError::Io { .. }) => tracing::warn!("watch: {e}"),
                    // Shutting down: nothing of it recorded, and the loop ends next.
                    Err(FsError::Stopped { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(m) if !m.file_type().is_symlink() => {
                tracing::debug!(
                    "skipping {}: not a regular file or directory",
                    path.display()
                );
            }
            other => {
                if let Ok(m) = other {
                    if m.file_type().is_symlink() {
                        tracing::warn!(
                            "skipping symlink {} (symlinks are not followed)",
                            path.display()
                        );
                    }
                }
                // Removed by the store, or not written because it could not be.
                if env.echo.absence_accounted(&key) {
                    continue;
                }
                let removal = Removal {
                    at: removed_at_ms(&env.rules, &key),
                    dir_left: dirs_left.contains(&path),
                };
                removed.push((key, removal));
            }
        }
    }
    Ok(Plan {
        changes: puts,
        subtrees,
        removed,
    })
}

/// The merge a conflict copy deleted by hand asks for (see [`merge_for_deleted_copy`]), if
/// `path` was the copy of one of the heads its key shows as conflict copies. The key is
/// then no longer a conflict anywhere, and the other replicas remove their copies.
fn merge_for_path(env: &Env, path: &Path) -> Result<Option<LocalChange>, FsError> {
    let Ok(copy) = env.rules.key_of(path) else {
        return Ok(None);
    };
    // `name.sync-conflict-<date>-<origin>.ext` is a copy of `name.ext`.
    let Some((front, rest)) = copy.as_str().rsplit_once(CONFLICT_MARKER) else {
        return Ok(None);
    };
    let ext = rest.find('.').map_or("", |i| &rest[i..]);
    let Ok(key) = Key::new(format!("{front}{ext}")) else {
        return Ok(None);
    };
    let heads = env.log.heads(&key)?;
    let merged = merge_for_deleted_copy(env, &key, &heads, |name| *name == copy);
    if merged.is_some() {
        tracing::info!("{copy} deleted: {key} keeps what it shows, and its conflict is merged");
    }
    Ok(merged.map(|(_, merge)| merge))
}

/// How many times the rules are read again when the ignore file changed while they were
/// read and the watcher started.
const RULES_TRIES: u32 = 8;

/// The hash of the folder's ignore file now (see [`Rules::read_from`]).
async fn ignore_stamp(root: &Path) -> Option<blake3::Hash> {
    let root = root.to_owned();
    tokio::task::spawn_blocking(move || ignore_file_hash(&root))
        .await
        .ok()
        .flatten()
}

/// What the held removals amount to now (blocking): a delete of every key at or below a
/// held one that the projection shows and the folder lacks, children before their
/// directory. Below a held directory, every such key counts, even if the directory came
/// back meanwhile (the store recreates one for a peer's file in it, and nothing else).
/// Each is stamped as of when its removal was seen (a key below a directory, as of the
/// directory's). Where a symlink is at or above its path now, what counts is what was
/// seen to go ([`Removal::absence`]). Fails, recording nothing, if the folder has lost its
/// marker.
fn removals(env: &Env, held: &BTreeMap<Key, Removal>) -> Result<Vec<LocalChange>, FsError> {
    // A key with a head the store has not applied (a peer's newer version, or a key new
    // from a peer) is not the user's to remove: what the folder lacks there it has not been
    // shown yet, as a scan judges (see `Projection::shows`).
    // Read before the heads below, as `Projection::shows` asks.
    let projection = Projection::unshown(&env.log, &env.echo)?;
    let mut deletes = Vec::new();
    let mut real = HashSet::new();
    let mut consider = |key: &Key, heads: &[converge_api::Head], how, removed_at| {
        if gone(env, key, heads, how, &mut real) && projection.shows(&env.log, heads) {
            deletes.push(LocalChange::new(key.clone(), Op::Delete).made_at(removed_at));
        }
    };
    let mut dirs = HashMap::new();
    for (key, removal) in held {
        let heads = env.log.heads(key)?;
        let dir = heads
            .iter()
            .any(|h| matches!(&h.op, Op::Put { meta, .. } if meta.kind == EntryKind::Dir));
        if dir {
            dirs.insert(key.clone(), *removal);
        }
        consider(key, &heads, removal.absence(), removal.at);
    }
    for (dir, removal) in &dirs {
        let how = removal.absence();
        for entry in env.log.states_below(dir) {
            let (key, state) = entry?;
            // Each key once, as of the removal of the nearest held directory above it.
            let nearest =
                std::iter::successors(key.parent(), Key::parent).find(|k| dirs.contains_key(k));
            if !held.contains_key(&key) && nearest.as_ref() == Some(dir) {
                consider(&key, &state.heads, how, removal.at);
            }
        }
    }
    if !deletes.is_empty() {
        marker::check(env.rules.root())?;
    }
    deletes.sort_by(|a, b| b.key.cmp(&a.key));
    Ok(deletes)
}

#[async_trait]
impl Source for FsSource {
    fn name(&self) -> &str {
        "folder"
    }

    fn scans_at_start(&self) -> bool {
        true
    }

    async fn run(&self, ctx: SourceContext) -> Result<(), PluginError> {
        self.run_inner(ctx)
            .await
            .map_err(|e| e.into_plugin(self.name()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(kind: EventKind, path: &str) -> WatchResult {
        Ok(notify::Event::new(kind).add_path(PathBuf::from(path)))
    }

    /// The store's own new file is dropped on the watcher's thread; any other event, a
    /// file of the user's, and the store's file changed or gone since are not.
    #[test]
    fn only_the_stores_own_new_files_are_dropped_early() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let env = Env::for_tests(&root);
        let made = |path: &Path| {
            notify::Event::new(EventKind::Create(CreateKind::File)).add_path(path.to_owned())
        };
        let path = root.join("d/f.txt");
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(&path, b"hello").unwrap();
        let (size, mtime_ms, executable) =
            crate::content::file_stat(&std::fs::symlink_metadata(&path).unwrap());
        let key = Key::new("d/f.txt").unwrap();
        let wrote = Applied::File {
            size,
            mtime_ms,
            executable,
            root: converge_api::Hash::of(b"hello"),
        };
        assert!(!is_own_file(&env, &made(&path)), "no record yet");
        env.echo.record(&key, wrote);
        // A note of a read of the user's, waiting for the store, goes first (as in the
        // plan): the store then looks for itself rather than skip on it.
        let read = Applied::File {
            size: 3,
            mtime_ms: 1,
            executable: false,
            root: converge_api::Hash::of(b"abc"),
        };
        env.echo.note_read(&key, read, env.echo.writes());
        assert!(is_own_file(&env, &made(&path)));
        assert!(!env.echo.take_read(&key, read), "the note went first");

        let written = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        let touched = EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any));
        for kind in [written, touched, EventKind::Create(CreateKind::Folder)] {
            let event = notify::Event::new(kind).add_path(path.clone());
            assert!(!is_own_file(&env, &event), "{kind:?}");
        }
        let mut lost = made(&path);
        lost = lost.set_flag(notify::event::Flag::Rescan);
        assert!(!is_own_file(&env, &lost), "events were lost");

        let users = root.join("d/g.txt");
        std::fs::write(&users, b"hello").unwrap();
        assert!(!is_own_file(&env, &made(&users)), "no record for it");

        std::fs::write(&path, b"hello, world").unwrap();
        assert!(!is_own_file(&env, &made(&path)), "changed since");
        std::fs::remove_file(&path).unwrap();
        assert!(!is_own_file(&env, &made(&path)), "gone");
        std::fs::create_dir(&path).unwrap();
        assert!(!is_own_file(&env, &made(&path)), "a directory there");
        assert!(!is_own_file(&env, &made(&root.join("../outside"))));
    }

    /// A full queue drops what comes and says so once; an error dropped says the watcher
    /// misses changes.
    #[test]
    fn a_full_queue_drops_and_says_so_once() {
        // What a batch makes of what was dropped: (rescan, the watcher failed).
        let dropped = |queue: &Queue| {
            let mut batch = Batch::default();
            for said in queue.take_dropped() {
                batch.collect(said);
            }
            (batch.rescan, batch.failed)
        };
        let (tx, mut rx) = mpsc::channel(2);
        let queue = Queue::new(tx);
        for name in ["a", "b", "c"] {
            queue.offer(event(EventKind::Any, &format!("/f/{name}")));
        }
        assert_eq!(dropped(&queue), (true, false), "events lost: a rescan");
        assert_eq!(dropped(&queue), (false, false), "said once");
        queue.offer(Err(notify::Error::generic("a watch failed")));
        assert_eq!(dropped(&queue), (true, true), "an error lost: failed");
        let kept: Vec<PathBuf> = std::iter::from_fn(|| rx.try_recv().ok())
            .flat_map(|r| r.map(|e| e.paths).unwrap_or_default())
            .collect();
        assert_eq!(kept, [PathBuf::from("/f/a"), PathBuf::from("/f/b")]);
        queue.offer(Err(notify::Error::generic("room again")));
        assert!(
            matches!(rx.try_recv(), Ok(Err(_))),
            "queued once there is room"
        );
        assert_eq!(dropped(&queue), (false, false));
    }

    /// Only a batch of renames into the folder is whole on arrival: anything else in it
    /// (a write, a move away, lost events) makes it wait for the debounce.
    #[test]
    fn only_what_was_renamed_in_is_complete() {
        let moved_in = || {
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/f/tree",
            )
        };
        let mut batch = Batch::default();
        assert!(!batch.complete(), "nothing yet");
        batch.collect(moved_in());
        assert!(batch.complete());
        let within = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path(PathBuf::from("/f/old"))
            .add_path(PathBuf::from("/f/new"));
        batch.collect(Ok(within));
        assert!(
            !batch.complete(),
            "the old name of a move within the folder"
        );

        let mut batch = Batch::default();
        batch.collect(moved_in());
        batch.collect(event(
            EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any)),
            "/f/being-written",
        ));
        assert!(!batch.complete(), "a write");

        let mut batch = Batch::default();
        batch.collect(event(
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            "/f/a",
        ));
        assert!(!batch.complete(), "a move away");

        let mut batch = Batch::default();
        batch.collect(moved_in());
        batch.rescan = true;
        assert!(!batch.complete(), "events lost");
    }
}
