//! PendingQueue: remote events that cannot be appended yet — ahead of a gap in their
//! origin's sequence, or waiting for content chunks.
//!
//! A remote event is appended only once its content is complete, or together with a later
//! event of its origin that supersedes it (names it as a parent for its key, directly or
//! through events appended with it); its content is then not asked for either (see
//! [`PendingQueue::take_ready`]). Such an event is never a head, so no store needs its
//! content, which may be gone for good (a lent pack changed in place); and waiting for it
//! would hold back every later event of its origin. So every head in the log can be
//! materialized.

use std::collections::{BTreeMap, HashMap};

use converge_api::{Event, EventId, Key, ReplicaId, VersionVector};

/// A remote event held back, and the peer it came from (who can send its content).
#[derive(Clone, Debug)]
pub struct PendingEvent {
    /// The event.
    pub event: Event,
    /// The peer that sent it.
    pub from: ReplicaId,
}

/// The parents `event` names that can go with it: earlier events of its own origin (an
/// origin's run is appended in order; another origin's event naming one of them is
/// appended on its own, and the one it names still waits for its content).
fn named_by(event: &Event) -> impl Iterator<Item = &EventId> + '_ {
    let id = event.id;
    event
        .parents
        .iter()
        .filter(move |p| p.origin == id.origin && p.seq < id.seq)
}

/// Whether `named` holds `event` as named under its own key (a parent shares its key with
/// the event naming it: heads are per key).
fn is_named(named: &HashMap<EventId, Vec<Key>>, event: &Event) -> bool {
    named
        .get(&event.id)
        .is_some_and(|keys| keys.contains(&event.key))
}

/// Events waiting, per origin, in seq order. Bounded: over the bound a new event is
/// dropped (never appended out of order), and the sender's resend brings it again later;
/// except one that fills a gap of its origin (a seq below the origin's last waiting
/// one), which takes the place of that last one. Otherwise a queue full of events behind
/// gaps would turn away the very events that let them go, for good.
#[derive(Debug)]
pub struct PendingQueue {
    by_origin: BTreeMap<ReplicaId, BTreeMap<u64, PendingEvent>>,
    /// The keys of the waiting events naming each parent (see [`named_by`]), once per
    /// event: whether a waiting event is superseded by another, without a scan.
    named: HashMap<EventId, Vec<Key>>,
    len: usize,
    max: usize,
    dropped: u64,
}

impl PendingQueue {
    /// An empty queue holding at most `max` events.
    pub fn new(max: usize) -> Self {
        PendingQueue {
            by_origin: BTreeMap::new(),
            named: HashMap::new(),
            len: 0,
            max,
            dropped: 0,
        }
    }

    /// Holds `event`, unless `held` (the log's version vector) already covers it. Returns
    /// `false` if it was dropped because the queue is full.
    pub fn insert(&mut self, event: Event, from: ReplicaId, held: &VersionVector) -> bool {
        if held.contains(&event.id) {
            return true;
        }
        let queue = self.by_origin.entry(event.id.origin).or_default();
        if let Some(existing) = queue.get_mut(&event.id.seq) {
            existing.from = from; // the newest sender is the likeliest to be connected
            return true;
        }
        if self.len >= self.max {
            // Full. A gap's event goes in, in place of its origin's last waiting one
            // (behind that gap, so no nearer to being appended; resent later).
            let last = queue.last_key_value().map(|(seq, _)| *seq);
            let evicted = match last {
                Some(last) if event.id.seq < last => queue.remove(&last),
                _ => None,
            };
            self.dropped += 1;
            let Some(evicted) = evicted else {
                return false;
            };
            Self::unname(&mut self.named, &evicted.event);
            self.len -= 1;
        }
        for parent in named_by(&event) {
            self.named
                .entry(*parent)
                .or_default()
                .push(event.key.clone());
        }
        queue.insert(event.id.seq, PendingEvent { event, from });
        self.len += 1;
        true
    }

    /// Whether another waiting event supersedes `event` (names it as a parent, for its
    /// key): then `event` goes with it, content or not (see [`take_ready`]), and its
    /// content need not be asked for.
    ///
    /// [`take_ready`]: Self::take_ready
    pub fn superseded(&self, event: &Event) -> bool {
        is_named(&self.named, event)
    }

    /// Forgets what a removed event named.
    fn unname(named: &mut HashMap<EventId, Vec<Key>>, event: &Event) {
        for parent in named_by(event) {
            if let Some(keys) = named.get_mut(parent) {
                if let Some(i) = keys.iter().position(|k| *k == event.key) {
                    keys.swap_remove(i);
                }
                if keys.is_empty() {
                    named.remove(parent);
                }
            }
        }
    }

    /// Removes and returns, per origin, the run of events that continues `held` without
    /// a gap and whose content `is_complete` says is present, or that a later event of
    /// the run supersedes (names as a parent, for the same key) and is returned with it:
    /// such an event is never one of its key's heads, so no store needs its content,
    /// which may be gone for good (a peer's copy lent to its folder and edited there
    /// since). Otherwise the first incomplete event of an origin stops that origin's run
    /// (seq order is never broken). Costs one look-up per event scanned, and the scan
    /// stops where the run does.
    pub fn take_ready(
        &mut self,
        held: &VersionVector,
        is_complete: &mut dyn FnMut(&Event) -> bool,
    ) -> Vec<Event> {
        self.prune(held);
        let mut ready = Vec::new();
        for (origin, queue) in &mut self.by_origin {
            let first = held.get(origin) + 1;
            let mut next = first;
            // How many events from the front can go: the run up to the last point where
            // every incomplete event in it was superseded by a later one in it.
            let mut settled = 0;
            let mut unresolved: HashMap<EventId, &Key> = HashMap::new();
            for (&seq, pending) in queue.range(first..) {
                if seq != next {
                    break;
                }
                let event = &pending.event;
                for parent in &event.parents {
                    if unresolved.get(parent).is_some_and(|key| **key == event.key) {
                        unresolved.remove(parent);
                    }
                }
                if !is_complete(event) {
                    if !is_named(&self.named, event) {
                        break;
                    }
                    unresolved.insert(event.id, &event.key);
                }
                next += 1;
                if unresolved.is_empty() {
                    settled = next - first;
                }
            }
            for _ in 0..settled {
                if let Some((_, pending)) = queue.pop_first() {
                    Self::unname(&mut self.named, &pending.event);
                    ready.push(pending.event);
                    self.len -= 1;
                }
            }
        }
        self.by_origin.retain(|_, q| !q.is_empty());
        ready
    }

    /// Forgets events the log now holds.
    pub fn prune(&mut self, held: &VersionVector) {
        for (origin, queue) in &mut self.by_origin {
            let keep = queue.split_off(&(held.get(origin) + 1));
            self.len -= queue.len();
            for pending in queue.values() {
                Self::unname(&mut self.named, &pending.event);
            }
            *queue = keep;
        }
        self.by_origin.retain(|_, q| !q.is_empty());
    }

    /// `held` extended by the events waiting here without a gap: what this replica has
    /// received, whether or not its content has arrived (what an `Ack` reports).
    pub fn received(&self, held: &VersionVector) -> VersionVector {
        let mut vv = held.clone();
        for (origin, queue) in &self.by_origin {
            let mut next = vv.get(origin) + 1;
            while queue.contains_key(&next) {
                next += 1;
            }
            vv.set(*origin, next - 1);
        }
        vv
    }

    /// Origins whose waiting events sit behind a gap, with the peers that sent them.
    pub fn gaps(&self, held: &VersionVector) -> Vec<(ReplicaId, ReplicaId)> {
        self.by_origin
            .iter()
            .filter_map(|(origin, q)| {
                let (seq, first) = q.first_key_value()?;
                (*seq > held.get(origin) + 1).then_some((*origin, first.from))
            })
            .collect()
    }

    /// Every waiting event (for requesting content).
    pub fn iter(&self) -> impl Iterator<Item = &PendingEvent> {
        self.by_origin.values().flat_map(|q| q.values())
    }

    /// Number of events waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Events dropped because the queue was full, since it was made.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use converge_api::{Hlc, Key, Op};

    fn ev(seq: u64) -> Event {
        Event {
            id: EventId {
                origin: ReplicaId([1; 16]),
                seq,
            },
            hlc: Hlc::default(),
            key: Key::new("k").unwrap(),
            parents: vec![],
            op: Op::Delete,
        }
    }

    #[test]
    fn releases_only_contiguous_complete_runs() {
        let peer = ReplicaId([9; 16]);
        let mut q = PendingQueue::new(3);
        let held = VersionVector::new();
        for s in [3, 2, 5] {
            assert!(q.insert(ev(s), peer, &held));
        }
        assert!(!q.insert(ev(6), peer, &held), "over the bound");
        assert_eq!(q.gaps(&held), vec![(ReplicaId([1; 16]), peer)]);
        assert!(
            q.take_ready(&held, &mut |_| true).is_empty(),
            "seq 1 missing"
        );
        let mut held = VersionVector::new();
        held.set(ReplicaId([1; 16]), 1);
        assert_eq!(q.received(&held).get(&ReplicaId([1; 16])), 3);
        let ready = q.take_ready(&held, &mut |e| e.id.seq != 3);
        assert_eq!(ready.iter().map(|e| e.id.seq).collect::<Vec<_>>(), vec![2]);
        let ready = q.take_ready(
            &{
                held.set(ReplicaId([1; 16]), 2);
                held.clone()
            },
            &mut |_| true,
        );
        assert_eq!(ready.iter().map(|e| e.id.seq).collect::<Vec<_>>(), vec![3]);
        assert_eq!(q.len(), 1);
    }

    /// A full queue of events behind a gap takes the gap's event, in place of the last
    /// one waiting: the run can then go (the last one comes again with a resend).
    #[test]
    fn a_full_queue_takes_the_event_that_fills_a_gap() {
        let peer = ReplicaId([9; 16]);
        let mut q = PendingQueue::new(3);
        let held = VersionVector::new();
        for s in [2, 3, 4] {
            assert!(q.insert(ev(s), peer, &held));
        }
        assert!(
            !q.insert(ev(5), peer, &held),
            "over the bound, behind the others"
        );
        assert!(q.insert(ev(1), peer, &held), "fills the gap");
        assert_eq!(q.len(), 3);
        assert_eq!(q.dropped(), 2);
        let ready = q.take_ready(&held, &mut |_| true);
        assert_eq!(
            ready.iter().map(|e| e.id.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(q.is_empty());
    }

    fn child(seq: u64, parent: u64) -> Event {
        let mut e = ev(seq);
        e.parents = vec![ev(parent).id];
        e
    }

    #[test]
    fn an_incomplete_event_goes_with_a_complete_later_one_that_supersedes_it() {
        let peer = ReplicaId([9; 16]);
        let held = VersionVector::new();
        // 1 ← 2 ← 3: 1 and 2 lack content, 3 has it; 4 lacks it and nothing supersedes it.
        let mut q = PendingQueue::new(10);
        for e in [ev(1), child(2, 1), child(3, 2), ev(4), ev(5)] {
            assert!(q.insert(e, peer, &held));
        }
        assert!(q.superseded(&ev(1)) && q.superseded(&ev(2)) && !q.superseded(&ev(3)));
        let complete = |e: &Event| e.id.seq == 3 || e.id.seq == 5;
        let ready = q.take_ready(&held, &mut |e| complete(e));
        assert_eq!(
            ready.iter().map(|e| e.id.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(q.len(), 2, "4 waits for its content, 5 behind it");

        // A superseding event that is itself still waiting takes nothing with it.
        let mut q = PendingQueue::new(10);
        for e in [ev(1), child(2, 1)] {
            assert!(q.insert(e, peer, &held));
        }
        assert!(q.take_ready(&held, &mut |_| false).is_empty());
        assert_eq!(q.take_ready(&held, &mut |e| e.id.seq == 2).len(), 2);

        // Nor does one behind an incomplete event of another key.
        let mut q = PendingQueue::new(10);
        for e in [ev(1), ev(2), child(3, 1)] {
            assert!(q.insert(e, peer, &held));
        }
        assert!(q.take_ready(&held, &mut |e| e.id.seq == 3).is_empty());
        assert_eq!(q.take_ready(&held, &mut |e| e.id.seq != 1).len(), 3);
        assert!(q.named.is_empty(), "nothing named once all went");

        // A later event naming it under another key does not supersede it (heads are
        // per key: it would stay a head).
        let mut q = PendingQueue::new(10);
        let mut other = child(2, 1);
        other.key = Key::new("another").unwrap();
        for e in [ev(1), other] {
            assert!(q.insert(e, peer, &held));
        }
        assert!(!q.superseded(&ev(1)));
        assert!(q.take_ready(&held, &mut |e| e.id.seq == 2).is_empty());

        // Nor does another origin's event: it is appended on its own, and the one it
        // names must still get its content.
        let mut q = PendingQueue::new(10);
        let mut elsewhere = child(1, 1);
        elsewhere.id.origin = ReplicaId([2; 16]);
        for e in [ev(1), elsewhere] {
            assert!(q.insert(e, peer, &held));
        }
        assert!(!q.superseded(&ev(1)));
        let ready = q.take_ready(&held, &mut |e| e.id.origin != ReplicaId([1; 16]));
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].id.origin, ReplicaId([2; 16]));
    }
}
