//! SyncEngine: owns the log, the plugins, the peer sessions and the background tasks.
//!
//! Start-up order matters (DESIGN §3): every store first re-applies what it had not
//! finished before a crash, then sources start (so a half-written file is repaired, not
//! mistaken for a local edit), then the network. A store that cannot catch up at start (a
//! full disk, a mirror's disk not mounted) keeps its cursor and is tried again by its own
//! loop, its error shown: it does not keep the replica from starting.
//!
//! Nothing that fails is fatal to the replica: it is tried again, and shown while it
//! lasts. A source that fails is started again after a growing pause, and shows as down,
//! with its error, until it has scanned again ([`SyncEngine::sources`]). A store whose
//! batch fails keeps its cursor, shows the error ([`SubscriberStatus::error`]) and is
//! tried again. Remote events whose append failed stay queued and are tried again after a
//! growing pause ([`SyncEngine::applier_error`]). A peer session that fails once it is up
//! (a lost connection, a timeout, what the peer sent not storable here, as on a full data
//! dir) is counted with its error ([`PeerStatus::failed_sessions`],
//! [`PeerStatus::last_error`]); a dial that fails is not, the peer shows as not connected
//! (with the reason in `last_error` when the peer was reached but a session was refused,
//! by either side, or it answered as another peer). A dial loop starts its pause over only
//! after a session that ran.
//!
//! Metrics leave the engine as typed [`EngineEvent`]s through an [`Observer`], so the
//! engine depends on no metrics crate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge_api::{ConflictPolicy, Event, Hash, Head, Key, Message, ReplicaId, VersionVector};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::content::{Ask, ChunkMap, ChunkSet, FreshChunk, Missing};
use crate::error::LogError;
use crate::log::EventLog;
use crate::pending::PendingQueue;
use crate::planner::SyncPlanner;
use crate::plugin::{ScanProgress, Source, SourceContext, Store, StoreContext, Transport};
use crate::protocol::{backoff, run_session, Control, Ended, PushBacklog, Pushed, SessionError};
use crate::reconciler::Reconciler;

/// A peer this replica syncs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its replica ID; a connection claiming another ID is refused.
    pub id: ReplicaId,
    /// Where to dial it; `None` to only accept its connections.
    pub address: Option<String>,
}

/// Tunables of the engine; the defaults suit a real network.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The peers; only these may connect.
    pub peers: Vec<PeerConfig>,
    /// Send a ping after this long without one.
    pub keepalive_interval: Duration,
    /// End a session when nothing arrives for this long.
    pub keepalive_timeout: Duration,
    /// End a connection whose `Hello` does not arrive within this.
    pub handshake_timeout: Duration,
    /// How often sessions check for lost frames and the applier re-requests content.
    pub tick_interval: Duration,
    /// First and longest wait between dials of an unreachable peer.
    pub dial_backoff: (Duration, Duration),
    /// Most events read and sent per batch.
    pub max_batch_events: usize,
    /// Most remote events held back waiting for a gap or content.
    pub max_pending_events: usize,
    /// Most chunk hashes requested from one peer and not yet answered.
    pub chunk_window: usize,
    /// Re-request a chunk that has not arrived after this long.
    pub chunk_timeout: Duration,
    /// Push chunks put locally to connected peers as they are stored, before the events
    /// naming them exist, instead of waiting for the peers to ask (a large file streams
    /// while it is chunked). A peer that already holds them receives them anyway.
    pub push_fresh_chunks: bool,
    /// Most bytes of pushed chunks one session may hold in memory, waiting to be sent,
    /// counted as the buffers they keep alive (a chunk cut from a larger buffer holds all
    /// of it until sent); beyond it fresh chunks are queued as hashes and read back from
    /// the pack when sent.
    pub push_memory_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            peers: Vec::new(),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(45),
            handshake_timeout: Duration::from_secs(10),
            tick_interval: Duration::from_millis(1000),
            dial_backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            max_batch_events: 4096,
            max_pending_events: 200_000,
            chunk_window: 2048,
            chunk_timeout: Duration::from_secs(20),
            push_fresh_chunks: true,
            push_memory_bytes: 32 << 20,
        }
    }
}

/// A failure to start or drive the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A store could not catch up at start.
    #[error(transparent)]
    Plugin(#[from] crate::error::PluginError),
    /// The peer is not connected.
    #[error("peer {0} is not connected")]
    NotConnected(String),
    /// No store subscriber has that name.
    #[error("no subscriber named {0:?}")]
    UnknownSubscriber(String),
    /// A replay of that subscriber is already running.
    #[error("subscriber {0:?} is already replaying")]
    ReplayInProgress(String),
    /// A replay may not start past the end of the log.
    #[error("replay from offset {from} is past the end of the log ({len})")]
    ReplayPastEnd {
        /// The offset asked for.
        from: u64,
        /// The log's length.
        len: u64,
    },
    /// The engine was already started.
    #[error("the engine is already running")]
    AlreadyStarted,
}

/// What the engine knows about one peer, for status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's replica ID.
    pub id: ReplicaId,
    /// Its configured address.
    pub address: Option<String>,
    /// Whether a session is up.
    pub connected: bool,
    /// The address of the current connection.
    pub remote: Option<String>,
    /// What it has acknowledged holding.
    pub acked: VersionVector,
    /// Events it lacks that this replica holds.
    pub behind: u64,
    /// Bytes sent to it and received from it (all sessions).
    pub sent_bytes: u64,
    /// Bytes received from it.
    pub received_bytes: u64,
    /// Events sent to it.
    pub events_sent: u64,
    /// Events received from it.
    pub events_received: u64,
    /// Sessions with it that ended with an error (a lost connection, a timeout, a
    /// protocol violation, or this replica failing to store what it sent, such as on a
    /// full disk). A dial that fails is not counted: the peer shows as not connected.
    pub failed_sessions: u64,
    /// Why the last failed session failed; cleared when a session that lasted ends cleanly or once a
    /// later one has been up for `SESSION_ERROR_SHOWN` (a minute).
    pub last_error: Option<String>,
}

/// How long a session must stay up before the error that ended the one before it is no
/// longer shown in [`PeerStatus::last_error`].
pub const SESSION_ERROR_SHOWN: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct PeerState {
    address: Option<String>,
    session: Option<SessionSlot>,
    acked: VersionVector,
    sent_bytes: u64,
    received_bytes: u64,
    events_sent: u64,
    events_received: u64,
    failed_sessions: u64,
    last_error: Option<String>,
    /// The session error last logged as a warning, when, and how many sessions ended with
    /// it since without a warning (see [`Inner::unregister`]).
    warned: Option<(String, Instant, u64)>,
}

/// How long the same error ending sessions with a peer is logged at debug after the
/// warning that named it: a cause that lasts (a full disk, say) ends a session every few
/// seconds, and one warning a minute, with the count, says as much.
const SESSION_ERROR_WARNED: Duration = Duration::from_secs(60);

/// Whether to warn of `error`, which ended a session at `now`, given the error `warned`
/// of last (updated): `None` while the same error repeats within
/// [`SESSION_ERROR_WARNED`] of its warning, else the number of sessions it ended since
/// that warning without one. Errors that differ only in their numbers are the same
/// error (see [`error_shape`]).
fn warn_of(warned: &mut Option<(String, Instant, u64)>, error: &str, now: Instant) -> Option<u64> {
    let warn = match warned {
        Some((last, at, repeats)) if error_shape(last).eq(error_shape(error)) => {
            if now.saturating_duration_since(*at) < SESSION_ERROR_WARNED {
                *repeats += 1;
                return None;
            }
            Some(*repeats)
        }
        _ => Some(0),
    };
    *warned = Some((error.to_owned(), now, 0));
    warn
}

/// `error` with each run of digits taken as one placeholder: a lasting cause names a new
/// pack file, a new byte count or a new port with every session it ends ("writing
/// pack-00000002: No space left on device", then "pack-00000003"), and is still the same
/// cause.
fn error_shape(error: &str) -> impl Iterator<Item = char> + '_ {
    let mut chars = error.chars().peekable();
    std::iter::from_fn(move || {
        let c = chars.next()?;
        if c.is_ascii_digit() {
            while chars.next_if(char::is_ascii_digit).is_some() {}
            return Some('#');
        }
        Some(c)
    })
}

#[derive(Debug)]
struct SessionSlot {
    generation: u64,
    dialed_by_me: bool,
    remote: String,
    control: mpsc::UnboundedSender<Control>,
    /// Pushed chunks the session has not sent yet.
    pushed: Arc<PushBacklog>,
    /// When the session was registered.
    since: Instant,
}

/// First pause before a failed source is started again; it doubles with each failure.
const SOURCE_RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest pause before a failed source is started again; a source that ran longer than
/// this before failing starts over from the first.
const SOURCE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Most pushed chunk hashes a session may have waiting (1 GiB of data at the average
/// chunk size); beyond it fresh chunks are not pushed to that peer, which asks for them
/// once their events arrive.
const PUSH_BACKLOG: usize = 1 << 16;

/// What each of `fresh` keeps alive in memory while it waits to be pushed: its own bytes,
/// and for the last of a run of chunks cut from one buffer, the rest of that buffer too,
/// which stays whole until that last one is sent. So a batch counts the buffers it holds,
/// not only its chunks' bytes (a scan's gathered 256 KiB of small files, say, of which a
/// few chunks were already stored).
fn memory_shares(fresh: &[FreshChunk]) -> Vec<usize> {
    let mut shares: Vec<usize> = fresh.iter().map(|c| c.bytes.len()).collect();
    let mut start = 0;
    for end in 1..=fresh.len() {
        let run_ends = fresh
            .get(end)
            .is_none_or(|next| !next.bytes.same_buffer(&fresh[start].bytes));
        if run_ends {
            let in_run: usize = shares[start..end].iter().sum();
            let rest = fresh[start].bytes.buffer_len().saturating_sub(in_run);
            shares[end - 1] += rest;
            start = end;
        }
    }
    shares
}

/// Where appended events came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOrigin {
    /// Written by a local source.
    Local,
    /// Received from a peer.
    Remote,
}

impl AppendOrigin {
    /// The metric label: `local` or `remote`.
    pub fn label(self) -> &'static str {
        match self {
            AppendOrigin::Local => "local",
            AppendOrigin::Remote => "remote",
        }
    }
}

/// Something that happened in the engine, for metrics and logs (one variant per kind of
/// happening, in the style of Vector's internal events).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum EngineEvent<'a> {
    /// A batch of events became durable in the log.
    Appended {
        /// Local or remote.
        origin: AppendOrigin,
        /// How many events.
        events: u64,
        /// From the request to the acknowledgement (group commit and flush included).
        duration: Duration,
    },
    /// A store made a batch durable (or several, shown before one sync: see
    /// [`Store::splits_sync`]) and advanced its cursor past them.
    Applied {
        /// The subscriber's name.
        subscriber: &'a str,
        /// Events the batch (or batches) covered.
        events: u64,
        /// Keys with more than one head among them.
        conflicts: u64,
        /// The conflict policy that resolved them.
        policy: &'a str,
        /// From reading the batch to the durable cursor.
        duration: Duration,
    },
}

/// Receives [`EngineEvent`]s; the admin API turns them into Prometheus metrics. Called on
/// hot paths: keep it cheap and non-blocking.
pub trait Observer: Send + Sync {
    /// Records one happening.
    fn observe(&self, event: &EngineEvent<'_>);
}

/// A plugin as status pages show it: a built-in one, a library loaded at start, or a
/// library that was refused (the daemon keeps running without it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginInfo {
    /// Its name (for a refused library, the file name).
    pub name: String,
    /// `source`, `store`, `transport` or `policy`.
    pub role: String,
    /// The library it was loaded from, for dynamically loaded plugins.
    pub library: Option<std::path::PathBuf>,
    /// Why it was refused, if it was.
    pub error: Option<String>,
}

impl PluginInfo {
    fn builtin(name: &str, role: &str) -> Self {
        PluginInfo {
            name: name.to_owned(),
            role: role.to_owned(),
            library: None,
            error: None,
        }
    }
}

/// A store subscriber as status pages show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberStatus {
    /// Its name (also its cursor's name).
    pub name: String,
    /// The next offset it will process.
    pub cursor: u64,
    /// Durable events it has not processed yet.
    pub lag: u64,
    /// Events applied since the engine started.
    pub applied: u64,
    /// Whether a replay is running (until the cursor reaches the end it had when asked).
    pub replaying: bool,
    /// Keys it could not show, tried again (see [`Store::failed`]).
    pub failed: u64,
    /// Why its last batch failed, until a batch succeeds (the batch waits and is tried
    /// again: a full disk, a folder without its marker).
    pub error: Option<String>,
}

/// A source as status pages show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStatus {
    /// Its name.
    pub name: String,
    /// False from a failure until the source, started again, has finished its start-up
    /// scan (or, for one that does not scan at start, has been started again).
    pub up: bool,
    /// Times it failed since the engine started.
    pub failures: u64,
    /// Why it last failed, while it is not up.
    pub error: Option<String>,
}

struct SourceSlot {
    name: String,
    /// Shared with the source's context, which sets it when a start-up scan is done.
    up: Arc<std::sync::atomic::AtomicBool>,
    failures: std::sync::atomic::AtomicU64,
    error: Mutex<Option<String>>,
}

impl SourceSlot {
    fn new(name: &str) -> Self {
        SourceSlot {
            name: name.to_owned(),
            up: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            failures: std::sync::atomic::AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }
}

struct StoreSlot {
    name: String,
    /// A rewind asked for and not yet taken up by the store's loop.
    replay_request: Mutex<Option<u64>>,
    /// While replaying: the log length to reach.
    replaying_until: Mutex<Option<u64>>,
    wake: tokio::sync::Notify,
    applied: std::sync::atomic::AtomicU64,
    /// The store's [`Store::failed`] after its last batch or retry.
    failed: std::sync::atomic::AtomicU64,
    /// Why its last batch failed, until one succeeds.
    error: Mutex<Option<String>>,
    /// Batches shown and not yet synced (see [`Store::show`]), ahead of the cursor.
    unsynced: Mutex<Option<Unsynced>>,
}

impl StoreSlot {
    fn new(name: &str) -> Self {
        StoreSlot {
            name: name.to_owned(),
            replay_request: Mutex::new(None),
            replaying_until: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            applied: std::sync::atomic::AtomicU64::new(0),
            failed: std::sync::atomic::AtomicU64::new(0),
            error: Mutex::new(None),
            unsynced: Mutex::new(None),
        }
    }

    /// Forgets the batches shown ahead of the cursor: the next batch is read from the
    /// cursor again (after a failure, they come again).
    fn forget_unsynced(&self) {
        if let Ok(mut unsynced) = self.unsynced.lock() {
            *unsynced = None;
        }
    }
}

/// Batches a store showed and did not sync yet (see [`Store::show`]).
#[derive(Clone, Copy, Debug)]
struct Unsynced {
    /// The log offset after the last of them: where the cursor goes once they are synced,
    /// and where the next batch starts.
    to: u64,
    /// Their events.
    events: u64,
    /// Their conflicted keys.
    conflicts: u64,
    /// When the first of them was read.
    since: Instant,
}

/// The most events a store shows ahead of its cursor before it syncs: what a crash makes
/// it show again.
const UNSYNCED_EVENTS_MAX: u64 = 32_768;
/// The longest a store shows batches without a sync, however many events wait.
const UNSYNCED_FOR_MAX: Duration = Duration::from_secs(1);

/// What the applier task is told by sessions.
#[derive(Debug)]
pub(crate) enum Inbound {
    Events { from: ReplicaId, batch: Vec<Event> },
    Chunks { from: ReplicaId, hashes: Vec<Hash> },
}

/// Counters the admin API turns into metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Events applied by stores.
    pub applied: std::sync::atomic::AtomicU64,
    /// Views with more than one head handed to stores.
    pub conflicts: std::sync::atomic::AtomicU64,
    /// Events waiting in the pending queue (last seen).
    pub pending: std::sync::atomic::AtomicU64,
    /// Why the last append of remote events failed, while they wait to be tried again
    /// (`None` once an append works). See [`SyncEngine::applier_error`].
    applier_error: Mutex<Option<String>>,
}

pub(crate) struct Inner {
    pub(crate) log: EventLog,
    pub(crate) config: EngineConfig,
    pub(crate) inbound: mpsc::Sender<Inbound>,
    pub(crate) shutdown: watch::Sender<bool>,
    reconciler: Reconciler,
    peers: Mutex<HashMap<ReplicaId, PeerState>>,
    peers_changed: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    progress: watch::Sender<ScanProgress>,
    next_generation: std::sync::atomic::AtomicU64,
    stats: EngineStats,
    stores: Vec<Arc<StoreSlot>>,
    sources: Vec<Arc<SourceSlot>>,
    plugins: Vec<PluginInfo>,
    pub(crate) observer: Option<Arc<dyn Observer>>,
}

impl Inner {
    pub(crate) fn is_known_peer(&self, id: &ReplicaId) -> bool {
        self.config.peers.iter().any(|p| p.id == *id)
    }

    /// Registers a session with `peer`; `None` if an existing one is kept instead. Of two
    /// connections dialed by different sides, both replicas keep the one dialed by the
    /// smaller replica ID, so simultaneous dials settle on the same connection.
    pub(crate) fn register(
        &self,
        peer: ReplicaId,
        dialed: bool,
        remote: &str,
        control: mpsc::UnboundedSender<Control>,
        pushed: Arc<PushBacklog>,
        hello_vv: &VersionVector,
    ) -> Option<u64> {
        if *self.paused.borrow() {
            return None;
        }
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let me = self.log.replica();
        let mut peers = self.peers.lock().ok()?;
        let state = peers.entry(peer).or_default();
        if let Some(old) = &state.session {
            let min_dialer_is_me = me < peer;
            let keep_new = old.dialed_by_me == dialed || dialed == min_dialer_is_me;
            if !keep_new {
                return None;
            }
            let _ = old.control.send(Control::Close);
        }
        state.session = Some(SessionSlot {
            generation,
            dialed_by_me: dialed,
            remote: remote.to_owned(),
            control,
            pushed,
            since: Instant::now(),
        });
        state.acked = hello_vv.clone();
        drop(peers);
        self.peers_changed.send_modify(|g| *g += 1);
        Some(generation)
    }

    /// What stores read while applying: the log, and the conflict policy.
    fn store_context(&self) -> StoreContext {
        StoreContext::new(self.log.clone()).with_reconciler(self.reconciler.clone())
    }

    /// Forgets the session `generation` with `peer`, which ended with `error` if it
    /// failed. Returns whether to log that error as a warning and, if so, how many
    /// sessions the same error ended since its last warning: `None` while it repeats
    /// within [`SESSION_ERROR_WARNED`] of that warning (log it at debug).
    pub(crate) fn unregister(
        &self,
        peer: &ReplicaId,
        generation: u64,
        error: Option<String>,
    ) -> Option<u64> {
        let mut warn = Some(0);
        if let Ok(mut peers) = self.peers.lock() {
            if let Some(state) = peers.get_mut(peer) {
                if let Some(error) = &error {
                    warn = warn_of(&mut state.warned, error, Instant::now());
                }
                let ended = state
                    .session
                    .as_ref()
                    .filter(|s| s.generation == generation)
                    .map(|s| s.since.elapsed());
                if ended.is_some() {
                    state.session = None;
                }
                if error.is_some() {
                    state.failed_sessions += 1;
                    state.last_error = error;
                } else if ended.is_none_or(|lasted| lasted >= QUICK_END) {
                    // A clean end right after the handshake is most likely the peer's
                    // refusal (see `dial_loop`): the reason shown for it stays.
                    state.last_error = None;
                }
            }
        }
        self.peers_changed.send_modify(|g| *g += 1);
        warn
    }

    /// Records why a dial of `peer` reached something that refused, or was refused, a
    /// session (shown in [`PeerStatus::last_error`]; no session was up, so none failed).
    fn refused(&self, peer: &ReplicaId, error: &str) {
        if let Ok(mut peers) = self.peers.lock() {
            if let Some(state) = peers.get_mut(peer) {
                state.last_error = Some(error.to_owned());
            }
        }
    }

    pub(crate) fn observe(&self, event: EngineEvent<'_>) {
        if let Some(o) = &self.observer {
            o.observe(&event);
        }
    }

    fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    pub(crate) fn is_connected(&self, peer: &ReplicaId) -> bool {
        self.peers
            .lock()
            .map(|p| p.get(peer).is_some_and(|s| s.session.is_some()))
            .unwrap_or(false)
    }

    /// The generations of the sessions connected now, by peer.
    fn session_generations(&self) -> HashMap<ReplicaId, u64> {
        self.peers
            .lock()
            .map(|p| {
                p.iter()
                    .filter_map(|(id, s)| s.session.as_ref().map(|s| (*id, s.generation)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn control(&self, peer: &ReplicaId) -> Option<mpsc::UnboundedSender<Control>> {
        self.peers
            .lock()
            .ok()?
            .get(peer)?
            .session
            .as_ref()
            .map(|s| s.control.clone())
    }

    fn with_peer(&self, peer: &ReplicaId, f: impl FnOnce(&mut PeerState)) {
        if let Ok(mut peers) = self.peers.lock() {
            f(peers.entry(*peer).or_default());
        }
    }

    pub(crate) fn record_ack(&self, peer: &ReplicaId, vv: &VersionVector) {
        self.with_peer(peer, |s| s.acked.merge(vv));
    }

    pub(crate) fn acked(&self, peer: &ReplicaId) -> VersionVector {
        self.peers
            .lock()
            .ok()
            .and_then(|p| p.get(peer).map(|s| s.acked.clone()))
            .unwrap_or_default()
    }

    pub(crate) fn count_sent(&self, peer: &ReplicaId, bytes: u64) {
        self.with_peer(peer, |s| s.sent_bytes += bytes);
    }

    pub(crate) fn count_received(&self, peer: &ReplicaId, bytes: u64) {
        self.with_peer(peer, |s| s.received_bytes += bytes);
    }

    pub(crate) fn count_events_sent(&self, peer: &ReplicaId, n: u64) {
        self.with_peer(peer, |s| s.events_sent += n);
    }

    pub(crate) fn count_events_received(&self, peer: &ReplicaId, n: u64) {
        self.with_peer(peer, |s| s.events_received += n);
    }

    /// Queues fresh local chunks on every connected session whose push backlog has room
    /// (the content store's fresh-chunk sink), with their bytes while the session's
    /// backlog in memory has room for them.
    fn push_fresh(&self, fresh: Vec<FreshChunk>) {
        use std::sync::atomic::Ordering;
        let Ok(peers) = self.peers.lock() else {
            return;
        };
        let n = fresh.len();
        let shares = memory_shares(&fresh);
        let size: usize = shares.iter().sum();
        for session in peers.values().filter_map(|p| p.session.as_ref()) {
            let backlog = &session.pushed;
            if backlog.chunks.load(Ordering::Relaxed) + n > PUSH_BACKLOG {
                continue;
            }
            let in_memory =
                backlog.bytes.load(Ordering::Relaxed) + size <= self.config.push_memory_bytes;
            let held = if in_memory { size } else { 0 };
            backlog.hold(n, held);
            let chunks = fresh
                .iter()
                .zip(&shares)
                .map(|(c, &share)| Pushed {
                    hash: c.hash,
                    bytes: in_memory.then(|| c.bytes.clone()),
                    place: c.place,
                    held: if in_memory { share } else { 0 },
                })
                .collect();
            if session.control.send(Control::Push(chunks)).is_err() {
                backlog.release(n, held);
            }
        }
    }

    /// Asks `peer` for `hashes`, in requests of at most `MAX_WANT_HASHES`.
    fn want_chunks(&self, peer: &ReplicaId, hashes: &[Hash]) {
        for part in hashes.chunks(crate::protocol::MAX_WANT_HASHES) {
            self.send_to(
                peer,
                Message::WantChunks {
                    hashes: part.to_vec(),
                },
            );
        }
    }

    fn send_to(&self, peer: &ReplicaId, msg: Message) {
        if let Some(control) = self.control(peer) {
            let _ = control.send(Control::Send(msg));
        }
    }

    fn connected_peers(&self) -> Vec<ReplicaId> {
        self.peers
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|(_, s)| s.session.is_some())
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Builds a [`SyncEngine`]: the log, a policy, plugins and peers.
pub struct EngineBuilder {
    log: EventLog,
    policy: Arc<dyn ConflictPolicy>,
    config: EngineConfig,
    transport: Option<Arc<dyn Transport>>,
    stores: Vec<Arc<dyn Store>>,
    sources: Vec<Arc<dyn Source>>,
    observer: Option<Arc<dyn Observer>>,
    extra_plugins: Vec<PluginInfo>,
}

impl EngineBuilder {
    /// Describes a plugin for status pages (one loaded from a library, or refused).
    pub fn describe_plugin(mut self, info: PluginInfo) -> Self {
        self.extra_plugins.push(info);
        self
    }

    /// Reports [`EngineEvent`]s to `observer` (metrics).
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Replaces the engine's tunables and peers.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Connects to peers over `transport`.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Adds a store subscriber.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.stores.push(store);
        self
    }

    /// Adds a source.
    pub fn source(mut self, source: Arc<dyn Source>) -> Self {
        self.sources.push(source);
        self
    }

    /// Catches every store up with the log, then starts sources, stores, the applier and
    /// the network. Returns once the catch-up is done and everything is running.
    pub async fn start(self) -> Result<SyncEngine, EngineError> {
        let (inbound_tx, inbound_rx) = mpsc::channel(64);
        let slots: Vec<Arc<StoreSlot>> = self
            .stores
            .iter()
            .map(|s| Arc::new(StoreSlot::new(s.name())))
            .collect();
        let source_slots: Vec<Arc<SourceSlot>> = self
            .sources
            .iter()
            .map(|s| Arc::new(SourceSlot::new(s.name())))
            .collect();
        let mut plugins: Vec<PluginInfo> = Vec::new();
        plugins.extend(
            self.sources
                .iter()
                .map(|s| PluginInfo::builtin(s.name(), "source")),
        );
        plugins.extend(
            self.stores
                .iter()
                .map(|s| PluginInfo::builtin(s.name(), "store")),
        );
        if let Some(t) = &self.transport {
            plugins.push(PluginInfo::builtin(t.kind(), "transport"));
        }
        // Libraries loaded (or refused) at start: their entries replace the built-in ones
        // of the same name and role, so a dylib source is shown with its file.
        for extra in self.extra_plugins {
            plugins.retain(|p| !(p.name == extra.name && p.role == extra.role));
            plugins.push(extra);
        }
        let inner = Arc::new(Inner {
            log: self.log.clone(),
            reconciler: Reconciler::new(self.policy),
            config: self.config,
            inbound: inbound_tx,
            shutdown: watch::channel(false).0,
            peers: Mutex::new(HashMap::new()),
            peers_changed: watch::channel(0).0,
            paused: watch::channel(false).0,
            progress: watch::channel(ScanProgress::default()).0,
            next_generation: std::sync::atomic::AtomicU64::new(1),
            stats: EngineStats::default(),
            stores: slots.clone(),
            sources: source_slots.clone(),
            plugins,
            observer: self.observer,
        });
        for peer in &inner.config.peers {
            inner.with_peer(&peer.id, |s| s.address = peer.address.clone());
        }
        if inner.config.push_fresh_chunks {
            // Weak: the store belongs to the log, which `inner` holds.
            let weak = Arc::downgrade(&inner);
            inner
                .log
                .chunks()
                .set_fresh_sink(Some(Box::new(move |hashes| {
                    if let Some(inner) = weak.upgrade() {
                        inner.push_fresh(hashes);
                    }
                })));
        }
        for (store, slot) in self.stores.iter().zip(&slots) {
            store.start(&inner.store_context()).await?;
            // A store that cannot catch up now (a full disk, a mirror's disk not mounted)
            // keeps its cursor and is tried again by its own loop, its error shown: it
            // must not keep the rest of the replica from starting.
            if let Err(e) = catch_up(&inner, store.as_ref(), slot).await {
                tracing::error!(
                    store = store.name(),
                    "catching up at start failed: {e}; tried again"
                );
                if let Ok(mut error) = slot.error.lock() {
                    *error = Some(e.to_string());
                }
            }
        }
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        for (store, slot) in self.stores.into_iter().zip(slots) {
            tasks.push(tokio::spawn(run_store(inner.clone(), store, slot)));
        }
        // Sources that scan at start hold the network back until their scan is done:
        // a remote change applied first could overwrite a local edit made while the
        // daemon was stopped, before the scan recorded it.
        let mut scans: Vec<watch::Receiver<bool>> = Vec::new();
        for (source, slot) in self.sources.into_iter().zip(source_slots) {
            let gate = source.scans_at_start().then(|| {
                let (tx, rx) = watch::channel(false);
                scans.push(rx);
                Arc::new(tx)
            });
            let ctx = SourceContext::new(
                inner.log.clone(),
                inner.shutdown.subscribe(),
                inner.progress.clone(),
            )
            .with_observer(inner.observer.clone())
            .with_scan_gate(gate.clone())
            .with_health(slot.up.clone());
            let mut shutdown = inner.shutdown.subscribe();
            tasks.push(tokio::spawn(async move {
                // A source that fails (a full disk, a folder gone for a while) is started
                // again after a growing pause: it scans at start, so nothing changed in
                // between is lost. One that ends without an error is done.
                let mut failures = 0u32;
                loop {
                    let started = Instant::now();
                    if failures > 0 && gate.is_none() {
                        slot.up.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    let Err(e) = source.run(ctx.clone()).await else {
                        break;
                    };
                    slot.up.store(false, std::sync::atomic::Ordering::Relaxed);
                    slot.failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut error) = slot.error.lock() {
                        *error = Some(e.to_string());
                    }
                    // A failing source, scan or not, must not hold the network back.
                    if let Some(gate) = &gate {
                        gate.send_replace(true);
                    }
                    if started.elapsed() > SOURCE_RETRY_MAX {
                        failures = 0;
                    }
                    failures += 1;
                    let wait = backoff(failures - 1, SOURCE_RETRY_MIN, SOURCE_RETRY_MAX);
                    tracing::error!(
                        source = source.name(),
                        "source stopped: {e}; starting it again in {wait:?} (failure {failures})"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {},
                        _ = until(&mut shutdown, true) => break,
                    }
                }
                if let Some(gate) = gate {
                    gate.send_replace(true);
                }
            }));
        }
        tasks.push(tokio::spawn(run_applier(inner.clone(), inbound_rx)));
        if let Some(transport) = self.transport {
            let network = inner.clone();
            tasks.push(tokio::spawn(async move {
                let mut shutdown = network.shutdown.subscribe();
                for mut scan in scans {
                    tokio::select! {
                        _ = until(&mut scan, true) => {},
                        _ = until(&mut shutdown, true) => return,
                    }
                }
                let mut loops = tokio::task::JoinSet::new();
                loops.spawn(accept_loop(network.clone(), transport.clone()));
                for peer in network.config.peers.clone() {
                    if let Some(address) = peer.address {
                        loops.spawn(dial_loop(
                            network.clone(),
                            transport.clone(),
                            peer.id,
                            address,
                        ));
                    }
                }
                while loops.join_next().await.is_some() {}
            }));
        }
        Ok(SyncEngine {
            inner,
            tasks: Mutex::new(tasks),
        })
    }
}

/// The running engine of one replica.
pub struct SyncEngine {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for SyncEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncEngine")
            .field("replica", &self.inner.log.replica())
            .finish_non_exhaustive()
    }
}

impl SyncEngine {
    /// Starts describing an engine over `log` with conflict policy `policy`.
    pub fn builder(log: EventLog, policy: Arc<dyn ConflictPolicy>) -> EngineBuilder {
        EngineBuilder {
            log,
            policy,
            config: EngineConfig::default(),
            transport: None,
            stores: Vec::new(),
            sources: Vec::new(),
            observer: None,
            extra_plugins: Vec::new(),
        }
    }

    /// The event log.
    pub fn log(&self) -> &EventLog {
        &self.inner.log
    }

    /// The reconciler (policy) stores are fed through.
    pub fn reconciler(&self) -> &Reconciler {
        &self.inner.reconciler
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    /// Why appending remote events last failed (a full disk, an I/O error), while the
    /// engine waits to try them again; `None` when the last append worked. The events stay
    /// queued meanwhile, and are tried again after a pause that doubles with each failure
    /// (1 s to 60 s), so sync resumes by itself once the cause is gone.
    pub fn applier_error(&self) -> Option<String> {
        self.inner
            .stats
            .applier_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
    }

    /// The sources' scan progress.
    pub fn scan_progress(&self) -> watch::Receiver<ScanProgress> {
        self.inner.progress.subscribe()
    }

    /// Every configured or connected peer.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let local = self.inner.log.version_vector();
        let peers = match self.inner.peers.lock() {
            Ok(p) => p,
            Err(_) => return Vec::new(),
        };
        let mut out: Vec<PeerStatus> = peers
            .iter()
            .map(|(id, s)| PeerStatus {
                id: *id,
                address: s.address.clone(),
                connected: s.session.is_some(),
                remote: s.session.as_ref().map(|x| x.remote.clone()),
                acked: s.acked.clone(),
                behind: SyncPlanner::lag(&local, &s.acked),
                sent_bytes: s.sent_bytes,
                received_bytes: s.received_bytes,
                events_sent: s.events_sent,
                events_received: s.events_received,
                failed_sessions: s.failed_sessions,
                // A session that has stayed up since shows the error is past.
                last_error: s.last_error.clone().filter(|_| {
                    s.session
                        .as_ref()
                        .is_none_or(|x| x.since.elapsed() < SESSION_ERROR_SHOWN)
                }),
            })
            .collect();
        out.sort_by_key(|p| p.id);
        out
    }

    /// The name of the conflict policy in use.
    pub fn policy_name(&self) -> &str {
        self.inner.reconciler.policy_name()
    }

    /// The plugins of this engine: built-in, loaded from libraries, and refused.
    pub fn plugins(&self) -> &[PluginInfo] {
        &self.inner.plugins
    }

    /// Every store subscriber with its cursor and lag.
    pub fn subscribers(&self) -> Result<Vec<SubscriberStatus>, EngineError> {
        let len = self.inner.log.len();
        let mut out = Vec::new();
        for slot in &self.inner.stores {
            let cursor = self.inner.log.cursor(&slot.name)?;
            let replaying = slot
                .replaying_until
                .lock()
                .map(|r| r.is_some())
                .unwrap_or(false)
                || slot
                    .replay_request
                    .lock()
                    .map(|r| r.is_some())
                    .unwrap_or(false);
            out.push(SubscriberStatus {
                name: slot.name.clone(),
                cursor,
                lag: len.saturating_sub(cursor),
                applied: slot.applied.load(std::sync::atomic::Ordering::Relaxed),
                replaying,
                failed: slot.failed.load(std::sync::atomic::Ordering::Relaxed),
                error: slot.error.lock().ok().and_then(|e| e.clone()),
            });
        }
        Ok(out)
    }

    /// The sources: whether each is up, and why it last failed.
    pub fn sources(&self) -> Vec<SourceStatus> {
        self.inner
            .sources
            .iter()
            .map(|slot| {
                let up = slot.up.load(std::sync::atomic::Ordering::Relaxed);
                SourceStatus {
                    name: slot.name.clone(),
                    up,
                    failures: slot.failures.load(std::sync::atomic::Ordering::Relaxed),
                    error: if up {
                        None
                    } else {
                        slot.error.lock().ok().and_then(|e| e.clone())
                    },
                }
            })
            .collect()
    }

    /// Rewinds subscriber `name` to offset `from` and re-applies everything after it
    /// (idempotently: stores apply the current view of each key). The store's own loop
    /// takes the rewind between two batches, so no batch is lost or torn.
    pub fn replay(&self, name: &str, from: u64) -> Result<(), EngineError> {
        let slot = self
            .inner
            .stores
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| EngineError::UnknownSubscriber(name.to_owned()))?;
        let len = self.inner.log.len();
        if from > len {
            return Err(EngineError::ReplayPastEnd { from, len });
        }
        let busy = slot
            .replaying_until
            .lock()
            .map(|r| r.is_some())
            .unwrap_or(true);
        let mut request = slot
            .replay_request
            .lock()
            .map_err(|_| EngineError::ReplayInProgress(name.to_owned()))?;
        if busy || request.is_some() {
            return Err(EngineError::ReplayInProgress(name.to_owned()));
        }
        *request = Some(from);
        drop(request);
        slot.wake.notify_one();
        Ok(())
    }

    /// Folds the whole log into the projection again (see
    /// [`EventLog::rebuild`](crate::log::EventLog::rebuild)).
    pub async fn rebuild(&self) -> Result<u64, EngineError> {
        Ok(self.inner.log.rebuild().await?)
    }

    /// Stops sending and receiving: closes every session and dials no more until resumed.
    pub fn pause(&self) {
        self.inner.paused.send_replace(true);
        for peer in self.inner.connected_peers() {
            if let Some(c) = self.inner.control(&peer) {
                let _ = c.send(Control::Close);
            }
        }
    }

    /// Resumes after [`Self::pause`]; sessions reconnect and catch up.
    pub fn resume(&self) {
        self.inner.paused.send_replace(false);
    }

    /// Whether sync is paused.
    pub fn is_paused(&self) -> bool {
        *self.inner.paused.borrow()
    }

    /// Runs an anti-entropy round with `peer` now: each side re-sends what the other's
    /// version vector says it lacks.
    pub fn sync_now(&self, peer: &ReplicaId) -> Result<(), EngineError> {
        let control = self
            .inner
            .control(peer)
            .ok_or_else(|| EngineError::NotConnected(peer.to_string()))?;
        let acked = self.inner.acked(peer);
        let _ = control.send(Control::Rewind {
            from: acked,
            held: 0,
        });
        let _ = control.send(Control::Send(Message::WantEvents {
            from: self.inner.log.version_vector(),
        }));
        Ok(())
    }

    /// Stops every task, closes sessions and the log. Idempotent.
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        self.inner.shutdown.send_replace(true);
        self.inner.log.chunks().set_fresh_sink(None);
        for peer in self.inner.connected_peers() {
            if let Some(c) = self.inner.control(&peer) {
                let _ = c.send(Control::Close);
            }
        }
        let tasks: Vec<JoinHandle<()>> = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        // Sources and stores finish their current batch; sessions end at once. Ten
        // seconds for all of them, not each.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut late = 0;
        for task in tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                late += 1;
            }
        }
        if late > 0 {
            tracing::warn!("{late} task(s) did not stop within 10 s: the log is closed under them");
        }
        self.inner.log.close().await?;
        Ok(())
    }
}

/// Resolves when the flag behind `rx` equals `value` (or its sender is gone).
pub(crate) async fn until(rx: &mut watch::Receiver<bool>, value: bool) {
    let _ = rx.wait_for(|v| *v == value).await;
}

/// Accepted connections whose handshake is under way, at most: beyond, a new connection
/// is closed at once. Each holds a task and a descriptor until its peer's `Hello` (or the
/// handshake timeout), so that a flood of connections that never say hello would
/// otherwise run the daemon out of descriptors, its peers' connections and its files'
/// with them.
pub const MAX_HANDSHAKES: usize = 64;

/// Accepted connections in their handshake from one host (the address a connection came
/// from, without its port), at most: one host's flood leaves the other hosts' room, so
/// that a peer this replica does not dial (or cannot reach) still gets in.
pub const MAX_HANDSHAKES_PER_HOST: usize = 8;

/// How often, at most, the refusals of connections past the handshake bounds are logged.
const HANDSHAKES_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The handshakes under way on accepted connections (see [`MAX_HANDSHAKES`] and
/// [`MAX_HANDSHAKES_PER_HOST`]).
#[derive(Clone, Default)]
struct Handshakes(Arc<Mutex<UnderWay>>);

/// How many handshakes are under way, in all and from each host.
#[derive(Default)]
struct UnderWay {
    all: usize,
    per_host: HashMap<String, usize>,
}

/// An accepted connection's room among the handshakes under way, given back when dropped:
/// once its peer's `Hello` is accepted, or the connection ends before.
pub(crate) struct HandshakeSlot {
    host: String,
    handshakes: Handshakes,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut under_way = self.handshakes.lock();
        under_way.all = under_way.all.saturating_sub(1);
        if let Some(n) = under_way.per_host.get_mut(&self.host) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                under_way.per_host.remove(&self.host);
            }
        }
    }
}

impl Handshakes {
    /// The counts, locked; a panic while they were held leaves them valid.
    fn lock(&self) -> std::sync::MutexGuard<'_, UnderWay> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Room for a handshake with a connection from `remote`, unless a bound is reached.
    fn enter(&self, remote: &str) -> Option<HandshakeSlot> {
        let host = host_of(remote).to_owned();
        let mut under_way = self.lock();
        let from_host = under_way.per_host.get(&host).copied().unwrap_or(0);
        if under_way.all >= MAX_HANDSHAKES || from_host >= MAX_HANDSHAKES_PER_HOST {
            return None;
        }
        under_way.all += 1;
        *under_way.per_host.entry(host.clone()).or_default() += 1;
        drop(under_way);
        Some(HandshakeSlot {
            host,
            handshakes: self.clone(),
        })
    }
}

/// The host part of a transport's `remote` address: `HOST:PORT` (`[V6]:PORT` too) without
/// its port; an address of another form is taken whole.
fn host_of(remote: &str) -> &str {
    match remote.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => remote,
    }
}

async fn accept_loop(inner: Arc<Inner>, transport: Arc<dyn Transport>) {
    let mut shutdown = inner.shutdown.subscribe();
    let handshakes = Handshakes::default();
    // Connections refused since the last warning, and when that was.
    let (mut refused, mut warned): (u64, Option<Instant>) = (0, None);
    loop {
        let conn = tokio::select! {
            c = transport.accept() => c,
            _ = crate::engine::until(&mut shutdown, true) => return,
        };
        match conn {
            Ok(conn) if !inner.is_paused() => {
                let Some(handshake) = handshakes.enter(&conn.remote) else {
                    // Dropping the connection closes it.
                    refused += 1;
                    if warned.is_none_or(|at| at.elapsed() >= HANDSHAKES_WARNING_EVERY) {
                        tracing::warn!(
                            "closing incoming connections ({refused} since the last warning, \
                             the last from {}): {MAX_HANDSHAKES} handshakes are under way, or \
                             {MAX_HANDSHAKES_PER_HOST} from that host",
                            conn.remote
                        );
                        (refused, warned) = (0, Some(Instant::now()));
                    }
                    continue;
                };
                if refused > 0 {
                    tracing::warn!(
                        "closed {refused} more incoming connections past the handshake bounds"
                    );
                    refused = 0;
                }
                let inner = inner.clone();
                tokio::spawn(async move {
                    let mut shutdown = inner.shutdown.subscribe();
                    tokio::select! {
                        r = run_session(inner.clone(), conn, None, Some(handshake)) => if let Err(e) = r {
                            tracing::warn!("incoming connection: {e}");
                        },
                        _ = crate::engine::until(&mut shutdown, true) => {}
                    }
                });
            }
            Ok(_) => {} // paused: dropping the connection closes it
            Err(e) => {
                tracing::warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn dial_loop(
    inner: Arc<Inner>,
    transport: Arc<dyn Transport>,
    peer: ReplicaId,
    address: String,
) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut paused = inner.paused.subscribe();
    let mut changed = inner.peers_changed.subscribe();
    let (min, max) = inner.config.dial_backoff;
    let mut attempt = 0u32;
    // The last refusal warned of: the same one again, every backoff, is logged at debug.
    let mut warned: Option<String> = None;
    loop {
        let stopping = *shutdown.borrow();
        if stopping {
            return;
        }
        let is_paused = *paused.borrow();
        if is_paused {
            tokio::select! {
                _ = crate::engine::until(&mut paused, false) => {},
                _ = crate::engine::until(&mut shutdown, true) => return,
            }
            continue;
        }
        if inner.is_connected(&peer) {
            tokio::select! {
                _ = changed.changed() => {},
                _ = crate::engine::until(&mut shutdown, true) => return,
            }
            continue;
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            c = transport.dial(&address) => match c {
                Ok(conn) => run_session(inner.clone(), conn, Some(peer), None)
                    .await
                    .map_err(Some),
                Err(e) => {
                    tracing::debug!(peer = %peer.short(), %address, "dial: {e}");
                    Err(None)
                }
            },
            _ = crate::engine::until(&mut shutdown, true) => return,
        };
        let lasted = started.elapsed();
        // Reached, but no session: refused by this side, or by the peer, which reads
        // this side's hello and closes (after a handshake of its own, since each side
        // sends its hello first; the reason is in its log). Unlike an unreachable peer,
        // that needs the user: shown in the peer's status, and logged once per reason
        // (a warning when this side refused).
        let refusal = match &outcome {
            Err(Some(e @ (SessionError::Refused { .. } | SessionError::Violation { .. }))) => {
                Some((e.to_string(), tracing::Level::WARN))
            }
            Err(Some(e)) => {
                tracing::debug!(peer = %peer.short(), %address, "dial: {e}");
                None
            }
            Ok(Ended::ClosedBeforeHello) => Some((
                "closed the connection before its hello: it is paused or stopping".to_owned(),
                tracing::Level::INFO,
            )),
            Ok(Ended::Ran) if lasted < QUICK_END && !session_follows(&inner, &peer).await => {
                Some((
                    "ended the session right after the handshake: it may not list this \
                     replica as a peer, or it refused to sync with it (its log says why)"
                        .to_owned(),
                    tracing::Level::INFO,
                ))
            }
            Ok(Ended::Ran) => {
                warned = None;
                None
            }
            _ => None,
        };
        if let Some((shown, level)) = refusal {
            inner.refused(&peer, &shown);
            if warned.as_ref() != Some(&shown) {
                if level == tracing::Level::WARN {
                    tracing::warn!(peer = %peer.short(), %address, "dialing: {shown}");
                } else {
                    tracing::info!(peer = %peer.short(), %address, "dialing: {shown}");
                }
                warned = Some(shown);
            }
        }
        // The pause starts over after a session that lasted, and after one given up for
        // another session with the peer (which is there, and well); anything shorter, a
        // refusal above all, makes it grow.
        attempt = if lasted > max || matches!(outcome, Ok(Ended::Superseded)) {
            0
        } else {
            attempt + 1
        };
        let wait = backoff(attempt, min, max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            _ = crate::engine::until(&mut shutdown, true) => return,
        }
    }
}

/// A session shorter than this that ends cleanly, with no other session to the peer
/// following within half a second, was most likely refused by the peer (see `dial_loop`).
const QUICK_END: Duration = Duration::from_secs(2);

/// Whether a session with `peer` is up within half a second: the peer may have closed a
/// connection for another it kept (simultaneous dials), which this side registers a
/// moment later.
async fn session_follows(inner: &Inner, peer: &ReplicaId) -> bool {
    let mut changed = inner.peers_changed.subscribe();
    let up = async {
        while !inner.is_connected(peer) {
            if changed.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(500), up)
        .await
        .is_ok()
        && inner.is_connected(peer)
}

/// A chunk the applier asked for: of whom, over which session, when, and for which
/// content.
#[derive(Clone, Copy, Debug)]
struct Asked {
    /// The peer asked.
    peer: ReplicaId,
    /// The generation of its session then: an answer cannot come over a later one.
    generation: Option<u64>,
    /// When.
    at: Instant,
    /// The root of the content the chunk is part of.
    root: Hash,
    /// The content's turn when asked (see [`Turns`]).
    turn: usize,
}

/// Chunks the applier asked for and has not received, by hash.
type Requested = ChunkMap<Asked>;

/// For each content whose chunks a peer let time out, how many times that happened: its
/// chunks are asked of the next connected peer in turn (see [`peer_to_ask`]). A relay
/// whose copy of a chunk is damaged, or which dropped it, never answers for it; the turn
/// moves on to a peer that may hold it, the event's origin among them.
type Turns = ChunkMap<usize>;

/// The applier's tick over its requests (`now`: the tick's time). A request is dropped,
/// to be asked again by the next pass, when it was made over a session that has ended
/// since (replaced by another after simultaneous dials, or lost: the answer will not
/// come), or when it is `timeout` old. A request that timed out over a live session, of a
/// peer that delivered no chunk within `timeout` either, moves its content's turn on
/// (see [`Turns`]): that peer does not have the chunk, or not intact, and the next one in
/// turn is asked. A peer still delivering is slow, not lacking: asked again, same turn.
/// A content's turn moves once a tick, and only by requests of the turn it is at (those
/// of an earlier turn timing out late say nothing of the peer asked now). Peers that
/// delivered nothing within `timeout` are forgotten from `delivered`. Returns the
/// contents whose turn moved, with the peer that let them time out.
fn expire_requests(
    requested: &mut Requested,
    delivered: &mut HashMap<ReplicaId, Instant>,
    turns: &mut Turns,
    sessions: &HashMap<ReplicaId, u64>,
    timeout: Duration,
    now: Instant,
) -> ChunkMap<ReplicaId> {
    let within = |at: &Instant| now.saturating_duration_since(*at) < timeout;
    let mut timed_out: ChunkMap<ReplicaId> = ChunkMap::default();
    requested.retain(|_, asked| {
        if sessions.get(&asked.peer) != asked.generation.as_ref() {
            return false;
        }
        if within(&asked.at) {
            return true;
        }
        let delivering = delivered.get(&asked.peer).is_some_and(within);
        let current = turns.get(&asked.root).copied().unwrap_or(0);
        if !delivering && asked.turn == current {
            timed_out.insert(asked.root, asked.peer);
        }
        false
    });
    delivered.retain(|_, at| within(at));
    for root in timed_out.keys() {
        *turns.entry(*root).or_default() += 1;
    }
    timed_out
}

/// The peer to ask for the chunks of a content that `from` sent, at `turn`: `from` first
/// while it is connected, then each other connected peer in the order of their IDs, and
/// round again.
/// `connected` is sorted. Called for every pending event of every pass: it allocates
/// nothing, and at turn 0 with the sender connected (nearly always) looks no further.
fn peer_to_ask(from: ReplicaId, connected: &[ReplicaId], turn: usize) -> ReplicaId {
    let has_from = connected.binary_search(&from).is_ok();
    let n = connected.len();
    if n == 0 {
        return from;
    }
    if !has_from {
        return connected[turn % n];
    }
    match turn % n {
        0 => from,
        t => connected
            .iter()
            .copied()
            .filter(|p| *p != from)
            .nth(t - 1)
            .unwrap_or(from),
    }
}

/// The applier: owns the pending queue; appends remote events once they continue their
/// origin's sequence and their content is complete; asks peers for missing chunks.
async fn run_applier(inner: Arc<Inner>, mut inbound: mpsc::Receiver<Inbound>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut queue = PendingQueue::new(inner.config.max_pending_events);
    let mut requested = Requested::default();
    let mut turns = Turns::default();
    // When each peer last delivered chunks: one still delivering is slow, not lacking.
    let mut delivered: HashMap<ReplicaId, Instant> = HashMap::new();
    // What each pending content still lacks, by root, kept between passes.
    let mut missing: ChunkMap<Missing> = ChunkMap::default();
    let mut tick = tokio::time::interval(inner.config.tick_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a failed append: when to try again, and the pause after the next failure.
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut retry_pause = APPEND_RETRY_MIN;
    loop {
        let mut ack_to: Vec<ReplicaId> = Vec::new();
        let mut on_tick = false;
        tokio::select! {
            msg = inbound.recv() => match msg {
                Some(Inbound::Events { from, batch }) => {
                    let held = inner.log.version_vector();
                    for event in batch {
                        queue.insert(event, from, &held);
                    }
                    ack_to.push(from);
                }
                Some(Inbound::Chunks { from, hashes }) => {
                    delivered.insert(from, Instant::now());
                    for h in &hashes {
                        requested.remove(h);
                    }
                }
                None => return,
            },
            _ = tick.tick() => on_tick = true,
            _ = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = crate::engine::until(&mut shutdown, true) => return,
        }
        // Take whatever else is already waiting, so one pass serves many messages.
        while let Ok(msg) = inbound.try_recv() {
            match msg {
                Inbound::Events { from, batch } => {
                    let held = inner.log.version_vector();
                    for event in batch {
                        queue.insert(event, from, &held);
                    }
                    if !ack_to.contains(&from) {
                        ack_to.push(from);
                    }
                }
                Inbound::Chunks { from, hashes } => {
                    delivered.insert(from, Instant::now());
                    for h in &hashes {
                        requested.remove(h);
                    }
                }
            }
        }
        if on_tick {
            let timeout = inner.config.chunk_timeout;
            let sessions = inner.session_generations();
            let moved = expire_requests(
                &mut requested,
                &mut delivered,
                &mut turns,
                &sessions,
                timeout,
                Instant::now(),
            );
            for (root, peer) in moved {
                let turn = turns.get(&root).copied().unwrap_or(0);
                tracing::debug!(
                    "{peer} did not send chunks of {root} within {timeout:?}: asking the next peer (turn {turn})"
                );
            }
        }
        if retry_at.is_none_or(|at| tokio::time::Instant::now() >= at) {
            let (q, outcome) =
                advance(&inner, queue, &mut requested, &mut missing, &mut turns).await;
            queue = q;
            let error = match outcome {
                Ok(()) => {
                    (retry_at, retry_pause) = (None, APPEND_RETRY_MIN);
                    None
                }
                Err(PassError::Log(LogError::Closed)) => {
                    if !*shutdown.borrow() {
                        tracing::error!("the log is closed: remote events are no longer applied");
                        if let Ok(mut slot) = inner.stats.applier_error.lock() {
                            *slot = Some(LogError::Closed.to_string());
                        }
                    }
                    return;
                }
                Err(e) => {
                    // The events stay queued (what Acks report as received). A full disk
                    // or an I/O error may pass: try again after a growing pause rather
                    // than stop applying remote events until a restart. (An error of the
                    // database itself does not pass: sled fails every later write.)
                    tracing::error!(
                        "appending remote events failed, trying again in {retry_pause:?}: {e}"
                    );
                    retry_at = Some(tokio::time::Instant::now() + retry_pause);
                    retry_pause = (retry_pause * 2).min(APPEND_RETRY_MAX);
                    Some(e.to_string())
                }
            };
            if let Ok(mut slot) = inner.stats.applier_error.lock() {
                *slot = error;
            }
        }
        inner
            .stats
            .pending
            .store(queue.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let held = inner.log.version_vector();
        let received = queue.received(&held);
        if on_tick {
            for (_, from) in queue.gaps(&held) {
                inner.send_to(
                    &from,
                    Message::WantEvents {
                        from: received.clone(),
                    },
                );
            }
        }
        for peer in ack_to {
            inner.send_to(
                &peer,
                Message::Ack {
                    vv: received.clone(),
                },
            );
        }
    }
}

/// Why a pass of the applier did not finish.
#[derive(Debug, thiserror::Error)]
enum PassError {
    /// Appending failed (the events are queued again).
    #[error(transparent)]
    Log(#[from] LogError),
    /// The pass's blocking work panicked; the queue was lost with it.
    #[error("a pass over the pending events panicked; sessions were restarted so that peers send them again")]
    Panicked,
}

/// Appends every ready event and requests missing chunks. Runs the sled work on a
/// blocking thread; the queue moves there and back, and comes back whatever happens: the
/// events of an append that failed are in it again.
async fn advance(
    inner: &Arc<Inner>,
    mut queue: PendingQueue,
    requested: &mut Requested,
    missing: &mut ChunkMap<Missing>,
    turns: &mut Turns,
) -> (PendingQueue, Result<(), PassError>) {
    loop {
        let chunks = inner.log.chunks().clone();
        let held = inner.log.version_vector();
        let asked: ChunkSet = requested.keys().copied().collect();
        // Each peer has a window of its own: one that never answers holds only its own.
        let mut asked_of: HashMap<ReplicaId, usize> = HashMap::new();
        for asked in requested.values() {
            *asked_of.entry(asked.peer).or_default() += 1;
        }
        let window = inner.config.chunk_window;
        let mut connected = inner.connected_peers();
        connected.sort_unstable();
        let mut tracked = std::mem::take(missing);
        let turned = std::mem::take(turns);
        let taken = tokio::task::spawn_blocking(move || {
            let in_flight = |h: &Hash| asked.contains(h);
            let ready = queue.take_ready(&held, &mut |e| match e.op.content() {
                None => true,
                Some(c) => {
                    let m = tracked.entry(c.root).or_insert_with(|| Missing::new(c));
                    m.refresh(&chunks, &in_flight).is_ok() && m.is_complete()
                }
            });
            // Hashes to ask for, by peer, with the root of each one's content and its turn.
            let mut wants: BTreeMap<ReplicaId, Vec<(Hash, Hash, usize)>> = BTreeMap::new();
            let mut wanted = ChunkSet::default();
            // What each peer may still be asked, and how many have no room left: once
            // none has, the pass stops looking.
            let mut budgets: HashMap<ReplicaId, usize> = HashMap::new();
            let mut full = 0;
            let peers = connected.len().max(1);
            for p in queue.iter() {
                if full >= peers {
                    break;
                }
                let Some(content) = p.event.op.content() else {
                    continue;
                };
                let turn = turned.get(&content.root).copied().unwrap_or(0);
                let peer = peer_to_ask(p.from, &connected, turn);
                let budget = budgets.entry(peer).or_insert_with(|| {
                    let left = window.saturating_sub(asked_of.get(&peer).copied().unwrap_or(0));
                    full += usize::from(left == 0);
                    left
                });
                if *budget == 0 {
                    continue;
                }
                if queue.superseded(&p.event) {
                    // Goes with the event that supersedes it, content or not: asking for
                    // a version nobody may hold any more would only fill the window
                    // ahead of the one that counts.
                    continue;
                }
                let m = tracked
                    .entry(content.root)
                    .or_insert_with(|| Missing::new(content));
                if m.refresh(&chunks, &in_flight).is_err() {
                    continue;
                }
                let asks = m.request(&mut |h| {
                    if *budget == 0 {
                        Ask::Stop
                    } else if asked.contains(h) || !wanted.insert(*h) {
                        Ask::InFlight
                    } else {
                        *budget -= 1;
                        Ask::Yes
                    }
                });
                full += usize::from(*budget == 0);
                if !asks.is_empty() {
                    let root = content.root;
                    wants
                        .entry(peer)
                        .or_default()
                        .extend(asks.into_iter().map(|h| (h, root, turn)));
                }
            }
            // Forget the contents no pending event refers to any more.
            let live: ChunkSet = queue
                .iter()
                .filter_map(|p| p.event.op.content().map(|c| c.root))
                .collect();
            tracked.retain(|root, _| live.contains(root));
            let mut turned = turned;
            turned.retain(|root, _| live.contains(root));
            (queue, ready, wants, tracked, turned)
        })
        .await;
        let Ok((q, ready, wants, tracked, turned)) = taken else {
            // The blocking pass panicked and took the queue with it. Peers counted its
            // events as received (the Acks said so), and only a new session's Hello
            // resets that: end the sessions, so that they reconnect and send again what
            // the log lacks.
            for peer in inner.connected_peers() {
                if let Some(control) = inner.control(&peer) {
                    let _ = control.send(Control::Close);
                }
            }
            let max = inner.config.max_pending_events;
            return (PendingQueue::new(max), Err(PassError::Panicked));
        };
        *missing = tracked;
        *turns = turned;
        queue = q;
        if !wants.is_empty() {
            let sessions = inner.session_generations();
            for (peer, asks) in wants {
                let (generation, at) = (sessions.get(&peer).copied(), Instant::now());
                let hashes: Vec<Hash> = asks.iter().map(|(h, _, _)| *h).collect();
                requested.extend(asks.into_iter().map(|(hash, root, turn)| {
                    let asked = Asked {
                        peer,
                        generation,
                        at,
                        root,
                        turn,
                    };
                    (hash, asked)
                }));
                inner.want_chunks(&peer, &hashes);
            }
        }
        if ready.is_empty() {
            return (queue, Ok(()));
        }
        let n = ready.len() as u64;
        let started = Instant::now();
        let outcome = match inner.log.append(ready.clone()).await {
            Ok(outcome) => outcome,
            Err(e) => {
                requeue(inner, &mut queue, ready);
                return (queue, Err(e.into()));
            }
        };
        inner.observe(EngineEvent::Appended {
            origin: AppendOrigin::Remote,
            events: n,
            duration: started.elapsed(),
        });
        let stalled = outcome.appended.is_empty();
        requeue(inner, &mut queue, outcome.out_of_order);
        if stalled {
            // Nothing went in (all held already, or ahead of a gap the log sees and the
            // queue did not): another pass would take the same events again.
            return (queue, Ok(()));
        }
    }
}

/// Puts `events`, taken from `queue` and not appended, back into it.
fn requeue(inner: &Inner, queue: &mut PendingQueue, events: Vec<Event>) {
    let held = inner.log.version_vector();
    for event in events {
        let from = event.id.origin;
        queue.insert(event, from, &held);
    }
}

/// Applies every event after `store`'s cursor, once.
async fn catch_up(
    inner: &Arc<Inner>,
    store: &dyn Store,
    slot: &StoreSlot,
) -> Result<(), EngineError> {
    while apply_next_batch(inner, store, slot).await? {}
    note_failed(inner, slot, store).await;
    Ok(())
}

/// Applies the next batch after `store`'s cursor; `false` when it was already caught up.
///
/// For a store that [splits](Store::splits_sync) showing from syncing, a batch with more
/// events waiting after it is only shown, within [`UNSYNCED_EVENTS_MAX`] and
/// [`UNSYNCED_FOR_MAX`]: one sync then covers several batches, and the store writes the
/// next one without waiting for the disk. The cursor moves once they are synced, after
/// the last batch. A sync between every two batches of 4,096 events left the receiver's
/// writers idle for each `syncfs`, and had each one write back the inodes the next batch
/// was about to change (W1 of `bench/daemon/run.py`, `ab.py --reps 9`: 1.13 → 0.99 s, its
/// syncs no longer between the receiver's batches).
async fn apply_next_batch(
    inner: &Arc<Inner>,
    store: &dyn Store,
    slot: &StoreSlot,
) -> Result<bool, EngineError> {
    let started = Instant::now();
    let log = inner.log.clone();
    let name = store.name().to_owned();
    let max = inner.config.max_batch_events;
    let reconciler = inner.reconciler.clone();
    let unsynced = slot.unsynced.lock().ok().and_then(|u| *u);
    let ahead = unsynced.map(|u| u.to);
    let prepared = tokio::task::spawn_blocking(move || {
        let cursor = match ahead {
            Some(to) => to,
            None => log.cursor(&name)?,
        };
        if cursor >= log.len() {
            return Ok::<_, LogError>(None);
        }
        let events = log.read(cursor, max)?;
        let next = events.last().map_or(cursor, |(o, _)| o + 1);
        // Merges (events naming several parents, rare) may end conflict copies.
        let mut merged: HashMap<&Key, Vec<Head>> = HashMap::new();
        for (_, event) in events.iter().filter(|(_, e)| e.parents.len() > 1) {
            let mut parents = Vec::with_capacity(event.parents.len());
            for id in &event.parents {
                if let Some(parent) = log.get(id)? {
                    parents.push(Head::of(&parent));
                }
            }
            let ended = reconciler.merged_copies(&event.key, &event.op, &parents);
            merged.entry(&event.key).or_default().extend(ended);
        }
        let mut seen = HashSet::new();
        let mut views = Vec::new();
        for (_, event) in &events {
            if seen.insert(event.key.clone()) {
                let mut view = reconciler.view(&event.key, &log.state(&event.key)?);
                if let Some(ended) = merged.remove(&event.key) {
                    view.merged_copies = ended
                        .into_iter()
                        .filter(|h| view.copies.iter().all(|c| c.id != h.id))
                        .collect();
                }
                views.push(view);
            }
        }
        Ok(Some((next, events.len(), views)))
    })
    .await
    .map_err(|_| LogError::Closed)??;
    let Some((next, count, views)) = prepared else {
        // Caught up: what was shown ahead is made durable now.
        return sync_shown(inner, store, slot).await;
    };
    let conflicts = views.iter().filter(|v| v.conflicted).count() as u64;
    let shown = Unsynced {
        to: next,
        events: unsynced.map_or(0, |u| u.events) + count as u64,
        conflicts: unsynced.map_or(0, |u| u.conflicts) + conflicts,
        since: unsynced.map_or(started, |u| u.since),
    };
    if let Err(e) = store.show(&inner.store_context(), views).await {
        slot.forget_unsynced();
        return Err(e.into());
    }
    if let Ok(mut unsynced) = slot.unsynced.lock() {
        *unsynced = Some(shown);
    }
    // Whether more events wait is asked once the batch is shown: those that came
    // meanwhile count (asked before, a receiver that had caught up with what had
    // arrived synced in the middle of a transfer).
    let defer = store.splits_sync()
        && next < inner.log.len()
        && shown.events < UNSYNCED_EVENTS_MAX
        && shown.since.elapsed() < UNSYNCED_FOR_MAX;
    if !defer {
        sync_shown(inner, store, slot).await?;
    }
    Ok(true)
}

/// Syncs the batches `store` showed ahead of its cursor, if any, and moves the cursor
/// past them; `false` when there were none.
async fn sync_shown(
    inner: &Arc<Inner>,
    store: &dyn Store,
    slot: &StoreSlot,
) -> Result<bool, EngineError> {
    let Some(shown) = slot.unsynced.lock().ok().and_then(|u| *u) else {
        return Ok(false);
    };
    // Forgotten whatever happens: after a failure the batches come again from the cursor.
    slot.forget_unsynced();
    store.sync(&inner.store_context()).await?;
    inner.log.set_cursor(store.name(), shown.to).await?;
    inner
        .stats
        .applied
        .fetch_add(shown.events, std::sync::atomic::Ordering::Relaxed);
    inner
        .stats
        .conflicts
        .fetch_add(shown.conflicts, std::sync::atomic::Ordering::Relaxed);
    slot.applied
        .fetch_add(shown.events, std::sync::atomic::Ordering::Relaxed);
    inner.observe(EngineEvent::Applied {
        subscriber: store.name(),
        events: shown.events,
        conflicts: shown.conflicts,
        policy: inner.reconciler.policy_name(),
        duration: shown.since.elapsed(),
    });
    Ok(true)
}

/// Takes up a requested rewind, if any: moves the cursor back durably and records the end
/// the replay runs to.
async fn take_replay(
    inner: &Arc<Inner>,
    store: &dyn Store,
    slot: &StoreSlot,
) -> Result<(), EngineError> {
    // Looked at, and taken only once what was shown ahead has landed (the rewind then
    // starts from a durable cursor): meanwhile it still shows, and stays if that fails.
    // Only this loop takes a request.
    let requested = slot.replay_request.lock().ok().and_then(|r| *r);
    if requested.is_some() {
        sync_shown(inner, store, slot).await?;
    }
    let request = slot.replay_request.lock().ok().and_then(|mut r| r.take());
    if let Some(from) = request {
        let until = inner.log.len();
        inner.log.set_cursor(&slot.name, from).await?;
        if let Ok(mut r) = slot.replaying_until.lock() {
            *r = Some(until);
        }
        tracing::info!(subscriber = %slot.name, from, until, "replay started");
    }
    Ok(())
}

fn finish_replay_if_done(inner: &Arc<Inner>, slot: &StoreSlot) {
    let cursor = inner.log.cursor(&slot.name).unwrap_or(0);
    if let Ok(mut r) = slot.replaying_until.lock() {
        if r.is_some_and(|until| cursor >= until) {
            *r = None;
            tracing::info!(subscriber = %slot.name, cursor, "replay finished");
        }
    }
}

/// First pause before remote events whose append failed are tried again; it doubles with
/// each failure.
const APPEND_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest pause before remote events whose append failed are tried again.
const APPEND_RETRY_MAX: Duration = Duration::from_secs(60);

/// First pause before a store's failed keys are tried again; it doubles with each try.
const STORE_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest pause between tries of a store's failed keys.
const STORE_RETRY_MAX: Duration = Duration::from_secs(60);

/// Records the store's count of failed keys for the status and the metrics; while there
/// are some, asks the connected peers for the chunks found damaged here (a key may fail
/// for want of one).
async fn note_failed(inner: &Arc<Inner>, slot: &StoreSlot, store: &dyn Store) {
    let failed = store.failed();
    slot.failed
        .store(failed as u64, std::sync::atomic::Ordering::Relaxed);
    if failed == 0 {
        return;
    }
    let chunks = inner.log.chunks().clone();
    let Ok(hashes) = tokio::task::spawn_blocking(move || chunks.damaged()).await else {
        return;
    };
    if hashes.is_empty() {
        return;
    }
    let peers = inner.connected_peers();
    tracing::info!(
        chunks = hashes.len(),
        peers = peers.len(),
        "asking peers for chunks damaged here"
    );
    for peer in peers {
        inner.want_chunks(&peer, &hashes);
    }
}

/// Sleeps for `wait`, or forever without one.
async fn sleep_if(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

async fn run_store(inner: Arc<Inner>, store: Arc<dyn Store>, slot: Arc<StoreSlot>) {
    let mut len = inner.log.subscribe();
    let mut shutdown = inner.shutdown.subscribe();
    let mut failures = 0u32;
    // Tries of the keys the store could not show (see `Store::failed`) since it last
    // had none.
    let mut retries = 0u32;
    loop {
        let stopping = *shutdown.borrow();
        if stopping {
            // A clean stop leaves nothing shown ahead of the cursor to show again.
            if let Err(e) = sync_shown(&inner, store.as_ref(), &slot).await {
                tracing::error!(store = store.name(), "syncing at stop: {e}");
            }
            return;
        }
        let step = match take_replay(&inner, store.as_ref(), &slot).await {
            Ok(()) => apply_next_batch(&inner, store.as_ref(), &slot).await,
            Err(e) => Err(e),
        };
        finish_replay_if_done(&inner, &slot);
        note_failed(&inner, &slot, store.as_ref()).await;
        // A batch only shown is no progress yet: a store whose syncs keep failing backs
        // off, and shows its error, as one whose batches do.
        let synced = slot.unsynced.lock().is_ok_and(|u| u.is_none());
        if let Ok(mut error) = slot.error.lock() {
            match &step {
                Err(e) => *error = Some(e.to_string()),
                Ok(_) if synced => *error = None,
                Ok(_) => {}
            }
        }
        match step {
            Ok(true) => {
                if synced {
                    failures = 0;
                }
            }
            Ok(false) => {
                // Failed keys, or keys the store has to show of its own (not failures).
                let pending = store.failed() > 0 || store.to_show() > 0;
                if !pending {
                    retries = 0;
                }
                let retry = pending.then(|| backoff(retries, STORE_RETRY_MIN, STORE_RETRY_MAX));
                let try_now = tokio::select! {
                    r = len.changed() => if r.is_err() { return } else { false },
                    _ = slot.wake.notified() => false,
                    // Keys that came to show are tried at once: none of them failed.
                    _ = store.more_to_show() => true,
                    _ = sleep_if(retry) => {
                        retries = retries.saturating_add(1);
                        true
                    }
                    _ = crate::engine::until(&mut shutdown, true) => return,
                };
                if try_now {
                    let ctx = inner.store_context();
                    if let Err(e) = store.retry(&ctx).await {
                        tracing::error!(store = store.name(), "retrying keys not shown: {e}");
                    }
                    note_failed(&inner, &slot, store.as_ref()).await;
                }
            }
            Err(e) => {
                // Nothing is lost: the cursor did not move, the batch comes again.
                failures += 1;
                tracing::error!(
                    store = store.name(),
                    "applying failed (attempt {failures}): {e}"
                );
                // (Stopping now, the top of the loop syncs what was shown ahead.)
                tokio::select! {
                    _ = tokio::time::sleep(backoff(failures, Duration::from_millis(200), Duration::from_secs(30))) => {},
                    _ = crate::engine::until(&mut shutdown, true) => {},
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::content::{ChunkBytes, SharedBuffer};

    #[test]
    fn chunks_are_asked_of_the_sender_first_then_of_each_other_peer_in_turn() {
        let id = |b: u8| ReplicaId([b; 16]);
        let connected = [id(3), id(5), id(9)];
        let turns: Vec<ReplicaId> = (0..4).map(|t| peer_to_ask(id(5), &connected, t)).collect();
        assert_eq!(turns, [id(5), id(3), id(9), id(5)]);
        // A sender no longer connected is not asked: the others in turn.
        let turns: Vec<ReplicaId> = (0..3).map(|t| peer_to_ask(id(1), &connected, t)).collect();
        assert_eq!(turns, [id(3), id(5), id(9)]);
        assert_eq!(peer_to_ask(id(1), &[], 2), id(1), "nobody else to ask");
    }

    /// The same error ending sessions again and again is warned of once a minute, with
    /// the count of the sessions it ended in between; a different error is warned of at
    /// once.
    #[test]
    fn a_repeated_session_error_is_warned_of_once_a_minute_with_its_count() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let full = "content store: writing pack-00000002: No space left on device";
        let mut warned = None;
        assert_eq!(warn_of(&mut warned, full, at(0)), Some(0));
        assert_eq!(warn_of(&mut warned, full, at(3)), None);
        assert_eq!(warn_of(&mut warned, full, at(59)), None);
        assert_eq!(warn_of(&mut warned, full, at(60)), Some(2));
        assert_eq!(warn_of(&mut warned, full, at(61)), None);
        assert_eq!(
            warn_of(&mut warned, "peer closed the connection", at(62)),
            Some(0)
        );
        assert_eq!(
            warn_of(&mut warned, full, at(63)),
            Some(0),
            "a new error in between"
        );
        assert_eq!(warn_of(&mut warned, full, at(200)), Some(0));
        // The same cause naming another pack (the disk still full) is the same error;
        // another cause is not, nor a number where there was none.
        let next_pack = "content store: writing pack-00000003: No space left on device";
        assert_eq!(warn_of(&mut warned, next_pack, at(201)), None);
        assert_eq!(warn_of(&mut warned, full, at(202)), None);
        assert_eq!(warn_of(&mut warned, next_pack, at(260)), Some(2));
        let io = "content store: writing pack-00000004: Input/output error";
        assert_eq!(warn_of(&mut warned, io, at(261)), Some(0));
        assert_eq!(
            warn_of(
                &mut warned,
                "content store: writing pack-x: Input/output error",
                at(262)
            ),
            Some(0)
        );
    }

    /// The tick's rule for requests that went unanswered (see `expire_requests`): a
    /// silent peer moves the content's turn on, once; a slow one that still delivers is
    /// asked again at the same turn; a request over an ended session is asked again at
    /// once; late answers to an earlier turn move nothing.
    #[test]
    fn unanswered_requests_move_the_turn_only_from_a_silent_peer() {
        let id = |b: u8| ReplicaId([b; 16]);
        let hash = |b: u8| Hash::of(&[b]);
        let (slow, silent, gone) = (id(1), id(2), id(3));
        let timeout = Duration::from_secs(20);
        let now = Instant::now() + Duration::from_secs(120);
        let ago = |secs: u64| now - Duration::from_secs(secs);
        let sessions: HashMap<ReplicaId, u64> = [(slow, 7), (silent, 8), (gone, 10)].into();
        let ask = |peer, generation, at, root: u8, turn| Asked {
            peer,
            generation: Some(generation),
            at,
            root: hash(root),
            turn,
        };
        let mut requested: Requested = [
            // Content 100, turn 0, asked of the slow peer 30 s ago: it delivered other
            // chunks 5 s ago.
            (hash(1), ask(slow, 7, ago(30), 100, 0)),
            // Content 101, turn 0, asked of the silent peer: two chunks timed out.
            (hash(2), ask(silent, 8, ago(25), 101, 0)),
            (hash(3), ask(silent, 8, ago(21), 101, 0)),
            // Content 101 again, asked 5 s ago: not timed out, kept.
            (hash(4), ask(silent, 8, ago(5), 101, 0)),
            // Content 102 is at turn 2; a late request of its turn 1 times out.
            (hash(5), ask(silent, 8, ago(40), 102, 1)),
            // Asked over the session the peer had before (generation 9, now 10).
            (hash(6), ask(gone, 9, ago(1), 103, 0)),
        ]
        .into_iter()
        .collect();
        let mut delivered: HashMap<ReplicaId, Instant> = [(slow, ago(5)), (silent, ago(50))].into();
        let mut turns: Turns = [(hash(102), 2)].into_iter().collect();

        let moved = expire_requests(
            &mut requested,
            &mut delivered,
            &mut turns,
            &sessions,
            timeout,
            now,
        );

        assert_eq!(
            moved.into_iter().collect::<Vec<_>>(),
            [(hash(101), silent)],
            "only the silent peer's content moves on"
        );
        assert_eq!(turns.get(&hash(101)), Some(&1), "once, for two chunks");
        assert_eq!(turns.get(&hash(100)), None, "the slow peer is asked again");
        assert_eq!(turns.get(&hash(102)), Some(&2), "a late answer to turn 1");
        assert_eq!(
            turns.get(&hash(103)),
            None,
            "an ended session moves nothing"
        );
        // Dropped (to be asked again) but the one still within its time.
        assert_eq!(requested.keys().copied().collect::<Vec<_>>(), [hash(4)]);
        // The silent peer's last delivery is forgotten; the slow one's is kept.
        assert_eq!(delivered.keys().copied().collect::<Vec<_>>(), [slow]);

        // At the next tick, the slow peer, asked again, has stopped delivering: now its
        // content moves on too.
        let later = now + timeout;
        requested.insert(hash(1), ask(slow, 7, now, 100, 0));
        let moved = expire_requests(
            &mut requested,
            &mut delivered,
            &mut turns,
            &sessions,
            timeout,
            later,
        );
        assert_eq!(moved.get(&hash(100)), Some(&slow));
        assert_eq!(turns.get(&hash(100)), Some(&1));
    }

    fn fresh(bytes: ChunkBytes) -> FreshChunk {
        FreshChunk {
            hash: Hash::of(&bytes),
            bytes,
            place: None,
        }
    }

    /// A buffer's whole length is counted once, on the last of its chunks in a run; a
    /// copied chunk counts its own bytes.
    #[test]
    fn memory_shares_count_whole_buffers() {
        let window: SharedBuffer = Arc::new(vec![1u8; 1000]);
        let other: SharedBuffer = Arc::new(vec![2u8; 300]);
        let batch = vec![
            fresh(ChunkBytes::shared(window.clone(), 0..100).unwrap()),
            fresh(ChunkBytes::shared(window.clone(), 100..250).unwrap()),
            fresh(ChunkBytes::copied(b"twelve bytes")),
            fresh(ChunkBytes::shared(other.clone(), 200..300).unwrap()),
        ];
        assert_eq!(memory_shares(&batch), vec![100, 900, 12, 300]);
        assert_eq!(memory_shares(&[]), Vec::<usize>::new());
    }
}
