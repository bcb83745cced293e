//! The conflict-policy trait: a pure, deterministic choice among a key's concurrent heads.

use serde::{Deserialize, Serialize};
use serde_tuple::{Deserialize_tuple, Serialize_tuple};

use crate::event::{Event, EventId, Hlc, Key, Op, ReplicaId};

/// One head of a key: an event on that key that no known event names as a parent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize_tuple, Deserialize_tuple)]
pub struct Head {
    /// The event's id.
    pub id: EventId,
    /// Its clock reading.
    pub hlc: Hlc,
    /// What it does.
    pub op: Op,
}

impl Head {
    /// The head of a key that `event` would form.
    pub fn of(event: &Event) -> Head {
        Head {
            id: event.id,
            hlc: event.hlc,
            op: event.op.clone(),
        }
    }

    /// The last-write-wins order: `(hlc, origin)`.
    pub fn lww_rank(&self) -> (Hlc, ReplicaId) {
        (self.hlc, self.id.origin)
    }
}

/// What a store shows for a key with one or more heads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// The head shown at the key's own path (a `Delete` winner shows the key absent).
    pub winner: EventId,
    /// Losing heads to show beside it as conflict copies (empty for last-write-wins).
    pub copies: Vec<EventId>,
}

impl Resolution {
    /// Shows `winner`, with no conflict copies. `None` (only possible for empty heads,
    /// which no host passes) names no event, and the host then falls back to
    /// last-write-wins.
    pub fn single(winner: Option<EventId>) -> Resolution {
        Resolution {
            winner: winner.unwrap_or(EventId {
                origin: ReplicaId([0; 16]),
                seq: 0,
            }),
            copies: Vec::new(),
        }
    }

    /// Last-write-wins among `heads`: the greatest `(hlc, origin)`, no conflict copies.
    pub fn lww(heads: &[Head]) -> Resolution {
        Resolution::single(heads.iter().max_by_key(|h| h.lww_rank()).map(|h| h.id))
    }
}

/// Decides what concurrent writes to one key resolve to.
///
/// Implementations must be pure and deterministic: the same heads give the same answer on
/// every replica. They may look at anything in the heads (sizes, origins, clocks), never
/// at the local clock or the local file system. `heads` is never empty and is sorted by
/// event id.
pub trait ConflictPolicy: Send + Sync {
    /// The name the config uses for this policy (`conflict_policy = "lww"`).
    fn name(&self) -> &str;

    /// Chooses among `heads` (two or more when called for a conflict).
    fn resolve(&self, key: &Key, heads: &[Head]) -> Resolution;
}
