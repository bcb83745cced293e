//! The plugin roles the engine drives: [`Source`], [`Store`] and [`Transport`] (async
//! traits); the fourth role, `ConflictPolicy`, is a plain trait in converge-api.

pub mod dylib;
mod source;
mod store;
mod transport;

pub use source::{ScanProgress, Source, SourceContext};
pub use store::{KeyView, Store, StoreContext};
pub use transport::{ChunksFrame, Connection, FrameReceiver, FrameSender, Transport};
