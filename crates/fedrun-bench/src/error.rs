//! The one error type of the benchmark harness, so that every failure (a bad argument, a child
//! process that did not answer, a cell or engine that could not start) reaches the orchestrator's
//! report as a typed, readable message instead of a panic.

use std::path::PathBuf;

/// Everything that can go wrong in `fedrun-cellbench`.
///
/// # Example
///
/// ```
/// use fedrun_bench::BenchError;
///
/// let e = BenchError::Usage("--count needs a number".into());
/// assert_eq!(e.to_string(), "usage: --count needs a number");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A command-line argument is missing, unknown or malformed.
    #[error("usage: {0}")]
    Usage(String),
    /// Reading or writing a file, or talking to a child process, failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A results file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A JSON document (a child's line, a results file) did not parse.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A child process failed, said `ERROR`, or did not answer in time.
    #[error("child {name}: {reason}")]
    Child {
        /// The child's cell name.
        name: String,
        /// What happened.
        reason: String,
    },
    /// A deadline passed before the awaited event.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A scenario could not complete (its peer never answered, a transfer was wrong, ...).
    #[error("scenario: {0}")]
    Scenario(String),
    /// A cell could not start or was stopped.
    #[error("cell: {0}")]
    Cell(#[from] fedrun_cell::CellError),
    /// The TCP transport refused a listener or a connector.
    #[error("wire: {0}")]
    Wire(#[from] fedrun_wire::WireError),
    /// An engine call failed.
    #[error("engine: {0}")]
    Engine(#[from] fedrun_engine::EngineError),
    /// An actor's mailbox was closed.
    #[error("actor gone: {0}")]
    ActorGone(#[from] actix::MailboxError),
}
