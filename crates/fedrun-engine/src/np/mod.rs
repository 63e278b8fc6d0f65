//! NVFlare's numpy example executors (`NPTrainer`, `NPValidator`) as fedrun components.
//!
//! NVFlare's hello-numpy jobs are how most people first meet a federated job, and they name
//! their executors by NVFlare class path. For fedrun to run those jobs unchanged — in
//! `fedrun simulate` and as the client job of a real deployment — the classes must exist here
//! under the same paths, take the same arguments with the same defaults, compute the same
//! numbers and answer with the same DXOs and return codes:
//!
//! - [`NpTrainer`] ([`NP_TRAINER_CLASS`]): `train` adds `delta` to the `numpy_key` array of the
//!   received `WEIGHTS` DXO (numpy's in-place rules, see [`ops`]), saves it as the local model
//!   and returns it with meta `NUM_STEPS_CURRENT_ROUND = 1`; `submit_model` returns the saved
//!   local model;
//! - [`NpValidator`] ([`NP_VALIDATOR_CLASS`]): `validate` scores the received model with
//!   `sum(a / max(a)) + random()` as a `METRICS` DXO `{"accuracy": ...}`.
//!
//! [`np_factories`] returns both factories under their NVFlare class paths; configs naming the
//! short class (`"name": "NPTrainer"`) find them through the registry's last-segment lookup.
//! Both honour `sleep_time` the way NVFlare's do (half-second steps), but return as soon as the
//! task's abort signal fires, with `TASK_ABORTED`.
//!
//! NVFlare's server-side numpy components for cross-site validation (`NPModelLocator`,
//! `NPFormatter`) are not here.

use std::path::{Component as PathPart, Path, PathBuf};
use std::time::Duration;

use fedrun_cell::AbortSignal;
use fedrun_core::{AppReturnCode, FlContext, NdArray, Shareable};
use serde_json::Value as Json;

use crate::executor::executor_factory;
use crate::registry::ComponentFactory;

pub mod ops;
pub mod trainer;
pub mod validator;

pub use ops::{add_delta, add_delta_owned, normalized_sum, Delta, FloatWidth};
pub use trainer::{NpTrainer, NpTrainerArgs};
pub use validator::{NpValidator, NpValidatorArgs};

/// NVFlare's class path of the numpy trainer.
pub const NP_TRAINER_CLASS: &str = "nvflare.app_common.np.np_trainer.NPTrainer";
/// NVFlare's class path of the numpy validator.
pub const NP_VALIDATOR_CLASS: &str = "nvflare.app_common.np.np_validator.NPValidator";
/// The DXO data key of the model array in NVFlare's numpy examples (`NPConstants.NUMPY_KEY`).
pub const NUMPY_KEY: &str = "numpy_key";
/// The DXO meta key of the number of local steps (`MetaKey.NUM_STEPS_CURRENT_ROUND`).
pub const NUM_STEPS_CURRENT_ROUND: &str = "NUM_STEPS_CURRENT_ROUND";
/// The task header of the current round (`AppConstants.CURRENT_ROUND`).
pub const CURRENT_ROUND: &str = "current_round";
/// The task header of the number of rounds (`AppConstants.NUM_ROUNDS`).
pub const NUM_ROUNDS: &str = "num_rounds";
/// The task header naming the owner of a model to validate (`AppConstants.MODEL_OWNER`).
pub const MODEL_OWNER: &str = "_model_owner_";
/// NVFlare's train task name (`AppConstants.TASK_TRAIN`).
pub const TASK_TRAIN: &str = "train";
/// NVFlare's submit-model task name (`AppConstants.TASK_SUBMIT_MODEL`).
pub const TASK_SUBMIT_MODEL: &str = "submit_model";
/// NVFlare's validation task name (`AppConstants.TASK_VALIDATION`).
pub const TASK_VALIDATION: &str = "validate";

/// The largest local model file `submit_model` reads (2 GiB); a larger file is refused as
/// unreadable, as any other bad file.
pub const MAX_LOCAL_MODEL_BYTES: u64 = 2 << 30;

/// The step of NVFlare's sleep loop: it checks the abort signal every half second.
const SLEEP_STEP_SECS: f64 = 0.5;

/// The numpy executors' factories under their NVFlare class paths, for one site.
///
/// `run_dir` is the job's run directory at this site (NVFlare's `workspace.get_run_dir(job_id)`,
/// `<workspace>/<job_id>` in a deployment): `NPTrainer` keeps its local model under it, at
/// `<run_dir>/<model_dir>/<model_name>`.
///
/// # Example
/// ```
/// use fedrun_engine::np::{np_factories, NP_TRAINER_CLASS};
/// use fedrun_engine::{executor_of, BuildArgs};
///
/// let factories = np_factories(std::env::temp_dir().join("run"));
/// let (class, trainer) = &factories[0];
/// assert_eq!(class, NP_TRAINER_CLASS);
/// assert!(executor_of(&trainer(BuildArgs::default()).unwrap()).is_some());
/// let mut bad = BuildArgs::default();
/// bad.args.insert("delta".into(), serde_json::json!("one"));
/// assert!(trainer(bad).is_err());
/// ```
pub fn np_factories(run_dir: impl Into<PathBuf>) -> Vec<(String, ComponentFactory)> {
    let run_dir = run_dir.into();
    let trainer = executor_factory(move |args: crate::BuildArgs| {
        let args = NpTrainerArgs::from_json(&args.args).map_err(|e| e.to_string())?;
        Ok(NpTrainer::new(args, run_dir.clone()))
    });
    let validator = executor_factory(|args: crate::BuildArgs| {
        let args = NpValidatorArgs::from_json(&args.args).map_err(|e| e.to_string())?;
        Ok(NpValidator::new(args))
    });
    vec![
        (NP_TRAINER_CLASS.to_owned(), trainer),
        (NP_VALIDATOR_CLASS.to_owned(), validator),
    ]
}

/// What is wrong with a numpy component's arguments or local model path.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum NpError {
    /// An argument has a type the NVFlare class refuses (or cannot use).
    #[error("{class}: {reason}")]
    BadArgument {
        /// The class (`NPTrainer`, `NPValidator`).
        class: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An argument the NVFlare class does not take (Python's "unexpected keyword argument").
    #[error("{class}: unexpected argument '{arg}'")]
    UnknownArgument {
        /// The class.
        class: &'static str,
        /// The argument.
        arg: String,
    },
    /// `model_dir`/`model_name` is absolute or leaves the run directory.
    #[error("model path {path} must be relative to and stay inside {root}")]
    PathOutsideRoot {
        /// The relative path asked for.
        path: String,
        /// The root it must stay in.
        root: String,
    },
}

/// Reads the `args` of a numpy component, one argument at a time, and refuses the rest.
struct ArgReader<'a> {
    class: &'static str,
    args: &'a serde_json::Map<String, Json>,
    known: Vec<&'static str>,
}

impl<'a> ArgReader<'a> {
    fn new(class: &'static str, args: &'a serde_json::Map<String, Json>) -> Self {
        Self {
            class,
            args,
            known: Vec::new(),
        }
    }

    fn bad(&self, reason: String) -> NpError {
        NpError::BadArgument {
            class: self.class,
            reason,
        }
    }

    fn raw(&mut self, name: &'static str) -> Option<&'a Json> {
        self.known.push(name);
        self.args.get(name)
    }

    fn string(&mut self, name: &'static str, default: &str) -> Result<String, NpError> {
        match self.raw(name) {
            None => Ok(default.to_owned()),
            Some(Json::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.bad(format!("{name} must be a string, got {other}"))),
        }
    }

    /// A number of seconds (Python compares it with floats; a bool counts as 0/1).
    fn seconds(&mut self, name: &'static str) -> Result<f64, NpError> {
        match self.raw(name) {
            None => Ok(0.0),
            Some(Json::Bool(b)) => Ok(f64::from(u8::from(*b))),
            Some(Json::Number(n)) => n
                .as_f64()
                .filter(|s| s.is_finite())
                .ok_or_else(|| self.bad(format!("{name} must be a finite number, got {n}"))),
            Some(other) => Err(self.bad(format!("{name} must be a number, got {other}"))),
        }
    }

    fn finish(self) -> Result<(), NpError> {
        let mut unknown: Vec<&String> = self
            .args
            .keys()
            .filter(|k| !self.known.contains(&k.as_str()))
            .collect();
        unknown.sort();
        match unknown.first() {
            Some(arg) => Err(NpError::UnknownArgument {
                class: self.class,
                arg: (*arg).clone(),
            }),
            None => Ok(()),
        }
    }
}

/// NVFlare's sleep loop (`while count < sleep_time: check abort; sleep 0.5; count += 0.5`):
/// sleeps `sleep_time` rounded up to a half second, and returns `false` as soon as `abort`
/// fires (at once when it already has). Needs a tokio runtime with timers when it sleeps.
async fn sleep_unless_aborted(sleep_time: f64, abort: &AbortSignal) -> bool {
    if sleep_time <= 0.0 {
        return true;
    }
    if abort.is_triggered() {
        return false;
    }
    let steps = (sleep_time / SLEEP_STEP_SECS).ceil();
    let total = Duration::from_secs_f64(steps * SLEEP_STEP_SECS);
    tokio::select! {
        biased;
        _ = abort.triggered() => false,
        _ = tokio::time::sleep(total) => true,
    }
}

/// A reply carrying only a return code (NVFlare's `make_reply`).
fn reply(rc: AppReturnCode) -> Shareable {
    Shareable::make_reply(rc, None)
}

/// `[job=.. site=..]` for log lines, from the task's context.
fn log_prefix(ctx: &FlContext) -> String {
    format!(
        "[job={} site={}]",
        ctx.job_id().unwrap_or_default(),
        ctx.identity_name()
    )
}

/// NVFlare's `resolve_path_under_root` without the file system: `relative` must not be
/// absolute and, read lexically (`..` pops a level), must stay inside `root`.
///
/// Symbolic links are not followed (NVFlare resolves them); a link inside the run directory
/// that points elsewhere is therefore not refused.
///
/// # Example
/// ```
/// use std::path::Path;
/// use fedrun_engine::np::resolve_under_root;
///
/// let root = Path::new("/ws/job-1");
/// assert_eq!(resolve_under_root(root, "model/a/../best.npy").unwrap(),
///            Path::new("/ws/job-1/model/best.npy"));
/// assert!(resolve_under_root(root, "../other/best.npy").is_err());
/// assert!(resolve_under_root(root, "/etc/passwd").is_err());
/// ```
pub fn resolve_under_root(root: &Path, relative: &str) -> Result<PathBuf, NpError> {
    let outside = || NpError::PathOutsideRoot {
        path: relative.to_owned(),
        root: root.display().to_string(),
    };
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for part in Path::new(relative).components() {
        match part {
            PathPart::Normal(p) => parts.push(p),
            PathPart::CurDir => {}
            PathPart::ParentDir => {
                parts.pop().ok_or_else(outside)?;
            }
            PathPart::RootDir | PathPart::Prefix(_) => return Err(outside()),
        }
    }
    let mut path = root.to_owned();
    path.extend(parts);
    Ok(path)
}

/// Runs blocking file work off the actor thread when a tokio runtime is there (the actix one),
/// inline otherwise (e.g. under `futures::executor::block_on`). `Err` if the work panicked.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| format!("file work failed: {e}")),
        Err(_) => Ok(f()),
    }
}

/// Writes `array` as a `.npy` file (what `numpy.save` writes for it), creating the directory.
fn save_npy(path: &Path, array: &NdArray) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, array.npy())
}

/// Reads a `.npy` file (`numpy.load(allow_pickle=False)`), refusing files over
/// [`MAX_LOCAL_MODEL_BYTES`] before reading them.
fn load_npy(path: &Path) -> Result<NdArray, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_LOCAL_MODEL_BYTES {
        return Err(format!(
            "{}: {} bytes is more than the {MAX_LOCAL_MODEL_BYTES} a local model may have",
            path.display(),
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    NdArray::from_npy(bytes.into()).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_arguments_are_refused_by_name() {
        let args = serde_json::json!({"delta": 2, "learning_rate": 0.1});
        let err = NpTrainerArgs::from_json(args.as_object().unwrap()).unwrap_err();
        assert_eq!(
            err,
            NpError::UnknownArgument {
                class: "NPTrainer",
                arg: "learning_rate".into()
            }
        );
    }

    #[actix::test]
    async fn sleep_returns_false_promptly_when_aborted() {
        let abort = AbortSignal::new();
        let trigger = abort.clone();
        let started = std::time::Instant::now();
        actix::spawn(async move { trigger.trigger() });
        assert!(!sleep_unless_aborted(30.0, &abort).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            sleep_unless_aborted(0.0, &abort).await,
            "no sleep, no check"
        );
    }
}
