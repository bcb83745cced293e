//! # converge-api
//!
//! What converge's plugin authors and peers share: the event model ([`Event`], [`Key`],
//! [`Hlc`], [`ReplicaId`], …), the versioned CBOR [`codec`] and protocol [`Message`]s, the
//! [`content`] tree format, the [`ConflictPolicy`] trait, and the plugin C [`abi`] with its
//! [`export_plugin!`] macro. It depends on neither sled nor
//! tokio, so a plugin can build against it alone.
//!
//! ```
//! use converge_api::{codec, Event, EventId, Hlc, Key, Meta, Op, ReplicaId};
//!
//! let key = Key::new("notes/todo.md")?;
//! assert!(Key::new("../escape").is_err());
//!
//! let event = Event {
//!     id: EventId { origin: ReplicaId([1; 16]), seq: 1 },
//!     hlc: Hlc::default().tick(1_700_000_000_000),
//!     key,
//!     parents: vec![],
//!     op: Op::Put { content: None, meta: Meta::dir(0) },
//! };
//! let bytes = codec::encode_event(&event)?;
//! assert_eq!(codec::decode_event(&bytes)?, event);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod abi;
pub mod codec;
pub mod content;
mod error;
pub mod event;
mod hash_many;
pub mod policy;

pub use codec::{ChunkItem, ChunkRef, ChunkSpan, Message, Place};
pub use error::{CodecError, IdError, KeyError};
pub use event::{
    ContentRef, EntryKind, Event, EventId, Hash, Hlc, Key, Meta, Op, ReplicaId, SystemClock,
    VersionVector, WallClock,
};
pub use policy::{ConflictPolicy, Head, Resolution};
