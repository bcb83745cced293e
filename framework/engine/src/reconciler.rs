//! Reconciler: runs the conflict policy over a key's heads to get what stores show.

use std::sync::Arc;

use converge_api::{ConflictPolicy, Head, Key, Op};

use crate::plugin::KeyView;
use crate::projection::KeyState;

/// Turns key states into views with one conflict policy.
#[derive(Clone)]
pub struct Reconciler {
    policy: Arc<dyn ConflictPolicy>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("policy", &self.policy.name())
            .finish()
    }
}

impl Reconciler {
    /// A reconciler using `policy`.
    pub fn new(policy: Arc<dyn ConflictPolicy>) -> Self {
        Reconciler { policy }
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    /// What stores show for `key` in `state`. One head needs no policy. An answer that
    /// names no head (a buggy policy) falls back to last-write-wins, so every replica
    /// still agrees.
    pub fn view(&self, key: &Key, state: &KeyState) -> KeyView {
        let heads = &state.heads;
        let (winner, copies): (Option<&Head>, Vec<Head>) = match heads.len() {
            0 => (None, Vec::new()),
            1 => (heads.first(), Vec::new()),
            _ => {
                let resolution = self.policy.resolve(key, heads);
                let find = |id| heads.iter().find(|h| h.id == id);
                match find(resolution.winner) {
                    Some(w) => (
                        Some(w),
                        resolution
                            .copies
                            .iter()
                            .filter_map(|id| find(*id))
                            .cloned()
                            .collect(),
                    ),
                    None => {
                        tracing::warn!(policy = self.policy.name(), %key, "policy named no head; using last-write-wins");
                        (heads.iter().max_by_key(|h| h.lww_rank()), Vec::new())
                    }
                }
            }
        };
        let winner = winner.filter(|h| !matches!(h.op, Op::Delete)).cloned();
        KeyView {
            key: key.clone(),
            winner,
            copies,
            conflicted: heads.len() > 1,
        }
    }
}
