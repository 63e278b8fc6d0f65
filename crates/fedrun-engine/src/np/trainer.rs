//! `NPTrainer`: NVFlare's numpy "training" executor (model + delta), task for task.
//!
//! What a `train` task gets back, in NVFlare's order of checks:
//!
//! 1. the task is not a DXO → `BAD_TASK_DATA`; the DXO is not `WEIGHTS` → `BAD_TASK_DATA`;
//! 2. the abort signal fired → `TASK_ABORTED`;
//! 3. the DXO has no data, or no `numpy_key` → `BAD_TASK_DATA`;
//! 4. `numpy_key += delta` with numpy's rules ([`super::ops`]); what numpy refuses (e.g. a float
//!    delta on an int array) → `EXECUTION_EXCEPTION`;
//! 5. the new `numpy_key` is saved as the local model at `<run_dir>/<model_dir>/<model_name>`
//!    (a failure is only logged, as NVFlare does);
//! 6. the reply: a DXO of the received kind with the received data (other keys untouched) and
//!    meta `NUM_STEPS_CURRENT_ROUND = 1`.
//!
//! `submit_model` reads that file back as a `WEIGHTS` DXO `{numpy_key: array}` (no meta), or
//! replies `EXECUTION_RESULT_ERROR` when it cannot. Any other task is `TASK_UNKNOWN`. Every task
//! first sleeps `sleep_time` (rounded up to half seconds) unless aborted (`TASK_ABORTED`).
//!
//! Not reproduced: NVFlare's trainer also calls `system_panic` on a non-DXO or non-`WEIGHTS`
//! task, which makes NVFlare's client runner abort the whole run; fedrun replies
//! `BAD_TASK_DATA` and the run goes on.

use std::path::PathBuf;

use fedrun_cell::AbortSignal;
use fedrun_core::{AppReturnCode, DataKind, Dxo, FlContext, Map, NdArray, Shareable, Value};
use futures::future::BoxFuture;
use serde_json::Value as Json;

use super::ops::{add_delta_owned, Delta};
use super::{
    blocking, load_npy, log_prefix, reply, resolve_under_root, save_npy, sleep_unless_aborted,
    ArgReader, NpError, CURRENT_ROUND, NUMPY_KEY, NUM_ROUNDS, NUM_STEPS_CURRENT_ROUND,
    TASK_SUBMIT_MODEL, TASK_TRAIN,
};
use crate::component::Component;
use crate::executor::Executor;

/// The arguments of `NPTrainer`, with NVFlare's defaults.
///
/// # Example
/// ```
/// use fedrun_engine::np::{Delta, NpTrainerArgs};
///
/// let args = NpTrainerArgs::from_json(
///     serde_json::json!({"delta": 0.5, "model_dir": "m"}).as_object().unwrap(),
/// ).unwrap();
/// assert_eq!(args.delta, Delta::Float(0.5));
/// assert_eq!((args.model_dir.as_str(), args.model_name.as_str()), ("m", "best_numpy.npy"));
/// assert_eq!(NpTrainerArgs::default().train_task_name, "train");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct NpTrainerArgs {
    /// Added to the model (`delta`, default `1`); a Python `int`, `float` or `bool`.
    pub delta: Delta,
    /// Seconds every task sleeps first (`sleep_time`, default `0`).
    pub sleep_time: f64,
    /// The training task's name (`train_task_name`, default `train`).
    pub train_task_name: String,
    /// The submit-model task's name (`submit_model_task_name`, default `submit_model`).
    pub submit_model_task_name: String,
    /// The local model's file name (`model_name`, default `best_numpy.npy`).
    pub model_name: String,
    /// The local model's directory under the run directory (`model_dir`, default `model`).
    pub model_dir: String,
}

impl Default for NpTrainerArgs {
    fn default() -> Self {
        Self {
            delta: Delta::Int(1),
            sleep_time: 0.0,
            train_task_name: TASK_TRAIN.to_owned(),
            submit_model_task_name: TASK_SUBMIT_MODEL.to_owned(),
            model_name: "best_numpy.npy".to_owned(),
            model_dir: "model".to_owned(),
        }
    }
}

impl NpTrainerArgs {
    /// Reads a config's `args`. A `delta` that is not a number (or bool) is refused as NVFlare's
    /// constructor refuses it; so are arguments NVFlare's class does not take.
    pub fn from_json(args: &serde_json::Map<String, Json>) -> Result<Self, NpError> {
        let mut r = ArgReader::new("NPTrainer", args);
        let defaults = Self::default();
        let delta = match r.raw("delta") {
            None => defaults.delta,
            Some(Json::Bool(b)) => Delta::Bool(*b),
            Some(Json::Number(n)) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Delta::Int(i128::from(i)),
                (None, Some(u), _) => Delta::Int(i128::from(u)),
                (None, None, Some(f)) => Delta::Float(f),
                _ => return Err(r.bad(format!("delta {n} is not representable"))),
            },
            Some(other) => {
                return Err(r.bad(format!(
                    "delta must be an instance of float or int, got {other}"
                )))
            }
        };
        let args = Self {
            delta,
            sleep_time: r.seconds("sleep_time")?,
            train_task_name: r.string("train_task_name", &defaults.train_task_name)?,
            submit_model_task_name: r
                .string("submit_model_task_name", &defaults.submit_model_task_name)?,
            model_name: r.string("model_name", &defaults.model_name)?,
            model_dir: r.string("model_dir", &defaults.model_dir)?,
        };
        r.finish()?;
        Ok(args)
    }
}

/// NVFlare's `NPTrainer` (see the module doc).
///
/// # Example
/// ```
/// use fedrun_cell::AbortSignal;
/// use fedrun_core::{DataKind, Dxo, FlContext, Map, NdArray};
/// use fedrun_engine::np::{NpTrainer, NpTrainerArgs, NUMPY_KEY};
/// use fedrun_engine::Executor;
///
/// let run_dir = std::env::temp_dir().join(format!("np-doc-{}", std::process::id()));
/// let trainer = NpTrainer::new(NpTrainerArgs::default(), &run_dir);
/// let mut data = Map::new();
/// data.insert(NUMPY_KEY, NdArray::from_f32(&[2], &[1.0, 2.0]).unwrap());
/// let task = Dxo::new(DataKind::Weights, data).to_shareable();
/// let ctx = FlContext::new();
/// let out = futures::executor::block_on(trainer.execute("train", task, &ctx, AbortSignal::new()))
///     .unwrap();
/// let dxo = Dxo::from_shareable(&out).unwrap();
/// let array = dxo.data.get(NUMPY_KEY).and_then(|v| v.as_ndarray()).unwrap();
/// assert_eq!(array.to_f32_vec().unwrap(), vec![2.0, 3.0]);
/// assert_eq!(dxo.meta.get("NUM_STEPS_CURRENT_ROUND").and_then(|v| v.as_i64()), Some(1));
/// # std::fs::remove_dir_all(&run_dir).ok();
/// ```
#[derive(Clone, Debug)]
pub struct NpTrainer {
    args: NpTrainerArgs,
    run_dir: PathBuf,
}

impl Component for NpTrainer {}

impl NpTrainer {
    /// A trainer keeping its local model under `run_dir` (the job's run directory).
    pub fn new(args: NpTrainerArgs, run_dir: impl Into<PathBuf>) -> Self {
        Self {
            args,
            run_dir: run_dir.into(),
        }
    }

    /// The arguments.
    pub fn args(&self) -> &NpTrainerArgs {
        &self.args
    }

    /// Where the local model is saved and read: `<run_dir>/<model_dir>/<model_name>`.
    pub fn model_path(&self) -> Result<PathBuf, NpError> {
        let relative = format!("{}/{}", self.args.model_dir, self.args.model_name);
        resolve_under_root(&self.run_dir, &relative)
    }

    async fn train(&self, task: Shareable, ctx: &FlContext, abort: &AbortSignal) -> Shareable {
        let prefix = log_prefix(ctx);
        let dxo = match Dxo::from_shareable(&task) {
            Ok(d) => d,
            Err(e) => {
                log::error!("{prefix} NPTrainer: unable to convert shareable to a DXO: {e}");
                return reply(AppReturnCode::BadTaskData);
            }
        };
        if dxo.kind != DataKind::Weights {
            log::error!(
                "{prefix} NPTrainer: model DXO should be of kind WEIGHTS, got {}",
                dxo.kind
            );
            return reply(AppReturnCode::BadTaskData);
        }
        let round = task.header_or_none(CURRENT_ROUND).cloned();
        let rounds = task.header_or_none(NUM_ROUNDS).cloned();
        log::info!(
            "{prefix} NPTrainer: model received for round {round:?}/{rounds:?}: {}",
            summary(&dxo.data)
        );
        if abort.is_triggered() {
            return reply(AppReturnCode::TaskAborted);
        }
        if dxo.data.is_empty() {
            log::error!("{prefix} NPTrainer: no model weights found in the task");
            return reply(AppReturnCode::BadTaskData);
        }
        // The DXO's data map holds the only other handle on the model: with the task gone and
        // the value taken out of the map, a downloaded model's buffer is ours alone and the delta
        // is added in place (no second copy of a big model).
        drop(task);
        let mut dxo = dxo;
        let Some(slot) = dxo.data.get_mut(NUMPY_KEY) else {
            log::error!("{prefix} NPTrainer: {NUMPY_KEY} not found in the model");
            return reply(AppReturnCode::BadTaskData);
        };
        let weights = std::mem::take(slot);
        let trained = match add_to_value(weights, self.args.delta) {
            Ok(v) => v,
            Err(e) => {
                log::error!("{prefix} NPTrainer: exception in execute: {e}");
                return reply(AppReturnCode::ExecutionException);
            }
        };
        if abort.is_triggered() {
            return reply(AppReturnCode::TaskAborted);
        }
        self.save_local_model(&trained, &prefix).await;
        if abort.is_triggered() {
            return reply(AppReturnCode::TaskAborted);
        }
        let mut data = dxo.data;
        if let Some(slot) = data.get_mut(NUMPY_KEY) {
            *slot = trained;
        }
        log::info!(
            "{prefix} NPTrainer: added delta {:?} to {NUMPY_KEY}; {}",
            self.args.delta,
            summary(&data)
        );
        let mut out = Dxo::new(dxo.kind, data);
        out.meta.insert(NUM_STEPS_CURRENT_ROUND, 1);
        out.to_shareable()
    }

    /// Saves `numpy_key` as NVFlare does (`numpy.save`); failures are logged only.
    async fn save_local_model(&self, weights: &Value, prefix: &str) {
        let array = match as_array(weights) {
            Ok(a) => a,
            Err(e) => {
                log::error!("{prefix} NPTrainer: exception in saving local model: {e}");
                return;
            }
        };
        let path = match self.model_path() {
            Ok(p) => p,
            Err(e) => {
                log::error!("{prefix} NPTrainer: exception in saving local model: {e}");
                return;
            }
        };
        let target = path.clone();
        match blocking(move || save_npy(&target, &array)).await {
            Ok(Ok(())) => log::info!(
                "{prefix} NPTrainer: saved numpy model to {}",
                path.display()
            ),
            Ok(Err(e)) => log::error!(
                "{prefix} NPTrainer: exception in saving local model to {}: {e}",
                path.display()
            ),
            Err(e) => log::error!("{prefix} NPTrainer: exception in saving local model: {e}"),
        }
    }

    async fn submit_model(&self, ctx: &FlContext, abort: &AbortSignal) -> Shareable {
        let prefix = log_prefix(ctx);
        let loaded = match self.model_path() {
            Err(e) => Err(e.to_string()),
            Ok(path) => blocking(move || load_npy(&path)).await.and_then(|r| r),
        };
        let array = match loaded {
            Ok(a) => Some(a),
            Err(e) => {
                log::error!("{prefix} NPTrainer: unable to load local model: {e}");
                None
            }
        };
        if abort.is_triggered() {
            return reply(AppReturnCode::TaskAborted);
        }
        match array {
            Some(array) => {
                let mut data = Map::with_capacity(1);
                data.insert(NUMPY_KEY, array);
                Dxo::new(DataKind::Weights, data).to_shareable()
            }
            None => {
                log::error!("{prefix} NPTrainer: local model not found");
                let mut out = Shareable::new();
                out.set_return_code(AppReturnCode::ExecutionResultError);
                out
            }
        }
    }
}

impl Executor for NpTrainer {
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
            log::info!("{} NPTrainer: task name: {task_name}", log_prefix(ctx));
            Ok(if task_name == self.args.train_task_name {
                self.train(task, ctx, &abort).await
            } else if task_name == self.args.submit_model_task_name {
                self.submit_model(ctx, &abort).await
            } else {
                reply(AppReturnCode::TaskUnknown)
            })
        })
    }
}

/// `value += delta` for what NVFlare can find under `numpy_key`: an ndarray (numpy's rules) or
/// a Python number (Python's rules: int + int stays int, anything with a float is a float).
/// An array is given away so that its elements can change in place ([`add_delta_owned`]).
fn add_to_value(value: Value, delta: Delta) -> Result<Value, String> {
    let value = match value {
        Value::NdArray(a) => return add_delta_owned(a, delta).map(Value::NdArray),
        other => other,
    };
    let value = &value;
    let int_delta = |d: Delta| match d {
        Delta::Int(i) => Some(i),
        Delta::Bool(b) => Some(i128::from(b)),
        Delta::Float(_) => None,
    };
    let float_delta = |d: Delta| match d {
        Delta::Int(i) => i as f64,
        Delta::Float(f) => f,
        Delta::Bool(b) => f64::from(u8::from(b)),
    };
    match value {
        Value::Int(_) | Value::Bool(_) => {
            let base: i128 = match value {
                Value::Bool(b) => i128::from(*b),
                other => other
                    .as_i64()
                    .map(i128::from)
                    .or_else(|| other.as_u64().map(i128::from))
                    .ok_or_else(|| "integer out of range".to_owned())?,
            };
            match int_delta(delta) {
                Some(d) => {
                    let sum = base + d;
                    i64::try_from(sum)
                        .map(Value::from)
                        .or_else(|_| u64::try_from(sum).map(Value::from))
                        .map_err(|_| format!("{sum} does not fit the wire's integers"))
                }
                None => Ok(Value::F64(base as f64 + float_delta(delta))),
            }
        }
        Value::F64(f) => Ok(Value::F64(f + float_delta(delta))),
        Value::F32(f) => Ok(Value::F64(f64::from(*f) + float_delta(delta))),
        other => Err(format!(
            "unsupported operand type for +=: '{}' and a number",
            other.kind()
        )),
    }
}

/// The array `numpy.save` would write for `value` (a scalar becomes a 0-d array).
fn as_array(value: &Value) -> Result<NdArray, String> {
    let array = match value {
        Value::NdArray(a) => return Ok(a.clone()),
        Value::F64(f) => NdArray::from_f64(&[], &[*f]),
        Value::Int(_) => match value.as_i64() {
            Some(i) => NdArray::from_i64(&[], &[i]),
            None => return Err("integer does not fit int64".to_owned()),
        },
        other => return Err(format!("cannot save a {} as .npy", other.kind())),
    };
    array.map_err(|e| e.to_string())
}

/// NVFlare's model summary for logs: the shape and dtype of `numpy_key`.
fn summary(data: &Map) -> String {
    match data.get(NUMPY_KEY).and_then(Value::as_ndarray) {
        Some(a) => format!("shape={:?}, dtype={}", a.shape(), a.dtype().name()),
        None if data.contains_key(NUMPY_KEY) => format!("{NUMPY_KEY}=not an array"),
        None => format!("{NUMPY_KEY}=missing"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use fedrun_core::ReturnCode;

    fn temp_run_dir() -> PathBuf {
        std::env::temp_dir().join(format!("fedrun-np-trainer-{}", uuid::Uuid::new_v4()))
    }

    fn weights(array: NdArray) -> Shareable {
        let mut data = Map::new();
        data.insert(NUMPY_KEY, array);
        data.insert("other", "kept");
        let mut s = Dxo::new(DataKind::Weights, data).to_shareable();
        s.set_header(CURRENT_ROUND, 0);
        s
    }

    fn rc(s: &Shareable) -> ReturnCode {
        s.return_code()
    }

    fn run(t: &NpTrainer, task_name: &str, task: Shareable) -> Shareable {
        let ctx = FlContext::new();
        futures::executor::block_on(t.execute(task_name, task, &ctx, AbortSignal::new())).unwrap()
    }

    #[test]
    fn train_adds_the_delta_in_the_tasks_own_buffer_when_nothing_else_holds_it() {
        let dir = temp_run_dir();
        let t = NpTrainer::new(NpTrainerArgs::default(), &dir);
        let model = NdArray::from_f32(&[4, 4], &[0.5; 16]).unwrap();
        let at = model.npy().as_ptr();
        let out = run(&t, "train", weights(model));
        let dxo = Dxo::from_shareable(&out).unwrap();
        let trained = dxo.data.get(NUMPY_KEY).and_then(Value::as_ndarray).unwrap();
        assert_eq!(trained.npy().as_ptr(), at, "the model was copied");
        assert_eq!(trained.to_f32_vec().unwrap(), vec![1.5; 16]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn train_adds_delta_in_the_arrays_dtype_and_keeps_the_other_data() {
        let dir = temp_run_dir();
        let t = NpTrainer::new(NpTrainerArgs::default(), &dir);
        let init: Vec<f32> = (1u8..=9).map(f32::from).collect();
        let out = run(
            &t,
            "train",
            weights(NdArray::from_f32(&[3, 3], &init).unwrap()),
        );
        assert_eq!(rc(&out), ReturnCode::App(AppReturnCode::Ok));
        let dxo = Dxo::from_shareable(&out).unwrap();
        assert_eq!(dxo.kind, DataKind::Weights);
        let a = dxo.data.get(NUMPY_KEY).and_then(Value::as_ndarray).unwrap();
        assert_eq!(a.descr(), "<f4");
        assert_eq!(a.shape(), &[3, 3]);
        let expected: Vec<f32> = (2u8..=10).map(f32::from).collect();
        assert_eq!(a.to_f32_vec().unwrap(), expected);
        assert_eq!(dxo.data.get("other").and_then(Value::as_str), Some("kept"));
        assert_eq!(
            dxo.meta
                .get(NUM_STEPS_CURRENT_ROUND)
                .and_then(Value::as_i64),
            Some(1)
        );
        assert_eq!(dxo.meta.len(), 1);

        let ints = NpTrainer::new(
            NpTrainerArgs {
                delta: Delta::Int(-2),
                ..NpTrainerArgs::default()
            },
            &dir,
        );
        let out = run(
            &ints,
            "train",
            weights(NdArray::from_i64(&[2], &[5, 7]).unwrap()),
        );
        let dxo = Dxo::from_shareable(&out).unwrap();
        let a = dxo.data.get(NUMPY_KEY).and_then(Value::as_ndarray).unwrap();
        assert_eq!(a.to_i64_vec().unwrap(), vec![3, 5]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn train_saves_the_local_model_that_submit_model_returns() {
        let dir = temp_run_dir();
        let args = NpTrainerArgs {
            model_dir: "m".into(),
            model_name: "x.npy".into(),
            ..NpTrainerArgs::default()
        };
        let t = NpTrainer::new(args, &dir);
        let none = run(&t, "submit_model", Shareable::new());
        assert_eq!(
            rc(&none),
            ReturnCode::App(AppReturnCode::ExecutionResultError),
            "no local model yet"
        );
        run(
            &t,
            "train",
            weights(NdArray::from_f64(&[2], &[0.5, 1.5]).unwrap()),
        );
        let file = dir.join("m").join("x.npy");
        let saved = NdArray::from_npy(std::fs::read(&file).unwrap().into()).unwrap();
        assert_eq!(saved.to_f64_vec().unwrap(), vec![1.5, 2.5]);
        let out = run(&t, "submit_model", Shareable::new());
        let dxo = Dxo::from_shareable(&out).unwrap();
        assert_eq!(dxo.kind, DataKind::Weights);
        assert_eq!(dxo.data.len(), 1);
        assert_eq!(
            dxo.data.get(NUMPY_KEY).and_then(Value::as_ndarray),
            Some(&saved)
        );
        assert!(dxo.meta.is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_task_data_gets_nvflares_return_codes() {
        let dir = temp_run_dir();
        let t = NpTrainer::new(NpTrainerArgs::default(), &dir);
        let bad = ReturnCode::App(AppReturnCode::BadTaskData);
        assert_eq!(rc(&run(&t, "train", Shareable::new())), bad, "not a DXO");
        let mut data = Map::new();
        data.insert(NUMPY_KEY, NdArray::from_f32(&[1], &[1.0]).unwrap());
        let diff = Dxo::new(DataKind::WeightDiff, data).to_shareable();
        assert_eq!(rc(&run(&t, "train", diff)), bad, "not WEIGHTS");
        let empty = Dxo::new(DataKind::Weights, Map::new()).to_shareable();
        assert_eq!(rc(&run(&t, "train", empty)), bad, "no data");
        let mut data = Map::new();
        data.insert("w", NdArray::from_f32(&[1], &[1.0]).unwrap());
        let no_key = Dxo::new(DataKind::Weights, data).to_shareable();
        assert_eq!(rc(&run(&t, "train", no_key)), bad, "no numpy_key");
        // what numpy refuses is an exception in execute
        let float_on_int = NpTrainer::new(
            NpTrainerArgs {
                delta: Delta::Float(0.5),
                ..NpTrainerArgs::default()
            },
            &dir,
        );
        let ints = weights(NdArray::from_i32(&[1], &[1]).unwrap());
        assert_eq!(
            rc(&run(&float_on_int, "train", ints)),
            ReturnCode::App(AppReturnCode::ExecutionException)
        );
        assert!(!dir.exists(), "nothing was saved");
    }

    #[test]
    fn unknown_tasks_are_task_unknown_and_task_names_are_configurable() {
        let dir = temp_run_dir();
        let t = NpTrainer::new(
            NpTrainerArgs {
                train_task_name: "fit".into(),
                ..NpTrainerArgs::default()
            },
            &dir,
        );
        let task = weights(NdArray::from_f32(&[1], &[1.0]).unwrap());
        assert_eq!(
            rc(&run(&t, "train", task.clone())),
            ReturnCode::App(AppReturnCode::TaskUnknown)
        );
        assert_eq!(
            rc(&run(&t, "fit", task)),
            ReturnCode::App(AppReturnCode::Ok)
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn python_scalars_follow_pythons_arithmetic() {
        assert_eq!(
            add_to_value(Value::from(2), Delta::Int(1)),
            Ok(Value::from(3))
        );
        assert_eq!(
            add_to_value(Value::from(2), Delta::Float(0.5)),
            Ok(Value::F64(2.5))
        );
        assert_eq!(
            add_to_value(Value::F64(1.0), Delta::Bool(true)),
            Ok(Value::F64(2.0))
        );
        assert!(add_to_value(Value::from("x"), Delta::Int(1)).is_err());
    }

    #[actix::test]
    async fn an_abort_during_sleep_returns_task_aborted_promptly() {
        let t = NpTrainer::new(
            NpTrainerArgs {
                sleep_time: 60.0,
                ..NpTrainerArgs::default()
            },
            temp_run_dir(),
        );
        let abort = AbortSignal::new();
        let ctx = FlContext::new();
        let task = weights(NdArray::from_f32(&[1], &[1.0]).unwrap());
        let trigger = abort.clone();
        actix::spawn(async move { trigger.trigger() });
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            t.execute("train", task, &ctx, abort),
        )
        .await
        .expect("the trainer returned well before its 60 s sleep")
        .unwrap();
        assert_eq!(rc(&out), ReturnCode::App(AppReturnCode::TaskAborted));
    }

    #[actix::test]
    async fn sleep_time_is_honoured_in_half_second_steps() {
        let t = NpTrainer::new(
            NpTrainerArgs {
                sleep_time: 0.2,
                ..NpTrainerArgs::default()
            },
            temp_run_dir(),
        );
        let ctx = FlContext::new();
        let started = tokio::time::Instant::now();
        let out = t
            .execute("nothing", Shareable::new(), &ctx, AbortSignal::new())
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert_eq!(rc(&out), ReturnCode::App(AppReturnCode::TaskUnknown));
    }
}
