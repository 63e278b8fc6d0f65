//! `NPValidator`: NVFlare's numpy "validation" executor, task for task.
//!
//! A `validate` task, in NVFlare's order of checks:
//!
//! 1. the task is not a DXO, or its DXO has no data or is not `WEIGHTS`, or has no `numpy_key`
//!    → `BAD_TASK_DATA`;
//! 2. the abort signal fired → `TASK_ABORTED`;
//! 3. the score: `sum(a / max(a)) + random()` with `random()` uniform in `[0, 1)` (NVFlare's
//!    dummy metric; its `epsilon` argument is accepted and, as in NVFlare, unused); what numpy
//!    refuses (an empty array, a string) → `EXECUTION_EXCEPTION`;
//! 4. the reply: a `METRICS` DXO `{"accuracy": score}` with no meta, the score a
//!    `numpy.float32` for a `float32` model and a `numpy.float64` otherwise, tagged as NVFlare's
//!    FOBS sends numpy scalars.
//!
//! `submit_model` replies `OK` with nothing (the validator has no local model; NVFlare's
//! cross-site workflow skips the site). Other tasks are `TASK_UNKNOWN`. Every task first sleeps
//! `sleep_time` unless aborted (`TASK_ABORTED`).

use fedrun_cell::AbortSignal;
use fedrun_core::{AppReturnCode, DataKind, Dxo, FlContext, Map, Shareable, Tagged, Value};
use futures::future::BoxFuture;
use serde_json::Value as Json;

use super::ops::{normalized_sum, FloatWidth};
use super::{
    log_prefix, reply, sleep_unless_aborted, ArgReader, NpError, MODEL_OWNER, NUMPY_KEY,
    TASK_SUBMIT_MODEL, TASK_VALIDATION,
};
use crate::component::Component;
use crate::executor::Executor;

/// The metric key of the validator's result.
pub const ACCURACY: &str = "accuracy";
/// FOBS's decomposer of `numpy.float32` scalars.
pub const FLOAT32_SCALAR_DECOMPOSER: &str =
    "nvflare.app_common.decomposers.numpy_decomposers.Float32ScalarDecomposer";
/// FOBS's decomposer of `numpy.float64` scalars.
pub const FLOAT64_SCALAR_DECOMPOSER: &str =
    "nvflare.app_common.decomposers.numpy_decomposers.Float64ScalarDecomposer";

/// The arguments of `NPValidator`, with NVFlare's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct NpValidatorArgs {
    /// `epsilon` (default `1`): accepted and unused, as in NVFlare.
    pub epsilon: Json,
    /// Seconds every task sleeps first (`sleep_time`, default `0`).
    pub sleep_time: f64,
}

impl Default for NpValidatorArgs {
    fn default() -> Self {
        Self {
            epsilon: Json::from(1),
            sleep_time: 0.0,
        }
    }
}

impl NpValidatorArgs {
    /// Reads a config's `args`; arguments NVFlare's class does not take are refused.
    ///
    /// # Example
    /// ```
    /// use fedrun_engine::np::NpValidatorArgs;
    ///
    /// let args = serde_json::json!({"sleep_time": 1.5});
    /// assert_eq!(NpValidatorArgs::from_json(args.as_object().unwrap()).unwrap().sleep_time, 1.5);
    /// let bad = serde_json::json!({"delta": 1});
    /// assert!(NpValidatorArgs::from_json(bad.as_object().unwrap()).is_err());
    /// ```
    pub fn from_json(args: &serde_json::Map<String, Json>) -> Result<Self, NpError> {
        let mut r = ArgReader::new("NPValidator", args);
        let epsilon = r.raw("epsilon").cloned().unwrap_or_else(|| Json::from(1));
        let sleep_time = r.seconds("sleep_time")?;
        r.finish()?;
        Ok(Self {
            epsilon,
            sleep_time,
        })
    }
}

/// NVFlare's `NPValidator` (see the module doc).
///
/// # Example
/// ```
/// use fedrun_cell::AbortSignal;
/// use fedrun_core::{DataKind, Dxo, FlContext, Map, NdArray};
/// use fedrun_engine::np::{NpValidator, NpValidatorArgs, NUMPY_KEY};
/// use fedrun_engine::Executor;
///
/// let v = NpValidator::new(NpValidatorArgs::default());
/// let mut data = Map::new();
/// data.insert(NUMPY_KEY, NdArray::from_f64(&[2], &[1.0, 2.0]).unwrap());
/// let task = Dxo::new(DataKind::Weights, data).to_shareable();
/// let ctx = FlContext::new();
/// let out = futures::executor::block_on(v.execute("validate", task, &ctx, AbortSignal::new()))
///     .unwrap();
/// let dxo = Dxo::from_shareable(&out).unwrap();
/// assert_eq!(dxo.kind, DataKind::Metrics);
/// let score = dxo.data.get("accuracy").and_then(|v| v.as_tagged()).unwrap();
/// let score = score.data.as_f64().unwrap();
/// assert!((1.5..2.5).contains(&score)); // 0.5 + 1.0 + random in [0, 1)
/// ```
#[derive(Clone, Debug)]
pub struct NpValidator {
    args: NpValidatorArgs,
}

impl Component for NpValidator {}

impl NpValidator {
    /// A validator with these arguments.
    pub fn new(args: NpValidatorArgs) -> Self {
        Self { args }
    }

    fn validate(&self, task: &Shareable, ctx: &FlContext, abort: &AbortSignal) -> Shareable {
        let prefix = log_prefix(ctx);
        let dxo = match Dxo::from_shareable(task) {
            Ok(d) => d,
            Err(e) => {
                log::error!("{prefix} NPValidator: unable to extract the model DXO: {e}");
                return reply(AppReturnCode::BadTaskData);
            }
        };
        if dxo.data.is_empty() || dxo.kind != DataKind::Weights {
            log::error!(
                "{prefix} NPValidator: model DXO has no data or is not WEIGHTS ({}); unable to \
                 validate",
                dxo.kind
            );
            return reply(AppReturnCode::BadTaskData);
        }
        let Some(model) = dxo.data.get(NUMPY_KEY) else {
            log::error!("{prefix} NPValidator: {NUMPY_KEY} not in model; unable to validate");
            return reply(AppReturnCode::BadTaskData);
        };
        let owner = task
            .header_or_none(MODEL_OWNER)
            .and_then(Value::as_str)
            .unwrap_or("?");
        log::info!("{prefix} NPValidator: validating model from {owner}");
        if abort.is_triggered() {
            return reply(AppReturnCode::TaskAborted);
        }
        let (sum, width) = match score_base(model) {
            Ok(s) => s,
            Err(e) => {
                log::error!("{prefix} NPValidator: exception in execute: {e}");
                return reply(AppReturnCode::ExecutionException);
            }
        };
        let epsilon = random_unit();
        let accuracy = match width {
            // numpy.float32 + Python float stays float32 (NEP 50)
            FloatWidth::F32 => numpy_scalar(f64::from(sum as f32 + epsilon as f32), width),
            FloatWidth::F64 => numpy_scalar(sum + epsilon, width),
        };
        if abort.is_triggered() {
            return reply(AppReturnCode::TaskAborted);
        }
        log::info!("{prefix} NPValidator: random epsilon {epsilon}; accuracy {accuracy:?}");
        let mut data = Map::with_capacity(1);
        data.insert(ACCURACY, accuracy);
        Dxo::new(DataKind::Metrics, data).to_shareable()
    }
}

impl Executor for NpValidator {
    fn execute<'a>(
        &'a self,
        task_name: &'a str,
        task: Shareable,
        ctx: &'a FlContext,
        abort: AbortSignal,
    ) -> BoxFuture<'a, Result<Shareable, String>> {
        Box::pin(async move {
            if !sleep_unless_aborted(self.args.sleep_time, &abort).await {
                return Ok(reply(AppReturnCode::TaskAborted));
            }
            Ok(if task_name == TASK_VALIDATION {
                self.validate(&task, ctx, &abort)
            } else if task_name == TASK_SUBMIT_MODEL {
                log::info!(
                    "{} NPValidator: submit_model: no local model, returning OK",
                    log_prefix(ctx)
                );
                reply(AppReturnCode::Ok)
            } else {
                reply(AppReturnCode::TaskUnknown)
            })
        })
    }
}

/// `sum(a / max(a))` of what `numpy_key` holds: an array, or a Python number (numpy makes it a
/// 0-d array: the result is `1.0`, or NaN for `0`).
fn score_base(model: &Value) -> Result<(f64, FloatWidth), String> {
    match model {
        Value::NdArray(a) => normalized_sum(a),
        Value::Int(_) | Value::F64(_) | Value::F32(_) | Value::Bool(_) => {
            let v = match model {
                Value::Bool(b) => f64::from(u8::from(*b)),
                other => other.as_f64().ok_or_else(|| "not a number".to_owned())?,
            };
            // numpy's max of a 0-d array is the value itself
            let max = v;
            Ok((v / max, FloatWidth::F64))
        }
        other => Err(format!(
            "unsupported operand type for /: '{}'",
            other.kind()
        )),
    }
}

/// A numpy scalar as NVFlare's FOBS sends it: tagged with its numpy type, the value a float.
fn numpy_scalar(value: f64, width: FloatWidth) -> Value {
    let (type_name, decomposer) = match width {
        FloatWidth::F32 => ("numpy.float32", FLOAT32_SCALAR_DECOMPOSER),
        FloatWidth::F64 => ("numpy.float64", FLOAT64_SCALAR_DECOMPOSER),
    };
    Value::from(Tagged {
        type_name: type_name.to_owned(),
        decomposer: decomposer.to_owned(),
        data: Value::F64(value),
    })
}

/// A uniform random number in `[0, 1)` (53 random bits of a v4 UUID, from the OS's generator).
fn random_unit() -> f64 {
    const BITS: u32 = 53;
    let bits = (uuid::Uuid::new_v4().as_u128() as u64) & ((1u64 << BITS) - 1);
    bits as f64 / (1u64 << BITS) as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use fedrun_core::{NdArray, ReturnCode};

    fn run(v: &NpValidator, name: &str, task: Shareable) -> Shareable {
        let ctx = FlContext::new();
        futures::executor::block_on(v.execute(name, task, &ctx, AbortSignal::new())).unwrap()
    }

    fn model(value: impl Into<Value>) -> Shareable {
        let mut data = Map::new();
        data.insert(NUMPY_KEY, value);
        Dxo::new(DataKind::Weights, data).to_shareable()
    }

    #[test]
    fn validate_scores_sum_over_max_plus_a_unit_random_as_numpy_float() {
        let v = NpValidator::new(NpValidatorArgs::default());
        let init: Vec<f32> = (1u8..=9).map(f32::from).collect();
        let out = run(
            &v,
            "validate",
            model(NdArray::from_f32(&[3, 3], &init).unwrap()),
        );
        let dxo = Dxo::from_shareable(&out).unwrap();
        assert_eq!(dxo.kind, DataKind::Metrics);
        assert!(dxo.meta.is_empty());
        assert_eq!(dxo.data.len(), 1);
        let acc = dxo.data.get(ACCURACY).and_then(Value::as_tagged).unwrap();
        assert_eq!(acc.type_name, "numpy.float32");
        assert_eq!(acc.decomposer, FLOAT32_SCALAR_DECOMPOSER);
        let score = acc.data.as_f64().unwrap();
        // sum(1..9)/9 = 5, plus [0, 1)
        assert!((5.0..6.0).contains(&score), "{score}");
        let ints = run(
            &v,
            "validate",
            model(NdArray::from_i64(&[2], &[2, 4]).unwrap()),
        );
        let dxo = Dxo::from_shareable(&ints).unwrap();
        let acc = dxo.data.get(ACCURACY).and_then(Value::as_tagged).unwrap();
        assert_eq!(acc.type_name, "numpy.float64");
        assert!((1.5..2.5).contains(&acc.data.as_f64().unwrap()));
    }

    #[test]
    fn bad_models_get_nvflares_return_codes() {
        let v = NpValidator::new(NpValidatorArgs::default());
        let bad = ReturnCode::App(AppReturnCode::BadTaskData);
        assert_eq!(run(&v, "validate", Shareable::new()).return_code(), bad);
        let empty = Dxo::new(DataKind::Weights, Map::new()).to_shareable();
        assert_eq!(run(&v, "validate", empty).return_code(), bad);
        let mut data = Map::new();
        data.insert(NUMPY_KEY, NdArray::from_f32(&[1], &[1.0]).unwrap());
        let diff = Dxo::new(DataKind::WeightDiff, data).to_shareable();
        assert_eq!(run(&v, "validate", diff).return_code(), bad);
        let mut data = Map::new();
        data.insert("w", 1);
        let no_key = Dxo::new(DataKind::Weights, data).to_shareable();
        assert_eq!(run(&v, "validate", no_key).return_code(), bad);
        let empty_array = model(NdArray::from_f32(&[0], &[]).unwrap());
        assert_eq!(
            run(&v, "validate", empty_array).return_code(),
            ReturnCode::App(AppReturnCode::ExecutionException)
        );
    }

    #[test]
    fn submit_model_is_ok_and_other_tasks_are_unknown() {
        let v = NpValidator::new(NpValidatorArgs::default());
        let ok = run(&v, "submit_model", Shareable::new());
        assert_eq!(ok.return_code(), ReturnCode::App(AppReturnCode::Ok));
        assert!(Dxo::from_shareable(&ok).is_err(), "no model in the reply");
        assert_eq!(
            run(&v, "train", model(1.0)).return_code(),
            ReturnCode::App(AppReturnCode::TaskUnknown)
        );
    }

    #[test]
    fn random_epsilon_is_in_the_unit_interval_and_varies() {
        let draws: Vec<f64> = (0..64).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }

    #[actix::test]
    async fn an_abort_during_sleep_returns_task_aborted_promptly() {
        let v = NpValidator::new(NpValidatorArgs {
            sleep_time: 60.0,
            ..NpValidatorArgs::default()
        });
        let abort = AbortSignal::new();
        let ctx = FlContext::new();
        let trigger = abort.clone();
        actix::spawn(async move { trigger.trigger() });
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            v.execute("validate", model(1.0), &ctx, abort),
        )
        .await
        .expect("the validator returned well before its 60 s sleep")
        .unwrap();
        assert_eq!(
            out.return_code(),
            ReturnCode::App(AppReturnCode::TaskAborted)
        );
    }
}
