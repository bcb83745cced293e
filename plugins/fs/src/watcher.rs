//! The folder's watcher: what changed in the tree, as `notify` events.
//!
//! On Linux it is inotify itself, through the `inotify` crate: a watch on every directory
//! of the tree, added as directories appear, for the changes the source records and no
//! others. `notify` 8 watches every open of every file as well (its mask cannot be set),
//! so each read in the folder, the source's own hashing included, came back as an event
//! to drop; a reader sweeping the folder (a backup, an indexer) could overflow the
//! kernel's queue and cost a rescan of the whole folder. It also stats every entry of a
//! new directory to find its subdirectories, where the type in the directory listing
//! says as much. Elsewhere `notify`'s own watcher is used.
//!
//! Either way symlinks are never followed: a symlinked directory would be watched where
//! it points (outside the folder, perhaps) and reported below the link. (`notify` 6
//! followed the symlinked directories it found: a change in a link's target came in below
//! the link, and a link to a directory of the folder took over that directory's watch.)
//! On Linux no walk starts below a symlink that replaced a parent either.
//!
//! On Linux, too, the watcher keeps its watches in step with directories moved, exchanged
//! and removed, and walks the tree again after the kernel's queue overflowed, dropping
//! the watches it did not meet (see `Tree` in the Linux module for how; five reviews found
//! the cases that design grew from, and each has a test below). The folder itself removed,
//! unmounted or moved is handed on as an error: nothing is watched any more. A directory
//! this user may not read is skipped with a warning (the scan cannot read it either) and
//! tried again when its attributes, or a parent's, change; the kernel's limit of watches
//! reached is an error naming the sysctl to raise (`fs.inotify.max_user_watches`).
//!
//! On Linux, directories the folder's ignore rules exclude are not watched either, nor
//! anything below them: an ignored `node_modules` or build tree would otherwise count
//! against the kernel's limit of watches (8,192 per user before Linux 5.11), and a folder
//! over it is rescanned every minute instead of watched. `notify`'s recursive watch
//! elsewhere watches them all.

use std::path::Path;

use notify::event::{ModifyKind, RenameMode};
use notify::EventKind;

/// What the watcher hands on: one event, or an error after which it may miss changes.
pub(crate) type WatchResult = notify::Result<notify::Event>;

/// The info the watcher gives the event of a directory moved away (see
/// [`moved_dir_away`]).
const DIRECTORY: &str = "directory";

/// Whether `event` says a directory moved away from its path. Told on Linux alone, where
/// inotify says whether what moved is a directory; elsewhere a move does not say what
/// moved, and this is never so. (A removal says it: `RemoveKind::Folder`.)
pub(crate) fn moved_dir_away(event: &notify::Event) -> bool {
    event.kind == EventKind::Modify(ModifyKind::Name(RenameMode::From))
        && event.info() == Some(DIRECTORY)
}

/// Whether a directory below the root (given by its path) is left unwatched, with
/// everything below it: the ignore rules' answer.
pub(crate) type Skip = Box<dyn Fn(&Path) -> bool + Send>;

/// Watches `root` and the tree below it, but for the directories `skip` names, until
/// dropped, handing each event to `handler` (on a thread of the watcher's own).
pub(crate) fn watch(
    root: &Path,
    skip: Skip,
    handler: impl FnMut(WatchResult) + Send + 'static,
) -> notify::Result<FolderWatcher> {
    imp::watch(root, skip, handler).map(FolderWatcher)
}

/// A running watcher of one folder's tree; dropping it stops it.
pub(crate) struct FolderWatcher(imp::Watcher);

impl FolderWatcher {
    /// Stops the watcher and waits until its watches are gone (blocking; a drop lets them
    /// go a moment later): a watcher started next, which walks the whole tree again, then
    /// does not meet the kernel's limit of watches with both watchers' watches.
    pub(crate) fn stop(self) {
        self.0.stop();
    }
}

impl std::fmt::Debug for FolderWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FolderWatcher")
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::path::Path;

    use notify::{RecursiveMode, Watcher as _};

    use super::{Skip, WatchResult};

    /// `notify`'s watcher, stopped by dropping it (held, never read).
    pub(super) struct Watcher(#[allow(dead_code)] notify::RecommendedWatcher);

    impl Watcher {
        pub(super) fn stop(self) {}
    }

    /// `notify`'s recursive watch cannot leave directories out: `_skip` goes unused, and
    /// the source drops the events of ignored paths.
    pub(super) fn watch(
        root: &Path,
        _skip: Skip,
        mut handler: impl FnMut(WatchResult) + Send + 'static,
    ) -> notify::Result<Watcher> {
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut watcher = notify::RecommendedWatcher::new(
            move |res: WatchResult| {
                // Opens and reads (our own hashing included) are no changes.
                let read = res.as_ref().is_ok_and(|e| {
                    matches!(e.kind, notify::EventKind::Access(k)
                        if k != notify::event::AccessKind::Close(notify::event::AccessMode::Write))
                });
                if !read {
                    handler(res);
                }
            },
            config,
        )?;
        watcher.watch(root, RecursiveMode::Recursive)?;
        Ok(Watcher(watcher))
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::{BTreeSet, HashMap, HashSet};
    use std::ffi::OsStr;
    use std::io::{self, ErrorKind};
    use std::os::fd::AsRawFd;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
    use mio::unix::SourceFd;
    use mio::{Interest, Poll, Token, Waker};
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, Flag, MetadataKind, ModifyKind, RemoveKind,
        RenameMode,
    };
    use notify::{Event, EventKind};

    use super::{Skip, WatchResult};
    use crate::rules::below_symlink;

    /// What every directory is watched for: the changes of its entries, no opens or reads.
    /// Symlinks are never followed, and a path that is not a directory (any more) is not
    /// watched.
    const MASK: WatchMask = WatchMask::CREATE
        .union(WatchMask::DELETE)
        .union(WatchMask::MODIFY)
        .union(WatchMask::CLOSE_WRITE)
        .union(WatchMask::ATTRIB)
        .union(WatchMask::MOVED_FROM)
        .union(WatchMask::MOVED_TO)
        .union(WatchMask::DONT_FOLLOW)
        .union(WatchMask::ONLYDIR)
        .union(WatchMask::EXCL_UNLINK);
    /// The root is also watched for its own removal or move.
    const ROOT_MASK: WatchMask = MASK
        .union(WatchMask::DELETE_SELF)
        .union(WatchMask::MOVE_SELF);

    const INOTIFY: Token = Token(0);
    const WAKE: Token = Token(1);

    /// Bytes read from the kernel's queue at once (an event is 16 bytes and its name).
    const BUFFER: usize = 64 * 1024;

    /// How long a directory moved away waits for the other half of its move (a
    /// `MOVED_TO` within the folder) before its watches are dropped. The kernel queues
    /// both halves in one go, so this only matters when they fall into two reads.
    const MOVE_PAIRING: Duration = Duration::from_millis(20);

    /// How long the thread waits after a wake-up before it reads, so that a burst of
    /// changes (a store writing a batch, a tree copied into the folder) is read in a few
    /// large reads: otherwise each event wakes the thread for a read of its own, which
    /// costs the thread and every writer, whose write does the waking (a tenth of the
    /// receiver's CPU in W1 of `bench/daemon/run.py` went to the watcher; with the wait,
    /// the receiver's CPU went from 0.84 to 0.74 s). Far below the source's debounce, and
    /// the kernel's queue (16,384 events by default) holds a few milliseconds of any
    /// burst.
    const GATHER: Duration = Duration::from_millis(3);

    /// Stops the watcher's thread when dropped.
    pub(in super::super) struct Watcher {
        stop: Arc<AtomicBool>,
        /// Shared with the thread, so that its eventfd stays open (and registered) until
        /// the thread has seen the wake-up: closing it at once could drop that wake-up.
        waker: Arc<Waker>,
        /// The thread, to wait for in [`Watcher::stop`].
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Watcher {
        /// Stops the thread and waits for it: its inotify descriptor, and with it every
        /// watch, is closed when it returns.
        pub(super) fn stop(mut self) {
            let thread = self.thread.take();
            drop(self);
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }

    impl Drop for Watcher {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            // The thread then ends at its next wake-up (it may be in a walk of a new
            // directory), or within `STOP_CHECK` if waking failed.
            let _ = self.waker.wake();
        }
    }

    /// How often the thread looks at the stop flag when nothing wakes it (a backstop: a
    /// stopped watcher wakes it at once).
    const STOP_CHECK: Duration = Duration::from_secs(1);

    pub(super) fn watch(
        root: &Path,
        skip: Skip,
        handler: impl FnMut(WatchResult) + Send + 'static,
    ) -> notify::Result<Watcher> {
        let inotify = Inotify::init().map_err(notify::Error::io)?;
        let poll = Poll::new().map_err(notify::Error::io)?;
        let fd = inotify.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), INOTIFY, Interest::READABLE)
            .map_err(notify::Error::io)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).map_err(notify::Error::io)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut tree = Tree::new(inotify.watches(), root, skip);
        tree.stop = stop.clone();
        tree.add(root)?;
        let (stopped, kept) = (stop.clone(), waker.clone());
        let mut handler = handler;
        let thread = std::thread::Builder::new()
            .name("converge-watch".into())
            .spawn(move || {
                let _waker = kept;
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(inotify, poll, tree, &stopped, &mut handler)
                }));
                if ran.is_err() {
                    // Said, so that the source rescans rather than trust a watcher gone.
                    handler(Err(notify::Error::generic(
                        "the folder watcher stopped after a panic",
                    )));
                }
            })
            .map_err(notify::Error::io)?;
        Ok(Watcher {
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The watcher's thread: waits for events, reads them all, hands them on.
    fn run(
        mut inotify: Inotify,
        mut poll: Poll,
        mut tree: Tree,
        stop: &AtomicBool,
        handler: &mut impl FnMut(WatchResult),
    ) {
        let mut buffer = vec![0u8; BUFFER];
        let mut ready = mio::Events::with_capacity(4);
        loop {
            // A directory moved away waits a moment for the other half of its move.
            let timeout = if tree.pending.is_empty() {
                STOP_CHECK
            } else {
                MOVE_PAIRING
            };
            match poll.poll(&mut ready, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    handler(Err(notify::Error::io(e)));
                    return;
                }
            }
            if stop.load(Ordering::Acquire) {
                return;
            }
            if ready.is_empty() {
                tree.moved_away(u64::MAX);
                continue;
            }
            std::thread::sleep(GATHER);
            // Readiness is reported once per change of state: read until the queue is
            // empty.
            loop {
                let events = match inotify.read_events(&mut buffer) {
                    Ok(events) => events,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        handler(Err(notify::Error::io(e)));
                        return;
                    }
                };
                tree.read(events, handler);
                if stop.load(Ordering::Acquire) {
                    return;
                }
            }
        }
    }

    /// The watched directories of the tree.
    ///
    /// A watch stays with its directory's inode wherever it moves, and adding a watch to
    /// a directory already watched gives back its watch. So the tree is kept by walking
    /// where directories arrive (made, or moved to) once all the events of a read are
    /// in, which puts down the path of every watch it meets as it is then; and a
    /// directory moved away leaves its watches *pending*: those no walk meets by the end
    /// of the next read (or within [`MOVE_PAIRING`]) left the folder and are dropped, as
    /// they would go on reporting changes outside it under their old paths. Walking only
    /// after the read is what keeps two directories exchanged (`RENAME_EXCHANGE`: from
    /// `a`, to `b`, from `b`, to `a`) apart: each move away takes the watches recorded at
    /// its path before either walk; walking the path a directory left is what keeps them
    /// apart when the read ends between the two halves. Five reviews found the cases this
    /// design grew from; each has a test in this file.
    struct Tree {
        watches: Watches,
        root: PathBuf,
        /// Watch → the directory it is on, and the watch itself (to drop it).
        dirs: HashMap<i32, (PathBuf, WatchDescriptor)>,
        /// The same, by path, so that a directory's subtree is a range. A directory
        /// replaced by another may share its path with it until its removal comes in.
        paths: BTreeSet<(PathBuf, i32)>,
        /// Watches of directories moved away, and the read that saw them go.
        pending: HashMap<i32, u64>,
        /// Directories not watched for want of permission: tried again when their
        /// attributes, or those of a directory above them, change.
        denied: BTreeSet<PathBuf>,
        /// Reads of the kernel's queue so far.
        reads: u64,
        /// Directories left unwatched with their trees (the ignore rules).
        skip: Skip,
        /// The watcher's stop flag: a walk under way ends early once it is set.
        stop: Arc<AtomicBool>,
    }

    impl Tree {
        fn new(watches: Watches, root: &Path, skip: Skip) -> Tree {
            Tree {
                watches,
                root: root.to_path_buf(),
                skip,
                stop: Arc::default(),
                dirs: HashMap::new(),
                paths: BTreeSet::new(),
                pending: HashMap::new(),
                denied: BTreeSet::new(),
                reads: 0,
            }
        }

        /// Takes the events of one read: keeps the watches in step with the tree, then
        /// hands the events on.
        fn read(&mut self, events: inotify::Events<'_>, handler: &mut impl FnMut(WatchResult)) {
            self.reads += 1;
            let mut out = Vec::new();
            let mut arrived = Vec::new();
            for event in events {
                self.take(event, &mut out, &mut arrived);
            }
            // Watched before the events are handed on, so that the scan of an arrived
            // directory the source makes misses nothing written there afterwards. A walk
            // covers what is below it: each subtree once.
            arrived.sort();
            arrived.dedup_by(|later, earlier| later.starts_with(earlier));
            for dir in arrived {
                if let Err(e) = self.add(&dir) {
                    handler(Err(e));
                }
            }
            self.moved_away(self.reads - 1);
            for event in out {
                handler(event);
            }
        }

        /// Watches `dir` and every directory below it but those `skip` names (with their
        /// trees). Entries that are gone or are no directories (any more) are skipped:
        /// their removal or replacement is an event of its own; so are directories this
        /// user may not read, which the scan cannot read either (with a warning). The walk
        /// goes on past other failures and returns the first.
        fn add(&mut self, dir: &Path) -> notify::Result<()> {
            // A directory met through a symlink that replaced one of its parents is not
            // the folder's (it may be anywhere): not watched. (A replacement during the
            // walk can still slip through; the source drops paths below a symlink.)
            if below_symlink(&self.root, dir, &mut HashSet::new()) {
                return Ok(());
            }
            let mut failed: Option<notify::Error> = None;
            let mut stack = vec![dir.to_path_buf()];
            while let Some(dir) = stack.pop() {
                if self.stop.load(Ordering::Relaxed) {
                    break;
                }
                let is_root = dir == self.root;
                if !is_root && (self.skip)(&dir) {
                    continue;
                }
                let mask = if is_root { ROOT_MASK } else { MASK };
                match self.watches.add(&dir, mask) {
                    Ok(wd) => {
                        self.denied.remove(&dir);
                        self.put(dir.clone(), wd);
                    }
                    Err(e) if vanished(&e) && !is_root => continue,
                    Err(e) if denied(&e) && !is_root => {
                        if !self.denied.contains(&dir) {
                            tracing::warn!("not watching {}: {e}", dir.display());
                        }
                        self.denied.insert(dir);
                        continue;
                    }
                    Err(e) => {
                        let limit = e.raw_os_error() == Some(libc::ENOSPC);
                        failed.get_or_insert(watch_error(e, &dir));
                        if limit || is_root {
                            // No further watch can be added either.
                            break;
                        }
                        continue;
                    }
                }
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if vanished(&e) => continue,
                    Err(e) => {
                        failed.get_or_insert(watch_error(e, &dir));
                        continue;
                    }
                };
                for entry in entries {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(e) => {
                            if !vanished(&e) {
                                failed.get_or_insert(watch_error(e, &dir));
                            }
                            break;
                        }
                    };
                    // The type the listing gives (lstat when it gives none): a symlink is
                    // not a directory here.
                    match entry.file_type() {
                        Ok(t) if t.is_dir() => stack.push(entry.path()),
                        Ok(_) => {}
                        Err(e) if vanished(&e) => {}
                        Err(e) => {
                            failed.get_or_insert(watch_error(e, &entry.path()));
                        }
                    }
                }
            }
            failed.map_or(Ok(()), Err)
        }

        /// Records that `wd` watches `dir` (met by a walk: no longer pending).
        fn put(&mut self, dir: PathBuf, wd: WatchDescriptor) {
            let id = wd.get_watch_descriptor_id();
            self.pending.remove(&id);
            if let Some((before, _)) = self.dirs.get(&id) {
                self.paths.remove(&(before.clone(), id));
            }
            self.paths.insert((dir.clone(), id));
            self.dirs.insert(id, (dir, wd));
        }

        /// Forgets watch `id`, and drops it from the kernel when `drop`.
        fn remove(&mut self, id: i32, drop: bool) {
            if let Some((dir, wd)) = self.dirs.remove(&id) {
                self.paths.remove(&(dir, id));
                if drop {
                    // Already gone with its directory, perhaps: nothing to undo.
                    let _ = self.watches.remove(wd);
                }
            }
            self.pending.remove(&id);
        }

        /// Drops the watches pending since read `read` or before.
        fn moved_away(&mut self, read: u64) {
            let gone: Vec<i32> = self
                .pending
                .iter()
                .filter(|(_, seen_in)| **seen_in <= read)
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.remove(id, true);
            }
        }

        /// Takes one event from the kernel: notes the directories that arrived and the
        /// watches moved away, and puts the event in `out`.
        fn take(
            &mut self,
            event: inotify::Event<&OsStr>,
            out: &mut Vec<WatchResult>,
            arrived: &mut Vec<PathBuf>,
        ) {
            let mask = event.mask;
            if mask.contains(EventMask::Q_OVERFLOW) {
                self.overflowed(out);
                return;
            }
            let id = event.wd.get_watch_descriptor_id();
            let Some((dir, _)) = self.dirs.get(&id) else {
                // A watch dropped already; its last events say nothing new.
                return;
            };
            let path = match event.name {
                Some(name) => dir.join(name),
                None => dir.clone(),
            };
            if mask.contains(EventMask::IGNORED) {
                // The directory was removed (or its file system unmounted).
                self.remove(id, false);
                return;
            }
            let is_dir = mask.contains(EventMask::ISDIR);
            let kind = if mask.contains(EventMask::CREATE) {
                EventKind::Create(if is_dir {
                    CreateKind::Folder
                } else {
                    CreateKind::File
                })
            } else if mask.contains(EventMask::DELETE) {
                EventKind::Remove(if is_dir {
                    RemoveKind::Folder
                } else {
                    RemoveKind::File
                })
            } else if mask.contains(EventMask::MOVED_FROM) {
                EventKind::Modify(ModifyKind::Name(RenameMode::From))
            } else if mask.contains(EventMask::MOVED_TO) {
                EventKind::Modify(ModifyKind::Name(RenameMode::To))
            } else if mask.contains(EventMask::CLOSE_WRITE) {
                EventKind::Access(AccessKind::Close(AccessMode::Write))
            } else if mask.contains(EventMask::MODIFY) {
                EventKind::Modify(ModifyKind::Data(DataChange::Any))
            } else if mask.contains(EventMask::ATTRIB) {
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any))
            } else if mask.contains(EventMask::DELETE_SELF) || mask.contains(EventMask::UNMOUNT) {
                if path != self.root && mask.contains(EventMask::UNMOUNT) {
                    // A file system mounted inside the folder went: the directory below
                    // shows again, unwatched, with contents of its own.
                    arrived.push(path.clone());
                    out.push(Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan)));
                }
                EventKind::Remove(RemoveKind::Folder)
            } else if mask.contains(EventMask::MOVE_SELF) {
                EventKind::Modify(ModifyKind::Name(RenameMode::Any))
            } else {
                return;
            };
            if path == self.root
                && (mask.contains(EventMask::DELETE_SELF)
                    || mask.contains(EventMask::UNMOUNT)
                    || mask.contains(EventMask::MOVE_SELF))
            {
                // Nothing is watched from now on (moved, its watches would report the tree
                // under this path): the source rescans, and finds the folder gone, rather
                // than wait for events that cannot come.
                out.push(Err(notify::Error::generic(
                    "the folder itself was removed, unmounted or moved; it is no longer watched",
                )
                .add_path(path.clone())));
            }
            if is_dir {
                if mask.contains(EventMask::DELETE) || mask.contains(EventMask::MOVED_FROM) {
                    // Gone from here, and whatever below it could not be watched too.
                    self.denied.retain(|p| !p.starts_with(&path));
                }
                if mask.contains(EventMask::MOVED_FROM) || mask.contains(EventMask::DELETE) {
                    // Gone from here. (Removed, its watches end by themselves; marked all
                    // the same, for one whose path a walk through a symlink that replaced
                    // a parent put below it.)
                    let below: Vec<i32> = self
                        .paths
                        .range((path.clone(), i32::MIN)..)
                        .take_while(|(p, _)| p.starts_with(&path))
                        .map(|(_, id)| *id)
                        .collect();
                    for id in below {
                        self.pending.entry(id).or_insert(self.reads);
                    }
                }
                if mask.contains(EventMask::MOVED_FROM) || mask.contains(EventMask::DELETE) {
                    // What is at the path when the walks run is the folder's too: with two
                    // directories exchanged and the read ending between the two halves,
                    // the one that came to this path arrived in the read before; and a
                    // removal reported by a watch moved away (pending, its path stale)
                    // must not cost the directory now there its watch.
                    arrived.push(path.clone());
                }
                if mask.contains(EventMask::CREATE) || mask.contains(EventMask::MOVED_TO) {
                    arrived.push(path.clone());
                }
                if mask.contains(EventMask::ATTRIB) {
                    // Its permissions changed: what could not be watched at or below it may
                    // be now.
                    arrived.extend(
                        self.denied
                            .range(path.clone()..)
                            .take_while(|p| p.starts_with(&path))
                            .cloned(),
                    );
                }
            }
            let event = Event::new(kind).add_path(path);
            // What moved away was a directory: the keys below it went with it, even where
            // a symlink made in its place shows their names (see `moved_dir_away`).
            let event = match is_dir && mask.contains(EventMask::MOVED_FROM) {
                true => event.set_info(super::DIRECTORY),
                false => event,
            };
            out.push(Ok(event));
        }

        /// Events were lost, directories made, moved or removed meanwhile among them:
        /// watches what is there now, drops the watches of what is not, then asks for a
        /// rescan.
        fn overflowed(&mut self, out: &mut Vec<WatchResult>) {
            // Every watch is pending until the walk meets it.
            let reads = self.reads;
            let before = std::mem::replace(
                &mut self.pending,
                self.dirs.keys().map(|id| (*id, reads)).collect(),
            );
            let root = self.root.clone();
            match self.add(&root) {
                // Stopped during the walk: nothing is watched any more anyway.
                Ok(()) if self.stop.load(Ordering::Relaxed) => {}
                Ok(()) => self.moved_away(u64::MAX),
                Err(e) => {
                    // Not every directory was reached (the watch limit, perhaps): keep the
                    // watches rather than drop ones that still work (but for those that
                    // left before, and no walk met); the source rescans from now on.
                    self.pending.retain(|id, _| before.contains_key(id));
                    out.push(Err(e));
                }
            }
            out.push(Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan)));
        }
    }

    /// The error for a watch not added (or a directory not listed) at `path`.
    fn watch_error(e: io::Error, path: &Path) -> notify::Error {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            notify::Error::generic(
                "the kernel's limit of inotify watches is reached (raise the sysctl fs.inotify.max_user_watches)",
            )
            .add_path(path.to_path_buf())
        } else {
            notify::Error::io_watch(e).add_path(path.to_path_buf())
        }
    }

    /// Whether `e` says the entry is gone or is no directory: a change the watcher hears
    /// of anyway, no failure.
    fn vanished(e: &io::Error) -> bool {
        e.kind() == ErrorKind::NotFound
            || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP))
    }

    /// Whether `e` says this user may not read the directory.
    fn denied(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn tree(root: &Path) -> (Inotify, Tree) {
            let inotify = Inotify::init().unwrap();
            let mut tree = Tree::new(inotify.watches(), root, Box::new(|_| false));
            tree.add(root).unwrap();
            (inotify, tree)
        }

        /// A folder (its temp dir and canonical path) holding the directories `dirs`, and
        /// a temp dir outside it to move them to.
        fn folder_with(dirs: &str) -> (tempfile::TempDir, tempfile::TempDir, PathBuf) {
            let outside = tempfile::tempdir().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().canonicalize().unwrap();
            std::fs::create_dir_all(root.join(dirs)).unwrap();
            (outside, dir, root)
        }

        /// The paths the tree has watches on, relative to `root`.
        fn watched(tree: &Tree, root: &Path) -> Vec<String> {
            let mut paths: Vec<String> = tree
                .dirs
                .values()
                .map(|(p, _)| p.strip_prefix(root).unwrap().display().to_string())
                .collect();
            paths.sort();
            let mut by_path: Vec<String> = tree
                .paths
                .iter()
                .map(|(p, _)| p.strip_prefix(root).unwrap().display().to_string())
                .collect();
            by_path.sort();
            assert_eq!(paths, by_path, "the two maps disagree");
            paths
        }

        /// Takes every event queued now, as the thread does, then lets the moves that
        /// found no other half go.
        fn take_all(inotify: &mut Inotify, tree: &mut Tree) -> Vec<WatchResult> {
            take_all_by(inotify, tree, BUFFER)
        }

        /// The same, reading at most `bytes` at a time.
        fn take_all_by(inotify: &mut Inotify, tree: &mut Tree, bytes: usize) -> Vec<WatchResult> {
            let mut out = Vec::new();
            let mut buffer = vec![0u8; bytes];
            loop {
                match inotify.read_events(&mut buffer) {
                    Ok(events) => tree.read(events, &mut |r| out.push(r)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            tree.moved_away(u64::MAX);
            out
        }

        /// The paths of `events`.
        fn paths(events: Vec<WatchResult>) -> Vec<PathBuf> {
            events.into_iter().flat_map(|r| r.unwrap().paths).collect()
        }

        /// Exchanges `a` and `b` (each with a subdirectory) and takes the events `bytes`
        /// at a time; then each watch must be on its directory's new path.
        fn exchange(bytes: usize) {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().canonicalize().unwrap();
            std::fs::create_dir_all(root.join("a/in_a")).unwrap();
            std::fs::create_dir_all(root.join("b/in_b")).unwrap();
            let (mut inotify, mut tree) = tree(&root);
            let (a, b) = (
                std::ffi::CString::new(root.join("a").into_os_string().into_encoded_bytes())
                    .unwrap(),
                std::ffi::CString::new(root.join("b").into_os_string().into_encoded_bytes())
                    .unwrap(),
            );
            // SAFETY: two valid NUL-terminated paths for the duration of the call.
            let rc = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
            take_all_by(&mut inotify, &mut tree, bytes);
            assert_eq!(watched(&tree, &root), ["", "a", "a/in_b", "b", "b/in_a"]);
            // And each watch reports under its directory's new name.
            std::fs::write(root.join("b/in_a/f"), b"x").unwrap();
            std::fs::write(root.join("a/in_b/g"), b"x").unwrap();
            let paths = paths(take_all(&mut inotify, &mut tree));
            let (f, g) = (root.join("b/in_a/f"), root.join("a/in_b/g"));
            assert!(paths.iter().all(|p| p == &f || p == &g), "{paths:?}");
            assert!(paths.contains(&f) && paths.contains(&g), "{paths:?}");
        }

        #[test]
        fn two_directories_exchanged_keep_their_watches_under_their_new_names() {
            exchange(BUFFER);
        }

        #[test]
        fn an_exchange_read_in_two_halves_keeps_every_watch() {
            // An event with a one-letter name takes 32 bytes: a read of 64 ends between
            // the exchange's two moves.
            exchange(64);
        }

        #[test]
        fn a_directory_moved_out_and_back_stays_watched() {
            let (outside, _dir, root) = folder_with("a/sub");
            let (mut inotify, mut tree) = tree(&root);
            std::fs::rename(root.join("a"), outside.path().join("a")).unwrap();
            std::fs::rename(outside.path().join("a"), root.join("a")).unwrap();
            take_all(&mut inotify, &mut tree);
            assert_eq!(watched(&tree, &root), ["", "a", "a/sub"]);
            std::fs::write(root.join("a/sub/f"), b"x").unwrap();
            assert!(paths(take_all(&mut inotify, &mut tree)).contains(&root.join("a/sub/f")));
        }

        #[test]
        fn a_directory_moved_within_then_out_is_no_longer_watched() {
            let (outside, _dir, root) = folder_with("a/sub");
            let (mut inotify, mut tree) = tree(&root);
            std::fs::rename(root.join("a"), root.join("b")).unwrap();
            std::fs::rename(root.join("b"), outside.path().join("b")).unwrap();
            take_all(&mut inotify, &mut tree);
            assert_eq!(watched(&tree, &root), [""]);
            // Dropped from the kernel too: nothing but the watches' removals comes.
            std::fs::write(outside.path().join("b/sub/f"), b"x").unwrap();
            let mut buffer = vec![0u8; BUFFER];
            let masks: Vec<EventMask> = match inotify.read_events(&mut buffer) {
                Ok(events) => events.map(|e| e.mask).collect(),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Vec::new(),
                Err(e) => panic!("{e}"),
            };
            assert!(masks.iter().all(|m| *m == EventMask::IGNORED), "{masks:?}");
        }

        #[test]
        fn a_removal_reported_by_a_watch_moved_away_keeps_what_is_here_now() {
            let (outside, _dir, root) = folder_with("a/x");
            let (mut inotify, mut tree) = tree(&root);
            let mut buffer = vec![0u8; BUFFER];
            // One read: `a` leaves (its watches pending, still recorded at `a`), a new
            // `a/x` comes and is watched.
            std::fs::rename(root.join("a"), outside.path().join("a")).unwrap();
            std::fs::create_dir_all(root.join("a/x")).unwrap();
            let events = inotify.read_events(&mut buffer).unwrap();
            tree.read(events, &mut |_| {});
            assert_eq!(watched(&tree, &root), ["", "a", "a", "a/x", "a/x"]);
            // The old `a`'s watch reports its `x` removed, under the path `a/x`.
            std::fs::remove_dir_all(outside.path().join("a")).unwrap();
            take_all(&mut inotify, &mut tree);
            assert_eq!(watched(&tree, &root), ["", "a", "a/x"]);
        }

        #[test]
        fn a_dropped_watcher_ends_its_thread() {
            for _ in 0..20 {
                let dir = tempfile::tempdir().unwrap();
                let mut watcher = watch(dir.path(), Box::new(|_| false), |_| {}).unwrap();
                let thread = watcher.thread.take().unwrap();
                drop(watcher);
                // Well within the backstop (`STOP_CHECK`): the wake-up itself ends it.
                let deadline = std::time::Instant::now() + Duration::from_millis(500);
                while !thread.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert!(thread.is_finished(), "the watcher's thread runs on");
            }
        }

        #[test]
        fn reading_a_file_queues_no_event() {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().canonicalize().unwrap();
            std::fs::create_dir_all(root.join("d")).unwrap();
            std::fs::write(root.join("d/f"), b"x").unwrap();
            let (mut inotify, _tree) = tree(&root);
            assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"x");
            let _ = std::fs::read_dir(root.join("d")).unwrap().count();
            let mut buffer = vec![0u8; BUFFER];
            let queued = inotify.read_events(&mut buffer).map(|e| e.count());
            assert!(
                matches!(&queued, Err(e) if e.kind() == ErrorKind::WouldBlock),
                "{queued:?}"
            );
        }

        #[test]
        fn an_overflow_watches_the_tree_as_it_is_now() {
            let (outside, _dir, root) = folder_with("a/sub");
            std::fs::create_dir_all(root.join("b")).unwrap();
            let (inotify, mut tree) = tree(&root);
            // Changes whose events are lost: a directory moved out, one moved within,
            // one made.
            std::fs::rename(root.join("a"), outside.path().join("a")).unwrap();
            std::fs::rename(root.join("b"), root.join("c")).unwrap();
            std::fs::create_dir_all(root.join("c/new/deeper")).unwrap();
            let mut out = Vec::new();
            tree.overflowed(&mut out);
            assert_eq!(watched(&tree, &root), ["", "c", "c/new", "c/new/deeper"]);
            assert!(matches!(out.as_slice(), [Ok(e)] if e.need_rescan()));
            drop(inotify);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use notify::EventKind;

    use super::*;

    /// Paths of the events `rx` delivers until `want` is among them (or two seconds pass),
    /// then for 200 ms more.
    fn paths_until(rx: &mpsc::Receiver<WatchResult>, want: &Path) -> BTreeSet<PathBuf> {
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut until = deadline;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Ok(event)) => {
                    assert!(
                        !matches!(
                            event.kind,
                            EventKind::Access(notify::event::AccessKind::Open(_))
                        ),
                        "an open was reported: {event:?}"
                    );
                    for p in event.paths {
                        if p == want && until == deadline {
                            until = Instant::now() + Duration::from_millis(200);
                        }
                        seen.insert(p);
                    }
                }
                Ok(Err(e)) => panic!("watcher error: {e}"),
                Err(_) => break,
            }
        }
        seen
    }

    fn start(root: &Path) -> (FolderWatcher, mpsc::Receiver<WatchResult>) {
        start_skipping(root, Box::new(|_| false))
    }

    fn start_skipping(root: &Path, skip: Skip) -> (FolderWatcher, mpsc::Receiver<WatchResult>) {
        let (tx, rx) = mpsc::channel();
        let watcher = watch(root, skip, move |r| {
            let _ = tx.send(r);
        })
        .expect("watching a temp dir");
        (watcher, rx)
    }

    #[test]
    fn the_folder_itself_removed_or_moved_is_an_error() {
        for moved in [false, true] {
            let outside = tempfile::tempdir().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().canonicalize().unwrap().join("folder");
            std::fs::create_dir(&root).unwrap();
            let (_w, rx) = start(&root);
            if moved {
                std::fs::rename(&root, outside.path().join("folder")).unwrap();
            } else {
                std::fs::remove_dir(&root).unwrap();
            }
            let error = (0..20)
                .filter_map(|_| rx.recv_timeout(Duration::from_millis(100)).ok())
                .find_map(Result::err);
            assert!(error.is_some(), "moved: {moved}");
        }
    }

    #[test]
    fn a_directory_moved_within_the_folder_reports_under_its_new_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/sub")).unwrap();
        let (_w, rx) = start(&root);
        std::fs::rename(root.join("a"), root.join("b")).unwrap();
        paths_until(&rx, &root.join("b"));
        std::fs::write(root.join("b/sub/f.txt"), b"x").unwrap();
        let seen = paths_until(&rx, &root.join("b/sub/f.txt"));
        assert!(seen.contains(&root.join("b/sub/f.txt")), "{seen:?}");
        assert!(
            !seen.iter().any(|p| p.starts_with(root.join("a"))),
            "{seen:?}"
        );
    }

    #[test]
    fn a_directory_moved_out_of_the_folder_is_no_longer_watched() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/sub")).unwrap();
        let (_w, rx) = start(&root);
        std::fs::rename(root.join("a"), outside.path().join("a")).unwrap();
        paths_until(&rx, &root.join("a"));
        std::fs::write(outside.path().join("a/sub/f.txt"), b"x").unwrap();
        std::fs::write(root.join("marker"), b"x").unwrap();
        let seen = paths_until(&rx, &root.join("marker"));
        assert_eq!(seen, BTreeSet::from([root.join("marker")]));
    }

    #[test]
    fn new_directories_are_watched_and_reads_and_symlinks_are_not() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("o.txt"), b"o").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("r.txt"), b"r").unwrap();
        let (_w, rx) = start(&root);
        std::fs::create_dir_all(root.join("n/m")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        paths_until(&rx, &root.join("link"));
        std::fs::read(root.join("r.txt")).unwrap();
        std::fs::write(outside.path().join("o.txt"), b"changed").unwrap();
        std::fs::write(root.join("n/m/f.txt"), b"x").unwrap();
        let seen = paths_until(&rx, &root.join("n/m/f.txt"));
        assert_eq!(seen, BTreeSet::from([root.join("n/m/f.txt")]));
    }

    /// An ignored directory is not watched, nor anything below it, whether it was there
    /// at the start or came later; the directories beside it are.
    #[cfg(target_os = "linux")]
    #[test]
    fn skipped_directories_are_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("skipped/deep")).unwrap();
        std::fs::create_dir_all(root.join("kept")).unwrap();
        let (_w, rx) = start_skipping(
            &root,
            Box::new(|p: &Path| p.file_name().is_some_and(|n| n == "skipped")),
        );
        std::fs::create_dir_all(root.join("kept/skipped/deep")).unwrap();
        paths_until(&rx, &root.join("kept/skipped"));
        std::fs::write(root.join("skipped/f.txt"), b"x").unwrap();
        std::fs::write(root.join("skipped/deep/f.txt"), b"x").unwrap();
        std::fs::write(root.join("kept/skipped/deep/f.txt"), b"x").unwrap();
        std::fs::write(root.join("kept/f.txt"), b"x").unwrap();
        let seen = paths_until(&rx, &root.join("kept/f.txt"));
        assert_eq!(seen, BTreeSet::from([root.join("kept/f.txt")]));
    }
}
