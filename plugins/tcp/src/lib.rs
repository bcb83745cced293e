//! # converge-transport-tcp
//!
//! converge's network transport: length-prefixed frames over tokio TCP. It only opens
//! connections and carries frames; the engine does the handshake, keepalive, dial backoff
//! and reconnects (DESIGN §4, §5).
//!
//! On the wire every frame is a 4-byte big-endian length followed by that many payload
//! bytes ([`converge_api::codec::FRAME_HEADER_LEN`]). Both directions enforce
//! [`TcpOptions::max_frame_len`]: an oversized frame is refused before it is sent, and an
//! oversized announcement ends the receiving side's session before anything is allocated
//! for it (DESIGN §7.4).
//!
//! ```
//! use converge_framework::plugin::Transport;
//! use converge_transport_tcp::{TcpOptions, TcpTransport};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = tokio::runtime::Runtime::new()?;
//! runtime.block_on(async {
//!     let loopback = "127.0.0.1:0".parse()?;
//!     let a = TcpTransport::bind(loopback, TcpOptions::default()).await?;
//!     let b = TcpTransport::bind(loopback, TcpOptions::default()).await?;
//!
//!     let address = b.local_address();
//!     let (dialed, accepted) = tokio::join!(a.dial(&address), b.accept());
//!     let (mut dialed, mut accepted) = (dialed?, accepted?);
//!     assert!(dialed.dialed && !accepted.dialed);
//!
//!     dialed.sender.send(b"hello".to_vec()).await?;
//!     assert_eq!(accepted.receiver.recv().await?, Some(b"hello".to_vec()));
//!
//!     dialed.sender.close().await;
//!     assert_eq!(accepted.receiver.recv().await?, None);
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })
//! # }
//! ```
#![deny(missing_docs)]

use std::time::Duration;

mod stream;
mod transport;

pub use transport::TcpTransport;

/// Settings of a [`TcpTransport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// Largest frame payload sent or accepted, in bytes. Both peers should agree: a peer
    /// that announces more is dropped.
    pub max_frame_len: usize,
    /// How long [`dial`](converge_framework::plugin::Transport::dial) may take, name
    /// resolution included, before it gives up with `Unreachable`.
    pub connect_timeout: Duration,
}

impl Default for TcpOptions {
    /// [`MAX_FRAME_LEN`](converge_api::codec::MAX_FRAME_LEN) (16 MiB) and a 5 s connect
    /// timeout.
    fn default() -> Self {
        TcpOptions {
            max_frame_len: converge_api::codec::MAX_FRAME_LEN,
            connect_timeout: Duration::from_secs(5),
        }
    }
}
