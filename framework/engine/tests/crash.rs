//! Crash recovery, after sled's `test_crash_recovery`: the test re-runs its own binary as a
//! child that appends to a log without pause (local batches, and remote batches from two
//! fake origins with duplicates, events ahead of a gap and the odd rebuild) and prints
//! every acknowledged event; the parent kills it with SIGKILL at a random moment, reopens
//! the log and checks that nothing acknowledged is lost, that no origin's sequence has a
//! gap, and that the projection equals both a fold over the log and a rebuild. Several
//! kill-and-check rounds run on the same directory.
//!
//! The seed is printed first; `CONVERGE_CRASH_SEED=<seed>` replays the same choices (the
//! moment of each kill still depends on timing).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use converge_api::{Event, EventId, Hlc, Key, Meta, Op, ReplicaId, VersionVector};
use converge_framework::log::{EventLog, LocalChange, LogConfig, Tips, IDS_STRIDE};
use converge_framework::projection::KeyState;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const TEST_NAME: &str = "crash_recovery";
/// Set in the child: the log directory.
const CHILD_DIR_ENV: &str = "CONVERGE_CRASH_CHILD";
/// Set in the child: the seed of its choices.
const CHILD_SEED_ENV: &str = "CONVERGE_CRASH_CHILD_SEED";
const ITERATIONS: usize = 5;
/// Small, so kills land before, during and after checkpoints.
const CHECKPOINT_EVERY: u64 = 500;
const KEYS: u8 = 20;
const ORIGINS: [ReplicaId; 2] = [ReplicaId([0xa1; 16]), ReplicaId([0xb2; 16])];
/// Generous: a loaded machine may take long to start the child and reopen the log.
const FIRST_ACK_TIMEOUT: Duration = Duration::from_secs(60);

fn config(dir: &Path) -> LogConfig {
    LogConfig::new(dir).checkpoint_every(CHECKPOINT_EVERY)
}

fn key(k: u8) -> Key {
    Key::new(format!("dir{}/k{k:02}", k % 3)).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn replica_from_hex(s: &str) -> ReplicaId {
    assert_eq!(s.len(), 32, "bad replica id {s:?}");
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    ReplicaId(out)
}

#[test]
fn crash_recovery() {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        let seed = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
        child(Path::new(&dir), seed);
        return;
    }
    let seed: u64 = std::env::var("CONVERGE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{TEST_NAME}: seed {seed} (CONVERGE_CRASH_SEED={seed} replays its choices)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashSet<EventId> = HashSet::new();
    let mut local: Option<ReplicaId> = None;
    for iteration in 0..ITERATIONS {
        let ctx = format!("seed {seed}, iteration {iteration}");
        let child_seed: u64 = rng.gen();
        let delay = Duration::from_millis(rng.gen_range(100..=1500));
        let run = run_and_kill(dir.path(), child_seed, delay, &ctx);
        match local {
            None => local = Some(run.replica),
            Some(r) => assert_eq!(r, run.replica, "{ctx}: the replica id changed"),
        }
        let new = run.acked.len();
        acked.extend(run.acked);
        let len = verify(dir.path(), &acked, run.replica, &ctx);
        eprintln!(
            "{ctx}: killed after {delay:?}, {new} events acknowledged, log holds {len}, \
             {} rebuilds started",
            run.rebuilds
        );
    }
}

/// What a child reported before it was killed.
struct ChildRun {
    replica: ReplicaId,
    acked: Vec<EventId>,
    rebuilds: usize,
}

/// Starts a child on `dir`, kills it `delay` after its first acknowledgement and collects
/// everything it reported.
fn run_and_kill(dir: &Path, child_seed: u64, delay: Duration, ctx: &str) -> ChildRun {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, child_seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            // A line cut by the kill has no newline; it was never flushed whole, so it
            // acknowledges nothing: `lines` still yields it, and parsing drops it below.
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut run = ChildRun {
        replica: ReplicaId([0; 16]),
        acked: Vec::new(),
        rebuilds: 0,
    };
    let mut saw_replica = false;
    let mut parse = |line: &str, run: &mut ChildRun| {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["replica", id] => {
                run.replica = replica_from_hex(id);
                saw_replica = true;
            }
            ["ack", origin, seq, "."] => run.acked.push(EventId {
                origin: replica_from_hex(origin),
                seq: seq.parse().unwrap(),
            }),
            ["rebuild"] => run.rebuilds += 1,
            _ => {} // libtest's own output, or a line the kill cut short
        }
    };
    // Wait for the first acknowledgement so the kill lands in the append loop.
    loop {
        match rx.recv_timeout(FIRST_ACK_TIMEOUT) {
            Ok(line) => {
                parse(&line, &mut run);
                if !run.acked.is_empty() {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                panic!("{ctx}: no acknowledgement from the child ({e}); it exited with {status}");
            }
        }
    }
    std::thread::sleep(delay);
    if let Some(status) = child.try_wait().unwrap() {
        panic!("{ctx}: the child stopped by itself before the kill: {status}");
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    for line in rx.try_iter() {
        parse(&line, &mut run);
    }
    assert!(
        saw_replica,
        "{ctx}: the child did not report its replica id"
    );
    run
}

/// Reopens the log and checks it against what the child acknowledged. Returns its length.
fn verify(dir: &Path, acked: &HashSet<EventId>, replica: ReplicaId, ctx: &str) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = EventLog::open(config(dir))
            .unwrap_or_else(|e| panic!("{ctx}: reopening after the kill failed: {e}"));
        assert_eq!(log.replica(), replica, "{ctx}: identity lost");

        // Offsets 0..n in order, and each origin's seqs 1, 2, 3, … in log order: no gap.
        let read = log.read(0, usize::MAX).unwrap();
        assert_eq!(log.len(), read.len() as u64, "{ctx}");
        let mut vv = VersionVector::new();
        let mut model: BTreeMap<Key, KeyState> = BTreeMap::new();
        let mut ids = HashSet::with_capacity(read.len());
        for (i, (offset, event)) in read.iter().enumerate() {
            assert_eq!(*offset, i as u64, "{ctx}: offsets not contiguous");
            let held = vv.get(&event.id.origin);
            assert_eq!(
                event.id.seq,
                held + 1,
                "{ctx}: at offset {offset}, {:?} follows seq {held} of its origin",
                event.id
            );
            model.entry(event.key.clone()).or_default().fold(event, &vv);
            vv.set(event.id.origin, event.id.seq);
            ids.insert(event.id);
        }
        assert_eq!(log.version_vector(), vv, "{ctx}: version vector");
        let mut tips = Tips::new();
        for (_, event) in &read {
            tips.insert(event.id.origin, (event.id.seq, event.fingerprint()));
        }
        assert_eq!(log.tips(), tips, "{ctx}: tips");

        // Nothing acknowledged is lost, and lookups by id find it.
        let mut lost: Vec<&EventId> = acked.iter().filter(|id| !ids.contains(id)).collect();
        lost.sort();
        assert!(
            lost.is_empty(),
            "{ctx}: {} acknowledged events lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        // `get` scans from the nearest indexed seq, so a lookup per event would be slow:
        // check the seqs around each index point and every origin's last ones.
        for id in acked {
            let near_index = matches!(id.seq % IDS_STRIDE, 0..=2);
            if near_index || id.seq + 3 > vv.get(&id.origin) {
                let event = log.get(id).unwrap();
                assert_eq!(event.map(|e| e.id), Some(*id), "{ctx}: get({id:?})");
            }
        }

        // The projection: recovered, folded from the log, and rebuilt, all equal.
        let recovered: BTreeMap<Key, KeyState> = log.states().map(|r| r.unwrap()).collect();
        assert_eq!(
            recovered, model,
            "{ctx}: recovered projection != fold of the log"
        );
        assert_eq!(log.rebuild().await.unwrap(), read.len() as u64, "{ctx}");
        let rebuilt: BTreeMap<Key, KeyState> = log.states().map(|r| r.unwrap()).collect();
        assert_eq!(recovered, rebuilt, "{ctx}: recovered projection != rebuild");
        assert_eq!(log.tips(), tips, "{ctx}: tips after a rebuild");
        log.close().await.unwrap();
        read.len()
    })
}

/// Writes `lines` to stdout at once and flushes. The parent gone, there is nobody left
/// to report to: exit.
fn report(lines: impl IntoIterator<Item = String>) {
    let mut out = String::new();
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(out.as_bytes()).is_err() || stdout.flush().is_err() {
        std::process::exit(0);
    }
}

/// A trailing `.` marks a whole line: a line the kill cut short does not parse.
fn ack_line(id: &EventId) -> String {
    format!("ack {} {} .", hex(&id.origin.0), id.seq)
}

/// The child: appends until killed, from three tasks at once so group commits hold
/// several requests.
fn child(dir: &Path, seed: u64) {
    // A failed append panics inside a task: end the process so the parent sees it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = EventLog::open(config(dir)).unwrap();
        // libtest has just printed `test crash_recovery ... ` without a newline.
        report([String::new(), format!("replica {}", hex(&log.replica().0))]);
        tokio::spawn(local_writer(log.clone(), seed));
        for (i, origin) in ORIGINS.into_iter().enumerate() {
            tokio::spawn(remote_writer(log.clone(), origin, seed ^ (i as u64 + 1)));
        }
        // Killed long before; stop anyway should the parent forget.
        tokio::time::sleep(Duration::from_secs(120)).await;
        std::process::exit(1);
    });
}

async fn local_writer(log: EventLog, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    loop {
        let changes: Vec<LocalChange> = (0..rng.gen_range(1..=50))
            .map(|_| {
                LocalChange::new(
                    key(rng.gen_range(0..KEYS)),
                    if rng.gen_ratio(1, 4) {
                        Op::Delete
                    } else {
                        Op::Put {
                            content: None,
                            meta: Meta::file(rng.gen_range(0..1_000_000)),
                        }
                    },
                )
            })
            .collect();
        let n = changes.len();
        let events = log.append_local(changes).await.unwrap();
        assert_eq!(events.len(), n);
        report(events.iter().map(|e| ack_line(&e.id)));
        if rng.gen_ratio(1, 300) {
            report(["rebuild".to_owned()]);
            log.rebuild().await.unwrap();
        }
    }
}

/// Appends events of the fake `origin` as if they came from a peer: parents are the key's
/// current heads, sometimes plus an event of the other origin not held yet (it will be
/// superseded on arrival). Some batches re-offer the previous one (duplicates) or end
/// with an event ahead of a gap, which must be handed back, not appended.
async fn remote_writer(log: EventLog, origin: ReplicaId, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let other = ORIGINS.into_iter().find(|o| *o != origin).unwrap();
    let mut next = log.version_vector().get(&origin) + 1;
    let mut previous: Vec<Event> = Vec::new();
    loop {
        let mut batch: Vec<Event> = Vec::new();
        if rng.gen_ratio(1, 10) {
            batch.extend(previous.iter().cloned());
        }
        let fresh: Vec<Event> = (0..rng.gen_range(1..=50u64))
            .map(|i| {
                let seq = next + i;
                let k = key(rng.gen_range(0..KEYS));
                let mut parents: Vec<EventId> =
                    log.heads(&k).unwrap().iter().map(|h| h.id).collect();
                if rng.gen_ratio(1, 8) {
                    parents.push(EventId {
                        origin: other,
                        seq: log.version_vector().get(&other) + rng.gen_range(1..5),
                    });
                }
                Event {
                    id: EventId { origin, seq },
                    hlc: Hlc {
                        wall_ms: 1_700_000_000_000 + seq * 10,
                        logical: u32::from(origin.0[0]),
                    },
                    key: k,
                    parents,
                    op: if rng.gen_ratio(1, 4) {
                        Op::Delete
                    } else {
                        Op::Put {
                            content: None,
                            meta: Meta::file(seq as i64),
                        }
                    },
                }
            })
            .collect();
        let fresh_ids: Vec<EventId> = fresh.iter().map(|e| e.id).collect();
        batch.extend(fresh.iter().cloned());
        let ahead = rng.gen_ratio(1, 10).then(|| {
            let mut e = fresh[fresh.len() - 1].clone();
            e.id.seq += 2; // one seq missing in between
            e
        });
        batch.extend(ahead.clone());
        let offered_again = batch.len() - fresh.len() - usize::from(ahead.is_some());

        let outcome = log.append(batch).await.unwrap();
        assert_eq!(
            outcome.appended, fresh_ids,
            "only the fresh events are appended"
        );
        assert_eq!(outcome.duplicates, offered_again);
        assert_eq!(outcome.out_of_order, ahead.into_iter().collect::<Vec<_>>());
        report(outcome.appended.iter().map(ack_line));
        next += fresh.len() as u64;
        previous = fresh;
    }
}
