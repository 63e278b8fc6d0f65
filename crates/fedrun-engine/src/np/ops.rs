//! numpy's element-wise arithmetic on `.npy` arrays, as NVFlare's numpy executors need it.
//!
//! NVFlare's `NPTrainer` trains by `model["numpy_key"] += delta` and `NPValidator` scores by
//! `sum(a / max(a))`. A site that replaces them must get the same numbers and the same dtype, so
//! this module follows numpy 2's rules (NEP 50, Python scalars are "weak"):
//!
//! - `+=` keeps the array's dtype, byte order, shape and memory order (the `.npy` header is kept
//!   byte for byte; only the element bytes change);
//! - an integer delta is converted to the array's dtype first: out of the dtype's range is an
//!   error (numpy's `OverflowError`); the sum then wraps around as numpy's integer arrays do;
//! - a float delta on an integer or bool array is an error (numpy cannot cast the float64 sum
//!   back with the `same_kind` rule), as is an int delta on a bool array; a bool delta counts as
//!   `0`/`1` (Python's `bool` is an `int`), and `bool += bool` is a logical or;
//! - float arrays add in their own precision (`float32 += 1.5` adds in `f32`).
//!
//! Supported element types: `bool`, `int8..int64`, `uint8..uint64`, `float32`, `float64`.
//! Anything else (`float16`, complex, strings, objects, ...) is refused with an error naming the
//! dtype; NVFlare computes some of these, fedrun does not.

use fedrun_core::NdArray;

/// The delta of `NPTrainer` (its `delta` argument): a Python `int`, `float` or `bool`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Delta {
    /// A Python `int` (any value JSON can give: `i64::MIN ..= u64::MAX`).
    Int(i128),
    /// A Python `float`.
    Float(f64),
    /// A Python `bool` (an `int` subclass: `0` or `1`, or a logical or on bool arrays).
    Bool(bool),
}

/// The element kinds this module computes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    Bool,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F32,
    F64,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::Bool | Elem::I8 | Elem::U8 => 1,
            Elem::I16 | Elem::U16 => 2,
            Elem::I32 | Elem::U32 | Elem::F32 => 4,
            Elem::I64 | Elem::U64 | Elem::F64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Elem::Bool => "bool",
            Elem::I8 => "int8",
            Elem::I16 => "int16",
            Elem::I32 => "int32",
            Elem::I64 => "int64",
            Elem::U8 => "uint8",
            Elem::U16 => "uint16",
            Elem::U32 => "uint32",
            Elem::U64 => "uint64",
            Elem::F32 => "float32",
            Elem::F64 => "float64",
        }
    }

    /// The inclusive range of an integer kind.
    fn int_range(self) -> Option<(i128, i128)> {
        Some(match self {
            Elem::I8 => (i8::MIN.into(), i8::MAX.into()),
            Elem::I16 => (i16::MIN.into(), i16::MAX.into()),
            Elem::I32 => (i32::MIN.into(), i32::MAX.into()),
            Elem::I64 => (i64::MIN.into(), i64::MAX.into()),
            Elem::U8 => (0, u8::MAX.into()),
            Elem::U16 => (0, u16::MAX.into()),
            Elem::U32 => (0, u32::MAX.into()),
            Elem::U64 => (0, u64::MAX.into()),
            _ => return None,
        })
    }
}

/// The element kind and byte order (`true` = big-endian) of a numpy descr like `<f4`.
fn parse_descr(descr: &str) -> Result<(Elem, bool), String> {
    let (big, rest) = match descr.as_bytes().first() {
        Some(b'>') => (true, &descr[1..]),
        Some(b'<' | b'|' | b'=') => (false, &descr[1..]),
        _ => (false, descr),
    };
    let elem = match rest {
        "b1" | "?" => Elem::Bool,
        "i1" => Elem::I8,
        "i2" => Elem::I16,
        "i4" => Elem::I32,
        "i8" => Elem::I64,
        "u1" => Elem::U8,
        "u2" => Elem::U16,
        "u4" => Elem::U32,
        "u8" => Elem::U64,
        "f4" => Elem::F32,
        "f8" => Elem::F64,
        _ => {
            return Err(format!(
                "dtype {descr} is not supported by fedrun's numpy components"
            ))
        }
    };
    Ok((elem, big))
}

/// Reads element `i` of kind `T` from `raw` (little- or big-endian).
macro_rules! rd {
    ($t:ty, $raw:expr, $big:expr) => {{
        let mut b = [0u8; std::mem::size_of::<$t>()];
        b.copy_from_slice($raw);
        if $big {
            <$t>::from_be_bytes(b)
        } else {
            <$t>::from_le_bytes(b)
        }
    }};
}

/// Writes `v` into `raw` (little- or big-endian).
macro_rules! wr {
    ($v:expr, $raw:expr, $big:expr) => {{
        let v = $v;
        if $big {
            $raw.copy_from_slice(&v.to_be_bytes());
        } else {
            $raw.copy_from_slice(&v.to_le_bytes());
        }
    }};
}

/// `array += delta` with numpy's rules (see the module doc): a new array with the same header.
///
/// # Errors
///
/// A text naming the problem, for what numpy refuses (out-of-range int delta, float delta on
/// an integer array, int delta on a bool array) and for unsupported dtypes.
///
/// # Example
/// ```
/// use fedrun_core::NdArray;
/// use fedrun_engine::np::{add_delta, Delta};
///
/// let a = NdArray::from_f32(&[2], &[1.0, 2.5]).unwrap();
/// let b = add_delta(&a, Delta::Int(1)).unwrap();
/// assert_eq!(b.to_f32_vec().unwrap(), vec![2.0, 3.5]);
/// assert_eq!(b.descr(), "<f4");
///
/// let i = NdArray::from_i32(&[1], &[i32::MAX]).unwrap();
/// assert_eq!(add_delta(&i, Delta::Int(1)).unwrap().to_i32_vec().unwrap(), vec![i32::MIN]);
/// assert!(add_delta(&i, Delta::Float(0.5)).is_err());
/// ```
pub fn add_delta(array: &NdArray, delta: Delta) -> Result<NdArray, String> {
    add_delta_owned(array.clone(), delta)
}

/// [`add_delta`] on an array given away: when nothing else shares its buffer (e.g. a model
/// just downloaded) the elements are changed in place and no second copy of the model is ever
/// made; otherwise the bytes are copied first, as [`add_delta`] does. On an error the array is
/// dropped unchanged.
///
/// # Example
/// ```
/// use fedrun_core::NdArray;
/// use fedrun_engine::np::{add_delta_owned, Delta};
///
/// let a = NdArray::from_f32(&[2], &[1.0, 2.5]).unwrap();
/// let at = a.npy().as_ptr();
/// let b = add_delta_owned(a, Delta::Float(0.5)).unwrap();
/// assert_eq!(b.npy().as_ptr(), at); // the same buffer
/// assert_eq!(b.to_f32_vec().unwrap(), vec![1.5, 3.0]);
/// ```
pub fn add_delta_owned(array: NdArray, delta: Delta) -> Result<NdArray, String> {
    let (elem, big) = parse_descr(array.descr())?;
    let mut array = array.into_mut();
    add_in_place(elem, big, array.data_mut(), delta)?;
    Ok(array.freeze())
}

/// `data += delta`, elements of kind `elem`; checks everything before changing a byte.
fn add_in_place(elem: Elem, big: bool, data: &mut [u8], delta: Delta) -> Result<(), String> {
    let size = elem.size();
    if !data.len().is_multiple_of(size) {
        return Err(format!(
            "the array's data ({} bytes) is not a whole number of {} elements",
            data.len(),
            elem.name()
        ));
    }
    let int_delta = |d: i128| -> Result<i128, String> {
        match elem.int_range() {
            Some((lo, hi)) if d < lo || d > hi => Err(format!(
                "Python integer {d} out of bounds for {}",
                elem.name()
            )),
            _ => Ok(d),
        }
    };
    match elem {
        Elem::Bool => {
            let Delta::Bool(d) = delta else {
                return Err(format!(
                    "cannot add a {} delta to a bool array in place (numpy's same_kind rule)",
                    delta_kind(delta)
                ));
            };
            if d {
                data.iter_mut().for_each(|b| *b = 1);
            }
        }
        Elem::F32 => {
            let d = match delta {
                Delta::Int(i) => i as f64 as f32,
                Delta::Float(f) => f as f32,
                Delta::Bool(b) => f32::from(u8::from(b)),
            };
            for c in data.chunks_exact_mut(4) {
                wr!(rd!(f32, c, big) + d, c, big);
            }
        }
        Elem::F64 => {
            let d = match delta {
                Delta::Int(i) => i as f64,
                Delta::Float(f) => f,
                Delta::Bool(b) => f64::from(u8::from(b)),
            };
            for c in data.chunks_exact_mut(8) {
                wr!(rd!(f64, c, big) + d, c, big);
            }
        }
        _ => {
            let d = match delta {
                Delta::Int(i) => int_delta(i)?,
                Delta::Bool(b) => i128::from(b),
                Delta::Float(_) => {
                    return Err(format!(
                        "cannot add a float delta to a {} array in place (numpy's same_kind \
                         rule)",
                        elem.name()
                    ))
                }
            };
            add_int(elem, data, d, big);
        }
    }
    Ok(())
}

fn delta_kind(delta: Delta) -> &'static str {
    match delta {
        Delta::Int(_) => "int",
        Delta::Float(_) => "float",
        Delta::Bool(_) => "bool",
    }
}

/// Wrapping integer addition of `d` (already checked to fit `elem`) to every element.
fn add_int(elem: Elem, data: &mut [u8], d: i128, big: bool) {
    macro_rules! each {
        ($t:ty) => {{
            // `d` fits the type (checked by the caller), so the cast is exact.
            let d = d as $t;
            for c in data.chunks_exact_mut(std::mem::size_of::<$t>()) {
                wr!(rd!($t, c, big).wrapping_add(d), c, big);
            }
        }};
    }
    match elem {
        Elem::I8 => each!(i8),
        Elem::I16 => each!(i16),
        Elem::I32 => each!(i32),
        Elem::I64 => each!(i64),
        Elem::U8 => each!(u8),
        Elem::U16 => each!(u16),
        Elem::U32 => each!(u32),
        Elem::U64 => each!(u64),
        Elem::Bool | Elem::F32 | Elem::F64 => {}
    }
}

/// The precision numpy computes `sum(a / max(a))` in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatWidth {
    /// `float32` arrays: the result is a `numpy.float32`.
    F32,
    /// Every other supported array (and Python scalars): a `numpy.float64`.
    F64,
}

/// `numpy.sum(a / numpy.max(a))`, NVFlare's `NPValidator` score before its random epsilon, and
/// the precision numpy gives it.
///
/// `max` propagates NaN as numpy's does; a zero max gives `inf`/NaN as numpy's division does. The
/// sum is accumulated in `f64` and rounded to the array's precision (numpy sums `float32` arrays
/// pairwise in `float32`; the two can differ in the last bit).
///
/// # Errors
///
/// An empty array (numpy's `max` of an empty array raises) and unsupported dtypes.
///
/// # Example
/// ```
/// use fedrun_core::NdArray;
/// use fedrun_engine::np::{normalized_sum, FloatWidth};
///
/// let a = NdArray::from_f32(&[3], &[1.0, 2.0, 4.0]).unwrap();
/// assert_eq!(normalized_sum(&a).unwrap(), (1.75, FloatWidth::F32));
/// ```
pub fn normalized_sum(array: &NdArray) -> Result<(f64, FloatWidth), String> {
    let (elem, big) = parse_descr(array.descr())?;
    let data = array.data();
    let size = elem.size();
    if data.is_empty() {
        return Err("zero-size array to reduction operation maximum which has no identity".into());
    }
    let values = data.chunks_exact(size).map(|c| -> f64 {
        match elem {
            Elem::Bool => f64::from(u8::from(c[0] != 0)),
            Elem::I8 => f64::from(rd!(i8, c, big)),
            Elem::I16 => f64::from(rd!(i16, c, big)),
            Elem::I32 => f64::from(rd!(i32, c, big)),
            Elem::I64 => rd!(i64, c, big) as f64,
            Elem::U8 => f64::from(rd!(u8, c, big)),
            Elem::U16 => f64::from(rd!(u16, c, big)),
            Elem::U32 => f64::from(rd!(u32, c, big)),
            Elem::U64 => rd!(u64, c, big) as f64,
            Elem::F32 => f64::from(rd!(f32, c, big)),
            Elem::F64 => rd!(f64, c, big),
        }
    });
    let max = values.clone().fold(f64::NEG_INFINITY, nan_max);
    if elem == Elem::F32 {
        // numpy divides float32 by float32: round each quotient to f32 before summing.
        let max = max as f32;
        let sum: f64 = values.map(|v| f64::from(v as f32 / max)).sum();
        Ok((f64::from(sum as f32), FloatWidth::F32))
    } else {
        Ok((values.map(|v| v / max).sum(), FloatWidth::F64))
    }
}

/// numpy's `maximum`: NaN wins.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;

    #[test]
    fn an_owned_unshared_array_gets_the_delta_in_its_own_buffer_a_shared_one_is_copied() {
        let a = NdArray::from_f64(&[3], &[1.0, 2.0, 3.0]).unwrap();
        let at = a.npy().as_ptr();
        let b = add_delta_owned(a, Delta::Int(2)).unwrap();
        assert_eq!(b.npy().as_ptr(), at);
        assert_eq!(b.to_f64_vec().unwrap(), vec![3.0, 4.0, 5.0]);

        let kept = b.clone();
        let c = add_delta_owned(b, Delta::Int(1)).unwrap();
        assert_ne!(c.npy().as_ptr(), at);
        assert_eq!(kept.to_f64_vec().unwrap(), vec![3.0, 4.0, 5.0]);
        assert_eq!(c.to_f64_vec().unwrap(), vec![4.0, 5.0, 6.0]);
    }

    #[test]
    fn a_refused_delta_changes_nothing_in_a_shared_array() {
        let a = NdArray::from_i32(&[1], &[7]).unwrap();
        assert!(add_delta_owned(a.clone(), Delta::Float(0.5)).is_err());
        assert!(add_delta_owned(a.clone(), Delta::Int(1 << 40)).is_err());
        assert_eq!(a.to_i32_vec().unwrap(), vec![7]);
    }

    #[test]
    fn float32_plus_int_delta_stays_float32_in_every_byte_order() {
        let a = NdArray::from_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.5]).unwrap();
        let b = add_delta(&a, Delta::Int(1)).unwrap();
        assert_eq!(b.descr(), "<f4");
        assert_eq!(b.shape(), &[2, 2]);
        assert_eq!(b.to_f32_vec().unwrap(), vec![2.0, 3.0, 4.0, 5.5]);
        // the header is kept as it came: same preamble length and bytes
        assert_eq!(b.npy()[..b.data_offset()], a.npy()[..a.data_offset()]);

        // a big-endian array stays big-endian
        let mut data = Vec::new();
        for v in [1.0f32, 2.0, 3.0, 4.5] {
            data.extend_from_slice(&v.to_be_bytes());
        }
        let npy = npy_of(">f4", &[2, 2], &data);
        let be = NdArray::from_npy(Bytes::from(npy)).unwrap();
        let out = add_delta(&be, Delta::Float(0.5)).unwrap();
        assert_eq!(out.descr(), ">f4");
        assert_eq!(out.to_f32_vec().unwrap(), vec![1.5, 2.5, 3.5, 5.0]);
    }

    #[test]
    fn float32_adds_in_float32_precision() {
        let a = NdArray::from_f32(&[1], &[16_777_216.0]).unwrap();
        // 2^24 + 1 is not a float32: numpy's float32 += 1 stays at 2^24
        let b = add_delta(&a, Delta::Int(1)).unwrap();
        assert_eq!(b.to_f32_vec().unwrap(), vec![16_777_216.0]);
        let d = NdArray::from_f64(&[1], &[16_777_216.0]).unwrap();
        let e = add_delta(&d, Delta::Int(1)).unwrap();
        assert_eq!(e.to_f64_vec().unwrap(), vec![16_777_217.0]);
    }

    #[test]
    fn integer_arrays_wrap_and_refuse_what_numpy_refuses() {
        let a = NdArray::from_i64(&[2], &[i64::MAX, -3]).unwrap();
        let b = add_delta(&a, Delta::Int(2)).unwrap();
        assert_eq!(b.to_i64_vec().unwrap(), vec![i64::MIN + 1, -1]);
        assert_eq!(
            add_delta(&a, Delta::Bool(true))
                .unwrap()
                .to_i64_vec()
                .unwrap(),
            vec![i64::MIN, -2]
        );
        let err = add_delta(&a, Delta::Float(1.0)).unwrap_err();
        assert!(err.contains("same_kind"), "{err}");
        let u = NdArray::from_u8(&[2], &[255, 1]).unwrap();
        assert_eq!(
            add_delta(&u, Delta::Int(1)).unwrap().to_u8_vec().unwrap(),
            vec![0, 2]
        );
        let err = add_delta(&u, Delta::Int(-1)).unwrap_err();
        assert!(err.contains("out of bounds for uint8"), "{err}");
        let err = add_delta(&u, Delta::Int(256)).unwrap_err();
        assert!(err.contains("256"), "{err}");
    }

    #[test]
    fn bool_arrays_take_only_bool_deltas() {
        let a = NdArray::from_bool(&[2], &[true, false]).unwrap();
        assert!(add_delta(&a, Delta::Int(1)).is_err());
        assert!(add_delta(&a, Delta::Float(1.0)).is_err());
        let b = add_delta(&a, Delta::Bool(true)).unwrap();
        assert_eq!(b.to_bool_vec().unwrap(), vec![true, true]);
        let c = add_delta(&a, Delta::Bool(false)).unwrap();
        assert_eq!(c.to_bool_vec().unwrap(), vec![true, false]);
    }

    #[test]
    fn unsupported_dtypes_are_named() {
        let npy = npy_of("<c8", &[1], &[0u8; 8]);
        let c = NdArray::from_npy(Bytes::from(npy)).unwrap();
        let err = add_delta(&c, Delta::Int(1)).unwrap_err();
        assert!(err.contains("<c8"), "{err}");
        assert!(normalized_sum(&c).is_err());
    }

    #[test]
    fn normalized_sum_follows_numpys_precision_and_edge_cases() {
        let a = NdArray::from_i32(&[4], &[1, 2, 3, 4]).unwrap();
        assert_eq!(normalized_sum(&a).unwrap(), (2.5, FloatWidth::F64));
        let f = NdArray::from_f32(&[3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]).unwrap();
        let (s, w) = normalized_sum(&f).unwrap();
        assert_eq!(w, FloatWidth::F32);
        assert!((s - 5.0).abs() < 1e-6, "{s}");
        let nan = NdArray::from_f64(&[2], &[1.0, f64::NAN]).unwrap();
        assert!(normalized_sum(&nan).unwrap().0.is_nan());
        let empty = NdArray::from_f32(&[0], &[]).unwrap();
        assert!(normalized_sum(&empty).is_err());
    }

    /// A `.npy` file with the given descr and shape (numpy's header layout).
    pub(crate) fn npy_of(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
        let mut out = fedrun_core::ndarray::npy_preamble(descr, shape).unwrap();
        out.extend_from_slice(data);
        out
    }
}
