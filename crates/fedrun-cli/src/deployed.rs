//! A job as NVFlare's client parent deploys it, loaded for `fedrun job` (the client job).
//!
//! In a real deployment NVFlare's client parent unpacks each job into its workspace and starts
//! a client job process for it. The layout it leaves, and what this module reads:
//!
//! - `<workspace>/<job_id>/` — the job's run directory (NVFlare's `get_run_dir`); the numpy
//!   trainer keeps its local model under it;
//! - `<workspace>/<job_id>/meta.json` — the job meta: `name`, `job_clients`, `launcher_spec`
//!   (optional: a missing file reads as an empty meta);
//! - `<workspace>/<job_id>/app_<site>/config/config_fed_client.<ext>` — the site's client app
//!   config, found as NVFlare finds it: for each extension in NVFlare's order (`.json`, `.conf`,
//!   `.yml`, `.yaml`, then the same with `.default`), the config directory and its
//!   subdirectories; the first match wins. `.conf` is HOCON ([`crate::hocon`]); YAML is refused.
//!
//! The config's variable references are resolved as NVFlare does ([`crate::config_vars`], with
//! the system variables `SITE_NAME`, `WORKSPACE`, `JOB_ID`, `SECURE_MODE`, `JOB_CUSTOM_DIR`,
//! `JOB_CONFIG_DIR` and the ones [`DeployOptions::sys_vars`] adds). Components that NVFlare's
//! client parent injects into every deployed config for its own services (the
//! [`INJECTED_CLASSES`], e.g. the `JobLogStreamer` of the POC's `SiteLogStreamer`) are dropped
//! with an info log. Every other component and executor must name a class fedrun can build;
//! the first that does not fails the load with one message naming its class and id.
//!
//! `--set k=v` overrides (NVFlare's `args.set`) do not take part in the substitution (NVFlare
//! only hands them to its config service); here they are read for the configuration variables
//! this module exposes ([`DeployedJob::np_download_chunk_size`]) and for `secure_train`.

use std::path::{Path, PathBuf};

use fedrun_engine::{ClientJobConfig, EngineHandle, SetBuildAuthorizer, TaskRouter};
use serde_json::{json, Map as JsonMap, Value as Json};

use crate::config_vars::{python_str, substitute};
use crate::error::CliError;
use crate::factories::{builtin_client_classes, register_builtin_client_factories};

/// The client app config's base name.
pub const CLIENT_CONFIG_BASENAME: &str = "config_fed_client";
/// NVFlare's config extensions, in its search order.
pub const CONFIG_EXTENSIONS: [&str; 8] = [
    ".json",
    ".conf",
    ".yml",
    ".yaml",
    ".json.default",
    ".conf.default",
    ".yml.default",
    ".yaml.default",
];
/// Classes NVFlare's client parent injects into deployed configs for its own services; fedrun
/// drops their components (by the class's last segment).
pub const INJECTED_CLASSES: [&str; 1] =
    ["nvflare.app_common.logging.job_log_streamer.JobLogStreamer"];
/// The configuration variable of the numpy download chunk size (the numpy decomposer's `np_`
/// prefix on `download_chunk_size`).
pub const NP_DOWNLOAD_CHUNK_SIZE: &str = "np_download_chunk_size";
/// NVFlare's default numpy download chunk size (2 MiB), used when the variable is not set.
pub const NP_DOWNLOAD_CHUNK_SIZE_DEFAULT: u64 = 2 * 1024 * 1024;
/// The environment prefix of NVFlare's configuration variables.
pub const ENV_VAR_PREFIX: &str = "NVFLARE_";
/// The largest config or meta file read (16 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// How deep the config directory is searched.
const MAX_SEARCH_DEPTH: usize = 8;

/// What a load may add to what the deployment says.
#[derive(Clone, Debug, Default)]
pub struct DeployOptions {
    /// NVFlare's `--set k=v` overrides, as given on the command line.
    pub set: Vec<String>,
    /// The classes the engine will have factories for; empty: fedrun's built-in client classes
    /// ([`builtin_client_classes`]).
    pub known_classes: Vec<String>,
    /// More system variables (e.g. `ROOT_URL`, `CP_URL`, `RELAY_URL`); they win over the
    /// built-in ones.
    pub sys_vars: JsonMap<String, Json>,
}

/// A component of the deployed config that was dropped as injected by the client parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredComponent {
    /// The component's id.
    pub id: String,
    /// Its class.
    pub class: String,
}

/// A deployed job, read and checked (see the module doc); nothing is built yet.
///
/// # Example
/// ```
/// use fedrun_cli::deployed::DeployedJob;
///
/// let ws = std::env::temp_dir().join(format!("deployed-doc-{}", std::process::id()));
/// let config = ws.join("job-1/app_site-1/config");
/// std::fs::create_dir_all(&config).unwrap();
/// std::fs::write(config.join("config_fed_client.json"), r#"{"format_version": 2,
///     "executors": [{"tasks": ["train"],
///                    "executor": {"path": "nvflare.app_common.np.np_trainer.NPTrainer"}}]}"#)
///     .unwrap();
/// let job = DeployedJob::load(&ws, "job-1", "site-1").unwrap();
/// assert_eq!(job.client_config.executors[0].tasks, vec!["train"]);
/// assert_eq!(job.run_dir, ws.join("job-1"));
/// # std::fs::remove_dir_all(&ws).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct DeployedJob {
    /// The job id.
    pub job_id: String,
    /// This site's name.
    pub site: String,
    /// The site's workspace root.
    pub workspace: PathBuf,
    /// `<workspace>/<job_id>`.
    pub run_dir: PathBuf,
    /// `<run_dir>/app_<site>`.
    pub app_dir: PathBuf,
    /// The config file that was read.
    pub config_path: PathBuf,
    /// The config after substitution, without the injected components.
    pub config: Json,
    /// The config, checked, ready for [`ClientJobConfig::build`].
    pub client_config: ClientJobConfig,
    /// The job meta (`{}` without `meta.json`).
    pub meta: Json,
    /// The meta's `name`.
    pub name: Option<String>,
    /// The meta's `job_clients` (NVFlare's client dicts, or names), when present.
    pub job_clients: Option<Vec<Json>>,
    /// The meta's `launcher_spec`, when present.
    pub launcher_spec: Option<Json>,
    /// `np_download_chunk_size` when configured (`--set`, the config, or the environment as
    /// `NVFLARE_NP_DOWNLOAD_CHUNK_SIZE`, in NVFlare's order); `None`: NVFlare's default,
    /// [`NP_DOWNLOAD_CHUNK_SIZE_DEFAULT`].
    pub np_download_chunk_size: Option<u64>,
    /// The components dropped as injected by the client parent.
    pub ignored_components: Vec<IgnoredComponent>,
}

impl DeployedJob {
    /// Loads the job `job_id` of `site` from `workspace` with default options.
    pub fn load(workspace: &Path, job_id: &str, site: &str) -> Result<Self, CliError> {
        Self::load_with(workspace, job_id, site, &DeployOptions::default())
    }

    /// Loads the job with `options` (see the module doc for what is read and checked).
    pub fn load_with(
        workspace: &Path,
        job_id: &str,
        site: &str,
        options: &DeployOptions,
    ) -> Result<Self, CliError> {
        let prefix = format!("[job={job_id} site={site}]");
        let run_dir = workspace.join(job_id);
        let app_dir = run_dir.join(format!("app_{site}"));
        let config_dir = app_dir.join("config");
        let config_path = find_config(&config_dir)?;
        let bad = |reason: String| CliError::BadJob {
            path: config_path.clone(),
            reason,
        };
        let text = read_limited(&config_path)?;
        let mut config = if is_hocon(&config_path) {
            crate::hocon::parse(&text).map_err(|e| bad(e.to_string()))?
        } else {
            serde_json::from_str(&text).map_err(|source| CliError::Json {
                path: config_path.clone(),
                source,
            })?
        };
        if !config.is_object() {
            return Err(bad("the config must be an object".to_owned()));
        }
        let set = parse_set(&options.set)?;
        let secure = set.get("secure_train").cloned().unwrap_or(Json::Bool(true));
        let mut sys_vars = JsonMap::new();
        sys_vars.insert("SITE_NAME".into(), json!(site));
        sys_vars.insert("WORKSPACE".into(), json!(workspace.display().to_string()));
        sys_vars.insert("JOB_ID".into(), json!(job_id));
        sys_vars.insert("SECURE_MODE".into(), secure);
        let custom = app_dir.join("custom").display().to_string();
        sys_vars.insert("JOB_CUSTOM_DIR".into(), json!(custom));
        sys_vars.insert(
            "JOB_CONFIG_DIR".into(),
            json!(config_dir.display().to_string()),
        );
        sys_vars.extend(options.sys_vars.clone());
        substitute(&mut config, &sys_vars, true).map_err(bad)?;

        let ignored_components = drop_injected(&mut config, &prefix);
        let known = if options.known_classes.is_empty() {
            builtin_client_classes()
        } else {
            options.known_classes.clone()
        };
        check_classes(&config, &known).map_err(bad)?;
        let client_config = ClientJobConfig::from_value(&config).map_err(|e| bad(e.to_string()))?;
        let np_download_chunk_size = chunk_size(&set, &config).map_err(bad)?;

        let meta_path = run_dir.join("meta.json");
        let meta = if meta_path.is_file() {
            serde_json::from_str(&read_limited(&meta_path)?).map_err(|source| CliError::Json {
                path: meta_path.clone(),
                source,
            })?
        } else {
            log::info!("{prefix} no {}: empty job meta", meta_path.display());
            json!({})
        };
        let meta_bad = |reason: String| CliError::BadJob {
            path: meta_path.clone(),
            reason,
        };
        if !meta.is_object() {
            return Err(meta_bad("the meta must be an object".to_owned()));
        }
        let name = match meta.get("name") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(v) => return Err(meta_bad(format!("'name' must be a string, got {v}"))),
        };
        let job_clients = match meta.get("job_clients") {
            None | Some(Json::Null) => None,
            Some(Json::Array(a)) => Some(a.clone()),
            Some(v) => return Err(meta_bad(format!("'job_clients' must be a list, got {v}"))),
        };
        let launcher_spec = meta.get("launcher_spec").filter(|v| !v.is_null()).cloned();
        log::info!(
            "{prefix} loaded deployed job {} from {}",
            name.as_deref().unwrap_or("(unnamed)"),
            config_path.display()
        );
        Ok(Self {
            job_id: job_id.to_owned(),
            site: site.to_owned(),
            workspace: workspace.to_owned(),
            run_dir,
            app_dir,
            config_path,
            config,
            client_config,
            meta,
            name,
            job_clients,
            launcher_spec,
            np_download_chunk_size,
            ignored_components,
        })
    }

    /// The names of the meta's `job_clients` (a dict's `name`, or a plain string).
    pub fn job_client_names(&self) -> Option<Vec<String>> {
        let clients = self.job_clients.as_ref()?;
        Some(
            clients
                .iter()
                .filter_map(|c| match c {
                    Json::String(s) => Some(s.clone()),
                    other => other.get("name").and_then(Json::as_str).map(str::to_owned),
                })
                .collect(),
        )
    }

    /// Makes the job's executors on `engine` (started for this job and site): registers the
    /// built-in client classes (numpy executors keeping their models under [`Self::run_dir`],
    /// the logistic-regression trainer), allows every registered class to be built, and builds
    /// the config. Register your own classes on the engine first; they win over the built-ins
    /// only if registered after this call's registrations, so register extras afterwards and
    /// build with [`ClientJobConfig::build`] yourself when you need that.
    pub async fn build(&self, engine: &EngineHandle) -> Result<TaskRouter, CliError> {
        let engine_err = |source| CliError::Engine {
            site: self.site.clone(),
            source,
        };
        register_builtin_client_factories(engine, &self.run_dir)
            .await
            .map_err(engine_err)?;
        engine
            .send(SetBuildAuthorizer {
                authorizer: std::sync::Arc::new(|_node: &Json, _path: &str| Ok(())),
            })
            .await
            .map_err(engine_err)?;
        self.client_config.build(engine).await.map_err(engine_err)
    }
}

/// The first `config_fed_client.<ext>` in NVFlare's search order.
fn find_config(dir: &Path) -> Result<PathBuf, CliError> {
    for ext in CONFIG_EXTENSIONS {
        let name = format!("{CLIENT_CONFIG_BASENAME}{ext}");
        if let Some(found) = search(dir, &name, 0) {
            if ext.starts_with(".yml") || ext.starts_with(".yaml") {
                return Err(CliError::BadJob {
                    path: found,
                    reason: "YAML job configs are not supported by fedrun".to_owned(),
                });
            }
            return Ok(found);
        }
    }
    Err(CliError::BadJob {
        path: dir.to_owned(),
        reason: format!(
            "no {CLIENT_CONFIG_BASENAME}[{}] in the app's config directory",
            CONFIG_EXTENSIONS.join("|")
        ),
    })
}

/// `dir/name`, else the same in `dir`'s subdirectories (sorted), depth first.
fn search(dir: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    let here = dir.join(name);
    if here.is_file() {
        return Some(here);
    }
    if depth >= MAX_SEARCH_DEPTH {
        return None;
    }
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    subdirs.iter().find_map(|d| search(d, name, depth + 1))
}

fn is_hocon(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    name.is_some_and(|n| n.ends_with(".conf") || n.ends_with(".conf.default"))
}

/// Reads a text file of at most [`MAX_CONFIG_BYTES`].
fn read_limited(path: &Path) -> Result<String, CliError> {
    let len = std::fs::metadata(path)
        .map_err(|e| CliError::io("cannot read", path, e))?
        .len();
    if len > MAX_CONFIG_BYTES {
        return Err(CliError::BadJob {
            path: path.to_owned(),
            reason: format!("{len} bytes is more than a config may have ({MAX_CONFIG_BYTES})"),
        });
    }
    std::fs::read_to_string(path).map_err(|e| CliError::io("cannot read", path, e))
}

/// NVFlare's `parse_vars`: `k=v`, the value an int, else a float, else a bool, else a string.
fn parse_set(items: &[String]) -> Result<JsonMap<String, Json>, CliError> {
    let mut out = JsonMap::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            return Err(CliError::BadOption {
                option: "set",
                reason: format!("'{item}' is not key=value"),
            });
        };
        let (k, v) = (k.trim(), v.trim());
        let value = if let Ok(i) = v.parse::<i64>() {
            json!(i)
        } else if let Some(f) = v.parse::<f64>().ok().filter(|f| f.is_finite()) {
            json!(f)
        } else {
            match v.to_ascii_lowercase().as_str() {
                "true" | "t" | "yes" | "y" | "on" | "1" => json!(true),
                "false" | "f" | "no" | "n" | "off" | "0" => json!(false),
                _ => json!(v),
            }
        };
        out.insert(k.to_owned(), value);
    }
    Ok(out)
}

/// The class a component config names (`path`, `class_path`, then `name`).
fn class_of(config: &Json) -> Option<&str> {
    ["path", "class_path", "name"]
        .iter()
        .find_map(|k| config.get(*k))
        .and_then(Json::as_str)
}

fn last_segment(class: &str) -> &str {
    class.rsplit('.').next().unwrap_or(class)
}

/// Drops the components of [`INJECTED_CLASSES`]; returns them.
fn drop_injected(config: &mut Json, prefix: &str) -> Vec<IgnoredComponent> {
    let mut ignored = Vec::new();
    let Some(Json::Array(components)) = config.get_mut("components") else {
        return ignored;
    };
    components.retain(|c| {
        let Some(class) = class_of(c) else {
            return true;
        };
        let injected = INJECTED_CLASSES
            .iter()
            .any(|i| last_segment(i) == last_segment(class));
        if injected {
            let id = c.get("id").and_then(Json::as_str).unwrap_or("?").to_owned();
            log::info!(
                "{prefix} component {id} ({class}) is a service of NVFlare's client parent; \
                 fedrun ignores it"
            );
            ignored.push(IgnoredComponent {
                id,
                class: class.to_owned(),
            });
        }
        !injected
    });
    ignored
}

/// Does `class` resolve among `known` as the registry resolves it (exact, or a short name
/// matching exactly one class's last segment)?
fn is_known(class: &str, known: &[String]) -> bool {
    known.iter().any(|k| k == class)
        || (!class.contains('.') && known.iter().filter(|k| last_segment(k) == class).count() == 1)
}

/// The first component or executor whose class fedrun cannot build, as one message.
fn check_classes(config: &Json, known: &[String]) -> Result<(), String> {
    let enabled = |c: &&Json| c.get("disabled") != Some(&Json::Bool(true));
    if let Some(Json::Array(components)) = config.get("components") {
        for c in components.iter().filter(enabled) {
            if let Some(class) = class_of(c).filter(|class| !is_known(class, known)) {
                let id = c.get("id").map(python_str).unwrap_or_else(|| "?".into());
                return Err(format!(
                    "component '{id}': class {class} has no fedrun implementation"
                ));
            }
        }
    }
    if let Some(Json::Array(executors)) = config.get("executors") {
        for e in executors {
            let Some(executor) = e.get("executor").filter(enabled) else {
                continue;
            };
            if let Some(class) = class_of(executor).filter(|class| !is_known(class, known)) {
                let id = executor.get("id").map(python_str).unwrap_or_else(|| {
                    format!("for tasks {}", e.get("tasks").unwrap_or(&Json::Null))
                });
                return Err(format!(
                    "executor '{id}': class {class} has no fedrun implementation"
                ));
            }
        }
    }
    Ok(())
}

/// `np_download_chunk_size` from `--set`, the config, then `NVFLARE_NP_DOWNLOAD_CHUNK_SIZE`,
/// as Python's `int()` reads it.
fn chunk_size(set: &JsonMap<String, Json>, config: &Json) -> Result<Option<u64>, String> {
    let env = std::env::var(format!(
        "{ENV_VAR_PREFIX}{}",
        NP_DOWNLOAD_CHUNK_SIZE.to_uppercase()
    ))
    .ok()
    .map(Json::String);
    let Some(value) = set
        .get(NP_DOWNLOAD_CHUNK_SIZE)
        .or_else(|| config.get(NP_DOWNLOAD_CHUNK_SIZE).filter(|v| !v.is_null()))
        .cloned()
        .or(env)
    else {
        return Ok(None);
    };
    let n = match &value {
        Json::Bool(b) => Some(i128::from(*b)),
        Json::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_f64().map(|f| f.trunc() as i128)),
        Json::String(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    n.and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| format!("{NP_DOWNLOAD_CHUNK_SIZE} = {value} is not a non-negative integer"))
}
