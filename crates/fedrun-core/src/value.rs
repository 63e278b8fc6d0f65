//! Dynamic values: what a [`Shareable`] holds and what a FOBS payload carries.
//!
//! NVFlare moves Python objects between sites. On the wire they are msgpack values, and objects
//! that msgpack cannot express natively (tuples, sets, numpy arrays, Shareables, FLContexts,
//! enums, ...) are *tagged*: replaced by a map naming the Python class and its decomposer.
//! [`Value`] is the Rust side of that model. The msgpack-native variants mirror msgpack one to one
//! (integers are [`rmpv::Integer`], so the whole `i64`/`u64` range survives a round trip); the
//! others are the tagged objects fedrun understands, and [`Value::Tagged`] keeps any other tagged
//! object unchanged, so a payload fedrun does not understand still round-trips byte for byte.
//!
//! Maps keep their insertion order and allow any value as a key, because NVFlare payloads do
//! (integer keys, and even tagged enum members as keys in job meta).

use bytes::Bytes;

use crate::ndarray::NdArray;
use crate::peer_context::PeerContext;
use crate::shareable::Shareable;

pub use rmpv::Integer;

/// A dynamic value, as carried in a Shareable or a FOBS payload.
///
/// # Example
/// ```
/// use fedrun_core::Value;
///
/// let v = Value::from(vec![Value::from(1), Value::from("two"), Value::from(3.0)]);
/// assert_eq!(v.as_array().map(|a| a.len()), Some(3));
/// assert_eq!(Value::from(7).as_i64(), Some(7));
/// ```
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Value {
    /// Python `None`, msgpack `nil`.
    #[default]
    Nil,
    /// A boolean.
    Bool(bool),
    /// An integer in the range `i64::MIN ..= u64::MAX`.
    Int(Integer),
    /// A msgpack float32 (Python never sends one, but a peer may).
    F32(f32),
    /// A float (Python `float`, msgpack float64).
    F64(f64),
    /// A UTF-8 string.
    Str(String),
    /// Raw bytes (Python `bytes`). Cheap to clone: the buffer is shared.
    Bin(Bytes),
    /// A list.
    Array(Vec<Value>),
    /// A dict, in insertion order, with keys of any type.
    Map(Map),
    /// A msgpack extension value (FOBS never emits one; kept so that it round-trips).
    Ext(i8, Bytes),
    /// A Python `tuple` (FOBS tag `tuple`).
    Tuple(Vec<Value>),
    /// A Python `set` (FOBS tag `set`), in wire order.
    Set(Vec<Value>),
    /// A numpy `ndarray` (FOBS tag `numpy.ndarray`, native `.npy` encoding).
    NdArray(NdArray),
    /// A nested Shareable (FOBS tag `nvflare.apis.shareable.Shareable`).
    Shareable(Box<Shareable>),
    /// A serialised FLContext (FOBS tag `nvflare.apis.fl_context.FLContext`), e.g. a peer context.
    Context(Box<PeerContext>),
    /// Any other tagged object, kept as it came: enum members, datetimes, numpy scalars, DXO
    /// objects, FLModels, data classes, and tags fedrun does not know.
    Tagged(Box<Tagged>),
}

/// A FOBS-tagged object that fedrun keeps opaque: class path, decomposer path and decomposed data.
///
/// # Example
/// ```
/// use fedrun_core::{Tagged, Value};
///
/// let kind = Value::enum_member("nvflare.apis.dxo.DataKind", "WEIGHTS");
/// let t: &Tagged = kind.as_tagged().unwrap();
/// assert_eq!(t.data.as_str(), Some("WEIGHTS"));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Tagged {
    /// `__fobs_type__`: the Python class path.
    pub type_name: String,
    /// `__fobs_dc__`: the decomposer class path.
    pub decomposer: String,
    /// `__fobs_data__`: the decomposed value.
    pub data: Value,
}

/// The decomposer NVFlare uses for enum members (data = the member's name).
pub const ENUM_DECOMPOSER: &str = "nvflare.fuel.utils.fobs.decomposer.EnumTypeDecomposer";

impl Value {
    /// An enum member as NVFlare sends it, e.g. `DataKind.WEIGHTS`.
    pub fn enum_member(class: &str, member: &str) -> Value {
        Value::Tagged(Box::new(Tagged {
            type_name: class.to_owned(),
            decomposer: ENUM_DECOMPOSER.to_owned(),
            data: Value::Str(member.to_owned()),
        }))
    }

    /// An empty map.
    pub fn map() -> Value {
        Value::Map(Map::new())
    }

    /// Is this `Nil`?
    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if this is a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The integer as `i64`, if this is an integer in range.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => i.as_i64(),
            _ => None,
        }
    }

    /// The integer as `u64`, if this is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => i.as_u64(),
            _ => None,
        }
    }

    /// Any number (integer or float) as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => i.as_f64(),
            Value::F32(f) => Some(f64::from(*f)),
            Value::F64(f) => Some(*f),
            _ => None,
        }
    }

    /// The bytes, if this is a binary value.
    pub fn as_bin(&self) -> Option<&Bytes> {
        match self {
            Value::Bin(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is a list.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The map, if this is a map.
    pub fn as_map(&self) -> Option<&Map> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The map, mutably, if this is a map.
    pub fn as_map_mut(&mut self) -> Option<&mut Map> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The Shareable, if this is one.
    pub fn as_shareable(&self) -> Option<&Shareable> {
        match self {
            Value::Shareable(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is a numpy array.
    pub fn as_ndarray(&self) -> Option<&NdArray> {
        match self {
            Value::NdArray(a) => Some(a),
            _ => None,
        }
    }

    /// The serialised FLContext, if this is one.
    pub fn as_context(&self) -> Option<&PeerContext> {
        match self {
            Value::Context(c) => Some(c),
            _ => None,
        }
    }

    /// The opaque tagged object, if this is one.
    pub fn as_tagged(&self) -> Option<&Tagged> {
        match self {
            Value::Tagged(t) => Some(t),
            _ => None,
        }
    }

    /// A short name of the variant, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::F32(_) => "float32",
            Value::F64(_) => "float",
            Value::Str(_) => "str",
            Value::Bin(_) => "bytes",
            Value::Array(_) => "list",
            Value::Map(_) => "dict",
            Value::Ext(..) => "ext",
            Value::Tuple(_) => "tuple",
            Value::Set(_) => "set",
            Value::NdArray(_) => "ndarray",
            Value::Shareable(_) => "Shareable",
            Value::Context(_) => "FLContext",
            Value::Tagged(_) => "tagged object",
        }
    }
}

/// An insertion-ordered map whose keys may be any [`Value`], like a Python dict on the wire.
///
/// Lookups are linear: maps inside payloads are small. (A [`Shareable`]'s top level is indexed.)
///
/// # Example
/// ```
/// use fedrun_core::{Map, Value};
///
/// let mut m = Map::new();
/// m.insert("a", 1);
/// m.insert("b", 2);
/// m.insert("a", 3); // replaces in place, like a dict
/// assert_eq!(m.get("a"), Some(&Value::from(3)));
/// assert_eq!(m.keys().next(), Some(&Value::from("a")));
/// ```
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Map(Vec<(Value, Value)>);

impl Map {
    /// An empty map.
    pub fn new() -> Self {
        Map(Vec::new())
    }

    /// An empty map with room for `n` entries.
    pub fn with_capacity(n: usize) -> Self {
        Map(Vec::with_capacity(n))
    }

    /// Build from pairs, keeping their order (a later duplicate key is kept as a second entry,
    /// exactly as it arrived; use [`Map::insert`] to get dict semantics).
    pub fn from_pairs(pairs: Vec<(Value, Value)>) -> Self {
        Map(pairs)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Look up a string key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Look up a string key, mutably.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.0
            .iter_mut()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Look up any key.
    pub fn get_value(&self, key: &Value) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// True when the string key is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Insert or replace (in place, keeping the position), like a Python dict. Returns the old
    /// value.
    pub fn insert(&mut self, key: impl Into<Value>, value: impl Into<Value>) -> Option<Value> {
        let key = key.into();
        let value = value.into();
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(&mut slot.1, value));
        }
        self.0.push((key, value));
        None
    }

    /// Remove a string key, keeping the order of the others.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let pos = self.0.iter().position(|(k, _)| k.as_str() == Some(key))?;
        Some(self.0.remove(pos).1)
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Value, &Value)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &Value> {
        self.0.iter().map(|(k, _)| k)
    }

    /// The entries as a slice of pairs.
    pub fn as_pairs(&self) -> &[(Value, Value)] {
        &self.0
    }

    /// The entries, consumed.
    pub fn into_pairs(self) -> Vec<(Value, Value)> {
        self.0
    }
}

impl<K: Into<Value>, V: Into<Value>> FromIterator<(K, V)> for Map {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut m = Map::new();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(Integer::from(v))
            }
        }
    )*};
}
from_int!(i8, i16, i32, i64, u8, u16, u32, u64);

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(Integer::from(v as u64))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Str(v.clone())
    }
}

impl From<Bytes> for Value {
    fn from(v: Bytes) -> Self {
        Value::Bin(v)
    }
}

impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::Array(v)
    }
}

impl From<Map> for Value {
    fn from(v: Map) -> Self {
        Value::Map(v)
    }
}

impl From<Shareable> for Value {
    fn from(v: Shareable) -> Self {
        Value::Shareable(Box::new(v))
    }
}

impl From<NdArray> for Value {
    fn from(v: NdArray) -> Self {
        Value::NdArray(v)
    }
}

impl From<PeerContext> for Value {
    fn from(v: PeerContext) -> Self {
        Value::Context(Box::new(v))
    }
}

impl From<Tagged> for Value {
    fn from(v: Tagged) -> Self {
        Value::Tagged(Box::new(v))
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Nil, Into::into)
    }
}
