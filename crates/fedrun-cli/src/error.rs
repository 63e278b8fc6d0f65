//! The errors of `fedrun simulate`.
//!
//! One enum for the crate: everything that can stop a simulation (bad arguments, a bad job
//! directory, an engine or server job that fails to start, a run that fails, a file that cannot
//! be written) ends up as a [`CliError`] whose message says what to fix, and `main` turns it into
//! a non-zero exit code.

use std::path::PathBuf;

use fedrun_core::CoreError;
use fedrun_engine::EngineError;
use fedrun_server::ServerError;

/// What can go wrong in `fedrun simulate`.
///
/// # Example
/// ```
/// use fedrun_cli::CliError;
///
/// let e = CliError::BadJob { path: "jobs/x".into(), reason: "no config_fed_client.json".into() };
/// assert_eq!(e.to_string(), "bad job jobs/x: no config_fed_client.json");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// A command-line value is unusable (e.g. zero clients).
    #[error("invalid option --{option}: {reason}")]
    BadOption {
        /// The option's long name.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// A job directory or one of its config files is malformed.
    #[error("bad job {}: {reason}", path.display())]
    BadJob {
        /// The job directory or config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A component's argument is missing, of the wrong type or out of range.
    #[error("bad argument '{arg}' of {component}: {reason}")]
    BadArgument {
        /// The component (class) whose argument it is.
        component: String,
        /// The argument's name.
        arg: String,
        /// What is wrong.
        reason: String,
    },
    /// A file or directory could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot read", "cannot create", ...).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A client job engine failed.
    #[error("client {site}: {source}")]
    Engine {
        /// The client site.
        site: String,
        /// The engine's error.
        #[source]
        source: EngineError,
    },
    /// The server job failed to start (bad server config, cell, actors).
    #[error("server job: {0}")]
    Server(#[from] ServerError),
    /// A model or a DXO is not what the job expects.
    #[error("bad model data: {0}")]
    Model(#[from] CoreError),
    /// The run did not finish: it was aborted, or the workflow failed.
    #[error("the run did not complete: {0}")]
    RunFailed(String),
    /// The command line of `fedrun job` is not what NVFlare's client parent passes.
    #[error("fedrun job: {0}")]
    JobArgs(#[from] crate::cj::args::ArgsError),
    /// The site's startup kit or the connection options cannot be used.
    #[error("fedrun job: {0}")]
    Startup(#[from] crate::cj::startup::StartupError),
    /// Part of the run did not finish in time.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline, in seconds.
        secs: u64,
    },
}

impl CliError {
    /// An [`CliError::Io`] for `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
