//! What the store last did to each key, shared with the source of the same folder so the
//! store's own writes are never read back as local changes.
//!
//! Comparing a file with the key's current heads is not enough: the store may have
//! written version 1 while version 2 was being appended, and the file (version 1) would
//! then look like a local revert. The store records what it wrote (size, mtime, mode,
//! root) *before* renaming into place; the source treats a file that still matches the
//! record as the store's, whatever the heads say now.
//!
//! Records are kept five minutes; past [`RECORDS_KEPT`] records, those of files that say
//! no more than the key's heads go sooner (see [`Echo::prune`]).
//!
//! The record also carries what passes between the two the other way. The store numbers
//! each change it makes at a key's path ([`Echo::wrote`]; the latest per key kept five
//! minutes), which orders its changes against the source's looks. The source notes the
//! files it has just read and recorded, which the store then need not look at
//! ([`Echo::note_read`]), and the events it recorded from the folder, which the folder
//! shows before the store's cursor says so ([`Echo::note_emitted`]). It also holds the keys
//! a change of the ignore rules let in, which the store is to show ([`Echo::admit`], see
//! [`crate::synced`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::Metadata;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use converge_api::{ContentRef, EntryKind, EventId, Hash, Key, Meta, Op, ReplicaId};
use converge_framework::log::{EventLog, LocalChange};

use crate::content::{file_stat, hash_file, put_stat, FileStat};
use crate::synced::RulesRecord;

/// A map by key with a fast hasher, seeded per process as the standard one is (a peer
/// names the keys): the watcher looks up every file the store writes, and SipHash on
/// the paths was 1.4% of a receiver's CPU in W1 of `bench/daemon/run.py`.
type KeyMap<V> = HashMap<Key, V, foldhash::fast::RandomState>;

/// How many events of a key [`known_state`] looks through, nearest first.
const KNOWN_SEARCH: usize = 256;

/// Records older than this are dropped: by then the source has seen the write.
const TTL: Duration = Duration::from_secs(300);

/// Most reads noted for the store at once (see [`Echo::note_read`]): about 2.5 MiB.
/// Each bound of this module is one a sync of ten thousand files stays within, so that a
/// larger one needs no more memory here (issue 3: peak memory flat as the workload grows).
const READ_NOTES: usize = 16_384;

/// Records kept before the oldest records of files that only repeat their key's heads
/// go, down to half (see [`Echo::prune`]): about 3.5 MiB.
const RECORDS_KEPT: usize = 16_384;

/// Numbers of the store's changes kept by key before the oldest half go (see
/// [`Written`]): about 1.5 MiB.
const WRITTEN_KEPT: usize = 16_384;

/// Racy marks kept before the old ones go (see [`Echo::note_racy`]): about 1 MiB.
const RACY_MARKS: usize = 8192;

/// How long a racy mark is sure to be kept once [`RACY_MARKS`] are (see
/// [`Echo::note_racy`]): the watcher looks at a file again within moments of a write.
const RACY_KEPT: Duration = Duration::from_secs(10);

/// What the store left at a key's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// A file with this content and metadata.
    File {
        size: u64,
        mtime_ms: i64,
        executable: bool,
        root: Hash,
    },
    /// A directory (created, or kept alive by its contents).
    Dir,
    /// Nothing (removed, or already absent).
    Absent,
}

impl Applied {
    /// The file an event with `content` and `meta` puts.
    pub(crate) fn file(content: &ContentRef, meta: &Meta) -> Applied {
        Applied::File {
            size: content.size,
            mtime_ms: meta.mtime_ms,
            executable: meta.executable,
            root: content.root,
        }
    }

    /// The size, mtime and mode of the file written, if one was.
    pub(crate) fn file_stat(self) -> Option<FileStat> {
        match self {
            Applied::File {
                size,
                mtime_ms,
                executable,
                ..
            } => Some((size, mtime_ms, executable)),
            Applied::Dir | Applied::Absent => None,
        }
    }
}

/// One key's entry in the record: what the store left at the path, when it recorded it,
/// and for a removal, the number of the change that made it (see [`Echo::wrote`]) once
/// it is made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Record {
    applied: Applied,
    at: Instant,
    done: Option<u64>,
}

/// The shared record.
#[derive(Debug, Default)]
pub(crate) struct Echo {
    map: Mutex<KeyMap<Record>>,
    /// Keys the store could not show (a file in a directory it may not write): what is at
    /// their paths is not a local change while it is in a state the log knows.
    failed: Mutex<HashSet<Key>>,
    /// The name of the folder's store, once it has started: its cursor says which events
    /// its writes (conflict copies included) already show.
    store: Mutex<Option<String>>,
    /// Files the source just read and recorded, until the store passes over their events
    /// (see [`Echo::note_read`]), each with the number of the store's latest change
    /// before it was looked at.
    read: Mutex<KeyMap<(Applied, u64, Instant)>>,
    /// The number of the store's latest change to the folder (see [`Echo::wrote`]).
    writes: AtomicU64,
    /// The store's latest change at each key's path (see [`Written`]).
    written: Mutex<Written>,
    /// The furthest the store's cursor was seen (see [`Echo::shown_up_to`]).
    shown: AtomicU64,
    /// How many records [`Echo::prune`] lets be before it looks for records of files to
    /// drop (0: [`RECORDS_KEPT`]): half that bound more than it left the last time, so
    /// that records it may not drop are not looked through at every batch.
    evict_at: AtomicUsize,
    /// Events the folder's source recorded from the folder (see [`Echo::emitted_here`]):
    /// runs of sequence numbers by where they start, each with where it ends and the
    /// log's length once they were appended.
    emitted: Mutex<BTreeMap<(ReplicaId, u64), Emitted>>,
    /// Files last read racy (see [`Echo::note_racy`]), with when, and the count at which
    /// the old ones are next looked for.
    racy: Mutex<(KeyMap<Instant>, usize)>,
    /// Heads the store did not show at a key because a local change was in the way (see
    /// [`Echo::decline`]).
    declined: Mutex<KeyMap<Declined>>,
    /// Whether `declined` changed since the store last saved it (see
    /// [`Echo::declined_to_save`]).
    declined_changed: AtomicBool,
    /// The keys a change of the ignore rules let in (see [`Echo::admit`]).
    admitted: Mutex<Admitted>,
    /// Woken when keys are admitted, for the store (see [`Echo::admitted_changed`]).
    admitted_changed: tokio::sync::Notify,
}

/// Heads the store declined at a key (see [`Echo::decline`]), as the echo record holds
/// them and the store saves them across restarts.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Declined {
    /// The key whose file the store left in place.
    pub(crate) key: Key,
    /// The heads it did not show there: other replicas' events.
    pub(crate) heads: Vec<EventId>,
    /// This replica's latest sequence number in the log when the store first declined
    /// at the key.
    pub(crate) since: u64,
}

impl Declined {
    /// What is left of this note with the key's heads now `heads`, read from the log
    /// of `replica` at start; `None` if nothing. The note is taken once an event of this
    /// replica at the key, numbered after `since`, is among the heads: the source recorded
    /// the change (the save after that may not have come before the restart). Of the
    /// declined heads only those still heads are kept: a later event has settled the
    /// others.
    pub(crate) fn left_with(mut self, heads: &[EventId], replica: ReplicaId) -> Option<Declined> {
        if heads
            .iter()
            .any(|h| h.origin == replica && h.seq > self.since)
        {
            return None;
        }
        self.heads.retain(|id| heads.contains(id));
        (!self.heads.is_empty()).then_some(self)
    }
}

/// The keys a change of the ignore rules let in, which the store is to show (see
/// [`crate::synced`]), and the rules to record once it has.
#[derive(Debug, Default)]
struct Admitted {
    /// The rules the folder was last in sync with, once known: read from the state dir at
    /// the source's first start, or recorded since.
    synced: Option<RulesRecord>,
    /// The keys admitted that no synced batch of the store has shown yet.
    keys: HashSet<Key>,
    /// The rules to record as those the folder is in sync with once `keys` are shown.
    record: Option<RulesToRecord>,
}

/// Ignore rules to record as those the folder is in sync with, and where (`None`: no state
/// dir, kept in memory only).
pub(crate) type RulesToRecord = (Option<PathBuf>, RulesRecord);

/// A run of events the folder's source recorded (see [`Echo::note_emitted`]), from the
/// sequence number it is filed under.
#[derive(Debug)]
struct Emitted {
    /// The sequence number after the run's last.
    seqs_end: u64,
    /// The log's length once they were appended: every one is before it.
    end: u64,
}

/// The number of the store's latest change at each key's path, for keys changed in the
/// last [`TTL`] (the latest [`WRITTEN_KEPT`] of them at most), and the highest number
/// dropped since (see [`Echo::take_read`]). A number dropped counts as a change at every
/// path, so dropping one early only makes the store look at a file it could have skipped.
#[derive(Debug, Default)]
struct Written {
    by_key: KeyMap<(u64, Instant)>,
    dropped: u64,
}

impl Echo {
    fn lock(&self) -> MutexGuard<'_, KeyMap<Record>> {
        locked(&self.map)
    }

    /// Records what the store is about to leave at `key`'s path (a removal is numbered
    /// once made, by [`Echo::wrote`]).
    pub(crate) fn record(&self, key: &Key, applied: Applied) {
        self.replace(key, applied);
    }

    /// Records that nothing is at `key`'s path, as the store found it: an absence no
    /// change of the store's is pending for, numbered as of now (see [`Echo::note_read`]).
    pub(crate) fn record_gone(&self, key: &Key) {
        let done = Some(self.writes());
        let record = Record {
            applied: Applied::Absent,
            at: Instant::now(),
            done,
        };
        self.lock().insert(key.clone(), record);
    }

    /// [`Echo::record`], returning what was recorded before (for [`Echo::put_back`]).
    pub(crate) fn replace(&self, key: &Key, applied: Applied) -> Option<Record> {
        let record = Record {
            applied,
            at: Instant::now(),
            done: None,
        };
        self.lock().insert(key.clone(), record)
    }

    /// Puts back what [`Echo::replace`] returned: the write it recorded did not happen.
    /// A removal made before something came back at the path is not put back: not when
    /// the write found something there (`found`), nor when the source has seen the file
    /// since (its note is newer; see [`Echo::note_read`]).
    pub(crate) fn put_back(&self, key: &Key, before: Option<Record>, found: bool) {
        let notes = locked(&self.read);
        let mut map = self.lock();
        let seen = if found {
            Some(u64::MAX)
        } else {
            notes.get(key).map(|(_, seen, _)| *seen)
        };
        match before {
            Some(record) if !outdated_by(&record, seen) => {
                map.insert(key.clone(), record);
            }
            _ => {
                map.remove(key);
            }
        }
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Applied> {
        self.lock().get(key).map(|r| r.applied)
    }

    /// Drops records older than [`TTL`]; past [`RECORDS_KEPT`] records, also the oldest
    /// records of files that say no more than the key's heads in `log` do (the file is
    /// what a head puts), down to half that count, however young. Such a record only
    /// spares the source a look at the heads: a file that matches it matches a head, by
    /// stat and by content. Should a newer head come before the store shows it, the
    /// file is in a state the log knows while the folder does not show the key's heads,
    /// which the watcher and the scan leave for the store to replace, record or no record
    /// (`watch::plan`, `scan::file_found`). A record of anything else stays its time: an
    /// older version the store wrote than the key's newest (its batch planned before the
    /// newest came), which the source must not take for a revert; a directory the store
    /// made for a file in it, which may have no event of its own; a removal, whose record
    /// orders the store's changes against the source's looks (see [`Echo::note_read`]).
    /// So a large sync keeps a bounded number of records, not five minutes of them.
    /// Blocks (reads the heads of the records it may drop).
    pub(crate) fn prune(&self, log: &EventLog) {
        self.prune_past(log, RECORDS_KEPT);
    }

    /// [`Echo::prune`] with `kept` for [`RECORDS_KEPT`].
    fn prune_past(&self, log: &EventLog, kept: usize) {
        // One reading of the clock for every record (the store prunes once per batch,
        // over as many records as it wrote lately).
        let now = Instant::now();
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < TTL;
        self.lock().retain(|_, r| fresh(&r.at));
        self.drop_repeated_files(log, kept);
        locked(&self.read).retain(|_, (_, _, at)| fresh(at));
        let mut written = locked(&self.written);
        let Written { by_key, dropped } = &mut *written;
        by_key.retain(|_, (n, at)| {
            let keep = fresh(at);
            if !keep {
                *dropped = (*dropped).max(*n);
            }
            keep
        });
        if by_key.len() > WRITTEN_KEPT {
            // Numbers rise with time: the oldest half are those up to the median.
            let mut numbers: Vec<u64> = by_key.values().map(|(n, _)| *n).collect();
            let oldest = numbers.len() - WRITTEN_KEPT / 2;
            let last = *numbers.select_nth_unstable(oldest - 1).1;
            by_key.retain(|_, (n, _)| *n > last);
            *dropped = (*dropped).max(last);
        }
    }

    /// Past `kept` records, drops the oldest records of files that say what a head of
    /// their key puts, down to half of `kept` (see [`Echo::prune`]).
    fn drop_repeated_files(&self, log: &EventLog, kept: usize) {
        let (files, excess) = {
            let map = self.lock();
            if map.len() <= kept {
                self.evict_at.store(0, Ordering::Relaxed);
                return;
            }
            if map.len() <= self.evict_at.load(Ordering::Relaxed) {
                return;
            }
            let mut files: Vec<(Instant, Key, Applied)> = map
                .iter()
                .filter(|(_, r)| matches!(r.applied, Applied::File { .. }))
                .map(|(k, r)| (r.at, k.clone(), r.applied))
                .collect();
            files.sort_unstable_by_key(|(at, _, _)| *at);
            (files, map.len() - kept / 2)
        };
        // The heads are read without the lock: the watcher's thread asks the record.
        let drop: Vec<(Instant, Key)> = files
            .into_iter()
            .filter(|(_, key, applied)| said_by_heads(log, key, *applied))
            .take(excess)
            .map(|(at, key, _)| (at, key))
            .collect();
        let mut map = self.lock();
        for (at, key) in drop {
            // Not one recorded since.
            if map.get(&key).is_some_and(|r| r.at == at) {
                map.remove(&key);
            }
        }
        // Looked through again once half the bound more is recorded: by then records of
        // versions older than their heads now may repeat their heads, and a few such
        // rounds are all a sync costs.
        self.evict_at
            .store(map.len().saturating_add(kept / 2), Ordering::Relaxed);
    }

    /// Numbers a change the store has made at `key`'s path, once made (a rename into
    /// place, a removal, a directory created, a file's mode or mtime set).
    /// A removal recorded for `key` and not yet numbered is the change made: it takes
    /// this number.
    pub(crate) fn wrote(&self, key: &Key) {
        // The record is numbered under the same lock as the number is taken: a source that
        // reads the number (and then finds the file back) finds the removal numbered.
        let mut map = self.lock();
        let n = {
            let mut written = locked(&self.written);
            let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
            written.by_key.insert(key.clone(), (n, Instant::now()));
            n
        };
        if let Some(record) = map.get_mut(key) {
            if record.applied == Applied::Absent && record.done.is_none() {
                record.done = Some(n);
            }
        }
    }

    /// The number of the store's latest change so far (see [`Echo::wrote`]): the source
    /// reads it before it looks at a file, for [`Echo::note_read`].
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Notes that the source read the file at `key` as `read` and is recording an event
    /// that puts exactly that; `writes` is [`Echo::writes`] from before it looked at the
    /// file. When the store comes to that event and has changed nothing at the key's path
    /// since, the file shows the event already (a change since is the source's to record),
    /// so the store need not look. At most [`READ_NOTES`] are kept (a store far behind its
    /// source then looks, as before).
    ///
    /// A change of the store's at the key's path after the source looked spoils the note
    /// ([`Echo::take_read`]). The source drops it before it judges an entry there
    /// ([`Echo::look`]), or a removal the store accounts for ([`Echo::absence_accounted`]),
    /// from the echo record: what it decides then may rest on the record, and the store
    /// must look for itself rather than skip. A removal the store does not account for
    /// keeps the note: the store skips rather than write back a file removed right after
    /// it was recorded, and the source records the removal.
    ///
    /// A record that the store removed the file, the removal made before the source
    /// looked, is dropped too: the file was there after that removal, so its going now is
    /// no echo of the store's but a removal of the user's, for the source to record (see
    /// [`Echo::absence_accounted`]). (Once, the source took a file made again and removed
    /// at once for the store's older removal, and the store wrote it back.) A removal
    /// recorded and not yet made (or made and not yet numbered) stays: the source's look
    /// may have come before it.
    pub(crate) fn note_read(&self, key: &Key, read: Applied, writes: u64) {
        let mut notes = locked(&self.read);
        if notes.len() < READ_NOTES || notes.contains_key(key) {
            notes.insert(key.clone(), (read, writes, Instant::now()));
        }
        let mut map = self.lock();
        if map.get(key).is_some_and(|r| outdated_by(r, Some(writes))) {
            map.remove(key);
        }
    }

    /// The number of the store's latest change at `key`'s path, or the highest number
    /// dropped when none is kept for it (see [`Written`]).
    fn last_change(&self, key: &Key) -> u64 {
        let written = locked(&self.written);
        written.by_key.get(key).map_or(written.dropped, |(n, _)| *n)
    }

    /// Whether the source noted reading `key` as `applied` with no change of the store's
    /// at `key`'s path made since it looked (see [`Echo::note_read`]; a change whose
    /// number was dropped counts as at every path); if so, also records `applied` as
    /// what the store left there, in the same step, so that a decision of the source's
    /// about `key` resting on the record comes either before (and drops the note, see
    /// [`Echo::look`] and [`Echo::absence_accounted`]) or after (and finds the record).
    /// The note is used up either way: it never outlives the store's first look at its
    /// key.
    pub(crate) fn take_read(&self, key: &Key, applied: Applied) -> bool {
        let mut notes = locked(&self.read);
        let Some((read, seen, _)) = notes.remove(key) else {
            return false;
        };
        let matches = read == applied && self.last_change(key) <= seen;
        if matches {
            self.record(key, applied);
        }
        matches
    }

    /// Whether the store accounts for `key` missing from the folder (see
    /// [`Echo::accounts_for_absence`]); if it does, also drops the key's note in the same
    /// step, since the source then dismisses the removal on the store's word and the store
    /// must not skip on the note (see [`Echo::take_read`]). A removal it does not account
    /// for keeps the note: the source records that removal itself, and a skip meanwhile
    /// does not write back the file it removed.
    pub(crate) fn absence_accounted(&self, key: &Key) -> bool {
        let mut notes = locked(&self.read);
        let accounted = self.accounts_for_absence(key);
        if accounted {
            notes.remove(key);
        }
        accounted
    }

    /// The source has found an entry at `key` (having read [`Echo::writes`] as `writes`
    /// before it looked) and is about to judge it: drops the key's note, since what the
    /// source decides now may rest on the echo record (a file that matches what the store
    /// wrote, say) rather than on what the note says; and drops a record of a removal made
    /// before the look, since the entry is back (see [`Echo::note_read`]: the same holds
    /// for a directory, or a file the source does not record).
    pub(crate) fn look(&self, key: &Key, writes: u64) {
        let mut notes = locked(&self.read);
        notes.remove(key);
        let mut map = self.lock();
        if map.get(key).is_some_and(|r| outdated_by(r, Some(writes))) {
            map.remove(key);
        }
    }

    /// The furthest the store's cursor has been seen, `cursor` (its value now) included:
    /// events before it were shown in the folder, even if a replay moved the cursor back.
    /// Also forgets the notes of events the cursor has passed (see
    /// [`Echo::note_emitted`]).
    pub(crate) fn shown_up_to(&self, cursor: u64) -> u64 {
        let shown = self.shown.fetch_max(cursor, Ordering::SeqCst).max(cursor);
        locked(&self.emitted).retain(|_, run| run.end > shown);
        shown
    }

    /// Notes events the folder's source just recorded from the folder, all before offset
    /// `end` of the log. Kept until the store's cursor passes `end` (see
    /// [`Echo::shown_up_to`]): from then on the cursor says they are shown.
    pub(crate) fn note_emitted(&self, ids: impl IntoIterator<Item = EventId>, end: u64) {
        let mut seqs: Vec<(ReplicaId, u64)> =
            ids.into_iter().map(|id| (id.origin, id.seq)).collect();
        seqs.sort_unstable();
        let mut emitted = locked(&self.emitted);
        // Carry on from the last run when these follow it (the usual case: this source
        // records most of the replica's events), so the notes stay few.
        let mut run: Option<((ReplicaId, u64), Emitted)> = match seqs.first() {
            Some(&(origin, seq)) => {
                let last = emitted
                    .range(..=(origin, seq))
                    .next_back()
                    .filter(|((o, _), r)| *o == origin && r.seqs_end == seq)
                    .map(|(start, _)| *start);
                last.and_then(|start| emitted.remove(&start).map(|r| (start, r)))
            }
            None => None,
        };
        if let Some((_, r)) = &mut run {
            r.end = end;
        }
        for (origin, seq) in seqs {
            match &mut run {
                Some(((o, _), r)) if *o == origin && r.seqs_end == seq => r.seqs_end = seq + 1,
                _ => {
                    if let Some((start, r)) = run.take() {
                        emitted.insert(start, r);
                    }
                    run = Some((
                        (origin, seq),
                        Emitted {
                            seqs_end: seq + 1,
                            end,
                        },
                    ));
                }
            }
        }
        if let Some((start, r)) = run {
            emitted.insert(start, r);
        }
    }

    /// Whether the folder's source recorded event `id` from the folder, and the store's
    /// cursor has not passed it yet: the folder showed it when it was read. This
    /// replica's events from other sources (a plugin's) are the store's to write.
    pub(crate) fn emitted_here(&self, id: &EventId) -> bool {
        locked(&self.emitted)
            .range(..=(id.origin, id.seq))
            .next_back()
            .is_some_and(|((origin, _), run)| *origin == id.origin && id.seq < run.seqs_end)
    }

    /// Sets the keys the store could not show.
    pub(crate) fn set_failed(&self, keys: HashSet<Key>) {
        *locked(&self.failed) = keys;
    }

    /// Notes whether the source's last read of `key`'s file was racy (see
    /// `scan::racy`): the next look at a racy file reads it again, whatever its stat
    /// says. A mark goes with the next read that is not racy; marks older than
    /// [`RACY_KEPT`] go sooner once [`RACY_MARKS`] are kept (a tree copied in is read
    /// racy file after file): by then the watcher has looked again at any written since.
    pub(crate) fn note_racy(&self, key: &Key, racy: bool) {
        let mut guard = locked(&self.racy);
        let (marks, look_at) = &mut *guard;
        if !racy {
            marks.remove(key);
            return;
        }
        let now = Instant::now();
        // Looked through again only once as many more have come as are kept: a tree
        // copied in within `RACY_KEPT` costs a pass per doubling, not one per file.
        if marks.len() >= (*look_at).max(RACY_MARKS) {
            marks.retain(|_, at| now.duration_since(*at) < RACY_KEPT);
            *look_at = marks.len() * 2;
        }
        marks.insert(key.clone(), now);
    }

    /// Whether the source's last read of `key`'s file was racy (see [`Echo::note_racy`]).
    pub(crate) fn is_racy(&self, key: &Key) -> bool {
        locked(&self.racy).0.contains_key(key)
    }

    /// Notes that the store left a local change at `key` in place instead of showing
    /// `heads` (a peer's version written, or its delete): the source then records that
    /// change without them as parents ([`LocalChange::without_seeing`]), concurrent with
    /// them, so that it does not silently supersede a version the folder never showed.
    /// `since` is this replica's latest sequence number in the log at the time: an event
    /// of this replica at the key numbered after it has taken the note (see
    /// [`Declined::left_with`]). They are forgotten once the store changes the file at the
    /// key ([`Echo::forget_declined`]), or the source has taken them. The store saves
    /// them with each batch it makes durable ([`Echo::declined_to_save`]), so that a
    /// restart before the source records the change keeps them.
    pub(crate) fn decline(&self, key: &Key, heads: Vec<EventId>, since: u64) {
        if heads.is_empty() {
            return;
        }
        let mut declined = locked(&self.declined);
        let d = declined.entry(key.clone()).or_insert_with(|| Declined {
            key: key.clone(),
            heads: Vec::new(),
            since,
        });
        for id in heads {
            if !d.heads.contains(&id) {
                d.heads.push(id);
            }
        }
        self.declined_changed.store(true, Ordering::Release);
    }

    /// Whether the store declined heads at `key` that the source has not recorded a
    /// change over yet (see [`Echo::decline`]).
    pub(crate) fn is_declined(&self, key: &Key) -> bool {
        let declined = locked(&self.declined);
        !declined.is_empty() && declined.contains_key(key)
    }

    /// Forgets what the store declined at `key` (see [`Echo::decline`]).
    pub(crate) fn forget_declined(&self, key: &Key) {
        let mut declined = locked(&self.declined);
        if !declined.is_empty() && declined.remove(key).is_some() {
            self.declined_changed.store(true, Ordering::Release);
        }
    }

    /// `change`, made without the heads the store declined at its key (see
    /// [`Echo::decline`]), which it takes.
    pub(crate) fn without_declined(&self, change: LocalChange) -> LocalChange {
        let mut declined = locked(&self.declined);
        if declined.is_empty() {
            return change;
        }
        match declined.remove(&change.key) {
            Some(d) => {
                self.declined_changed.store(true, Ordering::Release);
                change.without_seeing(d.heads)
            }
            None => change,
        }
    }

    /// Everything declined now, if that changed since the last call: for the store to
    /// save (see [`Echo::decline`]). A store that fails to save it calls
    /// [`Echo::declined_unsaved`].
    pub(crate) fn declined_to_save(&self) -> Option<Vec<Declined>> {
        // Cleared before the copy: a change made meanwhile sets it again.
        if !self.declined_changed.swap(false, Ordering::AcqRel) {
            return None;
        }
        let mut all: Vec<Declined> = locked(&self.declined).values().cloned().collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Some(all)
    }

    /// Notes that what [`Echo::declined_to_save`] gave was not saved: the next call gives
    /// it again.
    pub(crate) fn declined_unsaved(&self) {
        self.declined_changed.store(true, Ordering::Release);
    }

    /// Takes up what an earlier run declined and saved (see [`Echo::decline`]), where
    /// the store found it still untaken.
    pub(crate) fn restore_declined(&self, saved: Vec<Declined>) {
        let mut declined = locked(&self.declined);
        for d in saved {
            declined.insert(d.key.clone(), d);
        }
    }

    /// Whether the store could not show `key` (see [`Echo::set_failed`]).
    pub(crate) fn is_failed(&self, key: &Key) -> bool {
        locked(&self.failed).contains(key)
    }

    /// Records the name of the folder's store (see [`Echo::store`]).
    pub(crate) fn set_store(&self, name: &str) {
        *locked(&self.store) = Some(name.to_owned());
    }

    /// The name of the folder's store, if it has started.
    pub(crate) fn store(&self) -> Option<String> {
        locked(&self.store).clone()
    }

    /// Whether the store accounts for `key` missing from the folder: it removed it, or it
    /// has yet to show it ([`Echo::awaits_store`]). Such an absence is no local removal.
    pub(crate) fn accounts_for_absence(&self, key: &Key) -> bool {
        self.get(key) == Some(Applied::Absent) || self.awaits_store(key)
    }

    /// Whether the store has yet to show `key`: it could not write it (see
    /// [`Echo::set_failed`]), or a change of the ignore rules let it in lately (see
    /// [`Echo::admit`]). A file at its path in a state the log knows is then the store's
    /// to replace, not a local change.
    pub(crate) fn awaits_store(&self, key: &Key) -> bool {
        self.is_failed(key) || locked(&self.admitted).keys.contains(key)
    }

    /// The ignore rules the folder was last in sync with, if known (see
    /// [`crate::synced`]).
    pub(crate) fn synced_rules(&self) -> Option<RulesRecord> {
        locked(&self.admitted).synced.clone()
    }

    /// Takes `rules` for those the folder was last in sync with, as read from the state
    /// dir (or, with none there, the rules in effect at the first start).
    pub(crate) fn set_synced_rules(&self, rules: RulesRecord) {
        locked(&self.admitted).synced = Some(rules);
    }

    /// Admits `keys`, which a change of the ignore rules let in, in place of those
    /// admitted before: until a synced batch of the store shows them, their absence is no
    /// local removal, and the store shows them with each batch ([`Echo::admitted`]). Once
    /// it has, `record` (the rules in effect, and where to record them) is what the folder
    /// is in sync with ([`Echo::shown_admitted`]). Wakes the store.
    pub(crate) fn admit(&self, keys: HashSet<Key>, record: Option<RulesToRecord>) {
        let mut admitted = locked(&self.admitted);
        admitted.keys = keys;
        admitted.record = record;
        if !admitted.keys.is_empty() || admitted.record.is_some() {
            self.admitted_changed.notify_one();
        }
    }

    /// The keys admitted and not yet shown by a synced batch (see [`Echo::admit`]).
    pub(crate) fn admitted(&self) -> Vec<Key> {
        locked(&self.admitted).keys.iter().cloned().collect()
    }

    /// How many keys are admitted and not yet shown by a synced batch.
    pub(crate) fn admitted_count(&self) -> usize {
        locked(&self.admitted).keys.len()
    }

    /// Returns once keys were admitted (or rules are to be recorded) since the last call
    /// returned; a wake-up that comes meanwhile is kept for the next call.
    pub(crate) async fn admitted_changed(&self) {
        self.admitted_changed.notified().await
    }

    /// The store made a batch showing `shown` durable: they are shown. Once no admitted
    /// key is left, returns the rules to record as those the folder is in sync with, and
    /// where, which from now on are (taken: the store records them once).
    pub(crate) fn shown_admitted(&self, shown: &HashSet<Key>) -> Option<RulesToRecord> {
        let mut admitted = locked(&self.admitted);
        admitted.keys.retain(|k| !shown.contains(k));
        if !admitted.keys.is_empty() {
            return None;
        }
        let (path, rules) = admitted.record.take()?;
        admitted.synced = Some(rules.clone());
        Some((path, rules))
    }
}

/// Whether the file `applied` is what a head of `key` in `log` puts (see
/// [`Echo::prune`]).
fn said_by_heads(log: &EventLog, key: &Key, applied: Applied) -> bool {
    log.heads(key).is_ok_and(|heads| {
        heads.iter().any(|h| match &h.op {
            Op::Put {
                content: Some(c),
                meta,
            } => meta.kind == EntryKind::File && Applied::file(c, meta) == applied,
            _ => false,
        })
    })
}

/// Whether `record` is a removal made before a look of the source's at the file that
/// read [`Echo::writes`] as `seen` (and found the file there).
fn outdated_by(record: &Record, seen: Option<u64>) -> bool {
    match (record.applied, record.done, seen) {
        (Applied::Absent, Some(done), Some(seen)) => done <= seen,
        _ => false,
    }
}

/// Locks `mutex`; a panic while it was held leaves a map or set that is still valid.
pub(crate) fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether the regular file `key` at `path`, as `m` describes it, is what the store last
/// wrote or what an event of `key` in the log put (a head or an ancestor of one, the
/// nearest [`KNOWN_SEARCH`] events): then it holds no local change, and the store may
/// replace it. Judged by size, mtime and mode, and failing that by size, mode and content
/// hash: a file whose mtime alone changed (touched) is no change the source records, so
/// waiting for one would keep the replicas apart. [`known`] also says what it found.
pub(crate) fn known_state(
    log: &EventLog,
    echo: &Echo,
    key: &Key,
    path: &Path,
    m: &Metadata,
) -> bool {
    !matches!(known(log, echo, key, path, m), Known::No)
}

/// What [`known`] found the file at a key's path to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Known {
    /// Neither what the store wrote nor what an event put: a change made here that the
    /// source has not recorded.
    No,
    /// A known state of the file, found by its size, mtime and mode: by the scan's rule
    /// it holds that state's content, of this root. (The file was not read.)
    Stat(Hash),
    /// A known state of the file, found by reading it: its content has this root.
    Content(Hash),
    /// Taken as known without a match: the log could not be read (a warning says so), or
    /// the caller had no need to look (an unguarded store; a file as its event records).
    Assumed,
}

/// [`known_state`], saying how the file is known.
pub(crate) fn known(log: &EventLog, echo: &Echo, key: &Key, path: &Path, m: &Metadata) -> Known {
    let stat @ (size, _, executable) = file_stat(m);
    // The stat of a file the source last read racy tells nothing: it may hold a write
    // made in the same tick as the version read (see `scan::racy`). Its hash does.
    let stat_tells = !echo.is_racy(key);
    // Contents of the right size and mode, to compare by hash if no stat matches.
    let mut roots = Vec::new();
    let mut consider = |s: u64, x: bool, root: Hash| {
        if (s, x) == (size, executable) && !roots.contains(&root) {
            roots.push(root);
        }
    };
    if let Some(Applied::File {
        size: s,
        mtime_ms,
        executable: x,
        root,
    }) = echo.get(key)
    {
        if stat_tells && (s, mtime_ms, x) == stat {
            return Known::Stat(root);
        }
        consider(s, x, root);
    }
    let found = search_history(log, key, |op| match op {
        Op::Put {
            content: Some(c),
            meta,
        } => {
            if stat_tells && put_stat(op) == Some(stat) {
                return Some(c.root);
            }
            consider(c.size, meta.executable, c.root);
            None
        }
        _ => None,
    });
    match found {
        Some(Searched::Found(root)) => return Known::Stat(root),
        None => return Known::Assumed,
        Some(Searched::NotFound) => {}
    }
    if roots.is_empty() {
        return Known::No;
    }
    match hash_file(path) {
        Ok(content) if content.size == size && roots.contains(&content.root) => {
            Known::Content(content.root)
        }
        Ok(_) => Known::No,
        Err(e) => {
            tracing::warn!("{key}: {e}");
            Known::No
        }
    }
}

/// Whether a file of `content` with the mode `executable`, read from `key`'s path, is in a
/// state the store or the log knows: what the store last wrote there, or what an event of
/// the key's history put. As [`known`], for a caller that has read the file already, by
/// its root and never by reading it again. A log that cannot be read counts as knowing
/// it (a warning says so), as in [`known`].
pub(crate) fn known_content(
    log: &EventLog,
    echo: &Echo,
    key: &Key,
    content: &ContentRef,
    executable: bool,
) -> bool {
    let state = (content.size, executable, content.root);
    if let Some(Applied::File {
        size,
        executable: x,
        root,
        ..
    }) = echo.get(key)
    {
        if (size, x, root) == state {
            return true;
        }
    }
    let found = search_history(log, key, |op| match op {
        Op::Put {
            content: Some(c),
            meta,
        } if (c.size, meta.executable, c.root) == state => Some(()),
        _ => None,
    });
    !matches!(found, Some(Searched::NotFound))
}

/// What [`search_history`] found.
enum Searched<T> {
    /// What `visit` returned for an event.
    Found(T),
    /// No event of the history searched gave anything.
    NotFound,
}

/// Calls `visit` with the op of each event of `key`'s history, its heads first and then
/// their parents, nearest first, at most [`KNOWN_SEARCH`] events, until it returns
/// something. `None` when the log could not be read (a warning says so).
fn search_history<T>(
    log: &EventLog,
    key: &Key,
    mut visit: impl FnMut(&Op) -> Option<T>,
) -> Option<Searched<T>> {
    let mut queue: VecDeque<EventId> = match log.heads(key) {
        Ok(heads) => heads.iter().map(|h| h.id).collect(),
        Err(e) => {
            tracing::warn!("{key}: reading its heads: {e}; taking the file as known");
            return None;
        }
    };
    let mut seen = HashSet::new();
    while let Some(id) = queue.pop_front() {
        if !seen.insert(id) || seen.len() > KNOWN_SEARCH {
            continue;
        }
        let event = match log.get(&id) {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("{key}: reading event {id:?}: {e}; taking the file as known");
                return None;
            }
        };
        if let Some(found) = visit(&event.op) {
            return Some(Searched::Found(found));
        }
        queue.extend(event.parents);
    }
    Some(Searched::NotFound)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A saved decline is taken once an event of this replica at the key, numbered after
    /// it, is a head; of its heads only those still heads are kept.
    #[test]
    fn a_saved_decline_is_left_as_the_heads_at_start_say() {
        let (here, peer, other) = (ReplicaId([1; 16]), ReplicaId([2; 16]), ReplicaId([3; 16]));
        let id = |origin, seq| EventId { origin, seq };
        let saved = Declined {
            key: Key::new("f.txt").unwrap(),
            heads: vec![id(peer, 4), id(other, 9)],
            since: 7,
        };
        let left = |heads: &[EventId]| saved.clone().left_with(heads, here);
        // Nothing recorded since: all of it is left.
        assert_eq!(left(&[id(peer, 4), id(other, 9)]), Some(saved.clone()));
        // An older event of this replica among the heads takes nothing.
        assert_eq!(
            left(&[id(here, 7), id(peer, 4), id(other, 9)]),
            Some(saved.clone())
        );
        // The edit recorded (a later event of this replica): taken.
        assert_eq!(left(&[id(here, 8), id(peer, 4), id(other, 9)]), None);
        // A head settled by a later event: only the other is left.
        let one = left(&[id(peer, 5), id(other, 9)]).unwrap();
        assert_eq!(one.heads, vec![id(other, 9)]);
        // Both settled: nothing.
        assert_eq!(left(&[id(peer, 5)]), None);
    }

    /// What the store declined is given to save once per change, again after a failed
    /// save, and taken with the change the source records.
    #[test]
    fn declines_are_given_to_save_once_per_change() {
        let echo = Echo::default();
        let key = Key::new("f.txt").unwrap();
        let peer = EventId {
            origin: ReplicaId([2; 16]),
            seq: 4,
        };
        assert_eq!(echo.declined_to_save(), None);
        echo.decline(&key, vec![peer], 7);
        let saved = vec![Declined {
            key: key.clone(),
            heads: vec![peer],
            since: 7,
        }];
        assert_eq!(echo.declined_to_save(), Some(saved.clone()));
        assert_eq!(echo.declined_to_save(), None);
        echo.declined_unsaved();
        assert_eq!(echo.declined_to_save(), Some(saved));
        let change = echo.without_declined(LocalChange::new(key, Op::Delete));
        assert_eq!(change.unseen_heads, vec![peer]);
        assert_eq!(echo.declined_to_save(), Some(Vec::new()));
    }

    fn file(n: u64) -> Applied {
        Applied::File {
            size: n,
            mtime_ms: 1,
            executable: false,
            root: Hash::of(&n.to_le_bytes()),
        }
    }

    fn key(n: usize) -> Key {
        Key::new(format!("d/{n}")).unwrap()
    }

    /// Past the bound, records of files go, oldest first, down to half the bound, young
    /// or old, but only those that say what a head of their key says: an older version
    /// the store wrote than the key's head stays, as do the records of directories and
    /// removals.
    #[tokio::test]
    async fn only_records_the_heads_repeat_go() {
        use converge_framework::log::{LocalChange, LogConfig};
        let log = EventLog::open(LogConfig::temporary()).unwrap();
        let echo = Echo::default();
        let now = Instant::now();
        let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap();
        let put_in = |echo: &Echo, key: &Key, applied: Applied, at: Instant| {
            let record = Record {
                applied,
                at,
                done: None,
            };
            echo.lock().insert(key.clone(), record);
        };
        let put = |key: &Key, applied: Applied, at: Instant| put_in(&echo, key, applied, at);
        // Each key's head puts `file(n)`.
        let heads = |keys: &[(Key, u64)]| {
            let changes = keys
                .iter()
                .map(|(key, n)| {
                    let Applied::File {
                        size,
                        mtime_ms,
                        executable,
                        root,
                    } = file(*n)
                    else {
                        unreachable!()
                    };
                    let content = ContentRef {
                        root,
                        size,
                        depth: 0,
                    };
                    let meta = Meta {
                        kind: EntryKind::File,
                        mtime_ms,
                        executable,
                    };
                    LocalChange::new(
                        key.clone(),
                        Op::Put {
                            content: Some(content),
                            meta,
                        },
                    )
                })
                .collect();
            log.append_local(changes)
        };
        let repeated: Vec<(Key, u64)> = (0..10).map(|i| (key(i), i as u64)).collect();
        let young: Vec<(Key, u64)> = (10..14).map(|i| (key(i), i as u64)).collect();
        let stale = Key::new("stale").unwrap();
        heads(&repeated).await.unwrap();
        heads(&young).await.unwrap();
        heads(&[(stale.clone(), 100)]).await.unwrap();
        for (i, (key, n)) in repeated.iter().enumerate() {
            put(key, file(*n), ago(60_000 + i as u64));
        }
        // A few milliseconds old, the last the youngest.
        for (i, (key, n)) in young.iter().enumerate() {
            put(key, file(*n), ago(3 - i as u64));
        }
        // The store wrote version 99; the head is 100, not written yet.
        put(&stale, file(99), ago(90_000));
        put(&Key::new("dir").unwrap(), Applied::Dir, ago(90_000));
        put(&Key::new("gone").unwrap(), Applied::Absent, ago(90_000));
        assert_eq!(echo.lock().len(), 17);

        echo.prune_past(&log, 8);
        // 13 go, the oldest first: every old record the heads repeat, and all but the
        // youngest of the young.
        for (key, _) in &repeated {
            assert_eq!(echo.get(key), None, "{key} stayed");
        }
        for (i, (key, n)) in young.iter().enumerate() {
            let kept = if i == 3 { Some(file(*n)) } else { None };
            assert_eq!(echo.get(key), kept, "{key}");
        }
        assert_eq!(echo.get(&stale), Some(file(99)));
        assert_eq!(echo.get(&Key::new("dir").unwrap()), Some(Applied::Dir));
        assert_eq!(echo.get(&Key::new("gone").unwrap()), Some(Applied::Absent));
        assert_eq!(echo.lock().len(), 4);

        // Within the bound, nothing goes; past it, down to half again, the oldest first.
        for (i, (key, n)) in repeated.iter().take(4).enumerate() {
            put(key, file(*n), ago(60_000 + i as u64));
        }
        echo.prune_past(&log, 8);
        assert_eq!(echo.lock().len(), 8);
        put(&repeated[4].0, file(4), ago(60_000));
        echo.prune_past(&log, 8);
        assert_eq!(echo.lock().len(), 4);
        assert_eq!(echo.get(&young[3].0), Some(file(13)));

        // Records that may not go are looked through again only once half the bound
        // more is recorded.
        let echo = Echo::default();
        for i in 0..9 {
            let stale = Key::new(format!("stale/{i}")).unwrap();
            heads(&[(stale.clone(), 200 + i)]).await.unwrap();
            put_in(&echo, &stale, file(100 + i), ago(1000));
        }
        echo.prune_past(&log, 8);
        assert_eq!(echo.lock().len(), 9, "an older version than the head went");
        for (i, (key, n)) in repeated.iter().take(3).enumerate() {
            put_in(&echo, key, file(*n), ago(60_000 + i as u64));
        }
        echo.prune_past(&log, 8);
        assert_eq!(echo.lock().len(), 12, "looked through again too soon");
        put_in(&echo, &repeated[3].0, file(3), ago(60_000));
        put_in(&echo, &repeated[4].0, file(4), ago(60_000));
        echo.prune_past(&log, 8);
        assert_eq!(echo.lock().len(), 9);

        // Down to half the bound and no further, the oldest first.
        let echo = Echo::default();
        for (i, (key, n)) in repeated.iter().enumerate() {
            let record = Record {
                applied: file(*n),
                at: ago(60_000 + i as u64),
                done: None,
            };
            echo.lock().insert(key.clone(), record);
        }
        echo.prune_past(&log, 8);
        for (i, (key, n)) in repeated.iter().enumerate() {
            let kept = if i < 4 { Some(file(*n)) } else { None };
            assert_eq!(echo.get(key), kept, "{key}");
        }
    }

    /// Past [`WRITTEN_KEPT`] keys, the oldest half of the numbers of the store's changes
    /// go, and count as changes at every path: a note taken before them no longer lets
    /// the store skip, one taken after them still does.
    #[tokio::test]
    async fn dropped_numbers_of_changes_count_everywhere() {
        let log = EventLog::open(converge_framework::log::LogConfig::temporary()).unwrap();
        let echo = Echo::default();
        let early = echo.writes();
        let n = WRITTEN_KEPT + 10;
        for i in 0..n {
            echo.wrote(&key(i));
        }
        let late = echo.writes();
        echo.prune(&log);
        let written = locked(&echo.written);
        assert!(written.by_key.len() <= WRITTEN_KEPT / 2);
        assert!(written.by_key.contains_key(&key(n - 1)));
        assert!(!written.by_key.contains_key(&key(0)));
        drop(written);

        let (before, after) = (Key::new("before").unwrap(), Key::new("after").unwrap());
        echo.note_read(&before, file(1), early);
        echo.note_read(&after, file(2), late);
        assert!(
            !echo.take_read(&before, file(1)),
            "a dropped change came after the look"
        );
        assert!(echo.take_read(&after, file(2)));
    }

    /// Admitted keys leave as synced batches show them, and only then are the rules to
    /// record handed to the store, once. An admission replaces the one before: a key of
    /// both that a batch showed meanwhile is shown for it too; one of the old alone is
    /// no longer awaited.
    #[test]
    fn admitted_keys_leave_once_shown_and_then_the_rules_are_recorded() {
        let echo = Echo::default();
        let root = Path::new("/nonexistent/folder");
        let rules = |text: &[u8]| {
            let parsed = crate::rules::Rules::parse(root, &[], Some(text));
            RulesRecord::of(&parsed, &[])
        };
        let keys = |names: &[&str]| -> HashSet<Key> {
            names.iter().map(|n| Key::new(*n).unwrap()).collect()
        };
        let path = Some(PathBuf::from("/state/folder.rules"));
        echo.admit(
            keys(&["a.iso", "b.iso"]),
            Some((path.clone(), rules(b"*.mp4"))),
        );
        assert!(echo.accounts_for_absence(&Key::new("a.iso").unwrap()));
        assert_eq!(echo.admitted_count(), 2);

        assert_eq!(echo.shown_admitted(&keys(&["a.iso"])), None);
        echo.admit(keys(&["a.iso", "c.mp3"]), Some((path.clone(), rules(b""))));
        assert!(!echo.awaits_store(&Key::new("b.iso").unwrap()));
        // A batch shown before the new admission, and synced after it.
        assert_eq!(echo.shown_admitted(&keys(&["a.iso"])), None);
        let recorded = echo.shown_admitted(&keys(&["c.mp3"]));
        assert_eq!(recorded, Some((path, rules(b""))));
        assert_eq!(echo.synced_rules(), Some(rules(b"")));
        assert_eq!(echo.shown_admitted(&HashSet::new()), None, "recorded once");
    }

    #[test]
    fn emitted_events_are_noted_until_the_cursor_passes_them() {
        let echo = Echo::default();
        let (me, peer) = (ReplicaId([1; 16]), ReplicaId([2; 16]));
        let id = |origin, seq| EventId { origin, seq };
        echo.note_emitted([id(me, 3), id(me, 1), id(me, 2), id(me, 5)], 10);
        echo.note_emitted([id(me, 6)], 12);
        for (seq, noted) in [
            (1, true),
            (2, true),
            (3, true),
            (4, false),
            (5, true),
            (6, true),
        ] {
            assert_eq!(echo.emitted_here(&id(me, seq)), noted, "seq {seq}");
        }
        assert!(!echo.emitted_here(&id(peer, 2)));
        assert!(!echo.emitted_here(&id(me, 7)));

        assert_eq!(echo.shown_up_to(10), 10);
        assert!(!echo.emitted_here(&id(me, 2)), "the cursor passed it");
        assert!(echo.emitted_here(&id(me, 6)));
        assert!(
            echo.emitted_here(&id(me, 5)),
            "6 carried on 5's run, which lasts as long"
        );
        assert_eq!(echo.shown_up_to(4), 10, "a rewound cursor does not count");
        assert!(echo.emitted_here(&id(me, 6)));
    }
}
