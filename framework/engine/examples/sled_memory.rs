//! How sled's memory grows with what a tree holds, at the log's cache capacity
//! (`converge_framework::log::CACHE_BYTES`, 4 MiB): the measurement behind the README's
//! "Peak memory as the workload grows" and vendor/sled/CONVERGE.md.
//!
//! Two shapes of writes, each into one tree of a fresh database in a temporary directory:
//! - `state`: `N` keys shaped like a folder's paths (100 directories of 100, then files),
//!   each with a value of `BYTES` bytes, one `insert` at a time, as the `state` tree gets
//!   a folder's entries;
//! - `log`: `N` values of `BYTES` bytes under rising 8-byte keys, eight to a batch and a
//!   flush after each, as the `log` tree gets segments of events.
//!
//! It prints the process's resident memory (VmRSS) and its peak (VmHWM) as the count
//! grows. With sled 0.34.7 as published, the resident memory follows what was written
//! (a 150 MiB log took 155 MiB) until some 16,000 pages are cached; with the vendored
//! sled's 8 shards it stays within a few MiB of the cache.
//!
//! ```sh
//! cargo run --release -p converge-framework --example sled_memory -- state 320000 150
//! cargo run --release -p converge-framework --example sled_memory -- log 4000 38000
//! ```

use std::error::Error;
use std::time::Instant;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let shape = args.next().unwrap_or_else(|| "state".to_string());
    let count: usize = args.next().as_deref().unwrap_or("320000").parse()?;
    let value_bytes: usize = args.next().as_deref().unwrap_or("150").parse()?;
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(converge_framework::log::CACHE_BYTES)
        .open()?;
    let tree = db.open_tree(&shape)?;
    println!("| {shape} entries | MiB written | RSS (MiB) | peak RSS (MiB) | seconds |");
    println!("|--:|--:|--:|--:|--:|");
    let started = Instant::now();
    let report = |done: usize| -> Result<(), Box<dyn Error>> {
        let (rss, peak) = memory()?;
        let written = (done * value_bytes) >> 20;
        let seconds = started.elapsed().as_secs_f64();
        println!("| {done} | {written} | {rss} | {peak} | {seconds:.2} |");
        Ok(())
    };
    // `state` reports at 10,000 entries and each time the count doubles; `log` at each
    // eighth of the count.
    let step = (count / 8).max(1);
    let mut next_report = if shape == "state" { 10_000 } else { step };
    let mut batch = sled::Batch::default();
    for i in 0..count {
        let mut value = vec![0u8; value_bytes.max(8)];
        value[..8].copy_from_slice(&(i as u64).to_le_bytes());
        match shape.as_str() {
            "state" => {
                let key = format!("d{:03}/s{:03}/file-{i:08}.bin", i % 100, (i / 100) % 100);
                tree.insert(key.as_bytes(), value)?;
            }
            "log" => {
                batch.insert(&(i as u64).to_be_bytes(), value);
                if (i + 1) % 8 == 0 || i + 1 == count {
                    tree.apply_batch(std::mem::take(&mut batch))?;
                    db.flush()?;
                }
            }
            other => return Err(format!("unknown shape {other:?}: state or log").into()),
        }
        if i + 1 == next_report || i + 1 == count {
            report(i + 1)?;
            next_report = if shape == "state" {
                next_report * 2
            } else {
                next_report + step
            };
        }
    }
    db.flush()?;
    Ok(())
}

/// The process's resident memory and its peak, in MiB, from `/proc/self/status`.
fn memory() -> Result<(u64, u64), Box<dyn Error>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<u64, Box<dyn Error>> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| format!("no value in {line:?}"))?
            .parse()?;
        Ok(kib / 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
