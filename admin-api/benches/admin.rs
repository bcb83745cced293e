//! Cost of the admin API: median latency of a `/metrics` scrape and of `/api/v1/status`
//! (criterion, over a real engine with a folder store, a mirror, three peers and 2,000
//! events), then local append throughput with the metrics observer on and off (as the
//! folder source reports each batch), printed with their ratio.
//!
//! Run: `cargo bench -p converge-admin --bench admin`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use converge_admin::{router, AdminState, AuthMode, Metrics};
use converge_api::{Key, Meta, Op, ReplicaId};
use converge_framework::log::{EventLog, LocalChange, LogConfig};
use converge_framework::{
    AppendOrigin, EngineConfig, EngineEvent, Observer, PeerConfig, SyncEngine,
};
use converge_plugin_fs::{FsConfig, FsStore};
use criterion::Criterion;
use http_body_util::BodyExt;
use tower::ServiceExt;

const BATCH: usize = 256;
const BATCHES: usize = 40;

fn changes(prefix: &str, n: usize) -> Vec<LocalChange> {
    (0..n)
        .map(|i| {
            LocalChange::new(
                Key::new(format!("{prefix}-{i}")).unwrap(),
                Op::Put {
                    content: None,
                    meta: Meta::file(1),
                },
            )
        })
        .collect()
}

/// Appends `BATCHES` batches of `BATCH` events, reporting each batch to `observer` the way
/// the folder source does; returns events per second.
async fn append_rate(log: &EventLog, observer: Option<&Metrics>, round: usize) -> f64 {
    let start = Instant::now();
    for b in 0..BATCHES {
        let t = Instant::now();
        let events = log
            .append_local(changes(&format!("r{round}-b{b}"), BATCH))
            .await
            .unwrap();
        if let Some(o) = observer {
            o.observe(&EngineEvent::Appended {
                origin: AppendOrigin::Local,
                events: events.len() as u64,
                duration: t.elapsed(),
            });
        }
    }
    (BATCH * BATCHES) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let folder = tempfile::tempdir().unwrap();
    let mirror = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = rt.block_on(async {
        let log = EventLog::open(LogConfig::temporary()).unwrap();
        let engine = SyncEngine::builder(log, Arc::new(converge_policies::Lww))
            .observer(metrics.clone())
            .config(EngineConfig {
                peers: (1..=3)
                    .map(|i| PeerConfig {
                        id: ReplicaId([i; 16]),
                        address: None,
                    })
                    .collect(),
                ..EngineConfig::default()
            })
            .store(Arc::new(FsStore::new(FsConfig::new(folder.path()))))
            .store(Arc::new(FsStore::mirror(
                "backup",
                FsConfig::new(mirror.path()),
            )))
            .start()
            .await
            .unwrap();
        for b in 0..8 {
            let dirs = (0..250)
                .map(|i| {
                    LocalChange::new(
                        Key::new(format!("d{b}-{i}")).unwrap(),
                        Op::Put {
                            content: None,
                            meta: Meta::dir(1),
                        },
                    )
                })
                .collect();
            engine.log().append_local(dirs).await.unwrap();
        }
        Arc::new(engine)
    });
    let app = router(AdminState::new(
        engine.clone(),
        metrics.clone(),
        "t",
        AuthMode::Mutating,
    ));

    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for path in ["/metrics", "/api/v1/status"] {
        c.bench_function(&format!("GET {path}"), |b| {
            b.to_async(&rt).iter(|| async {
                let response = app
                    .clone()
                    .oneshot(Request::get(path).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                response
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .len()
            })
        });
    }
    c.final_summary();

    // Append throughput, observer on and off, alternating rounds to share any drift.
    let log = EventLog::open(LogConfig::temporary()).unwrap();
    let observer = Metrics::new().unwrap();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for round in 0..10 {
            if round % 2 == 0 {
                on.push(append_rate(&log, Some(&observer), round).await);
            } else {
                off.push(append_rate(&log, None, round).await);
            }
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (on, off) = (median(&mut on), median(&mut off));
    println!(
        "append throughput: observer on {on:.0} events/s, off {off:.0} events/s, on/off = {:.3}",
        on / off
    );
    // Raw cost of one observation, for scale.
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        observer.observe(&EngineEvent::Applied {
            subscriber: "folder",
            events: 1,
            conflicts: 0,
            policy: "lww",
            duration: Duration::from_micros(50),
        });
    }
    println!(
        "one Applied observation: {:.0} ns",
        t.elapsed().as_nanos() as f64 / f64::from(n)
    );
}
