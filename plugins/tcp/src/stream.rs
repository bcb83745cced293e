//! The two halves of a TCP connection: frames out ([`TcpSender`]) and in ([`TcpReceiver`]).
//!
//! Both keep their progress through the current frame in the struct rather than in the
//! future, so a `send` or `recv` dropped halfway (a `select!` branch losing, a timeout)
//! never desynchronizes the stream: the next call picks up where the last one stopped.

use std::io::{self, IoSlice};
use std::time::Instant;

use async_trait::async_trait;
use converge_api::codec::{frame_len, FRAME_HEADER_LEN};
use converge_api::CodecError;
use converge_framework::plugin::{ChunksFrame, FrameReceiver, FrameSender};
use converge_framework::TransportError;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Read buffer size: large enough that a stream of small frames costs few syscalls; frames
/// larger than this are read straight into their own buffer, bypassing it.
const READ_BUFFER: usize = 256 << 10;

/// Writes frames to one peer.
pub(crate) struct TcpSender {
    write: OwnedWriteHalf,
    max: usize,
    /// The frame being written; `Some` after a `send` was dropped halfway.
    pending: Option<Outgoing>,
    /// Closed by `close`, or broken by a write error: later sends fail.
    closed: bool,
}

struct Outgoing {
    header: [u8; FRAME_HEADER_LEN],
    payload: Payload,
    written: usize,
}

/// A frame's payload: in one buffer, or as the pieces of a frame of chunks.
enum Payload {
    Whole(Vec<u8>),
    Chunks(ChunksFrame),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Whole(bytes) => bytes.len(),
            Payload::Chunks(frame) => frame.len(),
        }
    }
}

/// Most pieces given to one vectored write (the kernel takes up to 1,024).
const WRITE_PIECES: usize = 256;

impl Outgoing {
    /// Writes the rest of the frame: header and payload (each piece of it where it lies)
    /// in vectored writes, so that neither a small frame costs two syscalls nor a large
    /// one a copy into a buffer.
    async fn finish(&mut self, write: &mut OwnedWriteHalf) -> io::Result<()> {
        let total = FRAME_HEADER_LEN + self.payload.len();
        while self.written < total {
            let n = {
                let header = std::iter::once(&self.header[..]);
                let pieces: Vec<&[u8]> = match &self.payload {
                    Payload::Whole(bytes) => header.chain([&bytes[..]]).collect(),
                    Payload::Chunks(frame) => header.chain(frame.pieces()).collect(),
                };
                let mut skip = self.written;
                let mut slices = Vec::with_capacity(pieces.len().min(WRITE_PIECES));
                for piece in pieces {
                    if skip >= piece.len() {
                        skip -= piece.len();
                        continue;
                    }
                    slices.push(IoSlice::new(&piece[skip..]));
                    skip = 0;
                    if slices.len() == WRITE_PIECES {
                        break;
                    }
                }
                write.write_vectored(&slices).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.written += n;
        }
        Ok(())
    }
}

impl TcpSender {
    pub(crate) fn new(write: OwnedWriteHalf, max: usize) -> Self {
        TcpSender {
            write,
            max,
            pending: None,
            closed: false,
        }
    }

    async fn send_payload(&mut self, payload: Payload) -> Result<(), TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        let len = match u32::try_from(payload.len()) {
            Ok(len) if payload.len() <= self.max => len,
            _ => {
                return Err(CodecError::FrameTooLarge {
                    len: payload.len(),
                    max: self.max,
                }
                .into())
            }
        };
        // An earlier send dropped mid-frame left its frame here: complete it first so the
        // peer still sees whole frames.
        self.write_pending().await?;
        self.pending = Some(Outgoing {
            header: len.to_be_bytes(),
            payload,
            written: 0,
        });
        self.write_pending().await
    }

    async fn write_pending(&mut self) -> Result<(), TransportError> {
        if let Some(outgoing) = &mut self.pending {
            if let Err(e) = outgoing.finish(&mut self.write).await {
                self.closed = true;
                return Err(e.into());
            }
            self.pending = None;
        }
        Ok(())
    }
}

#[async_trait]
impl FrameSender for TcpSender {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        self.send_payload(Payload::Whole(frame)).await
    }

    async fn send_chunks(&mut self, frame: ChunksFrame) -> Result<(), TransportError> {
        self.send_payload(Payload::Chunks(frame)).await
    }

    async fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        // A frame cut short here reaches the peer as a truncated stream, which it reports
        // as an error: that is the truth.
        self.pending = None;
        if let Err(e) = self.write.shutdown().await {
            tracing::debug!(error = %e, "tcp shutdown failed (peer already gone)");
        }
    }
}

/// Reads frames from one peer.
pub(crate) struct TcpReceiver {
    read: BufReader<OwnedReadHalf>,
    max: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_read: usize,
    /// The current frame's buffer, allocated only once its header passed the size check.
    payload: Option<Vec<u8>>,
    /// When a read last returned bytes.
    progress: Option<Instant>,
}

impl TcpReceiver {
    pub(crate) fn new(read: OwnedReadHalf, max: usize) -> Self {
        TcpReceiver {
            read: BufReader::with_capacity(READ_BUFFER, read),
            max,
            header: [0; FRAME_HEADER_LEN],
            header_read: 0,
            payload: None,
            progress: None,
        }
    }
}

fn truncated(what: &str, got: usize, want: usize) -> TransportError {
    let message = format!("connection closed after {got} of {want} bytes of a frame {what}");
    io::Error::new(io::ErrorKind::UnexpectedEof, message).into()
}

#[async_trait]
impl FrameReceiver for TcpReceiver {
    async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        while self.header_read < FRAME_HEADER_LEN {
            let n = self.read.read(&mut self.header[self.header_read..]).await?;
            if n == 0 {
                if self.header_read == 0 {
                    return Ok(None);
                }
                return Err(truncated("header", self.header_read, FRAME_HEADER_LEN));
            }
            self.header_read += n;
            self.progress = Some(Instant::now());
        }
        let len = frame_len(self.header, self.max)?;
        // Read into the spare capacity: zeroing 4 MiB first only to overwrite it cost as
        // much as the copy from the socket.
        let payload = self.payload.get_or_insert_with(|| Vec::with_capacity(len));
        while payload.len() < len {
            let want = (len - payload.len()) as u64;
            if (&mut self.read).take(want).read_buf(payload).await? == 0 {
                return Err(truncated("payload", payload.len(), len));
            }
            self.progress = Some(Instant::now());
        }
        self.header_read = 0;
        Ok(self.payload.take())
    }

    fn last_progress(&self) -> Option<Instant> {
        self.progress
    }
}
