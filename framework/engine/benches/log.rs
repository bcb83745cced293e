//! Event-log benchmarks: durable append throughput against raw sled, and rebuild speed.
//!
//! `cargo bench -p converge-framework --bench log` runs criterion, then prints a table of
//! medians with the append/raw-sled ratios measured in the same run. Two floors: raw sled
//! inserting the same encoded events one entry per event (what the issue measures
//! against), and raw sled inserting the same bytes grouped the way the log stores them
//! (segments of up to 128 events), which shows converge's own overhead.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use converge_api::{codec, ContentRef, Event, EventId, Hash, Hlc, Key, Meta, Op, ReplicaId};
use converge_framework::log::{EventLog, LogConfig};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};

const BATCHES: [usize; 3] = [1, 64, 1024];
const SEGMENT_EVENTS: usize = converge_framework::log::SEGMENT_EVENTS as usize;
const REBUILD_EVENTS: u64 = 1_000_000;

fn event(origin: ReplicaId, seq: u64) -> Event {
    Event {
        id: EventId { origin, seq },
        hlc: Hlc {
            wall_ms: 1_700_000_000_000 + seq,
            logical: 0,
        },
        key: Key::new(format!("folder/sub{}/file-{}.txt", seq % 100, seq % 10_000)).unwrap(),
        parents: vec![EventId {
            origin,
            seq: seq.saturating_sub(10_000).max(1),
        }],
        op: Op::Put {
            content: Some(ContentRef {
                root: Hash::of(&seq.to_le_bytes()),
                size: 4096,
                depth: 0,
            }),
            meta: Meta::file(1_700_000_000_000),
        },
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn bench_append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append");
    group.measurement_time(Duration::from_secs(5));
    for &n in &BATCHES {
        group.throughput(Throughput::Elements(n as u64));
        let dir = tempfile::tempdir().unwrap();
        let log = rt.block_on(async { EventLog::open(LogConfig::new(dir.path())).unwrap() });
        let origin = ReplicaId([9; 16]);
        let mut seq = 0u64;
        group.bench_with_input(BenchmarkId::new("durable", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    let batch: Vec<Event> =
                        (1..=n as u64).map(|i| event(origin, seq + i)).collect();
                    seq += n as u64;
                    batch
                },
                |batch| rt.block_on(log.append(batch)).unwrap(),
                BatchSize::SmallInput,
            )
        });
        rt.block_on(log.close()).unwrap();

        // The same bytes written straight into one sled tree and flushed, with the sled
        // configuration the log uses (its cache size matters): the floors.
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .cache_capacity(converge_framework::log::CACHE_BYTES)
            .open()
            .unwrap();
        let tree = db.open_tree("raw").unwrap();
        let offset = std::cell::Cell::new(0u64);
        let encoded_batch = |n: usize| {
            (1..=n as u64)
                .map(|i| codec::encode_event(&event(origin, offset.get() + i)).unwrap())
                .collect::<Vec<_>>()
        };
        group.bench_with_input(BenchmarkId::new("raw_sled", n), &n, |b, &n| {
            b.iter_batched(
                || encoded_batch(n),
                |encoded| {
                    let mut batch = sled::Batch::default();
                    for bytes in encoded {
                        offset.set(offset.get() + 1);
                        batch.insert(&offset.get().to_be_bytes(), bytes);
                    }
                    tree.apply_batch(batch).unwrap();
                    db.flush().unwrap();
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_with_input(BenchmarkId::new("raw_sled_segments", n), &n, |b, &n| {
            b.iter_batched(
                || encoded_batch(n),
                |encoded| {
                    let mut batch = sled::Batch::default();
                    for events in encoded.chunks(SEGMENT_EVENTS) {
                        let mut value = vec![1u8];
                        value.extend_from_slice(&(events.len() as u32).to_le_bytes());
                        for bytes in events {
                            value.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                            value.extend_from_slice(bytes);
                        }
                        batch.insert(&offset.get().to_be_bytes(), value);
                        offset.set(offset.get() + events.len() as u64);
                    }
                    tree.apply_batch(batch).unwrap();
                    db.flush().unwrap();
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn bench_rebuild(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let log = rt.block_on(async { EventLog::open(LogConfig::new(dir.path())).unwrap() });
    let origin = ReplicaId([7; 16]);
    rt.block_on(async {
        let mut seq = 0;
        while seq < REBUILD_EVENTS {
            let batch: Vec<Event> = (1..=8192)
                .map(|i| event(origin, seq + i))
                .take_while(|e| e.id.seq <= REBUILD_EVENTS)
                .collect();
            seq += batch.len() as u64;
            log.append(batch).await.unwrap();
        }
    });
    let mut group = c.benchmark_group("rebuild");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(REBUILD_EVENTS));
    group.bench_function(BenchmarkId::new("events", REBUILD_EVENTS), |b| {
        b.iter(|| assert_eq!(rt.block_on(log.rebuild()).unwrap(), REBUILD_EVENTS))
    });
    group.finish();
    rt.block_on(log.close()).unwrap();
}

/// Median time per iteration of a benchmark, read back from criterion's own estimates.
fn median_seconds(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../target").to_string());
    let path = format!("{dir}/criterion/{group}/{id}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    // {"mean":{...},"median":{"confidence_interval":{...},"point_estimate":123.4,...
    let median = text.split("\"median\"").nth(1)?;
    let value = median.split("\"point_estimate\":").nth(1)?;
    let number: String = value
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '-')
        .collect();
    number.parse::<f64>().ok().map(|ns| ns / 1e9)
}

fn print_table() {
    println!(
        "\n| batch | converge durable append (events/s) | raw sled, entry per event (events/s) | ratio | raw sled, same segments (events/s) | ratio |"
    );
    println!("|------:|------:|------:|------:|------:|------:|");
    for n in BATCHES {
        let (Some(ours), Some(raw), Some(segments)) = (
            median_seconds("append", &format!("durable/{n}")),
            median_seconds("append", &format!("raw_sled/{n}")),
            median_seconds("append", &format!("raw_sled_segments/{n}")),
        ) else {
            continue;
        };
        println!(
            "| {n} | {:.0} | {:.0} | {:.0}% | {:.0} | {:.0}% |",
            n as f64 / ours,
            n as f64 / raw,
            100.0 * raw / ours,
            n as f64 / segments,
            100.0 * segments / ours
        );
    }
    if let Some(t) = median_seconds("rebuild", &format!("events/{REBUILD_EVENTS}")) {
        println!(
            "\nrebuild of a {REBUILD_EVENTS}-event log: {:.2} s median, {:.0} events/s",
            t,
            REBUILD_EVENTS as f64 / t
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_append(&mut c);
    bench_rebuild(&mut c);
    c.final_summary();
    print_table();
}
