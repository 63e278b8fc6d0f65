//! The client app's job config (NVFlare's `config_fed_client.json`), read and built.
//!
//! A client job is described by one JSON file: the components the job needs, the executors that
//! do its tasks and the task names each one handles, and (in NVFlare) filters on task data and
//! results. This module reads that file into a [`ClientJobConfig`], checking its shape before
//! anything is built, and [`ClientJobConfig::build`] turns it into live objects on an engine:
//! every component is built through the engine's factories and registered under its id, every
//! executor is built the same way, and the result is the [`TaskRouter`] the client runner uses.
//!
//! The format (format version 2):
//!
//! ```json
//! {
//!   "format_version": 2,
//!   "executors": [
//!     {"tasks": ["train", "submit_model"],
//!      "executor": {"id": "trainer", "path": "my.Trainer", "args": {"lr": 0.01}}}
//!   ],
//!   "components": [{"id": "shuffler", "name": "Shuffler", "args": {}}],
//!   "task_data_filters": [],
//!   "task_result_filters": []
//! }
//! ```
//!
//! Filters are not implemented yet: empty filter lists are accepted, any filter is refused with
//! [`EngineError::NotSupportedYet`] rather than silently ignored.

use std::collections::HashSet;

use serde_json::Value as Json;

use crate::error::EngineError;
use crate::executor::{executor_of, TaskRouter};
use crate::handle::EngineHandle;

/// The only format version this reader accepts.
pub const CLIENT_CONFIG_FORMAT_VERSION: i64 = 2;

/// Top-level keys of the config that name filter lists.
const FILTER_KEYS: [&str; 2] = ["task_data_filters", "task_result_filters"];

/// Top-level keys the reader knows.
const KNOWN_KEYS: [&str; 5] = [
    "format_version",
    "executors",
    "components",
    "task_data_filters",
    "task_result_filters",
];

/// One entry of `components`: its id and its config (the whole entry, as `BuildComponent` takes
/// it: `path` / `class_path` / `name`, `args`, `disabled`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentSpec {
    /// The component's id (unique in the job).
    pub id: String,
    /// The entry, given to `BuildComponent` as is.
    pub config: Json,
}

/// One entry of `executors`: the task names and the executor's config.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecutorSpec {
    /// The task names this executor does (exact names, or `"*"` for every other task).
    pub tasks: Vec<String>,
    /// The executor's component id, when the config gives one (it is then registered as a
    /// component under that id).
    pub id: Option<String>,
    /// The `executor` object, given to `BuildComponent` as is.
    pub config: Json,
}

/// A client app's job config (`config_fed_client.json`), checked but not built yet.
///
/// Checks made by [`from_json`](ClientJobConfig::from_json), all before anything is built:
/// `format_version` is 2; `components` and `executors` are lists of objects; each component has a
/// non-empty string `id`, unique; each executor has a non-empty `tasks` list of non-empty strings
/// and an `executor` object; each config names its class (`path`, `class_path` or `name`); no task
/// is routed twice; the filter lists are absent or empty. Unknown top-level keys are logged and
/// ignored.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use fedrun_cell::Network;
/// use fedrun_core::Shareable;
/// use fedrun_engine::{
///     executor_factory, executor_fn, ClientEngine, ClientJobConfig, RegisterComponentFactory,
///     SetBuildAuthorizer,
/// };
///
/// let config = ClientJobConfig::from_json(r#"{
///     "format_version": 2,
///     "executors": [{"tasks": ["train"], "executor": {"id": "t", "path": "my.Trainer", "args": {}}}],
///     "components": [],
///     "task_result_filters": [],
///     "task_data_filters": []
/// }"#).unwrap();
/// assert_eq!(config.executors[0].tasks, vec!["train"]);
///
/// actix::System::new().block_on(async {
///     let engine = ClientEngine::builder("site-1", "job-1").start(&Network::new()).await.unwrap();
///     // The application decides which classes exist and which configs may be built.
///     let trainer = executor_factory(|_args| {
///         Ok(executor_fn(|_, task: Shareable, _, _| async move { Ok::<_, String>(task) }))
///     });
///     engine.send(RegisterComponentFactory { class: "my.Trainer".into(), factory: trainer })
///         .await.unwrap().unwrap();
///     engine.send(SetBuildAuthorizer { authorizer: Arc::new(|_, _| Ok(())) }).await.unwrap();
///
///     let router = config.build(&engine).await.unwrap();
///     assert!(router.route("train").is_some());
///     assert!(engine.get_component("t").await.unwrap().is_some());
/// });
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ClientJobConfig {
    /// The format version (always [`CLIENT_CONFIG_FORMAT_VERSION`] once read).
    pub format_version: i64,
    /// The components, in file order (built in this order, before the executors).
    pub components: Vec<ComponentSpec>,
    /// The executors, in file order.
    pub executors: Vec<ExecutorSpec>,
}

fn bad(message: impl Into<String>) -> EngineError {
    EngineError::BadJobConfig(message.into())
}

/// The class a config names (for messages), or an error when it names none.
fn class_of(config: &serde_json::Map<String, Json>, what: &str) -> Result<String, EngineError> {
    for key in ["path", "class_path", "name"] {
        if let Some(value) = config.get(key) {
            return match value.as_str() {
                Some(s) if !s.is_empty() => Ok(s.to_owned()),
                _ => Err(bad(format!("{what}: '{key}' must be a non-empty string"))),
            };
        }
    }
    Err(bad(format!(
        "{what}: the config must name its class with 'path', 'class_path' or 'name'"
    )))
}

/// The list under `key`, or an empty one when the key is absent or null.
fn list<'a>(top: &'a serde_json::Map<String, Json>, key: &str) -> Result<&'a [Json], EngineError> {
    match top.get(key) {
        None | Some(Json::Null) => Ok(&[]),
        Some(Json::Array(items)) => Ok(items),
        Some(_) => Err(bad(format!("'{key}' must be a list"))),
    }
}

impl ClientJobConfig {
    /// Reads and checks a config from its JSON text (see the type's doc for the checks).
    pub fn from_json(text: &str) -> Result<Self, EngineError> {
        let value: Json =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        Self::from_value(&value)
    }

    /// Reads and checks a config from parsed JSON.
    pub fn from_value(value: &Json) -> Result<Self, EngineError> {
        let Some(top) = value.as_object() else {
            return Err(bad("the config must be a JSON object"));
        };
        let format_version = match top.get("format_version") {
            None => return Err(bad("missing format_version")),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| bad(format!("format_version must be an integer, got {v}")))?,
        };
        if format_version != CLIENT_CONFIG_FORMAT_VERSION {
            return Err(EngineError::NotSupportedYet(format!(
                "format_version {format_version} (only {CLIENT_CONFIG_FORMAT_VERSION} is)"
            )));
        }
        for key in FILTER_KEYS {
            let filters = list(top, key)?;
            if !filters.is_empty() {
                return Err(EngineError::NotSupportedYet(format!(
                    "{key} ({} configured; filters are)",
                    filters.len()
                )));
            }
        }
        for key in top.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                // NVFlare reads every other top-level key as a configuration variable
                // (`np_download_chunk_size`, `app_script`, ...), used by substitutions and
                // by the job process, not as a section to build.
                log::debug!("client job config: top-level key '{key}' is a configuration variable");
            }
        }

        let mut ids = HashSet::new();
        let mut components = Vec::new();
        for (i, entry) in list(top, "components")?.iter().enumerate() {
            let what = format!("components[{i}]");
            let Some(obj) = entry.as_object() else {
                return Err(bad(format!("{what} must be an object")));
            };
            let id = match obj.get("id").and_then(Json::as_str) {
                Some(id) if !id.is_empty() => id.to_owned(),
                _ => return Err(bad(format!("{what} needs a non-empty string 'id'"))),
            };
            class_of(obj, &format!("{what} ({id})"))?;
            if !ids.insert(id.clone()) {
                return Err(EngineError::DuplicateComponent(id));
            }
            components.push(ComponentSpec {
                id,
                config: entry.clone(),
            });
        }

        let mut tasks_seen = HashSet::new();
        let mut executors = Vec::new();
        for (i, entry) in list(top, "executors")?.iter().enumerate() {
            let what = format!("executors[{i}]");
            let Some(obj) = entry.as_object() else {
                return Err(bad(format!("{what} must be an object")));
            };
            let tasks = match obj.get("tasks") {
                Some(Json::Array(items)) if !items.is_empty() => items
                    .iter()
                    .map(|t| match t.as_str() {
                        Some(s) if !s.is_empty() => Ok(s.to_owned()),
                        _ => Err(bad(format!(
                            "{what}: every task name must be a non-empty string, got {t}"
                        ))),
                    })
                    .collect::<Result<Vec<String>, EngineError>>()?,
                _ => return Err(bad(format!("{what} needs a non-empty 'tasks' list"))),
            };
            for task in &tasks {
                if !tasks_seen.insert(task.clone()) {
                    return Err(EngineError::DuplicateTaskRoute(task.clone()));
                }
            }
            let Some(config) = obj.get("executor") else {
                return Err(bad(format!("{what} needs an 'executor' object")));
            };
            let Some(exec_obj) = config.as_object() else {
                return Err(bad(format!("{what}: 'executor' must be an object")));
            };
            let id = match exec_obj.get("id") {
                None | Some(Json::Null) => None,
                Some(Json::String(id)) if !id.is_empty() => Some(id.clone()),
                Some(other) => {
                    return Err(bad(format!(
                        "{what}: executor 'id' must be a non-empty string, got {other}"
                    )))
                }
            };
            class_of(exec_obj, &format!("{what} executor"))?;
            if let Some(id) = &id {
                if !ids.insert(id.clone()) {
                    return Err(EngineError::DuplicateComponent(id.clone()));
                }
            }
            executors.push(ExecutorSpec {
                tasks,
                id,
                config: config.clone(),
            });
        }

        Ok(ClientJobConfig {
            format_version,
            components,
            executors,
        })
    }

    /// Builds the job on `engine` and returns its task router.
    ///
    /// Components first, in file order: each is built with `BuildComponent` (so the engine needs
    /// a factory for its class and a build authorizer) and registered with `AddComponent` under
    /// its id (which also subscribes it to events when it handles them); a disabled one is
    /// skipped. Then the executors: each is built the same way and must be an
    /// [`ExecutorComponent`](crate::ExecutorComponent) (register its factory with
    /// [`executor_factory`](crate::executor_factory)); one with an `id` is registered as a
    /// component, one without is subscribed to events directly when it handles them; a disabled
    /// executor is skipped with a warning, so its tasks stay unknown.
    ///
    /// Errors stop the build at the first failure, with what was registered so far left in
    /// place: the engine's build errors, [`EngineError::DuplicateComponent`], and
    /// [`EngineError::BadJobConfig`] for an executor config that builds something else.
    pub async fn build(&self, engine: &EngineHandle) -> Result<TaskRouter, EngineError> {
        let prefix = format!("[job={} site={}]", engine.job_id(), engine.site());
        for spec in &self.components {
            match engine.build_component(spec.config.clone()).await? {
                Some(component) => {
                    engine.add_component(&spec.id, component).await?;
                    log::debug!("{prefix} job config: component {} built", spec.id);
                }
                None => log::info!("{prefix} job config: component {} is disabled", spec.id),
            }
        }
        let mut router = TaskRouter::new();
        for spec in &self.executors {
            let Some(component) = engine.build_component(spec.config.clone()).await? else {
                log::warn!(
                    "{prefix} job config: the executor of tasks {:?} is disabled; those tasks \
                     will be answered TASK_UNKNOWN",
                    spec.tasks
                );
                continue;
            };
            let Some(executor) = executor_of(&component) else {
                let class = spec
                    .config
                    .as_object()
                    .and_then(|o| class_of(o, "executor").ok())
                    .unwrap_or_default();
                return Err(bad(format!(
                    "the executor of tasks {:?} (class {class}) built a {}, not an executor; \
                     register its factory with executor_factory",
                    spec.tasks,
                    component.type_name()
                )));
            };
            match &spec.id {
                Some(id) => engine.add_component(id, component).await?,
                None => {
                    if let Some(handler) = component.as_event_handler() {
                        engine.add_handler(handler).await?;
                    }
                }
            }
            router.add(spec.tasks.iter().cloned(), executor)?;
            log::info!(
                "{prefix} job config: executor for tasks {:?} built",
                spec.tasks
            );
        }
        Ok(router)
    }
}
