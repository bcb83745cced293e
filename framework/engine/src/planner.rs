//! SyncPlanner: from version vectors to "send these, from here".

use converge_api::{EventId, VersionVector};

use crate::error::LogError;
use crate::log::EventLog;

/// Plans what one peer lacks. Stateless: everything comes from the two version vectors.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncPlanner;

impl SyncPlanner {
    /// The log offset from which to scan to find every event `peer` lacks: the smallest
    /// offset of an event just above the peer's entry, over every origin where the local
    /// log is ahead. `None` if the peer lacks nothing.
    pub fn start_offset(log: &EventLog, peer: &VersionVector) -> Result<Option<u64>, LogError> {
        let local = log.version_vector();
        let mut start: Option<u64> = None;
        for (origin, &seq) in &local.0 {
            let theirs = peer.get(origin);
            if seq > theirs {
                let first = converge_api::EventId {
                    origin: *origin,
                    seq: theirs + 1,
                };
                // Every held event has an offset; a miss would only mean a racing rebuild:
                // fall back to scanning from the start, which is always correct.
                let offset = log.offset_of(&first)?.unwrap_or(0);
                start = Some(start.map_or(offset, |s: u64| s.min(offset)));
            }
        }
        Ok(start)
    }

    /// Whether the event `id` should go to a peer whose known holdings are `sent` (what it
    /// has acknowledged plus what was already sent to it): judged by id alone, so before
    /// the event is decoded.
    pub fn should_send(id: &EventId, sent: &VersionVector) -> bool {
        id.seq > sent.get(&id.origin)
    }

    /// Events of `local` the peer lacks, counted (for status: "events behind").
    pub fn lag(local: &VersionVector, peer: &VersionVector) -> u64 {
        local
            .0
            .iter()
            .map(|(o, s)| s.saturating_sub(peer.get(o)))
            .sum()
    }
}
