//! Versioned CBOR encoding of events and protocol messages, and length-prefixed framing.
//!
//! Every encoded value is one format-version byte followed by CBOR (ciborium). The types
//! stored and sent in bulk (events, ids, clocks, content references, heads) are CBOR arrays
//! in field order rather than maps with field names: half the bytes and twice the decoding
//! speed, which is what bounds a rebuild. Fields are only ever added at the end, with a new
//! format version that decoders keep reading alongside the old; a version this build does
//! not know is refused with [`CodecError::UnknownVersion`]. Decoding never panics on bad
//! input.

use std::ops::Range;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::CodecError;
use crate::event::{Event, EventId, Hash, ReplicaId, VersionVector};

/// The format version written by this build, first byte of every encoded value.
pub const FORMAT_VERSION: u8 = 1;

/// The sync protocol version spoken in [`Message::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame accepted or sent by default: 16 MiB (a batch of events or chunks).
pub const MAX_FRAME_LEN: usize = 16 << 20;

/// Length of the frame header: a big-endian `u32` byte count.
pub const FRAME_HEADER_LEN: usize = 4;

/// Encodes `value` as a format-version byte followed by CBOR.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(FORMAT_VERSION);
    ciborium::into_writer(value, out).map_err(|e| CodecError::Encode(e.to_string()))
}

thread_local! {
    /// ciborium's scratch space for strings and byte strings. `ciborium::from_reader`
    /// zeroes a fresh 4 KiB one on every call: a few percent of a rebuild's time.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; 4096].into_boxed_slice());
}

/// Decodes a value written by [`encode`], checking the version byte first.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let mut reader = body;
    let value = SCRATCH
        .with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => ciborium::from_reader_with_buffer(&mut reader, &mut scratch[..]),
            Err(_) => ciborium::from_reader(&mut reader),
        })
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !reader.is_empty() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes",
            reader.len()
        )));
    }
    Ok(value)
}

/// Encodes one event for the log or the wire.
pub fn encode_event(event: &Event) -> Result<Vec<u8>, CodecError> {
    encode(event)
}

/// Decodes one event; its key is validated on the way.
pub fn decode_event(bytes: &[u8]) -> Result<Event, CodecError> {
    decode(bytes)
}

/// The id of an event encoded by [`encode_event`], read from its first bytes without
/// decoding the rest (fields are only ever added at the end, so the id stays first).
/// `None` if they do not hold one: the caller decodes the event whole, which says why.
/// For readers that pass over most events by id, such as a peer's outbox skipping what
/// the peer holds: decoding an event whole takes a few microseconds, this a few dozen
/// nanoseconds.
pub fn event_id(bytes: &[u8]) -> Option<EventId> {
    use ciborium_ll::{Decoder, Header};
    let (&FORMAT_VERSION, body) = bytes.split_first()? else {
        return None;
    };
    let mut decoder = Decoder::from(body);
    let Ok(Header::Array(Some(5))) = decoder.pull() else {
        return None;
    };
    let Ok(Header::Array(Some(2))) = decoder.pull() else {
        return None;
    };
    let Ok(Header::Bytes(Some(16))) = decoder.pull() else {
        return None;
    };
    let at = decoder.offset();
    let origin = <[u8; 16]>::try_from(body.get(at..at + 16)?).ok()?;
    let Ok(Header::Positive(seq)) = Decoder::from(body.get(at + 16..)?).pull() else {
        return None;
    };
    Some(EventId {
        origin: ReplicaId(origin),
        seq,
    })
}

/// A chunk of content in transit: its claimed hash and its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkItem {
    /// The hash the sender says the bytes have; the receiver verifies it.
    pub hash: Hash,
    /// The chunk's bytes.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Where the chunk lies in the file it was cut from, when the sender pushes a large
    /// file's data unasked: the receiver may write it there directly (see [`Place`]).
    /// Added after protocol version 1 was fixed; absent from the encoding when `None`,
    /// so that earlier decoders, which ignore unknown fields, read the item as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<Place>,
}

/// A chunk to send, borrowed from wherever its bytes are: [`encode_chunks`] encodes a
/// list of them exactly as [`Message::Chunks`] with the same [`ChunkItem`]s, without
/// first copying every chunk into an item of its own.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ChunkRef<'a> {
    /// As [`ChunkItem::hash`].
    pub hash: Hash,
    /// As [`ChunkItem::bytes`].
    #[serde(with = "serde_bytes")]
    pub bytes: &'a [u8],
    /// As [`ChunkItem::place`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub place: Option<Place>,
}

/// The borrowed twin of [`Message`] (its one variant encodes as the variant of the same
/// name: CBOR names variants, it does not number them).
#[derive(Serialize)]
enum MessageRef<'a> {
    Chunks { items: &'a [ChunkRef<'a>] },
}

/// Encodes a [`Message::Chunks`] of `items` as a frame payload, into a buffer sized for
/// it up front (grown from nothing, a 4 MiB frame was copied again twice over).
pub fn encode_chunks(items: &[ChunkRef<'_>]) -> Result<Vec<u8>, CodecError> {
    // Each item's bytes, plus its hash, field names, place and headers (under 128).
    let capacity = 32 + items.iter().map(|i| i.bytes.len() + 128).sum::<usize>();
    let mut out = Vec::with_capacity(capacity);
    encode_into(&MessageRef::Chunks { items }, &mut out)?;
    Ok(out)
}

/// [`encode_chunks`] without the chunks' bytes: the payload with every item's bytes left
/// out (its `head`), and for each item the offset in `head` where its bytes go. The
/// pieces of `head` and the items' bytes, in turn, are exactly [`encode_chunks`]'s
/// payload; the engine's `ChunksFrame` holds them so, and a transport sends the chunks
/// from where they lie rather than copied into one buffer (a 4 MiB copy per frame, and on
/// these machines a fault per page of that buffer).
pub fn encode_chunks_head(items: &[ChunkRef<'_>]) -> Result<(Vec<u8>, Vec<usize>), CodecError> {
    use ciborium_ll::{Encoder, Header};
    let failed = |e: std::io::Error| CodecError::Encode(e.to_string());
    let mut head = Vec::with_capacity(32 + items.len() * 128);
    let mut at = Vec::with_capacity(items.len());
    head.push(FORMAT_VERSION);
    // What serde and ciborium make of `MessageRef::Chunks`: one-entry maps around the
    // array, each item a map of its fields (`place` left out when `None`); the hash and
    // the place are encoded by serde itself, as inside the struct.
    let mut encoder = Encoder::from(&mut head);
    encoder.push(Header::Map(Some(1))).map_err(failed)?;
    encoder.text("Chunks", None).map_err(failed)?;
    encoder.push(Header::Map(Some(1))).map_err(failed)?;
    encoder.text("items", None).map_err(failed)?;
    encoder
        .push(Header::Array(Some(items.len())))
        .map_err(failed)?;
    for item in items {
        let fields = if item.place.is_some() { 3 } else { 2 };
        let mut encoder = Encoder::from(&mut head);
        encoder.push(Header::Map(Some(fields))).map_err(failed)?;
        encoder.text("hash", None).map_err(failed)?;
        ciborium::into_writer(&item.hash, &mut head)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        let mut encoder = Encoder::from(&mut head);
        encoder.text("bytes", None).map_err(failed)?;
        encoder
            .push(Header::Bytes(Some(item.bytes.len())))
            .map_err(failed)?;
        at.push(head.len());
        if let Some(place) = &item.place {
            Encoder::from(&mut head)
                .text("place", None)
                .map_err(failed)?;
            ciborium::into_writer(place, &mut head)
                .map_err(|e| CodecError::Encode(e.to_string()))?;
        }
    }
    Ok((head, at))
}

/// Encodes a [`Message::Events`] of events already encoded (each as [`encode_event`]
/// wrote it, as the log stores it) as a frame payload: the same bytes as encoding the
/// message of the decoded events, without decoding and encoding each again (what an
/// outbox sending its log did, a tenth of a sender's CPU in W1 beside the reading).
/// An event of another format version is refused.
pub fn encode_events(events: &[&[u8]]) -> Result<Vec<u8>, CodecError> {
    use ciborium_ll::{Encoder, Header};
    let mut out = Vec::with_capacity(32 + events.iter().map(|e| e.len()).sum::<usize>());
    out.push(FORMAT_VERSION);
    // What serde's externally tagged enum and struct variant make: one-entry maps.
    let mut encoder = Encoder::from(&mut out);
    let headers = (|| {
        encoder.push(Header::Map(Some(1)))?;
        encoder.text("Events", None)?;
        encoder.push(Header::Map(Some(1)))?;
        encoder.text("batch", None)?;
        encoder.push(Header::Array(Some(events.len())))
    })();
    headers.map_err(|e| CodecError::Encode(e.to_string()))?;
    for (n, event) in events.iter().enumerate() {
        match event.split_first() {
            Some((&FORMAT_VERSION, body)) => out.extend_from_slice(body),
            Some((&found, _)) => {
                return Err(CodecError::Encode(format!(
                    "event {n} of the batch is of format version {found}, not {FORMAT_VERSION}"
                )))
            }
            None => {
                return Err(CodecError::Encode(format!(
                    "event {n} of the batch is empty"
                )))
            }
        }
    }
    Ok(out)
}

/// A chunk of a [`Message::Chunks`] payload, found in the payload instead of copied out of
/// it (see [`chunk_spans`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    /// As [`ChunkItem::hash`].
    pub hash: Hash,
    /// Where [`ChunkItem::bytes`] lie in the payload.
    pub bytes: Range<usize>,
    /// As [`ChunkItem::place`].
    pub place: Option<Place>,
}

/// The chunks of a frame payload holding a [`Message::Chunks`] in the form
/// [`encode_chunks`] and [`Message::encode`] write, each as a range of the payload:
/// a receiver stores them from the frame it read, where decoding copied every chunk into
/// a `Vec` of its own, growing it a scratch buffer's worth at a time (on a receiver of a
/// 256 MiB file, a tenth of its CPU went to those copies and their page faults).
///
/// `None` for any other payload, and for a Chunks message written any other way (keys
/// in another form or with unknown ones, indefinite lengths, tags, a `null` place):
/// [`Message::decode`] then decodes it, accepting or refusing it as it does any frame.
/// Whenever this returns chunks, `Message::decode` of the same payload returns the same
/// ones (tested against it on mangled payloads).
pub fn chunk_spans(payload: &[u8]) -> Option<Vec<ChunkSpan>> {
    if payload.first() != Some(&FORMAT_VERSION) {
        return None;
    }
    let mut cbor = Cbor {
        bytes: payload,
        at: 1,
    };
    cbor.header_is(MAP, 1)?;
    cbor.one_of(&[b"Chunks"])?;
    cbor.header_is(MAP, 1)?;
    cbor.one_of(&[b"items"])?;
    let n = cbor.head(ARRAY)?;
    // Each item takes more than 40 bytes: a claimed count past that is not believed.
    let mut spans = Vec::with_capacity(usize::try_from(n).ok()?.min(payload.len() / 40));
    for _ in 0..n {
        spans.push(cbor.chunk()?);
    }
    (cbor.at == payload.len()).then_some(spans)
}

/// CBOR's major type of an unsigned integer, one of the five [`Cbor`] reads.
const UINT: u8 = 0;
/// CBOR's major type of a byte string.
const BYTES: u8 = 2;
/// CBOR's major type of a text string.
const TEXT: u8 = 3;
/// CBOR's major type of an array.
const ARRAY: u8 = 4;
/// CBOR's major type of a map.
const MAP: u8 = 5;

/// A reader of the few CBOR items a Chunks message is made of, for [`chunk_spans`]:
/// ciborium's own reader hands byte strings on only by copying them out.
struct Cbor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cbor<'a> {
    /// The argument of the next item, which must be of type `major` with a definite
    /// length (or value).
    fn head(&mut self, major: u8) -> Option<u64> {
        let &first = self.bytes.get(self.at)?;
        if first >> 5 != major {
            return None;
        }
        self.at += 1;
        let width = match first & 0x1f {
            info @ 0..=23 => return Some(u64::from(info)),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return None,
        };
        let arg = self.take(width)?;
        Some(arg.iter().fold(0, |n, &b| (n << 8) | u64::from(b)))
    }

    /// The range of the next `len` bytes, passed over.
    fn span(&mut self, len: u64) -> Option<Range<usize>> {
        let start = self.at;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        if end > self.bytes.len() {
            return None;
        }
        self.at = end;
        Some(start..end)
    }

    /// The next `len` bytes, passed over.
    fn take(&mut self, len: u64) -> Option<&'a [u8]> {
        let range = self.span(len)?;
        self.bytes.get(range)
    }

    /// The contents of the next item, a byte or text string (`major`).
    fn string(&mut self, major: u8) -> Option<Range<usize>> {
        let len = self.head(major)?;
        self.span(len)
    }

    /// The next item, a header of type `major` with argument `arg`.
    fn header_is(&mut self, major: u8, arg: u64) -> Option<()> {
        (self.head(major)? == arg).then_some(())
    }

    /// The next item, a text that must be one of `keys`: its index there.
    fn one_of(&mut self, keys: &[&[u8]]) -> Option<usize> {
        let text = self.string(TEXT)?;
        let text = self.bytes.get(text)?;
        keys.iter().position(|k| *k == text)
    }

    /// One [`ChunkItem`]: its fields in any order, each once, `place` optional.
    fn chunk(&mut self) -> Option<ChunkSpan> {
        let fields = self.head(MAP)?;
        if !(2..=3).contains(&fields) {
            return None;
        }
        let (mut hash, mut bytes, mut place) = (None, None, None);
        for _ in 0..fields {
            match self.one_of(&[b"hash", b"bytes", b"place"])? {
                0 if hash.is_none() => {
                    let range = self.string(BYTES)?;
                    hash = Some(Hash(self.bytes.get(range)?.try_into().ok()?));
                }
                1 if bytes.is_none() => bytes = Some(self.string(BYTES)?),
                2 if place.is_none() => place = Some(self.place()?),
                _ => return None,
            }
        }
        Some(ChunkSpan {
            hash: hash?,
            bytes: bytes?,
            place,
        })
    }

    /// One [`Place`]: both fields, in any order.
    fn place(&mut self) -> Option<Place> {
        self.header_is(MAP, 2)?;
        let (mut stream, mut offset) = (None, None);
        for _ in 0..2 {
            match self.one_of(&[b"stream", b"offset"])? {
                0 if stream.is_none() => stream = Some(self.head(UINT)?),
                1 if offset.is_none() => offset = Some(self.head(UINT)?),
                _ => return None,
            }
        }
        Some(Place {
            stream: stream?,
            offset: offset?,
        })
    }
}

/// A data chunk's place in the file it was cut from: the stream (one chunking of one
/// file, named at random by the replica that cut it) and the byte offset in it. A
/// receiver writes the chunks of one stream at their offsets into one pack, which, once
/// it holds exactly a content's data, the folder store can take as the file itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Place {
    /// The stream's random identifier.
    pub stream: u64,
    /// The chunk's first byte in the file.
    pub offset: u64,
}

/// One message of the sync protocol (DESIGN §4), carried in one frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on a connection: who I am and what I hold.
    Hello {
        /// The protocol version the sender speaks.
        protocol: u32,
        /// The sender's replica ID.
        replica: ReplicaId,
        /// The sender's version vector.
        vv: VersionVector,
        /// For origins of `vv`, the newest event of it the sender holds: its seq and its
        /// [fingerprint](crate::Event::fingerprint). The receiver compares those it holds
        /// too with its own, which tells two data dirs acting as one replica. Added after
        /// protocol version 1 was fixed; absent from the encoding when empty, so earlier
        /// decoders, which ignore unknown fields, read the message as before.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tips: Vec<(ReplicaId, u64, Hash)>,
    },
    /// Events the receiver lacks, in the sender's log order.
    Events {
        /// The events.
        batch: Vec<Event>,
    },
    /// What the sender now holds durably.
    Ack {
        /// The sender's version vector.
        vv: VersionVector,
    },
    /// "Send me everything above this vector again": sent when a gap shows that events
    /// were lost on the way.
    WantEvents {
        /// The receiver's version vector.
        from: VersionVector,
    },
    /// Chunks the sender needs, by hash.
    WantChunks {
        /// The hashes wanted.
        hashes: Vec<Hash>,
    },
    /// Chunks answering a `WantChunks`.
    Chunks {
        /// The chunks.
        items: Vec<ChunkItem>,
    },
    /// Keepalive probe.
    Ping {
        /// Echoed in the answer.
        nonce: u64,
    },
    /// Keepalive answer.
    Pong {
        /// The probe's nonce.
        nonce: u64,
    },
}

impl Message {
    /// Encodes the message as a frame payload.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode(self)
    }

    /// Decodes a frame payload.
    pub fn decode(bytes: &[u8]) -> Result<Message, CodecError> {
        decode(bytes)
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Events { .. } => "events",
            Message::Ack { .. } => "ack",
            Message::WantEvents { .. } => "want_events",
            Message::WantChunks { .. } => "want_chunks",
            Message::Chunks { .. } => "chunks",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
        }
    }
}

/// Prefixes `payload` with its length as a big-endian `u32`.
pub fn frame(payload: &[u8], max: usize) -> Result<Vec<u8>, CodecError> {
    if payload.len() > max || payload.len() > u32::MAX as usize {
        return Err(CodecError::FrameTooLarge {
            len: payload.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reads a frame header and checks the announced length against `max`.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Splits a byte stream into frames, for transports that read arbitrary-sized pieces.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max`.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    /// Adds bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's payload, `Ok(None)` if more bytes are needed, or an error
    /// if the stream announces an oversized frame (the stream is then unusable).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, CodecError> {
        let Some(header) = self.buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(header);
        let len = frame_len(h, self.max)?;
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec();
        self.buf.drain(..FRAME_HEADER_LEN + len);
        Ok(Some(payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Hello` with tips reads as before to a decoder of protocol version 1's `Hello`,
    /// which has no such field (peers of earlier builds), and one without them is encoded
    /// as before: the field is additive.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn tips_in_a_hello_are_additive() {
        #[derive(Debug, PartialEq, Deserialize, Serialize)]
        enum Before {
            Hello {
                protocol: u32,
                replica: ReplicaId,
                vv: VersionVector,
            },
        }
        let mut vv = VersionVector::new();
        vv.set(ReplicaId([4; 16]), 9);
        let hello = |tips| Message::Hello {
            protocol: PROTOCOL_VERSION,
            replica: ReplicaId([3; 16]),
            vv: vv.clone(),
            tips,
        };
        let before = Before::Hello {
            protocol: PROTOCOL_VERSION,
            replica: ReplicaId([3; 16]),
            vv: vv.clone(),
        };
        let with_tips = hello(vec![(ReplicaId([4; 16]), 9, Hash([7; 32]))]);
        assert_eq!(
            decode::<Before>(&with_tips.encode().unwrap()).unwrap(),
            before
        );
        assert_eq!(
            hello(Vec::new()).encode().unwrap(),
            encode(&before).unwrap()
        );
        assert_eq!(
            Message::decode(&encode(&before).unwrap()).unwrap(),
            hello(Vec::new())
        );
    }
    use crate::event::{EventId, Hlc, Key, Meta, Op};

    fn sample() -> Event {
        Event {
            id: EventId {
                origin: ReplicaId([3; 16]),
                seq: 9,
            },
            hlc: Hlc {
                wall_ms: 1_700_000_000_000,
                logical: 2,
            },
            key: Key::new("docs/a.txt").unwrap(),
            parents: vec![EventId {
                origin: ReplicaId([4; 16]),
                seq: 1,
            }],
            op: Op::Put {
                content: None,
                meta: Meta::dir(5),
            },
        }
    }

    #[test]
    fn events_encoded_already_make_the_message_they_are() {
        let mut events = Vec::new();
        for seq in [1, 24, 300, 70_000] {
            let mut event = sample();
            event.id.seq = seq;
            event.key = Key::new(format!("dir/f{seq}.txt")).unwrap();
            events.push(event);
        }
        for n in 0..=events.len() {
            let batch = events[..n].to_vec();
            let encoded: Vec<Vec<u8>> = batch.iter().map(|e| encode_event(e).unwrap()).collect();
            let raw: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
            let message = Message::Events { batch };
            let bytes = encode_events(&raw).unwrap();
            assert_eq!(bytes, message.encode().unwrap(), "{n} events");
            assert_eq!(Message::decode(&bytes).unwrap(), message);
        }
        let mut other = encode_event(&sample()).unwrap();
        other[0] = FORMAT_VERSION + 1;
        assert!(encode_events(&[&other]).is_err());
        assert!(encode_events(&[&[]]).is_err());
    }

    fn chunk_items(seed: u8, n: usize) -> Vec<ChunkItem> {
        (0..n)
            .map(|i| ChunkItem {
                hash: Hash([seed.wrapping_add(i as u8); 32]),
                bytes: vec![i as u8; i * 7 % 40],
                place: (i % 3 != 0).then_some(Place {
                    stream: u64::from(seed) << (8 * (i % 8)),
                    offset: (i as u64) * 1_000_003,
                }),
            })
            .collect()
    }

    /// `items` as the borrowed chunks `encode_chunks` takes.
    fn borrowed(items: &[ChunkItem]) -> Vec<ChunkRef<'_>> {
        items
            .iter()
            .map(|i| ChunkRef {
                hash: i.hash,
                bytes: &i.bytes,
                place: i.place,
            })
            .collect()
    }

    /// `chunk_spans`' chunks, as `Message::decode` would give them.
    fn from_spans(payload: &[u8], spans: Vec<ChunkSpan>) -> Vec<ChunkItem> {
        spans
            .into_iter()
            .map(|s| ChunkItem {
                hash: s.hash,
                bytes: payload[s.bytes].to_vec(),
                place: s.place,
            })
            .collect()
    }

    #[test]
    fn chunks_are_found_in_the_payload_as_decoding_finds_them() {
        for n in [0, 1, 2, 5, 30] {
            let items = chunk_items(n as u8, n);
            let message = Message::Chunks {
                items: items.clone(),
            };
            let refs = borrowed(&items);
            for payload in [message.encode().unwrap(), encode_chunks(&refs).unwrap()] {
                let spans = chunk_spans(&payload).expect("a Chunks message");
                assert_eq!(from_spans(&payload, spans), items, "{n} chunks");
            }
        }
        let others = [
            Message::Ping { nonce: 7 },
            Message::WantChunks {
                hashes: vec![Hash([1; 32])],
            },
            Message::Events { batch: vec![] },
        ];
        for other in others {
            assert_eq!(chunk_spans(&other.encode().unwrap()), None, "{other:?}");
        }
        assert_eq!(chunk_spans(&[]), None);
    }

    proptest::proptest! {
        /// Whatever a payload is made into (bytes changed, cut short or added), chunks
        /// found in it are the ones decoding it gives.
        #[test]
        fn chunks_found_in_a_mangled_payload_are_the_decoded_ones(
            n in 0usize..6,
            seed in proptest::prelude::any::<u8>(),
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
                0..4,
            ),
            cut in proptest::option::of(proptest::prelude::any::<proptest::sample::Index>()),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3),
        ) {
            let mut payload = Message::Chunks { items: chunk_items(seed, n) }.encode().unwrap();
            for (at, byte) in edits {
                let at = at.index(payload.len());
                payload[at] = byte;
            }
            if let Some(cut) = cut {
                payload.truncate(cut.index(payload.len() + 1));
            }
            payload.extend_from_slice(&tail);
            if let Some(spans) = chunk_spans(&payload) {
                let items = from_spans(&payload, spans);
                let decoded = Message::decode(&payload).map_err(|e| e.to_string());
                proptest::prop_assert_eq!(decoded, Ok(Message::Chunks { items }));
            }
        }
    }

    #[test]
    fn an_events_id_is_read_from_its_head() {
        for seq in [
            0,
            1,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            let mut event = sample();
            event.id.seq = seq;
            event.id.origin = ReplicaId([seq as u8; 16]);
            let bytes = encode_event(&event).unwrap();
            assert_eq!(event_id(&bytes), Some(event.id), "seq {seq}");
            // Cut anywhere inside the id, there is none to read.
            for cut in 0..bytes.len() {
                let head = event_id(&bytes[..cut]);
                assert!(
                    head.is_none() || head == Some(event.id),
                    "seq {seq}, cut at {cut}"
                );
            }
        }
        let bytes = encode_event(&sample()).unwrap();
        let mut other_version = bytes.clone();
        other_version[0] = FORMAT_VERSION + 1;
        assert_eq!(event_id(&other_version), None);
        assert_eq!(
            event_id(&encode(&sample().id).unwrap()),
            None,
            "an id alone is no event"
        );
        assert_eq!(event_id(&[]), None);
    }

    #[test]
    fn borrowed_chunks_encode_as_the_message() {
        let items = vec![
            ChunkItem {
                hash: Hash::of(b"placed"),
                bytes: b"placed".to_vec(),
                place: Some(Place {
                    stream: u64::MAX,
                    offset: 1 << 33,
                }),
            },
            ChunkItem {
                hash: Hash::of(b""),
                bytes: Vec::new(),
                place: None,
            },
        ];
        let refs = borrowed(&items);
        let encoded = encode_chunks(&refs).unwrap();
        let message = Message::Chunks {
            items: items.clone(),
        };
        assert_eq!(encoded, message.encode().unwrap());
        assert_eq!(Message::decode(&encoded).unwrap(), message);
    }

    /// The head and the chunks' bytes, put together at the offsets given, are the
    /// payload [`encode_chunks`] writes, for every width of CBOR's length header (0–23
    /// in the header byte, then 1, 2 and 4 bytes) and with and without places.
    #[test]
    fn the_head_and_the_chunks_make_the_encoded_payload() {
        let sizes = [0, 1, 23, 24, 255, 256, 65_535, 65_536, 70_000];
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        for placed in [false, true] {
            let items: Vec<ChunkRef<'_>> = data
                .iter()
                .enumerate()
                .map(|(i, bytes)| ChunkRef {
                    hash: Hash::of(bytes),
                    bytes,
                    place: (placed && i % 2 == 0).then_some(Place {
                        stream: u64::MAX - i as u64,
                        offset: (i as u64) << 30,
                    }),
                })
                .collect();
            let (head, at) = encode_chunks_head(&items).unwrap();
            assert_eq!(at.len(), items.len());
            let mut joined = Vec::new();
            let mut from = 0;
            for (item, &at) in items.iter().zip(&at) {
                joined.extend_from_slice(&head[from..at]);
                joined.extend_from_slice(item.bytes);
                from = at;
            }
            joined.extend_from_slice(&head[from..]);
            assert_eq!(joined, encode_chunks(&items).unwrap(), "placed: {placed}");
        }
        let (head, at) = encode_chunks_head(&[]).unwrap();
        assert!(at.is_empty());
        assert_eq!(head, encode_chunks(&[]).unwrap());
    }

    #[test]
    fn an_item_without_a_place_encodes_as_before_places_existed() {
        #[derive(Serialize)]
        struct Before {
            hash: Hash,
            #[serde(with = "serde_bytes")]
            bytes: Vec<u8>,
        }
        let before = encode(&Before {
            hash: Hash::of(b"x"),
            bytes: b"x".to_vec(),
        })
        .unwrap();
        let item = ChunkItem {
            hash: Hash::of(b"x"),
            bytes: b"x".to_vec(),
            place: None,
        };
        assert_eq!(encode(&item).unwrap(), before);
        // And an earlier decoder (no place field) reads a placed item.
        #[derive(Deserialize, PartialEq, Debug)]
        struct Earlier {
            hash: Hash,
            #[serde(with = "serde_bytes")]
            bytes: Vec<u8>,
        }
        let placed = ChunkItem {
            place: Some(Place {
                stream: 1,
                offset: 2,
            }),
            ..item
        };
        let earlier: Earlier = decode(&encode(&placed).unwrap()).unwrap();
        assert_eq!(earlier.bytes, b"x");
    }

    #[test]
    fn event_round_trip() {
        let e = sample();
        let bytes = encode_event(&e).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode_event(&bytes).unwrap(), e);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = Message::Events {
            batch: vec![sample(), sample()],
        }
        .encode()
        .unwrap();
        for cut in 0..bytes.len() {
            assert!(
                Message::decode(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
    }

    #[test]
    fn unknown_version_is_named() {
        let mut bytes = encode_event(&sample()).unwrap();
        bytes[0] = 9;
        let err = decode_event(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::UnknownVersion {
                    found: 9,
                    supported: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn invalid_key_on_the_wire_is_rejected() {
        // Re-encode with a bad key by going through an untyped value: an event is an
        // array [id, hlc, key, parents, op].
        let mut value: ciborium::Value = ciborium::Value::serialized(&sample()).unwrap();
        if let ciborium::Value::Array(fields) = &mut value {
            fields[2] = ciborium::Value::Text("../etc/passwd".into());
        }
        let bytes = encode(&value).unwrap();
        let err = decode_event(&bytes).unwrap_err();
        assert!(err.to_string().contains("'..' segment"), "{err}");
    }

    #[test]
    fn frames_split_and_limit() {
        let mut d = FrameDecoder::new(8);
        let mut stream = frame(b"abc", 8).unwrap();
        stream.extend(frame(b"", 8).unwrap());
        d.extend(&stream[..2]);
        assert_eq!(d.next_frame().unwrap(), None);
        d.extend(&stream[2..]);
        assert_eq!(d.next_frame().unwrap(), Some(b"abc".to_vec()));
        assert_eq!(d.next_frame().unwrap(), Some(Vec::new()));
        assert_eq!(d.next_frame().unwrap(), None);
        d.extend(&[0, 0, 0, 9]);
        assert!(matches!(
            d.next_frame(),
            Err(CodecError::FrameTooLarge { len: 9, max: 8 })
        ));
        assert!(frame(&[0; 9], 8).is_err());
    }
}
