//! Replicas converge under any delivery: 3–5 replicas write random puts and deletes on a
//! few shared keys (so conflicts are frequent) over the in-memory transport with drops,
//! duplicates, reordering and partitions; after healing, every replica has the same version
//! vector, the same heads for every key and the same last-write-wins winner.
//!
//! `CONVERGE_PROPTEST_CASES=10000 cargo test -p converge-framework --test convergence`
//! runs more cases. A failure prints the case, whose `seed` replays the same faults.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use converge_api::content::TreeBuilder;
use converge_api::{ContentRef, Key, Meta, Op, VersionVector};
use converge_framework::log::{EventLog, LocalChange, LogConfig};
use converge_framework::projection::KeyState;
use converge_framework::{EngineConfig, PeerConfig, SyncEngine};
use converge_policies::Lww;
use converge_transport_memory::{Faults, MemoryNetwork};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Write {
        replica: usize,
        key: u8,
        delete: bool,
        chunks: u8,
    },
    Partition {
        a: usize,
        b: usize,
    },
    HealAll,
    Wait {
        ms: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0usize..5, 0u8..4, prop::bool::weighted(0.25), 0u8..4)
            .prop_map(|(replica, key, delete, chunks)| Step::Write { replica, key, delete, chunks }),
        1 => (0usize..5, 0usize..5).prop_map(|(a, b)| Step::Partition { a, b }),
        1 => Just(Step::HealAll),
        2 => (0u64..300).prop_map(|ms| Step::Wait { ms }),
    ]
}

fn cases() -> u32 {
    std::env::var("CONVERGE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn test_config(peers: Vec<PeerConfig>) -> EngineConfig {
    EngineConfig {
        peers,
        keepalive_interval: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(3600),
        handshake_timeout: Duration::from_secs(2),
        tick_interval: Duration::from_millis(200),
        dial_backoff: (Duration::from_millis(20), Duration::from_millis(500)),
        chunk_timeout: Duration::from_secs(1),
        ..EngineConfig::default()
    }
}

/// Content of `chunks` small chunks (a tree when more than one), stored in `log`.
fn put_content(log: &EventLog, seed: u64, chunks: u8) -> Option<ContentRef> {
    if chunks == 0 {
        return None;
    }
    let mut tree = TreeBuilder::new();
    for i in 0..chunks {
        let bytes = format!("chunk {i} of {seed}").into_bytes();
        let hash = log.chunks().put(&bytes).unwrap();
        tree.push(hash, bytes.len() as u64, &mut |_, node| {
            log.chunks().put(&node).unwrap();
        });
    }
    tree.finish(&mut |_, node| {
        log.chunks().put(&node).unwrap();
    })
}

async fn run(n: usize, seed: u64, steps: Vec<Step>) {
    let faults = Faults {
        drop: 0.1,
        duplicate: 0.1,
        reorder: 0.2,
        max_delay: Duration::from_millis(50),
    };
    let network = MemoryNetwork::new(seed, faults);
    let logs: Vec<EventLog> = (0..n)
        .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
        .collect();
    let address = |i: usize| format!("replica-{i}");
    let mut engines = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let peers = (0..n)
            .filter(|j| *j != i)
            .map(|j| PeerConfig {
                id: logs[j].replica(),
                address: Some(address(j)),
            })
            .collect();
        let engine = SyncEngine::builder(log.clone(), Arc::new(Lww))
            .config(test_config(peers))
            .transport(Arc::new(network.endpoint(&address(i))))
            .start()
            .await
            .unwrap();
        engines.push(engine);
    }

    let mut written = 0u64;
    for step in steps {
        match step {
            Step::Write {
                replica,
                key,
                delete,
                chunks,
            } => {
                let log = &logs[replica % n];
                written += 1;
                let op = if delete {
                    Op::Delete
                } else {
                    Op::Put {
                        content: put_content(log, seed ^ written, chunks),
                        meta: Meta::file(written as i64),
                    }
                };
                let key = Key::new(format!("k{key}")).unwrap();
                log.append_local(vec![LocalChange::new(key, op)])
                    .await
                    .unwrap();
            }
            Step::Partition { a, b } => {
                let (a, b) = (a % n, b % n);
                if a != b {
                    network.partition(&address(a), &address(b));
                }
            }
            Step::HealAll => network.heal_all(),
            Step::Wait { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }

    network.set_faults(Faults::none());
    network.heal_all();
    let real_deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let vvs: Vec<VersionVector> = logs.iter().map(|l| l.version_vector()).collect();
        let mut union = VersionVector::new();
        for vv in &vvs {
            union.merge(vv);
        }
        if vvs.iter().all(|vv| *vv == union) {
            assert_eq!(union.total(), written, "every write is in the union");
            break;
        }
        assert!(
            std::time::Instant::now() < real_deadline,
            "no convergence (seed {seed}): {vvs:#?}\npeers: {:#?}",
            engines.iter().map(|e| e.peers()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Same heads for every key, and the same winner (every replica computes it itself).
    let projection = |log: &EventLog| -> BTreeMap<Key, KeyState> {
        log.states()
            .map(|r| r.unwrap())
            .map(|(k, mut s)| {
                s.superseded.clear(); // bookkeeping of ids not yet seen, not part of the state shown
                (k, s)
            })
            .collect()
    };
    let first = projection(&logs[0]);
    for (i, log) in logs.iter().enumerate().skip(1) {
        assert_eq!(
            projection(log),
            first,
            "replica {i} differs from replica 0 (seed {seed})"
        );
        for (key, state) in &first {
            let a = engines[0].reconciler().view(key, state);
            let b = engines[i].reconciler().view(key, &log.state(key).unwrap());
            assert_eq!(a.winner, b.winner, "winner of {key} (seed {seed})");
        }
    }
    // Every winner's content is complete on every replica.
    for log in &logs {
        for (_, state) in log.states().map(|r| r.unwrap()) {
            for head in &state.heads {
                if let Some(content) = head.op.content() {
                    assert!(
                        log.chunks().missing(content).unwrap().is_empty(),
                        "content of {:?} incomplete",
                        head.id
                    );
                }
            }
        }
    }
    for engine in &engines {
        engine.shutdown().await.unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 64, ..ProptestConfig::default() })]
    #[test]
    fn replicas_converge_under_faults(
        n in 3usize..=5,
        seed in any::<u64>(),
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(run(n, seed, steps));
    }
}

/// Starts an engine on each log over a fault-free memory network; replica `i` dials
/// the replicas listed in `neighbours[i]`.
async fn start_engines(logs: &[EventLog], neighbours: &[Vec<usize>]) -> Vec<SyncEngine> {
    start_engines_with(logs, neighbours, |_| {}).await
}

/// As [`start_engines`], with `tweak` applied to every engine's configuration.
async fn start_engines_with(
    logs: &[EventLog],
    neighbours: &[Vec<usize>],
    tweak: impl Fn(&mut EngineConfig),
) -> Vec<SyncEngine> {
    let network = MemoryNetwork::new(7, Faults::none());
    let mut engines = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let peers = neighbours[i]
            .iter()
            .map(|&j| PeerConfig {
                id: logs[j].replica(),
                address: Some(format!("n{j}")),
            })
            .collect();
        let mut config = test_config(peers);
        tweak(&mut config);
        engines.push(
            SyncEngine::builder(log.clone(), Arc::new(Lww))
                .config(config)
                .transport(Arc::new(network.endpoint(&format!("n{i}"))))
                .start()
                .await
                .unwrap(),
        );
    }
    engines
}

/// Writes `content` to `key` on `from`, and waits (up to 600 naps of 50 ms) until `to`
/// holds the event.
async fn write_and_wait(from: &EventLog, to: &EventLog, key: &Key, content: Option<ContentRef>) {
    from.append_local(vec![LocalChange::new(
        key.clone(),
        Op::Put {
            content,
            meta: Meta::file(1),
        },
    )])
    .await
    .unwrap();
    for _ in 0..600 {
        if to.heads(key).unwrap().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The error `engine` shows for its first peer, once it shows one (up to 500 naps of
/// 10 ms).
async fn first_peer_error(engine: &SyncEngine) -> Option<String> {
    for _ in 0..500 {
        if let Some(error) = engine.peers()[0].last_error.clone() {
            return Some(error);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A–B–C in a line (A and C are not peers): A's events reach C through B.
#[tokio::test(start_paused = true)]
async fn events_are_relayed_along_a_line() {
    let logs: Vec<EventLog> = (0..3)
        .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
        .collect();
    let engines = start_engines(&logs, &[vec![1], vec![0, 2], vec![1]]).await;
    let content = put_content(&logs[0], 1, 3);
    let key = Key::new("from/a").unwrap();
    write_and_wait(&logs[0], &logs[2], &key, content).await;
    let heads = logs[2].heads(&key).unwrap();
    assert_eq!(heads.len(), 1, "A's event reached C");
    assert_eq!(heads[0].id.origin, logs[0].replica());
    assert!(
        logs[2]
            .chunks()
            .missing(&content.unwrap())
            .unwrap()
            .is_empty(),
        "and its content"
    );
    for e in &engines {
        e.shutdown().await.unwrap();
    }
}

/// C holds B's event but B lacks its content (a relay whose copy was damaged, say), while
/// A, also C's peer, holds it: once B has let C's request time out, C asks A. Before,
/// C asked the event's sender again and again, and never had the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_a_peer_does_not_send_is_asked_of_the_next() {
    let logs: Vec<EventLog> = (0..3)
        .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
        .collect();
    // Only A holds the bytes, stored before any engine runs (nothing is pushed).
    let content = put_content(&logs[0], 13, 3).unwrap();
    assert!(!logs[1].chunks().missing(&content).unwrap().is_empty());
    // A–C and B–C; A and B are not peers, so the event reaches A only through C.
    let engines = start_engines_with(&logs, &[vec![2], vec![2], vec![0, 1]], |c| {
        c.push_fresh_chunks = false;
    })
    .await;
    while !engines[2].peers().iter().all(|p| p.connected) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let key = Key::new("held/elsewhere").unwrap();
    write_and_wait(&logs[1], &logs[2], &key, Some(content)).await;
    let heads = logs[2].heads(&key).unwrap();
    assert_eq!(heads.len(), 1, "C has B's event, content from A");
    assert_eq!(heads[0].id.origin, logs[1].replica());
    assert!(logs[2].chunks().missing(&content).unwrap().is_empty());
    for e in &engines {
        e.shutdown().await.unwrap();
    }
}

/// A peer that does not list this replica reads its hello and closes: this side's
/// status says what that likely means, where it showed nothing (and dialed again at once,
/// as after a session that ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_list_this_replica_shows_as_refusing() {
    let logs: Vec<EventLog> = (0..2)
        .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
        .collect();
    // A lists B; B lists nobody.
    let engines = start_engines(&logs, &[vec![1], vec![]]).await;
    let shown = first_peer_error(&engines[0])
        .await
        .expect("A's status shows why B keeps no session");
    assert!(shown.contains("may not list this replica"), "{shown}");
    assert!(!engines[0].peers()[0].connected);
    for e in &engines {
        e.shutdown().await.unwrap();
    }
}

/// Two replicas that dial each other at once keep one of the two connections: the other
/// ends at once, and is not taken for a refusal (no error shown, the backoff not grown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_show_no_refusal() {
    for _ in 0..8 {
        let logs: Vec<EventLog> = (0..2)
            .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
            .collect();
        let engines = start_engines(&logs, &[vec![1], vec![0]]).await;
        while !engines
            .iter()
            .all(|e| e.peers().iter().all(|p| p.connected))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        for e in &engines {
            let status = &e.peers()[0];
            assert!(status.connected);
            assert_eq!(status.last_error, None, "{status:?}");
        }
        for e in &engines {
            e.shutdown().await.unwrap();
        }
    }
}

/// A's new content is pushed to B while it is stored, ahead of the event naming it: B
/// never has to ask for it. Asking would cost B at least 32 bytes a chunk on the wire.
/// Pushed chunks go from memory, or, past the session's memory budget (here none), as
/// hashes read back from the pack when sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_content_is_pushed_before_its_event() {
    const CHUNKS: u8 = 250; // with the index nodes, more than one push batch
    for memory in [EngineConfig::default().push_memory_bytes, 0] {
        let logs: Vec<EventLog> = (0..2)
            .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
            .collect();
        let engines =
            start_engines_with(&logs, &[vec![1], vec![0]], |c| c.push_memory_bytes = memory).await;
        while !engines
            .iter()
            .all(|e| e.peers().iter().all(|p| p.connected))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let content = put_content(&logs[0], 5, CHUNKS).unwrap();
        let key = Key::new("pushed").unwrap();
        write_and_wait(&logs[0], &logs[1], &key, Some(content)).await;
        assert_eq!(logs[1].heads(&key).unwrap().len(), 1, "A's event reached B");
        assert!(logs[1].chunks().missing(&content).unwrap().is_empty());
        let b_sent = engines[1].peers()[0].sent_bytes;
        assert!(
            b_sent < 16 * u64::from(CHUNKS),
            "memory {memory}: B sent {b_sent} bytes: it asked for content that should have been pushed"
        );
        for e in &engines {
            e.shutdown().await.unwrap();
        }
    }
}

/// An append of remote events that fails (here: the content store's directory is gone
/// when the append syncs it, as an I/O error or a full disk would fail it) does not stop
/// the replica applying remote events: the events stay queued, the failure is shown, and
/// the append is tried again after a pause until it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_of_remote_events_is_tried_again_until_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let logs = vec![
        EventLog::open(LogConfig::temporary()).unwrap(),
        EventLog::open(LogConfig::new(dir.path().join("b"))).unwrap(),
    ];
    let engines = start_engines(&logs, &[vec![1], vec![0]]).await;
    while !engines
        .iter()
        .all(|e| e.peers().iter().all(|p| p.connected))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // B starts a pack (so its next sync also syncs the packs directory), then loses the
    // directory: the chunks A pushes still go into the open pack, but the append of A's
    // event, which syncs the directory first, fails.
    logs[1].chunks().put(b"a chunk of B's own").unwrap();
    let packs = dir.path().join("b").join("packs");
    let away = dir.path().join("packs-away");
    std::fs::rename(&packs, &away).unwrap();
    let key = Key::new("after/a/failure").unwrap();
    let content = put_content(&logs[0], 9, 3);
    logs[0]
        .append_local(vec![LocalChange::new(
            key.clone(),
            Op::Put {
                content,
                meta: Meta::file(1),
            },
        )])
        .await
        .unwrap();
    let mut error = None;
    for _ in 0..400 {
        error = engines[1].applier_error();
        if error.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let error = error.expect("B shows that its append failed");
    assert!(
        error.contains("packs"),
        "the error names the directory: {error}"
    );
    assert!(
        logs[1].heads(&key).unwrap().is_empty(),
        "not appended meanwhile"
    );
    std::fs::rename(&away, &packs).unwrap();
    for _ in 0..600 {
        if logs[1].heads(&key).unwrap().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        logs[1].heads(&key).unwrap().len(),
        1,
        "appended once it could be"
    );
    assert!(logs[1]
        .chunks()
        .missing(&content.unwrap())
        .unwrap()
        .is_empty());
    // Cleared once the pass that appended is over.
    for _ in 0..400 {
        if engines[1].applier_error().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(engines[1].applier_error(), None, "and the error is gone");
    for e in &engines {
        e.shutdown().await.unwrap();
    }
}

/// An event whose content no replica holds any more (a copy lent to a folder and edited
/// there before a peer fetched it) does not hold back its origin's later events: once a later event
/// that supersedes it arrives, both are appended, and the key shows the later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_content_is_gone_goes_with_the_event_that_supersedes_it() {
    let logs: Vec<EventLog> = (0..2)
        .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
        .collect();
    let engines = start_engines(&logs, &[vec![1], vec![0]]).await;
    let key = Key::new("edited/twice").unwrap();
    // Content A never stored (as bytes edited in place before anyone fetched them).
    let mut tree = TreeBuilder::new();
    let gone = converge_api::Hash::of(b"bytes overwritten before anyone fetched them");
    tree.push(gone, 44, &mut |_, _| {});
    let lost = tree.finish(&mut |_, _| {});
    let put = |content| {
        vec![LocalChange::new(
            key.clone(),
            Op::Put {
                content,
                meta: Meta::file(1),
            },
        )]
    };
    let first = logs[0].append_local(put(lost)).await.unwrap();
    for _ in 0..400 {
        if engines[1]
            .stats()
            .pending
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        engines[1]
            .stats()
            .pending
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "B holds the first event, waiting for its content"
    );
    let content = put_content(&logs[0], 11, 2);
    let second = logs[0].append_local(put(content)).await.unwrap();
    assert_eq!(second[0].parents, vec![first[0].id]);
    for _ in 0..600 {
        if logs[1].version_vector().get(&logs[0].replica()) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        logs[1].version_vector().get(&logs[0].replica()),
        2,
        "both appended"
    );
    let heads = logs[1].heads(&key).unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].id, second[0].id, "the key shows the later event");
    assert!(logs[1]
        .chunks()
        .missing(&content.unwrap())
        .unwrap()
        .is_empty());
    for e in &engines {
        e.shutdown().await.unwrap();
    }
}

/// A replica's events are not sent back to it by the peer it sent them to: the peer
/// knows the sender holds what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_not_echoed_back_to_their_sender() {
    let logs: Vec<EventLog> = (0..2)
        .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
        .collect();
    let engines = start_engines(&logs, &[vec![1], vec![0]]).await;
    for i in 0..20 {
        let key = Key::new(format!("k{i}")).unwrap();
        write_and_wait(&logs[0], &logs[1], &key, None).await;
    }
    // Time for an echo to come back, were there one (real time: the logs append on
    // their own threads).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(logs[1].len(), 20);
    assert_eq!(
        engines[1].peers()[0].events_sent,
        0,
        "B sent A's events back"
    );
    assert_eq!(engines[0].peers()[0].events_received, 0);
    for e in &engines {
        e.shutdown().await.unwrap();
    }
}

/// Copies the directory `from` (files and directories below it) to `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A replica's data dir restored from a copy taken after its first event, once it had
/// sent two more to B; the restored replica then writes `new` (one event each) and meets
/// B again, and B writes "from b". Returns A, B and their engines.
async fn restored_replica_meets_its_peer(
    dir: &std::path::Path,
    new: &[&str],
) -> (EventLog, EventLog, Vec<SyncEngine>) {
    let (a_dir, copy) = (dir.join("a"), dir.join("copy"));
    let k = |s: &str| Key::new(s).unwrap();
    let put = |key: Key| {
        LocalChange::new(
            key,
            Op::Put {
                content: None,
                meta: Meta::dir(1),
            },
        )
    };
    // A's first event, then a copy of its data dir.
    let a = EventLog::open(LogConfig::new(&a_dir)).unwrap();
    a.append_local(vec![put(k("one"))]).await.unwrap();
    a.close().await.unwrap();
    drop(a);
    copy_dir(&a_dir, &copy);

    // Two more events, which reach B.
    let a = EventLog::open(LogConfig::new(&a_dir)).unwrap();
    let b_dir = dir.join("b");
    let b = EventLog::open(LogConfig::new(&b_dir)).unwrap();
    a.append_local(vec![put(k("two")), put(k("three"))])
        .await
        .unwrap();
    let engines = start_engines(&[a.clone(), b.clone()], &[vec![1], vec![0]]).await;
    for _ in 0..600 {
        if b.version_vector().get(&a.replica()) == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.version_vector().get(&a.replica()), 3);
    for engine in &engines {
        engine.shutdown().await.unwrap();
    }
    drop(engines);
    a.close().await.unwrap();
    b.close().await.unwrap();
    drop((a, b));

    // A's data dir restored from the copy: its next event is numbered 2 again.
    std::fs::rename(&a_dir, dir.join("lost")).unwrap();
    std::fs::rename(&copy, &a_dir).unwrap();
    let a = EventLog::open(LogConfig::new(&a_dir)).unwrap();
    let b = EventLog::open(LogConfig::new(&b_dir)).unwrap();
    for key in new {
        a.append_local(vec![put(k(key))]).await.unwrap();
    }
    assert_eq!(a.version_vector().get(&a.replica()), 1 + new.len() as u64);
    // In a session, B's next event would reach A.
    let engines = start_engines(&[a.clone(), b.clone()], &[vec![1], vec![0]]).await;
    b.append_local(vec![put(k("from b"))]).await.unwrap();
    (a, b, engines)
}

/// A replica whose data dir lost events it had sent (restored from an older copy) would
/// number its next events as the lost ones were, and its peer, holding those, would drop
/// the new ones as duplicates: silently, for good. Both sides refuse to sync instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_events_it_sent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, engines) = restored_replica_meets_its_peer(dir.path(), &["new"]).await;
    let k = |s: &str| Key::new(s).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        a.heads(&k("from b")).unwrap().is_empty(),
        "a session came up"
    );
    assert!(b.heads(&k("new")).unwrap().is_empty());
    for engine in &engines {
        engine.shutdown().await.unwrap();
    }
}

/// The same, once the restored replica has written past what it lost: the version
/// vectors no longer tell, but the events under the same numbers differ, which the tips
/// in `Hello` show to the side holding the later one (A, here), which refuses, saying
/// why; B shows that A ended its sessions. Before, the session came up and B
/// dropped A's new events as duplicates of the lost ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restored_and_written_past_its_loss_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, engines) =
        restored_replica_meets_its_peer(dir.path(), &["new", "newer", "newest"]).await;
    let k = |s: &str| Key::new(s).unwrap();
    let error = first_peer_error(&engines[0])
        .await
        .expect("A shows why there is no session");
    assert!(
        error.contains("is not the same event here as on that peer"),
        "{error}"
    );
    // From whichever of B's connections to A ended last: the one B dialed (A refused
    // it right after the handshake) or the one A dialed (A closed it).
    let shown = first_peer_error(&engines[1])
        .await
        .expect("B shows that A keeps no session");
    assert!(
        shown.contains("refused to sync") || shown.contains("closed"),
        "{shown}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        a.heads(&k("from b")).unwrap().is_empty(),
        "a session came up"
    );
    assert!(b.heads(&k("newest")).unwrap().is_empty());
    for engine in &engines {
        engine.shutdown().await.unwrap();
    }
}
