//! The errors of the server job.
//!
//! One enum for the crate, so that the CLI and workflows match on one type. Each variant carries
//! what the caller needs to act on the failure, and its message reads on its own in a log line.
//! Protocol problems caused by a *client* (a bad `get_task`, a late result) are never errors
//! here: the server answers them on the wire as NVFlare does and logs them.

use std::path::PathBuf;

use fedrun_cell::CellError;
use fedrun_core::CoreError;
use fedrun_engine::EngineError;

/// What can go wrong in the server job, its workflows, aggregators, persistors and config.
///
/// # Example
/// ```
/// use fedrun_server::ServerError;
///
/// let e = ServerError::NotEnoughResponses { got: 1, needed: 2 };
/// assert_eq!(e.to_string(), "not enough successful responses: got 1, needed 2");
/// let round = ServerError::RoundFailed { round: 3, source: Box::new(e) };
/// assert!(round.to_string().contains("round 3"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The cell layer failed (bad job id for a cell name, duplicate cell, stopped cell).
    #[error("cell: {0}")]
    Cell(#[from] CellError),
    /// An engine actor (run info, aux runner, component registry) failed.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// Data-model error (invalid DXO, invalid array, ...).
    #[error("data: {0}")]
    Core(#[from] CoreError),
    /// An actor of the server job has stopped (its mailbox is closed).
    #[error("the {actor} actor is gone (mailbox closed)")]
    ActorGone {
        /// Which actor.
        actor: &'static str,
    },
    /// A task target is not a client of this job.
    #[error("unknown client {0}: not a client of this job")]
    UnknownClient(String),
    /// A task cannot be posted as asked (no targets, more responses needed than targets, ...).
    #[error("invalid task: {0}")]
    InvalidTask(String),
    /// The task ended (timeout, or every target answered) with fewer successful results than
    /// required.
    #[error("not enough successful responses: got {got}, needed {needed}")]
    NotEnoughResponses {
        /// Successful results received (return code `OK`).
        got: usize,
        /// Successful results required.
        needed: usize,
    },
    /// The wait was aborted (the caller's abort signal or the run's).
    #[error("aborted")]
    Aborted,
    /// The run has ended: no task can be posted or awaited any more.
    #[error("the run has ended")]
    RunEnded,
    /// A round of a workflow failed.
    #[error("round {round} failed: {source}")]
    RoundFailed {
        /// The round number.
        round: u32,
        /// Why.
        #[source]
        source: Box<ServerError>,
    },
    /// Arrays to aggregate have different shapes.
    #[error("array '{name}' from {client} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The array's name in the DXO data.
        name: String,
        /// The client whose array differs.
        client: String,
        /// The shape of the first contribution.
        expected: Vec<usize>,
        /// The shape of this one.
        got: Vec<usize>,
    },
    /// Aggregation failed for another reason (unsupported dtype, no contribution, bad weight...).
    #[error("aggregation failed: {0}")]
    Aggregation(String),
    /// A model (DXO data map) is not a map of named float arrays.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// A persistor has no model to start from.
    #[error("no initial model: {0}")]
    NoInitialModel(String),
    /// Reading or writing a model file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A model file exists but its content is not what fedrun wrote.
    #[error("{path}: {reason}")]
    BadModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The server job config (`config_fed_server.json`) is malformed.
    #[error("bad server config: {0}")]
    Config(String),
    /// A component of the server job config could not be built.
    #[error("component {id}: {source}")]
    Component {
        /// The component's id in the config.
        id: String,
        /// Why.
        #[source]
        source: EngineError,
    },
    /// No workflow factory is registered for the class a config names.
    #[error("unknown workflow class {0}")]
    UnknownWorkflowClass(String),
    /// A workflow's factory failed.
    #[error("failed to build workflow {id} ({class}): {reason}")]
    WorkflowBuild {
        /// The workflow's id in the config.
        id: String,
        /// Its class.
        class: String,
        /// The factory's error text (or panic message).
        reason: String,
    },
    /// A workflow panicked; the run was ended.
    #[error("workflow {workflow} panicked: {message}")]
    WorkflowPanicked {
        /// The workflow's name.
        workflow: String,
        /// The panic message.
        message: String,
    },
    /// A blocking job (aggregation, persistence) panicked or was cancelled.
    #[error("{what} panicked or was cancelled: {reason}")]
    BlockingJob {
        /// What was running.
        what: &'static str,
        /// The join error.
        reason: String,
    },
}

impl ServerError {
    /// The error of an actor whose mailbox is closed.
    pub(crate) fn gone(actor: &'static str) -> impl FnOnce(actix::MailboxError) -> ServerError {
        move |_| ServerError::ActorGone { actor }
    }
}
