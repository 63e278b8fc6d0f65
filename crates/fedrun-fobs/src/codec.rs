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
use fedrun_core::{Tagged, Value};
use uuid::Uuid;

use crate::error::FobsError;
use crate::lobs::{self, Datum, DatumKind, SECTION_HEADER_LEN};
use crate::msgpack::{self, ByteCounter, Decoder, Sink, DEFAULT_MAX_DEPTH, ENCODE_MAX_DEPTH};
use crate::tags::{self, decomposer, type_name, DatumTable, Lifter};

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
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_depth: DEFAULT_MAX_DEPTH,
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

/// Decode a LOBS payload (what NVFlare sends with `cn__payload_encoding = "fobs"`).
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
    let mut decoder = Decoder::new(sections.main).with_max_depth(options.max_depth);
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

fn encode_parts(
    value: &Value,
    extra: &[Datum],
    options: &EncodeOptions,
    ids: &[Uuid],
) -> Result<Bytes, FobsError> {
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
    let main_len = counter.0;
    let datum_len: usize = datums
        .iter()
        .map(|(_, leaf)| SECTION_HEADER_LEN + lobs::DATUM_ID_LEN + leaf_bytes(leaf).len())
        .sum::<usize>()
        + extra.iter().map(Datum::section_len).sum::<usize>();
    let mut out = Vec::with_capacity(SECTION_HEADER_LEN + main_len + datum_len);
    lobs::write_section_header(&mut out, lobs::MARKER_MAIN, 0, main_len as u64);
    write_tree(&mut out, value, &plan, ENCODE_MAX_DEPTH)?;
    for (id, leaf) in &datums {
        let kind = match leaf {
            Value::Str(_) => DatumKind::Text,
            _ => DatumKind::Blob,
        };
        lobs::write_datum_section(&mut out, kind, 0, id, leaf_bytes(leaf));
    }
    for d in extra {
        lobs::write_datum(&mut out, d);
    }
    Ok(Bytes::from(out))
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

impl<'v> Planner<'v> {
    /// The order msgpack packs the tree in: each object externalizes its data, then is packed.
    fn walk(&mut self, v: &'v Value, depth: usize) -> Result<(), FobsError> {
        let inner = msgpack::depth_below(depth)?;
        match v {
            Value::Array(items) => {
                for item in items {
                    self.walk(item, inner)?;
                }
            }
            Value::Map(m) => {
                for (k, item) in m.iter() {
                    self.walk(k, inner)?;
                    self.walk(item, inner)?;
                }
            }
            Value::Tuple(items) | Value::Set(items) => {
                for item in items {
                    self.externalize(item, inner)?;
                }
                for item in items {
                    self.walk(item, inner)?;
                }
            }
            Value::NdArray(_) => self.leaf(v),
            Value::Shareable(s) => {
                for (_, item) in s.iter() {
                    self.externalize(item, inner)?;
                }
                for (_, item) in s.iter() {
                    self.walk(item, inner)?;
                }
            }
            Value::Context(c) => {
                self.externalize(&c.model, inner)?;
                for (_, p) in &c.props {
                    self.externalize(&p.value, inner)?;
                }
                self.walk(&c.model, inner)?;
                for (_, p) in &c.props {
                    self.walk(&p.value, inner)?;
                }
            }
            Value::Tagged(t) => {
                self.externalize(&t.data, inner)?;
                self.walk(&t.data, inner)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Python's `Externalizer`: through dicts (dict subclasses included) and lists to the leaves.
    fn externalize(&mut self, v: &'v Value, depth: usize) -> Result<(), FobsError> {
        let inner = msgpack::depth_below(depth)?;
        match v {
            Value::Bin(_) | Value::Str(_) => self.leaf(v),
            Value::Array(items) => {
                for item in items {
                    self.externalize(item, inner)?;
                }
            }
            Value::Map(m) => {
                for (_, item) in m.iter() {
                    self.externalize(item, inner)?;
                }
            }
            Value::Shareable(s) => {
                for (_, item) in s.iter() {
                    self.externalize(item, inner)?;
                }
            }
            // an OrderedDict is a dict subclass: its values are externalized by its parent
            Value::Tagged(t) if t.type_name == type_name::ORDERED_DICT => {
                if let Value::Array(items) = &t.data {
                    for item in items {
                        if let Value::Tuple(pair) = item {
                            if let [_, value] = pair.as_slice() {
                                self.externalize(value, inner)?;
                            }
                        }
                    }
                }
            }
            _ => {}
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

fn write_datum_ref<S: Sink>(s: &mut S, id: &Uuid, depth: usize) -> Result<(), FobsError> {
    let r = Value::Tagged(Box::new(tags::datum_ref_value(id)));
    write_tree(s, &r, &Plan::default(), depth)
}

/// Write the msgpack of a FOBS tree, typed values as tagged maps, planned leaves as datum refs.
fn write_tree<S: Sink>(s: &mut S, v: &Value, plan: &Plan, depth: usize) -> Result<(), FobsError> {
    let inner = msgpack::depth_below(depth)?;
    if matches!(v, Value::Bin(_) | Value::Str(_)) {
        if let Some(id) = plan.get(v) {
            return write_datum_ref(s, id, inner);
        }
    }
    if msgpack::write_scalar(s, v)? {
        return Ok(());
    }
    match v {
        Value::Array(items) => {
            msgpack::write_array_len(s, items.len())?;
            for item in items {
                write_tree(s, item, plan, inner)?;
            }
        }
        Value::Map(m) => {
            msgpack::write_map_len(s, m.len())?;
            for (k, item) in m.iter() {
                write_tree(s, k, plan, inner)?;
                write_tree(s, item, plan, inner)?;
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
            for item in items {
                write_tree(s, item, plan, inner)?;
            }
            close_tag(s, dc)?;
        }
        Value::NdArray(a) => {
            open_tag(s, type_name::NDARRAY)?;
            msgpack::write_map_len(s, 2)?;
            msgpack::write_str(s, "type")?;
            msgpack::write_str(s, tags::NDARRAY_NATIVE)?;
            msgpack::write_str(s, "data")?;
            match plan.get(v) {
                Some(id) => write_datum_ref(s, id, inner)?,
                None => msgpack::write_bin(s, a.npy())?,
            }
            close_tag(s, decomposer::NUMPY_ARRAY)?;
        }
        Value::Shareable(sh) => {
            open_tag(s, type_name::SHAREABLE)?;
            msgpack::write_map_len(s, sh.len())?;
            for (k, item) in sh.iter() {
                msgpack::write_str(s, k)?;
                write_tree(s, item, plan, inner)?;
            }
            close_tag(s, decomposer::DICT)?;
        }
        Value::Context(c) => {
            open_tag(s, type_name::FL_CONTEXT)?;
            msgpack::write_array_len(s, 2)?;
            write_tree(s, &c.model, plan, inner)?;
            msgpack::write_map_len(s, c.props.len())?;
            for (k, p) in &c.props {
                msgpack::write_str(s, k)?;
                msgpack::write_map_len(s, 2)?;
                msgpack::write_str(s, "value")?;
                write_tree(s, &p.value, plan, inner)?;
                msgpack::write_str(s, "mask")?;
                msgpack::write_uint(s, u64::from(p.mask));
            }
            close_tag(s, decomposer::CONTEXT)?;
        }
        Value::Tagged(t) => write_tagged(s, t, plan, inner)?,
        // scalars were written above
        _ => {}
    }
    Ok(())
}

fn write_tagged<S: Sink>(
    s: &mut S,
    t: &Tagged,
    plan: &Plan,
    depth: usize,
) -> Result<(), FobsError> {
    open_tag(s, &t.type_name)?;
    write_tree(s, &t.data, plan, depth)?;
    close_tag(s, &t.decomposer)
}
