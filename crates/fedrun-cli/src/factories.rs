//! The component classes `fedrun simulate` adds to a job's configs, on both sides.
//!
//! Job configs name classes; factories build them. The engine and the server crate bring their
//! own (FedAvg, ScatterAndGather, the `.npy` persistors); the simulator adds what its example job
//! needs: the [`LogRegTrainer`](crate::trainer::LogRegTrainer) executor on every client, and on
//! the server [`ZERO_MODEL_PERSISTOR_CLASS`], an `.npy` persistor whose first model is all
//! zeros with the shapes the config gives — so a job can start from scratch without shipping a
//! model file. Users and tests add their own classes through [`SiteFactory`] lists.
//!
//! Every client job — simulated, or deployed by NVFlare's client parent (`fedrun job`) — gets
//! the same built-in client classes from [`register_builtin_client_factories`]: NVFlare's numpy
//! executors ([`fedrun_engine::np`]) and the logistic-regression trainer.

use std::path::Path;
use std::sync::Arc;

use fedrun_core::NdArray;
use fedrun_engine::np::np_factories;
use fedrun_engine::{
    factory, BuildArgs, ComponentFactory, EngineError, EngineHandle, RegisterComponentFactory,
};
use fedrun_server::{ModelWeights, NpyPersistor, ServerFactories, SharedPersistor};
use serde_json::Value as Json;

/// The class of the zero-initialised `.npy` persistor.
pub const ZERO_MODEL_PERSISTOR_CLASS: &str = "fedrun.examples.ZeroModelPersistor";
/// Its short name.
pub const ZERO_MODEL_PERSISTOR_SHORT: &str = "ZeroModelPersistor";

/// Makes the factory of one client site (the site name is its argument), so that what it builds
/// can depend on the site — e.g. each site's own data.
pub type SiteFactory = Arc<dyn Fn(&str) -> ComponentFactory + Send + Sync>;

/// The client classes every fedrun client job can build, by the names configs use: NVFlare's
/// numpy executors (class paths) and the logistic-regression trainer (class path and short
/// name). Short names of the numpy classes (`NPTrainer`) resolve through the registry's
/// last-segment lookup.
///
/// # Example
/// ```
/// let classes = fedrun_cli::factories::builtin_client_classes();
/// assert!(classes.iter().any(|c| c == "nvflare.app_common.np.np_trainer.NPTrainer"));
/// ```
pub fn builtin_client_classes() -> Vec<String> {
    let mut classes: Vec<String> = np_factories(".").into_iter().map(|(c, _)| c).collect();
    classes.push(crate::trainer::LOGREG_TRAINER_CLASS.to_owned());
    classes.push(crate::trainer::LOGREG_TRAINER_SHORT.to_owned());
    classes
}

/// Registers the built-in client classes ([`builtin_client_classes`]) on a client engine.
///
/// `run_dir` is the job's run directory at this site (NVFlare's `<workspace>/<job_id>`; the
/// simulator gives each site `<workspace>/<site>`): `NPTrainer` keeps its local model there.
pub async fn register_builtin_client_factories(
    engine: &EngineHandle,
    run_dir: &Path,
) -> Result<(), EngineError> {
    for (class, factory) in np_factories(run_dir) {
        engine
            .send(RegisterComponentFactory { class, factory })
            .await??;
    }
    crate::trainer::register_logreg_factories(engine).await
}

/// The zero model an [`args`](BuildArgs::args) object describes: `arrays` maps each array name
/// to its shape (a list of sizes); every array is `float32` zeros.
///
/// # Example
/// ```
/// use fedrun_cli::factories::zero_model;
///
/// let args = serde_json::json!({"w": [2, 3], "b": [1]});
/// let model = zero_model(args.as_object().unwrap()).unwrap();
/// assert_eq!(model["w"].shape(), &[2, 3]);
/// assert_eq!(model["b"].to_f32_vec().unwrap(), vec![0.0]);
/// ```
pub fn zero_model(arrays: &serde_json::Map<String, Json>) -> Result<ModelWeights, String> {
    let mut model = ModelWeights::new();
    for (name, shape) in arrays {
        let dims = shape
            .as_array()
            .ok_or_else(|| format!("shape of '{name}' must be a list of sizes, got {shape}"))?;
        let dims: Vec<usize> = dims
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("shape of '{name}' must hold non-negative integers"))?;
        let len = dims
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .ok_or_else(|| format!("shape of '{name}' is too large"))?;
        let array = NdArray::from_f32(&dims, &vec![0.0; len]).map_err(|e| e.to_string())?;
        model.insert(name.clone(), array);
    }
    if model.is_empty() {
        return Err("'arrays' names no array".to_owned());
    }
    Ok(model)
}

/// Builds the zero-initialised persistor: args `dir` (where models are saved, relative to the
/// workspace; default `models`) and `arrays` (name → shape).
fn build_zero_persistor(base: &Path, args: &BuildArgs) -> Result<SharedPersistor, String> {
    let dir = match args.args.get("dir") {
        None | Some(Json::Null) => "models",
        Some(Json::String(d)) => d.as_str(),
        Some(other) => return Err(format!("'dir' must be a string, got {other}")),
    };
    let arrays = match args.args.get("arrays") {
        Some(Json::Object(a)) => a,
        Some(other) => return Err(format!("'arrays' must be an object, got {other}")),
        None => return Err("missing 'arrays' (array name -> shape)".to_owned()),
    };
    for key in args.args.keys() {
        if key != "dir" && key != "arrays" {
            log::warn!("{ZERO_MODEL_PERSISTOR_CLASS}: argument {key} ignored");
        }
    }
    let dir = Path::new(dir);
    let dir = if dir.is_absolute() {
        dir.to_owned()
    } else {
        base.join(dir)
    };
    let persistor = NpyPersistor::new(dir).with_initial_weights(zero_model(arrays)?);
    Ok(SharedPersistor(Arc::new(persistor)))
}

/// The server factories of a simulation: the server crate's built-ins (relative paths resolved
/// against `workspace`), the zero-initialised persistor, then `extra` (which may replace any).
pub fn server_factories(workspace: &Path, extra: &[(String, ComponentFactory)]) -> ServerFactories {
    let mut factories = ServerFactories::new(workspace);
    for class in [ZERO_MODEL_PERSISTOR_CLASS, ZERO_MODEL_PERSISTOR_SHORT] {
        let base = workspace.to_owned();
        factories.register_component(
            class,
            factory(move |args: BuildArgs| build_zero_persistor(&base, &args)),
        );
    }
    for (class, f) in extra {
        factories.register_component(class.clone(), Arc::clone(f));
    }
    factories
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn zero_persistor_starts_from_zeros_and_saves_under_the_workspace() {
        let ws = std::env::temp_dir().join(format!("fedrun-zero-{}", uuid::Uuid::new_v4()));
        let args = BuildArgs {
            args: serde_json::json!({"arrays": {"w": [4]}})
                .as_object()
                .unwrap()
                .clone(),
            ..BuildArgs::default()
        };
        let p = build_zero_persistor(&ws, &args).unwrap();
        let model = p.0.load().unwrap();
        assert_eq!(model["w"].to_f32_vec().unwrap(), vec![0.0; 4]);
        p.0.save(&model).unwrap();
        assert!(ws.join("models").join("w.npy").is_file());
        std::fs::remove_dir_all(&ws).unwrap();
    }

    #[test]
    fn bad_shapes_are_refused_with_the_array_name() {
        let bad = serde_json::json!({"w": [-1]});
        assert!(zero_model(bad.as_object().unwrap())
            .unwrap_err()
            .contains("'w'"));
        let empty = serde_json::json!({});
        assert!(zero_model(empty.as_object().unwrap()).is_err());
    }
}
