//! File content as a tree of chunks: FastCDC data chunks, BLAKE3 hashes, index nodes.
//!
//! Files are streamed (never read whole into memory) through FastCDC with the sizes below;
//! each data chunk is hashed and, when a store is given, put into it; the chunk hashes
//! feed [`TreeBuilder`], whose index nodes are stored the same way. The content store
//! deduplicates by hash, so unchanged chunks and nodes cost nothing. An empty file is one
//! empty chunk. These functions block: call them from blocking threads.

use std::fs::{File, Metadata};
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use converge_api::content::TreeBuilder;
use converge_api::{ContentRef, EntryKind, Hash, Meta, Op, Place};
use converge_framework::content::{new_stream, Adopted, ChunkStore, SharedBuffer};
use converge_framework::LogError;
use fastcdc::v2020::FastCDC;

use crate::error::FsError;

/// Smallest data chunk FastCDC cuts (except a file's last one). FastCDC skips this many
/// bytes of each chunk before it looks for a cut, so it sets how much of a file the gear
/// hash reads: at half the average rather than a quarter, cutting 256 MiB of random data
/// took 64 ms instead of 78 (a scratch program on the development machine; FastCDC was a
/// third of the sender's CPU in W2 of `bench/daemon/run.py`), and the chunks came out
/// 21.7 KiB on average instead of 19.9.
pub const MIN_CHUNK: u32 = 8 * 1024;
/// Average data chunk size.
pub const AVG_CHUNK: u32 = 16 * 1024;
/// Largest data chunk.
pub const MAX_CHUNK: u32 = 64 * 1024;

/// Chunks the file at `path`, puts every data chunk and index node into `chunks`, and
/// returns the content reference (root, size, depth). Only a regular file is read: a
/// symlink at `path` is an `ELOOP` error, anything else not a regular file one that
/// [`is_not_regular`] recognizes.
pub fn store_file(path: &Path, chunks: &ChunkStore) -> Result<ContentRef, FsError> {
    chunk_file(path, Some(chunks))
}

/// [`store_file`] for a file a scan looked at (`looked_at`, its `lstat`), also returning
/// the metadata of the file read, taken from its open handle once read: the scan compares
/// it with what it looked at (same size, mtime and mode) to tell that the content it
/// stored is the one it looked at. (The handle's stat costs no path look-up, unlike a
/// second `lstat`.)
///
/// `None` when what opens at `path` is no longer the file looked at (it was replaced, by a
/// symlink too, or a directory above it was) or has changed since (size, mtime, mode):
/// nothing is read from it. The watcher reports such a change (the next scan, without a
/// watcher), and the file is looked at again.
///
/// With `gathered`, a small file's chunks are added to it rather than stored: the caller
/// stores them (see [`Gathered`]) before anything names them.
pub(crate) fn store_file_read(
    path: &Path,
    looked_at: &Metadata,
    chunks: &ChunkStore,
    gathered: Option<&mut Gathered>,
    stop: &AtomicBool,
) -> Result<Option<(ContentRef, Metadata)>, FsError> {
    let (file, opened) = match open_file(path) {
        Ok(opened) => opened,
        Err(e) if replaced(&e) => return Ok(None),
        Err(e) => return Err(FsError::io("opening", path)(e)),
    };
    if (opened.dev(), opened.ino()) != (looked_at.dev(), looked_at.ino()) {
        // Some file systems give an open file another identity than its path (overlayfs
        // before Linux 4.19): then the path says whether it is still the one looked at.
        // (A symlink made since can have the number the file looked at had.)
        let now = std::fs::symlink_metadata(path).map_err(FsError::io("reading", path))?;
        if !now.is_file() || (now.dev(), now.ino()) != (looked_at.dev(), looked_at.ino()) {
            return Ok(None);
        }
    }
    // Being written since: read once that is done (and no file that only took the inode
    // number of one removed).
    if file_stat(&opened) != file_stat(looked_at) {
        return Ok(None);
    }
    store_open_file(path, &file, &opened, chunks, gathered, stop).map(Some)
}

/// [`store_file_read`] for `file`, open at `path` by [`open_file`] with the stat
/// `opened` from its handle, which is what the caller looked at.
pub(crate) fn store_open_file(
    path: &Path,
    file: &File,
    opened: &Metadata,
    chunks: &ChunkStore,
    gathered: Option<&mut Gathered>,
    stop: &AtomicBool,
) -> Result<(ContentRef, Metadata), FsError> {
    let sink = match gathered {
        Some(gathered) if opened.len() <= GATHER_FILE_MAX => Sink::Gather(gathered, chunks),
        _ => Sink::Store(chunks),
    };
    let content = chunk_open_file(path, file, opened.len(), sink, Some(stop))?;
    let read = file.metadata().map_err(FsError::io("reading", path))?;
    Ok((content, read))
}

/// Files at most this large are gathered (see [`Gathered`]); larger ones are stored as
/// they are read, and so is what a file gathered grew by while it was read.
const GATHER_FILE_MAX: u64 = 64 << 10;

/// Bytes gathered before they are stored.
const GATHER_BYTES: usize = 256 << 10;

/// Files' chunks gathered before they are stored (it bounds how long a change waits).
pub(crate) const GATHER_FILES: usize = 64;

/// What a gathering buffer is made for: full once past `GATHER_BYTES`, it then holds at
/// most one more file's data chunks and the few nodes of a file of that size.
const GATHER_CAPACITY: usize = GATHER_BYTES + GATHER_FILE_MAX as usize + (4 << 10);

/// Chunks of small files that a scan thread has read but not stored yet. Storing them
/// together is one write to the pack for many files: written one file at a time, the
/// sender's pack writes took 11% of its time in W1 of `bench/daemon/run.py`, three times
/// what the receiver paid for the same bytes written in batches (`ab.py --workload W1
/// --reps 9`, gathered: 0.80 → 0.71 s, A's CPU 0.56 → 0.48 s). The scan lets out no
/// change that names them before [`store`](Self::store) has succeeded.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    /// The chunks' bytes, one after the other: handed on to peers as ranges of it,
    /// without a copy of each.
    buffer: Vec<u8>,
    chunks: Vec<(Hash, Range<usize>)>,
    files: usize,
    /// Bytes gathered of the file being read.
    file_bytes: u64,
}

impl Gathered {
    /// Whether nothing waits to be stored.
    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Files gathered so far (whose findings must wait for [`store`](Self::store)).
    pub(crate) fn files(&self) -> usize {
        self.files
    }

    /// Starts gathering a file's chunks.
    fn begin_file(&mut self) {
        if self.files == 0 {
            // Room for all it takes at once: grown by doubling, a buffer just past
            // `GATHER_BYTES` held twice that while its chunks waited to be pushed to
            // peers, whose memory budget sees its length, not its capacity.
            self.buffer.reserve_exact(GATHER_CAPACITY);
        }
        self.files += 1;
        self.file_bytes = 0;
    }

    /// Whether enough waits to be stored now.
    pub(crate) fn is_full(&self) -> bool {
        self.buffer.len() >= GATHER_BYTES || self.files >= GATHER_FILES
    }

    /// Stores everything gathered into `store`, in one call; on failure nothing is kept
    /// (the files are read again by a later scan).
    pub(crate) fn store(&mut self, store: &ChunkStore) -> Result<(), LogError> {
        let gathered = std::mem::take(self);
        let buffer: SharedBuffer = Arc::new(gathered.buffer);
        store.put_shared_prehashed_at(&buffer, &gathered.chunks, &[])
    }

    fn add(&mut self, piece: &Piece) {
        let mut add = |hash: &Hash, bytes: &[u8]| {
            let start = self.buffer.len();
            self.buffer.extend_from_slice(bytes);
            self.file_bytes += bytes.len() as u64;
            self.chunks.push((*hash, start..self.buffer.len()));
        };
        match piece {
            Piece::Data(window) => {
                let bytes: &[u8] = &window.bytes.bytes;
                for (hash, range) in &window.chunks {
                    if let Some(chunk) = bytes.get(range.clone()) {
                        add(hash, chunk);
                    }
                }
            }
            Piece::Node(hash, node) => add(hash, node),
        }
    }
}

/// Where the chunker's pieces go.
enum Sink<'a> {
    /// Nowhere: the content is only hashed.
    Drop,
    /// Into the store as they come.
    Store(&'a ChunkStore),
    /// Gathered, for the caller to store (a small file's); into the store once the file
    /// has grown past [`GATHER_FILE_MAX`] while read.
    Gather(&'a mut Gathered, &'a ChunkStore),
}

/// Whether opening a file failed because what is at its path is no longer a regular file
/// (see [`open_file`]).
fn replaced(e: &std::io::Error) -> bool {
    is_not_regular(e) || e.raw_os_error() == Some(libc::ELOOP)
}

/// The error of reading a file ([`store_file`], [`hash_file`]) that finds a FIFO, a device
/// or a socket at its path: only regular files are read.
#[derive(Debug, thiserror::Error)]
#[error("not a regular file")]
pub struct NotRegular;

/// Whether `e` is [`NotRegular`]: what is at the path is not a regular file.
pub fn is_not_regular(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NotRegular>())
}

/// The content reference of the file at `path`, without storing anything (to check a file
/// on disk against a reference). Only a regular file is read, as by [`store_file`].
pub fn hash_file(path: &Path) -> Result<ContentRef, FsError> {
    chunk_file(path, None)
}

/// Files at least this large are chunked on two threads, one cutting while the other
/// hashes and stores (and written out by the store on one thread while another reads the
/// chunks).
pub(crate) const PIPELINE_BYTES: u64 = 4 << 20;

/// Bytes read at once (they fit a core's cache): the chunker cuts a whole window in
/// place, so each byte is copied once from the kernel, hashed where it lies and copied
/// once more, into the pack. (`fastcdc`'s `StreamCDC` copies every chunk out of a 64 KiB
/// buffer, shifts the rest down and zeroes the space: several passes over every byte.)
const WINDOW: usize = 512 << 10;

/// Windows cut but not yet hashed, between the two threads of a large file.
const WINDOWS_IN_FLIGHT: usize = 4;

/// Windows whose chunks are hashed together on the second thread of a large file (2 MiB,
/// about 100 chunks: [`Hash::of_each`] hashed 256 MiB of FastCDC's chunks in 86–99 ms one
/// by one, 69 ms 64 at a time and 52 ms 200 at a time).
const WINDOWS_HASHED: usize = 4;

/// Windows kept for reuse, between the threads of a large file: those the hasher is done
/// with and those whose chunks were pushed to peers from them. (A window written into
/// for the first time costs a page fault per page.)
const WINDOWS_KEPT: usize = 16;

/// A window of a file and the data chunks cut from it: (hash, range in `bytes`); `bytes`
/// starts at byte `start` of the file.
struct Window {
    bytes: Arc<Pooled>,
    start: u64,
    chunks: Vec<(Hash, Range<usize>)>,
}

/// A window's buffer, shared with the fresh chunks pushed from it (see
/// `ChunkStore::put_shared_prehashed_at`), and given back for reuse when the last of them
/// is done with it.
struct Pooled {
    bytes: Vec<u8>,
    back: Option<SyncSender<Vec<u8>>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(back) = &self.back {
            if !self.bytes.is_empty() {
                let _ = back.try_send(std::mem::take(&mut self.bytes));
            }
        }
    }
}

/// What the chunker hands on, in file order: windows of data chunks and index nodes.
enum Piece {
    Data(Window),
    Node(Hash, Vec<u8>),
}

/// Puts a piece into `store`; data chunks with their places in `stream` when there is
/// one (a large file's, see [`Place`]), and recorded where they lie in the file when the
/// store `adopted` it.
fn put_piece(
    store: &ChunkStore,
    stream: Option<u64>,
    adopted: Option<&Adopted>,
    piece: &Piece,
) -> Result<(), LogError> {
    match piece {
        Piece::Data(w) => {
            let places: Vec<Option<Place>> = match stream {
                Some(stream) => w
                    .chunks
                    .iter()
                    .map(|(_, range)| {
                        Some(Place {
                            stream,
                            offset: w.start + range.start as u64,
                        })
                    })
                    .collect(),
                None => Vec::new(),
            };
            let buffer: SharedBuffer = w.bytes.clone();
            match adopted {
                Some(adopted) => store.put_adopted_at(adopted, &buffer, &w.chunks, &places),
                None => store.put_shared_prehashed_at(&buffer, &w.chunks, &places),
            }
        }
        Piece::Node(hash, node) => store.put_prehashed(hash, node),
    }
}

/// Chunks the file at `path` (see [`store_file`]); returns its content reference.
fn chunk_file(path: &Path, store: Option<&ChunkStore>) -> Result<ContentRef, FsError> {
    let (file, opened) = open_file(path).map_err(FsError::io("opening", path))?;
    let sink = match store {
        Some(store) => Sink::Store(store),
        None => Sink::Drop,
    };
    chunk_open_file(path, &file, opened.len(), sink, None)
}

/// Chunks `file`, open at `path` and `size` bytes long when opened (it may change while it
/// is read: the chunks are of what was read). A large file's read ends early, as
/// [`FsError::Stopped`], once `stop` is set.
fn chunk_open_file(
    path: &Path,
    file: &File,
    size: u64,
    mut sink: Sink<'_>,
    stop: Option<&AtomicBool>,
) -> Result<ContentRef, FsError> {
    let stopped = || stop.is_some_and(|s| s.load(Ordering::Relaxed));
    // A large file's data is one stream, which a peer can write straight into a file.
    let stream = (size >= PIPELINE_BYTES).then(new_stream);
    if let Sink::Gather(gathered, _) = &mut sink {
        gathered.begin_file();
    }
    // Its data chunks are not copied into a pack: the store takes the file itself.
    let adopted = match (&sink, stream) {
        (Sink::Store(store), Some(_)) => store.adopt(file),
        _ => None,
    };
    let put = &mut |piece: &Piece| match &mut sink {
        Sink::Store(store) => put_piece(store, stream, adopted.as_ref(), piece),
        Sink::Gather(gathered, _) if gathered.file_bytes <= GATHER_FILE_MAX => {
            gathered.add(piece);
            Ok(())
        }
        Sink::Gather(_, store) => put_piece(store, stream, None, piece),
        Sink::Drop => Ok(()),
    };
    let mut hasher = Hasher::default();
    if size < PIPELINE_BYTES {
        cut(path, file, Some(size), None, &mut |bytes, cuts| {
            hasher.window(bytes, cuts, put).map(drop)
        })?;
        return hasher.finish(path, put);
    }
    // Cutting takes about as long as hashing and storing: the one on this thread, the
    // other on a second. Windows hashed go back to the cutter for reuse.
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(WINDOWS_IN_FLIGHT);
        let (back_tx, back_rx) = std::sync::mpsc::sync_channel(WINDOWS_KEPT);
        hasher.pool = Some(back_tx.clone());
        let second = scope.spawn(move || {
            // Windows are hashed a few at a time (the cutter is a few windows ahead
            // anyway), so that their chunks share the hash's SIMD lanes.
            let mut batch = Vec::with_capacity(WINDOWS_HASHED);
            let mut windows = rx.iter().peekable();
            while let Some(window) = windows.next() {
                batch.push(window);
                if batch.len() < WINDOWS_HASHED && windows.peek().is_some() {
                    continue;
                }
                for window in hasher.windows(std::mem::take(&mut batch), put)? {
                    if !window.is_empty() {
                        let _ = back_tx.try_send(window);
                    }
                }
            }
            hasher.finish(path, put)
        });
        let cutting = cut(
            path,
            file,
            Some(size),
            Some(&back_rx),
            &mut |bytes, cuts| {
                if stopped() {
                    return Err(LogError::Closed);
                }
                tx.send((bytes, cuts)).map_err(|_| LogError::Closed)
            },
        );
        drop(tx);
        let hashed = second.join().map_err(|_| FsError::Content {
            path: path.to_owned(),
            reason: "the thread hashing its chunks panicked".into(),
        })?;
        match cutting {
            Err(FsError::Log(LogError::Closed)) if stopped() => Err(FsError::Stopped {
                path: path.to_owned(),
            }),
            // The second thread stopped first: its error is the one to report.
            Err(FsError::Log(LogError::Closed)) => hashed.and(Err(LogError::Closed.into())),
            Err(e) => Err(e),
            Ok(()) => hashed,
        }
    })
}

/// Opens the regular file at `path` for reading, refusing anything else: a symlink (even
/// one swapped in since the caller looked: `O_NOFOLLOW`, `ELOOP`), and a FIFO, a device
/// or a socket ([`NotRegular`]). It returns the file with its metadata, read from the
/// open handle.
///
/// The open does not wait (`O_NONBLOCK`), so that a FIFO swapped in for a file cannot hang
/// a scan thread waiting for a writer; the flag is cleared once the file is known to be
/// regular, as it would make reads of a FUSE file, or of one under a mandatory lock, fail
/// with `EAGAIN`. A file under a lease someone holds (Samba, an NFS server) refuses such
/// an open at once: it is opened again the usual way, which waits for the lease to go.
/// `O_NOCTTY` keeps a terminal swapped in from becoming the daemon's.
///
/// It does not update the file's access time where the kernel allows that (the file's
/// owner may; anyone else is refused, and opens it as usual): reading a file to sync it is
/// not an access its owner made, and the update cost a write of the inode per file (2.5%
/// of the sender's time in W1 of `bench/daemon/run.py`).
pub(crate) fn open_file(path: &Path) -> std::io::Result<(File, Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let read = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | flags)
            .open(path)
    };
    let open = |flags| match read(flags | libc::O_NONBLOCK) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => read(flags),
        other => other,
    };
    // The status flags the file was opened with, less `O_NONBLOCK`: set back as they are
    // (without reading them first, a system call per file).
    #[cfg(target_os = "linux")]
    let (file, keep) = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => (open(0)?, 0),
        other => (other?, libc::O_NOATIME),
    };
    #[cfg(not(target_os = "linux"))]
    let (file, keep) = (open(0)?, 0);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            NotRegular,
        ));
    }
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: `fd` is open for the duration of the call, which takes plain integers.
        // `F_SETFL` sets only the status flags (append, async, direct, noatime,
        // nonblock): of those the file was opened with `keep` and `O_NONBLOCK`.
        let cleared = unsafe { libc::fcntl(fd, libc::F_SETFL, keep) == 0 };
        if !cleared {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((file, meta))
}

/// The second half of the chunker: hashes the chunks cut from each window, in file
/// order, feeds them to the tree and hands windows and index nodes on.
#[derive(Default)]
struct Hasher {
    tree: TreeBuilder,
    nodes: Vec<(Hash, Vec<u8>)>,
    count: u64,
    /// Bytes of the file hashed so far: where the next window starts.
    offset: u64,
    /// Where windows shared with pushed chunks go back when those are sent.
    pool: Option<SyncSender<Vec<u8>>>,
}

impl Hasher {
    /// Hashes the chunks at `cuts` of `bytes` and hands them on through `put` (with the
    /// index nodes they complete); returns the window's buffer, for reuse.
    fn window(
        &mut self,
        bytes: Vec<u8>,
        cuts: Vec<Range<usize>>,
        put: &mut dyn FnMut(&Piece) -> Result<(), LogError>,
    ) -> Result<Vec<u8>, LogError> {
        let mut done = self.windows(vec![(bytes, cuts)], put)?;
        Ok(done.pop().unwrap_or_default())
    }

    /// [`window`](Self::window) for several windows at once, in file order: their chunks
    /// are hashed together ([`Hash::of_each`] shares its SIMD lanes among them, which
    /// one window's 30 or so chunks are too few for). Returns the windows' buffers.
    fn windows(
        &mut self,
        windows: Vec<(Vec<u8>, Vec<Range<usize>>)>,
        put: &mut dyn FnMut(&Piece) -> Result<(), LogError>,
    ) -> Result<Vec<Vec<u8>>, LogError> {
        let slices: Vec<&[u8]> = windows
            .iter()
            .flat_map(|(bytes, cuts)| cuts.iter().map(|range| &bytes[range.clone()]))
            .collect();
        let mut hashes = Hash::of_each(&slices).into_iter();
        drop(slices);
        let mut done = Vec::with_capacity(windows.len());
        for (bytes, cuts) in windows {
            let chunks = hashes.by_ref().zip(cuts).collect();
            done.push(self.hashed(bytes, chunks, put)?);
        }
        Ok(done)
    }

    /// Feeds a window's chunks, hashed, to the tree and hands them on through `put` (with
    /// the index nodes they complete); returns the window's buffer, for reuse.
    fn hashed(
        &mut self,
        bytes: Vec<u8>,
        chunks: Vec<(Hash, Range<usize>)>,
        put: &mut dyn FnMut(&Piece) -> Result<(), LogError>,
    ) -> Result<Vec<u8>, LogError> {
        for (hash, range) in &chunks {
            let nodes = &mut self.nodes;
            self.tree.push(*hash, range.len() as u64, &mut |h, node| {
                nodes.push((h, node))
            });
        }
        self.count += chunks.len() as u64;
        let start = self.offset;
        self.offset += chunks.last().map_or(0, |(_, range)| range.end as u64);
        let piece = Piece::Data(Window {
            bytes: Arc::new(Pooled {
                bytes,
                back: self.pool.clone(),
            }),
            start,
            chunks,
        });
        put(&piece)?;
        for (hash, node) in self.nodes.drain(..) {
            put(&Piece::Node(hash, node))?;
        }
        // Back for reuse now, unless chunks pushed from it still hold it (it goes back
        // to the pool when they are sent).
        match piece {
            Piece::Data(window) => match Arc::try_unwrap(window.bytes) {
                Ok(mut pooled) => Ok(std::mem::take(&mut pooled.bytes)),
                Err(_) => Ok(Vec::new()),
            },
            Piece::Node(..) => Ok(Vec::new()),
        }
    }

    /// Completes the tree (an empty file is one empty chunk, its own root) and returns the
    /// content reference.
    fn finish(
        mut self,
        path: &Path,
        put: &mut dyn FnMut(&Piece) -> Result<(), LogError>,
    ) -> Result<ContentRef, FsError> {
        if self.count == 0 {
            let empty: Range<usize> = 0..0;
            self.window(Vec::new(), vec![empty], put)?;
        }
        let mut nodes = Vec::new();
        let root = self.tree.finish(&mut |h, node| nodes.push((h, node)));
        for (hash, node) in nodes {
            put(&Piece::Node(hash, node))?;
        }
        root.ok_or_else(|| FsError::Content {
            path: path.to_owned(),
            reason: "no chunk was cut".into(),
        })
    }
}

/// Reads `file` a window at a time and cuts each with FastCDC where `StreamCDC` would (a
/// cut is taken only while a whole largest chunk lies ahead in the window, or at the end
/// of the file), handing each window with its cuts to `window`. `size` (the file's length
/// when opened) sizes the first window, so a small file is read into a buffer of its own
/// size; `recycled` gives back windows to read into again.
fn cut(
    path: &Path,
    mut file: &File,
    size: Option<u64>,
    recycled: Option<&Receiver<Vec<u8>>>,
    window: &mut dyn FnMut(Vec<u8>, Vec<Range<usize>>) -> Result<(), LogError>,
) -> Result<(), FsError> {
    // One byte more than the file, so a file that did not grow ends within the first fill.
    let first = size.map_or(WINDOW, |n| {
        usize::try_from(n).map_or(WINDOW, |n| n.saturating_add(1).min(WINDOW))
    });
    let mut buf = vec![0u8; first];
    let mut len = 0;
    let mut read_total = 0u64;
    let mut eof = false;
    loop {
        while len < buf.len() && !eof {
            match file.read(&mut buf[len..]) {
                Ok(0) => eof = true,
                Ok(n) => {
                    len += n;
                    read_total += n as u64;
                    // A read that stops short of the buffer at the length the file was
                    // opened with is taken as its end, without the read that would return
                    // 0 (a system call per small file). Should it not be (a file system
                    // that reads short), the file grew, and the stat taken after the read
                    // tells the caller so.
                    eof = len < buf.len() && size == Some(read_total);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FsError::io("reading", path)(e)),
            }
        }
        let mut cuts = Vec::new();
        let mut done = 0;
        for c in FastCDC::new(&buf[..len], MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
            if !eof && c.offset + MAX_CHUNK as usize > len {
                break; // more of the file may move this cut: take it up in the next window
            }
            cuts.push(c.offset..c.offset + c.length);
            done = c.offset + c.length;
        }
        let bytes = if eof {
            std::mem::take(&mut buf)
        } else {
            // The uncut rest starts the next window.
            let next = recycled
                .and_then(|r| r.try_recv().ok())
                .filter(|b| b.len() == WINDOW)
                .unwrap_or_else(|| vec![0u8; WINDOW]);
            let bytes = std::mem::replace(&mut buf, next);
            buf[..len - done].copy_from_slice(&bytes[done..len]);
            len -= done;
            bytes
        };
        if !cuts.is_empty() {
            window(bytes, cuts)?;
        }
        if eof {
            return Ok(());
        }
    }
}

/// Size, mtime in milliseconds and the executable bit: what tells a file unchanged without
/// reading it (the scan's rule, and the store's guard).
pub(crate) type FileStat = (u64, i64, bool);

/// The [`FileStat`] of a file on disk.
pub(crate) fn file_stat(meta: &Metadata) -> FileStat {
    (meta.len(), mtime_ms(meta), is_executable(meta))
}

/// The [`FileStat`] an event records for a file.
pub(crate) fn recorded_stat(content: &ContentRef, meta: &Meta) -> FileStat {
    (content.size, meta.mtime_ms, meta.executable)
}

/// The [`FileStat`] of `op` if it puts a file.
pub(crate) fn put_stat(op: &Op) -> Option<FileStat> {
    match op {
        Op::Put {
            content: Some(content),
            meta,
        } if meta.kind == EntryKind::File => Some(recorded_stat(content, meta)),
        _ => None,
    }
}

/// Modification time in milliseconds since the Unix epoch (floor), as events carry it.
pub(crate) fn mtime_ms(meta: &Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1000)
        .saturating_add(meta.mtime_nsec() / 1_000_000)
}

/// When the entry last changed, in wall-clock milliseconds: its ctime, which the kernel
/// sets on every write, rename or chmod and which, unlike the mtime, no tool can set back.
/// A change the source finds is stamped with it (see `LocalChange::made_at_ms`). `None`
/// before 1970.
pub(crate) fn changed_at_ms(meta: &Metadata) -> Option<u64> {
    let ms = meta
        .ctime()
        .checked_mul(1000)?
        .checked_add(meta.ctime_nsec() / 1_000_000)?;
    u64::try_from(ms).ok()
}

/// Whether the owner-executable bit is set.
pub(crate) fn is_executable(meta: &Metadata) -> bool {
    meta.mode() & 0o100 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastcdc::v2020::StreamCDC;

    /// Deterministic pseudo-random bytes (xorshift), so cut points are not all at the
    /// largest size as with constant data.
    fn bytes(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    fn windowed(path: &Path, size_hint: Option<u64>) -> Vec<Hash> {
        let mut hashes = Vec::new();
        let file = File::open(path).unwrap();
        let mut hasher = Hasher::default();
        let put = &mut |piece: &Piece| {
            if let Piece::Data(w) = piece {
                for (hash, range) in &w.chunks {
                    assert_eq!(*hash, Hash::of(&w.bytes.bytes[range.clone()]));
                    hashes.push(*hash);
                }
            }
            Ok(())
        };
        cut(path, &file, size_hint, None, &mut |bytes, cuts| {
            hasher.window(bytes, cuts, put).map(drop)
        })
        .unwrap();
        hasher.finish(path, put).unwrap();
        hashes
    }

    #[test]
    fn a_large_file_is_chunked_on_two_threads_as_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes(2 * PIPELINE_BYTES as usize + 12_345, 9)).unwrap();
        let mut hasher = Hasher::default();
        let put = &mut |_: &Piece| Ok(());
        let file = File::open(&path).unwrap();
        cut(&path, &file, None, None, &mut |bytes, cuts| {
            hasher.window(bytes, cuts, put).map(drop)
        })
        .unwrap();
        let on_one = hasher.finish(&path, put).unwrap();
        assert_eq!(hash_file(&path).unwrap(), on_one);
    }

    #[test]
    fn windows_cut_where_the_stream_chunker_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let sizes = [
            0,
            1,
            MIN_CHUNK as usize - 1,
            MAX_CHUNK as usize + 1,
            WINDOW - 1,
            WINDOW,
            WINDOW + 1,
            3 * WINDOW + 12_345,
        ];
        for (i, size) in sizes.into_iter().enumerate() {
            let data = bytes(size, i as u64 + 1);
            std::fs::write(&path, &data).unwrap();
            let mut streamed: Vec<Hash> =
                StreamCDC::new(&data[..], MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                    .map(|c| Hash::of(&c.unwrap().data))
                    .collect();
            if size == 0 {
                streamed.push(Hash::of(&[]));
            }
            // (An empty file is one empty chunk.)
            assert_eq!(windowed(&path, Some(size as u64)), streamed, "{size} bytes");
            // A file that grew after its size was taken is cut the same.
            if size > 0 {
                assert_eq!(windowed(&path, Some(1)), streamed, "{size} bytes, grown");
            }
            assert!(hash_file(&path).is_ok());
        }
    }

    #[test]
    fn what_replaced_a_file_looked_at_is_not_read() {
        use converge_framework::log::{EventLog, LogConfig};
        let log = EventLog::open(LogConfig::temporary()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("f");
        std::fs::write(&secret, b"not in the folder").unwrap();
        let read = |path: &Path, looked_at: &Metadata| {
            store_file_read(path, looked_at, log.chunks(), None, &AtomicBool::new(false))
                .unwrap()
                .map(|(content, _)| content)
        };

        // The file looked at reads.
        let path = dir.path().join("f");
        std::fs::write(&path, b"the folder's").unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"the folder's").unwrap();
        let looked_at = std::fs::symlink_metadata(&path).unwrap();
        let content = read(&path, &looked_at).unwrap();
        assert_eq!(content.size, 12);

        // A symlink swapped in after the look (to a file outside the folder).
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        assert_eq!(read(&path, &looked_at), None);
        let e = hash_file(&path).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");

        // Another file renamed over it (made while the first lived, so that it cannot
        // have its inode number).
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(read(&path, &looked_at), None);

        // A directory above it swapped for a symlink to one outside holding the same name.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let below = sub.join("f");
        std::fs::write(&below, b"the folder's").unwrap();
        let looked_at = std::fs::symlink_metadata(&below).unwrap();
        std::fs::rename(&sub, dir.path().join("sub-moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), &sub).unwrap();
        assert_eq!(read(&below, &looked_at), None);

        // A FIFO with no writer, which would block an open for reading: refused at once.
        let fifo = dir.path().join("fifo");
        std::fs::write(&fifo, b"").unwrap();
        let looked_at = std::fs::symlink_metadata(&fifo).unwrap();
        std::fs::remove_file(&fifo).unwrap();
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `name` is NUL-terminated and lives through the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert_eq!(read(&fifo, &looked_at), None);
        let e = hash_file(&fifo).unwrap_err();
        assert!(
            matches!(&e, FsError::Io { source, .. } if is_not_regular(source)),
            "{e}"
        );

        // Nothing from outside the folder reached the content store.
        assert!(!log
            .chunks()
            .contains(&Hash::of(b"not in the folder"))
            .unwrap());
        assert!(log.chunks().contains(&content.root).unwrap());
    }
}
