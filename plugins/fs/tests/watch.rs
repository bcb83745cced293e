//! The watcher: changes made while the source runs become events within moments.
#![allow(clippy::unwrap_used)]

mod common;

use common::{wait_until, write};
use converge_api::EntryKind::{Dir, File};
use converge_framework::log::EventLog;
use converge_framework::plugin::{ScanProgress, Source, SourceContext};
use converge_plugin_fs::{FsConfig, FsSource};
use tokio::sync::watch;

/// A source running on its own task, its first scan done.
struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), converge_framework::PluginError>>,
}

impl Running {
    /// Runs `source` over `log` and waits for its first scan.
    async fn start(source: impl Source + 'static, log: &EventLog) -> Running {
        let (stop, stop_rx) = watch::channel(false);
        let (progress_tx, mut progress_rx) = watch::channel(ScanProgress::default());
        let log = log.clone();
        let task = tokio::spawn(async move {
            source
                .run(SourceContext::new(log, stop_rx, progress_tx))
                .await
        });
        progress_rx.wait_for(|p| p.done).await.unwrap();
        Running { stop, task }
    }

    /// Runs the source of a folder whose store (returned, started, not applying on its
    /// own) shares its echo record, and waits for the first scan.
    async fn start_folder(
        config: FsConfig,
        log: &EventLog,
    ) -> (Running, converge_plugin_fs::FsStore) {
        use converge_framework::plugin::{Store, StoreContext};
        let (source, store) = converge_plugin_fs::folder(config);
        store.start(&StoreContext::new(log.clone())).await.unwrap();
        (Running::start(source, log).await, store)
    }

    /// Stops the source and asserts it ended without an error.
    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// A peer's newer version of `f.txt` (`bytes`, on top of its heads), not appended yet,
/// with the folder store's cursor set past everything before it: the store has shown what
/// the log held so far, and shows nothing after it in the test.
async fn peers_newer_f(log: &EventLog, bytes: &[u8]) -> converge_api::Event {
    log.set_cursor("folder", log.len()).await.unwrap();
    let f = common::key("f.txt");
    let parents = log.heads(&f).unwrap().iter().map(|h| h.id).collect();
    common::remote_put(log, 1, "f.txt", bytes, u64::MAX / 2, parents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_modified_renamed_and_deleted_entries_become_events() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "existing.txt", b"old");
    write(&root, ".convergeignore", b"*.tmp\n");
    let log = common::log();
    let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;
    assert_eq!(log.len(), 1);

    write(&root, "new.txt", b"fresh");
    write(&root, "scratch.tmp", b"ignored");
    wait_until(&log, "new.txt", |s| {
        s.get("new.txt") == Some(&(File, 5, false))
    })
    .await;

    write(&root, "new.txt", b"fresh and longer");
    wait_until(&log, "new.txt modified", |s| {
        s.get("new.txt") == Some(&(File, 16, false))
    })
    .await;

    std::fs::rename(root.join("new.txt"), root.join("renamed.txt")).unwrap();
    wait_until(&log, "the file renamed", |s| {
        !s.contains_key("new.txt") && s.get("renamed.txt") == Some(&(File, 16, false))
    })
    .await;

    std::fs::create_dir(root.join("folder")).unwrap();
    write(&root, "folder/inner/a.txt", b"a");
    wait_until(&log, "the new folder", |s| {
        s.get("folder") == Some(&(Dir, 0, false))
            && s.get("folder/inner") == Some(&(Dir, 0, false))
            && s.get("folder/inner/a.txt") == Some(&(File, 1, false))
    })
    .await;

    std::fs::rename(root.join("folder"), root.join("moved")).unwrap();
    wait_until(&log, "the folder renamed", |s| {
        !s.keys().any(|k| k.starts_with("folder"))
            && s.get("moved") == Some(&(Dir, 0, false))
            && s.get("moved/inner/a.txt") == Some(&(File, 1, false))
    })
    .await;

    std::fs::remove_dir_all(root.join("moved")).unwrap();
    std::fs::remove_file(root.join("existing.txt")).unwrap();
    wait_until(&log, "the deletes", |s| {
        s.keys().collect::<Vec<_>>() == ["renamed.txt"]
    })
    .await;

    // The ignored file never became a key, and nothing is emitted twice once settled.
    let settled = log.len();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(log.len(), settled);
    let keys: Vec<String> = log
        .read(0, 1000)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.key.to_string())
        .collect();
    assert!(!keys.iter().any(|k| k.ends_with(".tmp")), "{keys:?}");

    running.stop().await;
}

/// A symlink to a directory is skipped, and so is what happens in the directory it points
/// to: outside the folder (not the folder's), or inside it (its own path's). Links to a
/// folder's directory share its inotify watch, and once took it over: a change in the
/// directory came in as a change below the last link walked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_below_a_symlinked_directory_are_not_events() {
    let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let root = dir.path().to_owned();
    write(&root, "existing.txt", b"old");
    write(&root, "real/inside.txt", b"inside");
    write(outside.path(), "before.txt", b"before");
    std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
    for name in ["a", "m", "zz"] {
        std::os::unix::fs::symlink(root.join("real"), root.join(name)).unwrap();
    }
    let log = common::log();
    let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;

    write(outside.path(), "after.txt", b"after");
    write(outside.path(), "before.txt", b"before, changed");
    write(outside.path(), "sub/deeper.txt", b"deeper");
    std::fs::remove_file(outside.path().join("before.txt")).unwrap();
    write(&root, "real/new.txt", b"new");
    // Written after those: once it is an event, they have been seen.
    write(&root, "sentinel.txt", b"s");
    wait_until(&log, "sentinel.txt", |s| s.contains_key("sentinel.txt")).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let keys: Vec<String> = log.states().map(|e| e.unwrap().0.to_string()).collect();
    assert_eq!(
        keys,
        [
            "existing.txt",
            "real",
            "real/inside.txt",
            "real/new.txt",
            "sentinel.txt"
        ]
    );

    running.stop().await;
}

/// A directory removed (`rm -rf`) or moved away, and a symlink made in its place at once
/// (to a directory holding the same names), while the folder is watched: the watcher saw
/// the directory go, and its keys went with it, though the link shows their names again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_replaced_by_a_symlink_while_watched_is_removed_with_its_contents() {
    let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let root = dir.path().to_owned();
    write(&root, "removed/f.txt", b"f");
    write(&root, "moved/g.txt", b"g");
    write(&root, "kept.txt", b"kept");
    write(outside.path(), "same/f.txt", b"f");
    write(outside.path(), "same/g.txt", b"g");
    let log = common::log();
    let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;

    std::fs::remove_dir_all(root.join("removed")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("same"), root.join("removed")).unwrap();
    std::fs::rename(root.join("moved"), outside.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("same"), root.join("moved")).unwrap();
    wait_until(&log, "the removals", |s| {
        s.keys().collect::<Vec<_>>() == ["kept.txt"]
    })
    .await;

    running.stop().await;
}

/// A symlink where the log shows a peer's directory of files (the store wrote nothing
/// below the link), replaced by another link while the folder is watched (removed and
/// made again, then moved aside and made again): no directory went, and nothing of the
/// peer's directory is taken for removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_replaced_while_watched_removes_nothing_of_a_peers_directory() {
    let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let root = dir.path().to_owned();
    for target in ["first", "second"] {
        std::fs::create_dir(outside.path().join(target)).unwrap();
    }
    let link = |target: &str| {
        std::os::unix::fs::symlink(outside.path().join(target), root.join("photos")).unwrap()
    };
    link("first");
    let log = common::log();
    let (running, store) = Running::start_folder(FsConfig::new(&root), &log).await;
    common::peers_directory(&log, "photos", &["a.jpg", "b.jpg"]).await;
    common::apply(&store, &log, common::views(&log)).await;
    log.set_cursor("folder", log.len()).await.unwrap();
    assert!(
        !outside.path().join("first/a.jpg").exists(),
        "written through the link"
    );
    let len = log.len();

    std::fs::remove_file(root.join("photos")).unwrap();
    link("second");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    std::fs::rename(root.join("photos"), root.join("photos.old")).unwrap();
    link("first");
    write(&root, "sentinel.txt", b"s");
    wait_until(&log, "sentinel.txt", |s| s.contains_key("sentinel.txt")).await;
    // Past the release of what the watcher held.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let deletes = common::deletes_since(&log, len);
    assert!(deletes.is_empty(), "removals recorded: {deletes:?}");

    running.stop().await;
}

/// Without a watcher (configured so here; also when watching fails, at the kernel's limit
/// of watches, say) the source keeps rescanning the folder: changes still become events,
/// removals included, and the source runs until it is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwatched_folder_is_rescanned() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "existing.txt", b"old");
    let log = common::log();
    let config = FsConfig::new(&root).rescan_every(std::time::Duration::from_millis(200));
    let running = Running::start(FsSource::new(config), &log).await;

    write(&root, "new.txt", b"fresh");
    wait_until(&log, "new.txt", |s| {
        s.get("new.txt") == Some(&(File, 5, false))
    })
    .await;
    std::fs::remove_file(root.join("existing.txt")).unwrap();
    wait_until(&log, "the removal", |s| {
        s.keys().collect::<Vec<_>>() == ["new.txt"]
    })
    .await;
    assert!(!running.task.is_finished(), "the source stopped");

    running.stop().await;
}

/// An `rm -rf` of a whole unwatched folder, seen by its rescans half way through (the
/// marker, removed somewhere in the middle, still there): the removals they find are held
/// as the watcher's are, and once the marker is gone none is recorded. (A watched folder
/// whose watcher's queue overflowed during the `rm -rf` is rescanned the same way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescan_during_an_rm_rf_of_the_folder_records_no_removal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    for d in ["a", "b", "c", "d"] {
        for f in 0..3 {
            write(&root, &format!("{d}/sub/{f}.txt"), b"kept elsewhere");
        }
    }
    let log = common::log();
    let config = FsConfig::new(&root).rescan_every(std::time::Duration::from_millis(100));
    let running = Running::start(FsSource::new(config), &log).await;
    wait_until(&log, "the first scan", |s| s.len() == 4 * 5).await;
    let len = log.len();

    // Half way: two directories gone, the marker still there, for a few rescans.
    std::fs::remove_dir_all(root.join("a")).unwrap();
    std::fs::remove_dir_all(root.join("b")).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    // Then the marker and the rest.
    std::fs::remove_file(root.join(converge_plugin_fs::MARKER_FILE)).unwrap();
    for d in ["c", "d"] {
        std::fs::remove_dir_all(root.join(d)).unwrap();
    }
    after_an_rm_rf_of_the_folder(running, &log, len).await;
}

/// The end of an `rm -rf` of the whole folder, marker included: once every removal held
/// is released (a second without a new one), none is recorded after log length `len`;
/// the source stops at the release, the marker missing (the engine would start it again
/// once the marker is back), or runs on.
async fn after_an_rm_rf_of_the_folder(running: Running, log: &EventLog, len: u64) {
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let deletes = common::deletes_since(log, len);
    assert!(deletes.is_empty(), "removals recorded: {deletes:?}");

    running.stop.send(true).unwrap();
    if let Err(e) = running.task.await.unwrap() {
        assert!(
            e.to_string().contains(converge_plugin_fs::MARKER_FILE),
            "{e}"
        );
    }
}

/// An `rm -rf` of the whole watched folder that takes longer than ten seconds, removals
/// never a second apart, and reaches the marker last: none is recorded. (Regression: a
/// removal was held ten seconds at most, and everything removed before then was recorded
/// with the marker still there, so deleting a large folder deleted it in part on every
/// replica.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_rm_rf_of_the_watched_folder_records_no_removal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    const DIRS: usize = 26;
    for d in 0..DIRS {
        write(&root, &format!("d{d:02}/f.txt"), b"kept elsewhere");
    }
    let log = common::log();
    let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;
    wait_until(&log, "the first scan", |s| s.len() == 2 * DIRS).await;
    let len = log.len();

    // A directory every half second for 12.5 s, then the marker.
    for d in 0..DIRS - 1 {
        std::fs::remove_dir_all(root.join(format!("d{d:02}"))).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    std::fs::remove_file(root.join(converge_plugin_fs::MARKER_FILE)).unwrap();
    std::fs::remove_dir_all(root.join(format!("d{:02}", DIRS - 1))).unwrap();
    after_an_rm_rf_of_the_folder(running, &log, len).await;
}

/// A directory renamed over one the log shows (`mv new d`), or made again and filled
/// after a removal, is scanned whole: its contents came with it and made no events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_moved_over_a_known_one_is_scanned() {
    // Both in the system's temp dir, one file system: the renames are renames.
    let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let root = dir.path().to_owned();
    write(&root, "d/old.txt", b"old");
    write(outside.path(), "new/g.txt", b"g");
    write(outside.path(), "new/sub/h.txt", b"hh");
    let log = common::log();
    let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;

    std::fs::rename(root.join("d"), outside.path().join("gone")).unwrap();
    std::fs::rename(outside.path().join("new"), root.join("d")).unwrap();
    wait_until(&log, "the new d", |s| {
        s.keys().collect::<Vec<_>>() == ["d", "d/g.txt", "d/sub", "d/sub/h.txt"]
    })
    .await;

    running.stop().await;
}

/// A rescan while the store is behind (it has not yet written a peer's newer `f.txt`,
/// nor its new `g.txt`, nor a plugin's new `p.txt`) records neither the older file it
/// finds nor the absences: either would undo those changes on every replica. A file there in a state the log
/// does not know is the user's change, and is recorded; so is the removal of a file whose
/// event this replica recorded, even one the store has not passed over yet (the folder
/// showed it when it was read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescan_does_not_undo_what_the_store_has_not_written_yet() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "f.txt", b"v1");
    let log = common::log();
    let config = FsConfig::new(&root).rescan_every(std::time::Duration::from_millis(100));
    let (running, _store) = Running::start_folder(config, &log).await;
    let newer = peers_newer_f(&log, b"version 2, a peer's").await;
    let new = common::remote_put(&log, 2, "g.txt", b"new, a peer's", u64::MAX / 2, vec![]);
    log.append(vec![newer, new]).await.unwrap();
    // This replica's own event from another source (a plugin's), not written yet either.
    let plugin = common::remote_put(&log, 3, "p.txt", b"a plugin's record", 1, vec![]);
    log.append_local(vec![converge_framework::log::LocalChange::new(
        common::key("p.txt"),
        plugin.op,
    )])
    .await
    .unwrap();
    let len = log.len();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(
        log.len(),
        len,
        "a rescan recorded: {:#?}",
        common::shown(&log)
    );

    write(&root, "f.txt", b"the user's own, v3");
    wait_until(&log, "the user's f.txt", |s| {
        s.get("f.txt") == Some(&(File, 18, false))
    })
    .await;
    write(&root, "h.txt", b"h");
    wait_until(&log, "h.txt", |s| s.contains_key("h.txt")).await;
    std::fs::remove_file(root.join("h.txt")).unwrap();
    wait_until(&log, "h.txt removed", |s| !s.contains_key("h.txt")).await;

    running.stop().await;
}

/// A file saved again unchanged (an older version the log knows) while the store has not
/// written the peer's newer one yet is not recorded by the watcher (it would undo the
/// peer's version on every replica), as a scan would not record it; an edit to new
/// content is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_version_saved_again_does_not_undo_what_the_store_has_not_written_yet() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "f.txt", b"v1");
    let log = common::log();
    let (running, _store) = Running::start_folder(FsConfig::new(&root), &log).await;
    let newer = peers_newer_f(&log, b"v2, a peer's").await;
    log.append(vec![newer]).await.unwrap();
    // Saved again as it was (v1's bytes, another mtime), then another file, whose record
    // says the watcher has been through both.
    write(&root, "f.txt", b"v1");
    common::set_mtime(&root, "f.txt", 1_800_000_000);
    write(&root, "g.txt", b"g");
    wait_until(&log, "g.txt", |s| s.contains_key("g.txt")).await;
    assert_eq!(
        common::shown(&log).get("f.txt"),
        Some(&(File, 12, false)),
        "the peer's version was undone"
    );

    write(&root, "f.txt", b"the user's own, v3");
    wait_until(&log, "the user's f.txt", |s| {
        s.get("f.txt") == Some(&(File, 18, false))
    })
    .await;

    running.stop().await;
}

/// The folder itself removed, or moved away and replaced by another directory, while the
/// source watches it: the source fails (shown down, started again by the engine once the
/// folder is back) rather than watch nothing, and records nothing.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_folder_itself_gone_stops_the_source_with_an_error() {
    for replaced in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("folder");
        std::fs::create_dir(&root).unwrap();
        let log = common::log();
        let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;
        let len = log.len();

        if replaced {
            std::fs::rename(&root, dir.path().join("folder.old")).unwrap();
            std::fs::create_dir(&root).unwrap();
        } else {
            std::fs::remove_dir_all(&root).unwrap();
        }
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), running.task)
            .await
            .expect("the source still runs")
            .unwrap();
        let error = ended.expect_err("the source ended without an error");
        assert!(error.to_string().contains("the folder is gone"), "{error}");
        assert_eq!(log.len(), len, "recorded: {:#?}", common::shown(&log));
    }
}

/// A known directory moved away and made again at once (`mv d d2; mkdir d; ...`) is
/// scanned whole: its old keys are gone, and files written into it before the watcher
/// watched it made no events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_moved_away_and_made_again_is_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "d/old.txt", b"old");
    let log = common::log();
    let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;

    // Within one debounce: the known `d` leaves (a move, no removal), a new `d` comes
    // with contents that may precede its watch.
    std::fs::rename(root.join("d"), root.join("d2")).unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/new.txt"), b"new").unwrap();
    wait_until(&log, "d2 and the new d", |s| {
        s.len() == 4
            && s.contains_key("d/new.txt")
            && s.contains_key("d2/old.txt")
            && !s.contains_key("d/old.txt")
    })
    .await;

    running.stop().await;
}

/// A removal the watcher holds is recorded at release only where the folder showed the
/// key's heads: a file removed while a peer's newer version waits for the store is not
/// removed over that version (the store then writes it), as a scan would judge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_removal_does_not_undo_what_the_store_has_not_written_yet() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "f.txt", b"v1");
    write(&root, "g.txt", b"g");
    let log = common::log();
    let (running, _store) = Running::start_folder(FsConfig::new(&root), &log).await;
    let newer = peers_newer_f(&log, b"v2, a peer's").await;
    log.append(vec![newer]).await.unwrap();
    std::fs::remove_file(root.join("f.txt")).unwrap();
    std::fs::remove_file(root.join("g.txt")).unwrap();
    // Both removals are held and released together: g.txt's is recorded.
    wait_until(&log, "g.txt removed", |s| !s.contains_key("g.txt")).await;
    assert_eq!(
        common::shown(&log).get("f.txt"),
        Some(&(File, 12, false)),
        "the peer's version was removed"
    );

    running.stop().await;
}

/// The same when the store made `d` moments before (a peer's file in it), and the user
/// moves `d` away or removes it, then makes it again: what the store last did there does
/// not keep the new `d` from being scanned, and the old keys go.
async fn store_made_directory_made_again(removed: bool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let log = common::log();
    let (running, store) = Running::start_folder(FsConfig::new(&root), &log).await;
    let old = common::remote_put(&log, 1, "d/old.txt", b"a peer's", 1, vec![]);
    log.append(vec![old]).await.unwrap();
    common::apply(&store, &log, common::views(&log)).await;
    log.set_cursor("folder", log.len()).await.unwrap();
    assert!(root.join("d/old.txt").is_file());
    // The store's own writes come back as events and are taken for echoes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    if removed {
        std::fs::remove_dir_all(root.join("d")).unwrap();
    } else {
        std::fs::rename(root.join("d"), root.join("d2")).unwrap();
    }
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/new.txt"), b"new").unwrap();
    wait_until(&log, "the new d", |s| {
        s.contains_key("d/new.txt")
            && s.contains_key("d2/old.txt") != removed
            && !s.contains_key("d/old.txt")
    })
    .await;

    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_the_store_made_moved_away_and_made_again_is_scanned() {
    store_made_directory_made_again(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_the_store_made_removed_and_made_again_is_scanned() {
    store_made_directory_made_again(true).await;
}

/// A directory removed and made again at once (`rm -rf d; mkdir d; ...`) is scanned
/// whole: files written into it before the watcher watched it made no events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_removed_and_made_again_is_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "d/old.txt", b"old");
    let log = common::log();
    let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;

    std::fs::remove_dir_all(root.join("d")).unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    for n in 0..50 {
        std::fs::write(root.join(format!("d/{n:02}.txt")), b"n").unwrap();
    }
    wait_until(&log, "the new d", |s| {
        s.len() == 51 && s.contains_key("d/49.txt") && !s.contains_key("d/old.txt")
    })
    .await;

    running.stop().await;
}

/// A folder whose `.convergeignore` excludes `build/` (which holds `old.o`) beside
/// `src/a.rs`, its source started with the configuration `config` makes for its root,
/// and the first scan recorded.
async fn start_with_build_ignored(
    config: impl FnOnce(&std::path::Path) -> FsConfig,
) -> (tempfile::TempDir, EventLog, Running) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, ".convergeignore", b"build/\n");
    write(root, "build/old.o", b"old");
    write(root, "src/a.rs", b"a");
    let log = common::log();
    let running = Running::start(FsSource::new(config(root)), &log).await;
    wait_until(&log, "the first scan", |s| {
        s.keys().collect::<Vec<_>>() == ["src", "src/a.rs"]
    })
    .await;
    (dir, log, running)
}

/// A directory the ignore rules exclude is not watched. Once `.convergeignore` no longer
/// excludes it, the rescan that follows records what is in it, and the watcher, started
/// again with the new rules, sees what changes there next (the folder is watched: no
/// periodic rescan would find it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_no_longer_ignored_is_recorded_and_watched() {
    let (dir, log, running) = start_with_build_ignored(|root| FsConfig::new(root)).await;
    let root = dir.path().to_owned();

    write(&root, "build/during.o", b"during");
    write(&root, "src/b.rs", b"b");
    wait_until(&log, "src/b.rs", |s| s.contains_key("src/b.rs")).await;
    assert!(
        !common::shown(&log).keys().any(|k| k.starts_with("build")),
        "an ignored directory was recorded"
    );

    write(&root, ".convergeignore", b"");
    wait_until(&log, "the rescan with the new rules", |s| {
        s.get("build/old.o") == Some(&(File, 3, false))
            && s.get("build/during.o") == Some(&(File, 6, false))
    })
    .await;
    write(&root, "build/new.o", b"new");
    write(&root, "build/deep/x.o", b"x");
    wait_until(&log, "changes in the directory no longer ignored", |s| {
        s.get("build/new.o") == Some(&(File, 3, false))
            && s.get("build/deep/x.o") == Some(&(File, 1, false))
    })
    .await;

    running.stop().await;
}

/// Unwatched (configured so, or the watcher failed), the folder's periodic rescan notices
/// a change of `.convergeignore` itself and scans with the new rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwatched_folder_takes_up_new_ignore_rules() {
    let (dir, log, running) = start_with_build_ignored(|root| {
        FsConfig::new(root).rescan_every(std::time::Duration::from_millis(200))
    })
    .await;
    let root = dir.path().to_owned();

    write(&root, ".convergeignore", b"");
    wait_until(&log, "a rescan with the new rules", |s| {
        s.get("build/old.o") == Some(&(File, 3, false))
    })
    .await;

    running.stop().await;
}

/// A peer's file the folder's `.convergeignore` kept out (its store passed over the
/// event), once the pattern is taken out while the source runs: the rescan that follows
/// the change of the rules does not take it for removed (which would delete it on the
/// peer), and the store writes it from the log, asked to by the source (the engine calls
/// `retry` on `more_to_show`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_file_no_longer_ignored_is_written_not_removed() {
    use converge_framework::plugin::Store;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, ".convergeignore", b"*.iso\n");
    let log = common::log();
    let (running, store) = Running::start_folder(FsConfig::new(&root), &log).await;
    let iso = common::remote_put(&log, 1, "x.iso", b"the peer's image", 1, vec![]);
    log.append(vec![iso]).await.unwrap();
    common::apply(&store, &log, common::views(&log)).await;
    log.set_cursor("folder", log.len()).await.unwrap();
    assert!(!root.join("x.iso").exists(), "an ignored file was written");
    let len = log.len();

    write(&root, ".convergeignore", b"");
    // Once it is recorded, the rescan after the change of the rules has run.
    write(&root, "sentinel.txt", b"s");
    wait_until(&log, "sentinel.txt", |s| s.contains_key("sentinel.txt")).await;
    // Past the release of what the rescan may have held.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let deletes = common::deletes_since(&log, len);
    assert!(deletes.is_empty(), "removals recorded: {deletes:?}");
    assert_eq!(store.to_show(), 1);
    let woken = tokio::time::timeout(std::time::Duration::from_secs(1), store.more_to_show());
    assert!(woken.await.is_ok(), "the store was not told");

    common::apply(&store, &log, Vec::new()).await;
    assert_eq!(
        std::fs::read(root.join("x.iso")).unwrap(),
        b"the peer's image"
    );
    assert_eq!(store.to_show(), 0);
    // The store's write is no change of the folder's.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(log.len(), len + 1, "{:#?}", common::shown(&log));

    running.stop().await;
}

/// A FIFO where the ignore file would be holds nothing up: it is no ignore file (the rules
/// read none), and telling whether it changed opens it without waiting for a writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_as_the_ignore_file_holds_nothing_up() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "a.txt", b"a");
    let made = std::process::Command::new("mkfifo")
        .arg(root.join(".convergeignore"))
        .status()
        .unwrap();
    assert!(made.success());
    let log = common::log();
    let config = FsConfig::new(&root).rescan_every(std::time::Duration::from_millis(100));
    let started = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        Running::start(FsSource::new(config), &log),
    )
    .await;
    let Ok(running) = started else {
        // Lets an open waiting for a writer go (a FIFO opened for both never waits), so
        // that the test fails rather than hangs on its runtime's blocked thread.
        let _writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(root.join(".convergeignore"));
        panic!("the source's start waited on the FIFO");
    };
    write(&root, "b.txt", b"b");
    wait_until(&log, "a rescan past the FIFO", |s| {
        s.keys().collect::<Vec<_>>() == ["a.txt", "b.txt"]
    })
    .await;
    running.stop().await;
}

/// A tree made outside the folder and moved into it (the first change in a quiet folder,
/// so planned without waiting for the debounce) is recorded whole, and so is a second
/// tree moved in right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_moved_into_the_folder_are_recorded_whole() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let log = common::log();
    let running = Running::start(FsSource::new(FsConfig::new(&root)), &log).await;
    let make = |name: &str| {
        for d in 0..3 {
            for f in 0..20 {
                write(
                    outside.path(),
                    &format!("{name}/d{d}/f{f}.txt"),
                    &[b'x'; 100],
                );
            }
        }
    };
    make("first");
    make("second");
    std::fs::rename(outside.path().join("first"), root.join("first")).unwrap();
    std::fs::rename(outside.path().join("second"), root.join("second")).unwrap();
    wait_until(&log, "both trees", |s| {
        ["first", "second"].iter().all(|t| {
            s.get(*t) == Some(&(Dir, 0, false))
                && (0..3).all(|d| {
                    s.get(&format!("{t}/d{d}")) == Some(&(Dir, 0, false))
                        && (0..20).all(|f| {
                            s.get(&format!("{t}/d{d}/f{f}.txt")) == Some(&(File, 100, false))
                        })
                })
        })
    })
    .await;
    assert_eq!(common::shown(&log).len(), 2 * (1 + 3 + 60));
    running.stop().await;
}

/// A file rewritten in the same tick of the file system's clock as the version read, with
/// the same size, shows the same size and timestamps: only a read tells it apart. A read
/// of a file changed moments before (within `racy_margin`, here an hour so that every read
/// is) is racy, and the next look reads the file again whatever its stat says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_that_keeps_size_and_mtime_after_a_racy_read_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "f.txt", b"version 1");
    common::set_mtime(&root, "f.txt", 1_800_000_000);
    let log = common::log();
    let config = FsConfig::new(&root).racy_margin(std::time::Duration::from_secs(3600));
    let running = Running::start(FsSource::new(config), &log).await;
    wait_until(&log, "f.txt", |s| s.contains_key("f.txt")).await;

    // The same size and mtime, other bytes: a stat cannot tell.
    write(&root, "f.txt", b"version 2");
    common::set_mtime(&root, "f.txt", 1_800_000_000);
    let other = tempfile::tempdir().unwrap();
    write(other.path(), "v2", b"version 2");
    let v2 = converge_plugin_fs::content::hash_file(&other.path().join("v2")).unwrap();
    let key = common::key("f.txt");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let heads = log.heads(&key).unwrap();
        let recorded = heads.iter().any(|h| {
            matches!(&h.op, converge_api::Op::Put { content: Some(c), .. } if c.root == v2.root)
        });
        if recorded {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "version 2 was never recorded: {heads:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    running.stop().await;
}

/// A peer's version that comes while an edit made here is not recorded yet is not
/// written over it; the edit, once recorded, is concurrent with that version (it never
/// showed here) rather than on top of it: both are heads, for the conflict policy to
/// decide (a conflict copy keeps the peer's), not one silently superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_the_store_did_not_overwrite_is_concurrent_with_the_version_it_kept_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    write(&root, "f.txt", b"v1");
    let log = common::log();
    // A debounce long enough for the peer's version to come before the edit is recorded.
    let config = FsConfig::new(&root).debounce(std::time::Duration::from_secs(2));
    let (running, store) = Running::start_folder(config, &log).await;
    let key = common::key("f.txt");

    write(&root, "f.txt", b"the user's edit, not recorded yet");
    let peers = peers_newer_f(&log, b"a peer's version").await;
    log.append(vec![peers.clone()]).await.unwrap();
    common::apply(&store, &log, common::views(&log)).await;
    assert_eq!(
        std::fs::read(root.join("f.txt")).unwrap(),
        b"the user's edit, not recorded yet"
    );

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let edit = loop {
        let heads = log.heads(&key).unwrap();
        let local = heads
            .iter()
            .find(|h| h.id.origin == log.replica() && h.id != peers.parents[0]);
        if let Some(local) = local {
            break (local.clone(), heads);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edit was never recorded: {heads:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let (_, heads) = edit;
    assert!(
        heads.iter().any(|h| h.id == peers.id),
        "the edit superseded the peer's version it never showed: {heads:#?}"
    );
    assert_eq!(heads.len(), 2, "{heads:#?}");

    running.stop().await;
}

/// The same across a restart: the store left the edit in place and made its batch
/// durable, and the daemon stopped (killed) before the edit was recorded. The scan at the
/// next start records the edit concurrent with the version kept out, as the running
/// source would have, not over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_left_in_place_before_a_restart_is_concurrent_with_the_version_it_kept_out() {
    use converge_framework::log::LogConfig;
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let state = data.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    write(&root, "f.txt", b"v1");
    let key = common::key("f.txt");
    let open_log = || EventLog::open(LogConfig::new(data.path().join("log"))).unwrap();

    let peers = {
        let log = open_log();
        // A debounce longer than the test: the edit is not recorded before the kill.
        let config = FsConfig::new(&root)
            .state_dir(&state)
            .debounce(std::time::Duration::from_secs(600));
        let (running, store) = Running::start_folder(config, &log).await;
        write(&root, "f.txt", b"the user's edit, not recorded yet");
        let peers = peers_newer_f(&log, b"a peer's version").await;
        log.append(vec![peers.clone()]).await.unwrap();
        common::apply(&store, &log, common::views(&log)).await;
        // As the engine does once the batch is durable.
        log.set_cursor("folder", log.len()).await.unwrap();
        assert_eq!(
            std::fs::read(root.join("f.txt")).unwrap(),
            b"the user's edit, not recorded yet"
        );
        let heads: Vec<_> = log.heads(&key).unwrap().iter().map(|h| h.id).collect();
        assert_eq!(
            heads,
            vec![peers.id],
            "the edit was recorded before the kill"
        );
        running.task.abort();
        let _ = running.task.await;
        drop(store);
        log.close().await.unwrap();
        peers
    };

    let log = open_log();
    let config = FsConfig::new(&root).state_dir(&state);
    let (running, _store) = Running::start_folder(config, &log).await;
    let heads = log.heads(&key).unwrap();
    assert!(
        heads.iter().any(|h| h.id == peers.id),
        "the edit superseded the peer's version it never showed: {heads:#?}"
    );
    assert!(
        heads.iter().any(|h| h.id.origin == log.replica()),
        "the edit was not recorded: {heads:#?}"
    );
    assert_eq!(heads.len(), 2, "{heads:#?}");
    running.stop().await;
}

/// A saved decline file that cannot be read does not keep the folder from starting, and
/// the next sync replaces it (here, with nothing declined, removes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_decline_file_is_replaced_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("folder.declined");
    std::fs::write(&file, b"\xff not cbor").unwrap();
    let log = common::log();
    let config = FsConfig::new(dir.path()).state_dir(state.path());
    let (running, store) = Running::start_folder(config, &log).await;
    assert!(file.exists());
    common::apply(&store, &log, Vec::new()).await;
    assert!(!file.exists(), "the unreadable file was kept");
    running.stop().await;
}
