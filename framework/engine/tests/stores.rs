//! A store that splits showing from syncing ([`Store::show`], [`Store::sync`]) is shown
//! the batches that have more events after them without a sync, then synced once, and
//! its cursor moves only once that sync succeeded: a failed sync shows the same events
//! again from the cursor.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use converge_api::{Key, Meta, Op};
use converge_framework::log::{EventLog, LocalChange, LogConfig};
use converge_framework::plugin::{KeyView, Store, StoreContext};
use converge_framework::{EngineConfig, PluginError, SyncEngine};
use converge_policies::Lww;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// A batch shown: its keys, and the cursor when it came.
    Show { keys: usize, cursor: u64 },
    /// A sync, and whether it failed.
    Sync { failed: bool },
}

/// Records its calls; its first sync fails.
#[derive(Default)]
struct Split {
    calls: Mutex<Vec<Call>>,
    synced_once: AtomicBool,
}

#[async_trait]
impl Store for Split {
    fn name(&self) -> &str {
        "split"
    }

    fn splits_sync(&self) -> bool {
        true
    }

    async fn apply(&self, ctx: &StoreContext, views: Vec<KeyView>) -> Result<(), PluginError> {
        self.show(ctx, views).await?;
        self.sync(ctx).await
    }

    async fn show(&self, ctx: &StoreContext, views: Vec<KeyView>) -> Result<(), PluginError> {
        let cursor = ctx.log().cursor("split").unwrap();
        self.calls.lock().unwrap().push(Call::Show {
            keys: views.len(),
            cursor,
        });
        Ok(())
    }

    async fn sync(&self, _ctx: &StoreContext) -> Result<(), PluginError> {
        let failed = !self.synced_once.swap(true, Ordering::SeqCst);
        self.calls.lock().unwrap().push(Call::Sync { failed });
        match failed {
            true => Err(PluginError::new("split", "the disk said no")),
            false => Ok(()),
        }
    }
}

/// Real time: the log appends on its own thread, which paused time would run past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shown_batches_are_synced_once_and_shown_again_after_a_failed_sync() {
    let log = EventLog::open(LogConfig::temporary()).unwrap();
    let changes: Vec<LocalChange> = (0..35)
        .map(|i| {
            LocalChange::new(
                Key::new(format!("dir-{i:02}")).unwrap(),
                Op::Put {
                    content: None,
                    meta: Meta::dir(0),
                },
            )
        })
        .collect();
    log.append_local(changes).await.unwrap();
    let store = Arc::new(Split::default());
    let config = EngineConfig {
        max_batch_events: 10,
        ..EngineConfig::default()
    };
    let engine = SyncEngine::builder(log.clone(), Arc::new(Lww))
        .config(config)
        .store(store.clone())
        .start()
        .await
        .unwrap();
    for _ in 0..100 {
        if log.cursor("split").unwrap() == 35 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(log.cursor("split").unwrap(), 35);
    let round = |cursor| {
        [10, 10, 10, 5]
            .map(|keys| Call::Show { keys, cursor })
            .to_vec()
    };
    let mut expected = round(0);
    expected.push(Call::Sync { failed: true });
    // From the cursor again, which the failed sync did not move.
    expected.extend(round(0));
    expected.push(Call::Sync { failed: false });
    assert_eq!(*store.calls.lock().unwrap(), expected);
    let status = engine.subscribers().unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(
        (status[0].applied, status[0].error.as_deref()),
        (35, None),
        "counted once, when synced"
    );
    engine.shutdown().await.unwrap();
}
