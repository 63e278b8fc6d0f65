//! The SFM frame: NVFlare's unit of transmission on a TCP connection.
//!
//! Every frame is a 16-byte big-endian prefix (`>IHBBHHHH`: length, header_len, type, reserved,
//! flags, app_id, stream_id, sequence), then `header_len` bytes of headers (a msgpack map with
//! string keys; for DATA frames it *is* the cell message's header map), then the payload. This
//! module holds the frame as a value ([`Frame`]) and its exact byte form: decoding keeps the
//! header order and every value's msgpack form, and encoding writes what msgpack-python 1.x
//! writes, so that decode → encode gives back NVFlare's bytes unchanged. The payload is never
//! copied: it is a slice of the received buffer.
//!
//! The handshake payload ([`HandshakeInfo`], HELLO/READY) and the heartbeat payload (PING/PONG,
//! msgpack `nil`) live here too, because they belong to the frame layer, not to CellNet.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use fedrun_cell::{Fqcn, Headers};
use fedrun_core::{Map, Value};
use fedrun_fobs::msgpack::{self, ByteCounter, ENCODE_MAX_DEPTH};

use crate::error::WireError;

/// Size of the frame prefix in bytes.
pub const PREFIX_LEN: usize = 16;

/// The largest frame NVFlare accepts: 2 GiB − 2 MiB (2 145 386 496 bytes), prefix included.
pub const MAX_FRAME_SIZE: usize = 2 * 1024 * 1024 * 1024 - 2 * 1024 * 1024;

/// The app id of CellNet DATA frames (`CoreCell.APP_ID`; not `AppIds.CELL_NET = 2`).
pub const APP_ID_CELLNET: u16 = 1;

/// The stream id of HELLO and READY frames.
pub const HANDSHAKE_STREAM_ID: u16 = 1;

/// The value the per-endpoint stream-id counter starts from; it is pre-incremented, so the
/// first DATA frame carries 17.
pub const STREAM_ID_BASE: u16 = 16;

/// The PING/PONG payload: msgpack `nil`.
pub const HEARTBEAT_PAYLOAD: &[u8] = &[0xc0];

/// Frame flag bits (defined by NVFlare, never set in practice).
pub mod flags {
    /// Out of band.
    pub const OOB: u16 = 0x8000;
    /// Acknowledgement.
    pub const ACK: u16 = 0x4000;
    /// Request.
    pub const REQ: u16 = 0x2000;
    /// Response.
    pub const RESP: u16 = 0x1000;
    /// Publish/subscribe.
    pub const PUB_SUB: u16 = 0x0800;
}

/// The type byte of a frame.
///
/// # Example
///
/// ```
/// use fedrun_wire::FrameType;
///
/// assert_eq!(FrameType::try_from(6).unwrap(), FrameType::Ping);
/// assert_eq!(u8::from(FrameType::Hello), 4);
/// assert!(FrameType::try_from(9).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// 1: a cell message (headers = cell headers, payload = encoded cell payload).
    Data,
    /// 2: reserved, unused.
    Frag,
    /// 3: reserved, unused.
    Ack,
    /// 4: handshake from the connecting side.
    Hello,
    /// 5: handshake answer from the listening side.
    Ready,
    /// 6: heartbeat probe.
    Ping,
    /// 7: heartbeat answer.
    Pong,
}

impl FrameType {
    /// NVFlare's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Data => "DATA",
            FrameType::Frag => "FRAG",
            FrameType::Ack => "ACK",
            FrameType::Hello => "HELLO",
            FrameType::Ready => "READY",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<FrameType> for u8 {
    fn from(t: FrameType) -> u8 {
        match t {
            FrameType::Data => 1,
            FrameType::Frag => 2,
            FrameType::Ack => 3,
            FrameType::Hello => 4,
            FrameType::Ready => 5,
            FrameType::Ping => 6,
            FrameType::Pong => 7,
        }
    }
}

impl TryFrom<u8> for FrameType {
    type Error = WireError;

    fn try_from(b: u8) -> Result<Self, WireError> {
        Ok(match b {
            1 => FrameType::Data,
            2 => FrameType::Frag,
            3 => FrameType::Ack,
            4 => FrameType::Hello,
            5 => FrameType::Ready,
            6 => FrameType::Ping,
            7 => FrameType::Pong,
            other => return Err(WireError::UnknownFrameType(other)),
        })
    }
}

/// The 16-byte prefix, as read from the wire (before any check beyond its size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Total frame length, prefix included.
    pub length: u32,
    /// Length of the msgpack header block (0 = no headers).
    pub header_len: u16,
    /// The type byte.
    pub frame_type: u8,
    /// Reserved byte (0).
    pub reserved: u8,
    /// Flag bits (0 in practice).
    pub flags: u16,
    /// Application id.
    pub app_id: u16,
    /// Stream id.
    pub stream_id: u16,
    /// Per-connection sequence number.
    pub sequence: u16,
}

impl Prefix {
    /// Reads the prefix from the first 16 bytes of `b` (`None` if `b` is shorter).
    ///
    /// # Example
    ///
    /// ```
    /// use fedrun_wire::Prefix;
    ///
    /// // loopback vector #43: a PING from the server
    /// let p = Prefix::parse(&hex::decode("00000011000006000000000000240015c0").unwrap()).unwrap();
    /// assert_eq!((p.length, p.frame_type, p.stream_id, p.sequence), (17, 6, 36, 21));
    /// ```
    pub fn parse(b: &[u8]) -> Option<Prefix> {
        let p: &[u8; PREFIX_LEN] = b.get(..PREFIX_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
        Some(Prefix {
            length: u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
            header_len: u16_at(4),
            frame_type: p[6],
            reserved: p[7],
            flags: u16_at(8),
            app_id: u16_at(10),
            stream_id: u16_at(12),
            sequence: u16_at(14),
        })
    }

    /// Checks the lengths against each other and against `max_frame_size`.
    ///
    /// # Errors
    ///
    /// [`WireError::FrameTooShort`], [`WireError::FrameTooLarge`] or
    /// [`WireError::HeaderLenPastEnd`].
    pub fn check(&self, max_frame_size: usize) -> Result<(), WireError> {
        let length = u64::from(self.length);
        if length < PREFIX_LEN as u64 {
            return Err(WireError::FrameTooShort { length });
        }
        if length > max_frame_size as u64 {
            return Err(WireError::FrameTooLarge {
                length,
                max: max_frame_size as u64,
            });
        }
        if u64::from(self.header_len) > length - PREFIX_LEN as u64 {
            return Err(WireError::HeaderLenPastEnd {
                header_len: self.header_len,
                length,
            });
        }
        Ok(())
    }

    fn write(&self, out: &mut BytesMut) {
        out.put_u32(self.length);
        out.put_u16(self.header_len);
        out.put_u8(self.frame_type);
        out.put_u8(self.reserved);
        out.put_u16(self.flags);
        out.put_u16(self.app_id);
        out.put_u16(self.stream_id);
        out.put_u16(self.sequence);
    }
}

/// One SFM frame.
///
/// `headers` is `None` when the frame has no header block (`header_len = 0`); an empty map is
/// also written without a block, as NVFlare does. The header order is kept so that a decoded
/// frame re-encodes to the same bytes.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use fedrun_cell::Headers;
/// use fedrun_wire::{Frame, FrameType};
///
/// let mut headers = Headers::new();
/// headers.set_channel("task");
/// headers.insert("cn__send_time", 1.5);
/// let mut frame = Frame::data(headers, Bytes::from_static(b"raw"));
/// frame.stream_id = 17;
/// frame.sequence = 2;
///
/// let bytes = frame.encode().unwrap();
/// assert_eq!(bytes.len(), frame.encoded_len().unwrap());
/// let back = Frame::decode(bytes.clone()).unwrap();
/// assert_eq!(back, frame);
/// assert_eq!(back.frame_type, FrameType::Data);
/// assert_eq!(back.encode().unwrap(), bytes);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The frame type.
    pub frame_type: FrameType,
    /// The reserved byte (0 in practice; kept for exact re-encoding).
    pub reserved: u8,
    /// Flag bits ([`flags`]; 0 in practice).
    pub flags: u16,
    /// Application id: [`APP_ID_CELLNET`] for DATA, 0 for the others.
    pub app_id: u16,
    /// Stream id: [`HANDSHAKE_STREAM_ID`] for HELLO/READY, a per-endpoint counter otherwise.
    pub stream_id: u16,
    /// Per-connection sequence number (ignored by receivers).
    pub sequence: u16,
    /// The header block.
    pub headers: Option<Headers>,
    /// The payload, shared with the receive buffer.
    pub payload: Bytes,
}

impl Frame {
    /// A frame of type `frame_type` with every prefix field 0 and no headers.
    pub fn new(frame_type: FrameType, payload: Bytes) -> Frame {
        Frame {
            frame_type,
            reserved: 0,
            flags: 0,
            app_id: 0,
            stream_id: 0,
            sequence: 0,
            headers: None,
            payload,
        }
    }

    /// A CellNet DATA frame (app id 1) carrying a cell message's headers and encoded payload.
    pub fn data(headers: Headers, payload: Bytes) -> Frame {
        Frame {
            app_id: APP_ID_CELLNET,
            headers: Some(headers),
            ..Frame::new(FrameType::Data, payload)
        }
    }

    /// A HELLO frame (stream id 1) introducing this endpoint.
    ///
    /// # Errors
    ///
    /// Never in practice (a handshake map is always encodable); typed for uniformity.
    pub fn hello(info: &HandshakeInfo) -> Result<Frame, WireError> {
        Ok(Frame {
            stream_id: HANDSHAKE_STREAM_ID,
            ..Frame::new(FrameType::Hello, info.encode()?)
        })
    }

    /// A READY frame (stream id 1) answering a HELLO.
    ///
    /// # Errors
    ///
    /// Never in practice (a handshake map is always encodable); typed for uniformity.
    pub fn ready(info: &HandshakeInfo) -> Result<Frame, WireError> {
        Ok(Frame {
            stream_id: HANDSHAKE_STREAM_ID,
            ..Frame::new(FrameType::Ready, info.encode()?)
        })
    }

    /// A PING frame (payload msgpack `nil`).
    pub fn ping() -> Frame {
        Frame::new(FrameType::Ping, Bytes::from_static(HEARTBEAT_PAYLOAD))
    }

    /// A PONG frame (payload msgpack `nil`).
    pub fn pong() -> Frame {
        Frame::new(FrameType::Pong, Bytes::from_static(HEARTBEAT_PAYLOAD))
    }

    /// The encoded header block (empty when there are no headers or the map is empty).
    ///
    /// # Errors
    ///
    /// [`WireError::HeaderEncode`] for a value msgpack cannot carry,
    /// [`WireError::HeadersTooLarge`] above 65535 bytes.
    pub fn header_block(&self) -> Result<Vec<u8>, WireError> {
        match &self.headers {
            Some(h) if !h.is_empty() => encode_headers(h),
            _ => Ok(Vec::new()),
        }
    }

    /// The size of the encoded frame, prefix included.
    ///
    /// # Errors
    ///
    /// As [`Frame::header_block`].
    pub fn encoded_len(&self) -> Result<usize, WireError> {
        let header_len = match &self.headers {
            Some(h) if !h.is_empty() => headers_len(h)?,
            _ => 0,
        };
        Ok(PREFIX_LEN + header_len + self.payload.len())
    }

    /// Appends the encoded frame to `out`, refusing frames above `max_frame_size`.
    ///
    /// # Errors
    ///
    /// As [`Frame::header_block`], and [`WireError::FrameTooLarge`].
    pub fn encode_into(&self, out: &mut BytesMut, max_frame_size: usize) -> Result<(), WireError> {
        self.encode_head_into(out, max_frame_size, self.payload.len(), self.payload.len())?;
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// The encoded prefix and header block, without the payload: what goes on the wire before
    /// the payload, so that a big payload can be written from its own buffer instead of being
    /// copied behind them. Refuses frames above `max_frame_size`, as [`Frame::encode_into`].
    ///
    /// # Errors
    ///
    /// As [`Frame::encode_into`].
    ///
    /// # Example
    ///
    /// ```
    /// use bytes::Bytes;
    /// use fedrun_wire::{Frame, MAX_FRAME_SIZE};
    ///
    /// let mut frame = Frame::ping();
    /// frame.payload = Bytes::from_static(b"payload");
    /// let head = frame.encode_head(MAX_FRAME_SIZE).unwrap();
    /// assert_eq!([&head[..], &frame.payload[..]].concat(), frame.encode().unwrap());
    /// ```
    pub fn encode_head(&self, max_frame_size: usize) -> Result<Bytes, WireError> {
        self.encode_head_for(max_frame_size, self.payload.len())
    }

    /// [`Frame::encode_head`] for a payload of `payload_len` bytes held elsewhere (the frame's
    /// own `payload` is then empty).
    pub(crate) fn encode_head_for(
        &self,
        max_frame_size: usize,
        payload_len: usize,
    ) -> Result<Bytes, WireError> {
        let mut out = BytesMut::new();
        self.encode_head_into(&mut out, max_frame_size, payload_len, 0)?;
        Ok(out.freeze())
    }

    /// Appends prefix and header block of a frame with a payload of `payload_len` bytes to
    /// `out`, reserving `extra` more bytes.
    fn encode_head_into(
        &self,
        out: &mut BytesMut,
        max_frame_size: usize,
        payload_len: usize,
        extra: usize,
    ) -> Result<(), WireError> {
        let block = self.header_block()?;
        let header_len = u16::try_from(block.len())
            .map_err(|_| WireError::HeadersTooLarge { len: block.len() })?;
        let total = PREFIX_LEN + block.len() + payload_len;
        let length = u32::try_from(total)
            .ok()
            .filter(|_| total <= max_frame_size)
            .ok_or(WireError::FrameTooLarge {
                length: total as u64,
                max: max_frame_size as u64,
            })?;
        let prefix = Prefix {
            length,
            header_len,
            frame_type: self.frame_type.into(),
            reserved: self.reserved,
            flags: self.flags,
            app_id: self.app_id,
            stream_id: self.stream_id,
            sequence: self.sequence,
        };
        out.reserve(PREFIX_LEN + block.len() + extra);
        prefix.write(out);
        out.extend_from_slice(&block);
        Ok(())
    }

    /// The encoded frame.
    ///
    /// # Errors
    ///
    /// As [`Frame::encode_into`] with [`MAX_FRAME_SIZE`].
    pub fn encode(&self) -> Result<Bytes, WireError> {
        let mut out = BytesMut::new();
        self.encode_into(&mut out, MAX_FRAME_SIZE)?;
        Ok(out.freeze())
    }

    /// Decodes one complete frame that fills `buf` exactly (limit [`MAX_FRAME_SIZE`]).
    ///
    /// # Errors
    ///
    /// [`WireError::FrameTooShort`] (also for a buffer shorter than the prefix),
    /// [`WireError::FrameTooLarge`], [`WireError::HeaderLenPastEnd`],
    /// [`WireError::LengthMismatch`], [`WireError::UnknownFrameType`], and the header errors of
    /// [`decode_headers`].
    pub fn decode(buf: Bytes) -> Result<Frame, WireError> {
        let prefix = Prefix::parse(&buf).ok_or(WireError::FrameTooShort {
            length: buf.len() as u64,
        })?;
        prefix.check(MAX_FRAME_SIZE)?;
        if u64::from(prefix.length) != buf.len() as u64 {
            return Err(WireError::LengthMismatch {
                claimed: u64::from(prefix.length),
                actual: buf.len() as u64,
            });
        }
        Frame::from_parts(prefix, buf)
    }

    /// Builds the frame from a checked prefix and the whole frame buffer (`buf.len()` equals
    /// `prefix.length`, and [`Prefix::check`] passed).
    pub(crate) fn from_parts(prefix: Prefix, buf: Bytes) -> Result<Frame, WireError> {
        let frame_type = FrameType::try_from(prefix.frame_type)?;
        let header_end = PREFIX_LEN + usize::from(prefix.header_len);
        let headers = if prefix.header_len == 0 {
            None
        } else {
            Some(decode_headers(buf.slice(PREFIX_LEN..header_end))?)
        };
        Ok(Frame {
            frame_type,
            reserved: prefix.reserved,
            flags: prefix.flags,
            app_id: prefix.app_id,
            stream_id: prefix.stream_id,
            sequence: prefix.sequence,
            headers,
            payload: buf.slice(header_end..),
        })
    }
}

/// Decodes a header block: a msgpack map whose keys are strings, in order.
///
/// Values are kept exactly as msgpack gives them (`bin` values are slices of `block`, floats keep
/// their width), so that [`encode_headers`] writes the same bytes back.
///
/// # Errors
///
/// [`WireError::HeaderBlock`] for invalid msgpack (or trailing bytes),
/// [`WireError::HeaderNotMap`], [`WireError::HeaderKeyNotString`].
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use fedrun_wire::{decode_headers, encode_headers};
///
/// let block = Bytes::from_static(b"\x82\xa1a\x01\xa1b\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00");
/// let h = decode_headers(block.clone()).unwrap();
/// assert_eq!(h.get("b").and_then(|v| v.as_f64()), Some(1.5));
/// assert_eq!(encode_headers(&h).unwrap(), block.to_vec());
/// assert!(decode_headers(Bytes::from_static(b"\x81\x01\x02")).is_err());
/// ```
pub fn decode_headers(block: Bytes) -> Result<Headers, WireError> {
    let value = msgpack::decode(block).map_err(WireError::HeaderBlock)?;
    let Value::Map(map) = value else {
        return Err(WireError::HeaderNotMap(value.kind()));
    };
    let mut headers = Headers::new();
    for (k, v) in map.into_pairs() {
        match k {
            Value::Str(key) => {
                headers.insert(key, v);
            }
            other => return Err(WireError::HeaderKeyNotString(format!("{other:?}"))),
        }
    }
    Ok(headers)
}

/// Encodes headers as msgpack-python would (`msgpack.packb(headers)`): a map of string keys in
/// order, values in their smallest msgpack forms, floats as float64.
///
/// # Errors
///
/// [`WireError::HeaderEncode`] for a value that is not msgpack-native (a tuple, an ndarray...),
/// [`WireError::HeadersTooLarge`] when the block exceeds 65535 bytes.
pub fn encode_headers(headers: &Headers) -> Result<Vec<u8>, WireError> {
    let len = headers_len(headers)?;
    let mut out = Vec::with_capacity(len);
    write_headers(&mut out, headers)?;
    Ok(out)
}

fn headers_len(headers: &Headers) -> Result<usize, WireError> {
    let mut counter = ByteCounter::default();
    write_headers(&mut counter, headers)?;
    if counter.0 > usize::from(u16::MAX) {
        return Err(WireError::HeadersTooLarge { len: counter.0 });
    }
    Ok(counter.0)
}

fn write_headers<S: msgpack::Sink>(out: &mut S, headers: &Headers) -> Result<(), WireError> {
    msgpack::write_map_len(out, headers.len()).map_err(WireError::HeaderEncode)?;
    for (k, v) in headers.iter() {
        msgpack::write_str(out, k).map_err(WireError::HeaderEncode)?;
        msgpack::write_native(out, v, ENCODE_MAX_DEPTH).map_err(WireError::HeaderEncode)?;
    }
    Ok(())
}

/// The HELLO/READY payload: `{"endpoint_name": .., "timestamp": .., "fqcn": ..}`.
///
/// Only `endpoint_name` is required on receipt; `timestamp` and `fqcn` are informational.
///
/// # Example
///
/// ```
/// use fedrun_cell::Fqcn;
/// use fedrun_wire::HandshakeInfo;
///
/// let info = HandshakeInfo::now(&Fqcn::new("site-1").unwrap());
/// let bytes = info.encode().unwrap();
/// assert_eq!(&bytes[..15], b"\x83\xadendpoint_name");
/// let back = HandshakeInfo::decode(&bytes).unwrap();
/// assert_eq!(back, info);
/// assert_eq!(back.endpoint().unwrap().as_str(), "site-1");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct HandshakeInfo {
    /// The sender's endpoint name (its FQCN).
    pub endpoint_name: String,
    /// The sender's clock at send, epoch seconds.
    pub timestamp: Option<f64>,
    /// The sender's FQCN, from its public properties.
    pub fqcn: Option<String>,
}

impl HandshakeInfo {
    /// The handshake of endpoint `fqcn`, stamped with the current time.
    pub fn now(fqcn: &Fqcn) -> HandshakeInfo {
        HandshakeInfo {
            endpoint_name: fqcn.as_str().to_owned(),
            timestamp: Some(epoch_secs()),
            fqcn: Some(fqcn.as_str().to_owned()),
        }
    }

    /// The msgpack payload, keys in NVFlare's order (absent optional fields are left out).
    ///
    /// # Errors
    ///
    /// [`WireError::HeaderEncode`] only if a string exceeds msgpack's 4 GiB limit.
    pub fn encode(&self) -> Result<Bytes, WireError> {
        let mut map = Map::new();
        map.insert("endpoint_name", self.endpoint_name.as_str());
        if let Some(t) = self.timestamp {
            map.insert("timestamp", t);
        }
        if let Some(f) = &self.fqcn {
            map.insert("fqcn", f.as_str());
        }
        let bytes = msgpack::encode(&Value::Map(map)).map_err(WireError::HeaderEncode)?;
        Ok(Bytes::from(bytes))
    }

    /// Reads a HELLO/READY payload.
    ///
    /// # Errors
    ///
    /// [`WireError::Handshake`] when it is not a msgpack map with a string `endpoint_name`.
    pub fn decode(payload: &Bytes) -> Result<HandshakeInfo, WireError> {
        let value = msgpack::decode(payload.clone())
            .map_err(|e| WireError::Handshake(format!("payload is not msgpack: {e}")))?;
        let Value::Map(map) = value else {
            return Err(WireError::Handshake(format!(
                "payload is a {}, not a map",
                value.kind()
            )));
        };
        let endpoint_name = map
            .get("endpoint_name")
            .and_then(Value::as_str)
            .ok_or_else(|| WireError::Handshake("no string endpoint_name".to_owned()))?
            .to_owned();
        Ok(HandshakeInfo {
            endpoint_name,
            timestamp: map.get("timestamp").and_then(Value::as_f64),
            fqcn: map.get("fqcn").and_then(Value::as_str).map(str::to_owned),
        })
    }

    /// The endpoint name as a validated FQCN (`[A-Za-z0-9_.~-]`, non-empty, no
    /// empty or duplicate parts).
    ///
    /// # Errors
    ///
    /// [`WireError::InvalidEndpointName`].
    pub fn endpoint(&self) -> Result<Fqcn, WireError> {
        Fqcn::new(self.endpoint_name.as_str()).map_err(WireError::InvalidEndpointName)
    }
}

/// The current time as epoch seconds (0.0 if the clock is before 1970).
pub(crate) fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn prefix_bytes(length: u32, header_len: u16, t: u8) -> Vec<u8> {
        let mut b = BytesMut::new();
        Prefix {
            length,
            header_len,
            frame_type: t,
            reserved: 0,
            flags: 0,
            app_id: 0,
            stream_id: 0,
            sequence: 0,
        }
        .write(&mut b);
        b.to_vec()
    }

    #[test]
    fn loopback_ping_vector_decodes_to_its_fields() {
        let b = Bytes::from(hex::decode("00000011000006000000000000240015c0").unwrap());
        let f = Frame::decode(b.clone()).unwrap();
        assert_eq!(f.frame_type, FrameType::Ping);
        assert_eq!((f.app_id, f.stream_id, f.sequence), (0, 36, 21));
        assert!(f.headers.is_none());
        assert_eq!(&f.payload[..], HEARTBEAT_PAYLOAD);
        assert_eq!(f.encode().unwrap(), b);
    }

    #[test]
    fn length_and_header_len_limits_are_typed_errors() {
        let short = Bytes::from(prefix_bytes(15, 0, 1));
        assert!(matches!(
            Frame::decode(short),
            Err(WireError::FrameTooShort { length: 15 })
        ));
        let huge = Bytes::from(prefix_bytes(u32::MAX, 0, 1));
        assert!(matches!(
            Frame::decode(huge),
            Err(WireError::FrameTooLarge { .. })
        ));
        let mut hl = prefix_bytes(18, 3, 1);
        hl.extend_from_slice(&[0x80, 0x80]);
        assert!(matches!(
            Frame::decode(Bytes::from(hl)),
            Err(WireError::HeaderLenPastEnd { header_len: 3, .. })
        ));
        let mut mismatch = prefix_bytes(20, 0, 1);
        mismatch.push(0);
        assert!(matches!(
            Frame::decode(Bytes::from(mismatch)),
            Err(WireError::LengthMismatch { .. })
        ));
        assert!(matches!(
            Frame::decode(Bytes::from(prefix_bytes(16, 0, 8))),
            Err(WireError::UnknownFrameType(8))
        ));
    }

    #[test]
    fn header_blocks_must_be_maps_with_string_keys() {
        assert!(matches!(
            decode_headers(Bytes::from_static(b"\x91\x01")),
            Err(WireError::HeaderNotMap("list"))
        ));
        assert!(matches!(
            decode_headers(Bytes::from_static(b"\x81\x01\x01")),
            Err(WireError::HeaderKeyNotString(_))
        ));
        assert!(matches!(
            decode_headers(Bytes::from_static(b"\x81\xa1a")),
            Err(WireError::HeaderBlock(_))
        ));
    }

    #[test]
    fn empty_header_map_is_written_without_a_block() {
        let mut f = Frame::data(Headers::new(), Bytes::new());
        assert_eq!(f.encode().unwrap().len(), PREFIX_LEN);
        f.headers = None;
        assert_eq!(f.encode().unwrap().len(), PREFIX_LEN);
    }

    #[test]
    fn oversized_header_block_is_refused() {
        let mut h = Headers::new();
        h.insert("big", "x".repeat(70_000));
        assert!(matches!(
            Frame::data(h, Bytes::new()).encode(),
            Err(WireError::HeadersTooLarge { .. })
        ));
    }

    #[test]
    fn non_native_header_value_is_refused() {
        let mut h = Headers::new();
        h.insert("t", Value::Tuple(vec![]));
        assert!(matches!(
            Frame::data(h, Bytes::new()).encode(),
            Err(WireError::HeaderEncode(_))
        ));
    }

    #[test]
    fn handshake_without_endpoint_name_or_with_bad_name_is_refused() {
        let no_name = Bytes::from_static(b"\x81\xa4fqcn\xa1a");
        assert!(matches!(
            HandshakeInfo::decode(&no_name),
            Err(WireError::Handshake(_))
        ));
        let info = HandshakeInfo {
            endpoint_name: "a..b".into(),
            timestamp: None,
            fqcn: None,
        };
        assert!(matches!(
            info.endpoint(),
            Err(WireError::InvalidEndpointName(_))
        ));
        let info = HandshakeInfo {
            endpoint_name: String::new(),
            timestamp: None,
            fqcn: None,
        };
        assert!(info.endpoint().is_err());
    }
}
