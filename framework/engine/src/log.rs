//! The event log on sled: the single source of truth of a replica.
//!
//! Trees (DESIGN §3): `log` (offset → event), `ids` ((origin, seq) → offset, sparse), `vv`
//! (origin → highest contiguous seq), `cursors` (subscriber → next offset to process),
//! `state` (key → heads), `chunk_index` (hash → place in a pack file; see
//! [`crate::content`]) and `meta` (identity, clock, checkpoint).
//!
//! Every append goes through one writer thread. It drains the queue of waiting requests,
//! writes their events to `log` in one atomic batch, flushes once, and only then answers
//! every request of the batch (group commit). It runs on its own OS thread so sled's writes
//! and flushes never block the async runtime. Subscribers learn of new durable entries
//! through [`EventLog::subscribe`].
//!
//! `log` stores consecutive events in *segments* of up to [`SEGMENT_EVENTS`], keyed by the
//! offset of their first event, rather than one entry per event: sled copies a leaf on
//! every insert, and that per-entry cost bounded both appends and rebuilds.
//!
//! `log` is the only ground truth; `ids`, `vv` and `state` are derived from it. To keep the
//! append path to a few inserts per group commit, derived changes collect in memory (the
//! *overlay*, which reads consult first) and reach their trees in a *checkpoint*: one sled
//! transaction that also records the log offset they reflect (`meta/derived_upto`).
//! Opening the log folds the entries after that offset again, so a crash at any point
//! loses nothing. `ids` holds every [`IDS_STRIDE`]-th seq of each origin; a lookup scans
//! forward from there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use converge_api::{
    codec, Event, EventId, Head, Hlc, Key, Op, ReplicaId, SystemClock, VersionVector, WallClock,
};
use sled::{Batch, IVec, Tree};
use tokio::sync::{mpsc, oneshot, watch};

use crate::content::ChunkStore;
use crate::error::LogError;
use crate::projection::KeyState;

mod segment;

use segment::{SegmentBuilder, SegmentReader};

/// Most events written in one group commit; more requests wait for the next one.
const MAX_COMMIT_EVENTS: usize = 8192;

/// Events handed from the reading thread to the folding one at a time during a rebuild.
const REBUILD_BATCH: usize = 4096;

/// A checkpoint is written after this many events, or when the overlay holds more keys.
/// The overlay's states take about 450 bytes a key: 16,384 keys is about 7 MiB, which a
/// sync of 10,000 files stays within (50,000 had let a sync of 100,000 files hold 21 MiB
/// more than one of 10,000).
const CHECKPOINT_EVENTS: u64 = 200_000;
const CHECKPOINT_KEYS: usize = 16_384;

/// Entries written per sled batch by a checkpoint (see [`Writer::checkpoint`]).
const CHECKPOINT_BATCH: usize = 512;

/// sled's page cache: log segments, index and projection entries. Content lives in pack
/// files outside sled, so file sizes do not grow the daemon's memory.
///
/// Small on purpose. sled fills its cache as the database grows, and the nodes it holds
/// take about 1.6 times what the cache counts, so a larger cache is memory that grows
/// with the number of files until the cache is full: with 64 MiB, a W1 sync of 400,000
/// files peaked 70–90 MiB higher than one of 100,000 (`bench/daemon/rss.py`; see the
/// README, "Peak memory as the workload grows"). With 4 MiB the cache is full early (a
/// folder's entries take about 120 bytes a file in the `state` tree alone). A read that
/// misses it reads the node back from sled's file, most often from the operating
/// system's page cache, and decodes it: the log's readers follow its tail, which was just
/// written, and a scan reads one directory's keys together. Measured: W1 no slower, a
/// restart's scan of 100,000 files 10–15% slower.
pub const CACHE_BYTES: u64 = 4 << 20;

/// Most events stored in one entry of the `log` tree: a group commit writes its events
/// as segments of consecutive events rather than one entry each.
pub const SEGMENT_EVENTS: u32 = 128;

/// Every `IDS_STRIDE`-th event of an origin (seq 1, 1 + stride, …) is indexed in `ids`.
pub const IDS_STRIDE: u64 = 64;

const META_REPLICA: &[u8] = b"replica";
const META_HLC: &[u8] = b"hlc";
/// How far ahead of this machine's clock a remote event's stamp may be before a warning
/// names its origin: the local clock follows the furthest clock it has seen (that is what
/// keeps last-write-wins after causality), so a peer whose clock is wrong by hours moves
/// every replica's stamps with it, which the user should hear about.
const CLOCK_AHEAD_WARNING_MS: u64 = 60 * 60 * 1000;

const META_REBUILDING: &[u8] = b"rebuilding";
const META_CHECKPOINTING: &[u8] = b"checkpointing";
const META_DERIVED_UPTO: &[u8] = b"derived_upto";

/// A local change for [`EventLog::append_local`]: the log fills in id, clock and parents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalChange {
    /// The key changed.
    pub key: Key,
    /// What happened to it.
    pub op: Op,
    /// When the change was made (wall-clock ms), if the source knows and it may be well
    /// before the change is appended: a folder's scan at start finds edits made while the
    /// daemon was stopped. The event's clock then reads this time instead of the current
    /// one, though never later than now and never at or before what the log has stamped
    /// already; so last-write-wins orders such an edit by when it was made, not by when it
    /// was found. `None`: now.
    pub made_at_ms: Option<u64>,
    /// Heads of the key that the change was made without: not taken as its parents, so
    /// that it is concurrent with them and the conflict policy decides between them. A
    /// folder's store that left a local edit in place rather than write a peer's version
    /// over it names that version here, so the edit does not silently supersede it.
    /// Empty: every current head is a parent.
    pub unseen_heads: Vec<EventId>,
}

impl LocalChange {
    /// A change made just now.
    pub fn new(key: Key, op: Op) -> Self {
        LocalChange {
            key,
            op,
            made_at_ms: None,
            unseen_heads: Vec::new(),
        }
    }

    /// The same change, made without seeing `heads` (see [`LocalChange::unseen_heads`]).
    pub fn without_seeing(self, heads: Vec<EventId>) -> Self {
        LocalChange {
            unseen_heads: heads,
            ..self
        }
    }

    /// The same change, made at `ms` (see [`LocalChange::made_at_ms`]).
    pub fn made_at(self, ms: Option<u64>) -> Self {
        LocalChange {
            made_at_ms: ms,
            ..self
        }
    }
}

/// What became of the events offered to [`EventLog::append`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Events appended (now durable), in the order given.
    pub appended: Vec<EventId>,
    /// Events already in the log (appending is idempotent).
    pub duplicates: usize,
    /// Events ahead of a gap in their origin's sequence: not appended, handed back so the
    /// caller can hold them until the gap fills.
    pub out_of_order: Vec<Event>,
}

/// How to open an [`EventLog`].
#[derive(Clone)]
pub struct LogConfig {
    sled: sled::Config,
    /// The pack directory of the content store, `None` for a temporary one.
    packs: Option<std::path::PathBuf>,
    clock: Arc<dyn WallClock>,
    checkpoint_events: u64,
}

impl LogConfig {
    /// A log stored in the directory `path` (created if missing).
    pub fn new(path: impl AsRef<Path>) -> Self {
        LogConfig {
            sled: sled::Config::new()
                .path(path.as_ref())
                .cache_capacity(CACHE_BYTES),
            packs: Some(path.as_ref().join("packs")),
            clock: Arc::new(SystemClock),
            checkpoint_events: CHECKPOINT_EVENTS,
        }
    }

    /// A log in a temporary directory removed when the log is dropped (tests, demos).
    pub fn temporary() -> Self {
        LogConfig {
            sled: sled::Config::new().temporary(true),
            packs: None,
            clock: Arc::new(SystemClock),
            checkpoint_events: CHECKPOINT_EVENTS,
        }
    }

    /// Checkpoints the derived trees after every `events` appended events (tests use small
    /// values to exercise checkpoints; larger values make appends cheaper and opening
    /// after a crash slower).
    pub fn checkpoint_every(mut self, events: u64) -> Self {
        self.checkpoint_events = events.max(1);
        self
    }

    /// Uses `clock` instead of the system clock for new events' timestamps.
    pub fn clock(mut self, clock: Arc<dyn WallClock>) -> Self {
        self.clock = clock;
        self
    }
}

impl std::fmt::Debug for LogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogConfig").finish_non_exhaustive()
    }
}

/// A replica's append-only event log and everything derived from it. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

struct Shared {
    db: Db,
    trees: Trees,
    chunks: ChunkStore,
    replica: ReplicaId,
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    durable_len: watch::Receiver<u64>,
    durable_vv: Arc<RwLock<VersionVector>>,
    durable_tips: Arc<RwLock<Tips>>,
    overlay: Arc<RwLock<Overlay>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// For each origin, the newest event of it the log holds: its seq and its
/// [fingerprint](Event::fingerprint). A peer compares them with the events it holds under
/// the same ids, which tells two data dirs acting as one replica (see the engine's
/// `Hello`). Kept up to date by the writer and in the `tips` tree at each checkpoint, so
/// that reading them costs no scan of the log.
pub type Tips = BTreeMap<ReplicaId, (u64, converge_api::Hash)>;

#[derive(Clone)]
struct Trees {
    log: Tree,
    ids: Tree,
    vv: Tree,
    tips: Tree,
    cursors: Tree,
    state: Tree,
    meta: Tree,
}

/// Derived changes not yet checkpointed into their trees; durable through the log.
#[derive(Default)]
struct Overlay {
    states: BTreeMap<Key, KeyState>,
    ids: BTreeMap<[u8; 24], u64>,
}

enum Request {
    Local(
        Vec<LocalChange>,
        oneshot::Sender<Result<Vec<Event>, LogError>>,
    ),
    Remote(Vec<Event>, oneshot::Sender<Result<AppendOutcome, LogError>>),
    Rebuild(oneshot::Sender<Result<u64, LogError>>),
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("replica", &self.shared.replica)
            .field("len", &self.len())
            .finish()
    }
}

impl EventLog {
    /// Opens (or creates) the log and starts its writer thread. A new log gets a fresh
    /// random replica identity.
    pub fn open(config: LogConfig) -> Result<EventLog, LogError> {
        let db = Db::open(&config.sled)?;
        let trees = Trees {
            log: db.open_tree("log")?,
            ids: db.open_tree("ids")?,
            vv: db.open_tree("vv")?,
            tips: db.open_tree("tips")?,
            cursors: db.open_tree("cursors")?,
            state: db.open_tree("state")?,
            meta: db.open_tree("meta")?,
        };
        let chunks = {
            let index = db.open_tree("chunk_index")?;
            let manifests = db.open_tree("chunk_manifests")?;
            let changed = db.open_tree("chunk_changed_files")?;
            let removed = db.open_tree("chunk_runs_removed")?;
            match config.packs {
                Some(dir) => ChunkStore::open(index, manifests, changed, removed, dir, false)?,
                None => {
                    let temp = std::env::temp_dir();
                    remove_stale_packs(&temp);
                    let name = format!(
                        "{TEMPORARY_PACKS}{}-{:016x}",
                        std::process::id(),
                        rand::random::<u64>()
                    );
                    ChunkStore::open(index, manifests, changed, removed, temp.join(name), true)?
                }
            }
        };
        let replica = match trees.meta.get(META_REPLICA)? {
            Some(bytes) => ReplicaId(bytes.as_ref().try_into().map_err(|_| LogError::Corrupt {
                what: "meta/replica".into(),
                source: converge_api::CodecError::Malformed("not 16 bytes".into()),
            })?),
            None => {
                let id = ReplicaId::random()?;
                trees.meta.insert(META_REPLICA, &id.0)?;
                db.flush()?;
                id
            }
        };
        let hlc = match trees.meta.get(META_HLC)? {
            Some(bytes) => decode_stored::<Hlc>("meta/hlc", &bytes)?,
            None => Hlc::default(),
        };
        let mut vv = VersionVector::new();
        for entry in trees.vv.iter() {
            let (k, v) = entry?;
            vv.set(replica_from(&k)?, u64_from("vv", &v)?);
        }
        let mut tips = Tips::new();
        for entry in trees.tips.iter() {
            let (k, v) = entry?;
            tips.insert(replica_from(&k)?, tip_from(&v)?);
        }
        let next_offset = match trees.log.last()? {
            Some((k, v)) => SegmentReader::new(&k, v)?.end(),
            None => 0,
        };

        let derived_upto = match trees.meta.get(META_DERIVED_UPTO)? {
            Some(v) => u64_from("meta/derived_upto", &v)?,
            None => 0,
        };

        let (len_tx, durable_len) = watch::channel(next_offset);
        let durable_vv = Arc::new(RwLock::new(VersionVector::new()));
        let durable_tips = Arc::new(RwLock::new(Tips::new()));
        let overlay = Arc::new(RwLock::new(Overlay::default()));
        let mut writer = Writer {
            trees: trees.clone(),
            chunks: chunks.clone(),
            db: db.clone(),
            replica,
            clock: config.clock,
            checkpoint_events: config.checkpoint_events,
            hlc,
            vv,
            next_offset: derived_upto,
            since_checkpoint: 0,
            published_len: len_tx,
            published_vv: durable_vv.clone(),
            tips,
            published_tips: durable_tips.clone(),
            overlay: overlay.clone(),
            warned_ahead: HashSet::new(),
        };
        if trees.meta.contains_key(META_REBUILDING)?
            || trees.meta.contains_key(META_CHECKPOINTING)?
            || derived_upto > next_offset
        {
            // A rebuild or a checkpoint that a crash interrupted, or derived trees ahead
            // of the log: derive everything from the log again.
            writer.rebuild()?;
        } else {
            // Entries appended after the last checkpoint: fold them into the overlay.
            writer.refold_tail(next_offset)?;
        }
        writer.publish();

        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            db,
            trees,
            chunks,
            replica,
            requests: Mutex::new(Some(tx)),
            durable_len,
            durable_vv,
            durable_tips,
            overlay,
            writer: Mutex::new(None),
        });
        let handle = std::thread::Builder::new()
            .name(format!("converge-log-{}", replica.short()))
            .spawn(move || writer.run(rx))
            .map_err(LogError::Thread)?;
        if let Ok(mut slot) = shared.writer.lock() {
            *slot = Some(handle);
        }
        Ok(EventLog { shared })
    }

    /// This replica's identity.
    pub fn replica(&self) -> ReplicaId {
        self.shared.replica
    }

    /// Number of durable entries; the next append gets this offset.
    pub fn len(&self) -> u64 {
        *self.shared.durable_len.borrow()
    }

    /// The length and the version vector of the durable log, read together: every event
    /// the vector holds is below the length (read apart, a commit may come between).
    pub fn published(&self) -> (u64, VersionVector) {
        match self.shared.durable_vv.read() {
            Ok(vv) => (self.len(), vv.clone()),
            Err(_) => (self.len(), self.version_vector()),
        }
    }

    /// Whether the log holds no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The newest durable event of each origin, as seq and fingerprint (see [`Tips`]). An
    /// origin whose events all came before this log kept tips (an older data dir) has
    /// none until its next event.
    pub fn tips(&self) -> Tips {
        self.shared
            .durable_tips
            .read()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    /// The version vector of the durable log.
    pub fn version_vector(&self) -> VersionVector {
        self.shared
            .durable_vv
            .read()
            .map(|vv| vv.clone())
            .unwrap_or_default()
    }

    /// The content store that shares this log's database (and its flushes).
    pub fn chunks(&self) -> &ChunkStore {
        &self.shared.chunks
    }

    /// A receiver of the durable log length, changed after every group commit: the
    /// wake-up signal for subscribers (no polling).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.durable_len.clone()
    }

    fn sender(&self) -> Result<mpsc::Sender<Request>, LogError> {
        self.shared
            .requests
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or(LogError::Closed)
    }

    /// Appends local changes as new events of this replica (seq, clock and parents filled
    /// in: the parents are the key's current heads, but those a change names as unseen).
    /// Returns once they are durable.
    pub async fn append_local(&self, changes: Vec<LocalChange>) -> Result<Vec<Event>, LogError> {
        // The chunks these changes name leave for peers before the events do.
        self.chunks().flush_fresh();
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Request::Local(changes, tx))
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Appends events from any origin, idempotently and in each origin's seq order.
    /// Returns once the appended ones are durable.
    pub async fn append(&self, events: Vec<Event>) -> Result<AppendOutcome, LogError> {
        if events.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Request::Remote(events, tx))
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Folds the whole log into the projection again, with appends held off meanwhile.
    /// Returns the number of events folded.
    ///
    /// The fold is done in memory first, and the derived trees are rewritten only once it
    /// worked: a log that cannot be read to its end (damage, an I/O error) leaves the
    /// projection as it was. They are rewritten in place, never cleared, so a reader meets
    /// each key's state as it was or as rebuilt, never none.
    pub async fn rebuild(&self) -> Result<u64, LogError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Request::Rebuild(tx))
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Up to `limit` durable events from offset `from` on, with their offsets.
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<(u64, Event)>, LogError> {
        LogIter::new(&self.shared.trees.log, from, self.len())?
            .take(limit)
            .collect()
    }

    /// Up to `limit` durable events from offset `from` on, as stored (each as
    /// [`converge_api::codec::encode_event`] wrote it), for a reader that sends them on as
    /// they are. `skip` is asked of each event's id, read from the head of its bytes
    /// ([`converge_api::codec::event_id`]; decoded whole only if it cannot be read so),
    /// and what it skips is left out. Returns the rest and the offset after the last
    /// event looked at.
    pub fn read_raw_unless(
        &self,
        from: u64,
        limit: usize,
        mut skip: impl FnMut(&EventId) -> bool,
    ) -> Result<(Vec<RawEvent>, u64), LogError> {
        let mut events = LogIter::new(&self.shared.trees.log, from, self.len())?;
        let (mut kept, mut next) = (Vec::new(), from);
        for _ in 0..limit {
            let item = events.advance(|segment| {
                let read = segment.next_raw()?.and_then(|(offset, bytes)| {
                    let id = match converge_api::codec::event_id(bytes) {
                        Some(id) => id,
                        None => segment::decode(offset, bytes)?.id,
                    };
                    Ok((!skip(&id)).then(|| RawEvent {
                        offset,
                        id,
                        bytes: bytes.to_vec(),
                    }))
                });
                Some(read.map(|event| (segment.offset(), event)))
            });
            let Some(item) = item else {
                break;
            };
            let (after, event) = item?;
            next = after;
            kept.extend(event);
        }
        Ok((kept, next))
    }

    /// The offset of the event `id`, if the log holds it.
    pub fn offset_of(&self, id: &EventId) -> Result<Option<u64>, LogError> {
        Ok(self.find(id, u64::MAX)?.map(|(offset, _)| offset))
    }

    /// The event `id`, if the log holds it.
    pub fn get(&self, id: &EventId) -> Result<Option<Event>, LogError> {
        Ok(self.find(id, u64::MAX)?.map(|(_, event)| event))
    }

    /// [`Self::get`], giving up (`None`) after reading `most` events: the scan from the
    /// nearest indexed seq of `id`'s origin passes every event of other origins between,
    /// which for an origin quiet while others wrote much is most of the log.
    pub fn get_within(&self, id: &EventId, most: u64) -> Result<Option<Event>, LogError> {
        Ok(self.find(id, most)?.map(|(_, event)| event))
    }

    /// The event `id` with its offset: found from the nearest indexed seq at or below it,
    /// scanning forward over at most `most` events.
    fn find(&self, id: &EventId, most: u64) -> Result<Option<(u64, Event)>, LogError> {
        if id.seq == 0 || !self.version_vector().contains(id) {
            return Ok(None);
        }
        let base = EventId {
            origin: id.origin,
            seq: (id.seq - 1) / IDS_STRIDE * IDS_STRIDE + 1,
        };
        let indexed = self
            .shared
            .overlay
            .read()
            .ok()
            .and_then(|o| o.ids.get(&id_key(&base)).copied());
        let start = match indexed {
            Some(offset) => offset,
            None => match self.shared.trees.ids.get(id_key(&base))? {
                Some(v) => u64_from("ids", &v)?,
                None => return Ok(None),
            },
        };
        let end = self.len().min(start.saturating_add(most));
        for entry in LogIter::new(&self.shared.trees.log, start, end)? {
            let (offset, event) = entry?;
            if event.id == *id {
                return Ok(Some((offset, event)));
            }
            if event.id.origin == id.origin && event.id.seq > id.seq {
                break;
            }
        }
        Ok(None)
    }

    /// The current state (heads) of `key`; empty if the log has no event on it.
    pub fn state(&self, key: &Key) -> Result<KeyState, LogError> {
        read_state(&self.shared.overlay, &self.shared.trees.state, key)
    }

    /// The heads of `key`.
    pub fn heads(&self, key: &Key) -> Result<Vec<Head>, LogError> {
        Ok(self.state(key)?.heads)
    }

    /// Every key with its state, in key order (the whole projection, streamed from the
    /// tree and merged with the not yet checkpointed overlay).
    pub fn states(&self) -> impl Iterator<Item = Result<(Key, KeyState), LogError>> + '_ {
        let overlay: BTreeMap<Key, KeyState> = self
            .shared
            .overlay
            .read()
            .map(|o| o.states.clone())
            .unwrap_or_default();
        StatesIter {
            tree: self.shared.trees.state.iter().peekable(),
            overlay: overlay.into_iter().peekable(),
        }
    }

    /// Every key strictly below the directory `dir`, with its state, in key order.
    pub fn states_below(
        &self,
        dir: &Key,
    ) -> impl Iterator<Item = Result<(Key, KeyState), LogError>> + '_ {
        let overlay: BTreeMap<Key, KeyState> = self
            .shared
            .overlay
            .read()
            .map(|o| {
                o.states
                    .iter()
                    .filter(|(k, _)| k.is_under(dir))
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect()
            })
            .unwrap_or_default();
        // `0` follows `/`: the range holds exactly the keys that continue `dir/`.
        let (lo, hi) = (format!("{dir}/"), format!("{dir}0"));
        StatesIter {
            tree: self
                .shared
                .trees
                .state
                .range(lo.into_bytes()..hi.into_bytes())
                .peekable(),
            overlay: overlay.into_iter().peekable(),
        }
    }

    /// The next offset subscriber `name` will process (0 for a new subscriber).
    pub fn cursor(&self, name: &str) -> Result<u64, LogError> {
        match self.shared.trees.cursors.get(name)? {
            Some(v) => u64_from("cursor", &v),
            None => Ok(0),
        }
    }

    /// Every subscriber's cursor.
    pub fn cursors(&self) -> Result<BTreeMap<String, u64>, LogError> {
        let mut out = BTreeMap::new();
        for entry in self.shared.trees.cursors.iter() {
            let (k, v) = entry?;
            out.insert(
                String::from_utf8_lossy(&k).into_owned(),
                u64_from("cursor", &v)?,
            );
        }
        Ok(out)
    }

    /// Durably sets subscriber `name`'s cursor (after it processed everything before
    /// `next`, or to rewind it for a replay). Flushes on a blocking thread.
    pub async fn set_cursor(&self, name: &str, next: u64) -> Result<(), LogError> {
        self.shared
            .trees
            .cursors
            .insert(name, &next.to_be_bytes())?;
        self.flush().await
    }

    /// Makes every write so far durable (chunks put into the content store included).
    pub async fn flush(&self) -> Result<(), LogError> {
        let (db, chunks) = (self.shared.db.clone(), self.shared.chunks.clone());
        tokio::task::spawn_blocking(move || -> Result<(), LogError> {
            chunks.sync()?;
            db.flush()?;
            Ok(())
        })
        .await
        .map_err(|_| LogError::Closed)??;
        Ok(())
    }

    /// Stops the writer after the requests already queued, and flushes. Later appends fail
    /// with [`LogError::Closed`]; reads keep working.
    pub async fn close(&self) -> Result<(), LogError> {
        if let Ok(mut slot) = self.shared.requests.lock() {
            slot.take();
        }
        let handle = self.shared.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|_| LogError::Closed)?
                .ok();
        }
        // Chunk locations waiting in manifests go into the index now, not at the next
        // open; the content store's indexer thread ends.
        let chunks = self.chunks().clone();
        tokio::task::spawn_blocking(move || chunks.close())
            .await
            .map_err(|_| LogError::Closed)??;
        self.flush().await
    }
}

/// sled's database, whose [`flush`](Db::flush) makes what it covers survive a power loss.
#[derive(Clone)]
struct Db {
    sled: sled::Db,
    /// sled's data file (`db` in its directory), opened again for `fdatasync`; `None` for
    /// a temporary log.
    file: Option<(Arc<std::fs::File>, std::path::PathBuf)>,
    /// An `fdatasync` of the file failed: nothing is taken as durable any more (after a
    /// failed sync, Linux may mark pages clean that never reached the disk, and the next
    /// sync then succeeds without them), as sled does after an I/O error of its own.
    failed: Arc<std::sync::atomic::AtomicBool>,
    /// sled's blob files, which [`flush`](Db::flush) syncs; `None` for a temporary log.
    blobs: Option<Arc<Mutex<Blobs>>>,
}

/// The files sled 0.34 writes a page into when it is larger than a quarter of its log
/// segment (`db/blobs/<lsn>`): a `log` leaf of segments, a leaf of large manifests.
/// sled writes them and never syncs them, nor their directory; its flush syncs only its
/// main file, whose pointer to the blob can then be durable while the blob's bytes are
/// not. After a power cut sled's recovery stops at the first blob it cannot read, which
/// would lose every event after it, acknowledged ones included.
struct Blobs {
    /// sled's `blobs` directory.
    dir: PathBuf,
    /// The blob files synced so far, by name, with the length they had then: a blob
    /// found still being written is synced again once it has grown.
    synced: HashMap<std::ffi::OsString, u64>,
}

impl Blobs {
    /// The blob files not synced at their current length (name, length, path), and
    /// forgets those sled has removed.
    fn unsynced(&mut self) -> std::io::Result<Vec<(std::ffi::OsString, u64, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // Not made yet: no blob to sync.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut unsynced = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let len = match entry.metadata() {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if self.synced.get(&name) != Some(&len) {
                unsynced.push((name.clone(), len, entry.path()));
            }
            present.insert(name);
        }
        self.synced.retain(|name, _| present.contains(name));
        Ok(unsynced)
    }

    /// Syncs the blob files `unsynced` names (see [`Blobs::unsynced`]; one sled removed
    /// meanwhile is passed over), then their directory.
    fn sync_files(
        dir: &Path,
        unsynced: &[(std::ffi::OsString, u64, PathBuf)],
    ) -> std::io::Result<()> {
        for (_, _, path) in unsynced {
            match std::fs::File::open(path) {
                Ok(file) => file.sync_data()?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::File::open(dir)?.sync_all()
    }

    /// Notes the blobs of `unsynced` as synced, at the lengths they had.
    fn note_synced(&mut self, unsynced: Vec<(std::ffi::OsString, u64, PathBuf)>) {
        self.synced
            .extend(unsynced.into_iter().map(|(name, len, _)| (name, len)));
    }

    /// Syncs every blob not synced at its current length, then their directory.
    #[cfg(test)]
    fn sync(&mut self) -> std::io::Result<()> {
        let unsynced = self.unsynced()?;
        if !unsynced.is_empty() {
            Blobs::sync_files(&self.dir, &unsynced)?;
            self.note_synced(unsynced);
        }
        Ok(())
    }
}

impl Db {
    /// Opens sled's database (see [`open_sled`]) and, unless it is temporary, its file.
    fn open(config: &sled::Config) -> Result<Db, LogError> {
        let sled = open_sled(config)?;
        let (file, blobs) = match config.temporary {
            true => (None, None),
            false => {
                let path = config.get_path().join("db");
                let file = std::fs::File::open(&path).map_err(|e| sync_error(&path, e))?;
                let blobs = Blobs {
                    dir: config.get_path().join("blobs"),
                    synced: HashMap::new(),
                };
                (
                    Some((Arc::new(file), path)),
                    Some(Arc::new(Mutex::new(blobs))),
                )
            }
        };
        Ok(Db {
            sled,
            file,
            failed: Arc::default(),
            blobs,
        })
    }

    /// sled's flush, then an `fdatasync` of its file. On Linux sled 0.34 flushes with
    /// `sync_file_range` alone, which neither empties the disk's write cache nor writes
    /// the file's size and block map: a power cut could take what it acknowledged, until
    /// the `fsync` of its own thread up to half a second later (sled issue 1452). The log
    /// acknowledges an event, and hands it to peers, only after this flush; an event
    /// lost after that would have its sequence number given to another event by the
    /// next local append, and peers, holding the first, would drop the second for good.
    ///
    /// sled's blob files are synced too (see [`Blobs`]), after sled's flush, which has
    /// finished writing every blob a page it covers points to.
    ///
    /// A failure is final (see [`Db::usable`]): whatever the writer staged before it may
    /// be on disk, and nothing may be written after it.
    fn flush(&self) -> Result<(), LogError> {
        use std::sync::atomic::Ordering;
        if let Err(e) = self.sled.flush() {
            self.failed.store(true, Ordering::Release);
            return Err(e.into());
        }
        let Some((file, path)) = &self.file else {
            return Ok(());
        };
        self.usable()?;
        let fail = |at: &Path, e| {
            self.failed.store(true, Ordering::Release);
            sync_error(at, e)
        };
        let Some(blobs) = &self.blobs else {
            return file.sync_data().map_err(|e| fail(path, e));
        };
        let (dir, unsynced) = {
            let mut blobs = blobs.lock().map_err(|_| LogError::Closed)?;
            let unsynced = blobs.unsynced().map_err(|e| fail(&blobs.dir, e))?;
            (blobs.dir.clone(), unsynced)
        };
        if unsynced.is_empty() {
            return file.sync_data().map_err(|e| fail(path, e));
        }
        // The blobs on a thread of their own, while this one syncs the main file: the
        // disk takes the syncs together (a W1 sync writes about a dozen blobs a side).
        let (main, of_blobs) = std::thread::scope(|scope| {
            let of_blobs = scope.spawn(|| Blobs::sync_files(&dir, &unsynced));
            let main = file.sync_data();
            (main, of_blobs.join())
        });
        main.map_err(|e| fail(path, e))?;
        match of_blobs {
            Ok(result) => result.map_err(|e| fail(&dir, e))?,
            Err(_) => {
                return Err(fail(
                    &dir,
                    std::io::Error::other("the thread syncing them panicked"),
                ))
            }
        }
        blobs
            .lock()
            .map_err(|_| LogError::Closed)?
            .note_synced(unsynced);
        Ok(())
    }

    /// An error once a flush has failed: from then on nothing more may be written. The
    /// writer puts its clock, vector and next offset back after a failed commit, but what
    /// it staged stays in sled, which writes it out on its own; a later commit would
    /// write other events at the same offsets, under segment keys that need not match
    /// the first attempt's, and the log read after a restart would hold both.
    fn usable(&self) -> Result<(), LogError> {
        if !self.failed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let e = std::io::Error::other("an earlier sync of it failed; restart converge");
        let path = match &self.file {
            Some((_, path)) => path.clone(),
            None => std::path::PathBuf::from("the temporary log"),
        };
        Err(sync_error(&path, e))
    }
}

impl std::ops::Deref for Db {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        &self.sled
    }
}

/// The error of syncing (or opening to sync) sled's file at `path`.
fn sync_error(path: &Path, e: std::io::Error) -> LogError {
    LogError::Storage(sled::Error::Io(std::io::Error::new(
        e.kind(),
        format!("syncing {}: {e}", path.display()),
    )))
}

/// How long [`open_sled`] waits for a database another handle still holds.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled's database, waiting up to [`LOCK_WAIT`] while its file is locked. A log
/// closed and dropped in this process can still hold the lock for a moment: sled's
/// background writes keep its file open after the last handle is gone (the log model's
/// reopen step met it about one run in six). sled waits for the lock itself only in its
/// own tests, and tells it apart only by its message. A database another process holds
/// fails after the wait, with sled's error naming the path.
fn open_sled(config: &sled::Config) -> Result<sled::Db, LogError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return Ok(other?),
        }
    }
}

/// The writer thread's state: everything an append needs, owned by one thread.
struct Writer {
    trees: Trees,
    chunks: ChunkStore,
    db: Db,
    replica: ReplicaId,
    clock: Arc<dyn WallClock>,
    checkpoint_events: u64,
    hlc: Hlc,
    vv: VersionVector,
    next_offset: u64,
    since_checkpoint: u64,
    published_len: watch::Sender<u64>,
    published_vv: Arc<RwLock<VersionVector>>,
    /// The newest event of each origin, as staged (see [`Tips`]).
    tips: Tips,
    published_tips: Arc<RwLock<Tips>>,
    overlay: Arc<RwLock<Overlay>>,
    /// Origins already named in a warning for a stamp far ahead of this clock.
    warned_ahead: HashSet<ReplicaId>,
}

/// The writer's clock, version vector, next offset and tips, as before a commit.
type Saved = (Hlc, VersionVector, u64, Tips);

/// What one group commit will write, staged before anything touches sled.
#[derive(Default)]
struct Pending {
    /// Sealed segments, as the `log` entries the commit writes.
    log: Batch,
    open: Option<SegmentBuilder>,
    states: HashMap<Key, KeyState>,
    ids: Vec<([u8; 24], u64)>,
    events: usize,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            let mut events = batch[0].size();
            while events < MAX_COMMIT_EVENTS {
                match rx.try_recv() {
                    Ok(req) => {
                        events += req.size();
                        batch.push(req);
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
            if self.since_checkpoint >= self.checkpoint_events
                || self.overlay_keys() >= CHECKPOINT_KEYS
            {
                if let Err(e) = self.checkpoint() {
                    tracing::error!(
                        "checkpoint of the derived trees failed (the log is intact): {e}"
                    );
                }
            }
        }
        if let Err(e) = self.checkpoint() {
            tracing::error!("final checkpoint failed (the log is intact): {e}");
        }
    }

    fn overlay_keys(&self) -> usize {
        self.overlay.read().map(|o| o.states.len()).unwrap_or(0)
    }

    fn commit_batch(&mut self, batch: Vec<Request>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut pending = Pending::default();
        let saved = self.saved();
        for req in batch {
            match req {
                Request::Local(changes, reply) => {
                    let result = self.stage_local(changes, &mut pending);
                    replies.push(Reply::Local(result, reply));
                }
                Request::Remote(events, reply) => {
                    let result = self.stage_remote(events, &mut pending);
                    replies.push(Reply::Remote(result, reply));
                }
                Request::Rebuild(reply) => {
                    // Commit what is staged first so the rebuild sees it.
                    let staged = self.commit(std::mem::take(&mut pending));
                    if staged.is_err() {
                        self.restore(&saved);
                    }
                    finish(std::mem::take(&mut replies), staged.as_ref().err());
                    // A rebuild that fails partway leaves the version vector part-folded:
                    // the next local append would reuse sequence numbers, and peers drop
                    // such events as ones they have.
                    let before = self.saved();
                    let rebuilt = self.rebuild();
                    if rebuilt.is_err() {
                        self.restore(&before);
                    }
                    let _ = reply.send(rebuilt.inspect(|_| self.publish()));
                }
            }
        }
        let result = self.commit(pending);
        if let Err(e) = &result {
            tracing::error!("group commit failed: {e}");
            self.restore(&saved);
        }
        finish(replies, result.as_ref().err());
    }

    /// What staging moves before a commit makes it durable, to put back on failure.
    fn saved(&self) -> Saved {
        (
            self.hlc,
            self.vv.clone(),
            self.next_offset,
            self.tips.clone(),
        )
    }

    fn restore(&mut self, saved: &Saved) {
        self.hlc = saved.0;
        self.vv = saved.1.clone();
        self.next_offset = saved.2;
        self.tips = saved.3.clone();
    }

    /// Notes `event` as its origin's newest (see [`Tips`]).
    fn note_tip(&mut self, event: &Event) {
        self.tips
            .insert(event.id.origin, (event.id.seq, event.fingerprint()));
    }

    fn stage_local(
        &mut self,
        changes: Vec<LocalChange>,
        pending: &mut Pending,
    ) -> Result<Vec<Event>, LogError> {
        // Every key's state first (reads that may fail), as `stage_remote` does: a
        // failure then stages nothing of the request, never its first changes alone,
        // which would be appended and sent to peers while the caller hears the request
        // failed (and so records them again).
        for change in &changes {
            self.staged_state(&mut pending.states, &change.key)?;
        }
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            let state = self.staged_state(&mut pending.states, &change.key)?;
            let parents = state
                .heads
                .iter()
                .map(|h| h.id)
                .filter(|id| !change.unseen_heads.contains(id))
                .collect();
            let now = self.clock.now_ms();
            self.hlc = self
                .hlc
                .tick(change.made_at_ms.map_or(now, |at| at.min(now)));
            let seq = self.vv.get(&self.replica) + 1;
            let event = Event {
                id: EventId {
                    origin: self.replica,
                    seq,
                },
                hlc: self.hlc,
                key: change.key,
                parents,
                op: change.op,
            };
            self.stage_event(&event, pending)?;
            out.push(event);
        }
        Ok(out)
    }

    fn stage_remote(
        &mut self,
        events: Vec<Event>,
        pending: &mut Pending,
    ) -> Result<AppendOutcome, LogError> {
        let mut outcome = AppendOutcome::default();
        let now = self.clock.now_ms();
        // Every key's state first (reads that may fail): a failure then stages nothing of
        // the request, never only its first events (one taken without its content for
        // being superseded by a later one of the request would be left a head).
        for event in &events {
            if event.id.seq > self.vv.get(&event.id.origin) {
                self.staged_state(&mut pending.states, &event.key)?;
            }
        }
        for event in events {
            let held = self.vv.get(&event.id.origin);
            if event.id.seq <= held {
                outcome.duplicates += 1;
            } else if event.id.seq == held + 1 {
                self.warn_if_ahead(&event, now);
                self.hlc = self.hlc.observe(event.hlc, now);
                self.stage_event(&event, pending)?;
                outcome.appended.push(event.id);
            } else {
                outcome.out_of_order.push(event);
            }
        }
        Ok(outcome)
    }

    /// Warns, once per origin, when `event` is stamped more than
    /// [`CLOCK_AHEAD_WARNING_MS`] ahead of this machine's clock (`now`).
    fn warn_if_ahead(&mut self, event: &Event, now: u64) {
        let ahead = event.hlc.wall_ms.saturating_sub(now);
        if ahead > CLOCK_AHEAD_WARNING_MS && self.warned_ahead.insert(event.id.origin) {
            tracing::warn!(
                "replica {} stamped an event {:.1} hours ahead of this machine's clock (its \
                 clock is ahead, or one it followed is): new events here follow that clock, \
                 so last-write-wins between concurrent writes goes by event counters until \
                 the clocks agree; check the time on the machines",
                event.id.origin,
                ahead as f64 / 3_600_000.0
            );
        }
    }

    /// The state of `key` as this group commit will leave it: staged, else overlay, else tree.
    fn staged_state<'p>(
        &self,
        states: &'p mut HashMap<Key, KeyState>,
        key: &Key,
    ) -> Result<&'p mut KeyState, LogError> {
        use std::collections::hash_map::Entry;
        Ok(match states.entry(key.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(read_state(&self.overlay, &self.trees.state, key)?),
        })
    }

    /// Stages `event`. Its key's state must be staged already (both callers read it
    /// first): the read may fail, and a failure here would leave the event in its segment
    /// at an offset the next event takes too.
    fn stage_event(&mut self, event: &Event, pending: &mut Pending) -> Result<(), LogError> {
        let offset = self.next_offset;
        let segment = pending
            .open
            .get_or_insert_with(|| SegmentBuilder::new(offset));
        segment.push(event)?;
        if segment.is_full() {
            pending.seal();
        }
        self.staged_state(&mut pending.states, &event.key)?
            .fold(event, &self.vv);
        if event.id.seq % IDS_STRIDE == 1 {
            pending.ids.push((id_key(&event.id), offset));
        }
        pending.events += 1;
        self.vv.set(event.id.origin, event.id.seq);
        self.note_tip(event);
        self.next_offset += 1;
        Ok(())
    }

    /// Writes the staged events, flushes, then publishes the derived changes: nothing is
    /// visible to readers or acknowledged before it is durable.
    fn commit(&mut self, mut pending: Pending) -> Result<(), LogError> {
        if pending.events == 0 {
            return Ok(());
        }
        pending.seal();
        // Chunks first: sled may persist the log entries below at any moment, and an
        // event must never be durable without the content put before it.
        self.chunks.sync()?;
        self.db.usable()?;
        self.trees.log.apply_batch(pending.log)?;
        self.db.flush()?;
        self.since_checkpoint += pending.events as u64;
        if let Ok(mut overlay) = self.overlay.write() {
            overlay.states.extend(pending.states);
            overlay.ids.extend(pending.ids);
        }
        self.publish();
        Ok(())
    }

    /// Makes the committed events readable: the version vector, then the length, both
    /// under the vector's lock, so that [`EventLog::published`] reads them as a pair.
    fn publish(&self) {
        if let Ok(mut tips) = self.published_tips.write() {
            tips.clone_from(&self.tips);
        }
        let vv = self.published_vv.write();
        if let Ok(mut vv) = vv {
            vv.clone_from(&self.vv);
            self.published_len.send_replace(self.next_offset);
        } else {
            self.published_len.send_replace(self.next_offset);
        }
    }

    /// Moves the overlay into the derived trees, with the offset they now reflect.
    ///
    /// In batches of [`CHECKPOINT_BATCH`] entries, not one transaction: sled keeps the
    /// node copies of a write until no operation is under way, and a transaction over
    /// 40,000 keys (a folder of 40,000 small files) held 200 MiB of them. A flag written
    /// first and removed with the new offset covers the batches: a crash between them
    /// leaves it, and the next start derives the trees from the log again, as after an
    /// interrupted rebuild.
    ///
    /// Each batch leaves the overlay once it is in its tree (reads find it there from
    /// then on; only this thread changes the overlay), so that the overlay and sled's
    /// nodes for the same entries are not held at once: at the peak of a 100,000-file
    /// sync they were 21 and 22 MiB.
    fn checkpoint(&mut self) -> Result<(), LogError> {
        // Nothing is written once a flush has failed (see `Db::usable`).
        self.db.usable()?;
        {
            let overlay = self.overlay.read().map_err(|_| LogError::Closed)?;
            if overlay.states.is_empty() && overlay.ids.is_empty() && self.since_checkpoint == 0 {
                return Ok(());
            }
        }
        self.trees.meta.insert(META_CHECKPOINTING, &[1u8])?;
        self.db.flush()?;
        move_to_tree(
            &self.overlay,
            &self.trees.state,
            |o| &o.states,
            |o| &mut o.states,
            |key, state| Ok((IVec::from(key.as_str()), IVec::from(state.encode()?))),
        )?;
        move_to_tree(
            &self.overlay,
            &self.trees.ids,
            |o| &o.ids,
            |o| &mut o.ids,
            |k, offset| Ok((IVec::from(&k[..]), IVec::from(&offset.to_be_bytes()))),
        )?;
        let mut vv = Batch::default();
        for (origin, seq) in &self.vv.0 {
            vv.insert(&origin.0, &seq.to_be_bytes());
        }
        self.trees.vv.apply_batch(vv)?;
        let mut tips = Batch::default();
        for (origin, (seq, fingerprint)) in &self.tips {
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(&fingerprint.0);
            tips.insert(&origin.0, value);
        }
        self.trees.tips.apply_batch(tips)?;
        let mut meta = Batch::default();
        meta.insert(META_DERIVED_UPTO, &self.next_offset.to_be_bytes());
        meta.insert(META_HLC, encode_stored("hlc", &self.hlc)?);
        meta.remove(META_CHECKPOINTING);
        self.trees.meta.apply_batch(meta)?;
        self.db.flush()?;
        if let Ok(mut overlay) = self.overlay.write() {
            *overlay = Overlay::default();
        }
        self.since_checkpoint = 0;
        Ok(())
    }

    /// Folds log entries from `self.next_offset` (the checkpoint) to `end` into the overlay.
    fn refold_tail(&mut self, end: u64) -> Result<(), LogError> {
        let mut staged = Pending::default();
        for entry in LogIter::new(&self.trees.log, self.next_offset, end)? {
            let (offset, event) = entry?;
            self.hlc = self.hlc.max(event.hlc);
            self.staged_state(&mut staged.states, &event.key)?
                .fold(&event, &self.vv);
            if event.id.seq % IDS_STRIDE == 1 {
                staged.ids.push((id_key(&event.id), offset));
            }
            self.vv.set(event.id.origin, event.id.seq);
            self.note_tip(&event);
            self.next_offset = offset + 1;
            self.since_checkpoint += 1;
        }
        if let Ok(mut overlay) = self.overlay.write() {
            overlay.states.extend(staged.states);
            overlay.ids.extend(staged.ids);
        }
        Ok(())
    }

    /// Folds the whole log into the derived trees again, streaming the log in batches;
    /// the states (one per key) and the id index entries are what is held in memory.
    fn rebuild(&mut self) -> Result<u64, LogError> {
        // The fold first, in memory: a log that cannot be read to its end (damage, an
        // I/O error) leaves the projection as it was, and the caller puts back the clock
        // and the version vector the fold moved. Only then are the derived trees
        // rewritten, under the flag that has the next start rebuild them should that fail.
        let mut states: HashMap<Key, KeyState> = HashMap::new();
        let mut ids = Batch::default();
        let mut id_keys: HashSet<[u8; 24]> = HashSet::new();
        self.vv = VersionVector::new();
        self.tips = Tips::new();
        let mut folded = 0u64;
        let mut from = 0u64;
        // One thread reads and decodes the log while this one folds: the two halves of
        // the work take about as long as each other. The channel is bounded, so only a
        // few batches of events and the states (one per key) are ever in memory.
        let log = &self.trees.log;
        std::thread::scope(|scope| -> Result<(), LogError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<(u64, Event)>, LogError>>(4);
            scope.spawn(move || {
                let mut batch = Vec::with_capacity(REBUILD_BATCH);
                let entries = match LogIter::new(log, 0, u64::MAX) {
                    Ok(entries) => entries,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                for entry in entries {
                    match entry {
                        Ok(item) => batch.push(item),
                        Err(e) => return drop(tx.send(Err(e))),
                    }
                    if batch.len() == REBUILD_BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(REBUILD_BATCH));
                        if tx.send(Ok(full)).is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(batch));
            });
            for batch in rx {
                for (offset, event) in batch? {
                    if event.id.seq % IDS_STRIDE == 1 {
                        let key = id_key(&event.id);
                        ids.insert(&key[..], &offset.to_be_bytes());
                        id_keys.insert(key);
                    }
                    self.tips
                        .insert(event.id.origin, (event.id.seq, event.fingerprint()));
                    let (id, hlc) = (event.id, event.hlc);
                    match states.get_mut(&event.key) {
                        Some(state) => state.fold(&event, &self.vv),
                        None => {
                            let mut state = KeyState::default();
                            state.fold(&event, &self.vv);
                            states.insert(event.key, state);
                        }
                    }
                    self.vv.set(id.origin, id.seq);
                    self.hlc = self.hlc.max(hlc);
                    from = offset + 1;
                    folded += 1;
                }
            }
            Ok(())
        })?;
        self.trees.meta.insert(META_REBUILDING, &[1u8])?;
        self.db.flush()?;
        // Rewritten in place, never cleared: a reader (the overlay first, then the trees)
        // meets each key's state as it was or as rebuilt, never none, and a failure here
        // leaves the projection readable until the next start rebuilds it.
        let mut stale_ids = Batch::default();
        for key in self.trees.ids.iter().keys() {
            let key = key?;
            if <[u8; 24]>::try_from(&key[..]).map_or(true, |k| !id_keys.contains(&k)) {
                stale_ids.remove(key);
            }
        }
        let mut stale_states = Batch::default();
        for key in self.trees.state.iter().keys() {
            let key = key?;
            let live = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| Key::new(k).ok())
                .is_some_and(|k| states.contains_key(&k));
            if !live {
                stale_states.remove(key);
            }
        }
        self.trees.ids.apply_batch(ids)?;
        self.trees.ids.apply_batch(stale_ids)?;
        let states = states
            .into_iter()
            .map(|(key, state)| Ok((IVec::from(key.as_str()), IVec::from(state.encode()?))));
        insert_in_batches(&self.trees.state, states, 8192)?;
        self.trees.state.apply_batch(stale_states)?;
        // The overlay held the same states (the log up to the same offset), now in the
        // trees. The version vector's tree is read only at start, and the checkpoint
        // below writes it whole.
        if let Ok(mut overlay) = self.overlay.write() {
            *overlay = Overlay::default();
        }
        self.trees.vv.clear()?;
        self.trees.tips.clear()?;
        self.next_offset = from;
        self.since_checkpoint = 1; // forces the checkpoint below to write vv and the offset
        self.checkpoint()?;
        self.trees.meta.remove(META_REBUILDING)?;
        self.db.flush()?;
        Ok(folded)
    }
}

/// Moves the entries of one of the overlay's maps (`map`, `map_mut`) into `tree`,
/// [`CHECKPOINT_BATCH`] at a time as `entry` encodes them, each batch leaving the overlay
/// once it is in the tree, so that a reader (overlay first, then tree) finds every entry
/// in one or the other throughout (see `Writer::checkpoint`).
fn move_to_tree<K: Ord + Clone, V>(
    overlay: &RwLock<Overlay>,
    tree: &Tree,
    map: impl Fn(&Overlay) -> &BTreeMap<K, V>,
    map_mut: impl Fn(&mut Overlay) -> &mut BTreeMap<K, V>,
    entry: impl Fn(&K, &V) -> Result<(IVec, IVec), LogError>,
) -> Result<(), LogError> {
    loop {
        let mut batch = Batch::default();
        let keys: Vec<K> = {
            let overlay = overlay.read().map_err(|_| LogError::Closed)?;
            let part = map(&overlay).iter().take(CHECKPOINT_BATCH);
            part.map(|(k, v)| {
                let (key, value) = entry(k, v)?;
                batch.insert(key, value);
                Ok(k.clone())
            })
            .collect::<Result<_, LogError>>()?
        };
        if keys.is_empty() {
            return Ok(());
        }
        tree.apply_batch(batch)?;
        let mut overlay = overlay.write().map_err(|_| LogError::Closed)?;
        let map = map_mut(&mut overlay);
        for k in &keys {
            map.remove(k);
        }
    }
}

/// Inserts `entries` into `tree`, `per` to a sled batch: sled keeps the node copies a
/// batch replaces until it is done, so that one batch of everything held them all.
fn insert_in_batches(
    tree: &Tree,
    entries: impl Iterator<Item = Result<(IVec, IVec), LogError>>,
    per: usize,
) -> Result<(), LogError> {
    let mut batch = Batch::default();
    for (i, entry) in entries.enumerate() {
        let (key, value) = entry?;
        batch.insert(key, value);
        if i % per == per - 1 {
            tree.apply_batch(std::mem::take(&mut batch))?;
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}

impl Pending {
    /// Closes the segment being filled; the next staged event starts a new one.
    fn seal(&mut self) {
        if let Some(segment) = self.open.take().filter(|s| !s.is_empty()) {
            let (key, value) = segment.finish();
            self.log.insert(&key, value);
        }
    }
}

/// An event as the log stores it (see [`EventLog::read_raw_unless`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEvent {
    /// Its offset in the log.
    pub offset: u64,
    /// Its id.
    pub id: EventId,
    /// Its encoding, as [`converge_api::codec::encode_event`] wrote it.
    pub bytes: Vec<u8>,
}

/// The events at offsets `from..end`, read segment by segment.
struct LogIter {
    entries: sled::Iter,
    segment: Option<SegmentReader>,
    from: u64,
    end: u64,
}

impl LogIter {
    fn new(log: &Tree, from: u64, end: u64) -> Result<LogIter, LogError> {
        // The segment holding `from` is the last one starting at or before it.
        let start = match log.range(..=from.to_be_bytes()).next_back().transpose()? {
            Some((key, _)) => key,
            None => IVec::from(&from.to_be_bytes()),
        };
        Ok(LogIter {
            entries: log.range(start..),
            segment: None,
            from,
            end,
        })
    }
}

impl LogIter {
    /// The next item `take` makes of the segment holding the next offset, from `from`
    /// to `end`.
    fn advance<T>(
        &mut self,
        mut take: impl FnMut(&mut SegmentReader) -> Option<Result<T, LogError>>,
    ) -> Option<Result<T, LogError>> {
        loop {
            if let Some(segment) = &mut self.segment {
                if segment.offset() >= self.end {
                    return None;
                }
                if segment.offset() < self.from {
                    match segment.next_raw() {
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Some(Err(e)),
                        None => {}
                    }
                } else if let Some(item) = take(segment) {
                    return Some(item);
                }
            }
            self.segment = match self.entries.next()? {
                Ok((key, value)) => match SegmentReader::new(&key, value) {
                    Ok(segment) => Some(segment),
                    Err(e) => return Some(Err(e)),
                },
                Err(e) => return Some(Err(e.into())),
            };
        }
    }
}

impl Iterator for LogIter {
    type Item = Result<(u64, Event), LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.advance(SegmentReader::next_event)
    }
}

/// Merges the checkpointed states (sled, in key order) with the overlay (in key order).
struct StatesIter {
    tree: std::iter::Peekable<sled::Iter>,
    overlay: std::iter::Peekable<std::collections::btree_map::IntoIter<Key, KeyState>>,
}

impl Iterator for StatesIter {
    type Item = Result<(Key, KeyState), LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        let order = match (self.tree.peek(), self.overlay.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) | (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(Ok((k, _))), Some((ok, _))) => k.as_ref().cmp(ok.as_str().as_bytes()),
        };
        match order {
            Ordering::Greater => self.overlay.next().map(Ok),
            Ordering::Equal => {
                self.tree.next();
                self.overlay.next().map(Ok)
            }
            Ordering::Less => self.tree.next().map(|entry| {
                let (k, v) = entry?;
                let key = std::str::from_utf8(&k)
                    .ok()
                    .and_then(|s| Key::new(s).ok())
                    .ok_or_else(|| LogError::Corrupt {
                        what: format!("state key {:?}", String::from_utf8_lossy(&k)),
                        source: converge_api::CodecError::Malformed("not a valid key".into()),
                    })?;
                Ok((key, KeyState::decode(&k, &v)?))
            }),
        }
    }
}

/// How the pack directories of temporary logs are named in the temp dir, followed by
/// the process id and a random number.
const TEMPORARY_PACKS: &str = "converge-packs-";

/// Removes the pack directories that temporary logs of processes no longer running left
/// in `temp`. A temporary log removes its own when dropped, but a process that exits
/// while another thread still holds the log (a test's server task, say) drops nothing,
/// and test runs left 8 MiB each so. Only where `/proc` tells which processes run
/// (Linux); a directory whose process runs, or whose name says none, stays. Failures
/// are ignored: another process may be removing the same directory.
fn remove_stale_packs(temp: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMPORARY_PACKS))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The durable state of `key`: the overlay's if it has one, else the tree's.
fn read_state(overlay: &RwLock<Overlay>, tree: &Tree, key: &Key) -> Result<KeyState, LogError> {
    if let Some(state) = overlay.read().ok().and_then(|o| o.states.get(key).cloned()) {
        return Ok(state);
    }
    match tree.get(key.as_str())? {
        Some(v) => KeyState::decode(key.as_str().as_bytes(), &v),
        None => Ok(KeyState::default()),
    }
}

impl Request {
    fn size(&self) -> usize {
        match self {
            Request::Local(c, _) => c.len(),
            Request::Remote(e, _) => e.len(),
            Request::Rebuild(_) => MAX_COMMIT_EVENTS,
        }
    }
}

enum Reply {
    Local(
        Result<Vec<Event>, LogError>,
        oneshot::Sender<Result<Vec<Event>, LogError>>,
    ),
    Remote(
        Result<AppendOutcome, LogError>,
        oneshot::Sender<Result<AppendOutcome, LogError>>,
    ),
}

/// Answers every request of a group commit: with its own result if the commit succeeded,
/// with the commit's error otherwise. Nothing is acknowledged before the flush.
fn finish(replies: Vec<Reply>, failure: Option<&LogError>) {
    let fail = |e: &LogError| LogError::CommitFailed(e.to_string());
    for reply in replies {
        match reply {
            Reply::Local(result, tx) => {
                let _ = tx.send(match failure {
                    Some(e) => Err(fail(e)),
                    None => result,
                });
            }
            Reply::Remote(result, tx) => {
                let _ = tx.send(match failure {
                    Some(e) => Err(fail(e)),
                    None => result,
                });
            }
        }
    }
}

fn id_key(id: &EventId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&id.origin.0);
    k[16..].copy_from_slice(&id.seq.to_be_bytes());
    k
}

fn u64_from(what: &str, bytes: &[u8]) -> Result<u64, LogError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| LogError::Corrupt {
            what: what.into(),
            source: converge_api::CodecError::Malformed(format!(
                "{} bytes, expected 8",
                bytes.len()
            )),
        })
}

/// A `tips` entry's value: the seq (8 bytes, big-endian), then the fingerprint.
fn tip_from(bytes: &[u8]) -> Result<(u64, converge_api::Hash), LogError> {
    let corrupt = || LogError::Corrupt {
        what: "tips".into(),
        source: converge_api::CodecError::Malformed(format!("{} bytes, expected 40", bytes.len())),
    };
    let (seq, fingerprint) = bytes.split_at_checked(8).ok_or_else(corrupt)?;
    let seq = u64_from("tips", seq)?;
    let fingerprint = <[u8; 32]>::try_from(fingerprint).map_err(|_| corrupt())?;
    Ok((seq, converge_api::Hash(fingerprint)))
}

fn replica_from(bytes: &IVec) -> Result<ReplicaId, LogError> {
    <[u8; 16]>::try_from(bytes.as_ref())
        .map(ReplicaId)
        .map_err(|_| LogError::Corrupt {
            what: "vv origin".into(),
            source: converge_api::CodecError::Malformed(format!(
                "{} bytes, expected 16",
                bytes.len()
            )),
        })
}

fn decode_stored<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, LogError> {
    codec::decode(bytes).map_err(|source| LogError::Corrupt {
        what: what.into(),
        source,
    })
}

fn encode_stored<T: serde::Serialize>(what: &str, value: &T) -> Result<Vec<u8>, LogError> {
    codec::encode(value).map_err(|source| LogError::Encode {
        what: what.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use converge_api::Op;

    /// A log written as a folder's first sync writes it (thousands of events, one
    /// commit after another) has pages sled writes as blob files; each of them, at the
    /// length it has, was synced by the last flush.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_blob_sled_wrote_is_synced_by_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(LogConfig::new(dir.path())).unwrap();
        for batch in 0..40 {
            let changes = (0..1000)
                .map(|i| {
                    let name = format!(
                        "d{:03}/s{:03}/a-file-name-long-enough-{batch:03}-{i:03}.bin",
                        i % 10,
                        batch
                    );
                    let op = Op::Put {
                        meta: converge_api::Meta::file(1_700_000_000_000 + i),
                        content: Some(converge_api::ContentRef {
                            root: converge_api::Hash::of(name.as_bytes()),
                            size: 4096,
                            depth: 0,
                        }),
                    };
                    LocalChange::new(Key::new(&name).unwrap(), op)
                })
                .collect();
            log.append_local(changes).await.unwrap();
        }
        log.flush().await.unwrap();
        let blobs_dir = dir.path().join("blobs");
        let on_disk: HashMap<std::ffi::OsString, u64> = std::fs::read_dir(&blobs_dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name(), e.metadata().unwrap().len())
            })
            .collect();
        assert!(
            !on_disk.is_empty(),
            "sled wrote no blob: the test shows nothing"
        );
        let synced = log
            .shared
            .db
            .blobs
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .synced
            .clone();
        assert_eq!(synced, on_disk);
        log.close().await.unwrap();
    }

    /// Opening a temporary log removes the pack directories of temporary logs whose
    /// processes are gone, and leaves those of running processes and other directories.
    #[tokio::test]
    async fn a_temporary_log_removes_packs_that_exited_processes_left() {
        let temp = std::env::temp_dir();
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        exited.wait().unwrap();
        let stale = temp.join(format!("{TEMPORARY_PACKS}{}-00000000000000aa", exited.id()));
        let running = temp.join(format!("{TEMPORARY_PACKS}1-00000000000000bb"));
        let other = temp.join(format!("{TEMPORARY_PACKS}not-a-pid"));
        for dir in [&stale, &running, &other] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("pack-00000001"), b"chunks").unwrap();
        }
        let log = EventLog::open(LogConfig::temporary()).unwrap();
        assert!(!stale.exists(), "{} stayed", stale.display());
        assert!(running.exists(), "process 1's packs went");
        assert!(other.exists());
        log.close().await.unwrap();
        std::fs::remove_dir_all(&running).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    /// A local change made without seeing a peer's head is concurrent with it: both stay
    /// heads, for the conflict policy to decide; a plain one supersedes every head.
    #[tokio::test]
    async fn a_change_made_without_seeing_a_head_is_concurrent_with_it() {
        let log = EventLog::open(LogConfig::temporary()).unwrap();
        let key = Key::new("f.txt").unwrap();
        let put = |mtime| Op::Put {
            content: None,
            meta: converge_api::Meta::file(mtime),
        };
        let first = log
            .append_local(vec![LocalChange::new(key.clone(), put(1))])
            .await
            .unwrap();
        let peers = Event {
            id: EventId {
                origin: ReplicaId([9; 16]),
                seq: 1,
            },
            hlc: converge_api::Hlc {
                wall_ms: 2,
                logical: 0,
            },
            key: key.clone(),
            parents: vec![first[0].id],
            op: put(2),
        };
        log.append(vec![peers.clone()]).await.unwrap();
        let edit = log
            .append_local(vec![
                LocalChange::new(key.clone(), put(3)).without_seeing(vec![peers.id])
            ])
            .await
            .unwrap();
        assert!(edit[0].parents.is_empty(), "{:?}", edit[0].parents);
        let mut heads: Vec<EventId> = log.heads(&key).unwrap().iter().map(|h| h.id).collect();
        heads.sort();
        let mut expected = vec![peers.id, edit[0].id];
        expected.sort();
        assert_eq!(heads, expected);

        let last = log
            .append_local(vec![LocalChange::new(key.clone(), put(4))])
            .await
            .unwrap();
        let heads: Vec<EventId> = log.heads(&key).unwrap().iter().map(|h| h.id).collect();
        assert_eq!(heads, vec![last[0].id]);
    }

    /// A blob synced while it was being written is synced again once it has grown, and
    /// one removed is forgotten.
    #[test]
    fn a_blob_that_grew_is_synced_again_and_one_removed_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut blobs = Blobs {
            dir: dir.path().join("blobs"),
            synced: HashMap::new(),
        };
        blobs.sync().unwrap();
        assert!(blobs.synced.is_empty());
        std::fs::create_dir(&blobs.dir).unwrap();
        std::fs::write(blobs.dir.join("100"), b"abc").unwrap();
        std::fs::write(blobs.dir.join("200"), b"de").unwrap();
        blobs.sync().unwrap();
        let expected = |pairs: &[(&str, u64)]| -> HashMap<std::ffi::OsString, u64> {
            pairs.iter().map(|(n, l)| (n.into(), *l)).collect()
        };
        assert_eq!(blobs.synced, expected(&[("100", 3), ("200", 2)]));
        std::fs::write(blobs.dir.join("100"), b"abcdef").unwrap();
        std::fs::remove_file(blobs.dir.join("200")).unwrap();
        blobs.sync().unwrap();
        assert_eq!(blobs.synced, expected(&[("100", 6)]));
    }
}
