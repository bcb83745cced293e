//! The heads the keep-larger example policy is exercised with, shared by the engine's
//! dylib test and bench (included with `#[path]`).

use converge_api::{ContentRef, EventId, Hash, Head, Hlc, Meta, Op, ReplicaId};

/// A put of a `size`-byte file by replica `origin` (seq 1) at `wall_ms`.
pub fn head(origin: u8, wall_ms: u64, size: u64) -> Head {
    Head {
        id: EventId {
            origin: ReplicaId([origin; 16]),
            seq: 1,
        },
        hlc: Hlc {
            wall_ms,
            logical: 0,
        },
        op: Op::Put {
            content: Some(ContentRef {
                root: Hash([origin; 32]),
                size,
                depth: 0,
            }),
            meta: Meta::file(0),
        },
    }
}
