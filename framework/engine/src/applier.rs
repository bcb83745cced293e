//! SyncApplier: validation of remote events before they go anywhere near the log.

use converge_api::{Event, Op};

/// Most parents an event may name (a key rarely has more than a few concurrent heads).
pub const MAX_PARENTS: usize = 1024;
/// Deepest content tree accepted (16 levels of fan-out ≥ 2 covers any real file).
pub const MAX_CONTENT_DEPTH: u8 = 16;

/// Checks a remote event's shape. Keys were already validated while decoding.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncApplier;

impl SyncApplier {
    /// `Ok` if `event` is well-formed; otherwise why not, naming the event.
    pub fn validate(event: &Event) -> Result<(), String> {
        let id = event.id;
        if id.seq == 0 {
            return Err(format!("event {id:?} has seq 0 (sequences start at 1)"));
        }
        if event.parents.len() > MAX_PARENTS {
            return Err(format!(
                "event {id:?} names {} parents (limit {MAX_PARENTS})",
                event.parents.len()
            ));
        }
        // Itself, or a later event of its own origin: no writer can have known it.
        if let Some(p) = event
            .parents
            .iter()
            .find(|p| p.seq == 0 || (p.origin == id.origin && p.seq >= id.seq))
        {
            return Err(format!("event {id:?} names an impossible parent {p:?}"));
        }
        if let Op::Put {
            content: Some(c), ..
        } = &event.op
        {
            if c.depth > MAX_CONTENT_DEPTH {
                return Err(format!(
                    "event {id:?} has a content tree {} levels deep",
                    c.depth
                ));
            }
        }
        Ok(())
    }
}
