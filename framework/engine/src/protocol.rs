//! Peer sessions: handshake, then a reader and a writer over one connection.
//!
//! The writer streams the events the peer lacks, in log order, then follows new appends;
//! it also sends whatever the reader or the applier queue (acks, chunk answers, pongs).
//! The reader validates every frame before anything else sees it: a malformed frame, an
//! invalid event or a chunk that does not match its hash ends the session.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge_api::codec::PROTOCOL_VERSION;
use converge_api::{codec, EventId, Hash, Message, Place, ReplicaId, VersionVector};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::applier::SyncApplier;
use crate::content::{ChunkBytes, ChunkSet, ChunkStore};
use crate::engine::{Inbound, Inner};
use crate::planner::SyncPlanner;
use crate::plugin::{ChunksFrame, Connection, FrameReceiver, FrameSender};

/// Most hashes one `WantChunks` may ask for, and most bytes one `Chunks` frame carries.
pub const MAX_WANT_HASHES: usize = 4096;
const CHUNKS_FRAME_BYTES: usize = 4 << 20;
/// Target size of one `Events` frame.
const EVENTS_FRAME_BYTES: usize = 1 << 20;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] crate::error::TransportError),
    /// The peer sent something invalid; it was dropped.
    #[error("protocol violation by {peer}: {reason}")]
    Violation {
        /// The peer (address or id).
        peer: String,
        /// What it did.
        reason: String,
    },
    /// The peer is not allowed here.
    #[error("refused peer {peer}: {reason}")]
    Refused {
        /// The peer's claimed id.
        peer: String,
        /// Why.
        reason: String,
    },
    /// Nothing arrived within the keepalive or handshake timeout.
    #[error("peer {0} timed out")]
    Timeout(String),
    /// The local log failed.
    #[error(transparent)]
    Log(#[from] crate::error::LogError),
}

/// Most of the peer's requests (chunk hashes asked for, pings to answer, rewinds) a
/// session holds before its writer has dealt with them. A peer that keeps asking while it
/// does not read what it asked for would otherwise grow this replica's memory without end:
/// past this, the session stops reading from it (which pushes back on it through TCP)
/// until the writer catches up. An honest peer has far fewer out: its requests for chunks
/// are bounded by its window (2,048 hashes by default, asked again after a timeout).
const REQUESTS_HELD: usize = 1 << 16;

/// The room for a session's requests (see [`REQUESTS_HELD`]): taken by the reader as it
/// queues them, given back by the writer as it deals with them.
#[derive(Debug)]
struct RequestBudget(tokio::sync::Semaphore);

impl Default for RequestBudget {
    fn default() -> Self {
        RequestBudget(tokio::sync::Semaphore::new(REQUESTS_HELD))
    }
}

impl RequestBudget {
    /// What `n` requests count: at most the whole budget, so that one large request
    /// (a `WantEvents` with a long version vector) waits for all the room, not for ever.
    fn units(n: usize) -> u32 {
        u32::try_from(n.min(REQUESTS_HELD)).unwrap_or(u32::MAX)
    }

    /// Waits until `n` more requests fit, then counts them.
    async fn take(&self, n: usize) {
        // The semaphore is never closed, so acquiring fails only if it were.
        if let Ok(permit) = self.0.acquire_many(Self::units(n)).await {
            permit.forget();
        }
    }

    /// Gives back `n` requests dealt with.
    fn give_back(&self, n: usize) {
        self.0.add_permits(Self::units(n) as usize);
    }
}

/// Counts `n` requests of the peer in `budget`, waiting while too many are held; a session
/// whose writer has not dealt with them within the keepalive timeout (its peer reads
/// nothing) ends, as one that receives nothing does.
async fn take_requests(
    inner: &Inner,
    label: &str,
    budget: &RequestBudget,
    n: usize,
) -> Result<(), SessionError> {
    timeout(inner.config.keepalive_timeout, budget.take(n))
        .await
        .map_err(|_| SessionError::Timeout(label.to_owned()))
}

/// Something for a session's writer to do.
#[derive(Debug)]
pub(crate) enum Control {
    /// Send this message.
    Send(Message),
    /// Send this answer to the peer's request (a `Pong`): counted in the session's
    /// [`RequestBudget`] until sent.
    Answer(Message),
    /// Read these chunks and send them (read lazily, so queued work holds only hashes);
    /// the peer asked for them, so they count in the session's [`RequestBudget`] until
    /// sent.
    ServeChunks(Vec<Hash>),
    /// Send these fresh local chunks unasked (see [`crate::content::FreshSink`]), from
    /// the bytes given or, where none are, read from the store; they count in the
    /// session's [`PushBacklog`] until sent.
    Push(Vec<Pushed>),
    /// The peer holds `from`: send everything above it again. `held`: what it counts in
    /// the session's [`RequestBudget`] (at the peer's request, `WantEvents`: its entries;
    /// the engine's own: none).
    Rewind { from: VersionVector, held: usize },
    /// End the session.
    Close,
}

/// A fresh local chunk handed to a session to push.
#[derive(Debug)]
pub(crate) struct Pushed {
    pub(crate) hash: Hash,
    /// Its bytes, when the session's backlog had room for them in memory.
    pub(crate) bytes: Option<ChunkBytes>,
    /// Its place in a large file (see [`Place`]).
    pub(crate) place: Option<Place>,
    /// How many bytes of memory it counts in the session's backlog (see
    /// `memory_shares` in `engine.rs`): 0 without its bytes.
    pub(crate) held: usize,
}

/// What a session has been given to push and has not sent yet, shared between the engine,
/// which stops pushing to a session whose backlog is full (the peer then asks for what it
/// lacks) and the session's writer.
#[derive(Debug, Default)]
pub(crate) struct PushBacklog {
    /// Pushed chunks waiting.
    pub(crate) chunks: AtomicUsize,
    /// Bytes of the pushed chunks waiting with their bytes in memory.
    pub(crate) bytes: AtomicUsize,
}

impl PushBacklog {
    /// Puts `chunks` chunks, `bytes` of them in memory, on the backlog.
    pub(crate) fn hold(&self, chunks: usize, bytes: usize) {
        self.chunks.fetch_add(chunks, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Takes `chunks` chunks, `bytes` of them in memory, off the backlog.
    pub(crate) fn release(&self, chunks: usize, bytes: usize) {
        self.chunks.fetch_sub(chunks, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Takes the pushed ones of `items`, sent or dropped, off the backlog.
    fn release_queued<'a>(&self, items: impl IntoIterator<Item = &'a Queued>) {
        let (mut chunks, mut bytes) = (0, 0);
        for item in items.into_iter().filter(|item| item.pushed) {
            chunks += 1;
            bytes += item.held;
        }
        self.release(chunks, bytes);
    }
}

fn violation(peer: &str, reason: impl Into<String>) -> SessionError {
    SessionError::Violation {
        peer: peer.to_owned(),
        reason: reason.into(),
    }
}

async fn send_message(
    sender: &mut dyn FrameSender,
    inner: &Inner,
    peer: Option<ReplicaId>,
    msg: &Message,
) -> Result<(), SessionError> {
    let bytes = msg.encode().map_err(|e| violation("self", e.to_string()))?;
    send_payload(sender, inner, peer, bytes).await
}

/// Sends an encoded message and counts its bytes.
async fn send_payload(
    sender: &mut dyn FrameSender,
    inner: &Inner,
    peer: Option<ReplicaId>,
    payload: Vec<u8>,
) -> Result<(), SessionError> {
    let len = payload.len() as u64 + codec::FRAME_HEADER_LEN as u64;
    sender.send(payload).await?;
    if let Some(peer) = peer {
        inner.count_sent(&peer, len);
    }
    Ok(())
}

/// Runs one connection to its end: handshake, registration, then reader and writer.
/// Why this replica and `peer` must not sync, if one of them lacks events of its own
/// that the other holds: a replica's events are numbered by it alone, so the other can
/// hold no more of them than it does, unless its log lost them (its data dir restored
/// from an older copy, say). It then numbers its next events as the lost ones were, and
/// the side holding those drops the new ones as duplicates: the two would never agree,
/// and say nothing. (Such a replica that has already made as many events as it lost is
/// not told apart by the version vectors.)
fn lost_own_events(
    log: &crate::log::EventLog,
    peer: &ReplicaId,
    peer_vv: &VersionVector,
) -> Option<String> {
    let (me, vv) = (log.replica(), log.version_vector());
    if peer_vv.get(&me) > vv.get(&me) {
        return Some(format!(
            "it holds events of this replica up to number {}, and this log only up to {}: \
             this data dir lost events it had sent (restored from an older copy?). Its new \
             events would carry the numbers of the lost ones, and never sync; start this \
             replica over with a fresh data dir (`converge init`), which takes the folder \
             as it is",
            peer_vv.get(&me),
            vv.get(&me)
        ));
    }
    if vv.get(peer) > peer_vv.get(peer) {
        return Some(format!(
            "this log holds its events up to number {}, and it only up to {}: its data dir \
             lost events it had sent (restored from an older copy?), and its new events \
             would never sync; it is to start over with a fresh data dir",
            vv.get(peer),
            peer_vv.get(peer)
        ));
    }
    None
}

/// This replica's `Hello`: its version vector and its [tips](crate::log::Tips), both kept
/// in memory (an unknown peer's connection costs no read of the log).
fn hello_of(log: &crate::log::EventLog) -> Message {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        replica: log.replica(),
        vv: log.version_vector(),
        tips: log
            .tips()
            .into_iter()
            .map(|(origin, (seq, fingerprint))| (origin, seq, fingerprint))
            .collect(),
    }
}

/// Most events read to find one event a peer's tip names (see [`split_replica`]): the
/// scan from the nearest indexed seq of a quiet origin passes every event other origins
/// wrote since.
const TIP_SCAN: u64 = 1 << 16;

/// Why this replica must not sync with a peer whose `Hello` named `tips`, if an event
/// both hold under one id differs between them: two data dirs have acted as one replica
/// (a data dir copied to a second machine and started there, or one restored from a
/// backup after it had sent events, that has since written as many events as it lost).
/// One of the two events would be dropped everywhere as a duplicate of the other, and the
/// replicas would differ for good without a word. The side that holds the later of the
/// two tips sees it. Reads at most one event per origin this log knows, and at most
/// [`TIP_SCAN`] events for each (a tip not found within that is let go).
fn split_replica(
    log: &crate::log::EventLog,
    tips: &[(ReplicaId, u64, Hash)],
) -> Result<Option<String>, crate::error::LogError> {
    let (held, own) = (log.version_vector(), log.tips());
    let mut seen = HashSet::new();
    for &(origin, seq, fingerprint) in tips {
        if seq == 0 || seq > held.get(&origin) || !seen.insert(origin) {
            continue;
        }
        let here = match own.get(&origin) {
            Some(&(newest, here)) if newest == seq => Some(here),
            _ => log
                .get_within(&EventId { origin, seq }, TIP_SCAN)?
                .map(|event| event.fingerprint()),
        };
        if here.is_some_and(|here| here != fingerprint) {
            let whose = if origin == log.replica() {
                "this replica".to_owned()
            } else {
                format!("replica {origin}")
            };
            return Ok(Some(format!(
                "event number {seq} of {whose} is not the same event here as on that peer: \
                 two data dirs have acted as {whose} (one copied to another machine, or \
                 restored from a backup after it had sent events), and their events can \
                 never converge. Stop the copy and start it over with a fresh data dir \
                 (`converge init`), which takes its folder as it is"
            )));
        }
    }
    Ok(None)
}

/// How a session that ended without an error went: a dialer starts its backoff over after
/// one that lasted or was superseded, and takes a quick end of one that ran for the
/// peer's refusal (see `dial_loop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It ran until a clean close or shutdown.
    Ran,
    /// Another connection to the peer was kept instead of this one, at once or after it
    /// ran (simultaneous dials).
    Superseded,
    /// It never ran: the peer closed the connection before its `Hello` (it refused this
    /// replica, or is paused or stopping).
    ClosedBeforeHello,
}

/// Runs a session over `conn`: the handshake, then the sync until either side ends it.
/// `expected` is the peer dialed (`None` for an accepted connection); `handshake`, held
/// until the peer's `Hello` has been accepted, is what an accepted connection counts
/// against the bound on handshakes under way (see `accept_loop`).
pub(crate) async fn run_session(
    inner: Arc<Inner>,
    conn: Connection,
    expected: Option<ReplicaId>,
    handshake: Option<crate::engine::HandshakeSlot>,
) -> Result<Ended, SessionError> {
    let Connection {
        remote,
        dialed,
        mut sender,
        mut receiver,
    } = conn;
    let hello = hello_of(&inner.log);
    // Sending this side's hello is in the handshake's time too: a peer that reads nothing
    // would otherwise hold the send (and an accepted connection's handshake slot) for good.
    let greeted = timeout(inner.config.handshake_timeout, async {
        send_message(sender.as_mut(), &inner, None, &hello).await?;
        Ok::<_, SessionError>(receiver.recv().await?)
    })
    .await;
    let first = match greeted {
        Err(_) => return Err(SessionError::Timeout(remote)),
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return Ok(Ended::ClosedBeforeHello),
        Ok(Err(e)) => return Err(e),
    };
    let (peer, peer_vv, tips) = match Message::decode(&first) {
        Ok(Message::Hello {
            protocol,
            replica,
            vv,
            tips,
        }) => {
            if protocol != PROTOCOL_VERSION {
                return Err(violation(
                    &remote,
                    format!("speaks protocol {protocol}, this build speaks {PROTOCOL_VERSION}"),
                ));
            }
            (replica, vv, tips)
        }
        Ok(other) => {
            return Err(violation(
                &remote,
                format!("sent {} before hello", other.kind()),
            ))
        }
        Err(e) => return Err(violation(&remote, e.to_string())),
    };
    if peer == inner.log.replica() {
        return Err(SessionError::Refused {
            peer: peer.to_string(),
            reason: "it is this replica".into(),
        });
    }
    if !inner.is_known_peer(&peer) {
        return Err(SessionError::Refused {
            peer: peer.to_string(),
            reason: format!("not in the configured peers (from {remote})"),
        });
    }
    if let Some(expected) = expected.filter(|e| *e != peer) {
        // Dialed as one peer, answered as another (a wrong address in the config, or a
        // peer moved): a session under the other's name would leave this one unreached.
        return Err(SessionError::Refused {
            peer: peer.to_string(),
            reason: format!("{remote} was dialed as peer {expected}"),
        });
    }
    let log = inner.log.clone();
    let split = tokio::task::spawn_blocking(move || split_replica(&log, &tips))
        .await
        .map_err(|e| violation("self", e.to_string()))??;
    if let Some(reason) = split.or_else(|| lost_own_events(&inner.log, &peer, &peer_vv)) {
        tracing::error!(peer = %peer.short(), "refusing to sync: {reason}");
        return Err(SessionError::Refused {
            peer: peer.to_string(),
            reason,
        });
    }
    // A known peer, in sync terms with this replica: no longer a handshake under way.
    drop(handshake);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let pushed = Arc::new(PushBacklog::default());
    let Some(generation) = inner.register(
        peer,
        dialed,
        &remote,
        control_tx.clone(),
        pushed.clone(),
        &peer_vv,
    ) else {
        sender.close().await;
        return Ok(Ended::Superseded); // a better connection to this peer already exists
    };
    tracing::info!(peer = %peer.short(), %remote, dialed, "peer connected");
    let label = peer.short();
    let requests = Arc::new(RequestBudget::default());
    let result = tokio::select! {
        r = read_loop(&inner, peer, &label, receiver.as_mut(), &control_tx, &requests) => r,
        w = write_loop(&inner, peer, sender.as_mut(), control_rx, peer_vv, pushed, requests.clone()) => w,
    };
    sender.close().await;
    let warn = inner.unregister(
        &peer,
        generation,
        result.as_ref().err().map(|e| e.to_string()),
    );
    // Closed for a better connection to the peer (simultaneous dials): that one is up.
    let replaced = result.is_ok() && inner.is_connected(&peer);
    match &result {
        Ok(()) if replaced => {
            tracing::debug!(peer = %label, "session replaced by another connection to the peer")
        }
        Ok(()) => tracing::info!(peer = %label, "peer disconnected"),
        Err(e) => match warn {
            Some(0) => tracing::warn!(peer = %label, "peer session ended: {e}"),
            Some(n) => tracing::warn!(
                peer = %label,
                "peer session ended: {e} (as {n} more sessions did since this was last logged)"
            ),
            None => tracing::debug!(peer = %label, "peer session ended: {e}"),
        },
    }
    result.map(|()| {
        if replaced {
            Ended::Superseded
        } else {
            Ended::Ran
        }
    })
}

async fn read_loop(
    inner: &Arc<Inner>,
    peer: ReplicaId,
    label: &str,
    receiver: &mut dyn FrameReceiver,
    control: &mpsc::UnboundedSender<Control>,
    requests: &RequestBudget,
) -> Result<(), SessionError> {
    // Chunks received are checked and stored on blocking threads while the next frame is
    // read and decoded (see `Storing`).
    let mut storing = Storing::default();
    loop {
        let received = tokio::select! {
            stored = async {
                match storing.tasks.front_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if !storing.tasks.is_empty() => {
                storing.tasks.pop_front();
                if !chunks_stored(inner, peer, label, stored).await? {
                    return Ok(()); // shutting down
                }
                continue;
            }
            received = next_frame(receiver, inner.config.keepalive_timeout) => received,
        };
        let frame = match received {
            None => return Err(SessionError::Timeout(label.to_owned())),
            Some(Ok(Some(frame))) => frame,
            Some(Ok(None)) => {
                while let Some(task) = storing.tasks.pop_front() {
                    chunks_stored(inner, peer, label, task.await).await?;
                }
                return Ok(());
            }
            Some(Err(e)) => return Err(e.into()),
        };
        inner.count_received(&peer, frame.len() as u64 + codec::FRAME_HEADER_LEN as u64);
        // Chunks are stored from the frame they came in, not copied out of it first.
        if let Some(spans) = codec::chunk_spans(&frame) {
            let stored = store_chunks(
                inner,
                peer,
                label,
                &mut storing,
                (frame, spans),
                |(frame, spans)| {
                    spans
                        .iter()
                        .map(|s| (s.hash, &frame[s.bytes.clone()], s.place))
                        .collect()
                },
            );
            if !stored.await? {
                return Ok(());
            }
            continue;
        }
        let msg =
            Message::decode(&frame).map_err(|e| violation(label, format!("bad frame: {e}")))?;
        match msg {
            Message::Hello { .. } => return Err(violation(label, "second hello")),
            Message::Events { batch } => {
                // The sender holds what it sends (each origin's events up to the highest
                // seq here, as logs hold them in order): not to be sent back to it.
                let mut holds = VersionVector::new();
                for event in &batch {
                    SyncApplier::validate(event).map_err(|reason| violation(label, reason))?;
                    if event.id.seq > holds.get(&event.id.origin) {
                        holds.set(event.id.origin, event.id.seq);
                    }
                }
                inner.record_ack(&peer, &holds);
                inner.count_events_received(&peer, batch.len() as u64);
                if inner
                    .inbound
                    .send(Inbound::Events { from: peer, batch })
                    .await
                    .is_err()
                {
                    return Ok(()); // shutting down
                }
            }
            Message::Ack { vv } => inner.record_ack(&peer, &vv),
            Message::WantEvents { from } => {
                inner.record_ack(&peer, &from);
                let held = from.0.len().max(1);
                take_requests(inner, label, requests, held).await?;
                let _ = control.send(Control::Rewind { from, held });
            }
            Message::WantChunks { hashes } => {
                if hashes.len() > MAX_WANT_HASHES {
                    return Err(violation(
                        label,
                        format!(
                            "asked for {} chunks at once (limit {MAX_WANT_HASHES})",
                            hashes.len()
                        ),
                    ));
                }
                take_requests(inner, label, requests, hashes.len()).await?;
                let _ = control.send(Control::ServeChunks(hashes));
            }
            Message::Chunks { items } => {
                let stored = store_chunks(inner, peer, label, &mut storing, items, |items| {
                    items
                        .iter()
                        .map(|i| (i.hash, i.bytes.as_slice(), i.place))
                        .collect()
                });
                if !stored.await? {
                    return Ok(());
                }
            }
            Message::Ping { nonce } => {
                take_requests(inner, label, requests, 1).await?;
                let _ = control.send(Control::Answer(Message::Pong { nonce }));
            }
            Message::Pong { .. } => {}
        }
    }
}

/// The next frame from `receiver`, or `None` once nothing at all arrived for `silence`.
/// A frame whose bytes keep arriving is waited for however long it takes as a whole: a
/// 4 MiB frame of chunks takes 45 s below 93 KB/s, and a deadline on whole frames ended
/// every session over such a link before its first frame of chunks was in, for good.
/// Cancel safe, as `recv` is.
async fn next_frame(
    receiver: &mut dyn FrameReceiver,
    silence: Duration,
) -> Option<Result<Option<Vec<u8>>, crate::TransportError>> {
    let mut deadline = tokio::time::Instant::now() + silence;
    loop {
        match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Ok(received) => return Some(received),
            Err(_) => {
                let heard = receiver.last_progress().map(|at| at + silence);
                match heard {
                    Some(until) if until > std::time::Instant::now() => {
                        deadline = tokio::time::Instant::from_std(until);
                    }
                    _ => return None,
                }
            }
        }
    }
}

/// Lists the chunks (hash, bytes, place) whose bytes a `T` holds: see [`store_chunks`].
type ListChunks<T> = for<'a> fn(&'a T) -> Vec<(Hash, &'a [u8], Option<Place>)>;

/// Checks and stores a batch of received chunks off the runtime (see [`Storing`]):
/// `chunks` lists them (hash, bytes, place) from `held`, which holds their bytes. `false`
/// when the engine is shutting down.
async fn store_chunks<T: Send + 'static>(
    inner: &Arc<Inner>,
    peer: ReplicaId,
    label: &str,
    storing: &mut Storing,
    held: T,
    chunks: ListChunks<T>,
) -> Result<bool, SessionError> {
    while storing.tasks.len() >= STORING_AT_ONCE {
        if let Some(task) = storing.tasks.pop_front() {
            if !chunks_stored(inner, peer, label, task.await).await? {
                return Ok(false);
            }
        }
    }
    let store = inner.log.chunks().clone();
    // Dropped once this batch is stored (or failed to be), which lets the next one write.
    let (stored, next_waits) = std::sync::mpsc::sync_channel::<()>(0);
    let after = storing.last.replace(next_waits);
    storing
        .tasks
        .push_back(tokio::task::spawn_blocking(move || {
            let _stored = stored;
            let (batch, places): (Vec<_>, Vec<_>) = chunks(&held)
                .into_iter()
                .map(|(hash, bytes, place)| ((hash, bytes), place))
                .unzip();
            let checked = ChunkStore::check(&batch)?;
            if let Some(after) = after {
                // Nothing is ever sent: this returns when the batch before is done.
                let _ = after.recv();
            }
            store.put_checked_at(checked, &places)?;
            Ok(batch.into_iter().map(|(hash, _)| hash).collect())
        }));
    Ok(true)
}

/// Batches of received chunks a session checks and stores at once. Each is checked as soon
/// as it arrives, the next one while the one before is written, but written only after
/// the one before: the chunks of a large file then reach its stream pack in order (see
/// `ChunkStore::put_checked_at`). A receiver that falls behind its sender this way
/// uses a second core for the checks, where one batch at a time left it idle while the
/// sender, done, waited for the receiver to catch up.
const STORING_AT_ONCE: usize = 2;

/// The batches of received chunks a session is checking and storing, oldest first.
#[derive(Default)]
struct Storing {
    /// Each batch's task: its hashes once stored.
    tasks: std::collections::VecDeque<StoringChunks>,
    /// Returns once the newest batch is stored (or failed): the next one waits on it.
    last: Option<std::sync::mpsc::Receiver<()>>,
}

/// A batch of received chunks being checked and stored: their hashes once stored.
type StoringChunks = tokio::task::JoinHandle<Result<Vec<Hash>, crate::error::LogError>>;

/// Tells the applier which chunks arrived; a chunk that does not match its hash ends the
/// session. `false` when the engine is shutting down.
async fn chunks_stored(
    inner: &Arc<Inner>,
    peer: ReplicaId,
    label: &str,
    stored: Result<Result<Vec<Hash>, crate::error::LogError>, tokio::task::JoinError>,
) -> Result<bool, SessionError> {
    let hashes = stored
        .map_err(|e| violation(label, e.to_string()))?
        .map_err(|e| match e {
            e @ crate::error::LogError::ChunkMismatch { .. } => violation(label, e.to_string()),
            other => SessionError::Log(other),
        })?;
    let from = peer;
    Ok(inner
        .inbound
        .send(Inbound::Chunks { from, hashes })
        .await
        .is_ok())
}

async fn write_loop(
    inner: &Arc<Inner>,
    peer: ReplicaId,
    sender: &mut dyn FrameSender,
    mut control: mpsc::UnboundedReceiver<Control>,
    peer_vv: VersionVector,
    pushed: Arc<PushBacklog>,
    requests: Arc<RequestBudget>,
) -> Result<(), SessionError> {
    let log = inner.log.clone();
    let mut outbox = Outbox::new(pushed, requests);
    // `sent`: what the peer holds as far as this session knows (acknowledged or sent).
    let mut sent = peer_vv;
    let mut scan = SyncPlanner::start_offset(&log, &sent)?.unwrap_or_else(|| log.len());
    let mut len_rx = log.subscribe();
    let mut shutdown = inner.shutdown.subscribe();
    let mut tick = tokio::time::interval(inner.config.tick_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ping = Instant::now();
    let mut last_acked: Option<VersionVector> = None;
    // Events go out once the chunks queued before they were appended have gone (local
    // changes push their chunks first), so the peer finds their content there instead of
    // asking for it; later chunks do not hold them back. `gates`: (log length, outbox
    // mark) as each new length was seen; `sendable`: events below it may go.
    let mut gates: VecDeque<(u64, u64)> = VecDeque::new();
    let mut seen_len = log.len();
    let mut sendable = seen_len;
    loop {
        // The length first, then the queue: chunks pushed before an append that this
        // length includes are then already in the outbox.
        let len = log.len();
        while let Ok(c) = control.try_recv() {
            if !handle_control(inner, peer, sender, c, &mut sent, &mut scan, &mut outbox).await? {
                return Ok(());
            }
        }
        if *shutdown.borrow() {
            return Ok(());
        }
        if len > seen_len {
            gates.push_back((len, outbox.queued_total));
            seen_len = len;
        }
        while let Some(&(gate_len, mark)) = gates.front() {
            if outbox.sent_total < mark {
                break;
            }
            sendable = gate_len;
            gates.pop_front();
        }
        if scan >= sendable && !outbox.is_empty() {
            // One frame at a time: control messages are looked at between frames.
            outbox.send_frame(inner, peer, sender).await?;
            continue;
        }
        if scan < sendable {
            let reader = log.clone();
            let max = inner
                .config
                .max_batch_events
                .min(usize::try_from(sendable - scan).unwrap_or(usize::MAX));
            // What the peer has acknowledged, or sent here, it holds: those events are
            // passed over by id, undecoded (most of them, on a replica that mostly
            // receives from this peer); the rest are sent as the log stores them.
            sent.merge(&inner.acked(&peer));
            let held = sent.clone();
            let (read, next) = tokio::task::spawn_blocking(move || {
                reader.read_raw_unless(scan, max, |id| !SyncPlanner::should_send(id, &held))
            })
            .await
            .map_err(|e| violation("self", e.to_string()))??;
            scan = next;
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut bytes = 0;
            for event in read {
                sent.set(event.id.origin, event.id.seq);
                bytes += event.bytes.len();
                batch.push(event.bytes);
                if bytes >= EVENTS_FRAME_BYTES {
                    send_events(inner, peer, sender, std::mem::take(&mut batch)).await?;
                    bytes = 0;
                }
            }
            if !batch.is_empty() {
                send_events(inner, peer, sender, batch).await?;
            }
            continue;
        }
        tokio::select! {
            c = control.recv() => match c {
                Some(c) => if !handle_control(inner, peer, sender, c, &mut sent, &mut scan, &mut outbox).await? { return Ok(()) },
                None => return Ok(()),
            },
            changed = len_rx.changed() => if changed.is_err() { return Ok(()) },
            _ = crate::engine::until(&mut shutdown, true) => return Ok(()),
            _ = tick.tick() => {
                if last_ping.elapsed() >= inner.config.keepalive_interval {
                    send_message(sender, inner, Some(peer), &Message::Ping { nonce: rand::random() }).await?;
                    last_ping = Instant::now();
                }
                // Lost tail: the peer's acknowledgements stopped short of what was sent
                // for a whole tick. Send again from what it holds.
                let acked = inner.acked(&peer);
                if !acked.dominates(&sent) && last_acked.as_ref() == Some(&acked) {
                    tracing::debug!(peer = %peer.short(), "no progress acknowledged; resending");
                    rewind(&log, &acked, &mut sent, &mut scan)?;
                }
                last_acked = Some(acked);
            }
        }
    }
}

fn rewind(
    log: &crate::log::EventLog,
    from: &VersionVector,
    sent: &mut VersionVector,
    scan: &mut u64,
) -> Result<(), SessionError> {
    *sent = from.clone();
    *scan = SyncPlanner::start_offset(log, from)?.unwrap_or_else(|| log.len());
    Ok(())
}

/// Sends `batch`, events as the log stores them, in one `Events` message.
async fn send_events(
    inner: &Arc<Inner>,
    peer: ReplicaId,
    sender: &mut dyn FrameSender,
    batch: Vec<Vec<u8>>,
) -> Result<(), SessionError> {
    let n = batch.len() as u64;
    let events: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
    let payload = codec::encode_events(&events).map_err(|e| violation("self", e.to_string()))?;
    send_payload(sender, inner, Some(peer), payload).await?;
    inner.count_events_sent(&peer, n);
    Ok(())
}

/// Returns `false` when the session should end.
async fn handle_control(
    inner: &Arc<Inner>,
    peer: ReplicaId,
    sender: &mut dyn FrameSender,
    control: Control,
    sent: &mut VersionVector,
    scan: &mut u64,
    outbox: &mut Outbox,
) -> Result<bool, SessionError> {
    match control {
        Control::Send(msg) => send_message(sender, inner, Some(peer), &msg).await?,
        Control::Answer(msg) => {
            send_message(sender, inner, Some(peer), &msg).await?;
            outbox.requests.give_back(1);
        }
        Control::Rewind { from, held } => {
            rewind(&inner.log, &from, sent, scan)?;
            outbox.requests.give_back(held);
        }
        Control::ServeChunks(hashes) => outbox.add(hashes.into_iter().map(|hash| Queued {
            hash,
            pushed: false,
            bytes: None,
            held: 0,
            place: None,
        })),
        Control::Push(chunks) => outbox.add(chunks.into_iter().map(|p| Queued {
            hash: p.hash,
            pushed: true,
            held: p.held,
            bytes: p.bytes,
            place: p.place,
        })),
        Control::Close => return Ok(false),
    }
    Ok(true)
}

/// Chunks a session is to send, in the order asked for or pushed, each once. Asked-for
/// chunks wait as hashes, read from the content store a frame at a time; pushed ones may
/// carry their bytes.
struct Outbox {
    queue: VecDeque<Queued>,
    queued: ChunkSet,
    /// Hashes ever queued and ever taken off the queue: the write loop's marks.
    queued_total: u64,
    sent_total: u64,
    /// What the engine pushed here and is not sent yet.
    pushed: Arc<PushBacklog>,
    /// The peer's requests held, chunks asked for among them.
    requests: Arc<RequestBudget>,
}

/// A chunk waiting in the [`Outbox`].
struct Queued {
    hash: Hash,
    /// Pushed (counted in the [`PushBacklog`]), not asked for.
    pushed: bool,
    /// The bytes, when the push brought them (taken when sent).
    bytes: Option<ChunkBytes>,
    /// How many bytes this counts in the backlog's `bytes`.
    held: usize,
    /// Its place in a large file, sent with it when pushed (see [`Place`]).
    place: Option<Place>,
}

impl Outbox {
    fn new(pushed: Arc<PushBacklog>, requests: Arc<RequestBudget>) -> Self {
        Outbox {
            queue: VecDeque::new(),
            queued: ChunkSet::default(),
            queued_total: 0,
            sent_total: 0,
            pushed,
            requests,
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn add(&mut self, items: impl Iterator<Item = Queued>) {
        let mut dropped = Vec::new();
        for item in items {
            if self.queued.insert(item.hash) {
                self.queue.push_back(item);
                self.queued_total += 1;
            } else {
                dropped.push(item);
            }
        }
        self.release(&dropped);
    }

    /// Stops counting `items`, taken off the queue or never put on it: the pushed ones in
    /// the push backlog, the asked-for ones in the peer's request budget.
    fn release(&self, items: &[Queued]) {
        self.pushed.release_queued(items);
        self.requests
            .give_back(items.iter().filter(|q| !q.pushed).count());
    }

    /// Reads chunks from the front of the queue up to one frame's worth and sends them.
    async fn send_frame(
        &mut self,
        inner: &Arc<Inner>,
        peer: ReplicaId,
        sender: &mut dyn FrameSender,
    ) -> Result<(), SessionError> {
        let take = self.queue.len().min(MAX_WANT_HASHES);
        let batch: Vec<Queued> = self.queue.drain(..take).collect();
        let chunks = inner.log.chunks().clone();
        // Read (where not in memory) and encoded off the runtime: a frame is 4 MiB.
        let (payload, done) = tokio::task::spawn_blocking(move || {
            // The chunks that go in this frame: in memory, or found here to read back
            // (`None` until read).
            let mut picked: Vec<(&Queued, Option<ChunkBytes>)> = Vec::new();
            let mut found = Vec::new();
            let mut bytes = 0;
            let mut done = 0;
            for queued in &batch {
                let at = match &queued.bytes {
                    Some(_) => None,
                    None => match chunks.find(&queued.hash) {
                        Ok(Some(at)) => Some(at),
                        // A chunk this replica does not have (or cannot read) is left
                        // out: the peer asks again, and the next request finds it once
                        // it is here.
                        _ => {
                            done += 1;
                            continue;
                        }
                    },
                };
                let len = match (&queued.bytes, &at) {
                    (Some(data), _) => data.len(),
                    (None, Some(at)) => at.len(),
                    (None, None) => 0,
                };
                // A chunk that would take the frame past its size waits for the next
                // frame, alone if need be: added to a frame nearly full, a large one
                // (a source's own chunking, or a peer's) went over the transport's limit,
                // which ended the session each time the chunk was asked for.
                if bytes > 0 && bytes + len > CHUNKS_FRAME_BYTES {
                    break;
                }
                done += 1;
                bytes += len;
                match at {
                    None => picked.push((queued, queued.bytes.clone())),
                    Some(at) => {
                        found.push((queued.hash, at));
                        picked.push((queued, None));
                    }
                }
            }
            // Read together (a large file's chunks lie one after another), in the order
            // found, which is the order picked.
            let mut read = chunks.read_found(&found).into_iter();
            let picked: Vec<(Hash, ChunkBytes, Option<Place>)> = picked
                .into_iter()
                .filter_map(|(queued, data)| {
                    let data = match data {
                        Some(data) => data,
                        None => read.next()?.ok()?,
                    };
                    Some((queued.hash, data, queued.place))
                })
                .collect();
            let payload = (!picked.is_empty()).then(|| ChunksFrame::encode(picked));
            (payload, (batch, done))
        })
        .await
        .map_err(|e| violation("self", e.to_string()))?;
        let (mut batch, done) = done;
        for item in batch.drain(done..).rev() {
            self.queue.push_front(item);
        }
        self.sent_total += done as u64;
        for item in &batch {
            self.queued.remove(&item.hash);
        }
        self.release(&batch);
        if self.queue.is_empty() {
            self.queue.shrink_to(1024);
            self.queued.shrink_to(1024);
        }
        if let Some(payload) = payload {
            let frame = payload.map_err(|e| violation("self", e.to_string()))?;
            let len = frame.len() as u64 + codec::FRAME_HEADER_LEN as u64;
            sender.send_chunks(frame).await?;
            inner.count_sent(&peer, len);
        }
        Ok(())
    }
}

/// How long to wait before the `attempt`-th redial (exponential, capped).
pub(crate) fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max)
}
