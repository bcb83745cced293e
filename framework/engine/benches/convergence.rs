//! Convergence throughput: 3 replicas over the in-memory transport (no faults), 100,000
//! events written across them; the time from the first write until every replica holds
//! every event. Runs 3 times and prints the median.
//!
//! `cargo bench -p converge-framework --bench convergence`
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use converge_api::{Key, Meta, Op};
use converge_framework::log::{EventLog, LocalChange, LogConfig};
use converge_framework::{EngineConfig, PeerConfig, SyncEngine};
use converge_policies::Lww;
use converge_transport_memory::{Faults, MemoryNetwork};

const REPLICAS: usize = 3;
const EVENTS: u64 = 100_000;
const BATCH: u64 = 1000;
const RUNS: usize = 3;

async fn once(run: usize) -> Duration {
    let network = MemoryNetwork::new(run as u64, Faults::none());
    let dirs: Vec<tempfile::TempDir> = (0..REPLICAS)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let logs: Vec<EventLog> = dirs
        .iter()
        .map(|d| EventLog::open(LogConfig::new(d.path())).unwrap())
        .collect();
    let mut engines = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let peers = (0..REPLICAS)
            .filter(|j| *j != i)
            .map(|j| PeerConfig {
                id: logs[j].replica(),
                address: Some(format!("r{j}")),
            })
            .collect();
        engines.push(
            SyncEngine::builder(log.clone(), Arc::new(Lww))
                .config(EngineConfig {
                    peers,
                    ..EngineConfig::default()
                })
                .transport(Arc::new(network.endpoint(&format!("r{i}"))))
                .start()
                .await
                .unwrap(),
        );
    }
    // Let the sessions come up so the clock measures sync, not dialing.
    while engines
        .iter()
        .any(|e| e.peers().iter().filter(|p| p.connected).count() < REPLICAS - 1)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    let writers: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            let log = log.clone();
            tokio::spawn(async move {
                let mine =
                    EVENTS / REPLICAS as u64 + u64::from(i == 0) * (EVENTS % REPLICAS as u64);
                let mut written = 0;
                while written < mine {
                    let n = BATCH.min(mine - written);
                    let changes = (0..n)
                        .map(|k| {
                            LocalChange::new(
                                Key::new(format!("dir{}/file{}", k % 50, (written + k) % 5000))
                                    .unwrap(),
                                Op::Put {
                                    content: None,
                                    meta: Meta::file((written + k) as i64),
                                },
                            )
                        })
                        .collect();
                    log.append_local(changes).await.unwrap();
                    written += n;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    while logs.iter().any(|l| l.version_vector().total() < EVENTS) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    for e in &engines {
        e.shutdown().await.unwrap();
    }
    elapsed
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut times: Vec<Duration> = (0..RUNS).map(|run| rt.block_on(once(run))).collect();
    times.sort();
    let median = times[RUNS / 2];
    println!("\n| replicas | events | median time to full convergence | events/s |");
    println!("|---------:|-------:|-------------------------------:|---------:|");
    println!(
        "| {REPLICAS} | {EVENTS} | {:.2} s | {:.0} |",
        median.as_secs_f64(),
        EVENTS as f64 / median.as_secs_f64()
    );
    println!("(runs: {:?})", times);
}
