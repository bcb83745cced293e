//! Runs: the chunk locations of large syncs, kept on disk in sorted files instead of in
//! sled.
//!
//! A large file's chunks are many (65,536 for 1 GiB at the average size), and every
//! place that held their locations grew the daemon's memory with the file: the staged
//! map, the sync's vector, its manifests, and sled's nodes once they were indexed (sled
//! keeps what it wrote in memory until its cache is full). A sync with at least
//! [`RUN_ENTRIES`](super::RUN_ENTRIES) locations writes them instead as one *run*: a file
//! of fixed-size entries (a hash and its encoded location, 48 bytes) sorted by hash, with
//! a footer that names how many there are, which runs it replaces, and their BLAKE3 hash.
//! Memory keeps a Bloom filter of a run's hashes (10 bits an entry) and 8 bytes a block of
//! [`BLOCK_ENTRIES`] entries (the first 8 bytes of the block's first hash, its *fence*): a
//! lookup of a hash the run lacks mostly ends at the filter, one it holds is a binary
//! search among the fences and a read of the block the hash falls in (3 KiB). That is 1.4
//! bytes an entry, where keeping each hash's prefix took 8: for a terabyte of large files,
//! 88 MiB rather than 512 MiB.
//!
//! Runs are immutable. A later run's entry for a hash wins over an earlier one's; the two
//! newest runs are merged into one once the newer is at least as large as the one before
//! it (as a binary counter carries), so a store holds a few runs, each entry rewritten a
//! few times. A merge is built from the files while lookups go on, and swapped in at the
//! end ([`Runs::merge_due_runs`]). An entry found wrong (its chunk damaged) is marked
//! *removed* in a sled tree, keyed by the hash and the location, and skipped from then
//! on; a merge leaves it out, and a mark goes once no run holds its entry (after a merge,
//! once the runs it replaced are durably gone, and at open).
//!
//! Crash safety: a run is written under a temporary name, synced, renamed into place and
//! its directory synced before anything relies on it (the log's flush that follows the
//! sync, see [`ChunkStore::sync`](super::ChunkStore::sync)). A merged run names the runs
//! it replaces, so one that a crash left beside them replaces them at the next open. A
//! run whose contents do not match its footer (its BLAKE3 covers the entries, their count
//! and the runs it replaces) is set aside (renamed `*.damaged`) with a warning: its chunks
//! are then missing here, as if never stored, and fetched again when content needs them.

use std::cmp::Ordering;
use std::collections::{HashSet, TryReserveError};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use converge_api::Hash;
use sled::Tree;

use super::{io_error, Location};
use crate::error::LogError;

/// Bytes of one entry: a hash and its encoded [`Location`].
const ENTRY: usize = 32 + 16;

/// The footer's last 8 bytes.
const MAGIC: &[u8; 8] = b"cvgrun01";

/// Bytes of the footer: entries (u64), first run replaced (u64), BLAKE3 of the entries,
/// magic.
const FOOTER: usize = 8 + 8 + 32 + 8;

/// Runs kept at most: beyond, the two newest are merged whatever their sizes.
const MAX_RUNS: usize = 12;

/// Buffer size for writing and merging runs.
const IO_BUFFER: usize = 256 << 10;

/// Entries per block: memory keeps one fence a block (see [`RunIndex`]), a lookup reads one
/// block (3 KiB), rarely two. Four in tests, so that small runs have many blocks.
#[cfg(not(test))]
const BLOCK_ENTRIES: usize = 64;
#[cfg(test)]
const BLOCK_ENTRIES: usize = 4;

/// Bits of a run's Bloom filter per entry it is sized for, and bits an entry sets: about
/// 1% of the lookups of a hash the run does not hold read a block of it anyway. (Without
/// the filter, every chunk a put checks the store for, a new one, cost a read in every
/// run: W4 of `bench/daemon/run.py` took 1.2 s → 1.5 s.)
const FILTER_BITS_PER_ENTRY: usize = 10;
const FILTER_PROBES: u64 = 7;

/// What memory keeps of a run: how many entries it has, the first 8 bytes (big-endian)
/// of the hash that starts each block of [`BLOCK_ENTRIES`], in order, and a Bloom filter
/// of its hashes. The filter's probes are read off the hashes' own bytes (after the
/// first 8, which the fences use): BLAKE3 output, spread evenly already.
struct RunIndex {
    count: u64,
    fences: Vec<u64>,
    filter: Vec<u64>,
}

impl RunIndex {
    /// Room for `entries` entries (a bound: a merge's entries are fewer when it drops
    /// some, see [`RunIndex::shrink_filter`]). An error when memory cannot be had for them
    /// (a run's footer may claim any count its file's size allows, sparse or damaged).
    fn with_capacity(entries: usize) -> Result<RunIndex, TryReserveError> {
        let mut fences = Vec::new();
        fences.try_reserve_exact(entries.div_ceil(BLOCK_ENTRIES))?;
        let mut filter = Vec::new();
        filter.try_reserve_exact(filter_words(entries))?;
        filter.resize(filter_words(entries), 0);
        Ok(RunIndex {
            count: 0,
            fences,
            filter,
        })
    }

    /// Halves the filter while it stays at least the size its entries need: a merge's is
    /// sized for both runs, and the newer often replaces most of the older's entries. A
    /// bit of the larger filter, `b mod 2m`, lands on `b mod m` folded, the bit `probes`
    /// finds in the smaller one: no hash is lost.
    fn shrink_filter(&mut self) {
        let needed = filter_words(self.len());
        while self.filter.len().is_multiple_of(2) && self.filter.len() / 2 >= needed {
            let half = self.filter.len() / 2;
            let (low, high) = self.filter.split_at_mut(half);
            low.iter_mut().zip(high.iter()).for_each(|(l, h)| *l |= h);
            self.filter.truncate(half);
        }
        self.filter.shrink_to_fit();
    }

    /// Whether the run may hold `hash` (no: it does not).
    fn may_hold(&self, hash: &Hash) -> bool {
        probes(self.filter.len(), hash).all(|(word, bit)| self.filter[word] & bit != 0)
    }

    /// Notes the next entry, `hash`, in order.
    fn push(&mut self, hash: &Hash) {
        if self.count.is_multiple_of(BLOCK_ENTRIES as u64) {
            self.fences.push(hash.prefix());
        }
        for (word, bit) in probes(self.filter.len(), hash) {
            self.filter[word] |= bit;
        }
        self.count += 1;
    }

    /// The entries as a `usize`, for sizes of merges and counts.
    fn len(&self) -> usize {
        usize::try_from(self.count).unwrap_or(usize::MAX)
    }
}

/// Words of the filter for `entries` entries (at least one).
fn filter_words(entries: usize) -> usize {
    entries
        .saturating_mul(FILTER_BITS_PER_ENTRY)
        .div_ceil(64)
        .max(1)
}

/// The bits of a filter of `words` words that `hash` sets, as (word, mask): double
/// hashing over two 8-byte words of the hash.
fn probes(words: usize, hash: &Hash) -> impl Iterator<Item = (usize, u64)> {
    let word = |at: usize| {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&hash.0[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let (first, step) = (word(8), word(16) | 1);
    let bits = words as u64 * 64;
    (0..FILTER_PROBES).map(move |i| {
        let bit = first.wrapping_add(i.wrapping_mul(step)) % bits;
        ((bit / 64) as usize, 1 << (bit % 64))
    })
}

/// One run file, open for reads.
struct Run {
    id: u64,
    /// The oldest run this one replaces (its own id if none).
    covers_from: u64,
    file: File,
    index: RunIndex,
}

impl Run {
    /// The encoded location of `hash` in this run, if it holds it. The block before the
    /// first fence at or above the hash's prefix is read first (the hash may lie after
    /// that block's first entry), and the next ones while their fences do not pass the
    /// prefix (hashes sharing their first 8 bytes may span blocks).
    fn find(&self, hash: &Hash) -> std::io::Result<Option<[u8; 16]>> {
        if !self.index.may_hold(hash) {
            return Ok(None);
        }
        let key = hash.prefix();
        let RunIndex { count, fences, .. } = &self.index;
        let mut block = fences.partition_point(|f| *f < key).saturating_sub(1);
        let mut buffer = [0u8; BLOCK_ENTRIES * ENTRY];
        while let Some(&fence) = fences.get(block) {
            if fence > key {
                break;
            }
            let first = block as u64 * BLOCK_ENTRIES as u64;
            let n = (*count - first).min(BLOCK_ENTRIES as u64) as usize;
            let bytes = &mut buffer[..n * ENTRY];
            self.file.read_exact_at(bytes, first * ENTRY as u64)?;
            let (entries, _) = bytes.as_chunks::<ENTRY>();
            let i = entries.partition_point(|e| e[..32] < hash.0[..]);
            match entries.get(i) {
                Some(entry) if entry[..32] == hash.0[..] => return Ok(Some(split_entry(entry).1)),
                Some(_) => break,
                None => block += 1,
            }
        }
        Ok(None)
    }
}

/// The runs of a content store, newest last, and the entries marked removed.
pub(super) struct Runs {
    dir: PathBuf,
    runs: Vec<Run>,
    next_id: u64,
    /// Entries skipped wherever found: (hash, encoded location).
    removed: HashSet<(Hash, [u8; 16])>,
    removed_tree: Tree,
}

/// The bytes of an entry: `hash`, then the encoded location (the form of a run's entries
/// and of the removed tree's keys).
fn entry_bytes(hash: &Hash, location: &[u8; 16]) -> [u8; ENTRY] {
    let mut entry = [0; ENTRY];
    entry[..32].copy_from_slice(&hash.0);
    entry[32..].copy_from_slice(location);
    entry
}

/// The hash and the encoded location of an entry's bytes.
fn split_entry(entry: &[u8; ENTRY]) -> (Hash, [u8; 16]) {
    let mut hash = Hash([0; 32]);
    hash.0.copy_from_slice(&entry[..32]);
    let mut location = [0; 16];
    location.copy_from_slice(&entry[32..]);
    (hash, location)
}

fn run_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("run-{id:016x}"))
}

fn corrupt(path: &Path, why: impl Into<String>) -> LogError {
    LogError::Corrupt {
        what: format!("chunk run {}", path.display()),
        source: converge_api::CodecError::Malformed(why.into()),
    }
}

/// Writes entries to a new file and returns what memory keeps of them; the footer is
/// written by [`RunWriter::finish`].
///
/// Entries are gathered in a buffer of [`IO_BUFFER`] bytes, which is hashed and written
/// whole: BLAKE3 fed 48 bytes at a time compresses block by block on one lane, several
/// times slower than over a buffer, whose 1 KiB chunks it hashes side by side. Same bytes,
/// same hash.
struct RunWriter {
    path: PathBuf,
    out: File,
    buffer: Vec<u8>,
    hasher: blake3::Hasher,
    index: RunIndex,
    last: Option<Hash>,
}

impl RunWriter {
    /// A writer for a run of at most `entries` entries (its index is sized for that many).
    fn create(path: PathBuf, entries: usize) -> Result<RunWriter, LogError> {
        let index = RunIndex::with_capacity(entries).map_err(|e| {
            io_error("indexing", path.clone())(std::io::Error::new(ErrorKind::OutOfMemory, e))
        })?;
        // Read too: the run is looked up through this file once written.
        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error("creating", path.clone()))?;
        Ok(RunWriter {
            path,
            out,
            buffer: Vec::with_capacity(IO_BUFFER),
            hasher: blake3::Hasher::new(),
            index,
            last: None,
        })
    }

    fn push(&mut self, hash: &Hash, location: &[u8; 16]) -> Result<(), LogError> {
        // (A merge's input changed on disk since it was loaded would break the order
        // before its hash is checked at its end.)
        if self.last.is_some_and(|last| last.0 >= hash.0) {
            return Err(corrupt(&self.path, "entries out of order"));
        }
        if self.buffer.len() + ENTRY > IO_BUFFER {
            self.write_buffer()?;
        }
        self.buffer.extend_from_slice(&entry_bytes(hash, location));
        self.index.push(hash);
        self.last = Some(*hash);
        Ok(())
    }

    /// Hashes and writes the entries gathered so far.
    fn write_buffer(&mut self) -> Result<(), LogError> {
        self.hasher.update(&self.buffer);
        self.out
            .write_all(&self.buffer)
            .map_err(io_error("writing", self.path.clone()))?;
        self.buffer.clear();
        Ok(())
    }

    /// Writes the footer and makes the file durable; returns it with its index.
    fn finish(mut self, covers_from: u64) -> Result<(File, RunIndex), LogError> {
        self.write_buffer()?;
        let mut footer = [0; FOOTER];
        footer[..8].copy_from_slice(&self.index.count.to_le_bytes());
        footer[8..16].copy_from_slice(&covers_from.to_le_bytes());
        self.hasher.update(&footer[..16]);
        footer[16..48].copy_from_slice(self.hasher.finalize().as_bytes());
        footer[48..].copy_from_slice(MAGIC);
        self.out
            .write_all(&footer)
            .map_err(io_error("writing", self.path.clone()))?;
        self.out
            .sync_data()
            .map_err(io_error("syncing", self.path.clone()))?;
        self.index.shrink_filter();
        Ok((self.out, self.index))
    }
}

/// Reads a run's entries in order, checking them against its footer at the end. Reads
/// and hashes [`IO_BUFFER`] bytes at a time (see [`RunWriter`]).
struct RunReader {
    path: PathBuf,
    input: File,
    buffer: Vec<u8>,
    /// Where the next entry starts in `buffer`.
    at: usize,
    /// Entries not yet read into `buffer`.
    left: u64,
    hasher: blake3::Hasher,
    expected: [u8; 32],
    /// The footer's count and first run replaced, as written (hashed after the entries).
    fields: [u8; 16],
    covers_from: u64,
}

impl RunReader {
    fn open(path: PathBuf) -> Result<RunReader, LogError> {
        let file = File::open(&path).map_err(io_error("opening", path.clone()))?;
        let size = file
            .metadata()
            .map_err(io_error("looking at", path.clone()))?
            .len();
        if size < FOOTER as u64 {
            return Err(corrupt(&path, "shorter than its footer"));
        }
        let mut footer = [0; FOOTER];
        file.read_exact_at(&mut footer, size - FOOTER as u64)
            .map_err(io_error("reading", path.clone()))?;
        let u64_at = |at: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&footer[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        let (count, covers_from) = (u64_at(0), u64_at(8));
        if &footer[48..] != MAGIC {
            return Err(corrupt(&path, "no run footer"));
        }
        if count.checked_mul(ENTRY as u64) != Some(size - FOOTER as u64) {
            return Err(corrupt(&path, format!("{size} bytes for {count} entries")));
        }
        let mut expected = [0; 32];
        expected.copy_from_slice(&footer[16..48]);
        let mut fields = [0; 16];
        fields.copy_from_slice(&footer[..16]);
        Ok(RunReader {
            fields,
            input: file,
            buffer: Vec::new(),
            at: 0,
            path,
            left: count,
            hasher: blake3::Hasher::new(),
            expected,
            covers_from,
        })
    }

    /// The next entry, or `None` after the last (once checked against the footer).
    fn next(&mut self) -> Result<Option<(Hash, [u8; 16])>, LogError> {
        if self.at == self.buffer.len() {
            if self.left == 0 {
                self.hasher.update(&self.fields);
                if self.hasher.finalize().as_bytes() != &self.expected {
                    return Err(corrupt(
                        &self.path,
                        "entries do not match the footer's hash",
                    ));
                }
                return Ok(None);
            }
            // `left` entries fit in the file's size, checked at open.
            let entries = self.left.min((IO_BUFFER / ENTRY) as u64);
            self.buffer.resize(entries as usize * ENTRY, 0);
            if let Err(e) = self.input.read_exact(&mut self.buffer) {
                // Nothing of a failed read is handed out.
                self.buffer.clear();
                self.at = 0;
                return Err(io_error("reading", self.path.clone())(e));
            }
            self.hasher.update(&self.buffer);
            self.left -= entries;
            self.at = 0;
        }
        let mut entry = [0; ENTRY];
        entry.copy_from_slice(&self.buffer[self.at..self.at + ENTRY]);
        self.at += ENTRY;
        Ok(Some(split_entry(&entry)))
    }

    fn into_file(self) -> File {
        self.input
    }
}

impl Runs {
    /// The runs in `dir`, with the entries marked removed in `removed_tree`. Temporary
    /// files a crash left are deleted, runs a merged one replaces too, and a damaged run
    /// is set aside.
    pub(super) fn open(dir: &Path, removed_tree: Tree) -> Result<Runs, LogError> {
        let mut ids = Vec::new();
        let mut damaged_last: Option<u64> = None;
        for entry in std::fs::read_dir(dir).map_err(io_error("listing", dir.to_owned()))? {
            let entry = entry.map_err(io_error("listing", dir.to_owned()))?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
                continue;
            };
            if rest.ends_with(".tmp") {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_error("removing", path))?;
            } else if rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_hexdigit()) {
                if let Ok(id) = u64::from_str_radix(rest, 16) {
                    ids.push(id);
                }
            } else if let Some(id) = rest
                .strip_suffix(".damaged")
                .filter(|id| id.len() == 16)
                .and_then(|id| u64::from_str_radix(id, 16).ok())
            {
                // Never taken again: a run set aside later would rename over it.
                damaged_last = damaged_last.max(Some(id));
            }
        }
        ids.sort_unstable();
        let next_id = match ids.last().copied().max(damaged_last) {
            None => 0,
            Some(id) => id
                .checked_add(1)
                .ok_or_else(|| corrupt(&run_path(dir, id), "no run number left after it"))?,
        };
        let mut runs: Vec<Run> = Vec::new();
        // Newest first: a merged run replaces the older ones it names.
        let mut replaced_below = u64::MAX;
        let mut replaced_from = u64::MAX;
        for &id in ids.iter().rev() {
            let path = run_path(dir, id);
            if id >= replaced_from && id < replaced_below {
                std::fs::remove_file(&path).map_err(io_error("removing", path))?;
                continue;
            }
            match Self::load(&path).and_then(|run| match run.2 <= id {
                true => Ok(run),
                false => Err(corrupt(&path, "replaces runs newer than itself")),
            }) {
                Ok((file, index, covers_from)) => {
                    if covers_from < id {
                        replaced_from = covers_from;
                        replaced_below = id;
                    }
                    runs.push(Run {
                        id,
                        covers_from,
                        file,
                        index,
                    });
                }
                Err(LogError::Corrupt { what, source }) => {
                    let aside = path.with_extension("damaged");
                    tracing::warn!(
                        "{what} is corrupt ({source}); set aside as {}, its chunks are missing here now",
                        aside.display()
                    );
                    std::fs::rename(&path, &aside).map_err(io_error("renaming", path))?;
                }
                Err(e) => return Err(e),
            }
        }
        runs.reverse();
        let mut removed = HashSet::new();
        for key in removed_tree.iter().keys() {
            if let Ok(key) = <[u8; ENTRY]>::try_from(&key?[..]) {
                removed.insert(split_entry(&key));
            }
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("syncing", dir.to_owned()))?;
        let mut runs = Runs {
            dir: dir.to_owned(),
            runs,
            next_id,
            removed,
            removed_tree,
        };
        // A crash after a merge, or a run set aside, may have left marks behind. Every run
        // file that may be read again is open now, and what was removed is durable.
        runs.drop_unheld_marks(None);
        Ok(runs)
    }

    /// Reads a whole run, checking it: its file, index and the first run it replaces.
    fn load(path: &Path) -> Result<(File, RunIndex, u64), LogError> {
        let mut reader = RunReader::open(path.to_owned())?;
        let entries = usize::try_from(reader.left).unwrap_or(usize::MAX);
        let mut index = RunIndex::with_capacity(entries)
            .map_err(|e| corrupt(path, format!("{entries} entries, too many to index: {e}")))?;
        let mut last: Option<Hash> = None;
        while let Some((hash, _)) = reader.next()? {
            if last.is_some_and(|last| last.0 >= hash.0) {
                return Err(corrupt(path, "entries out of order"));
            }
            index.push(&hash);
            last = Some(hash);
        }
        let covers_from = reader.covers_from;
        Ok((reader.into_file(), index, covers_from))
    }

    /// Where the newest run holding `hash` has it, unless that entry is removed.
    pub(super) fn get(&self, hash: &Hash) -> Result<Option<Location>, LogError> {
        for run in self.runs.iter().rev() {
            let found = run
                .find(hash)
                .map_err(io_error("reading", run_path(&self.dir, run.id)))?;
            if let Some(location) = found {
                if !self.removed.contains(&(*hash, location)) {
                    return Location::decode(hash, &location).map(Some);
                }
            }
        }
        Ok(None)
    }

    /// Entries in all runs: about the chunks they hold, as an entry marked removed, or
    /// superseded by a newer run's, counts too.
    pub(super) fn len(&self) -> usize {
        self.runs.iter().map(|r| r.index.len()).sum()
    }

    /// Marks the entry `hash` at `location` removed, if a run holds it; durable with the
    /// database's next flush (lost in a crash before it, the entry is found wrong again).
    pub(super) fn remove(&mut self, hash: &Hash, location: Location) -> Result<(), LogError> {
        if self.get(hash)? != Some(location) {
            return Ok(());
        }
        let location = location.encode();
        self.removed_tree
            .insert(entry_bytes(hash, &location), sled::IVec::default())?;
        self.removed.insert((*hash, location));
        Ok(())
    }

    /// Drops the removal marks of entries no run holds any more: each would otherwise
    /// stay, in memory and in sled, for as long as the store. With `of`, only the marks of
    /// entries one of those runs held (runs a merge replaced, their files durably gone);
    /// without, every such mark (at open, where every run file on disk that may be read
    /// again is open). Dropped from sled with its next flush; a crash before leaves the
    /// mark, dropped at the next open. A mark whose runs cannot be read stays.
    fn drop_unheld_marks(&mut self, of: Option<&[Run]>) {
        if self.removed.is_empty() {
            return;
        }
        let unheld: Vec<(Hash, [u8; 16])> = self
            .removed
            .iter()
            .filter(|&&(hash, location)| {
                let held = |run: &Run| matches!(run.find(&hash), Ok(Some(at)) if at == location);
                // Read, and found elsewhere or not at all.
                let not_held =
                    |run: &Run| matches!(run.find(&hash), Ok(at) if at != Some(location));
                of.is_none_or(|gone| gone.iter().any(held)) && self.runs.iter().all(not_held)
            })
            .copied()
            .collect();
        for (hash, location) in unheld {
            match self.removed_tree.remove(entry_bytes(&hash, &location)) {
                Ok(_) => {
                    self.removed.remove(&(hash, location));
                }
                Err(e) => tracing::warn!("dropping the removal mark of chunk {hash:?}: {e}"),
            }
        }
    }

    /// Writes `entries` (sorted by hash, no hash twice) as a new run, durable when this
    /// returns `Ok`. An entry marked removed before is found again from then on. Merging
    /// is left to [`Runs::merge_due_runs`].
    pub(super) fn write(&mut self, entries: &[(Hash, Location)]) -> Result<(), LogError> {
        if entries.is_empty() {
            return Ok(());
        }
        let id = self.next_id;
        let (file, index) = self.create_run(id, entries.len(), id, |out| {
            entries
                .iter()
                .try_for_each(|(hash, location)| out.push(hash, &location.encode()))
        })?;
        self.next_id += 1;
        self.runs.push(Run {
            id,
            covers_from: id,
            file,
            index,
        });
        if !self.removed.is_empty() {
            self.unremove(entries);
        }
        Ok(())
    }

    /// Takes back the marks of `entries`, recorded anew: in memory at once, on disk with a
    /// flush of its own (a mark back after a crash would hide the new entry; the chunk would
    /// then be fetched again). A failure is only logged, with that same outcome.
    fn unremove(&mut self, entries: &[(Hash, Location)]) {
        let mut any = false;
        for (hash, location) in entries {
            let location = location.encode();
            if self.removed.remove(&(*hash, location)) {
                if let Err(e) = self.removed_tree.remove(entry_bytes(hash, &location)) {
                    tracing::warn!("taking back the removal of chunk {hash:?} from its run: {e}");
                }
                any = true;
            }
        }
        if any {
            if let Err(e) = self.removed_tree.flush() {
                tracing::warn!("flushing the removals of chunks from runs: {e}");
            }
        }
    }

    /// Writes run `id` (replacing the runs from `covers_from`), of at most `bound`
    /// entries, which `fill` pushes: under a temporary name, synced, renamed into place
    /// and its directory synced. Returns its file, open, and its index; on failure
    /// nothing is left behind.
    fn create_run<E: From<LogError>>(
        &self,
        id: u64,
        bound: usize,
        covers_from: u64,
        fill: impl FnOnce(&mut RunWriter) -> Result<(), E>,
    ) -> Result<(File, RunIndex), E> {
        let path = run_path(&self.dir, id);
        let tmp = path.with_extension("tmp");
        let created = (|| {
            let mut out = RunWriter::create(tmp.clone(), bound)?;
            fill(&mut out)?;
            let run = out.finish(covers_from)?;
            std::fs::rename(&tmp, &path).map_err(io_error("renaming", tmp.clone()))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error("syncing", self.dir.clone()))?;
            Ok(run)
        })();
        if created.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        created
    }

    /// Whether the two newest runs are to be merged: the newer is at least as large, or
    /// there are too many runs.
    fn merge_due(&self) -> bool {
        match &self.runs[..] {
            [.., older, newer] => {
                newer.index.count >= older.index.count || self.runs.len() > MAX_RUNS
            }
            _ => false,
        }
    }

    /// Merges runs while a merge is due ([`Runs::merge_due`]): each merged run is built
    /// under the read lock, so that lookups go on, and swapped in under the write lock.
    /// The caller keeps any other run from being written meanwhile (the content store's
    /// sync lock). Nothing fails: a merge that does not work is logged and the runs stay
    /// as they were, all still right, for the next sync to try again; a run that reads
    /// corrupt is set aside.
    pub(super) fn merge_due_runs(lock: &RwLock<Runs>) {
        loop {
            let built = match lock.read() {
                Ok(runs) if runs.merge_due() => runs.build_merge(),
                _ => return,
            };
            let Ok(mut runs) = lock.write() else {
                return;
            };
            match built {
                Ok(merged) => runs.install(merged),
                Err(MergeError { error, damaged }) => {
                    tracing::warn!("merging chunk runs: {error}");
                    match damaged {
                        Some(id) => runs.set_aside(id),
                        None => return,
                    }
                }
            }
        }
    }

    /// Writes the merge of the two newest runs, durable, under a new name: the newer's
    /// entry wins unless removed, removed ones go.
    fn build_merge(&self) -> Result<Merged, MergeError> {
        let n = self.runs.len();
        let (older, newer) = match &self.runs[..] {
            [.., older, newer] => (older, newer),
            _ => return Err(corrupt(&self.dir, "fewer than two runs to merge").into()),
        };
        // An input's own errors name it: a corrupt one is set aside.
        fn input(run: &Run) -> impl Fn(LogError) -> MergeError {
            let id = run.id;
            move |error| MergeError {
                damaged: matches!(error, LogError::Corrupt { .. }).then_some(id),
                error,
            }
        }
        let id = self.next_id;
        let bound = older.index.len().saturating_add(newer.index.len());
        let (file, index) = self.create_run(
            id,
            bound,
            older.covers_from,
            |out| -> Result<(), MergeError> {
                let mut a = RunReader::open(run_path(&self.dir, older.id)).map_err(input(older))?;
                let mut b = RunReader::open(run_path(&self.dir, newer.id)).map_err(input(newer))?;
                let (mut x, mut y) = (
                    a.next().map_err(input(older))?,
                    b.next().map_err(input(newer))?,
                );
                loop {
                    // What a lookup finds: the newer run's entry unless it is removed, then
                    // the older's unless it is removed.
                    let order = match (&x, &y) {
                        (None, None) => break,
                        (Some(_), None) => Ordering::Less,
                        (None, Some(_)) => Ordering::Greater,
                        (Some((ha, _)), Some((hb, _))) => ha.cmp(hb),
                    };
                    let kept = match order {
                        Ordering::Less => {
                            std::mem::replace(&mut x, a.next().map_err(input(older))?)
                        }
                        Ordering::Greater => {
                            std::mem::replace(&mut y, b.next().map_err(input(newer))?)
                        }
                        Ordering::Equal => {
                            let o = std::mem::replace(&mut x, a.next().map_err(input(older))?);
                            let n = std::mem::replace(&mut y, b.next().map_err(input(newer))?);
                            match n {
                                Some(entry) if !self.removed.contains(&entry) => Some(entry),
                                _ => o,
                            }
                        }
                    };
                    let Some((hash, location)) = kept else {
                        break;
                    };
                    if !self.removed.contains(&(hash, location)) {
                        out.push(&hash, &location)?;
                    }
                }
                Ok(())
            },
        )?;
        Ok(Merged {
            run: Run {
                id,
                covers_from: older.covers_from,
                file,
                index,
            },
            replaced: [older.id, newer.id],
            at: n - 2,
        })
    }

    /// Puts a merged run in place of the two it replaces, and removes their files.
    fn install(&mut self, merged: Merged) {
        let Merged { run, replaced, at } = merged;
        let still = self.runs.len() == at + 2
            && self.runs[at].id == replaced[0]
            && self.runs[at + 1].id == replaced[1];
        if !still {
            // Not reached while the caller keeps runs from being written meanwhile; the
            // merged run, unused, would replace them at the next open.
            tracing::warn!("chunk runs changed during a merge; the merge is dropped");
            let path = run_path(&self.dir, run.id);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing unused merged chunk run {}: {e}", path.display());
            }
            self.next_id = self.next_id.max(run.id.saturating_add(1));
            return;
        }
        self.next_id = run.id.saturating_add(1);
        let gone: Vec<Run> = self.runs.drain(at..).collect();
        self.runs.push(run);
        let mut deleted = true;
        for old in &gone {
            let path = run_path(&self.dir, old.id);
            // Left behind, it is removed at the next open (the merged run names it).
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing merged chunk run {}: {e}", path.display());
                deleted = false;
            }
        }
        // The merged run, durable, left out the entries marked removed; their marks go
        // once the runs that held them are gone for good. A run file left behind, or back
        // after a power loss, would be read again should the merged run be set aside.
        if self.removed.is_empty() || !deleted {
            return;
        }
        match File::open(&self.dir).and_then(|d| d.sync_all()) {
            Ok(()) => self.drop_unheld_marks(Some(&gone)),
            Err(e) => tracing::warn!("syncing {}: {e}", self.dir.display()),
        }
    }

    /// Stops using run `id`, which read corrupt, and renames its file `*.damaged`.
    fn set_aside(&mut self, id: u64) {
        self.runs.retain(|run| run.id != id);
        let path = run_path(&self.dir, id);
        let aside = path.with_extension("damaged");
        match std::fs::rename(&path, &aside) {
            Ok(()) => tracing::warn!(
                "chunk run {} set aside as {}; its chunks are missing here now",
                path.display(),
                aside.display()
            ),
            Err(e) => tracing::warn!("setting aside chunk run {}: {e}", path.display()),
        }
    }
}

/// Why a merge failed, and which input, if one read corrupt (to be set aside).
struct MergeError {
    error: LogError,
    damaged: Option<u64>,
}

impl From<LogError> for MergeError {
    fn from(error: LogError) -> Self {
        MergeError {
            error,
            damaged: None,
        }
    }
}

/// A merged run, durable, not yet in place of the two it replaces.
struct Merged {
    run: Run,
    /// The ids of the runs it replaces, older first.
    replaced: [u64; 2],
    /// Where the older of them was in the list.
    at: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn at(pack: u32, offset: u64) -> Location {
        Location {
            pack,
            offset,
            len: 7,
        }
    }

    fn hash(n: u32) -> Hash {
        Hash::of(&n.to_le_bytes())
    }

    fn sorted(entries: impl IntoIterator<Item = (Hash, Location)>) -> Vec<(Hash, Location)> {
        let map: HashMap<Hash, Location> = entries.into_iter().collect();
        let mut v: Vec<_> = map.into_iter().collect();
        v.sort_by_key(|(h, _)| h.0);
        v
    }

    fn open(dir: &Path, db: &sled::Db) -> RwLock<Runs> {
        RwLock::new(Runs::open(dir, db.open_tree("removed").unwrap()).unwrap())
    }

    /// A scratch dir with its runs open, and the database of their removal marks.
    fn scratch() -> (tempfile::TempDir, sled::Db, RwLock<Runs>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let runs = open(dir.path(), &db);
        (dir, db, runs)
    }

    /// Writes a run and merges what is due, as the content store's sync does.
    fn put(runs: &RwLock<Runs>, entries: &[(Hash, Location)]) {
        runs.write().unwrap().write(entries).unwrap();
        Runs::merge_due_runs(runs);
    }

    fn get(runs: &RwLock<Runs>, n: u32) -> Option<Location> {
        runs.read().unwrap().get(&hash(n)).unwrap()
    }

    fn count(runs: &RwLock<Runs>) -> usize {
        runs.read().unwrap().runs.len()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn entries_are_found_after_a_reopen_the_newest_winning_and_removed_ones_skipped() {
        let (dir, db, runs) = scratch();
        put(&runs, &sorted((0..100).map(|n| (hash(n), at(1, n as u64)))));
        // Smaller: not merged.
        put(&runs, &sorted((0..10).map(|n| (hash(n), at(2, n as u64)))));
        assert_eq!(count(&runs), 2);
        runs.write().unwrap().remove(&hash(50), at(1, 50)).unwrap();
        // Not what a run holds: nothing marked.
        runs.write().unwrap().remove(&hash(51), at(9, 9)).unwrap();
        let check = |runs: &RwLock<Runs>| {
            assert_eq!(get(runs, 3), Some(at(2, 3)));
            assert_eq!(get(runs, 30), Some(at(1, 30)));
            assert_eq!(get(runs, 50), None);
            assert_eq!(get(runs, 51), Some(at(1, 51)));
            assert_eq!(get(runs, 1000), None);
        };
        check(&runs);
        drop(runs);
        let runs = open(dir.path(), &db);
        check(&runs);
        // Written again at the same place: found again.
        put(&runs, &[(hash(50), at(1, 50))]);
        assert_eq!(get(&runs, 50), Some(at(1, 50)));
        assert!(db.open_tree("removed").unwrap().is_empty());
    }

    #[test]
    fn a_removal_mark_goes_once_no_run_holds_its_entry() {
        let (dir, db, runs) = scratch();
        let marks = || -> Vec<(Hash, [u8; 16])> {
            let tree = db.open_tree("removed").unwrap();
            tree.iter()
                .keys()
                .map(|k| split_entry(&<[u8; ENTRY]>::try_from(&k.unwrap()[..]).unwrap()))
                .collect()
        };
        let run = |from: u32, to: u32, pack: u32| {
            sorted((from..to).map(|n| (hash(n), at(pack, u64::from(n)))))
        };
        let mark = |runs: &RwLock<Runs>, n: u32, pack: u32| {
            let location = at(pack, u64::from(n));
            runs.write().unwrap().remove(&hash(n), location).unwrap();
        };
        put(&runs, &run(0, 100, 1));
        put(&runs, &run(100, 110, 2));
        assert_eq!(count(&runs), 2);
        mark(&runs, 5, 1);
        mark(&runs, 105, 2);
        mark(&runs, 7, 1);
        assert_eq!(marks().len(), 3);
        // 10 + 10: the two newest merge, leaving out 105; 5 and 7 stay in the first run.
        put(&runs, &run(110, 120, 3));
        assert_eq!(count(&runs), 2);
        let left = marks();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.contains(&(hash(5), at(1, 5).encode())));
        assert!(left.contains(&(hash(7), at(1, 7).encode())));
        assert_eq!(runs.read().unwrap().removed.len(), 2);
        for n in [5, 7, 105] {
            assert_eq!(get(&runs, n), None, "{n}");
        }
        assert_eq!(get(&runs, 104), Some(at(2, 104)));
        // Marks the first run still holds outlive an open.
        drop(runs);
        let runs = open(dir.path(), &db);
        assert_eq!(marks().len(), 2);
        assert_eq!(runs.read().unwrap().removed.len(), 2);
        assert_eq!(get(&runs, 5), None);
        // A newer run takes 7 elsewhere: the merge of everything keeps that one, and
        // neither old entry survives it, nor their marks.
        put(&runs, &[(hash(7), at(4, 7))]);
        put(&runs, &run(200, 300, 5));
        assert_eq!(count(&runs), 1);
        assert_eq!(get(&runs, 7), Some(at(4, 7)));
        assert_eq!(get(&runs, 5), None);
        assert!(marks().is_empty());
        assert!(runs.read().unwrap().removed.is_empty());
        // A mark no run holds, left by a crash: dropped at the next open.
        drop(runs);
        let stray = entry_bytes(&hash(1000), &at(9, 9).encode());
        db.open_tree("removed")
            .unwrap()
            .insert(stray, sled::IVec::default())
            .unwrap();
        let runs = open(dir.path(), &db);
        assert!(marks().is_empty());
        assert!(runs.read().unwrap().removed.is_empty());
    }

    #[test]
    fn runs_merge_like_a_binary_counter_and_a_crash_mid_merge_leaves_no_stale_run() {
        let (dir, db, runs) = scratch();
        for round in 0..4u32 {
            put(
                &runs,
                &sorted((round * 10..round * 10 + 10).map(|n| (hash(n), at(round, n as u64)))),
            );
        }
        // 10 + 10 → 20; + 10 → (20, 10); + 10 → 20 + 20 → 40.
        assert_eq!(count(&runs), 1);
        assert_eq!(runs.read().unwrap().len(), 40);
        assert_eq!(files(dir.path()).len(), 1);
        for n in 0..40 {
            assert_eq!(get(&runs, n), Some(at(n / 10, n as u64)));
        }
        // A crash after the merged run was made durable, before the runs it replaces
        // were removed: the next open removes them.
        let merged = runs.read().unwrap().runs[0].id;
        drop(runs);
        let stale = run_path(dir.path(), merged - 1);
        std::fs::write(&stale, b"whatever the old run held").unwrap();
        std::fs::write(dir.path().join("run-00000000000000ff.tmp"), b"half").unwrap();
        let runs = open(dir.path(), &db);
        assert_eq!(files(dir.path()), vec![format!("run-{merged:016x}")]);
        assert_eq!(runs.read().unwrap().len(), 40);
    }

    #[test]
    fn a_damaged_run_is_set_aside_at_the_open_or_when_a_merge_reads_it() {
        let (dir, db, runs) = scratch();
        put(&runs, &sorted((0..10).map(|n| (hash(n), at(1, n as u64)))));
        let id = runs.read().unwrap().runs[0].id;
        let path = run_path(dir.path(), id);
        // Found when a merge reads it: set aside, the merge's input gone with it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        put(&runs, &sorted((20..30).map(|n| (hash(n), at(2, n as u64)))));
        assert_eq!(get(&runs, 1), None);
        assert_eq!(get(&runs, 21), Some(at(2, 21)));
        assert_eq!(count(&runs), 1);
        let damaged = format!("run-{id:016x}.damaged");
        assert!(files(dir.path()).contains(&damaged));
        drop(runs);
        std::fs::remove_file(dir.path().join(&damaged)).unwrap();

        // Found at the open, in the footer's own fields (the runs it replaces).
        let runs = open(dir.path(), &db);
        let id = runs.read().unwrap().runs[0].id;
        drop(runs);
        let path = run_path(dir.path(), id);
        let mut bytes = std::fs::read(&path).unwrap();
        let field = bytes.len() - FOOTER + 8;
        bytes[field] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let runs = open(dir.path(), &db);
        assert_eq!(count(&runs), 0);
        assert_eq!(get(&runs, 21), None);
        assert_eq!(files(dir.path()), vec![format!("run-{id:016x}.damaged")]);
        // Its number is not taken again: the next run set aside keeps both.
        put(&runs, &[(hash(5), at(4, 5))]);
        assert_eq!(runs.read().unwrap().runs[0].id, id + 1);
        assert_eq!(get(&runs, 5), Some(at(4, 5)));
    }

    #[test]
    fn hashes_sharing_their_first_bytes_are_found_across_blocks() {
        // Fences are the first 8 bytes of a block's first hash: hashes that share them
        // (rare, but anyone can store such chunks) may start before a fence and go on
        // over several blocks.
        let shared = |n: u8| {
            let mut bytes = [7u8; 32];
            bytes[31] = n;
            Hash(bytes)
        };
        let (_dir, _db, runs) = scratch();
        let mut entries: Vec<(Hash, Location)> = (0..3u8)
            .map(|n| (Hash([n; 32]), at(1, n as u64)))
            .chain((0..11u8).map(|n| (shared(n * 2), at(2, n as u64))))
            .chain((0..3u8).map(|n| (Hash([200 + n; 32]), at(3, n as u64))))
            .collect();
        entries.sort_by_key(|(h, _)| h.0);
        put(&runs, &entries);
        let runs = runs.read().unwrap();
        assert!(runs.runs[0].index.fences.len() > 3);
        for (hash, location) in &entries {
            assert_eq!(runs.get(hash).unwrap(), Some(*location));
        }
        for absent in [shared(1), shared(9), shared(21), shared(255), Hash([5; 32])] {
            assert_eq!(runs.get(&absent).unwrap(), None);
        }
    }

    /// An index sized for `capacity` entries holding the hashes of `0..entries`; checks
    /// that it may hold each, and that about 1% of 10,000 others pass its filter (10 bits
    /// and 7 probes an entry).
    fn check_filter(capacity: usize, entries: u32, fold: bool) -> RunIndex {
        let mut index = RunIndex::with_capacity(capacity).unwrap();
        let mut hashes: Vec<Hash> = (0..entries).map(hash).collect();
        hashes.sort_by_key(|h| h.0);
        hashes.iter().for_each(|h| index.push(h));
        if fold {
            index.shrink_filter();
        }
        assert!(hashes.iter().all(|h| index.may_hold(h)));
        let passed = (5000..15_000u32)
            .filter(|n| index.may_hold(&hash(*n)))
            .count();
        assert!(
            passed < 300,
            "{passed} of 10,000 absent hashes passed the filter"
        );
        index
    }

    #[test]
    fn the_filter_answers_most_lookups_of_absent_hashes_without_a_read() {
        check_filter(4096, 4096, false);
        // Sized for more than it got (a merge whose newer run replaced the older's
        // entries): folded down to what its entries need, none lost.
        assert_eq!(check_filter(8192, 1000, false).filter.len(), 1280);
        assert_eq!(check_filter(8192, 1000, true).filter.len(), 160);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(Vec<(u8, u16)>),
        Remove(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec((any::<u8>(), any::<u16>()), 1..60).prop_map(Op::Write),
            2 => any::<u8>().prop_map(Op::Remove),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn runs_answer_like_a_map(ops in prop::collection::vec(op(), 1..30)) {
            let (dir, db, mut runs) = scratch();
            let mut model: HashMap<Hash, Location> = HashMap::new();
            for op in ops {
                match op {
                    Op::Write(entries) => {
                        let entries = sorted(
                            entries.into_iter().map(|(h, o)| (hash(h as u32), at(3, o as u64))),
                        );
                        put(&runs, &entries);
                        model.extend(entries);
                    }
                    Op::Remove(h) => {
                        if let Some(location) = model.remove(&hash(h as u32)) {
                            runs.write().unwrap().remove(&hash(h as u32), location).unwrap();
                            // An older run's entry for it may show through (the store
                            // only removes what it found): take it as the model's.
                            if let Some(older) = get(&runs, h as u32) {
                                model.insert(hash(h as u32), older);
                            }
                        }
                    }
                    Op::Reopen => {
                        drop(runs);
                        runs = open(dir.path(), &db);
                    }
                }
                for n in 0..=255u32 {
                    prop_assert_eq!(get(&runs, n), model.get(&hash(n)).copied());
                }
                prop_assert!(count(&runs) <= MAX_RUNS);
            }
        }
    }
}
