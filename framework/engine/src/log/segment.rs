//! The stored form of the `log` tree: segments of consecutive events.
//!
//! A group commit stores its events as a few sled entries rather than one per event, the
//! way Kafka stores a producer's record batch as one unit. An entry's key is the offset of
//! its first event (`u64` big-endian), so the log stays ordered by offset and the entry
//! holding offset `n` is the last one whose key is `≤ n`. Its value is
//!
//! ```text
//! [format: u8 = 1] [count: u32 LE] count × ([len: u32 LE] [event: versioned CBOR])
//! ```
//!
//! Why: sled copies a leaf node on every insert and reclaims the old copy through its
//! epoch collector; per event, that cost was larger than everything converge itself does
//! on the append path, and iterating a million small entries bounded a rebuild. A segment
//! is written in one atomic batch with the rest of its group commit, so it is never torn.

use converge_api::{CodecError, Event};
use sled::IVec;

use crate::error::LogError;

/// The segment layout written by this build.
const FORMAT: u8 = 1;

/// Bytes before the first event: the format byte and the count.
const HEADER_LEN: usize = 5;

/// A segment is sealed once it holds this many events…
const MAX_EVENTS: u32 = super::SEGMENT_EVENTS;

/// …or this many bytes, whichever comes first. Small enough that reading one event (a
/// subscriber's single new event, [`super::EventLog::get`]) decodes little besides it.
pub(super) const MAX_BYTES: usize = 16 * 1024;

/// A segment being filled by a group commit.
pub(super) struct SegmentBuilder {
    first: u64,
    count: u32,
    bytes: Vec<u8>,
}

impl SegmentBuilder {
    /// An empty segment whose first event will have offset `first`.
    pub(super) fn new(first: u64) -> Self {
        let mut bytes = Vec::with_capacity(MAX_BYTES + 512);
        bytes.push(FORMAT);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        SegmentBuilder {
            first,
            count: 0,
            bytes,
        }
    }

    /// Appends the encoding of `event`. On error the segment is unchanged.
    pub(super) fn push(&mut self, event: &Event) -> Result<(), LogError> {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        if let Err(source) = converge_api::codec::encode_into(event, &mut self.bytes) {
            self.bytes.truncate(at);
            return Err(LogError::Encode {
                what: format!("event {:?}", event.id),
                source,
            });
        }
        let len = (self.bytes.len() - at - 4) as u32;
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    /// Whether the segment should be sealed before another event goes in.
    pub(super) fn is_full(&self) -> bool {
        self.count >= MAX_EVENTS || self.bytes.len() >= MAX_BYTES
    }

    /// Whether no event went in.
    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The sled key and value of the finished segment.
    pub(super) fn finish(mut self) -> ([u8; 8], Vec<u8>) {
        self.bytes[1..HEADER_LEN].copy_from_slice(&self.count.to_le_bytes());
        (self.first.to_be_bytes(), self.bytes)
    }
}

/// A stored segment being read, event by event.
pub(super) struct SegmentReader {
    value: IVec,
    pos: usize,
    offset: u64,
    left: u32,
}

impl SegmentReader {
    /// Reads the entry stored under `key` with value `value`.
    pub(super) fn new(key: &[u8], value: IVec) -> Result<Self, LogError> {
        let first = <[u8; 8]>::try_from(key)
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt(u64::MAX, format!("key of {} bytes, expected 8", key.len())))?;
        if value.len() < HEADER_LEN {
            return Err(corrupt(first, "segment shorter than its header".into()));
        }
        if value[0] != FORMAT {
            return Err(LogError::Corrupt {
                what: format!("log/{first}"),
                source: CodecError::UnknownVersion {
                    found: value[0],
                    supported: FORMAT,
                },
            });
        }
        let mut count = [0; 4];
        count.copy_from_slice(&value[1..HEADER_LEN]);
        Ok(SegmentReader {
            value,
            pos: HEADER_LEN,
            offset: first,
            left: u32::from_le_bytes(count),
        })
    }

    /// Offset of the next event to be read.
    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    /// Offset one past the segment's last event.
    pub(super) fn end(&self) -> u64 {
        self.offset + u64::from(self.left)
    }

    /// The next event's offset and encoded bytes; `None` after the last one. Anything
    /// that does not parse is an error, after which the reader yields nothing more.
    pub(super) fn next_raw(&mut self) -> Option<Result<(u64, &[u8]), LogError>> {
        let rest = &self.value[self.pos..];
        if self.left == 0 {
            if rest.is_empty() {
                return None;
            }
            self.pos = self.value.len();
            return Some(Err(corrupt(
                self.offset,
                "bytes after the last event".into(),
            )));
        }
        let offset = self.offset;
        let len = rest.get(..4).map(|n| {
            let mut len = [0; 4];
            len.copy_from_slice(n);
            u32::from_le_bytes(len) as usize
        });
        let Some(len) = len.filter(|len| rest.len() - 4 >= *len) else {
            self.left = 0;
            self.pos = self.value.len();
            return Some(Err(corrupt(offset, "segment truncated".into())));
        };
        let start = self.pos + 4;
        self.pos = start + len;
        self.left -= 1;
        self.offset += 1;
        Some(Ok((offset, &self.value[start..start + len])))
    }

    /// The next event, decoded.
    pub(super) fn next_event(&mut self) -> Option<Result<(u64, Event), LogError>> {
        Some(
            self.next_raw()?
                .and_then(|(offset, bytes)| decode(offset, bytes).map(|event| (offset, event))),
        )
    }
}

/// The event stored at `offset` as `bytes`.
pub(super) fn decode(offset: u64, bytes: &[u8]) -> Result<Event, LogError> {
    converge_api::codec::decode_event(bytes).map_err(|source| LogError::Corrupt {
        what: format!("log/{offset}"),
        source,
    })
}

fn corrupt(offset: u64, why: String) -> LogError {
    LogError::Corrupt {
        what: format!("log/{offset}"),
        source: CodecError::Malformed(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use converge_api::{EventId, Hlc, Key, Op, ReplicaId};

    fn event(seq: u64) -> Event {
        Event {
            id: EventId {
                origin: ReplicaId([3; 16]),
                seq,
            },
            hlc: Hlc {
                wall_ms: seq,
                logical: 0,
            },
            key: Key::new(format!("k/{seq}")).unwrap(),
            parents: vec![],
            op: Op::Delete,
        }
    }

    #[test]
    fn round_trip_keeps_offsets_and_events() {
        let mut b = SegmentBuilder::new(40);
        for seq in 1..=3 {
            b.push(&event(seq)).unwrap();
        }
        let (key, value) = b.finish();
        let mut r = SegmentReader::new(&key, value.into()).unwrap();
        assert_eq!((r.offset(), r.end()), (40, 43));
        for (i, seq) in (1..=3).enumerate() {
            let (offset, e) = r.next_event().unwrap().unwrap();
            assert_eq!((offset, e), (40 + i as u64, event(seq)));
        }
        assert!(r.next_raw().is_none());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut b = SegmentBuilder::new(0);
        b.push(&event(1)).unwrap();
        b.push(&event(2)).unwrap();
        let (key, value) = b.finish();
        let read_all = |bytes: &[u8]| -> Result<usize, LogError> {
            let mut r = SegmentReader::new(&key, bytes.into())?;
            let mut n = 0;
            while let Some(item) = r.next_event() {
                item?;
                n += 1;
            }
            Ok(n)
        };
        assert_eq!(read_all(&value).unwrap(), 2);
        for cut in 0..value.len() {
            assert!(
                read_all(&value[..cut]).is_err(),
                "cut at {cut} went unnoticed"
            );
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(read_all(&longer).is_err());
        let mut other = value;
        other[0] = 9;
        assert!(matches!(
            read_all(&other),
            Err(LogError::Corrupt {
                source: CodecError::UnknownVersion { found: 9, .. },
                ..
            })
        ));
    }
}
