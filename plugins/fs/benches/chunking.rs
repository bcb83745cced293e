//! What cutting a large file into content costs on one core: the floor under W2 of
//! `bench/daemon/run.py`, whatever the disk and the network do.
//!
//! `cargo bench -p converge-plugin-fs --bench chunking` measures, over 64 MiB of random
//! bytes: FastCDC's cut points alone and BLAKE3 over the chunks FastCDC cuts alone (the two
//! passes every sender makes; a receiver makes the second again to check what it is sent),
//! and BLAKE3 over chunks of exactly 16 KiB for comparison: BLAKE3's SIMD fills all its
//! lanes only for whole 16 KiB subtrees (with AVX-512), and runs the rest of an input on
//! narrower kernels, so chunks of FastCDC's sizes hash at a fraction of its best rate. Then
//! the plugin's own paths over a file of that size in the page cache: `hash_file` (read,
//! cut, hash, build the tree) and `store_file` into a fresh content store (that, plus
//! recording the chunks: for a file this large, adopting it as a pack). It prints a table
//! of medians in MiB/s and the time each would take for W2's 256 MiB.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use converge_framework::log::{EventLog, LogConfig};
use converge_plugin_fs::content::{hash_file, store_file, AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
use criterion::{BatchSize, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

const LEN: usize = 64 << 20;
const W2: f64 = 256.0;

fn main() {
    let mut data = vec![0u8; LEN];
    SmallRng::seed_from_u64(1).fill_bytes(&mut data);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();

    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    let mut group = c.benchmark_group("chunking");
    group.throughput(Throughput::Bytes(LEN as u64));
    group.bench_function("fastcdc", |b| {
        b.iter(|| {
            fastcdc::v2020::FastCDC::new(&data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                .map(|c| c.length)
                .sum::<usize>()
        })
    });
    let cuts: Vec<std::ops::Range<usize>> =
        fastcdc::v2020::FastCDC::new(&data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
            .map(|c| c.offset..c.offset + c.length)
            .collect();
    group.bench_function("blake3", |b| {
        b.iter(|| {
            cuts.iter()
                .map(|c| blake3::hash(&data[c.clone()]).as_bytes()[0])
                .fold(0u8, |a, x| a ^ x)
        })
    });
    group.bench_function("blake3_16k", |b| {
        b.iter(|| {
            data.chunks(AVG_CHUNK as usize)
                .map(|c| blake3::hash(c).as_bytes()[0])
                .fold(0u8, |a, x| a ^ x)
        })
    });
    group.bench_function("hash_file", |b| b.iter(|| hash_file(&path).unwrap()));
    group.bench_function("store_file", |b| {
        b.iter_batched(
            || EventLog::open(LogConfig::temporary()).unwrap(),
            |log| {
                store_file(&path, log.chunks()).unwrap();
                log
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    c.final_summary();

    println!("\n| step (64 MiB, one core) | median | MiB/s | for W2's 256 MiB |");
    println!("|---|--:|--:|--:|");
    for name in ["fastcdc", "blake3", "blake3_16k", "hash_file", "store_file"] {
        let Some(secs) = median(&format!("chunking/{name}")) else {
            println!("| {name} | n/a | | |");
            continue;
        };
        let mib = LEN as f64 / (1 << 20) as f64;
        println!(
            "| {name} | {:.1} ms | {:.0} | {:.2} s |",
            secs * 1e3,
            mib / secs,
            secs * W2 / mib
        );
    }
}

/// The median criterion saved for `id`, in seconds.
fn median(id: &str) -> Option<f64> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        std::path::PathBuf::from,
    );
    let file = target
        .join("criterion")
        .join(id)
        .join("new")
        .join("estimates.json");
    let estimates: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    estimates["median"]["point_estimate"]
        .as_f64()
        .map(|ns| ns / 1e9)
}
