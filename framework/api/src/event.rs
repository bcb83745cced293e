//! The data model: replicas, event ids, hybrid logical clocks, keys, content references and events.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_tuple::{Deserialize_tuple, Serialize_tuple};

use crate::error::{IdError, KeyError};

/// Longest key accepted, in bytes. Long enough for deep paths, short enough to bound memory.
pub const MAX_KEY_LEN: usize = 4096;

macro_rules! byte_array_serde {
    ($ty:ident, $len:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        write!(f, "{} bytes", $len)
                    }
                    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<$ty, E> {
                        <[u8; $len]>::try_from(v)
                            .map($ty)
                            .map_err(|_| E::invalid_length(v.len(), &self))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    };
}

/// Identity of one replica (one device's copy of the data): 16 random bytes.
///
/// Shown like a Syncthing device ID: lowercase base32 without padding, in groups of
/// seven characters joined by `-` (`aaaaaaa-bbbbbbb-ccccccc-ddddd`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(pub [u8; 16]);
byte_array_serde!(ReplicaId, 16);

const ID_GROUP: usize = 7;

impl ReplicaId {
    /// A fresh random identity, from the operating system's random source.
    pub fn random() -> Result<Self, IdError> {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes).map_err(|e| IdError::Random(e.to_string()))?;
        Ok(ReplicaId(bytes))
    }

    /// A short form for logs and metric labels: the first group of the full form.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(ID_GROUP);
        s
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = data_encoding::BASE32_NOPAD
            .encode(&self.0)
            .to_ascii_lowercase();
        for (i, chunk) in plain.as_bytes().chunks(ID_GROUP).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            // base32 output is ASCII, so every chunk is valid UTF-8.
            f.write_str(std::str::from_utf8(chunk).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicaId({self})")
    }
}

impl FromStr for ReplicaId {
    type Err = IdError;

    /// Parses the printed form; dashes and case are ignored.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let plain: String = s
            .chars()
            .filter(|c| *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(plain.as_bytes())
            .map_err(|_| IdError::Malformed(s.to_owned()))?;
        <[u8; 16]>::try_from(bytes.as_slice())
            .map(ReplicaId)
            .map_err(|_| IdError::Malformed(s.to_owned()))
    }
}

/// A dot: the `seq`-th event written by replica `origin`. Each replica numbers its own
/// events 1, 2, 3, … without gaps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize_tuple, Deserialize_tuple)]
pub struct EventId {
    /// The replica that wrote the event.
    pub origin: ReplicaId,
    /// Its position in that replica's own sequence, starting at 1.
    pub seq: u64,
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin.short(), self.seq)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin, self.seq)
    }
}

/// A hybrid logical clock reading: wall-clock milliseconds plus a logical counter that
/// breaks ties and carries causality when clocks disagree.
///
/// Ordered by `(wall_ms, logical)`; with the origin it gives the total order that
/// last-write-wins uses.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize_tuple,
    Deserialize_tuple,
)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as the writing replica saw them (never decreasing).
    pub wall_ms: u64,
    /// Counter within one millisecond.
    pub logical: u32,
}

/// Where a clock reads the time from; tests pass a fake one.
pub trait WallClock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

impl Hlc {
    /// The next reading for a local event: greater than `self`, and than the wall clock
    /// when the wall clock is ahead. Monotonic even if the wall clock goes backwards.
    pub fn tick(self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms {
            Hlc {
                wall_ms: now_ms,
                logical: 0,
            }
        } else {
            self.bump()
        }
    }

    /// The reading after seeing a remote event stamped `remote`: greater than both.
    pub fn observe(self, remote: Hlc, now_ms: u64) -> Hlc {
        let wall = self.wall_ms.max(remote.wall_ms).max(now_ms);
        let logical = if wall == self.wall_ms && wall == remote.wall_ms {
            self.logical.max(remote.logical).saturating_add(1)
        } else if wall == self.wall_ms {
            self.logical.saturating_add(1)
        } else if wall == remote.wall_ms {
            remote.logical.saturating_add(1)
        } else {
            0
        };
        Hlc {
            wall_ms: wall,
            logical,
        }
    }

    fn bump(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc {
                wall_ms: self.wall_ms,
                logical,
            },
            // 4 billion events in one millisecond: borrow the next millisecond (at the
            // very end of the range, which only a peer's bogus stamp reaches, stay there
            // rather than wrap to 0).
            None => match self.wall_ms.checked_add(1) {
                Some(wall_ms) => Hlc {
                    wall_ms,
                    logical: 0,
                },
                None => self,
            },
        }
    }
}

/// A validated key: a relative, normalized, `/`-separated UTF-8 path such as `docs/a.txt`.
///
/// Construction checks the rules of [`Key::new`]; every key that enters the system (from a
/// local source, the network or the admin API) goes through it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Key(String);

impl Key {
    /// Validates `s` as a key: not empty, at most [`MAX_KEY_LEN`] bytes, no leading or
    /// trailing `/`, no empty, `.` or `..` segment, no backslash, no NUL or other control
    /// character.
    pub fn new(s: impl Into<String>) -> Result<Key, KeyError> {
        let s = s.into();
        validate_key(&s)?;
        Ok(Key(s))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's parent directory key, if it has one (`a/b/c` → `a/b`).
    pub fn parent(&self) -> Option<Key> {
        self.0.rfind('/').map(|i| Key(self.0[..i].to_owned()))
    }

    /// Whether `self` lies strictly below the directory key `dir`.
    pub fn is_under(&self, dir: &Key) -> bool {
        self.0.len() > dir.0.len()
            && self.0.starts_with(&dir.0)
            && self.0.as_bytes()[dir.0.len()] == b'/'
    }
}

fn validate_key(s: &str) -> Result<(), KeyError> {
    let err = |reason: &'static str| KeyError {
        key: s.escape_debug().to_string(),
        reason,
    };
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.len() > MAX_KEY_LEN {
        return Err(err("longer than 4096 bytes"));
    }
    if s.starts_with('/') {
        return Err(err("absolute (starts with '/')"));
    }
    if s.contains('\\') {
        return Err(err("contains a backslash"));
    }
    if s.contains('\0') {
        return Err(err("contains NUL"));
    }
    if s.chars().any(char::is_control) {
        return Err(err("contains a control character"));
    }
    for segment in s.split('/') {
        match segment {
            "" => return Err(err("has an empty segment")),
            "." => return Err(err("has a '.' segment")),
            ".." => return Err(err("has a '..' segment")),
            _ => {}
        }
    }
    Ok(())
}

impl<'de> Deserialize<'de> for Key {
    /// Keys are validated while decoding, so nothing from disk or the network skips the check.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Key::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for Key {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Key::new(s)
    }
}

/// A BLAKE3 hash: the address of a chunk in the content store. Ordered as its bytes are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash(pub [u8; 32]);
byte_array_serde!(Hash, 32);

impl Ord for Hash {
    /// The bytes' order, decided by the first 8 as one big-endian integer when those
    /// differ, as they almost always do: a byte-wise comparison of the whole array is a
    /// `memcmp` call, and the content store's lookups and sorts made enough of them to be
    /// 3% of either daemon's CPU in a W1 sync (a `perf` profile).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.prefix()
            .cmp(&other.prefix())
            .then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for Hash {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Hash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    /// The first 8 bytes, as a number that orders as they do (big-endian): a hash's place
    /// among uniformly spread hashes, and the first step of comparing two.
    pub fn prefix(&self) -> u64 {
        let mut p = [0; 8];
        p.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(p)
    }

    /// Lowercase hex, for logs and the admin API.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", &self.to_hex()[..12])
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A reference to content held in the content store: the root of a small tree of chunks
/// (see [`crate::content`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize_tuple, Deserialize_tuple)]
pub struct ContentRef {
    /// Hash of the root chunk.
    pub root: Hash,
    /// Length of the whole content in bytes.
    pub size: u64,
    /// Levels of index nodes above the data chunks: 0 means `root` is the only data chunk.
    pub depth: u8,
}

/// What kind of entry a `Put` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file, with content.
    File,
    /// A directory (no content), so that empty directories sync too.
    Dir,
}

/// File metadata carried by a `Put`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize_tuple, Deserialize_tuple)]
pub struct Meta {
    /// File or directory.
    pub kind: EntryKind,
    /// Modification time in milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// Whether the owner-executable bit is set.
    pub executable: bool,
}

impl Meta {
    /// Metadata of a plain, non-executable file.
    pub fn file(mtime_ms: i64) -> Meta {
        Meta {
            kind: EntryKind::File,
            mtime_ms,
            executable: false,
        }
    }

    /// Metadata of a directory.
    pub fn dir(mtime_ms: i64) -> Meta {
        Meta {
            kind: EntryKind::Dir,
            mtime_ms,
            executable: false,
        }
    }
}

/// What an event does to its key.
///
/// Encoded positionally like the other event types: `[0, content, meta]` for a put,
/// `[1]` for a delete.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Sets the key's value: a file with content, or a directory (`content` is `None`).
    Put {
        /// The content, for files.
        content: Option<ContentRef>,
        /// Kind, time and mode.
        meta: Meta,
    },
    /// Removes the key.
    Delete,
}

const OP_PUT: u8 = 0;
const OP_DELETE: u8 = 1;

impl Serialize for Op {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        match self {
            Op::Put { content, meta } => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element(&OP_PUT)?;
                t.serialize_element(content)?;
                t.serialize_element(meta)?;
                t.end()
            }
            Op::Delete => {
                let mut t = s.serialize_tuple(1)?;
                t.serialize_element(&OP_DELETE)?;
                t.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Op {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Op;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an operation: [0, content, meta] or [1]")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Op, A::Error> {
                use serde::de::Error;
                let tag: u8 = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                match tag {
                    OP_PUT => {
                        let content = seq
                            .next_element()?
                            .ok_or_else(|| A::Error::invalid_length(1, &self))?;
                        let meta = seq
                            .next_element()?
                            .ok_or_else(|| A::Error::invalid_length(2, &self))?;
                        Ok(Op::Put { content, meta })
                    }
                    OP_DELETE => Ok(Op::Delete),
                    other => Err(A::Error::custom(format!("unknown operation {other}"))),
                }
            }
        }
        d.deserialize_seq(V)
    }
}

impl Op {
    /// The content this operation needs present before it can be applied.
    pub fn content(&self) -> Option<&ContentRef> {
        match self {
            Op::Put { content, .. } => content.as_ref(),
            Op::Delete => None,
        }
    }
}

/// One change to one key, the unit the log stores and replicas exchange.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize_tuple, Deserialize_tuple)]
pub struct Event {
    /// Who wrote it and its place in their sequence.
    pub id: EventId,
    /// When, by the writer's hybrid logical clock.
    pub hlc: Hlc,
    /// The key it changes.
    pub key: Key,
    /// The heads of `key` the writer knew when it wrote this event (what it supersedes).
    pub parents: Vec<EventId>,
    /// What it does.
    pub op: Op,
}

impl Event {
    /// The last-write-wins order of this event: `(hlc, origin)`, total and the same everywhere.
    pub fn lww_rank(&self) -> (Hlc, ReplicaId) {
        (self.hlc, self.id.origin)
    }

    /// A digest of everything the event says: id, clock, key, parents and operation,
    /// laid out field by field rather than taken from an encoding, so that it does not
    /// change with the encoding's format version. Two replicas that hold an event with
    /// the same id and different fingerprints hold two events under one id: two data dirs
    /// have acted as the same replica (one copied, or restored from a backup), and their
    /// events can never converge.
    pub fn fingerprint(&self) -> Hash {
        let mut h = blake3::Hasher::new();
        let id = |h: &mut blake3::Hasher, id: &EventId| {
            h.update(&id.origin.0);
            h.update(&id.seq.to_le_bytes());
        };
        id(&mut h, &self.id);
        h.update(&self.hlc.wall_ms.to_le_bytes());
        h.update(&self.hlc.logical.to_le_bytes());
        h.update(&(self.key.as_str().len() as u64).to_le_bytes());
        h.update(self.key.as_str().as_bytes());
        h.update(&(self.parents.len() as u64).to_le_bytes());
        for parent in &self.parents {
            id(&mut h, parent);
        }
        match &self.op {
            Op::Delete => {
                h.update(&[0]);
            }
            Op::Put { content, meta } => {
                h.update(&[1]);
                match content {
                    None => h.update(&[0]),
                    Some(c) => h
                        .update(&[1])
                        .update(&c.root.0)
                        .update(&c.size.to_le_bytes())
                        .update(&[c.depth]),
                };
                let kind = match meta.kind {
                    EntryKind::File => 0,
                    EntryKind::Dir => 1,
                };
                h.update(&[kind, u8::from(meta.executable)]);
                h.update(&meta.mtime_ms.to_le_bytes());
            }
        }
        Hash(*h.finalize().as_bytes())
    }
}

/// For each origin, the highest sequence number held without a gap below it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(pub BTreeMap<ReplicaId, u64>);

impl VersionVector {
    /// An empty vector: nothing held.
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest contiguous seq held from `origin` (0 when none).
    pub fn get(&self, origin: &ReplicaId) -> u64 {
        self.0.get(origin).copied().unwrap_or(0)
    }

    /// Sets the entry for `origin`.
    pub fn set(&mut self, origin: ReplicaId, seq: u64) {
        self.0.insert(origin, seq);
    }

    /// Whether the event `id` is covered by this vector.
    pub fn contains(&self, id: &EventId) -> bool {
        id.seq <= self.get(&id.origin)
    }

    /// Raises every entry to at least `other`'s.
    pub fn merge(&mut self, other: &VersionVector) {
        for (origin, seq) in &other.0 {
            let entry = self.0.entry(*origin).or_insert(0);
            *entry = (*entry).max(*seq);
        }
    }

    /// Whether every entry of `other` is covered by `self`.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(o, s)| self.get(o) >= *s)
    }

    /// Total number of events covered.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint covers every field, and its layout never changes: replicas of
    /// different versions compare fingerprints in `Hello`.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_fingerprint_covers_every_field_and_keeps_its_layout() {
        let event = Event {
            id: EventId {
                origin: ReplicaId([1; 16]),
                seq: 7,
            },
            hlc: Hlc {
                wall_ms: 1_700_000_000_000,
                logical: 3,
            },
            key: Key::new("docs/a.txt").unwrap(),
            parents: vec![EventId {
                origin: ReplicaId([2; 16]),
                seq: 5,
            }],
            op: Op::Put {
                content: Some(ContentRef {
                    root: Hash([9; 32]),
                    size: 1234,
                    depth: 1,
                }),
                meta: Meta::file(1_699_999_999_000),
            },
        };
        assert_eq!(
            event.fingerprint().to_hex(),
            "0ead205f89ae75942438a37f8504c5beea8246f2af72fd68f650bb29625f2811"
        );
        let put = |content: Option<ContentRef>, meta: Meta| Event {
            op: Op::Put { content, meta },
            ..event.clone()
        };
        let content = ContentRef {
            root: Hash([9; 32]),
            size: 1234,
            depth: 1,
        };
        let meta = Meta::file(1_699_999_999_000);
        let changed: Vec<Event> = vec![
            Event {
                id: EventId {
                    origin: ReplicaId([3; 16]),
                    ..event.id
                },
                ..event.clone()
            },
            Event {
                hlc: Hlc {
                    wall_ms: 1_700_000_000_001,
                    ..event.hlc
                },
                ..event.clone()
            },
            put(
                Some(ContentRef {
                    root: Hash([8; 32]),
                    ..content
                }),
                meta.clone(),
            ),
            put(
                Some(ContentRef {
                    size: 1235,
                    ..content
                }),
                meta.clone(),
            ),
            put(
                Some(ContentRef {
                    depth: 2,
                    ..content
                }),
                meta.clone(),
            ),
            put(
                Some(content),
                Meta {
                    executable: true,
                    ..meta.clone()
                },
            ),
            put(Some(content), Meta::file(1_699_999_999_001)),
            Event {
                id: EventId { seq: 8, ..event.id },
                ..event.clone()
            },
            Event {
                hlc: Hlc {
                    logical: 4,
                    ..event.hlc
                },
                ..event.clone()
            },
            Event {
                key: Key::new("docs/b.txt").unwrap(),
                ..event.clone()
            },
            Event {
                parents: Vec::new(),
                ..event.clone()
            },
            Event {
                op: Op::Delete,
                ..event.clone()
            },
            Event {
                op: Op::Put {
                    content: None,
                    meta: Meta::file(1_699_999_999_000),
                },
                ..event.clone()
            },
            Event {
                op: Op::Put {
                    content: None,
                    meta: Meta::dir(1_699_999_999_000),
                },
                ..event.clone()
            },
        ];
        let mut seen = std::collections::HashSet::new();
        seen.insert(event.fingerprint());
        for other in &changed {
            assert!(seen.insert(other.fingerprint()), "{other:?}");
        }
    }

    /// Hashes order as their bytes do, whichever byte first differs.
    #[test]
    fn hashes_order_as_their_bytes() {
        let at = |i: usize, v: u8| {
            let mut h = [0x80u8; 32];
            h[i] = v;
            Hash(h)
        };
        for i in [0, 7, 8, 31] {
            for (a, b) in [(0u8, 0xff), (0x7f, 0x80), (0x80, 0x81)] {
                let (x, y) = (at(i, a), at(i, b));
                assert_eq!(x.cmp(&y), x.0.cmp(&y.0), "byte {i}: {a} against {b}");
                assert_eq!(y.cmp(&x), y.0.cmp(&x.0), "byte {i}: {b} against {a}");
            }
            assert_eq!(at(i, 3).cmp(&at(i, 3)), std::cmp::Ordering::Equal);
        }
    }

    #[test]
    fn replica_id_round_trips_through_its_printed_form() {
        let id = ReplicaId([7u8; 16]);
        let printed = id.to_string();
        assert!(printed
            .chars()
            .all(|c| c == '-' || c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(printed.split('-').count(), 4);
        assert_eq!(printed.parse::<ReplicaId>().ok(), Some(id));
        assert_eq!(printed.to_uppercase().parse::<ReplicaId>().ok(), Some(id));
        assert!("not-an-id".parse::<ReplicaId>().is_err());
    }

    fn check_key(input: &str, valid: bool) {
        assert_eq!(Key::new(input).is_ok(), valid, "key {input:?}");
    }

    #[test]
    fn key_validation() {
        for ok in [
            "a",
            "a/b",
            "dir/sub/file.txt",
            "with space/ünïcode.md",
            ".hidden",
            "a..b",
            "..a",
        ] {
            check_key(ok, true);
        }
        for bad in [
            "", "/abs", "a/", "a//b", "./a", "a/./b", "..", "a/../b", "a\\b", "a\0b", "a\nb",
        ] {
            check_key(bad, false);
        }
        check_key(&"x".repeat(MAX_KEY_LEN), true);
        check_key(&"x".repeat(MAX_KEY_LEN + 1), false);
    }

    #[test]
    fn key_parent_and_under() {
        let k = Key::new("a/b/c").unwrap();
        assert_eq!(k.parent(), Key::new("a/b").ok());
        assert!(k.is_under(&Key::new("a").unwrap()));
        assert!(!Key::new("ab/c").unwrap().is_under(&Key::new("a").unwrap()));
        assert_eq!(Key::new("a").unwrap().parent(), None);
    }

    #[test]
    fn hlc_is_monotonic_when_the_wall_clock_goes_backwards() {
        let mut clock = Hlc::default();
        let mut last = clock;
        for now in [100, 100, 50, 40, 101, 90, 200] {
            clock = clock.tick(now);
            assert!(clock > last, "{clock:?} after {last:?} at {now}");
            last = clock;
        }
        assert_eq!(
            clock,
            Hlc {
                wall_ms: 200,
                logical: 0
            }
        );
    }

    #[test]
    fn hlc_at_the_end_of_its_range_stays_there() {
        let end = Hlc {
            wall_ms: u64::MAX,
            logical: u32::MAX,
        };
        // A peer's bogus stamp: observed, then ticked, without overflow.
        let seen = Hlc::default().observe(end, 1_000);
        assert_eq!(seen, end);
        assert_eq!(seen.tick(1_000), end);
        let almost = Hlc {
            wall_ms: u64::MAX - 1,
            logical: u32::MAX,
        };
        assert_eq!(
            almost.tick(0),
            Hlc {
                wall_ms: u64::MAX,
                logical: 0
            }
        );
    }

    #[test]
    fn hlc_observe_exceeds_both_sides() {
        let local = Hlc {
            wall_ms: 100,
            logical: 3,
        };
        let remote = Hlc {
            wall_ms: 500,
            logical: 7,
        };
        let seen = local.observe(remote, 10);
        assert!(seen > local && seen > remote);
        assert_eq!(
            seen,
            Hlc {
                wall_ms: 500,
                logical: 8
            }
        );
        // A later local tick with a wall clock still behind stays above the remote reading.
        assert!(seen.tick(20) > remote);
        assert_eq!(
            local.observe(local, 100),
            Hlc {
                wall_ms: 100,
                logical: 4
            }
        );
        assert_eq!(
            local.observe(remote, 900),
            Hlc {
                wall_ms: 900,
                logical: 0
            }
        );
    }

    #[test]
    fn version_vector_merge_and_dominates() {
        let (a, b) = (ReplicaId([1; 16]), ReplicaId([2; 16]));
        let mut x = VersionVector::new();
        x.set(a, 3);
        let mut y = VersionVector::new();
        y.set(b, 2);
        assert!(!x.dominates(&y));
        x.merge(&y);
        assert!(x.dominates(&y));
        assert!(x.contains(&EventId { origin: a, seq: 3 }));
        assert!(!x.contains(&EventId { origin: a, seq: 4 }));
        assert_eq!(x.total(), 5);
    }
}
