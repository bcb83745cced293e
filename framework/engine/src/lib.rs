//! # converge-framework
//!
//! converge's runtime (work in progress).
#![deny(missing_docs)]

mod error;
pub mod plugin;

pub use error::{LogError, PluginError, TransportError};
