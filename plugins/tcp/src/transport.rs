//! [`TcpTransport`]: the listener, accepting and dialing.

use std::io;
use std::net::SocketAddr;

use async_trait::async_trait;
use converge_framework::plugin::{Connection, Transport};
use converge_framework::TransportError;
use tokio::net::{TcpListener, TcpStream};

use crate::stream::{TcpReceiver, TcpSender};
use crate::TcpOptions;

/// A TCP transport: a bound listener that accepts peers, and a dialer.
///
/// Each [`Connection`] it returns carries length-prefixed frames over one TCP stream with
/// `TCP_NODELAY` set.
#[derive(Debug)]
pub struct TcpTransport {
    listener: TcpListener,
    local: SocketAddr,
    options: TcpOptions,
}

impl TcpTransport {
    /// Binds a listener on `addr`. Port 0 picks an ephemeral port; see
    /// [`local_addr`](Self::local_addr) for the one the system chose.
    pub async fn bind(
        addr: SocketAddr,
        options: TcpOptions,
    ) -> Result<TcpTransport, TransportError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| io::Error::new(e.kind(), format!("local address of {addr}: {e}")))?;
        tracing::debug!(%local, "tcp transport listening");
        Ok(TcpTransport {
            listener,
            local,
            options,
        })
    }

    /// The address the listener is bound to, with the real port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The options this transport was bound with.
    pub fn options(&self) -> &TcpOptions {
        &self.options
    }

    fn connection(&self, stream: TcpStream, remote: String, dialed: bool) -> Connection {
        // Frames are small protocol messages waiting for an answer (Hello, Ack, Ping): Nagle
        // would hold them back. A failure here only costs latency, so it is not fatal.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
        }
        let (read, write) = stream.into_split();
        Connection {
            remote,
            dialed,
            sender: Box::new(TcpSender::new(write, self.options.max_frame_len)),
            receiver: Box::new(TcpReceiver::new(read, self.options.max_frame_len)),
        }
    }

    async fn connect(address: &str) -> Result<TcpStream, String> {
        let targets = tokio::net::lookup_host(address)
            .await
            .map_err(|e| e.to_string())?;
        let mut last = None;
        for target in targets {
            match TcpStream::connect(target).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(format!("{target}: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| "the name resolved to no address".to_owned()))
    }
}

#[async_trait]
impl Transport for TcpTransport {
    fn kind(&self) -> &str {
        "tcp"
    }

    fn local_address(&self) -> String {
        self.local.to_string()
    }

    async fn accept(&self) -> Result<Connection, TransportError> {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "tcp connection accepted");
                    return Ok(self.connection(stream, peer.to_string(), false));
                }
                // These concern one half-open connection that died before we took it, not
                // the listener: skip it and wait for the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    tracing::debug!(error = %e, "tcp accept: connection dropped before accept");
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("accepting on {}: {e}", self.local),
                    )
                    .into())
                }
            }
        }
    }

    async fn dial(&self, address: &str) -> Result<Connection, TransportError> {
        let timeout = self.options.connect_timeout;
        let stream = match tokio::time::timeout(timeout, Self::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(reason)) => {
                return Err(TransportError::Unreachable {
                    address: address.to_owned(),
                    reason,
                })
            }
            Err(_) => {
                return Err(TransportError::Unreachable {
                    address: address.to_owned(),
                    reason: format!("no connection within {timeout:?}"),
                })
            }
        };
        tracing::debug!(%address, "tcp connection dialed");
        Ok(self.connection(stream, address.to_owned(), true))
    }
}
