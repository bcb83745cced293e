//! Content chunking: round trips and how little an edit adds to the content store.
#![allow(clippy::unwrap_used)]

mod common;

use common::random_bytes;
use converge_framework::content::ChunkStore;
use converge_plugin_fs::content::{hash_file, store_file};

fn read_back(chunks: &ChunkStore, content: &converge_api::ContentRef) -> Vec<u8> {
    let mut out = Vec::new();
    chunks
        .for_each_data_chunk(content, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
    out
}

/// Stores `bytes` as a file and returns how many chunks and nodes that added.
fn added(chunks: &ChunkStore, dir: &std::path::Path, bytes: &[u8]) -> usize {
    let path = dir.join("f");
    std::fs::write(&path, bytes).unwrap();
    let before = chunks.len();
    let content = store_file(&path, chunks).unwrap();
    assert_eq!(read_back(chunks, &content), bytes);
    assert_eq!(hash_file(&path).unwrap(), content);
    chunks.len() - before
}

#[test]
fn a_random_file_round_trips() {
    let log = common::log();
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(1, 3 << 20);
    let path = dir.path().join("big");
    std::fs::write(&path, &bytes).unwrap();
    let content = store_file(&path, log.chunks()).unwrap();
    assert_eq!(content.size, 3 << 20);
    assert!(content.depth >= 1);
    assert!(log.chunks().missing(&content).unwrap().is_empty());
    assert_eq!(read_back(log.chunks(), &content), bytes);
}

#[test]
fn an_empty_file_is_one_empty_chunk() {
    let log = common::log();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty");
    std::fs::write(&path, b"").unwrap();
    let content = store_file(&path, log.chunks()).unwrap();
    assert_eq!(
        (content.root, content.size, content.depth),
        (converge_api::Hash::of(b""), 0, 0)
    );
    assert_eq!(read_back(log.chunks(), &content), b"");
}

#[test]
fn a_one_byte_edit_adds_at_most_three_chunks_and_nodes() {
    let log = common::log();
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = random_bytes(2, 8 << 20);
    let first = added(log.chunks(), dir.path(), &bytes);
    assert!(first > 300, "{first} chunks and nodes for 8 MiB");
    assert_eq!(
        added(log.chunks(), dir.path(), &bytes),
        0,
        "unchanged content is deduplicated"
    );
    bytes[4 << 20] ^= 0xff;
    let n = added(log.chunks(), dir.path(), &bytes);
    assert!((1..=3).contains(&n), "{n} new chunks and nodes");
}

#[test]
fn an_insertion_adds_at_most_four_chunks_and_nodes() {
    let log = common::log();
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = random_bytes(3, 8 << 20);
    added(log.chunks(), dir.path(), &bytes);
    let at = bytes.len() / 3;
    bytes.splice(at..at, random_bytes(4, 100));
    let n = added(log.chunks(), dir.path(), &bytes);
    assert!((1..=4).contains(&n), "{n} new chunks and nodes");
}

#[test]
fn a_single_chunk_whose_hash_ends_an_index_node_is_its_own_root() {
    // Regression: TreeBuilder::finish panicked on one chunk whose hash is a node boundary.
    let bytes = (0u32..)
        .map(|i| format!("small file {i}").into_bytes())
        .find(|b| converge_api::Hash::of(b).0[0] & 63 == 0)
        .unwrap();
    let log = common::log();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, &bytes).unwrap();
    let content = store_file(&path, log.chunks()).unwrap();
    assert_eq!(
        (content.root, content.size, content.depth),
        (converge_api::Hash::of(&bytes), bytes.len() as u64, 0)
    );
}
