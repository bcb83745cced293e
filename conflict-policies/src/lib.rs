//! # converge-policies
//!
//! The built-in conflict policies. [`Lww`] (last-write-wins) is the default: of a key's
//! concurrent heads, the one with the greatest `(hlc, origin)` wins — a total order that
//! every replica computes the same way — and a winning delete shows the key absent.
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

use converge_api::{ConflictPolicy, Head, Key, Resolution};

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

/// Names of the built-in policies, for error messages.
pub const BUILT_IN: &[&str] = &["lww"];

/// The built-in policy called `name`, if there is one.
pub fn by_name(name: &str) -> Option<Arc<dyn ConflictPolicy>> {
    match name {
        "lww" => Some(Arc::new(Lww)),
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
}
