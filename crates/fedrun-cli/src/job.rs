//! Jobs: NVFlare's job directory layout, read from disk or built in.
//!
//! `fedrun simulate` runs NVFlare-shaped jobs so that a job written for NVFlare's simulator reads
//! the same here. A job directory holds an optional `meta.json` (name, `deploy_map`,
//! `min_clients`, ...) and one app whose `config/` holds `config_fed_client.json` (executors and
//! components of every client) and `config_fed_server.json` (workflows and components of the
//! server). [`JobDefinition::load`] finds the two configs at `DIR/<app>/config/` (the app that
//! `deploy_map` deploys to `@ALL`, else `app`) or at the top level of `DIR`, and parses them.
//!
//! NVFlare lets a config refer to its own top-level values: a string that is exactly `"{name}"`
//! is replaced by the top-level value `name` (keeping its type); [`JobDefinition::load`] resolves
//! these. The simulator then overrides what its options fix: the number of clients
//! (`min_clients` of the ScatterAndGather workflow and of the meta), the number of rounds and,
//! optionally, the trainer's seed.
//!
//! The built-in job ([`JobDefinition::builtin_logreg`]) is the repository's `examples/logreg/`
//! directory, compiled in, so the two cannot drift apart.

use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use crate::error::CliError;

/// The file name of the client app config.
pub const CLIENT_CONFIG_FILE: &str = "config_fed_client.json";
/// The file name of the server app config.
pub const SERVER_CONFIG_FILE: &str = "config_fed_server.json";
/// The file name of the job meta.
pub const META_FILE: &str = "meta.json";
/// The class (last path segment) of the workflow whose rounds and clients the simulator sets.
pub const SCATTER_AND_GATHER: &str = "ScatterAndGather";

const BUILTIN_META: &str = include_str!("../../../examples/logreg/meta.json");
const BUILTIN_CLIENT: &str =
    include_str!("../../../examples/logreg/app/config/config_fed_client.json");
const BUILTIN_SERVER: &str =
    include_str!("../../../examples/logreg/app/config/config_fed_server.json");

/// Where a job came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobSource {
    /// The built-in logistic-regression job.
    BuiltIn,
    /// A job directory.
    Dir(PathBuf),
    /// Configs given in code ([`JobDefinition::from_configs`]).
    Inline,
}

/// A job: its meta and its two app configs, as JSON, ready for the simulator.
///
/// # Example
/// ```
/// use fedrun_cli::job::JobDefinition;
///
/// let mut job = JobDefinition::builtin_logreg().unwrap();
/// job.set_num_rounds(3).unwrap();
/// job.set_min_clients(2).unwrap();
/// assert_eq!(job.num_rounds(), Some(3));
/// assert_eq!(job.name, "logreg");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct JobDefinition {
    /// The job's name (`meta.json` `name`, else the directory name).
    pub name: String,
    /// Where it came from.
    pub source: JobSource,
    /// The job meta (an object; empty when the job has no `meta.json`).
    pub meta: Json,
    /// `config_fed_client.json`.
    pub client_config: Json,
    /// `config_fed_server.json`.
    pub server_config: Json,
}

impl JobDefinition {
    /// The built-in job: `examples/logreg` (logistic regression with FedAvg).
    pub fn builtin_logreg() -> Result<Self, CliError> {
        let path = PathBuf::from("<built-in>/examples/logreg");
        let parse = |file: &str, text: &str| {
            serde_json::from_str::<Json>(text).map_err(|source| CliError::Json {
                path: path.join(file),
                source,
            })
        };
        let meta = parse(META_FILE, BUILTIN_META)?;
        let client = parse(CLIENT_CONFIG_FILE, BUILTIN_CLIENT)?;
        let server = parse(SERVER_CONFIG_FILE, BUILTIN_SERVER)?;
        Self::from_parts(JobSource::BuiltIn, "logreg", meta, client, server, &path)
    }

    /// A job from configs given in code (config variables are resolved as for a directory).
    ///
    /// # Example
    /// ```
    /// use fedrun_cli::job::JobDefinition;
    /// use serde_json::json;
    ///
    /// let client = json!({"format_version": 2, "executors": []});
    /// let server = json!({"format_version": 2, "num_rounds": 2, "workflows": [
    ///     {"id": "sag", "name": "ScatterAndGather", "args": {"num_rounds": "{num_rounds}"}}]});
    /// let job = JobDefinition::from_configs("mine", json!({}), client, server).unwrap();
    /// assert_eq!(job.num_rounds(), Some(2));
    /// ```
    pub fn from_configs(
        name: &str,
        meta: Json,
        client_config: Json,
        server_config: Json,
    ) -> Result<Self, CliError> {
        let path = PathBuf::from(format!("<inline>/{name}"));
        Self::from_parts(
            JobSource::Inline,
            name,
            meta,
            client_config,
            server_config,
            &path,
        )
    }

    /// Reads the job directory `dir` (see the module doc for the layout).
    pub fn load(dir: &Path) -> Result<Self, CliError> {
        if !dir.is_dir() {
            return Err(CliError::BadJob {
                path: dir.to_owned(),
                reason: "not a directory".to_owned(),
            });
        }
        let meta_path = dir.join(META_FILE);
        let meta = if meta_path.exists() {
            read_json(&meta_path)?
        } else {
            json!({})
        };
        let apps = app_candidates(dir, &meta);
        let client_path = find_config(dir, &apps, CLIENT_CONFIG_FILE)?;
        let server_path = find_config(dir, &apps, SERVER_CONFIG_FILE)?;
        let client = read_json(&client_path)?;
        let server = read_json(&server_path)?;
        let fallback = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "job".to_owned());
        Self::from_parts(
            JobSource::Dir(dir.to_owned()),
            &fallback,
            meta,
            client,
            server,
            dir,
        )
    }

    fn from_parts(
        source: JobSource,
        fallback_name: &str,
        meta: Json,
        mut client: Json,
        mut server: Json,
        path: &Path,
    ) -> Result<Self, CliError> {
        let bad = |reason: String| CliError::BadJob {
            path: path.to_owned(),
            reason,
        };
        if !meta.is_object() {
            return Err(bad(format!("{META_FILE} must hold a JSON object")));
        }
        for (file, config) in [
            (CLIENT_CONFIG_FILE, &mut client),
            (SERVER_CONFIG_FILE, &mut server),
        ] {
            if !config.is_object() {
                return Err(bad(format!("{file} must hold a JSON object")));
            }
            substitute_vars(config).map_err(|e| bad(format!("{file}: {e}")))?;
        }
        let name = match meta.get("name") {
            None | Some(Json::Null) => fallback_name.to_owned(),
            Some(Json::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => return Err(bad(format!("meta 'name' must be a string, got {other}"))),
        };
        let job = Self {
            name,
            source,
            meta,
            client_config: client,
            server_config: server,
        };
        job.sag_workflows()
            .map_err(|e| bad(format!("{SERVER_CONFIG_FILE}: {e}")))?;
        Ok(job)
    }

    /// The indices of the ScatterAndGather workflows of the server config.
    fn sag_workflows(&self) -> Result<Vec<usize>, String> {
        let workflows = match self.server_config.get("workflows") {
            Some(Json::Array(w)) => w,
            Some(_) => return Err("'workflows' must be a list".to_owned()),
            None => return Err("no 'workflows'".to_owned()),
        };
        Ok(workflows
            .iter()
            .enumerate()
            .filter(|(_, w)| class_name(w).is_some_and(|c| c == SCATTER_AND_GATHER))
            .map(|(i, _)| i)
            .collect())
    }

    /// Sets `name` in the `args` of every ScatterAndGather workflow; fails when there is none.
    fn set_sag_arg(&mut self, name: &str, value: Json) -> Result<(), CliError> {
        let indices = self.sag_workflows().map_err(|reason| self.bad(reason))?;
        if indices.is_empty() {
            return Err(self.bad(format!(
                "{SERVER_CONFIG_FILE}: no {SCATTER_AND_GATHER} workflow to set '{name}' on"
            )));
        }
        let workflows = self
            .server_config
            .get_mut("workflows")
            .and_then(Json::as_array_mut);
        for (i, workflow) in workflows.into_iter().flatten().enumerate() {
            if !indices.contains(&i) {
                continue;
            }
            let Some(obj) = workflow.as_object_mut() else {
                continue;
            };
            let args = obj.entry("args").or_insert_with(|| json!({}));
            match args.as_object_mut() {
                Some(args) => {
                    args.insert(name.to_owned(), value.clone());
                }
                None => {
                    return Err(CliError::BadJob {
                        path: self.source_path(),
                        reason: format!(
                            "{SERVER_CONFIG_FILE}: workflow {i}: 'args' must be an object"
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    fn source_path(&self) -> PathBuf {
        match &self.source {
            JobSource::BuiltIn => PathBuf::from("<built-in>/examples/logreg"),
            JobSource::Dir(d) => d.clone(),
            JobSource::Inline => PathBuf::from(format!("<inline>/{}", self.name)),
        }
    }

    fn bad(&self, reason: String) -> CliError {
        CliError::BadJob {
            path: self.source_path(),
            reason,
        }
    }

    /// The number of rounds the ScatterAndGather workflow asks for, if it says.
    pub fn num_rounds(&self) -> Option<u64> {
        let indices = self.sag_workflows().ok()?;
        let first = *indices.first()?;
        self.server_config["workflows"][first]["args"]["num_rounds"].as_u64()
    }

    /// The `min_clients` of the ScatterAndGather workflow, if it says.
    pub fn min_clients(&self) -> Option<u64> {
        let indices = self.sag_workflows().ok()?;
        let first = *indices.first()?;
        self.server_config["workflows"][first]["args"]["min_clients"].as_u64()
    }

    /// Sets the number of rounds of the ScatterAndGather workflow.
    pub fn set_num_rounds(&mut self, rounds: u64) -> Result<(), CliError> {
        self.set_sag_arg("num_rounds", json!(rounds))
    }

    /// Sets the workflow's `min_clients` and the meta's `min_clients` to `clients`.
    pub fn set_min_clients(&mut self, clients: usize) -> Result<(), CliError> {
        self.set_sag_arg("min_clients", json!(clients))?;
        if let Some(meta) = self.meta.as_object_mut() {
            meta.insert("min_clients".to_owned(), json!(clients));
        }
        Ok(())
    }

    /// Sets the `seed` argument of every executor whose args have one; returns how many.
    pub fn set_seed(&mut self, seed: u64) -> usize {
        let mut n = 0;
        if let Some(Json::Array(executors)) = self.client_config.get_mut("executors") {
            for entry in executors {
                if let Some(args) = entry
                    .get_mut("executor")
                    .and_then(|e| e.get_mut("args"))
                    .and_then(Json::as_object_mut)
                {
                    if args.contains_key("seed") {
                        args.insert("seed".to_owned(), json!(seed));
                        n += 1;
                    }
                }
            }
        }
        n
    }
}

/// The last segment of the class a component config names (`path`, `class_path` or `name`).
pub fn class_name(config: &Json) -> Option<&str> {
    let obj = config.as_object()?;
    let class = ["path", "class_path", "name"]
        .iter()
        .find_map(|k| obj.get(*k))?
        .as_str()?;
    class.rsplit('.').next()
}

/// App directory names to look in: the app `deploy_map` deploys to `@ALL` (if any), then `app`.
fn app_candidates(dir: &Path, meta: &Json) -> Vec<PathBuf> {
    let mut apps = Vec::new();
    if let Some(map) = meta.get("deploy_map").and_then(Json::as_object) {
        for (app, sites) in map {
            let to_all = sites
                .as_array()
                .is_some_and(|s| s.iter().any(|v| v.as_str() == Some("@ALL")));
            if to_all {
                apps.push(dir.join(app));
            }
        }
    }
    let default = dir.join("app");
    if !apps.contains(&default) {
        apps.push(default);
    }
    apps
}

/// `<app>/config/<file>` for the first app that has it, else `DIR/<file>`.
fn find_config(dir: &Path, apps: &[PathBuf], file: &str) -> Result<PathBuf, CliError> {
    let mut looked = Vec::new();
    for app in apps {
        let p = app.join("config").join(file);
        if p.is_file() {
            return Ok(p);
        }
        looked.push(p);
    }
    let top = dir.join(file);
    if top.is_file() {
        return Ok(top);
    }
    looked.push(top);
    let looked: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    Err(CliError::BadJob {
        path: dir.to_owned(),
        reason: format!("no {file} (looked at {})", looked.join(", ")),
    })
}

fn read_json(path: &Path) -> Result<Json, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::io("cannot read", path, e))?;
    serde_json::from_str(&text).map_err(|source| CliError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Replaces every string that is exactly `"{name}"` by the config's top-level value `name`
/// (NVFlare's config variables). Top-level values themselves are not substituted; an unknown
/// name is an error.
fn substitute_vars(config: &mut Json) -> Result<(), String> {
    let Some(top) = config.as_object() else {
        return Ok(());
    };
    let vars: serde_json::Map<String, Json> = top
        .iter()
        .filter(|(_, v)| !v.is_object() && !v.is_array())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    fn walk(v: &mut Json, vars: &serde_json::Map<String, Json>) -> Result<(), String> {
        match v {
            Json::String(s) => {
                if let Some(name) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                    if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                        *v = vars
                            .get(name)
                            .cloned()
                            .ok_or_else(|| format!("unknown config variable {{{name}}}"))?;
                    }
                }
                Ok(())
            }
            Json::Array(items) => items.iter_mut().try_for_each(|i| walk(i, vars)),
            Json::Object(map) => map.values_mut().try_for_each(|i| walk(i, vars)),
            _ => Ok(()),
        }
    }
    if let Some(obj) = config.as_object_mut() {
        for value in obj.values_mut() {
            if value.is_object() || value.is_array() {
                walk(value, &vars)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_variables_are_replaced_with_their_typed_values() {
        let mut c = json!({
            "num_rounds": 3,
            "workflows": [{"args": {"num_rounds": "{num_rounds}", "label": "{not a var}"}}]
        });
        substitute_vars(&mut c).unwrap();
        assert_eq!(c["workflows"][0]["args"]["num_rounds"], json!(3));
        assert_eq!(c["workflows"][0]["args"]["label"], json!("{not a var}"));
        let mut unknown = json!({"workflows": [{"args": {"x": "{missing}"}}]});
        assert!(substitute_vars(&mut unknown)
            .unwrap_err()
            .contains("missing"));
    }

    #[test]
    fn builtin_job_is_the_example_directory() {
        let builtin = JobDefinition::builtin_logreg().unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/logreg");
        let loaded = JobDefinition::load(&dir).unwrap();
        assert_eq!(builtin.client_config, loaded.client_config);
        assert_eq!(builtin.server_config, loaded.server_config);
        assert_eq!(loaded.name, "logreg");
    }

    #[test]
    fn a_directory_without_configs_is_a_bad_job_naming_the_missing_file() {
        let dir = std::env::temp_dir().join(format!("fedrun-empty-job-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = JobDefinition::load(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.to_string().contains(CLIENT_CONFIG_FILE), "{err}");
    }

    #[test]
    fn overrides_reach_every_scatter_and_gather_workflow_and_the_meta() {
        let mut job = JobDefinition::builtin_logreg().unwrap();
        job.set_min_clients(7).unwrap();
        job.set_num_rounds(9).unwrap();
        assert_eq!(job.set_seed(5), 1);
        assert_eq!(job.num_rounds(), Some(9));
        assert_eq!(job.meta["min_clients"], json!(7));
        let i = job.sag_workflows().unwrap()[0];
        assert_eq!(
            job.server_config["workflows"][i]["args"]["min_clients"],
            json!(7)
        );
        assert_eq!(
            job.client_config["executors"][0]["executor"]["args"]["seed"],
            json!(5)
        );
    }
}
