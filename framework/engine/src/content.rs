//! The content store: chunks addressed by their BLAKE3 hash.
//!
//! Chunk bytes are appended to *pack files* in a directory beside the log's database;
//! sled holds only an index, hash → (pack, offset, length), 16 bytes a chunk. Keeping the
//! bytes out of sled matters twice: sled copies a leaf node on every insert, which with
//! 16 KiB values made storing a large file cost many times its size in copying, and sled's
//! cache held the chunks written, so memory grew with the file. Pack reads go through the
//! kernel's page cache instead. For the same reason a large file's index entries are kept
//! out of sled too, in sorted *run* files beside the packs, of which memory holds under
//! 1.4 bytes an entry: a Bloom filter and one hash prefix a block (see the `runs` module).
//!
//! Durability follows the log's group commit. A chunk put is written to the current pack
//! and kept in a *staged* list that lookups consult; [`ChunkStore::sync`], which the log
//! calls before every flush, makes the pack durable and only then moves the staged entries
//! into the index (or, for more than a few at once, into one *manifest* first, indexed
//! once the store has been quiet for a moment; for many, into a run; see
//! [`ChunkStore::sync`]). A put that leaves many chunks staged syncs the store itself, so
//! that a large file's entries are written out a part at a time as it is stored. So an index
//! entry never outlives its bytes in a crash, and an event is acknowledged only after the
//! chunks put before it are durable. A chunk staged but not synced when the process dies
//! is simply missing afterwards (and fetched again). A new pack is started at every open,
//! so nothing is ever appended after bytes a crash may have torn.
//!
//! A sync that fails is not tried again on the same packs: after a failed `fdatasync`
//! Linux may mark the pages it could not write clean, and a second sync then succeeds
//! with the bytes never on disk. The packs it covered are written to no more and no
//! longer trusted, and the next sync first writes the chunks staged in them again,
//! appended to the current pack (never one of those), read back and checked. File
//! systems that keep the pages a failed writeback left (ext4) give them back from the
//! page cache; where they are dropped (XFS), or a chunk reads wrong, it is lost, and
//! the store refuses to sync until it is opened again, so that no event naming it is
//! made durable (staged chunks are then simply missing: the source stores them again,
//! peers send them again).
//!
//! Every chunk is checked once on its way in: hashed from the file by the source that
//! puts it, or checked against its hash when a peer offers it. Reads from the packs this
//! process wrote (and has not lent, see below, nor given up after a failure, see above)
//! are trusted on that ground and not hashed again; reads from the packs of earlier runs,
//! which a crash or the disk may have damaged since, are checked, so a damaged pack reads
//! as an error, never as wrong content. A
//! file's data can be copied out of the trusted packs by the kernel ([`Piece::InPack`]),
//! without passing through memory, where the run lines up with the file's pages.
//!
//! The locations the last syncs indexed are also kept in memory, two bounded generations
//! of them: the chunks just stored are the ones read next (written out by a store, sent to
//! a peer), and each such read would otherwise be a sled lookup.
//!
//! Chunks put by this replica (not those received from peers) are also handed, in
//! batches and with a copy of their bytes, to a *fresh-chunk sink* when one is set: the
//! engine pushes them to connected peers while a large file is still being chunked,
//! before the event that names them exists, so content streams instead of waiting for
//! the peer's request. The log calls
//! [`ChunkStore::flush_fresh`] before each local append, so a batch's chunks are always
//! handed on before its events.
//!
//! A large file's data chunks carry their [`Place`] in it (a stream named by the
//! replica that cut the file, and an offset). A peer's chunks pushed with a place are
//! written at that offset into a pack of their own, a *stream pack*, instead of being
//! appended to the shared one; once a stream pack holds exactly a content's data, from
//! its first byte to its last, the folder store can take it as the file
//! ([`ChunkStore::lend`]: a hard link, no copy). A lent pack is the folder's file too, so
//! anyone may change it from then on: its chunks are checked on every read, like an
//! earlier run's, and a chunk changed since reads as damaged and is fetched again.
//!
//! The other way round, a large file of the folder that this replica chunks is not copied
//! into a pack: the store takes the file itself as a pack, *adopted* ([`ChunkStore::adopt`],
//! a hard link), and records where its chunks lie in it. It is read like a lent pack,
//! every chunk checked, and its data is synced like a pack's before the index names it. A
//! large file thus costs its size once on the replica that has it, not twice. Such a file
//! is its owner's to change, and a change is an event of its own that supersedes the
//! content it loses; so a chunk is left in a file of the folder (adopted or lent) only
//! while that file alone needs it. When other content holds it too (a copy of the file,
//! or a file that shares part of it), the store writes it into a pack of its own:
//! chunking a file, it never records a chunk held in another file of the folder, and
//! never moves one out of its own packs (see [`ChunkStore::put_adopted_at`]). A pack is
//! taken for such a file, in an earlier run, when it has more than one link.
//!
//! Chunks are never removed yet (no garbage collection), as before with the sled tree.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use converge_api::content::IndexNode;
use converge_api::{ContentRef, Hash, Place};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use sled::Tree;

use crate::error::LogError;

/// A map keyed by chunk hashes, for the engine's bookkeeping of chunks: foldhash, not
/// std's SipHash, which was a visible share of a large transfer's CPU. The keys are BLAKE3
/// hashes, and foldhash is seeded at random: chosen keys cannot degrade it. (This module's
/// own maps, keyed by hashes and pack numbers, use foldhash throughout.)
pub(crate) type ChunkMap<V> = HashMap<Hash, V>;

/// A set of chunk hashes (see [`ChunkMap`]).
pub(crate) type ChunkSet = HashSet<Hash>;

mod runs;
use runs::Runs;

/// A pack is closed and a new one started once it holds this many bytes.
const PACK_BYTES: u64 = 1 << 30;

/// Index entries written per sled batch by [`ChunkStore::sync`].
const INDEX_BATCH: usize = 256;

/// A sync with at least this many chunks to record writes them as one manifest, indexed
/// later (see [`ChunkStore::sync`]).
const MANIFEST_ENTRIES: usize = 64;

/// A sync with at least this many chunks to record writes them as a run, on disk, rather
/// than into sled (see the `runs` module): a large file's locations, which in sled would
/// grow the daemon's memory with the file.
const RUN_ENTRIES: usize = 4096;

/// A put that leaves this many chunks staged syncs the store itself (about 256 MiB of data
/// at the average chunk size): a large file's locations then wait in memory a part at a
/// time, each part written out as a run, never the whole file's at once.
const SPILL_ENTRIES: usize = 1 << 14;

/// Chunks held in manifests and in memory at most: a sync that finds this many indexes
/// them itself (a few MiB; about 1 GiB of data at the average chunk size).
const UNINDEXED_MAX: usize = 1 << 16;

/// How long the store must have been out of use (no sync, no lookup) before its
/// manifests are indexed on a thread of their own.
const INDEX_QUIET: Duration = Duration::from_secs(1);

/// Bytes of one manifest entry: a hash and its encoded [`Location`].
const MANIFEST_ENTRY_BYTES: usize = 32 + 16;

/// Entries of one manifest at most (3 MiB; more go to further manifests): sled holds a
/// value whole in memory.
const MANIFEST_MAX: usize = 1 << 16;

/// Entries per generation of [`Recent`]: two generations of this many (48 bytes each, about
/// 1.5 MiB in all with the maps' room) cover a 256 MiB file's chunks at the average size.
/// Larger files' chunks are found in runs (a filter, a binary search and a read of 3 KiB),
/// and more generations would only make the memory grow with the file up to a larger
/// bound.
const RECENT_ENTRIES: usize = 1 << 13;

/// Writeback of an appended file (a pack, a file the folder store writes) is started every
/// this many bytes, so that the sync that follows finds little left to write.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// Waits for the writeback of what a writer wrote ([`ChunkStore::drop_behind`],
/// [`Writeback::wrote`]) queued for [`behind`]'s thread at most: 128 MiB written and not
/// yet dropped, at [`WRITEBACK_BYTES`] each. Past that the writer waits for room.
const BEHIND_AT_ONCE: usize = 16;

/// A wait queued for [`behind`]'s thread.
type Wait = Box<dyn FnOnce() + Send>;

/// The queue of [`behind`]'s thread; `None` if it could not be started.
static BEHIND: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Wait>>> =
    std::sync::OnceLock::new();

/// Runs `wait` (a wait for writeback, then dropping pages) on a thread of the process's
/// own, in the order queued, so that the writer goes on meanwhile. Waiting itself, a
/// receiver sat idle through each of the disk's stalls while the sender waited for it:
/// W2 of `bench/daemon/run.py`, `ab.py --reps 6`, 1.23 s against 1.07 s with the waits
/// here (and 1.19 against 1.08 s with a thread for each wait). One thread, so that a pack's
/// waits still follow one another as they did on the writer's thread (see
/// [`ChunkStore::drop_behind`]). Where the thread cannot be started, or is gone, `wait`
/// runs here.
fn behind(wait: impl FnOnce() + Send + 'static) {
    let queue = BEHIND.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Wait>(BEHIND_AT_ONCE);
        std::thread::Builder::new()
            .name("converge-behind".into())
            .spawn(move || {
                for wait in rx {
                    // Advisory work: a panic in one wait does not end the others.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(wait));
                }
            })
            .ok()
            .map(|_| tx)
    });
    match queue {
        Some(tx) => {
            if let Err(std::sync::mpsc::SendError(wait)) = tx.send(Box::new(wait)) {
                wait();
            }
        }
        None => wait(),
    }
}

/// Fresh chunk hashes are handed to the sink in batches of this many (4 MiB of data at
/// the average chunk size), so that a large file streams while it is chunked.
const FRESH_BATCH: usize = 256;

/// A peer's chunks written together, in one system call under the writer's lock, by
/// [`ChunkStore::put_checked_at`] (they are checked before, all at once, by
/// [`ChunkStore::check`]): enough for few calls, little enough that lookups wait on the
/// lock for no longer than one such write.
const GROUP_BYTES: usize = 1 << 20;

/// Bytes read back and written again at once by [`ChunkStore::sync`] after a failed sync.
const WRITE_AGAIN_BYTES: usize = 8 << 20;

/// Stream packs open for writing at once; the one written least recently is closed to
/// make room for a new stream (its chunks stay where they are; only lending it is lost).
const OPEN_STREAMS: usize = 8;

/// Packs kept open for reading (see [`ChunkStore::keep_reader`]).
const OPEN_READERS: usize = 64;

/// Highest byte a stream pack is written to: a place beyond it (a peer's mistake or
/// malice) stores the chunk in the shared pack instead.
const STREAM_BYTES: u64 = 1 << 42;

/// Stream packs created between two syncs, at most: the packs closed to make room stay
/// open until the sync makes them durable, so a peer sending chunks of ever new streams
/// would otherwise run this process out of file descriptors. Later streams' chunks go to
/// the shared pack.
const NEW_STREAMS: usize = 64;

/// The longest run of chunks [`ChunkStore::for_each_data_piece`] hands out as one
/// [`Piece::InPack`]: long enough that a large file is copied in few system calls, short
/// enough that a writer pipelined behind the walk starts early.
pub const PIECE_BYTES: u64 = 8 << 20;

/// The page size [`Piece::write_to`] lines pack runs up with (the kernel's on every
/// platform this runs on; a larger one only means fewer runs are copied in the kernel).
const PAGE_BYTES: u64 = 4096;

/// Most bytes [`ChunkStore::read_found`] reads at once: a frame of chunks and then some.
const READ_RUN_BYTES: u64 = 8 << 20;

/// Receives the chunks this replica put (see [`ChunkStore::set_fresh_sink`]). Called on
/// the thread that put them; it must not block.
pub type FreshSink = Box<dyn Fn(Vec<FreshChunk>) + Send + Sync>;

/// A chunk this replica put, handed to the [`FreshSink`] with its bytes: a push sends them
/// from memory instead of reading them back from the pack, which on a large file took
/// twice as long as sending them (`bench/daemon/run.py`, W2).
#[derive(Clone, Debug)]
pub struct FreshChunk {
    /// The chunk's hash.
    pub hash: Hash,
    /// The chunk's bytes, shared by the sessions pushing it (and, when the chunker put
    /// them with [`ChunkStore::put_shared_prehashed_at`], with the buffer they were cut
    /// from).
    pub bytes: ChunkBytes,
    /// The chunk's place in the file it was cut from, for a large file's data chunks.
    pub place: Option<Place>,
}

/// A buffer chunks are cut from, shared by the chunks handed on from it.
pub type SharedBuffer = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A chunk's bytes in memory: a range of a buffer shared with other chunks (a window of
/// the file they were cut from, kept alive until the last of them is sent) or a copy of
/// their own. Cheap to clone.
#[derive(Clone)]
pub struct ChunkBytes {
    buffer: SharedBuffer,
    range: Range<usize>,
}

impl ChunkBytes {
    /// `range` of `buffer`, or `None` if the buffer is shorter.
    pub fn shared(buffer: SharedBuffer, range: Range<usize>) -> Option<ChunkBytes> {
        let len = (*buffer).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(ChunkBytes { buffer, range })
    }

    /// `bytes`, a buffer of their own.
    pub fn owned(bytes: Vec<u8>) -> ChunkBytes {
        ChunkBytes {
            range: 0..bytes.len(),
            buffer: Arc::new(bytes),
        }
    }

    /// A copy of `bytes`, on its own.
    pub fn copied(bytes: &[u8]) -> ChunkBytes {
        ChunkBytes::owned(bytes.to_vec())
    }

    /// The length of the whole buffer these bytes keep alive.
    pub(crate) fn buffer_len(&self) -> usize {
        (*self.buffer).as_ref().len()
    }

    /// Whether `self` and `other` are ranges of the same buffer.
    pub(crate) fn same_buffer(&self, other: &ChunkBytes) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.buffer), Arc::as_ptr(&other.buffer))
    }
}

impl std::ops::Deref for ChunkBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // In range: checked when made, and the buffer is immutable.
        &(*self.buffer).as_ref()[self.range.clone()]
    }
}

impl std::fmt::Debug for ChunkBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkBytes({} bytes)", self.range.len())
    }
}

/// A new stream identifier for [`ChunkStore::put_many_prehashed_at`]: random, so that the
/// streams of different replicas do not collide at a receiver.
pub fn new_stream() -> u64 {
    rand::random()
}

/// Where chunks being put come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Put by this replica, hashed by the caller: fresh, handed to the sink.
    Local,
    /// Offered by a peer, and checked against their hashes ([`ChunkStore::check`]).
    Peer,
}

/// A peer's chunks found to hash to the hashes they came with ([`ChunkStore::check`]),
/// ready for [`ChunkStore::put_checked_at`]. Only a check makes one.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a> {
    chunks: &'a [(Hash, &'a [u8])],
}

/// A peer's chunk with its offset in its stream, on the way into a stream pack.
type Placed<'a> = (Hash, &'a [u8], u64);

/// A chunk put locally and new to the store, on its way to the fresh-chunk sink: its
/// bytes, their range in the buffer they were cut from (if any) and its place.
type NewChunk<'a> = (Hash, &'a [u8], Option<Range<usize>>, Option<Place>);

/// A file of the folder offered as one of the store's packs ([`ChunkStore::adopt`]): its
/// chunks are recorded where they lie in it ([`ChunkStore::put_adopted_at`]) instead of
/// being copied into a pack.
#[derive(Clone, Debug)]
pub struct Adopted {
    /// The file's device and inode.
    inode: (u64, u64),
    /// The file, open: linked as the pack, and synced with the chunks recorded in it.
    file: Arc<File>,
}

/// What is known of packs during one put (see [`PackKinds::of`]).
#[derive(Default)]
struct PackKinds(HashMap<u32, PackKind>);

/// Whether someone else may change a pack, and which file it is.
#[derive(Clone, Copy)]
struct PackKind {
    /// Another name links to the pack (a file of the folder: adopted, or lent to it), or
    /// it could not be looked at: its chunks may change under the store.
    shared: bool,
    /// Its device and inode, when looked at.
    inode: Option<(u64, u64)>,
}

impl PackKinds {
    /// What pack `id` is, looked at once per put: a pack this process wrote and neither
    /// lent nor adopted is the store's alone; any other is shared while its file has
    /// more than one link. Once the folder's file was renamed over or removed, the pack
    /// is the only name of its bytes, and no one else changes them.
    fn of(&mut self, store: &ChunkStore, id: u32) -> PackKind {
        *self.0.entry(id).or_insert_with(|| {
            use std::os::unix::fs::MetadataExt;
            if id >= store.inner.own_packs && !store.is_lent(id) {
                return PackKind {
                    shared: false,
                    inode: None,
                };
            }
            match store.pack(id).and_then(|pack| {
                pack.metadata()
                    .map_err(io_error("looking at", pack_path(&store.inner.dir, id)))
            }) {
                Ok(meta) => PackKind {
                    shared: meta.nlink() > 1,
                    inode: Some((meta.dev(), meta.ino())),
                },
                Err(_) => PackKind {
                    shared: true,
                    inode: None,
                },
            }
        })
    }
}

/// Where a chunk is stored, as [`ChunkStore::find`] found it (for
/// [`ChunkStore::read_found`]).
#[derive(Clone, Copy, Debug)]
pub struct Found {
    location: Location,
}

impl Found {
    /// The chunk's length in bytes.
    pub fn len(&self) -> usize {
        self.location.len as usize
    }

    /// Whether the chunk is empty.
    pub fn is_empty(&self) -> bool {
        self.location.len == 0
    }
}

/// Where a chunk's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Location {
    pack: u32,
    offset: u64,
    len: u32,
}

impl Location {
    fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..4].copy_from_slice(&self.pack.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    fn decode(hash: &Hash, bytes: &[u8]) -> Result<Location, LogError> {
        let bytes: [u8; 16] = bytes.try_into().map_err(|_| LogError::Corrupt {
            what: format!("chunk index entry {hash:?}"),
            source: converge_api::CodecError::Malformed(format!(
                "{} bytes, expected 16",
                bytes.len()
            )),
        })?;
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut offset = [0; 8];
        offset.copy_from_slice(&bytes[4..12]);
        Ok(Location {
            pack: u32_at(0),
            offset: u64::from_le_bytes(offset),
            len: u32_at(12),
        })
    }
}

/// Chunks by hash. Cheap to clone; its methods block on disk, so call them from blocking
/// threads when the work is large.
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

struct Inner {
    index: Tree,
    /// Large syncs' locations, on disk (see the `runs` module). Taken after `writer`
    /// when both are.
    runs: RwLock<Runs>,
    /// Manifests: chunk locations synced but not yet in `index` (see [`ChunkStore::sync`]).
    manifests: Tree,
    dir: PathBuf,
    /// Remove `dir` when the store is dropped (a temporary log's store).
    remove_on_drop: bool,
    writer: Mutex<PackWriter>,
    /// Held by [`ChunkStore::sync`] throughout (the writer's lock only around its syncs),
    /// by [`ChunkStore::lend`] while it checks and links a pack, and by the indexer while
    /// it indexes manifests.
    syncing: Mutex<()>,
    /// A thread waits to index the manifests (see [`ChunkStore::index_later`]); read and
    /// changed under the writer's lock.
    indexer: AtomicBool,
    /// That thread, to wake and join when the store is closed.
    indexer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// [`ChunkStore::close`] was called: no indexer starts or works from then on.
    closed: AtomicBool,
    /// The first pack this process wrote: packs from here on hold only chunks checked on
    /// their way in, and are read without hashing them again.
    own_packs: u32,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    sink: RwLock<Option<FreshSink>>,
    recent: RwLock<Recent>,
    /// Chunks found damaged in a pack and dropped from the index, to be fetched again
    /// from peers (see [`ChunkStore::damaged`]).
    damaged: Mutex<HashSet<Hash>>,
    /// Files of the folder (device, inode) holding a pack's chunks that were found changed
    /// there, for the folder source to chunk again (see [`ChunkStore::changed_files`]).
    changed_files: Mutex<HashSet<(u64, u64)>>,
    /// The same, kept across restarts: the chunks' index entries are dropped for good, so
    /// the file would not read changed again.
    changed_tree: Tree,
    /// Whether `changed_files` may hold any: the source asks for every file it looks at.
    any_changed_file: AtomicBool,
    /// Wakes the folder source when a file joins `changed_files`.
    file_changed: tokio::sync::Notify,
    /// Stream packs of this run lent to the folder store ([`ChunkStore::lend`]), and the
    /// folder's files taken as packs ([`ChunkStore::adopt`]): not trusted, as the
    /// folder's files may change.
    lent: RwLock<HashSet<u32>>,
    /// Runs of trusted packs handed out as [`Piece::InPack`] and not dropped yet, by
    /// pack: they are copied without a check later, so a pack with any is not lent.
    in_use: Arc<Mutex<HashMap<u32, usize>>>,
    /// Packs a sync failed on, or whose writeback a lend found failed: written to no
    /// more, never synced again, and no longer trusted (see the module docs). Never
    /// emptied: what a failed writeback spoilt in them is not known.
    failed: RwLock<HashSet<u32>>,
    /// Packs whose pages are not dropped from the page cache (see
    /// [`ChunkStore::drop_behind`]).
    keep_pages: Mutex<KeptPages>,
}

/// Packs marked in [`KeptPages::syncing`] for as long as this lives.
struct SyncingPages<'a> {
    inner: &'a Inner,
    ids: Vec<u32>,
}

impl<'a> SyncingPages<'a> {
    fn mark(inner: &'a Inner, ids: impl IntoIterator<Item = u32>) -> SyncingPages<'a> {
        let ids: Vec<u32> = ids.into_iter().collect();
        if let Ok(mut keep) = inner.keep_pages.lock() {
            keep.syncing.extend(&ids);
        }
        SyncingPages { inner, ids }
    }
}

impl Drop for SyncingPages<'_> {
    fn drop(&mut self) {
        if let Ok(mut keep) = self.inner.keep_pages.lock() {
            for id in &self.ids {
                keep.syncing.remove(id);
            }
        }
    }
}

/// Packs whose pages [`ChunkStore::drop_behind`] leaves in the page cache.
#[derive(Default)]
struct KeptPages {
    /// For good: a wait for their writeback heard of a failure.
    kept: HashSet<u32>,
    /// While a sync of them is under way, and until a failed one has given them up: the
    /// sync's `fdatasync` hears of a failed writeback for every descriptor opened before,
    /// and a wait for writeback on a descriptor opened after that hears of nothing, so it
    /// would drop pages whose writeback failed, all that is left of their bytes (see
    /// `write_again`), before the pack is marked given up.
    syncing: HashSet<u32>,
}

impl Inner {
    /// The runs, locked for writing (a new run, a removal).
    fn runs_mut(&self) -> Result<std::sync::RwLockWriteGuard<'_, Runs>, LogError> {
        self.runs.write().map_err(|_| LogError::Closed)
    }
}

/// The locations the last syncs indexed, kept in memory: the chunks just stored are the
/// ones read next (written out by a store, sent to a peer, looked up to see whether a
/// content is complete), and a sled lookup cost about as much as the folder store's
/// write of a small file. Two generations, the older dropped when the newer fills, so
/// memory stays bounded. Entries are durable and packs are never rewritten; a chunk
/// recorded anew (copied out of a file of the folder, or found at another place in an
/// adopted one, see [`ChunkStore::put_adopted_at`]) is found staged or in a manifest
/// before this is asked, and its new entry is the newer one here once indexed.
#[derive(Default)]
struct Recent {
    newer: HashMap<Hash, Location>,
    older: HashMap<Hash, Location>,
}

impl Recent {
    fn get(&self, hash: &Hash) -> Option<Location> {
        self.newer
            .get(hash)
            .or_else(|| self.older.get(hash))
            .copied()
    }

    fn extend(&mut self, entries: &[(Hash, Location)]) {
        for &(hash, location) in entries {
            if self.newer.len() >= RECENT_ENTRIES {
                self.older = std::mem::take(&mut self.newer);
            }
            self.newer.insert(hash, location);
        }
    }
}

/// Chunk locations in a vector sorted by hash, looked up by binary search: the entries of
/// the manifests waiting to be written out as a run (see [`ChunkStore::sync`]). Up to half
/// the memory of a hash map of the same entries, and already in a run's order, so that
/// writing it needs no sorted copy: with a map, a large file's sync and its indexing
/// each held one more copy of all its locations. A sync's entries are moved in when none
/// wait (a large file's, alone) and merged in place otherwise, which costs a pass over
/// the vector, bounded by [`UNINDEXED_MAX`] entries (3 MiB), as a sync past that indexes
/// them first.
#[derive(Default)]
struct SortedLocations {
    entries: Vec<(Hash, Location)>,
    /// Entries removed but still in `entries`, taken out in one pass once they are many
    /// or before the entries are read in order: taking each out at once would move the
    /// rest of the vector every time (a pack lost while a large file's entries wait is
    /// forgotten chunk by chunk; a sync's moved chunks, and an open's entries indexed
    /// since, go the same way).
    removed: HashSet<Hash>,
}

impl SortedLocations {
    /// The entries of `entries`, the last one for a hash named more than once.
    fn from_unsorted(mut entries: Vec<(Hash, Location)>) -> Self {
        // Stable: of equal hashes, the last stays last, and is kept over those before it.
        entries.sort_by_key(|(h, _)| *h);
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                *kept = *later;
            }
            same
        });
        SortedLocations {
            entries,
            removed: HashSet::new(),
        }
    }

    fn position(&self, hash: &Hash) -> Option<usize> {
        use std::cmp::Ordering as Order;
        if !self.removed.is_empty() && self.removed.contains(hash) {
            return None;
        }
        let entries = &self.entries;
        let order = |i: usize| entries[i].0.cmp(hash);
        // Hashes are uniform: start where `hash` would fall in proportion, and widen from
        // there until it is bracketed. A few reads of the vector where a binary search
        // over it made one per halving, each a cache miss once it outgrows the cache (the
        // lookups were 2% of a receiver's CPU in W1). Entries that are not uniform (a
        // test's) only make the widening longer.
        let n = entries.len();
        if n == 0 {
            return None;
        }
        let guess = ((u128::from(hash.prefix()) * n as u128) >> 64) as usize;
        let (lo, hi) = match order(guess) {
            Order::Equal => return Some(guess),
            Order::Less => {
                // In guess + 1.. : doubling steps to the right.
                let (mut lo, mut step) = (guess + 1, 1);
                loop {
                    let probe = lo + step - 1;
                    if probe >= n {
                        break (lo, n);
                    }
                    if order(probe) != Order::Less {
                        break (lo, probe + 1);
                    }
                    lo = probe + 1;
                    step *= 2;
                }
            }
            Order::Greater => {
                // In ..guess: doubling steps to the left.
                let (mut hi, mut step) = (guess, 1);
                loop {
                    if hi < step {
                        break (0, hi);
                    }
                    let probe = hi - step;
                    if order(probe) != Order::Greater {
                        break (probe, hi);
                    }
                    hi = probe;
                    step *= 2;
                }
            }
        };
        entries[lo..hi]
            .binary_search_by(|(h, _)| h.cmp(hash))
            .ok()
            .map(|i| lo + i)
    }

    fn get(&self, hash: &Hash) -> Option<&Location> {
        self.position(hash).map(|i| &self.entries[i].1)
    }

    fn remove(&mut self, hash: &Hash) {
        if self.position(hash).is_some() {
            self.removed.insert(*hash);
            if self.removed.len() * 8 > self.entries.len() {
                self.compact();
            }
        }
    }

    /// Takes the entries removed out of the vector.
    fn compact(&mut self) {
        if !self.removed.is_empty() {
            let removed = std::mem::take(&mut self.removed);
            self.entries.retain(|(h, _)| !removed.contains(h));
        }
    }

    fn len(&self) -> usize {
        self.entries.len() - self.removed.len()
    }

    /// The entries, in order.
    fn entries(&mut self) -> &[(Hash, Location)] {
        self.compact();
        &self.entries
    }

    /// Adds `new`, sorted by hash with no hash twice; one for a hash held already
    /// replaces it.
    fn add(&mut self, new: Vec<(Hash, Location)>) {
        debug_assert!(new.windows(2).all(|w| w[0].0 < w[1].0));
        let Some(&last) = new.last() else {
            return;
        };
        self.compact();
        if self.entries.is_empty() {
            self.entries = new;
            return;
        }
        // From the back, into room made at the end: no second vector.
        let old_len = self.entries.len();
        self.entries.resize(old_len + new.len(), last);
        let (mut old, mut next, mut to) = (old_len, new.len(), self.entries.len());
        while next > 0 {
            let n = new[next - 1];
            to -= 1;
            match old.checked_sub(1).map(|o| self.entries[o].0.cmp(&n.0)) {
                Some(std::cmp::Ordering::Greater) => {
                    self.entries[to] = self.entries[old - 1];
                    old -= 1;
                }
                Some(std::cmp::Ordering::Equal) => {
                    // Replaced: the old entry is dropped, and a slot is left over.
                    self.entries[to] = n;
                    old -= 1;
                    next -= 1;
                }
                _ => {
                    self.entries[to] = n;
                    next -= 1;
                }
            }
        }
        // The old entries below `old` are in place unless some were replaced: then they
        // move up over the slots left over, and those go.
        if to > old {
            self.entries.copy_within(0..old, to - old);
            self.entries.drain(..to - old);
        }
    }
}

/// The chunks written since the last sync, by hash, with a count of the entries replaced
/// or removed. A sync takes the entries, syncs the packs without the writer's lock, and
/// then records what it took: when nothing was replaced or removed meanwhile, every entry
/// it took is still as it took it, and when nothing was added either, it can let go of
/// them all at once. A large file's sync then costs no second and third pass over its
/// entries in a map (the sync's tail, which each side of a transfer waits for).
#[derive(Default)]
struct Staged {
    map: HashMap<Hash, Location>,
    changes: u64,
}

impl Staged {
    fn get(&self, hash: &Hash) -> Option<&Location> {
        self.map.get(hash)
    }

    fn insert(&mut self, hash: Hash, location: Location) {
        if self.map.insert(hash, location).is_some() {
            self.changes += 1;
        }
    }

    fn extend(&mut self, entries: impl IntoIterator<Item = (Hash, Location)>) {
        for (hash, location) in entries {
            self.insert(hash, location);
        }
    }

    fn remove(&mut self, hash: &Hash) {
        if self.map.remove(hash).is_some() {
            self.changes += 1;
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&Hash, &Location)> {
        self.map.iter()
    }

    /// Forgets `recorded`, entries taken when [`changes`](Self::changes) was `taken_at`
    /// and still as taken: all at once when they are all there is, else one by one.
    fn forget(&mut self, recorded: &[(Hash, Location)], taken_at: u64) {
        if self.changes == taken_at && recorded.len() == self.map.len() {
            self.map.clear();
            self.changes += 1;
        } else {
            recorded.iter().for_each(|(hash, _)| self.remove(hash));
        }
        if self.map.is_empty() && self.map.capacity() > 4096 {
            // A large sync's entries are gone: so is their room.
            self.map = HashMap::with_capacity(1024);
        }
    }
}

/// The pack being appended to, and the chunks written since the last sync.
struct PackWriter {
    id: u32,
    file: Option<Arc<File>>,
    /// Bytes in the current pack, and how far its writeback was started.
    written: Writeback,
    staged: Staged,
    /// Chunks durable and recorded in a manifest, not yet in a run.
    unindexed: SortedLocations,
    /// The manifests `unindexed` came from.
    manifested: Vec<u64>,
    /// The key of the next manifest.
    next_manifest: u64,
    /// The manifests are to be indexed by the next sync, however busy the store: they
    /// were left by a crash, or an entry of theirs was dropped from memory (a damaged
    /// chunk) and must not come back from them after a restart.
    index_due: bool,
    /// When the last sync started, or a chunk was last put or looked up while manifests
    /// wait: the store is in use (a file being chunked, a folder store writing out what a
    /// sync brought, a peer fetching), and indexing would take the CPU and the locks from
    /// that work.
    last_busy: Instant,
    /// [`INDEX_QUIET`] (tests make it longer).
    index_quiet: Duration,
    /// Packs closed since the last sync, and adopted files chunks were recorded in, still
    /// to be made durable.
    closed: Vec<(u32, Arc<File>)>,
    /// The files of the folder taken as packs in this run, by device and inode, so that
    /// one chunked again is the same pack (see [`ChunkStore::adopt`]); `None` for one
    /// that could not be linked.
    adopted: HashMap<(u64, u64), Option<u32>>,
    /// Chunks recorded over an entry the index or a manifest may hold (copied out of a
    /// file of the folder, or found at another place in an adopted one): indexed at the
    /// next sync, never through a manifest, so that no older entry comes back over them
    /// after a crash (`open` takes a manifest's entry only where the index has none).
    moved: HashSet<Hash>,
    /// Stream packs of this run that local content relies on for a chunk it holds: never
    /// lent (see [`ChunkStore::lend`]), as the folder's owner could then change it.
    relied_on: HashSet<u32>,
    /// Chunks put locally and not yet handed to the sink (only while one is set).
    fresh: Vec<FreshChunk>,
    /// Stream packs open for writing, by stream (see the module docs).
    streams: HashMap<u64, StreamPack>,
    /// Counts writes to stream packs, to find the one written least recently.
    stream_clock: u64,
    /// Stream packs created since the last sync (see [`NEW_STREAMS`]).
    new_streams: usize,
    /// A pack was created since the last sync: the directory is synced with the packs,
    /// so that no index entry names a pack a crash could lose (whose number the next
    /// run would then give a new pack, trusted, with other bytes).
    created: bool,
    /// Why nothing can be made durable until the store is opened again: a chunk staged
    /// in a failed pack could not be read back to be written again.
    broken: Option<String>,
    /// A pack was given up (see [`Inner::failed`]) since the last
    /// [`ChunkStore::write_again`]: the chunks staged in failed packs are to be written
    /// again before anything is synced.
    again: bool,
}

/// A pack holding one stream's chunks at their offsets in the stream.
struct StreamPack {
    id: u32,
    file: Arc<File>,
    /// Everything below `written.len()` is either written or skipped (a hole); chunks are
    /// written only at or above it, so that a chunk written never overlaps another.
    written: Writeback,
    /// Written to since the last sync.
    dirty: bool,
    /// `stream_clock` at the last write.
    used: u64,
    /// Where the blocks reserved ahead of the writes end ([`allocate_ahead`]); 0 when
    /// none are.
    allocated: u64,
    /// Whether blocks are still to be reserved ahead: not once that failed (a file system
    /// without it), nor once the pack was trimmed.
    reserving: bool,
}

impl StreamPack {
    /// Gives back the blocks reserved past the pack's end ([`trim_allocation`]), while
    /// the pack is still the store's alone (before it is lent: a folder's file could be
    /// appended to between the look at its size and the truncation). Nothing more is
    /// reserved for it.
    fn trim(&mut self) {
        if self.allocated > 0 {
            trim_allocation(&self.file);
            self.allocated = 0;
        }
        self.reserving = false;
    }
}

impl PackWriter {
    /// Whether a put left so many chunks staged that it is to sync the store itself
    /// ([`ChunkStore::spill`]); not while the store is broken, as that sync would fail.
    fn spill_due(&self) -> bool {
        self.staged.len() >= SPILL_ENTRIES && self.broken.is_none()
    }

    /// Closes the current pack (it is synced with the next [`ChunkStore::sync`]); the
    /// next chunk starts a new one.
    fn rotate(&mut self) {
        if let Some(file) = self.file.take() {
            self.closed.push((self.id, file));
        }
        self.id += 1;
    }

    /// Notes that local content keeps a chunk in pack `id`: a stream pack of this run is
    /// then never lent (see [`PackWriter::relied_on`]).
    fn rely_on(&mut self, id: u32) {
        if self.streams.values().any(|p| p.id == id) {
            self.relied_on.insert(id);
        }
    }

    /// Where `hash` is held in the writer's memory, if there: staged, or in a manifest
    /// not yet written out as a run.
    fn in_memory(&self, hash: &Hash) -> Option<Location> {
        self.staged
            .get(hash)
            .or_else(|| self.unindexed.get(hash))
            .copied()
    }

    /// Notes a put or a lookup: while manifests wait, the store is in use (see
    /// [`PackWriter::last_busy`]).
    fn busy(&mut self) {
        if !self.manifested.is_empty() {
            self.last_busy = Instant::now();
        }
    }

    /// Gives up the packs in `failed` (see [`Inner::failed`]): no chunk is written to them
    /// any more, and they are not synced again (their staged chunks are written again
    /// elsewhere by the next sync).
    fn abandon(&mut self, failed: &HashSet<u32>) {
        if self.file.is_some() && failed.contains(&self.id) {
            self.file = None;
            self.id += 1;
        }
        self.streams.retain(|_, pack| !failed.contains(&pack.id));
        self.closed.retain(|(id, _)| !failed.contains(id));
    }

    /// Stops writing to the stream pack of `stream` (it is synced with the next
    /// [`ChunkStore::sync`] if it was written to since the last one).
    fn close_stream(&mut self, stream: u64) {
        if let Some(mut pack) = self.streams.remove(&stream) {
            // The blocks reserved past its end are given back (a lent one's were before
            // the lend).
            pack.trim();
            // Never lent now: nothing to keep it from.
            self.relied_on.remove(&pack.id);
            if pack.dirty {
                self.closed.push((pack.id, pack.file));
            }
        }
    }
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("pack-{id:08}"))
}

/// The key of a file of the folder (device, inode) in the tree of changed files.
fn encode_file_id((dev, ino): (u64, u64)) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&dev.to_be_bytes());
    key[8..].copy_from_slice(&ino.to_be_bytes());
    key
}

/// The file a key of the tree of changed files names; `None` for a key of another length.
fn decode_file_id(key: &[u8]) -> Option<(u64, u64)> {
    let dev = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
    let ino = u64::from_be_bytes(key.get(8..16)?.try_into().ok()?);
    (key.len() == 16).then_some((dev, ino))
}

fn io_error(op: &'static str, path: PathBuf) -> impl FnOnce(std::io::Error) -> LogError {
    move |source| LogError::ContentIo { op, path, source }
}

impl ChunkStore {
    /// The store with index tree `index`, manifests in `manifests`, the folder's files
    /// found changed in `changed` (see [`ChunkStore::changed_files`]), the run entries
    /// found wrong in `runs_removed`, and pack files and runs in `dir` (created if
    /// missing); `temporary` removes `dir` when the last clone is dropped. The manifests a
    /// crash left are indexed by the first sync.
    pub(crate) fn open(
        index: Tree,
        manifests: Tree,
        changed: Tree,
        runs_removed: Tree,
        dir: PathBuf,
        temporary: bool,
    ) -> Result<Self, LogError> {
        let mut changed_files = HashSet::new();
        for key in changed.iter().keys() {
            if let Some(file) = decode_file_id(&key?) {
                changed_files.insert(file);
            }
        }
        let mut entries = Vec::new();
        let mut manifested = Vec::new();
        for entry in manifests.iter() {
            let (key, value) = entry?;
            let id = decode_manifest(&key, &value, &mut entries)?;
            manifested.push(id);
        }
        // In the manifests' order: a later one's entry for a hash wins.
        let mut unindexed = SortedLocations::from_unsorted(entries);
        // A chunk the index holds already was indexed since (a copy stored after the
        // manifest's was found damaged and forgotten, say): the index's entry is newer.
        let mut known = Vec::new();
        for (hash, _) in unindexed.entries() {
            if index.contains_key(hash.0)? {
                known.push(*hash);
            }
        }
        for hash in &known {
            unindexed.remove(hash);
        }
        let next_manifest = match manifested.last() {
            None => 0,
            Some(id) => id.checked_add(1).ok_or_else(|| LogError::Corrupt {
                what: "chunk manifests".into(),
                source: converge_api::CodecError::Malformed("no manifest number left".into()),
            })?,
        };
        std::fs::create_dir_all(&dir).map_err(io_error("creating", dir.clone()))?;
        let runs = Runs::open(&dir, runs_removed)?;
        let mut last = 0;
        for entry in std::fs::read_dir(&dir).map_err(io_error("listing", dir.clone()))? {
            let entry = entry.map_err(io_error("listing", dir.clone()))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("pack-"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                last = last.max(id);
            }
        }
        Ok(ChunkStore {
            inner: Arc::new(Inner {
                index,
                runs: RwLock::new(runs),
                manifests,
                dir,
                remove_on_drop: temporary,
                writer: Mutex::new(PackWriter {
                    id: last + 1,
                    file: None,
                    written: Writeback::default(),
                    staged: Staged::default(),
                    unindexed,
                    index_due: !manifested.is_empty(),
                    manifested,
                    next_manifest,
                    last_busy: Instant::now(),
                    index_quiet: INDEX_QUIET,
                    closed: Vec::new(),
                    adopted: HashMap::new(),
                    relied_on: HashSet::new(),
                    moved: HashSet::new(),
                    fresh: Vec::new(),
                    streams: HashMap::new(),
                    stream_clock: 0,
                    new_streams: 0,
                    created: false,
                    broken: None,
                    again: false,
                }),
                syncing: Mutex::new(()),
                indexer: AtomicBool::new(false),
                indexer_thread: Mutex::new(None),
                closed: AtomicBool::new(false),
                own_packs: last + 1,
                readers: RwLock::new(HashMap::new()),
                sink: RwLock::new(None),
                recent: RwLock::new(Recent::default()),
                damaged: Mutex::new(HashSet::new()),
                any_changed_file: AtomicBool::new(!changed_files.is_empty()),
                changed_files: Mutex::new(changed_files),
                changed_tree: changed,
                file_changed: tokio::sync::Notify::new(),
                lent: RwLock::new(HashSet::new()),
                in_use: Arc::default(),
                failed: RwLock::new(HashSet::new()),
                keep_pages: Mutex::new(KeptPages::default()),
            }),
        })
    }

    /// Stores `bytes` under their hash and returns it (a no-op for known content).
    pub fn put(&self, bytes: &[u8]) -> Result<Hash, LogError> {
        let hash = Hash::of(bytes);
        self.put_chunks(&[(hash, bytes)], &[], None, Origin::Local)?;
        Ok(hash)
    }

    /// Stores `bytes` under `hash`, which the caller has just computed as
    /// `Hash::of(bytes)` (a chunker that hashes while another thread stores). Reads check
    /// the hash, so a wrong one reads as corrupt, never as content.
    pub fn put_prehashed(&self, hash: &Hash, bytes: &[u8]) -> Result<(), LogError> {
        self.put_many_prehashed(&[(*hash, bytes)])
    }

    /// [`put_prehashed`](Self::put_prehashed) for many chunks, written with one system
    /// call where they fit.
    pub fn put_many_prehashed(&self, chunks: &[(Hash, &[u8])]) -> Result<(), LogError> {
        self.put_many_prehashed_at(chunks, &[])
    }

    /// [`put_many_prehashed`](Self::put_many_prehashed) for data chunks of a large file,
    /// with their places in it (`places[i]` is `chunks[i]`'s; missing ones have none):
    /// they go to the fresh-chunk sink with them, so that peers can write them where they
    /// go. Get one stream id per chunking of a file from [`new_stream`].
    pub fn put_many_prehashed_at(
        &self,
        chunks: &[(Hash, &[u8])],
        places: &[Option<Place>],
    ) -> Result<(), LogError> {
        debug_assert!(chunks.iter().all(|(h, b)| Hash::of(b) == *h));
        self.put_chunks(chunks, places, None, Origin::Local)
    }

    /// [`put_many_prehashed_at`](Self::put_many_prehashed_at) for chunks that are
    /// `ranges` of `buffer`: fresh ones are handed to the sink as ranges of the buffer
    /// rather than copies, when they are most of it (a few fresh chunks do not keep a
    /// whole buffer alive: they are copied).
    pub fn put_shared_prehashed_at(
        &self,
        buffer: &SharedBuffer,
        chunks: &[(Hash, Range<usize>)],
        places: &[Option<Place>],
    ) -> Result<(), LogError> {
        let bytes: &[u8] = (**buffer).as_ref();
        let mut slices = Vec::with_capacity(chunks.len());
        let mut ranges = Vec::with_capacity(chunks.len());
        for (hash, range) in chunks {
            let slice = bytes
                .get(range.clone())
                .ok_or_else(|| LogError::ContentIo {
                    op: "storing",
                    path: self.inner.dir.clone(),
                    source: std::io::Error::other("a chunk's range lies outside its buffer"),
                })?;
            slices.push((*hash, slice));
            ranges.push(range.clone());
        }
        debug_assert!(slices.iter().all(|(h, b)| Hash::of(b) == *h));
        self.put_chunks(&slices, places, Some((buffer, &ranges)), Origin::Local)
    }

    /// Offers the open file `file` (a large file of the folder, about to be chunked) as a
    /// pack of this store, so that its data chunks need not be copied
    /// ([`put_adopted_at`](Self::put_adopted_at)). The file is taken, a hard link to it
    /// in the pack directory, only once a chunk is to be recorded in it, and once per run:
    /// a file chunked again (the same inode, edited in place) is the same pack again.
    ///
    /// What the store records there is durable like a pack's: the next
    /// [`sync`](Self::sync) syncs the file's data before any index entry naming it. The
    /// folder's owner may change the file at any time, so the pack is read like a lent
    /// one, every chunk checked, and a chunk changed since reads as damaged; the change
    /// is a later event of the file, which supersedes the one whose content was lost that
    /// way (see `PendingQueue::take_ready`). So that this holds, a chunk recorded in an
    /// adopted file is that file's alone: content put otherwise that holds it gets a copy
    /// in a pack of the store's own (see [`put_adopted_at`](Self::put_adopted_at) and the
    /// module docs).
    ///
    /// `None` when the file cannot be looked at or opened again: its chunks are then put
    /// as usual.
    pub fn adopt(&self, file: &File) -> Option<Adopted> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().ok()?;
        Some(Adopted {
            inode: (meta.dev(), meta.ino()),
            file: Arc::new(file.try_clone().ok()?),
        })
    }

    /// The pack that is the file `adopted` offers, linked now if it is not yet; `None`
    /// when it cannot be (another file system, a file owned by someone else, no `/proc`,
    /// a sync of it failed): its chunks are then copied. `w` is the writer, locked.
    fn adopted_pack(&self, w: &mut PackWriter, adopted: &Adopted) -> Option<u32> {
        match w.adopted.get(&adopted.inode) {
            Some(&Some(pack)) if !self.is_failed(pack) => return Some(pack),
            Some(&Some(_)) | Some(None) => return None,
            None => {}
        }
        // The next pack number (the shared pack moves on to the one after, closed first
        // so that numbers stay in creation order), marked lent before it exists, so that
        // no read ever trusts it.
        if w.file.is_some() {
            w.rotate();
        }
        let id = w.id;
        w.id += 1;
        if let Ok(mut lent) = self.inner.lent.write() {
            lent.insert(id);
        }
        let path = pack_path(&self.inner.dir, id);
        match link_open_file(&adopted.file, &path) {
            Ok(()) => {
                // Synced with the next sync, before any index entry naming the pack is.
                w.created = true;
                w.adopted.insert(adopted.inode, Some(id));
                self.keep_reader(id, &adopted.file);
                Some(id)
            }
            Err(e) => {
                if let Ok(mut lent) = self.inner.lent.write() {
                    lent.remove(&id);
                }
                w.adopted.insert(adopted.inode, None);
                tracing::debug!(
                    "linking a file as {}: {e}; copying it instead",
                    path.display()
                );
                None
            }
        }
    }

    /// Puts data chunks of the file `adopted` offers, cut from `buffer` (`chunks[i]` is
    /// (hash, range in `buffer`), at `places[i]` in the file; every one needs its place).
    /// A chunk new to the store, or held only in that same file (chunked before, here or
    /// in an earlier run), is recorded where the file has it now: nothing is written. One
    /// held in a pack no one else can change (one of the store's own, or one whose file
    /// has no other name) stays there. One held only where someone else may change it
    /// (another adopted file, a stream pack lent to the folder) is copied into a pack of
    /// the store's own: a chunk two files share is never the adopted file's alone, so an
    /// edit of either loses nothing the other still needs. When the file cannot be taken
    /// (see [`adopt`](Self::adopt)), every chunk to record is copied instead. Chunks new
    /// to the store are handed to the fresh-chunk sink, as
    /// [`put_shared_prehashed_at`](Self::put_shared_prehashed_at) does.
    pub fn put_adopted_at(
        &self,
        adopted: &Adopted,
        buffer: &SharedBuffer,
        chunks: &[(Hash, Range<usize>)],
        places: &[Option<Place>],
    ) -> Result<(), LogError> {
        let inner = &self.inner;
        let bytes: &[u8] = (**buffer).as_ref();
        let misplaced = |what: &str| LogError::ContentIo {
            op: "storing",
            path: inner.dir.clone(),
            source: std::io::Error::other(what.to_owned()),
        };
        let mut packs = PackKinds::default();
        let mut w = inner.writer.lock().map_err(|_| LogError::Closed)?;
        w.busy();
        // The pack the file is, if it was taken before.
        let mut pack = match w.adopted.get(&adopted.inode) {
            Some(&Some(id)) if !self.is_failed(id) => Some(id),
            _ => None,
        };
        // Chunks to record in the file (and whether one was held before, elsewhere in it),
        // to copy, and new to the store.
        let mut here: Vec<(Hash, Range<usize>, Place, bool)> = Vec::new();
        let mut copy: Vec<(Hash, Range<usize>)> = Vec::new();
        let mut new: Vec<(Hash, Range<usize>, Place)> = Vec::new();
        let mut seen: HashSet<Hash> = HashSet::new();
        for (i, (hash, range)) in chunks.iter().enumerate() {
            let place = places
                .get(i)
                .copied()
                .flatten()
                .ok_or_else(|| misplaced("a chunk of an adopted file without its place"))?;
            let slice = bytes
                .get(range.clone())
                .ok_or_else(|| misplaced("a chunk's range lies outside its buffer"))?;
            debug_assert_eq!(Hash::of(slice), *hash);
            u32::try_from(slice.len()).map_err(|_| misplaced("a chunk larger than 4 GiB"))?;
            // A file with repeated content names a chunk twice: the first place serves.
            if !seen.insert(*hash) {
                continue;
            }
            match self.known(&w, hash)? {
                None => {
                    here.push((*hash, range.clone(), place, false));
                    new.push((*hash, range.clone(), place));
                }
                Some(location) if Some(location.pack) == pack => {
                    // Where it was: nothing to record.
                    if location.offset != place.offset {
                        here.push((*hash, range.clone(), place, true));
                    }
                }
                Some(location) => {
                    let kind = packs.of(self, location.pack);
                    if kind.inode == Some(adopted.inode) {
                        here.push((*hash, range.clone(), place, true));
                    } else if !kind.shared && !self.is_failed(location.pack) {
                        w.rely_on(location.pack);
                    } else {
                        copy.push((*hash, range.clone()));
                        w.moved.insert(*hash);
                    }
                }
            }
        }
        // The file is taken for a window mostly its own (new chunks, or its own found
        // again); a few new chunks among known ones (an edit of a large file renamed over
        // it) are copied instead, so that the sync does not write out the whole file for
        // them. Once taken, it holds what else is new.
        let window: usize = chunks.iter().map(|(_, r)| r.len()).sum();
        let own: usize = here.iter().map(|(_, r, _, _)| r.len()).sum();
        let again = here.iter().any(|(_, _, _, moved)| *moved);
        if pack.is_none() && !here.is_empty() && (again || own * 2 >= window) {
            pack = self.adopted_pack(&mut w, adopted);
        }
        match pack {
            Some(pack) => {
                for (hash, range, place, moved) in &here {
                    // Checked above.
                    let len = range.len() as u32;
                    w.staged.insert(
                        *hash,
                        Location {
                            pack,
                            offset: place.offset,
                            len,
                        },
                    );
                    if *moved {
                        w.moved.insert(*hash);
                    }
                }
                // Synced with the next sync, before the entries are recorded.
                if !here.is_empty() && !w.closed.iter().any(|(id, _)| *id == pack) {
                    w.closed.push((pack, adopted.file.clone()));
                }
            }
            None => {
                for (hash, range, _, moved) in &here {
                    copy.push((*hash, range.clone()));
                    if *moved {
                        w.moved.insert(*hash);
                    }
                }
            }
        }
        let mut behind = Vec::new();
        if !copy.is_empty() {
            let slices: Vec<(Hash, &[u8])> = copy
                .iter()
                .map(|(hash, range)| (*hash, &bytes[range.clone()]))
                .collect();
            self.append(&mut w, &slices, &mut behind)?;
        }
        let fresh = new
            .into_iter()
            .map(|(hash, range, place)| (hash, &bytes[range.clone()], Some(range), Some(place)))
            .collect();
        let full = self.queue_fresh(&mut w, Some(buffer), fresh);
        let spill = w.spill_due();
        drop(w);
        for (id, range) in behind {
            self.drop_behind(id, range);
        }
        if let Some(fresh) = full {
            self.hand_on(fresh);
        }
        if spill {
            self.spill();
        }
        Ok(())
    }

    /// Syncs the store from a put that left [`SPILL_ENTRIES`] chunks staged, so that a
    /// large file's locations are written out as it is stored rather than all held until
    /// its event is appended. A failure is only logged: the chunks stay staged, and the
    /// next sync, which the log's append waits for, meets it again.
    fn spill(&self) {
        if let Err(e) = self.sync() {
            tracing::warn!("syncing the content store while a large content is stored: {e}");
        }
    }

    /// Queues chunks put locally and new to the store for the fresh-chunk sink, each as
    /// (hash, bytes, range in `buffer`, place): as ranges of `buffer` when at least half
    /// of it is new (no copy), copied otherwise. Returns a full batch to hand on, outside
    /// the writer's lock (`w`, locked). Nothing is queued while no sink is set.
    fn queue_fresh(
        &self,
        w: &mut PackWriter,
        buffer: Option<&SharedBuffer>,
        new: Vec<NewChunk<'_>>,
    ) -> Option<Vec<FreshChunk>> {
        if new.is_empty() || !self.inner.sink.read().is_ok_and(|s| s.is_some()) {
            return None;
        }
        let new_bytes: usize = new.iter().map(|(_, bytes, _, _)| bytes.len()).sum();
        let buffer = buffer.filter(|buffer| new_bytes * 2 >= (***buffer).as_ref().len());
        for (hash, bytes, range, place) in new {
            let bytes = buffer
                .zip(range)
                .and_then(|(buffer, range)| ChunkBytes::shared(buffer.clone(), range))
                .unwrap_or_else(|| ChunkBytes::copied(bytes));
            w.fresh.push(FreshChunk { hash, bytes, place });
        }
        (w.fresh.len() >= FRESH_BATCH).then(|| std::mem::take(&mut w.fresh))
    }

    /// Where `hash` is held, if anywhere: staged, in a manifest, in the index or in a run
    /// (`w` is the writer, locked).
    fn known(&self, w: &PackWriter, hash: &Hash) -> Result<Option<Location>, LogError> {
        if let Some(location) = w.in_memory(hash).or_else(|| self.recent(hash)) {
            return Ok(Some(location));
        }
        self.durable(hash)
    }

    /// Where the index, or else a run, has `hash`: the durable entries, after those in
    /// memory.
    fn durable(&self, hash: &Hash) -> Result<Option<Location>, LogError> {
        match self.inner.index.get(hash.0)? {
            Some(entry) => Location::decode(hash, &entry).map(Some),
            None => self
                .inner
                .runs
                .read()
                .map_err(|_| LogError::Closed)?
                .get(hash),
        }
    }

    /// Stores `bytes` offered under `hash` (by a peer), after checking that they hash to
    /// it. Such chunks are not fresh: they are not handed to the sink.
    pub fn put_verified(&self, hash: &Hash, bytes: &[u8]) -> Result<(), LogError> {
        self.put_many_verified(&[(*hash, bytes)])
    }

    /// [`put_verified`](Self::put_verified) for many chunks: all are checked first
    /// ([`check`](Self::check)), then those not known yet are written a group at a time
    /// (one system call each). A chunk that does not match its hash fails the call, and
    /// nothing of it is stored.
    pub fn put_many_verified(&self, chunks: &[(Hash, &[u8])]) -> Result<(), LogError> {
        self.put_many_verified_at(chunks, &[])
    }

    /// [`put_many_verified`](Self::put_many_verified) for chunks some of which a peer
    /// sent with their place in a file (`places[i]` is `chunks[i]`'s; missing ones have
    /// none): those are written at that place into their stream's pack (see the module
    /// docs), where a place lets them; the others are appended as usual.
    pub fn put_many_verified_at(
        &self,
        chunks: &[(Hash, &[u8])],
        places: &[Option<Place>],
    ) -> Result<(), LogError> {
        self.put_checked_at(ChunkStore::check(chunks)?, places)
    }

    /// Checks that each of a peer's chunks hashes to the hash it came with, all in one
    /// pass ([`Hash::of_each`]: hashed together, they share the SIMD lanes one chunk of an
    /// uneven size leaves idle), without touching any store or lock: a receiver checks a
    /// batch while the batch before it is being written, and then stores it with
    /// [`put_checked_at`](Self::put_checked_at). The first chunk that does not match
    /// fails the check.
    pub fn check<'a>(chunks: &'a [(Hash, &'a [u8])]) -> Result<Checked<'a>, LogError> {
        let bytes: Vec<&[u8]> = chunks.iter().map(|&(_, bytes)| bytes).collect();
        for (&(hash, _), actual) in chunks.iter().zip(Hash::of_each(&bytes)) {
            if actual != hash {
                return Err(mismatch(&hash, &actual));
            }
        }
        Ok(Checked { chunks })
    }

    /// [`put_many_verified_at`](Self::put_many_verified_at) for chunks already checked,
    /// written 1 MiB at a time (one system call each).
    pub fn put_checked_at(
        &self,
        checked: Checked<'_>,
        places: &[Option<Place>],
    ) -> Result<(), LogError> {
        let chunks = checked.chunks;
        let place = |i: usize| places.get(i).copied().flatten();
        let mut start = 0;
        let mut bytes_in_group = 0;
        for (i, (_, bytes)) in chunks.iter().enumerate() {
            bytes_in_group += bytes.len();
            if bytes_in_group >= GROUP_BYTES {
                let group: Vec<Option<Place>> = (start..=i).map(place).collect();
                self.put_chunks(&chunks[start..=i], &group, None, Origin::Peer)?;
                (start, bytes_in_group) = (i + 1, 0);
            }
        }
        let group: Vec<Option<Place>> = (start..chunks.len()).map(place).collect();
        self.put_chunks(&chunks[start..], &group, None, Origin::Peer)
    }

    /// Sets where the chunks put from now on by [`put`](Self::put) and
    /// [`put_prehashed`](Self::put_prehashed) go (their hashes and a copy of their bytes);
    /// the engine sets it to push new content to peers. `None` stops handing them on.
    pub fn set_fresh_sink(&self, sink: Option<FreshSink>) {
        if let Ok(mut slot) = self.inner.sink.write() {
            *slot = sink;
        }
        if let Ok(mut w) = self.inner.writer.lock() {
            w.fresh.clear();
        }
    }

    /// Hands the fresh chunks not yet handed on to the sink. The log calls it before each
    /// local append, so that the chunks leave before the events that name them.
    pub fn flush_fresh(&self) {
        let fresh = match self.inner.writer.lock() {
            Ok(mut w) if !w.fresh.is_empty() => std::mem::take(&mut w.fresh),
            _ => return,
        };
        self.hand_on(fresh);
    }

    fn hand_on(&self, fresh: Vec<FreshChunk>) {
        if let Ok(sink) = self.inner.sink.read() {
            if let Some(sink) = sink.as_ref() {
                sink(fresh);
            }
        }
    }

    fn put_chunks(
        &self,
        chunks: &[(Hash, &[u8])],
        places: &[Option<Place>],
        shared: Option<(&SharedBuffer, &[Range<usize>])>,
        origin: Origin,
    ) -> Result<(), LogError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let (full, spill) = self.write_chunks(chunks, places, shared, origin)?;
        if let Some(fresh) = full {
            self.hand_on(fresh);
        }
        if spill {
            self.spill();
        }
        Ok(())
    }

    /// Appends the chunks not known yet to the pack (a peer's checked first, so that known
    /// ones are neither hashed nor looked up twice; a peer's placed ones written into
    /// their stream's pack instead), and local ones known only in a file of the folder
    /// (see [`ChunkStore::adopt`]), which are not fresh; returns a full batch of fresh
    /// hashes to hand on (outside the writer's lock), and whether the store is to be
    /// synced now ([`ChunkStore::spill`]), once that batch is handed on.
    fn write_chunks(
        &self,
        chunks: &[(Hash, &[u8])],
        places: &[Option<Place>],
        shared: Option<(&SharedBuffer, &[Range<usize>])>,
        origin: Origin,
    ) -> Result<(Option<Vec<FreshChunk>>, bool), LogError> {
        let inner = &self.inner;
        let mut w = inner.writer.lock().map_err(|_| LogError::Closed)?;
        w.busy();
        let mut new: Vec<(Hash, &[u8])> = Vec::with_capacity(chunks.len());
        let mut new_places: Vec<Option<Place>> = Vec::with_capacity(chunks.len());
        let mut new_index: Vec<usize> = Vec::with_capacity(chunks.len());
        // A batch may name a chunk twice (a file with repeated content).
        let mut taken: HashSet<Hash> = HashSet::with_capacity(chunks.len());
        // Chunks known only where someone else may change them, written again (below).
        let mut again: HashSet<Hash> = HashSet::new();
        let mut packs = PackKinds::default();
        for (i, &(hash, bytes)) in chunks.iter().enumerate() {
            if taken.contains(&hash) {
                continue;
            }
            if let Some(location) = self.known(&w, &hash)? {
                // A file's own chunk held only in another file of the folder (adopted or
                // lent) is copied into a pack of the store's own: an edit of that file
                // must not lose content this one still needs (see `adopt`). A peer's
                // chunks need no copy: their origin holds them.
                if origin != Origin::Local {
                    continue;
                }
                if !packs.of(self, location.pack).shared {
                    w.rely_on(location.pack);
                    continue;
                }
                again.insert(hash);
                w.moved.insert(hash);
            }
            taken.insert(hash);
            if u32::try_from(bytes.len()).is_err() {
                return Err(LogError::ContentIo {
                    op: "storing",
                    path: pack_path(&inner.dir, w.id),
                    source: std::io::Error::other("a chunk larger than 4 GiB"),
                });
            }
            new.push((hash, bytes));
            new_places.push(places.get(i).copied().flatten());
            new_index.push(i);
        }
        if new.is_empty() {
            return Ok((None, false));
        }
        let mut behind = Vec::new();
        if origin == Origin::Peer && new_places.iter().any(Option::is_some) {
            let mut shared = Vec::new();
            // Runs of consecutive chunks of one stream: (stream, its chunks).
            let mut run: Option<(u64, Vec<Placed>)> = None;
            for (&(hash, bytes), place) in new.iter().zip(&new_places) {
                let Some(place) = place else {
                    shared.push((hash, bytes));
                    continue;
                };
                match &mut run {
                    Some((stream, chunks)) if *stream == place.stream => {
                        chunks.push((hash, bytes, place.offset));
                    }
                    _ => {
                        if let Some((stream, chunks)) = run.take() {
                            shared.extend(self.write_stream(
                                &mut w,
                                stream,
                                &chunks,
                                &mut behind,
                            )?);
                        }
                        run = Some((place.stream, vec![(hash, bytes, place.offset)]));
                    }
                }
            }
            if let Some((stream, chunks)) = run {
                shared.extend(self.write_stream(&mut w, stream, &chunks, &mut behind)?);
            }
            self.append(&mut w, &shared, &mut behind)?;
        } else {
            self.append(&mut w, &new, &mut behind)?;
        }
        let fresh = match origin {
            Origin::Local => new
                .iter()
                .zip(&new_places)
                .enumerate()
                .filter(|(_, ((hash, _), _))| !again.contains(hash))
                .map(|(k, (&(hash, bytes), &place))| {
                    let range = shared.and_then(|(_, ranges)| ranges.get(new_index[k]).cloned());
                    (hash, bytes, range, place)
                })
                .collect(),
            Origin::Peer => Vec::new(),
        };
        let full = self.queue_fresh(&mut w, shared.map(|(buffer, _)| buffer), fresh);
        let spill = w.spill_due();
        // The wait for the writeback happens outside the lock, which every lookup of a
        // staged chunk takes.
        drop(w);
        for (id, range) in behind {
            self.drop_behind(id, range);
        }
        Ok((full, spill))
    }

    /// Appends `new` (chunks not stored yet) to the shared pack and stages their
    /// locations; a range to drop behind the writer goes to `behind`.
    fn append(
        &self,
        w: &mut PackWriter,
        new: &[(Hash, &[u8])],
        behind: &mut Vec<(u32, (u64, u64))>,
    ) -> Result<(), LogError> {
        if new.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let file = match &w.file {
            Some(file) => file.clone(),
            None => {
                let id = w.id;
                let file = self.create_pack(w, id, true)?;
                w.file = Some(file.clone());
                w.written = Writeback::default();
                file
            }
        };
        if let Err(e) = write_all_vectored(&file, new) {
            // Part of the batch may be in the pack, so the next chunk would not be where
            // `len` says: cut the pack back to what it held (the chunks in it stay good),
            // or, if even that fails, start a new pack. Cutting back keeps a full disk,
            // where every peer session retries, from leaving a new pack file behind each
            // time.
            let path = pack_path(&inner.dir, w.id);
            if file.set_len(w.written.len()).is_err() {
                w.rotate();
            }
            return Err(io_error("writing", path)(e));
        }
        let mut offset = w.written.len();
        for (hash, bytes) in new {
            let len = bytes.len() as u32; // checked by the caller
            let location = Location {
                pack: w.id,
                offset,
                len,
            };
            offset += u64::from(len);
            w.staged.insert(*hash, location);
        }
        let appended = offset - w.written.len();
        if let Some(range) = w.written.appended(&file, appended) {
            behind.push((w.id, range));
        }
        if w.written.len() >= PACK_BYTES {
            w.rotate();
        }
        Ok(())
    }

    /// Writes `run` (a peer's chunks not stored yet, with their offsets in `stream`) into
    /// the stream's pack where their places let them: at or above everything written
    /// there, so that no chunk overlaps another. Returns the others, for the shared pack.
    fn write_stream<'a>(
        &self,
        w: &mut PackWriter,
        stream: u64,
        run: &[Placed<'a>],
        behind: &mut Vec<(u32, (u64, u64))>,
    ) -> Result<Vec<(Hash, &'a [u8])>, LogError> {
        let elsewhere_all = || run.iter().map(|&(h, b, _)| (h, b)).collect();
        if !w.streams.contains_key(&stream) {
            // Only a stream that starts at its first byte can ever be lent (nothing is
            // written below what a pack holds); and only so many new ones between syncs.
            if run.first().map(|&(_, _, offset)| offset) != Some(0) || w.new_streams >= NEW_STREAMS
            {
                return Ok(elsewhere_all());
            }
            if w.streams.len() >= OPEN_STREAMS {
                let oldest = w
                    .streams
                    .iter()
                    .min_by_key(|(_, p)| p.used)
                    .map(|(s, _)| *s);
                if let Some(oldest) = oldest {
                    w.close_stream(oldest);
                }
            }
            // A stream pack takes the next pack number; the shared pack moves on to the
            // one after (closed first, so that numbers stay in creation order).
            w.rotate();
            let id = w.id;
            w.id += 1;
            let file = self.create_pack(w, id, false)?;
            w.new_streams += 1;
            w.streams.insert(
                stream,
                StreamPack {
                    id,
                    file,
                    written: Writeback::default(),
                    dirty: false,
                    used: 0,
                    allocated: 0,
                    reserving: true,
                },
            );
        }
        w.stream_clock += 1;
        let clock = w.stream_clock;
        let Some(pack) = w.streams.get_mut(&stream) else {
            return Ok(elsewhere_all());
        };
        pack.used = clock;
        // Blocks are reserved only ahead of a stream written in order, up to the run's
        // end. A run that skips ahead (the chunks between are held already, as when a
        // peer pushes only the parts of a large file that changed) would have them
        // reserved all the way to its far end, inside the file where nothing ever writes
        // them and no trim gives them back: from there on the pack allocates as it writes.
        let mut last = pack.written.len();
        let in_order = run.iter().all(|&(_, bytes, offset)| {
            let follows = offset == last;
            last = offset.saturating_add(bytes.len() as u64);
            follows
        });
        if !in_order {
            pack.reserving = false;
        }
        if pack.reserving && last > pack.allocated {
            match allocate_ahead(&pack.file, pack.allocated, last) {
                Some(end) => pack.allocated = end,
                None => pack.reserving = false,
            }
        }
        let (id, file) = (pack.id, pack.file.clone());
        let mut elsewhere = Vec::new();
        let mut placed: Vec<(Hash, Location)> = Vec::new();
        let mut pending: Vec<(Hash, &[u8])> = Vec::new();
        let mut pending_at = 0;
        let mut end = pack.written.len();
        let mut result = Ok(());
        for &(hash, bytes, offset) in run {
            let fits = offset >= end
                && offset
                    .checked_add(bytes.len() as u64)
                    .is_some_and(|e| e <= STREAM_BYTES);
            if !fits {
                elsewhere.push((hash, bytes));
                continue;
            }
            if offset != end && !pending.is_empty() {
                result = write_all_vectored_at(&file, &pending, pending_at);
                if result.is_err() {
                    break;
                }
                pending.clear();
            }
            if pending.is_empty() {
                pending_at = offset;
            }
            pending.push((hash, bytes));
            placed.push((
                hash,
                Location {
                    pack: id,
                    offset,
                    len: bytes.len() as u32, // checked by the caller
                },
            ));
            end = offset + bytes.len() as u64;
        }
        if result.is_ok() && !pending.is_empty() {
            result = write_all_vectored_at(&file, &pending, pending_at);
        }
        if let Err(e) = result {
            // What was written may be torn: nothing more goes to this pack, and nothing
            // of this run is indexed in it.
            w.close_stream(stream);
            return Err(io_error("writing", pack_path(&self.inner.dir, id))(e));
        }
        if let Some(pack) = w.streams.get_mut(&stream) {
            let grown = end - pack.written.len();
            if grown > 0 {
                pack.dirty = true;
                if let Some(range) = pack.written.appended(&file, grown) {
                    behind.push((id, range));
                }
            }
        }
        w.staged.extend(placed);
        Ok(elsewhere)
    }

    /// Keeps `file`, pack `id` open for reading, among at most [`OPEN_READERS`]: a stream
    /// pack is made for every large file received, and keeping each open would run out of
    /// file descriptors. The pack closed to make room is the oldest (the writer keeps its
    /// own handle on the packs it writes; a read of a closed pack opens it again).
    fn keep_reader(&self, id: u32, file: &Arc<File>) {
        if let Ok(mut readers) = self.inner.readers.write() {
            if readers.len() >= OPEN_READERS && !readers.contains_key(&id) {
                if let Some(&oldest) = readers.keys().min() {
                    readers.remove(&oldest);
                }
            }
            readers.insert(id, file.clone());
        }
    }

    /// Creates pack `id`, open for reading and for writing (appending only, for the
    /// shared pack: a stream pack is written at offsets), and registers it for reads.
    fn create_pack(
        &self,
        w: &mut PackWriter,
        id: u32,
        append: bool,
    ) -> Result<Arc<File>, LogError> {
        w.created = true;
        let path = pack_path(&self.inner.dir, id);
        let file = Arc::new(
            OpenOptions::new()
                .create_new(true)
                .write(true)
                .append(append)
                .read(true)
                .open(&path)
                .map_err(io_error("creating", path))?,
        );
        self.keep_reader(id, &file);
        Ok(file)
    }

    /// Makes every chunk put so far durable: syncs the packs written to, then records
    /// their chunks in sled, which the caller's flush makes durable, or in a run, durable
    /// at once. The log calls it before each flush, and a put that leaves
    /// `SPILL_ENTRIES` chunks staged calls it too.
    ///
    /// At least `RUN_ENTRIES` chunks at once (a large file's: 16,000 for 256 MiB) are
    /// written as a run, a sorted file beside the packs, and never go into sled (see the
    /// `runs` module): in sled's nodes, and in the manifests and vectors on their way
    /// there, they held memory that grew with the file.
    ///
    /// More than a few chunks at once, fewer than that (a few hundred small files'), are
    /// recorded as one *manifest*, a single sled value, and written out later, all the
    /// manifests waiting as one run (see `index_manifests`),
    /// once the store has been out of use for `INDEX_QUIET`, by a thread of their own:
    /// indexing a large file's 16,000 entries took a tenth of a second, and 10,000 small
    /// files' a tenth of each side's CPU, on the path from a change to its copy on the
    /// peer (the event waits for this sync, and the peer's write of the file for the
    /// event). Until then lookups find them in memory. A sync writes them itself when
    /// they reach `UNINDEXED_MAX`, and so does every sync after [`close`](Self::close)
    /// (which writes what waits), and the first sync after an open those a crash left
    /// (`open` takes them back). A manifest is removed once its entries'
    /// run is durable.
    pub fn sync(&self) -> Result<(), LogError> {
        // One sync at a time: a second one waits for the first and then syncs what was
        // put since. (Two at once could each take part of the packs to sync, and one
        // index chunks in a pack the other has not synced yet.)
        let _one = self.inner.syncing.lock().map_err(|_| LogError::Closed)?;
        let synced = self.sync_locked();
        // Outside the writer's lock (puts and lookups go on), still one sync at a time.
        Runs::merge_due_runs(&self.inner.runs);
        synced
    }

    /// [`sync`](Self::sync), its lock held.
    fn sync_locked(&self) -> Result<(), LogError> {
        let inner = &self.inner;
        let mut w = inner.writer.lock().map_err(|_| LogError::Closed)?;
        if let Some(why) = &w.broken {
            return Err(LogError::ContentIo {
                op: "syncing",
                path: inner.dir.clone(),
                source: std::io::Error::other(why.clone()),
            });
        }
        w.last_busy = Instant::now();
        let closed = inner.closed.load(Ordering::Acquire);
        if w.index_due || closed || w.unindexed.len() >= UNINDEXED_MAX {
            self.index_manifests(&mut w)?;
        }
        if w.again {
            self.write_again(&mut w)?;
        }
        if w.staged.is_empty() {
            return Ok(());
        }
        // What to sync and what it covers, taken under the lock; the syncs themselves
        // run outside it, so that chunks are put and looked up meanwhile (they took the
        // writers and readers of every chunk off their work for the disk's time).
        let mut staged: Vec<(Hash, Location)> = w.staged.iter().map(|(h, l)| (*h, *l)).collect();
        let taken_at = w.staged.changes;
        let current = w.file.clone().map(|file| (w.id, file));
        let mut files = std::mem::take(&mut w.closed);
        files.extend(current);
        for pack in w.streams.values_mut().filter(|p| p.dirty) {
            files.push((pack.id, pack.file.clone()));
            pack.dirty = false;
        }
        let created = std::mem::take(&mut w.created);
        w.new_streams = 0;
        drop(w);

        // Their pages stay in the page cache until this sync has succeeded, or has
        // given them up (see `KeptPages::syncing`); taken out of the set on every way out.
        let _kept = SyncingPages::mark(inner, files.iter().map(|(id, _)| *id));
        let synced = files
            .iter()
            .try_for_each(|(id, file)| {
                file.sync_data()
                    .map_err(io_error("syncing", pack_path(&inner.dir, *id)))
            })
            .and_then(|()| match created {
                true => File::open(&inner.dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(io_error("syncing", inner.dir.clone())),
                false => Ok(()),
            });
        let mut w = inner.writer.lock().map_err(|_| LogError::Closed)?;
        if let Err(e) = synced {
            // Not tried again on these packs (see the module docs): the next sync writes
            // their staged chunks again, into a new pack, whose creation syncs the
            // directory too.
            self.give_up(&mut w, files.iter().map(|(id, _)| *id))?;
            w.created |= created;
            tracing::error!("{e}; the chunks it held are written again before the next sync");
            return Err(e);
        }
        // Left staged until recorded, so that a failure below loses no location: the
        // next sync (an append tried again) records them then. A chunk dropped as
        // damaged meanwhile is not recorded.
        // (None lies in a pack given up meanwhile: only a sync, and a lend, which waits
        // for a sync, give packs up.)
        // Each copy of a large file's entries is what the peak memory grows by with the
        // file's size: this vector is filtered, split and sorted in place, and then moved
        // into `unindexed` (or merged there in place).
        if w.staged.changes != taken_at {
            staged.retain(|(h, l)| w.staged.get(h) == Some(l));
        }
        // Chunks recorded anew are no longer where the index or a manifest waiting to be
        // indexed has them: indexed now, over both (see `PackWriter::moved`).
        let mut moved: Vec<(Hash, Location)> = Vec::new();
        if !w.moved.is_empty() {
            staged.retain(|entry| {
                let keep = !w.moved.contains(&entry.0);
                if !keep {
                    moved.push(*entry);
                }
                keep
            });
        }
        if !moved.is_empty() {
            moved.sort_unstable_by_key(|(h, _)| *h);
            self.index_sorted(&moved)?;
            for (hash, _) in &moved {
                w.unindexed.remove(hash);
                w.moved.remove(hash);
                w.staged.remove(hash);
            }
        }
        // Sorted here, in place: indexed as it is, or moved into `unindexed`.
        staged.sort_unstable_by_key(|(h, _)| *h);
        if staged.len() < MANIFEST_ENTRIES {
            self.index_sorted(&staged)?;
            w.staged.forget(&staged, taken_at);
        } else if staged.len() >= RUN_ENTRIES {
            // Removals from the index and the manifests durable first (a chunk forgotten
            // as damaged, then stored again into this run): back after a crash, their
            // older entries would be looked up before this run's.
            inner.index.flush()?;
            // Left staged if this fails, for the next sync.
            inner.runs_mut()?.write(&staged)?;
            w.staged.forget(&staged, taken_at);
            if let Ok(mut recent) = inner.recent.write() {
                recent.extend(&staged);
            }
        } else {
            let mut recorded = 0;
            let mut failed = None;
            for part in staged.chunks(MANIFEST_MAX) {
                let id = w.next_manifest;
                if let Err(e) = inner
                    .manifests
                    .insert(id.to_be_bytes(), encode_manifest(part))
                {
                    failed = Some(e);
                    break;
                }
                w.next_manifest += 1;
                w.manifested.push(id);
                recorded += part.len();
            }
            // The entries of every manifest written go into memory with it, even when a
            // later one failed: no manifest's entries are missing there. The rest stay
            // staged, for the next sync.
            staged.truncate(recorded);
            w.staged.forget(&staged, taken_at);
            w.unindexed.add(staged);
            if recorded > 0 {
                self.index_later(&w);
            }
            if let Some(e) = failed {
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Writes the manifests' entries as one run (durable when written), and only then
    /// removes the manifests; the entries stay in memory until all that worked. Called
    /// with the sync lock held; the caller merges runs once it let go of the writer's.
    ///
    /// A run, not sled's index: inserting many small files' entries into sled (10,000 at
    /// W1's size, all those since the last time the store was quiet) grew its nodes by
    /// more than 100 MiB for 40,000 files. A manifest whose removal a crash undid comes
    /// back at the next open, and is written again: its entries are then in two runs,
    /// the same in both.
    fn index_manifests(&self, w: &mut PackWriter) -> Result<(), LogError> {
        if w.manifested.is_empty() {
            w.index_due = false;
            return Ok(());
        }
        let inner = &self.inner;
        // Sorted already: written from where they are, not from a sorted copy.
        inner.runs_mut()?.write(w.unindexed.entries())?;
        for id in &w.manifested {
            inner.manifests.remove(id.to_be_bytes())?;
        }
        // Durable before any later run: a manifest back after a crash would bring an
        // entry older than one a later run holds, and win over it (it is looked up
        // first).
        inner.manifests.flush()?;
        w.manifested.clear();
        w.unindexed = SortedLocations::default();
        w.index_due = false;
        Ok(())
    }

    /// Starts the thread that indexes the manifests once the store is quiet, unless it
    /// runs already (`w` is the writer, locked). It holds the store only while it works,
    /// and ends once the manifests are indexed, or the store is closed or gone.
    fn index_later(&self, _w: &PackWriter) {
        if self.inner.closed.load(Ordering::Acquire)
            || self.inner.indexer.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let store = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("converge-index".into())
            .spawn(move || loop {
                // Woken early by `close`.
                std::thread::park_timeout(INDEX_QUIET);
                let Some(inner) = store.upgrade() else {
                    return;
                };
                if (ChunkStore { inner }).index_if_quiet() {
                    return;
                }
            });
        match spawned {
            Ok(handle) => {
                if let Ok(mut slot) = self.inner.indexer_thread.lock() {
                    // The one before has ended (it cleared `indexer` as its last step).
                    *slot = Some(handle);
                }
            }
            Err(e) => {
                // A sync over the limit, or `close`, indexes them.
                tracing::warn!("no thread to index chunk manifests: {e}");
                self.inner.indexer.store(false, Ordering::Release);
            }
        }
    }

    /// Stops the indexer (waiting for a round under way) and indexes what manifests wait,
    /// so that the next open does not have to; blocks. The log calls it when it closes,
    /// once nothing appends any more. Syncs still work afterwards; each indexes the
    /// manifests the one before it wrote.
    pub fn close(&self) -> Result<(), LogError> {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        let thread = inner.indexer_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            thread.thread().unpark();
            let _ = thread.join();
        }
        let _one = inner.syncing.lock().map_err(|_| LogError::Closed)?;
        let mut w = inner.writer.lock().map_err(|_| LogError::Closed)?;
        let indexed = self.index_manifests(&mut w);
        drop(w);
        Runs::merge_due_runs(&inner.runs);
        indexed
    }

    /// The indexer's round: indexes the manifests if the store was out of use for
    /// [`INDEX_QUIET`] and no sync is under way. Whether the indexer is done (nothing
    /// left, or an error, which the next sync meets again).
    fn index_if_quiet(&self) -> bool {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return true;
        }
        let _one = match inner.syncing.try_lock() {
            Ok(one) => one,
            Err(std::sync::TryLockError::WouldBlock) => return false,
            // A thread panicked holding it: the store syncs no more.
            Err(std::sync::TryLockError::Poisoned(_)) => return true,
        };
        let Ok(mut w) = inner.writer.lock() else {
            return true;
        };
        if !w.manifested.is_empty() && w.last_busy.elapsed() < w.index_quiet {
            return false;
        }
        if let Err(e) = self.index_manifests(&mut w) {
            tracing::warn!("indexing chunk manifests: {e}; the next sync tries again");
            w.index_due = true;
        }
        // Under the writer's lock, as a sync that writes a manifest looks at it.
        inner.indexer.store(false, Ordering::Release);
        drop(w);
        Runs::merge_due_runs(&inner.runs);
        true
    }

    /// Gives up packs `ids` (see [`Inner::failed`]): they are written to and synced no
    /// more, and the next sync first writes the chunks staged in them again.
    fn give_up(
        &self,
        w: &mut PackWriter,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<(), LogError> {
        let mut failed = self.inner.failed.write().map_err(|_| LogError::Closed)?;
        failed.extend(ids);
        w.abandon(&failed);
        w.again = true;
        Ok(())
    }

    /// Writes the chunks staged in packs a sync failed on again, appended to the current
    /// pack, from where they lie (the page cache, on ext4: the pages a failed writeback
    /// left stay there), checked against their hashes. One that reads short or wrong, or
    /// cannot be read (`EIO`, its pack gone), is lost, and an event naming it may be
    /// waiting to be made durable: the store then refuses to sync until it is opened
    /// again. Any other error is returned, and the next sync tries again.
    fn write_again(&self, w: &mut PackWriter) -> Result<(), LogError> {
        let failed = self
            .inner
            .failed
            .read()
            .map_err(|_| LogError::Closed)?
            .clone();
        let mut moving: Vec<(Hash, Location)> = w
            .staged
            .iter()
            .filter(|(_, location)| failed.contains(&location.pack))
            .map(|(h, l)| (*h, *l))
            .collect();
        moving.sort_unstable_by_key(|(_, l)| (l.pack, l.offset));
        let mut group: Vec<(Hash, Vec<u8>)> = Vec::new();
        let mut bytes_in_group = 0;
        for (i, &(hash, location)) in moving.iter().enumerate() {
            let path = pack_path(&self.inner.dir, location.pack);
            let mut bytes = vec![0; location.len as usize];
            let read = self.pack(location.pack).and_then(|pack| {
                pack.read_exact_at(&mut bytes, location.offset)
                    .map_err(io_error("reading", path.clone()))
            });
            let lost = match read {
                Ok(()) => check(&hash, &bytes).err(),
                // Cut short, gone, or unreadable where a failed writeback left it: lost.
                // (Anything else, a full descriptor table say, passes.)
                Err(LogError::ContentIo { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::NotFound
                    ) || source.raw_os_error() == Some(libc::EIO)
                        || source.kind() == std::io::ErrorKind::PermissionDenied
                            && self.is_folders(location.pack) =>
                {
                    Some(LogError::ContentIo {
                        op: "reading",
                        path: path.clone(),
                        source,
                    })
                }
                Err(e) => return Err(e),
            };
            match lost {
                // An adopted file changed since it was read: the change is an event of
                // its own, which supersedes the content the chunk was of (see `adopt`).
                // (A disk's failure to read it is no change: that chunk is lost.)
                Some(e) if self.is_lent(location.pack) && !is_eio(&e) => {
                    tracing::info!("{e}: changed in the folder since it was read; dropped");
                    w.staged.remove(&hash);
                }
                Some(e) => return Err(self.lost(w, &hash, &path, &e)),
                None => {
                    bytes_in_group += bytes.len();
                    group.push((hash, bytes));
                }
            }
            if !group.is_empty() && (bytes_in_group >= WRITE_AGAIN_BYTES || i + 1 == moving.len()) {
                let slices: Vec<(Hash, &[u8])> =
                    group.iter().map(|(h, b)| (*h, b.as_slice())).collect();
                // The current pack is a new one: the failed ones were given up. (Its
                // ranges to drop behind are left in the page cache: a rare path.)
                self.append(w, &slices, &mut Vec::new())?;
                group.clear();
                bytes_in_group = 0;
            }
        }
        if !moving.is_empty() {
            let moved = moving.len();
            tracing::info!("{moved} chunk(s) of packs given up written again");
        }
        w.again = false;
        Ok(())
    }

    /// Records that `hash`, staged in `pack` (a pack a sync failed on), is lost (`why`):
    /// from now on no sync succeeds until the store is opened again (see the module
    /// docs). Returns the error to report.
    fn lost(&self, w: &mut PackWriter, hash: &Hash, pack: &Path, why: &LogError) -> LogError {
        let why = format!(
            "chunk {hash:?} was lost with a failed sync of {} ({why}); nothing more is made \
             durable: restart converge to store it again",
            pack.display()
        );
        tracing::error!("{why}");
        w.broken = Some(why.clone());
        LogError::ContentIo {
            op: "syncing",
            path: pack.to_owned(),
            source: std::io::Error::other(why),
        }
    }

    /// Waits for the writeback of `range` of pack `id` and drops it from the page cache
    /// (see [`Writeback`]), off the writer's thread (see [`behind`]), through a
    /// descriptor of its own: the wait reports a failed writeback to the descriptor it is
    /// made on, once, and the pack's own must keep that for the sync, which would
    /// otherwise succeed over the lost pages. Advisory. Once a wait on a pack failed, or
    /// the pack was given up, none of its pages is dropped any more: which ranges the
    /// failure was in is not told (an error is reported once per descriptor, not per
    /// range), and the sync that writes them again reads them from the page cache. The
    /// waits run one after another, so that one that failed is recorded before the next
    /// opens its descriptor (which hears only of later failures). The store is not kept
    /// alive for them: closed meanwhile, nothing is dropped.
    fn drop_behind(&self, id: u32, range: (u64, u64)) {
        if range.1 == 0 {
            return;
        }
        let path = pack_path(&self.inner.dir, id);
        let store = Arc::downgrade(&self.inner);
        behind(move || {
            let Ok(file) = File::open(&path) else {
                return;
            };
            let waited = wait_behind(&file, range);
            let Some(inner) = store.upgrade() else {
                return;
            };
            // Given up is read under this lock: a failed sync gives its packs up before
            // it takes them out of `syncing`, under the same lock.
            let Ok(mut keep) = inner.keep_pages.lock() else {
                return;
            };
            let given_up = inner.failed.read().map_or(true, |f| f.contains(&id));
            if !waited {
                keep.kept.insert(id);
            } else if !keep.kept.contains(&id) && !keep.syncing.contains(&id) && !given_up {
                evict(&file, range);
            }
        });
    }

    /// Puts `entries`, sorted by hash, into the index (and the recent locations).
    /// In key order, a batch's entries fall into few of sled's leaves: about 15% less time
    /// than in hash-map order.
    fn index_sorted(&self, entries: &[(Hash, Location)]) -> Result<(), LogError> {
        debug_assert!(entries.windows(2).all(|w| w[0].0 .0 <= w[1].0 .0));
        // In small batches: sled frees the node copies an insert replaces only once no
        // operation is running, so one batch of a large file's 65,000 entries held a
        // quarter of a GiB. The entries are independent; they need no atomicity.
        for part in entries.chunks(INDEX_BATCH) {
            let mut batch = sled::Batch::default();
            for (hash, location) in part {
                batch.insert(&hash.0, &location.encode());
            }
            self.inner.index.apply_batch(batch)?;
            if let Ok(mut recent) = self.inner.recent.write() {
                recent.extend(part);
            }
        }
        Ok(())
    }

    /// Hard-links to `to` (a new path, on the same file system as the store) the stream
    /// pack that holds exactly the data of `content`, from its first byte to its last,
    /// and returns `true`; `false` when no pack does (the data is then to be copied, see
    /// [`for_each_data_piece`](Self::for_each_data_piece)), a run of it handed out as a
    /// [`Piece::InPack`] is still held, or the link fails. Once lent,
    /// the pack is closed to further writes and, the file at `to` being the caller's to
    /// change, its chunks are checked on every read (see the module docs). A pack whose
    /// writeback failed is given up instead (see the module docs). Blocks on a walk of
    /// the content's tree, on a sync under way and on the pack's writeback under way.
    pub fn lend(&self, content: &ContentRef, to: &Path) -> Result<bool, LogError> {
        let open = |w: &PackWriter| !w.streams.is_empty();
        if !self.inner.writer.lock().is_ok_and(|w| open(&w)) {
            return Ok(false);
        }
        // Every data chunk in one pack, one after another from its first byte.
        let mut pack = None;
        let mut end = 0;
        let mut whole = true;
        self.walk_content(content, &mut |_, location| {
            whole &= location.offset == end && *pack.get_or_insert(location.pack) == location.pack;
            // An offset read from the index, so not trusted to add up.
            match location.offset.checked_add(u64::from(location.len)) {
                Some(next) => end = next,
                None => whole = false,
            }
            Ok(())
        })?;
        let Some(pack) = pack.filter(|_| whole && end == content.size) else {
            return Ok(false);
        };
        // Not during a sync: of the two, one could hear of a failed writeback of the pack
        // (each is reported once) and the other not, so that the sync indexed the pack's
        // chunks, or this lent the pack, over the lost pages.
        let _one = self.inner.syncing.lock().map_err(|_| LogError::Closed)?;
        let mut w = self.inner.writer.lock().map_err(|_| LogError::Closed)?;
        let Some((&stream, stream_pack)) = w.streams.iter().find(|(_, p)| p.id == pack) else {
            return Ok(false);
        };
        // Not if the kernel's writeback of it failed (started as it was written): its
        // pages may be clean and not on disk, and the folder's sync, on a descriptor
        // opened since, would not hear of it. Given up like a pack whose sync failed.
        if let Err(e) = writeback_error(&stream_pack.file) {
            self.give_up(&mut w, [pack])?;
            tracing::error!(
                "writing {} failed: {e}; its chunks are written again",
                pack_path(&self.inner.dir, pack).display()
            );
            return Ok(false);
        }
        // Nothing beyond the content (a later chunk of the stream, or one written where
        // a failed write left it).
        if stream_pack.written.len() != content.size
            || stream_pack.file.metadata().map(|m| m.len()).ok() != Some(content.size)
        {
            return Ok(false);
        }
        // Linked under the writer's lock, so that nothing is written to the pack once it
        // is the folder's, and marked lent first, so that no read trusts it from then on.
        let mark = |lent: bool| {
            if let Ok(mut set) = self.inner.lent.write() {
                match lent {
                    true => set.insert(pack),
                    false => set.remove(&pack),
                };
            }
        };
        // Not while a run of it is still to be copied unchecked (by another writer of
        // the same content), nor once local content relies on a chunk of it (the
        // folder's owner could change it; see `adopt`): it is copied here too, then.
        let in_use = self.inner.in_use.lock().map_err(|_| LogError::Closed)?;
        if in_use.contains_key(&pack) || w.relied_on.contains(&pack) {
            return Ok(false);
        }
        mark(true);
        drop(in_use);
        if let Some(stream_pack) = w.streams.get_mut(&stream) {
            stream_pack.trim();
        }
        let from = pack_path(&self.inner.dir, pack);
        match std::fs::hard_link(&from, to) {
            Ok(()) => {
                w.close_stream(stream);
                Ok(true)
            }
            Err(e) => {
                // Still this store's alone (another file system, say): a copy is made.
                mark(false);
                tracing::debug!(
                    "linking {} to {}: {e}; copying instead",
                    from.display(),
                    to.display()
                );
                Ok(false)
            }
        }
    }

    fn locate(&self, hash: &Hash) -> Result<Option<Location>, LogError> {
        let in_memory = {
            let mut w = self.inner.writer.lock().map_err(|_| LogError::Closed)?;
            w.busy();
            w.in_memory(hash)
        };
        match in_memory.or_else(|| self.recent(hash)) {
            Some(location) => Ok(Some(location)),
            None => self.durable(hash),
        }
    }

    fn recent(&self, hash: &Hash) -> Option<Location> {
        self.inner.recent.read().ok()?.get(hash)
    }

    /// [`locate`](Self::locate) for each of `hashes`, each lock taken once for all of
    /// them. Taken and released around each lookup, a lock's atomic instructions kept
    /// the processor from looking up the next hash while the last one's cache miss was
    /// under way: a large file's chunks, looked up as its content is checked and lent,
    /// are each a miss in maps of thousands of entries.
    fn locate_all(&self, hashes: &[Hash]) -> Result<Vec<Option<Location>>, LogError> {
        let mut found: Vec<Option<Location>> = {
            let mut w = self.inner.writer.lock().map_err(|_| LogError::Closed)?;
            w.busy();
            hashes.iter().map(|hash| w.in_memory(hash)).collect()
        };
        if found.iter().any(Option::is_none) {
            if let Ok(recent) = self.inner.recent.read() {
                for (slot, hash) in found.iter_mut().zip(hashes) {
                    if slot.is_none() {
                        *slot = recent.get(hash);
                    }
                }
            }
        }
        for (slot, hash) in found.iter_mut().zip(hashes) {
            if slot.is_none() {
                *slot = self.durable(hash)?;
            }
        }
        Ok(found)
    }

    fn pack(&self, id: u32) -> Result<Arc<File>, LogError> {
        if let Some(file) = self
            .inner
            .readers
            .read()
            .ok()
            .and_then(|r| r.get(&id).cloned())
        {
            return Ok(file);
        }
        let path = pack_path(&self.inner.dir, id);
        let file = Arc::new(File::open(&path).map_err(io_error("opening", path))?);
        self.keep_reader(id, &file);
        Ok(file)
    }

    /// Whether pack `id` was lent to the folder, or adopted from it, by this process.
    fn is_lent(&self, id: u32) -> bool {
        self.inner.lent.read().is_ok_and(|lent| lent.contains(&id))
    }

    /// Whether pack `id` is a file of the folder too: lent to it or adopted from it in this
    /// run, or, from an earlier one, a pack with another name.
    fn is_folders(&self, id: u32) -> bool {
        self.is_lent(id) || self.folders_file(id).is_some()
    }

    /// The device and inode of pack `id` if it is a file of the folder too (see
    /// [`ChunkStore::is_folders`]) and can be looked at.
    fn folders_file(&self, id: u32) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(pack_path(&self.inner.dir, id)).ok()?;
        (self.is_lent(id) || meta.nlink() > 1).then(|| (meta.dev(), meta.ino()))
    }

    /// Whether a chunk at `location` was checked on its way into a pack this process
    /// wrote and has not lent, so that reading it needs no check.
    fn trusted(&self, location: Location) -> bool {
        location.pack >= self.inner.own_packs
            && !self.is_lent(location.pack)
            && !self.is_failed(location.pack)
    }

    /// Whether pack `id` was given up (see [`Inner::failed`]).
    fn is_failed(&self, id: u32) -> bool {
        self.inner.failed.read().map_or(true, |f| f.contains(&id))
    }

    fn read(&self, hash: &Hash, location: Location) -> Result<Vec<u8>, LogError> {
        let mut bytes = vec![0; location.len as usize];
        let trusted = self.trusted(location);
        let read = match self.pack(location.pack) {
            Ok(pack) => pack.read_exact_at(&mut bytes, location.offset),
            // A pack of an earlier run removed, or one lent to the folder or adopted from
            // it whose mode the folder's owner changed: its chunks are lost, like damaged
            // ones.
            Err(LogError::ContentIo { source, .. })
                if !trusted
                    && (source.kind() == std::io::ErrorKind::NotFound
                        || source.kind() == std::io::ErrorKind::PermissionDenied
                            && self.is_folders(location.pack)) =>
            {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            }
            Err(e) => return Err(e),
        };
        let short = match read {
            Ok(()) => false,
            // A pack cut short (by a crash, or, lent, by a change to the folder's file),
            // or gone, lost the chunk: damage, like bytes that do not match.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !trusted => true,
            Err(e) => {
                return Err(io_error(
                    "reading",
                    pack_path(&self.inner.dir, location.pack),
                )(e))
            }
        };
        // Asked again after the read: a lend may have made the pack the folder's file
        // meanwhile, and then what was read is checked like any lent pack's.
        if trusted && self.trusted(location) {
            return Ok(bytes);
        }
        if short || check(hash, &bytes).is_err() {
            self.forget_damaged(hash, location)?;
            return Err(LogError::Corrupt {
                what: format!(
                    "chunk {hash:?} in {}",
                    pack_path(&self.inner.dir, location.pack).display()
                ),
                source: converge_api::CodecError::Malformed(
                    match short {
                        true => "the pack is cut short or gone (dropped; asked of peers again)",
                        false => "bytes do not match their hash (dropped; asked of peers again)",
                    }
                    .into(),
                ),
            });
        }
        Ok(bytes)
    }

    /// Drops a chunk whose bytes at `location` do not match its hash: from then on it is
    /// missing, so a peer's copy is stored when it comes (a known chunk would be skipped),
    /// and it is listed by [`ChunkStore::damaged`] for the engine to ask peers for.
    fn forget_damaged(&self, hash: &Hash, location: Location) -> Result<(), LogError> {
        let path = pack_path(&self.inner.dir, location.pack);
        // Noted before the index entry goes: sled persists its writes in order, so the
        // entry is never gone without the note.
        self.note_changed_file(location.pack)?;
        let mut writer = self.inner.writer.lock().map_err(|_| LogError::Closed)?;
        // A lent pack's chunks may still be staged (lent before the sync).
        if writer.staged.get(hash) == Some(&location) {
            // (An adopted file's chunk changed is superseded, not lost: see `adopt`.)
            if self.is_failed(location.pack) && !self.is_lent(location.pack) {
                // Staged in a pack given up: an event naming it may be waiting to be made
                // durable, and no longer finds it staged.
                let why = LogError::ContentIo {
                    op: "reading",
                    path: path.clone(),
                    source: std::io::Error::other("read short or wrong"),
                };
                self.lost(&mut writer, hash, &path, &why);
            }
            writer.staged.remove(hash);
        }
        if writer.unindexed.get(hash) == Some(&location) {
            writer.unindexed.remove(hash);
            writer.index_due = true;
        }
        if self.inner.index.get(hash.0)?.as_deref() == Some(&location.encode()[..]) {
            self.inner.index.remove(hash.0)?;
        }
        self.inner.runs_mut()?.remove(hash, location)?;
        if let Ok(mut recent) = self.inner.recent.write() {
            recent.newer.remove(hash);
            recent.older.remove(hash);
        }
        if let Ok(mut damaged) = self.inner.damaged.lock() {
            damaged.insert(*hash);
        }
        if self.is_lent(location.pack) {
            // The folder's copy of the file changed since: expected, not damage.
            tracing::info!(
                "chunk {hash:?} changed in {} (lent to the folder); to be fetched again from peers",
                path.display()
            );
        } else {
            tracing::warn!(
                "chunk {hash:?} is damaged in {}; dropped, to be fetched again from peers",
                path.display()
            );
        }
        Ok(())
    }

    /// Notes that pack `id` read changed, if it is a file of the folder too (lent to it,
    /// or adopted from it): a change the folder source did not see (an edit in place that
    /// kept the file's size and mtime, made while the daemon was stopped) left the logged
    /// version without its content, and only chunking the file again gives the event that
    /// supersedes it.
    fn note_changed_file(&self, id: u32) -> Result<(), LogError> {
        let Some(file) = self.folders_file(id) else {
            return Ok(());
        };
        let mut files = self
            .inner
            .changed_files
            .lock()
            .map_err(|_| LogError::Closed)?;
        if files.insert(file) {
            self.inner.changed_tree.insert(encode_file_id(file), &[])?;
            self.inner.any_changed_file.store(true, Ordering::Release);
            self.inner.file_changed.notify_one();
        }
        Ok(())
    }

    /// The files of the folder (device, inode) in which this store found chunks changed
    /// since it recorded them there ([`ChunkStore::get`] reading a pack that is a file of
    /// the folder too): a change the folder source did not see, as its stat hid it. Kept
    /// across restarts until [`ChunkStore::forget_changed_files`]: the folder source
    /// chunks each again whatever its stat says (see [`ChunkStore::is_changed_file`]) in a
    /// whole scan, and forgets those it took at the start of one that completed.
    pub fn changed_files(&self) -> Vec<(u64, u64)> {
        self.inner
            .changed_files
            .lock()
            .map(|files| files.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Forgets `files` (from [`ChunkStore::changed_files`]): a whole scan of the folder
    /// chunked them again and logged what it found.
    pub fn forget_changed_files(&self, files: &[(u64, u64)]) -> Result<(), LogError> {
        let mut set = self
            .inner
            .changed_files
            .lock()
            .map_err(|_| LogError::Closed)?;
        for file in files {
            if set.remove(file) {
                self.inner.changed_tree.remove(encode_file_id(*file))?;
            }
        }
        if set.is_empty() {
            self.inner.any_changed_file.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Whether the file of the folder with inode `ino` on device `dev` is one of
    /// [`ChunkStore::changed_files`]: chunked again whatever its stat says.
    pub fn is_changed_file(&self, dev: u64, ino: u64) -> bool {
        self.inner.any_changed_file.load(Ordering::Acquire)
            && self
                .inner
                .changed_files
                .lock()
                .is_ok_and(|files| files.contains(&(dev, ino)))
    }

    /// Waits until a file of the folder is found changed where this store had recorded
    /// its chunks (see [`ChunkStore::changed_files`]); at once if one was found since the
    /// last wait ended. For the folder source, which then scans the folder again.
    pub async fn files_changed(&self) {
        self.inner.file_changed.notified().await;
    }

    /// The chunks found damaged (see [`ChunkStore::get`]) and not stored again since: the
    /// engine asks connected peers for them while a store has keys it could not show.
    pub fn damaged(&self) -> Vec<Hash> {
        // Not under the set's lock: `locate` takes the writer's, which `forget_damaged`
        // holds while it takes the set's.
        let listed: Vec<Hash> = match self.inner.damaged.lock() {
            Ok(damaged) => damaged.iter().copied().collect(),
            Err(_) => return Vec::new(),
        };
        let (back, missing): (Vec<Hash>, Vec<Hash>) = listed
            .into_iter()
            .partition(|h| matches!(self.locate(h), Ok(Some(_))));
        if let Ok(mut damaged) = self.inner.damaged.lock() {
            for hash in &back {
                damaged.remove(hash);
            }
        }
        missing
    }

    /// Where the chunk stored under `hash` is, if it is here: for [`ChunkStore::read_found`].
    pub fn find(&self, hash: &Hash) -> Result<Option<Found>, LogError> {
        Ok(self.locate(hash)?.map(|location| Found { location }))
    }

    /// The bytes of chunks [`ChunkStore::find`] found, in order, each as
    /// [`ChunkStore::get`] reads it, and checked as it checks them. Chunks that lie one
    /// after another in a pack (a large file's, read back to send) are read in one read,
    /// into one buffer they share, and checked together ([`Hash::of_each`]), where one by
    /// one a sender read back a third of W2's 256 MiB 16 KiB at a time, each into a buffer
    /// of its own and hashed on its own. A run that reads short or does not match is read
    /// again chunk by chunk, which finds and drops the damaged chunk as `get` does.
    pub fn read_found(&self, found: &[(Hash, Found)]) -> Vec<Result<ChunkBytes, LogError>> {
        let mut out = Vec::with_capacity(found.len());
        let mut i = 0;
        while i < found.len() {
            let first = found[i].1.location;
            let mut end = first.offset.saturating_add(u64::from(first.len));
            let mut j = i + 1;
            while let Some((_, next)) = found.get(j) {
                let next = next.location;
                let run_end = end.saturating_add(u64::from(next.len));
                if next.pack != first.pack
                    || next.offset != end
                    || run_end - first.offset > READ_RUN_BYTES
                {
                    break;
                }
                end = run_end;
                j += 1;
            }
            let run = &found[i..j];
            match (run.len() > 1)
                .then(|| self.read_run(run, first, end))
                .flatten()
            {
                Some(chunks) => out.extend(chunks.into_iter().map(Ok)),
                None => {
                    out.extend(run.iter().map(|(hash, found)| {
                        self.read(hash, found.location).map(ChunkBytes::owned)
                    }))
                }
            }
            i = j;
        }
        out
    }

    /// The chunks of `run`, one after another in one pack from `first` to byte `end`, in
    /// one read; `None` if that read fails or a chunk does not match its hash (the caller
    /// reads them one by one then).
    fn read_run(
        &self,
        run: &[(Hash, Found)],
        first: Location,
        end: u64,
    ) -> Option<Vec<ChunkBytes>> {
        let len = usize::try_from(end - first.offset).ok()?;
        let mut bytes = vec![0; len];
        self.pack(first.pack)
            .ok()?
            .read_exact_at(&mut bytes, first.offset)
            .ok()?;
        let ranges: Vec<Range<usize>> = run
            .iter()
            .map(|(_, found)| {
                let start = (found.location.offset - first.offset) as usize;
                start..start + found.location.len as usize
            })
            .collect();
        if !self.trusted(first) {
            let pieces: Vec<(Hash, &[u8])> = run
                .iter()
                .zip(&ranges)
                .map(|((hash, _), range)| (*hash, &bytes[range.clone()]))
                .collect();
            ChunkStore::check(&pieces).ok()?;
        }
        let buffer: SharedBuffer = Arc::new(bytes);
        ranges
            .into_iter()
            .map(|range| ChunkBytes::shared(buffer.clone(), range))
            .collect()
    }

    /// The bytes stored under `hash` (checked against it when they are in a pack of an
    /// earlier run; see the module docs).
    pub fn get(&self, hash: &Hash) -> Result<Option<Vec<u8>>, LogError> {
        match self.locate(hash)? {
            Some(location) => self.read(hash, location).map(Some),
            None => Ok(None),
        }
    }

    /// Whether a chunk is stored under `hash`.
    pub fn contains(&self, hash: &Hash) -> Result<bool, LogError> {
        Ok(self.locate(hash)?.is_some())
    }

    /// Number of chunks stored.
    pub fn len(&self) -> usize {
        let in_memory = self
            .inner
            .writer
            .lock()
            .map(|w| w.staged.len() + w.unindexed.len())
            .unwrap_or(0);
        let in_runs = self.inner.runs.read().map_or(0, |runs| runs.len());
        self.inner.index.len() + in_memory + in_runs
    }

    /// Whether no chunk is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunks of `content` that are missing here, as far as the tree can be walked:
    /// a missing index node hides its children until it arrives. Empty means complete.
    pub fn missing(&self, content: &ContentRef) -> Result<Vec<Hash>, LogError> {
        let mut missing = Vec::new();
        let mut level = vec![content.root];
        for depth in (0..=content.depth).rev() {
            let mut next = Vec::new();
            // A node named many times (repeated content) is looked at once.
            let mut seen = HashSet::new();
            for hash in level {
                if !seen.insert(hash) {
                    continue;
                }
                match self.locate(&hash)? {
                    None => missing.push(hash),
                    Some(location) if depth > 0 => {
                        next.extend(self.node(&hash, location)?.children.iter().map(|c| c.hash));
                    }
                    Some(_) => {}
                }
            }
            level = next;
        }
        Ok(missing)
    }

    fn node(&self, hash: &Hash, location: Location) -> Result<IndexNode, LogError> {
        let bytes = self.read(hash, location)?;
        IndexNode::decode(&bytes).map_err(|source| LogError::Corrupt {
            what: format!("index node {hash:?}"),
            source,
        })
    }

    /// Calls `f` with each data chunk of `content` in order (to write a file out).
    /// A chunk that is absent is reported as [`LogError::Corrupt`].
    pub fn for_each_data_chunk(
        &self,
        content: &ContentRef,
        f: &mut dyn FnMut(&[u8]) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        self.walk_content(
            content,
            &mut |hash, location| f(&self.read(hash, location)?),
        )
    }

    /// Calls `f` with the data of `content` in order, as [`Piece`]s: runs of chunks lying
    /// one after another in a pack this process wrote and has not lent, up to
    /// [`PIECE_BYTES`] each, to be copied without a check (by the kernel where they line
    /// up, see [`Piece::write_to`]; the pack is not lent while a run of it is held); other
    /// chunks read and checked. A chunk that is absent is reported as
    /// [`LogError::Corrupt`].
    pub fn for_each_data_piece(
        &self,
        content: &ContentRef,
        f: &mut dyn FnMut(Piece) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        // A run's pack stays trusted while the run is held: it cannot be lent meanwhile.
        let mut run: Option<(u32, u64, u64, PackUse)> = None;
        self.walk_content(content, &mut |hash, location| {
            let len = u64::from(location.len);
            if let Some((pack, offset, run_len, _)) = &mut run {
                if *pack == location.pack
                    && offset.checked_add(*run_len) == Some(location.offset)
                    && *run_len + len <= PIECE_BYTES
                {
                    *run_len += len;
                    return Ok(());
                }
            }
            if let Some(done) = run.take() {
                f(self.piece_in_pack(done)?)?;
            }
            match self.use_if_trusted(location)? {
                Some(held) => {
                    run = Some((location.pack, location.offset, len, held));
                    Ok(())
                }
                None => f(Piece::Bytes(self.read(hash, location)?)),
            }
        })?;
        match run {
            Some(done) => f(self.piece_in_pack(done)?),
            None => Ok(()),
        }
    }

    fn piece_in_pack(
        &self,
        (pack, offset, len, held): (u32, u64, u64, PackUse),
    ) -> Result<Piece, LogError> {
        Ok(Piece::InPack {
            file: self.pack(pack)?,
            path: pack_path(&self.inner.dir, pack),
            offset,
            len,
            held,
        })
    }

    /// A hold on the pack at `location` if it is trusted (see [`Self::trusted`]): taken
    /// together with the check, so that [`lend`](Self::lend) cannot make it untrusted
    /// before the hold is dropped.
    fn use_if_trusted(&self, location: Location) -> Result<Option<PackUse>, LogError> {
        let mut in_use = self.inner.in_use.lock().map_err(|_| LogError::Closed)?;
        if !self.trusted(location) {
            return Ok(None);
        }
        *in_use.entry(location.pack).or_default() += 1;
        Ok(Some(PackUse {
            pack: location.pack,
            counts: self.inner.in_use.clone(),
        }))
    }

    /// Calls `f` with the hash and location of each data chunk of `content`, in order,
    /// and fails as soon as they add up to more than its size: a tree that names one
    /// node many times (a peer's mistake or malice) would otherwise be walked to no end.
    fn walk_content(
        &self,
        content: &ContentRef,
        f: &mut dyn FnMut(&Hash, Location) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let mut total: u64 = 0;
        self.walk_locations(content.root, content.depth, &mut |hash, location| {
            total = total.saturating_add(u64::from(location.len));
            if total > content.size {
                return Err(LogError::Corrupt {
                    what: format!("content {:?}", content.root),
                    source: converge_api::CodecError::Malformed(format!(
                        "its tree holds more than its {} bytes",
                        content.size
                    )),
                });
            }
            f(hash, location)
        })
    }

    /// Calls `f` with the hash and location of each data chunk under `hash`, in order.
    fn walk_locations(
        &self,
        hash: Hash,
        depth: u8,
        f: &mut dyn FnMut(&Hash, Location) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let Some(location) = self.locate(&hash)? else {
            return Err(self.gone(hash));
        };
        if depth == 0 {
            return f(&hash, location);
        }
        let children = self.node(&hash, location)?.children;
        if depth > 1 {
            for child in children {
                self.walk_locations(child.hash, depth - 1, f)?;
            }
            return Ok(());
        }
        // Data chunks: looked up together.
        let hashes: Vec<Hash> = children.iter().map(|child| child.hash).collect();
        for (hash, location) in hashes.iter().zip(self.locate_all(&hashes)?) {
            f(hash, location.ok_or_else(|| self.gone(*hash))?)?;
        }
        Ok(())
    }

    /// The error for `hash` missing from content being read out, which lists it as
    /// damaged. Such content is an event's, complete when it was appended: a chunk of it
    /// gone since (its index entries in a run file set aside as damaged at open, say) is
    /// listed to be fetched again from peers, as one found damaged in its pack is.
    fn gone(&self, hash: Hash) -> LogError {
        if let Ok(mut damaged) = self.inner.damaged.lock() {
            damaged.insert(hash);
        }
        LogError::Corrupt {
            what: format!("chunk {hash:?}"),
            source: converge_api::CodecError::Malformed(
                "missing from the content store (asked of peers again)".into(),
            ),
        }
    }
}

/// A run of a content's data, as [`ChunkStore::for_each_data_piece`] hands it out.
#[derive(Debug)]
pub enum Piece {
    /// Chunk bytes read from the store and checked against their hash.
    Bytes(Vec<u8>),
    /// `len` bytes at `offset` of the pack `file` (at `path`), chunks checked when they
    /// were put, to be copied without another check.
    InPack {
        /// The pack, open for reading.
        file: Arc<File>,
        /// The pack's path, for errors.
        path: PathBuf,
        /// Where the run starts in the pack.
        offset: u64,
        /// The run's length in bytes.
        len: u64,
        /// Keeps the pack from being lent (and so changed) until the run is copied.
        held: PackUse,
    },
}

/// A hold on a pack a [`Piece::InPack`] is a run of: while any is held, the store does
/// not lend the pack to the folder ([`ChunkStore::lend`]), whose changes would then be
/// copied unchecked. Released when dropped.
#[derive(Debug)]
pub struct PackUse {
    pack: u32,
    counts: Arc<Mutex<HashMap<u32, usize>>>,
}

impl Drop for PackUse {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.lock() {
            if let Some(n) = counts.get_mut(&self.pack) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.pack);
                }
            }
        }
    }
}

impl Piece {
    /// The piece's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes(bytes) => bytes.len() as u64,
            Piece::InPack { len, .. } => *len,
        }
    }

    /// Whether the piece holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the piece's bytes to `out` at its current position, which is byte `at` of
    /// `out`. A pack run whose offset in the pack and `at` fall at the same place within a
    /// page is copied in the kernel (`copy_file_range`); any other run is read and
    /// written through memory. ext4 copies between files by splicing page by page, so a
    /// run that does not line up writes every page of `out` in two parts, and ext4 zeroes
    /// the rest of a new block before each part: more work than a read and a write (a
    /// third of the folder store's time for small files, measured). A pack read error
    /// names the pack; a write error is returned as it is, for the caller to name `out`.
    pub fn write_to(&self, mut out: &File, at: u64) -> Result<(), PieceError> {
        let (pack, path, mut offset, len) = match self {
            Piece::Bytes(bytes) => return out.write_all(bytes).map_err(PieceError::Write),
            Piece::InPack {
                file,
                path,
                offset,
                len,
                held: _,
            } => (file, path, *offset, *len),
        };
        let end = offset + len;
        if offset % PAGE_BYTES != at % PAGE_BYTES {
            return copy_through_memory(pack, path, offset, end, out);
        }
        while offset < end {
            let want = usize::try_from(end - offset).unwrap_or(usize::MAX);
            match rustix::fs::copy_file_range(&**pack, Some(&mut offset), out, None, want) {
                Ok(0) => {
                    return Err(PieceError::Read(LogError::ContentIo {
                        op: "reading",
                        path: path.clone(),
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    }))
                }
                Ok(_) => {}
                Err(e) if e == rustix::io::Errno::INTR => {}
                // Another file system, or one that cannot copy: through memory instead.
                Err(_) => return copy_through_memory(pack, path, offset, end, out),
            }
        }
        Ok(())
    }
}

/// Why [`Piece::write_to`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    /// Reading the piece from the store failed.
    #[error(transparent)]
    Read(LogError),
    /// Writing to the output failed.
    #[error("writing: {0}")]
    Write(std::io::Error),
}

/// Copies `offset..end` of `pack` to `out` through a buffer.
fn copy_through_memory(
    pack: &File,
    path: &Path,
    mut offset: u64,
    end: u64,
    mut out: &File,
) -> Result<(), PieceError> {
    let mut buffer = vec![0; (end - offset).min(1 << 20) as usize];
    while offset < end {
        let n = (end - offset).min(buffer.len() as u64) as usize;
        pack.read_exact_at(&mut buffer[..n], offset)
            .map_err(|e| PieceError::Read(io_error("reading", path.to_owned())(e)))?;
        out.write_all(&buffer[..n]).map_err(PieceError::Write)?;
        offset += n as u64;
    }
    Ok(())
}

/// What is still missing of one content, kept between checks so that each check costs
/// only the chunks that arrived (or whose request lapsed) since the last one, not a walk
/// of the whole tree: the applier checks after every message, and a 256 MiB file has
/// 16,000 chunks.
#[derive(Debug)]
pub(crate) struct Missing {
    entries: Vec<Wanted>,
    /// Every index node ever entered, as (hash, height): a subtree named many times
    /// (repeated content, or a peer's tree naming one node over and over) is tracked
    /// once. And the data chunks listed in `entries`, as (hash, 0): one named many times
    /// is asked for once. Not the data chunks found present, so that this stays as small
    /// as what is missing (and the tree's nodes), not as large as the file.
    seen: HashSet<(Hash, u8)>,
}

#[derive(Debug)]
struct Wanted {
    hash: Hash,
    /// 0 for a data chunk, the node's height for an index node.
    depth: u8,
    /// Looked up and found absent since it was last asked for.
    checked: bool,
    /// Asked for, as far as this content knows.
    requested: bool,
}

impl Missing {
    /// Everything of `content` is to be looked up, starting at its root.
    pub(crate) fn new(content: &ContentRef) -> Self {
        Missing {
            entries: vec![Wanted {
                hash: content.root,
                depth: content.depth,
                checked: false,
                requested: false,
            }],
            seen: HashSet::from_iter([(content.root, content.depth)]),
        }
    }

    /// Whether every chunk is here (as of the last [`Missing::refresh`]).
    pub(crate) fn is_complete(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks up what may have arrived: entries never looked up, and entries asked for that
    /// `in_flight` no longer lists. Present index nodes are replaced by their children.
    pub(crate) fn refresh(
        &mut self,
        store: &ChunkStore,
        in_flight: &dyn Fn(&Hash) -> bool,
    ) -> Result<(), LogError> {
        // Found missing below the nodes that arrived: appended once the pass is over.
        let mut found = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            let e = &mut self.entries[i];
            if e.requested && !in_flight(&e.hash) {
                e.requested = false;
                e.checked = false;
            }
            if e.checked || e.requested {
                i += 1;
                continue;
            }
            let located = match store.locate(&e.hash) {
                Ok(located) => located,
                Err(err) => {
                    // What this pass found below earlier nodes stays listed.
                    self.entries.append(&mut found);
                    return Err(err);
                }
            };
            match located {
                None => {
                    e.checked = true;
                    i += 1;
                }
                Some(location) => {
                    let e = self.entries.swap_remove(i);
                    if e.depth == 0 {
                        self.seen.remove(&(e.hash, 0));
                        continue;
                    }
                    // On an error (a node damaged, or malformed), nothing is lost: the node
                    // stays listed, to be looked up again, and so does what was found and
                    // what was still to walk (`walk_below` leaves it in `found`).
                    let walked = match store.node(&e.hash, location) {
                        Ok(node) => self.walk_below(store, &node, e.depth, &mut found),
                        Err(err) => {
                            self.entries.push(e);
                            Err(err)
                        }
                    };
                    if let Err(err) = walked {
                        self.entries.append(&mut found);
                        return Err(err);
                    }
                }
            }
        }
        self.entries.append(&mut found);
        Ok(())
    }

    /// Looks up what `node` (at height `depth`) names, depth first, and adds to `found`
    /// what is missing. Depth first, so that what this holds at once is the children of
    /// the nodes on one path, not a whole level of the tree: a large file's chunks, here
    /// already as a peer pushed them, are each looked up and let go.
    fn walk_below(
        &mut self,
        store: &ChunkStore,
        node: &IndexNode,
        depth: u8,
        found: &mut Vec<Wanted>,
    ) -> Result<(), LogError> {
        fn below(node: &IndexNode, depth: u8) -> impl Iterator<Item = (Hash, u8)> + '_ {
            node.children
                .iter()
                .rev()
                .map(move |child| (child.hash, depth - 1))
        }
        if depth == 1 {
            return self.chunks_below(store, node, found);
        }
        let mut stack: Vec<(Hash, u8)> = below(node, depth).collect();
        // On an error, what is left to walk goes to `found`, to be looked up again.
        let keep = |stack: Vec<(Hash, u8)>, found: &mut Vec<Wanted>| {
            found.extend(stack.into_iter().rev().map(|(hash, depth)| Wanted {
                hash,
                depth,
                checked: false,
                requested: false,
            }));
        };
        while let Some((hash, depth)) = stack.pop() {
            // Index nodes are entered once (a tree naming one over and over is walked
            // once); a data chunk is listed once while it is missing.
            let listed = match depth {
                0 => self.seen.contains(&(hash, 0)),
                _ => !self.seen.insert((hash, depth)),
            };
            if listed {
                continue;
            }
            let located = match store.locate(&hash) {
                Ok(located) => located,
                Err(err) => {
                    stack.push((hash, depth));
                    keep(stack, found);
                    return Err(err);
                }
            };
            match located {
                None => {
                    if depth == 0 {
                        self.seen.insert((hash, 0));
                    }
                    found.push(Wanted {
                        hash,
                        depth,
                        checked: true,
                        requested: false,
                    });
                }
                Some(location) if depth > 0 => match store.node(&hash, location) {
                    Ok(node) if depth == 1 => {
                        if let Err(err) = self.chunks_below(store, &node, found) {
                            keep(stack, found);
                            return Err(err);
                        }
                    }
                    Ok(node) => stack.extend(below(&node, depth)),
                    Err(err) => {
                        stack.push((hash, depth));
                        keep(stack, found);
                        return Err(err);
                    }
                },
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Looks up the data chunks `node` (at height 1) names, together (see
    /// [`ChunkStore::locate_all`]), and adds to `found` those missing and not yet listed.
    /// On an error, they all go to `found`, to be looked up again.
    fn chunks_below(
        &mut self,
        store: &ChunkStore,
        node: &IndexNode,
        found: &mut Vec<Wanted>,
    ) -> Result<(), LogError> {
        let chunks: Vec<Hash> = node
            .children
            .iter()
            .map(|child| child.hash)
            .filter(|hash| !self.seen.contains(&(*hash, 0)))
            .collect();
        let located = match store.locate_all(&chunks) {
            Ok(located) => located,
            Err(err) => {
                found.extend(chunks.into_iter().map(|hash| Wanted {
                    hash,
                    depth: 0,
                    checked: false,
                    requested: false,
                }));
                return Err(err);
            }
        };
        for (hash, location) in chunks.into_iter().zip(located) {
            // A chunk named twice in the node is listed once.
            if location.is_none() && self.seen.insert((hash, 0)) {
                found.push(Wanted {
                    hash,
                    depth: 0,
                    checked: true,
                    requested: false,
                });
            }
        }
        Ok(())
    }

    /// Asks for the chunks known missing and not yet asked for, in order, as `ask`
    /// decides for each; returns those to request.
    pub(crate) fn request(&mut self, ask: &mut dyn FnMut(&Hash) -> Ask) -> Vec<Hash> {
        let mut out = Vec::new();
        for e in &mut self.entries {
            if !e.checked || e.requested {
                continue;
            }
            match ask(&e.hash) {
                Ask::Yes => out.push(e.hash),
                Ask::InFlight => {}
                Ask::Stop => break,
            }
            e.requested = true;
        }
        out
    }
}

/// What to do with a missing chunk, for [`Missing::request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ask {
    /// Request it.
    Yes,
    /// It is already asked for (for another content): wait for it.
    InFlight,
    /// Request nothing more now (the window is full).
    Stop,
}

/// The length of a file being appended to, starting the kernel's writeback of what was
/// written every few MiB, so that a later `fdatasync` or `syncfs` finds little left to
/// write, and dropping from the page cache what is already on disk. (The pack writer and
/// the folder store's file writer both use it.)
///
/// Dropping behind the writer keeps the pages a large file passes through few and reused:
/// on the virtual machines this runs on, a page the guest has not touched for a while
/// costs a host fault when first written, and writing 256 MiB through the page cache took
/// 0.64 s into such pages against 0.17 s when every 8 MiB was written back and dropped
/// (W2 of `bench/daemon/run.py` went from 1.48 s to 1.15 s, the receiver's CPU time from
/// 1.27 s to 0.67 s). What was dropped is read from the disk if it is read again.
#[derive(Clone, Copy, Debug, Default)]
pub struct Writeback {
    len: u64,
    started: u64,
    dropped: u64,
}

impl Writeback {
    /// Records `bytes` more appended to `file`, starting writeback when enough piled up
    /// and dropping the range whose writeback was started the time before, off the
    /// writer's thread (see `behind`) through a second descriptor of the same open
    /// file. For a file made durable by `syncfs`, which hears of a failed writeback from
    /// the file system whichever descriptor waited for it; a file to be `fsync`ed could
    /// have its failure reported to the wait instead.
    pub fn wrote(&mut self, file: &File, bytes: u64) {
        if let Some(range) = self.appended(file, bytes).filter(|(_, len)| *len > 0) {
            match file.try_clone() {
                Ok(file) => behind(move || drop_behind(&file, range)),
                Err(_) => drop_behind(file, range),
            }
        }
    }

    /// As [`Writeback::wrote`], but returns the range to drop (`offset`, `len`) for the
    /// caller to pass to [`drop_behind`], which waits for its writeback, once it holds no
    /// lock.
    fn appended(&mut self, file: &File, bytes: u64) -> Option<(u64, u64)> {
        self.len += bytes;
        if self.len - self.started < WRITEBACK_BYTES {
            return None;
        }
        start_writeback(file, self.started, self.len - self.started);
        let behind = (self.dropped, self.started - self.dropped);
        self.dropped = self.started;
        self.started = self.len;
        Some(behind)
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to disk, without
/// waiting: a later `fdatasync` or `syncfs` then finds them written or under way.
/// Advisory (Linux only; a no-op elsewhere); errors are left for that sync to report.
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: the descriptor is open for as long as `file` is borrowed, and
        // sync_file_range only reads its arguments.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Waits for the writeback under way on `file` and returns the error of any writeback
/// that failed since the descriptor last reported one (each is reported once per
/// descriptor). Writes and flushes nothing. Linux only; `Ok` elsewhere.
fn writeback_error(file: &File) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for as long as `file` is borrowed, and
        // sync_file_range only reads its arguments.
        let rc = unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WAIT_BEFORE)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
    Ok(())
}

/// Waits for the writeback of `len` bytes at `offset` of `file` (started earlier by
/// [`start_writeback`]) and drops those pages from the page cache. Not a sync: the
/// device's cache is not flushed and nothing is made durable; a later `fdatasync` or
/// `syncfs` still does that. Advisory (Linux only; a no-op elsewhere); errors are left
/// for that sync to report.
fn drop_behind(file: &File, range: (u64, u64)) {
    // Pages whose writeback failed are kept: they may be all that is left of their bytes
    // (see `ChunkStore::sync`).
    if wait_behind(file, range) {
        evict(file, range);
    }
}

/// Blocks reserved at once ahead of a stream pack's writes.
const ALLOCATE_STEP: u64 = 32 << 20;

/// Reserves the blocks of `file` (a stream pack) from `allocated` past `upto`, rounded up
/// to [`ALLOCATE_STEP`], without changing its size (`fallocate` with `KEEP_SIZE`), and
/// returns where they now end; `None` when that failed, and it is not tried again for
/// that pack (the writes then allocate as they go, as without it). Writes into reserved blocks skip
/// ext4's delayed allocation, which took a tenth of the receiver's CPU in W2 of
/// `bench/daemon/run.py` (`ext4_da_get_block_prep` and the reservations behind it, page
/// by page): `ab.py --workload W2 --reps 12`, the receiver's CPU 0.24 -> 0.21 s, the
/// time 0.29 -> 0.28 s.
fn allocate_ahead(file: &File, allocated: u64, upto: u64) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let end = upto.div_ceil(ALLOCATE_STEP).saturating_mul(ALLOCATE_STEP);
        let (Ok(offset), Ok(len)) = (
            i64::try_from(allocated),
            i64::try_from(end.saturating_sub(allocated)),
        ) else {
            return None;
        };
        // SAFETY: the descriptor is open for the call, which takes plain integers.
        let reserved =
            unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len) };
        if reserved == 0 {
            return Some(end);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, allocated, upto);
    None
}

/// Gives back the blocks reserved past the end of `file` ([`allocate_ahead`]): truncating
/// a file to its own size frees what lies beyond it. Only space is at stake, so a failure
/// is not reported (a pack left so after a crash keeps at most [`ALLOCATE_STEP`] more).
fn trim_allocation(file: &File) {
    if let Ok(meta) = file.metadata() {
        let _ = file.set_len(meta.len());
    }
}

/// Starts and waits for the writeback of `len` bytes at `offset` of `file`; whether it
/// went without a reported error (true where there is nothing to wait for).
fn wait_behind(file: &File, (offset, len): (u64, u64)) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return true;
        };
        if len == 0 {
            return true;
        }
        // SAFETY: as in `start_writeback`.
        let rc = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
        rc == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
        true
    }
}

/// Drops `len` bytes at `offset` of `file` from the page cache (those written back;
/// advisory, Linux only).
fn evict(file: &File, (offset, len): (u64, u64)) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        if len == 0 {
            return;
        }
        // SAFETY: the descriptor is open for as long as `file` is borrowed, and
        // posix_fadvise only reads its arguments.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// [`write_all_vectored`] at byte `at` of `file`, for a stream pack (not opened to append;
/// its writer is the only one to move its position).
fn write_all_vectored_at(
    mut file: &File,
    chunks: &[(Hash, &[u8])],
    at: u64,
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(at))?;
    write_all_vectored(file, chunks)
}

/// Writes every chunk's bytes, in order, with as few system calls as the kernel allows
/// (`IOV_MAX` slices at a time).
fn write_all_vectored(mut file: &File, chunks: &[(Hash, &[u8])]) -> std::io::Result<()> {
    const IOV_MAX: usize = 1024;
    for group in chunks.chunks(IOV_MAX) {
        let mut slices: Vec<IoSlice<'_>> = group.iter().map(|(_, b)| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        // Counted in bytes: an empty chunk (an empty file's) has nothing to write.
        let mut left: usize = group.iter().map(|(_, b)| b.len()).sum();
        while left > 0 {
            match file.write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left -= n;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Whether `e` is the disk's failure to read (`EIO`), not a change of what was read.
fn is_eio(e: &LogError) -> bool {
    matches!(e, LogError::ContentIo { source, .. } if source.raw_os_error() == Some(libc::EIO))
}

/// Hard-links the file open as `file` at `to`: the very file opened, even if its name
/// was since given to another (through `/proc/self/fd`, which needs no privilege, unlike
/// `linkat` with `AT_EMPTY_PATH`).
fn link_open_file(file: &File, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let to = CString::new(to.as_os_str().as_bytes())?;
        // SAFETY: both paths are NUL-terminated strings that outlive the call, which
        // only reads them.
        let linked = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if linked == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, to);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// A manifest's value: its entries, hash then location, one after another.
fn encode_manifest(entries: &[(Hash, Location)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * MANIFEST_ENTRY_BYTES);
    for (hash, location) in entries {
        out.extend_from_slice(&hash.0);
        out.extend_from_slice(&location.encode());
    }
    out
}

/// Adds the entries of the manifest stored under `key` to `into`; returns its number.
fn decode_manifest(
    key: &[u8],
    value: &[u8],
    into: &mut Vec<(Hash, Location)>,
) -> Result<u64, LogError> {
    let corrupt = |what: String, why: String| LogError::Corrupt {
        what,
        source: converge_api::CodecError::Malformed(why),
    };
    let id = <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt("a chunk manifest's key".into(), format!("{key:?}")))?;
    if !value.len().is_multiple_of(MANIFEST_ENTRY_BYTES) {
        return Err(corrupt(
            format!("chunk manifest {id}"),
            format!("{} bytes, not whole entries", value.len()),
        ));
    }
    for entry in value.chunks_exact(MANIFEST_ENTRY_BYTES) {
        let (hash, location) = entry.split_at(32);
        let mut bytes = [0; 32];
        bytes.copy_from_slice(hash);
        let hash = Hash(bytes);
        into.push((hash, Location::decode(&hash, location)?));
    }
    Ok(id)
}

fn check(hash: &Hash, bytes: &[u8]) -> Result<(), LogError> {
    let actual = Hash::of(bytes);
    if actual != *hash {
        return Err(mismatch(hash, &actual));
    }
    Ok(())
}

/// The error for bytes sent or read as the chunk `expected` that hash to `actual`.
fn mismatch(expected: &Hash, actual: &Hash) -> LogError {
    LogError::ChunkMismatch {
        expected: expected.to_hex(),
        actual: actual.to_hex(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(db: &sled::Db, dir: &Path) -> ChunkStore {
        let tree = |name: &str| db.open_tree(name).unwrap();
        ChunkStore::open(
            tree("chunk_index"),
            tree("chunk_manifests"),
            tree("chunk_changed_files"),
            tree("chunk_runs_removed"),
            dir.to_owned(),
            false,
        )
        .unwrap()
    }

    /// A store over a temporary database and pack directory (kept alive by the tuple).
    fn scratch() -> (tempfile::TempDir, sled::Db, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let store = open(&db, dir.path());
        (dir, db, store)
    }

    #[test]
    fn chunks_survive_a_reopen_only_once_synced() {
        let (dir, db, store) = scratch();
        let synced = store.put(b"synced").unwrap();
        assert_eq!(
            store.put(b"synced").unwrap(),
            synced,
            "a second put is a no-op"
        );
        store.sync().unwrap();
        let staged = store.put(b"staged").unwrap();
        assert_eq!(store.get(&staged).unwrap().as_deref(), Some(&b"staged"[..]));
        assert_eq!(store.len(), 2);
        drop(store);

        // Reopened without a sync: the staged chunk is gone, the synced one is there,
        // and new chunks go to a new pack.
        let store = open(&db, dir.path());
        assert_eq!(store.get(&synced).unwrap().as_deref(), Some(&b"synced"[..]));
        assert!(!store.contains(&staged).unwrap());
        store.put(b"later").unwrap();
        store.sync().unwrap();
        assert!(pack_path(dir.path(), 2).exists());
        assert_eq!(store.len(), 2);
    }

    /// Makes `store` never quiet enough for its indexer: manifests wait for a sync that
    /// must index them.
    fn never_quiet(store: &ChunkStore) {
        store.inner.writer.lock().unwrap().index_quiet = std::time::Duration::from_secs(3600);
    }

    /// The manifests' and the index's trees of `db`, to count their entries.
    fn manifests_and_index(db: &sled::Db) -> (sled::Tree, sled::Tree) {
        (
            db.open_tree("chunk_manifests").unwrap(),
            db.open_tree("chunk_index").unwrap(),
        )
    }

    /// `n` distinct small chunks, put in one call.
    fn put_small(store: &ChunkStore, n: usize, seed: u32) -> Vec<(Hash, Vec<u8>)> {
        let chunks: Vec<(Hash, Vec<u8>)> = (0..n as u32)
            .map(|i| {
                let bytes = [seed.to_le_bytes(), i.to_le_bytes()].concat();
                (Hash::of(&bytes), bytes)
            })
            .collect();
        let refs: Vec<(Hash, &[u8])> = chunks.iter().map(|(h, b)| (*h, &b[..])).collect();
        store.put_many_prehashed(&refs).unwrap();
        chunks
    }

    #[test]
    fn many_chunks_synced_at_once_are_indexed_later_or_after_a_crash() {
        let (dir, db, store) = scratch();
        never_quiet(&store);
        let (manifests, index) = manifests_and_index(&db);
        let all_there = |store: &ChunkStore, chunks: &[(Hash, Vec<u8>)]| {
            for (hash, bytes) in chunks {
                assert_eq!(store.get(hash).unwrap().as_ref(), Some(bytes));
            }
        };
        let few = put_small(&store, 10, 0);
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (10, 0),
            "a few: indexed at once"
        );

        let many = put_small(&store, MANIFEST_ENTRIES, 1);
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (10, 1),
            "many: one manifest"
        );
        all_there(&store, &many);
        assert_eq!(store.len(), 10 + MANIFEST_ENTRIES);
        // Known: not stored again.
        put_small(&store, MANIFEST_ENTRIES, 1);
        assert!(store.inner.writer.lock().unwrap().staged.is_empty());
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (10, 1),
            "not indexed by a sync while the store is busy"
        );
        drop(store);

        // A crash before the next sync: the manifest is taken back at the open.
        let store = open(&db, dir.path());
        all_there(&store, &many);
        all_there(&store, &few);
        assert_eq!(store.len(), 10 + MANIFEST_ENTRIES);
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (10 + MANIFEST_ENTRIES, 0),
            "indexed by the next sync, which then removes the manifest"
        );
        all_there(&store, &many);
        assert_eq!(store.len(), 10 + MANIFEST_ENTRIES);
    }

    #[test]
    fn a_sync_finding_the_most_entries_waiting_indexes_them_itself() {
        let (_dir, db, store) = scratch();
        never_quiet(&store);
        let (manifests, index) = manifests_and_index(&db);
        // Syncs too small for a run each, together just below the limit.
        let per_sync = RUN_ENTRIES - 1;
        let below = UNINDEXED_MAX / per_sync;
        let mut first = Vec::new();
        for seed in 0..below {
            first.extend(put_small(&store, per_sync, seed as u32));
            store.sync().unwrap();
        }
        assert!(first.len() < UNINDEXED_MAX);
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (0, below),
            "below the limit: waits"
        );
        put_small(&store, per_sync, below as u32);
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (0, below + 1),
            "the sync that passes the limit records its own manifest"
        );
        let last = put_small(&store, 1, 1000);
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            ((below + 1) * per_sync + 1, 0),
            "the next one finds the limit passed and indexes everything, busy or not"
        );
        assert_eq!(store.inner.writer.lock().unwrap().unindexed.len(), 0);
        for (hash, bytes) in first.iter().step_by(997).chain(&last) {
            assert_eq!(store.get(hash).unwrap().as_ref(), Some(bytes));
        }
    }

    /// Entries in the store's runs.
    fn in_runs(store: &ChunkStore) -> usize {
        store.inner.runs.read().unwrap().len()
    }

    /// The run files in `dir`.
    fn run_files(dir: &Path) -> Vec<PathBuf> {
        let mut runs: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("run-"))
            .collect();
        runs.sort();
        runs
    }

    #[test]
    fn a_large_sync_is_written_as_a_run_not_into_sled_and_survives_a_crash() {
        let (dir, db, store) = scratch();
        never_quiet(&store);
        let (manifests, index) = manifests_and_index(&db);
        let chunks = put_small(&store, RUN_ENTRIES, 20);
        assert_eq!(store.inner.writer.lock().unwrap().staged.len(), RUN_ENTRIES);
        store.sync().unwrap();
        assert_eq!((index.len(), manifests.len()), (0, 0), "nothing in sled");
        assert_eq!(run_files(dir.path()).len(), 1);
        assert!(store.inner.writer.lock().unwrap().staged.is_empty());
        assert_eq!(store.len(), RUN_ENTRIES);
        // Known: not stored again.
        put_small(&store, RUN_ENTRIES, 20);
        assert!(store.inner.writer.lock().unwrap().staged.is_empty());

        // Found after a crash, read from the pack (checked: an earlier run's).
        drop(store);
        let store = open(&db, dir.path());
        for (hash, bytes) in chunks.iter().step_by(101) {
            assert_eq!(store.get(hash).unwrap().as_ref(), Some(bytes));
        }
        assert_eq!(store.len(), RUN_ENTRIES);

        // A chunk found damaged in its pack is dropped for good.
        let (hash, _) = chunks[7].clone();
        let at = store.locate(&hash).unwrap().unwrap();
        let path = pack_path(dir.path(), at.pack);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[usize::try_from(at.offset).unwrap()] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(store.get(&hash), Err(LogError::Corrupt { .. })));
        assert_eq!(store.damaged(), vec![hash]);
        assert!(!store.contains(&hash).unwrap());
        db.flush().unwrap();
        drop(store);
        let store = open(&db, dir.path());
        assert!(!store.contains(&hash).unwrap());
        // Stored again (a peer sent it): found again, at its new place.
        let (_, good) = chunks[7].clone();
        store.put_verified(&hash, &good).unwrap();
        store.sync().unwrap();
        assert_eq!(store.get(&hash).unwrap(), Some(good));
    }

    #[test]
    fn a_put_leaving_the_most_chunks_staged_writes_them_out_itself() {
        let (dir, db, store) = scratch();
        never_quiet(&store);
        let (manifests, index) = manifests_and_index(&db);
        let chunks = put_small(&store, SPILL_ENTRIES, 21);
        assert!(
            store.inner.writer.lock().unwrap().staged.is_empty(),
            "synced by the put, before any event names them"
        );
        assert_eq!((index.len(), manifests.len()), (0, 0));
        assert_eq!(run_files(dir.path()).len(), 1);
        // Durable: found after a crash with no sync of the log's.
        drop(store);
        let store = open(&db, dir.path());
        assert_eq!(store.len(), SPILL_ENTRIES);
        for (hash, bytes) in chunks.iter().step_by(503) {
            assert_eq!(store.get(hash).unwrap().as_ref(), Some(bytes));
        }
    }

    #[test]
    fn a_chunk_found_damaged_while_it_waits_in_a_manifest_stays_gone() {
        let (dir, db, store) = scratch();
        never_quiet(&store);
        let (manifests, index) = manifests_and_index(&db);
        let chunks = put_small(&store, MANIFEST_ENTRIES, 9);
        store.sync().unwrap();
        assert_eq!((index.len() + in_runs(&store), manifests.len()), (0, 1));
        let (hash, _) = chunks[MANIFEST_ENTRIES / 2].clone();
        let at = *store
            .inner
            .writer
            .lock()
            .unwrap()
            .unindexed
            .get(&hash)
            .unwrap();
        let path = pack_path(dir.path(), at.pack);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[usize::try_from(at.offset).unwrap()] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        // A crash: the next run takes the manifest back, and reads its pack (not one it
        // wrote itself) checked.
        drop(store);
        let store = open(&db, dir.path());
        never_quiet(&store);

        assert!(matches!(store.get(&hash), Err(LogError::Corrupt { .. })));
        assert_eq!(store.damaged(), vec![hash]);
        // The next sync indexes the manifest without the damaged chunk and removes it:
        // left in either, it would come back at a restart.
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (MANIFEST_ENTRIES - 1, 0)
        );
        drop(store);
        let store = open(&db, dir.path());
        assert!(!store.contains(&hash).unwrap());
        assert_eq!(store.get(&hash).unwrap(), None);
        for (other, bytes) in chunks.iter().filter(|(h, _)| *h != hash) {
            assert_eq!(store.get(other).unwrap().as_ref(), Some(bytes));
        }
    }

    #[test]
    fn sorted_locations_keep_the_last_entry_for_a_hash_and_merge_in_order() {
        let at = |n: u64| Location {
            pack: 1,
            offset: n,
            len: 4,
        };
        let h = |b: u8| Hash([b; 32]);
        let hashes =
            |s: &mut SortedLocations| s.entries().iter().map(|e| e.0 .0[0]).collect::<Vec<_>>();
        // From manifests read in order: a later one's entry for a hash wins.
        let mut s = SortedLocations::from_unsorted(vec![
            (h(9), at(1)),
            (h(3), at(2)),
            (h(9), at(3)),
            (h(5), at(4)),
            (h(9), at(5)),
        ]);
        assert_eq!(hashes(&mut s), [3, 5, 9]);
        assert_eq!(s.get(&h(9)), Some(&at(5)));
        assert_eq!(s.get(&h(4)), None);
        // A sync's entries merged in, in place; one for a hash held replaces it.
        s.add(vec![
            (h(1), at(6)),
            (h(5), at(7)),
            (h(7), at(8)),
            (h(9), at(9)),
        ]);
        assert_eq!(hashes(&mut s), [1, 3, 5, 7, 9]);
        assert_eq!(
            s.entries().iter().map(|e| e.1.offset).collect::<Vec<_>>(),
            [6, 2, 7, 8, 9]
        );
        s.add(Vec::new());
        assert_eq!(s.len(), 5);
        // Removed at once for lookups, taken out of the vector later.
        s.remove(&h(3));
        s.remove(&h(4));
        assert_eq!((s.get(&h(3)), s.len()), (None, 4));
        s.remove(&h(9));
        assert_eq!(hashes(&mut s), [1, 5, 7]);
        // Added again after a removal: there once more.
        s.remove(&h(7));
        s.add(vec![(h(0), at(10)), (h(7), at(11))]);
        assert_eq!(hashes(&mut s), [0, 1, 5, 7]);
        assert_eq!(s.get(&h(7)), Some(&at(11)));
        // Into an empty one, moved as it is.
        let mut empty = SortedLocations::default();
        empty.add(vec![(h(2), at(12))]);
        assert_eq!((empty.len(), empty.get(&h(2))), (1, Some(&at(12))));
    }

    proptest::proptest! {
        /// Lookups find every entry held and no other, whether the hashes are spread
        /// evenly (as BLAKE3's are) or bunched, sharing their first bytes (as a test's).
        #[test]
        fn sorted_locations_find_what_they_hold(
            spread in proptest::collection::vec(proptest::array::uniform32(0u8..=255), 0..300),
            bunched in proptest::collection::vec((0u8..4, 0u8..4), 0..50),
            absent in proptest::collection::vec(proptest::array::uniform32(0u8..=255), 0..50),
        ) {
            let mut hashes: Vec<Hash> = spread.into_iter().map(Hash).collect();
            hashes.extend(bunched.into_iter().map(|(a, b)| {
                let mut h = [a; 32];
                h[31] = b;
                Hash(h)
            }));
            let at = |n: usize| Location { pack: 1, offset: n as u64, len: 1 };
            let entries: Vec<(Hash, Location)> =
                hashes.iter().enumerate().map(|(n, h)| (*h, at(n))).collect();
            let sorted = SortedLocations::from_unsorted(entries.clone());
            // The last entry for a hash stands, in both.
            let model: HashMap<Hash, Location> = entries.into_iter().collect();
            for (h, l) in &model {
                proptest::prop_assert_eq!(sorted.get(h), Some(l));
            }
            for h in absent.into_iter().map(Hash).chain([Hash([0; 32]), Hash([255; 32])]) {
                proptest::prop_assert_eq!(sorted.get(&h), model.get(&h));
            }
        }

        /// Any mix of batches added, removals and lookups answers as a map would.
        #[test]
        fn sorted_locations_answer_as_a_map_does(
            ops in proptest::collection::vec(
                (0u8..2, proptest::collection::vec(0u8..40, 0..12)),
                1..40,
            )
        ) {
            let mut sorted = SortedLocations::default();
            let mut model: HashMap<Hash, Location> = HashMap::new();
            for (n, (op, keys)) in ops.into_iter().enumerate() {
                let at = |k: u8| Location { pack: n as u32, offset: u64::from(k), len: 1 };
                match op {
                    0 => {
                        let mut batch: Vec<(Hash, Location)> =
                            keys.iter().map(|&k| (Hash([k; 32]), at(k))).collect();
                        batch.sort_by_key(|(h, _)| h.0);
                        batch.dedup_by_key(|(h, _)| h.0);
                        model.extend(batch.iter().copied());
                        sorted.add(batch);
                    }
                    _ => {
                        for k in keys {
                            sorted.remove(&Hash([k; 32]));
                            model.remove(&Hash([k; 32]));
                        }
                    }
                }
                proptest::prop_assert_eq!(sorted.len(), model.len());
                for k in 0u8..40 {
                    let h = Hash([k; 32]);
                    proptest::prop_assert_eq!(sorted.get(&h), model.get(&h));
                }
            }
            let mut expected: Vec<(Hash, Location)> = model.into_iter().collect();
            expected.sort_by_key(|(h, _)| h.0);
            proptest::prop_assert_eq!(sorted.entries(), &expected[..]);
        }
    }

    #[test]
    fn manifests_are_indexed_once_the_store_is_quiet() {
        let (_dir, db, store) = scratch();
        let (manifests, index) = manifests_and_index(&db);
        let chunks = put_small(&store, MANIFEST_ENTRIES, 3);
        store.sync().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !manifests.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(INDEX_QUIET / 4);
        }
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (MANIFEST_ENTRIES, 0)
        );
        assert_eq!(store.inner.writer.lock().unwrap().unindexed.len(), 0);
        for (hash, bytes) in &chunks {
            assert_eq!(store.get(hash).unwrap().as_ref(), Some(bytes));
        }
        // The indexer is done, and a later manifest starts it again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store
            .inner
            .indexer
            .load(std::sync::atomic::Ordering::Acquire)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(INDEX_QUIET / 4);
        }
        put_small(&store, MANIFEST_ENTRIES, 4);
        store.sync().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !manifests.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(INDEX_QUIET / 4);
        }
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (2 * MANIFEST_ENTRIES, 0)
        );
    }

    #[test]
    fn closing_indexes_what_waits_and_ends_the_indexer() {
        let (_dir, db, store) = scratch();
        never_quiet(&store);
        let (manifests, index) = manifests_and_index(&db);
        let chunks = put_small(&store, MANIFEST_ENTRIES, 5);
        store.sync().unwrap();
        assert_eq!((index.len() + in_runs(&store), manifests.len()), (0, 1));
        assert!(store.inner.indexer_thread.lock().unwrap().is_some());

        store.close().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (MANIFEST_ENTRIES, 0)
        );
        assert!(
            store.inner.indexer_thread.lock().unwrap().is_none(),
            "joined"
        );
        for (hash, bytes) in &chunks {
            assert_eq!(store.get(hash).unwrap().as_ref(), Some(bytes));
        }
        // Closed: a later sync's manifest is indexed by the next sync; no indexer starts.
        put_small(&store, MANIFEST_ENTRIES, 6);
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (MANIFEST_ENTRIES, 1)
        );
        store.sync().unwrap();
        assert_eq!(
            (index.len() + in_runs(&store), manifests.len()),
            (2 * MANIFEST_ENTRIES, 0)
        );
        assert!(store.inner.indexer_thread.lock().unwrap().is_none());
    }

    #[test]
    fn a_manifest_left_by_a_crash_does_not_override_a_newer_index_entry() {
        let (dir, db, store) = scratch();
        let old = store.put(b"first copy, later found damaged").unwrap();
        let new = store.put(b"the copy stored again").unwrap();
        store.sync().unwrap();
        let at = |hash: &Hash| store.locate(hash).unwrap().unwrap();
        let (first, second) = (at(&old), at(&new));
        drop(store);
        // A manifest naming `new` where `old` lies (its first place), left by a crash,
        // while the index already holds `new`'s later place.
        db.open_tree("chunk_manifests")
            .unwrap()
            .insert(7u64.to_be_bytes(), encode_manifest(&[(new, first)]))
            .unwrap();
        let store = open(&db, dir.path());
        assert_eq!(store.locate(&new).unwrap(), Some(second));
        assert_eq!(store.get(&new).unwrap().unwrap(), b"the copy stored again");
        store.sync().unwrap();
        assert_eq!(db.open_tree("chunk_manifests").unwrap().len(), 0);
        assert_eq!(store.get(&new).unwrap().unwrap(), b"the copy stored again");
    }

    #[test]
    fn fresh_local_chunks_are_handed_on_in_order_and_once() {
        let (_dir, _db, store) = scratch();
        let before = store.put(b"put before the sink was set").unwrap();
        let handed: Arc<Mutex<Vec<Vec<Hash>>>> = Arc::default();
        let sink = handed.clone();
        store.set_fresh_sink(Some(Box::new(move |fresh: Vec<FreshChunk>| {
            for chunk in &fresh {
                assert_eq!(Hash::of(&chunk.bytes), chunk.hash, "handed with its bytes");
            }
            sink.lock()
                .unwrap()
                .push(fresh.into_iter().map(|c| c.hash).collect())
        })));

        let mut local = Vec::new();
        for i in 0..FRESH_BATCH + 10 {
            local.push(store.put(format!("local {i}").as_bytes()).unwrap());
        }
        assert_eq!(*handed.lock().unwrap(), vec![local[..FRESH_BATCH].to_vec()]);
        // Known chunks and chunks from peers are not fresh.
        store.put(b"local 0").unwrap();
        store.put(b"put before the sink was set").unwrap();
        let from_peer = b"from a peer";
        store.put_verified(&Hash::of(from_peer), from_peer).unwrap();
        store.flush_fresh();
        store.flush_fresh();
        assert_eq!(
            *handed.lock().unwrap(),
            vec![local[..FRESH_BATCH].to_vec(), local[FRESH_BATCH..].to_vec()]
        );
        assert!(store.contains(&before).unwrap());

        store.set_fresh_sink(None);
        store.put(b"after the sink was removed").unwrap();
        store.flush_fresh();
        assert_eq!(handed.lock().unwrap().len(), 2);
    }

    #[test]
    fn batches_skip_known_and_repeated_chunks_and_stop_at_a_mismatch() {
        let (_dir, _db, store) = scratch();
        let known = store.put(b"known").unwrap();
        // More chunks than one vectored write takes, one of them twice, one known.
        let bytes: Vec<Vec<u8>> = (0..1500)
            .map(|i| format!("chunk {i}").into_bytes())
            .collect();
        let mut batch: Vec<(Hash, &[u8])> = bytes.iter().map(|b| (Hash::of(b), &b[..])).collect();
        batch.push(batch[7]);
        batch.push((known, b"known"));
        batch.push((Hash::of(b""), b""));
        store.put_many_verified(&batch).unwrap();
        assert_eq!(store.len(), 1502);
        // A batch of nothing but an empty chunk (an empty file's) is stored too.
        let (dir2, db2) = (
            tempfile::tempdir().unwrap(),
            sled::Config::new().temporary(true).open().unwrap(),
        );
        let only_empty = open(&db2, dir2.path());
        only_empty
            .put_many_prehashed(&[(Hash::of(b""), b"")])
            .unwrap();
        assert_eq!(
            only_empty.get(&Hash::of(b"")).unwrap().as_deref(),
            Some(&b""[..])
        );
        for (hash, b) in &batch {
            assert_eq!(store.get(hash).unwrap().as_deref(), Some(*b));
        }

        let good = b"good".to_vec();
        let bad = [
            (Hash::of(&good), &good[..]),
            (Hash::of(b"claimed"), &b"other"[..]),
        ];
        assert!(matches!(
            store.put_many_verified(&bad),
            Err(LogError::ChunkMismatch { .. })
        ));
        assert!(!store.contains(&Hash::of(&good)).unwrap());
        // The same in a group checked together (chunks over 1 KiB, more of them than
        // `Hash::of_each` hashes one by one): one chunk that is not what it claims stops
        // the group before anything of it is written.
        let large: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![i; 3000 + usize::from(i) * 100])
            .collect();
        let mut group: Vec<(Hash, &[u8])> = large.iter().map(|b| (Hash::of(b), &b[..])).collect();
        group[33].0 = Hash::of(b"claimed");
        assert!(matches!(
            store.put_many_verified(&group),
            Err(LogError::ChunkMismatch { .. })
        ));
        assert!(!store.contains(&Hash::of(&large[0])).unwrap());
        group[33].0 = Hash::of(&large[33]);
        store.put_many_verified(&group).unwrap();
        assert_eq!(
            store.get(&group[39].0).unwrap().as_deref(),
            Some(group[39].1)
        );
        store.sync().unwrap();
        assert_eq!(
            store.get(&batch[1499].0).unwrap().as_deref(),
            Some(batch[1499].1)
        );
    }

    /// A tree of `depth` levels above one data chunk in which every node names the node
    /// below it `MAX_FANOUT` times: 1024^depth chunks in all, but a few hundred bytes to
    /// send. Returns the content (claiming `size` bytes) with every chunk stored.
    fn repeating_tree(store: &ChunkStore, depth: u8, size: u64) -> ContentRef {
        use converge_api::content::{NodeEntry, MAX_FANOUT};
        let data = b"one chunk, named over and over".to_vec();
        let mut below = (store.put(&data).unwrap(), data.len() as u64);
        for _ in 0..depth {
            let node = IndexNode {
                children: vec![
                    NodeEntry {
                        hash: below.0,
                        size: below.1,
                    };
                    MAX_FANOUT
                ],
            };
            below = (
                store.put(&node.encode().unwrap()).unwrap(),
                below.1 * MAX_FANOUT as u64,
            );
        }
        ContentRef {
            root: below.0,
            size,
            depth,
        }
    }

    #[test]
    fn a_tree_naming_one_node_over_and_over_is_walked_once_and_bounded_by_its_size() {
        let (dir, _db, store) = scratch();
        // 1024^4 data chunks, were each name followed.
        let content = repeating_tree(&store, 4, 1 << 20);
        let mut missing = Missing::new(&content);
        missing.refresh(&store, &|_| false).unwrap();
        assert!(missing.is_complete());
        assert!(missing.seen.len() <= 5, "{} entries", missing.seen.len());
        assert!(store.missing(&content).unwrap().is_empty());
        // Writing it out stops at its claimed size, with an error, not at 1024^4 chunks.
        let mut pieces = 0;
        let walked = store.for_each_data_piece(&content, &mut |_| {
            pieces += 1;
            Ok(())
        });
        assert!(
            matches!(walked, Err(LogError::Corrupt { .. })),
            "{walked:?}"
        );
        assert!(pieces < 100_000);
        assert!(matches!(
            store.for_each_data_chunk(&content, &mut |_| Ok(())),
            Err(LogError::Corrupt { .. })
        ));
        assert!(matches!(
            store.lend(&content, &dir.path().join("never")),
            Ok(false) | Err(LogError::Corrupt { .. })
        ));
    }

    #[test]
    fn missing_tracks_what_arrives_and_asks_once() {
        use converge_api::content::NodeEntry;
        let (_dir, _db, store) = scratch();
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10]).collect();
        let node = IndexNode {
            children: data
                .iter()
                .map(|d| NodeEntry {
                    hash: Hash::of(d),
                    size: 10,
                })
                .collect(),
        }
        .encode()
        .unwrap();
        let content = ContentRef {
            root: Hash::of(&node),
            size: 30,
            depth: 1,
        };
        let mut in_flight = std::collections::HashSet::new();
        let mut m = Missing::new(&content);
        let ask = |m: &mut Missing, in_flight: &mut std::collections::HashSet<Hash>| {
            m.refresh(&store, &|h| in_flight.contains(h)).unwrap();
            m.request(&mut |h| {
                if in_flight.insert(*h) {
                    Ask::Yes
                } else {
                    Ask::InFlight
                }
            })
        };
        assert_eq!(ask(&mut m, &mut in_flight), vec![content.root]);
        assert!(ask(&mut m, &mut in_flight).is_empty(), "asked once");
        // The root arrives: its children are asked for next.
        store.put(&node).unwrap();
        in_flight.remove(&content.root);
        let mut children = ask(&mut m, &mut in_flight);
        children.sort();
        let mut expected: Vec<Hash> = data.iter().map(|d| Hash::of(d)).collect();
        expected.sort();
        assert_eq!(children, expected);
        // Two arrive; the third's request lapses without it: asked again.
        store.put(&data[0]).unwrap();
        store.put(&data[1]).unwrap();
        in_flight.clear();
        assert_eq!(ask(&mut m, &mut in_flight), vec![Hash::of(&data[2])]);
        assert!(!m.is_complete());
        store.put(&data[2]).unwrap();
        in_flight.clear();
        m.refresh(&store, &|h| in_flight.contains(h)).unwrap();
        assert!(m.is_complete());
        assert!(store.missing(&content).unwrap().is_empty());
    }

    /// Puts `chunks` as the data of one content, then its index nodes.
    fn put_content(store: &ChunkStore, chunks: &[Vec<u8>]) -> ContentRef {
        let mut tree = converge_api::content::TreeBuilder::new();
        let mut nodes = Vec::new();
        for chunk in chunks {
            let hash = store.put(chunk).unwrap();
            tree.push(hash, chunk.len() as u64, &mut |h, n| nodes.push((h, n)));
        }
        let content = tree.finish(&mut |h, n| nodes.push((h, n))).unwrap();
        for (hash, node) in nodes {
            store.put_prehashed(&hash, &node).unwrap();
        }
        content
    }

    /// The content's pieces, and the bytes they write.
    fn pieces(store: &ChunkStore, content: &ContentRef) -> (Vec<Piece>, Vec<u8>) {
        let mut pieces = Vec::new();
        store
            .for_each_data_piece(content, &mut |piece| {
                pieces.push(piece);
                Ok(())
            })
            .unwrap();
        let out = tempfile::tempfile().unwrap();
        let mut at = 0;
        for piece in &pieces {
            piece.write_to(&out, at).unwrap();
            at += piece.len();
        }
        let written = contents(&out);
        (pieces, written)
    }

    /// Everything in `file`.
    fn contents(file: &File) -> Vec<u8> {
        let mut bytes = vec![0; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut bytes, 0).unwrap();
        bytes
    }

    #[test]
    fn recent_locations_keep_the_last_two_generations() {
        let entries: Vec<(Hash, Location)> = (0..=2 * RECENT_ENTRIES as u64)
            .map(|i| {
                let location = Location {
                    pack: 1,
                    offset: i,
                    len: 1,
                };
                (Hash::of(&i.to_le_bytes()), location)
            })
            .collect();
        let mut recent = Recent::default();
        recent.extend(&entries);
        let found = |i: usize| recent.get(&entries[i].0);
        assert_eq!(found(0), None, "the first generation is dropped");
        assert_eq!(found(RECENT_ENTRIES - 1), None);
        assert_eq!(found(RECENT_ENTRIES), Some(entries[RECENT_ENTRIES].1));
        assert_eq!(
            found(2 * RECENT_ENTRIES),
            Some(entries[2 * RECENT_ENTRIES].1)
        );
        assert!(recent.newer.len() + recent.older.len() <= 2 * RECENT_ENTRIES);
    }

    #[test]
    fn a_run_written_where_it_does_not_line_up_with_its_pack_is_copied_whole() {
        let (_dir, _db, store) = scratch();
        let chunks: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; 5_000 + usize::from(i)]).collect();
        let content = put_content(&store, &chunks);
        let (got, _) = pieces(&store, &content);
        assert_eq!(got.len(), 1, "one run of this run's pack");
        // After 100 bytes of something else: the pack offset and the file offset fall at
        // different places within a page.
        let out = tempfile::tempfile().unwrap();
        (&out).write_all(&[7; 100]).unwrap();
        got[0].write_to(&out, 100).unwrap();
        let written = contents(&out);
        assert!(written[..100] == [7; 100]);
        assert!(written[100..] == chunks.concat(), "the run follows, whole");
    }

    #[test]
    fn data_is_copied_out_of_this_runs_packs_and_checked_from_older_ones() {
        let (dir, db, store) = scratch();
        let chunks: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; 3 << 20]).collect();
        let content = put_content(&store, &chunks);
        let whole = chunks.concat();

        // This run's pack: runs of chunks lying one after another, at most PIECE_BYTES.
        let (got, written) = pieces(&store, &content);
        let runs: Vec<(bool, u64)> = got
            .iter()
            .map(|p| (matches!(p, Piece::InPack { .. }), p.len()))
            .collect();
        assert_eq!(runs, [(true, 6 << 20), (true, 3 << 20)]);
        assert!(written == whole, "the pieces write the content");

        // An earlier run's pack: every chunk is read and checked.
        store.sync().unwrap();
        drop(store);
        let store = open(&db, dir.path());
        let (got, written) = pieces(&store, &content);
        assert!(got.iter().all(|p| matches!(p, Piece::Bytes(_))));
        assert_eq!(got.len(), 3);
        assert!(written == whole, "the pieces write the content");

        let path = pack_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let store = open(&db, dir.path());
        let damaged = store.for_each_data_piece(&content, &mut |_| Ok(()));
        assert!(
            matches!(damaged, Err(LogError::Corrupt { .. })),
            "{damaged:?}"
        );
    }

    /// A chunk as a peer pushes it: hash, bytes, place.
    type PushedItem = (Hash, Vec<u8>, Option<Place>);

    /// A content cut into `chunks` as a peer pushes it: data chunks placed in `stream`
    /// (each one's offset in the file), index nodes without a place.
    fn pushed(chunks: &[Vec<u8>], stream: u64) -> (ContentRef, Vec<PushedItem>) {
        let mut tree = converge_api::content::TreeBuilder::new();
        let mut items = Vec::new();
        let mut offset = 0;
        for chunk in chunks {
            let hash = Hash::of(chunk);
            items.push((hash, chunk.clone(), Some(Place { stream, offset })));
            offset += chunk.len() as u64;
            tree.push(hash, chunk.len() as u64, &mut |h, n| {
                items.push((h, n, None))
            });
        }
        let content = tree.finish(&mut |h, n| items.push((h, n, None))).unwrap();
        (content, items)
    }

    fn put_pushed(store: &ChunkStore, items: &[PushedItem]) {
        let chunks: Vec<(Hash, &[u8])> = items.iter().map(|(h, b, _)| (*h, &b[..])).collect();
        let places: Vec<Option<Place>> = items.iter().map(|i| i.2).collect();
        store.put_many_verified_at(&chunks, &places).unwrap();
    }

    /// Distinct pseudo-random chunks of the given lengths.
    fn chunks_of(lens: &[usize], seed: u8) -> Vec<Vec<u8>> {
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                (0..len)
                    .map(|j| (j as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
                    .collect()
            })
            .collect()
    }

    /// A chunk of stored content that is gone (its index entry lost with a damaged run,
    /// say) is reported when the content is read out, and listed to be fetched again.
    #[test]
    fn a_chunk_gone_from_stored_content_is_listed_to_be_fetched_again() {
        let (_dir, _db, store) = scratch();
        let chunks = chunks_of(&[3000, 4000, 5000], 4);
        let (content, items) = pushed(&chunks, 61);
        let gone = items[1].0;
        let kept: Vec<PushedItem> = items.into_iter().filter(|i| i.0 != gone).collect();
        put_pushed(&store, &kept);
        store.sync().unwrap();
        assert!(store.damaged().is_empty());
        let read = store.for_each_data_chunk(&content, &mut |_| Ok(()));
        assert!(matches!(read, Err(LogError::Corrupt { .. })), "{read:?}");
        assert_eq!(store.damaged(), vec![gone]);
        // Once stored again, it is no longer asked for.
        store.put_verified(&gone, &chunks[1]).unwrap();
        assert!(store.damaged().is_empty());
    }

    /// A stream that skips ahead (a peer pushing only the chunks of a large file this
    /// replica lacks) has no blocks reserved across the gap: they would lie inside the
    /// pack, never written and never given back.
    #[test]
    fn a_stream_that_skips_ahead_reserves_no_blocks_across_the_gap() {
        use std::os::unix::fs::MetadataExt;
        let (dir, _db, store) = scratch();
        let chunks = chunks_of(&[5000, 7000], 9);
        let far = 256 << 20;
        let items: Vec<PushedItem> = vec![
            (
                Hash::of(&chunks[0]),
                chunks[0].clone(),
                Some(Place {
                    stream: 51,
                    offset: 0,
                }),
            ),
            (
                Hash::of(&chunks[1]),
                chunks[1].clone(),
                Some(Place {
                    stream: 51,
                    offset: far,
                }),
            ),
        ];
        put_pushed(&store, &items);
        store.sync().unwrap();
        let mut packs: Vec<std::fs::Metadata> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("pack-"))
            .map(|e| e.metadata().unwrap())
            .collect();
        packs.sort_by_key(|m| m.len());
        let stream = packs.last().unwrap();
        assert_eq!(stream.len(), far + 7000, "the far chunk is at its place");
        assert!(
            stream.blocks() * 512 < 33 << 20,
            "{} bytes allocated for 12,000 bytes of chunks",
            stream.blocks() * 512
        );
        for (hash, bytes, _) in &items {
            assert_eq!(&store.get(hash).unwrap().unwrap(), bytes);
        }
    }

    /// A stream pack that local content relies on for a chunk (a file put here holding a
    /// chunk a peer's stream brought) is not lent: the folder's owner could change it.
    #[test]
    fn a_stream_pack_local_content_relies_on_is_not_lent() {
        let (dir, _db, store) = scratch();
        let lens: Vec<usize> = (0..40).map(|i| 1000 + i * 7).collect();
        let chunks = chunks_of(&lens, 3);
        let (content, items) = pushed(&chunks, 43);
        put_pushed(&store, &items);
        store.sync().unwrap();
        assert!(store.missing(&content).unwrap().is_empty());
        // Known already: the local put keeps it where the stream put it.
        let stream_pack = store.locate(&items[0].0).unwrap().unwrap();
        store.put(&chunks[0]).unwrap();
        assert_eq!(store.locate(&items[0].0).unwrap().unwrap(), stream_pack);
        assert!(!store.lend(&content, &dir.path().join("the file")).unwrap());
        assert!(store.trusted(store.locate(&items[0].0).unwrap().unwrap()));
    }

    #[test]
    fn a_stream_received_whole_is_lent_then_checked_on_every_read() {
        let (dir, _db, store) = scratch();
        // Many chunks, so that the content has index nodes, pushed in several batches.
        let lens: Vec<usize> = (0..300).map(|i| 1000 + i * 7).collect();
        let chunks = chunks_of(&lens, 1);
        let whole: Vec<u8> = chunks.concat();
        let (content, items) = pushed(&chunks, 42);
        assert!(content.depth > 0);
        for part in items.chunks(64) {
            put_pushed(&store, part);
        }
        store.sync().unwrap();
        assert!(store.missing(&content).unwrap().is_empty());

        // A link that fails (here: no such directory) lends nothing; the next may.
        let nowhere = dir.path().join("no such directory").join("the file");
        assert!(!store.lend(&content, &nowhere).unwrap());
        assert!(store.trusted(store.locate(&items[0].0).unwrap().unwrap()));
        let to = dir.path().join("the file");
        assert!(store.lend(&content, &to).unwrap());
        assert!(!store.trusted(store.locate(&items[0].0).unwrap().unwrap()));
        assert_eq!(std::fs::read(&to).unwrap(), whole);
        // Lent once: the stream is closed, a second lend copies.
        assert!(!store.lend(&content, &dir.path().join("again")).unwrap());
        assert_eq!(store.get(&items[0].0).unwrap().unwrap(), chunks[0]);

        // The folder's copy changes in place: the chunk read from it is not trusted.
        let mut changed = whole.clone();
        changed[5] ^= 0xff;
        std::fs::write(&to, &changed).unwrap();
        assert!(matches!(
            store.get(&items[0].0),
            Err(LogError::Corrupt { .. })
        ));
        assert_eq!(store.damaged(), vec![items[0].0]);
        // Cut short: the chunks beyond the end are damaged too, not an I/O error.
        let last = Hash::of(chunks.last().unwrap());
        std::fs::write(&to, &changed[..1000]).unwrap();
        assert!(matches!(store.get(&last), Err(LogError::Corrupt { .. })));
        // Fetched again, they are stored anew and read back right.
        store.put_verified(&last, chunks.last().unwrap()).unwrap();
        assert_eq!(store.get(&last).unwrap().unwrap(), *chunks.last().unwrap());
    }

    /// A peer's chunks checked apart from their put (as a receiver checks one batch while
    /// the one before is written) are stored as `put_many_verified_at` stores them: a
    /// stream put in checked batches is lent whole. A check names the chunk that does not
    /// match, and stores nothing.
    #[test]
    fn chunks_checked_apart_are_put_like_verified_ones() {
        let (dir, _db, store) = scratch();
        let lens: Vec<usize> = (0..200).map(|i| 1000 + i * 11).collect();
        let chunks = chunks_of(&lens, 5);
        let (content, items) = pushed(&chunks, 44);
        let batches: Vec<Vec<(Hash, &[u8])>> = items
            .chunks(50)
            .map(|part| part.iter().map(|(h, b, _)| (*h, &b[..])).collect())
            .collect();
        let checked: Vec<Checked<'_>> = batches
            .iter()
            .map(|chunks| ChunkStore::check(chunks).unwrap())
            .collect();
        // Nothing is stored by a check.
        assert_eq!(store.missing(&content).unwrap(), vec![content.root]);
        for (checked, part) in checked.into_iter().zip(items.chunks(50)) {
            let places: Vec<Option<Place>> = part.iter().map(|i| i.2).collect();
            store.put_checked_at(checked, &places).unwrap();
        }
        store.sync().unwrap();
        assert!(store.missing(&content).unwrap().is_empty());
        let to = dir.path().join("the file");
        assert!(store.lend(&content, &to).unwrap());
        assert_eq!(std::fs::read(&to).unwrap(), chunks.concat());
        // The blocks reserved ahead of the writes are not the folder's file's.
        use std::os::unix::fs::MetadataExt;
        let lent = std::fs::metadata(&to).unwrap();
        assert!(
            lent.blocks() * 512 < content.size + (64 << 10),
            "{} bytes in blocks for {} of content",
            lent.blocks() * 512,
            content.size
        );

        let good = b"as sent".as_slice();
        let bad = b"as damaged on the way".as_slice();
        let claimed = Hash::of(b"as claimed");
        let sent = [(Hash::of(good), good), (claimed, bad)];
        match ChunkStore::check(&sent) {
            Err(LogError::ChunkMismatch { expected, actual }) => {
                assert_eq!(expected, claimed.to_hex());
                assert_eq!(actual, Hash::of(bad).to_hex());
            }
            other => panic!("{other:?}"),
        }
    }

    /// A stream pack whose writeback failed (here: its descriptor a pipe's, on which the
    /// kernel's check fails for real) is not lent: the folder's sync would not hear of
    /// the failure. It is given up like a pack whose sync failed, and its staged chunks
    /// are written again by the next sync.
    #[test]
    fn a_stream_whose_writeback_failed_is_not_lent() {
        let (dir, db, store) = scratch();
        let lens: Vec<usize> = (0..40).map(|i| 1000 + i * 7).collect();
        let chunks = chunks_of(&lens, 3);
        let (content, items) = pushed(&chunks, 42);
        put_pushed(&store, &items);
        assert!(store.missing(&content).unwrap().is_empty());
        let stream = store.locate(&items[0].0).unwrap().unwrap().pack;

        let put_back = fail_syncs_of(dir.path(), stream);
        assert!(!store.lend(&content, &dir.path().join("the file")).unwrap());
        put_back();
        assert!(!dir.path().join("the file").exists());
        assert!(!store.lend(&content, &dir.path().join("the file")).unwrap());
        store.sync().unwrap();
        let moved = store.locate(&items[0].0).unwrap().unwrap();
        assert_ne!(moved.pack, stream, "written again elsewhere");
        drop(store);
        let store = open(&db, dir.path());
        for (hash, bytes) in items.iter().map(|i| i.0).zip(&chunks) {
            assert_eq!(store.get(&hash).unwrap().as_ref(), Some(bytes));
        }
    }

    /// Chunks with their ranges in one buffer, and their places in one stream.
    type Laid = (Vec<(Hash, Range<usize>)>, Vec<Option<Place>>);

    /// `chunks`, one after another in one buffer, with their ranges and places.
    fn placed(chunks: &[Vec<u8>]) -> Laid {
        let mut ranges = Vec::new();
        let mut places = Vec::new();
        let mut at = 0;
        for chunk in chunks {
            ranges.push((Hash::of(chunk), at..at + chunk.len()));
            places.push(Some(Place {
                stream: 7,
                offset: at as u64,
            }));
            at += chunk.len();
        }
        (ranges, places)
    }

    /// The pack `adopted` is linked as, if it is.
    fn pack_of(store: &ChunkStore, adopted: &Adopted) -> Option<u32> {
        let w = store.inner.writer.lock().unwrap();
        w.adopted.get(&adopted.inode).copied().flatten()
    }

    /// The bytes in the store's packs other than `except`'s.
    fn packed_bytes(dir: &Path, except: &[u32]) -> u64 {
        let except: Vec<PathBuf> = except.iter().map(|&id| pack_path(dir, id)).collect();
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                name.starts_with("pack-") && !except.contains(p)
            })
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    }

    #[test]
    fn an_adopted_file_is_read_where_it_lies_checked_and_never_copied() {
        use std::os::unix::fs::MetadataExt;
        let (dir, db, store) = scratch();
        let lens: Vec<usize> = (0..40).map(|i| 3000 + i * 11).collect();
        let chunks = chunks_of(&lens, 7);
        let whole: Vec<u8> = chunks.concat();
        let path = dir.path().join("a large file of the folder");
        std::fs::write(&path, &whole).unwrap();
        let (ranges, places) = placed(&chunks);
        let buffer: SharedBuffer = Arc::new(whole.clone());
        let hash = |i: usize| ranges[i].0;
        // One chunk is held already, in a pack this run wrote.
        store.put(&chunks[0]).unwrap();
        let handed: Arc<Mutex<Vec<Hash>>> = Arc::default();
        let sink = handed.clone();
        store.set_fresh_sink(Some(Box::new(move |fresh: Vec<FreshChunk>| {
            sink.lock().unwrap().extend(fresh.iter().map(|c| c.hash))
        })));

        // A file on another file system cannot be linked: its chunks are copied.
        let elsewhere = store
            .adopt(&File::open("/proc/self/status").unwrap())
            .unwrap();
        let apart = chunks_of(&[5000, 6000], 99);
        let (apart_ranges, apart_places) = placed(&apart);
        let apart_buffer: SharedBuffer = Arc::new(apart.concat());
        store
            .put_adopted_at(&elsewhere, &apart_buffer, &apart_ranges, &apart_places)
            .unwrap();
        assert_eq!(pack_of(&store, &elsewhere), None);
        for (hash, _) in &apart_ranges {
            assert!(store.trusted(store.locate(hash).unwrap().unwrap()));
        }
        let apart_bytes = (5000 + 6000) as u64;
        store.flush_fresh();
        handed.lock().unwrap().clear();

        let file = File::open(&path).unwrap();
        let adopted = store.adopt(&file).unwrap();
        store
            .put_adopted_at(&adopted, &buffer, &ranges, &places)
            .unwrap();
        store.flush_fresh();
        let fresh: Vec<Hash> = (1..chunks.len()).map(hash).collect();
        assert_eq!(*handed.lock().unwrap(), fresh, "the new chunks go to peers");
        // The pack is the file itself; nothing else holds more than the first chunk.
        let adopted_pack = pack_of(&store, &adopted).unwrap();
        let pack = pack_path(dir.path(), adopted_pack);
        assert_eq!(
            std::fs::metadata(&pack).unwrap().ino(),
            std::fs::metadata(&path).unwrap().ino()
        );
        assert_eq!(
            packed_bytes(dir.path(), &[adopted_pack]),
            chunks[0].len() as u64 + apart_bytes
        );
        let first = store.locate(&hash(0)).unwrap().unwrap();
        assert!(
            store.trusted(first) && first.pack != adopted_pack,
            "a trusted copy stays"
        );
        assert!(!store.trusted(store.locate(&hash(1)).unwrap().unwrap()));
        assert_eq!(store.get(&hash(1)).unwrap().unwrap(), chunks[1]);
        // Chunked again in this run, the same file is the same pack: no second link.
        let file = File::open(&path).unwrap();
        let once_more = store.adopt(&file).unwrap();
        store
            .put_adopted_at(&once_more, &buffer, &ranges, &places)
            .unwrap();
        assert_eq!(pack_of(&store, &once_more), Some(adopted_pack));
        assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 2);

        // Synced and opened again (a restart), the chunks are found where they lie.
        store.sync().unwrap();
        drop(store);
        let store = open(&db, dir.path());
        assert_eq!(store.get(&hash(2)).unwrap().unwrap(), chunks[2]);

        // Changed in place by the folder's owner: what changed reads as damaged.
        let mut changed = whole.clone();
        changed[ranges[3].1.start] ^= 0xff;
        std::fs::write(&path, &changed).unwrap();
        assert!(matches!(store.get(&hash(3)), Err(LogError::Corrupt { .. })));
        assert_eq!(store.damaged(), vec![hash(3)]);
        // The file is named for the folder source to chunk again, and wakes it.
        let meta = std::fs::metadata(&path).unwrap();
        assert!(store.is_changed_file(meta.dev(), meta.ino()));
        assert!(!store.is_changed_file(meta.dev(), meta.ino() + 1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let woken = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), store.files_changed()).await
        });
        assert!(
            woken.is_ok(),
            "the wait ends at once: a file was found changed"
        );
        // Kept across a restart, until a whole scan has chunked it again.
        drop(store);
        let store = open(&db, dir.path());
        assert_eq!(store.changed_files(), vec![(meta.dev(), meta.ino())]);
        assert!(store.is_changed_file(meta.dev(), meta.ino()));
        store.forget_changed_files(&store.changed_files()).unwrap();
        assert!(!store.is_changed_file(meta.dev(), meta.ino()));
        drop(store);
        let store = open(&db, dir.path());
        assert!(store.changed_files().is_empty());

        // Chunked again once changed back, it is adopted anew: the chunk lost is found in
        // it, and so are those the earlier run recorded in the same file; the one in a
        // pack of the store's own stays there.
        std::fs::write(&path, &whole).unwrap();
        let file = File::open(&path).unwrap();
        let again = store.adopt(&file).unwrap();
        store
            .put_adopted_at(&again, &buffer, &ranges, &places)
            .unwrap();
        let again_pack = pack_of(&store, &again).unwrap();
        assert_ne!(again_pack, adopted_pack);
        for i in [3, 2] {
            assert_eq!(store.locate(&hash(i)).unwrap().unwrap().pack, again_pack);
        }
        assert_eq!(store.locate(&hash(0)).unwrap().unwrap(), first);
        assert_eq!(store.get(&hash(3)).unwrap().unwrap(), chunks[3]);
        assert!(store.damaged().is_empty());
    }

    /// A chunk two files of the folder share is never left in one of them alone: a file
    /// put the usual way that holds a chunk of an adopted file, and a copy of the adopted
    /// file (`cp big copy`), get copies in the store's own packs, so that editing the
    /// adopted file in place loses none of their content; synced, the copies are what the
    /// index holds, whatever manifest still waits to be indexed, after a crash too.
    #[test]
    fn a_chunk_of_an_adopted_file_that_other_content_holds_is_copied() {
        use std::os::unix::fs::MetadataExt;
        let (dir, db, store) = scratch();
        // Enough chunks for a sync to record them in a manifest.
        let lens: Vec<usize> = (0..MANIFEST_ENTRIES + 16).map(|i| 4000 + i * 13).collect();
        let chunks = chunks_of(&lens, 9);
        let whole: Vec<u8> = chunks.concat();
        let (ranges, places) = placed(&chunks);
        let buffer: SharedBuffer = Arc::new(whole.clone());
        let hash = |i: usize| ranges[i].0;
        let original = dir.path().join("big");
        std::fs::write(&original, &whole).unwrap();
        let adopted = store.adopt(&File::open(&original).unwrap()).unwrap();
        store
            .put_adopted_at(&adopted, &buffer, &ranges, &places)
            .unwrap();
        let original_pack = pack_of(&store, &adopted).unwrap();
        assert_eq!(packed_bytes(dir.path(), &[original_pack]), 0);
        store.sync().unwrap();
        assert_ne!(store.inner.writer.lock().unwrap().unindexed.len(), 0);

        // A small file holding one of its chunks, put the usual way: the chunk is copied,
        // and, synced, stays copied once the manifest is indexed.
        store.put(&chunks[3]).unwrap();
        store.sync().unwrap();
        assert!(store.trusted(store.locate(&hash(3)).unwrap().unwrap()));

        // `cp big copy`: every chunk of the copy is copied, and the copy, in which
        // nothing is recorded, is not linked.
        let copy = dir.path().join("copy");
        std::fs::write(&copy, &whole).unwrap();
        let second = store.adopt(&File::open(&copy).unwrap()).unwrap();
        store
            .put_adopted_at(&second, &buffer, &ranges, &places)
            .unwrap();
        assert_eq!(pack_of(&store, &second), None);
        assert_eq!(std::fs::metadata(&copy).unwrap().nlink(), 1);
        assert_eq!(
            packed_bytes(dir.path(), &[original_pack]),
            whole.len() as u64
        );
        store.sync().unwrap();
        for i in 0..chunks.len() {
            assert!(store.trusted(store.locate(&hash(i)).unwrap().unwrap()));
        }
        // A crash before the big file's manifest is indexed: the copies still count.
        assert!(!store.inner.writer.lock().unwrap().manifested.is_empty());
        drop(store);
        let store = open(&db, dir.path());
        for i in 0..chunks.len() {
            assert_ne!(store.locate(&hash(i)).unwrap().unwrap().pack, original_pack);
        }

        // Both files edited in place: nothing the copies hold is lost.
        for path in [&original, &copy] {
            std::fs::write(path, vec![0u8; whole.len()]).unwrap();
        }
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(store.get(&hash(i)).unwrap().unwrap(), *chunk);
        }
        assert!(store.damaged().is_empty());

        // A file whose pack has no other name left (renamed over, here removed) is no
        // one else's to change: a new file holding its chunks leaves them there.
        let lens: Vec<usize> = (0..10).map(|i| 5000 + i * 7).collect();
        let other = chunks_of(&lens, 21);
        let (other_ranges, other_places) = placed(&other);
        let other_buffer: SharedBuffer = Arc::new(other.concat());
        let third = dir.path().join("third");
        std::fs::write(&third, other.concat()).unwrap();
        let third_adopted = store.adopt(&File::open(&third).unwrap()).unwrap();
        store
            .put_adopted_at(&third_adopted, &other_buffer, &other_ranges, &other_places)
            .unwrap();
        let kept = store.locate(&other_ranges[5].0).unwrap().unwrap();
        assert_eq!(Some(kept.pack), pack_of(&store, &third_adopted));
        std::fs::remove_file(&third).unwrap();
        let fourth = dir.path().join("fourth");
        std::fs::write(&fourth, other.concat()).unwrap();
        let fourth_adopted = store.adopt(&File::open(&fourth).unwrap()).unwrap();
        store
            .put_adopted_at(&fourth_adopted, &other_buffer, &other_ranges, &other_places)
            .unwrap();
        assert_eq!(store.locate(&other_ranges[5].0).unwrap().unwrap(), kept);
        assert_eq!(pack_of(&store, &fourth_adopted), None);
    }

    #[test]
    fn a_stream_with_holes_or_overlaps_is_copied_not_lent() {
        let (dir, _db, store) = scratch();
        let chunks = chunks_of(&[5000, 6000, 7000, 8000], 2);
        let (content, items) = pushed(&chunks, 7);
        let data: Vec<&PushedItem> = items.iter().filter(|i| i.2.is_some()).collect();
        // The second chunk is already known: a hole in the stream pack.
        store.put(&chunks[1]).unwrap();
        put_pushed(&store, &items);
        assert!(!store.lend(&content, &dir.path().join("holed")).unwrap());
        let (pieces, bytes) = pieces(&store, &content);
        assert!(!pieces.is_empty());
        assert_eq!(bytes, chunks.concat());

        // A chunk placed over bytes already written (a peer's mistake) is stored in the
        // shared pack instead, and the chunks below it stay as they were.
        let other = chunks_of(&[3000], 9).remove(0);
        let overlapping = (
            Hash::of(&other),
            other.clone(),
            Some(Place {
                stream: 7,
                offset: data[2].2.unwrap().offset + 10,
            }),
        );
        put_pushed(&store, &[overlapping]);
        assert_eq!(store.get(&Hash::of(&other)).unwrap().unwrap(), other);
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(
                store.get(&Hash::of(chunk)).unwrap().unwrap(),
                *chunk,
                "chunk {i}"
            );
        }
        // A place far beyond any file goes to the shared pack too.
        let far = b"far away".to_vec();
        let far_place = Place {
            stream: 8,
            offset: STREAM_BYTES,
        };
        put_pushed(&store, &[(Hash::of(&far), far.clone(), Some(far_place))]);
        assert_eq!(store.get(&Hash::of(&far)).unwrap().unwrap(), far);
    }

    #[test]
    fn a_chunk_of_a_pack_lent_before_its_sync_is_dropped_once_changed() {
        let (dir, _db, store) = scratch();
        let chunks = chunks_of(&[5000, 6000, 7000], 4);
        let (content, items) = pushed(&chunks, 11);
        put_pushed(&store, &items);
        let to = dir.path().join("lent unsynced");
        assert!(store.lend(&content, &to).unwrap());
        let mut changed = chunks.concat();
        changed[1] ^= 0xff;
        std::fs::write(&to, &changed).unwrap();
        let first = Hash::of(&chunks[0]);
        assert!(matches!(store.get(&first), Err(LogError::Corrupt { .. })));
        // Missing now (not found among the staged chunks), so asked for and stored anew.
        assert_eq!(store.damaged(), vec![first]);
        store.put_verified(&first, &chunks[0]).unwrap();
        assert_eq!(store.get(&first).unwrap().unwrap(), chunks[0]);
        store.sync().unwrap();
        assert_eq!(store.get(&first).unwrap().unwrap(), chunks[0]);
        assert!(store.damaged().is_empty());
    }

    #[test]
    fn a_pack_is_not_lent_while_a_run_of_it_is_held() {
        let (dir, _db, store) = scratch();
        let chunks = chunks_of(&[5000, 6000, 7000], 5);
        let (content, items) = pushed(&chunks, 12);
        put_pushed(&store, &items);
        store.sync().unwrap();
        let mut held = Vec::new();
        store
            .for_each_data_piece(&content, &mut |piece| {
                held.push(piece);
                Ok(())
            })
            .unwrap();
        assert!(matches!(held[..], [Piece::InPack { .. }]));
        // Another writer of the same content would copy it unchecked: not lent.
        assert!(!store
            .lend(&content, &dir.path().join("while held"))
            .unwrap());
        drop(held);
        let to = dir.path().join("once copied");
        assert!(store.lend(&content, &to).unwrap());
        assert_eq!(std::fs::read(&to).unwrap(), chunks.concat());
        // From then on its runs are read and checked, not handed out.
        let (pieces, bytes) = pieces(&store, &content);
        assert!(pieces.iter().all(|p| matches!(p, Piece::Bytes(_))));
        assert_eq!(bytes, chunks.concat());
    }

    #[test]
    fn streams_open_at_their_start_and_only_so_many_between_syncs() {
        let (dir, _db, store) = scratch();
        let packs = || std::fs::read_dir(dir.path()).unwrap().count();
        let placed = |seed: u8, stream: u64, offset: u64| {
            let bytes = chunks_of(&[100], seed).remove(0);
            let item = (Hash::of(&bytes), bytes, Some(Place { stream, offset }));
            put_pushed(&store, std::slice::from_ref(&item));
            item
        };
        // A stream first seen past its start could never be lent: the shared pack.
        let late = placed(0, 1, 4096);
        assert!(store.inner.writer.lock().unwrap().streams.is_empty());
        assert_eq!(packs(), 1);
        assert_eq!(store.get(&late.0).unwrap().unwrap(), late.1);
        // A peer opening ever new streams gets a bounded number of packs until the sync.
        let items: Vec<PushedItem> = (0..NEW_STREAMS as u64 + 20)
            .map(|stream| placed(stream as u8 + 1, 100 + stream, 0))
            .collect();
        let before_sync = packs();
        assert!(before_sync <= NEW_STREAMS + 2, "{before_sync} pack files");
        for (hash, bytes, _) in &items {
            assert_eq!(store.get(hash).unwrap().unwrap(), *bytes);
        }
        store.sync().unwrap();
        placed(200, 1000, 0);
        assert_eq!(
            packs(),
            before_sync + 1,
            "a new stream opens after the sync"
        );
    }

    #[test]
    fn a_pack_of_an_earlier_run_that_is_gone_reads_as_damaged() {
        let (dir, db, store) = scratch();
        let hash = store.put(b"in a pack removed later").unwrap();
        store.sync().unwrap();
        drop(store);
        let store = open(&db, dir.path());
        std::fs::remove_file(pack_path(dir.path(), 1)).unwrap();
        assert!(matches!(store.get(&hash), Err(LogError::Corrupt { .. })));
        assert_eq!(store.damaged(), vec![hash]);
        assert!(!store.contains(&hash).unwrap());
    }

    #[test]
    fn many_streams_keep_a_bounded_number_of_packs_open() {
        let (_dir, _db, store) = scratch();
        let chunks = chunks_of(&vec![100; OPEN_READERS + 10], 3);
        for (stream, chunk) in chunks.iter().enumerate() {
            let place = Place {
                stream: stream as u64,
                offset: 0,
            };
            put_pushed(&store, &[(Hash::of(chunk), chunk.clone(), Some(place))]);
        }
        store.sync().unwrap();
        assert!(store.inner.readers.read().unwrap().len() <= OPEN_READERS);
        assert!(store.inner.writer.lock().unwrap().streams.len() <= OPEN_STREAMS);
        // A stream pack closed to make room keeps no blocks reserved past its end; one
        // still open does.
        use std::os::unix::fs::MetadataExt;
        let reserved = |stream: usize| {
            let location = store.locate(&Hash::of(&chunks[stream])).unwrap().unwrap();
            let meta = std::fs::metadata(pack_path(&store.inner.dir, location.pack)).unwrap();
            meta.blocks() * 512 > 64 << 10
        };
        // (The streams after the first `NEW_STREAMS` went to the shared pack.)
        assert!(!reserved(0));
        assert!(reserved(NEW_STREAMS - 1));
        // Closed packs are opened again to be read.
        for chunk in &chunks {
            assert_eq!(store.get(&Hash::of(chunk)).unwrap().unwrap(), *chunk);
        }
        assert!(store.inner.readers.read().unwrap().len() <= OPEN_READERS);
    }

    fn found_without(store: &ChunkStore, hashes: &[Hash], skip: usize) -> Vec<(Hash, Found)> {
        hashes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, h)| (*h, store.find(h).unwrap().unwrap()))
            .collect()
    }

    /// Chunks one after another in a pack are read back together, as `get` reads each;
    /// in a pack of an earlier run a damaged one among them reads as an error and is
    /// dropped, and the rest still read.
    #[test]
    fn chunks_found_together_read_as_each_alone_and_a_damaged_one_is_dropped() {
        let (dir, db, store) = scratch();
        let data: Vec<Vec<u8>> = (0..40u32)
            .map(|i| (0..1000 + i * 97).map(|b| (b * 31 + i) as u8).collect())
            .collect();
        let hashes: Vec<Hash> = data.iter().map(|d| store.put(d).unwrap()).collect();
        store.sync().unwrap();
        let found = |store: &ChunkStore| -> Vec<(Hash, Found)> {
            let mut found: Vec<_> = hashes
                .iter()
                .map(|h| (*h, store.find(h).unwrap().unwrap()))
                .collect();
            // Read in pack order whichever way they were asked for: here, as put.
            found.sort_by_key(|(_, f)| f.location.offset);
            found
        };
        let read = |store: &ChunkStore| -> Vec<Result<Vec<u8>, LogError>> {
            store
                .read_found(&found(store))
                .into_iter()
                .map(|r| r.map(|c| c.to_vec()))
                .collect()
        };
        // One after another, as the pack appended them: one run.
        let all = found(&store);
        for pair in all.windows(2) {
            let (a, b) = (pair[0].1.location, pair[1].1.location);
            assert_eq!((b.pack, b.offset), (a.pack, a.offset + u64::from(a.len)));
        }
        // Trusted (this run's pack): as put.
        let got: Vec<Vec<u8>> = read(&store).into_iter().map(Result::unwrap).collect();
        assert_eq!(got, data);
        let damaged_at = store.find(&hashes[20]).unwrap().unwrap().location.offset;
        drop(store);

        // An earlier run's pack, checked: one byte of chunk 20 changed.
        let path = pack_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[damaged_at as usize + 5] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let store = open(&db, dir.path());
        for (i, result) in read(&store).into_iter().enumerate() {
            match i {
                20 => assert!(
                    matches!(result, Err(LogError::Corrupt { .. })),
                    "{result:?}"
                ),
                _ => assert_eq!(result.unwrap(), data[i], "chunk {i}"),
            }
        }
        assert_eq!(store.damaged(), vec![hashes[20]]);
        // The rest, read together again, all match now.
        let rest: Vec<(Hash, Found)> = found_without(&store, &hashes, 20);
        assert!(store.read_found(&rest).iter().all(Result::is_ok));
    }

    #[test]
    fn a_damaged_pack_reads_as_an_error_not_as_content() {
        let (dir, db, store) = scratch();
        let hash = store.put(b"precious bytes").unwrap();
        store.sync().unwrap();
        let path = pack_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let store = open(&db, dir.path());
        assert!(matches!(store.get(&hash), Err(LogError::Corrupt { .. })));
        // Dropped and listed, so that a peer's copy is stored when it comes.
        assert_eq!(store.damaged(), vec![hash]);
        assert!(!store.contains(&hash).unwrap());
        store.put_verified(&hash, b"precious bytes").unwrap();
        store.sync().unwrap();
        assert_eq!(store.get(&hash).unwrap().unwrap(), b"precious bytes");
        assert!(store.damaged().is_empty());
    }

    /// A pack write that fails (here with a file size limit standing in for a full disk)
    /// is cut back, so the next put lands in the same pack where the index says, instead
    /// of every retry leaving a new pack file behind.
    #[test]
    fn a_failed_pack_write_is_cut_back_and_the_pack_kept() {
        // The limit is per process: the test runs itself in a child process.
        const CHILD: &str = "CONVERGE_TEST_FILE_SIZE_LIMIT";
        const NAME: &str = "content::tests::a_failed_pack_write_is_cut_back_and_the_pack_kept";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "the child failed:\n{text}");
            assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
            return;
        }
        let (dir, db, store) = scratch();
        let before = store.put(&[1; 1 << 20]).unwrap();
        store.sync().unwrap();
        // Writes past the limit fail with EFBIG rather than killing the process.
        // SAFETY: ignoring a signal in this single-test child process.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let limit = libc::rlimit {
            rlim_cur: 3 << 20,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a plain system call on a valid struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);

        for _ in 0..3 {
            let err = store.put(&[2; 4 << 20]).unwrap_err();
            assert!(err.to_string().contains("pack-00000001"), "{err}");
        }
        let packs = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(packs(), 1, "no new pack for a failed write");
        assert_eq!(
            std::fs::metadata(pack_path(dir.path(), 1)).unwrap().len(),
            1 << 20,
            "cut back to the chunks it held"
        );

        let after = store.put(b"written once there is room").unwrap();
        store.sync().unwrap();
        assert_eq!(packs(), 1);
        drop(store);
        let store = open(&db, dir.path());
        assert_eq!(store.get(&before).unwrap().unwrap(), vec![1; 1 << 20]);
        assert_eq!(
            store.get(&after).unwrap().unwrap(),
            b"written once there is room"
        );
        assert!(store.damaged().is_empty());
    }

    /// Makes the syncs of `dir`'s pack `id` fail, for real, the way a disk's failed
    /// writeback does: the store's descriptors of the pack are turned into a pipe's
    /// (`fdatasync` of a pipe fails with `EINVAL`). Returns what puts them back.
    fn fail_syncs_of(dir: &Path, id: u32) -> impl FnOnce() {
        fail_syncs_of_path(&pack_path(dir, id))
    }

    /// [`fail_syncs_of`] for the descriptors open on the file at `pack`.
    fn fail_syncs_of_path(pack: &Path) -> impl FnOnce() {
        let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                (target == *pack).then(|| e.file_name().to_str()?.parse().ok())?
            })
            .collect();
        assert!(!fds.is_empty(), "no descriptor of {}", pack.display());
        let mut pipe = [0; 2];
        // SAFETY: plain system calls on descriptors this test owns or the store holds
        // open until it is dropped; each replaced one is put back below.
        let saved: Vec<(i32, i32)> = unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            fds.iter()
                .map(|&fd| {
                    let copy = libc::dup(fd);
                    assert!(copy >= 0);
                    assert!(libc::dup2(pipe[1], fd) >= 0);
                    (fd, copy)
                })
                .collect()
        };
        move || unsafe {
            for (fd, copy) in saved {
                assert!(libc::dup2(copy, fd) >= 0);
                libc::close(copy);
            }
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
    }

    /// An adopted file whose sync fails is given up like a pack: its chunks are copied
    /// into the store's own pack by the next sync, except one the folder's owner changed
    /// meanwhile, which is dropped (the change supersedes it) without breaking the store,
    /// and the file's later chunks are copied, not recorded in it.
    #[test]
    fn an_adopted_file_whose_sync_failed_is_copied_and_a_changed_chunk_dropped() {
        let (dir, _db, store) = scratch();
        let lens: Vec<usize> = (0..8).map(|i| 4000 + i * 13).collect();
        let chunks = chunks_of(&lens, 5);
        let whole: Vec<u8> = chunks.concat();
        let (ranges, places) = placed(&chunks);
        let buffer: SharedBuffer = Arc::new(whole.clone());
        let path = dir.path().join("a large file of the folder");
        std::fs::write(&path, &whole).unwrap();
        let adopted = store.adopt(&File::open(&path).unwrap()).unwrap();
        store
            .put_adopted_at(&adopted, &buffer, &ranges[..4], &places[..4])
            .unwrap();
        let pack = pack_of(&store, &adopted).unwrap();

        let put_back = fail_syncs_of_path(&path);
        assert!(store.sync().is_err());
        put_back();
        // Changed in place meanwhile: the second chunk.
        let mut changed = whole.clone();
        changed[ranges[1].1.start] ^= 0xff;
        std::fs::write(&path, &changed).unwrap();
        store.sync().unwrap();
        assert_eq!(store.locate(&ranges[1].0).unwrap(), None);
        for i in [0, 2, 3] {
            let at = store.locate(&ranges[i].0).unwrap().unwrap();
            assert!(store.trusted(at) && at.pack != pack, "{at:?}");
            assert_eq!(store.get(&ranges[i].0).unwrap().unwrap(), chunks[i]);
        }
        // Not broken: the file's later chunks are copied, and syncs go on.
        store
            .put_adopted_at(&adopted, &buffer, &ranges[4..], &places[4..])
            .unwrap();
        store.sync().unwrap();
        for (hash, _) in &ranges[4..] {
            let at = store.locate(hash).unwrap().unwrap();
            assert!(store.trusted(at) && at.pack != pack, "{at:?}");
        }
    }

    /// After a failed sync the pages it could not write may be marked clean, so syncing
    /// the same pack again could succeed over lost bytes: the chunks staged in it are
    /// written again, into a new pack, and those are the ones indexed.
    #[test]
    fn the_chunks_of_a_pack_whose_sync_failed_are_written_again() {
        let (dir, db, store) = scratch();
        let kept = store.put(b"synced before the failure").unwrap();
        store.sync().unwrap();
        let staged = store.put(b"staged when the sync fails").unwrap();

        let put_back = fail_syncs_of(dir.path(), 1);
        let err = store.sync().unwrap_err();
        assert!(err.to_string().contains("pack-00000001"), "{err}");
        // Not readable for now (a pipe): an error, tried again by the next sync.
        let err = store.sync().unwrap_err();
        assert!(!err.to_string().contains("restart converge"), "{err}");
        // The pages are readable again, as from the page cache after a real failure.
        put_back();
        let later = store.put(b"put after the failure").unwrap();
        store.sync().unwrap();

        let pack = |h: &Hash| store.locate(h).unwrap().unwrap().pack;
        assert_eq!(pack(&kept), 1, "what was synced before stays");
        let at = store.locate(&kept).unwrap().unwrap();
        assert!(!store.trusted(at), "a failed pack is checked from then on");
        assert_eq!(pack(&staged), 2, "written again into a new pack");
        assert_eq!(pack(&later), 2);
        drop(store);
        let store = open(&db, dir.path());
        for (hash, bytes) in [
            (kept, &b"synced before the failure"[..]),
            (staged, b"staged when the sync fails"),
            (later, b"put after the failure"),
        ] {
            assert_eq!(store.get(&hash).unwrap().as_deref(), Some(bytes));
        }
        assert!(store.damaged().is_empty());
    }

    /// A chunk staged in a pack whose sync failed that reads wrong is lost (its pages
    /// dropped, the disk holding something else): reads check it, and no later sync may
    /// succeed (an event naming it would be made durable without it) until the store is
    /// opened again, which then lacks it and takes it again. Found by the sync that
    /// would write it again, or first by a read.
    #[test]
    fn a_chunk_lost_with_a_failed_sync_stops_every_later_sync() {
        for read_first in [false, true] {
            let (dir, db, store) = scratch();
            let kept = store.put(b"synced before the failure").unwrap();
            store.sync().unwrap();
            let lost = store.put(b"lost with the failed sync").unwrap();

            let put_back = fail_syncs_of(dir.path(), 1);
            assert!(store.sync().is_err());
            put_back();
            let at = store.locate(&lost).unwrap().unwrap();
            let pack = OpenOptions::new()
                .write(true)
                .open(pack_path(dir.path(), 1))
                .unwrap();
            pack.write_all_at(&vec![0; at.len as usize], at.offset)
                .unwrap();
            let read = |store: &ChunkStore| {
                assert!(
                    matches!(store.get(&lost), Err(LogError::Corrupt { .. })),
                    "read unchecked"
                );
            };
            if read_first {
                read(&store);
            }
            let err = store.sync().unwrap_err();
            assert!(err.to_string().contains("restart converge"), "{err}");
            if !read_first {
                read(&store);
            }
            store.put(b"put after the loss").unwrap();
            let err = store.sync().unwrap_err();
            assert!(err.to_string().contains("restart converge"), "{err}");
            drop(store);

            let store = open(&db, dir.path());
            assert!(store.contains(&kept).unwrap());
            assert!(!store.contains(&lost).unwrap());
            let lost_again = store.put(b"lost with the failed sync").unwrap();
            assert_eq!(lost_again, lost);
            store.sync().unwrap();
            assert!(store.contains(&lost).unwrap());
        }
    }
}
