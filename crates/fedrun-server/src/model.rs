//! The global model as the server keeps it: named float arrays.
//!
//! Training jobs exchange their weights as the `data` map of a DXO (array name → numpy array).
//! The server's workflows, aggregators and persistors all need the same few operations on that
//! map — read it into named arrays, check the arrays are floats, get their elements in C order,
//! write them back — so they live here once, on [`ModelWeights`].

use std::collections::BTreeMap;

use fedrun_core::ndarray::DType;
use fedrun_core::{DataKind, Dxo, Map, NdArray, Value};

use crate::error::ServerError;

/// A model: array name → numpy array, sorted by name.
pub type ModelWeights = BTreeMap<String, NdArray>;

/// The DXO carrying `weights` as its data (array name → ndarray), with empty meta.
///
/// # Example
/// ```
/// use fedrun_core::{DataKind, NdArray};
/// use fedrun_server::{weights_from_dxo, weights_to_dxo, ModelWeights};
///
/// let mut w = ModelWeights::new();
/// w.insert("w".into(), NdArray::from_f32(&[2], &[1.0, 2.0]).unwrap());
/// let dxo = weights_to_dxo(&w, DataKind::Weights);
/// assert_eq!(weights_from_dxo(&dxo).unwrap(), w);
/// ```
pub fn weights_to_dxo(weights: &ModelWeights, kind: DataKind) -> Dxo {
    let data: Map = weights
        .iter()
        .map(|(k, v)| (Value::from(k.as_str()), Value::NdArray(v.clone())))
        .collect();
    Dxo::new(kind, data)
}

/// The arrays of a DXO's data map.
///
/// # Errors
///
/// [`ServerError::InvalidModel`] when a key is not a string or a value is not a numpy array.
pub fn weights_from_dxo(dxo: &Dxo) -> Result<ModelWeights, ServerError> {
    let mut out = ModelWeights::new();
    for (key, value) in dxo.data.iter() {
        let Some(name) = key.as_str() else {
            return Err(ServerError::InvalidModel(format!(
                "a DXO data key is a {}, not a string",
                key.kind()
            )));
        };
        let Some(array) = value.as_ndarray() else {
            return Err(ServerError::InvalidModel(format!(
                "entry '{name}' is a {}, not a numpy array",
                value.kind()
            )));
        };
        out.insert(name.to_owned(), array.clone());
    }
    Ok(out)
}

/// The elements of a float array, in C (row-major) order, widened to `f64`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FloatArray {
    /// `F32` or `F64`: the type to write back.
    pub(crate) dtype: DType,
    /// The shape.
    pub(crate) shape: Vec<usize>,
    /// The elements, C order.
    pub(crate) values: Vec<f64>,
}

impl FloatArray {
    /// Reads a `float32` / `float64` array (any byte order, C or Fortran order).
    pub(crate) fn read(name: &str, array: &NdArray) -> Result<FloatArray, ServerError> {
        let values: Vec<f64> = match array.dtype() {
            DType::F32 => array.to_f32_vec()?.into_iter().map(f64::from).collect(),
            DType::F64 => array.to_f64_vec()?,
            other => {
                return Err(ServerError::Aggregation(format!(
                    "array '{name}' holds {} elements; only float32 and float64 are supported",
                    other.name()
                )))
            }
        };
        let shape = array.shape().to_vec();
        let values = if array.fortran_order() && shape.len() > 1 {
            fortran_to_c(&shape, &values)
        } else {
            values
        };
        Ok(FloatArray {
            dtype: array.dtype().clone(),
            shape,
            values,
        })
    }

    /// Writes the array back as a C-order array of its dtype (`f64` values are rounded to the
    /// nearest `f32` for a `float32` array).
    pub(crate) fn write(&self) -> Result<NdArray, ServerError> {
        let array = if self.dtype == DType::F32 {
            // Narrowing to the array's own type is the point here.
            let narrow: Vec<f32> = self.values.iter().map(|v| *v as f32).collect();
            NdArray::from_f32(&self.shape, &narrow)?
        } else {
            NdArray::from_f64(&self.shape, &self.values)?
        };
        Ok(array)
    }
}

/// Reorders the elements of a Fortran-order array into C order.
fn fortran_to_c(shape: &[usize], values: &[f64]) -> Vec<f64> {
    let n = values.len();
    let mut out = Vec::with_capacity(n);
    // Walk the C-order indices and find each element's Fortran-order offset.
    let mut index = vec![0usize; shape.len()];
    for _ in 0..n {
        let mut offset = 0usize;
        let mut stride = 1usize;
        for (i, dim) in index.iter().zip(shape) {
            offset += i * stride;
            stride *= dim;
        }
        out.push(values.get(offset).copied().unwrap_or(f64::NAN));
        // Increment the C-order index (last axis fastest).
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;

    #[test]
    fn fortran_order_arrays_are_read_in_c_order() {
        // numpy: np.asfortranarray(np.arange(6, dtype='<f8').reshape(2, 3))
        let c = NdArray::from_f64(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let header = c.npy()[..c.data_offset()].to_vec();
        let text = String::from_utf8(header[10..].to_vec()).unwrap();
        let text = text.replace("'fortran_order': False", "'fortran_order': True ");
        let mut npy = header[..10].to_vec();
        npy.extend_from_slice(text.as_bytes());
        for v in [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0] {
            npy.extend_from_slice(&v.to_le_bytes());
        }
        let f = NdArray::from_npy(Bytes::from(npy)).unwrap();
        assert!(f.fortran_order());
        let read = FloatArray::read("x", &f).unwrap();
        assert_eq!(read.values, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(read.write().unwrap(), c);
    }

    #[test]
    fn integer_arrays_are_refused_with_their_dtype() {
        let a = NdArray::from_i64(&[1], &[1]).unwrap();
        let err = FloatArray::read("steps", &a).unwrap_err().to_string();
        assert!(err.contains("'steps'") && err.contains("int64"), "{err}");
    }

    #[test]
    fn non_array_entries_are_not_a_model() {
        let mut data = Map::new();
        data.insert("w", 1.5);
        let err = weights_from_dxo(&Dxo::new(DataKind::Weights, data)).unwrap_err();
        assert!(err.to_string().contains("'w' is a float"), "{err}");
    }
}
