//! The crate's error type, converted to a `PluginError` at the trait boundary.

use std::path::{Path, PathBuf};

use converge_framework::{LogError, PluginError};
use thiserror::Error;

/// What can go wrong while scanning, watching or writing a folder.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FsError {
    /// A file system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`reading`, `renaming`, …).
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The event log or the content store failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Content to write is not what its reference promises (size or missing chunk).
    #[error("content for {} is inconsistent: {reason}", path.display())]
    Content {
        /// The file being written.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// Reading a file stopped halfway because the engine is shutting down; nothing of it
    /// was recorded.
    #[error("stopped reading {}: shutting down", path.display())]
    Stopped {
        /// The file.
        path: PathBuf,
    },
    /// The file watcher could not be set up.
    #[error("watching {}: {source}", path.display())]
    Watch {
        /// The folder.
        path: PathBuf,
        /// The watcher's error.
        source: notify::Error,
    },
    /// A file changed here and not recorded yet stands where a key needs a directory: the
    /// key waits until the source has recorded the change (then the file is moved aside).
    #[error("{} is a file changed here and not recorded yet, where a directory is needed", path.display())]
    Unrecorded {
        /// The file in the way.
        path: PathBuf,
    },
    /// A file is to be written where a directory still holds entries (keys below it live,
    /// or their removal not here yet): the key waits until the directory is empty.
    #[error("{} is a directory with entries in it, where a file is to be written; tried again once it is empty", path.display())]
    NotEmpty {
        /// The directory.
        path: PathBuf,
        /// Whether keys below it are shown: then the directory wins the path (DESIGN §2),
        /// which is what the log asks for until they go, not a failure.
        kept_alive: bool,
    },
    /// The folder has lost its marker ([`crate::MARKER_FILE`]) though this replica holds
    /// files there: nothing is recorded as deleted or written until it is back.
    #[error(
        "{} has no {} marker, though this replica holds files there: its disk may not be \
         mounted, or an empty directory took its place. Nothing is deleted or written \
         there until the marker is back. If this is the right folder (emptied on purpose), \
         create the marker: touch {}",
        path.display(),
        crate::MARKER_FILE,
        path.join(crate::MARKER_FILE).display()
    )]
    MarkerMissing {
        /// The folder.
        path: PathBuf,
    },
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

impl FsError {
    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> FsError + 'a {
        move |source| FsError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn into_plugin(self, plugin: &str) -> PluginError {
        PluginError::new(plugin, self)
    }

    /// Whether this error concerns one key only, not the folder or the disk as a whole: no
    /// permission at its path, a name too long, a file where a directory is needed, a
    /// read-only mount below the folder, its content damaged in the content store, a file
    /// changed here and not yet recorded where it needs a directory, or a directory with
    /// entries where it is to be a file, or something not a regular file where one was
    /// looked at. The key fails alone and the rest of a batch is applied. A full disk or
    /// an I/O error does not: the batch waits.
    pub(crate) fn fails_alone(&self) -> bool {
        match self {
            FsError::Io { source, .. } => {
                source.kind() == std::io::ErrorKind::PermissionDenied
                    || crate::content::is_not_regular(source)
                    || source.raw_os_error().is_some_and(|code| {
                        [
                            libc::ENAMETOOLONG,
                            libc::ENOTDIR,
                            libc::EISDIR,
                            libc::ELOOP,
                            libc::ETXTBSY,
                            libc::EROFS,
                        ]
                        .contains(&code)
                    })
            }
            FsError::Log(LogError::Corrupt { .. })
            | FsError::Content { .. }
            | FsError::Unrecorded { .. }
            | FsError::NotEmpty { .. } => true,
            _ => false,
        }
    }

    /// Whether the key waits for a state the log itself implies rather than for a fault
    /// to go away (see [`FsError::NotEmpty`]): retried, but not counted as failed.
    pub(crate) fn is_expected(&self) -> bool {
        matches!(
            self,
            FsError::NotEmpty {
                kept_alive: true,
                ..
            }
        )
    }

    /// Whether this is an I/O error of kind `NotFound`.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, FsError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

impl From<tokio::task::JoinError> for FsError {
    fn from(e: tokio::task::JoinError) -> Self {
        FsError::Task(e.to_string())
    }
}
