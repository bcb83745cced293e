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

fn chunk_file(path: &Path, store: Option<&ChunkStore>) -> Result<ContentRef, FsError> {
    let file = File::open(path).map_err(FsError::io("opening", path))?;
    let mut tree = TreeBuilder::new();
    let mut node_error = None;
    let mut emit = |_hash: Hash, bytes: Vec<u8>| {
        if let Some(store) = store {
            if let Err(e) = store.put(&bytes) {
                node_error.get_or_insert(e);
            }
        }
    };
    let mut count = 0u64;
    for chunk in StreamCDC::new(file, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let chunk = chunk.map_err(|e| FsError::Io {
            op: "reading",
            path: path.to_owned(),
            source: e.into(),
        })?;
        let hash = match store {
            Some(store) => store.put(&chunk.data)?,
            None => Hash::of(&chunk.data),
        };
        tree.push(hash, chunk.length as u64, &mut emit);
        count += 1;
    }
    if count == 0 {
        // An empty file is one empty chunk, its own root.
        let hash = match store {
            Some(store) => store.put(&[])?,
            None => Hash::of(&[]),
        };
        tree.push(hash, 0, &mut emit);
    }
    let root = tree.finish(&mut emit);
    if let Some(e) = node_error {
        return Err(e.into());
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
