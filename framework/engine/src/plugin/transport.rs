//! The `Transport` role: connects replicas and moves frames. It knows nothing of events.

use async_trait::async_trait;
use converge_api::{codec, ChunkRef, CodecError, Hash, Place};

use crate::content::ChunkBytes;
use crate::error::TransportError;

/// Sends frames (whole protocol messages) to one peer.
#[async_trait]
pub trait FrameSender: Send + 'static {
    /// Sends one frame. An error means the connection is unusable.
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError>;

    /// Sends one frame given as its pieces: what [`FrameSender::send`] of
    /// [`ChunksFrame::into_vec`] sends, which is what the default does. A transport that
    /// can write the pieces where they lie (TCP: vectored writes) spares the copy of
    /// every chunk into one buffer.
    async fn send_chunks(&mut self, frame: ChunksFrame) -> Result<(), TransportError> {
        self.send(frame.into_vec()).await
    }

    /// Closes the connection; later sends fail. Idempotent.
    async fn close(&mut self);
}

/// A frame of chunks as the pieces it is made of: the payload without the chunks' bytes
/// (`head`, from `codec::encode_chunks_head`) and each chunk's bytes, kept where they are
/// in memory, with the offset in `head` they go at.
pub struct ChunksFrame {
    head: Vec<u8>,
    chunks: Vec<(usize, ChunkBytes)>,
}

impl ChunksFrame {
    /// The frame of `head` with each chunk's bytes put in at its offset; `None` unless
    /// the offsets rise (or stay) and lie within `head`.
    pub fn new(head: Vec<u8>, chunks: Vec<(usize, ChunkBytes)>) -> Option<ChunksFrame> {
        let mut last = 0;
        for (at, _) in &chunks {
            if *at < last || *at > head.len() {
                return None;
            }
            last = *at;
        }
        Some(ChunksFrame { head, chunks })
    }

    /// The `Chunks` message of `chunks` (hash, bytes, place in a large file), each
    /// chunk's bytes left where they are: only the rest is encoded
    /// (`codec::encode_chunks_head`).
    pub fn encode(
        chunks: Vec<(Hash, ChunkBytes, Option<Place>)>,
    ) -> Result<ChunksFrame, CodecError> {
        let items: Vec<ChunkRef<'_>> = chunks
            .iter()
            .map(|(hash, bytes, place)| ChunkRef {
                hash: *hash,
                bytes,
                place: *place,
            })
            .collect();
        let (head, at) = codec::encode_chunks_head(&items)?;
        drop(items);
        let chunks = at.into_iter().zip(chunks.into_iter().map(|(_, b, _)| b));
        Ok(ChunksFrame {
            head,
            chunks: chunks.collect(),
        })
    }

    /// The payload's length.
    pub fn len(&self) -> usize {
        self.head.len() + self.chunks.iter().map(|(_, c)| c.len()).sum::<usize>()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload's pieces in order (some may be empty).
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut from = 0;
        self.chunks
            .iter()
            .flat_map(move |(at, chunk)| {
                let head = &self.head[from..*at];
                from = *at;
                [head, &chunk[..]]
            })
            .chain(std::iter::once_with(move || {
                let last = self.chunks.last().map_or(0, |(at, _)| *at);
                &self.head[last..]
            }))
    }

    /// The payload in one buffer.
    pub fn into_vec(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for piece in self.pieces() {
            out.extend_from_slice(piece);
        }
        out
    }
}

impl std::fmt::Debug for ChunksFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunksFrame")
            .field("len", &self.len())
            .field("chunks", &self.chunks.len())
            .finish()
    }
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

    /// When bytes last arrived, if the transport can tell: a large frame still arriving
    /// over a slow link is then not taken for a silent peer (the keepalive timeout counts
    /// from here rather than from the start of the frame). The default, `None`, suits a
    /// transport that delivers each frame whole at once.
    fn last_progress(&self) -> Option<std::time::Instant> {
        None
    }
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
