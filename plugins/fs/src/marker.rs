//! The folder marker ([`MARKER_FILE`]): what tells the folder this replica synced from an
//! empty directory in its place.
//!
//! A folder on a disk that is not mounted shows as its empty mount point; a folder deleted
//! with everything in it may be recreated empty. Read as it is, such a folder says every
//! file was deleted, and syncing that would delete them on every replica. So the folder
//! carries a marker, written at the first start, and while it is missing from a folder
//! this replica holds files in, the source records no removal and the store writes
//! nothing: the source fails and is started again (by the engine, after a growing pause)
//! until the marker is back, and the store's batches wait. (Syncthing's `.stfolder` is the
//! same safeguard.)
//!
//! A folder deleted whole while the daemon runs (`rm -rf`, which removes the marker
//! somewhere in the middle) records none of its removals: the source holds the removals
//! it sees until none has come for a second (a minute at most) and checks them again then,
//! marker included (`REMOVALS_QUIET` in `watch.rs`). A mirror marks its own folder on its
//! first write and, once it has written, writes nothing while that folder is missing or
//! empty without the marker (a backup disk not mounted).

use std::path::Path;

use converge_framework::log::EventLog;

use crate::error::FsError;
use crate::scan::Resolver;
use crate::MARKER_FILE;

/// Makes sure `root` carries the marker before anything is read as a removal or written
/// there. A folder without one gets it (a new folder, or one with entries in it, set up
/// before markers existed); but a folder that is missing or empty, and that this replica
/// has synced into before (`synced_before`, asked only then), fails: its disk is not
/// mounted, or an empty directory took its place.
pub(crate) fn ensure(
    root: &Path,
    synced_before: impl FnOnce() -> Result<bool, FsError>,
) -> Result<(), FsError> {
    if check(root).is_ok() {
        return Ok(());
    }
    let empty = match std::fs::read_dir(root) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(FsError::io("reading", root)(e)),
    };
    if empty && synced_before()? {
        return Err(FsError::MarkerMissing {
            path: root.to_owned(),
        });
    }
    std::fs::create_dir_all(root).map_err(FsError::io("creating", root))?;
    let marker = root.join(MARKER_FILE);
    std::fs::write(&marker, MARKER_TEXT).map_err(FsError::io("writing", &marker))?;
    tracing::info!(
        "marked {} as a synced folder ({MARKER_FILE})",
        root.display()
    );
    Ok(())
}

/// Whether the log shows any key: the folder source has synced files into its folder.
pub(crate) fn shows_something(log: &EventLog, resolver: &Resolver) -> Result<bool, FsError> {
    for entry in log.states() {
        let (key, state) = entry?;
        if resolver.shown(&key, &state.heads).is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Fails unless the marker is there: called before removals are recorded and before the
/// store writes anything.
pub(crate) fn check(root: &Path) -> Result<(), FsError> {
    if root.join(MARKER_FILE).is_file() {
        Ok(())
    } else {
        Err(FsError::MarkerMissing {
            path: root.to_owned(),
        })
    }
}

const MARKER_TEXT: &str =
    "This file marks the folder that converge syncs. While it is missing, converge\n\
records no deletion here and writes nothing here (the folder's disk may not be mounted).\n\
It is not synced. Do not remove it.\n";
