//! The content store: chunks addressed by their BLAKE3 hash, in the log's sled database.
//!
//! Chunks share the log's database, so the flush of a group commit also makes durable
//! every chunk put before the event that references it.

use converge_api::content::IndexNode;
use converge_api::{ContentRef, Hash};
use sled::Tree;

use crate::error::LogError;

/// Chunks by hash. Cheap to clone; its methods block on disk, so call them from blocking
/// threads when the work is large.
#[derive(Clone, Debug)]
pub struct ChunkStore {
    tree: Tree,
}

impl ChunkStore {
    pub(crate) fn new(tree: Tree) -> Self {
        ChunkStore { tree }
    }

    /// Stores `bytes` under their hash and returns it (a no-op for known content).
    pub fn put(&self, bytes: &[u8]) -> Result<Hash, LogError> {
        let hash = Hash::of(bytes);
        self.put_unchecked(&hash, bytes)?;
        Ok(hash)
    }

    /// Stores `bytes` offered under `hash`, after checking that they hash to it.
    pub fn put_verified(&self, hash: &Hash, bytes: &[u8]) -> Result<(), LogError> {
        let actual = Hash::of(bytes);
        if actual != *hash {
            return Err(LogError::ChunkMismatch {
                expected: hash.to_hex(),
                actual: actual.to_hex(),
            });
        }
        self.put_unchecked(hash, bytes)
    }

    fn put_unchecked(&self, hash: &Hash, bytes: &[u8]) -> Result<(), LogError> {
        if !self.tree.contains_key(hash.0)? {
            self.tree.insert(hash.0, bytes)?;
        }
        Ok(())
    }

    /// The bytes stored under `hash`.
    pub fn get(&self, hash: &Hash) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.tree.get(hash.0)?.map(|v| v.to_vec()))
    }

    /// Whether a chunk is stored under `hash`.
    pub fn contains(&self, hash: &Hash) -> Result<bool, LogError> {
        Ok(self.tree.contains_key(hash.0)?)
    }

    /// Number of chunks stored.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether no chunk is stored.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// The chunks of `content` that are missing here, as far as the tree can be walked:
    /// a missing index node hides its children until it arrives. Empty means complete.
    pub fn missing(&self, content: &ContentRef) -> Result<Vec<Hash>, LogError> {
        let mut missing = Vec::new();
        let mut level = vec![content.root];
        for depth in (0..=content.depth).rev() {
            let mut next = Vec::new();
            for hash in level {
                match self.tree.get(hash.0)? {
                    None => missing.push(hash),
                    Some(bytes) if depth > 0 => {
                        let node =
                            IndexNode::decode(&bytes).map_err(|source| LogError::Corrupt {
                                what: format!("index node {hash:?}"),
                                source,
                            })?;
                        next.extend(node.children.iter().map(|c| c.hash));
                    }
                    Some(_) => {}
                }
            }
            level = next;
        }
        Ok(missing)
    }

    /// Calls `f` with each data chunk of `content` in order (to write a file out).
    /// A chunk that is absent is reported as [`LogError::Corrupt`].
    pub fn for_each_data_chunk(
        &self,
        content: &ContentRef,
        f: &mut dyn FnMut(&[u8]) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        self.walk(content.root, content.depth, f)
    }

    fn walk(
        &self,
        hash: Hash,
        depth: u8,
        f: &mut dyn FnMut(&[u8]) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let bytes = self.tree.get(hash.0)?.ok_or_else(|| LogError::Corrupt {
            what: format!("chunk {hash:?}"),
            source: converge_api::CodecError::Malformed("missing from the content store".into()),
        })?;
        if depth == 0 {
            return f(&bytes);
        }
        let node = IndexNode::decode(&bytes).map_err(|source| LogError::Corrupt {
            what: format!("index node {hash:?}"),
            source,
        })?;
        for child in node.children {
            self.walk(child.hash, depth - 1, f)?;
        }
        Ok(())
    }
}
