//! # example-policy-keep-larger
//!
//! A conflict policy loaded at run time from a `cdylib`: of a key's concurrent heads, the
//! one with the **larger content wins**; equal sizes fall back to last-write-wins
//! (`(hlc, origin)`), so every replica picks the same winner.
//!
//! Run it:
//!
//! ```text
//! cargo build --release -p example-policy-keep-larger
//! # in the folder's config:
//! #   [[plugins]]
//! #   path = "target/release/libexample_policy_keep_larger.so"
//! #   [folder]
//! #   conflict_policy = "keep-larger"
//! ```
//!
//! Sizes: a `Put` counts its content's size; a `Put` without content (a directory) and a
//! `Delete` count as 0, so a delete concurrent with a non-empty file loses and the file
//! stays. See `docs/plugins.md`.
//!
//! The policy is an ordinary Rust value too, which is how its unit tests and the static
//! half of the dylib benchmark call it:
//!
//! ```
//! use converge_api::abi::PolicyPlugin;
//! use converge_api::{ContentRef, EventId, Hash, Head, Hlc, Key, Meta, Op, ReplicaId};
//! use example_policy_keep_larger::KeepLarger;
//!
//! let head = |origin: u8, wall_ms: u64, size: u64| Head {
//!     id: EventId { origin: ReplicaId([origin; 16]), seq: 1 },
//!     hlc: Hlc { wall_ms, logical: 0 },
//!     op: Op::Put {
//!         content: Some(ContentRef { root: Hash::of(&[origin]), size, depth: 0 }),
//!         meta: Meta::file(0),
//!     },
//! };
//! // The older but larger write wins.
//! let heads = [head(1, 100, 5_000), head(2, 200, 10)];
//! let key = Key::new("notes.txt").unwrap();
//! assert_eq!(KeepLarger.resolve(&key, &heads).winner, heads[0].id);
//! ```
//!
//! Test hook: the key `__panic__` makes `resolve` panic, so the host's panic handling
//! (caught in the plugin, `PANIC` code, last-write-wins fallback) can be tested.
#![deny(missing_docs)]

use converge_api::abi::PolicyPlugin;
use converge_api::{Head, Key, Op, Resolution};

/// The key that makes [`KeepLarger::resolve`] panic (a test hook).
pub const PANIC_KEY: &str = "__panic__";

/// Larger content wins; ties go to last-write-wins.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeepLarger;

/// The size a head counts for: its content's, 0 for a directory or a delete.
pub fn size_of(head: &Head) -> u64 {
    match &head.op {
        Op::Put {
            content: Some(c), ..
        } => c.size,
        Op::Put { content: None, .. } | Op::Delete => 0,
    }
}

impl PolicyPlugin for KeepLarger {
    fn name(&self) -> &str {
        "keep-larger"
    }

    fn resolve(&self, key: &Key, heads: &[Head]) -> Resolution {
        if key.as_str() == PANIC_KEY {
            panic!("keep-larger: asked to panic by the test key {PANIC_KEY}");
        }
        Resolution::single(
            heads
                .iter()
                .max_by_key(|h| (size_of(h), h.lww_rank()))
                .map(|h| h.id),
        )
    }
}

converge_api::export_plugin!(policy: KeepLarger);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use converge_api::{ContentRef, EventId, Hash, Hlc, Meta, ReplicaId};

    fn head(origin: u8, wall_ms: u64, size: Option<u64>) -> Head {
        Head {
            id: EventId {
                origin: ReplicaId([origin; 16]),
                seq: 1,
            },
            hlc: Hlc {
                wall_ms,
                logical: 0,
            },
            op: match size {
                Some(size) => Op::Put {
                    content: Some(ContentRef {
                        root: Hash([origin; 32]),
                        size,
                        depth: 0,
                    }),
                    meta: Meta::file(0),
                },
                None => Op::Delete,
            },
        }
    }

    fn check(heads: &[Head], expected_origin: u8) {
        let key = Key::new("k").unwrap();
        assert_eq!(
            KeepLarger.resolve(&key, heads).winner.origin,
            ReplicaId([expected_origin; 16])
        );
    }

    #[test]
    fn larger_wins_ties_are_lww_deletes_count_zero() {
        check(&[head(1, 100, Some(10)), head(2, 200, Some(5))], 1);
        check(&[head(1, 100, Some(5)), head(2, 200, Some(5))], 2);
        check(&[head(1, 300, Some(5)), head(2, 200, Some(5))], 1);
        check(&[head(1, 100, Some(1)), head(2, 200, None)], 1);
        check(&[head(1, 100, Some(0)), head(2, 200, None)], 2);
    }
}
