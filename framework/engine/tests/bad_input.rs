//! Bad input from the network is refused: one real engine on a real TCP transport, and raw
//! loopback sockets that send what no honest peer would — oversized, truncated, garbled
//! or unversioned frames, handshakes from strangers, invalid events and chunks that do not
//! match their hash. Each time the engine must close the connection and append nothing;
//! afterwards a well-behaved client is still served.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use converge_api::codec::{self, PROTOCOL_VERSION};
use converge_api::{
    ChunkItem, ContentRef, Event, EventId, Hash, Hlc, Key, Message, Meta, Op, Place, ReplicaId,
    VersionVector,
};
use converge_framework::log::{EventLog, LogConfig};
use converge_framework::{EngineConfig, PeerConfig, SyncEngine};
use converge_policies::Lww;
use converge_transport_tcp::{TcpOptions, TcpTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The one peer the engine knows.
const KNOWN: ReplicaId = ReplicaId([7; 16]);
/// A replica the engine was never told about.
const STRANGER: ReplicaId = ReplicaId([8; 16]);
/// Origin of the otherwise valid events smuggled in next to bad input: if one were ever
/// appended, the final check of the log's content would see it.
const SMUGGLED: ReplicaId = ReplicaId([9; 16]);
/// Generous, for a loaded machine; nothing here measures time.
const WAIT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

struct Daemon {
    engine: SyncEngine,
    log: EventLog,
    addr: SocketAddr,
}

async fn start() -> Daemon {
    start_knowing(&[]).await
}

/// As [`start`], knowing the replicas `also` too (which dial it).
async fn start_knowing(also: &[ReplicaId]) -> Daemon {
    start_with(also, |_| {}).await
}

/// As [`start_knowing`], with `tweak` applied to the engine's configuration.
async fn start_with(also: &[ReplicaId], tweak: impl Fn(&mut EngineConfig)) -> Daemon {
    let log = EventLog::open(LogConfig::temporary()).unwrap();
    let transport = TcpTransport::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::default())
        .await
        .unwrap();
    let addr = transport.local_addr();
    let config = EngineConfig {
        peers: std::iter::once(KNOWN)
            .chain(also.iter().copied())
            .map(|id| PeerConfig { id, address: None })
            .collect(),
        handshake_timeout: HANDSHAKE_TIMEOUT,
        ..EngineConfig::default()
    };
    let mut config = config;
    tweak(&mut config);
    let engine = SyncEngine::builder(log.clone(), Arc::new(Lww))
        .config(config)
        .transport(Arc::new(transport))
        .start()
        .await
        .unwrap();
    Daemon { engine, log, addr }
}

fn framed(payload: &[u8]) -> Vec<u8> {
    codec::frame(payload, codec::MAX_FRAME_LEN).unwrap()
}

fn message(msg: &Message) -> Vec<u8> {
    framed(&msg.encode().unwrap())
}

fn hello(replica: ReplicaId) -> Vec<u8> {
    message(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        replica,
        vv: VersionVector::new(),
        tips: Vec::new(),
    })
}

fn event(origin: ReplicaId, seq: u64, key: &str) -> Event {
    Event {
        id: EventId { origin, seq },
        hlc: Hlc {
            wall_ms: 1_700_000_000_000 + seq,
            logical: 0,
        },
        key: Key::new(key).unwrap(),
        parents: Vec::new(),
        op: Op::Put {
            content: None,
            meta: Meta::dir(0),
        },
    }
}

/// One event of `SMUGGLED` naming `(origin, seq)` as its parent, framed.
fn naming_parent(origin: ReplicaId, seq: u64) -> Vec<u8> {
    events(vec![Event {
        parents: vec![EventId { origin, seq }],
        ..event(SMUGGLED, 1, "smuggled.txt")
    }])
}

fn events(batch: Vec<Event>) -> Vec<u8> {
    message(&Message::Events { batch })
}

/// An `Events` payload whose events carry `keys` verbatim, valid or not: the typed `Key`
/// cannot hold an invalid one, so the message is built as an untyped CBOR value.
fn events_payload_with_keys(keys: &[&str]) -> Vec<u8> {
    let batch = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let mut value =
                ciborium::Value::serialized(&event(SMUGGLED, i as u64 + 1, "k")).unwrap();
            // An event is the array [id, hlc, key, parents, op].
            let ciborium::Value::Array(fields) = &mut value else {
                panic!("an event serializes as an array");
            };
            fields[2] = ciborium::Value::Text((*key).to_owned());
            value
        })
        .collect();
    let text = |s: &str| ciborium::Value::Text(s.to_owned());
    let msg = ciborium::Value::Map(vec![(
        text("Events"),
        ciborium::Value::Map(vec![(text("batch"), ciborium::Value::Array(batch))]),
    )]);
    codec::encode(&msg).unwrap()
}

/// Reads one frame; `None` at the end of the stream.
async fn read_frame(stream: &mut TcpStream) -> Option<Message> {
    let mut header = [0u8; codec::FRAME_HEADER_LEN];
    stream.read_exact(&mut header).await.ok()?;
    let len = codec::frame_len(header, codec::MAX_FRAME_LEN).unwrap();
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await.unwrap();
    Some(Message::decode(&payload).unwrap())
}

/// Connects and reads the engine's `Hello` (it speaks first).
async fn connect(d: &Daemon) -> TcpStream {
    let mut stream = TcpStream::connect(d.addr).await.unwrap();
    let first = timeout(WAIT, read_frame(&mut stream)).await.unwrap();
    match first {
        Some(Message::Hello { replica, .. }) => assert_eq!(replica, d.log.replica()),
        other => panic!("expected the engine's hello, got {other:?}"),
    }
    stream
}

fn is_closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// Sends `bytes` on a fresh connection (then half-closes it if `then_close`), and checks
/// that the engine closes the connection, keeps no session and appends nothing.
async fn check(d: &Daemon, name: &str, bytes: &[u8], then_close: bool) {
    let mut stream = connect(d).await;
    if let Err(e) = stream.write_all(bytes).await {
        assert!(is_closed(&e), "{name}: writing failed: {e}");
    }
    if then_close {
        let _ = stream.shutdown().await;
    }
    // Whatever the engine still sends (nothing, or pings) is skipped until the end.
    let mut buf = vec![0u8; 64 << 10];
    let closed = timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_closed(&e) => return,
                Err(e) => panic!("{name}: reading failed: {e}"),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{name}: the engine kept the connection open"
    );
    let unregistered = timeout(WAIT, async {
        while d.engine.peers().iter().any(|p| p.connected) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        unregistered.is_ok(),
        "{name}: the session stayed registered"
    );
    assert_eq!(d.log.len(), 0, "{name}: something was appended");
}

/// A listener standing in for a configured peer: for every connection it reads the
/// engine's `Hello`, answers with `answer` (or nothing), and closes. Counts connections.
async fn fake_peer(answer: Option<ReplicaId>) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = timeout(WAIT, read_frame(&mut stream)).await;
                if let Some(id) = answer {
                    let _ = stream.write_all(&hello(id)).await;
                }
                let _ = stream.shutdown().await;
                // Hold the socket until the engine closes its side.
                let mut buf = [0u8; 1024];
                while let Ok(Ok(n)) = timeout(WAIT, stream.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A configured peer that closes every connection before its `Hello` (it does not list
/// this replica) is dialed with a growing pause, and its status says why there is no
/// session. Before, a clean close counted as a session that ran, and the engine dialed
/// again every 100 ms, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_closing_before_its_hello_is_dialed_with_a_growing_pause() {
    let (addr, accepted) = fake_peer(None).await;
    let d = start_with(&[], |c| {
        c.peers = vec![PeerConfig {
            id: KNOWN,
            address: Some(addr.to_string()),
        }];
        c.dial_backoff = (Duration::from_millis(100), Duration::from_secs(10));
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 100 + 200 + 400 + 800 + 1,600 ms of pauses: at most 5 dials in 3 s (30 at 100 ms).
    let dials = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=6).contains(&dials), "{dials} dials in 3 s");
    let status = d.engine.peers();
    let error = status[0].last_error.clone().unwrap_or_default();
    assert!(
        error.contains("closed the connection before its hello"),
        "the peer's status says why: {status:?}"
    );
    d.engine.shutdown().await.unwrap();
}

/// A dialed address that answers as another configured peer is refused: a session under
/// that peer's name would leave the dialed one never reached. The dialed peer's status
/// names the mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialed_address_answering_as_another_peer_is_refused() {
    const OTHER: ReplicaId = ReplicaId([6; 16]);
    let (addr, accepted) = fake_peer(Some(OTHER)).await;
    let d = start_with(&[OTHER], |c| {
        c.peers[0].address = Some(addr.to_string());
    })
    .await;
    let refused = timeout(WAIT, async {
        loop {
            let status = d.engine.peers();
            let known = status.iter().find(|p| p.id == KNOWN).unwrap();
            if let Some(e) = &known.last_error {
                return e.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the dialed peer shows an error");
    assert!(
        refused.contains("was dialed as peer") && refused.contains(&KNOWN.to_string()),
        "{refused}"
    );
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(
        d.engine.peers().iter().all(|p| !p.connected),
        "no session under the other peer's name: {:?}",
        d.engine.peers()
    );
    d.engine.shutdown().await.unwrap();
}

/// A large chunk asked for after others is sent in a frame of its own rather than added
/// to a frame nearly full: 3.5 + 13 MiB in one frame went over the transport's 16 MiB
/// limit and ended the session, every time the chunks were asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_chunk_goes_in_a_frame_of_its_own() {
    let d = start().await;
    let chunk = |len: usize, seed: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    };
    let (small, large) = (chunk(7 << 19, 1), chunk(13 << 20, 2));
    let hashes = vec![
        d.log.chunks().put(&small).unwrap(),
        d.log.chunks().put(&large).unwrap(),
    ];
    let mut stream = connect(&d).await;
    stream.write_all(&hello(KNOWN)).await.unwrap();
    stream
        .write_all(&message(&Message::WantChunks {
            hashes: hashes.clone(),
        }))
        .await
        .unwrap();
    let mut received = Vec::new();
    let answered = timeout(WAIT, async {
        while received.len() < 2 {
            match read_frame(&mut stream).await {
                Some(Message::Chunks { items }) => {
                    received.extend(items.into_iter().map(|i| (i.hash, i.bytes.len())))
                }
                Some(_) => {}
                None => return false,
            }
        }
        true
    })
    .await;
    assert_eq!(answered, Ok(true), "both chunks came, the session up");
    assert_eq!(received, [(hashes[0], 7 << 19), (hashes[1], 13 << 20)]);
    d.engine.shutdown().await.unwrap();
}

/// A frame whose bytes keep coming for longer than the keepalive timeout (a large frame
/// over a slow link) is waited for: the timeout counts silence, not whole frames. Before,
/// the session ended a second into the frame, and over such a link for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_arriving_slowly_is_not_taken_for_silence() {
    let d = start_with(&[], |c| {
        c.keepalive_timeout = Duration::from_millis(1500);
        c.keepalive_interval = Duration::from_millis(300);
    })
    .await;
    let mut stream = connect(&d).await;
    stream.write_all(&hello(KNOWN)).await.unwrap();
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let hash = Hash::of(&bytes);
    let item = ChunkItem {
        hash,
        bytes,
        place: None,
    };
    let frame = message(&Message::Chunks { items: vec![item] });
    // Four seconds for the frame: 40 pieces, one every 100 ms.
    for piece in frame.chunks(frame.len().div_ceil(40)) {
        if let Err(e) = stream.write_all(piece).await {
            panic!("the engine closed the connection while the frame was arriving: {e}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = timeout(WAIT, async {
        while !d.log.chunks().contains(&hash).unwrap() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(stored.is_ok(), "the chunk was stored");
    assert!(
        d.engine.peers().iter().any(|p| p.connected),
        "and the session is still up"
    );
    d.engine.shutdown().await.unwrap();
}

/// A peer that never answers chunk requests holds only its own window: the content of
/// another peer's event is asked for at once, not after the first one's requests time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_does_not_hold_back_another_peers_content() {
    // E: a real peer, which does not push its content (so that D has to ask for it).
    let e_log = EventLog::open(LogConfig::temporary()).unwrap();
    let d = start_knowing(&[e_log.replica()]).await;

    // The silent peer sends more events than a window holds, with content it never sends.
    let mut stream = connect(&d).await;
    let window = EngineConfig::default().chunk_window;
    let batch: Vec<Event> = (1..=window as u64 + 500)
        .map(|seq| Event {
            op: Op::Put {
                content: Some(ContentRef {
                    root: Hash::of(&seq.to_le_bytes()),
                    size: 100,
                    depth: 0,
                }),
                meta: Meta::file(0),
            },
            ..event(KNOWN, seq, &format!("silent/{seq}"))
        })
        .collect();
    stream.write_all(&hello(KNOWN)).await.unwrap();
    for part in batch.chunks(500) {
        stream.write_all(&events(part.to_vec())).await.unwrap();
    }
    let pending = || {
        d.engine
            .stats()
            .pending
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for _ in 0..500 {
        if pending() as usize == batch.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pending() as usize,
        batch.len(),
        "D holds the silent peer's events"
    );

    let e_transport = TcpTransport::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::default())
        .await
        .unwrap();
    let e = SyncEngine::builder(e_log.clone(), Arc::new(Lww))
        .config(EngineConfig {
            peers: vec![PeerConfig {
                id: d.log.replica(),
                address: Some(d.addr.to_string()),
            }],
            push_fresh_chunks: false,
            ..EngineConfig::default()
        })
        .transport(Arc::new(e_transport))
        .start()
        .await
        .unwrap();
    let bytes = b"E's file, which D must ask E for".to_vec();
    let content = ContentRef {
        root: e_log.chunks().put(&bytes).unwrap(),
        size: bytes.len() as u64,
        depth: 0,
    };
    let key = Key::new("from/e").unwrap();
    e_log
        .append_local(vec![converge_framework::log::LocalChange::new(
            key.clone(),
            Op::Put {
                content: Some(content),
                meta: Meta::file(1),
            },
        )])
        .await
        .unwrap();
    // Well inside the 20 s after which the silent peer's requests would time out.
    let mut got = false;
    for _ in 0..400 {
        if d.log.heads(&key).unwrap().len() == 1 {
            got = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(got, "E's event waited behind the silent peer's requests");
    drop(stream);
    e.shutdown().await.unwrap();
    d.engine.shutdown().await.unwrap();
}

/// A peer that keeps asking for chunks while it reads nothing is pushed back: once the
/// engine holds a bounded number of its requests, it stops reading from it (TCP then
/// stops the peer's writes) instead of queueing every request in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_asking_without_reading_is_pushed_back_not_buffered() {
    let d = start().await;
    // Served again for each request: a few fill the socket the peer does not read.
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let hash = d.log.chunks().put(&big).unwrap();
    let mut stream = connect(&d).await;
    stream.write_all(&hello(KNOWN)).await.unwrap();
    let ask = message(&Message::WantChunks {
        hashes: vec![hash; 4096], // the most one request may ask for
    });
    // Without the bound the engine reads all of it, holding each request (128 KiB of
    // hashes) while its writer waits on the socket.
    const LIMIT: usize = 256 << 20;
    let mut written = 0;
    while written < LIMIT {
        match timeout(Duration::from_secs(3), stream.write_all(&ask)).await {
            Ok(Ok(())) => written += ask.len(),
            Ok(Err(e)) => panic!("the engine closed the connection: {e}"),
            Err(_) => break, // the engine stopped reading
        }
    }
    assert!(
        written < 64 << 20,
        "the engine took {} MiB of requests from a peer that reads nothing",
        written >> 20
    );
    drop(stream);
    d.engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_daemon_keeps_serving() {
    let d = start().await;
    let smuggled = || events(vec![event(SMUGGLED, 1, "smuggled.txt")]);

    let unversioned = {
        let mut payload = Message::Hello {
            protocol: PROTOCOL_VERSION,
            replica: KNOWN,
            vv: VersionVector::new(),
            tips: Vec::new(),
        }
        .encode()
        .unwrap();
        payload[0] = codec::FORMAT_VERSION + 1;
        framed(&payload)
    };
    let mismatched_chunk = message(&Message::Chunks {
        items: vec![ChunkItem {
            hash: Hash::of(b"what was asked for"),
            bytes: b"something else".to_vec(),
            // Placed in a stream: checked all the same before it is written anywhere.
            place: Some(Place {
                stream: 1,
                offset: 0,
            }),
        }],
    });
    // Deterministic noise (an LCG), framed so that only the payload is nonsense.
    let noise: Vec<u8> = (0..300u32)
        .scan(12345u32, |s, _| {
            *s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
            Some((*s >> 16) as u8)
        })
        .collect();
    let hello_frame = hello(KNOWN);
    let with_hello = |rest: &[u8]| [hello_frame.as_slice(), rest].concat();
    let cat = |parts: &[&[u8]]| parts.concat();

    let mut cases: Vec<(String, Vec<u8>, bool)> = vec![
        (
            "frame announcing more than MAX_FRAME_LEN".into(),
            ((codec::MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec(),
            false,
        ),
        (
            "frame announcing 4 GiB, then bytes".into(),
            cat(&[&u32::MAX.to_be_bytes(), &[1; 64]]),
            false,
        ),
        ("truncated header, then close".into(), vec![0, 0], true),
        (
            "truncated hello, then close".into(),
            hello_frame[..hello_frame.len() - 3].to_vec(),
            true,
        ),
        (
            "hello, truncated events, then close".into(),
            with_hello(&smuggled()[..20]),
            true,
        ),
        (
            "garbage (an HTTP request)".into(),
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            false,
        ),
        ("garbage in a frame".into(), framed(&noise), false),
        (
            "garbage CBOR behind a valid version byte".into(),
            framed(&cat(&[&[codec::FORMAT_VERSION], &noise])),
            false,
        ),
        ("empty frame".into(), framed(&[]), false),
        ("unknown format version".into(), unversioned, false),
        (
            "unknown protocol version".into(),
            message(&Message::Hello {
                protocol: PROTOCOL_VERSION + 1,
                replica: KNOWN,
                vv: VersionVector::new(),
                tips: Vec::new(),
            }),
            false,
        ),
        (
            "hello from an unknown replica, then events".into(),
            cat(&[&hello(STRANGER), &smuggled()]),
            false,
        ),
        (
            "hello claiming the engine's own id, then events".into(),
            cat(&[&hello(d.log.replica()), &smuggled()]),
            false,
        ),
        ("events before hello".into(), smuggled(), false),
        ("second hello".into(), with_hello(&hello(KNOWN)), false),
        (
            "event with seq 0 after a valid one".into(),
            with_hello(&events(vec![
                event(SMUGGLED, 1, "smuggled.txt"),
                event(SMUGGLED, 0, "zero.txt"),
            ])),
            false,
        ),
        (
            "event naming a parent with seq 0".into(),
            with_hello(&naming_parent(KNOWN, 0)),
            false,
        ),
        (
            "event naming itself as parent".into(),
            with_hello(&naming_parent(SMUGGLED, 1)),
            false,
        ),
        (
            "event naming a later event of its own origin as parent".into(),
            with_hello(&naming_parent(SMUGGLED, 7)),
            false,
        ),
        (
            "content tree 200 levels deep".into(),
            with_hello(&events(vec![Event {
                op: Op::Put {
                    content: Some(ContentRef {
                        root: Hash::of(b"root"),
                        size: 1,
                        depth: 200,
                    }),
                    meta: Meta::file(0),
                },
                ..event(SMUGGLED, 1, "smuggled.txt")
            }])),
            false,
        ),
        (
            "chunk that does not match its hash".into(),
            with_hello(&mismatched_chunk),
            false,
        ),
        (
            "too many chunks wanted at once".into(),
            with_hello(&message(&Message::WantChunks {
                hashes: (0..5000u32).map(|i| Hash::of(&i.to_be_bytes())).collect(),
            })),
            false,
        ),
        ("silence (handshake timeout)".into(), Vec::new(), false),
    ];
    // The untyped construction is sound: with valid keys it decodes to the typed message.
    assert_eq!(
        Message::decode(&events_payload_with_keys(&["smuggled.txt", "a/b"])).unwrap(),
        Message::Events {
            batch: vec![
                event(SMUGGLED, 1, "smuggled.txt"),
                event(SMUGGLED, 2, "a/b")
            ]
        }
    );
    for key in [
        "../x",
        "a/../b",
        "/abs",
        "a//b",
        "a\\b",
        "a\0b",
        "",
        ".",
        "a/./b",
        "trailing/",
        "tab\t",
    ] {
        cases.push((
            format!("invalid key {key:?} after a valid event"),
            with_hello(&framed(&events_payload_with_keys(&["smuggled.txt", key]))),
            false,
        ));
    }

    // The status counts a session that came up and then failed, with its reason, and
    // nothing for a connection that never became a session with the known peer.
    let known = |d: &Daemon| {
        let peers = d.engine.peers();
        let p = peers.iter().find(|p| p.id == KNOWN).unwrap();
        (p.failed_sessions, p.last_error.clone())
    };
    for (name, bytes, then_close) in &cases {
        let (failed_before, _) = known(&d);
        check(&d, name, bytes, *then_close).await;
        let (failed, last_error) = known(&d);
        if !bytes.starts_with(&hello_frame) {
            assert_eq!(failed, failed_before, "{name}: counted as a failed session");
        }
        if name.starts_with("chunk that does not match") {
            assert_eq!(
                failed,
                failed_before + 1,
                "{name}: not counted as a failed session"
            );
            let last_error = last_error.unwrap_or_default();
            assert!(
                last_error.contains("mismatch"),
                "{name}: last error {last_error:?}"
            );
        }
    }
    assert!(
        !d.log
            .chunks()
            .contains(&Hash::of(b"what was asked for"))
            .unwrap(),
        "the mismatched chunk was stored"
    );

    // A well-behaved client is still served: its event is appended and acknowledged.
    let good = event(KNOWN, 1, "ok.txt");
    let mut stream = connect(&d).await;
    stream
        .write_all(&with_hello(&events(vec![good.clone()])))
        .await
        .unwrap();
    let acked = timeout(WAIT, async {
        loop {
            match read_frame(&mut stream).await {
                Some(Message::Ack { vv }) if vv.get(&KNOWN) == 1 => return,
                Some(_) => {}
                None => panic!("the engine closed a good client's connection"),
            }
        }
    })
    .await;
    assert!(
        acked.is_ok(),
        "the good client's event was not acknowledged"
    );
    let appended = timeout(WAIT, async {
        while d.log.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(appended.is_ok(), "the good client's event was not appended");
    let log: Vec<Event> = d
        .log
        .read(0, 100)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    assert_eq!(log, vec![good], "exactly the good event is in the log");
    d.engine.shutdown().await.unwrap();
}
