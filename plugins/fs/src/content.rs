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
use std::sync::mpsc::Receiver;

use converge_api::content::TreeBuilder;
use converge_api::{ContentRef, EntryKind, Hash, Meta, Op};
use converge_framework::content::ChunkStore;
use converge_framework::LogError;
use fastcdc::v2020::FastCDC;

use crate::error::FsError;

/// Smallest data chunk FastCDC cuts (except a file's last one).
pub const MIN_CHUNK: u32 = 4 * 1024;
/// Average data chunk size.
pub const AVG_CHUNK: u32 = 16 * 1024;
/// Largest data chunk.
pub const MAX_CHUNK: u32 = 64 * 1024;

/// Chunks the file at `path`, puts every data chunk and index node into `chunks`, and
/// returns the content reference (root, size, depth).
pub fn store_file(path: &Path, chunks: &ChunkStore) -> Result<ContentRef, FsError> {
    chunk_file(path, Some(chunks))
}

/// The content reference of the file at `path`, without storing anything (to check a file
/// on disk against a reference).
pub fn hash_file(path: &Path) -> Result<ContentRef, FsError> {
    chunk_file(path, None)
}

/// Files at least this large are chunked (and written out by the store) on one thread
/// while another stores (reads) the chunks.
pub(crate) const PIPELINE_BYTES: u64 = 4 << 20;

/// Bytes read at once (they fit a core's cache): the chunker cuts a whole window in
/// place, so each byte is copied once from the kernel, hashed where it lies and copied
/// once more, into the pack. (`fastcdc`'s `StreamCDC` copies every chunk out of a 64 KiB
/// buffer, shifts the rest down and zeroes the space: several passes over every byte.)
const WINDOW: usize = 512 << 10;

/// A window of a file and the data chunks cut from it: (hash, range in `bytes`).
struct Window {
    bytes: Vec<u8>,
    chunks: Vec<(Hash, Range<usize>)>,
}

/// What the chunker hands on, in file order: windows of data chunks and index nodes.
enum Piece {
    Data(Window),
    Node(Hash, Vec<u8>),
}

fn put_piece(store: &ChunkStore, piece: &Piece) -> Result<(), LogError> {
    match piece {
        Piece::Data(w) => {
            let chunks: Vec<(Hash, &[u8])> = w
                .chunks
                .iter()
                .map(|(hash, range)| (*hash, &w.bytes[range.clone()]))
                .collect();
            store.put_many_prehashed(&chunks)
        }
        Piece::Node(hash, node) => store.put_prehashed(hash, node),
    }
}

fn chunk_file(path: &Path, store: Option<&ChunkStore>) -> Result<ContentRef, FsError> {
    let file = File::open(path).map_err(FsError::io("opening", path))?;
    let size = file.metadata().map(|m| m.len()).ok();
    let large = size.is_some_and(|n| n >= PIPELINE_BYTES);
    match store {
        None => cut(path, file, size, None, &mut |_| Ok(())),
        Some(store) if !large => cut(path, file, size, None, &mut |piece| {
            put_piece(store, &piece)
        }),
        // Reading, cutting and hashing take about as long as writing the chunks into the
        // pack: do both at once. Windows written go back to the chunker for reuse.
        Some(store) => std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(4);
            let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
            let writer = scope.spawn(move || {
                rx.into_iter().try_for_each(|piece| {
                    put_piece(store, &piece)?;
                    if let Piece::Data(w) = piece {
                        let _ = back_tx.try_send(w.bytes);
                    }
                    Ok::<(), LogError>(())
                })
            });
            let content = cut(path, file, size, Some(&back_rx), &mut |piece| {
                tx.send(piece).map_err(|_| LogError::Closed)
            });
            drop(tx);
            match writer.join() {
                Ok(Ok(())) => content,
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(FsError::Content {
                    path: path.to_owned(),
                    reason: "the thread storing its chunks panicked".into(),
                }),
            }
        }),
    }
}

/// Reads `file` a window at a time, cuts each with FastCDC where `StreamCDC` would (a cut
/// is taken only while a whole largest chunk lies ahead in the window, or at the end of
/// the file), hashes the chunks in place, hands on windows and index nodes through `put`
/// and returns the content reference. `size` (the file's length when opened) sizes the
/// first window, so a small file is read into a buffer of its own size.
fn cut(
    path: &Path,
    mut file: File,
    size: Option<u64>,
    recycled: Option<&Receiver<Vec<u8>>>,
    put: &mut dyn FnMut(Piece) -> Result<(), LogError>,
) -> Result<ContentRef, FsError> {
    let mut tree = TreeBuilder::new();
    let mut nodes: Vec<(Hash, Vec<u8>)> = Vec::new();
    let mut count = 0u64;
    // One byte more than the file, so a file that did not grow ends within the first fill.
    let first = size.map_or(WINDOW, |n| {
        usize::try_from(n).map_or(WINDOW, |n| n.saturating_add(1).min(WINDOW))
    });
    let mut buf = vec![0u8; first];
    let mut len = 0;
    let mut eof = false;
    loop {
        while len < buf.len() && !eof {
            match file.read(&mut buf[len..]) {
                Ok(0) => eof = true,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FsError::io("reading", path)(e)),
            }
        }
        let mut chunks = Vec::new();
        let mut done = 0;
        for c in FastCDC::new(&buf[..len], MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
            if !eof && c.offset + MAX_CHUNK as usize > len {
                break; // more of the file may move this cut: take it up in the next window
            }
            let range = c.offset..c.offset + c.length;
            chunks.push((Hash::of(&buf[range.clone()]), range));
            done = c.offset + c.length;
        }
        for (hash, range) in &chunks {
            tree.push(*hash, range.len() as u64, &mut |h, node| {
                nodes.push((h, node))
            });
        }
        count += chunks.len() as u64;
        let window = if eof {
            std::mem::take(&mut buf)
        } else {
            // The uncut rest starts the next window.
            let next = recycled
                .and_then(|r| r.try_recv().ok())
                .filter(|b| b.len() == WINDOW)
                .unwrap_or_else(|| vec![0u8; WINDOW]);
            let window = std::mem::replace(&mut buf, next);
            buf[..len - done].copy_from_slice(&window[done..len]);
            len -= done;
            window
        };
        if !chunks.is_empty() {
            put(Piece::Data(Window {
                bytes: window,
                chunks,
            }))?;
        }
        for (hash, node) in nodes.drain(..) {
            put(Piece::Node(hash, node))?;
        }
        if eof {
            break;
        }
    }
    if count == 0 {
        // An empty file is one empty chunk, its own root.
        let hash = Hash::of(&[]);
        put(Piece::Data(Window {
            bytes: Vec::new(),
            chunks: vec![(hash, 0..0)],
        }))?;
        tree.push(hash, 0, &mut |h, node| nodes.push((h, node)));
    }
    let root = tree.finish(&mut |h, node| nodes.push((h, node)));
    for (hash, node) in nodes {
        put(Piece::Node(hash, node))?;
    }
    root.ok_or_else(|| FsError::Content {
        path: path.to_owned(),
        reason: "no chunk was cut".into(),
    })
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
        cut(path, file, size_hint, None, &mut |piece| {
            if let Piece::Data(w) = piece {
                for (hash, range) in w.chunks {
                    assert_eq!(hash, Hash::of(&w.bytes[range]));
                    hashes.push(hash);
                }
            }
            Ok(())
        })
        .unwrap();
        hashes
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
}
