//! Aggregation: turning the clients' results of one round into one update.
//!
//! [`Aggregator`] is the pluggable step of a training workflow; [`FedAvg`] is the built-in one,
//! NVFlare's `InTimeAccumulateWeightedAggregator`: a weighted mean of every array of the
//! clients' DXO `data`, weighted by the DXO meta `NUM_STEPS_CURRENT_ROUND` (1 when absent).
//! Aggregators are synchronous: the workflow runs them on the blocking pool, so a large model
//! does not stall the actors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::BytesMut;
use fedrun_core::ndarray::{npy_preamble, ByteOrder, DType};
use fedrun_core::{DataKind, Dxo, Map, NdArray, Value};
use fedrun_engine::Component;

use crate::error::ServerError;

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

    /// The FedAvg settings when this aggregator is a plain [`FedAvg`]: ScatterAndGather then
    /// averages streamed results incrementally, chunk by chunk (default: `None`).
    fn fed_avg(&self) -> Option<&FedAvg> {
        None
    }
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
/// `float32` or `float64`, and one name must have one shape and one dtype across clients.
///
/// Memory stays flat: every array name has ONE [`WeightedSum`] buffer in the array's own dtype,
/// which becomes the output array in place; contributions are read straight from their `.npy`
/// bytes, never converted into a `Vec`. Each step is computed in `f64` and rounded to the
/// array's dtype, as NVFlare accumulates in the array's dtype.
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

/// The running weighted sum of one array name: ONE buffer in the array's own dtype (`float32`
/// or `float64`, little-endian, C order), laid out as the output `.npy` file, so that
/// [`WeightedSum::finish`] divides in place and hands the buffer over as the result without a
/// copy. Contributions are added whole ([`WeightedSum::add_array`]) or in chunks of raw bytes
/// as they arrive from a stream ([`WeightedSum::add_bytes`]); both do the same arithmetic per
/// element (`sum = round(sum + weight * x)` in `f64`, rounded to the dtype), so chunked and whole
/// accumulation give bit-identical results.
///
/// # Example
/// ```
/// use fedrun_core::NdArray;
/// use fedrun_core::ndarray::ByteOrder;
/// use fedrun_server::WeightedSum;
///
/// let a = NdArray::from_f32(&[2], &[1.0, 2.0]).unwrap();
/// let b = NdArray::from_f32(&[2], &[4.0, 8.0]).unwrap();
/// let mut sum = WeightedSum::new("w", "site-1", a.dtype(), a.shape()).unwrap();
/// sum.add_array("site-1", &a, 1.0).unwrap();
/// // site-2's array arrives in two chunks of 4 bytes
/// let data = b.data();
/// sum.add_bytes(0, &data[..4], ByteOrder::Little, 3.0).unwrap();
/// sum.add_bytes(4, &data[4..], ByteOrder::Little, 3.0).unwrap();
/// sum.add_weight(3.0);
/// let mean = sum.finish().unwrap();
/// assert_eq!(mean.to_f32_vec().unwrap(), vec![3.25, 6.5]);
/// ```
#[derive(Debug)]
pub struct WeightedSum {
    name: String,
    first_client: String,
    dtype: DType,
    shape: Vec<usize>,
    data_offset: usize,
    buf: BytesMut,
    total_weight: f64,
}

impl WeightedSum {
    /// A zero sum for array `name` of `dtype` and `shape`, first sent by `client`.
    ///
    /// # Errors
    ///
    /// [`ServerError::Aggregation`] for a dtype other than `float32` / `float64`.
    pub fn new(
        name: &str,
        client: &str,
        dtype: &DType,
        shape: &[usize],
    ) -> Result<WeightedSum, ServerError> {
        let descr = match dtype {
            DType::F32 => "<f4",
            DType::F64 => "<f8",
            other => {
                return Err(ServerError::Aggregation(format!(
                    "array '{name}' holds {} elements; only float32 and float64 are supported",
                    other.name()
                )))
            }
        };
        let preamble = npy_preamble(descr, shape)?;
        let item = dtype.item_size().unwrap_or(8);
        let data_len = shape
            .iter()
            .try_fold(item, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| {
                ServerError::Aggregation(format!("array '{name}': shape {shape:?} overflows"))
            })?;
        // zeroed: the allocator hands out untouched zero pages, filled as sums arrive
        let mut buf = BytesMut::zeroed(preamble.len() + data_len);
        buf[..preamble.len()].copy_from_slice(&preamble);
        Ok(WeightedSum {
            name: name.to_owned(),
            first_client: client.to_owned(),
            dtype: dtype.clone(),
            shape: shape.to_vec(),
            data_offset: preamble.len(),
            buf,
            total_weight: 0.0,
        })
    }

    /// The array's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sum of the weights counted so far.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The number of data bytes (elements times item size).
    pub fn data_len(&self) -> usize {
        self.buf.len() - self.data_offset
    }

    /// Checks that `client`'s array has this sum's shape and dtype.
    ///
    /// # Errors
    ///
    /// [`ServerError::ShapeMismatch`] or [`ServerError::Aggregation`] naming both clients.
    pub fn check(&self, client: &str, dtype: &DType, shape: &[usize]) -> Result<(), ServerError> {
        if shape != self.shape.as_slice() {
            return Err(ServerError::ShapeMismatch {
                name: self.name.clone(),
                client: client.to_owned(),
                expected: self.shape.clone(),
                got: shape.to_vec(),
            });
        }
        if *dtype != self.dtype {
            return Err(ServerError::Aggregation(format!(
                "'{}' from {client} is {}, but {} sent {}",
                self.name,
                dtype.name(),
                self.first_client,
                self.dtype.name()
            )));
        }
        Ok(())
    }

    /// Adds `weight` times the elements whose raw bytes (C order, `order`) are `bytes`,
    /// starting at byte `offset` of the array's data. Does not count the weight: call
    /// [`WeightedSum::add_weight`] once per contribution.
    ///
    /// # Errors
    ///
    /// [`ServerError::Aggregation`] when the range is outside the array or not aligned to
    /// whole elements.
    pub fn add_bytes(
        &mut self,
        offset: usize,
        bytes: &[u8],
        order: ByteOrder,
        weight: f64,
    ) -> Result<(), ServerError> {
        let item = self.dtype.item_size().unwrap_or(8);
        let end = offset.checked_add(bytes.len());
        let Some(end) = end.filter(|e| *e <= self.data_len()) else {
            return Err(ServerError::Aggregation(format!(
                "'{}': {} bytes at offset {offset} do not fit its {} data bytes",
                self.name,
                bytes.len(),
                self.data_len()
            )));
        };
        if !offset.is_multiple_of(item) || !bytes.len().is_multiple_of(item) {
            return Err(ServerError::Aggregation(format!(
                "'{}': chunk at offset {offset} of {} bytes is not made of whole {}-byte elements",
                self.name,
                bytes.len(),
                item
            )));
        }
        let acc = &mut self.buf[self.data_offset + offset..self.data_offset + end];
        let big = order == ByteOrder::Big;
        match self.dtype {
            DType::F32 => accumulate::<4, f32>(
                acc,
                bytes,
                weight,
                if big {
                    f32::from_be_bytes
                } else {
                    f32::from_le_bytes
                },
                f32::from_le_bytes,
                |v| (v as f32).to_le_bytes(),
                f64::from,
            ),
            _ => accumulate::<8, f64>(
                acc,
                bytes,
                weight,
                if big {
                    f64::from_be_bytes
                } else {
                    f64::from_le_bytes
                },
                f64::from_le_bytes,
                f64::to_le_bytes,
                |v| v,
            ),
        }
        Ok(())
    }

    /// Counts one contribution's weight (once, whatever the number of chunks).
    pub fn add_weight(&mut self, weight: f64) {
        self.total_weight += weight;
    }

    /// Adds `client`'s whole `array` with `weight` and counts the weight.
    ///
    /// # Errors
    ///
    /// As [`WeightedSum::check`].
    pub fn add_array(
        &mut self,
        client: &str,
        array: &NdArray,
        weight: f64,
    ) -> Result<(), ServerError> {
        self.check(client, array.dtype(), array.shape())?;
        // Fortran order is rare: reorder a copy of that one array first
        let array = array.to_c_order()?;
        let data = array.data();
        self.add_bytes(0, &data, array.byte_order(), weight)?;
        self.add_weight(weight);
        Ok(())
    }

    /// The weighted mean, written in place into the sum's buffer, which becomes the result.
    ///
    /// # Errors
    ///
    /// [`ServerError::Aggregation`] when the weights sum to 0 or less.
    pub fn finish(mut self) -> Result<NdArray, ServerError> {
        let total = self.total_weight;
        if total <= 0.0 || !total.is_finite() {
            return Err(ServerError::Aggregation(format!(
                "the weights of '{}' sum to {total}: nothing to average",
                self.name
            )));
        }
        let acc = &mut self.buf[self.data_offset..];
        match self.dtype {
            DType::F32 => scale::<4, f32>(
                acc,
                total,
                f32::from_le_bytes,
                |v| (v as f32).to_le_bytes(),
                f64::from,
            ),
            _ => scale::<8, f64>(acc, total, f64::from_le_bytes, f64::to_le_bytes, |v| v),
        }
        Ok(NdArray::from_npy(self.buf.freeze())?)
    }

    /// The plain sum (no division by the weights), as an array.
    ///
    /// # Errors
    ///
    /// [`ServerError::InvalidModel`] should the buffer not parse (it always does).
    pub fn into_sum(self) -> Result<NdArray, ServerError> {
        Ok(NdArray::from_npy(self.buf.freeze())?)
    }
}

/// `acc[i] = round(acc[i] + weight * x[i])` over little-endian accumulator bytes and raw input
/// bytes (a tight loop over fixed-size chunks).
fn accumulate<const N: usize, T: Copy>(
    acc: &mut [u8],
    input: &[u8],
    weight: f64,
    read_in: fn([u8; N]) -> T,
    read_acc: fn([u8; N]) -> T,
    write: fn(f64) -> [u8; N],
    widen: fn(T) -> f64,
) {
    for (a, x) in acc.chunks_exact_mut(N).zip(input.chunks_exact(N)) {
        let mut xb = [0u8; N];
        xb.copy_from_slice(x);
        let mut ab = [0u8; N];
        ab.copy_from_slice(a);
        let v = widen(read_acc(ab)) + weight * widen(read_in(xb));
        a.copy_from_slice(&write(v));
    }
}

/// `acc[i] = round(acc[i] / total)` in place.
fn scale<const N: usize, T: Copy>(
    acc: &mut [u8],
    total: f64,
    read: fn([u8; N]) -> T,
    write: fn(f64) -> [u8; N],
    widen: fn(T) -> f64,
) {
    for a in acc.chunks_exact_mut(N) {
        let mut ab = [0u8; N];
        ab.copy_from_slice(a);
        a.copy_from_slice(&write(widen(read(ab)) / total));
    }
}

/// A contribution's aggregation weight under `avg`'s settings, given its local steps.
pub(crate) fn contribution_weight(avg: &FedAvg, client: &str, steps: f64) -> f64 {
    let steps = if avg.weigh_by_local_iter { steps } else { 1.0 };
    steps * avg.aggregation_weights.get(client).copied().unwrap_or(1.0)
}

impl Aggregator for FedAvg {
    fn fed_avg(&self) -> Option<&FedAvg> {
        Some(self)
    }

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
        let mut sums: BTreeMap<String, WeightedSum> = BTreeMap::new();
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
            let weight = contribution_weight(self, &c.client, steps);
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
                let sum =
                    match sums.entry(name.to_owned()) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => e.insert(
                            WeightedSum::new(name, &c.client, array.dtype(), array.shape())?,
                        ),
                    };
                sum.add_array(&c.client, array, weight)?;
            }
        }
        let mut data = Map::with_capacity(sums.len());
        for (name, sum) in sums {
            data.insert(name, sum.finish()?);
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

    #[test]
    fn chunked_accumulation_equals_whole_array_fedavg_exactly() {
        // awkward values so that every rounding step matters
        let n = 1000;
        let a: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.37).sin() * 1e3 + 0.1)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 1.7).cos() / 3.0 - 7.3).collect();
        let (wa, wb) = (3.0, 7.0);
        let whole = FedAvg::default()
            .aggregate(&[
                contribution("a", &[("w", f32s(&[n], &a))], Some(Value::from(3))),
                contribution("b", &[("w", f32s(&[n], &b))], Some(Value::from(7))),
            ])
            .unwrap();
        let mut sum = WeightedSum::new("w", "a", &DType::F32, &[n]).unwrap();
        for (values, w) in [(&a, wa), (&b, wb)] {
            let arr = f32s(&[n], values);
            let data = arr.data();
            // uneven chunk sizes, in order
            let mut at = 0;
            for size in [4usize, 396, 1200, 2400] {
                let end = (at + size).min(data.len());
                sum.add_bytes(at, &data[at..end], ByteOrder::Little, w)
                    .unwrap();
                at = end;
            }
            assert_eq!(at, data.len());
            sum.add_weight(w);
        }
        let chunked = sum.finish().unwrap();
        assert_eq!(
            &chunked,
            whole.data.get("w").and_then(Value::as_ndarray).unwrap()
        );
    }

    #[test]
    fn misaligned_or_out_of_range_chunks_are_errors() {
        let mut sum = WeightedSum::new("w", "a", &DType::F32, &[2]).unwrap();
        assert!(sum.add_bytes(2, &[0; 4], ByteOrder::Little, 1.0).is_err());
        assert!(sum.add_bytes(4, &[0; 8], ByteOrder::Little, 1.0).is_err());
        assert!(sum.add_bytes(0, &[0; 3], ByteOrder::Little, 1.0).is_err());
        assert!(WeightedSum::new("w", "a", &DType::I64, &[2]).is_err());
    }

    #[test]
    fn fortran_and_big_endian_contributions_are_read_in_c_order() {
        // numpy: np.asfortranarray(np.arange(6, dtype='>f8').reshape(2, 3))
        let c = NdArray::from_f64(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let header = c.npy()[..c.data_offset()].to_vec();
        let text = String::from_utf8(header[10..].to_vec()).unwrap();
        let text = text
            .replace("'fortran_order': False", "'fortran_order': True ")
            .replace("<f8", ">f8");
        let mut npy = header[..10].to_vec();
        npy.extend_from_slice(text.as_bytes());
        for v in [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0] {
            npy.extend_from_slice(&v.to_be_bytes());
        }
        let f = NdArray::from_npy(bytes::Bytes::from(npy)).unwrap();
        assert!(f.fortran_order());
        let out = FedAvg::default()
            .aggregate(&[contribution("a", &[("w", f)], None)])
            .unwrap();
        assert_eq!(out.data.get("w").and_then(Value::as_ndarray).unwrap(), &c);
    }

    #[test]
    fn integer_arrays_are_refused_with_their_dtype() {
        let a = contribution(
            "a",
            &[("steps", NdArray::from_i64(&[1], &[1]).unwrap())],
            None,
        );
        let err = FedAvg::default().aggregate(&[a]).unwrap_err().to_string();
        assert!(err.contains("'steps'") && err.contains("int64"), "{err}");
    }
}
