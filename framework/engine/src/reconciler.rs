//! Reconciler: runs the conflict policy over a key's heads to get what stores show.

use std::sync::Arc;

use converge_api::{ConflictPolicy, Head, Key, Op, Resolution};

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

    /// The policy.
    pub fn policy(&self) -> &dyn ConflictPolicy {
        &*self.policy
    }

    /// What stores show for `key` in `state` (see [`pick`]).
    pub fn view(&self, key: &Key, state: &KeyState) -> KeyView {
        view(Some(&*self.policy), key, state)
    }

    /// The heads that `parents` (the heads a merging event names) showed as conflict
    /// copies, if the merge kept what they showed (its `op` is the winner's): the copies
    /// it ends. Empty for any other event, such as an edit or a delete of the key, after
    /// which copies stay until deleted.
    pub fn merged_copies(&self, key: &Key, op: &Op, parents: &[Head]) -> Vec<Head> {
        match pick(Some(&*self.policy), key, parents) {
            (Some(winner), copies) if parents.len() > 1 && winner.op == *op => {
                copies.into_iter().cloned().collect()
            }
            _ => Vec::new(),
        }
    }
}

/// What stores show for `key` in `state`, deciding with `policy` (last-write-wins without
/// one; see [`pick`]).
pub(crate) fn view(policy: Option<&dyn ConflictPolicy>, key: &Key, state: &KeyState) -> KeyView {
    let heads = &state.heads;
    let (winner, copies) = pick(policy, key, heads);
    let copies = copies.into_iter().cloned().collect();
    let winner = winner.filter(|h| !matches!(h.op, Op::Delete)).cloned();
    KeyView {
        key: key.clone(),
        winner,
        copies,
        conflicted: heads.len() > 1,
        merged_copies: Vec::new(),
    }
}

/// The head shown for `key` among `heads`, and the heads shown beside it as conflict
/// copies. One head needs no policy; without a policy, or when the policy's answer names
/// no head (a buggy policy), last-write-wins decides, so every replica still agrees.
/// `None` only for no heads.
pub fn pick<'h>(
    policy: Option<&dyn ConflictPolicy>,
    key: &Key,
    heads: &'h [Head],
) -> (Option<&'h Head>, Vec<&'h Head>) {
    let find = |id| heads.iter().find(|h| h.id == id);
    if heads.len() < 2 {
        return (heads.first(), Vec::new());
    }
    let Some(policy) = policy else {
        return (find(Resolution::lww(heads).winner), Vec::new());
    };
    let resolution = policy.resolve(key, heads);
    match find(resolution.winner) {
        Some(winner) => (
            Some(winner),
            resolution
                .copies
                .iter()
                .filter_map(|id| find(*id))
                .collect(),
        ),
        None => {
            tracing::warn!(policy = policy.name(), %key, "policy named no head; using last-write-wins");
            (find(Resolution::lww(heads).winner), Vec::new())
        }
    }
}
