//! File content as a tree of chunks: FastCDC data chunks, BLAKE3 hashes, index nodes.
//!
//! Files are streamed (never read whole into memory) through FastCDC with the sizes below;
//! each data chunk is hashed and, when a store is given, put into it; the chunk hashes
//! feed [`TreeBuilder`], whose index nodes are stored the same way. The content store
//! deduplicates by hash, so unchanged chunks and nodes cost nothing. An empty file is one
//! empty chunk. These functions block: call them from blocking threads.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use converge_api::content::TreeBuilder;
use converge_api::{ContentRef, Hash};
use converge_framework::content::ChunkStore;
use converge_framework::LogError;
use fastcdc::v2020::StreamCDC;

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

fn chunk_file(path: &Path, store: Option<&ChunkStore>) -> Result<ContentRef, FsError> {
    let file = File::open(path).map_err(FsError::io("opening", path))?;
    let large = file.metadata().is_ok_and(|m| m.len() >= PIPELINE_BYTES);
    match store {
        None => cut(path, file, &mut |_, _| Ok(())),
        Some(store) if !large => cut(path, file, &mut |hash, bytes| {
            store.put_prehashed(&hash, &bytes)
        }),
        // Reading, cutting and hashing take about as long as writing the chunks into the
        // pack: do both at once.
        Some(store) => std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(Hash, Vec<u8>)>(32);
            let writer = scope.spawn(move || {
                rx.into_iter()
                    .try_for_each(|(hash, bytes)| store.put_prehashed(&hash, &bytes))
            });
            let content = cut(path, file, &mut |hash, bytes| {
                tx.send((hash, bytes)).map_err(|_| LogError::Closed)
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

/// Streams `file` through FastCDC, hashes each chunk, hands chunks and index nodes to
/// `put`, and returns the content reference.
fn cut(
    path: &Path,
    file: File,
    put: &mut dyn FnMut(Hash, Vec<u8>) -> Result<(), LogError>,
) -> Result<ContentRef, FsError> {
    let mut tree = TreeBuilder::new();
    let mut nodes: Vec<(Hash, Vec<u8>)> = Vec::new();
    let mut count = 0u64;
    for chunk in StreamCDC::new(file, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let chunk = chunk.map_err(|e| FsError::Io {
            op: "reading",
            path: path.to_owned(),
            source: e.into(),
        })?;
        let hash = Hash::of(&chunk.data);
        put(hash, chunk.data)?;
        tree.push(hash, chunk.length as u64, &mut |h, node| {
            nodes.push((h, node))
        });
        for (hash, node) in nodes.drain(..) {
            put(hash, node)?;
        }
        count += 1;
    }
    if count == 0 {
        // An empty file is one empty chunk, its own root.
        let hash = Hash::of(&[]);
        put(hash, Vec::new())?;
        tree.push(hash, 0, &mut |h, node| nodes.push((h, node)));
    }
    let root = tree.finish(&mut |h, node| nodes.push((h, node)));
    for (hash, node) in nodes {
        put(hash, node)?;
    }
    root.ok_or_else(|| FsError::Content {
        path: path.to_owned(),
        reason: "no chunk was cut".into(),
    })
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
