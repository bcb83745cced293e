//! The scan: compares what is on disk with the projection and emits the difference.
//!
//! Entries are walked in parallel (the `ignore` crate's parallel walker, on its own
//! threads, started from a blocking task); each is compared with its key's heads: the same
//! size and mtime as a head means unchanged, otherwise the file is chunked (its chunks go
//! into the content store) and its root compared. Keys the projection shows but the disk
//! lacks become deletes, children before their directory. Changes are appended in batches.
//!
//! A scan records nothing that would undo what the folder does not show yet. A head is
//! shown once the folder's store has applied it (it is before the furthest cursor the
//! store reached; a replay's rewind does not count: [`Echo::shown_up_to`]), or once the
//! folder's source recorded it from the folder (the source notes the runs of ids it emits
//! until the store's cursor passes them: [`Echo::note_emitted`]). The scan reads the log's
//! length and version vector as one pair
//! ([`EventLog::published`](converge_framework::log::EventLog::published)) before the
//! heads, and the events not applied yet up to that length, once per scan, from the
//! cursor on; a head beyond that vector was appended meanwhile and is looked up by offset
//! ([`Projection::shows`]). For a key with a head not shown, a scan records no removal, no
//! directory, and a file only in a state the log does not know (the user's change, which
//! the store waits on rather than replace). Otherwise a rescan while the store is behind
//! would take a peer's (or a plugin's) new file, not written yet, for a local removal, and
//! the older version still in the folder for a local edit, and record both over that
//! change on every replica.
//!
//! Changes are stamped with when they were made
//! ([`LocalChange::made_at_ms`](converge_framework::log::LocalChange::made_at_ms)): a
//! file's or directory's ctime, and for a removal the ctime of the nearest directory
//! still there ([`removed_at_ms`]). The log takes that for the event's clock when it is
//! earlier than now, never at or below what it stamped before, so the clock stays
//! monotonic while an edit made while the daemon was stopped is ordered by
//! last-write-wins as of when it was made.
//!
//! Files are read as [`open_file`] opens them: never through a symlink, never a FIFO or a
//! device, without touching their access time where the kernel allows it, and only when
//! what opens is the very inode the scan looked at, unchanged (a directory above it
//! swapped for a symlink opens another file, which is not read: nothing outside the folder
//! reaches the content store that way). After the read the open handle's stat says the
//! file is still unchanged, with no second look-up of the path ([`store_file_read`]). A
//! walker thread gathers the chunks of the small files it reads and stores them in one
//! call, one write to the pack ([`Gathered`]); what it found waits until then, so that no
//! change naming them reaches the log first ([`Outbox`]).
//!
//! Conflict copies (`name.sync-conflict-<date>-<origin>.ext`, for the heads a policy such
//! as `conflict-copy` names) are derived from the heads by every replica alike and are
//! never keys. A copy deleted by hand reads as "keep the winner" (DESIGN §2): the source
//! records the winner's operation again, which names every head as a parent and so merges
//! the conflict ([`merge_for_deleted_copy`], which the watcher asks as it sees the copy
//! go). The scan at start does the same for a copy deleted while the daemon was stopped,
//! once the store's cursor shows it wrote the key's copies
//! ([`merges_for_deleted_copies`]). The engine reads such a merge from the batch it hands
//! a store and names the copies it ends
//! ([`KeyView::merged_copies`](converge_framework::plugin::KeyView::merged_copies)); the
//! folder store removes its own of them, unless changed since, so a copy deleted on one
//! replica goes on every replica. After any other merge (an edit or a delete of the key)
//! copies stay.

use std::collections::HashSet;
use std::fs::{File, FileType, Metadata};
use std::hash::{BuildHasher, RandomState};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge_api::{ConflictPolicy, EntryKind, EventId, Head, Key, Meta, Op, VersionVector};
use converge_framework::content::ChunkStore;
use converge_framework::log::{EventLog, LocalChange};
use converge_framework::plugin::{ScanProgress, SourceContext};
use converge_framework::projection::KeyState;
use converge_framework::reconciler::pick;
use converge_framework::LogError;
use ignore::{WalkBuilder, WalkState};
use tokio::sync::mpsc;

use crate::content::{
    changed_at_ms, file_stat, mtime_ms, open_file, put_stat, store_file_read, store_open_file,
    Gathered,
};
use crate::echo::{known_state, Applied, Echo};
use crate::error::FsError;
use crate::rules::{below_symlink, Rules};
use crate::store::file_copies;
use crate::EMIT_BATCH;

/// Picks the head a store shows for a key, as the engine's reconciler does (the conflict
/// policy's winner, last-write-wins without one).
#[derive(Clone, Default)]
pub(crate) struct Resolver {
    pub(crate) policy: Option<Arc<dyn ConflictPolicy>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("policy", &self.policy.as_ref().map(|p| p.name().to_owned()))
            .finish()
    }
}

impl Resolver {
    /// The winning head if it is a `Put` (the key is shown), `None` if the key is absent.
    pub(crate) fn shown<'h>(&self, key: &Key, heads: &'h [Head]) -> Option<&'h Head> {
        let (winner, _) = self.pick(key, heads);
        winner.filter(|h| matches!(h.op, Op::Put { .. }))
    }

    /// The winning head (a `Delete` too) and the heads shown as conflict copies.
    pub(crate) fn pick<'h>(
        &self,
        key: &Key,
        heads: &'h [Head],
    ) -> (Option<&'h Head>, Vec<&'h Head>) {
        pick(self.policy.as_deref(), key, heads)
    }
}

/// What a running source works with; rebuilt when the ignore rules change.
#[derive(Debug)]
pub(crate) struct Env {
    pub(crate) rules: Rules,
    pub(crate) echo: Arc<Echo>,
    pub(crate) resolver: Resolver,
    pub(crate) log: EventLog,
    pub(crate) chunks: ChunkStore,
    /// Set once the engine shuts down: a file being read stops at its next window rather
    /// than holding the shutdown until it is read whole (see [`FsError::Stopped`]).
    pub(crate) stopping: Arc<AtomicBool>,
    /// See [`FsConfig::racy_margin`](crate::FsConfig#structfield.racy_margin).
    pub(crate) racy_margin: Duration,
}

#[cfg(test)]
impl Env {
    /// The state of a source of the folder at `root`, over a temporary log of its own.
    #[allow(clippy::unwrap_used)]
    pub(crate) fn for_tests(root: &Path) -> Env {
        let log = EventLog::open(converge_framework::log::LogConfig::temporary()).unwrap();
        Env {
            rules: Rules::load(root, &[]),
            echo: Arc::new(Echo::default()),
            resolver: Resolver::default(),
            chunks: log.chunks().clone(),
            log,
            stopping: Arc::new(AtomicBool::new(false)),
            racy_margin: crate::DEFAULT_RACY_MARGIN,
        }
    }
}

fn head_kind(head: &Head) -> Option<EntryKind> {
    match &head.op {
        Op::Put { meta, .. } => Some(meta.kind),
        Op::Delete => None,
    }
}

/// Whether the regular file `key` is just as the store last wrote it (its own write coming
/// back through the watcher), judged by size, mtime and the executable bit.
pub(crate) fn is_echo(env: &Env, key: &Key, meta: &Metadata) -> bool {
    as_written(env, key, meta) && !changed_unseen(env, meta)
}

/// Whether the stat of the regular file `key` is the one the store last wrote.
fn as_written(env: &Env, key: &Key, meta: &Metadata) -> bool {
    env.echo.get(key).and_then(Applied::file_stat) == Some(file_stat(meta))
}

/// Whether the content store found the file `meta` describes changed where it had
/// recorded its chunks (see `ChunkStore::is_changed_file`): its stat hides a change, and
/// it is chunked again whatever the stat says.
fn changed_unseen(env: &Env, meta: &Metadata) -> bool {
    env.chunks.is_changed_file(meta.dev(), meta.ino())
}

/// Compares the regular file at `path` with `heads`; returns the `Put` to emit (if it
/// changed) and the number of bytes hashed. Blocks. A file whose size, mtime or mode
/// changed since `meta` was read (it is being written) gives no `Put`: what was read may
/// mix two versions, and the write's own watcher event brings the file back here.
/// `writes` is [`Echo::writes`] from before `looked` was.
pub(crate) fn examine_file(
    env: &Env,
    key: &Key,
    path: &Path,
    looked: Looked<'_>,
    writes: u64,
    heads: &[Head],
    gathered: Option<&mut Gathered>,
) -> Result<(Option<Op>, u64), FsError> {
    let meta = looked.meta();
    let stat @ (_, mtime, executable) = file_stat(meta);
    let unseen = changed_unseen(env, meta);
    let recorded = || heads.iter().any(|h| put_stat(&h.op) == Some(stat));
    // A file last read racy is read again, whatever its stat says (see `racy`).
    let racy_before = env.echo.is_racy(key);
    if !unseen && !racy_before && (as_written(env, key, meta) || recorded()) {
        return Ok((None, 0));
    }
    // A key the store could not show, or has yet to show since the ignore rules let it
    // in: a state the log knows is what the store is to replace, not a local change.
    if env.echo.awaits_store(key) && known_state(&env.log, &env.echo, key, path, meta) {
        return Ok((None, 0));
    }
    // The file read is the one looked at (not one renamed over it since, nor a symlink
    // swapped in: see `store_file_read`), and unchanged by the end of the read. One
    // renamed over it after the read is the watcher's news.
    let started = std::time::SystemTime::now();
    let read = match looked {
        Looked::Opened(file, _) => Some(store_open_file(
            path,
            file,
            meta,
            &env.chunks,
            gathered,
            &env.stopping,
        )?),
        Looked::Path(_) => store_file_read(path, meta, &env.chunks, gathered, &env.stopping)?,
    };
    let Some((content, read)) = read else {
        tracing::debug!("{key}: changed or replaced since it was looked at; looked at again");
        return Ok((None, 0));
    };
    if file_stat(&read) != stat || !same_mtime(&read, meta) || content.size != stat.0 {
        tracing::debug!("{key}: changed while it was read; looked at again once written");
        return Ok((None, content.size));
    }
    env.echo
        .note_racy(key, racy(meta, started, env.racy_margin));
    if unseen {
        tracing::info!("{key}: changed in place without a change of size or mtime; chunked again");
    }
    let same_content = heads.iter().any(|h| match &h.op {
        Op::Put {
            content: Some(c),
            meta: hm,
        } => {
            hm.kind == EntryKind::File
                && c.root == content.root
                && c.size == content.size
                && hm.executable == executable
        }
        _ => false,
    }) || matches!(env.echo.get(key), Some(Applied::File { root, executable: x, .. }) if root == content.root && x == executable);
    if same_content {
        return Ok((None, content.size));
    }
    let meta = Meta {
        kind: EntryKind::File,
        mtime_ms: mtime,
        executable,
    };
    env.echo
        .note_read(key, Applied::file(&content, &meta), writes);
    let op = Op::Put {
        content: Some(content),
        meta,
    };
    Ok((Some(op), content.size))
}

/// Whether both stats carry the same mtime to the nanosecond: a write during a read that
/// leaves the size and the mtime's milliseconds as they were still moves it, where the
/// file system's clock has ticked since the look. (Not the ctime: the content store
/// links a large file it reads into its packs, which moves the ctime.)
fn same_mtime(a: &Metadata, b: &Metadata) -> bool {
    (a.mtime(), a.mtime_nsec()) == (b.mtime(), b.mtime_nsec())
}

/// Whether a file looked at as `looked`, read from `started` on, is racy: changed less
/// than `margin` before the read began. The file system stamps a change
/// with the time of its clock's last tick (a few milliseconds apart on Linux before
/// 6.13), so a write in the same tick as the one that made the file, after the read
/// began, leaves its size and timestamps exactly as the read saw them: neither the
/// watcher's next look (its event comes) nor a rescan could tell it from the version
/// read. The next look at a racy file reads it again; one read long enough after its
/// last change is not racy any more. The mtime as looked at, before the read: a write
/// sets it to the tick it was made in. Not the ctime, which a rename moves too: a file
/// saved by renaming a finished temp file over it, and read at once, would read racy
/// and be read again whole at the next look (a large file's, the link the content store
/// makes of it). A tool that sets the mtime back after writing leaves the file as any
/// edit that keeps size and mtime (see the README's known limitations).
fn racy(looked: &Metadata, started: std::time::SystemTime, margin: Duration) -> bool {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let started_ms = started.duration_since(std::time::UNIX_EPOCH).map_or(0, ms);
    mtime_ms(looked).saturating_add(ms(margin)) > started_ms
}

/// How the scan or the watcher looked at a file: its `lstat`, or the stat of its handle
/// when it was opened instead ([`open_file`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Looked<'a> {
    /// Looked up by path.
    Path(&'a Metadata),
    /// Opened, and the handle's stat read.
    Opened(&'a File, &'a Metadata),
}

impl<'a> Looked<'a> {
    /// The stat looked at.
    pub(crate) fn meta(self) -> &'a Metadata {
        match self {
            Looked::Path(meta) | Looked::Opened(_, meta) => meta,
        }
    }
}

/// Compares the directory at `key` with `heads`: a directory not shown as one is new,
/// unless a delete won and live keys remain below (it is kept alive by them).
pub(crate) fn examine_dir(
    env: &Env,
    key: &Key,
    meta: &Metadata,
    heads: &[Head],
    live_below: impl FnOnce() -> bool,
) -> Option<Op> {
    // The store's own, or one it could not remove.
    if env.echo.get(key) == Some(Applied::Dir) || env.echo.is_failed(key) {
        return None;
    }
    match env.resolver.shown(key, heads) {
        Some(h) if head_kind(h) == Some(EntryKind::Dir) => None,
        None if !heads.is_empty() && (live_below() || holds_nothing_synced(env, key)) => None,
        _ => Some(Op::Put {
            content: None,
            meta: Meta::dir(mtime_ms(meta)),
        }),
    }
}

/// Whether the directory at `key` holds entries, none of which the folder syncs (ignored,
/// named in bytes that are not UTF-8, symlinks, special files, directories holding only
/// such entries): what keeps a directory removed elsewhere in place here (the store
/// removes it only when empty), not a directory made again here. An empty one, or one
/// that cannot be read, counts as made, and so does one with more than
/// [`UNSYNCED_LOOKED_AT`] entries below it.
fn holds_nothing_synced(env: &Env, key: &Key) -> bool {
    let mut budget = UNSYNCED_LOOKED_AT;
    holds_only_unsynced(env, &env.rules.path_of(key), &mut budget)
}

/// Most entries [`holds_nothing_synced`] looks at below a directory.
const UNSYNCED_LOOKED_AT: usize = 4096;

/// [`holds_nothing_synced`] for the directory at `path`, looking at no more than `budget`
/// entries.
fn holds_only_unsynced(env: &Env, path: &Path, budget: &mut usize) -> bool {
    let Ok(entries) = std::fs::read_dir(path) else {
        return false;
    };
    let mut any = false;
    for entry in entries {
        let Ok(entry) = entry else {
            return false;
        };
        let Some(left) = budget.checked_sub(1) else {
            return false;
        };
        *budget = left;
        any = true;
        let Ok(kind) = entry.file_type() else {
            return false;
        };
        let unsynced = !(kind.is_file() || kind.is_dir())
            || env.rules.key_of(&entry.path()).is_err()
            || env.rules.ignores(&entry.path(), kind.is_dir(), true);
        if unsynced {
            continue;
        }
        if kind.is_file() || !holds_only_unsynced(env, &entry.path(), budget) {
            return false;
        }
    }
    any
}

/// How a key came to be asked about its removal ([`gone`]): what a symlink at or above its
/// path then means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Absence {
    /// Found missing by a scan at start, or a directory key (or a key below one) held for
    /// removal where the watcher saw no directory go. Something the folder does not sync
    /// at the path (a symlink, a FIFO), or a symlink above it, makes the key no longer the
    /// folder's, as an ignore rule would: the store writes nothing there, and the key is
    /// not taken for removed either. Nothing tells a link made in place of what the folder
    /// showed from one that was always there: `photos` a link here while a peer has a
    /// directory of photos at that path, which the store refused to write below the link;
    /// taken for removed, they would be deleted on every replica at each start.
    Found,
    /// Seen to go while the source runs: the watcher saw the entry at its path removed or
    /// moved away (or a directory above it), or a scan while the source runs found it
    /// missing. A symlink made in its place since (`rm -rf d; ln -s elsewhere d`) does not
    /// bring it back: what lies through the link is not the folder's.
    Seen,
}

/// Whether `key`, shown by `heads`, is gone from the folder as a local removal, judged as
/// `how` says (see [`Absence`]): neither a file nor a directory is at its path (one created
/// after a walk passed by is there, and the watcher reports it), and the store does not
/// account for the absence. `real` holds directories found not to be symlinks (see
/// [`below_symlink`]), for a caller asking about many keys.
pub(crate) fn gone(
    env: &Env,
    key: &Key,
    heads: &[Head],
    how: Absence,
    real: &mut HashSet<PathBuf>,
) -> bool {
    if env.resolver.shown(key, heads).is_none() || env.echo.absence_accounted(key) {
        return false;
    }
    let path = env.rules.path_of(key);
    match std::fs::symlink_metadata(&path) {
        // There, unless through a symlink that replaced a directory above it (seen to go,
        // that directory took the key with it).
        Ok(m) if m.is_file() || m.is_dir() => {
            how == Absence::Seen && below_symlink(env.rules.root(), &path, real)
        }
        // A symlink or a special file at the path.
        Ok(_) => how == Absence::Seen,
        Err(_) => how == Absence::Seen || !below_symlink(env.rules.root(), &path, real),
    }
}

/// When the entry at `key` was removed, as far as the disk tells: the ctime of its nearest
/// directory still there, which the removal set and which later changes in that directory
/// only move forward. So a removal made while the daemon was stopped is not stamped later
/// than an edit a peer made after it (last-write-wins would then delete that edit).
pub(crate) fn removed_at_ms(rules: &Rules, key: &Key) -> Option<u64> {
    let path = rules.path_of(key);
    path.ancestors()
        .skip(1)
        .take_while(|dir| dir.starts_with(rules.root()))
        .find_map(|dir| std::fs::symlink_metadata(dir).ok().filter(|m| m.is_dir()))
        .and_then(|m| changed_at_ms(&m))
}

/// The keys a scan compares the folder with: every key, or a directory's and those below
/// it, each key's heads read from the log as the walk comes to it (a folder of a million
/// files is never held whole), with what the folder's store had not applied when the scan
/// began.
pub(crate) struct Projection {
    /// Whose keys: every key (`None`), or a directory's and those below it.
    under: Option<Key>,
    /// The log held none of those keys when the scan began: each key's heads are then
    /// taken as none, unread, as a first scan of a folder finds it (its own events, and
    /// a peer's appended meanwhile, are news to a later scan).
    empty: bool,
    /// What the folder's store had not applied when the scan began (`None`: no store has
    /// started; see [`Projection::shows`]).
    unshown: Option<Unshown>,
}

/// A key with its heads.
type KeyHeads = (Key, Vec<Head>);

/// The events past the folder store's cursor, but those the folder's source recorded
/// from the folder, and what the log held just before the heads were read.
#[derive(Debug)]
struct Unshown {
    ids: HashSet<EventId>,
    cursor: u64,
    /// The log's version vector from before the heads were read, with the length the
    /// events were read up to: a head beyond it was appended meanwhile, perhaps after.
    before: VersionVector,
}

impl Projection {
    /// The keys of the folder (`under` = `None`) or of a directory key and those below it,
    /// with what the folder's store has not applied yet.
    pub(crate) fn load(
        log: &EventLog,
        echo: &Echo,
        under: Option<&Key>,
    ) -> Result<Projection, FsError> {
        // Before any heads are read (see `Unshown::before`).
        let mut projection = Projection::unshown(log, echo)?;
        projection.empty = scoped_states(log, under).next().is_none();
        projection.under = under.cloned();
        Ok(projection)
    }

    /// No keys' heads, only what the folder's store has not applied yet: for a caller
    /// that reads the heads it asks [`Projection::shows`] about itself, after this.
    pub(crate) fn unshown(log: &EventLog, echo: &Echo) -> Result<Projection, FsError> {
        // Before the heads the caller reads: a head beyond `before` was appended
        // meanwhile, and the events read below stop at `end`.
        let (end, before) = log.published();
        let unshown = match echo.store() {
            Some(store) => {
                // The furthest the store has been: a replay moves its cursor back over
                // events the folder showed before.
                let cursor = echo.shown_up_to(log.cursor(&store)?);
                let mut at = cursor;
                let mut ids = HashSet::new();
                while at < end {
                    let limit = UNSHOWN_READ.min(usize::try_from(end - at).unwrap_or(usize::MAX));
                    let events = log.read(at, limit)?;
                    let Some((last, _)) = events.last() else {
                        break;
                    };
                    at = last + 1;
                    ids.extend(
                        events
                            .into_iter()
                            .map(|(_, e)| e.id)
                            .filter(|id| !echo.emitted_here(id)),
                    );
                }
                Some(Unshown {
                    ids,
                    cursor,
                    before,
                })
            }
            None => None,
        };
        Ok(Projection {
            under: None,
            empty: true,
            unshown,
        })
    }

    /// Whether the folder shows every one of `heads` (a key's, read after this
    /// projection was loaded): the store has applied it, or the folder's source recorded
    /// it from the folder. Until then, what is in the folder at the key may be what it
    /// showed before (an older version, or nothing for a key new from a peer or a
    /// plugin): a scan then records neither a removal nor a file in a state the log
    /// knows, which would undo that change on every replica.
    pub(crate) fn shows(&self, log: &EventLog, heads: &[Head]) -> bool {
        let Some(u) = &self.unshown else {
            return true;
        };
        heads.iter().all(|h| {
            if u.ids.contains(&h.id) {
                return false;
            }
            // Appended while the heads were read: the events read may have missed it.
            if h.id.seq > u.before.get(&h.id.origin) {
                return log
                    .offset_of(&h.id)
                    .ok()
                    .flatten()
                    .is_some_and(|offset| offset < u.cursor);
            }
            true
        })
    }

    /// The heads of `key`, one of this projection's keys.
    fn heads(&self, log: &EventLog, key: &Key) -> Result<Vec<Head>, FsError> {
        if self.empty {
            return Ok(Vec::new());
        }
        Ok(log.heads(key)?)
    }

    /// Every key of this projection that has heads, with them, in key order.
    fn states<'l>(
        &self,
        log: &'l EventLog,
    ) -> Box<dyn Iterator<Item = Result<KeyHeads, FsError>> + 'l> {
        if self.empty {
            return Box::new(std::iter::empty());
        }
        scoped_states(log, self.under.as_ref())
    }

    /// Whether some key strictly below the directory `key` is shown (a live `Put`); if
    /// the log cannot tell, taken as so (the directory is then not recorded anew).
    fn live_below(&self, log: &EventLog, key: &Key, resolver: &Resolver) -> bool {
        !self.empty
            && log.states_below(key).any(|entry| {
                entry.map_or(true, |(k, state)| {
                    resolver.shown(&k, &state.heads).is_some()
                })
            })
    }
}

/// Every key of `log` (`under` = `None`), or the directory key `under` and those below it,
/// that has heads, with them, in key order.
fn scoped_states<'l>(
    log: &'l EventLog,
    under: Option<&Key>,
) -> Box<dyn Iterator<Item = Result<KeyHeads, FsError>> + 'l> {
    let states: Box<dyn Iterator<Item = Result<(Key, KeyState), LogError>> + 'l> = match under {
        None => Box::new(log.states()),
        Some(dir) => {
            let own = log.state(dir).map(|state| (dir.clone(), state));
            Box::new(std::iter::once(own).chain(log.states_below(dir)))
        }
    };
    Box::new(states.filter_map(|entry| match entry {
        Ok((_, state)) if state.heads.is_empty() => None,
        Ok((key, state)) => Some(Ok((key, state.heads))),
        Err(e) => Some(Err(e.into())),
    }))
}

/// Keys a scan found, each held as a 128-bit hash, two SipHashes under random keys of
/// the scan's own (a folder of a million files costs about 16 MiB, not the keys
/// themselves). A key taken for another one found, at negligible odds, would go
/// unremoved (or its conflict unmerged) until a later scan, whose keys differ.
struct KeySet {
    hashers: (RandomState, RandomState),
    hashes: HashSet<u128>,
}

impl KeySet {
    fn new() -> KeySet {
        KeySet {
            hashers: (RandomState::new(), RandomState::new()),
            hashes: HashSet::new(),
        }
    }

    fn hash(&self, key: &Key) -> u128 {
        let (a, b) = &self.hashers;
        (u128::from(a.hash_one(key.as_str())) << 64) | u128::from(b.hash_one(key.as_str()))
    }

    fn insert(&mut self, key: &Key) {
        let hash = self.hash(key);
        self.hashes.insert(hash);
    }

    fn contains(&self, key: &Key) -> bool {
        self.hashes.contains(&self.hash(key))
    }
}

/// What a walker thread reports to the collecting task.
enum Found {
    Entry {
        key: Key,
        change: Option<Op>,
        /// When the entry last changed (its ctime).
        changed_at: Option<u64>,
        hashed: u64,
    },
    /// This key (and what lies below it) could not be read: do not read it as deleted.
    Failed(Option<String>),
    Fatal(FsError),
}

/// Why a walker could not read a path, if the error names one.
fn error_path(err: &ignore::Error) -> Option<&Path> {
    match err {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            error_path(err)
        }
        ignore::Error::Loop { child, .. } => Some(child),
        _ => None,
    }
}

/// Records `changes` the folder's source found in the folder, noting their events as
/// shown there (see [`Echo::emitted_here`]).
pub(crate) async fn emit(
    ctx: &SourceContext,
    echo: &Echo,
    changes: Vec<LocalChange>,
) -> Result<(), converge_framework::LogError> {
    let changes = changes
        .into_iter()
        .map(|change| echo.without_declined(change))
        .collect();
    let events = ctx.emit(changes).await?;
    // Forget the notes the store has passed meanwhile, so they do not pile up between
    // scans.
    if let Some(cursor) = echo.store().and_then(|store| ctx.log().cursor(&store).ok()) {
        echo.shown_up_to(cursor);
    }
    echo.note_emitted(events.iter().map(|e| e.id), ctx.log().len());
    Ok(())
}

/// Events read at a time by [`Projection::load`] looking for the ones the store has not
/// applied.
const UNSHOWN_READ: usize = 4096;

/// Scans the whole folder (`under` = `None`) or the subtree of one directory key, emits
/// what changed and, for a full scan with `report`, reports progress. The keys it finds
/// removed are handed back in `hold`, to be held and checked again before they are
/// recorded (every scan while the source runs: see `REMOVALS_QUIET` in `watch.rs`), or
/// without one recorded at once, once the folder marker is checked (the start-up scan).
pub(crate) async fn scan(
    ctx: &SourceContext,
    env: &Arc<Env>,
    under: Option<Key>,
    report: bool,
    hold: Option<&mut Vec<(Key, Option<u64>)>>,
) -> Result<(), FsError> {
    let projection = {
        let (env, under) = (env.clone(), under.clone());
        Arc::new(
            tokio::task::spawn_blocking(move || {
                Projection::load(&env.log, &env.echo, under.as_ref())
            })
            .await??,
        )
    };
    let start = match &under {
        Some(k) => env.rules.path_of(k),
        None => env.rules.root().to_owned(),
    };
    // The files the content store found changed unseen: a whole scan chunks each again
    // (see `changed_unseen`), and once it has logged what it found they are done with.
    let unseen = match under {
        None => env.chunks.changed_files(),
        Some(_) => Vec::new(),
    };
    let (tx, mut rx) = mpsc::channel::<Found>(4096);
    let stop = Arc::new(AtomicBool::new(false));
    let walk = {
        let (env, projection, stop) = (env.clone(), projection.clone(), stop.clone());
        let include_start = under.is_some();
        tokio::task::spawn_blocking(move || walk(env, projection, start, include_start, tx, stop))
    };

    // The keys found, and those found changed: a key of the projection the walk did not
    // find is removed.
    let mut seen = KeySet::new();
    let mut changed = KeySet::new();
    let mut failed: Vec<String> = Vec::new();
    let mut failed_all = false;
    let mut fatal = None;
    let mut batch = Vec::new();
    let mut progress = ScanProgress::default();
    while let Some(found) = rx.recv().await {
        match found {
            Found::Entry {
                key,
                change,
                changed_at,
                hashed,
            } => {
                progress.files += 1;
                progress.bytes += hashed;
                // Against no keys (a first sync), nothing can be found removed.
                if !projection.empty {
                    seen.insert(&key);
                }
                if let Some(op) = change {
                    if !projection.empty {
                        changed.insert(&key);
                    }
                    batch.push(LocalChange::new(key, op).made_at(changed_at));
                }
                if batch.len() >= EMIT_BATCH {
                    if let Err(e) = emit(ctx, &env.echo, std::mem::take(&mut batch)).await {
                        stop.store(true, Ordering::Relaxed);
                        fatal.get_or_insert(FsError::from(e));
                    }
                }
                if report && progress.files % 64 == 0 {
                    ctx.report(progress);
                }
            }
            Found::Failed(Some(prefix)) => failed.push(prefix),
            Found::Failed(None) => failed_all = true,
            Found::Fatal(e) => {
                stop.store(true, Ordering::Relaxed);
                fatal.get_or_insert(e);
            }
        }
        if ctx.is_shutting_down() {
            stop.store(true, Ordering::Relaxed);
        }
    }
    walk.await?;
    if let Some(e) = fatal {
        return Err(e);
    }
    if stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    let whole = failed.is_empty() && !failed_all;

    if !failed_all {
        let env2 = env.clone();
        let deletes = tokio::task::spawn_blocking(move || {
            let out = removed(&env2, &projection, &seen, &failed)?;
            let merges = merges_for_deleted_copies(&env2, &projection, &seen, &changed)?;
            Ok::<_, FsError>((out, merges))
        })
        .await??;
        let (deletes, merges) = deletes;
        match hold {
            // Handed back to be held, as the watcher's removals are (and checked again,
            // with the folder marker, when they are recorded).
            Some(hold) => hold.extend(deletes),
            None => {
                if !deletes.is_empty() {
                    crate::marker::check(env.rules.root())?;
                }
                batch.extend(
                    deletes
                        .into_iter()
                        .map(|(key, at)| LocalChange::new(key, Op::Delete).made_at(at)),
                );
            }
        }
        batch.extend(merges);
    }
    for chunk in batch.chunks(EMIT_BATCH) {
        emit(ctx, &env.echo, chunk.to_vec()).await?;
    }
    if whole && !unseen.is_empty() {
        let env = env.clone();
        tokio::task::spawn_blocking(move || env.chunks.forget_changed_files(&unseen)).await??;
    }
    if report {
        progress.total_files = Some(progress.files);
        progress.done = true;
        ctx.report(progress);
    }
    Ok(())
}

/// The keys of `projection` a scan that found `seen` (and could not read below `failed`)
/// finds removed, children before their directory, each with when it was removed (see
/// [`removed_at_ms`]). As keys the ignore rules exclude, keys at or below a symlink are
/// not the folder's, and never found removed ([`Absence::Found`]). Blocks.
fn removed(
    env: &Env,
    projection: &Projection,
    seen: &KeySet,
    failed: &[String],
) -> Result<Vec<(Key, Option<u64>)>, FsError> {
    let mut out = Vec::new();
    let mut real = HashSet::new();
    for entry in projection.states(&env.log) {
        let (key, heads) = entry?;
        let k = key.as_str();
        let below = |f: &String| {
            k.strip_prefix(f.as_str())
                .is_some_and(|r| r.starts_with('/'))
        };
        if seen.contains(&key) || failed.iter().any(|f| k == f || below(f)) {
            continue;
        }
        let is_dir = heads.iter().any(|h| head_kind(h) == Some(EntryKind::Dir));
        if env.rules.ignores(&env.rules.path_of(&key), is_dir, true)
            || !gone(env, &key, &heads, Absence::Found, &mut real)
            || !projection.shows(&env.log, &heads)
        {
            continue;
        }
        let removed_at = removed_at_ms(&env.rules, &key);
        out.push((key, removed_at));
    }
    // Children before their directory.
    out.reverse();
    Ok(out)
}

/// Merges for the conflict copies deleted while the daemon was stopped (the watcher sees
/// the ones deleted while it runs, see `merge_for_deleted_copy`): for a conflicted key
/// whose file is there and unchanged (`seen`, not `changed`) and a copy of which is
/// missing, the winner's operation recorded again, which names every head and so keeps
/// what the key shows. Only for conflicts the folder's store has applied in full, and not
/// for a key it has yet to show ([`Echo::awaits_store`]), so that a copy not written yet is
/// not taken for one deleted.
fn merges_for_deleted_copies(
    env: &Env,
    projection: &Projection,
    seen: &KeySet,
    changed: &KeySet,
) -> Result<Vec<LocalChange>, FsError> {
    let Some(store) = env.echo.store() else {
        return Ok(Vec::new());
    };
    let cursor = env.log.cursor(&store)?;
    let mut merges = Vec::new();
    for entry in projection.states(&env.log) {
        let (key, heads) = entry?;
        if heads.len() < 2 {
            continue;
        }
        if !seen.contains(&key) || changed.contains(&key) || env.echo.awaits_store(&key) {
            continue;
        }
        let mut applied = true;
        for head in &heads {
            applied &= env.log.offset_of(&head.id)?.is_some_and(|o| o < cursor);
        }
        if !applied {
            continue;
        }
        let merged = merge_for_deleted_copy(env, &key, &heads, |copy| {
            std::fs::symlink_metadata(env.rules.path_of(copy))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        });
        if let Some((copy, merge)) = merged {
            tracing::info!("{copy} was deleted while the daemon was stopped: {key} keeps what it shows, and its conflict is merged");
            merges.push(merge.made_at(removed_at_ms(&env.rules, &copy)));
        }
    }
    Ok(merges)
}

/// The merge that ends the conflict of `key`, shown by `heads`, keeping what it shows
/// (DESIGN §2: a conflict copy deleted by hand means "keep the winner"), if one of the
/// copies its heads make is `deleted`: the winner's operation again, which names every
/// head as a parent; with that copy's name.
pub(crate) fn merge_for_deleted_copy(
    env: &Env,
    key: &Key,
    heads: &[Head],
    mut deleted: impl FnMut(&Key) -> bool,
) -> Option<(Key, LocalChange)> {
    let (Some(winner), copies) = env.resolver.pick(key, heads) else {
        return None;
    };
    let (copy, _, _) = file_copies(key, copies).find(|(copy, _, _)| deleted(copy))?;
    Some((copy, LocalChange::new(key.clone(), winner.op.clone())))
}

/// The parallel walk; runs on a blocking thread and its own walker threads.
fn walk(
    env: Arc<Env>,
    projection: Arc<Projection>,
    start: PathBuf,
    include_start: bool,
    tx: mpsc::Sender<Found>,
    stop: Arc<AtomicBool>,
) {
    let filter_env = env.clone();
    let walker = WalkBuilder::new(&start)
        .standard_filters(false)
        .follow_links(false)
        .threads(0)
        .filter_entry(move |entry| {
            let path = entry.path();
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            if filter_env.rules.ignores(path, is_dir, false) {
                return false;
            }
            if path == filter_env.rules.root() {
                return true;
            }
            match filter_env.rules.key_of(path) {
                Ok(_) => true,
                Err(why) => {
                    tracing::warn!("{why}");
                    false
                }
            }
        })
        .build_parallel();
    walker.run(|| {
        let (projection, stop) = (projection.clone(), stop.clone());
        let mut out = Outbox {
            env: env.clone(),
            tx: tx.clone(),
            gathered: Gathered::default(),
            held: Vec::new(),
        };
        Box::new(move |result| {
            if stop.load(Ordering::Relaxed) {
                return WalkState::Quit;
            }
            let env = &out.env;
            let found = match result {
                Err(err) => {
                    tracing::warn!("scan: {err}");
                    Found::Failed(
                        error_path(&err)
                            .and_then(|p| env.rules.key_of(p).ok())
                            .map(|k| k.to_string()),
                    )
                }
                Ok(entry) => {
                    if entry.depth() == 0 && !include_start {
                        return WalkState::Continue;
                    }
                    let before = out.gathered.files();
                    let file_type = entry.file_type();
                    match visit(env, &projection, entry.path(), file_type, &mut out.gathered) {
                        Some(found) if out.gathered.files() != before => {
                            return if out.hold(found) {
                                WalkState::Continue
                            } else {
                                WalkState::Quit
                            };
                        }
                        Some(found) => found,
                        None => return WalkState::Continue,
                    }
                }
            };
            if out.tx.blocking_send(found).is_ok() {
                WalkState::Continue
            } else {
                WalkState::Quit
            }
        })
    });
}

/// What the scan finds of the regular file at `path`, looked at as `looked`.
fn file_found(
    env: &Env,
    projection: &Projection,
    (key, heads): (Key, &[Head]),
    path: &Path,
    looked: Looked<'_>,
    writes: u64,
    gathered: &mut Gathered,
) -> Found {
    let meta = looked.meta();
    match examine_file(env, &key, path, looked, writes, heads, Some(gathered)) {
        Ok((change, hashed)) => Found::Entry {
            // Not yet shown by the store: a file in a state the log knows is what the
            // store is to replace. One it does not know is a local change, which the
            // store waits on (it replaces no unrecorded change).
            change: change.filter(|_| {
                projection.shows(&env.log, heads)
                    || !known_state(&env.log, &env.echo, &key, path, meta)
            }),
            key,
            changed_at: changed_at_ms(meta),
            hashed,
        },
        Err(e @ FsError::Io { .. }) => {
            tracing::warn!("scan: {e}");
            Found::Failed(Some(key.to_string()))
        }
        // Shutting down: this scan's findings no longer count.
        Err(FsError::Stopped { .. }) => Found::Failed(None),
        Err(e) => Found::Fatal(e),
    }
}

/// What one walker thread found, on its way to the scan: the findings of files whose
/// chunks were gathered (see [`Gathered`]) wait until those are stored; everything else
/// goes at once. Whatever is held when the walk ends is stored and let out on drop.
struct Outbox {
    env: Arc<Env>,
    tx: mpsc::Sender<Found>,
    gathered: Gathered,
    held: Vec<Found>,
}

impl Outbox {
    /// Holds `found`, the finding of a file gathered, until the gathering is stored (now,
    /// if it is full); whether the scan still listens.
    fn hold(&mut self, found: Found) -> bool {
        self.held.push(found);
        !self.gathered.is_full() || self.flush()
    }

    /// Stores what is gathered and lets out what was held; whether the scan still
    /// listens. A failure to store is fatal to the scan, as it is for a file stored alone,
    /// and sent before anything held: the changes naming those chunks never go out.
    fn flush(&mut self) -> bool {
        let held = std::mem::take(&mut self.held);
        if let Err(e) = self.gathered.store(&self.env.chunks) {
            return self.tx.blocking_send(Found::Fatal(e.into())).is_ok();
        }
        held.into_iter()
            .all(|found| self.tx.blocking_send(found).is_ok())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if !self.held.is_empty() || !self.gathered.is_empty() {
            self.flush();
        }
    }
}

/// Looks at one walked entry, a `file_type` as the walk read it from its directory; a
/// small file's chunks are left in `gathered`.
fn visit(
    env: &Env,
    projection: &Projection,
    path: &Path,
    file_type: Option<FileType>,
    gathered: &mut Gathered,
) -> Option<Found> {
    let key = env.rules.key_of(path).ok()?;
    let writes = env.echo.writes();
    let heads = match projection.heads(&env.log, &key) {
        Ok(heads) => heads,
        Err(e) => return Some(Found::Fatal(e)),
    };
    // A file the log does not know is read whatever its stat: opened at once, the stat of
    // the open handle is the look, with no `lstat` walking its path first (7% of the
    // sender's CPU in W1 of `bench/daemon/run.py`). Anything else there (a symlink or a
    // FIFO swapped in since the walk), or a file that does not open, is looked at as usual,
    // and what that look finds is reported.
    if file_type.is_some_and(|t| t.is_file()) && heads.is_empty() {
        if let Ok((file, meta)) = open_file(path) {
            env.echo.look(&key, writes);
            let looked = Looked::Opened(&file, &meta);
            return Some(file_found(
                env,
                projection,
                (key, &heads),
                path,
                looked,
                writes,
                gathered,
            ));
        }
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("scan: reading {}: {e}", path.display());
            return Some(Found::Failed(Some(key.to_string())));
        }
    };
    if meta.is_file() || meta.is_dir() {
        env.echo.look(&key, writes);
    }
    if meta.is_dir() {
        let change = examine_dir(env, &key, &meta, &heads, || {
            projection.live_below(&env.log, &key, &env.resolver)
        })
        // Not yet shown by the store: the directory may be what it is to remove.
        .filter(|_| projection.shows(&env.log, &heads));
        Some(Found::Entry {
            key,
            change,
            changed_at: changed_at_ms(&meta),
            hashed: 0,
        })
    } else if meta.is_file() {
        Some(file_found(
            env,
            projection,
            (key, &heads),
            path,
            Looked::Path(&meta),
            writes,
            gathered,
        ))
    } else if meta.file_type().is_symlink() {
        tracing::warn!(
            "skipping symlink {} (symlinks are not followed)",
            path.display()
        );
        None
    } else {
        tracing::debug!(
            "skipping {}: not a regular file or directory",
            path.display()
        );
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::content::GATHER_FILES;

    fn env(root: &Path) -> Env {
        Env::for_tests(root)
    }

    /// A subtree's projection holds the directory and the keys below it, and no key
    /// that merely starts with its name; one loaded while the log held none of its keys
    /// (a first sync) takes every key's heads as none, even once keys come.
    #[tokio::test]
    async fn a_subtree_projection_holds_the_subtree_alone() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(dir.path());
        let dir_op = || Op::Put {
            meta: Meta::dir(0),
            content: None,
        };
        let changes = ["a", "d", "d/x", "d/y", "d/y/z", "d0", "d-e", "e"]
            .into_iter()
            .map(|k| LocalChange::new(Key::new(k).unwrap(), dir_op()))
            .collect();
        env.log.append_local(changes).await.unwrap();

        let keys = |projection: &Projection| -> Vec<String> {
            projection
                .states(&env.log)
                .map(|e| e.unwrap().0.to_string())
                .collect()
        };
        let under = Key::new("d").unwrap();
        let projection = Projection::load(&env.log, &env.echo, Some(&under)).unwrap();
        assert_eq!(keys(&projection), ["d", "d/x", "d/y", "d/y/z"]);
        let all = Projection::load(&env.log, &env.echo, None).unwrap();
        assert_eq!(keys(&all).len(), 8);
        let d_x = Key::new("d/x").unwrap();
        assert_eq!(projection.heads(&env.log, &d_x).unwrap().len(), 1);

        // Loaded while the log held none of its keys (a first sync), a projection takes
        // every key's heads as none, even once the keys come.
        let first = Env::for_tests(dir.path());
        let empty = Projection::load(&first.log, &first.echo, None).unwrap();
        let sub = Projection::load(&env.log, &env.echo, Some(&Key::new("e/f").unwrap()));
        assert!(sub.unwrap().empty, "no key at or below e/f");
        first
            .log
            .append_local(vec![LocalChange::new(d_x.clone(), dir_op())])
            .await
            .unwrap();
        assert_eq!(first.log.heads(&d_x).unwrap().len(), 1);
        assert!(empty.heads(&first.log, &d_x).unwrap().is_empty());
        assert!(keys(&empty).is_empty());
        assert!(!empty.live_below(&first.log, &Key::new("d").unwrap(), &first.resolver));
    }

    /// What a scan finds removed: keys of the projection it did not find, shown by the
    /// folder, children before their directory; not a key it found, nor one below a
    /// directory it could not read, nor a peer's key the store has not written yet.
    #[tokio::test]
    async fn removals_are_shown_keys_not_found_children_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let env = env(&root);
        env.echo.set_store("store");
        let put = |k: &str| {
            let op = if k.ends_with(".txt") {
                Op::Put {
                    content: Some(converge_api::ContentRef {
                        root: converge_api::Hash::of(k.as_bytes()),
                        size: 1,
                        depth: 0,
                    }),
                    meta: Meta::file(1),
                }
            } else {
                Op::Put {
                    content: None,
                    meta: Meta::dir(0),
                }
            };
            LocalChange::new(Key::new(k).unwrap(), op)
        };
        let keys = [
            "a", "a/f.txt", "b", "b/g.txt", "c.txt", "d", "d/h.txt", "d0.txt", "x.txt",
        ];
        env.log
            .append_local(keys.iter().map(|k| put(k)).collect())
            .await
            .unwrap();
        env.log.set_cursor("store", env.log.len()).await.unwrap();
        // On disk, and found by the walk: b, b/g.txt and c.txt; d could not be read;
        // x.txt was found and is gone since (the watcher's to record).
        std::fs::create_dir(root.join("b")).unwrap();
        std::fs::write(root.join("b/g.txt"), b"g").unwrap();
        std::fs::write(root.join("c.txt"), b"c").unwrap();
        let projection = Projection::load(&env.log, &env.echo, None).unwrap();
        // A peer's new key, appended after the scan began and not written yet.
        env.log.append_local(vec![put("e.txt")]).await.unwrap();
        let mut seen = KeySet::new();
        for k in ["b", "b/g.txt", "c.txt", "x.txt"] {
            seen.insert(&Key::new(k).unwrap());
        }
        let failed = vec!["d".to_owned()];

        let removed: Vec<String> = removed(&env, &projection, &seen, &failed)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(removed, ["d0.txt", "a/f.txt", "a"]);
    }

    /// The window between looking at a file and reading it: a file written in it (its
    /// stat no longer the one looked at) is not recorded from that read.
    #[test]
    fn a_file_changed_while_examined_is_not_recorded_from_that_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let env = env(&root);
        let path = root.join("f.txt");
        let key = Key::new("f.txt").unwrap();
        std::fs::write(&path, b"first").unwrap();
        let looked_at = std::fs::symlink_metadata(&path).unwrap();
        std::fs::write(&path, b"second, being written").unwrap();

        let (op, _) =
            examine_file(&env, &key, &path, Looked::Path(&looked_at), 0, &[], None).unwrap();
        assert_eq!(op, None);
        let now = std::fs::symlink_metadata(&path).unwrap();
        let (op, _) = examine_file(&env, &key, &path, Looked::Path(&now), 0, &[], None).unwrap();
        let Some(Op::Put {
            content: Some(c),
            meta,
        }) = op
        else {
            panic!("{op:?}")
        };
        assert_eq!(c.size, 21);
        // The read is noted for the store (see `Echo::note_read`), as recorded.
        assert!(env.echo.take_read(&key, Applied::file(&c, &meta)));
    }

    /// A file the log does not know is opened rather than looked up, and recorded from
    /// that open; what opens must still be a regular file: a symlink or a FIFO swapped in
    /// since the walk read a regular file's entry is skipped, as the walk's own look skips
    /// it, and nothing it leads to is read.
    #[test]
    fn a_new_file_is_read_from_its_open_and_only_if_regular() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"not in the folder").unwrap();
        let env = env(&root);
        let path = root.join("f.txt");
        std::fs::write(&path, b"new content").unwrap();
        let regular = std::fs::symlink_metadata(&path).unwrap().file_type();
        let projection = Projection::load(&env.log, &env.echo, None).unwrap();
        let mut gathered = Gathered::default();

        let found = visit(&env, &projection, &path, Some(regular), &mut gathered);
        let Some(Found::Entry {
            change:
                Some(Op::Put {
                    content: Some(content),
                    ..
                }),
            ..
        }) = found
        else {
            panic!("the new file is not recorded");
        };
        assert_eq!(content.size, 11);

        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        let found = visit(&env, &projection, &path, Some(regular), &mut gathered);
        assert!(found.is_none(), "a symlink swapped in is recorded");

        std::fs::remove_file(&path).unwrap();
        let fifo = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let found = visit(&env, &projection, &path, Some(regular), &mut gathered);
        assert!(found.is_none(), "a FIFO swapped in is recorded");
    }

    /// A walker thread's small files: their chunks are gathered, and what it found waits
    /// until they are stored, by a full gathering or at the end of the walk.
    #[test]
    fn findings_wait_for_the_chunks_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let env = Arc::new(env(&root));
        let (tx, mut rx) = mpsc::channel(2 * GATHER_FILES);
        let mut out = Outbox {
            env: env.clone(),
            tx,
            gathered: Gathered::default(),
            held: Vec::new(),
        };
        let mut roots = Vec::new();
        for i in 0..GATHER_FILES + 2 {
            let path = root.join(format!("f{i}"));
            std::fs::write(&path, format!("file {i}").repeat(100)).unwrap();
            let key = Key::new(format!("f{i}")).unwrap();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let gathered = Some(&mut out.gathered);
            let (op, _) =
                examine_file(&env, &key, &path, Looked::Path(&meta), 0, &[], gathered).unwrap();
            let Some(Op::Put {
                content: Some(content),
                ..
            }) = &op
            else {
                panic!("{op:?}")
            };
            assert!(!env.chunks.contains(&content.root).unwrap(), "f{i}");
            roots.push(content.root);
            let found = Found::Entry {
                key,
                change: op,
                changed_at: None,
                hashed: 0,
            };
            assert!(out.hold(found));
            let sent = std::iter::from_fn(|| rx.try_recv().ok()).count();
            // The last of a full gathering lets them all out, stored.
            let expected = if i + 1 == GATHER_FILES {
                GATHER_FILES
            } else {
                0
            };
            assert_eq!(sent, expected, "after f{i}");
        }
        for (i, root) in roots.iter().enumerate().take(GATHER_FILES) {
            assert!(env.chunks.contains(root).unwrap(), "f{i}");
        }
        assert!(!env.chunks.contains(&roots[GATHER_FILES]).unwrap());
        // The walk ends: the rest is stored and let out.
        drop(out);
        assert!(roots.iter().all(|root| env.chunks.contains(root).unwrap()));
        let mut sent = Vec::new();
        while let Ok(Found::Entry { key, .. }) = rx.try_recv() {
            sent.push(key.to_string());
        }
        assert_eq!(
            sent,
            [format!("f{GATHER_FILES}"), format!("f{}", GATHER_FILES + 1)]
        );
    }

    /// Another file renamed over the one looked at, with the same size, mtime and mode, is
    /// not recorded from a read of it under the stat of the first: the read is of another
    /// inode.
    #[test]
    fn a_file_replaced_while_examined_is_not_recorded_from_that_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let env = env(&root);
        let (path, other) = (root.join("f.txt"), root.join("g.txt"));
        let key = Key::new("f.txt").unwrap();
        std::fs::write(&path, b"first").unwrap();
        let looked_at = std::fs::symlink_metadata(&path).unwrap();
        std::fs::write(&other, b"other").unwrap();
        let mtime = filetime::FileTime::from_last_modification_time(&looked_at);
        filetime::set_file_mtime(&other, mtime).unwrap();
        std::fs::rename(&other, &path).unwrap();
        let now = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(file_stat(&now), file_stat(&looked_at));

        let (op, _) =
            examine_file(&env, &key, &path, Looked::Path(&looked_at), 0, &[], None).unwrap();
        assert_eq!(op, None);
        let (op, _) = examine_file(&env, &key, &path, Looked::Path(&now), 0, &[], None).unwrap();
        assert!(matches!(op, Some(Op::Put { .. })), "{op:?}");
    }
}
