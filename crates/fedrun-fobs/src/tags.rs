//! The FOBS object model: how Python objects ride on msgpack as tagged maps.
//!
//! FOBS never uses msgpack extension types. An object msgpack cannot express is written as a
//! three-entry map, in exactly this key order:
//! `{"__fobs_type__": <class path>, "__fobs_data__": <decomposed value>, "__fobs_dc__": <decomposer path>}`.
//! This module names the class and decomposer paths NVFlare 2.9 uses (a Python receiver accepts
//! only these exact strings) and turns tagged maps into fedrun's typed [`Value`] variants while
//! decoding.
//!
//! The rule that makes every payload round-trip byte for byte: a tagged map becomes a typed
//! variant ([`Value::Tuple`], [`Value::Set`], [`Value::NdArray`], [`Value::Shareable`],
//! [`Value::Context`]) only when its shape is exactly what that variant encodes back to; anything
//! else (enums, datetimes, numpy scalars, DXO objects, FLModels, array download refs, unknown
//! tags, and known tags whose data has an unexpected shape) stays a [`Value::Tagged`] with its
//! data decoded recursively. A map that merely resembles a tagged map (other keys, another key
//! order, non-string type or decomposer) is a plain map.
//!
//! Datum references (`DatumRef` objects that point at a datum section of the LOBS container, see
//! [`crate::lobs`]) are replaced by the datum's content here as well.

use std::collections::{HashMap, HashSet};

use fedrun_core::peer_context::ContextProp;
use fedrun_core::{Map, NdArray, PeerContext, Shareable, Tagged, Value};
use uuid::Uuid;

use crate::error::FobsError;
use crate::lobs::{Datum, DatumKind};
use crate::msgpack::MapHook;

/// Key of the class path in a tagged map (first key).
pub const FOBS_TYPE: &str = "__fobs_type__";
/// Key of the decomposed data in a tagged map (second key).
pub const FOBS_DATA: &str = "__fobs_data__";
/// Key of the decomposer path in a tagged map (third key).
pub const FOBS_DC: &str = "__fobs_dc__";

/// The `__fobs_type__` strings fedrun maps to typed variants.
pub mod type_name {
    /// Python `tuple` ([`fedrun_core::Value::Tuple`]).
    pub const TUPLE: &str = "tuple";
    /// Python `set` ([`fedrun_core::Value::Set`]).
    pub const SET: &str = "set";
    /// `numpy.ndarray` ([`fedrun_core::Value::NdArray`]).
    pub const NDARRAY: &str = "numpy.ndarray";
    /// NVFlare's `Shareable` ([`fedrun_core::Value::Shareable`]).
    pub const SHAREABLE: &str = "nvflare.apis.shareable.Shareable";
    /// NVFlare's `FLContext` ([`fedrun_core::Value::Context`]).
    pub const FL_CONTEXT: &str = "nvflare.apis.fl_context.FLContext";
    /// A reference to a datum section (resolved while decoding).
    pub const DATUM_REF: &str = "nvflare.fuel.utils.fobs.datum.DatumRef";
    /// `collections.OrderedDict` (kept as a tagged object).
    pub const ORDERED_DICT: &str = "collections.OrderedDict";
}

/// The `__fobs_dc__` strings of NVFlare's built-in decomposers.
pub mod decomposer {
    /// For dict subclasses such as Shareable: data is the plain dict.
    pub const DICT: &str = "nvflare.fuel.utils.fobs.decomposer.DictDecomposer";
    /// For registered data classes (and DatumRef): data is `{"data": vars(obj)}`.
    pub const DATA_CLASS: &str = "nvflare.fuel.utils.fobs.decomposer.DataClassDecomposer";
    /// For enum members: data is the member name.
    pub const ENUM: &str = fedrun_core::ENUM_DECOMPOSER;
    /// For tuples: data is a list.
    pub const TUPLE: &str = "nvflare.fuel.utils.fobs.decomposers.core_decomposers.TupleDecomposer";
    /// For sets: data is a list.
    pub const SET: &str = "nvflare.fuel.utils.fobs.decomposers.core_decomposers.SetDecomposer";
    /// For numpy arrays: data is `{"type": "native", "data": <.npy>}` (or a download ref).
    pub const NUMPY_ARRAY: &str =
        "nvflare.app_common.decomposers.numpy_decomposers.NumpyArrayDecomposer";
    /// For FLContext: data is `[model, {key: {"value": v, "mask": m}}]`.
    pub const CONTEXT: &str = "nvflare.apis.utils.decomposers.flare_decomposers.ContextDecomposer";
}

/// The `"type"` of an ndarray embedded as `.npy` bytes.
pub const NDARRAY_NATIVE: &str = "native";

/// The datum sections of a payload, by id, while its main body is decoded.
#[derive(Debug, Default)]
pub(crate) struct DatumTable {
    datums: Vec<Datum>,
    by_id: HashMap<String, usize>,
    used: Vec<bool>,
    /// Bytes of TEXT datums copied into `str` values so far, and what all TEXT datums hold:
    /// a TEXT datum named by many references would otherwise be copied once per reference.
    text_copied: usize,
    text_held: usize,
}

impl DatumTable {
    /// Index the datums (ids are looked up by their canonical hyphenated lowercase string, as a
    /// Python receiver does).
    pub(crate) fn new(datums: Vec<Datum>) -> Self {
        let by_id = datums
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.hyphenated().to_string(), i))
            .collect();
        let used = vec![false; datums.len()];
        let text_held = datums
            .iter()
            .filter(|d| d.kind == DatumKind::Text)
            .map(|d| d.content.len())
            .sum();
        DatumTable {
            datums,
            by_id,
            used,
            text_copied: 0,
            text_held,
        }
    }

    /// The ids of the datums that were resolved (section order), and the others.
    pub(crate) fn into_parts(self) -> (Vec<Uuid>, Vec<Datum>) {
        let mut ids = Vec::new();
        let mut extra = Vec::new();
        for (d, used) in self.datums.into_iter().zip(self.used) {
            if used {
                ids.push(d.id);
            } else {
                extra.push(d);
            }
        }
        (ids, extra)
    }
}

/// The decode hook that turns tagged maps into typed values and resolves datum references.
pub(crate) struct Lifter<'a> {
    /// `None` for bare msgpack (no container): datum references stay tagged objects.
    pub(crate) datums: Option<&'a mut DatumTable>,
}

impl MapHook for Lifter<'_> {
    fn finish_map(&mut self, map: Map, _offset: usize) -> Result<Value, FobsError> {
        if !looks_tagged(&map) {
            return Ok(Value::Map(map));
        }
        let mut it = map.into_pairs().into_iter().map(|(_, v)| v);
        let (Some(Value::Str(type_name)), Some(data), Some(Value::Str(decomposer))) =
            (it.next(), it.next(), it.next())
        else {
            // looks_tagged checked these shapes
            return Ok(Value::Nil);
        };
        self.lift(Tagged {
            type_name,
            decomposer,
            data,
        })
    }
}

/// Exactly the three keys in order, with string type and decomposer.
fn looks_tagged(map: &Map) -> bool {
    match map.as_pairs() {
        [(k0, Value::Str(_)), (k1, _), (k2, Value::Str(_))] => {
            k0.as_str() == Some(FOBS_TYPE)
                && k1.as_str() == Some(FOBS_DATA)
                && k2.as_str() == Some(FOBS_DC)
        }
        _ => false,
    }
}

fn tagged(t: Tagged) -> Value {
    Value::Tagged(Box::new(t))
}

impl Lifter<'_> {
    fn lift(&mut self, t: Tagged) -> Result<Value, FobsError> {
        Ok(match (t.type_name.as_str(), t.decomposer.as_str()) {
            (type_name::TUPLE, decomposer::TUPLE) => match t.data {
                Value::Array(items) => Value::Tuple(items),
                _ => tagged(t),
            },
            (type_name::SET, decomposer::SET) => match t.data {
                Value::Array(items) => Value::Set(items),
                _ => tagged(t),
            },
            (type_name::NDARRAY, decomposer::NUMPY_ARRAY) => lift_ndarray(t),
            (type_name::SHAREABLE, decomposer::DICT) => lift_shareable(t),
            (type_name::FL_CONTEXT, decomposer::CONTEXT) => lift_context(t),
            (type_name::DATUM_REF, decomposer::DATA_CLASS) => self.resolve(t)?,
            _ => tagged(t),
        })
    }

    /// Replace a DatumRef by its datum's content (TEXT → str, BLOB → bytes) when it asks to be
    /// unwrapped and names a plain (dot 0) TEXT or BLOB datum. FILE datums, datums with a
    /// post-processing type, and refs without `unwrap` stay as they are.
    fn resolve(&mut self, t: Tagged) -> Result<Value, FobsError> {
        let Some(table) = self.datums.as_deref_mut() else {
            return Ok(tagged(t));
        };
        let Some((id, unwrap)) = datum_ref_parts(&t.data) else {
            return Ok(tagged(t));
        };
        let Some(&index) = table.by_id.get(id) else {
            return Err(FobsError::UnknownDatumId(id.to_owned()));
        };
        let datum = &table.datums[index];
        if !unwrap || datum.dot != 0 {
            return Ok(tagged(t));
        }
        let value = match datum.kind {
            DatumKind::Blob => Value::Bin(datum.content.clone()),
            DatumKind::Text => match std::str::from_utf8(&datum.content) {
                Ok(s) => {
                    let copied = table.text_copied.saturating_add(s.len());
                    if copied > table.text_held {
                        return Err(FobsError::DatumTextReused {
                            copied,
                            held: table.text_held,
                        });
                    }
                    table.text_copied = copied;
                    Value::Str(s.to_owned())
                }
                // TEXT datums are validated when the container is split
                Err(_) => return Ok(tagged(t)),
            },
            DatumKind::File => return Ok(tagged(t)),
        };
        table.used[index] = true;
        Ok(value)
    }
}

/// `{"data": {"datum_id": <str>, "unwrap": <bool>}}`, exactly.
fn datum_ref_parts(data: &Value) -> Option<(&str, bool)> {
    let [(k, Value::Map(inner))] = data.as_map()?.as_pairs() else {
        return None;
    };
    if k.as_str() != Some("data") {
        return None;
    }
    match inner.as_pairs() {
        [(k1, Value::Str(id)), (k2, Value::Bool(unwrap))]
            if k1.as_str() == Some("datum_id") && k2.as_str() == Some("unwrap") =>
        {
            Some((id, *unwrap))
        }
        _ => None,
    }
}

/// `{"type": "native", "data": <valid .npy bytes>}` → NdArray; anything else stays tagged
/// (array download refs `{"type": "ref", ...}` included). Invalid `.npy` bytes are logged and
/// kept tagged, so the application sees exactly what came.
fn lift_ndarray(t: Tagged) -> Value {
    let npy = match t.data.as_map().map(Map::as_pairs) {
        Some([(k1, Value::Str(kind)), (k2, Value::Bin(npy))])
            if k1.as_str() == Some("type")
                && kind == NDARRAY_NATIVE
                && k2.as_str() == Some("data") =>
        {
            npy.clone()
        }
        _ => return tagged(t),
    };
    match NdArray::from_npy(npy) {
        Ok(a) => Value::NdArray(a),
        Err(e) => {
            log::warn!("keeping a numpy.ndarray with invalid .npy data as a tagged object: {e}");
            tagged(t)
        }
    }
}

/// A map with unique string keys including `__headers__` → Shareable (order kept).
fn lift_shareable(t: Tagged) -> Value {
    let ok = match &t.data {
        Value::Map(m) => {
            let mut seen = HashSet::with_capacity(m.len());
            m.keys().all(|k| k.as_str().is_some_and(|s| seen.insert(s)))
                && seen.contains(fedrun_core::constants::header_key::HEADERS)
        }
        _ => false,
    };
    if !ok {
        return tagged(t);
    }
    let Value::Map(m) = t.data else {
        return Value::Nil;
    };
    let entries = m.into_pairs().into_iter().filter_map(|(k, v)| match k {
        Value::Str(k) => Some((k, v)),
        _ => None,
    });
    Value::Shareable(Box::new(Shareable::with_headers(entries)))
}

/// `[model, {key: {"value": v, "mask": 0..=255}}]` with unique string keys → PeerContext.
fn lift_context(t: Tagged) -> Value {
    let ok = match t.data.as_array() {
        Some([_, Value::Map(props)]) => {
            let mut seen = HashSet::with_capacity(props.len());
            props
                .iter()
                .all(|(k, p)| k.as_str().is_some_and(|s| seen.insert(s)) && prop_parts(p).is_some())
        }
        _ => false,
    };
    if !ok {
        return tagged(t);
    }
    let Value::Array(items) = t.data else {
        return Value::Nil;
    };
    let mut items = items.into_iter();
    let (Some(model), Some(Value::Map(props))) = (items.next(), items.next()) else {
        return Value::Nil;
    };
    let props = props
        .into_pairs()
        .into_iter()
        .filter_map(|(k, p)| {
            let mask = prop_parts(&p)?;
            let (Value::Str(key), Value::Map(p)) = (k, p) else {
                return None;
            };
            let value = p.into_pairs().into_iter().next()?.1;
            Some((key, ContextProp { value, mask }))
        })
        .collect();
    Value::Context(Box::new(PeerContext { model, props }))
}

/// The mask of `{"value": v, "mask": m}` (exactly those keys, in that order, m in 0..=255).
fn prop_parts(p: &Value) -> Option<u8> {
    match p.as_map()?.as_pairs() {
        [(k1, _), (k2, Value::Int(m))]
            if k1.as_str() == Some("value") && k2.as_str() == Some("mask") =>
        {
            m.as_u64().and_then(|m| u8::try_from(m).ok())
        }
        _ => None,
    }
}

/// The tagged object a datum reference to `id` is (the encoder writes it directly; tests build it).
#[cfg(test)]
pub(crate) fn datum_ref_value(id: &Uuid) -> Tagged {
    let mut inner = Map::with_capacity(2);
    inner.insert("datum_id", id.hyphenated().to_string());
    inner.insert("unwrap", true);
    let mut data = Map::with_capacity(1);
    data.insert("data", inner);
    Tagged {
        type_name: type_name::DATUM_REF.to_owned(),
        decomposer: decomposer::DATA_CLASS.to_owned(),
        data: Value::Map(data),
    }
}
