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
//! Memory keeps 8 bytes an entry (the first 8 bytes of each hash, in order): a lookup is a
//! binary search there and, when the prefix is there, one read of 48 bytes.
//!
//! Runs are immutable. A later run's entry for a hash wins over an earlier one's; the two
//! newest runs are merged into one once the newer is at least as large as the one before
//! it (as a binary counter carries), so a store holds a few runs, each entry rewritten a
//! few times. A merge is built from the files while lookups go on, and swapped in at the
//! end ([`Runs::merge_due_runs`]). An entry found wrong (its chunk damaged) is marked
//! *removed* in a sled tree, keyed by the hash and the location, and skipped from then
//! on; a merge leaves it out.
//!
//! Crash safety: a run is written under a temporary name, synced, renamed into place and
//! its directory synced before anything relies on it (the log's flush that follows the
//! sync, see [`ChunkStore::sync`](super::ChunkStore::sync)). A merged run names the runs
//! it replaces, so one that a crash left beside them replaces them at the next open. A
//! run whose contents do not match its footer (its BLAKE3 covers the entries, their count
//! and the runs it replaces) is set aside (renamed `*.damaged`) with a warning: its chunks
//! are then missing here, as if never stored, and fetched again when content needs them.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
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

/// One run file, open for reads.
struct Run {
    id: u64,
    /// The oldest run this one replaces (its own id if none).
    covers_from: u64,
    file: File,
    /// The first 8 bytes of each entry's hash, big-endian, in the file's order.
    prefixes: Vec<u64>,
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

fn prefix(hash: &Hash) -> u64 {
    let mut first = [0; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_be_bytes(first)
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
struct RunWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    prefixes: Vec<u64>,
    last: Option<Hash>,
}

impl RunWriter {
    /// A writer for a run of `entries` entries (a bound: room is made for that many).
    fn create(path: PathBuf, entries: usize) -> Result<RunWriter, LogError> {
        // Read too: the run is looked up through this file once written.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error("creating", path.clone()))?;
        Ok(RunWriter {
            path,
            out: BufWriter::with_capacity(IO_BUFFER, file),
            hasher: blake3::Hasher::new(),
            prefixes: Vec::with_capacity(entries),
            last: None,
        })
    }

    fn push(&mut self, hash: &Hash, location: &[u8; 16]) -> Result<(), LogError> {
        // (A merge's input changed on disk since it was loaded would break the order
        // before its hash is checked at its end.)
        if self.last.is_some_and(|last| last.0 >= hash.0) {
            return Err(corrupt(&self.path, "entries out of order"));
        }
        let entry = entry_bytes(hash, location);
        self.hasher.update(&entry);
        self.out
            .write_all(&entry)
            .map_err(io_error("writing", self.path.clone()))?;
        self.prefixes.push(prefix(hash));
        self.last = Some(*hash);
        Ok(())
    }

    /// Writes the footer and makes the file durable; returns it with its prefixes.
    fn finish(mut self, covers_from: u64) -> Result<(File, Vec<u64>), LogError> {
        let mut footer = [0; FOOTER];
        footer[..8].copy_from_slice(&(self.prefixes.len() as u64).to_le_bytes());
        footer[8..16].copy_from_slice(&covers_from.to_le_bytes());
        self.hasher.update(&footer[..16]);
        footer[16..48].copy_from_slice(self.hasher.finalize().as_bytes());
        footer[48..].copy_from_slice(MAGIC);
        self.out
            .write_all(&footer)
            .map_err(io_error("writing", self.path.clone()))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_error("writing", self.path.clone())(e.into_error()))?;
        file.sync_data()
            .map_err(io_error("syncing", self.path.clone()))?;
        Ok((file, self.prefixes))
    }
}

/// Reads a run's entries in order, checking them against its footer at the end.
struct RunReader {
    path: PathBuf,
    input: BufReader<File>,
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
            input: BufReader::with_capacity(IO_BUFFER, file),
            path,
            left: count,
            hasher: blake3::Hasher::new(),
            expected,
            covers_from,
        })
    }

    /// The next entry, or `None` after the last (once checked against the footer).
    fn next(&mut self) -> Result<Option<(Hash, [u8; 16])>, LogError> {
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
        let mut entry = [0; ENTRY];
        self.input
            .read_exact(&mut entry)
            .map_err(io_error("reading", self.path.clone()))?;
        self.hasher.update(&entry);
        self.left -= 1;
        Ok(Some(split_entry(&entry)))
    }

    fn into_file(self) -> File {
        self.input.into_inner()
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
                Ok((file, prefixes, covers_from)) => {
                    if covers_from < id {
                        replaced_from = covers_from;
                        replaced_below = id;
                    }
                    runs.push(Run {
                        id,
                        covers_from,
                        file,
                        prefixes,
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
        Ok(Runs {
            dir: dir.to_owned(),
            runs,
            next_id,
            removed,
            removed_tree,
        })
    }

    /// Reads a whole run, checking it: its file, prefixes and the first run it replaces.
    fn load(path: &Path) -> Result<(File, Vec<u64>, u64), LogError> {
        let mut reader = RunReader::open(path.to_owned())?;
        let mut prefixes = Vec::with_capacity(usize::try_from(reader.left).unwrap_or(0));
        let mut last: Option<Hash> = None;
        while let Some((hash, _)) = reader.next()? {
            if last.is_some_and(|last| last.0 >= hash.0) {
                return Err(corrupt(path, "entries out of order"));
            }
            prefixes.push(prefix(&hash));
            last = Some(hash);
        }
        let covers_from = reader.covers_from;
        Ok((reader.into_file(), prefixes, covers_from))
    }

    /// Where the newest run holding `hash` has it, unless that entry is removed.
    pub(super) fn get(&self, hash: &Hash) -> Result<Option<Location>, LogError> {
        let key = prefix(hash);
        for run in self.runs.iter().rev() {
            let mut i = run.prefixes.partition_point(|p| *p < key);
            while run.prefixes.get(i) == Some(&key) {
                let mut entry = [0; ENTRY];
                run.file
                    .read_exact_at(&mut entry, i as u64 * ENTRY as u64)
                    .map_err(io_error("reading", run_path(&self.dir, run.id)))?;
                let (found, location) = split_entry(&entry);
                if found == *hash {
                    if self.removed.contains(&(found, location)) {
                        break;
                    }
                    return Location::decode(hash, &location).map(Some);
                }
                i += 1;
            }
        }
        Ok(None)
    }

    /// Entries in all runs: about the chunks they hold, as an entry marked removed, or
    /// superseded by a newer run's, counts too.
    pub(super) fn len(&self) -> usize {
        self.runs.iter().map(|r| r.prefixes.len()).sum()
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

    /// Writes `entries` (sorted by hash, no hash twice) as a new run, durable when this
    /// returns `Ok`. An entry marked removed before is found again from then on. Merging
    /// is left to [`Runs::merge_due_runs`].
    pub(super) fn write(&mut self, entries: &[(Hash, Location)]) -> Result<(), LogError> {
        if entries.is_empty() {
            return Ok(());
        }
        let id = self.next_id;
        let (file, prefixes) = self.create_run(id, entries.len(), id, |out| {
            entries
                .iter()
                .try_for_each(|(hash, location)| out.push(hash, &location.encode()))
        })?;
        self.next_id += 1;
        self.runs.push(Run {
            id,
            covers_from: id,
            file,
            prefixes,
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
    /// and its directory synced. Returns its file, open, and its prefixes; on failure
    /// nothing is left behind.
    fn create_run<E: From<LogError>>(
        &self,
        id: u64,
        bound: usize,
        covers_from: u64,
        fill: impl FnOnce(&mut RunWriter) -> Result<(), E>,
    ) -> Result<(File, Vec<u64>), E> {
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
                newer.prefixes.len() >= older.prefixes.len() || self.runs.len() > MAX_RUNS
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
        let bound = older.prefixes.len() + newer.prefixes.len();
        let (file, prefixes) = self.create_run(
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
                        (Some((ha, _)), Some((hb, _))) => ha.0.cmp(&hb.0),
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
                prefixes,
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
        for old in gone {
            let path = run_path(&self.dir, old.id);
            // Left behind, it is removed at the next open (the merged run names it).
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing merged chunk run {}: {e}", path.display());
            }
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
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let runs = open(dir.path(), &db);
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
    fn runs_merge_like_a_binary_counter_and_a_crash_mid_merge_leaves_no_stale_run() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let runs = open(dir.path(), &db);
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
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let runs = open(dir.path(), &db);
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
            let dir = tempfile::tempdir().unwrap();
            let db = sled::Config::new().temporary(true).open().unwrap();
            let mut runs = open(dir.path(), &db);
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
