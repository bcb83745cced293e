//! What the store last did to each key, shared with the source of the same folder so the
//! store's own writes are never read back as local changes.
//!
//! Comparing a file with the key's current heads is not enough: the store may have
//! written version 1 while version 2 was being appended, and the file (version 1) would
//! then look like a local revert. The store records what it wrote (size, mtime, mode,
//! root) *before* renaming into place; the source treats a file that still matches the
//! record as the store's, whatever the heads say now.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use converge_api::{Hash, Key};

use crate::content::FileStat;

/// Records older than this are dropped: by then the source has seen the write.
const TTL: Duration = Duration::from_secs(300);

/// What the store left at a key's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// A file with this content and metadata.
    File {
        size: u64,
        mtime_ms: i64,
        executable: bool,
        root: Hash,
    },
    /// A directory (created, or kept alive by its contents).
    Dir,
    /// Nothing (removed, or already absent).
    Absent,
}

impl Applied {
    /// The size, mtime and mode of the file written, if one was.
    pub(crate) fn file_stat(self) -> Option<FileStat> {
        match self {
            Applied::File {
                size,
                mtime_ms,
                executable,
                ..
            } => Some((size, mtime_ms, executable)),
            Applied::Dir | Applied::Absent => None,
        }
    }
}

/// The shared record.
#[derive(Debug, Default)]
pub(crate) struct Echo {
    map: Mutex<HashMap<Key, (Applied, Instant)>>,
}

impl Echo {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Applied, Instant)>> {
        // A panic while holding the lock leaves a map that is still valid.
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn record(&self, key: &Key, applied: Applied) {
        self.lock().insert(key.clone(), (applied, Instant::now()));
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Applied> {
        self.lock().get(key).map(|(a, _)| *a)
    }

    pub(crate) fn prune(&self) {
        self.lock().retain(|_, (_, at)| at.elapsed() < TTL);
    }
}
