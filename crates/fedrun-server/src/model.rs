//! The global model as the server keeps it: named float arrays.
//!
//! Training jobs exchange their weights as the `data` map of a DXO (array name → numpy array).
//! The server's workflows, aggregators and persistors all need the same few operations on that
//! map — read it into named arrays and write them back — so they live here once, on
//! [`ModelWeights`]. (The float arithmetic lives in [`crate::aggregator::WeightedSum`].)

use std::collections::BTreeMap;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn non_array_entries_are_not_a_model() {
        let mut data = Map::new();
        data.insert("w", 1.5);
        let err = weights_from_dxo(&Dxo::new(DataKind::Weights, data)).unwrap_err();
        assert!(err.to_string().contains("'w' is a float"), "{err}");
    }
}
