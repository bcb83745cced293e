//! The store: applying views into a folder, idempotence, crash repair, directory deletes,
//! conflict copies and echo suppression.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::{
    apply, key, make_executable, random_bytes, remote_put, scan_once, set_mtime, shown, tree,
    views, write,
};
use converge_api::{EntryKind, Head, Hlc, Op};
use converge_framework::log::{EventLog, LocalChange, LogConfig};
use converge_framework::plugin::{
    KeyView, ScanProgress, Source, SourceContext, Store, StoreContext,
};
use converge_plugin_fs::{folder, FsConfig, FsSource, FsStore, TEMP_PREFIX};
use tokio::sync::watch;

fn source_fixture(root: &std::path::Path) {
    write(root, "a.txt", b"hello");
    write(root, "empty.txt", b"");
    write(root, "big/data.bin", &random_bytes(5, 300_000));
    write(root, "big/sub dir/ünï.md", b"unicode");
    std::fs::create_dir_all(root.join("empty dir/inner")).unwrap();
    write(root, "run.sh", b"#!/bin/sh\necho hi\n");
    make_executable(root, "run.sh");
}

fn inodes(root: &std::path::Path) -> Vec<(String, u64, i64)> {
    tree(root)
        .keys()
        .map(|rel| {
            let m = std::fs::metadata(root.join(rel)).unwrap();
            (rel.clone(), m.ino(), m.mtime())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_views_reproduce_the_folder_idempotently_and_repair_torn_files() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    source_fixture(a.path());
    let log = common::log();
    scan_once(&FsSource::new(FsConfig::new(a.path())), &log).await;
    let store = FsStore::new(FsConfig::new(b.path()));
    apply(&store, &log, views(&log)).await;
    assert_eq!(tree(b.path()), tree(a.path()));
    let mtime = std::fs::metadata(b.path().join("big/data.bin"))
        .unwrap()
        .mtime();
    assert_eq!(
        mtime,
        std::fs::metadata(a.path().join("big/data.bin"))
            .unwrap()
            .mtime()
    );

    // Applying again rewrites nothing (same inodes) and leaves no temp file.
    let before = inodes(b.path());
    apply(&store, &log, views(&log)).await;
    assert_eq!(inodes(b.path()), before);
    assert_eq!(tree(b.path()), tree(a.path()));

    // A half-written file at its final path (a crash) is repaired by the re-apply.
    let torn = b.path().join("big/data.bin");
    let f = std::fs::OpenOptions::new().write(true).open(&torn).unwrap();
    f.set_len(150_000).unwrap();
    drop(f);
    // Same size, other bytes: found by the hash check.
    write(b.path(), "a.txt", b"HELLO");
    apply(&store, &log, views(&log)).await;
    assert_eq!(tree(b.path()), tree(a.path()));

    // A source on the store's folder finds nothing new (no echo).
    let len = log.len();
    scan_once(&FsSource::new(FsConfig::new(b.path())), &log).await;
    assert_eq!(log.len(), len);

    // Deletes made on one side are applied on the other, directories once empty.
    std::fs::remove_dir_all(a.path().join("big")).unwrap();
    std::fs::remove_dir_all(a.path().join("empty dir")).unwrap();
    std::fs::remove_file(a.path().join("a.txt")).unwrap();
    scan_once(&FsSource::new(FsConfig::new(a.path())), &log).await;
    // a.txt, big/data.bin, big/sub dir/ünï.md, big/sub dir, big, empty dir/inner, empty dir.
    assert_eq!(log.len(), len + 7);
    apply(&store, &log, views(&log)).await;
    assert_eq!(tree(b.path()), tree(a.path()));
    assert_eq!(
        tree(b.path()).keys().collect::<Vec<_>>(),
        ["empty.txt", "run.sh"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_file_keeps_a_deleted_directory() {
    let b = tempfile::tempdir().unwrap();
    let log = common::log();
    let (d, e) = (key("d"), key("e"));
    log.append_local(vec![
        LocalChange::new(
            d.clone(),
            Op::Put {
                content: None,
                meta: converge_api::Meta::dir(0),
            },
        ),
        LocalChange::new(
            e.clone(),
            Op::Put {
                content: None,
                meta: converge_api::Meta::dir(0),
            },
        ),
    ])
    .await
    .unwrap();
    let f = tempfile::tempdir().unwrap();
    write(f.path(), "d/live.txt", b"alive");
    let root = converge_plugin_fs::content::store_file(&f.path().join("d/live.txt"), log.chunks())
        .unwrap();
    log.append_local(vec![LocalChange::new(
        key("d/live.txt"),
        Op::Put {
            content: Some(root),
            meta: converge_api::Meta::file(1_000),
        },
    )])
    .await
    .unwrap();
    let store = FsStore::new(FsConfig::new(b.path()));
    apply(&store, &log, views(&log)).await;
    assert!(b.path().join("d/live.txt").is_file() && b.path().join("e").is_dir());

    // Both directories deleted; the file in d is still live.
    log.append_local(vec![
        LocalChange::new(d.clone(), Op::Delete),
        LocalChange::new(e.clone(), Op::Delete),
    ])
    .await
    .unwrap();
    apply(&store, &log, views(&log)).await;
    assert!(
        b.path().join("d").is_dir(),
        "a live file keeps its directory"
    );
    assert_eq!(
        std::fs::read(b.path().join("d/live.txt")).unwrap(),
        b"alive"
    );
    assert!(
        !b.path().join("e").exists(),
        "an empty deleted directory goes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_copies_are_written_beside_the_winner_and_not_read_back() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(a.path(), "notes.txt", b"winner");
    let log = common::log();
    scan_once(&FsSource::new(FsConfig::new(a.path())), &log).await;
    let winner = log.heads(&key("notes.txt")).unwrap().remove(0);
    write(a.path(), "other", b"loser content");
    let content =
        converge_plugin_fs::content::store_file(&a.path().join("other"), log.chunks()).unwrap();
    let loser = Head {
        id: converge_api::EventId {
            origin: converge_api::ReplicaId([0; 16]),
            seq: 1,
        },
        hlc: Hlc {
            wall_ms: 1_700_000_000_000,
            logical: 0,
        },
        op: Op::Put {
            content: Some(content),
            meta: converge_api::Meta::file(5_000),
        },
    };
    let view = KeyView {
        key: key("notes.txt"),
        winner: Some(winner),
        copies: vec![loser],
        conflicted: true,
        merged_copies: vec![],
    };
    apply(
        &FsStore::new(FsConfig::new(b.path())),
        &log,
        vec![view.clone()],
    )
    .await;
    let files = tree(b.path());
    assert_eq!(files["notes.txt"].1, b"winner");
    assert_eq!(
        files["notes.sync-conflict-20231114-221320-aaaaaaa.txt"].1,
        b"loser content"
    );

    let len = log.len();
    scan_once(&FsSource::new(FsConfig::new(b.path())), &log).await;
    assert_eq!(log.len(), len, "conflict copies are not keys");

    // The user merges by hand in the copy; the same view shown again (a replay, a retry)
    // leaves their edit, and a copy removed is written again.
    let copy = "notes.sync-conflict-20231114-221320-aaaaaaa.txt";
    write(b.path(), copy, b"merged by hand");
    let (_, store) = folder(FsConfig::new(b.path()));
    store.start(&StoreContext::new(log.clone())).await.unwrap();
    apply(&store, &log, vec![view.clone()]).await;
    assert_eq!(tree(b.path())[copy].1, b"merged by hand");
    std::fs::remove_file(b.path().join(copy)).unwrap();
    apply(&store, &log, vec![view]).await;
    assert_eq!(tree(b.path())[copy].1, b"loser content");
}

/// The store writes an older version while a newer event is already in the log: the
/// watching source of the same folder must not read that write as a local revert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_of_the_store_is_not_echoed() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(a.path(), "f.txt", b"version 1");
    let log = common::log();
    let scanner = FsSource::new(FsConfig::new(a.path()));
    scan_once(&scanner, &log).await;
    let old_views = views(&log);
    write(a.path(), "f.txt", b"version 2, longer");
    scan_once(&scanner, &log).await;
    let len = log.len();
    assert_eq!(len, 2);

    // B's folder was synced before (marked), and lacks f.txt.
    write(b.path(), converge_plugin_fs::MARKER_FILE, b"");
    let (source, store) = folder(FsConfig::new(b.path()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (progress_tx, mut progress_rx) = watch::channel(ScanProgress::default());
    let running = {
        let log = log.clone();
        tokio::spawn(async move {
            source
                .run(SourceContext::new(log, stop_rx, progress_tx))
                .await
        })
    };
    progress_rx.wait_for(|p| p.done).await.unwrap();
    // The folder lacked f.txt, so the scan read it as deleted: put it back as version 2.
    assert_eq!(log.len(), len + 1);
    write(a.path(), "f.txt", b"version 2, longer!");
    scan_once(&scanner, &log).await;
    let old_views = {
        let mut v = old_views;
        v.retain(|v| v.key == key("f.txt"));
        v
    };
    let len = log.len();

    apply(&store, &log, old_views).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        log.len(),
        len,
        "stale echo: {:?}",
        log.read(len, 10).unwrap()
    );

    apply(&store, &log, views(&log)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(log.len(), len);
    stop_tx.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert!(shown(&log)
        .values()
        .all(|(kind, _, _)| *kind == EntryKind::File));
}

/// A folder with its own (guarded) store, a source to record its files, and a log.
fn guarded_folder() -> (tempfile::TempDir, EventLog, FsStore, FsSource) {
    let dir = tempfile::tempdir().unwrap();
    let (_, store) = folder(FsConfig::new(dir.path()));
    let scanner = FsSource::new(FsConfig::new(dir.path()));
    (dir, common::log(), store, scanner)
}

/// A file saved again before the source recorded the change must not be put back to the
/// version the log holds; a file in a state the log knows (an ancestor of the winner) is
/// replaced as usual; a mirror overwrites whatever it finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_change_not_yet_recorded_is_never_overwritten() {
    let (dir, log, store, scanner) = guarded_folder();
    write(dir.path(), "f.txt", b"first");
    scan_once(&scanner, &log).await;

    // Saved again; the source has not seen it yet. The store applies the first version.
    write(dir.path(), "f.txt", b"second, not recorded yet");
    apply(&store, &log, views(&log)).await;
    assert_eq!(
        std::fs::read(dir.path().join("f.txt")).unwrap(),
        b"second, not recorded yet"
    );

    // The same for a remove: a delete that won must not take the unrecorded file.
    let deleted = log
        .append_local(vec![LocalChange::new(key("f.txt"), Op::Delete)])
        .await
        .unwrap();
    apply(&store, &log, views(&log)).await;
    assert!(dir.path().join("f.txt").exists());

    // A remote write on top of the recorded history (delete ← first): the file on disk is
    // in no state the log knows, so it stays; once it is back to a known state (the
    // first version, an ancestor of the winner), the remote write replaces it.
    let remote = remote_put(
        &log,
        1,
        "f.txt",
        b"remote version",
        u64::MAX / 2,
        vec![deleted[0].id],
    );
    log.append(vec![remote]).await.unwrap();
    apply(&store, &log, views(&log)).await;
    assert_eq!(
        std::fs::read(dir.path().join("f.txt")).unwrap(),
        b"second, not recorded yet"
    );
    let first = log.read(0, 1).unwrap().remove(0).1;
    let Op::Put { meta, .. } = &first.op else {
        panic!("the first event is a put")
    };
    write(dir.path(), "f.txt", b"first");
    filetime::set_file_mtime(
        dir.path().join("f.txt"),
        filetime::FileTime::from_unix_time(
            meta.mtime_ms / 1000,
            (meta.mtime_ms % 1000) as u32 * 1_000_000,
        ),
    )
    .unwrap();
    apply(&store, &log, views(&log)).await;
    assert_eq!(
        std::fs::read(dir.path().join("f.txt")).unwrap(),
        b"remote version"
    );

    // A mirror is not guarded: it overwrites a file changed by hand.
    let mirror_dir = tempfile::tempdir().unwrap();
    write(mirror_dir.path(), "f.txt", b"edited in the mirror");
    apply(
        &FsStore::mirror("m", FsConfig::new(mirror_dir.path())),
        &log,
        views(&log),
    )
    .await;
    assert_eq!(
        std::fs::read(mirror_dir.path().join("f.txt")).unwrap(),
        b"remote version"
    );
}

/// A file whose mtime alone differs from every state the log knows (touched) holds known
/// content, which the source records no change for: the store replaces it with a remote
/// write. A file of the same size and mode but other bytes is a local change: it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touched_file_is_replaced_but_an_unrecorded_edit_of_the_same_size_is_not() {
    let (dir, log, store, scanner) = guarded_folder();
    write(dir.path(), "touched.txt", b"v1");
    write(dir.path(), "edited.txt", b"v1");
    scan_once(&scanner, &log).await;
    set_mtime(dir.path(), "touched.txt", 1_000_000_000);
    write(dir.path(), "edited.txt", b"v9");
    set_mtime(dir.path(), "edited.txt", 1_000_000_000);

    let remote: Vec<converge_api::Event> = ["touched.txt", "edited.txt"]
        .iter()
        .zip(1..)
        .map(|(name, seq)| {
            let parents = log
                .heads(&key(name))
                .unwrap()
                .iter()
                .map(|h| h.id)
                .collect();
            remote_put(&log, seq, name, b"remote version", u64::MAX / 2, parents)
        })
        .collect();
    log.append(remote).await.unwrap();
    apply(&store, &log, views(&log)).await;
    assert_eq!(
        std::fs::read(dir.path().join("touched.txt")).unwrap(),
        b"remote version"
    );
    assert_eq!(std::fs::read(dir.path().join("edited.txt")).unwrap(), b"v9");
}

/// A file of the size of a peer's new version, in a state the log knows by its stat (the
/// version before), is replaced without being read: its stat tells its content, which is
/// not the new one. (A same-size edit of a large file cost each receiver a hash of the
/// whole file: W3 of `bench/daemon/run.py`.) What has the new version's own stat is
/// still checked by its hash (the crash-repair check, in the first test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_version_of_the_same_size_is_replaced_without_reading_it() {
    let (dir, log, store, scanner) = guarded_folder();
    write(dir.path(), "same.bin", &random_bytes(1, 300_000));
    scan_once(&scanner, &log).await;
    let parents = log
        .heads(&key("same.bin"))
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect();
    let new = random_bytes(2, 300_000);
    let remote = remote_put(&log, 1, "same.bin", &new, u64::MAX / 2, parents);
    log.append(vec![remote]).await.unwrap();

    let opens = Opens::watch(&dir.path().join("same.bin"));
    apply(&store, &log, views(&log)).await;
    assert_eq!(opens.count(), 0, "the store read the version it replaced");
    assert_eq!(std::fs::read(dir.path().join("same.bin")).unwrap(), new);

    // Other bytes under the new version's stat (as a crash can leave a file whose data
    // never reached the disk): found by the hash check, and written again.
    write(dir.path(), "same.bin", &random_bytes(3, 300_000));
    set_mtime(dir.path(), "same.bin", 1_700_000_000);
    apply(&store, &log, views(&log)).await;
    assert_eq!(std::fs::read(dir.path().join("same.bin")).unwrap(), new);
}

/// A file whose content is damaged in a pack of an earlier run fails alone: the other
/// files of the batch are written, `apply` returns, and the store counts the failed key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_damaged_content_fails_alone() {
    let data = tempfile::tempdir().unwrap();
    let source_dir = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(LogConfig::new(data.path())).unwrap();
        // The first file's chunk is the first thing in the first pack.
        write(
            source_dir.path(),
            "damaged.txt",
            b"these bytes will be damaged",
        );
        scan_once(&FsSource::new(FsConfig::new(source_dir.path())), &log).await;
        write(
            source_dir.path(),
            "intact.txt",
            b"these bytes stay as they are",
        );
        scan_once(&FsSource::new(FsConfig::new(source_dir.path())), &log).await;
        log.close().await.unwrap();
    }
    let pack = data.path().join("packs/pack-00000001");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&pack, bytes).unwrap();

    let log = EventLog::open(LogConfig::new(data.path())).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let store = FsStore::new(FsConfig::new(folder.path()));
    apply(&store, &log, views(&log)).await;
    assert_eq!(
        std::fs::read(folder.path().join("intact.txt")).unwrap(),
        b"these bytes stay as they are"
    );
    assert!(!folder.path().join("damaged.txt").exists());
    assert_eq!(store.failed(), 1);
}

/// With a temp dir on the folder's file system, the store writes there and renames into
/// the folder: a watcher on the folder sees the final names only, never a temp file. On
/// another file system (tmpfs here) the temp dir is not used, and the files are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_written_in_the_temp_dir_and_renamed_into_the_folder() {
    use notify::Watcher;
    let (a, b, data) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    write(a.path(), "one.txt", b"one");
    write(a.path(), "two.bin", &random_bytes(2, 100_000));
    // Enough files that several threads write them, each in a temp dir of its own.
    for n in 0..100 {
        write(a.path(), &format!("many/{n}.txt"), n.to_string().as_bytes());
    }
    let log = common::log();
    scan_once(&FsSource::new(FsConfig::new(a.path())), &log).await;

    let (tx, rx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(tx).unwrap();
    watcher
        .watch(b.path(), notify::RecursiveMode::NonRecursive)
        .unwrap();
    let temp_dir = data.path().join("tmp");
    // Left by a killed run: removed at start.
    write(&temp_dir, &format!("{TEMP_PREFIX}1-1"), b"stale");
    write(
        &temp_dir,
        &format!("{TEMP_PREFIX}w0/{TEMP_PREFIX}1-2"),
        b"stale, a thread's",
    );
    let store = FsStore::new(FsConfig::new(b.path()).temp_dir(&temp_dir));
    store.start(&StoreContext::new(log.clone())).await.unwrap();
    apply(&store, &log, views(&log)).await;
    assert_eq!(tree(b.path()), tree(a.path()));
    let left: Vec<_> = tree(&temp_dir)
        .into_iter()
        .filter(|(_, (is_dir, _, _))| !is_dir)
        .map(|(name, _)| name)
        .collect();
    assert!(left.is_empty(), "files left in the temp dir: {left:?}");
    if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        assert!(
            temp_dir.join(format!("{TEMP_PREFIX}w1")).is_dir(),
            "a second thread wrote in a temp dir of its own"
        );
    }

    // Events arrive in order: once both final names were seen, a temp file written in
    // the folder would have been reported before them.
    let mut seen = Vec::new();
    while !(seen.iter().any(|n: &String| n == "one.txt") && seen.iter().any(|n| n == "two.bin")) {
        let event = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        seen.extend(
            event
                .paths
                .iter()
                .filter_map(|p| p.file_name()?.to_str().map(str::to_owned)),
        );
    }
    assert!(
        !seen.iter().any(|n| n.starts_with(TEMP_PREFIX)),
        "the watcher saw a temp file: {seen:?}"
    );

    // A temp dir on another file system is not used (a rename would fail).
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() && shm.metadata().unwrap().dev() != b.path().metadata().unwrap().dev() {
        let c = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir_in(shm).unwrap();
        let store = FsStore::new(FsConfig::new(c.path()).temp_dir(elsewhere.path()));
        apply(&store, &log, views(&log)).await;
        assert_eq!(tree(c.path()), tree(a.path()));
        assert!(tree(elsewhere.path()).is_empty());
    }
}

/// The folder's own store does not read back a file its source has just recorded from
/// it (same size, mtime and mode): that would hash every saved file twice. A file written
/// elsewhere, as a mirror's is, is still checked by its hash. Reads are seen as the opens
/// inotify reports (the access time would not show them: files are read with
/// `O_NOATIME`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_recorded_here_is_not_read_back_by_its_store() {
    let (dir, mirror) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let log = common::log();
    let (source, store) = folder(FsConfig::new(dir.path()));
    write(dir.path(), "saved.bin", &random_bytes(3, 200_000));
    scan_once(&source, &log).await;
    let saved = dir.path().join("saved.bin");
    let opens = Opens::watch(&saved);
    apply(&store, &log, views(&log)).await;
    assert_eq!(opens.count(), 0, "the store read the file back");

    // A mirror holding the same file (its own copy, not recorded from it) checks it.
    let copy = mirror.path().join("saved.bin");
    std::fs::copy(&saved, &copy).unwrap();
    filetime::set_file_mtime(
        &copy,
        filetime::FileTime::from_last_modification_time(&saved.metadata().unwrap()),
    )
    .unwrap();
    let opens = Opens::watch(&copy);
    apply(
        &FsStore::mirror("m", FsConfig::new(mirror.path())),
        &log,
        views(&log),
    )
    .await;
    assert!(opens.count() > 0, "the mirror checked its copy");
    assert_eq!(tree(mirror.path()), tree(dir.path()));
}

/// Counts the opens of one file from when it is made (an inotify watch for `IN_OPEN`).
struct Opens {
    fd: std::os::fd::OwnedFd,
}

impl Opens {
    fn watch(path: &std::path::Path) -> Opens {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: inotify_init1 takes flags only; a valid descriptor is owned from here.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            raw >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a descriptor just opened and owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: the descriptor is open and `name` is a NUL-terminated path.
        let watch = unsafe { libc::inotify_add_watch(raw, name.as_ptr(), libc::IN_OPEN) };
        assert!(
            watch >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Opens { fd }
    }

    /// Opens of the file reported so far.
    fn count(&self) -> usize {
        use std::io::Read;
        let mut file = std::fs::File::from(self.fd.try_clone().unwrap());
        let mut buf = vec![0u8; 64 << 10];
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut events = 0;
        loop {
            let n = match file.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return events,
                Err(e) => panic!("reading inotify events: {e}"),
            };
            let mut at = 0;
            while at + header <= n {
                // The event's mask, after its watch descriptor, and its name length, the
                // last field of the fixed header. (The kernel also reports a watch it drops,
                // `IN_IGNORED`, when the file is removed or replaced.)
                let field = |offset: usize| {
                    u32::from_ne_bytes(buf[at + offset..at + offset + 4].try_into().unwrap())
                };
                let (mask, len) = (field(4), field(header - 4));
                events += usize::from(mask & libc::IN_OPEN != 0);
                at += header + len as usize;
            }
        }
    }
}

/// A peer's file below a path where this folder holds a file changed here and not yet
/// recorded cannot be written. It waits as a failed key (not a warning skipped for good)
/// for the source to record that change; the retry then moves the file aside as a
/// conflict copy and writes the key below (live keys below win), so this replica ends as
/// its peers do instead of holding a file where they hold a directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_below_an_unrecorded_file_waits_for_the_change_to_be_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (source, store) = folder(FsConfig::new(dir.path()));
    let log = common::log();
    write(dir.path(), "x", b"a file");
    scan_once(&source, &log).await;

    // Edited here, not recorded yet, when the peer's x/inside.txt arrives.
    write(dir.path(), "x", b"edited here, later");
    let below = remote_put(&log, 1, "x/inside.txt", b"from the peer", 1, Vec::new());
    log.append(vec![below]).await.unwrap();
    apply(&store, &log, views(&log)).await;
    assert_eq!(
        std::fs::read(dir.path().join("x")).unwrap(),
        b"edited here, later"
    );
    assert_eq!(store.failed(), 1, "x/inside.txt waits");

    // The source records the edit (and not the missing x/inside.txt as a delete); the
    // store's retry then makes way for the directory.
    let len = log.len();
    scan_once(&source, &log).await;
    assert_eq!(log.len(), len + 1, "only the edit of x is recorded");
    apply(&store, &log, Vec::new()).await;
    assert_eq!(store.failed(), 0);
    assert_eq!(
        std::fs::read(dir.path().join("x/inside.txt")).unwrap(),
        b"from the peer"
    );
    let copies: Vec<Vec<u8>> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("x.sync-conflict-")
        })
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert_eq!(copies, [b"edited here, later".to_vec()]);
}

/// A file changed here and not recorded yet, where a peer's event makes its key a
/// directory, is not removed to make way: the key waits until the source has recorded
/// the edit, which then supersedes the directory and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_file_is_not_removed_to_make_its_key_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (source, store) = folder(FsConfig::new(dir.path()));
    let log = common::log();
    write(dir.path(), "x", b"a file");
    scan_once(&source, &log).await;
    let recorded = log.read(0, 1).unwrap().remove(0).1.id;

    // The peer replaced the file with a directory; here it was edited meanwhile.
    write(dir.path(), "x", b"edited here, later");
    let made_dir = converge_api::Event {
        id: converge_api::EventId {
            origin: converge_api::ReplicaId([7; 16]),
            seq: 1,
        },
        hlc: Hlc {
            wall_ms: u64::MAX / 2,
            logical: 0,
        },
        key: key("x"),
        parents: vec![recorded],
        op: Op::Put {
            content: None,
            meta: converge_api::Meta::dir(1_700_000_000_000),
        },
    };
    log.append(vec![made_dir]).await.unwrap();
    apply(&store, &log, views(&log)).await;
    assert_eq!(
        std::fs::read(dir.path().join("x")).unwrap(),
        b"edited here, later"
    );
    assert_eq!(store.failed(), 1, "x waits for the edit to be recorded");

    // The source records the edit over the directory: it wins, and the file stays.
    let len = log.len();
    scan_once(&source, &log).await;
    assert_eq!(log.len(), len + 1, "the edit is recorded");
    apply(&store, &log, views(&log)).await;
    assert_eq!(store.failed(), 0);
    assert_eq!(
        std::fs::read(dir.path().join("x")).unwrap(),
        b"edited here, later"
    );
    assert_eq!(shown(&log)["x"].0, EntryKind::File);
}

/// A mirror marks its folder on its first write. Once it has written (its cursor is past
/// the start), a missing or empty folder without the marker is a backup disk not mounted:
/// the batch fails, nothing is written there, and it is written once the disk is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_does_not_write_into_its_folder_while_it_is_missing_or_empty() {
    let (source_dir, disk) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(source_dir.path(), "kept.txt", b"backed up");
    let log = common::log();
    scan_once(&FsSource::new(FsConfig::new(source_dir.path())), &log).await;
    let backup = disk.path().join("backup");
    let mirror = FsStore::mirror("m", FsConfig::new(&backup));
    apply(&mirror, &log, views(&log)).await;
    assert!(backup.join(converge_plugin_fs::MARKER_FILE).is_file());
    assert_eq!(tree(&backup), tree(source_dir.path()));
    log.set_cursor("mirror-m", log.len()).await.unwrap();

    // Unmounted: the path is missing, then an empty mount point.
    let mounted = disk.path().join("mounted");
    std::fs::rename(&backup, &mounted).unwrap();
    write(source_dir.path(), "new.txt", b"written meanwhile");
    scan_once(&FsSource::new(FsConfig::new(source_dir.path())), &log).await;
    let ctx = StoreContext::new(log.clone());
    let error = mirror.apply(&ctx, views(&log)).await.unwrap_err();
    assert!(error.to_string().contains(".convergefolder"), "{error}");
    assert!(!backup.exists(), "the mirror made its folder again");
    std::fs::create_dir(&backup).unwrap();
    assert!(mirror.apply(&ctx, views(&log)).await.is_err());
    assert!(
        tree(&backup).is_empty(),
        "the mirror wrote into the mount point"
    );

    // Mounted again.
    std::fs::remove_dir(&backup).unwrap();
    std::fs::rename(&mounted, &backup).unwrap();
    apply(&mirror, &log, views(&log)).await;
    assert_eq!(tree(&backup), tree(source_dir.path()));
}

/// The view of `k` deleted (a peer's delete won), no conflict.
fn deleted(k: &str) -> KeyView {
    KeyView {
        key: key(k),
        winner: None,
        copies: vec![],
        conflicted: false,
        merged_copies: vec![],
    }
}

/// The store removed a file (a peer's delete), then the user made it again, the source
/// recorded it, and the user removed it before the store came to that event. The removal
/// is the user's: the source records it, and the file does not come back. (The store's
/// record of its own removal, still fresh, once made the source take the user's removal
/// for an echo of it, and the store then wrote the file back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_made_again_and_removed_stays_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = common::log();
    let (source, store) = folder(FsConfig::new(dir.path()));
    write(dir.path(), "f.txt", b"first");
    scan_once(&source, &log).await;
    apply(&store, &log, views(&log)).await;

    // A peer's delete wins: the store removes the file.
    apply(&store, &log, vec![deleted("f.txt")]).await;
    assert!(!dir.path().join("f.txt").exists(), "the store removed it");

    write(dir.path(), "f.txt", b"made again");
    scan_once(&source, &log).await;
    std::fs::remove_file(dir.path().join("f.txt")).unwrap();
    scan_once(&source, &log).await;
    apply(&store, &log, views(&log)).await;
    assert!(
        !dir.path().join("f.txt").exists(),
        "the store wrote the removed file back"
    );
    let heads = log.heads(&key("f.txt")).unwrap();
    assert!(
        heads.iter().all(|h| matches!(h.op, Op::Delete)),
        "the removal was not recorded: {heads:?}"
    );
}

/// As above, for a directory: the store removed it, the user made it again (recorded),
/// then removed it before the store came to that event. It stays removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_made_again_and_removed_stays_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = common::log();
    let (source, store) = folder(FsConfig::new(dir.path()));
    std::fs::create_dir(dir.path().join("d")).unwrap();
    scan_once(&source, &log).await;
    apply(&store, &log, views(&log)).await;

    apply(&store, &log, vec![deleted("d")]).await;
    assert!(!dir.path().join("d").exists(), "the store removed it");

    std::fs::create_dir(dir.path().join("d")).unwrap();
    scan_once(&source, &log).await;
    std::fs::remove_dir(dir.path().join("d")).unwrap();
    scan_once(&source, &log).await;
    apply(&store, &log, views(&log)).await;
    assert!(
        !dir.path().join("d").exists(),
        "the store made the removed directory again"
    );
    let heads = log.heads(&key("d")).unwrap();
    assert!(
        heads.iter().all(|h| matches!(h.op, Op::Delete)),
        "the removal was not recorded: {heads:?}"
    );
}

/// After a batch whose sync failed, the files it wrote can read right from the page cache
/// and be missing from the disk; the store saves their keys in its state dir. Started
/// again over that state (as after a restart), it writes those files anew, even though
/// they look right, leaves the others alone, and removes the state once a sync covers
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_a_failed_batch_wrote_are_written_again_after_a_restart() {
    let (a, b, state) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    source_fixture(a.path());
    let log = common::log();
    scan_once(&FsSource::new(FsConfig::new(a.path())), &log).await;
    let mut config = FsConfig::new(b.path());
    config.state_dir = Some(state.path().to_owned());
    let store = FsStore::new(config.clone());
    let ctx = StoreContext::new(log.clone());
    store.start(&ctx).await.unwrap();
    apply(&store, &log, views(&log)).await;
    assert_eq!(tree(b.path()), tree(a.path()));
    let unsynced = state.path().join("folder.unsynced");
    assert!(!unsynced.exists(), "nothing saved when every sync succeeds");
    let before = inodes(b.path());

    // What a batch whose sync failed leaves behind (see the store's module docs).
    let noted = vec![key("a.txt"), key("big/sub dir/ünï.md")];
    std::fs::write(&unsynced, converge_api::codec::encode(&noted).unwrap()).unwrap();
    let restarted = FsStore::new(config);
    restarted.start(&ctx).await.unwrap();
    apply(&restarted, &log, views(&log)).await;

    assert_eq!(tree(b.path()), tree(a.path()));
    let after = inodes(b.path());
    for ((rel, ino, _), (rel_after, ino_after, _)) in before.iter().zip(&after) {
        assert_eq!(rel, rel_after);
        let was_noted = noted.iter().any(|k| k.as_str() == rel);
        assert_eq!(
            ino != ino_after,
            was_noted,
            "{rel}: written again iff noted"
        );
    }
    assert!(!unsynced.exists(), "removed once a sync covers them");
}

/// `f.txt` written as `v1` into `root` and recorded by `source`, then a peer's newer
/// version of it (`bytes`) appended to `log`.
async fn v1_then_a_peers_newer_f(
    root: &std::path::Path,
    source: &FsSource,
    log: &converge_framework::log::EventLog,
    bytes: &[u8],
) {
    write(root, "f.txt", b"v1");
    scan_once(source, log).await;
    let parents = log
        .heads(&key("f.txt"))
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect();
    let newer = remote_put(log, 1, "f.txt", bytes, u64::MAX / 2, parents);
    log.append(vec![newer]).await.unwrap();
}

/// A power loss before a batch's sync can leave a file it wrote torn (its name and size
/// on disk, not its data): in no state the log knows, it would read as a change made
/// here. The store saves the keys it is about to write first; started again after the
/// machine went down, it writes such a file anew. Without a restart of the machine (the
/// process killed, say), the page cache held what was written, so a file in no known
/// state is the user's, and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_left_torn_by_a_power_loss_is_written_again_not_recorded() {
    use std::time::{Duration, SystemTime};
    for machine_went_down in [true, false] {
        let (dir, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let config = FsConfig::new(dir.path()).state_dir(state.path());
        let log = common::log();
        let (source, store) = folder(config.clone());
        let v2 = b"v2, a peer's version";
        v1_then_a_peers_newer_f(dir.path(), &source, &log, v2).await;

        // Shown, not synced: then the machine goes down, and the file is left torn.
        let ctx = StoreContext::new(log.clone());
        store.start(&ctx).await.unwrap();
        store.show(&ctx, views(&log)).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("f.txt")).unwrap(), v2);
        drop((source, store));
        std::fs::write(dir.path().join("f.txt"), &v2[..7]).unwrap();

        // Started again, on a machine started since the file last changed, or not.
        let booted = match machine_went_down {
            true => SystemTime::now() + Duration::from_secs(1),
            false => SystemTime::UNIX_EPOCH,
        };
        let (_, store) = folder(config);
        let store = store.booted_at(booted);
        store.start(&ctx).await.unwrap();
        apply(&store, &log, views(&log)).await;
        let expected: &[u8] = match machine_went_down {
            true => v2,
            false => &v2[..7],
        };
        assert_eq!(
            std::fs::read(dir.path().join("f.txt")).unwrap(),
            expected,
            "machine went down: {machine_went_down}"
        );
    }
}

/// A file changed here and not recorded yet, which a batch left in place rather than
/// write a peer's version over it, is not among the files that batch leaves saved as
/// being written: after a power loss, the next start would take it (last changed before
/// the boot, in no state the log knows) for one the batch left torn, and write over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_a_batch_left_in_place_is_not_taken_for_torn_after_a_power_loss() {
    use std::time::{Duration, SystemTime};
    let (dir, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = FsConfig::new(dir.path()).state_dir(state.path());
    let log = common::log();
    let (source, store) = folder(config.clone());
    v1_then_a_peers_newer_f(dir.path(), &source, &log, b"v2, a peer's").await;

    // Edited here, not recorded yet; the batch leaves it; the machine goes down.
    write(dir.path(), "f.txt", b"the user's edit");
    let ctx = StoreContext::new(log.clone());
    store.start(&ctx).await.unwrap();
    store.show(&ctx, views(&log)).await.unwrap();
    drop((source, store));

    let (_, store) = folder(config);
    let store = store.booted_at(SystemTime::now() + Duration::from_secs(1));
    store.start(&ctx).await.unwrap();
    apply(&store, &log, views(&log)).await;
    assert_eq!(
        std::fs::read(dir.path().join("f.txt")).unwrap(),
        b"the user's edit"
    );
}

/// A file saved here while the store writes the version that is to replace it (a large
/// file takes a while) is not renamed over: the store looks again right before the
/// rename, and leaves the user's save for the source to record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_saved_while_the_store_writes_over_it_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let log = common::log();
    let (source, store) = folder(FsConfig::new(dir.path()));
    write(dir.path(), "big.bin", b"v1");
    scan_once(&source, &log).await;
    let parents = log
        .heads(&key("big.bin"))
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect();
    let newer = remote_put(
        &log,
        1,
        "big.bin",
        &random_bytes(11, 96 << 20),
        u64::MAX / 2,
        parents,
    );
    log.append(vec![newer]).await.unwrap();

    // The user saves the file as soon as the store's temp file appears.
    let root = dir.path().to_owned();
    let saver = std::thread::spawn(move || {
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let writing = std::fs::read_dir(&root).unwrap().any(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(TEMP_PREFIX)
            });
            if writing {
                std::fs::write(root.join("big.bin"), b"saved by the user meanwhile").unwrap();
                return;
            }
            assert!(std::time::Instant::now() < give_up, "no temp file appeared");
        }
    });
    apply(&store, &log, views(&log)).await;
    saver.join().unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("big.bin")).unwrap(),
        b"saved by the user meanwhile"
    );
    assert!(
        !std::fs::read_dir(dir.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(TEMP_PREFIX)),
        "a temp file was left behind"
    );
}

/// A peer's directory of files, and a peer's file, where this replica has symlinks
/// (`photos` a link to a disk of its own, say): the store writes nothing at or below the
/// links, and the next scan (each start scans) takes none of them for removed, which
/// would delete them on the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_files_where_this_replica_has_symlinks_are_not_removed_by_a_scan() {
    let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let root = dir.path();
    write(outside.path(), "own/mine.jpg", b"this replica's own");
    write(outside.path(), "notes.txt", b"this replica's notes");
    std::os::unix::fs::symlink(outside.path().join("own"), root.join("photos")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("notes.txt"), root.join("notes.txt")).unwrap();
    let log = common::log();
    let (source, store) = folder(FsConfig::new(root));
    store.start(&StoreContext::new(log.clone())).await.unwrap();
    scan_once(&source, &log).await;
    assert_eq!(log.len(), 0);
    common::peers_directory(&log, "photos", &["a.jpg", "b.jpg"]).await;
    let notes = remote_put(&log, 4, "notes.txt", b"the peer's notes", 1, vec![]);
    log.append(vec![notes]).await.unwrap();
    apply(&store, &log, views(&log)).await;
    log.set_cursor("folder", log.len()).await.unwrap();
    assert!(
        !outside.path().join("own/a.jpg").exists(),
        "written below the link"
    );
    assert_eq!(
        std::fs::read(outside.path().join("notes.txt")).unwrap(),
        b"this replica's notes"
    );
    let len = log.len();

    scan_once(&source, &log).await;
    assert_eq!(common::deletes_since(&log, len), Vec::<String>::new());
    assert_eq!(log.len(), len);
}

/// Peer's files kept out here by `.convergeignore` (`x.iso`, and `y.iso`, whose older
/// version is still here) and by the configured `exclude` paths (`big/`), once both are
/// taken out while the daemon is stopped: the start-up scan takes none of them for
/// removed, nor the older version for an edit (either would undo the peer's version on
/// every replica), the store writes them from the log, and only once that is synced are
/// the new rules recorded as those the folder is in sync with (a restart before that lets
/// them in again; one after, nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_files_no_longer_ignored_after_a_restart_are_written_not_removed() {
    let (dir, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let root = dir.path();
    write(root, ".convergeignore", b"*.iso\n");
    write(root, "y.iso", b"version 1");
    let log = common::log();
    let state_dir = state.path().to_owned();
    let start = |config: FsConfig| {
        let (log, state_dir) = (log.clone(), state_dir.clone());
        async move {
            let (source, store) = folder(config.state_dir(state_dir));
            store.start(&StoreContext::new(log.clone())).await.unwrap();
            scan_once(&source, &log).await;
            store
        }
    };
    let store = start(FsConfig::new(root).exclude("big")).await;
    // Done by the engine's retry at start: the rules in effect recorded as in sync.
    apply(&store, &log, Vec::new()).await;
    assert!(state.path().join("folder.rules").is_file());
    let iso = remote_put(&log, 1, "x.iso", b"the peer's image", 1, vec![]);
    let big = common::remote_dir(2, "big", 1);
    let data = remote_put(&log, 3, "big/data.bin", b"the peer's data", 1, vec![]);
    let y1 = remote_put(&log, 4, "y.iso", b"version 1", 1, vec![]);
    let y2 = remote_put(&log, 5, "y.iso", b"version 2, newer", 2, vec![y1.id]);
    log.append(vec![iso, big, data, y1, y2]).await.unwrap();
    apply(&store, &log, views(&log)).await;
    log.set_cursor("folder", log.len()).await.unwrap();
    assert_eq!(
        tree(root).keys().collect::<Vec<_>>(),
        [".convergeignore", "y.iso"]
    );
    let len = log.len();

    // Stopped; the pattern and the exclude taken out; started twice before the store
    // gets to write.
    write(root, ".convergeignore", b"");
    for _ in 0..2 {
        let store = start(FsConfig::new(root)).await;
        assert_eq!(log.len(), len, "recorded: {:#?}", shown(&log));
        assert_eq!(store.to_show(), 4);
    }
    let store = start(FsConfig::new(root)).await;
    apply(&store, &log, Vec::new()).await;
    assert_eq!(store.to_show(), 0);
    assert_eq!(
        std::fs::read(root.join("x.iso")).unwrap(),
        b"the peer's image"
    );
    assert_eq!(
        std::fs::read(root.join("big/data.bin")).unwrap(),
        b"the peer's data"
    );
    assert_eq!(
        std::fs::read(root.join("y.iso")).unwrap(),
        b"version 2, newer"
    );

    let store = start(FsConfig::new(root)).await;
    assert_eq!(store.to_show(), 0, "the new rules were not recorded");
    assert_eq!(log.len(), len, "{:#?}", shown(&log));
}
