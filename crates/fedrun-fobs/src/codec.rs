//! Whole payloads: decode a LOBS container into a [`Value`], encode a [`Value`] into one.
//!
//! Decoding splits the container ([`crate::lobs`]), decodes the main body with the bounded
//! msgpack reader ([`crate::msgpack`]) while lifting tagged maps into typed values and resolving
//! datum references ([`crate::tags`]), all in one pass and without copying `bytes` values.
//!
//! Encoding mirrors what NVFlare's `fobs.dumps` does, so that fedrun's output is byte-identical:
//! big `bytes`/`str` values found in the data of an *object* (Shareable, tuple, ndarray, ...) are
//! moved into datum sections, in the order Python creates them: when Python packs an object it
//! first walks the object's decomposed data through plain dicts and lists (and dict subclasses
//! such as nested Shareables) and externalizes every big leaf, then packs that data, meeting
//! nested objects in order. A plain dict or list at the root is never externalized (Python only
//! externalizes the data of objects). A `str` is measured in characters, as Python's `len` does.

use std::collections::HashMap;

use bytes::Bytes;
use fedrun_core::Value;
use uuid::Uuid;

use crate::error::FobsError;
use crate::lobs::{self, Datum, DatumKind, SECTION_HEADER_LEN};
use crate::msgpack::{
    self, ByteCounter, Decoder, Sink, DEFAULT_MAX_DEPTH, DEFAULT_MAX_VALUES, ENCODE_MAX_DEPTH,
};
use crate::tags::{self, decomposer, type_name, DatumTable, Lifter};

/// The multiple of its input length that decoding a payload may hold at most (see [`decode`]).
///
/// Why so many: a one-byte msgpack value (`nil`, a small int, an empty string) becomes a 48-byte
/// [`Value`]; a map entry becomes two of them, and a tagged map that is lifted into a Shareable is
/// copied into its own index (about as much again) before the map is dropped.
pub const DECODE_MEMORY_FACTOR: usize = 96;

/// NVFlare's default `max_value_size`: values of 10 MiB or more become datums.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 10 * 1024 * 1024;

/// A decoded LOBS payload.
///
/// `datum_ids` and `extra_datums` are what is needed to re-encode the payload exactly
/// ([`encode_payload`]): the ids of the datums that were resolved into `value` (in section order,
/// which is the order the encoder creates them in), and the datum sections that were left as they
/// are (FILE datums, download references with a non-zero dot, datums nothing referred to).
///
/// # Example
/// ```
/// use fedrun_core::{Shareable, Value};
/// use fedrun_fobs::{decode, encode, encode_payload, EncodeOptions};
///
/// let mut s = Shareable::new();
/// s.insert("x", 1);
/// let bytes = encode(&Value::from(s.clone())).unwrap();
///
/// let payload = decode(bytes.clone()).unwrap();
/// assert_eq!(payload.value.as_shareable(), Some(&s));
/// assert_eq!(encode_payload(&payload, &EncodeOptions::default()).unwrap(), bytes);
/// ```
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Payload {
    /// The decoded object tree.
    pub value: Value,
    /// Ids of the datums resolved into `value`, in section order.
    pub datum_ids: Vec<Uuid>,
    /// Datum sections kept as they came, in section order.
    pub extra_datums: Vec<Datum>,
}

/// Options for decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// How deep containers (lists, maps, objects' data) may nest.
    pub max_depth: usize,
    /// How many msgpack values the main body may hold in all (every scalar, container and map
    /// key counts one); [`DEFAULT_MAX_VALUES`] by default. This is what bounds the decoded form
    /// absolutely (see [`decode_with`]).
    pub max_values: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_depth: DEFAULT_MAX_DEPTH,
            max_values: DEFAULT_MAX_VALUES,
        }
    }
}

/// Options for encoding.
///
/// # Example
/// ```
/// use fedrun_fobs::{EncodeOptions, DEFAULT_MAX_VALUE_SIZE};
///
/// let opts = EncodeOptions { max_value_size: 1024, ..EncodeOptions::default() };
/// assert_eq!(EncodeOptions::default().max_value_size, DEFAULT_MAX_VALUE_SIZE);
/// assert!(opts.datum_ids.is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    /// `bytes` values of this many bytes or more, and `str` values of this many characters or
    /// more, inside an object's data become datum sections. Must be > 0.
    pub max_value_size: usize,
    /// Ids for the datums, used in order (e.g. the [`Payload::datum_ids`] of a decoded payload,
    /// to reproduce it exactly); fresh random (v4) ids are used for any further datum, and ids
    /// left over are ignored.
    pub datum_ids: Option<Vec<Uuid>>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            datum_ids: None,
        }
    }
}

/// Decode a LOBS payload (what NVFlare sends with `cn__payload_encoding = "fobs"`), with the
/// default [`DecodeOptions`].
///
/// # Memory
/// Whatever the input, decoding never holds more than [`DECODE_MEMORY_FACTOR`] × the input's
/// length + 1 MiB of heap at any moment (the input itself not counted; measured by the tests
/// `decoding_never_holds_more_than_k_times_the_input_*`: 48 × for a list of one-byte values,
/// 64 × for the densest Shareable), and, whatever the input's length, never more than
/// 128 × `max_values` + 2 × the input's length + 1 MiB ([`DecodeOptions::max_values`]; with the
/// default, 128 MiB + 2 × the input): a
/// declared count or length is checked against the bytes left (and against the values still
/// owed to every open container) before anything is reserved, `bytes` values and BLOB datums are
/// slices of the input, and strings (TEXT datums included) are copied at most once in all.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_fobs::decode;
///
/// // `fobs.dumps("hello")`
/// let p = decode(Bytes::from_static(b"\x64\x00\x00\x00\x00\x00\x00\x00\x00\x06\xa5hello")).unwrap();
/// assert_eq!(p.value.as_str(), Some("hello"));
/// ```
pub fn decode(input: Bytes) -> Result<Payload, FobsError> {
    decode_with(input, &DecodeOptions::default())
}

/// [`decode`] with options.
pub fn decode_with(input: Bytes, options: &DecodeOptions) -> Result<Payload, FobsError> {
    let sections = lobs::split(&input)?;
    let mut table = DatumTable::new(sections.datums);
    let main_start = SECTION_HEADER_LEN;
    let mut decoder = Decoder::new(sections.main)
        .with_max_depth(options.max_depth)
        .with_max_values(options.max_values);
    let mut lifter = Lifter {
        datums: Some(&mut table),
    };
    let value = decoder
        .read_value_with(&mut lifter)
        .map_err(|e| shift_offset(e, main_start))?;
    decoder.finish().map_err(|e| shift_offset(e, main_start))?;
    let (datum_ids, extra_datums) = table.into_parts();
    Ok(Payload {
        value,
        datum_ids,
        extra_datums,
    })
}

/// Report msgpack offsets relative to the whole container.
fn shift_offset(e: FobsError, by: usize) -> FobsError {
    match e {
        FobsError::Truncated {
            offset,
            needed,
            available,
        } => FobsError::Truncated {
            offset: offset + by,
            needed,
            available,
        },
        FobsError::LengthPastEnd {
            offset,
            claimed,
            remaining,
        } => FobsError::LengthPastEnd {
            offset: offset + by,
            claimed,
            remaining,
        },
        FobsError::DepthExceeded { limit, offset } => FobsError::DepthExceeded {
            limit,
            offset: offset + by,
        },
        FobsError::TooManyValues { limit, offset } => FobsError::TooManyValues {
            limit,
            offset: offset + by,
        },
        FobsError::InvalidUtf8 { offset } => FobsError::InvalidUtf8 {
            offset: offset + by,
        },
        FobsError::ReservedMarker { offset } => FobsError::ReservedMarker {
            offset: offset + by,
        },
        FobsError::TrailingBytes { offset, remaining } => FobsError::TrailingBytes {
            offset: offset + by,
            remaining,
        },
        other => other,
    }
}

/// Decode bare msgpack (no LOBS container) with FOBS tags lifted into typed values, e.g. a cell
/// message's header map. Datum references cannot be resolved without a container and stay
/// tagged objects.
///
/// # Example
/// ```
/// use fedrun_core::{Map, Value};
/// use fedrun_fobs::{decode_value, encode_value};
///
/// let mut m = Map::new();
/// m.insert("sm__sz", 326);
/// m.insert("pair", Value::Tuple(vec![Value::from(1), Value::from("a")]));
/// let v = Value::Map(m);
/// assert_eq!(decode_value(encode_value(&v).unwrap()).unwrap(), v);
/// ```
pub fn decode_value(input: Bytes) -> Result<Value, FobsError> {
    let mut decoder = Decoder::new(input);
    let value = decoder.read_value_with(&mut Lifter { datums: None })?;
    decoder.finish()?;
    Ok(value)
}

/// Encode a value as bare msgpack (no LOBS container, no datums), typed values in their tagged
/// form. For msgpack-native values this is exactly what msgpack-python writes.
pub fn encode_value(value: &Value) -> Result<Bytes, FobsError> {
    let plan = Plan::default();
    let mut counter = ByteCounter::default();
    write_tree(&mut counter, value, &plan, ENCODE_MAX_DEPTH)?;
    let mut out = Vec::with_capacity(counter.0);
    write_tree(&mut out, value, &plan, ENCODE_MAX_DEPTH)?;
    Ok(Bytes::from(out))
}

/// Encode a value as a LOBS payload with the default options (10 MiB datum threshold, fresh
/// datum ids), as NVFlare's `fobs.dumps` would.
///
/// # Example
/// ```
/// use fedrun_fobs::encode;
/// use fedrun_core::Value;
///
/// let bytes = encode(&Value::from("hello")).unwrap();
/// assert_eq!(&bytes[..], b"\x64\x00\x00\x00\x00\x00\x00\x00\x00\x06\xa5hello");
/// ```
pub fn encode(value: &Value) -> Result<Bytes, FobsError> {
    encode_with(value, &EncodeOptions::default())
}

/// Encode a value as a LOBS payload with options.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_core::{Shareable, Value};
/// use fedrun_fobs::{decode, encode_with, EncodeOptions};
///
/// let mut s = Shareable::new();
/// s.insert("big", Bytes::from(vec![7u8; 2048]));
/// let opts = EncodeOptions { max_value_size: 1024, ..EncodeOptions::default() };
/// let bytes = encode_with(&Value::from(s), &opts).unwrap();
///
/// // the value went into a BLOB datum and comes back in place
/// let p = decode(bytes).unwrap();
/// assert_eq!(p.datum_ids.len(), 1);
/// let s = p.value.as_shareable().unwrap();
/// assert_eq!(s.get("big").and_then(Value::as_bin).map(|b| b.len()), Some(2048));
/// ```
pub fn encode_with(value: &Value, options: &EncodeOptions) -> Result<Bytes, FobsError> {
    encode_parts(
        value,
        &[],
        options,
        options.datum_ids.as_deref().unwrap_or(&[]),
    )
}

/// Encode a decoded (possibly modified) payload: datum ids are taken from
/// `options.datum_ids` if set, else from `payload.datum_ids`; the extra datums are appended after
/// the datums the value needs. Re-encoding an unmodified payload with the `max_value_size` its
/// producer used gives back the original bytes.
pub fn encode_payload(payload: &Payload, options: &EncodeOptions) -> Result<Bytes, FobsError> {
    let ids = options.datum_ids.as_deref().unwrap_or(&payload.datum_ids);
    encode_parts(&payload.value, &payload.extra_datums, options, ids)
}

/// Decide which leaves become datums, and their ids (`ids` in order, then fresh ones).
fn plan_parts<'v>(
    value: &'v Value,
    options: &EncodeOptions,
    ids: &[Uuid],
) -> Result<Planned<'v>, FobsError> {
    if options.max_value_size == 0 {
        return Err(FobsError::InvalidOption(
            "max_value_size must be greater than 0",
        ));
    }
    let mut planner = Planner {
        threshold: options.max_value_size,
        plan: Plan::default(),
        leaves: Vec::new(),
    };
    planner.walk(value, ENCODE_MAX_DEPTH)?;
    let Planner {
        mut plan, leaves, ..
    } = planner;
    let mut datums = Vec::with_capacity(leaves.len());
    for (i, (addr, leaf)) in leaves.into_iter().enumerate() {
        let id = ids.get(i).copied().unwrap_or_else(Uuid::new_v4);
        plan.ids.insert(addr, id);
        datums.push((id, leaf));
    }

    let mut counter = ByteCounter::default();
    write_tree(&mut counter, value, &plan, ENCODE_MAX_DEPTH)?;
    Ok(Planned {
        plan,
        datums,
        main_len: counter.0,
    })
}

/// What [`plan_parts`] decided: which leaves become datums, under which ids, and the length of
/// the main section's body.
struct Planned<'v> {
    plan: Plan,
    datums: Vec<(Uuid, &'v Value)>,
    main_len: usize,
}

/// Write a planned LOBS payload into `s`: the main section, the datums, the extra datums.
fn write_parts<S: Sink>(
    s: &mut S,
    value: &Value,
    extra: &[Datum],
    planned: &Planned<'_>,
) -> Result<(), FobsError> {
    let mut head = Vec::with_capacity(SECTION_HEADER_LEN + lobs::DATUM_ID_LEN);
    lobs::write_section_header(&mut head, lobs::MARKER_MAIN, 0, planned.main_len as u64);
    s.put(&head);
    write_tree(s, value, &planned.plan, ENCODE_MAX_DEPTH)?;
    for (id, leaf) in &planned.datums {
        let kind = match leaf {
            Value::Str(_) => DatumKind::Text,
            _ => DatumKind::Blob,
        };
        let content = leaf_bytes(leaf);
        head.clear();
        lobs::write_section_header(
            &mut head,
            kind.marker(),
            0,
            (lobs::DATUM_ID_LEN + content.len()) as u64,
        );
        head.extend_from_slice(id.as_bytes());
        s.put(&head);
        match leaf {
            Value::Bin(b) => s.put_shared(b),
            _ => s.put(content),
        }
    }
    for d in extra {
        head.clear();
        lobs::write_section_header(
            &mut head,
            d.kind.marker(),
            d.dot,
            (lobs::DATUM_ID_LEN + d.content.len()) as u64,
        );
        head.extend_from_slice(d.id.as_bytes());
        s.put(&head);
        s.put_shared(&d.content);
    }
    Ok(())
}

/// The encoded length of a planned payload.
fn parts_len(extra: &[Datum], planned: &Planned<'_>) -> usize {
    SECTION_HEADER_LEN
        + planned.main_len
        + planned
            .datums
            .iter()
            .map(|(_, leaf)| SECTION_HEADER_LEN + lobs::DATUM_ID_LEN + leaf_bytes(leaf).len())
            .sum::<usize>()
        + extra.iter().map(Datum::section_len).sum::<usize>()
}

fn encode_parts(
    value: &Value,
    extra: &[Datum],
    options: &EncodeOptions,
    ids: &[Uuid],
) -> Result<Bytes, FobsError> {
    let planned = plan_parts(value, options, ids)?;
    let mut out = Vec::with_capacity(parts_len(extra, &planned));
    write_parts(&mut out, value, extra, &planned)?;
    Ok(Bytes::from(out))
}

/// Encode a value as [`encode_with`] does, but as a list of buffers whose concatenation is
/// exactly [`encode_with`]'s output (for the same datum ids): a `bytes` value of at least
/// [`msgpack::SHARED_SEGMENT_MIN`] bytes, inline or as a datum, is referenced as a segment of its
/// own instead of being copied. For senders that write the payload out in vectored writes (or
/// cut it into stream chunks) without ever needing it in one buffer.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_core::{Shareable, Value};
/// use fedrun_fobs::{encode, encode_segments, EncodeOptions};
///
/// let data = Bytes::from(vec![9u8; 1 << 20]);
/// let mut s = Shareable::new();
/// s.insert("data", data.clone());
/// let v = Value::from(s);
/// let segments = encode_segments(&v, &EncodeOptions::default()).unwrap();
/// assert!(segments.iter().any(|seg| seg.as_ptr() == data.as_ptr())); // referenced
/// assert_eq!(segments.concat(), encode(&v).unwrap());
/// ```
pub fn encode_segments(value: &Value, options: &EncodeOptions) -> Result<Vec<Bytes>, FobsError> {
    encode_segments_with_extra(value, &[], options)
}

/// [`encode_segments`] with `extra` datum sections appended after the datums the value needs
/// (e.g. the download-reference datums of a payload whose arrays are served by a producer).
///
/// # Example
/// ```
/// use fedrun_core::Value;
/// use fedrun_fobs::download_ref::{DownloadRef, DOT_NUMPY_DOWNLOAD};
/// use fedrun_fobs::{decode, encode_segments_with_extra, EncodeOptions};
///
/// let r = DownloadRef { fqcn: "site-1.J".into(), ref_id: "r1".into(), dot: DOT_NUMPY_DOWNLOAD };
/// let segs = encode_segments_with_extra(&Value::from(1), &[r.to_datum()], &EncodeOptions::default()).unwrap();
/// let back = decode(segs.concat().into()).unwrap();
/// assert_eq!(back.extra_datums.len(), 1);
/// assert_eq!(back.extra_datums[0].dot, DOT_NUMPY_DOWNLOAD);
/// ```
pub fn encode_segments_with_extra(
    value: &Value,
    extra: &[Datum],
    options: &EncodeOptions,
) -> Result<Vec<Bytes>, FobsError> {
    let planned = plan_parts(value, options, options.datum_ids.as_deref().unwrap_or(&[]))?;
    let mut out = msgpack::Segments::default();
    write_parts(&mut out, value, extra, &planned)?;
    Ok(out.into_segments())
}

/// The bytes a datum leaf contributes (a str's UTF-8, a bin's bytes, an ndarray's `.npy`).
fn leaf_bytes(v: &Value) -> &[u8] {
    match v {
        Value::Str(s) => s.as_bytes(),
        Value::Bin(b) => b,
        Value::NdArray(a) => a.npy(),
        _ => &[],
    }
}

/// Which leaves of the tree are written as datum references: by the leaf's address (a `bytes`
/// or `str` value, or an ndarray whose `.npy` is the leaf), the datum id.
#[derive(Default)]
struct Plan {
    ids: HashMap<usize, Uuid>,
}

impl Plan {
    fn get(&self, v: &Value) -> Option<&Uuid> {
        if self.ids.is_empty() {
            None
        } else {
            self.ids.get(&addr(v))
        }
    }
}

fn addr(v: &Value) -> usize {
    std::ptr::from_ref(v) as usize
}

/// Finds the datum leaves in the order NVFlare creates datums (see the module doc).
struct Planner<'v> {
    threshold: usize,
    plan: Plan,
    /// (address, leaf) in creation order.
    leaves: Vec<(usize, &'v Value)>,
}

/// A step of the planner's walk (an explicit stack keeps deep values off the call stack).
enum Step<'v> {
    /// Visit a value in the order msgpack packs it.
    Walk(&'v Value, usize),
    /// Python's `Externalizer` over an object's data.
    Externalize(&'v Value, usize),
}

impl<'v> Planner<'v> {
    /// Visit the tree in the order msgpack packs it: each object first externalizes its data,
    /// then its data is packed.
    fn walk(&mut self, root: &'v Value, limit: usize) -> Result<(), FobsError> {
        let mut stack = vec![Step::Walk(root, 0)];
        while let Some(step) = stack.pop() {
            match step {
                Step::Walk(v, depth) => {
                    let d = deeper(depth, limit)?;
                    let walk = |v| Step::Walk(v, d);
                    let ext = |v| Step::Externalize(v, d);
                    match v {
                        Value::Array(items) => stack.extend(items.iter().rev().map(walk)),
                        Value::Map(m) => {
                            for (k, item) in m.as_pairs().iter().rev() {
                                stack.push(walk(item));
                                stack.push(walk(k));
                            }
                        }
                        Value::Tuple(items) | Value::Set(items) => {
                            stack.extend(items.iter().rev().map(walk));
                            stack.extend(items.iter().rev().map(ext));
                        }
                        Value::NdArray(_) => self.leaf(v),
                        Value::Shareable(sh) => {
                            let items: Vec<&Value> = sh.iter().map(|(_, item)| item).collect();
                            stack.extend(items.iter().rev().map(|v| walk(v)));
                            stack.extend(items.iter().rev().map(|v| ext(v)));
                        }
                        Value::Context(c) => {
                            stack.extend(c.props.iter().rev().map(|(_, p)| walk(&p.value)));
                            stack.push(walk(&c.model));
                            stack.extend(c.props.iter().rev().map(|(_, p)| ext(&p.value)));
                            stack.push(ext(&c.model));
                        }
                        Value::Tagged(t) => {
                            stack.push(walk(&t.data));
                            stack.push(ext(&t.data));
                        }
                        _ => {}
                    }
                }
                Step::Externalize(v, depth) => {
                    let d = deeper(depth, limit)?;
                    let ext = |v| Step::Externalize(v, d);
                    match v {
                        Value::Bin(_) | Value::Str(_) => self.leaf(v),
                        Value::Array(items) => stack.extend(items.iter().rev().map(ext)),
                        Value::Map(m) => {
                            stack.extend(m.as_pairs().iter().rev().map(|(_, item)| ext(item)))
                        }
                        Value::Shareable(sh) => {
                            let items: Vec<&Value> = sh.iter().map(|(_, item)| item).collect();
                            stack.extend(items.into_iter().rev().map(ext));
                        }
                        // an OrderedDict is a dict subclass: its parent externalizes its values
                        Value::Tagged(t) if t.type_name == type_name::ORDERED_DICT => {
                            if let Value::Array(pairs) = &t.data {
                                for pair in pairs.iter().rev() {
                                    if let Value::Tuple(kv) = pair {
                                        if let [_, item] = kv.as_slice() {
                                            stack.push(ext(item));
                                        }
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// A leaf that becomes a datum if it is big enough (and was not externalized already).
    fn leaf(&mut self, v: &'v Value) {
        let big = match v {
            Value::Bin(b) => b.len() >= self.threshold,
            // Python compares len(str), which counts characters
            Value::Str(s) => s.len() >= self.threshold && s.chars().count() >= self.threshold,
            Value::NdArray(a) => a.npy().len() >= self.threshold,
            _ => false,
        };
        let a = addr(v);
        if big && !self.plan.ids.contains_key(&a) {
            // the id is filled in once all leaves are known
            self.plan.ids.insert(a, Uuid::nil());
            self.leaves.push((a, v));
        }
    }
}

/// One level deeper, or [`FobsError::EncodeDepthExceeded`].
fn deeper(depth: usize, limit: usize) -> Result<usize, FobsError> {
    if depth >= limit {
        return Err(FobsError::EncodeDepthExceeded { limit });
    }
    Ok(depth + 1)
}

fn open_tag<S: Sink>(s: &mut S, type_name: &str) -> Result<(), FobsError> {
    msgpack::write_map_len(s, 3)?;
    msgpack::write_str(s, tags::FOBS_TYPE)?;
    msgpack::write_str(s, type_name)?;
    msgpack::write_str(s, tags::FOBS_DATA)
}

fn close_tag<S: Sink>(s: &mut S, decomposer: &str) -> Result<(), FobsError> {
    msgpack::write_str(s, tags::FOBS_DC)?;
    msgpack::write_str(s, decomposer)
}

/// `{"__fobs_type__": DatumRef, "__fobs_data__": {"data": {"datum_id": id, "unwrap": true}}, ...}`
fn write_datum_ref<S: Sink>(s: &mut S, id: &Uuid) -> Result<(), FobsError> {
    open_tag(s, type_name::DATUM_REF)?;
    msgpack::write_map_len(s, 1)?;
    msgpack::write_str(s, "data")?;
    msgpack::write_map_len(s, 2)?;
    msgpack::write_str(s, "datum_id")?;
    let mut buf = uuid::Uuid::encode_buffer();
    msgpack::write_str(s, id.hyphenated().encode_lower(&mut buf))?;
    msgpack::write_str(s, "unwrap")?;
    msgpack::write_bool(s, true);
    close_tag(s, decomposer::DATA_CLASS)
}

/// A piece of output still to write (an explicit stack keeps deep values off the call stack).
enum Piece<'v> {
    Value(&'v Value, usize),
    Str(&'v str),
    MapLen(usize),
    Uint(u64),
    CloseTag(&'v str),
}

/// Write the msgpack of a FOBS tree, typed values as tagged maps, planned leaves as datum refs.
fn write_tree<S: Sink>(
    s: &mut S,
    root: &Value,
    plan: &Plan,
    limit: usize,
) -> Result<(), FobsError> {
    let mut stack = vec![Piece::Value(root, 0)];
    while let Some(piece) = stack.pop() {
        let (v, depth) = match piece {
            Piece::Value(v, depth) => (v, depth),
            Piece::Str(text) => {
                msgpack::write_str(s, text)?;
                continue;
            }
            Piece::MapLen(n) => {
                msgpack::write_map_len(s, n)?;
                continue;
            }
            Piece::Uint(n) => {
                msgpack::write_uint(s, n);
                continue;
            }
            Piece::CloseTag(dc) => {
                close_tag(s, dc)?;
                continue;
            }
        };
        let d = deeper(depth, limit)?;
        if matches!(v, Value::Bin(_) | Value::Str(_)) {
            if let Some(id) = plan.get(v) {
                write_datum_ref(s, id)?;
                continue;
            }
        }
        if msgpack::write_scalar(s, v)? {
            continue;
        }
        match v {
            Value::Array(items) => {
                msgpack::write_array_len(s, items.len())?;
                stack.extend(items.iter().rev().map(|item| Piece::Value(item, d)));
            }
            Value::Map(m) => {
                msgpack::write_map_len(s, m.len())?;
                for (k, item) in m.as_pairs().iter().rev() {
                    stack.push(Piece::Value(item, d));
                    stack.push(Piece::Value(k, d));
                }
            }
            Value::Tuple(items) | Value::Set(items) => {
                let (t, dc) = if matches!(v, Value::Tuple(_)) {
                    (type_name::TUPLE, decomposer::TUPLE)
                } else {
                    (type_name::SET, decomposer::SET)
                };
                open_tag(s, t)?;
                msgpack::write_array_len(s, items.len())?;
                stack.push(Piece::CloseTag(dc));
                stack.extend(items.iter().rev().map(|item| Piece::Value(item, d)));
            }
            Value::NdArray(a) => {
                open_tag(s, type_name::NDARRAY)?;
                msgpack::write_map_len(s, 2)?;
                msgpack::write_str(s, "type")?;
                msgpack::write_str(s, tags::NDARRAY_NATIVE)?;
                msgpack::write_str(s, "data")?;
                match plan.get(v) {
                    Some(id) => write_datum_ref(s, id)?,
                    None => msgpack::write_bin(s, a.npy())?,
                }
                close_tag(s, decomposer::NUMPY_ARRAY)?;
            }
            Value::Shareable(sh) => {
                open_tag(s, type_name::SHAREABLE)?;
                msgpack::write_map_len(s, sh.len())?;
                stack.push(Piece::CloseTag(decomposer::DICT));
                let entries: Vec<(&String, &Value)> = sh.iter().collect();
                for (k, item) in entries.into_iter().rev() {
                    stack.push(Piece::Value(item, d));
                    stack.push(Piece::Str(k));
                }
            }
            Value::Context(c) => {
                open_tag(s, type_name::FL_CONTEXT)?;
                msgpack::write_array_len(s, 2)?;
                stack.push(Piece::CloseTag(decomposer::CONTEXT));
                for (k, p) in c.props.iter().rev() {
                    stack.push(Piece::Uint(u64::from(p.mask)));
                    stack.push(Piece::Str("mask"));
                    stack.push(Piece::Value(&p.value, d));
                    stack.push(Piece::Str("value"));
                    stack.push(Piece::MapLen(2));
                    stack.push(Piece::Str(k));
                }
                stack.push(Piece::MapLen(c.props.len()));
                stack.push(Piece::Value(&c.model, d));
            }
            Value::Tagged(t) => {
                open_tag(s, &t.type_name)?;
                stack.push(Piece::CloseTag(&t.decomposer));
                stack.push(Piece::Value(&t.data, d));
            }
            // scalars were written above
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use fedrun_core::{Map, NdArray, PeerContext, Shareable, Tagged};

    use super::*;

    fn small(max_value_size: usize) -> EncodeOptions {
        EncodeOptions {
            max_value_size,
            datum_ids: None,
        }
    }

    fn nested_arrays(depth: usize) -> Value {
        let mut v = Value::from(1);
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    }

    #[test]
    fn encoder_refuses_values_nested_deeper_than_its_limit() {
        let deep = nested_arrays(ENCODE_MAX_DEPTH + 10);
        assert!(matches!(
            encode(&deep),
            Err(FobsError::EncodeDepthExceeded { .. })
        ));
        assert!(matches!(
            encode_value(&deep),
            Err(FobsError::EncodeDepthExceeded { .. })
        ));
        assert!(matches!(
            msgpack::encode(&deep),
            Err(FobsError::EncodeDepthExceeded { .. })
        ));
    }

    #[test]
    fn the_deepest_decodable_value_encodes_back() {
        let mut s = Shareable::new();
        s.insert("deep", nested_arrays(DEFAULT_MAX_DEPTH - 2));
        let bytes = encode(&Value::from(s)).unwrap();
        let p = decode(bytes.clone()).unwrap();
        assert_eq!(
            encode_payload(&p, &EncodeOptions::default()).unwrap(),
            bytes
        );
    }

    #[test]
    fn datums_follow_python_creation_order() {
        // Python externalizes the Shareable's own leaves first, then the nested array's .npy
        let array = NdArray::from_u8(&[40], &[9u8; 40]).unwrap();
        let mut s = Shareable::new();
        s.insert("a", array.clone());
        s.insert("b", Bytes::from(vec![1u8; 50]));
        s.insert("c", vec![Value::from("x".repeat(60))]);
        let bytes = encode_with(&Value::from(s.clone()), &small(32)).unwrap();
        let sections = lobs::split(&bytes).unwrap();
        let kinds: Vec<(DatumKind, usize)> = sections
            .datums
            .iter()
            .map(|d| (d.kind, d.content.len()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (DatumKind::Blob, 50),
                (DatumKind::Text, 60),
                (DatumKind::Blob, array.npy().len())
            ]
        );
        let p = decode(bytes.clone()).unwrap();
        assert_eq!(p.value, Value::from(s));
        assert_eq!(p.datum_ids.len(), 3);
        assert_eq!(encode_payload(&p, &small(32)).unwrap(), bytes);
    }

    #[test]
    fn root_plain_values_are_never_externalized() {
        let mut m = Map::new();
        m.insert("big", Bytes::from(vec![0u8; 100]));
        let bytes = encode_with(&Value::Map(m), &small(10)).unwrap();
        assert!(lobs::split(&bytes).unwrap().datums.is_empty());
    }

    #[test]
    fn str_threshold_counts_characters_like_python() {
        let mut s = Shareable::new();
        // 20 characters, 40 bytes
        s.insert("t", "é".repeat(20));
        let v = Value::from(s);
        assert!(lobs::split(&encode_with(&v, &small(21)).unwrap())
            .unwrap()
            .datums
            .is_empty());
        assert_eq!(
            lobs::split(&encode_with(&v, &small(20)).unwrap())
                .unwrap()
                .datums
                .len(),
            1
        );
    }

    #[test]
    fn datum_ids_are_reused_in_order_then_fresh() {
        let mut s = Shareable::new();
        s.insert("a", Bytes::from(vec![1u8; 8]));
        s.insert("b", Bytes::from(vec![2u8; 8]));
        let opts = EncodeOptions {
            max_value_size: 8,
            datum_ids: Some(vec![Uuid::from_u128(42)]),
        };
        let sections = lobs::split(&encode_with(&Value::from(s), &opts).unwrap()).unwrap();
        assert_eq!(sections.datums[0].id, Uuid::from_u128(42));
        assert_ne!(sections.datums[1].id, Uuid::from_u128(42));
        assert_eq!(sections.datums[1].id.get_version_num(), 4);
    }

    #[test]
    fn zero_max_value_size_is_an_invalid_option() {
        assert!(matches!(
            encode_with(&Value::Nil, &small(0)),
            Err(FobsError::InvalidOption(_))
        ));
    }

    /// Encode `data` under a tag, decode it, and check it stays tagged and re-encodes exactly.
    fn stays_tagged(type_name: &str, dc: &str, data: Value) {
        let t = Value::Tagged(Box::new(Tagged {
            type_name: type_name.to_owned(),
            decomposer: dc.to_owned(),
            data,
        }));
        let bytes = encode_value(&t).unwrap();
        let back = decode_value(bytes.clone()).unwrap();
        assert_eq!(back, t, "{type_name}");
        assert_eq!(encode_value(&back).unwrap(), bytes);
    }

    #[test]
    fn known_tags_with_unexpected_shapes_stay_tagged_and_round_trip() {
        stays_tagged(type_name::TUPLE, decomposer::TUPLE, Value::from(1));
        stays_tagged(type_name::TUPLE, decomposer::SET, Value::Array(vec![]));
        stays_tagged(type_name::SET, decomposer::SET, Value::map());
        // a Shareable without __headers__, with a non-str key, with a duplicate key
        let mut m = Map::new();
        m.insert("x", 1);
        stays_tagged(
            type_name::SHAREABLE,
            decomposer::DICT,
            Value::Map(m.clone()),
        );
        m.insert("__headers__", Value::map());
        m.insert(1, 2);
        stays_tagged(type_name::SHAREABLE, decomposer::DICT, Value::Map(m));
        let dup = Map::from_pairs(vec![
            (Value::from("__headers__"), Value::map()),
            (Value::from("__headers__"), Value::map()),
        ]);
        stays_tagged(type_name::SHAREABLE, decomposer::DICT, Value::Map(dup));
        // a context prop with a mask out of range, or keys in the other order
        let prop = |a: &str, b: &str, mask: u64| {
            let mut p = Map::new();
            p.insert(a, "v");
            p.insert(b, mask);
            let mut props = Map::new();
            props.insert("k", p);
            Value::Array(vec![Value::Nil, Value::Map(props)])
        };
        stays_tagged(
            type_name::FL_CONTEXT,
            decomposer::CONTEXT,
            prop("value", "mask", 300),
        );
        stays_tagged(
            type_name::FL_CONTEXT,
            decomposer::CONTEXT,
            prop("mask", "value", 0),
        );
        // an array download reference, and invalid .npy bytes
        let mut r = Map::new();
        r.insert("type", "ref");
        r.insert("data", "T0");
        stays_tagged(type_name::NDARRAY, decomposer::NUMPY_ARRAY, Value::Map(r));
        let mut n = Map::new();
        n.insert("type", "native");
        n.insert("data", Bytes::from_static(b"not npy"));
        stays_tagged(type_name::NDARRAY, decomposer::NUMPY_ARRAY, Value::Map(n));
        // a datum reference outside a container
        stays_tagged(
            type_name::DATUM_REF,
            decomposer::DATA_CLASS,
            tags::datum_ref_value(&Uuid::nil()).data,
        );
    }

    #[test]
    fn typed_values_round_trip_through_their_tags() {
        let mut ctx = PeerContext::default();
        ctx.set("__identity_name__", "site-1");
        ctx.props.push((
            "sticky".to_owned(),
            fedrun_core::peer_context::ContextProp {
                value: Value::from(3),
                mask: 1,
            },
        ));
        let mut s = Shareable::new();
        s.insert("t", Value::Tuple(vec![Value::from(1)]));
        s.insert("s", Value::Set(vec![Value::from("a")]));
        s.insert("a", NdArray::from_bool(&[2], &[true, false]).unwrap());
        s.insert("c", ctx);
        s.insert(
            "e",
            Value::enum_member("nvflare.apis.dxo.DataKind", "WEIGHTS"),
        );
        s.insert("f32", Value::F32(0.5));
        s.insert("x", Value::Ext(3, Bytes::from_static(b"abc")));
        let v = Value::from(s);
        let p = decode(encode(&v).unwrap()).unwrap();
        assert_eq!(p.value, v);
    }

    #[test]
    fn a_map_that_only_resembles_a_tag_stays_a_plain_map() {
        let mut m = Map::new();
        m.insert(tags::FOBS_DATA, 1);
        m.insert(tags::FOBS_TYPE, "tuple");
        m.insert(tags::FOBS_DC, decomposer::TUPLE);
        let v = Value::Map(m);
        assert_eq!(decode_value(encode_value(&v).unwrap()).unwrap(), v);
        let mut m = Map::new();
        m.insert(tags::FOBS_TYPE, 5);
        m.insert(tags::FOBS_DATA, 1);
        m.insert(tags::FOBS_DC, "x");
        let v = Value::Map(m);
        assert_eq!(decode_value(encode_value(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn unreferenced_and_download_datums_are_kept_and_written_back() {
        let mut out = Vec::new();
        let main = encode_value(&Value::from("x")).unwrap();
        lobs::write_section_header(&mut out, lobs::MARKER_MAIN, 0, main.len() as u64);
        out.extend_from_slice(&main);
        let download = Datum {
            kind: DatumKind::Text,
            dot: 3,
            id: Uuid::from_u128(1),
            content: Bytes::from_static(b"{\"fqcn\": \"server\"}"),
        };
        let file = Datum {
            kind: DatumKind::File,
            dot: 0,
            id: Uuid::from_u128(2),
            content: Bytes::from_static(b"file"),
        };
        lobs::write_datum(&mut out, &download);
        lobs::write_datum(&mut out, &file);
        let p = decode(Bytes::from(out.clone())).unwrap();
        assert_eq!(p.extra_datums, vec![download, file]);
        assert!(p.datum_ids.is_empty());
        assert_eq!(encode_payload(&p, &EncodeOptions::default()).unwrap(), out);
    }

    #[test]
    fn segments_concatenate_to_the_exact_encoding_and_reference_big_bytes() {
        let inline = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let datum = Bytes::from(vec![3u8; 300_000]);
        let small = Bytes::from(vec![5u8; 100]);
        let mut s = Shareable::new();
        s.insert("inline", inline.clone());
        s.insert("small", small);
        let mut inner = Map::new();
        inner.insert("big", datum.clone());
        s.insert("nested", Value::Map(inner));
        s.insert(
            "array",
            NdArray::from_u8(&[70_000], &[1u8; 70_000]).unwrap(),
        );
        let v = Value::from(s);
        // `datum` and the array go into datum sections; `inline` stays inline
        let opts = EncodeOptions {
            max_value_size: 250_000,
            datum_ids: Some(vec![Uuid::from_u128(1), Uuid::from_u128(2)]),
        };
        let whole = encode_with(&v, &opts).unwrap();
        let segments = encode_segments(&v, &opts).unwrap();
        assert_eq!(segments.concat(), whole);
        assert!(segments.iter().all(|seg| !seg.is_empty()));
        for big in [&inline, &datum] {
            assert!(
                segments.iter().any(|seg| seg.as_ptr() == big.as_ptr()),
                "a big bytes value was copied"
            );
        }
        assert_eq!(decode(whole).unwrap().value, v);
    }
}
