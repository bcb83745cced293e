//! # converge-framework
//!
//! converge's runtime, with nothing environment-specific in it: the append-only
//! [`log::EventLog`] on sled (the single source of truth), the per-key
//! [`projection`] derived from it, the content store, and the [`SyncEngine`] that drives
//! plugins — [`plugin::Source`]s that turn local changes into events,
//! [`plugin::Store`]s that materialize the projection, and [`plugin::Transport`]s that
//! carry frames between replicas. The engine talks to files and sockets only through
//! those traits.
//!
//! ```
//! use converge_framework::log::{EventLog, LocalChange, LogConfig};
//! use converge_api::{Key, Meta, Op};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let log = EventLog::open(LogConfig::temporary())?;
//! let dir = Op::Put { content: None, meta: Meta::dir(0) };
//! let change = LocalChange::new(Key::new("notes")?, dir);
//! let events = log.append_local(vec![change]).await?;
//! assert_eq!(events[0].id.seq, 1);
//! assert_eq!(log.heads(&Key::new("notes")?)?.len(), 1);
//! log.close().await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
#![deny(missing_docs)]

pub mod applier;
pub mod content;
mod engine;
mod error;
pub mod log;
pub mod pending;
pub mod planner;
pub mod plugin;
pub mod projection;
mod protocol;
pub mod reconciler;

pub use engine::{
    AppendOrigin, EngineBuilder, EngineConfig, EngineError, EngineEvent, EngineStats, Observer,
    PeerConfig, PeerStatus, PluginInfo, SourceStatus, SubscriberStatus, SyncEngine, MAX_HANDSHAKES,
    MAX_HANDSHAKES_PER_HOST,
};
pub use error::{LogError, PluginError, TransportError};
pub use protocol::SessionError;
