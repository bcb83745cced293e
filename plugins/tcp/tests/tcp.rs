//! The TCP transport over real loopback sockets (127.0.0.1, ephemeral ports only).
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use converge_api::CodecError;
use converge_framework::content::ChunkBytes;
use converge_framework::plugin::{ChunksFrame, Connection, Transport};
use converge_framework::TransportError;
use converge_transport_tcp::{TcpOptions, TcpTransport};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Fails the test instead of hanging it when a connection stalls.
async fn within<T>(body: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("test timed out")
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn options(max_frame_len: usize) -> TcpOptions {
    TcpOptions {
        max_frame_len,
        ..TcpOptions::default()
    }
}

async fn bind(max_frame_len: usize) -> TcpTransport {
    TcpTransport::bind(loopback(), options(max_frame_len))
        .await
        .unwrap()
}

/// Two transports and one connection between them: (dialed side, accepted side).
async fn pair(max_frame_len: usize) -> (Connection, Connection) {
    let a = bind(max_frame_len).await;
    let b = bind(max_frame_len).await;
    let address = b.local_address();
    let (dialed, accepted) = tokio::join!(a.dial(&address), b.accept());
    (dialed.unwrap(), accepted.unwrap())
}

/// A raw socket connected to a transport, and the transport's side of it.
async fn raw(transport: &TcpTransport) -> (TcpStream, Connection) {
    let (stream, accepted) = tokio::join!(
        TcpStream::connect(transport.local_addr()),
        transport.accept()
    );
    (stream.unwrap(), accepted.unwrap())
}

fn header(len: u32) -> [u8; 4] {
    len.to_be_bytes()
}

/// A frame whose bytes depend on its index, so reordering or corruption shows.
fn payload(index: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (index * 31 + i * 7) as u8).collect()
}

fn assert_too_large(result: Result<impl std::fmt::Debug, TransportError>, len: usize, max: usize) {
    match result {
        Err(TransportError::Frame(CodecError::FrameTooLarge { len: l, max: m })) => {
            assert_eq!((l, m), (len, max));
        }
        other => panic!("expected FrameTooLarge {{ len: {len}, max: {max} }}, got {other:?}"),
    }
}

fn assert_unexpected_eof(result: Result<Option<Vec<u8>>, TransportError>) {
    match result {
        Err(TransportError::Io(e)) => assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}"),
        other => panic!("expected an UnexpectedEof I/O error, got {other:?}"),
    }
}

#[tokio::test]
async fn bind_reports_the_real_address_and_kind() {
    let t = bind(1024).await;
    let addr = t.local_addr();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    assert_eq!(t.local_address(), format!("127.0.0.1:{}", addr.port()));
    assert_eq!(t.kind(), "tcp");
    assert_eq!(
        TcpOptions::default().max_frame_len,
        converge_api::codec::MAX_FRAME_LEN
    );
    assert_eq!(
        TcpOptions::default().connect_timeout,
        Duration::from_secs(5)
    );
}

#[tokio::test]
async fn many_frames_round_trip_in_order_both_directions() {
    within(async {
        const FRAMES: usize = 2000;
        let a = bind(1 << 20).await;
        let b = bind(1 << 20).await;
        let address = b.local_address();
        let (dialed, accepted) = tokio::join!(a.dial(&address), b.accept());
        let (dialed, accepted) = (dialed.unwrap(), accepted.unwrap());
        assert!(dialed.dialed);
        assert!(!accepted.dialed);
        assert_eq!(dialed.remote, b.local_address());
        let remote: SocketAddr = accepted.remote.parse().unwrap();
        assert_eq!(remote.ip().to_string(), "127.0.0.1");

        // Each side sends and receives at once, so neither blocks on a full socket buffer.
        let exchange = |mut c: Connection, seed: usize, peer_seed: usize| async move {
            let send = async {
                for i in 0..FRAMES {
                    c.sender
                        .send(payload(seed + i, (i * 37) % 3000))
                        .await
                        .unwrap();
                }
                c.sender.close().await;
            };
            let recv = async {
                for i in 0..FRAMES {
                    let frame = c.receiver.recv().await.unwrap();
                    assert_eq!(
                        frame,
                        Some(payload(peer_seed + i, (i * 37) % 3000)),
                        "frame {i}"
                    );
                }
                assert_eq!(c.receiver.recv().await.unwrap(), None);
            };
            tokio::join!(send, recv);
        };
        tokio::join!(exchange(dialed, 0, 100_000), exchange(accepted, 100_000, 0));
    })
    .await;
}

#[tokio::test]
async fn empty_frame_is_a_frame_not_a_close() {
    within(async {
        let (mut a, mut b) = pair(16).await;
        a.sender.send(Vec::new()).await.unwrap();
        a.sender.send(b"x".to_vec()).await.unwrap();
        assert_eq!(b.receiver.recv().await.unwrap(), Some(Vec::new()));
        assert_eq!(b.receiver.recv().await.unwrap(), Some(b"x".to_vec()));
    })
    .await;
}

#[tokio::test]
async fn frame_at_the_limit_passes_and_one_byte_over_is_refused_before_writing() {
    within(async {
        let (mut a, mut b) = pair(64).await;
        a.sender.send(payload(1, 64)).await.unwrap();
        assert_too_large(a.sender.send(payload(2, 65)).await, 65, 64);
        // Nothing of the refused frame reached the wire: the stream is still in step.
        a.sender.send(payload(3, 1)).await.unwrap();
        assert_eq!(b.receiver.recv().await.unwrap(), Some(payload(1, 64)));
        assert_eq!(b.receiver.recv().await.unwrap(), Some(payload(3, 1)));
    })
    .await;
}

#[tokio::test]
async fn oversized_announcement_is_an_error() {
    within(async {
        // (limit, announced length)
        for (max, announced) in [(64, 65u32), (converge_api::codec::MAX_FRAME_LEN, u32::MAX)] {
            let t = bind(max).await;
            let (mut stream, mut conn) = raw(&t).await;
            stream.write_all(&header(announced)).await.unwrap();
            assert_too_large(conn.receiver.recv().await, announced as usize, max);
        }
    })
    .await;
}

fn frame(body: &[u8]) -> Vec<u8> {
    [&header(body.len() as u32)[..], body].concat()
}

#[tokio::test]
async fn stream_cut_mid_frame_is_an_error() {
    /// Sends `sent` on a raw socket and closes it: the whole frames in `before` arrive, then
    /// the cut is an UnexpectedEof error.
    async fn check(t: &TcpTransport, sent: &[u8], before: &[&[u8]]) {
        let (mut stream, mut conn) = raw(t).await;
        stream.write_all(sent).await.unwrap();
        drop(stream);
        for expected in before {
            assert_eq!(
                conn.receiver.recv().await.unwrap().as_deref(),
                Some(*expected),
                "{sent:?}"
            );
        }
        assert_unexpected_eof(conn.receiver.recv().await);
    }

    within(async {
        let t = bind(64).await;
        check(&t, &[0xde, 0xad], &[]).await; // garbage, inside a header
        check(&t, &[&header(10)[..], b"abc"].concat(), &[]).await; // inside a payload
        check(&t, &header(5), &[]).await; // a header and no payload
        check(&t, &[frame(b"ok"), vec![0, 0, 0]].concat(), &[b"ok"]).await; // after a frame
        check(&t, &[frame(b""), header(3).to_vec()].concat(), &[b""]).await;
    })
    .await;
}

#[tokio::test]
async fn clean_close_is_none_and_half_closes() {
    within(async {
        let (mut a, mut b) = pair(64).await;
        a.sender.send(b"last".to_vec()).await.unwrap();
        a.sender.close().await;
        a.sender.close().await; // idempotent
        assert!(matches!(
            a.sender.send(b"late".to_vec()).await,
            Err(TransportError::Closed)
        ));
        assert_eq!(b.receiver.recv().await.unwrap(), Some(b"last".to_vec()));
        assert_eq!(b.receiver.recv().await.unwrap(), None);
        assert_eq!(b.receiver.recv().await.unwrap(), None);

        // Closing one direction leaves the other open.
        b.sender.send(b"reply".to_vec()).await.unwrap();
        assert_eq!(a.receiver.recv().await.unwrap(), Some(b"reply".to_vec()));
        b.sender.close().await;
        assert_eq!(a.receiver.recv().await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn dropped_connection_at_a_frame_boundary_is_none() {
    within(async {
        let (a, mut b) = pair(64).await;
        drop(a);
        assert_eq!(b.receiver.recv().await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn dial_of_a_closed_port_is_unreachable_naming_the_address() {
    within(async {
        let port = std::net::TcpListener::bind(loopback())
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let closed = format!("127.0.0.1:{port}");
        let t = bind(64).await;
        for address in [closed.as_str(), "127.0.0.1", "not an address"] {
            let err = t.dial(address).await.unwrap_err();
            let TransportError::Unreachable { address: named, .. } = &err else {
                panic!("dial {address}: expected Unreachable, got {err:?}");
            };
            assert_eq!(named, address);
            assert!(
                err.to_string()
                    .starts_with(&format!("cannot reach {address}: ")),
                "{err}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn listener_keeps_accepting_after_a_bad_connection() {
    within(async {
        let server = bind(64).await;
        let (mut stream, mut bad) = raw(&server).await;
        stream.write_all(&header(1000)).await.unwrap();
        assert_too_large(bad.receiver.recv().await, 1000, 64);
        drop(bad);
        drop(stream);

        let client = bind(64).await;
        let address = server.local_address();
        let (dialed, accepted) = tokio::join!(client.dial(&address), server.accept());
        let (mut dialed, mut accepted) = (dialed.unwrap(), accepted.unwrap());
        dialed.sender.send(b"good".to_vec()).await.unwrap();
        assert_eq!(
            accepted.receiver.recv().await.unwrap(),
            Some(b"good".to_vec())
        );
    })
    .await;
}

#[tokio::test]
async fn ten_mib_frame_round_trips() {
    within(async {
        let big = payload(7, 10 << 20);
        let (mut a, mut b) = pair(converge_api::codec::MAX_FRAME_LEN).await;
        let (sent, received) = tokio::join!(a.sender.send(big.clone()), b.receiver.recv());
        sent.unwrap();
        assert!(received.unwrap() == Some(big), "10 MiB frame differs");
    })
    .await;
}

#[tokio::test]
async fn recv_dropped_mid_frame_resumes_where_it_stopped() {
    within(async {
        let t = bind(64).await;
        let (mut stream, mut conn) = raw(&t).await;
        let body = payload(9, 20);
        let bytes = [&header(20)[..], &body].concat();
        // Cut inside the header, then inside the payload; each time recv is abandoned.
        for piece in [&bytes[..2], &bytes[2..10]] {
            stream.write_all(piece).await.unwrap();
            let attempt =
                tokio::time::timeout(Duration::from_millis(50), conn.receiver.recv()).await;
            assert!(
                attempt.is_err(),
                "recv returned {attempt:?} on a partial frame"
            );
        }
        stream.write_all(&bytes[10..]).await.unwrap();
        assert_eq!(conn.receiver.recv().await.unwrap(), Some(body));
    })
    .await;
}

#[tokio::test]
async fn send_dropped_mid_frame_is_completed_before_the_next() {
    within(async {
        // Larger than loopback socket buffers, so the send blocks while nobody reads.
        let big = payload(5, 32 << 20);
        let (mut a, mut b) = pair(64 << 20).await;
        let attempt =
            tokio::time::timeout(Duration::from_millis(20), a.sender.send(big.clone())).await;
        if let Ok(result) = attempt {
            result.unwrap(); // the machine's buffers took it all: still a valid run
        }
        let (sent, first) = tokio::join!(a.sender.send(b"next".to_vec()), b.receiver.recv());
        sent.unwrap();
        assert!(
            first.unwrap() == Some(big),
            "the interrupted frame arrived damaged"
        );
        assert_eq!(b.receiver.recv().await.unwrap(), Some(b"next".to_vec()));
    })
    .await;
}

/// A frame of chunks given as pieces (more than one vectored write takes, and larger than
/// the socket's buffers) arrives as the one frame they make, between two plain frames.
#[tokio::test]
async fn a_frame_of_chunks_arrives_whole() {
    within(async {
        let (mut a, mut b) = pair(64 << 20).await;
        let window: Arc<Vec<u8>> = Arc::new(payload(9, 8 << 20));
        // 600 chunks of one shared window, each after 3 bytes of head, and one last piece
        // of head after them.
        let head = payload(4, 600 * 3 + 5);
        let chunks: Vec<(usize, ChunkBytes)> = (0..600)
            .map(|i| {
                let at = i * 3 + 3;
                let range = i * 13_000..i * 13_000 + 1 + i % 17 * 700;
                (at, ChunkBytes::shared(window.clone(), range).unwrap())
            })
            .collect();
        let mut expected = Vec::new();
        let mut from = 0;
        for (at, chunk) in &chunks {
            expected.extend_from_slice(&head[from..*at]);
            expected.extend_from_slice(chunk);
            from = *at;
        }
        expected.extend_from_slice(&head[from..]);
        let frame = ChunksFrame::new(head, chunks).unwrap();
        assert_eq!(frame.len(), expected.len());
        let sending = async {
            a.sender.send(b"before".to_vec()).await.unwrap();
            a.sender.send_chunks(frame).await.unwrap();
            a.sender.send(b"after".to_vec()).await.unwrap();
        };
        let receiving = async {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(b.receiver.recv().await.unwrap().unwrap());
            }
            got
        };
        let ((), got) = tokio::join!(sending, receiving);
        assert_eq!(got[0], b"before");
        assert!(got[1] == expected, "the frame of chunks arrived damaged");
        assert_eq!(got[2], b"after");
    })
    .await;
}

#[test]
fn a_frame_of_chunks_refuses_offsets_out_of_order_or_past_its_head() {
    let bytes = |n: usize| ChunkBytes::shared(Arc::new(vec![1u8; n]), 0..n).unwrap();
    assert!(ChunksFrame::new(vec![0; 4], vec![(2, bytes(1)), (1, bytes(1))]).is_none());
    assert!(ChunksFrame::new(vec![0; 4], vec![(5, bytes(1))]).is_none());
    let frame = ChunksFrame::new(
        vec![0; 4],
        vec![(2, bytes(3)), (2, bytes(1)), (4, bytes(0))],
    )
    .unwrap();
    assert_eq!(frame.len(), 8);
    assert_eq!(frame.into_vec(), vec![0, 0, 1, 1, 1, 1, 0, 0]);
}

/// A frame of chunks encoded in pieces joins into the payload `encode_chunks` writes.
#[test]
fn an_encoded_frame_of_chunks_is_the_chunks_message() {
    use converge_api::codec::encode_chunks;
    use converge_api::{ChunkRef, Hash, Place};
    let window = Arc::new(payload(3, 100_000));
    let chunks: Vec<(Hash, ChunkBytes, Option<Place>)> = (0..5)
        .map(|i| {
            let bytes =
                ChunkBytes::shared(window.clone(), i * 20_000..i * 20_000 + 300 * i).unwrap();
            let place = (i % 2 == 1).then_some(Place {
                stream: 7,
                offset: (i * 20_000) as u64,
            });
            (Hash::of(&bytes), bytes, place)
        })
        .collect();
    let items: Vec<ChunkRef<'_>> = chunks
        .iter()
        .map(|(hash, bytes, place)| ChunkRef {
            hash: *hash,
            bytes,
            place: *place,
        })
        .collect();
    let expected = encode_chunks(&items).unwrap();
    let frame = ChunksFrame::encode(chunks.clone()).unwrap();
    assert_eq!(frame.len(), expected.len());
    assert_eq!(frame.into_vec(), expected);
}
