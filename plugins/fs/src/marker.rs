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

use std::path::Path;

use converge_framework::log::EventLog;

use crate::error::FsError;
use crate::scan::Resolver;
use crate::MARKER_FILE;

/// Checks the marker at the start of the source, before the folder is scanned: writes it
/// in a folder that has none yet (a new folder, one the log shows nothing in, or one with
/// files in it, set up before markers existed), and fails for an empty folder that the
/// log shows files in.
pub(crate) fn ensure(root: &Path, log: &EventLog, resolver: &Resolver) -> Result<(), FsError> {
    let marker = root.join(MARKER_FILE);
    if marker.is_file() {
        return Ok(());
    }
    let shows_something = || -> Result<bool, FsError> {
        for entry in log.states() {
            let (key, state) = entry?;
            if resolver.shown(&key, &state.heads).is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    };
    let mut entries = std::fs::read_dir(root).map_err(FsError::io("reading", root))?;
    if entries.next().is_none() && shows_something()? {
        return Err(FsError::MarkerMissing {
            path: root.to_owned(),
        });
    }
    std::fs::write(&marker, MARKER_TEXT).map_err(FsError::io("writing", &marker))?;
    tracing::info!(
        "marked {} as a synced folder ({MARKER_FILE})",
        root.display()
    );
    Ok(())
}

/// For a mirror (a store on a folder of its own, a backup disk say): creates the folder
/// and its marker on the first write, or marks a folder that holds files but no marker
/// (made before markers existed); but a mirror that has written before (`written_before`,
/// its cursor is past the log's start) and finds its folder missing or empty without the
/// marker fails, rather than copying everything onto the disk the backup disk is not
/// mounted over.
pub(crate) fn ensure_mirror(root: &Path, written_before: bool) -> Result<(), FsError> {
    if root.join(MARKER_FILE).is_file() {
        return Ok(());
    }
    let empty = match std::fs::read_dir(root) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(FsError::io("reading", root)(e)),
    };
    if empty && written_before {
        return Err(FsError::MarkerMissing {
            path: root.to_owned(),
        });
    }
    std::fs::create_dir_all(root).map_err(FsError::io("creating", root))?;
    let marker = root.join(MARKER_FILE);
    std::fs::write(&marker, MARKER_TEXT).map_err(FsError::io("writing", &marker))
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
