//! Errors of converge-framework.

use converge_api::{CodecError, KeyError};
use thiserror::Error;

/// A failure of the event log or its sled database.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LogError {
    /// sled reported an error (I/O, corruption).
    #[error("event log storage: {0}")]
    Storage(#[from] sled::Error),
    /// A stored entry could not be decoded.
    #[error("event log entry {what} is corrupt: {source}")]
    Corrupt {
        /// Which entry (tree and key).
        what: String,
        /// Why it did not decode.
        source: CodecError,
    },
    /// Encoding an entry failed.
    #[error("encoding {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// Why.
        source: CodecError,
    },
    /// The group commit this append was part of failed; nothing of it was acknowledged.
    #[error("group commit failed: {0}")]
    CommitFailed(String),
    /// No replica identity could be made.
    #[error(transparent)]
    Identity(#[from] converge_api::IdError),
    /// The writer thread could not be started.
    #[error("starting the log writer thread: {0}")]
    Thread(std::io::Error),
    /// The log's writer task has stopped (the engine is shutting down).
    #[error("the event log is closed")]
    Closed,
    /// A key was rejected.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Reading or writing the content store's pack files failed.
    #[error("content store: {op} {}: {source}", path.display())]
    ContentIo {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A chunk's bytes do not match the hash they were offered under.
    #[error("chunk hash mismatch: expected {expected}, got {actual}")]
    ChunkMismatch {
        /// The hash claimed.
        expected: String,
        /// The hash of the bytes.
        actual: String,
    },
}

/// A failure of a transport connection.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// An I/O error on the connection.
    #[error("transport I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// A frame broke the framing rules.
    #[error("bad frame: {0}")]
    Frame(#[from] CodecError),
    /// The address could not be dialed or parsed.
    #[error("cannot reach {address}: {reason}")]
    Unreachable {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// A failure inside a plugin (source or store), reported to the engine.
#[derive(Debug, Error)]
#[error("plugin {plugin}: {message}")]
pub struct PluginError {
    /// The plugin's name.
    pub plugin: String,
    /// What went wrong.
    pub message: String,
}

impl PluginError {
    /// A plugin error with a message.
    pub fn new(plugin: impl Into<String>, message: impl std::fmt::Display) -> Self {
        PluginError {
            plugin: plugin.into(),
            message: message.to_string(),
        }
    }
}
