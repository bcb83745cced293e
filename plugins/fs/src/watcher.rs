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
//! it points (outside the folder, perhaps) and reported below the link.

use std::path::Path;

/// What the watcher hands on: one event, or an error after which it may miss changes.
pub(crate) type WatchResult = notify::Result<notify::Event>;

/// Watches `root` and the tree below it until dropped, handing each event to `handler`
/// (on a thread of the watcher's own).
pub(crate) fn watch(
    root: &Path,
    handler: impl FnMut(WatchResult) + Send + 'static,
) -> notify::Result<FolderWatcher> {
    imp::watch(root, handler).map(FolderWatcher)
}

/// A running watcher of one folder's tree; dropping it stops it.
pub(crate) struct FolderWatcher(#[allow(dead_code)] imp::Watcher);

impl std::fmt::Debug for FolderWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FolderWatcher")
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::path::Path;

    use notify::{RecursiveMode, Watcher as _};

    use super::WatchResult;

    pub(super) type Watcher = notify::RecommendedWatcher;

    pub(super) fn watch(
        root: &Path,
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
        Ok(watcher)
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::{BTreeMap, HashMap};
    use std::ffi::OsStr;
    use std::io::{self, ErrorKind};
    use std::os::fd::AsRawFd;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
    use mio::unix::SourceFd;
    use mio::{Interest, Poll, Token, Waker};
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, Flag, MetadataKind, ModifyKind, RemoveKind,
        RenameMode,
    };
    use notify::{Event, EventKind};

    use super::WatchResult;

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

    /// Stops the watcher's thread when dropped.
    pub(in super::super) struct Watcher {
        stop: Arc<AtomicBool>,
        waker: Waker,
    }

    impl Drop for Watcher {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            // The thread then ends at its next wake-up (it may be in a walk of a new
            // directory); if waking fails it ends with the process.
            let _ = self.waker.wake();
        }
    }

    pub(super) fn watch(
        root: &Path,
        handler: impl FnMut(WatchResult) + Send + 'static,
    ) -> notify::Result<Watcher> {
        let inotify = Inotify::init().map_err(notify::Error::io)?;
        let poll = Poll::new().map_err(notify::Error::io)?;
        let fd = inotify.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), INOTIFY, Interest::READABLE)
            .map_err(notify::Error::io)?;
        let waker = Waker::new(poll.registry(), WAKE).map_err(notify::Error::io)?;
        let mut tree = Tree {
            watches: inotify.watches(),
            root: root.to_path_buf(),
            dirs: HashMap::new(),
            paths: BTreeMap::new(),
        };
        tree.add(root, true)
            .map_err(|e| notify::Error::io_watch(e).add_path(root.to_path_buf()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("converge-watch".into())
            .spawn(move || run(inotify, poll, tree, &stopped, handler))
            .map_err(notify::Error::io)?;
        Ok(Watcher { stop, waker })
    }

    /// The watcher's thread: waits for events, reads them all, hands them on.
    fn run(
        mut inotify: Inotify,
        mut poll: Poll,
        mut tree: Tree,
        stop: &AtomicBool,
        mut handler: impl FnMut(WatchResult),
    ) {
        let mut buffer = vec![0u8; BUFFER];
        let mut ready = mio::Events::with_capacity(4);
        loop {
            match poll.poll(&mut ready, None) {
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
                for event in events {
                    tree.take(event, &mut handler);
                }
                if stop.load(Ordering::Acquire) {
                    return;
                }
            }
        }
    }

    /// The watched directories of the tree.
    struct Tree {
        watches: Watches,
        root: PathBuf,
        /// Watch → the directory it is on.
        dirs: HashMap<i32, PathBuf>,
        /// Directory → its watch, sorted so that a directory's subtree is a range.
        paths: BTreeMap<PathBuf, WatchDescriptor>,
    }

    impl Tree {
        /// Watches `dir` and every directory below it. Entries that are gone or are no
        /// directories (any more) are skipped: their removal or replacement is an event of
        /// its own. Adding a watch to a directory already watched keeps its watch.
        fn add(&mut self, dir: &Path, root: bool) -> io::Result<()> {
            let mut stack = vec![dir.to_path_buf()];
            let mut first = root;
            while let Some(dir) = stack.pop() {
                let mask = if std::mem::take(&mut first) {
                    ROOT_MASK
                } else {
                    MASK
                };
                match self.watches.add(&dir, mask) {
                    Ok(wd) => self.remember(dir.clone(), wd),
                    Err(e) if vanished(&e) => continue,
                    Err(e) => return Err(e),
                }
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if vanished(&e) => continue,
                    Err(e) => return Err(e),
                };
                for entry in entries {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(e) if vanished(&e) => break,
                        Err(e) => return Err(e),
                    };
                    // The type the listing gives (lstat when it gives none): a symlink is
                    // not a directory here.
                    match entry.file_type() {
                        Ok(t) if t.is_dir() => stack.push(entry.path()),
                        Ok(_) => {}
                        Err(e) if vanished(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        }

        fn remember(&mut self, dir: PathBuf, wd: WatchDescriptor) {
            let id = wd.get_watch_descriptor_id();
            if let Some(before) = self.dirs.insert(id, dir.clone()) {
                if before != dir
                    && self.paths.get(&before).map(|w| w.get_watch_descriptor_id()) == Some(id)
                {
                    self.paths.remove(&before);
                }
            }
            self.paths.insert(dir, wd);
        }

        /// Stops watching `dir` and the directories below it (moved away: their watches
        /// would go on reporting changes under the old paths).
        fn forget(&mut self, dir: &Path) {
            let below: Vec<PathBuf> = self
                .paths
                .range(dir.to_path_buf()..)
                .take_while(|(p, _)| p.starts_with(dir))
                .map(|(p, _)| p.clone())
                .collect();
            for path in below {
                if let Some(wd) = self.paths.remove(&path) {
                    self.dirs.remove(&wd.get_watch_descriptor_id());
                    // Already gone with its directory, perhaps: nothing to undo.
                    let _ = self.watches.remove(wd);
                }
            }
        }

        /// Takes one event from the kernel: keeps the watches in step with the tree and
        /// hands the event on.
        fn take(&mut self, event: inotify::Event<&OsStr>, handler: &mut impl FnMut(WatchResult)) {
            let mask = event.mask;
            if mask.contains(EventMask::Q_OVERFLOW) {
                // Events were lost, directories made meanwhile among them: watch what is
                // there now, then ask for a rescan.
                let root = self.root.clone();
                if let Err(e) = self.add(&root, true) {
                    handler(Err(notify::Error::io_watch(e).add_path(root)));
                }
                handler(Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan)));
                return;
            }
            let id = event.wd.get_watch_descriptor_id();
            let Some(dir) = self.dirs.get(&id) else {
                // A watch forgotten already; its last events say nothing new.
                return;
            };
            let path = match event.name {
                Some(name) => dir.join(name),
                None => dir.clone(),
            };
            if mask.contains(EventMask::IGNORED) {
                // The directory was removed (or its file system unmounted).
                self.dirs.remove(&id);
                if self.paths.get(&path).map(|w| w.get_watch_descriptor_id()) == Some(id) {
                    self.paths.remove(&path);
                }
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
                EventKind::Remove(RemoveKind::Folder)
            } else if mask.contains(EventMask::MOVE_SELF) {
                EventKind::Modify(ModifyKind::Name(RenameMode::Any))
            } else {
                return;
            };
            if is_dir && mask.contains(EventMask::MOVED_FROM) {
                self.forget(&path);
            }
            if is_dir && (mask.contains(EventMask::CREATE) || mask.contains(EventMask::MOVED_TO)) {
                // Watched before the event is handed on, so that the scan of it the
                // source makes misses nothing written there afterwards.
                if let Err(e) = self.add(&path, false) {
                    handler(Err(notify::Error::io_watch(e).add_path(path.clone())));
                }
            }
            handler(Ok(Event::new(kind).add_path(path)));
        }
    }

    /// Whether `e` says the entry is gone or is no directory: a change the watcher hears
    /// of anyway, no failure.
    fn vanished(e: &io::Error) -> bool {
        e.kind() == ErrorKind::NotFound
            || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP))
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
        let (tx, rx) = mpsc::channel();
        let watcher = watch(root, move |r| {
            let _ = tx.send(r);
        })
        .expect("watching a temp dir");
        (watcher, rx)
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
}
