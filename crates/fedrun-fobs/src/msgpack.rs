//! A small msgpack reader and writer, written for hostile input and byte-exact output.
//!
//! Why not a general msgpack crate: the bytes fedrun reads come from peers, so the reader must be
//! *bounded* (a nesting limit, a limit on the number of values, no allocation in proportion to a
//! claimed length, every length and count checked against what is left, counts of nested
//! containers together) and *zero-copy* (a `bin` value is a slice of the input
//! [`Bytes`], so a 64 MiB array is never copied); and the bytes fedrun writes must be identical to
//! what msgpack-python 1.x writes with its defaults, which this writer reproduces exactly:
//!
//! | value | encoding |
//! |---|---|
//! | int ≥ 0 | positive fixint, `uint8`, `uint16`, `uint32`, `uint64` (smallest) |
//! | int < 0 | negative fixint, `int8`, `int16`, `int32`, `int64` (smallest) |
//! | str | fixstr, `str8` (32..=255 bytes), `str16`, `str32` |
//! | bytes | `bin8`, `bin16`, `bin32` |
//! | float | `float64` (`cb`); [`Value::F32`] stays `float32` (`ca`) |
//! | list / dict | fixarray/fixmap, 16, 32 |
//! | ext | fixext 1/2/4/8/16, `ext8`, `ext16`, `ext32` |
//!
//! This module knows only msgpack: the FOBS object model on top of it is in [`crate::tags`].
//! [`decode`] and [`encode`] handle msgpack-native [`Value`]s only.

use bytes::Bytes;
use fedrun_core::{Integer, Map, Value};

use crate::error::FobsError;

/// The default nesting limit of the decoder.
pub const DEFAULT_MAX_DEPTH: usize = 512;

/// The default limit on the number of msgpack values one decoder reads (every scalar, every
/// container and every map key counts one): 1 Mi values, at most 48 MiB of decoded [`Value`]s.
///
/// Why a count and not only a check against the input: a msgpack `nil` is one byte and its
/// [`Value`] is 48, so a payload of N bytes of nils decodes into 48 × N bytes however carefully
/// capacities are reserved (a 600 MiB payload would take 28 GiB). This limit bounds the decoded
/// form whatever the payload's size. Real NVFlare payloads carry their bulk as `bytes` values
/// (model weights, `.npy` arrays), which are one value each, so they are far below it.
/// A list of a million Python floats (9 MiB) still fits.
pub const DEFAULT_MAX_VALUES: usize = 1024 * 1024;

/// The nesting limit of the writers (values built by hand can be nested deeper than anything the
/// decoder accepts; this keeps the recursion bounded).
pub const ENCODE_MAX_DEPTH: usize = 1024;

/// Decode one msgpack value that fills `input` exactly, with the default nesting limit.
///
/// Maps stay maps: FOBS tags are not interpreted (use [`crate::decode_value`] for that).
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_core::Value;
/// use fedrun_fobs::msgpack;
///
/// let v = msgpack::decode(Bytes::from_static(b"\x92\x01\xa1a")).unwrap();
/// assert_eq!(v, Value::from(vec![Value::from(1), Value::from("a")]));
/// ```
pub fn decode(input: Bytes) -> Result<Value, FobsError> {
    let mut d = Decoder::new(input);
    let v = d.read_value()?;
    d.finish()?;
    Ok(v)
}

/// Encode a msgpack-native value (nil, bool, int, float, str, bin, list, dict, ext) exactly as
/// msgpack-python would. FOBS objects (tuple, set, ndarray, Shareable, FLContext, tagged) are an
/// error ([`FobsError::NotMsgpackNative`]); [`crate::encode_value`] encodes those.
///
/// # Example
/// ```
/// use fedrun_core::{Map, Value};
/// use fedrun_fobs::msgpack;
///
/// let mut headers = Map::new();
/// headers.insert("cn__channel", "task");
/// headers.insert("cn__send_time", 1.5);
/// let bytes = msgpack::encode(&Value::Map(headers)).unwrap();
/// assert_eq!(&bytes[..2], b"\x82\xab");
/// ```
pub fn encode(value: &Value) -> Result<Vec<u8>, FobsError> {
    let mut out = Vec::new();
    write_native(&mut out, value, ENCODE_MAX_DEPTH)?;
    Ok(out)
}

/// What the decoder does with each map it has read (the FOBS layer turns tagged maps into typed
/// values here, in the same pass).
pub(crate) trait MapHook {
    /// Turn a complete map that started at byte `offset` into a value.
    fn finish_map(&mut self, map: Map, offset: usize) -> Result<Value, FobsError>;
}

/// The hook that keeps maps as maps.
struct PlainMaps;

impl MapHook for PlainMaps {
    fn finish_map(&mut self, map: Map, _offset: usize) -> Result<Value, FobsError> {
        Ok(Value::Map(map))
    }
}

/// A bounded, zero-copy msgpack reader over a [`Bytes`] buffer.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_fobs::{msgpack::Decoder, FobsError};
///
/// // two values back to back
/// let mut d = Decoder::new(Bytes::from_static(b"\x01\xc4\x02hi"));
/// assert_eq!(d.read_value().unwrap().as_i64(), Some(1));
/// assert_eq!(d.read_value().unwrap().as_bin().map(|b| &b[..]), Some(&b"hi"[..]));
/// d.finish().unwrap();
///
/// // nesting is bounded
/// let deep = Bytes::from(vec![0x91u8; 10]);
/// let err = Decoder::new(deep).with_max_depth(4).read_value().unwrap_err();
/// assert!(matches!(err, FobsError::DepthExceeded { limit: 4, .. }));
/// ```
#[derive(Debug)]
pub struct Decoder {
    buf: Bytes,
    pos: usize,
    max_depth: usize,
    max_values: usize,
    /// Values read so far (scalars, containers and map keys), across [`Decoder::read_value`]
    /// calls.
    values: usize,
}

impl Decoder {
    /// A decoder at the start of `buf`, with [`DEFAULT_MAX_DEPTH`].
    pub fn new(buf: Bytes) -> Self {
        Decoder {
            buf,
            pos: 0,
            max_depth: DEFAULT_MAX_DEPTH,
            max_values: DEFAULT_MAX_VALUES,
            values: 0,
        }
    }

    /// Set the nesting limit (arrays and maps inside each other).
    pub fn with_max_depth(mut self, max_depth: usize) -> Self {
        self.max_depth = max_depth;
        self
    }

    /// Set the limit on the number of values this decoder reads in all (every scalar, every
    /// container and every map key counts one; [`DEFAULT_MAX_VALUES`] by default). A container
    /// whose declared size would pass it is refused at its header, before anything is reserved
    /// ([`FobsError::TooManyValues`]).
    ///
    /// # Example
    /// ```
    /// use bytes::Bytes;
    /// use fedrun_fobs::{msgpack::Decoder, FobsError};
    ///
    /// // [nil, nil, nil] is four values (the list and its three items)
    /// let input = Bytes::from_static(b"\x93\xc0\xc0\xc0");
    /// assert!(Decoder::new(input.clone()).with_max_values(4).read_value().is_ok());
    /// let err = Decoder::new(input).with_max_values(3).read_value().unwrap_err();
    /// assert!(matches!(err, FobsError::TooManyValues { limit: 3, .. }));
    /// ```
    pub fn with_max_values(mut self, max_values: usize) -> Self {
        self.max_values = max_values;
        self
    }

    /// The offset of the next byte to read.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Check that the whole input was read.
    pub fn finish(&self) -> Result<(), FobsError> {
        match self.remaining() {
            0 => Ok(()),
            remaining => Err(FobsError::TrailingBytes {
                offset: self.pos,
                remaining,
            }),
        }
    }

    /// Read the next value; maps stay maps.
    pub fn read_value(&mut self) -> Result<Value, FobsError> {
        self.read_value_with(&mut PlainMaps)
    }

    /// Read the next value, passing every map to `hook`.
    pub(crate) fn read_value_with<H: MapHook>(&mut self, hook: &mut H) -> Result<Value, FobsError> {
        self.read(hook)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], FobsError> {
        let available = self.remaining();
        if n > available {
            return Err(FobsError::Truncated {
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, FobsError> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], FobsError> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N)?);
        Ok(b)
    }

    fn len8(&mut self) -> Result<usize, FobsError> {
        Ok(usize::from(self.u8()?))
    }

    fn len16(&mut self) -> Result<usize, FobsError> {
        Ok(usize::from(u16::from_be_bytes(self.be()?)))
    }

    fn len32(&mut self) -> Result<usize, FobsError> {
        let n = u32::from_be_bytes(self.be()?);
        usize::try_from(n).map_err(|_| FobsError::LengthPastEnd {
            offset: self.pos,
            claimed: u64::from(n),
            remaining: self.remaining(),
        })
    }

    /// `len` bytes as a zero-copy slice of the input.
    fn slice(&mut self, len: usize, len_at: usize) -> Result<Bytes, FobsError> {
        if len > self.remaining() {
            return Err(FobsError::LengthPastEnd {
                offset: len_at,
                claimed: len as u64,
                remaining: self.remaining(),
            });
        }
        let b = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(b)
    }

    fn string(&mut self, len: usize, start: usize) -> Result<Value, FobsError> {
        if len > self.remaining() {
            return Err(FobsError::LengthPastEnd {
                offset: start,
                claimed: len as u64,
                remaining: self.remaining(),
            });
        }
        let bytes = &self.buf[self.pos..self.pos + len];
        let text = match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => return Err(FobsError::InvalidUtf8 { offset: start }),
        };
        self.pos += len;
        Ok(Value::Str(text))
    }

    /// Open a container of `n` elements (`slots` values: `n` for a list, `2 n` for a map) whose
    /// header started at `start`, given `owed` values still to come for the containers already
    /// open.
    ///
    /// Every value takes at least one byte, so the values still owed, these included, must fit
    /// in the bytes left, and they must fit in the value limit: a claimed count never drives an
    /// allocation. Since the check covers every open container at once (not each against the
    /// whole rest of the input), the capacity reserved by all containers together never exceeds
    /// one slot per input byte, however they nest.
    fn open(
        &self,
        stack: &[Frame],
        kind: Open,
        n: usize,
        owed: usize,
        start: usize,
    ) -> Result<(Frame, usize), FobsError> {
        if stack.len() >= self.max_depth {
            return Err(FobsError::DepthExceeded {
                limit: self.max_depth,
                offset: start,
            });
        }
        let slots = match kind {
            Open::Array => n,
            Open::Map => n.saturating_mul(2),
        };
        let owed = owed.saturating_add(slots);
        if owed > self.remaining() {
            return Err(FobsError::LengthPastEnd {
                offset: start,
                claimed: n as u64,
                remaining: self.remaining(),
            });
        }
        if owed.saturating_add(self.values) > self.max_values {
            return Err(FobsError::TooManyValues {
                limit: self.max_values,
                offset: start,
            });
        }
        let frame = match kind {
            Open::Array => Frame::Array {
                items: Vec::with_capacity(n),
                left: n,
            },
            Open::Map => Frame::Map {
                pairs: Vec::with_capacity(n),
                key: None,
                left: n,
                start,
            },
        };
        Ok((frame, owed))
    }

    /// Iterative (explicit stack), so that nesting costs heap, not call stack.
    fn read<H: MapHook>(&mut self, hook: &mut H) -> Result<Value, FobsError> {
        let mut stack: Vec<Frame> = Vec::new();
        // values the open containers still wait for (each will take at least one byte)
        let mut owed = 0usize;
        loop {
            let start = self.pos;
            if self.values >= self.max_values {
                return Err(FobsError::TooManyValues {
                    limit: self.max_values,
                    offset: start,
                });
            }
            self.values += 1;
            // this value fills one of the slots owed (none for the root)
            owed = owed.saturating_sub(usize::from(!stack.is_empty()));
            let mut value = match self.read_head()? {
                Head::Value(v) => v,
                Head::Open(kind, n) => {
                    let (frame, now_owed) = self.open(&stack, kind, n, owed, start)?;
                    owed = now_owed;
                    match frame {
                        Frame::Array { left: 0, .. } => Value::Array(Vec::new()),
                        Frame::Map { left: 0, .. } => hook.finish_map(Map::new(), start)?,
                        frame => {
                            stack.push(frame);
                            continue;
                        }
                    }
                }
            };
            // hand the value to its container; close every container it completes
            loop {
                match stack.last_mut() {
                    None => return Ok(value),
                    Some(Frame::Array { items, left }) => {
                        items.push(value);
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        value = Value::Array(std::mem::take(items));
                        stack.pop();
                    }
                    Some(Frame::Map {
                        pairs,
                        key,
                        left,
                        start,
                    }) => {
                        let Some(k) = key.take() else {
                            *key = Some(value);
                            break;
                        };
                        pairs.push((k, value));
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        let (pairs, start) = (std::mem::take(pairs), *start);
                        stack.pop();
                        value = hook.finish_map(Map::from_pairs(pairs), start)?;
                    }
                }
            }
        }
    }

    fn ext(&mut self, len: usize, start: usize) -> Result<Value, FobsError> {
        let tag = i8::from_be_bytes(self.be()?);
        let data = self.slice(len, start)?;
        Ok(Value::Ext(tag, data))
    }

    /// One scalar, or the header of a container.
    fn read_head(&mut self) -> Result<Head, FobsError> {
        let start = self.pos;
        let m = self.u8()?;
        let v = match m {
            0x00..=0x7f => Value::Int(Integer::from(m)),
            0x80..=0x8f => return Ok(Head::Open(Open::Map, usize::from(m & 0x0f))),
            0x90..=0x9f => return Ok(Head::Open(Open::Array, usize::from(m & 0x0f))),
            0xa0..=0xbf => self.string(usize::from(m & 0x1f), start)?,
            0xc0 => Value::Nil,
            0xc1 => return Err(FobsError::ReservedMarker { offset: start }),
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4 => {
                let n = self.len8()?;
                Value::Bin(self.slice(n, start)?)
            }
            0xc5 => {
                let n = self.len16()?;
                Value::Bin(self.slice(n, start)?)
            }
            0xc6 => {
                let n = self.len32()?;
                Value::Bin(self.slice(n, start)?)
            }
            0xc7 => {
                let n = self.len8()?;
                self.ext(n, start)?
            }
            0xc8 => {
                let n = self.len16()?;
                self.ext(n, start)?
            }
            0xc9 => {
                let n = self.len32()?;
                self.ext(n, start)?
            }
            0xca => Value::F32(f32::from_be_bytes(self.be()?)),
            0xcb => Value::F64(f64::from_be_bytes(self.be()?)),
            0xcc => Value::Int(Integer::from(self.u8()?)),
            0xcd => Value::Int(Integer::from(u16::from_be_bytes(self.be()?))),
            0xce => Value::Int(Integer::from(u32::from_be_bytes(self.be()?))),
            0xcf => Value::Int(Integer::from(u64::from_be_bytes(self.be()?))),
            0xd0 => Value::Int(Integer::from(i8::from_be_bytes(self.be()?))),
            0xd1 => Value::Int(Integer::from(i16::from_be_bytes(self.be()?))),
            0xd2 => Value::Int(Integer::from(i32::from_be_bytes(self.be()?))),
            0xd3 => Value::Int(Integer::from(i64::from_be_bytes(self.be()?))),
            0xd4 => self.ext(1, start)?,
            0xd5 => self.ext(2, start)?,
            0xd6 => self.ext(4, start)?,
            0xd7 => self.ext(8, start)?,
            0xd8 => self.ext(16, start)?,
            0xd9 => {
                let n = self.len8()?;
                self.string(n, start)?
            }
            0xda => {
                let n = self.len16()?;
                self.string(n, start)?
            }
            0xdb => {
                let n = self.len32()?;
                self.string(n, start)?
            }
            0xdc => return Ok(Head::Open(Open::Array, self.len16()?)),
            0xdd => return Ok(Head::Open(Open::Array, self.len32()?)),
            0xde => return Ok(Head::Open(Open::Map, self.len16()?)),
            0xdf => return Ok(Head::Open(Open::Map, self.len32()?)),
            0xe0..=0xff => Value::Int(Integer::from(i8::from_be_bytes([m]))),
        };
        Ok(Head::Value(v))
    }
}

/// What [`Decoder::read_head`] found.
enum Head {
    Value(Value),
    Open(Open, usize),
}

#[derive(Clone, Copy)]
enum Open {
    Array,
    Map,
}

/// A container being filled by the iterative decoder.
enum Frame {
    Array {
        items: Vec<Value>,
        left: usize,
    },
    Map {
        pairs: Vec<(Value, Value)>,
        key: Option<Value>,
        left: usize,
        start: usize,
    },
}

/// Where the writer puts bytes: a `Vec<u8>`, or a [`ByteCounter`] that only measures.
pub trait Sink {
    /// Append bytes.
    fn put(&mut self, bytes: &[u8]);

    /// Append the bytes of a shared buffer. The default copies them as [`Sink::put`] does;
    /// [`Segments`] keeps a reference to a big buffer instead.
    fn put_shared(&mut self, bytes: &Bytes) {
        self.put(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A [`Sink`] that counts bytes instead of storing them (to size a buffer before writing).
///
/// # Example
/// ```
/// use fedrun_fobs::msgpack::{write_str, ByteCounter};
///
/// let mut c = ByteCounter::default();
/// write_str(&mut c, "hello").unwrap();
/// assert_eq!(c.0, 6);
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct ByteCounter(pub usize);

impl Sink for ByteCounter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

/// The smallest shared buffer a [`Segments`] sink references instead of copying (64 KiB).
pub const SHARED_SEGMENT_MIN: usize = 64 * 1024;

/// A [`Sink`] that collects an encoding as a list of buffers whose concatenation is the
/// encoding: small writes are gathered into one buffer, and a shared buffer (a `bytes` value) of
/// at least [`SHARED_SEGMENT_MIN`] bytes becomes a segment of its own, referenced, not copied.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_fobs::msgpack::{write_bin_len, Segments, Sink};
///
/// let big = Bytes::from(vec![7u8; 100_000]);
/// let mut s = Segments::default();
/// write_bin_len(&mut s, big.len()).unwrap();
/// s.put_shared(&big);
/// s.put(b"\x01");
/// let segments = s.into_segments();
/// assert_eq!(segments.len(), 3); // the bin header, the value itself, what follows
/// assert_eq!(&segments[0][..], &[0xc6, 0, 1, 0x86, 0xa0]);
/// assert_eq!(segments[1].as_ptr(), big.as_ptr()); // not copied
/// ```
#[derive(Debug, Default)]
pub struct Segments {
    done: Vec<Bytes>,
    current: Vec<u8>,
}

impl Segments {
    /// The segments, in order (none for an empty encoding; never an empty segment).
    pub fn into_segments(mut self) -> Vec<Bytes> {
        self.close_current();
        self.done
    }

    fn close_current(&mut self) {
        if !self.current.is_empty() {
            self.done
                .push(Bytes::from(std::mem::take(&mut self.current)));
        }
    }
}

impl Sink for Segments {
    fn put(&mut self, bytes: &[u8]) {
        self.current.extend_from_slice(bytes);
    }

    fn put_shared(&mut self, bytes: &Bytes) {
        if bytes.len() < SHARED_SEGMENT_MIN {
            self.current.extend_from_slice(bytes);
        } else {
            self.close_current();
            self.done.push(bytes.clone());
        }
    }
}

/// Write `nil`.
pub fn write_nil<S: Sink>(s: &mut S) {
    s.put(&[0xc0]);
}

/// Write a boolean.
pub fn write_bool<S: Sink>(s: &mut S, b: bool) {
    s.put(&[if b { 0xc3 } else { 0xc2 }]);
}

/// Write a non-negative integer in its smallest form.
pub fn write_uint<S: Sink>(s: &mut S, n: u64) {
    if n < 0x80 {
        s.put(&[n as u8]);
    } else if let Ok(b) = u8::try_from(n) {
        s.put(&[0xcc, b]);
    } else if let Ok(h) = u16::try_from(n) {
        let b = h.to_be_bytes();
        s.put(&[0xcd, b[0], b[1]]);
    } else if let Ok(w) = u32::try_from(n) {
        let mut b = [0xce, 0, 0, 0, 0];
        b[1..].copy_from_slice(&w.to_be_bytes());
        s.put(&b);
    } else {
        let mut b = [0xcf, 0, 0, 0, 0, 0, 0, 0, 0];
        b[1..].copy_from_slice(&n.to_be_bytes());
        s.put(&b);
    }
}

/// Write a signed integer in its smallest form (non-negative values as unsigned, like
/// msgpack-python).
pub fn write_int<S: Sink>(s: &mut S, n: i64) {
    if let Ok(u) = u64::try_from(n) {
        write_uint(s, u);
    } else if n >= -32 {
        s.put(&(n as i8).to_be_bytes());
    } else if let Ok(b) = i8::try_from(n) {
        s.put(&[0xd0, b.to_be_bytes()[0]]);
    } else if let Ok(h) = i16::try_from(n) {
        let b = h.to_be_bytes();
        s.put(&[0xd1, b[0], b[1]]);
    } else if let Ok(w) = i32::try_from(n) {
        let mut b = [0xd2, 0, 0, 0, 0];
        b[1..].copy_from_slice(&w.to_be_bytes());
        s.put(&b);
    } else {
        let mut b = [0xd3, 0, 0, 0, 0, 0, 0, 0, 0];
        b[1..].copy_from_slice(&n.to_be_bytes());
        s.put(&b);
    }
}

/// Write an integer of the whole `i64::MIN ..= u64::MAX` range.
pub fn write_integer<S: Sink>(s: &mut S, i: &Integer) {
    match (i.as_u64(), i.as_i64()) {
        (Some(u), _) => write_uint(s, u),
        (None, Some(n)) => write_int(s, n),
        // an Integer is always one of the two
        (None, None) => write_nil(s),
    }
}

/// Write a float64 (`cb`), as Python writes every `float`.
pub fn write_f64<S: Sink>(s: &mut S, f: f64) {
    let mut b = [0xcb, 0, 0, 0, 0, 0, 0, 0, 0];
    b[1..].copy_from_slice(&f.to_be_bytes());
    s.put(&b);
}

/// Write a float32 (`ca`).
pub fn write_f32<S: Sink>(s: &mut S, f: f32) {
    let mut b = [0xca, 0, 0, 0, 0];
    b[1..].copy_from_slice(&f.to_be_bytes());
    s.put(&b);
}

fn len32(what: &'static str, len: usize) -> Result<u32, FobsError> {
    u32::try_from(len).map_err(|_| FobsError::TooLarge { what, len })
}

/// Write a str header for `len` bytes (fixstr up to 31, then str8/16/32).
pub fn write_str_len<S: Sink>(s: &mut S, len: usize) -> Result<(), FobsError> {
    let n = len32("str", len)?;
    if n < 32 {
        s.put(&[0xa0 | n as u8]);
    } else if n < 0x100 {
        s.put(&[0xd9, n as u8]);
    } else if n < 0x10000 {
        let b = (n as u16).to_be_bytes();
        s.put(&[0xda, b[0], b[1]]);
    } else {
        let b = n.to_be_bytes();
        s.put(&[0xdb, b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Write a string.
pub fn write_str<S: Sink>(s: &mut S, text: &str) -> Result<(), FobsError> {
    write_str_len(s, text.len())?;
    s.put(text.as_bytes());
    Ok(())
}

/// Write a bin header for `len` bytes (bin8/16/32).
pub fn write_bin_len<S: Sink>(s: &mut S, len: usize) -> Result<(), FobsError> {
    let n = len32("bytes value", len)?;
    if n < 0x100 {
        s.put(&[0xc4, n as u8]);
    } else if n < 0x10000 {
        let b = (n as u16).to_be_bytes();
        s.put(&[0xc5, b[0], b[1]]);
    } else {
        let b = n.to_be_bytes();
        s.put(&[0xc6, b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Write a bytes value.
pub fn write_bin<S: Sink>(s: &mut S, bytes: &[u8]) -> Result<(), FobsError> {
    write_bin_len(s, bytes.len())?;
    s.put(bytes);
    Ok(())
}

/// Write an array header for `len` elements.
pub fn write_array_len<S: Sink>(s: &mut S, len: usize) -> Result<(), FobsError> {
    let n = len32("list", len)?;
    if n < 16 {
        s.put(&[0x90 | n as u8]);
    } else if n < 0x10000 {
        let b = (n as u16).to_be_bytes();
        s.put(&[0xdc, b[0], b[1]]);
    } else {
        let b = n.to_be_bytes();
        s.put(&[0xdd, b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Write a map header for `len` entries.
pub fn write_map_len<S: Sink>(s: &mut S, len: usize) -> Result<(), FobsError> {
    let n = len32("dict", len)?;
    if n < 16 {
        s.put(&[0x80 | n as u8]);
    } else if n < 0x10000 {
        let b = (n as u16).to_be_bytes();
        s.put(&[0xde, b[0], b[1]]);
    } else {
        let b = n.to_be_bytes();
        s.put(&[0xdf, b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Write an extension value (fixext 1/2/4/8/16 when the length allows, else ext8/16/32).
pub fn write_ext<S: Sink>(s: &mut S, tag: i8, data: &[u8]) -> Result<(), FobsError> {
    let t = tag.to_be_bytes()[0];
    match data.len() {
        1 => s.put(&[0xd4, t]),
        2 => s.put(&[0xd5, t]),
        4 => s.put(&[0xd6, t]),
        8 => s.put(&[0xd7, t]),
        16 => s.put(&[0xd8, t]),
        len => {
            let n = len32("ext value", len)?;
            if n < 0x100 {
                s.put(&[0xc7, n as u8, t]);
            } else if n < 0x10000 {
                let b = (n as u16).to_be_bytes();
                s.put(&[0xc8, b[0], b[1], t]);
            } else {
                let b = n.to_be_bytes();
                s.put(&[0xc9, b[0], b[1], b[2], b[3], t]);
            }
        }
    }
    s.put(data);
    Ok(())
}

/// Write a msgpack-native value, or fail with [`FobsError::NotMsgpackNative`] on a FOBS object.
/// At most `limit` levels of nesting are written ([`FobsError::EncodeDepthExceeded`] beyond).
pub fn write_native<S: Sink>(s: &mut S, v: &Value, limit: usize) -> Result<(), FobsError> {
    let mut stack = vec![(v, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        if depth >= limit {
            return Err(FobsError::EncodeDepthExceeded { limit });
        }
        match v {
            Value::Array(items) => {
                write_array_len(s, items.len())?;
                stack.extend(items.iter().rev().map(|item| (item, depth + 1)));
            }
            Value::Map(m) => {
                write_map_len(s, m.len())?;
                for (k, item) in m.as_pairs().iter().rev() {
                    stack.push((item, depth + 1));
                    stack.push((k, depth + 1));
                }
            }
            other => {
                if !write_scalar(s, other)? {
                    return Err(FobsError::NotMsgpackNative(other.kind()));
                }
            }
        }
    }
    Ok(())
}

/// Write a scalar (nil, bool, int, float, str, bin, ext). Returns false, writing nothing, for
/// containers and FOBS objects.
pub(crate) fn write_scalar<S: Sink>(s: &mut S, v: &Value) -> Result<bool, FobsError> {
    match v {
        Value::Nil => write_nil(s),
        Value::Bool(b) => write_bool(s, *b),
        Value::Int(i) => write_integer(s, i),
        Value::F32(f) => write_f32(s, *f),
        Value::F64(f) => write_f64(s, *f),
        Value::Str(text) => write_str(s, text)?,
        Value::Bin(b) => {
            write_bin_len(s, b.len())?;
            s.put_shared(b);
        }
        Value::Ext(tag, data) => write_ext(s, *tag, data)?,
        _ => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn enc(v: &Value) -> Vec<u8> {
        encode(v).unwrap()
    }

    fn int_bytes(n: i64) -> Vec<u8> {
        enc(&Value::from(n))
    }

    #[test]
    fn positive_ints_use_the_smallest_unsigned_form() {
        assert_eq!(int_bytes(0), [0x00]);
        assert_eq!(int_bytes(127), [0x7f]);
        assert_eq!(int_bytes(128), [0xcc, 0x80]);
        assert_eq!(int_bytes(255), [0xcc, 0xff]);
        assert_eq!(int_bytes(256), [0xcd, 0x01, 0x00]);
        assert_eq!(int_bytes(65535), [0xcd, 0xff, 0xff]);
        assert_eq!(int_bytes(65536), [0xce, 0, 1, 0, 0]);
        assert_eq!(int_bytes(4294967295), [0xce, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(int_bytes(4294967296), [0xcf, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(
            enc(&Value::from(u64::MAX)),
            [0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn negative_ints_use_the_smallest_signed_form() {
        assert_eq!(int_bytes(-1), [0xff]);
        assert_eq!(int_bytes(-32), [0xe0]);
        assert_eq!(int_bytes(-33), [0xd0, 0xdf]);
        assert_eq!(int_bytes(-128), [0xd0, 0x80]);
        assert_eq!(int_bytes(-129), [0xd1, 0xff, 0x7f]);
        assert_eq!(int_bytes(-32768), [0xd1, 0x80, 0x00]);
        assert_eq!(int_bytes(-32769), [0xd2, 0xff, 0xff, 0x7f, 0xff]);
        assert_eq!(int_bytes(-2147483648), [0xd2, 0x80, 0, 0, 0]);
        assert_eq!(
            int_bytes(-2147483649),
            [0xd3, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff]
        );
        assert_eq!(int_bytes(i64::MIN), [0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn strings_switch_form_at_32_256_and_65536_bytes() {
        let s = |n: usize| enc(&Value::from("x".repeat(n)));
        assert_eq!(s(0)[0], 0xa0);
        assert_eq!(s(31)[0], 0xbf);
        assert_eq!(&s(32)[..2], [0xd9, 32]);
        assert_eq!(&s(255)[..2], [0xd9, 255]);
        assert_eq!(&s(256)[..3], [0xda, 1, 0]);
        assert_eq!(&s(65535)[..3], [0xda, 0xff, 0xff]);
        assert_eq!(&s(65536)[..5], [0xdb, 0, 1, 0, 0]);
    }

    #[test]
    fn bytes_switch_form_at_256_and_65536_bytes() {
        let b = |n: usize| enc(&Value::Bin(Bytes::from(vec![0u8; n])));
        assert_eq!(&b(0)[..2], [0xc4, 0]);
        assert_eq!(&b(255)[..2], [0xc4, 255]);
        assert_eq!(&b(256)[..3], [0xc5, 1, 0]);
        assert_eq!(&b(65535)[..3], [0xc5, 0xff, 0xff]);
        assert_eq!(&b(65536)[..5], [0xc6, 0, 1, 0, 0]);
    }

    #[test]
    fn arrays_and_maps_switch_form_at_16_and_65536_entries() {
        let a = |n: usize| enc(&Value::Array(vec![Value::Nil; n]));
        assert_eq!(a(15)[0], 0x9f);
        assert_eq!(&a(16)[..3], [0xdc, 0, 16]);
        assert_eq!(&a(65536)[..5], [0xdd, 0, 1, 0, 0]);
        let m = |n: usize| {
            let pairs = (0..n).map(|i| (Value::from(i), Value::Nil)).collect();
            enc(&Value::Map(Map::from_pairs(pairs)))
        };
        assert_eq!(m(15)[0], 0x8f);
        assert_eq!(&m(16)[..3], [0xde, 0, 16]);
        assert_eq!(&m(65536)[..5], [0xdf, 0, 1, 0, 0]);
    }

    #[test]
    fn floats_are_float64_and_f32_stays_float32() {
        assert_eq!(
            enc(&Value::F64(0.1)),
            [0xcb, 0x3f, 0xb9, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a]
        );
        assert_eq!(enc(&Value::F32(1.5)), [0xca, 0x3f, 0xc0, 0, 0]);
    }

    #[test]
    fn ext_uses_fixext_for_exact_sizes() {
        let e = |n: usize| enc(&Value::Ext(5, Bytes::from(vec![0u8; n])));
        assert_eq!(&e(1)[..2], [0xd4, 5]);
        assert_eq!(&e(16)[..2], [0xd8, 5]);
        assert_eq!(&e(3)[..3], [0xc7, 3, 5]);
        assert_eq!(&e(256)[..4], [0xc8, 1, 0, 5]);
    }

    #[test]
    fn every_boundary_value_decodes_to_itself() {
        let mut values = vec![
            Value::Nil,
            Value::Bool(true),
            Value::Bool(false),
            Value::F32(2.5),
        ];
        for n in [
            0i64,
            127,
            128,
            255,
            256,
            65535,
            65536,
            -1,
            -32,
            -33,
            -128,
            -129,
            i64::MIN,
            i64::MAX,
        ] {
            values.push(Value::from(n));
        }
        values.push(Value::from(u64::MAX));
        for n in [0usize, 31, 32, 255, 256, 65536] {
            values.push(Value::from("é".repeat(n / 2)));
            values.push(Value::Bin(Bytes::from(vec![7u8; n])));
            values.push(Value::Ext(-1, Bytes::from(vec![1u8; n])));
        }
        for v in values {
            let bytes = enc(&v);
            assert_eq!(decode(Bytes::from(bytes)).unwrap(), v);
        }
    }

    #[test]
    fn bin_values_are_slices_of_the_input() {
        let input = Bytes::from(vec![0xc4, 3, 1, 2, 3]);
        let v = decode(input.clone()).unwrap();
        let b = v.as_bin().unwrap();
        assert_eq!(b.as_ptr(), input[2..].as_ptr());
    }

    #[test]
    fn fobs_objects_are_refused_by_the_plain_writer() {
        let v = Value::Tuple(vec![]);
        assert_eq!(encode(&v), Err(FobsError::NotMsgpackNative("tuple")));
    }

    #[test]
    fn nested_counts_are_checked_together_against_the_bytes_left() {
        // the inner list's 2 items fit in the 2 bytes left, but not with the outer list's
        // second item as well: refused at the inner header, before reserving anything
        assert_eq!(
            decode(Bytes::from_static(b"\x92\x92\xc0\xc0")),
            Err(FobsError::LengthPastEnd {
                offset: 1,
                claimed: 2,
                remaining: 2
            })
        );
        assert!(decode(Bytes::from_static(b"\x92\x92\xc0\xc0\xc0")).is_ok());
        // a map's entries owe two values each
        assert!(matches!(
            decode(Bytes::from_static(b"\x91\x81\xc0")),
            Err(FobsError::LengthPastEnd { offset: 1, .. })
        ));
    }

    #[test]
    fn the_value_limit_counts_values_across_reads() {
        let mut d = Decoder::new(Bytes::from_static(b"\x01\x02\x03")).with_max_values(2);
        assert!(d.read_value().is_ok());
        assert!(d.read_value().is_ok());
        assert_eq!(
            d.read_value(),
            Err(FobsError::TooManyValues {
                limit: 2,
                offset: 2
            })
        );
    }

    #[test]
    fn reserved_marker_and_bad_utf8_are_typed_errors() {
        assert_eq!(
            decode(Bytes::from_static(b"\xc1")),
            Err(FobsError::ReservedMarker { offset: 0 })
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x91\xa2\xff\xfe")),
            Err(FobsError::InvalidUtf8 { offset: 1 })
        );
        assert!(matches!(
            decode(Bytes::from_static(b"\x01\x02")),
            Err(FobsError::TrailingBytes { .. })
        ));
        assert!(matches!(
            decode(Bytes::new()),
            Err(FobsError::Truncated { .. })
        ));
    }
}
