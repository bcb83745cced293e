//! The `Transport` role: connects replicas and moves frames. It knows nothing of events.

use async_trait::async_trait;

use crate::error::TransportError;

/// Sends frames (whole protocol messages) to one peer.
#[async_trait]
pub trait FrameSender: Send + 'static {
    /// Sends one frame. An error means the connection is unusable.
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError>;

    /// Closes the connection; later sends fail. Idempotent.
    async fn close(&mut self);
}

/// Receives frames from one peer.
#[async_trait]
pub trait FrameReceiver: Send + 'static {
    /// The next frame; `Ok(None)` when the peer closed the connection cleanly. Frames over
    /// the transport's size limit, or a broken stream, are errors: the session ends.
    ///
    /// Must be cancel safe: the engine waits for a frame and for other work at once, and
    /// drops this future when the other work finishes first. A later call must go on
    /// with the same frame, having lost none of its bytes.
    async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError>;
}

/// One connection between two replicas: both directions of a frame stream.
pub struct Connection {
    /// The remote address as the transport names it (for logs and status).
    pub remote: String,
    /// Whether this side dialed (`true`) or accepted (`false`) the connection.
    pub dialed: bool,
    /// Outgoing frames.
    pub sender: Box<dyn FrameSender>,
    /// Incoming frames.
    pub receiver: Box<dyn FrameReceiver>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("remote", &self.remote)
            .field("dialed", &self.dialed)
            .finish_non_exhaustive()
    }
}

/// Moves frames between replicas: accepts incoming connections and dials peers.
///
/// The engine owns the policy (which peers to dial, backoff, handshake, keepalive);
/// a transport only opens connections and carries frames intact and in order per
/// connection (the in-memory test transport may break that on purpose).
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The transport's kind, for logs and status (`tcp`, `memory`).
    fn kind(&self) -> &str;

    /// The address peers dial to reach this replica.
    fn local_address(&self) -> String;

    /// Waits for the next incoming connection.
    async fn accept(&self) -> Result<Connection, TransportError>;

    /// Opens a connection to `address`.
    async fn dial(&self, address: &str) -> Result<Connection, TransportError>;
}
