//! Errors of converge-api, one enum per concern.

use thiserror::Error;

/// A key failed validation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid key {key:?}: {reason}")]
pub struct KeyError {
    /// The rejected key, escaped for printing.
    pub key: String,
    /// Which rule it broke.
    pub reason: &'static str,
}

/// A replica identity could not be made or parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    /// The text is not a replica ID (26 base32 characters, dashes allowed).
    #[error("malformed replica ID {0:?}: expected 26 base32 characters, dashes allowed")]
    Malformed(String),
    /// The operating system gave no randomness.
    #[error("no randomness for a new replica ID: {0}")]
    Random(String),
}

/// Bytes could not be encoded or decoded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The buffer is empty: not even a format version byte.
    #[error("empty buffer: no format version")]
    Empty,
    /// The format version byte names a version this build does not know.
    #[error("unknown format version {found} (this build reads version {supported})")]
    UnknownVersion {
        /// The version found.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// The CBOR is malformed, truncated or of the wrong shape.
    #[error("malformed CBOR: {0}")]
    Malformed(String),
    /// A frame announced more bytes than the limit allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Encoding failed (only for values serde cannot express in CBOR).
    #[error("encoding failed: {0}")]
    Encode(String),
}
