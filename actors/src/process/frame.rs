//! The wire between a parent and its worker processes: length-prefixed
//! frames of [postcard](https://docs.rs/postcard) bytes over a Unix socket
//! (the child's standard input).
//!
//! A frame is a 4-byte little-endian length and that many bytes. The parent
//! sends [`JobRef`]s and reads [`Reply`]s; the child the other way round.
//! What a child sends is untrusted: [`FrameBuf`] refuses a length above the
//! limit before it allocates anything for it, never holds more than one
//! frame (and one read chunk) at a time, and decoding errors are values,
//! never panics.
//!
//! Custom metadata (`serde_json::Value`s) cannot cross in postcard, which is
//! not self-describing: it crosses as a JSON string, empty when there is none.

use serde::{Deserialize, Serialize};

/// Bumped when the frames change; a child of another version is refused.
pub(crate) const PROTOCOL_VERSION: u32 = 3;

/// Bytes of the length prefix.
const HEADER: usize = 4;
/// How much is read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// An item on its way to a child, borrowing from the parent's item.
#[derive(Serialize)]
pub(crate) struct JobRef<'a, T> {
    pub(crate) job_id: &'a str,
    /// The attempt this is in the stage (1 on the first), so that a
    /// handler's `metadata().attempts()` reads as it does in-process.
    pub(crate) attempts: u32,
    /// The item's custom metadata as JSON, or empty.
    pub(crate) custom: &'a str,
    pub(crate) data: &'a T,
}

/// An item as the child reads it (the same layout as [`JobRef`]).
#[derive(Deserialize)]
pub(crate) struct Job<T> {
    pub(crate) job_id: String,
    pub(crate) attempts: u32,
    pub(crate) custom: String,
    pub(crate) data: T,
}

/// A batch on its way to a child, as the data of a [`JobRef`]: its items
/// in order (each as a [`JobRef`] of its own) and its key.
#[derive(Serialize)]
pub(crate) struct BatchRef<'a, T> {
    pub(crate) key: Option<u64>,
    pub(crate) items: Vec<JobRef<'a, T>>,
}

/// A batch as the child reads it (the same layout as [`BatchRef`]).
#[derive(Deserialize)]
pub(crate) struct BatchJob<T> {
    pub(crate) key: Option<u64>,
    pub(crate) items: Vec<Job<T>>,
}

/// One item's outcome in a batch the handler returned (the data of a
/// [`Reply::Done`] to a batch is one of these per item, in order).
#[derive(Serialize, Deserialize)]
pub(crate) enum ItemReply<T> {
    /// Its output.
    Done(T),
    /// Its error's chain, and whether it was marked
    /// [`Permanent`](crate::item::Permanent).
    Failed { message: String, permanent: bool },
}

/// What a child sends.
#[derive(Serialize, Deserialize)]
pub(crate) enum Reply<T> {
    /// First, once the child is ready to serve its stage (its per-worker
    /// resource, if the stage has one, is built).
    Hello { version: u32, pid: u32 },
    /// The handler returned this item (custom metadata as JSON or empty).
    Done { custom: String, data: T },
    /// The handler returned an error: its chain, and whether it was marked
    /// [`Permanent`](crate::item::Permanent).
    Failed { message: String, permanent: bool },
    /// The handler panicked; the child caught it and goes on serving.
    Panicked { message: String },
    /// First, instead of [`Reply::Hello`]: the stage's per-worker resource
    /// could not be built (the constructor's error chain, or its panic);
    /// the child exits.
    NoResource { message: String },
}

/// Appends one frame holding `value` to `out`.
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), String> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    let out2 = std::mem::take(out);
    let mut full = postcard::to_extend(value, out2)
        .map_err(|e| format!("cannot encode it for the worker process: {e}"))?;
    let len = full.len() - start - HEADER;
    if len > limit {
        full.truncate(start);
        *out = full;
        return Err(format!(
            "its encoding is {len} bytes, above the frame limit of {limit} bytes"
        ));
    }
    full[start..start + HEADER].copy_from_slice(&(len as u32).to_le_bytes());
    *out = full;
    Ok(())
}

/// One frame holding `value`.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    encode_into(value, &mut out, limit)?;
    Ok(out)
}

/// Decodes a frame's payload.
pub(crate) fn decode<'de, T: Deserialize<'de>>(payload: &'de [u8]) -> Result<T, String> {
    postcard::from_bytes(payload).map_err(|e| format!("undecodable frame: {e}"))
}

/// The custom metadata as it crosses: JSON, or empty when there is none.
pub(crate) fn custom_to_wire(
    custom: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Result<String, String> {
    if custom.is_empty() {
        return Ok(String::new());
    }
    serde_json::to_string(custom).map_err(|e| format!("cannot encode custom metadata: {e}"))
}

/// The custom metadata from the wire.
pub(crate) fn custom_from_wire(
    text: &str,
) -> Result<std::collections::BTreeMap<String, serde_json::Value>, String> {
    if text.is_empty() {
        return Ok(Default::default());
    }
    serde_json::from_str(text).map_err(|e| format!("undecodable custom metadata: {e}"))
}

/// Why reading frames failed.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// A length above the limit.
    TooLarge { len: usize, limit: usize },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, limit } => {
                write!(
                    f,
                    "a frame of {len} bytes, above the limit of {limit} bytes"
                )
            }
        }
    }
}

/// Bytes read from a peer, cut into frames.
///
/// Holds at most `limit + 4` bytes plus one read chunk, whatever the peer
/// sends: a frame's room is made only once its length has been checked.
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limit: usize,
}

impl FrameBuf {
    pub(crate) fn new(limit: usize) -> Self {
        FrameBuf {
            buf: vec![0; READ_CHUNK.min(limit + HEADER).max(HEADER)],
            start: 0,
            end: 0,
            limit,
        }
    }

    /// True when no byte is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Where the next read goes; never empty once [`Self::next_frame`]
    /// returned `Ok(None)`.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }

    /// Notes that `n` bytes were read into [`Self::spare`].
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// The next whole frame's payload range, if it has arrived; otherwise
    /// makes room for the rest of it.
    pub(crate) fn next_frame(&mut self) -> Result<Option<std::ops::Range<usize>>, FrameError> {
        if self.start == self.end && self.buf.len() > 4 * READ_CHUNK {
            // A large frame has been taken: do not keep its room.
            self.buf.truncate(READ_CHUNK);
            self.buf.shrink_to_fit();
        }
        let have = self.end - self.start;
        if have >= HEADER {
            let mut len = [0; HEADER];
            len.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
            let len = u32::from_le_bytes(len) as usize;
            if len > self.limit {
                return Err(FrameError::TooLarge {
                    len,
                    limit: self.limit,
                });
            }
            if have >= HEADER + len {
                let payload = self.start + HEADER..self.start + HEADER + len;
                self.start += HEADER + len;
                if self.start == self.end {
                    (self.start, self.end) = (0, 0);
                }
                return Ok(Some(payload));
            }
            self.make_room(HEADER + len);
        } else {
            self.make_room(HEADER);
        }
        Ok(None)
    }

    /// The bytes of a range [`Self::next_frame`] returned; valid until the
    /// next call that takes `&mut self`.
    pub(crate) fn get(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Room for a frame of `need` bytes (header included) from `start`,
    /// and at least one free byte after `end`. Only called while less than
    /// `need` bytes are held, and `need <= limit + 4`.
    fn make_room(&mut self, need: usize) {
        if self.start > 0 && (self.buf.len() - self.start < need || self.end == self.buf.len()) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.start < need {
            self.buf.resize(self.start + need, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(buf: &mut FrameBuf, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let spare = buf.spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            buf.filled(n);
            rest = &rest[n..];
        }
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let mut wire = Vec::new();
        for i in 0..100u32 {
            encode_into(&(i, "x".repeat(i as usize * 1000)), &mut wire, 1 << 20).unwrap();
        }
        let mut buf = FrameBuf::new(1 << 20);
        let mut got = Vec::new();
        for chunk in wire.chunks(777) {
            let mut chunk = chunk;
            while !chunk.is_empty() {
                let spare = buf.spare();
                let n = spare.len().min(chunk.len());
                spare[..n].copy_from_slice(&chunk[..n]);
                buf.filled(n);
                chunk = &chunk[n..];
                while let Some(r) = buf.next_frame().unwrap() {
                    let (i, s): (u32, String) = decode(buf.get(r)).unwrap();
                    assert_eq!(s.len(), i as usize * 1000);
                    got.push(i);
                }
            }
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        let mut buf = FrameBuf::new(1024);
        feed(&mut buf, &u32::MAX.to_le_bytes());
        assert!(matches!(buf.next_frame(), Err(FrameError::TooLarge { .. })));
        assert!(buf.buf.len() <= 64 * 1024);
    }

    #[test]
    fn garbage_decodes_to_an_error_not_a_panic() {
        let mut seed = 0x1234_5678u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect();
            let _ = decode::<Reply<Vec<String>>>(&bytes);
        }
    }

    #[test]
    fn encoding_above_the_limit_is_an_error() {
        let mut out = vec![7];
        let err = encode_into(&vec![0u8; 100], &mut out, 10).unwrap_err();
        assert!(err.contains("above the frame limit"), "{err}");
        assert_eq!(out, vec![7]);
    }
}
