//! Behaviour of the in-memory transport: delivery, faults, determinism, partitions, close.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use converge_framework::plugin::{Connection, Transport};
use converge_framework::TransportError;
use converge_transport_memory::{Faults, MemoryNetwork, MemoryTransport, NetworkStats};

/// Dials `b` from `a` and returns (dialing side, accepting side).
async fn connect(a: &MemoryTransport, b: &MemoryTransport) -> (Connection, Connection) {
    let dialed = a.dial(&b.local_address()).await.unwrap();
    let accepted = b.accept().await.unwrap();
    (dialed, accepted)
}

fn frame(n: u32) -> Vec<u8> {
    // Frames of different lengths, so truncation or mixing would show.
    let mut bytes = n.to_be_bytes().to_vec();
    bytes.extend(vec![n as u8; n as usize % 7]);
    bytes
}

fn number(frame: &[u8]) -> u32 {
    let n = u32::from_be_bytes(frame[..4].try_into().unwrap());
    assert_eq!(frame, self::frame(n), "frame {n} arrived altered");
    n
}

/// Sends frames `0..count` from a to b over a fresh network, spaced `gap` apart, closes,
/// and returns what b received up to the end of the stream, with the network's stats.
async fn transfer(
    seed: u64,
    faults: Faults,
    count: u32,
    gap: Duration,
) -> (Vec<u32>, NetworkStats) {
    let network = MemoryNetwork::new(seed, faults);
    let a = network.endpoint("a");
    let b = network.endpoint("b");
    let (mut dialed, mut accepted) = connect(&a, &b).await;
    let sending = tokio::spawn(async move {
        for n in 0..count {
            dialed.sender.send(frame(n)).await.unwrap();
            tokio::time::sleep(gap).await;
        }
        dialed.sender.close().await;
    });
    let mut received = Vec::new();
    while let Some(frame) = accepted.receiver.recv().await.unwrap() {
        received.push(number(&frame));
    }
    sending.await.unwrap();
    (received, network.stats())
}

/// Checks one transfer against the frames expected, in order.
async fn check(faults: Faults, count: u32, expected: &[u32]) {
    let (received, _) = transfer(1, faults, count, Duration::ZERO).await;
    assert_eq!(received, expected);
}

fn lossy(drop: f64, duplicate: f64, reorder: f64, max_delay_ms: u64) -> Faults {
    Faults {
        drop,
        duplicate,
        reorder,
        max_delay: Duration::from_millis(max_delay_ms),
    }
}

#[tokio::test(start_paused = true)]
async fn without_faults_frames_arrive_intact_and_in_order() {
    let expected: Vec<u32> = (0..100).collect();
    check(Faults::none(), 100, &expected).await;

    let (_, stats) = transfer(1, Faults::none(), 100, Duration::ZERO).await;
    let bytes: u64 = (0..100).map(|n| frame(n).len() as u64).sum();
    assert_eq!(
        stats,
        NetworkStats {
            frames_sent: 100,
            frames_delivered: 100,
            frames_dropped: 0,
            frames_duplicated: 0,
            bytes_delivered: bytes,
        }
    );
}

#[tokio::test(start_paused = true)]
async fn both_directions_carry_frames_and_sides_know_their_roles() {
    let network = MemoryNetwork::new(3, Faults::none());
    let a = network.endpoint("a");
    let b = network.endpoint("b");
    assert_eq!(a.kind(), "memory");
    assert_eq!(a.local_address(), "a");
    let (mut dialed, mut accepted) = connect(&a, &b).await;
    assert!(dialed.dialed);
    assert!(!accepted.dialed);
    assert_eq!(dialed.remote, "b");
    assert_eq!(accepted.remote, "a");

    dialed.sender.send(b"ping".to_vec()).await.unwrap();
    assert_eq!(
        accepted.receiver.recv().await.unwrap(),
        Some(b"ping".to_vec())
    );
    accepted.sender.send(b"pong".to_vec()).await.unwrap();
    assert_eq!(
        dialed.receiver.recv().await.unwrap(),
        Some(b"pong".to_vec())
    );
    // Empty frames are frames too.
    accepted.sender.send(Vec::new()).await.unwrap();
    assert_eq!(dialed.receiver.recv().await.unwrap(), Some(Vec::new()));
}

#[tokio::test(start_paused = true)]
async fn dial_of_unknown_or_dropped_endpoint_is_unreachable() {
    let network = MemoryNetwork::new(0, Faults::none());
    let a = network.endpoint("a");
    assert!(
        matches!(a.dial("nowhere").await, Err(TransportError::Unreachable { address, .. }) if address == "nowhere")
    );

    let b = network.endpoint("b");
    drop(b);
    assert!(matches!(
        a.dial("b").await,
        Err(TransportError::Unreachable { .. })
    ));

    // The address can be registered again, like a restarted replica.
    let b = network.endpoint("b");
    let (_dialed, accepted) = connect(&a, &b).await;
    assert_eq!(accepted.remote, "a");
}

#[tokio::test(start_paused = true)]
async fn replaced_endpoint_stops_accepting() {
    let network = MemoryNetwork::new(0, Faults::none());
    let a = network.endpoint("a");
    let old = network.endpoint("b");
    let new = network.endpoint("b");
    assert!(matches!(old.accept().await, Err(TransportError::Closed)));
    drop(old); // must not unregister the new endpoint
    let (_dialed, accepted) = connect(&a, &new).await;
    assert_eq!(accepted.remote, "a");
}

#[tokio::test(start_paused = true)]
async fn with_drop_one_nothing_arrives() {
    check(lossy(1.0, 0.0, 0.0, 0), 50, &[]).await;
    let (_, stats) = transfer(9, lossy(1.0, 0.0, 0.0, 0), 50, Duration::ZERO).await;
    assert_eq!(
        (
            stats.frames_sent,
            stats.frames_dropped,
            stats.frames_delivered
        ),
        (50, 50, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn dropped_frames_leave_the_receiver_waiting() {
    let network = MemoryNetwork::new(5, lossy(1.0, 0.0, 0.0, 0));
    let a = network.endpoint("a");
    let b = network.endpoint("b");
    let (mut dialed, mut accepted) = connect(&a, &b).await;
    dialed.sender.send(frame(1)).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(60), accepted.receiver.recv()).await;
    assert!(waited.is_err(), "a dropped frame arrived: {waited:?}");

    // Turning faults off heals the link for later frames.
    network.set_faults(Faults::none());
    dialed.sender.send(frame(2)).await.unwrap();
    assert_eq!(accepted.receiver.recv().await.unwrap(), Some(frame(2)));
}

#[tokio::test(start_paused = true)]
async fn with_duplicate_one_each_frame_arrives_twice() {
    check(lossy(0.0, 1.0, 0.0, 0), 4, &[0, 0, 1, 1, 2, 2, 3, 3]).await;
    let (_, stats) = transfer(2, lossy(0.0, 1.0, 0.0, 0), 10, Duration::ZERO).await;
    assert_eq!(
        (
            stats.frames_sent,
            stats.frames_duplicated,
            stats.frames_delivered
        ),
        (10, 10, 20)
    );
}

#[tokio::test(start_paused = true)]
async fn reorder_delivers_everything_but_not_in_order() {
    let faults = lossy(0.0, 0.0, 0.5, 100);
    for gap in [Duration::ZERO, Duration::from_millis(10)] {
        let (received, stats) = transfer(11, faults, 200, gap).await;
        let mut sorted = received.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..200).collect::<Vec<_>>(),
            "gap {gap:?}: a frame was lost or repeated"
        );
        assert_ne!(received, sorted, "gap {gap:?}: nothing was reordered");
        assert_eq!(stats.frames_delivered, 200);
    }
}

#[tokio::test(start_paused = true)]
async fn delays_cost_no_real_time_on_a_paused_clock() {
    let started = std::time::Instant::now();
    let (received, _) = transfer(4, lossy(0.0, 0.0, 1.0, 3_600_000), 20, Duration::ZERO).await;
    assert_eq!(received.len(), 20);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_delivery_sequence() {
    let faults = lossy(0.2, 0.2, 0.3, 50);
    let gap = Duration::from_millis(3);
    let (first, first_stats) = transfer(42, faults, 300, gap).await;
    let (second, second_stats) = transfer(42, faults, 300, gap).await;
    assert_eq!(first, second);
    assert_eq!(first_stats, second_stats);
    assert!(first_stats.frames_dropped > 0 && first_stats.frames_duplicated > 0);

    let (other, _) = transfer(43, faults, 300, gap).await;
    assert_ne!(first, other, "a different seed made the same decisions");
}

/// Three endpoints exchanging frames in both directions on every pair: the whole log of
/// who received what, in which order.
async fn mesh(seed: u64) -> Vec<(String, String, u32)> {
    let network = MemoryNetwork::new(seed, lossy(0.1, 0.1, 0.3, 20));
    let names = ["a", "b", "c"];
    let endpoints: Vec<MemoryTransport> = names.iter().map(|name| network.endpoint(name)).collect();
    let mut connections = Vec::new();
    for i in 0..names.len() {
        for j in i + 1..names.len() {
            let (dialed, accepted) = connect(&endpoints[i], &endpoints[j]).await;
            connections.push((names[i], dialed));
            connections.push((names[j], accepted));
        }
    }
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (me, connection) in connections {
        let Connection {
            remote,
            mut sender,
            mut receiver,
            ..
        } = connection;
        tasks.push(tokio::spawn(async move {
            for n in 0..50 {
                sender.send(frame(n)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sender.close().await;
        }));
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(frame) = receiver.recv().await.unwrap() {
                log.lock()
                    .unwrap()
                    .push((me.to_owned(), remote.clone(), number(&frame)));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    log
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_interleaving_across_a_mesh() {
    let first = mesh(7).await;
    assert!(!first.is_empty());
    assert_eq!(first, mesh(7).await);
}

#[tokio::test(start_paused = true)]
async fn partition_closes_connections_and_blocks_dials_until_healed() {
    let network = MemoryNetwork::new(0, Faults::none());
    let a = network.endpoint("a");
    let b = network.endpoint("b");
    let c = network.endpoint("c");
    let (mut ab, mut ba) = connect(&a, &b).await;
    let (mut ac, mut ca) = connect(&a, &c).await;

    // Frames in flight when the partition hits are lost; a waiting receiver wakes up.
    ab.sender.send(frame(1)).await.unwrap();
    let waiting = tokio::spawn(async move { ab.receiver.recv().await.map(|_| ()) });
    tokio::task::yield_now().await;
    network.partition("b", "a");

    assert!(matches!(
        waiting.await.unwrap(),
        Err(TransportError::Closed)
    ));
    assert!(matches!(
        ba.receiver.recv().await,
        Err(TransportError::Closed)
    ));
    assert!(ab.sender.send(frame(2)).await.is_err());
    assert!(ba.sender.send(frame(3)).await.is_err());
    assert!(matches!(
        a.dial("b").await,
        Err(TransportError::Unreachable { .. })
    ));
    assert!(matches!(
        b.dial("a").await,
        Err(TransportError::Unreachable { .. })
    ));
    assert!(network.is_partitioned("a", "b"));

    // Other pairs are untouched.
    ac.sender.send(frame(4)).await.unwrap();
    assert_eq!(ca.receiver.recv().await.unwrap(), Some(frame(4)));
    let (_bc, _cb) = connect(&b, &c).await;

    network.heal("a", "b");
    let (mut ab, mut ba) = connect(&a, &b).await;
    ab.sender.send(frame(5)).await.unwrap();
    assert_eq!(ba.receiver.recv().await.unwrap(), Some(frame(5)));
}

#[tokio::test(start_paused = true)]
async fn isolate_cuts_every_pair_until_heal_all() {
    let network = MemoryNetwork::new(0, Faults::none());
    let a = network.endpoint("a");
    let b = network.endpoint("b");
    let c = network.endpoint("c");
    let (_ab, mut ba) = connect(&a, &b).await;
    let (mut bc, mut cb) = connect(&b, &c).await;
    network.isolate("a");
    network.partition("b", "c");

    assert!(matches!(
        ba.receiver.recv().await,
        Err(TransportError::Closed)
    ));
    assert!(matches!(
        cb.receiver.recv().await,
        Err(TransportError::Closed)
    ));
    assert!(bc.sender.send(frame(0)).await.is_err());
    assert!(c.dial("a").await.is_err());
    assert!(c.dial("b").await.is_err());

    network.heal_all();
    connect(&c, &a).await;
    connect(&c, &b).await;
}

#[tokio::test(start_paused = true)]
async fn close_ends_the_stream_after_frames_in_flight() {
    let network = MemoryNetwork::new(0, lossy(0.0, 0.0, 1.0, 30));
    let a = network.endpoint("a");
    let b = network.endpoint("b");
    let (mut dialed, mut accepted) = connect(&a, &b).await;
    dialed.sender.send(frame(1)).await.unwrap();
    dialed.sender.send(frame(2)).await.unwrap();
    dialed.sender.close().await;
    dialed.sender.close().await; // idempotent
    assert!(matches!(
        dialed.sender.send(frame(3)).await,
        Err(TransportError::Closed)
    ));

    let mut received = Vec::new();
    while let Some(frame) = accepted.receiver.recv().await.unwrap() {
        received.push(number(&frame));
    }
    received.sort_unstable();
    assert_eq!(received, [1, 2]);
    assert_eq!(accepted.receiver.recv().await.unwrap(), None);

    // The other direction stays open.
    accepted.sender.send(frame(4)).await.unwrap();
    assert_eq!(dialed.receiver.recv().await.unwrap(), Some(frame(4)));
}

#[tokio::test(start_paused = true)]
async fn dropping_one_side_ends_the_other() {
    let network = MemoryNetwork::new(0, Faults::none());
    let a = network.endpoint("a");
    let b = network.endpoint("b");
    let (mut dialed, accepted) = connect(&a, &b).await;
    drop(accepted);
    assert_eq!(dialed.receiver.recv().await.unwrap(), None);
    assert!(matches!(
        dialed.sender.send(frame(0)).await,
        Err(TransportError::Closed)
    ));
}

#[tokio::test(start_paused = true)]
async fn out_of_range_probabilities_do_not_panic() {
    check(lossy(-1.0, f64::NAN, 2.0, 0), 3, &[0, 1, 2]).await;
}
