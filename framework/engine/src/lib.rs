//! # converge-framework
//!
//! converge's runtime (work in progress).
#![deny(missing_docs)]

pub mod content;
mod error;
pub mod log;
pub mod plugin;
pub mod projection;

pub use error::{LogError, PluginError, TransportError};
