//! numpy arrays in their `.npy` form.
//!
//! NVFlare ships numpy arrays as `.npy` files (NumPy format 1.0, `allow_pickle=False`) inside FOBS
//! payloads. fedrun keeps an array as its validated `.npy` bytes, so that an array passes through
//! a Rust site without being copied or re-encoded, and builds new arrays with exactly the header
//! numpy 2.x writes, so that what fedrun sends is byte-identical to what Python would send.
//!
//! Parsing never trusts the header: the header length, the dict literal, the shape and the data
//! length are all checked (with overflow-checked arithmetic) before anything is sliced, and nothing
//! is allocated in proportion to what the header claims.

use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::CoreError;

/// The `.npy` magic string.
pub const NPY_MAGIC: &[u8; 6] = b"\x93NUMPY";

/// numpy pads the preamble (magic, version, header length, header) to a multiple of this.
const ARRAY_ALIGN: usize = 64;

/// numpy adds spare spaces to the header so that the first axis can grow in place: this many
/// digits minus the digits of the current first dimension.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;

/// numpy's limit on the number of dimensions.
const MAX_DIMS: usize = 64;

/// The largest header fedrun accepts (numpy's own reader refuses more than 10 000 bytes unless
/// told otherwise).
const MAX_HEADER_LEN: usize = 1 << 16;

/// The element type of an array, from its `descr`.
///
/// The common numeric types are named; anything else (complex, strings, datetimes, other widths)
/// is [`DType::Other`] with numpy's descr string. Byte order is reported separately by
/// [`NdArray::byte_order`]: `'<f4'` and `'>f4'` are both [`DType::F32`].
///
/// # Example
/// ```
/// use fedrun_core::ndarray::{DType, NdArray};
///
/// let a = NdArray::from_i64(&[2], &[1, -1]).unwrap();
/// assert_eq!(a.dtype(), &DType::I64);
/// assert_eq!(a.descr(), "<i8");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DType {
    /// `float32` (`f4`).
    F32,
    /// `float64` (`f8`).
    F64,
    /// `int32` (`i4`).
    I32,
    /// `int64` (`i8`).
    I64,
    /// `uint8` (`|u1`).
    U8,
    /// `bool` (`|b1`).
    Bool,
    /// Any other type, with numpy's descr string (e.g. `"<c8"`, `"<U5"`, `"<i2"`).
    Other(String),
}

impl DType {
    /// The size of one element in bytes, for the named types.
    pub fn item_size(&self) -> Option<usize> {
        match self {
            DType::F32 | DType::I32 => Some(4),
            DType::F64 | DType::I64 => Some(8),
            DType::U8 | DType::Bool => Some(1),
            DType::Other(_) => None,
        }
    }

    /// A short name for messages (`"float32"`, ..., or the descr).
    pub fn name(&self) -> &str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::Bool => "bool",
            DType::Other(d) => d,
        }
    }
}

/// The byte order of an array's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteOrder {
    /// `<`: little-endian (what numpy writes on every common platform).
    Little,
    /// `>`: big-endian.
    Big,
    /// `|`: not applicable (one-byte types, strings of bytes, ...).
    NotApplicable,
}

/// What the `.npy` header says, parsed once.
#[derive(Debug, PartialEq, Eq)]
struct NpyInfo {
    descr: String,
    dtype: DType,
    byte_order: ByteOrder,
    fortran_order: bool,
    shape: Vec<usize>,
    data_offset: usize,
}

/// A numpy array, held as its validated `.npy` bytes (so it re-encodes exactly as it came).
///
/// Cloning is cheap (the bytes and the parsed header are shared). Equality compares the `.npy`
/// bytes.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_core::ndarray::{DType, NdArray};
///
/// let a = NdArray::from_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
/// assert_eq!(a.shape(), &[2, 3]);
/// assert_eq!(a.len(), 6);
///
/// // what goes on the wire is the .npy file; parsing it back gives the same array
/// let again = NdArray::from_npy(a.npy().clone()).unwrap();
/// assert_eq!(again.dtype(), &DType::F32);
/// assert_eq!(again.to_f32_vec().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
/// assert!(again.to_i64_vec().is_err()); // wrong dtype is an error, not a reinterpretation
///
/// assert!(NdArray::from_npy(Bytes::from_static(b"not an array")).is_err());
/// ```
#[derive(Clone)]
pub struct NdArray {
    npy: Bytes,
    info: Arc<NpyInfo>,
}

impl PartialEq for NdArray {
    fn eq(&self, other: &Self) -> bool {
        self.npy == other.npy
    }
}

impl fmt::Debug for NdArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NdArray")
            .field("descr", &self.info.descr)
            .field("shape", &self.info.shape)
            .field("fortran_order", &self.info.fortran_order)
            .field("npy_len", &self.npy.len())
            .finish()
    }
}

/// An array whose `.npy` buffer one owner holds alone ([`NdArray::try_into_mut`]): its element
/// bytes can be changed in place, its header cannot. [`NdArrayMut::freeze`] makes it an
/// [`NdArray`] again without copying.
pub struct NdArrayMut {
    npy: BytesMut,
    info: Arc<NpyInfo>,
}

impl fmt::Debug for NdArrayMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NdArrayMut")
            .field("descr", &self.info.descr)
            .field("shape", &self.info.shape)
            .field("npy_len", &self.npy.len())
            .finish()
    }
}

impl NdArrayMut {
    /// numpy's descr string, e.g. `"<f4"`.
    pub fn descr(&self) -> &str {
        &self.info.descr
    }

    /// The element type.
    pub fn dtype(&self) -> &DType {
        &self.info.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.info.shape
    }

    /// The `.npy` bytes (header and data).
    pub fn npy(&self) -> &[u8] {
        &self.npy
    }

    /// The raw element bytes, to change in place (the header stays as it is, so the length and
    /// layout are fixed).
    pub fn data_mut(&mut self) -> &mut [u8] {
        let at = self.info.data_offset.min(self.npy.len());
        &mut self.npy[at..]
    }

    /// Back to a shared [`NdArray`], without copying.
    pub fn freeze(self) -> NdArray {
        NdArray {
            npy: self.npy.freeze(),
            info: self.info,
        }
    }

    /// The owned `.npy` buffer (e.g. to frame it as a zip entry in place).
    pub fn into_npy(self) -> BytesMut {
        self.npy
    }
}

/// What the preamble of a `.npy` file says, read from its first bytes only (e.g. the first piece
/// of a stream), so that a receiver can size and check what follows.
///
/// # Example
/// ```
/// use fedrun_core::ndarray::{DType, NdArray, NpyHeader};
///
/// let a = NdArray::from_f32(&[2, 3], &[0.0; 6]).unwrap();
/// let h = NpyHeader::parse(&a.npy()[..a.data_offset() + 4]).unwrap();
/// assert_eq!((h.dtype, h.shape.as_slice(), h.data_len), (DType::F32, &[2usize, 3][..], 24));
/// assert_eq!(h.data_offset + h.data_len, a.npy().len());
/// assert!(NpyHeader::parse(&a.npy()[..20]).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// numpy's descr string.
    pub descr: String,
    /// The element type.
    pub dtype: DType,
    /// The byte order of the elements.
    pub byte_order: ByteOrder,
    /// Fortran (column-major) storage.
    pub fortran_order: bool,
    /// The shape.
    pub shape: Vec<usize>,
    /// Where the data starts.
    pub data_offset: usize,
    /// How many data bytes follow the preamble.
    pub data_len: usize,
}

impl NpyHeader {
    /// Parses the preamble (magic, version, header) at the start of `prefix`, which must hold
    /// at least the whole preamble but need not hold the data.
    ///
    /// # Errors
    ///
    /// [`CoreError::InvalidNpy`] as for [`NdArray::from_npy`], or when the preamble is cut.
    pub fn parse(prefix: &[u8]) -> Result<NpyHeader, CoreError> {
        let (info, data_len) = parse_preamble(prefix)?;
        Ok(NpyHeader {
            descr: info.descr,
            dtype: info.dtype,
            byte_order: info.byte_order,
            fortran_order: info.fortran_order,
            shape: info.shape,
            data_offset: info.data_offset,
            data_len,
        })
    }

    /// The size of one element, when the dtype has a fixed one.
    pub fn item_size(&self) -> Option<usize> {
        match self.dtype.item_size() {
            Some(n) => Some(n),
            None => parse_descr(&self.descr).ok().map(|(_, _, n)| n),
        }
    }
}

/// The header and padding numpy 2.x writes for a C-order array of `descr` and `shape` (magic,
/// version, header length, header): the bytes that precede the data.
///
/// # Errors
///
/// [`CoreError::InvalidNpy`] when the header would be too long.
pub fn npy_preamble(descr: &str, shape: &[usize]) -> Result<Vec<u8>, CoreError> {
    let header = npy_header(descr, shape);
    let hlen = u16::try_from(header.len()).map_err(|_| bad("header too long"))?;
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    Ok(out)
}

fn bad(msg: impl Into<String>) -> CoreError {
    CoreError::InvalidNpy(msg.into())
}

impl NdArray {
    /// Parse and validate `.npy` bytes (format 1.0, 2.0 or 3.0), without copying them.
    ///
    /// Checks the magic, the version, the header length, the header dict (`descr`,
    /// `fortran_order`, `shape`, nothing else), and that the data is exactly
    /// `product(shape) * item size` bytes. Structured dtypes (a list as descr) and object arrays
    /// are refused.
    pub fn from_npy(npy: Bytes) -> Result<NdArray, CoreError> {
        let info = parse_npy(&npy)?;
        Ok(NdArray {
            npy,
            info: Arc::new(info),
        })
    }

    /// The `.npy` bytes (header and data), as they go on the wire.
    pub fn npy(&self) -> &Bytes {
        &self.npy
    }

    /// numpy's descr string, e.g. `"<f4"`.
    pub fn descr(&self) -> &str {
        &self.info.descr
    }

    /// The element type.
    pub fn dtype(&self) -> &DType {
        &self.info.dtype
    }

    /// The byte order of the elements.
    pub fn byte_order(&self) -> ByteOrder {
        self.info.byte_order
    }

    /// The shape (empty for a 0-d array, which holds one element).
    pub fn shape(&self) -> &[usize] {
        &self.info.shape
    }

    /// True when the data is stored in Fortran (column-major) order.
    pub fn fortran_order(&self) -> bool {
        self.info.fortran_order
    }

    /// The number of elements (the product of the shape; 1 for a 0-d array).
    pub fn len(&self) -> usize {
        self.info.shape.iter().product()
    }

    /// True when the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the raw data starts inside [`NdArray::npy`].
    pub fn data_offset(&self) -> usize {
        self.info.data_offset
    }

    /// The raw element bytes, in storage order (C order unless [`NdArray::fortran_order`]), in the
    /// array's own byte order. A zero-copy slice of the `.npy` bytes.
    pub fn data(&self) -> Bytes {
        self.npy.slice(self.info.data_offset..)
    }

    /// Whether this handle is the only one on the array's buffer (then
    /// [`NdArray::try_into_mut`] hands it over without copying).
    pub fn is_unique(&self) -> bool {
        self.npy.is_unique()
    }

    /// The array with its buffer to itself, for changing its elements in place, when no other
    /// handle (clone, slice of the same received buffer) shares it; otherwise the array back,
    /// untouched. Never copies.
    ///
    /// # Example
    /// ```
    /// use fedrun_core::NdArray;
    ///
    /// let a = NdArray::from_f32(&[2], &[1.0, 2.0]).unwrap();
    /// let kept = a.clone();
    /// let a = a.try_into_mut().unwrap_err(); // shared with `kept`
    /// drop(kept);
    /// let mut m = a.try_into_mut().unwrap();
    /// m.data_mut()[..4].copy_from_slice(&5.0f32.to_le_bytes());
    /// assert_eq!(m.freeze().to_f32_vec().unwrap(), vec![5.0, 2.0]);
    /// ```
    pub fn try_into_mut(self) -> Result<NdArrayMut, NdArray> {
        let NdArray { npy, info } = self;
        match npy.try_into_mut() {
            Ok(npy) => Ok(NdArrayMut { npy, info }),
            Err(npy) => Err(NdArray { npy, info }),
        }
    }

    /// [`NdArray::try_into_mut`], copying the bytes when the buffer is shared.
    pub fn into_mut(self) -> NdArrayMut {
        match self.try_into_mut() {
            Ok(m) => m,
            Err(shared) => NdArrayMut {
                npy: BytesMut::from(&shared.npy[..]),
                info: shared.info,
            },
        }
    }

    fn check_dtype(&self, want: DType) -> Result<(), CoreError> {
        if self.info.dtype == want {
            Ok(())
        } else {
            Err(CoreError::DTypeMismatch {
                expected: want.name().to_owned(),
                actual: self.info.descr.clone(),
            })
        }
    }

    fn elements<const N: usize, T>(
        &self,
        want: DType,
        from_le: fn([u8; N]) -> T,
        from_be: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, CoreError> {
        self.check_dtype(want)?;
        let conv = if self.info.byte_order == ByteOrder::Big {
            from_be
        } else {
            from_le
        };
        // exact-size iterator over fixed-size chunks: one allocation, a tight loop
        Ok(self.npy[self.info.data_offset..]
            .chunks_exact(N)
            .map(|c| conv(le_array(c)))
            .collect())
    }

    /// Calls `f(start, values)` for consecutive runs of the elements (storage order), decoded
    /// into a small reused buffer of at most [`VISIT_CHUNK`] elements: the elements are read
    /// without materialising the whole array.
    fn visit<const N: usize, T: Copy + Default>(
        &self,
        want: DType,
        from_le: fn([u8; N]) -> T,
        from_be: fn([u8; N]) -> T,
        mut f: impl FnMut(usize, &[T]),
    ) -> Result<(), CoreError> {
        self.check_dtype(want)?;
        let conv = if self.info.byte_order == ByteOrder::Big {
            from_be
        } else {
            from_le
        };
        let mut buf = vec![T::default(); VISIT_CHUNK.min(self.len())];
        let mut start = 0;
        for bytes in self.npy[self.info.data_offset..].chunks(VISIT_CHUNK * N) {
            let n = bytes.len() / N;
            for (slot, c) in buf.iter_mut().zip(bytes.chunks_exact(N)) {
                *slot = conv(le_array(c));
            }
            f(start, &buf[..n]);
            start += n;
        }
        Ok(())
    }

    /// Visits the elements of a `float32` array in storage order without materialising them:
    /// `f(start, values)` gets consecutive runs (at most [`VISIT_CHUNK`] elements each), where
    /// `start` is the index of `values[0]`. Big-endian data is converted. Any other dtype is an
    /// error ([`CoreError::DTypeMismatch`]).
    ///
    /// # Example
    /// ```
    /// use fedrun_core::NdArray;
    ///
    /// let a = NdArray::from_f32(&[3], &[1.0, 2.0, 3.0]).unwrap();
    /// let mut sum = 0.0;
    /// a.for_each_f32(|_start, values| sum += values.iter().sum::<f32>()).unwrap();
    /// assert_eq!(sum, 6.0);
    /// ```
    pub fn for_each_f32(&self, f: impl FnMut(usize, &[f32])) -> Result<(), CoreError> {
        self.visit(DType::F32, f32::from_le_bytes, f32::from_be_bytes, f)
    }

    /// Visits the elements of a `float64` array (see [`NdArray::for_each_f32`]).
    pub fn for_each_f64(&self, f: impl FnMut(usize, &[f64])) -> Result<(), CoreError> {
        self.visit(DType::F64, f64::from_le_bytes, f64::from_be_bytes, f)
    }

    /// The elements of a `float32` array, in storage order. Big-endian data (`'>f4'`) is
    /// converted. Any other dtype is an error ([`CoreError::DTypeMismatch`]).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, CoreError> {
        self.elements(DType::F32, f32::from_le_bytes, f32::from_be_bytes)
    }

    /// The elements of a `float64` array (see [`NdArray::to_f32_vec`]).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>, CoreError> {
        self.elements(DType::F64, f64::from_le_bytes, f64::from_be_bytes)
    }

    /// The elements of an `int32` array (see [`NdArray::to_f32_vec`]).
    pub fn to_i32_vec(&self) -> Result<Vec<i32>, CoreError> {
        self.elements(DType::I32, i32::from_le_bytes, i32::from_be_bytes)
    }

    /// The elements of an `int64` array (see [`NdArray::to_f32_vec`]).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, CoreError> {
        self.elements(DType::I64, i64::from_le_bytes, i64::from_be_bytes)
    }

    /// The elements of a `uint8` array.
    pub fn to_u8_vec(&self) -> Result<Vec<u8>, CoreError> {
        self.check_dtype(DType::U8)?;
        Ok(self.npy[self.info.data_offset..].to_vec())
    }

    /// The elements of a `bool` array (any non-zero byte is `true`, as in numpy).
    pub fn to_bool_vec(&self) -> Result<Vec<bool>, CoreError> {
        self.check_dtype(DType::Bool)?;
        Ok(self.npy[self.info.data_offset..]
            .iter()
            .map(|b| *b != 0)
            .collect())
    }

    /// The same array in C (row-major) order: `self` (a cheap clone) when it already is, or
    /// when it has fewer than two dimensions; otherwise a reordered copy with the same descr.
    ///
    /// # Errors
    ///
    /// [`CoreError::InvalidNpy`] for a dtype without a fixed item size.
    pub fn to_c_order(&self) -> Result<NdArray, CoreError> {
        let shape = &self.info.shape;
        if !self.info.fortran_order || shape.len() < 2 {
            return Ok(self.clone());
        }
        let (_, _, item) = parse_descr(&self.info.descr)?;
        let data = &self.npy[self.info.data_offset..];
        let n = self.len();
        let mut out = BytesMut::from(&npy_preamble(&self.info.descr, shape)?[..]);
        out.reserve(data.len());
        // Walk the C-order indices; each element's Fortran offset has the first axis fastest.
        let mut index = vec![0usize; shape.len()];
        for _ in 0..n {
            let mut offset = 0usize;
            let mut stride = 1usize;
            for (i, dim) in index.iter().zip(shape) {
                offset += i * stride;
                stride *= dim;
            }
            let at = offset * item;
            out.put_slice(
                data.get(at..at + item)
                    .ok_or_else(|| bad("data too short"))?,
            );
            for axis in (0..shape.len()).rev() {
                index[axis] += 1;
                if index[axis] < shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
        NdArray::from_npy(out.freeze())
    }

    /// Build an array from raw little-endian element bytes, writing numpy 2.x's exact header.
    fn build(
        descr: &str,
        dtype: DType,
        item: usize,
        shape: &[usize],
        count: usize,
        write: impl FnOnce(&mut BytesMut),
    ) -> Result<NdArray, CoreError> {
        if shape.len() > MAX_DIMS {
            return Err(bad(format!(
                "{} dimensions (numpy allows {MAX_DIMS})",
                shape.len()
            )));
        }
        let elements = checked_product(shape)?;
        if elements != count {
            return Err(bad(format!(
                "shape {shape:?} holds {elements} elements but {count} were given"
            )));
        }
        let header = npy_header(descr, shape);
        let preamble = 10 + header.len();
        let data_len = count
            .checked_mul(item)
            .ok_or_else(|| bad("data size overflows"))?;
        let mut buf = BytesMut::with_capacity(preamble + data_len);
        buf.put_slice(NPY_MAGIC);
        buf.put_slice(&[1, 0]);
        let hlen = u16::try_from(header.len()).map_err(|_| bad("header too long"))?;
        buf.put_u16_le(hlen);
        buf.put_slice(header.as_bytes());
        write(&mut buf);
        let byte_order = if item == 1 {
            ByteOrder::NotApplicable
        } else {
            ByteOrder::Little
        };
        Ok(NdArray {
            npy: buf.freeze(),
            info: Arc::new(NpyInfo {
                descr: descr.to_owned(),
                dtype,
                byte_order,
                fortran_order: false,
                shape: shape.to_vec(),
                data_offset: preamble,
            }),
        })
    }

    /// A C-order `float32` array (`'<f4'`). `data.len()` must equal the product of `shape`.
    pub fn from_f32(shape: &[usize], data: &[f32]) -> Result<NdArray, CoreError> {
        Self::build("<f4", DType::F32, 4, shape, data.len(), |b| {
            write_le(b, data, |v: &f32| v.to_le_bytes())
        })
    }

    /// A C-order `float32` array (`'<f4'`) written straight from an iterator, without an
    /// intermediate `Vec`. The iterator must yield exactly the product of `shape` elements
    /// (fewer or more is an error).
    ///
    /// # Example
    /// ```
    /// use fedrun_core::NdArray;
    ///
    /// let a = NdArray::from_f32(&[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let mut doubled = Vec::new();
    /// a.for_each_f32(|_, v| doubled.extend(v.iter().map(|x| x * 2.0))).unwrap();
    /// let b = NdArray::from_f32_iter(&[2, 2], doubled).unwrap();
    /// assert_eq!(b.to_f32_vec().unwrap(), vec![2.0, 4.0, 6.0, 8.0]);
    /// assert!(NdArray::from_f32_iter(&[3], [1.0f32]).is_err());
    /// ```
    pub fn from_f32_iter(
        shape: &[usize],
        values: impl IntoIterator<Item = f32>,
    ) -> Result<NdArray, CoreError> {
        Self::build_iter("<f4", DType::F32, shape, values, f32::to_le_bytes)
    }

    /// A C-order `float64` array (`'<f8'`) written straight from an iterator (see
    /// [`NdArray::from_f32_iter`]).
    pub fn from_f64_iter(
        shape: &[usize],
        values: impl IntoIterator<Item = f64>,
    ) -> Result<NdArray, CoreError> {
        Self::build_iter("<f8", DType::F64, shape, values, f64::to_le_bytes)
    }

    fn build_iter<const N: usize, T>(
        descr: &str,
        dtype: DType,
        shape: &[usize],
        values: impl IntoIterator<Item = T>,
        to_le: fn(T) -> [u8; N],
    ) -> Result<NdArray, CoreError> {
        let count = checked_product(shape)?;
        let mut written = 0usize;
        let mut overflow = false;
        let array = Self::build(descr, dtype, N, shape, count, |b| {
            let start = b.len();
            b.resize(start + count * N, 0);
            let mut slots = b[start..].chunks_exact_mut(N);
            for v in values {
                match slots.next() {
                    Some(slot) => slot.copy_from_slice(&to_le(v)),
                    None => {
                        overflow = true;
                        break;
                    }
                }
                written += 1;
            }
        })?;
        if overflow || written != count {
            return Err(bad(format!(
                "shape {shape:?} holds {count} elements but the iterator gave {}",
                if overflow {
                    "more".to_owned()
                } else {
                    written.to_string()
                }
            )));
        }
        Ok(array)
    }

    /// A C-order `float64` array (`'<f8'`).
    pub fn from_f64(shape: &[usize], data: &[f64]) -> Result<NdArray, CoreError> {
        Self::build("<f8", DType::F64, 8, shape, data.len(), |b| {
            write_le(b, data, |v: &f64| v.to_le_bytes())
        })
    }

    /// A C-order `int32` array (`'<i4'`).
    pub fn from_i32(shape: &[usize], data: &[i32]) -> Result<NdArray, CoreError> {
        Self::build("<i4", DType::I32, 4, shape, data.len(), |b| {
            write_le(b, data, |v: &i32| v.to_le_bytes())
        })
    }

    /// A C-order `int64` array (`'<i8'`).
    pub fn from_i64(shape: &[usize], data: &[i64]) -> Result<NdArray, CoreError> {
        Self::build("<i8", DType::I64, 8, shape, data.len(), |b| {
            write_le(b, data, |v: &i64| v.to_le_bytes())
        })
    }

    /// A C-order `uint8` array (`'|u1'`).
    pub fn from_u8(shape: &[usize], data: &[u8]) -> Result<NdArray, CoreError> {
        Self::build("|u1", DType::U8, 1, shape, data.len(), |b| {
            b.put_slice(data)
        })
    }

    /// A C-order `bool` array (`'|b1'`).
    pub fn from_bool(shape: &[usize], data: &[bool]) -> Result<NdArray, CoreError> {
        Self::build("|b1", DType::Bool, 1, shape, data.len(), |b| {
            for v in data {
                b.put_u8(u8::from(*v));
            }
        })
    }
}

/// The most elements [`NdArray::for_each_f32`] and [`NdArray::for_each_f64`] hand over at once.
pub const VISIT_CHUNK: usize = 16 * 1024;

/// A chunk of exactly `N` bytes as an array (callers pass `chunks_exact(N)` items).
fn le_array<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(c);
    b
}

/// Appends the little-endian bytes of `data` in one resize and a tight loop.
fn write_le<const N: usize, T>(b: &mut BytesMut, data: &[T], to_le: impl Fn(&T) -> [u8; N]) {
    let start = b.len();
    b.resize(start + data.len() * N, 0);
    for (slot, v) in b[start..].chunks_exact_mut(N).zip(data) {
        slot.copy_from_slice(&to_le(v));
    }
}

fn checked_product(shape: &[usize]) -> Result<usize, CoreError> {
    shape.iter().try_fold(1usize, |acc, d| {
        acc.checked_mul(*d)
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))
    })
}

/// The header text numpy 2.x writes for a C-order array (format 1.0): the dict literal, spare
/// spaces for growing the first axis, padding to a 64-byte preamble, and a final newline.
fn npy_header(descr: &str, shape: &[usize]) -> String {
    let shape_repr = match shape {
        [] => "()".to_owned(),
        [one] => format!("({one},)"),
        more => {
            let parts: Vec<String> = more.iter().map(usize::to_string).collect();
            format!("({})", parts.join(", "))
        }
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_repr}, }}");
    if let Some(first) = shape.first() {
        let digits = first.to_string().len();
        header.push_str(&" ".repeat(GROWTH_AXIS_MAX_DIGITS.saturating_sub(digits)));
    }
    // magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64
    let unpadded = 10 + header.len() + 1;
    let pad = (ARRAY_ALIGN - unpadded % ARRAY_ALIGN) % ARRAY_ALIGN;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    header
}

/// Parses the preamble at the start of `npy` (which may hold only part of the data); returns the
/// header and the number of data bytes it announces.
fn parse_preamble(npy: &[u8]) -> Result<(NpyInfo, usize), CoreError> {
    if npy.len() < 10 || &npy[..6] != NPY_MAGIC {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (major, minor) = (npy[6], npy[7]);
    let (hlen, start): (usize, usize) = match (major, minor) {
        (1, 0) => (usize::from(u16::from_le_bytes([npy[8], npy[9]])), 10),
        (2, 0) | (3, 0) => {
            if npy.len() < 12 {
                return Err(bad("truncated header length"));
            }
            let n = u32::from_le_bytes([npy[8], npy[9], npy[10], npy[11]]);
            (usize::try_from(n).map_err(|_| bad("header too long"))?, 12)
        }
        _ => return Err(bad(format!("unsupported format version {major}.{minor}"))),
    };
    if hlen > MAX_HEADER_LEN {
        return Err(bad(format!("header of {hlen} bytes is too long")));
    }
    let data_offset = start
        .checked_add(hlen)
        .ok_or_else(|| bad("header too long"))?;
    if data_offset > npy.len() {
        return Err(bad(format!(
            "header claims {hlen} bytes but only {} remain",
            npy.len() - start
        )));
    }
    let header = std::str::from_utf8(&npy[start..data_offset])
        .map_err(|_| bad("header is not valid text"))?;
    let (descr, fortran_order, shape) = HeaderParser::new(header).parse()?;
    let (dtype, byte_order, item) = parse_descr(&descr)?;
    let elements = checked_product(&shape)?;
    let data_len = elements
        .checked_mul(item)
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    Ok((
        NpyInfo {
            descr,
            dtype,
            byte_order,
            fortran_order,
            shape,
            data_offset,
        },
        data_len,
    ))
}

fn parse_npy(npy: &[u8]) -> Result<NpyInfo, CoreError> {
    let (info, data_len) = parse_preamble(npy)?;
    let actual = npy.len() - info.data_offset;
    if actual != data_len {
        return Err(bad(format!(
            "shape {:?} of {} needs {data_len} data bytes but there are {actual}",
            info.shape, info.descr
        )));
    }
    Ok(info)
}

/// Element type, byte order and item size of a descr such as `'<f4'`, `'|b1'`, `'<U5'`,
/// `'<M8[ns]'`.
fn parse_descr(descr: &str) -> Result<(DType, ByteOrder, usize), CoreError> {
    let unsupported = || bad(format!("unsupported descr {descr:?}"));
    let mut chars = descr.chars();
    let order = match chars.next() {
        Some('<') => ByteOrder::Little,
        Some('>') => ByteOrder::Big,
        Some('|') => ByteOrder::NotApplicable,
        _ => return Err(unsupported()),
    };
    let rest = chars.as_str();
    let kind = rest.chars().next().ok_or_else(unsupported)?;
    let tail = &rest[kind.len_utf8()..];
    let digits_end = tail
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(tail.len());
    let (digits, unit) = tail.split_at(digits_end);
    if digits.is_empty() || digits.len() > 9 {
        return Err(unsupported());
    }
    let n: usize = digits.parse().map_err(|_| unsupported())?;
    let unit_ok = unit.is_empty()
        || (matches!(kind, 'M' | 'm')
            && unit.starts_with('[')
            && unit.ends_with(']')
            && unit[1..unit.len() - 1]
                .chars()
                .all(|c| c.is_ascii_alphanumeric()));
    if !unit_ok {
        return Err(unsupported());
    }
    let item = match kind {
        'b' | 'i' | 'u' | 'f' | 'c' | 'S' | 'a' | 'V' | 'M' | 'm' => n,
        'U' => n.checked_mul(4).ok_or_else(unsupported)?,
        _ => return Err(unsupported()),
    };
    if item == 0 && !matches!(kind, 'S' | 'a' | 'V' | 'U') {
        return Err(unsupported());
    }
    let dtype = match (kind, n, order) {
        ('f', 4, ByteOrder::Little | ByteOrder::Big) => DType::F32,
        ('f', 8, ByteOrder::Little | ByteOrder::Big) => DType::F64,
        ('i', 4, ByteOrder::Little | ByteOrder::Big) => DType::I32,
        ('i', 8, ByteOrder::Little | ByteOrder::Big) => DType::I64,
        ('u', 1, _) => DType::U8,
        ('b', 1, _) => DType::Bool,
        _ => DType::Other(descr.to_owned()),
    };
    Ok((dtype, order, item))
}

/// A parser for the Python dict literal of a `.npy` header, e.g.
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
struct HeaderParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> HeaderParser<'a> {
    fn new(s: &'a str) -> Self {
        HeaderParser {
            s: s.as_bytes(),
            pos: 0,
        }
    }

    fn ws(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t' | b'\n' | b'\r') {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), CoreError> {
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(bad(format!(
                "header: expected '{}' at byte {}",
                char::from(c),
                self.pos
            )))
        }
    }

    fn string(&mut self) -> Result<String, CoreError> {
        self.ws();
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(bad(format!(
                    "header: expected a string at byte {}",
                    self.pos
                )))
            }
        };
        self.pos += 1;
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == quote {
                let text = std::str::from_utf8(&self.s[start..self.pos])
                    .map_err(|_| bad("header: invalid text"))?
                    .to_owned();
                self.pos += 1;
                return Ok(text);
            }
            if c == b'\\' {
                return Err(bad("header: escapes in strings are not supported"));
            }
            self.pos += 1;
        }
        Err(bad("header: unterminated string"))
    }

    fn word(&mut self) -> &'a [u8] {
        self.ws();
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }

    fn boolean(&mut self) -> Result<bool, CoreError> {
        match self.word() {
            b"True" => Ok(true),
            b"False" => Ok(false),
            _ => Err(bad("header: fortran_order must be True or False")),
        }
    }

    fn shape(&mut self) -> Result<Vec<usize>, CoreError> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.peek() == Some(b')') {
                self.pos += 1;
                break;
            }
            let w = self.word();
            if w.is_empty() || !w.iter().all(u8::is_ascii_digit) {
                return Err(bad("header: shape must be a tuple of non-negative ints"));
            }
            let text = std::str::from_utf8(w).map_err(|_| bad("header: invalid text"))?;
            let d: usize = text
                .parse()
                .map_err(|_| bad(format!("header: dimension {text} is too large")))?;
            if dims.len() == MAX_DIMS {
                return Err(bad(format!("more than {MAX_DIMS} dimensions")));
            }
            dims.push(d);
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b')') => {
                    self.pos += 1;
                    // Python needs a trailing comma for a 1-tuple: `(5)` is an int
                    if dims.len() == 1 {
                        return Err(bad("header: shape must be a tuple"));
                    }
                    break;
                }
                _ => return Err(bad("header: malformed shape tuple")),
            }
        }
        Ok(dims)
    }

    fn parse(mut self) -> Result<(String, bool, Vec<usize>), CoreError> {
        self.expect(b'{')?;
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        loop {
            self.ws();
            if self.peek() == Some(b'}') {
                self.pos += 1;
                break;
            }
            let key = self.string()?;
            self.expect(b':')?;
            let dup = match key.as_str() {
                "descr" => {
                    self.ws();
                    if self.peek() == Some(b'[') {
                        return Err(bad("structured dtypes are not supported"));
                    }
                    descr.replace(self.string()?).is_some()
                }
                "fortran_order" => fortran.replace(self.boolean()?).is_some(),
                "shape" => shape.replace(self.shape()?).is_some(),
                other => return Err(bad(format!("header: unexpected key {other:?}"))),
            };
            if dup {
                return Err(bad(format!("header: duplicate key {key:?}")));
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                _ => {
                    return Err(bad(format!(
                        "header: expected ',' or '}}' at byte {}",
                        self.pos
                    )))
                }
            }
        }
        self.ws();
        if self.pos != self.s.len() {
            return Err(bad("header: trailing characters after the dict"));
        }
        match (descr, fortran, shape) {
            (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
            _ => Err(bad("header: needs descr, fortran_order and shape")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn npy_with_header(header: &str, data: &[u8]) -> Bytes {
        let mut v = NPY_MAGIC.to_vec();
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&(header.len() as u16).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        Bytes::from(v)
    }

    #[test]
    fn constructed_header_matches_numpy_layout() {
        let a = NdArray::from_f32(&[2, 3], &[0.0; 6]).unwrap();
        let hlen = u16::from_le_bytes([a.npy()[8], a.npy()[9]]) as usize;
        assert_eq!(hlen, 118);
        assert_eq!(a.data_offset() % 64, 0);
        let header = std::str::from_utf8(&a.npy()[10..10 + hlen]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(header.ends_with(" \n"));
        let scalar = NdArray::from_f64(&[], &[3.25]).unwrap();
        assert!(std::str::from_utf8(&scalar.npy()[10..scalar.data_offset()])
            .unwrap()
            .contains("'shape': (), }"));
        assert_eq!(scalar.len(), 1);
    }

    #[test]
    fn typed_round_trips_keep_values() {
        let a = NdArray::from_i32(&[3], &[1, -2, 3]).unwrap();
        let b = NdArray::from_npy(a.npy().clone()).unwrap();
        assert_eq!(b.to_i32_vec().unwrap(), vec![1, -2, 3]);
        let u = NdArray::from_u8(&[2], &[7, 255]).unwrap();
        assert_eq!(
            NdArray::from_npy(u.npy().clone())
                .unwrap()
                .to_u8_vec()
                .unwrap(),
            vec![7, 255]
        );
        let t = NdArray::from_bool(&[2], &[true, false]).unwrap();
        assert_eq!(t.to_bool_vec().unwrap(), vec![true, false]);
        assert_eq!(t.descr(), "|b1");
        let f = NdArray::from_f64(&[1], &[0.5]).unwrap();
        assert_eq!(f.to_f64_vec().unwrap(), vec![0.5]);
        let i = NdArray::from_i64(&[0], &[]).unwrap();
        assert!(i.is_empty());
    }

    #[test]
    fn wrong_dtype_is_an_error_not_a_reinterpretation() {
        let a = NdArray::from_f32(&[1], &[1.0]).unwrap();
        assert!(matches!(
            a.to_i32_vec(),
            Err(CoreError::DTypeMismatch { .. })
        ));
    }

    #[test]
    fn constructor_rejects_shape_that_does_not_match_data() {
        assert!(NdArray::from_f32(&[2, 2], &[1.0]).is_err());
        assert!(NdArray::from_f32(&[usize::MAX, 2], &[1.0]).is_err());
    }

    #[test]
    fn big_endian_data_is_converted() {
        let mut data = Vec::new();
        data.extend_from_slice(&1.5f32.to_be_bytes());
        let npy = npy_with_header(
            "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }\n",
            &data,
        );
        let a = NdArray::from_npy(npy).unwrap();
        assert_eq!(a.byte_order(), ByteOrder::Big);
        assert_eq!(a.to_f32_vec().unwrap(), vec![1.5]);
    }

    #[test]
    fn absurd_shape_is_rejected_without_allocating() {
        let npy = npy_with_header(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }\n",
            &[],
        );
        assert!(NdArray::from_npy(npy).is_err());
        let npy = npy_with_header(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999999,), }\n",
            &[],
        );
        assert!(NdArray::from_npy(npy).is_err());
    }

    #[test]
    fn malformed_headers_are_errors() {
        for h in [
            "{'descr': '<f4', 'fortran_order': False}\n",
            "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,), }\n",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1), }\n",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}\n",
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }\n",
            "{'descr': 'O', 'fortran_order': False, 'shape': (1,), }\n",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), } x\n",
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }\n",
        ] {
            assert!(
                NdArray::from_npy(npy_with_header(h, &[0; 4])).is_err(),
                "{h}"
            );
        }
        // data length must match exactly
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n";
        assert!(NdArray::from_npy(npy_with_header(h, &[0; 4])).is_err());
        assert!(NdArray::from_npy(npy_with_header(h, &[0; 8])).is_ok());
    }

    #[test]
    fn other_dtypes_are_kept_by_descr() {
        let h = "{'descr': '<U2', 'fortran_order': True, 'shape': (1,), }\n";
        let a = NdArray::from_npy(npy_with_header(h, &[0; 8])).unwrap();
        assert_eq!(a.dtype(), &DType::Other("<U2".into()));
        assert!(a.fortran_order());
        assert!(a.to_f32_vec().is_err());
    }

    #[test]
    fn visiting_elements_sees_every_value_once_in_order() {
        let n = VISIT_CHUNK * 2 + 5;
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let a = NdArray::from_f32(&[n], &values).unwrap();
        let mut seen = Vec::new();
        let mut starts = Vec::new();
        a.for_each_f32(|start, v| {
            starts.push(start);
            seen.extend_from_slice(v);
        })
        .unwrap();
        assert_eq!(seen, values);
        assert_eq!(starts, vec![0, VISIT_CHUNK, 2 * VISIT_CHUNK]);
        assert!(a.for_each_f64(|_, _| {}).is_err());
        let d = NdArray::from_f64_iter(&[2], [0.5, -1.5]).unwrap();
        let mut got = Vec::new();
        d.for_each_f64(|_, v| got.extend_from_slice(v)).unwrap();
        assert_eq!(got, vec![0.5, -1.5]);
    }

    #[test]
    fn iterator_builders_match_slice_builders_and_check_the_count() {
        let v = [1.0f32, -2.5, 3.25, 0.0];
        assert_eq!(
            NdArray::from_f32_iter(&[2, 2], v).unwrap(),
            NdArray::from_f32(&[2, 2], &v).unwrap()
        );
        assert!(NdArray::from_f32_iter(&[5], v).is_err());
        assert!(NdArray::from_f32_iter(&[3], v).is_err());
        assert!(NdArray::from_f64_iter(&[0], std::iter::empty())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn header_is_read_from_a_prefix_and_c_order_copies_fortran_data() {
        let a = NdArray::from_i32(&[2, 3], &[0, 1, 2, 3, 4, 5]).unwrap();
        let h = NpyHeader::parse(&a.npy()[..a.data_offset()]).unwrap();
        assert_eq!(h.data_len, 24);
        assert_eq!(h.item_size(), Some(4));
        assert_eq!(
            npy_preamble("<i4", &[2, 3]).unwrap(),
            a.npy()[..a.data_offset()].to_vec()
        );
        let mut data = Vec::new();
        for v in [0i32, 3, 1, 4, 2, 5] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        let f = NdArray::from_npy(npy_with_header(
            "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 3), }\n",
            &data,
        ))
        .unwrap();
        let c = f.to_c_order().unwrap();
        assert!(!c.fortran_order());
        assert_eq!(c.to_i32_vec().unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(a.to_c_order().unwrap(), a);
    }
}
