//! Plugin-boundary benchmarks: a resolve of two small heads through the keep-larger policy
//! loaded from its `cdylib` against the same policy linked statically (target: ≤ 2 µs extra
//! per call), and events/s through the JSON-lines source loaded from its `cdylib`.
//!
//! `cargo bench -p converge-framework --bench dylib` builds the example plugins (release),
//! runs criterion, then prints the extra nanoseconds per call and the source's rate.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use converge_api::abi::PolicyPlugin;
use converge_api::{codec, ConflictPolicy, Key};
use converge_framework::log::{EventLog, LogConfig};
use converge_framework::plugin::dylib;
use converge_framework::plugin::{ScanProgress, SourceContext};
use criterion::Criterion;
use example_policy_keep_larger::KeepLarger;

const SOURCE_RECORDS: u64 = 20_000;

#[path = "../tests/support/example_plugins.rs"]
mod example_plugins;
#[path = "../tests/support/heads.rs"]
mod heads;
use example_plugins::example_plugin;
use heads::head;

fn per_call(mut f: impl FnMut()) -> f64 {
    const N: u32 = 200_000;
    for _ in 0..N / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..N {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(N)
}

/// Events/s from appending `SOURCE_RECORDS` lines to the tailed file until all are logged.
fn source_rate() -> f64 {
    let plugin = dylib::load(example_plugin("example_source_jsonl")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kv.jsonl");
    std::fs::write(&data, "").unwrap();
    let source = plugin.source(data.to_str().unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = EventLog::open(LogConfig::temporary()).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ctx = SourceContext::new(
            log.clone(),
            stop_rx,
            tokio::sync::watch::channel(ScanProgress::default()).0,
        );
        let task = tokio::spawn(async move { source.run(ctx).await });
        let mut file = std::io::BufWriter::new(std::fs::File::create(&data).unwrap());
        let start = Instant::now();
        for i in 0..SOURCE_RECORDS {
            writeln!(
                file,
                "{{\"id\": {}, \"value\": \"value number {i}\"}}",
                i % 1000
            )
            .unwrap();
        }
        file.flush().unwrap();
        while log.len() < SOURCE_RECORDS {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "source too slow"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rate = SOURCE_RECORDS as f64 / start.elapsed().as_secs_f64();
        stop_tx.send_replace(true);
        task.await.unwrap().unwrap();
        log.close().await.unwrap();
        rate
    })
}

fn main() {
    let loaded: Arc<dyn ConflictPolicy> = dylib::load(example_plugin("example_policy_keep_larger"))
        .unwrap()
        .policy()
        .unwrap();
    let heads = [head(1, 100, 50), head(2, 200, 10)];
    let key = Key::new("notes/todo.md").unwrap();

    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    let mut group = c.benchmark_group("resolve two heads");
    group.bench_function("static", |b| {
        b.iter(|| KeepLarger.resolve(std::hint::black_box(&key), std::hint::black_box(&heads)))
    });
    group.bench_function("dylib", |b| {
        b.iter(|| loaded.resolve(std::hint::black_box(&key), std::hint::black_box(&heads)))
    });
    group.finish();

    let static_ns = per_call(|| {
        std::hint::black_box(KeepLarger.resolve(&key, std::hint::black_box(&heads)));
    });
    let dylib_ns = per_call(|| {
        std::hint::black_box(loaded.resolve(&key, std::hint::black_box(&heads)));
    });
    println!(
        "\nresolve of two heads: static {static_ns:.0} ns, dylib {dylib_ns:.0} ns, extra {:.0} ns per call (target ≤ 2000)",
        dylib_ns - static_ns
    );
    // Where the extra time goes: the four encoding steps of one call.
    let req_bytes = converge_api::abi::encode_resolve_request(&key, &heads);
    let resolution = KeepLarger.resolve(&key, &heads);
    let res_bytes = codec::encode(&resolution).unwrap();
    let steps = [
        (
            "encode request",
            per_call(|| {
                std::hint::black_box(converge_api::abi::encode_resolve_request(
                    std::hint::black_box(&key),
                    std::hint::black_box(&heads),
                ));
            }),
        ),
        (
            "decode request",
            per_call(|| {
                std::hint::black_box(
                    converge_api::abi::decode_resolve_request(std::hint::black_box(&req_bytes))
                        .unwrap(),
                );
            }),
        ),
        (
            "encode resolution",
            per_call(|| {
                std::hint::black_box(codec::encode(std::hint::black_box(&resolution)).unwrap());
            }),
        ),
        (
            "decode resolution",
            per_call(|| {
                std::hint::black_box(
                    codec::decode::<converge_api::Resolution>(std::hint::black_box(&res_bytes))
                        .unwrap(),
                );
            }),
        ),
    ];
    for (what, ns) in steps {
        println!("  {what}: {ns:.0} ns");
    }
    println!(
        "dylib source (jsonl): {:.0} events/s over {SOURCE_RECORDS} records",
        source_rate()
    );
    c.final_summary();
}
