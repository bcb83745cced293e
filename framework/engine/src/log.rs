//! The event log on sled: the single source of truth of a replica.
//!
//! Trees (DESIGN §3): `log` (offset → event), `ids` ((origin, seq) → offset), `vv`
//! (origin → highest contiguous seq), `cursors` (subscriber → next offset to process),
//! `state` (key → heads; derived), `chunks` (hash → bytes) and `meta` (identity, clock).
//!
//! Every append goes through one writer thread. It drains the queue of waiting requests,
//! writes them in one sled transaction over `log`, `ids`, `vv`, `state` and `meta`,
//! flushes once, and only then answers every request of the batch (group commit). It runs
//! on its own OS thread so sled's writes and flushes never block the async runtime.
//! Subscribers learn of new durable entries through [`EventLog::subscribe`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use converge_api::{codec, Event, EventId, Head, Hlc, Key, Op, ReplicaId, SystemClock, VersionVector, WallClock};
use sled::transaction::{TransactionError, Transactional};
use sled::{Batch, IVec, Tree};
use tokio::sync::{mpsc, oneshot, watch};

use crate::content::ChunkStore;
use crate::error::LogError;
use crate::projection::KeyState;

/// Most events written in one group commit; more requests wait for the next one.
const MAX_COMMIT_EVENTS: usize = 8192;

/// Events read per batch while rebuilding, so the log is never held in memory whole.
const REBUILD_READ_BATCH: usize = 16 * 1024;

const META_REPLICA: &[u8] = b"replica";
const META_HLC: &[u8] = b"hlc";
const META_REBUILDING: &[u8] = b"rebuilding";

/// A local change for [`EventLog::append_local`]: the log fills in id, clock and parents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalChange {
    /// The key changed.
    pub key: Key,
    /// What happened to it.
    pub op: Op,
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
    clock: Arc<dyn WallClock>,
}

impl LogConfig {
    /// A log stored in the directory `path` (created if missing).
    pub fn new(path: impl AsRef<Path>) -> Self {
        LogConfig {
            sled: sled::Config::new().path(path.as_ref()).cache_capacity(256 << 20),
            clock: Arc::new(SystemClock),
        }
    }

    /// A log in a temporary directory removed when the log is dropped (tests, demos).
    pub fn temporary() -> Self {
        LogConfig { sled: sled::Config::new().temporary(true), clock: Arc::new(SystemClock) }
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
    db: sled::Db,
    trees: Trees,
    chunks: ChunkStore,
    replica: ReplicaId,
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    durable_len: watch::Receiver<u64>,
    durable_vv: Arc<RwLock<VersionVector>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Clone)]
struct Trees {
    log: Tree,
    ids: Tree,
    vv: Tree,
    cursors: Tree,
    state: Tree,
    meta: Tree,
}

enum Request {
    Local(Vec<LocalChange>, oneshot::Sender<Result<Vec<Event>, LogError>>),
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
        let db = config.sled.open()?;
        let trees = Trees {
            log: db.open_tree("log")?,
            ids: db.open_tree("ids")?,
            vv: db.open_tree("vv")?,
            cursors: db.open_tree("cursors")?,
            state: db.open_tree("state")?,
            meta: db.open_tree("meta")?,
        };
        let chunks = ChunkStore::new(db.open_tree("chunks")?);
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
        let next_offset = match trees.log.last()? {
            Some((k, _)) => u64_from("log offset", &k)? + 1,
            None => 0,
        };

        let (len_tx, durable_len) = watch::channel(next_offset);
        let durable_vv = Arc::new(RwLock::new(vv.clone()));
        let mut writer = Writer {
            trees: trees.clone(),
            db: db.clone(),
            replica,
            clock: config.clock,
            hlc,
            vv,
            next_offset,
            published_len: len_tx,
            published_vv: durable_vv.clone(),
        };
        // A rebuild that a crash interrupted left the projection half-written: redo it.
        if trees.meta.contains_key(META_REBUILDING)? {
            writer.rebuild()?;
        }

        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            db,
            trees,
            chunks,
            replica,
            requests: Mutex::new(Some(tx)),
            durable_len,
            durable_vv,
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

    /// Whether the log holds no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The version vector of the durable log.
    pub fn version_vector(&self) -> VersionVector {
        self.shared.durable_vv.read().map(|vv| vv.clone()).unwrap_or_default()
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
        self.shared.requests.lock().ok().and_then(|s| s.clone()).ok_or(LogError::Closed)
    }

    /// Appends local changes as new events of this replica (seq, clock and parents filled
    /// in: the parents are the key's current heads). Returns once they are durable.
    pub async fn append_local(&self, changes: Vec<LocalChange>) -> Result<Vec<Event>, LogError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(Request::Local(changes, tx)).await.map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Appends events from any origin, idempotently and in each origin's seq order.
    /// Returns once the appended ones are durable.
    pub async fn append(&self, events: Vec<Event>) -> Result<AppendOutcome, LogError> {
        if events.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(Request::Remote(events, tx)).await.map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Drops the projection and folds the whole log into it again, with appends held off
    /// meanwhile. Returns the number of events folded.
    pub async fn rebuild(&self) -> Result<u64, LogError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(Request::Rebuild(tx)).await.map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Up to `limit` durable events from offset `from` on, with their offsets.
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<(u64, Event)>, LogError> {
        let end = self.len();
        let mut out = Vec::with_capacity(limit.min(4096));
        for entry in self.shared.trees.log.range(from.to_be_bytes()..end.to_be_bytes()).take(limit) {
            let (k, v) = entry?;
            let offset = u64_from("log offset", &k)?;
            out.push((offset, decode_event(offset, &v)?));
        }
        Ok(out)
    }

    /// The offset of the event `id`, if the log holds it.
    pub fn offset_of(&self, id: &EventId) -> Result<Option<u64>, LogError> {
        match self.shared.trees.ids.get(id_key(id))? {
            Some(v) => Ok(Some(u64_from("ids", &v)?)),
            None => Ok(None),
        }
    }

    /// The event `id`, if the log holds it.
    pub fn get(&self, id: &EventId) -> Result<Option<Event>, LogError> {
        let Some(offset) = self.offset_of(id)? else { return Ok(None) };
        match self.shared.trees.log.get(offset.to_be_bytes())? {
            Some(v) => Ok(Some(decode_event(offset, &v)?)),
            None => Ok(None),
        }
    }

    /// The current state (heads) of `key`; empty if the log has no event on it.
    pub fn state(&self, key: &Key) -> Result<KeyState, LogError> {
        match self.shared.trees.state.get(key.as_str())? {
            Some(v) => KeyState::decode(key.as_str().as_bytes(), &v),
            None => Ok(KeyState::default()),
        }
    }

    /// The heads of `key`.
    pub fn heads(&self, key: &Key) -> Result<Vec<Head>, LogError> {
        Ok(self.state(key)?.heads)
    }

    /// Every key with its state, in key order (the whole projection, streamed).
    pub fn states(&self) -> impl Iterator<Item = Result<(Key, KeyState), LogError>> + '_ {
        self.shared.trees.state.iter().map(|entry| {
            let (k, v) = entry?;
            let key = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| Key::new(s).ok())
                .ok_or_else(|| LogError::Corrupt {
                    what: format!("state key {:?}", String::from_utf8_lossy(&k)),
                    source: converge_api::CodecError::Malformed("not a valid key".into()),
                })?;
            let state = KeyState::decode(&k, &v)?;
            Ok((key, state))
        })
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
            out.insert(String::from_utf8_lossy(&k).into_owned(), u64_from("cursor", &v)?);
        }
        Ok(out)
    }

    /// Durably sets subscriber `name`'s cursor (after it processed everything before
    /// `next`, or to rewind it for a replay). Flushes on a blocking thread.
    pub async fn set_cursor(&self, name: &str, next: u64) -> Result<(), LogError> {
        self.shared.trees.cursors.insert(name, &next.to_be_bytes())?;
        self.flush().await
    }

    /// Makes every write so far durable (chunks put into the content store included).
    pub async fn flush(&self) -> Result<(), LogError> {
        let db = self.shared.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
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
            tokio::task::spawn_blocking(move || handle.join()).await.map_err(|_| LogError::Closed)?.ok();
        }
        self.flush().await
    }
}

/// The writer thread's state: everything an append needs, owned by one thread.
struct Writer {
    trees: Trees,
    db: sled::Db,
    replica: ReplicaId,
    clock: Arc<dyn WallClock>,
    hlc: Hlc,
    vv: VersionVector,
    next_offset: u64,
    published_len: watch::Sender<u64>,
    published_vv: Arc<RwLock<VersionVector>>,
}

/// What one group commit will write, built before the transaction so that the
/// transaction closure only applies ready batches.
#[derive(Default)]
struct Pending {
    log: Batch,
    ids: Batch,
    states: HashMap<Key, KeyState>,
    vv_touched: Vec<ReplicaId>,
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
        }
    }

    fn commit_batch(&mut self, batch: Vec<Request>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut pending = Pending::default();
        let saved = (self.hlc, self.vv.clone(), self.next_offset);
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
                    if let Err(e) = &staged {
                        self.hlc = saved.0;
                        self.vv = saved.1.clone();
                        self.next_offset = saved.2;
                        tracing::error!("group commit failed: {e}");
                    }
                    finish(std::mem::take(&mut replies), staged.as_ref().err());
                    let _ = reply.send(self.rebuild());
                }
            }
        }
        let result = self.commit(pending);
        if let Err(e) = &result {
            tracing::error!("group commit failed: {e}");
            self.hlc = saved.0;
            self.vv = saved.1;
            self.next_offset = saved.2;
        }
        finish(replies, result.as_ref().err());
    }

    fn stage_local(&mut self, changes: Vec<LocalChange>, pending: &mut Pending) -> Result<Vec<Event>, LogError> {
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            let state = staged_state(&self.trees.state, &mut pending.states, &change.key)?;
            let parents = state.heads.iter().map(|h| h.id).collect();
            self.hlc = self.hlc.tick(self.clock.now_ms());
            let seq = self.vv.get(&self.replica) + 1;
            let event = Event {
                id: EventId { origin: self.replica, seq },
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

    fn stage_remote(&mut self, events: Vec<Event>, pending: &mut Pending) -> Result<AppendOutcome, LogError> {
        let mut outcome = AppendOutcome::default();
        let now = self.clock.now_ms();
        for event in events {
            let held = self.vv.get(&event.id.origin);
            if event.id.seq <= held {
                outcome.duplicates += 1;
            } else if event.id.seq == held + 1 {
                self.hlc = self.hlc.observe(event.hlc, now);
                self.stage_event(&event, pending)?;
                outcome.appended.push(event.id);
            } else {
                outcome.out_of_order.push(event);
            }
        }
        Ok(outcome)
    }

    fn stage_event(&mut self, event: &Event, pending: &mut Pending) -> Result<(), LogError> {
        let bytes = codec::encode_event(event)
            .map_err(|source| LogError::Encode { what: format!("event {:?}", event.id), source })?;
        let offset = self.next_offset;
        staged_state(&self.trees.state, &mut pending.states, &event.key)?.fold(event, &self.vv);
        pending.log.insert(&offset.to_be_bytes(), bytes);
        pending.ids.insert(id_key(&event.id).to_vec(), &offset.to_be_bytes());
        if !pending.vv_touched.contains(&event.id.origin) {
            pending.vv_touched.push(event.id.origin);
        }
        pending.events += 1;
        self.vv.set(event.id.origin, event.id.seq);
        self.next_offset += 1;
        Ok(())
    }

    fn commit(&mut self, pending: Pending) -> Result<(), LogError> {
        if pending.events == 0 {
            return Ok(());
        }
        let mut vv = Batch::default();
        for origin in &pending.vv_touched {
            vv.insert(&origin.0, &self.vv.get(origin).to_be_bytes());
        }
        let mut state = Batch::default();
        for (key, s) in &pending.states {
            state.insert(key.as_str(), s.encode()?);
        }
        let mut meta = Batch::default();
        meta.insert(META_HLC, encode_stored("hlc", &self.hlc)?);
        let trees = &self.trees;
        (&trees.log, &trees.ids, &trees.vv, &trees.state, &trees.meta)
            .transaction(|(log, ids, vvt, st, me)| {
                log.apply_batch(&pending.log)?;
                ids.apply_batch(&pending.ids)?;
                vvt.apply_batch(&vv)?;
                st.apply_batch(&state)?;
                me.apply_batch(&meta)?;
                Ok(())
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => LogError::Storage(e),
                TransactionError::Abort(()) => LogError::Closed,
            })?;
        self.db.flush()?;
        // Publish before anyone is answered, so an acknowledged event is readable.
        if let Ok(mut vv) = self.published_vv.write() {
            vv.clone_from(&self.vv);
        }
        self.published_len.send_replace(self.next_offset);
        Ok(())
    }

    /// Drops the projection and folds the whole log into it, streaming the log in batches.
    fn rebuild(&mut self) -> Result<u64, LogError> {
        self.trees.meta.insert(META_REBUILDING, &[1u8])?;
        self.db.flush()?;
        self.trees.state.clear()?;
        let mut states: HashMap<Key, KeyState> = HashMap::new();
        let mut known = VersionVector::new();
        let mut folded = 0u64;
        let mut from = 0u64;
        loop {
            let mut read = 0;
            for entry in self.trees.log.range(from.to_be_bytes()..).take(REBUILD_READ_BATCH) {
                let (k, v) = entry?;
                let offset = u64_from("log offset", &k)?;
                let event = decode_event(offset, &v)?;
                states.entry(event.key.clone()).or_default().fold(&event, &known);
                known.set(event.id.origin, event.id.seq);
                from = offset + 1;
                read += 1;
            }
            folded += read as u64;
            if read < REBUILD_READ_BATCH {
                break;
            }
        }
        let mut batch = Batch::default();
        let mut in_batch = 0;
        for (key, state) in states {
            batch.insert(key.as_str(), state.encode()?);
            in_batch += 1;
            if in_batch == 4096 {
                self.trees.state.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        self.trees.state.apply_batch(batch)?;
        self.trees.meta.remove(META_REBUILDING)?;
        self.db.flush()?;
        Ok(folded)
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
    Local(Result<Vec<Event>, LogError>, oneshot::Sender<Result<Vec<Event>, LogError>>),
    Remote(Result<AppendOutcome, LogError>, oneshot::Sender<Result<AppendOutcome, LogError>>),
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

/// The state of `key` as this group commit will leave it, loaded from the tree on first use.
fn staged_state<'p>(
    tree: &Tree,
    states: &'p mut HashMap<Key, KeyState>,
    key: &Key,
) -> Result<&'p mut KeyState, LogError> {
    use std::collections::hash_map::Entry;
    Ok(match states.entry(key.clone()) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(match tree.get(key.as_str())? {
            Some(v) => KeyState::decode(key.as_str().as_bytes(), &v)?,
            None => KeyState::default(),
        }),
    })
}

fn id_key(id: &EventId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&id.origin.0);
    k[16..].copy_from_slice(&id.seq.to_be_bytes());
    k
}

fn u64_from(what: &str, bytes: &[u8]) -> Result<u64, LogError> {
    <[u8; 8]>::try_from(bytes).map(u64::from_be_bytes).map_err(|_| LogError::Corrupt {
        what: what.into(),
        source: converge_api::CodecError::Malformed(format!("{} bytes, expected 8", bytes.len())),
    })
}

fn replica_from(bytes: &IVec) -> Result<ReplicaId, LogError> {
    <[u8; 16]>::try_from(bytes.as_ref()).map(ReplicaId).map_err(|_| LogError::Corrupt {
        what: "vv origin".into(),
        source: converge_api::CodecError::Malformed(format!("{} bytes, expected 16", bytes.len())),
    })
}

fn decode_event(offset: u64, bytes: &[u8]) -> Result<Event, LogError> {
    codec::decode_event(bytes).map_err(|source| LogError::Corrupt { what: format!("log/{offset}"), source })
}

fn decode_stored<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, LogError> {
    codec::decode(bytes).map_err(|source| LogError::Corrupt { what: what.into(), source })
}

fn encode_stored<T: serde::Serialize>(what: &str, value: &T) -> Result<Vec<u8>, LogError> {
    codec::encode(value).map_err(|source| LogError::Encode { what: what.into(), source })
}
