//! An encoded payload held as a list of buffers, so that a big `bytes` value travels from the
//! cell's message to the socket without being copied into one encoding buffer first.
//!
//! [`fedrun_fobs::encode_segments`] writes a payload's small parts into a few buffers of their
//! own and references every big `bytes` value as a segment. A [`Body`] keeps those segments:
//! one frame's payload is written with vectored writes straight from them, and a stream chunk
//! is a zero-copy slice when it lies inside one segment (a chunk across a segment boundary is
//! the only one copied). Its concatenation is always exactly the encoded payload.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// An encoded payload as segments whose concatenation is the payload; never an empty segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Body {
    segments: VecDeque<Bytes>,
    len: usize,
}

impl Body {
    /// A body of these segments, in order (empty ones are dropped).
    pub(crate) fn from_segments(segments: impl IntoIterator<Item = Bytes>) -> Body {
        let segments: VecDeque<Bytes> = segments.into_iter().filter(|s| !s.is_empty()).collect();
        let len = segments.iter().map(Bytes::len).sum();
        Body { segments, len }
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The bytes `start..end` (clamped to the body) as one buffer: a zero-copy slice when they
    /// lie in one segment, a copy when they span several.
    pub(crate) fn slice_bytes(&self, start: usize, end: usize) -> Bytes {
        let end = end.min(self.len);
        if start >= end {
            return Bytes::new();
        }
        let mut parts = Vec::new();
        let mut at = 0;
        for seg in &self.segments {
            let (from, to) = (at, at + seg.len());
            at = to;
            if to <= start {
                continue;
            }
            if from >= end {
                break;
            }
            parts.push(seg.slice(start.max(from) - from..end.min(to) - from));
        }
        match parts.len() {
            1 => parts.swap_remove(0),
            _ => Bytes::from(parts.concat()),
        }
    }

    /// The whole body as one buffer (a copy only when it has several segments).
    pub(crate) fn to_bytes(&self) -> Bytes {
        self.slice_bytes(0, self.len)
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body::from_segments([bytes])
    }
}

/// Reading a body consumes it front to back (for `write_all_buf` and vectored writes).
impl Buf for Body {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.segments.front().map_or(&[], |s| &s[..])
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, seg) in dst.iter_mut().zip(&self.segments) {
            *slot = IoSlice::new(seg);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.segments.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                self.len -= cnt;
                return;
            }
            cnt -= front.len();
            self.len -= front.len();
            self.segments.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> (Body, Vec<u8>) {
        let segs = [
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from(vec![7u8; 10]),
            Bytes::from_static(b"xyz"),
        ];
        let whole = segs.concat();
        (Body::from_segments(segs), whole)
    }

    #[test]
    fn every_slice_is_the_same_bytes_as_the_concatenation() {
        let (b, whole) = body();
        assert_eq!(b.len(), whole.len());
        for start in 0..=whole.len() {
            for end in start..=whole.len() + 2 {
                let want = &whole[start..end.min(whole.len())];
                assert_eq!(&b.slice_bytes(start, end)[..], want, "{start}..{end}");
            }
        }
        assert_eq!(&b.to_bytes()[..], &whole[..]);
    }

    #[test]
    fn a_slice_inside_one_segment_is_not_copied() {
        let big = Bytes::from(vec![1u8; 100]);
        let b = Body::from_segments([Bytes::from_static(b"head"), big.clone()]);
        assert_eq!(b.slice_bytes(10, 50).as_ptr(), big[6..].as_ptr());
    }

    #[test]
    fn reading_as_a_buf_yields_the_concatenation_in_any_steps() {
        let (mut b, whole) = body();
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(b.chunks_vectored(&mut slices), 3);
        let mut got = Vec::new();
        while b.has_remaining() {
            let step = b.chunk().len().min(4);
            got.extend_from_slice(&b.chunk()[..step]);
            b.advance(step);
        }
        assert_eq!(got, whole);
        b.advance(5); // past the end: nothing, no panic
        assert_eq!(b.remaining(), 0);
    }
}
