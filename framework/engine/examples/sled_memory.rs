//! How sled 0.34's memory grows with the number of entries in a tree, whatever its cache
//! capacity: the measurement behind the README's "Peak memory as the workload grows".
//!
//! Inserts `N` keys shaped like a folder's paths (100 directories of 100, then files),
//! each with a value of `VALUE_BYTES` bytes, one `insert` at a time, into one tree of a
//! database in a temporary directory with the log's cache capacity
//! (`converge_framework::log::CACHE_BYTES`, 4 MiB), and prints the process's resident
//! memory (VmRSS) and its peak (VmHWM) each time the count doubles.
//!
//! ```sh
//! cargo run --release -p converge-framework --example sled_memory -- 320000 150
//! ```

use std::error::Error;
use std::time::Instant;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().as_deref().unwrap_or("320000").parse()?;
    let value_bytes: usize = args.next().as_deref().unwrap_or("150").parse()?;
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(converge_framework::log::CACHE_BYTES)
        .open()?;
    let tree = db.open_tree("state")?;
    println!("| entries | RSS (MiB) | peak RSS (MiB) | seconds |");
    println!("|--:|--:|--:|--:|");
    let started = Instant::now();
    let mut next_report = 10_000;
    for i in 0..count {
        let key = format!("d{:03}/s{:03}/file-{i:08}.bin", i % 100, (i / 100) % 100);
        let mut value = vec![0u8; value_bytes.max(8)];
        value[..8].copy_from_slice(&(i as u64).to_le_bytes());
        tree.insert(key.as_bytes(), value)?;
        if i + 1 == next_report || i + 1 == count {
            let (rss, peak) = memory()?;
            let seconds = started.elapsed().as_secs_f64();
            println!("| {} | {rss} | {peak} | {seconds:.2} |", i + 1);
            next_report *= 2;
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
