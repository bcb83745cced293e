//! # converge-policies
//!
//! The built-in conflict policies. [`Lww`] (last-write-wins) is the default: of a key's
//! concurrent heads, the one with the greatest `(hlc, origin)` wins — a total order that
//! every replica computes the same way — and a winning delete shows the key absent.
//! [`ConflictCopy`] shows the same winner and keeps every losing file beside it, as a
//! conflict copy (`name.sync-conflict-<date>-<replica>.ext`), so no write is lost from
//! view.
//!
//! ```
//! use converge_api::{ConflictPolicy, EventId, Head, Hlc, Key, Op, ReplicaId};
//! use converge_policies::Lww;
//!
//! let head = |origin: u8, wall_ms| Head {
//!     id: EventId { origin: ReplicaId([origin; 16]), seq: 1 },
//!     hlc: Hlc { wall_ms, logical: 0 },
//!     op: Op::Delete,
//! };
//! let heads = [head(1, 200), head(2, 100)];
//! let key = Key::new("a.txt").unwrap();
//! assert_eq!(Lww.resolve(&key, &heads).winner, heads[0].id);
//! ```
#![deny(missing_docs)]

use std::sync::Arc;

use converge_api::{ConflictPolicy, EntryKind, Head, Key, Op, Resolution};

/// Last-write-wins: the greatest `(hlc, origin)` wins; no conflict copies.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lww;

impl ConflictPolicy for Lww {
    fn name(&self) -> &str {
        "lww"
    }

    fn resolve(&self, _key: &Key, heads: &[Head]) -> Resolution {
        Resolution::lww(heads)
    }
}

/// Last-write-wins at the key's path, and every other head that writes a file shown
/// beside it as a conflict copy (a losing delete or directory has nothing to show).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConflictCopy;

impl ConflictPolicy for ConflictCopy {
    fn name(&self) -> &str {
        "conflict-copy"
    }

    fn resolve(&self, _key: &Key, heads: &[Head]) -> Resolution {
        let mut resolution = Resolution::lww(heads);
        resolution.copies = heads
            .iter()
            .filter(|h| h.id != resolution.winner)
            .filter(|h| {
                matches!(&h.op, Op::Put { content: Some(_), meta } if meta.kind == EntryKind::File)
            })
            .map(|h| h.id)
            .collect();
        resolution
    }
}

/// Names of the built-in policies, for error messages.
pub const BUILT_IN: &[&str] = &["lww", "conflict-copy"];

/// The built-in policy called `name`, if there is one.
pub fn by_name(name: &str) -> Option<Arc<dyn ConflictPolicy>> {
    match name {
        "lww" => Some(Arc::new(Lww)),
        "conflict-copy" => Some(Arc::new(ConflictCopy)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use converge_api::{EventId, Hlc, Op, ReplicaId};

    fn head(origin: u8, wall_ms: u64, logical: u32) -> Head {
        Head {
            id: EventId {
                origin: ReplicaId([origin; 16]),
                seq: 1,
            },
            hlc: Hlc { wall_ms, logical },
            op: Op::Delete,
        }
    }

    fn check(heads: &[Head], expected_origin: u8) {
        let key = Key::new("k").unwrap();
        assert_eq!(
            Lww.resolve(&key, heads).winner.origin,
            ReplicaId([expected_origin; 16])
        );
        let mut reversed = heads.to_vec();
        reversed.reverse();
        assert_eq!(
            Lww.resolve(&key, &reversed).winner.origin,
            ReplicaId([expected_origin; 16]),
            "order-independent"
        );
    }

    #[test]
    fn greatest_clock_then_origin_wins() {
        check(&[head(1, 10, 0), head(2, 9, 5)], 1);
        check(&[head(1, 10, 0), head(2, 10, 1)], 2);
        check(&[head(1, 10, 0), head(2, 10, 0)], 2);
        check(&[head(3, 10, 0), head(2, 10, 0), head(1, 10, 0)], 3);
    }

    #[test]
    fn conflict_copy_shows_the_lww_winner_and_every_losing_file() {
        use converge_api::{ContentRef, Hash, Meta};
        let file = |origin: u8, wall_ms| Head {
            op: Op::Put {
                content: Some(ContentRef {
                    root: Hash([origin; 32]),
                    size: 1,
                    depth: 0,
                }),
                meta: Meta::file(0),
            },
            ..head(origin, wall_ms, 0)
        };
        let dir = |origin: u8, wall_ms| Head {
            op: Op::Put {
                content: None,
                meta: Meta::dir(0),
            },
            ..head(origin, wall_ms, 0)
        };
        let heads = [
            file(1, 10),
            file(2, 30),
            head(3, 20, 0),
            dir(4, 5),
            file(5, 15),
        ];
        let key = Key::new("k").unwrap();
        let resolution = ConflictCopy.resolve(&key, &heads);
        assert_eq!(resolution.winner, Lww.resolve(&key, &heads).winner);
        assert_eq!(resolution.winner.origin, ReplicaId([2; 16]));
        let copies: Vec<u8> = resolution.copies.iter().map(|id| id.origin.0[0]).collect();
        assert_eq!(
            copies,
            [1, 5],
            "the losing files, in head order; no delete, no dir"
        );
        // A losing write of a winning delete is kept too.
        let resolution = ConflictCopy.resolve(&key, &[file(1, 10), head(3, 20, 0)]);
        assert_eq!(resolution.winner.origin, ReplicaId([3; 16]));
        assert_eq!(resolution.copies.len(), 1);
    }
}
