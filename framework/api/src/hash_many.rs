//! BLAKE3 over many inputs at once: [`Hash::of_each`].
//!
//! The `blake3` crate's SIMD kernels hash several 1 KiB chunks side by side, but only
//! chunks of one input: an input of 16 KiB fills the 16 lanes of its AVX-512 kernel, while
//! one of 15 KiB runs on its 8-, 4- and 1-lane kernels, and every input's last, partial
//! chunk runs alone. Over the chunks FastCDC cuts (8–64 KiB, no size favoured) that made
//! hashing 2.6 times as slow as over chunks of exactly 16 KiB (`cargo bench -p
//! converge-plugin-fs --bench chunking`), and small files' single chunks slower still.
//!
//! Here the lanes are shared between inputs instead. BLAKE3 compresses the `k`th 1 KiB
//! chunk of any input with the counter `k`, so the `k`th chunks of many inputs go through
//! one call of the kernel with one counter; the parent nodes of all inputs then go through
//! it level by level (a parent's block is its two children's chaining values), and the
//! roots last, with the root flag. The tree is BLAKE3's: at each level nodes pair from the
//! left and an odd last one waits for the next level, which is the shape its left-full
//! subtrees give. An input's partial last chunk, and an input of one chunk, are hashed on
//! their own through the crate's public API.
//!
//! The kernel is `blake3::platform::Platform::hash_many`, which the crate marks
//! undocumented and unstable (its public API offers no way to hash several inputs
//! together: BLAKE3 issues 386 and 478). The workspace holds `blake3` to 1.8.x for that
//! reason, and the tests compare every result with `blake3::hash`.

use blake3::hazmat::{ChainingValue, HasherExt};
use blake3::platform::Platform;
use blake3::IncrementCounter;

use crate::event::Hash;

/// BLAKE3's chunk length: the unit its kernels compress side by side.
const CHUNK: usize = 1024;
/// BLAKE3's initialization vector (the key of unkeyed hashing), from its specification.
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
/// Domain flags of BLAKE3's compression function.
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;
const ROOT: u8 = 8;
/// Chaining value length.
const CV: usize = 32;

/// Fewer inputs than this are hashed one by one. Over FastCDC's chunks (a scratch program,
/// 256 MiB in batches of n, against 86–99 ms one by one): n = 16 took 113 ms, 32 took 84,
/// 64 took 69, and a frame's worth (about 200) 52; the parents and partial chunks each
/// input adds cost more than its lanes save until the batch is large.
const BATCH_MIN: usize = 32;

impl Hash {
    /// The hash of each of `inputs`, as [`Hash::of`] gives it. From 32 inputs on
    /// they are hashed together, sharing the SIMD lanes that one input of an uneven length
    /// leaves idle: for the chunks of a frame.
    pub fn of_each(inputs: &[&[u8]]) -> Vec<Hash> {
        if inputs.len() < BATCH_MIN {
            return inputs.iter().map(|input| Hash::of(input)).collect();
        }
        together(inputs)
    }
}

/// [`Hash::of_each`] for any number of inputs, hashed together.
fn together(inputs: &[&[u8]]) -> Vec<Hash> {
    let platform = Platform::detect();
    // Each input's nodes at the current level of its tree: first its chunks' chaining
    // values. An input of one chunk is its own root, hashed on its own below.
    let mut levels: Vec<Vec<ChainingValue>> = inputs
        .iter()
        .map(|input| match input.len() {
            0..=CHUNK => Vec::new(),
            n => vec![[0; CV]; n.div_ceil(CHUNK)],
        })
        .collect();
    let mut out = Vec::new();

    // Whole chunks, the `k`th of every input in one call.
    let mut lanes: Vec<&[u8; CHUNK]> = Vec::with_capacity(inputs.len());
    let mut owners: Vec<usize> = Vec::with_capacity(inputs.len());
    let whole = inputs
        .iter()
        .filter(|i| i.len() > CHUNK)
        .map(|i| i.len() / CHUNK);
    for k in 0..whole.max().unwrap_or(0) {
        lanes.clear();
        owners.clear();
        for (n, input) in inputs.iter().enumerate() {
            if input.len() <= CHUNK {
                continue;
            }
            let piece = input.get(k * CHUNK..(k + 1) * CHUNK);
            if let Some(chunk) = piece.and_then(|p| <&[u8; CHUNK]>::try_from(p).ok()) {
                lanes.push(chunk);
                owners.push(n);
            }
        }
        compress(
            platform,
            &lanes,
            k as u64,
            CHUNK_START,
            CHUNK_END,
            0,
            &mut out,
        );
        for (&cv, &n) in out.iter().zip(&owners) {
            if let Some(node) = levels[n].get_mut(k) {
                *node = cv;
            }
        }
    }
    // Partial last chunks, each on its own.
    for (input, level) in inputs.iter().zip(levels.iter_mut()) {
        let k = input.len() / CHUNK;
        if input.len() > CHUNK && input.len() % CHUNK != 0 {
            let mut hasher = blake3::Hasher::new();
            hasher.set_input_offset((k * CHUNK) as u64);
            hasher.update(&input[k * CHUNK..]);
            level[k] = hasher.finalize_non_root();
        }
    }

    // Parents, a level at a time across all inputs, until each has two nodes left.
    let mut blocks: Vec<[u8; 2 * CV]> = Vec::new();
    loop {
        blocks.clear();
        for level in levels.iter().filter(|l| l.len() > 2) {
            blocks.extend(level.chunks_exact(2).map(|pair| join(&pair[0], &pair[1])));
        }
        if blocks.is_empty() {
            break;
        }
        let refs: Vec<&[u8; 2 * CV]> = blocks.iter().collect();
        compress(platform, &refs, 0, 0, 0, PARENT, &mut out);
        let mut cvs = out.iter();
        for level in levels.iter_mut().filter(|l| l.len() > 2) {
            let odd = (level.len() % 2 == 1).then(|| level[level.len() - 1]);
            let pairs = level.len() / 2;
            level.clear();
            level.extend(cvs.by_ref().take(pairs));
            level.extend(odd);
        }
    }

    // The roots: of the two nodes left, with the root flag (its output's first 32
    // bytes are the hash).
    blocks.clear();
    blocks.extend(
        levels
            .iter()
            .filter(|l| l.len() == 2)
            .map(|l| join(&l[0], &l[1])),
    );
    let refs: Vec<&[u8; 2 * CV]> = blocks.iter().collect();
    compress(platform, &refs, 0, 0, 0, PARENT | ROOT, &mut out);
    let mut roots = out.iter();
    inputs
        .iter()
        .zip(&levels)
        .map(|(input, level)| match level.len() {
            // Every input with two nodes left has its root, in order.
            2 => roots
                .next()
                .map_or_else(|| Hash::of(input), |&root| Hash(root)),
            _ => Hash::of(input),
        })
        .collect()
}

/// A parent node's block: its two children's chaining values.
fn join(left: &ChainingValue, right: &ChainingValue) -> [u8; 2 * CV] {
    let mut block = [0; 2 * CV];
    block[..CV].copy_from_slice(left);
    block[CV..].copy_from_slice(right);
    block
}

/// Compresses each of `inputs` (whole blocks) with the same `counter` and `flags`, the
/// first block also with `start` and the last with `end`, into `out`: a chaining value
/// each, in order.
fn compress<const N: usize>(
    platform: Platform,
    inputs: &[&[u8; N]],
    counter: u64,
    start: u8,
    end: u8,
    flags: u8,
    out: &mut Vec<ChainingValue>,
) {
    out.clear();
    out.resize(inputs.len(), [0; CV]);
    if inputs.is_empty() {
        return;
    }
    platform.hash_many(
        inputs,
        &IV,
        counter,
        IncrementCounter::No,
        flags,
        start,
        end,
        out.as_flattened_mut(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `len` bytes that differ with `seed`: BLAKE3's extendable output of the seed.
    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    #[test]
    fn every_length_around_the_chunk_and_tree_edges_hashes_as_blake3_does() {
        let lengths: Vec<usize> = (0..=4)
            .flat_map(|k| [k * CHUNK, (k * CHUNK).saturating_sub(1), k * CHUNK + 1])
            .chain([
                63,
                64,
                65,
                15 * CHUNK,
                16 * CHUNK,
                17 * CHUNK + 5,
                31 * CHUNK,
                32 * CHUNK + 1,
                33 * CHUNK,
                64 << 10,
                (64 << 10) + 7,
                100_000,
            ])
            .collect();
        let inputs: Vec<Vec<u8>> = lengths.iter().zip(1..).map(|(&n, s)| bytes(n, s)).collect();
        let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        for each in [together(&refs), Hash::of_each(&refs)] {
            for (input, hash) in inputs.iter().zip(&each) {
                assert_eq!(*hash, Hash::of(input), "an input of {} bytes", input.len());
            }
        }
        assert!(together(&[]).is_empty());
        assert_eq!(Hash::of_each(&refs[..3]), together(&refs[..3]));
    }

    proptest! {
        #[test]
        fn any_batch_hashes_as_blake3_does_one_by_one(
            lengths in prop::collection::vec(0usize..70_000, 0..48),
            seed in any::<u64>(),
        ) {
            let inputs: Vec<Vec<u8>> =
                lengths.iter().zip(0..).map(|(&n, i)| bytes(n, seed ^ i)).collect();
            let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            let each = together(&refs);
            prop_assert_eq!(each.len(), inputs.len());
            for (input, hash) in inputs.iter().zip(&each) {
                prop_assert_eq!(*hash, Hash::of(input));
            }
        }
    }
}
