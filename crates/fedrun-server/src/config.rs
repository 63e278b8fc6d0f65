//! Building a server job's workflows and components from NVFlare's `config_fed_server.json`.
//!
//! The file (format version 2) lists `workflows` and `components`, each `{id, path|name, args}`.
//! [`ServerJobConfig::from_json`] reads it; [`ServerJobConfig::build`] builds it with
//! [`ServerFactories`]: components first, through the engine's
//! [`ComponentRegistry`] (class by `path`, `class_path` or
//! short `name`, nested component args, `disabled`), then workflows, whose factories get the
//! built components by id (a scatter-and-gather names its aggregator and persistor by id).
//!
//! Built-in classes (NVFlare's class paths where NVFlare has the class):
//!
//! | class | builds | args |
//! |---|---|---|
//! | [`SAG_CLASS`] | [`ScatterAndGather`] | `min_clients` (1000, NVFlare's default), `num_rounds` (5), `start_round` (0), `wait_time_after_min_received` (0), `aggregator_id` (`aggregator`), `persistor_id` (`persistor`), `shareable_generator_id` (`shareable_generator`), `train_task_name` (`train`), `train_timeout` (0 = none), `persist_every_n_rounds` (1), `stream_threshold` (64 MiB; fedrun's, 0 = never stream) |
//! | [`INTIME_AGGREGATOR_CLASS`] | [`FedAvg`] | `expected_data_kind` (`WEIGHT_DIFF`, NVFlare's default), `aggregation_weights` ({}), `weigh_by_local_iter` (true) |
//! | [`NPY_PERSISTOR_CLASS`] | [`NpyPersistor`] | `dir` (`models`), `initial_model` (a model directory; default: the model saved in `dir`) |
//! | [`NP_MODEL_PERSISTOR_CLASS`] | [`NpModelPersistor`] | `model_dir` (`models`), `model_name` (`server.npy`), `model` (a nested list), `source_ckpt_file_full_name`: NVFlare's numpy persistor, NVFlare's file layout (one `.npy` of array `numpy_key` at `model_dir/model_name`) and first-model order |
//! | [`FULL_MODEL_GENERATOR_CLASS`] | [`FullModelShareableGenerator`] | none (the scatter-and-gather already sends full models) |
//!
//! Relative paths are resolved against [`ServerFactories::new`]'s base directory (normally the
//! job app's directory). Arguments a built-in does not know are logged and ignored; arguments
//! whose meaning it cannot honour (`exclude_vars`) are errors.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use fedrun_core::DataKind;
use fedrun_engine::{
    factory, AddComponent, BuildArgs, BuildComponent, Component, ComponentFactory, ComponentRef,
    ComponentRegistry, EngineError, RegisterComponentFactory, SetBuildAuthorizer,
};
use serde_json::{Map as JsonMap, Value as Json};

use crate::aggregator::{FedAvg, SharedAggregator};
use crate::error::ServerError;
use crate::np_persistor::{NpModelPersistor, NP_DEFAULT_MODEL_DIR, NP_DEFAULT_MODEL_NAME};
use crate::persistor::{ModelPersistor, NpyPersistor, SharedPersistor};
use crate::sag::{SagConfig, ScatterAndGather};
use crate::workflow::Workflow;

/// NVFlare's scatter-and-gather workflow class.
pub const SAG_CLASS: &str = "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather";
/// NVFlare's weighted in-time aggregator class (built as [`FedAvg`]).
pub const INTIME_AGGREGATOR_CLASS: &str =
    "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator";
/// fedrun's `.npy` directory persistor class.
pub const NPY_PERSISTOR_CLASS: &str = "fedrun.persistors.NpyModelPersistor";
/// NVFlare's numpy model persistor class (built as an [`NpyPersistor`]).
pub const NP_MODEL_PERSISTOR_CLASS: &str =
    "nvflare.app_common.np.np_model_persistor.NPModelPersistor";
/// NVFlare's full-model shareable generator class.
pub const FULL_MODEL_GENERATOR_CLASS: &str =
    "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator";

/// The array name NVFlare's numpy examples use.
pub const NUMPY_KEY: &str = crate::np_persistor::NP_NUMPY_KEY;

/// NVFlare's full-model shareable generator: a marker, because [`ScatterAndGather`] always
/// sends the full model as a `WEIGHTS` DXO (and applies `WEIGHT_DIFF` aggregates itself).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullModelShareableGenerator;

impl Component for FullModelShareableGenerator {}

/// What a workflow factory gets.
#[derive(Clone, Debug)]
pub struct WorkflowArgs {
    /// The workflow's id in the config.
    pub id: String,
    /// The class the factory was found by.
    pub class: String,
    /// The config's `args`.
    pub args: JsonMap<String, Json>,
    /// The job's built components, by id.
    pub components: HashMap<String, ComponentRef>,
}

impl WorkflowArgs {
    /// The component `id`, as a `T`.
    ///
    /// # Errors
    ///
    /// A text naming the id when it is missing or of another type.
    pub fn component<T: Component>(&self, id: &str) -> Result<Arc<T>, String> {
        let c = self
            .components
            .get(id)
            .ok_or_else(|| format!("no component with id {id:?}"))?;
        c.downcast::<T>().ok_or_else(|| {
            format!(
                "component {id:?} is a {}, not a {}",
                c.type_name(),
                std::any::type_name::<T>()
            )
        })
    }

    /// The aggregator component `id` (a [`SharedAggregator`]).
    ///
    /// # Errors
    ///
    /// As [`WorkflowArgs::component`].
    pub fn aggregator(&self, id: &str) -> Result<Arc<dyn crate::Aggregator>, String> {
        Ok(Arc::clone(&self.component::<SharedAggregator>(id)?.0))
    }

    /// The persistor component `id` (a [`SharedPersistor`]).
    ///
    /// # Errors
    ///
    /// As [`WorkflowArgs::component`].
    pub fn persistor(&self, id: &str) -> Result<Arc<dyn ModelPersistor>, String> {
        Ok(Arc::clone(&self.component::<SharedPersistor>(id)?.0))
    }
}

/// Builds one workflow; an `Err` text becomes [`ServerError::WorkflowBuild`] (so does a
/// panic).
pub type WorkflowFactory =
    Arc<dyn Fn(WorkflowArgs) -> Result<Box<dyn Workflow>, String> + Send + Sync>;

/// The factories a config is built with: the built-ins of the module doc plus the user's.
///
/// # Example
/// ```
/// use fedrun_engine::factory;
/// use fedrun_server::{FedAvg, ServerFactories, SharedAggregator};
/// use std::sync::Arc;
///
/// let mut factories = ServerFactories::new("/jobs/hello/app_server");
/// // a user aggregator class, usable as "my.Aggregator" in config_fed_server.json
/// factories.register_component("my.Aggregator", factory(|_args| {
///     Ok(SharedAggregator(Arc::new(FedAvg::default())))
/// }));
/// assert!(factories.component_classes().contains(&"my.Aggregator".to_owned()));
/// ```
#[derive(Clone)]
pub struct ServerFactories {
    base_dir: PathBuf,
    components: Vec<(String, ComponentFactory)>,
    workflows: Vec<(String, WorkflowFactory)>,
    skip_unknown: bool,
}

impl std::fmt::Debug for ServerFactories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerFactories")
            .field("base_dir", &self.base_dir)
            .field("components", &self.component_classes())
            .field("workflows", &self.workflow_classes())
            .field("skip_unknown", &self.skip_unknown)
            .finish()
    }
}

impl Default for ServerFactories {
    fn default() -> Self {
        Self::new(".")
    }
}

impl ServerFactories {
    /// The built-in factories, resolving relative paths against `base_dir`.
    pub fn new(base_dir: impl Into<PathBuf>) -> Self {
        let base_dir = base_dir.into();
        let mut f = ServerFactories {
            base_dir: base_dir.clone(),
            components: Vec::new(),
            workflows: Vec::new(),
            skip_unknown: false,
        };
        f.register_workflow(SAG_CLASS, Arc::new(build_sag));
        f.register_component(INTIME_AGGREGATOR_CLASS, factory(build_fedavg));
        let base = base_dir.clone();
        f.register_component(
            NPY_PERSISTOR_CLASS,
            factory(move |args| build_npy_persistor(&base, &args)),
        );
        f.register_component(
            NP_MODEL_PERSISTOR_CLASS,
            factory(move |args| build_np_model_persistor(&base_dir, &args)),
        );
        f.register_component(
            FULL_MODEL_GENERATOR_CLASS,
            factory(|_args| Ok(FullModelShareableGenerator)),
        );
        f
    }

    /// The directory relative paths are resolved against.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Registers (or replaces) the factory of component class `class` (a full class path, or
    /// a short name).
    pub fn register_component(&mut self, class: impl Into<String>, factory: ComponentFactory) {
        let class = class.into();
        self.components.retain(|(c, _)| *c != class);
        self.components.push((class, factory));
    }

    /// Registers (or replaces) the factory of workflow class `class`.
    pub fn register_workflow(&mut self, class: impl Into<String>, factory: WorkflowFactory) {
        let class = class.into();
        self.workflows.retain(|(c, _)| *c != class);
        self.workflows.push((class, factory));
    }

    /// Skip (with a warning) components and workflows of unknown classes instead of failing
    /// (e.g. to run the training part of an NVFlare job whose extra widgets fedrun lacks).
    pub fn skip_unknown(mut self, on: bool) -> Self {
        self.skip_unknown = on;
        self
    }

    /// The registered component classes.
    pub fn component_classes(&self) -> Vec<String> {
        self.components.iter().map(|(c, _)| c.clone()).collect()
    }

    /// The registered workflow classes.
    pub fn workflow_classes(&self) -> Vec<String> {
        self.workflows.iter().map(|(c, _)| c.clone()).collect()
    }

    /// The workflow factory a config entry names: `path`, then `class_path` (exact), then
    /// `name` (exact, else the one class whose last component it is).
    fn workflow_factory(
        &self,
        entry: &JsonMap<String, Json>,
    ) -> Result<(String, WorkflowFactory), ServerError> {
        let exact = |class: &str| {
            self.workflows
                .iter()
                .find(|(c, _)| c == class)
                .map(|(c, f)| (c.clone(), Arc::clone(f)))
        };
        for key in ["path", "class_path"] {
            if let Some(v) = entry.get(key) {
                let class = v.as_str().ok_or_else(|| {
                    ServerError::Config(format!("workflow {key} must be a string"))
                })?;
                return exact(class)
                    .ok_or_else(|| ServerError::UnknownWorkflowClass(class.to_owned()));
            }
        }
        let Some(name) = entry.get("name").and_then(Json::as_str) else {
            return Err(ServerError::Config(
                "a workflow needs 'path', 'class_path' or 'name'".to_owned(),
            ));
        };
        if let Some(found) = exact(name) {
            return Ok(found);
        }
        let mut matches = self
            .workflows
            .iter()
            .filter(|(c, _)| c.rsplit('.').next() == Some(name));
        match (matches.next(), matches.next()) {
            (Some((c, f)), None) => Ok((c.clone(), Arc::clone(f))),
            (Some(_), Some(_)) => Err(ServerError::Config(format!(
                "workflow class name {name} is ambiguous"
            ))),
            (None, _) => Err(ServerError::UnknownWorkflowClass(name.to_owned())),
        }
    }
}

/// One entry of `workflows` or `components`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigEntry {
    /// Its `id`.
    pub id: String,
    /// The whole entry (`id`, `path`/`name`, `args`, ...).
    pub config: JsonMap<String, Json>,
}

impl ConfigEntry {
    /// The class the entry names (`path`, `class_path` or `name`), for messages.
    pub fn class(&self) -> &str {
        ["path", "class_path", "name"]
            .iter()
            .find_map(|k| self.config.get(*k).and_then(Json::as_str))
            .unwrap_or("?")
    }

    fn disabled(&self) -> bool {
        self.config.get("disabled") == Some(&Json::Bool(true))
    }
}

/// A parsed `config_fed_server.json` (see the module doc).
///
/// # Example
/// ```
/// use fedrun_server::ServerJobConfig;
///
/// let config = ServerJobConfig::from_json(r#"{
///   "format_version": 2,
///   "workflows": [{"id": "sag", "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
///                  "args": {"min_clients": 2, "num_rounds": 3}}],
///   "components": [
///     {"id": "aggregator", "path": "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator",
///      "args": {"expected_data_kind": "WEIGHTS"}},
///     {"id": "persistor", "path": "fedrun.persistors.NpyModelPersistor", "args": {"dir": "models"}}
///   ]
/// }"#).unwrap();
/// assert_eq!(config.workflows[0].id, "sag");
/// assert_eq!(config.components.len(), 2);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ServerJobConfig {
    /// `format_version` (2 when given).
    pub format_version: Option<u64>,
    /// The workflows, in order.
    pub workflows: Vec<ConfigEntry>,
    /// The components, in order.
    pub components: Vec<ConfigEntry>,
}

/// What [`ServerJobConfig::build`] built.
pub struct BuiltServerJob {
    /// The workflows, in config order (disabled and skipped ones left out).
    pub workflows: Vec<Box<dyn Workflow>>,
    /// The components by id, in config order.
    pub components: Vec<(String, ComponentRef)>,
}

impl std::fmt::Debug for BuiltServerJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let workflows: Vec<&str> = self.workflows.iter().map(|w| w.name()).collect();
        let components: Vec<&str> = self.components.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("BuiltServerJob")
            .field("workflows", &workflows)
            .field("components", &components)
            .finish()
    }
}

fn entries(root: &JsonMap<String, Json>, key: &str) -> Result<Vec<ConfigEntry>, ServerError> {
    let list = match root.get(key) {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(list)) => list,
        Some(_) => return Err(ServerError::Config(format!("'{key}' must be a list"))),
    };
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let Some(obj) = item.as_object() else {
                return Err(ServerError::Config(format!("{key}[{i}] must be an object")));
            };
            let Some(id) = obj
                .get("id")
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
            else {
                return Err(ServerError::Config(format!(
                    "{key}[{i}] has no (string) 'id'"
                )));
            };
            Ok(ConfigEntry {
                id: id.to_owned(),
                config: obj.clone(),
            })
        })
        .collect()
}

impl ServerJobConfig {
    /// Parses the JSON text of a `config_fed_server.json`.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] for invalid JSON, a `format_version` other than 2, lists that
    /// are not lists of objects, entries without an `id`, or duplicate ids.
    pub fn from_json(text: &str) -> Result<Self, ServerError> {
        let json: Json = serde_json::from_str(text)
            .map_err(|e| ServerError::Config(format!("invalid JSON: {e}")))?;
        Self::from_value(json)
    }

    /// Reads and parses a `config_fed_server.json` file.
    ///
    /// # Errors
    ///
    /// [`ServerError::Io`] when the file cannot be read; as [`ServerJobConfig::from_json`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ServerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ServerError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ServerError::Config(reason) => {
                ServerError::Config(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// Reads an already parsed config (see [`ServerJobConfig::from_json`]).
    ///
    /// # Errors
    ///
    /// As [`ServerJobConfig::from_json`].
    pub fn from_value(json: Json) -> Result<Self, ServerError> {
        let Some(root) = json.as_object() else {
            return Err(ServerError::Config(
                "the config must be an object".to_owned(),
            ));
        };
        let format_version = match root.get("format_version") {
            None => {
                log::warn!("server config has no format_version; reading it as version 2");
                None
            }
            Some(v) if v.as_u64() == Some(2) => Some(2),
            Some(v) => {
                return Err(ServerError::Config(format!(
                    "format_version {v} is not supported (only 2)"
                )))
            }
        };
        let workflows = entries(root, "workflows")?;
        let components = entries(root, "components")?;
        let mut seen = HashSet::new();
        for e in components.iter().chain(&workflows) {
            if !seen.insert(e.id.as_str()) {
                return Err(ServerError::Config(format!("duplicate id {}", e.id)));
            }
        }
        Ok(ServerJobConfig {
            format_version,
            workflows,
            components,
        })
    }

    /// Builds the components (in order), then the workflows.
    ///
    /// # Errors
    ///
    /// [`ServerError::Component`] (unknown class, bad config, failing factory),
    /// [`ServerError::UnknownWorkflowClass`], [`ServerError::WorkflowBuild`],
    /// [`ServerError::Config`]. With [`ServerFactories::skip_unknown`], unknown classes are
    /// skipped instead.
    pub async fn build(&self, factories: &ServerFactories) -> Result<BuiltServerJob, ServerError> {
        let registry = ComponentRegistry::new("config", "server").start();
        for (class, f) in &factories.components {
            registry
                .send(RegisterComponentFactory {
                    class: class.clone(),
                    factory: Arc::clone(f),
                })
                .await
                .map_err(ServerError::gone("ComponentRegistry"))??;
        }
        // Every class the registry can build was registered on purpose: allow them all.
        registry
            .send(SetBuildAuthorizer {
                authorizer: Arc::new(|_node: &Json, _path: &str| Ok(())),
            })
            .await
            .map_err(ServerError::gone("ComponentRegistry"))?;
        let mut components = Vec::with_capacity(self.components.len());
        for entry in &self.components {
            let built = registry
                .send(BuildComponent {
                    config: Json::Object(entry.config.clone()),
                })
                .await
                .map_err(ServerError::gone("ComponentRegistry"))?;
            let component = match built {
                Ok(Some(c)) => c,
                Ok(None) => {
                    log::info!("server config: component {} is disabled", entry.id);
                    continue;
                }
                Err(EngineError::UnknownComponentClass(class)) if factories.skip_unknown => {
                    log::warn!(
                        "server config: component {} of unknown class {class} skipped",
                        entry.id
                    );
                    continue;
                }
                Err(source) => {
                    return Err(ServerError::Component {
                        id: entry.id.clone(),
                        source,
                    })
                }
            };
            registry
                .send(AddComponent {
                    id: entry.id.clone(),
                    component: component.clone(),
                })
                .await
                .map_err(ServerError::gone("ComponentRegistry"))?
                .map_err(|source| ServerError::Component {
                    id: entry.id.clone(),
                    source,
                })?;
            components.push((entry.id.clone(), component));
        }
        let by_id: HashMap<String, ComponentRef> = components.iter().cloned().collect();
        let mut workflows: Vec<Box<dyn Workflow>> = Vec::with_capacity(self.workflows.len());
        for entry in &self.workflows {
            if entry.disabled() {
                log::info!("server config: workflow {} is disabled", entry.id);
                continue;
            }
            let (class, factory) = match factories.workflow_factory(&entry.config) {
                Ok(found) => found,
                Err(ServerError::UnknownWorkflowClass(class)) if factories.skip_unknown => {
                    log::warn!(
                        "server config: workflow {} of unknown class {class} skipped",
                        entry.id
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            let args = match entry.config.get("args") {
                None | Some(Json::Null) => JsonMap::new(),
                Some(Json::Object(a)) => a.clone(),
                Some(_) => {
                    return Err(ServerError::Config(format!(
                        "args of workflow {} must be an object",
                        entry.id
                    )))
                }
            };
            let wf_args = WorkflowArgs {
                id: entry.id.clone(),
                class: class.clone(),
                args,
                components: by_id.clone(),
            };
            let built = std::panic::catch_unwind(AssertUnwindSafe(|| factory(wf_args)))
                .unwrap_or_else(|_| Err("the factory panicked".to_owned()));
            match built {
                Ok(w) => workflows.push(w),
                Err(reason) => {
                    return Err(ServerError::WorkflowBuild {
                        id: entry.id.clone(),
                        class,
                        reason,
                    })
                }
            }
        }
        Ok(BuiltServerJob {
            workflows,
            components,
        })
    }
}

// ---- argument readers ------------------------------------------------------------------------

/// Reads typed arguments and remembers which ones were read, to log the others.
struct Args<'a> {
    owner: &'a str,
    args: &'a JsonMap<String, Json>,
    used: HashSet<&'static str>,
}

impl<'a> Args<'a> {
    fn new(owner: &'a str, args: &'a JsonMap<String, Json>) -> Self {
        Args {
            owner,
            args,
            used: HashSet::new(),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Json> {
        self.used.insert(key);
        self.args.get(key).filter(|v| !v.is_null())
    }

    fn uint(&mut self, key: &'static str, default: u64) -> Result<u64, String> {
        let owner = self.owner;
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| format!("{owner}: {key} must be a non-negative integer, got {v}")),
        }
    }

    fn u32(&mut self, key: &'static str, default: u32) -> Result<u32, String> {
        let owner = self.owner;
        let v = self.uint(key, u64::from(default))?;
        u32::try_from(v).map_err(|_| format!("{owner}: {key} = {v} is too large"))
    }

    fn seconds(&mut self, key: &'static str) -> Result<Duration, String> {
        let owner = self.owner;
        match self.get(key) {
            None => Ok(Duration::ZERO),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .and_then(|f| Duration::try_from_secs_f64(f).ok())
                .ok_or_else(|| format!("{owner}: {key} must be a number of seconds >= 0, got {v}")),
        }
    }

    fn string(&mut self, key: &'static str, default: &str) -> Result<String, String> {
        let owner = self.owner;
        match self.get(key) {
            None => Ok(default.to_owned()),
            Some(Json::String(s)) => Ok(s.clone()),
            Some(v) => Err(format!("{owner}: {key} must be a string, got {v}")),
        }
    }

    fn boolean(&mut self, key: &'static str, default: bool) -> Result<bool, String> {
        let owner = self.owner;
        match self.get(key) {
            None => Ok(default),
            Some(Json::Bool(b)) => Ok(*b),
            Some(v) => Err(format!("{owner}: {key} must be true or false, got {v}")),
        }
    }

    /// Logs the arguments nobody read.
    fn finish(self) {
        for key in self.args.keys() {
            if !self.used.contains(key.as_str()) {
                log::warn!(
                    "{}: argument {key} is not supported by fedrun; ignored",
                    self.owner
                );
            }
        }
    }
}

fn build_sag(wf: WorkflowArgs) -> Result<Box<dyn Workflow>, String> {
    let owner = format!("workflow {}", wf.id);
    let mut a = Args::new(&owner, &wf.args);
    let min_clients = usize::try_from(a.uint("min_clients", 1000)?)
        .map_err(|_| format!("{owner}: min_clients is too large"))?;
    let num_rounds = a.u32("num_rounds", 5)?;
    let start_round = a.u32("start_round", 0)?;
    let wait = a.seconds("wait_time_after_min_received")?;
    let aggregator_id = a.string("aggregator_id", "aggregator")?;
    let persistor_id = a.string("persistor_id", "persistor")?;
    let generator_id = a.string("shareable_generator_id", "shareable_generator")?;
    let train_task_name = a.string("train_task_name", "train")?;
    let train_timeout = a.seconds("train_timeout")?;
    let persist_every = a.u32("persist_every_n_rounds", 1)?;
    let stream_threshold = a.uint("stream_threshold", crate::sag::DEFAULT_STREAM_THRESHOLD)?;
    a.finish();
    let aggregator = wf.aggregator(&aggregator_id)?;
    let persistor = wf.persistor(&persistor_id)?;
    if wf.components.contains_key(&generator_id) {
        wf.component::<FullModelShareableGenerator>(&generator_id)
            .map_err(|e| format!("{e}; fedrun's scatter-and-gather sends full models only"))?;
    } else {
        log::warn!("{owner}: no shareable generator {generator_id:?}; full models are sent");
    }
    let mut config = SagConfig::new(min_clients, num_rounds)
        .with_start_round(start_round)
        .with_wait_time_after_min_received(wait)
        .with_train_task_name(train_task_name)
        .with_train_timeout(train_timeout)
        .with_persist_every_n_rounds(persist_every)
        .with_stream_threshold(stream_threshold);
    config.aggregator_id = aggregator_id;
    Ok(Box::new(
        ScatterAndGather::new(config, aggregator, persistor).with_id(wf.id.as_str()),
    ))
}

fn build_fedavg(args: BuildArgs) -> Result<SharedAggregator, String> {
    let owner = INTIME_AGGREGATOR_CLASS
        .rsplit('.')
        .next()
        .unwrap_or("aggregator");
    let mut a = Args::new(owner, &args.args);
    let kind = a.string("expected_data_kind", "WEIGHT_DIFF")?;
    let kind = match DataKind::from_name(&kind) {
        k @ (DataKind::Weights | DataKind::WeightDiff) => k,
        other => {
            return Err(format!(
                "{owner}: expected_data_kind {other} is not WEIGHTS or WEIGHT_DIFF"
            ))
        }
    };
    let weigh_by_local_iter = a.boolean("weigh_by_local_iter", true)?;
    let mut aggregation_weights = HashMap::new();
    match a.get("aggregation_weights") {
        None => {}
        Some(Json::Object(m)) => {
            for (client, w) in m {
                let w = w.as_f64().ok_or_else(|| {
                    format!("{owner}: aggregation weight of {client} is not a number")
                })?;
                aggregation_weights.insert(client.clone(), w);
            }
        }
        Some(v) => {
            return Err(format!(
                "{owner}: aggregation_weights must be an object, got {v}"
            ))
        }
    }
    if a.get("exclude_vars").is_some() {
        return Err(format!("{owner}: exclude_vars is not supported by fedrun"));
    }
    a.finish();
    Ok(SharedAggregator(Arc::new(FedAvg {
        expected_kind: Some(kind),
        aggregation_weights,
        weigh_by_local_iter,
    })))
}

fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn build_npy_persistor(base: &Path, args: &BuildArgs) -> Result<SharedPersistor, String> {
    let mut a = Args::new("NpyModelPersistor", &args.args);
    let dir = resolve(base, &a.string("dir", "models")?);
    let initial = a.get("initial_model").cloned();
    a.finish();
    let mut persistor = NpyPersistor::new(dir);
    match initial {
        None => {}
        Some(Json::String(path)) => persistor = persistor.with_initial_dir(resolve(base, &path)),
        Some(v) => {
            return Err(format!(
                "NpyModelPersistor: initial_model must be a path, got {v}"
            ))
        }
    }
    Ok(SharedPersistor(Arc::new(persistor)))
}

/// NVFlare's `NPModelPersistor` (see [`NpModelPersistor`]): `model_dir`, `model_name`,
/// `model` and `source_ckpt_file_full_name`, relative to `base` (the job's run directory).
fn build_np_model_persistor(base: &Path, args: &BuildArgs) -> Result<SharedPersistor, String> {
    let mut a = Args::new("NPModelPersistor", &args.args);
    let dir = a.string("model_dir", NP_DEFAULT_MODEL_DIR)?;
    let name = a.string("model_name", NP_DEFAULT_MODEL_NAME)?;
    let model = a.get("model").cloned();
    let ckpt = a.get("source_ckpt_file_full_name").cloned();
    a.finish();
    let mut persistor = NpModelPersistor::new(base, &dir, &name).map_err(|e| e.to_string())?;
    if let Some(model) = model {
        persistor = persistor
            .with_model_list(&model)
            .map_err(|e| e.to_string())?;
    }
    match ckpt {
        None => {}
        Some(Json::String(s)) if s.is_empty() => {}
        Some(Json::String(s)) => persistor = persistor.with_source_ckpt(&s),
        Some(v) => {
            return Err(format!(
                "NPModelPersistor: source_ckpt_file_full_name must be a path, got {v}"
            ))
        }
    }
    Ok(SharedPersistor(Arc::new(persistor)))
}
