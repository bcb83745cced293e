//! Helpers shared by the fs plugin's tests: folders on disk, a scan run, views from the log.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use converge_api::{EntryKind, Key, Op};
use converge_framework::log::{EventLog, LogConfig};
use converge_framework::plugin::{
    KeyView, ScanProgress, Source, SourceContext, Store, StoreContext,
};
use tokio::sync::watch;

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn log() -> EventLog {
    EventLog::open(LogConfig::temporary()).unwrap()
}

pub fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

pub fn set_mtime(root: &Path, rel: &str, secs: i64) {
    filetime::set_file_mtime(root.join(rel), filetime::FileTime::from_unix_time(secs, 0)).unwrap();
}

pub fn make_executable(root: &Path, rel: &str) {
    std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs `source` until its start-up scan reports done, then stops it.
pub async fn scan_once(source: &impl Source, log: &EventLog) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (progress_tx, mut progress_rx) = watch::channel(ScanProgress::default());
    let ctx = SourceContext::new(log.clone(), stop_rx, progress_tx);
    let waiter = async {
        progress_rx.wait_for(|p| p.done).await.unwrap();
        stop_tx.send(true).unwrap();
    };
    let (ran, ()) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(source.run(ctx), waiter)
    })
    .await
    .unwrap();
    ran.unwrap();
}

/// What the projection shows, per key: (kind, size, executable); absent keys left out.
pub fn shown(log: &EventLog) -> BTreeMap<String, (EntryKind, u64, bool)> {
    let mut out = BTreeMap::new();
    for entry in log.states() {
        let (key, state) = entry.unwrap();
        assert!(state.heads.len() <= 1, "conflict on {key}");
        if let Some(head) = state.heads.first() {
            if let Op::Put { content, meta } = &head.op {
                out.insert(
                    key.to_string(),
                    (
                        meta.kind,
                        content.map(|c| c.size).unwrap_or(0),
                        meta.executable,
                    ),
                );
            }
        }
    }
    out
}

/// One view per key of the log: the single head wins; a delete shows the key absent.
pub fn views(log: &EventLog) -> Vec<KeyView> {
    log.states()
        .map(|entry| {
            let (key, state) = entry.unwrap();
            let winner = state
                .heads
                .first()
                .filter(|h| matches!(h.op, Op::Put { .. }))
                .cloned();
            KeyView {
                key,
                winner,
                copies: vec![],
                conflicted: false,
                merged_copies: vec![],
            }
        })
        .collect()
}

pub async fn apply(store: &impl Store, log: &EventLog, views: Vec<KeyView>) {
    store
        .apply(&StoreContext::new(log.clone()), views)
        .await
        .unwrap();
}

pub fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// Every entry below `root` (not following symlinks) but the folder marker: rel path →
/// (is_dir, bytes, executable).
pub fn tree(root: &Path) -> BTreeMap<String, (bool, Vec<u8>, bool)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (bool, Vec<u8>, bool)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == converge_plugin_fs::MARKER_FILE {
                continue; // each folder's own, never synced
            }
            if meta.is_dir() {
                out.insert(rel, (true, vec![], false));
                walk(root, &path, out);
            } else if meta.is_file() {
                out.insert(
                    rel,
                    (
                        false,
                        std::fs::read(&path).unwrap(),
                        meta.mode() & 0o100 != 0,
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Waits (up to 10 s) until `check` holds for the log's projection.
pub async fn wait_until(
    log: &EventLog,
    what: &str,
    check: impl Fn(&BTreeMap<String, (EntryKind, u64, bool)>) -> bool,
) {
    let mut rx = log.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = shown(log);
        if check(&state) {
            return;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            panic!("timed out waiting for {what}; projection: {state:#?}");
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.changed()).await;
    }
}

/// A put of `bytes` at `key` by another replica (`[7; 16]`), at `wall_ms`, over
/// `parents`; its content is put into the log's content store.
pub fn remote_put(
    log: &EventLog,
    seq: u64,
    key_str: &str,
    bytes: &[u8],
    wall_ms: u64,
    parents: Vec<converge_api::EventId>,
) -> converge_api::Event {
    let other = tempfile::tempdir().unwrap();
    write(other.path(), "r", bytes);
    let content =
        converge_plugin_fs::content::store_file(&other.path().join("r"), log.chunks()).unwrap();
    let op = Op::Put {
        content: Some(content),
        meta: converge_api::Meta::file(1_700_000_000_000),
    };
    peers_event(seq, key_str, wall_ms, parents, op)
}

/// A directory made at `key` by another replica (`[7; 16]`), at `wall_ms`, as its
/// event number `seq` (see [`remote_put`]).
pub fn remote_dir(seq: u64, key_str: &str, wall_ms: u64) -> converge_api::Event {
    let op = Op::Put {
        content: None,
        meta: converge_api::Meta::dir(1_700_000_000_000),
    };
    peers_event(seq, key_str, wall_ms, vec![], op)
}

/// Event number `seq` of another replica (`[7; 16]`) at `key`, at `wall_ms`.
fn peers_event(
    seq: u64,
    key_str: &str,
    wall_ms: u64,
    parents: Vec<converge_api::EventId>,
    op: Op,
) -> converge_api::Event {
    converge_api::Event {
        id: converge_api::EventId {
            origin: converge_api::ReplicaId([7; 16]),
            seq,
        },
        hlc: converge_api::Hlc {
            wall_ms,
            logical: 0,
        },
        key: key(key_str),
        parents,
        op,
    }
}

/// The events of `log` from offset `from` on that delete a key, by key.
pub fn deletes_since(log: &EventLog, from: u64) -> Vec<String> {
    log.read(from, 100_000)
        .unwrap()
        .into_iter()
        .filter(|(_, e)| matches!(e.op, Op::Delete))
        .map(|(_, e)| e.key.to_string())
        .collect()
}

/// Another replica's directory `dir` holding the files `files` (as `remote_dir` and
/// `remote_put` make them, numbered from 1), appended to `log`.
pub async fn peers_directory(log: &EventLog, dir: &str, files: &[&str]) {
    let mut events = vec![remote_dir(1, dir, 1)];
    for (n, name) in files.iter().enumerate() {
        let path = format!("{dir}/{name}");
        let seq = n as u64 + 2;
        events.push(remote_put(log, seq, &path, path.as_bytes(), 1, vec![]));
    }
    log.append(events).await.unwrap();
}
