//! The SFM frame codec for a TCP byte stream (`tokio_util::codec`).
//!
//! TCP delivers bytes, not frames. [`SfmCodec`] cuts the stream at frame boundaries using only
//! the prefix's `length` (read 16 bytes, check the length, read the rest), refuses
//! impossible lengths *before* buffering anything for them, and hands each frame out without
//! copying its payload (`split_to(..).freeze()`). Any error is fatal for the connection it came
//! from (a byte stream cannot be resynchronised), and only for that one: the caller closes it.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::WireError;
use crate::frame::{Frame, Prefix, MAX_FRAME_SIZE, PREFIX_LEN};

/// The most buffer space the decoder asks for ahead of data that has not arrived yet.
///
/// A peer's `length` field alone never makes the decoder allocate a large buffer: the buffer
/// grows with the bytes actually received (a frame claiming 2 GiB and sending nothing costs
/// 1 MiB, not 2 GiB).
pub const READ_RESERVE_LIMIT: usize = 1024 * 1024;

/// Decoder and encoder of SFM frames.
///
/// # Example
///
/// ```
/// use bytes::BytesMut;
/// use fedrun_wire::{Frame, SfmCodec, WireError};
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = SfmCodec::new();
/// let mut buf = BytesMut::new();
/// codec.encode(Frame::ping(), &mut buf).unwrap();
/// codec.encode(Frame::pong(), &mut buf).unwrap();
///
/// // half a frame: nothing yet
/// let mut stream = buf.split_to(10);
/// assert!(codec.decode(&mut stream).unwrap().is_none());
/// stream.unsplit(buf);
/// assert_eq!(codec.decode(&mut stream).unwrap(), Some(Frame::ping()));
/// assert_eq!(codec.decode(&mut stream).unwrap(), Some(Frame::pong()));
///
/// // a length below the prefix size is an error, not a wait
/// let mut bad = BytesMut::from(&[0u8, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
/// assert!(matches!(codec.decode(&mut bad), Err(WireError::FrameTooShort { length: 3 })));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SfmCodec {
    max_frame_size: usize,
}

impl Default for SfmCodec {
    fn default() -> Self {
        SfmCodec {
            max_frame_size: MAX_FRAME_SIZE,
        }
    }
}

impl SfmCodec {
    /// A codec with NVFlare's limit, [`MAX_FRAME_SIZE`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A codec with a lower frame size limit (values above [`MAX_FRAME_SIZE`] are capped to it;
    /// values below the prefix size make every frame too large).
    pub fn with_max_frame_size(max_frame_size: usize) -> Self {
        SfmCodec {
            max_frame_size: max_frame_size.min(MAX_FRAME_SIZE),
        }
    }

    /// Changes the frame size limit (capped to [`MAX_FRAME_SIZE`]), e.g. from the handshake's
    /// small limit to the connection's own once the peer said who it is.
    pub fn set_max_frame_size(&mut self, max_frame_size: usize) {
        self.max_frame_size = max_frame_size.min(MAX_FRAME_SIZE);
    }

    /// The frame size limit in force, in both directions.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }
}

impl Decoder for SfmCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(prefix) = Prefix::parse(src) else {
            src.reserve(PREFIX_LEN - src.len());
            return Ok(None);
        };
        prefix.check(self.max_frame_size)?;
        // `check` bounds the length by `max_frame_size`, which is a `usize`.
        let length = usize::try_from(prefix.length).map_err(|_| WireError::FrameTooLarge {
            length: u64::from(prefix.length),
            max: self.max_frame_size as u64,
        })?;
        if src.len() < length {
            src.reserve((length - src.len()).min(READ_RESERVE_LIMIT));
            return Ok(None);
        }
        let buf = take_frame(src, length);
        Frame::from_parts(prefix, buf).map(Some)
    }
}

/// A frame at least this big gets a buffer of its own (see [`take_frame`]).
const OWN_BUFFER_MIN: usize = 1 << 20;

/// Splits the first `length` bytes off the read buffer as a frame. A big frame leaves the read
/// buffer's allocation to itself: the few bytes of the next frame already read after it are
/// copied into a fresh read buffer, so that nothing else shares the frame's bytes and whoever
/// ends up owning them alone (a downloaded model being trained) can change them in place
/// instead of copying them.
fn take_frame(src: &mut BytesMut, length: usize) -> Bytes {
    if length >= OWN_BUFFER_MIN && src.len() - length <= OWN_BUFFER_MIN {
        let after = src.split_off(length);
        let rest = BytesMut::from(&after[..]);
        drop(after);
        return std::mem::replace(src, rest).freeze();
    }
    src.split_to(length).freeze()
}

impl Encoder<Frame> for SfmCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        frame.encode_into(dst, self.max_frame_size)
    }
}

impl Encoder<&Frame> for SfmCodec {
    type Error = WireError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        frame.encode_into(dst, self.max_frame_size)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::BufMut;

    fn prefix(length: u32, header_len: u16) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(length);
        b.put_u16(header_len);
        b.put_u8(1);
        b.put_u8(0);
        b.put_slice(&[0; 8]);
        b
    }

    #[test]
    fn a_big_frame_owns_its_buffer_and_the_next_frames_bytes_stay_in_the_read_buffer() {
        let mut codec = SfmCodec::new();
        let len = PREFIX_LEN + 2 * OWN_BUFFER_MIN;
        let mut src = prefix(len as u32, 0);
        src.put_slice(&vec![7u8; len - PREFIX_LEN]);
        src.put_slice(b"next");
        let frame = codec.decode(&mut src).unwrap().unwrap();
        assert_eq!(&src[..], b"next");
        assert_eq!(frame.payload.len(), len - PREFIX_LEN);
        let payload = frame.payload;
        assert!(payload.is_unique(), "the frame shares its bytes");
        let mut owned = payload.try_into_mut().unwrap();
        owned[0] = 1;

        // a small frame is split off as before
        let mut src = prefix(PREFIX_LEN as u32 + 3, 0);
        src.put_slice(b"abcnext");
        let frame = codec.decode(&mut src).unwrap().unwrap();
        assert_eq!((&frame.payload[..], &src[..]), (&b"abc"[..], &b"next"[..]));
    }

    #[test]
    fn length_above_the_limit_is_refused_before_buffering() {
        let mut codec = SfmCodec::with_max_frame_size(1000);
        let mut src = prefix(1001, 0);
        assert!(matches!(
            codec.decode(&mut src),
            Err(WireError::FrameTooLarge {
                length: 1001,
                max: 1000
            })
        ));
    }

    #[test]
    fn header_len_past_the_frame_is_refused() {
        let mut codec = SfmCodec::new();
        let mut src = prefix(20, 5);
        assert!(matches!(
            codec.decode(&mut src),
            Err(WireError::HeaderLenPastEnd { header_len: 5, .. })
        ));
    }

    #[test]
    fn a_huge_claimed_length_reserves_at_most_the_limit() {
        let mut codec = SfmCodec::new();
        let mut src = prefix(MAX_FRAME_SIZE as u32, 0);
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(src.capacity() <= PREFIX_LEN + READ_RESERVE_LIMIT + 64);
    }

    #[test]
    fn payload_is_a_slice_of_the_receive_buffer() {
        let mut codec = SfmCodec::new();
        let mut src = BytesMut::new();
        let f = Frame::data(fedrun_cell::Headers::new(), Bytes::from_static(b"payload"));
        codec.encode(&f, &mut src).unwrap();
        let start = src.as_ptr() as usize;
        let got = codec.decode(&mut src).unwrap().unwrap();
        assert_eq!(got.payload.as_ptr() as usize, start + PREFIX_LEN);
        assert_eq!(&got.payload[..], b"payload");
    }

    #[test]
    fn encoder_refuses_frames_above_the_limit() {
        let mut codec = SfmCodec::with_max_frame_size(20);
        let f = Frame::new(crate::FrameType::Data, Bytes::from(vec![0u8; 5]));
        let mut dst = BytesMut::new();
        assert!(matches!(
            codec.encode(f, &mut dst),
            Err(WireError::FrameTooLarge { length: 21, .. })
        ));
        assert!(dst.is_empty());
    }
}
