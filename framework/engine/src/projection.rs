//! Per-key state derived from the log: each key's heads (a multi-value register).
//!
//! A key's heads are the events on it that no known event names as a parent. Folding an
//! event removes its parents from the heads and adds it, unless an event already folded
//! named it as a parent (it arrived late): then it is superseded on arrival. The result is
//! a function of the *set* of events folded, whatever their order — the property the
//! convergence tests check.

use converge_api::{codec, Event, EventId, Head, VersionVector};
use serde_tuple::{Deserialize_tuple, Serialize_tuple};

use crate::error::LogError;

/// What the projection keeps for one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize_tuple, Deserialize_tuple)]
pub struct KeyState {
    /// Events on the key that nothing known supersedes, sorted by id.
    pub heads: Vec<Head>,
    /// Ids named as parents by folded events but not folded themselves yet: when one of
    /// them arrives it is already superseded.
    pub superseded: Vec<EventId>,
}

impl KeyState {
    /// Folds `event` into the state. `known` tells whether an event is already in the log
    /// (for the log: its seq is covered by the version vector before `event`).
    pub fn fold(&mut self, event: &Event, known: &VersionVector) {
        for parent in &event.parents {
            if let Some(i) = self.heads.iter().position(|h| h.id == *parent) {
                self.heads.remove(i);
            } else if !known.contains(parent) && !self.superseded.contains(parent) {
                self.superseded.push(*parent);
            }
        }
        if let Some(i) = self.superseded.iter().position(|id| *id == event.id) {
            self.superseded.swap_remove(i);
            return;
        }
        if let Err(at) = self.heads.binary_search_by(|h| h.id.cmp(&event.id)) {
            self.heads.insert(at, Head::of(event));
        }
    }

    /// Whether the key has more than one head (concurrent writes).
    pub fn is_conflict(&self) -> bool {
        self.heads.len() > 1
    }

    /// The stored form.
    pub fn encode(&self) -> Result<Vec<u8>, LogError> {
        codec::encode(self).map_err(|source| LogError::Encode {
            what: "key state".into(),
            source,
        })
    }

    /// Reads the stored form of the state of `key`.
    pub fn decode(key: &[u8], bytes: &[u8]) -> Result<KeyState, LogError> {
        codec::decode(bytes).map_err(|source| LogError::Corrupt {
            what: format!("state/{}", String::from_utf8_lossy(key)),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use converge_api::{Hlc, Key, Meta, Op, ReplicaId};

    fn ev(origin: u8, seq: u64, parents: &[(u8, u64)]) -> Event {
        Event {
            id: EventId {
                origin: ReplicaId([origin; 16]),
                seq,
            },
            hlc: Hlc {
                wall_ms: seq,
                logical: 0,
            },
            key: Key::new("k").unwrap(),
            parents: parents
                .iter()
                .map(|&(o, s)| EventId {
                    origin: ReplicaId([o; 16]),
                    seq: s,
                })
                .collect(),
            op: Op::Put {
                content: None,
                meta: Meta::file(0),
            },
        }
    }

    fn fold_all(events: &[&Event]) -> Vec<EventId> {
        let mut state = KeyState::default();
        let mut vv = VersionVector::new();
        for e in events {
            state.fold(e, &vv);
            vv.set(e.id.origin, e.id.seq);
        }
        state.heads.iter().map(|h| h.id).collect()
    }

    #[test]
    fn heads_do_not_depend_on_order() {
        let a1 = ev(1, 1, &[]);
        let b1 = ev(2, 1, &[]); // concurrent with a1
        let a2 = ev(1, 2, &[(1, 1), (2, 1)]); // merges both
        let b2 = ev(2, 2, &[(2, 1)]); // concurrent with a2
        let expected = vec![a2.id, b2.id];
        // Every order that keeps each origin's own seq order (as the log does).
        for order in [
            vec![&a1, &b1, &a2, &b2],
            vec![&b1, &b2, &a1, &a2],
            vec![&a1, &a2, &b1, &b2],
            vec![&b1, &a1, &b2, &a2],
        ] {
            assert_eq!(fold_all(&order), expected);
        }
    }

    #[test]
    fn late_parent_is_superseded_on_arrival() {
        let b1 = ev(2, 1, &[]);
        let a1 = ev(1, 1, &[(2, 1)]);
        assert_eq!(fold_all(&[&a1, &b1]), vec![a1.id]);
    }
}
