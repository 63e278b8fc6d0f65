//! Aggregation: turning the clients' results of one round into one update.
//!
//! [`Aggregator`] is the pluggable step of a training workflow; [`FedAvg`] is the built-in one,
//! NVFlare's `InTimeAccumulateWeightedAggregator`: a weighted mean of every array of the
//! clients' DXO `data`, weighted by the DXO meta `NUM_STEPS_CURRENT_ROUND` (1 when absent).
//! Aggregators are synchronous: the workflow runs them on the blocking pool, so a large model
//! does not stall the actors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fedrun_core::{DataKind, Dxo, Map, Value};
use fedrun_engine::Component;

use crate::error::ServerError;
use crate::model::FloatArray;

/// The DXO meta key of a result's local step count (the aggregation weight).
pub const NUM_STEPS_CURRENT_ROUND: &str = "NUM_STEPS_CURRENT_ROUND";

/// One client's successful result of a round, as an aggregator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    /// The client's name.
    pub client: String,
    /// The result's DXO.
    pub dxo: Dxo,
}

/// Combines the contributions of one round into one DXO.
///
/// # Example
/// ```
/// use fedrun_core::{DataKind, Dxo, Map};
/// use fedrun_server::{Aggregator, Contribution, ServerError};
///
/// /// Keeps the first contribution.
/// struct First;
/// impl Aggregator for First {
///     fn aggregate(&self, contributions: &[Contribution]) -> Result<Dxo, ServerError> {
///         contributions
///             .first()
///             .map(|c| c.dxo.clone())
///             .ok_or_else(|| ServerError::Aggregation("nothing to aggregate".into()))
///     }
/// }
/// let c = Contribution { client: "site-1".into(), dxo: Dxo::new(DataKind::Weights, Map::new()) };
/// assert_eq!(First.aggregate(&[c.clone()]).unwrap(), c.dxo);
/// ```
pub trait Aggregator: Send + Sync {
    /// The aggregate of `contributions` (at least one). The DXO kind says what it is:
    /// `WEIGHTS` replace the global model, `WEIGHT_DIFF` are added to it.
    ///
    /// # Errors
    ///
    /// Any [`ServerError`]; the round then fails with it.
    fn aggregate(&self, contributions: &[Contribution]) -> Result<Dxo, ServerError>;
}

/// An aggregator as a job component (what config factories build and workflows look up by
/// id).
#[derive(Clone)]
pub struct SharedAggregator(pub Arc<dyn Aggregator>);

impl Component for SharedAggregator {}

impl std::fmt::Debug for SharedAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedAggregator")
    }
}

/// Weighted federated averaging (NVFlare's `InTimeAccumulateWeightedAggregator`).
///
/// For every array name, the mean over the contributions that carry it, each weighted by
/// `NUM_STEPS_CURRENT_ROUND` (when [`weigh_by_local_iter`](FedAvg::weigh_by_local_iter); 1 when
/// the meta is absent) times the client's entry in
/// [`aggregation_weights`](FedAvg::aggregation_weights) (1 when absent). Arrays must be
/// `float32` or `float64`, and one name must have one shape and one dtype across clients. The
/// sums are computed in `f64` and written back in the array's own dtype (NVFlare accumulates in
/// the array's dtype, so `float32` results may differ from NVFlare's in the last bit).
///
/// All contributions must have the same DXO kind (`expected_kind` when set); the result has
/// that kind and empty meta.
///
/// # Example
/// ```
/// use fedrun_core::{DataKind, Dxo, Map, NdArray, Value};
/// use fedrun_server::{Aggregator, Contribution, FedAvg};
///
/// let contribution = |client: &str, w: f32, steps: i64| {
///     let mut data = Map::new();
///     data.insert("w", NdArray::from_f32(&[1], &[w]).unwrap());
///     let mut dxo = Dxo::new(DataKind::Weights, data);
///     dxo.meta.insert("NUM_STEPS_CURRENT_ROUND", steps);
///     Contribution { client: client.into(), dxo }
/// };
/// let avg = FedAvg::default()
///     .aggregate(&[contribution("a", 1.0, 1), contribution("b", 4.0, 3)])
///     .unwrap();
/// let w = avg.data.get("w").and_then(Value::as_ndarray).unwrap();
/// assert_eq!(w.to_f32_vec().unwrap(), vec![3.25]);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct FedAvg {
    /// The kind every contribution must have (`None`: any, but all the same).
    pub expected_kind: Option<DataKind>,
    /// Per-client multipliers of the weight (absent clients: 1).
    pub aggregation_weights: HashMap<String, f64>,
    /// Weigh by `NUM_STEPS_CURRENT_ROUND` (true, NVFlare's default) or only by the
    /// aggregation weights.
    pub weigh_by_local_iter: bool,
}

impl Default for FedAvg {
    fn default() -> Self {
        FedAvg {
            expected_kind: None,
            aggregation_weights: HashMap::new(),
            weigh_by_local_iter: true,
        }
    }
}

impl FedAvg {
    /// A FedAvg that accepts only contributions of `kind`.
    pub fn expecting(kind: DataKind) -> Self {
        FedAvg {
            expected_kind: Some(kind),
            ..FedAvg::default()
        }
    }
}

/// A contribution's weight: `NUM_STEPS_CURRENT_ROUND` (1 when absent), which must be a finite
/// number ≥ 0.
pub(crate) fn local_steps(c: &Contribution) -> Result<f64, ServerError> {
    match c.dxo.meta.get(NUM_STEPS_CURRENT_ROUND) {
        None | Some(Value::Nil) => Ok(1.0),
        Some(v) => match v.as_f64() {
            Some(n) if n.is_finite() && n >= 0.0 => Ok(n),
            _ => Err(ServerError::Aggregation(format!(
                "{NUM_STEPS_CURRENT_ROUND} from {} is {v:?}, not a number >= 0",
                c.client
            ))),
        },
    }
}

/// Running sums of one array name.
struct Accumulator {
    first_client: String,
    array: FloatArray,
    total_weight: f64,
}

impl Aggregator for FedAvg {
    fn aggregate(&self, contributions: &[Contribution]) -> Result<Dxo, ServerError> {
        let Some(first) = contributions.first() else {
            return Err(ServerError::Aggregation(
                "no contribution to aggregate".to_owned(),
            ));
        };
        let kind = self
            .expected_kind
            .clone()
            .unwrap_or_else(|| first.dxo.kind.clone());
        let mut sums: BTreeMap<String, Accumulator> = BTreeMap::new();
        for c in contributions {
            if c.dxo.kind != kind {
                return Err(ServerError::Aggregation(format!(
                    "{} sent a {} DXO, expected {kind}",
                    c.client, c.dxo.kind
                )));
            }
            let steps = if self.weigh_by_local_iter {
                local_steps(c)?
            } else {
                1.0
            };
            let weight = steps
                * self
                    .aggregation_weights
                    .get(&c.client)
                    .copied()
                    .unwrap_or(1.0);
            for (key, value) in c.dxo.data.iter() {
                let Some(name) = key.as_str() else {
                    return Err(ServerError::Aggregation(format!(
                        "{} sent a data key that is a {}, not a string",
                        c.client,
                        key.kind()
                    )));
                };
                let Some(array) = value.as_ndarray() else {
                    return Err(ServerError::Aggregation(format!(
                        "'{name}' from {} is a {}, not a numpy array",
                        c.client,
                        value.kind()
                    )));
                };
                let mut read = FloatArray::read(name, array)?;
                match sums.get_mut(name) {
                    None => {
                        read.values.iter_mut().for_each(|v| *v *= weight);
                        sums.insert(
                            name.to_owned(),
                            Accumulator {
                                first_client: c.client.clone(),
                                array: read,
                                total_weight: weight,
                            },
                        );
                    }
                    Some(acc) => {
                        if read.shape != acc.array.shape {
                            return Err(ServerError::ShapeMismatch {
                                name: name.to_owned(),
                                client: c.client.clone(),
                                expected: acc.array.shape.clone(),
                                got: read.shape,
                            });
                        }
                        if read.dtype != acc.array.dtype {
                            return Err(ServerError::Aggregation(format!(
                                "'{name}' from {} is {}, but {} sent {}",
                                c.client,
                                read.dtype.name(),
                                acc.first_client,
                                acc.array.dtype.name()
                            )));
                        }
                        for (sum, v) in acc.array.values.iter_mut().zip(&read.values) {
                            *sum += v * weight;
                        }
                        acc.total_weight += weight;
                    }
                }
            }
        }
        let mut data = Map::with_capacity(sums.len());
        for (name, mut acc) in sums {
            if acc.total_weight <= 0.0 {
                return Err(ServerError::Aggregation(format!(
                    "the weights of '{name}' sum to {}: nothing to average",
                    acc.total_weight
                )));
            }
            let total = acc.total_weight;
            acc.array.values.iter_mut().for_each(|v| *v /= total);
            data.insert(name, acc.array.write()?);
        }
        Ok(Dxo::new(kind, data))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedrun_core::NdArray;

    fn contribution(
        client: &str,
        arrays: &[(&str, NdArray)],
        steps: Option<Value>,
    ) -> Contribution {
        let data: Map = arrays
            .iter()
            .map(|(k, v)| (Value::from(*k), Value::NdArray(v.clone())))
            .collect();
        let mut dxo = Dxo::new(DataKind::Weights, data);
        if let Some(s) = steps {
            dxo.meta.insert(NUM_STEPS_CURRENT_ROUND, s);
        }
        Contribution {
            client: client.into(),
            dxo,
        }
    }

    fn f32s(shape: &[usize], v: &[f32]) -> NdArray {
        NdArray::from_f32(shape, v).unwrap()
    }

    #[test]
    fn shapes_that_differ_are_a_shape_mismatch_naming_the_client() {
        let a = contribution("site-1", &[("w", f32s(&[2], &[1.0, 2.0]))], None);
        let b = contribution("site-2", &[("w", f32s(&[1, 2], &[1.0, 2.0]))], None);
        match FedAvg::default().aggregate(&[a, b]) {
            Err(ServerError::ShapeMismatch {
                name,
                client,
                expected,
                got,
            }) => {
                assert_eq!((name.as_str(), client.as_str()), ("w", "site-2"));
                assert_eq!((expected, got), (vec![2], vec![1, 2]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_array_is_averaged_over_the_clients_that_sent_it() {
        let a = contribution(
            "a",
            &[("w", f32s(&[1], &[2.0])), ("b", f32s(&[1], &[10.0]))],
            Some(Value::from(1)),
        );
        let b = contribution("b", &[("w", f32s(&[1], &[4.0]))], Some(Value::from(1)));
        let out = FedAvg::default().aggregate(&[a, b]).unwrap();
        let get = |k: &str| {
            out.data
                .get(k)
                .and_then(Value::as_ndarray)
                .unwrap()
                .to_f32_vec()
                .unwrap()
        };
        assert_eq!(get("w"), vec![3.0]);
        assert_eq!(get("b"), vec![10.0]);
    }

    #[test]
    fn f64_arrays_stay_f64_and_aggregation_weights_multiply() {
        let a = contribution(
            "a",
            &[("w", NdArray::from_f64(&[1], &[1.0]).unwrap())],
            None,
        );
        let b = contribution(
            "b",
            &[("w", NdArray::from_f64(&[1], &[2.0]).unwrap())],
            None,
        );
        let avg = FedAvg {
            aggregation_weights: [("b".to_owned(), 3.0)].into_iter().collect(),
            ..FedAvg::default()
        };
        let out = avg.aggregate(&[a, b]).unwrap();
        let w = out.data.get("w").and_then(Value::as_ndarray).unwrap();
        assert_eq!(w.to_f64_vec().unwrap(), vec![1.75]);
    }

    #[test]
    fn bad_weights_mixed_kinds_and_dtypes_are_errors() {
        let bad = contribution("a", &[("w", f32s(&[1], &[1.0]))], Some(Value::from("x")));
        assert!(FedAvg::default().aggregate(&[bad]).is_err());
        let zero = contribution("a", &[("w", f32s(&[1], &[1.0]))], Some(Value::from(0)));
        let err = FedAvg::default().aggregate(&[zero]).unwrap_err();
        assert!(err.to_string().contains("sum to 0"), "{err}");
        let mut diff = contribution("b", &[("w", f32s(&[1], &[1.0]))], None);
        diff.dxo.kind = DataKind::WeightDiff;
        let w = contribution("a", &[("w", f32s(&[1], &[1.0]))], None);
        assert!(FedAvg::default().aggregate(&[w.clone(), diff]).is_err());
        let f64s = contribution(
            "b",
            &[("w", NdArray::from_f64(&[1], &[1.0]).unwrap())],
            None,
        );
        let err = FedAvg::default().aggregate(&[w, f64s]).unwrap_err();
        assert!(err.to_string().contains("float64"), "{err}");
        assert!(FedAvg::default().aggregate(&[]).is_err());
    }
}
