//! The event log against a model: a `Vec<Event>` per origin and a fold over the event set,
//! through random appends, duplicates, out-of-order offers and reopenings of the database.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use converge_api::{Event, EventId, Hlc, Key, Meta, Op, ReplicaId, VersionVector};
use converge_framework::log::{EventLog, LocalChange, LogConfig, Tips};
use converge_framework::projection::KeyState;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    /// Offer event `seq` of origin `origin` (may be a duplicate or ahead of a gap).
    Remote {
        origin: u8,
        seq: u64,
        key: u8,
        parent: Option<u64>,
    },
    /// A local write on `key`.
    Local { key: u8, delete: bool },
    /// `count` local writes in one append, enough to fill several stored segments.
    LocalBatch { count: usize },
    /// Close and reopen the database.
    Reopen,
    /// Rebuild the projection.
    Rebuild,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..3, 1u64..8, 0u8..4, proptest::option::of(1u64..8))
            .prop_map(|(origin, seq, key, parent)| Step::Remote { origin, seq, key, parent }),
        3 => (0u8..4, any::<bool>()).prop_map(|(key, delete)| Step::Local { key, delete }),
        1 => (1usize..400).prop_map(|count| Step::LocalBatch { count }),
        1 => Just(Step::Reopen),
        1 => Just(Step::Rebuild),
    ]
}

fn key(k: u8) -> Key {
    Key::new(format!("dir/k{k}")).unwrap()
}

/// Remote events are a pure function of (origin, seq), so a duplicate offer is identical.
fn remote_event(origin: u8, seq: u64, k: u8, parent: Option<u64>) -> Event {
    let origin_id = ReplicaId([origin + 100; 16]);
    Event {
        id: EventId {
            origin: origin_id,
            seq,
        },
        hlc: Hlc {
            wall_ms: seq * 10,
            logical: origin as u32,
        },
        key: key(k),
        parents: parent
            .filter(|p| *p < seq)
            .map(|p| EventId {
                origin: origin_id,
                seq: p,
            })
            .into_iter()
            .collect(),
        op: Op::Put {
            content: None,
            meta: Meta::file(seq as i64),
        },
    }
}

fn check_against_model(log: &EventLog, model: &[Event]) {
    // Every event, in order, at offsets 0..n.
    let read = log.read(0, usize::MAX).unwrap();
    assert_eq!(read.len(), model.len());
    // Each origin's newest event, as `Hello` names it: across reopens and rebuilds too.
    let mut tips = Tips::new();
    for event in model {
        tips.insert(event.id.origin, (event.id.seq, event.fingerprint()));
    }
    assert_eq!(log.tips(), tips, "tips");
    for (i, ((offset, event), expected)) in read.iter().zip(model).enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(event, expected);
        assert_eq!(log.offset_of(&event.id).unwrap(), Some(i as u64));
    }
    // Reads that start and end anywhere, including inside a stored segment.
    let n = model.len();
    for from in (0..n)
        .step_by((n / 40).max(1))
        .chain(n.saturating_sub(3)..n + 1)
    {
        let got: Vec<Event> = log
            .read(from as u64, 5)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(got, model[from..(from + 5).min(n)], "read from {from}");
        if let Some(expected) = model.get(from) {
            assert_eq!(log.get(&expected.id).unwrap().as_ref(), Some(expected));
        }
        // Passing over one origin's events by id (as an outbox does for what its peer
        // holds): the others, with their offsets, and where to go on from.
        let skipped = ReplicaId([101; 16]);
        let (kept, next) = log
            .read_raw_unless(from as u64, 7, |id| id.origin == skipped)
            .unwrap();
        let kept: Vec<(u64, Event)> = kept
            .into_iter()
            .map(|raw| {
                let event = converge_api::codec::decode_event(&raw.bytes).unwrap();
                assert_eq!(raw.id, event.id, "the id read from the head");
                (raw.offset, event)
            })
            .collect();
        let end = (from + 7).min(n);
        let expected: Vec<(u64, Event)> = (from..end)
            .filter(|&i| model[i].id.origin != skipped)
            .map(|i| (i as u64, model[i].clone()))
            .collect();
        assert_eq!(kept, expected, "read from {from}, skipping one origin");
        assert_eq!(
            next,
            end.max(from) as u64,
            "read from {from}: where to go on"
        );
    }
    // The version vector: highest seq per origin, and no gaps.
    let mut vv = VersionVector::new();
    for e in model {
        assert_eq!(e.id.seq, vv.get(&e.id.origin) + 1, "gap before {:?}", e.id);
        vv.set(e.id.origin, e.id.seq);
    }
    assert_eq!(log.version_vector(), vv);
    // The projection: a fold over the model.
    let mut states: BTreeMap<Key, KeyState> = BTreeMap::new();
    let mut known = VersionVector::new();
    for e in model {
        states.entry(e.key.clone()).or_default().fold(e, &known);
        known.set(e.id.origin, e.id.seq);
    }
    let actual: BTreeMap<Key, KeyState> = log.states().map(|r| r.unwrap()).collect();
    assert_eq!(actual, states);
}

async fn run(steps: Vec<Step>, checkpoint_every: u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = || LogConfig::new(dir.path()).checkpoint_every(checkpoint_every);
    let mut log = EventLog::open(config()).unwrap();
    let replica = log.replica();
    let mut model: Vec<Event> = Vec::new();
    for step in steps {
        match step {
            Step::Remote {
                origin,
                seq,
                key,
                parent,
            } => {
                let event = remote_event(origin, seq, key, parent);
                let held = model
                    .iter()
                    .filter(|e| e.id.origin == event.id.origin)
                    .count() as u64;
                let outcome = log.append(vec![event.clone()]).await.unwrap();
                if seq == held + 1 {
                    assert_eq!(outcome.appended, vec![event.id]);
                    model.push(event);
                } else if seq <= held {
                    assert_eq!(outcome.duplicates, 1);
                } else {
                    assert_eq!(outcome.out_of_order, vec![event]);
                }
            }
            Step::Local { key: k, delete } => {
                let op = if delete {
                    Op::Delete
                } else {
                    Op::Put {
                        content: None,
                        meta: Meta::file(1),
                    }
                };
                let heads: Vec<EventId> =
                    log.heads(&key(k)).unwrap().iter().map(|h| h.id).collect();
                let events = log
                    .append_local(vec![LocalChange::new(key(k), op)])
                    .await
                    .unwrap();
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].id.origin, replica);
                assert_eq!(events[0].parents, heads);
                if let Some(prev) = model.iter().rev().find(|e| e.id.origin == replica) {
                    assert!(events[0].hlc > prev.hlc);
                }
                model.push(events[0].clone());
            }
            Step::LocalBatch { count } => {
                let changes = (0..count)
                    .map(|i| {
                        LocalChange::new(
                            key((i % 5) as u8),
                            Op::Put {
                                content: None,
                                meta: Meta::file(i as i64),
                            },
                        )
                    })
                    .collect();
                let events = log.append_local(changes).await.unwrap();
                assert_eq!(events.len(), count);
                model.extend(events);
            }
            Step::Reopen => {
                log.close().await.unwrap();
                drop(log);
                log = EventLog::open(config()).unwrap();
                assert_eq!(log.replica(), replica, "identity survives reopening");
            }
            Step::Rebuild => {
                assert_eq!(log.rebuild().await.unwrap(), model.len() as u64);
            }
        }
        check_against_model(&log, &model);
    }
    log.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn log_matches_model(steps in proptest::collection::vec(step(), 1..40), checkpoint_every in 1u64..20) {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run(steps, checkpoint_every));
    }
}

#[tokio::test]
async fn appending_a_batch_twice_changes_nothing() {
    let log = EventLog::open(LogConfig::temporary()).unwrap();
    let batch: Vec<Event> = (1..=50)
        .map(|s| remote_event(1, s, (s % 4) as u8, Some(s - 1)))
        .collect();
    let first = log.append(batch.clone()).await.unwrap();
    assert_eq!(first.appended.len(), 50);
    let before: Vec<_> = log.states().map(|r| r.unwrap()).collect();
    let second = log.append(batch).await.unwrap();
    assert_eq!((second.appended.len(), second.duplicates), (0, 50));
    assert_eq!(log.len(), 50);
    let after: Vec<_> = log.states().map(|r| r.unwrap()).collect();
    assert_eq!(before, after);
    assert_eq!(log.rebuild().await.unwrap(), 50);
    let rebuilt: Vec<_> = log.states().map(|r| r.unwrap()).collect();
    assert_eq!(before, rebuilt);
}

#[tokio::test]
async fn events_ahead_of_a_gap_are_handed_back_not_appended() {
    let log = EventLog::open(LogConfig::temporary()).unwrap();
    let outcome = log
        .append(vec![
            remote_event(1, 2, 0, None),
            remote_event(1, 1, 0, None),
        ])
        .await
        .unwrap();
    assert_eq!(outcome.out_of_order.len(), 1);
    assert_eq!(outcome.out_of_order[0].id.seq, 2);
    assert_eq!(outcome.appended.len(), 1);
    assert_eq!(log.version_vector().get(&ReplicaId([101; 16])), 1);
}

#[tokio::test]
async fn subscribers_are_woken_after_the_flush() {
    let log = EventLog::open(LogConfig::temporary()).unwrap();
    let mut rx = log.subscribe();
    assert_eq!(*rx.borrow_and_update(), 0);
    let writer = log.clone();
    let task = tokio::spawn(async move { writer.append(vec![remote_event(1, 1, 0, None)]).await });
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow(), 1);
    assert_eq!(log.read(0, 10).unwrap().len(), 1);
    task.await.unwrap().unwrap();
    log.set_cursor("store", 1).await.unwrap();
    assert_eq!(log.cursor("store").unwrap(), 1);
    assert_eq!(log.cursor("other").unwrap(), 0);
}

/// A clock that always reads the same time.
struct Fixed(u64);

impl converge_api::WallClock for Fixed {
    fn now_ms(&self) -> u64 {
        self.0
    }
}

#[tokio::test]
async fn a_change_found_late_is_stamped_when_it_was_made() {
    let now = 1_700_000_000_000;
    let log =
        EventLog::open(LogConfig::temporary().clock(std::sync::Arc::new(Fixed(now)))).unwrap();
    let put = |k: u8, at: Option<u64>| {
        LocalChange::new(
            key(k),
            Op::Put {
                content: None,
                meta: Meta::dir(0),
            },
        )
        .made_at(at)
    };
    let stamped = |events: Vec<Event>| -> Vec<(u64, u32)> {
        events
            .iter()
            .map(|e| (e.hlc.wall_ms, e.hlc.logical))
            .collect()
    };
    // Made an hour ago: stamped then. Made "later than now" (a clock that jumped back):
    // stamped now. Made before what the log already stamped: just after it.
    let events = log
        .append_local(vec![
            put(1, Some(now - 3_600_000)),
            put(2, Some(now + 60_000)),
            put(3, Some(now - 7_200_000)),
            put(4, None),
        ])
        .await
        .unwrap();
    assert_eq!(
        stamped(events),
        vec![(now - 3_600_000, 0), (now, 0), (now, 1), (now, 2)]
    );
}

/// `states_below` lists exactly the keys under a directory, from the overlay before a
/// checkpoint and from the tree after one; not the directory itself, nor keys that only
/// share its name's start (`x.txt`, `xa/d`, `x0`).
#[tokio::test]
async fn states_below_a_directory_are_exactly_the_keys_under_it() {
    let dir = tempfile::tempdir().unwrap();
    for checkpoint_every in [1_000_000, 1] {
        let log = EventLog::open(
            LogConfig::new(dir.path().join(checkpoint_every.to_string()))
                .checkpoint_every(checkpoint_every),
        )
        .unwrap();
        let changes = ["x", "x.txt", "x/a", "x/b/c", "xa/d", "x0", "w"]
            .iter()
            .map(|k| LocalChange::new(Key::new(*k).unwrap(), Op::Delete))
            .collect();
        log.append_local(changes).await.unwrap();
        let below = |k: &str| -> Vec<String> {
            log.states_below(&Key::new(k).unwrap())
                .map(|r| r.unwrap().0.as_str().to_owned())
                .collect()
        };
        assert_eq!(
            below("x"),
            ["x/a", "x/b/c"],
            "checkpoint every {checkpoint_every}"
        );
        assert_eq!(below("x/b"), ["x/b/c"]);
        assert!(below("x/a").is_empty());
        assert!(below("x.txt").is_empty());
    }
}

/// Reads made while checkpoints move the overlay into the trees, batch by batch, find
/// every key's latest state: never a key without one, never an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_checkpoints_see_every_state() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    // Checkpoints every 700 events: several during the appends, each of up to 700 keys.
    let log = Arc::new(EventLog::open(LogConfig::temporary().checkpoint_every(700)).unwrap());
    let name = |i: usize| Key::new(format!("d{}/f{i:05}", i % 7)).unwrap();
    let mtime = |round: usize| round as i64 + 1;
    // Keys below `done` hold the mtime of round `round` at least.
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    const KEYS: usize = 3000;
    let reader = {
        let (log, done, stop) = (log.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            // The latest state each key was read with: a later read is never older.
            let mut seen = vec![0i64; KEYS];
            while !stop.load(Ordering::Acquire) {
                let upto = done.load(Ordering::Acquire);
                for i in (0..upto).step_by(13) {
                    let heads = log.heads(&name(i)).unwrap();
                    assert_eq!(heads.len(), 1, "key {i} read with {} heads", heads.len());
                    match &heads[0].op {
                        Op::Put { meta, .. } => {
                            assert!(meta.mtime_ms >= seen[i], "key {i} read older");
                            seen[i] = meta.mtime_ms;
                        }
                        other => panic!("key {i}: {other:?}"),
                    }
                    reads += 1;
                }
            }
            reads
        })
    };
    for round in 0..2 {
        for start in (0..KEYS).step_by(250) {
            let changes = (start..start + 250)
                .map(|i| {
                    LocalChange::new(
                        name(i),
                        Op::Put {
                            content: None,
                            meta: Meta::file(mtime(round)),
                        },
                    )
                })
                .collect();
            log.append_local(changes).await.unwrap();
            if round == 0 {
                done.store(start + 250, Ordering::Release);
            }
        }
    }
    stop.store(true, Ordering::Release);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    // After it all, every key holds the second round's state.
    for i in 0..KEYS {
        let heads = log.heads(&name(i)).unwrap();
        match &heads[..] {
            [head] => match &head.op {
                Op::Put { meta, .. } => assert_eq!(meta.mtime_ms, mtime(1), "key {i}"),
                other => panic!("key {i}: {other:?}"),
            },
            other => panic!("key {i}: {other:?}"),
        }
    }
}
