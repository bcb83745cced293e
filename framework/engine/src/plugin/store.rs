//! The `Store` role: materializes the projection somewhere (a folder, a mirror).

use async_trait::async_trait;
use converge_api::{Head, Key, Op};

use crate::content::ChunkStore;
use crate::error::{LogError, PluginError};
use crate::log::EventLog;
use crate::reconciler::{pick, view, Reconciler};

/// What a store must show for one key: the conflict policy's answer over its heads.
/// Serializable, so that a store can keep the views it could not show yet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyView {
    /// The key.
    pub key: Key,
    /// The winning head, or `None` when the key is absent (never written, or a delete won).
    pub winner: Option<Head>,
    /// Losing heads to show beside the key as conflict copies (policy-dependent).
    pub copies: Vec<Head>,
    /// Whether the key has more than one head.
    pub conflicted: bool,
    /// Heads shown as conflict copies before an event of this batch merged the conflict
    /// keeping what the key showed (a user deleted the copy on some replica): a store
    /// that wrote copies of them removes them, unless they were changed since.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_copies: Vec<Head>,
}

/// What a store may read while applying: the content store and the log (e.g. to see
/// whether live keys remain below a directory that lost).
#[derive(Clone, Debug)]
pub struct StoreContext {
    log: EventLog,
    reconciler: Option<Reconciler>,
}

impl StoreContext {
    /// A context over `log`, deciding what keys show by last-write-wins.
    pub fn new(log: EventLog) -> Self {
        StoreContext {
            log,
            reconciler: None,
        }
    }

    /// Decides what keys show with `reconciler` (the engine's conflict policy).
    pub fn with_reconciler(mut self, reconciler: Reconciler) -> Self {
        self.reconciler = Some(reconciler);
        self
    }

    /// Whether some key strictly below `dir` shows something (its winner is a `Put`): then
    /// `dir` must be a directory, whatever its own heads say (DESIGN §2).
    pub fn shown_below(&self, dir: &Key) -> Result<bool, LogError> {
        for entry in self.log.states_below(dir) {
            let (key, state) = entry?;
            let (winner, _) = pick(
                self.reconciler.as_ref().map(Reconciler::policy),
                &key,
                &state.heads,
            );
            if winner.is_some_and(|h| matches!(h.op, Op::Put { .. })) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// What the store is to show for `key` now, as the engine would hand it in a batch
    /// (the conflict policy's answer over its heads; no copies ended by a merge): for a
    /// store that shows a key no event of a batch brings (see [`Store::to_show`]).
    pub fn view(&self, key: &Key) -> Result<KeyView, LogError> {
        let state = self.log.state(key)?;
        let policy = self.reconciler.as_ref().map(Reconciler::policy);
        Ok(view(policy, key, &state))
    }

    /// The content store: every chunk of every view's winner and copies is present.
    pub fn chunks(&self) -> &ChunkStore {
        self.log.chunks()
    }

    /// The log, for reading other keys' state.
    pub fn log(&self) -> &EventLog {
        &self.log
    }
}

/// A subscriber that materializes key views. The engine feeds it batches read from the
/// log after its durable cursor and advances the cursor once they are durable: once
/// `show` returns for a store that does not [split](Store::splits_sync) showing from
/// syncing (the default `show` is `apply`), once `sync` returns for one that does.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The subscriber name, also the name of its cursor (`folder`, `mirror-backup`).
    fn name(&self) -> &str;

    /// Makes the store show `views` and makes that durable before returning (one batch,
    /// one durability barrier, no per-file fsync). Must be idempotent: after a crash or
    /// a replay the same views come again. Every chunk they reference is present.
    async fn apply(&self, ctx: &StoreContext, views: Vec<KeyView>) -> Result<(), PluginError>;

    /// Whether the store splits showing a batch ([`Store::show`]) from making it durable
    /// ([`Store::sync`]). The engine then shows it batch after batch while more events
    /// wait, and syncs once after the last one (or after a bound on the events or the
    /// time), moving the cursor past them all only once that sync returns: one barrier
    /// covers several batches, and writing the next batch does not wait for the disk.
    /// If a `show` or a `sync` fails, the engine shows the same events again from the
    /// cursor. Otherwise (the default) each batch goes to `show`, whose default is
    /// `apply`, and the cursor moves after each.
    fn splits_sync(&self) -> bool {
        false
    }

    /// Shows `views` as [`Store::apply`] does, without waiting for them to be durable (for
    /// a store that [splits](Store::splits_sync) the two). The default applies them
    /// durably at once.
    async fn show(&self, ctx: &StoreContext, views: Vec<KeyView>) -> Result<(), PluginError> {
        self.apply(ctx, views).await
    }

    /// Makes what [`Store::show`] showed since the last sync durable. After a failed
    /// `show` or `sync` the engine shows the same events again before it syncs: the
    /// store must not take what the failed attempt wrote for durable then (the folder
    /// store writes those files again). The default has nothing to do (the default
    /// `show` applies durably).
    async fn sync(&self, _ctx: &StoreContext) -> Result<(), PluginError> {
        Ok(())
    }

    /// Called once at start, before the store catches up with the log: the place to clear
    /// what a crash left behind (a folder store removes its stale temporary files).
    async fn start(&self, _ctx: &StoreContext) -> Result<(), PluginError> {
        Ok(())
    }

    /// How many keys could not be shown and are to be tried again (a folder store's file
    /// in a directory it may not write). Such keys fail alone: the batch goes through,
    /// and the cursor moves on. While there are some and no new events come, the engine calls
    /// [`Store::retry`] after a growing pause; the admin API and the metrics show the
    /// count.
    fn failed(&self) -> usize {
        0
    }

    /// Tries the keys that failed again (see [`Store::failed`]), and shows the keys of
    /// [`Store::to_show`].
    async fn retry(&self, _ctx: &StoreContext) -> Result<(), PluginError> {
        Ok(())
    }

    /// How many keys the store has to show that no event brings, and that have not
    /// failed: the folder store's keys that its ignore rules came to let in, whose
    /// events it passed over while they were ignored. The engine calls [`Store::retry`]
    /// as soon as [`Store::more_to_show`] says some came, and after a growing pause while
    /// some are left, as for failed keys; they are not counted as failed. The default has
    /// none.
    fn to_show(&self) -> usize {
        0
    }

    /// Returns once the store may have more keys to show of its own (see
    /// [`Store::to_show`]); the engine then calls [`Store::retry`]. Cancel-safe: a wake-up
    /// that comes while the engine does not wait must be kept for its next wait. The
    /// default never returns.
    async fn more_to_show(&self) {
        std::future::pending::<()>().await
    }
}
