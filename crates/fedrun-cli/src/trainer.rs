//! `LogRegTrainer`: the executor of the example job, putting [`crate::logreg`] on the task
//! protocol.
//!
//! It does what an NVFlare learner executor does for a `train` task: read the global model from
//! the task's DXO (`WEIGHTS`: `w` `float32[n_features]`, `b` `float32[1]`), evaluate it on the
//! site's held-out data, train it for a few local epochs on the site's training data, and return
//! the new weights as a DXO `WEIGHTS` with meta `NUM_STEPS_CURRENT_ROUND` (the number of training
//! samples, the weight FedAvg gives this site), `loss` and `accuracy` (of the **received** model,
//! so the server's per-round metrics follow the global model), and `val_samples`.
//!
//! The factory is registered under [`LOGREG_TRAINER_CLASS`] and the short name
//! [`LOGREG_TRAINER_SHORT`] by [`register_logreg_factories`].

use std::sync::Arc;

use fedrun_cell::AbortSignal;
use fedrun_core::{DataKind, Dxo, FlContext, Map, NdArray, Shareable, Value};
use fedrun_engine::{
    executor_factory, BuildArgs, Component, EngineError, EngineHandle, Executor,
    RegisterComponentFactory,
};
use futures::future::BoxFuture;

use crate::error::CliError;
use crate::logreg::{generate_site_data, LogRegParams, Model, SiteData};
use crate::rng::derive_seed;

/// The class path job configs use for the trainer.
pub const LOGREG_TRAINER_CLASS: &str = "fedrun.examples.logreg.LogRegTrainer";
/// The short class name the trainer is also registered under.
pub const LOGREG_TRAINER_SHORT: &str = "LogRegTrainer";
/// The DXO meta key of the number of samples a site trained on (FedAvg's weight).
pub const NUM_STEPS_CURRENT_ROUND: &str = "NUM_STEPS_CURRENT_ROUND";
/// The task header carrying the round number.
pub const CURRENT_ROUND: &str = "current_round";
/// The DXO meta key of the received model's held-out loss.
pub const META_LOSS: &str = "loss";
/// The DXO meta key of the received model's held-out accuracy.
pub const META_ACCURACY: &str = "accuracy";
/// The DXO meta key of the number of held-out samples the metrics were computed on.
pub const META_VAL_SAMPLES: &str = "val_samples";

/// The logistic-regression trainer of one site.
///
/// # Example
/// ```
/// use fedrun_cell::AbortSignal;
/// use fedrun_cli::logreg::{LogRegParams, Model};
/// use fedrun_cli::trainer::{model_to_dxo, LogRegTrainer};
/// use fedrun_core::{Dxo, FlContext};
/// use fedrun_engine::Executor;
///
/// let params = LogRegParams { n_features: 3, ..LogRegParams::default() };
/// let trainer = LogRegTrainer::new("site-1", params).unwrap();
/// let task = model_to_dxo(&Model::zeros(3)).unwrap().to_shareable();
/// let ctx = FlContext::new();
/// let result = futures::executor::block_on(trainer.execute("train", task, &ctx, AbortSignal::new()));
/// let dxo = Dxo::from_shareable(&result.unwrap()).unwrap();
/// assert_eq!(dxo.meta.get("NUM_STEPS_CURRENT_ROUND").and_then(|v| v.as_u64()),
///            Some(trainer.train_samples() as u64));
/// ```
#[derive(Debug)]
pub struct LogRegTrainer {
    site: String,
    params: LogRegParams,
    data: SiteData,
}

impl LogRegTrainer {
    /// The trainer of `site`: generates the site's data now (deterministic in seed and name).
    pub fn new(site: &str, params: LogRegParams) -> Result<Self, CliError> {
        params.validate()?;
        let data = generate_site_data(&params, site);
        Ok(Self {
            site: site.to_owned(),
            params,
            data,
        })
    }

    /// The site's number of training samples.
    pub fn train_samples(&self) -> usize {
        self.data.train.len()
    }

    /// The site's data.
    pub fn data(&self) -> &SiteData {
        &self.data
    }

    /// One round: evaluate `global`, train a copy, and return the new model, the number of
    /// training samples and the evaluation of `global`.
    fn train_round(&self, global: &Model, round: u64) -> (Model, usize, crate::logreg::Evaluation) {
        let eval = global.evaluate(&self.data.val);
        let mut local = global.clone();
        let seed = derive_seed(self.params.seed, &format!("{}/round-{round}", self.site));
        local.train(
            &self.data.train,
            self.params.lr,
            self.params.epochs,
            self.params.batch_size,
            seed,
        );
        (local, self.data.train.len(), eval)
    }
}

impl Component for LogRegTrainer {}

impl Executor for LogRegTrainer {
    fn execute<'a>(
        &'a self,
        task_name: &'a str,
        task: Shareable,
        _ctx: &'a FlContext,
        abort: AbortSignal,
    ) -> BoxFuture<'a, Result<Shareable, String>> {
        Box::pin(async move {
            let round = task
                .header_or_none(CURRENT_ROUND)
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let dxo = Dxo::from_shareable(&task)
                .map_err(|e| format!("{}: task {task_name} carries no DXO: {e}", self.site))?;
            if dxo.kind != DataKind::Weights {
                return Err(format!(
                    "{}: expected a WEIGHTS DXO, got {}",
                    self.site, dxo.kind
                ));
            }
            let global = model_from_dxo(&dxo, self.params.n_features)
                .map_err(|e| format!("{}: {e}", self.site))?;
            if abort.is_triggered() {
                return Err(format!("{}: task {task_name} aborted", self.site));
            }
            // A few thousand multiply-adds: cheap enough to run on the arbiter's thread.
            let (local, n_train, eval) = self.train_round(&global, round);
            log::debug!(
                "[site={}] round {round}: received model loss {:.4} accuracy {:.3}; trained on {n_train} samples",
                self.site,
                eval.loss,
                eval.accuracy
            );
            let mut out = model_to_dxo(&local).map_err(|e| format!("{}: {e}", self.site))?;
            out.meta.insert(NUM_STEPS_CURRENT_ROUND, n_train);
            out.meta.insert(META_LOSS, eval.loss);
            out.meta.insert(META_ACCURACY, eval.accuracy);
            out.meta.insert(META_VAL_SAMPLES, self.data.val.len());
            Ok(out.to_shareable())
        })
    }
}

/// The DXO `WEIGHTS` of a model: `w` as `float32[n_features]`, `b` as `float32[1]`.
pub fn model_to_dxo(model: &Model) -> Result<Dxo, CliError> {
    let mut data = Map::with_capacity(2);
    data.insert("w", NdArray::from_f32(&[model.w.len()], &model.w)?);
    data.insert("b", NdArray::from_f32(&[1], &[model.b])?);
    Ok(Dxo::new(DataKind::Weights, data))
}

/// Reads a model out of a `WEIGHTS` DXO, checking that `w` has `n_features` values and `b` one.
pub fn model_from_dxo(dxo: &Dxo, n_features: usize) -> Result<Model, String> {
    let array = |name: &str| -> Result<Vec<f32>, String> {
        let value = dxo
            .data
            .get(name)
            .ok_or_else(|| format!("the model has no '{name}' array"))?;
        let array = value
            .as_ndarray()
            .ok_or_else(|| format!("'{name}' must be an ndarray, got {}", value.kind()))?;
        array
            .to_f32_vec()
            .map_err(|e| format!("'{name}' must be float32: {e}"))
    };
    let w = array("w")?;
    let b = array("b")?;
    if w.len() != n_features {
        return Err(format!(
            "'w' has {} values but the trainer has n_features = {n_features}",
            w.len()
        ));
    }
    let [b] = b[..] else {
        return Err(format!("'b' must hold exactly one value, got {}", b.len()));
    };
    Ok(Model { w, b })
}

/// Registers the trainer's factory, under both names, on a client engine of `site`: configs that
/// name [`LOGREG_TRAINER_CLASS`] or [`LOGREG_TRAINER_SHORT`] then build a [`LogRegTrainer`] for
/// this site from their `args` (see [`LogRegParams::from_args`]).
pub async fn register_logreg_factories(engine: &EngineHandle) -> Result<(), EngineError> {
    let site: Arc<str> = Arc::from(engine.site());
    for class in [LOGREG_TRAINER_CLASS, LOGREG_TRAINER_SHORT] {
        let site = Arc::clone(&site);
        let factory = executor_factory(move |args: BuildArgs| {
            let params = LogRegParams::from_args(&args.args).map_err(|e| e.to_string())?;
            LogRegTrainer::new(&site, params).map_err(|e| e.to_string())
        });
        engine
            .send(RegisterComponentFactory {
                class: class.to_owned(),
                factory,
            })
            .await??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(trainer: &LogRegTrainer, task: Shareable) -> Result<Shareable, String> {
        let ctx = FlContext::new();
        futures::executor::block_on(trainer.execute("train", task, &ctx, AbortSignal::new()))
    }

    #[test]
    fn result_reports_the_received_models_metrics_and_the_sample_count() {
        let trainer = LogRegTrainer::new("site-1", LogRegParams::default()).unwrap();
        let zero = Model::zeros(10);
        let result = run(&trainer, model_to_dxo(&zero).unwrap().to_shareable()).unwrap();
        let dxo = Dxo::from_shareable(&result).unwrap();
        assert_eq!(dxo.kind, DataKind::Weights);
        let expected = zero.evaluate(&trainer.data().val);
        assert_eq!(
            dxo.meta.get(META_LOSS).and_then(Value::as_f64),
            Some(expected.loss)
        );
        assert_eq!(
            dxo.meta
                .get(NUM_STEPS_CURRENT_ROUND)
                .and_then(Value::as_u64),
            Some(trainer.train_samples() as u64)
        );
        let trained = model_from_dxo(&dxo, 10).unwrap();
        assert_ne!(trained, zero);
        assert!(trained.evaluate(&trainer.data().val).loss < expected.loss);
    }

    #[test]
    fn a_task_without_a_matching_model_fails_with_a_reason() {
        let trainer = LogRegTrainer::new("site-1", LogRegParams::default()).unwrap();
        let err = run(&trainer, Shareable::new()).unwrap_err();
        assert!(err.contains("no DXO"), "{err}");
        let wrong = model_to_dxo(&Model::zeros(3)).unwrap().to_shareable();
        let err = run(&trainer, wrong).unwrap_err();
        assert!(err.contains("n_features = 10"), "{err}");
    }
}
