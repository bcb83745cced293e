//! A rebuild of the projection that cannot read the log to its end changes nothing.
#![allow(clippy::unwrap_used)]

use converge_api::{Key, Meta, Op};
use converge_framework::log::{EventLog, LocalChange, LogConfig};

/// What `open` opens, once the closed log's last threads have let go of the database's
/// lock (sled's I/O threads can hold it for a moment after the log is closed).
fn once_unlocked<T, E: std::fmt::Display>(what: &str, open: impl Fn() -> Result<T, E>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Ok(opened) => return opened,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("opening {what}: {e}"),
        }
    }
}

/// The database at `dir`, opened as sled itself.
fn open_db(dir: &std::path::Path) -> sled::Db {
    once_unlocked("the database", || sled::open(dir))
}

/// The log at `dir`.
fn open_log(dir: &std::path::Path) -> EventLog {
    once_unlocked("the log", || EventLog::open(LogConfig::new(dir)))
}

fn put(key: &str) -> LocalChange {
    LocalChange::new(
        Key::new(key).unwrap(),
        Op::Put {
            content: None,
            meta: Meta::file(1),
        },
    )
}

/// With the log's first segment damaged, a rebuild fails; the projection, the version
/// vector and the next sequence number are still those of before, and the log goes on
/// appending.
#[tokio::test]
async fn a_failed_rebuild_leaves_the_projection_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ["a", "b", "c"];
    {
        let log = open_log(dir.path());
        log.append_local(keys.iter().map(|k| put(k)).collect())
            .await
            .unwrap();
        log.append_local(vec![put("a")]).await.unwrap();
        log.close().await.unwrap();
    }
    {
        // The first segment (offset 0) made unreadable, behind the log's back.
        let db = open_db(dir.path());
        let tree = db.open_tree("log").unwrap();
        let (first, _) = tree.first().unwrap().unwrap();
        assert_eq!(&first[..], &0u64.to_be_bytes());
        tree.insert(first, &b"not a segment"[..]).unwrap();
        db.flush().unwrap();
    }

    let log = open_log(dir.path());
    let heads_before: Vec<_> = keys
        .iter()
        .map(|k| log.heads(&Key::new(*k).unwrap()).unwrap())
        .collect();
    assert!(
        heads_before.iter().all(|h| h.len() == 1),
        "{heads_before:?}"
    );
    let vv_before = log.version_vector();

    assert!(
        log.rebuild().await.is_err(),
        "the rebuild read a damaged log"
    );

    let heads_after: Vec<_> = keys
        .iter()
        .map(|k| log.heads(&Key::new(*k).unwrap()).unwrap())
        .collect();
    assert_eq!(heads_after, heads_before);
    assert_eq!(log.version_vector(), vv_before);
    let next = log.append_local(vec![put("d")]).await.unwrap();
    assert_eq!(next[0].id.seq, 5, "a sequence number reused or skipped");
    assert_eq!(log.heads(&Key::new("d").unwrap()).unwrap().len(), 1);
    log.close().await.unwrap();
}

/// A rebuild rewrites the derived trees in place: what the log does not back (a state
/// left behind the log's back here) is gone after it, and every key the log names keeps
/// its heads.
#[tokio::test]
async fn a_rebuild_drops_what_the_log_does_not_back() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open_log(dir.path());
        log.append_local(vec![put("a"), put("b")]).await.unwrap();
        log.close().await.unwrap();
    }
    {
        let db = open_db(dir.path());
        let state = db.open_tree("state").unwrap();
        let (_, a) = state.first().unwrap().unwrap();
        state.insert("ghost", a).unwrap();
        db.flush().unwrap();
    }
    let log = open_log(dir.path());
    let keys = |log: &EventLog| -> Vec<String> {
        log.states()
            .map(|r| r.unwrap().0.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&log), ["a", "b", "ghost"]);
    assert_eq!(log.rebuild().await.unwrap(), 2);
    assert_eq!(keys(&log), ["a", "b"]);
    assert_eq!(log.heads(&Key::new("a").unwrap()).unwrap().len(), 1);
    log.close().await.unwrap();
}
