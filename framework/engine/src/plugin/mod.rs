//! The plugin roles the engine drives: [`Transport`] (and later `Source` and `Store`).

mod transport;

pub use transport::{Connection, FrameReceiver, FrameSender, Transport};
