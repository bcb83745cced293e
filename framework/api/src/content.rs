//! The shape of content in the content store: data chunks under a small tree of index nodes.
//!
//! A file's bytes are cut into data chunks (by FastCDC in the fs plugin). Their hashes are
//! grouped into index nodes, cut at content-defined boundaries of the hash list (a hash
//! whose low bits are zero ends a node), so an insertion early in a file changes only the
//! nodes around it. Index nodes are grouped the same way, level by level, until one root
//! is left. A [`ContentRef`] names the root, the total size and the number of index
//! levels, so anyone holding the root can walk the tree without guessing what a chunk is.
//!
//! ```
//! use converge_api::content::{TreeBuilder, IndexNode};
//! use converge_api::Hash;
//!
//! let mut stored = Vec::new();
//! let mut tree = TreeBuilder::new();
//! for piece in [&b"hello "[..], b"world"] {
//!     tree.push(Hash::of(piece), piece.len() as u64, &mut |h, node| stored.push((h, node)));
//! }
//! let root = tree.finish(&mut |h, node| stored.push((h, node))).unwrap();
//! assert_eq!(root.size, 11);
//! assert_eq!(root.depth, 1);
//! let (_, node) = stored.last().unwrap();
//! assert_eq!(IndexNode::decode(node).unwrap().children.len(), 2);
//! ```

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::CodecError;
use crate::event::{ContentRef, Hash};

/// Largest number of children in one index node (a forced cut).
pub const MAX_FANOUT: usize = 1024;

/// A boundary is cut after a child whose hash has these low bits all zero: 64 on average.
const BOUNDARY_MASK: u32 = 63;

/// One child of an index node: a chunk or a lower node, and the data bytes below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Hash of the child chunk or node.
    pub hash: Hash,
    /// Number of content bytes the child covers.
    pub size: u64,
}

/// An index node: the ordered children one level down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexNode {
    /// Children in content order.
    pub children: Vec<NodeEntry>,
}

impl IndexNode {
    /// The node's stored bytes (hash these to get its address).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    /// Reads a node from its stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<IndexNode, CodecError> {
        codec::decode(bytes)
    }
}

fn is_boundary(hash: &Hash) -> bool {
    u32::from_le_bytes([hash.0[0], hash.0[1], hash.0[2], hash.0[3]]) & BOUNDARY_MASK == 0
}

/// Builds the index tree over a stream of data chunks, emitting each finished index
/// node through a callback (to be stored under its hash). Memory use is one open node
/// per level.
#[derive(Debug, Default)]
pub struct TreeBuilder {
    /// `levels[i]` holds the open node whose children are at depth `i` (0 = data chunks).
    levels: Vec<Vec<NodeEntry>>,
    size: u64,
    chunks: u64,
    first: Option<NodeEntry>,
}

impl TreeBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next data chunk (already stored under `hash`) of `len` bytes.
    pub fn push(&mut self, hash: Hash, len: u64, emit: &mut dyn FnMut(Hash, Vec<u8>)) {
        self.size += len;
        self.chunks += 1;
        if self.first.is_none() {
            self.first = Some(NodeEntry { hash, size: len });
        }
        self.push_at(0, NodeEntry { hash, size: len }, emit);
    }

    fn push_at(&mut self, level: usize, entry: NodeEntry, emit: &mut dyn FnMut(Hash, Vec<u8>)) {
        if self.levels.len() <= level {
            self.levels.push(Vec::new());
        }
        self.levels[level].push(entry);
        if is_boundary(&entry.hash) || self.levels[level].len() >= MAX_FANOUT {
            if let Some(node) = self.close(level, emit) {
                self.push_at(level + 1, node, emit);
            }
        }
    }

    fn close(&mut self, level: usize, emit: &mut dyn FnMut(Hash, Vec<u8>)) -> Option<NodeEntry> {
        let children = std::mem::take(&mut self.levels[level]);
        if children.is_empty() {
            return None;
        }
        let size = children.iter().map(|c| c.size).sum();
        // Encoding a list of fixed-size entries cannot fail.
        let bytes = IndexNode { children }.encode().unwrap_or_default();
        let hash = Hash::of(&bytes);
        emit(hash, bytes);
        Some(NodeEntry { hash, size })
    }

    /// Closes every open node and returns the content reference, or `None` if no chunk was
    /// pushed (an empty file is one empty chunk: push it).
    pub fn finish(mut self, emit: &mut dyn FnMut(Hash, Vec<u8>)) -> Option<ContentRef> {
        match (self.chunks, self.first) {
            (0, _) | (_, None) => return None,
            (1, Some(only)) => {
                return Some(ContentRef {
                    root: only.hash,
                    size: only.size,
                    depth: 0,
                })
            }
            _ => {}
        }
        let mut level = 0;
        while level < self.levels.len() {
            let has_parent_level = level + 1 < self.levels.len();
            if !has_parent_level && level > 0 && self.levels[level].len() == 1 {
                let root = self.levels[level][0];
                return Some(ContentRef {
                    root: root.hash,
                    size: self.size,
                    depth: level as u8,
                });
            }
            if let Some(node) = self.close(level, emit) {
                if !has_parent_level {
                    self.levels.push(Vec::new());
                }
                self.levels[level + 1].push(node);
            }
            level += 1;
        }
        None // unreachable with two or more chunks: the loop ends at a single root
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn build(chunks: &[Vec<u8>]) -> (ContentRef, HashMap<Hash, Vec<u8>>) {
        let mut store = HashMap::new();
        let mut tree = TreeBuilder::new();
        for c in chunks {
            store.insert(Hash::of(c), c.clone());
            tree.push(Hash::of(c), c.len() as u64, &mut |h, b| {
                store.insert(h, b);
            });
        }
        let root = tree
            .finish(&mut |h, b| {
                store.insert(h, b);
            })
            .unwrap();
        (root, store)
    }

    fn flatten(r: &ContentRef, store: &HashMap<Hash, Vec<u8>>) -> Vec<u8> {
        fn walk(h: Hash, depth: u8, store: &HashMap<Hash, Vec<u8>>, out: &mut Vec<u8>) {
            let bytes = &store[&h];
            if depth == 0 {
                out.extend_from_slice(bytes);
            } else {
                for c in IndexNode::decode(bytes).unwrap().children {
                    walk(c.hash, depth - 1, store, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(r.root, r.depth, store, &mut out);
        out
    }

    #[test]
    fn tree_reassembles_and_is_shift_resistant() {
        let chunks: Vec<Vec<u8>> = (0u32..5000).map(|i| i.to_le_bytes().repeat(3)).collect();
        let (root, store) = build(&chunks);
        assert!(root.depth >= 2, "depth {}", root.depth);
        assert_eq!(flatten(&root, &store), chunks.concat());
        assert_eq!(root.size, chunks.concat().len() as u64);

        // Insert one chunk near the front: most index nodes stay the same.
        let mut shifted = chunks.clone();
        shifted.insert(100, b"inserted".to_vec());
        let (root2, store2) = build(&shifted);
        assert_eq!(flatten(&root2, &store2), shifted.concat());
        let new_nodes = store2.keys().filter(|h| !store.contains_key(h)).count();
        assert!(
            new_nodes <= 1 + 2 * root2.depth as usize,
            "{new_nodes} new nodes"
        );
    }

    #[test]
    fn any_number_of_chunks_makes_a_tree_even_when_boundaries_close_levels_early() {
        // Regression: a single chunk whose hash is a boundary closed level 0 before finish.
        for n in 1..300u32 {
            let chunks: Vec<Vec<u8>> = (0..n).map(|i| format!("{n}/{i}").into_bytes()).collect();
            let (root, store) = build(&chunks);
            assert_eq!(flatten(&root, &store), chunks.concat(), "{n} chunks");
            if n == 1 {
                assert_eq!(root.depth, 0);
            }
        }
    }

    #[test]
    fn single_chunk_is_its_own_root() {
        let (root, _) = build(&[b"only".to_vec()]);
        assert_eq!(
            root,
            ContentRef {
                root: Hash::of(b"only"),
                size: 4,
                depth: 0
            }
        );
    }
}
