//! A source that fails is started again (after a pause), so a passing failure (a full
//! disk, a folder away for a while) does not leave the replica deaf to local changes; the
//! engine shows it down, with the reason, until it has scanned again.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use converge_api::{Key, Meta, Op};
use converge_framework::log::{EventLog, LocalChange, LogConfig};
use converge_framework::plugin::{Source, SourceContext};
use converge_framework::{PluginError, SourceStatus, SyncEngine};
use converge_policies::Lww;

/// Fails its first two runs; the third records one change, reports its start-up scan
/// done once `scanned` is notified, and runs until shutdown.
struct Flaky {
    runs: AtomicU32,
    scanned: tokio::sync::Notify,
}

#[async_trait]
impl Source for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    fn scans_at_start(&self) -> bool {
        true
    }

    async fn run(&self, mut ctx: SourceContext) -> Result<(), PluginError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run <= 2 {
            return Err(PluginError::new("flaky", format!("failure {run}")));
        }
        ctx.emit(vec![LocalChange::new(
            Key::new(format!("run-{run}")).unwrap(),
            Op::Put {
                content: None,
                meta: Meta::dir(0),
            },
        )])
        .await
        .map_err(|e| PluginError::new("flaky", e))?;
        self.scanned.notified().await;
        ctx.initial_scan_done();
        ctx.shutdown().await;
        Ok(())
    }
}

/// Real time: the log appends on its own thread, which paused time would run past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_source_is_started_again() {
    let log = EventLog::open(LogConfig::temporary()).unwrap();
    let source = Arc::new(Flaky {
        runs: AtomicU32::new(0),
        scanned: tokio::sync::Notify::new(),
    });
    let engine = SyncEngine::builder(log.clone(), Arc::new(Lww))
        .source(source.clone())
        .start()
        .await
        .unwrap();
    for _ in 0..100 {
        if log.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(log.len(), 1, "the third run recorded its change");
    assert_eq!(log.heads(&Key::new("run-3").unwrap()).unwrap().len(), 1);
    // Down, saying why, until the run started again has scanned.
    let down = SourceStatus {
        name: "flaky".into(),
        up: false,
        failures: 2,
        error: Some("plugin flaky: failure 2".into()),
    };
    assert_eq!(engine.sources(), std::slice::from_ref(&down));
    source.scanned.notify_one();
    let up = SourceStatus {
        up: true,
        error: None,
        ..down
    };
    for _ in 0..100 {
        if engine.sources() == [up.clone()] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(engine.sources(), [up]);
    engine.shutdown().await.unwrap();
    // It ended without an error at shutdown: not started again.
    assert_eq!(source.runs.load(Ordering::SeqCst), 3);
}
